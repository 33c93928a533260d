//! The block-device interface every disk driver implements, and the pieces that keep the I/O
//! path free of allocation: DMA buffer pools and fixed in-flight tables.
//!
//! # Request life cycle
//! 1. The caller takes a [`DmaBuf`] from a [`BufferPool`] (sized at init). An empty pool is
//!    back-pressure: wait for a completion to return a buffer.
//! 2. It builds a [`BlockRequest`] (a caller tag, an [`Operation`], an LBA, the buffer) and
//!    [`BlockDevice::submit`]s it. Submission never completes inline; when it fails (queue full,
//!    bad range, device failed) the request — buffer included — comes back in [`Rejected`]. A
//!    full queue ([`BlockError::QueueFull`]) is back-pressure, not failure: resubmit after the
//!    next completion.
//! 3. The device's interrupt marks it pending (see [`crate::msix::VectorRegistry`]); the main
//!    loop calls [`BlockDevice::poll_completions`] with a budget and gets one [`Completion`] per
//!    request, carrying the tag, the result and the buffer back.
//! 4. The caller returns the buffer to its pool (or reuses it for the next request).
//!
//! Buffers are moved, never shared: while a request is in flight only the device holds its
//! buffer, so the CPU cannot touch memory the device is writing.
//!
//! The trait is object-safe (the completion sink is `&mut dyn FnMut`) so the kernel can keep
//! virtio-blk, NVMe and RAM disks in one table.

mod buffer;
mod ramdisk;
mod slots;

pub use buffer::{BufferPool, DmaBuf};
pub use ramdisk::{Fault, RamDisk, RamDiskConfig};
pub use slots::SlotTable;

use crate::info::DeviceInfo;

/// Errors of block requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// Every request slot is in use: back-pressure, resubmit after a completion.
    QueueFull,
    /// A read or write without a buffer.
    MissingBuffer,
    /// A transfer length that is zero or not a multiple of the logical block size.
    Misaligned {
        /// Transfer length in bytes.
        bytes: usize,
        /// Logical block size.
        block_size: u32,
    },
    /// A transfer longer than the device's maximum.
    TooLarge {
        /// Transfer length in bytes.
        bytes: usize,
        /// Maximum transfer length.
        max: u32,
    },
    /// A range beyond the end of the device.
    OutOfRange {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
        /// Device capacity in blocks.
        capacity: u64,
    },
    /// The device does not support this operation (discard, or FUA on a write-back cache).
    Unsupported,
    /// A write to a read-only device.
    ReadOnly,
    /// A buffer that does not belong to the pool it is returned to.
    ForeignBuffer,
    /// The device reported a media or transport error for this request.
    Io,
    /// The device refused the request as unsupported.
    DeviceUnsupported,
    /// The device has failed; outstanding requests were aborted.
    DeviceFailed,
    /// The device completed the request with an error status; the spec's name for it (e.g.
    /// NVMe "LBA Out of Range").
    DeviceStatus(&'static str),
}

impl core::fmt::Display for BlockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::QueueFull => write!(f, "queue full"),
            Self::MissingBuffer => write!(f, "request has no buffer"),
            Self::Misaligned { bytes, block_size } => {
                write!(
                    f,
                    "{bytes} bytes is not a whole number of {block_size}-byte blocks"
                )
            }
            Self::TooLarge { bytes, max } => {
                write!(f, "{bytes} bytes exceeds maximum transfer {max}")
            }
            Self::OutOfRange {
                lba,
                blocks,
                capacity,
            } => {
                write!(f, "blocks {lba}+{blocks} beyond capacity {capacity}")
            }
            Self::Unsupported => write!(f, "operation not supported by device"),
            Self::ReadOnly => write!(f, "device is read-only"),
            Self::ForeignBuffer => write!(f, "buffer belongs to another pool"),
            Self::Io => write!(f, "I/O error"),
            Self::DeviceUnsupported => write!(f, "device rejected request as unsupported"),
            Self::DeviceFailed => write!(f, "device failed"),
            Self::DeviceStatus(name) => write!(f, "device reported {name}"),
        }
    }
}

