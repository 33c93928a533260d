//! [`RamDisk`]: a block device in memory for host tests of everything above the drivers.
//!
//! It behaves like a real queue: submissions are validated and queued (a full queue is
//! back-pressure), and requests are carried out and completed on the next
//! [`BlockDevice::poll_completions`], never inline. [`Fault`]s make chosen requests fail.

use super::{
    validate, BlockDevice, BlockError, BlockRequest, BlockStats, Completion, Geometry, OpKind,
    Operation, PollOutcome, Rejected,
};
use crate::info::{DeviceInfo, DeviceName, FixedString};
use alloc::{collections::VecDeque, vec, vec::Vec};
use core::ops::Range;

/// Shape of a RAM disk.
#[derive(Clone, Copy, Debug)]
pub struct RamDiskConfig {
    /// Geometry to report (capacity × block size bytes are allocated).
    pub geometry: Geometry,
}

impl Default for RamDiskConfig {
    fn default() -> Self {
        Self {
            geometry: Geometry {
                block_size: 512,
                capacity_blocks: 2048,
                max_transfer_bytes: 128 * 1024,
                queue_count: 1,
                queue_depth: 32,
                volatile_write_cache: true,
                fua: true,
                discard: true,
                max_discard_blocks: 2048,
                read_only: false,
            },
        }
    }
}

/// An injected failure: the next `remaining` requests matching `op` and `lba` fail with
/// `error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Operation kind to match (`None`: any).
    pub op: Option<OpKind>,
    /// Blocks to match: a request overlapping this range matches (`None`: any).
    pub lba: Option<Range<u64>>,
    /// How many more requests fail.
    pub remaining: u32,
    /// The error they complete with.
    pub error: BlockError,
}

impl Fault {
    fn matches(&self, op: OpKind, lba: u64, blocks: u64) -> bool {
        self.remaining > 0
            && self.op.is_none_or(|o| o == op)
            && self
                .lba
                .as_ref()
                .is_none_or(|r| lba < r.end && lba.saturating_add(blocks.max(1)) > r.start)
    }
}

/// Maximum number of armed faults.
const MAX_FAULTS: usize = 8;

/// A RAM-backed block device.
#[derive(Debug)]
pub struct RamDisk {
    name: DeviceName,
    geometry: Geometry,
    data: Vec<u8>,
    queue: VecDeque<BlockRequest>,
    faults: Vec<Fault>,
    stats: BlockStats,
}

impl RamDisk {
    /// A zeroed disk.
    pub fn new(name: &str, config: RamDiskConfig) -> Self {
        let g = config.geometry;
        let bytes = (g.capacity_blocks * u64::from(g.block_size)) as usize;
        Self {
            name: DeviceName::from_str_truncated(name),
            geometry: g,
            data: vec![0; bytes],
            queue: VecDeque::with_capacity(usize::from(g.queue_depth)),
            faults: Vec::with_capacity(MAX_FAULTS),
            stats: BlockStats::default(),
        }
    }

    /// Arms a fault; hands it back when `MAX_FAULTS` are already armed.
    pub fn inject(&mut self, fault: Fault) -> Result<(), Fault> {
        self.faults.retain(|f| f.remaining > 0);
        if self.faults.len() >= MAX_FAULTS {
            return Err(fault);
        }
        self.faults.push(fault);
        Ok(())
    }

    /// The disk's contents.
    pub fn contents(&self) -> &[u8] {
        &self.data
    }

    /// The disk's contents, mutably (to prepare test images).
    pub fn contents_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    fn execute(&mut self, request: &mut BlockRequest) -> Result<(), BlockError> {
        let bs = u64::from(self.geometry.block_size);
        let blocks = request.blocks(self.geometry.block_size);
        let kind = request.op.kind();
        if let Some(fault) = self
            .faults
            .iter_mut()
            .find(|f| f.matches(kind, request.lba, blocks))
        {
            fault.remaining -= 1;
            return Err(fault.error);
        }
        let start = (request.lba * bs) as usize;
        let end = start + (blocks * bs) as usize;
        match request.op {
            Operation::Read => {
                let buf = request.buffer.as_mut().ok_or(BlockError::MissingBuffer)?;
                buf.as_mut_slice().copy_from_slice(&self.data[start..end]);
            }
            Operation::Write { .. } => {
                let buf = request.buffer.as_ref().ok_or(BlockError::MissingBuffer)?;
                self.data[start..end].copy_from_slice(buf.as_slice());
            }
            Operation::Discard { .. } => self.data[start..end].fill(0),
            Operation::Flush => {}
        }
        Ok(())
    }
}

impl BlockDevice for RamDisk {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn submit(&mut self, request: BlockRequest) -> Result<(), Rejected> {
        if let Err(error) = validate(&self.geometry, &request) {
            return Err(Rejected { error, request });
        }
        if self.queue.len() >= usize::from(self.geometry.queue_depth) {
            self.stats.queue_full += 1;
            return Err(Rejected {
                error: BlockError::QueueFull,
                request,
            });
        }
        // Within the capacity reserved at construction: no reallocation.
        self.queue.push_back(request);
        Ok(())
    }

    fn poll_completions(&mut self, budget: usize, sink: &mut dyn FnMut(Completion)) -> PollOutcome {
        let mut completed = 0;
        while completed < budget {
            let Some(mut request) = self.queue.pop_front() else {
                break;
            };
            let result = self.execute(&mut request);
            let completion = request.complete(result);
            self.stats.record(&completion);
            sink(completion);
            completed += 1;
        }
        PollOutcome {
            completed,
            more: !self.queue.is_empty(),
        }
    }

