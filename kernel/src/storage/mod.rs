//! The appliance's disks: PCI discovery and driver bring-up at boot, the table of block
//! devices with their DMA buffer pools, and the completion path of the main loop.
//!
//! Interrupts: every device vector (0x30..=0xEF) runs [`on_device_interrupt`], which marks
//! the vector pending in the drivers' `VectorRegistry` and wakes the main loop; the loop
//! calls [`poll`], which acknowledges each pending queue to its driver and drains its
//! completions with a budget. Nothing on this path allocates.

pub mod discover;
pub mod extents;
pub mod snaptask;
pub mod tasks;
pub mod volume;

use alloc::boxed::Box;
use alloc::vec::Vec;

use drivers::block::{BlockDevice, BufferPool, Completion};
use drivers::hal::{ConfigMechanism, EcamConfigAccess, PortConfigAccess};
use drivers::info::{DeviceInfo, DeviceName};
use drivers::msix::VectorRegistry;
use drivers::nvme::{self, MmioRegisters, NvmeConfig, NvmeController};
use drivers::pci::{enumerate, ScanMode};
use drivers::service::{discover_virtio_blk, BoxedDevice, Servicer};
use drivers::virtio::ProbeContext;
use drivers::virtio_blk::VirtioBlkConfig;

use crate::arch::{apic, interrupts};
use crate::platform::{self, KernelHal, KernelPorts};
use crate::{executor, memory};

/// Largest transfer the console tools and pools use for virtio-blk.
pub const MAX_TRANSFER: usize = 128 * 1024;
/// Largest transfer for NVMe namespaces (QEMU's MDTS; larger ones are split by the driver),
/// so a single request exercises PRP lists.
pub const NVME_MAX_TRANSFER: usize = 512 * 1024;
/// Requests in flight per NVMe namespace.
pub const NVME_DEPTH: u16 = 128;
/// Completions drained per device per loop iteration.
const POLL_BUDGET: usize = 64;

/// Vector → (device, queue) table shared with the interrupt handler.
pub static REGISTRY: VectorRegistry = VectorRegistry::new();

/// The most runs a snapshot's exception table may grow to: one per chunk of its store. The
/// same at `snapshot create` and at boot; the table starts empty and grows as it fills
/// (`snapshot::table`), so this bounds memory, it does not reserve it.
pub fn table_limit(cow_sectors: u64, chunk_sectors: u32) -> usize {
    (cow_sectors / u64::from(chunk_sectors.max(1))).clamp(1, usize::MAX as u64) as usize
}

/// Every disk, its DMA buffers, and the devices that failed to initialise.
pub struct Storage {
    /// Working devices, in PCI order; the index is the device number interrupts carry.
    pub devices: Vec<BoxedDevice>,
    /// One pool per device: up to `queue_depth` buffers of the device's largest transfer.
    pub pools: Vec<BufferPool>,
    /// Devices that failed to initialise, with their reason.
    pub failed: Vec<DeviceInfo>,
    /// NVMe controllers (their namespaces are in `devices`).
    pub controllers: Vec<NvmeController<MmioRegisters>>,
    /// Devices that are origins of snapshots, with their engines.
    pub origins: Vec<volume::Origin>,
    /// Stores found at boot that are not served (no binding, origin missing, corrupt).
    pub unserved: Vec<discover::Unserved>,
    /// Half-merged origins whose merging store is not attached: read-only until it is.
    pub held: Vec<discover::HeldOrigin>,
    /// Requests submitted by [`Storage::submit_to`] whose completion has not reached the
    /// sink of [`poll`] yet. A task is finished only when this is zero, so a late completion
    /// never reaches the next task.
    pub task_ios: usize,
    /// Per device: NBD requests sent straight to it (not through an engine) whose completion
    /// has not come back. `snapshot create` waits for its origin's to drain.
    pub direct_nbd: Vec<u32>,
    servicer: Servicer,
    next_housekeeping: u64,
}

/// What console I/O addresses: a plain device, or a volume served by a snapshot engine (an
/// origin with snapshots, or a snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A device with no snapshots.
    Device(usize),
    /// A volume of `origins[origin]`.
    Volume {
        /// Index into [`Storage::origins`].
        origin: usize,
        /// The origin itself or one of its snapshots.
        volume: snapshot::Volume,
    },
}