/// What a device offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Logical block size in bytes (512 or 4096 typically); LBAs count these.
    pub block_size: u32,
    /// Capacity in logical blocks.
    pub capacity_blocks: u64,
    /// Longest single transfer in bytes (a multiple of `block_size`).
    pub max_transfer_bytes: u32,
    /// Number of request queues.
    pub queue_count: u16,
    /// Requests that can be in flight at once (per device).
    pub queue_depth: u16,
    /// The device has a volatile write cache: writes are durable only after a flush (or FUA).
    pub volatile_write_cache: bool,
    /// Writes can carry Force Unit Access.
    pub fua: bool,
    /// Discard (deallocate / TRIM) is supported.
    pub discard: bool,
    /// Longest discard in blocks (0 when unsupported).
    pub max_discard_blocks: u32,
    /// Writes are refused.
    pub read_only: bool,
}

/// Operation kinds, for counters and fault injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush.
    Flush,
    /// Discard.
    Discard,
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read `buffer.len()` bytes from `lba`.
    Read,
    /// Write `buffer.len()` bytes at `lba`; with `fua` the data is durable on completion.
    Write {
        /// Force Unit Access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocate `blocks` blocks at `lba` (no buffer).
    Discard {
        /// Number of blocks.
        blocks: u32,
    },
}

impl Operation {
    /// The kind of operation.
    pub fn kind(&self) -> OpKind {
        match self {
            Self::Read => OpKind::Read,
            Self::Write { .. } => OpKind::Write,
            Self::Flush => OpKind::Flush,
            Self::Discard { .. } => OpKind::Discard,
        }
    }
}

/// One request.
#[derive(Debug)]
pub struct BlockRequest {
    /// The caller's tag, returned in the completion.
    pub tag: u64,
    /// The operation.
    pub op: Operation,
    /// First logical block (ignored for flush).
    pub lba: u64,
    /// Data buffer for reads and writes; its `len()` is the transfer length.
    pub buffer: Option<DmaBuf>,
}

impl BlockRequest {
    /// A read of `buffer.len()` bytes.
    pub fn read(tag: u64, lba: u64, buffer: DmaBuf) -> Self {
        Self {
            tag,
            op: Operation::Read,
            lba,
            buffer: Some(buffer),
        }
    }

    /// A write of `buffer.len()` bytes.
    pub fn write(tag: u64, lba: u64, buffer: DmaBuf, fua: bool) -> Self {
        Self {
            tag,
            op: Operation::Write { fua },
            lba,
            buffer: Some(buffer),
        }
    }

    /// A cache flush.
    pub fn flush(tag: u64) -> Self {
        Self {
            tag,
            op: Operation::Flush,
            lba: 0,
            buffer: None,
        }
    }

    /// A discard.
    pub fn discard(tag: u64, lba: u64, blocks: u32) -> Self {
        Self {
            tag,
            op: Operation::Discard { blocks },
            lba,
            buffer: None,
        }
    }

    /// Number of blocks the request covers (0 for flush).
    pub fn blocks(&self, block_size: u32) -> u64 {
        match self.op {
            Operation::Read | Operation::Write { .. } => self
                .buffer
                .as_ref()
                .map_or(0, |b| (b.len() / block_size.max(1) as usize) as u64),
            Operation::Flush => 0,
            Operation::Discard { blocks } => u64::from(blocks),
        }
    }

    /// Turns the request into a completion with `result`, handing the buffer back.
    pub fn complete(self, result: Result<(), BlockError>) -> Completion {
        Completion {
            tag: self.tag,
            op: self.op,
            lba: self.lba,
            result,
            buffer: self.buffer,
        }
    }
}

/// A request refused at submission, handed back whole.
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub error: BlockError,
    /// The request, with its buffer.
    pub request: BlockRequest,
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag.
    pub tag: u64,
    /// The operation.
    pub op: Operation,
    /// The first block.
    pub lba: u64,
    /// Success or the device's error.
    pub result: Result<(), BlockError>,
    /// The buffer, back to the caller (reads: filled with data on success).
    pub buffer: Option<DmaBuf>,
}

/// What one call to [`BlockDevice::poll_completions`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PollOutcome {
    /// Completions delivered.
    pub completed: usize,
    /// More completions are ready: the budget ran out; poll again soon.
    pub more: bool,
}

/// Per-device counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockStats {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Completed flushes.
    pub flushes: u64,
    /// Completed discards.
    pub discards: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// Bytes read successfully.
    pub bytes_read: u64,
    /// Bytes written successfully.
    pub bytes_written: u64,
    /// Interrupts taken for this device.
    pub interrupts: u64,
    /// Submissions refused because the queue was full.
    pub queue_full: u64,
}

