//! The virtio-blk device: initialisation (virtio 1.2 §3.1.1), geometry, and the
//! [`BlockDevice`] implementation over one [`RequestQueue`].

use super::queue::{Chain, Owner, QueueError, RequestQueue};
use super::regs::{self, config, BlkFeatures, SECTOR_SIZE};
use super::{VirtioBlkConfig, VirtioBlkError};
use crate::block::{
    validate, BlockDevice, BlockError, BlockRequest, BlockStats, Completion, Geometry, Operation,
    PollOutcome, Rejected,
};
use crate::hal::PciAddress;
use crate::info::{reason, DeviceInfo, DeviceName, DeviceState, FixedString};
use crate::virtio::{assign_config, assign_queue, choose_queue_size, AnyQueue, VectorConfig};
use alloc::collections::VecDeque;
use log::{error, info, warn};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::Hal;

/// MSI-X table entries to program into the device (`None`: no interrupt for that source, e.g.
/// when polling or in tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VectorAssignment {
    /// Entry for configuration-change interrupts.
    pub config_entry: Option<u16>,
    /// Entry for queue 0.
    pub queue_entry: Option<u16>,
    /// CPU vectors behind those entries, for [`DeviceInfo`].
    pub cpu_vectors: [Option<u8>; 2],
}

/// The virtio-blk driver for one device: generic over the virtio HAL and the transport
/// (`PciTransport` in the kernel, a fake in tests).
#[derive(Debug)]
pub struct VirtioBlk<H: Hal, T: Transport> {
    name: DeviceName,
    pci: Option<PciAddress>,
    transport: T,
    assignment: VectorAssignment,
    queue: RequestQueue<H>,
    features: BlkFeatures,
    geometry: Geometry,
    serial: FixedString<20>,
    /// Requests finished without the device (flush without a cache) or aborted by a failure;
    /// delivered by the next poll. Capacity: queue depth (never grows).
    ready: VecDeque<Completion>,
    stats: BlockStats,
    state: DeviceState,
    config_changed: bool,
    /// Completions delivered so far, and when requests in flight last saw one arrive (or
    /// the queue was empty): the stalled-device check ([`REQUEST_TIMEOUT_NS`]).
    completed: u64,
    watchdog: (u64, u64),
}

/// A device with requests in flight that completes none of them for this long is failed
/// (Linux's block-layer default timeout is 30 s too).
pub const REQUEST_TIMEOUT_NS: u64 = 30_000_000_000;

/// Reads `T` at `offset` of the device configuration, `None` when the device's configuration
/// space is too short for it.
fn read_config<T: Transport>(transport: &T, offset: usize) -> Result<Option<u32>, VirtioBlkError> {
    match transport.read_config_space::<u32>(offset) {
        Ok(v) => Ok(Some(v)),
        Err(virtio_drivers::Error::ConfigSpaceTooSmall) => Ok(None),
        Err(e) => Err(VirtioBlkError::Virtio(e)),
    }
}

impl<H: Hal, T: Transport> VirtioBlk<H, T> {
    /// Initialises the device: reset, feature negotiation, MSI-X vectors, queue 0, geometry,
    /// DRIVER_OK; then queues a `GET_ID` whose answer fills in the serial on a later poll.
    ///
    /// On error the device is left reset (status 0).
    pub fn new<V: VectorConfig>(
        name: DeviceName,
        pci: Option<PciAddress>,
        mut transport: T,
        mut vectors: Option<V>,
        assignment: VectorAssignment,
        config: VirtioBlkConfig,
    ) -> Result<Self, VirtioBlkError> {
        if transport.device_type() != DeviceType::Block {
            return Err(VirtioBlkError::NotBlockDevice);
        }
        let result = Self::bring_up(&mut transport, vectors.as_mut(), assignment, config);
        let (queue, features, geometry) = match result {
            Ok(parts) => parts,
            Err(e) => {
                transport.set_status(DeviceStatus::FAILED);
                transport.set_status(DeviceStatus::empty());
                return Err(e);
            }
        };
        let depth = usize::from(queue.depth());
        let mut device = Self {
            name,
            pci,
            transport,
            assignment,
            queue,
            features,
            geometry,
            serial: FixedString::new(),
            ready: VecDeque::with_capacity(depth),
            stats: BlockStats::default(),
            state: DeviceState::Online,
            config_changed: false,
            completed: 0,
            watchdog: (0, 0),
        };
        if let Err((_, e)) = device.queue.submit(
            &mut device.transport,
            Owner::GetId,
            Chain::GetId,
            regs::T_GET_ID,
            0,
            None,
        ) {
            warn!("{}: cannot queue GET_ID: {e:?}", device.name);
        }
        info!(
            "{}: virtio-blk, {} blocks of {} bytes, queue {}x{}, cache {}",
            device.name,
            geometry.capacity_blocks,
            geometry.block_size,
            device.queue.size(),
            device.queue.depth(),
            if geometry.volatile_write_cache {
                "write-back"
            } else {
                "write-through"
            }
        );
        Ok(device)
    }