/// A volume name for messages (snapshot names may be longer than device names).
pub type VolumeName = drivers::info::FixedString<64>;

impl Storage {
    /// Resolves a volume name: a device (through its engine when it has snapshots) or a
    /// snapshot.
    pub fn resolve(&self, name: &str) -> Option<Target> {
        if let Some(disk) = self.find(name) {
            return Some(
                match self
                    .origins
                    .iter()
                    .position(|o| o.disk == disk && !o.snaps.is_empty())
                {
                    Some(origin) => Target::Volume {
                        origin,
                        volume: snapshot::Volume::Origin,
                    },
                    None => Target::Device(disk),
                },
            );
        }
        self.origins.iter().enumerate().find_map(|(origin, o)| {
            o.snap(name)
                .filter(|s| {
                    matches!(
                        s.state,
                        volume::SnapState::Active | volume::SnapState::Invalid
                    )
                })
                .map(|s| Target::Volume {
                    origin,
                    volume: snapshot::Volume::Snapshot(s.id),
                })
        })
    }

    /// The device whose geometry and buffers a target uses.
    pub fn disk_of(&self, target: Target) -> usize {
        match target {
            Target::Device(d) => d,
            Target::Volume { origin, .. } => {
                self.origins.get(origin).map_or(usize::MAX, |o| o.disk)
            }
        }
    }

    /// A target's name.
    pub fn target_name(&self, target: Target) -> VolumeName {
        match target {
            Target::Volume {
                origin,
                volume: snapshot::Volume::Snapshot(id),
            } => {
                let name = self
                    .origins
                    .get(origin)
                    .and_then(|o| o.snaps.iter().find(|s| s.id == id));
                VolumeName::from_str_truncated(name.map_or("?", |s| s.name.as_str()))
            }
            t => VolumeName::from_str_truncated(self.name(self.disk_of(t)).as_str()),
        }
    }

    /// The geometry I/O to a target sees (a snapshot: its origin's, read-only unless writable).
    pub fn geometry(&self, target: Target) -> drivers::block::Geometry {
        let mut g = self
            .devices
            .get(self.disk_of(target))
            .map(|d| d.geometry())
            .unwrap_or_default();
        if let Target::Volume {
            origin,
            volume: snapshot::Volume::Snapshot(id),
        } = target
        {
            let writable = self
                .origins
                .get(origin)
                .and_then(|o| o.snaps.iter().find(|s| s.id == id))
                .is_some_and(|s| s.writable);
            g.read_only |= !writable;
            g.discard = false;
        }
        // A half-merged origin waiting for its store, and the volumes on it.
        g.read_only |= self.held(self.disk_of(target)).is_some();
        // A device that grew after its engine was set up: its volumes keep the engine's size.
        if let Target::Volume { origin, .. } = target {
            if let Some(o) = self.origins.get(origin) {
                let block_sectors = u64::from((g.block_size / 512).max(1));
                g.capacity_blocks = g
                    .capacity_blocks
                    .min(o.engine.config().origin_sectors / block_sectors);
            }
        }
        g
    }

    /// The first store on `disk` that starts at or after sector `end`, if any.
    pub fn next_store_after(&self, disk: usize, end: u64) -> Option<u64> {
        self.origins
            .iter()
            .flat_map(|o| o.snaps.iter())
            .filter(|s| s.cow_disk == disk && s.cow_start >= end)
            .map(|s| s.cow_start)
            .chain(
                self.unserved
                    .iter()
                    .filter(|u| u.disk == disk && u.start >= end)
                    .map(|u| u.start),
            )
            .min()
    }

    /// Sectors free after `[start, start + len)` on `disk`: up to the next store on the
    /// device, or its end (its capacity now: a whole-device store grows with its device).
    pub fn free_after(&self, disk: usize, start: u64, len: u64) -> u64 {
        let g = self.geometry(Target::Device(disk));
        let capacity = g.capacity_blocks * u64::from(g.block_size / 512);
        let end = start + len;
        let next = self.next_store_after(disk, end).unwrap_or(capacity);
        next.min(capacity).saturating_sub(end)
    }