impl BlockStats {
    /// Counts a completion.
    pub fn record(&mut self, completion: &Completion) {
        let bytes = completion.buffer.as_ref().map_or(0, |b| b.len() as u64);
        match completion.op.kind() {
            OpKind::Read => self.reads += 1,
            OpKind::Write => self.writes += 1,
            OpKind::Flush => self.flushes += 1,
            OpKind::Discard => self.discards += 1,
        }
        match (completion.result, completion.op.kind()) {
            (Err(_), _) => self.errors += 1,
            (Ok(()), OpKind::Read) => self.bytes_read += bytes,
            (Ok(()), OpKind::Write) => self.bytes_written += bytes,
            _ => {}
        }
    }
}

/// A block device.
pub trait BlockDevice {
    /// What the device offers. Fixed after initialisation.
    fn geometry(&self) -> Geometry;

    /// Queues a request. Never completes it inline: the completion comes from a later
    /// [`BlockDevice::poll_completions`]. On failure the request comes back with the reason;
    /// [`BlockError::QueueFull`] means "wait for a completion and retry".
    fn submit(&mut self, request: BlockRequest) -> Result<(), Rejected>;

    /// Delivers at most `budget` completions to `sink`, in the order the device finished them.
    fn poll_completions(&mut self, budget: usize, sink: &mut dyn FnMut(Completion)) -> PollOutcome;

    /// The main loop took an interrupt for `queue` of this device (counts it; devices that need
    /// it acknowledge here).
    fn interrupt(&mut self, queue: u16);

    /// Requests submitted and not yet completed.
    fn in_flight(&self) -> usize;

    /// Holds back the device notification (virtio kick, NVMe doorbell) for requests
    /// submitted until [`BlockDevice::unplug`], so a burst costs one notification. Every
    /// `plug` must be followed by `unplug` before the main loop halts.
    fn plug(&mut self) {}

    /// Sends the notification held back since [`BlockDevice::plug`], if a request was queued.
    fn unplug(&mut self) {}

    /// Whether the device raises no interrupts, so the main loop must poll it while requests
    /// are in flight (a device without MSI-X).
    fn needs_polling(&self) -> bool {
        false
    }

    /// Checks for a device that stopped answering (called now and then with the time in
    /// ns). A device that has had requests in flight and completed none of them for its
    /// timeout is failed: its requests complete with [`BlockError::DeviceFailed`] at the
    /// next polls. Returns true when it must be polled. Devices with their own deadlines
    /// (NVMe: the controller checks them) keep the default.
    fn check_timeouts(&mut self, _now_ns: u64) -> bool {
        false
    }

    /// Counters.
    fn stats(&self) -> BlockStats;

    /// Description for the console.
    fn info(&self) -> DeviceInfo;
}

/// Checks a request against a geometry: buffer present and block-aligned, range inside the
/// device, operation supported. Drivers call this first in `submit`.
pub fn validate(geometry: &Geometry, request: &BlockRequest) -> Result<(), BlockError> {
    validate_transfer(geometry, request)?;
    let blocks = request.blocks(geometry.block_size.max(1));
    match request.lba.checked_add(blocks) {
        Some(end) if end <= geometry.capacity_blocks => Ok(()),
        _ => Err(BlockError::OutOfRange {
            lba: request.lba,
            blocks,
            capacity: geometry.capacity_blocks,
        }),
    }
}