    fn bring_up<V: VectorConfig>(
        transport: &mut T,
        vectors: Option<&mut V>,
        assignment: VectorAssignment,
        config: VirtioBlkConfig,
    ) -> Result<(RequestQueue<H>, BlkFeatures, Geometry), VirtioBlkError> {
        let mut supported = BlkFeatures::VERSION_1
            | BlkFeatures::SIZE_MAX
            | BlkFeatures::SEG_MAX
            | BlkFeatures::RO
            | BlkFeatures::BLK_SIZE
            | BlkFeatures::FLUSH
            | BlkFeatures::TOPOLOGY
            | BlkFeatures::CONFIG_WCE
            | BlkFeatures::DISCARD;
        if config.event_idx {
            supported |= BlkFeatures::RING_EVENT_IDX;
        }
        let features = transport.begin_init(supported);
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(VirtioBlkError::FeaturesRejected);
        }
        if !features.contains(BlkFeatures::VERSION_1) {
            return Err(VirtioBlkError::LegacyDevice);
        }

        let mut vectors = vectors;
        if let (Some(v), Some(entry)) = (vectors.as_mut(), assignment.config_entry) {
            assign_config(&mut **v, entry)?;
        }
        let max = transport.max_queue_size(0);
        let size = choose_queue_size(max, config.max_queue_size)
            .ok_or(VirtioBlkError::QueueTooSmall(max))?;
        let queue = AnyQueue::<H>::new(
            transport,
            0,
            size,
            features.contains(BlkFeatures::RING_EVENT_IDX),
        )?;
        // The vector is set after the queue's addresses and before DRIVER_OK, as Linux does.
        if let (Some(v), Some(entry)) = (vectors.as_mut(), assignment.queue_entry) {
            assign_queue(&mut **v, 0, entry)?;
        }
        let queue = RequestQueue::new(queue, 0, config.max_depth)?;
        let geometry = Self::read_geometry(transport, features, &queue, config)?;
        transport.finish_init();
        Ok((queue, features, geometry))
    }

    fn read_geometry(
        transport: &T,
        features: BlkFeatures,
        queue: &RequestQueue<H>,
        config: VirtioBlkConfig,
    ) -> Result<Geometry, VirtioBlkError> {
        transport
            .read_consistent(|| {
                let low = read_config(transport, config::CAPACITY)
                    .map_err(|_| virtio_drivers::Error::IoError)?;
                let high = read_config(transport, config::CAPACITY + 4)
                    .map_err(|_| virtio_drivers::Error::IoError)?;
                let (Some(low), Some(high)) = (low, high) else {
                    return Err(virtio_drivers::Error::ConfigSpaceTooSmall);
                };
                let capacity_sectors = u64::from(high) << 32 | u64::from(low);
                let read = |offset, feature| -> Result<Option<u32>, virtio_drivers::Error> {
                    if features.contains(feature) {
                        read_config(transport, offset).map_err(|_| virtio_drivers::Error::IoError)
                    } else {
                        Ok(None)
                    }
                };
                let block_size = read(config::BLK_SIZE, BlkFeatures::BLK_SIZE)?.unwrap_or(512);
                let size_max = read(config::SIZE_MAX, BlkFeatures::SIZE_MAX)?;
                let writeback = if features.contains(BlkFeatures::CONFIG_WCE) {
                    transport
                        .read_config_space::<u8>(config::WRITEBACK)
                        .ok()
                        .map(|w| w != 0)
                } else {
                    None
                };
                let max_discard_sectors =
                    read(config::MAX_DISCARD_SECTORS, BlkFeatures::DISCARD)?.unwrap_or(0);
                Ok((
                    capacity_sectors,
                    block_size,
                    size_max,
                    writeback,
                    max_discard_sectors,
                ))
            })
            .map_err(VirtioBlkError::Virtio)
            .and_then(
                |(capacity_sectors, block_size, size_max, writeback, max_discard_sectors)| {
                    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
                        return Err(VirtioBlkError::BadBlockSize(block_size));
                    }
                    let sectors_per_block = u64::from(block_size) / SECTOR_SIZE;
                    let mut max_transfer = config.max_transfer_bytes;
                    if let Some(size_max) = size_max.filter(|&s| s > 0) {
                        max_transfer = max_transfer.min(size_max);
                    }
                    max_transfer -= max_transfer % block_size;
                    if max_transfer == 0 {
                        return Err(VirtioBlkError::BadBlockSize(block_size));
                    }
                    let flush = features.contains(BlkFeatures::FLUSH);
                    // Linux's rule (virtblk_get_cache_mode): with CONFIG_WCE the field decides,
                    // otherwise a device offering FLUSH has a write-back cache.
                    let volatile_write_cache = flush && writeback.unwrap_or(true);
                    let discard =
                        features.contains(BlkFeatures::DISCARD) && max_discard_sectors > 0;
                    Ok(Geometry {
                        block_size,
                        capacity_blocks: capacity_sectors / sectors_per_block,
                        max_transfer_bytes: max_transfer,
                        queue_count: 1,
                        queue_depth: queue.depth(),
                        volatile_write_cache,
                        fua: false,
                        discard,
                        max_discard_blocks: if discard {
                            (u64::from(max_discard_sectors) / sectors_per_block) as u32
                        } else {
                            0
                        },
                        read_only: features.contains(BlkFeatures::RO),
                    })
                },
            )
    }

    /// Negotiated features.
    pub fn features(&self) -> BlkFeatures {
        self.features
    }

    /// The serial (empty until the `GET_ID` answer has been polled).
    pub fn serial(&self) -> &str {
        self.serial.as_str()
    }

    /// Whether a configuration-change interrupt arrived (capacity change); cleared on read.
    pub fn take_config_changed(&mut self) -> bool {
        core::mem::take(&mut self.config_changed)
    }

    /// After a configuration-change interrupt: a device that needs a reset has failed
    /// (virtio 1.2 §2.1.2). A larger capacity (QEMU `block_resize`, a grown volume) is taken
    /// at once: new requests may use it, and a whole-device COW store can be extended into
    /// it (`snapshot extend`); an origin's volume keeps the size its engine was set up with.
    /// A smaller one is reported, not applied: data the layers above placed past the new end
    /// would be lost, and requests there fail at the device anyway.
    fn check_configuration(&mut self) {
        if self
            .transport
            .get_status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
        {
            self.fail(reason(format_args!("device needs reset")));
            return;
        }
        let low = read_config(&self.transport, config::CAPACITY);
        let high = read_config(&self.transport, config::CAPACITY + 4);
        if let (Ok(Some(low)), Ok(Some(high))) = (low, high) {
            let sectors = u64::from(high) << 32 | u64::from(low);
            let blocks = sectors / (u64::from(self.geometry.block_size) / SECTOR_SIZE);
            if blocks > self.geometry.capacity_blocks {
                info!(
                    "{}: capacity grew from {} to {} blocks",
                    self.name, self.geometry.capacity_blocks, blocks
                );
                self.geometry.capacity_blocks = blocks;
            } else if blocks < self.geometry.capacity_blocks {
                warn!(
                    "{}: capacity shrank from {} to {} blocks (not applied)",
                    self.name, self.geometry.capacity_blocks, blocks
                );
            } else {
                info!("{}: configuration changed", self.name);
            }
        }
    }

    /// Gives up on the device: logs, resets it (so it stops DMA), and fails every request in
    /// flight; their buffers come back through the next polls.
    fn fail(&mut self, why: crate::info::Reason) {
        if matches!(self.state, DeviceState::Failed(_)) {
            return;
        }
        error!("{}: device failed: {}", self.name, why);
        self.state = DeviceState::Failed(why);
        self.transport.set_status(DeviceStatus::FAILED);
        self.transport.set_status(DeviceStatus::empty());
        let ready = &mut self.ready;
        let extra = &mut 0usize;
        self.queue.abandon(|owner| {
            if let Owner::User {
                tag,
                op,
                lba,
                buffer,
            } = owner
            {
                let completion = Completion {
                    tag,
                    op,
                    lba,
                    result: Err(BlockError::DeviceFailed),
                    buffer,
                };
                if ready.len() < ready.capacity() {
                    ready.push_back(completion);
                } else {
                    // Cannot happen: ready + in flight never exceed the depth. Keep the request
                    // rather than grow.
                    *extra += 1;
                }
            }
        });
        if *extra > 0 {
            error!("{}: {} aborted requests lost", self.name, extra);
        }
    }

    fn finish(&mut self, popped: super::queue::Popped) -> Option<Completion> {
        let result = match popped.status {
            regs::S_OK => Ok(()),
            regs::S_IOERR => Err(BlockError::Io),
            regs::S_UNSUPP => Err(BlockError::DeviceUnsupported),
            other => {
                warn!("{}: request completed with status {other:#x}", self.name);
                Err(BlockError::Io)
            }
        };
        match popped.owner {
            Owner::User {
                tag,
                op,
                lba,
                buffer,
            } => Some(Completion {
                tag,
                op,
                lba,
                result,
                buffer,
            }),
            Owner::GetId => {
                if result.is_ok() {
                    self.serial = FixedString::from_device_bytes(&popped.id);
                } else {
                    info!("{}: no serial ({:?})", self.name, result);
                }
                None
            }
        }
    }
}