    /// Auto-extend (`snapshot autoextend`): every snapshot whose policy's threshold its usage
    /// has reached, and that is not being extended, grows by the policy's amount, as far as
    /// free space after its store allows (a free-extent marker keeps the rest reachable when
    /// another store follows). When there is no room, the console says so once, and the
    /// 80/90 % warnings and, when it fills, the invalidation go on as without it.
    pub fn autoextend(&mut self) {
        for oi in 0..self.origins.len() {
            for si in 0..self.origins[oi].snaps.len() {
                let o = &self.origins[oi];
                let s = &o.snaps[si];
                if s.state != volume::SnapState::Active || o.auto_extending.is_some() {
                    continue;
                }
                let Some(policy) = o.engine.autoextend(s.id) else {
                    continue;
                };
                if o.engine.extending(s.id) {
                    continue;
                }
                let Some(snapshot::Status::Usage(u)) = o.engine.status(s.id) else {
                    continue;
                };
                let used = u.allocated_sectors * 100 / u.total_sectors.max(1);
                if used < u64::from(policy.threshold) {
                    self.origins[oi].snaps[si].auto_blocked = false;
                    continue;
                }
                let chunk = u64::from(s.chunk_sectors.max(1));
                let want = match policy.by {
                    snapshot::format::ExtendBy::Percent(p) => s.cow_sectors * u64::from(p) / 100,
                    snapshot::format::ExtendBy::Sectors(n) => n,
                }
                .div_ceil(chunk)
                    * chunk;
                let free = self.free_after(s.cow_disk, s.cow_start, s.cow_sectors) / chunk * chunk;
                let grow = want.min(free);
                let (id, disk, start, len) = (s.id, s.cow_disk, s.cow_start, s.cow_sectors);
                if grow == 0 {
                    if !s.auto_blocked {
                        log::warn!(
                            "snapshot {}: {used}% used; auto-extend cannot grow it: no free space after its store on {}",
                            s.name,
                            self.name(disk)
                        );
                        self.origins[oi].snaps[si].auto_blocked = true;
                    }
                    continue;
                }
                let new = len + grow;
                let marker = self.next_store_after(disk, start + len).and_then(|next| {
                    (next > start + new).then_some(snapshot::format::FreeExtent {
                        start: start + new,
                        sectors: next - (start + new),
                    })
                });
                let o = &mut self.origins[oi];
                let Some(mut b) = o.engine.binding(id) else {
                    continue;
                };
                b.region_start = start;
                b.region_sectors = new;
                if o.engine.extend_snapshot(id, new, &b, marker).is_ok() {
                    o.auto_extending = Some((id, new));
                    log::info!(
                        "snapshot {}: {used}% used; auto-extending by {} MiB to {} MiB",
                        o.snaps[si].name,
                        grow / 2048,
                        new / 2048
                    );
                }
            }
        }
    }

    /// The half-merged origin on `disk` waiting for its merging store, if it is one.
    pub fn held(&self, disk: usize) -> Option<&discover::HeldOrigin> {
        self.held.iter().find(|h| h.disk == disk)
    }

    /// Names snapshot `id` of `origin` in the origin marker a merge of it writes (its name,
    /// its COW device and region), so a boot that finds the origin without the store can say
    /// which store to bring back.
    pub fn label_merge(&mut self, origin: usize, id: snapshot::SnapId) {
        let Some(o) = self.origins.get(origin) else {
            return;
        };
        let Some(s) = o.snaps.iter().find(|s| s.id == id) else {
            return;
        };
        let Some(cow) = self.devices.get(s.cow_disk).map(|d| d.info()) else {
            return;
        };
        let desc = alloc::format!("{}", crate::identity::DescribeDevice(&cow));
        let (name, start) = (s.name.clone(), s.cow_start);
        self.origins[origin]
            .engine
            .set_merge_label(id, name.as_bytes(), desc.as_bytes(), start);
    }