/// [`validate`] without the range check, for devices that check ranges themselves and
/// report them by status (NVMe: "LBA Out of Range"), whose capacity may also change while
/// the appliance runs.
pub fn validate_transfer(geometry: &Geometry, request: &BlockRequest) -> Result<(), BlockError> {
    let block_size = geometry.block_size.max(1);
    match request.op {
        Operation::Read | Operation::Write { .. } => {
            if matches!(request.op, Operation::Write { .. }) && geometry.read_only {
                return Err(BlockError::ReadOnly);
            }
            if matches!(request.op, Operation::Write { fua: true })
                && !geometry.fua
                && geometry.volatile_write_cache
            {
                // Without a volatile cache every write is already durable, so FUA is moot.
                return Err(BlockError::Unsupported);
            }
            let bytes = request
                .buffer
                .as_ref()
                .ok_or(BlockError::MissingBuffer)?
                .len();
            if bytes == 0 || bytes % block_size as usize != 0 {
                return Err(BlockError::Misaligned { bytes, block_size });
            }
            if bytes > geometry.max_transfer_bytes as usize {
                return Err(BlockError::TooLarge {
                    bytes,
                    max: geometry.max_transfer_bytes,
                });
            }
        }
        Operation::Flush => return Ok(()),
        Operation::Discard { blocks } => {
            if geometry.read_only {
                return Err(BlockError::ReadOnly);
            }
            if !geometry.discard {
                return Err(BlockError::Unsupported);
            }
            if blocks == 0 || blocks > geometry.max_discard_blocks {
                return Err(BlockError::TooLarge {
                    bytes: blocks as usize * block_size as usize,
                    max: geometry.max_discard_blocks.saturating_mul(block_size),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeDma;

    fn geometry() -> Geometry {
        Geometry {
            block_size: 512,
            capacity_blocks: 100,
            max_transfer_bytes: 8192,
            queue_count: 1,
            queue_depth: 4,
            volatile_write_cache: true,
            fua: false,
            discard: true,
            max_discard_blocks: 50,
            read_only: false,
        }
    }

    #[test]
    fn validation() {
        let g = geometry();
        let mut pool = BufferPool::new::<FakeDma>(0, 2, 16384).unwrap();
        let mut buf = pool.acquire().unwrap();
        buf.set_len(1024).unwrap();
        let ok = BlockRequest::read(1, 98, buf);
        assert_eq!(validate(&g, &ok), Ok(()));
        let mut buf = ok.buffer.unwrap();
        buf.set_len(1000).unwrap();
        let r = BlockRequest::write(2, 0, buf, false);
        assert_eq!(
            validate(&g, &r),
            Err(BlockError::Misaligned {
                bytes: 1000,
                block_size: 512
            })
        );
        let mut buf = r.buffer.unwrap();
        buf.set_len(16384).unwrap();
        let r = BlockRequest::write(2, 0, buf, false);
        assert_eq!(
            validate(&g, &r),
            Err(BlockError::TooLarge {
                bytes: 16384,
                max: 8192
            })
        );
        let mut buf = r.buffer.unwrap();
        buf.set_len(1024).unwrap();
        let r = BlockRequest::read(3, 99, buf);
        assert!(matches!(
            validate(&g, &r),
            Err(BlockError::OutOfRange {
                lba: 99,
                blocks: 2,
                ..
            })
        ));
        let r = BlockRequest::write(3, u64::MAX, r.buffer.unwrap(), false);
        assert!(matches!(
            validate(&g, &r),
            Err(BlockError::OutOfRange { .. })
        ));
        let r = BlockRequest::write(3, 0, r.buffer.unwrap(), true);
        assert_eq!(validate(&g, &r), Err(BlockError::Unsupported));
        let through = Geometry {
            volatile_write_cache: false,
            ..g
        };
        assert_eq!(
            validate(&through, &r),
            Ok(()),
            "FUA is moot without a volatile cache"
        );
        let ro = Geometry {
            read_only: true,
            ..g
        };
        assert_eq!(validate(&ro, &r), Err(BlockError::ReadOnly));
        assert_eq!(
            validate(
                &g,
                &BlockRequest {
                    tag: 0,
                    op: Operation::Read,
                    lba: 0,
                    buffer: None
                }
            ),
            Err(BlockError::MissingBuffer)
        );
        assert_eq!(validate(&g, &BlockRequest::flush(9)), Ok(()));
        assert_eq!(validate(&g, &BlockRequest::discard(9, 50, 50)), Ok(()));
        assert!(validate(&g, &BlockRequest::discard(9, 60, 50)).is_err());
        assert!(validate(&g, &BlockRequest::discard(9, 0, 51)).is_err());
        assert!(validate(&g, &BlockRequest::discard(9, 0, 0)).is_err());
        let nodiscard = Geometry {
            discard: false,
            ..g
        };
        assert_eq!(
            validate(&nodiscard, &BlockRequest::discard(9, 0, 1)),
            Err(BlockError::Unsupported)
        );
        pool.release(r.buffer.unwrap()).unwrap();
    }

    #[test]
    fn stats_count_completions() {
        let mut pool = BufferPool::new::<FakeDma>(0, 1, 4096).unwrap();
        let mut stats = BlockStats::default();
        let c = BlockRequest::read(1, 0, pool.acquire().unwrap()).complete(Ok(()));
        stats.record(&c);
        let c = BlockRequest::write(1, 0, c.buffer.unwrap(), false).complete(Err(BlockError::Io));
        stats.record(&c);
        stats.record(&BlockRequest::flush(2).complete(Ok(())));
        assert_eq!(
            (stats.reads, stats.writes, stats.flushes, stats.errors),
            (1, 1, 1, 1)
        );
        assert_eq!((stats.bytes_read, stats.bytes_written), (4096, 0));
    }
}