    fn interrupt(&mut self, _queue: u16) {
        self.stats.interrupts += 1;
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn stats(&self) -> BlockStats {
        self.stats
    }

    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(self.name, "ramdisk");
        info.model = FixedString::from_str_truncated("RAM disk");
        info.geometry = Some(self.geometry);
        info.stats = self.stats;
        info.in_flight = self.queue.len();
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BufferPool;
    use crate::hal::fake::FakeDma;

    fn small() -> RamDisk {
        let mut config = RamDiskConfig::default();
        config.geometry.capacity_blocks = 64;
        config.geometry.queue_depth = 2;
        RamDisk::new("ram0", config)
    }

    fn drain(disk: &mut RamDisk, budget: usize) -> (Vec<Completion>, PollOutcome) {
        let mut out = Vec::new();
        let outcome = disk.poll_completions(budget, &mut |c| out.push(c));
        (out, outcome)
    }

    #[test]
    fn write_then_read_completes_on_poll_not_inline() {
        let mut disk = small();
        let mut pool = BufferPool::new::<FakeDma>(0, 4, 4096).unwrap();
        let mut buf = pool.acquire().unwrap();
        buf.set_len(1024).unwrap();
        buf.as_mut_slice().fill(0xab);
        disk.submit(BlockRequest::write(10, 3, buf, false)).unwrap();
        assert_eq!(
            disk.contents()[3 * 512],
            0,
            "nothing happens before the poll"
        );
        assert_eq!(disk.in_flight(), 1);

        let (done, outcome) = drain(&mut disk, 8);
        assert_eq!(
            outcome,
            PollOutcome {
                completed: 1,
                more: false
            }
        );
        assert_eq!((done[0].tag, done[0].result), (10, Ok(())));
        assert!(disk.contents()[3 * 512..5 * 512].iter().all(|&b| b == 0xab));

        let mut buf = done.into_iter().next().unwrap().buffer.unwrap();
        buf.set_len(1536).unwrap();
        buf.as_mut_slice().fill(0);
        disk.submit(BlockRequest::read(11, 2, buf)).unwrap();
        let (done, _) = drain(&mut disk, 8);
        let data = done[0].buffer.as_ref().unwrap().as_slice();
        assert!(data[..512].iter().all(|&b| b == 0));
        assert!(data[512..].iter().all(|&b| b == 0xab));
        let s = disk.stats();
        assert_eq!(
            (s.reads, s.writes, s.bytes_read, s.bytes_written),
            (1, 1, 1536, 1024)
        );
    }

    #[test]
    fn full_queue_hands_request_back_and_budget_limits() {
        let mut disk = small();
        disk.submit(BlockRequest::flush(1)).unwrap();
        disk.submit(BlockRequest::flush(2)).unwrap();
        let rejected = disk.submit(BlockRequest::flush(3)).unwrap_err();
        assert_eq!(
            (rejected.error, rejected.request.tag),
            (BlockError::QueueFull, 3)
        );
        assert_eq!(disk.stats().queue_full, 1);

        let (done, outcome) = drain(&mut disk, 1);
        assert_eq!((done.len(), outcome.more), (1, true));
        assert_eq!(done[0].tag, 1, "completions in submission order");
        disk.submit(rejected.request).unwrap();
        let (done, outcome) = drain(&mut disk, 10);
        assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), vec![2, 3]);
        assert!(!outcome.more);
        assert_eq!(disk.stats().flushes, 3);
    }

    #[test]
    fn injected_faults_fail_matching_requests() {
        let mut disk = small();
        let mut pool = BufferPool::new::<FakeDma>(0, 2, 512).unwrap();
        disk.inject(Fault {
            op: Some(OpKind::Write),
            lba: Some(10..12),
            remaining: 1,
            error: BlockError::Io,
        })
        .unwrap();
        disk.submit(BlockRequest::write(1, 9, pool.acquire().unwrap(), false))
            .unwrap();
        disk.submit(BlockRequest::write(2, 11, pool.acquire().unwrap(), false))
            .unwrap();
        let (done, _) = drain(&mut disk, 10);
        assert_eq!(done[0].result, Ok(()));
        assert_eq!(done[1].result, Err(BlockError::Io));
        assert!(
            done[1].buffer.is_some(),
            "the buffer comes back on error too"
        );
        let mut it = done.into_iter();
        let b1 = it.next().unwrap().buffer.unwrap();
        disk.submit(BlockRequest::write(3, 11, b1, false)).unwrap();
        let (done, _) = drain(&mut disk, 10);
        assert_eq!(done[0].result, Ok(()), "fault fired once");
        assert_eq!(disk.stats().errors, 1);

        disk.inject(Fault {
            op: None,
            lba: None,
            remaining: 2,
            error: BlockError::DeviceFailed,
        })
        .unwrap();
        disk.submit(BlockRequest::flush(4)).unwrap();
        disk.submit(BlockRequest::discard(5, 0, 8)).unwrap();
        let (done, _) = drain(&mut disk, 10);
        assert!(done
            .iter()
            .all(|c| c.result == Err(BlockError::DeviceFailed)));
    }

    #[test]
    fn discard_zeroes_and_validation_rejects() {
        let mut disk = small();
        disk.contents_mut().fill(0xff);
        disk.submit(BlockRequest::discard(1, 4, 4)).unwrap();
        drain(&mut disk, 10);
        assert!(disk.contents()[4 * 512..8 * 512].iter().all(|&b| b == 0));
        assert_eq!(disk.contents()[8 * 512], 0xff);
        let rejected = disk.submit(BlockRequest::discard(2, 63, 2)).unwrap_err();
        assert!(matches!(rejected.error, BlockError::OutOfRange { .. }));
        let info = disk.info();
        assert_eq!(info.geometry.unwrap().capacity_blocks, 64);
        assert!(info.to_string().starts_with("ram0     ramdisk"));
    }
}