    /// After discovery or `snapshot attach`: half-merged origins whose merge now runs are
    /// released; the others stay read-only, with a warning when `warn` (at boot).
    pub fn settle_held(&mut self, warn: bool) {
        let origins = &self.origins;
        self.held.retain(|h| {
            !origins
                .iter()
                .any(|o| o.disk == h.disk && o.engine.merge_progress().is_some())
        });
        if warn {
            for h in &self.held {
                log::warn!("{}: {}", self.name(h.disk), h.why());
            }
        }
    }

    /// The buffer pool for I/O to a target.
    pub fn pool(&mut self, target: Target) -> Option<&mut BufferPool> {
        let disk = self.disk_of(target);
        self.pools.get_mut(disk)
    }

    /// Interrupts taken by the devices behind a target (for a volume: its origin and the
    /// COW devices of its snapshots).
    pub fn interrupts(&self, target: Target) -> u64 {
        let of = |disk: usize| self.devices.get(disk).map_or(0, |d| d.stats().interrupts);
        let Target::Volume { origin, .. } = target else {
            return of(self.disk_of(target));
        };
        let Some(o) = self.origins.get(origin) else {
            return 0;
        };
        // A volume's I/O goes to the origin and to its snapshots' COW devices: count each
        // device once.
        let mut total = of(o.disk);
        for (i, s) in o.snaps.iter().enumerate() {
            let seen =
                s.cow_disk == o.disk || o.snaps[..i].iter().any(|t| t.cow_disk == s.cow_disk);
            if !seen {
                total += of(s.cow_disk);
            }
        }
        total
    }

    /// Sends a console task's request to a target (counted in `task_ios`); on refusal the
    /// buffer comes back with the reason.
    pub fn submit_to(
        &mut self,
        target: Target,
        request: drivers::block::BlockRequest,
    ) -> Result<(), (drivers::block::BlockError, Option<drivers::block::DmaBuf>)> {
        let submitted = self.submit_any(target, request);
        if submitted.is_ok() {
            self.task_ios += 1;
        }
        submitted
    }

    /// Sends an NBD request (tagged by `nbd::backend::tag`) to a target. Not counted in
    /// `task_ios`: its completion goes to the NBD sink of [`poll`], and console tasks do not
    /// wait for it.
    pub fn submit_nbd(
        &mut self,
        target: Target,
        request: drivers::block::BlockRequest,
    ) -> Result<(), (drivers::block::BlockError, Option<drivers::block::DmaBuf>)> {
        self.submit_any(target, request)?;
        if let Target::Device(d) = target {
            if let Some(n) = self.direct_nbd.get_mut(d) {
                *n += 1;
            }
        }
        Ok(())
    }

    /// A new snapshot instance number: unique since boot, never reused (one per snapshot
    /// created or found; 2^32 of them would take far longer than any uptime).
    pub fn new_instance() -> u32 {
        static NEXT: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(1);
        NEXT.fetch_add(1, core::sync::atomic::Ordering::Relaxed)
    }

    /// NBD requests sent straight to device `disk` and not back yet.
    pub fn direct_nbd_in_flight(&self, disk: usize) -> u32 {
        self.direct_nbd.get(disk).copied().unwrap_or(0)
    }

    /// Whether device `disk` holds a COW store (one an engine serves, or one found at boot
    /// and not served) or is a half-merged origin waiting for its store. Only the engine (or
    /// nobody) writes it.
    pub fn holds_store(&self, disk: usize) -> bool {
        self.cow_user(disk).is_some()
            || self.unserved.iter().any(|u| u.disk == disk)
            || self.held(disk).is_some()
    }

    fn submit_any(
        &mut self,
        target: Target,
        request: drivers::block::BlockRequest,
    ) -> Result<(), (drivers::block::BlockError, Option<drivers::block::DmaBuf>)> {
        match target {
            Target::Device(d) => match self.devices.get_mut(d) {
                Some(device) => device
                    .submit(request)
                    .map_err(|r| (r.error, r.request.buffer)),
                None => Err((drivers::block::BlockError::DeviceFailed, request.buffer)),
            },
            Target::Volume { origin, volume } => match self.origins.get_mut(origin) {
                Some(o) => o.submit(volume, request),
                None => Err((drivers::block::BlockError::DeviceFailed, request.buffer)),
            },
        }
    }