impl<H: Hal, T: Transport> BlockDevice for VirtioBlk<H, T> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn submit(&mut self, request: BlockRequest) -> Result<(), Rejected> {
        if matches!(
            self.state,
            DeviceState::Failed(_) | DeviceState::InitFailed(_)
        ) {
            return Err(Rejected {
                error: BlockError::DeviceFailed,
                request,
            });
        }
        if let Err(error) = validate(&self.geometry, &request) {
            return Err(Rejected { error, request });
        }
        if self.queue.in_flight() + self.ready.len() >= usize::from(self.queue.depth()) {
            self.stats.queue_full += 1;
            return Err(Rejected {
                error: BlockError::QueueFull,
                request,
            });
        }
        let sectors_per_block = u64::from(self.geometry.block_size) / SECTOR_SIZE;
        let sector = request.lba * sectors_per_block;
        let (chain, request_type, discard) = match request.op {
            Operation::Read => (Chain::Read, regs::T_IN, None),
            // No FUA in virtio-blk: validation only lets FUA through without a volatile cache,
            // where every write is durable on completion anyway.
            Operation::Write { .. } => (Chain::Write, regs::T_OUT, None),
            Operation::Flush if !self.features.contains(BlkFeatures::FLUSH) => {
                // No FLUSH feature: the device has no volatile cache; complete on next poll.
                self.ready.push_back(request.complete(Ok(())));
                return Ok(());
            }
            Operation::Flush => (Chain::Flush, regs::T_FLUSH, None),
            Operation::Discard { blocks } => {
                let sectors = u64::from(blocks) * sectors_per_block;
                let sectors = u32::try_from(sectors).map_err(|_| ()).ok();
                match sectors {
                    Some(sectors) => (Chain::Discard, regs::T_DISCARD, Some((sector, sectors))),
                    None => {
                        return Err(Rejected {
                            error: BlockError::TooLarge {
                                bytes: usize::MAX,
                                max: self.geometry.max_transfer_bytes,
                            },
                            request,
                        })
                    }
                }
            }
        };
        let BlockRequest {
            tag,
            op,
            lba,
            buffer,
        } = request;
        let owner = Owner::User {
            tag,
            op,
            lba,
            buffer,
        };
        match self.queue.submit(
            &mut self.transport,
            owner,
            chain,
            request_type,
            sector,
            discard,
        ) {
            Ok(()) => Ok(()),
            Err((owner, error)) => {
                let Owner::User {
                    tag,
                    op,
                    lba,
                    buffer,
                } = owner
                else {
                    return Ok(());
                };
                let error = match error {
                    QueueError::Full => {
                        self.stats.queue_full += 1;
                        BlockError::QueueFull
                    }
                    other => {
                        warn!("{}: submit failed: {other:?}", self.name);
                        BlockError::Io
                    }
                };
                Err(Rejected {
                    error,
                    request: BlockRequest {
                        tag,
                        op,
                        lba,
                        buffer,
                    },
                })
            }
        }
    }

    fn poll_completions(&mut self, budget: usize, sink: &mut dyn FnMut(Completion)) -> PollOutcome {
        let mut completed = 0;
        while completed < budget {
            if let Some(completion) = self.ready.pop_front() {
                self.stats.record(&completion);
                self.completed += 1;
                sink(completion);
                completed += 1;
                continue;
            }
            if matches!(self.state, DeviceState::Failed(_)) {
                break;
            }
            match self.queue.pop() {
                Ok(Some(popped)) => {
                    // Any answer from the device (its own GET_ID too) is progress.
                    self.completed += 1;
                    if let Some(completion) = self.finish(popped) {
                        self.stats.record(&completion);
                        sink(completion);
                        completed += 1;
                    }
                }
                Ok(None) => break,
                Err(QueueError::UnknownToken(token)) => {
                    self.stats.errors += 1;
                    self.fail(reason(format_args!(
                        "used ring returned unknown token {token}"
                    )));
                }
                Err(e) => {
                    self.stats.errors += 1;
                    self.fail(reason(format_args!("used ring: {e:?}")));
                }
            }
        }
        let more = !self.ready.is_empty()
            || (!matches!(self.state, DeviceState::Failed(_)) && self.queue.has_used());
        PollOutcome { completed, more }
    }

    fn interrupt(&mut self, queue: u16) {
        self.stats.interrupts += 1;
        if queue == crate::msix::InterruptOwner::CONFIG_QUEUE {
            self.config_changed = true;
            self.check_configuration();
        }
    }

    fn in_flight(&self) -> usize {
        self.queue.in_flight() + self.ready.len()
    }

    fn check_timeouts(&mut self, now_ns: u64) -> bool {
        if matches!(self.state, DeviceState::Failed(_)) || self.queue.in_flight() == 0 {
            self.watchdog = (self.completed, now_ns);
            return false;
        }
        let (seen, since) = self.watchdog;
        if self.completed != seen {
            self.watchdog = (self.completed, now_ns);
            return false;
        }
        if now_ns.saturating_sub(since) < REQUEST_TIMEOUT_NS {
            return false;
        }
        let n = self.queue.in_flight();
        self.fail(reason(format_args!(
            "{n} requests in flight and none completed in {} s",
            REQUEST_TIMEOUT_NS / 1_000_000_000
        )));
        true
    }

    fn plug(&mut self) {
        self.queue.plug();
    }

    fn unplug(&mut self) {
        self.queue.unplug(&mut self.transport);
    }

    fn needs_polling(&self) -> bool {
        self.assignment.queue_entry.is_none()
    }

    fn stats(&self) -> BlockStats {
        self.stats
    }

    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(self.name, "virtio-blk");
        info.pci = self.pci;
        info.serial = self.serial;
        info.geometry = Some(self.geometry);
        let mut vectors = [0u8; 2];
        let mut n = 0;
        for v in self.assignment.cpu_vectors.iter().flatten() {
            vectors[n] = *v;
            n += 1;
        }
        info.set_vectors(&vectors[..n]);
        info.stats = self.stats;
        info.in_flight = self.in_flight();
        info.state = self.state;
        info
    }
}