    /// The engine of origin device `disk`, set up on first use; its index in `origins`.
    pub fn origin_for(&mut self, disk: usize) -> Result<usize, volume::SetupError> {
        if let Some(i) = self.origins.iter().position(|o| o.disk == disk) {
            return Ok(i);
        }
        let device = self.devices.get(disk).ok_or("no such device")?;
        let pool_id = 0x8000 + self.origins.len() as u16;
        self.origins
            .push(volume::Origin::new(disk, device, pool_id)?);
        Ok(self.origins.len() - 1)
    }

    /// The snapshot whose COW store lives on `disk`, if any.
    pub fn cow_user(&self, disk: usize) -> Option<&str> {
        self.origins
            .iter()
            .flat_map(|o| o.snaps.iter())
            .find(|s| s.cow_disk == disk)
            .map(|s| s.name.as_str())
    }

    /// Finds a disk by name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.info().name.as_str() == name)
    }

    /// A disk's name.
    pub fn name(&self, disk: usize) -> DeviceName {
        self.devices
            .get(disk)
            .map(|d| d.info().name)
            .unwrap_or_default()
    }
}

static STORAGE: spin::Mutex<Storage> = spin::Mutex::new(Storage {
    devices: Vec::new(),
    pools: Vec::new(),
    failed: Vec::new(),
    controllers: Vec::new(),
    origins: Vec::new(),
    unserved: Vec::new(),
    held: Vec::new(),
    task_ios: 0,
    direct_nbd: Vec::new(),
    servicer: Servicer::new(),
    next_housekeeping: 0,
});

/// The clock NVMe bring-up deadlines and command timeouts use.
static CLOCK: fn() -> u64 = crate::time::uptime_ns;
/// How often NVMe command deadlines are checked.
const HOUSEKEEPING_NS: u64 = 100_000_000;

/// Runs `f` on the storage table (main loop only; never from an interrupt handler).
pub fn with<R>(f: impl FnOnce(&mut Storage) -> R) -> R {
    f(&mut STORAGE.lock())
}

fn on_device_interrupt(vector: u8) {
    REGISTRY.dispatch(vector);
    executor::wake();
}

/// Finds and starts every supported disk. Failures are recorded, never fatal.
pub fn init(ecam: Option<&crate::acpi::EcamWindow>) {
    for vector in interrupts::DEVICE_VECTORS {
        interrupts::register(vector, on_device_interrupt);
    }
    let hal = KernelHal;
    let ports = PortConfigAccess::new(KernelPorts);
    let window = ecam.filter(|w| w.segment == 0 && w.start_bus == 0);
    let cfg = match window.map(|w| (w, platform::map_ecam(w))) {
        Some((w, Ok(region))) => {
            ConfigMechanism::Ecam(EcamConfigAccess::new(region, w.start_bus, w.end_bus))
        }
        Some((w, Err(e))) => {
            log::warn!(
                "PCI ECAM window at {:#x} unusable ({e}); using ports",
                w.base
            );
            ConfigMechanism::Ports(ports)
        }
        None => ConfigMechanism::Ports(ports),
    };
    let functions = enumerate(&cfg, ScanMode::FollowBridges);
    log::info!("PCI: {} functions", functions.len());
    let ctx = ProbeContext {
        cfg: &cfg,
        mapper: &hal,
        registry: &REGISTRY,
        apic_id: apic::id(),
    };
    let config = VirtioBlkConfig {
        max_transfer_bytes: MAX_TRANSFER as u32,
        ..VirtioBlkConfig::default()
    };
    let found = discover_virtio_blk::<KernelHal, _, _>(&ctx, &functions, 0, config);
    let mut storage = STORAGE.lock();
    storage.failed = found.failed;
    let mut full = false;
    for device in found.devices {
        // After a device found no memory at all, later ones cannot keep their index.
        if full {
            storage.skip(device.info());
        } else if !storage.add(device) {
            full = true;
        }
    }
    let nvme_ctx = nvme::ProbeContext {
        cfg: &cfg,
        mapper: &hal,
        registry: &REGISTRY,
        apic_id: apic::id(),
        clock: &CLOCK,
    };
    for (n, function) in functions.iter().filter(|f| nvme::is_nvme(f)).enumerate() {
        let first = storage.devices.len() as u16;
        let config = NvmeConfig {
            max_depth: NVME_DEPTH,
            max_transfer_bytes: NVME_MAX_TRANSFER as u32,
            ..NvmeConfig::default()
        };
        match nvme::probe::<KernelHal, _, _>(&nvme_ctx, function, n as u32, first, config) {
            Ok(attached) => {
                if let Some(info) = attached.controller.controller_info() {
                    log::info!("{info}");
                }
                for namespace in attached.namespaces {
                    if full {
                        storage.skip(namespace.info());
                    } else if !storage.add(Box::new(namespace)) {
                        full = true;
                    }
                }
                storage.failed.extend(attached.failed);
                storage.controllers.push(attached.controller);
            }
            Err(failure) => storage.failed.push(failure.info),
        }
    }
    drop(storage);
    crate::net::init(&ctx, &functions, crate::start::cmdline().and_then(|c| c.ip));
    let m = memory::stats();
    log::debug!(
        "storage up: {} disks, {} frames free",
        STORAGE.lock().devices.len(),
        m.frames_free
    );
}

impl Storage {
    /// Adds a working device with a buffer pool of `queue_depth` buffers of its largest
    /// transfer. Returns false (and records the device as failed) when there is no memory for
    /// the pool: devices after it would carry the wrong index, so discovery stops there.
    fn add(&mut self, device: BoxedDevice) -> bool {
        let geometry = device.geometry();
        let info = device.info();
        let depth = usize::from(geometry.queue_depth).max(1);
        let index = self.devices.len() as u16;
        let size = (geometry.max_transfer_bytes as usize).clamp(4096, NVME_MAX_TRANSFER);
        // One buffer per queue slot, but no device's pool takes more than an eighth of the
        // free frames (at least 8 buffers): a small appliance still brings up every disk.
        let budget = (memory::stats().frames_free * crate::frames::FRAME_SIZE / 8) as usize;
        let wanted = depth.min((budget / size).max(8));
        // Memory short: a smaller pool (less depth) beats a missing disk.
        let pool = [wanted, 8.min(wanted), 1]
            .into_iter()
            .find_map(|n| {
                BufferPool::new::<KernelHal>(index, n, size)
                    .ok()
                    .map(|p| (n, p))
            })
            .ok_or(drivers::hal::HalError::DmaExhausted {
                pages: size.div_ceil(4096),
            });
        match pool {
            Ok((count, pool)) => {
                log::info!(
                    "{}: {geometry}, {count} DMA buffers of {} KiB",
                    info.name,
                    size / 1024
                );
                self.devices.push(device);
                self.pools.push(pool);
                self.direct_nbd.push(0);
                true
            }
            Err(e) => {
                log::error!("{}: no memory for its buffer pool: {e}", info.name);
                let why = drivers::info::reason(format_args!("no DMA memory for buffers: {e}"));
                self.failed.push(DeviceInfo::init_failed(
                    info.name,
                    info.driver,
                    info.pci,
                    why,
                ));
                false
            }
        }
    }
}

impl Storage {
    /// Records a device left out because memory ran out before it.
    fn skip(&mut self, info: DeviceInfo) {
        log::error!("{}: left out: no DMA memory for its buffers", info.name);
        let why = drivers::info::reason(format_args!("left out: no DMA memory for its buffers"));
        self.failed.push(DeviceInfo::init_failed(
            info.name,
            info.driver,
            info.pci,
            why,
        ));
    }
}

/// Sends the device I/O for volume requests submitted since the last [`poll`] (console tasks
/// and NBD sessions submit after it ran; without this their I/O would wait for the next
/// interrupt, which under interrupt coalescing can be a whole batch of completions later).
/// Returns true when an engine has finished requests to deliver (run [`poll`] again before
/// halting).
pub fn issue_volumes(storage: &mut Storage) -> bool {
    let mut more = false;
    for (index, o) in storage.origins.iter_mut().enumerate() {
        o.issue(index, storage.devices.as_mut_slice());
        more |= o.engine.has_completions();
    }
    more
}

/// Holds back device notifications (see `BlockDevice::plug`) until [`unplug`]: what the
/// main loop submits in one round then costs one notification per device.
pub fn plug(storage: &mut Storage) {
    storage.devices.iter_mut().for_each(|d| d.plug());
}

/// Sends the notifications held back since [`plug`].
pub fn unplug(storage: &mut Storage) {
    storage.devices.iter_mut().for_each(|d| d.unplug());
}

/// Timer work of the storage layer (called every loop iteration): auto-extend; every
/// 100 ms, NVMe command deadlines and virtio-blk devices that stopped answering. Returns
/// true when a device has work to finish.
pub fn housekeeping(storage: &mut Storage, now: u64) -> bool {
    // Every iteration: an extension must start before a burst of writes fills the store.
    storage.autoextend();
    if now < storage.next_housekeeping {
        return false;
    }
    storage.next_housekeeping = now + HOUSEKEEPING_NS;
    // Every controller is checked (no short circuit).
    let mut more = false;
    for controller in &storage.controllers {
        more |= controller.check_timeouts();
    }
    // Devices without deadlines of their own (virtio-blk): one that stopped answering.
    for device in storage.devices.iter_mut() {
        more |= device.check_timeouts(now);
    }
    more
}

/// One round of the completion path: takes fired vectors, polls those devices with a budget,
/// hands each completion to `sink` with the device's buffer pool (engine I/O goes back to its
/// engine; NBD I/O, tagged by `nbd::backend::tag`, to `nbd` instead), then lets every engine
/// issue I/O and deliver finished volume requests. Returns true when work remains (run
/// again before halting).
pub fn poll(
    storage: &mut Storage,
    now: u64,
    sink: &mut dyn FnMut(&mut BufferPool, Completion),
    nbd: &mut dyn FnMut(&mut BufferPool, Completion),
) -> bool {
    let Storage {
        devices,
        pools,
        servicer,
        origins,
        task_ios,
        direct_nbd,
        ..
    } = storage;
    // Completions below are stamped with this round's time.
    for o in origins.iter_mut() {
        o.engine.tick(now / 1000);
    }
    let more = servicer.run(
        &REGISTRY,
        devices.as_mut_slice(),
        POLL_BUDGET,
        &mut |index, c| {
            if c.tag & volume::VOLUME_TAG != 0 {
                let origin = ((c.tag & !volume::VOLUME_TAG) >> 32) as usize;
                if let Some(o) = origins.get_mut(origin) {
                    o.complete(c.tag as u32, c);
                }
            } else if crate::nbd::backend::untag(c.tag).is_some() {
                // NBD I/O sent straight to this device (engine-routed NBD I/O comes back
                // through `deliver` below).
                if let Some(n) = direct_nbd.get_mut(usize::from(index)) {
                    *n = n.saturating_sub(1);
                }
                if let Some(pool) = pools.get_mut(usize::from(index)) {
                    nbd(pool, c);
                }
            } else {
                *task_ios = task_ios.saturating_sub(1);
                if let Some(pool) = pools.get_mut(usize::from(index)) {
                    sink(pool, c);
                }
            }
        },
    );
    // The engines' I/O of this round goes out with one notification per device.
    let plugged = !origins.is_empty();
    if plugged {
        devices.iter_mut().for_each(|d| d.plug());
    }
    for (index, o) in origins.iter_mut().enumerate() {
        o.issue(index, devices);
        if let Some(pool) = pools.get_mut(o.disk) {
            o.deliver(&mut |c| {
                if crate::nbd::backend::untag(c.tag).is_some() {
                    nbd(pool, c)
                } else {
                    *task_ios = task_ios.saturating_sub(1);
                    sink(pool, c)
                }
            });
        }
        o.issue(index, devices);
        o.sweep();
        o.alert_unmarked(now);
    }
    if plugged {
        devices.iter_mut().for_each(|d| d.unplug());
    }
    more
}
