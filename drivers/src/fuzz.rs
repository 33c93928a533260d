//! Bodies of the fuzz targets in `tests/fuzz/` (cargo fuzz) that exercise the drivers'
//! completion handling against devices that lie: the NVMe completion queue and the virtio
//! used ring take arbitrary entries next to real ones. The fuzz targets call these functions,
//! and so does `tests/tests/fuzz_corpus.rs`, which replays every file of each target's corpus
//! (`tests/fuzz/corpus/TARGET/`) on the stable toolchain: `cargo test -p tests --test fuzz_corpus`.
//!
//! Built with the `fuzz` feature (the fuzz crate and the `tests` crate turn it on) (which builds the crate with std for
//! the fakes); not part of the appliance.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::block::{BlockDevice, BlockRequest, BufferPool, Completion};
use crate::hal::fake::{with_dma_reclaimed, FakeDma, FakeVirtioHal};
use crate::info::{disk_name, DeviceName};
use crate::msix::VectorRegistry;
use crate::nvme::cmd::CompletionEntry;
use crate::nvme::fake::{FakeController, FakeNamespace, TestVectors};
use crate::nvme::{attach, AttachParams, Clock, NvmeConfig, StatusField};
use crate::virtio_blk::fake_queue::{FakeBlk, FakeTransport, FakeVectors};
use crate::virtio_blk::regs::BlkFeatures;
use crate::virtio_blk::{VectorAssignment, VirtioBlk, VirtioBlkConfig};

/// The input as a stream of bytes, zero once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Which request each tag was and whether it has completed: every request a device accepted
/// completes exactly once, with its buffer back if it had one.
#[derive(Default)]
struct Ledger {
    open: BTreeMap<u64, bool>,
    next_tag: u64,
}

impl Ledger {
    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }
    fn accepted(&mut self, tag: u64, has_buffer: bool) {
        assert!(self.open.insert(tag, has_buffer).is_none());
    }
    fn completed(&mut self, c: Completion, pool: &mut BufferPool) {
        let has_buffer = self
            .open
            .remove(&c.tag)
            .unwrap_or_else(|| panic!("completion of tag {} twice or never submitted", c.tag));
        assert_eq!(c.buffer.is_some(), has_buffer, "tag {}: buffer", c.tag);
        if let Some(b) = c.buffer {
            assert!(pool.release(b).is_ok(), "tag {}: a foreign buffer", c.tag);
        }
    }
}

/// A request of kind `kind % 4` (read, write, flush, discard) on a device of `blocks`
/// 512-byte blocks, with a buffer from `pool` if it needs one and one is free.
fn request(b: &mut Bytes, tag: u64, blocks: u64, pool: &mut BufferPool) -> Option<BlockRequest> {
    let kind = b.u8() % 4;
    let lba = u64::from(b.u16()) % (blocks + 4);
    let len = 512 * (1 + usize::from(b.u8() % 8));
    if kind >= 2 {
        return Some(if kind == 2 {
            BlockRequest::flush(tag)
        } else {
            BlockRequest::discard(tag, lba, 1 + u32::from(b.u8() % 8))
        });
    }
    let mut buf = pool.acquire()?;
    if buf.set_len(len.min(buf.capacity())).is_err() {
        let _ = pool.release(buf);
        return None;
    }
    Some(if kind == 0 {
        BlockRequest::read(tag, lba, buf)
    } else {
        BlockRequest::write(tag, lba, buf, b.u8() & 1 != 0)
    })
}

/// Submits `r`; a refused request comes back with its buffer, which goes back to the pool.
fn submit(
    device: &mut dyn BlockDevice,
    r: BlockRequest,
    ledger: &mut Ledger,
    pool: &mut BufferPool,
) {
    let tag = r.tag;
    let has_buffer = r.buffer.is_some();
    match device.submit(r) {
        Ok(()) => ledger.accepted(tag, has_buffer),
        Err(rejected) => {
            if let Some(b) = rejected.request.buffer {
                assert!(pool.release(b).is_ok());
            }
        }
    }
}

/// Polls `device` until it has nothing more; every completion goes to the ledger.
fn drain(device: &mut dyn BlockDevice, budget: usize, ledger: &mut Ledger, pool: &mut BufferPool) {
    for _ in 0..64 {
        let mut done = Vec::new();
        let outcome = device.poll_completions(budget, &mut |c| done.push(c));
        assert_eq!(outcome.completed, done.len());
        assert!(done.len() <= budget);
        for c in done {
            ledger.completed(c, pool);
        }
        if !outcome.more {
            return;
        }
    }
}

static NVME_VECTORS: VectorRegistry = VectorRegistry::new();
static NVME_NOW: AtomicU64 = AtomicU64::new(0);

/// The NVMe driver's clock here: 1 ms per read, and jumps the input asks for.
fn nvme_clock() -> u64 {
    NVME_NOW.fetch_add(1_000_000, Ordering::Relaxed)
}

/// `nvme_completions`: an NVMe controller (the fake, two namespaces on shared or separate
/// queue pairs, small rings) whose I/O commands are held; the input interleaves
/// submissions, real completions in any order, arbitrary completion entries posted on any
/// completion queue (any command ID, SQ ID, SQ head, status, with the current or the stale
/// phase tag), polls with small budgets, clock jumps past the command deadline and a fatal
/// controller status.
///
/// Checks: the driver never panics; every request it accepted completes exactly once (with
/// its buffer) by the time the device has finished or has been given up; no completion for
/// a tag it never took.
pub fn nvme_completions(data: &[u8]) {
    with_dma_reclaimed(|| nvme_run(data));
}

fn nvme_run(data: &[u8]) {
    let mut b = Bytes(data);
    NVME_NOW.store(0, Ordering::Relaxed);
    let shared = b.u8() & 1 != 0;
    let config = NvmeConfig {
        io_queue_entries: 8,
        max_depth: 6,
        max_io_queues: if shared { 1 } else { 2 },
        max_transfer_bytes: 4096,
        ..NvmeConfig::default()
    };
    let fake = FakeController::new(vec![
        FakeNamespace::new(1, 9, 64),
        FakeNamespace::new(2, 9, 32),
    ]);
    let clock: Clock = &nvme_clock;
    let mut vectors = TestVectors::new(&NVME_VECTORS, 4);
    let attached = attach::<_, FakeDma>(
        fake.clone(),
        AttachParams {
            name: DeviceName::from_str_truncated("nvme0"),
            pci: None,
            first_device_index: 0,
            config,
            clock,
            registry: &NVME_VECTORS,
            vectors: &mut vectors,
        },
    );
    let Ok(mut attached) = attached else {
        vectors.release();
        panic!("the fake controller did not attach");
    };
    fake.state().hold = true;
    let mut pool = BufferPool::new::<FakeDma>(0, 8, 4096).expect("pool");
    let mut ledger = Ledger::default();
    let queues = if shared { 1 } else { 2 };
    while !b.is_empty() {
        match b.u8() % 8 {
            0 | 1 => {
                let ns = usize::from(b.u8() % 2);
                let tag = ledger.tag();
                let blocks = [64, 32][ns];
                if let Some(r) = request(&mut b, tag, blocks, &mut pool) {
                    submit(&mut attached.namespaces[ns], r, &mut ledger, &mut pool);
                }
            }
            2 => fake.release_one(usize::from(b.u8())),
            3 => {
                let cqid = u16::from(b.u8()) % (queues + 1);
                let entry = CompletionEntry {
                    result: 0,
                    cid: b.u16() % 16,
                    sq_head: b.u16() % 12,
                    sq_id: b.u16() % 4,
                    phase: false,
                    status: StatusField(b.u16() & 0x7fff),
                };
                fake.post_entry(cqid, entry, b.u8() == 0xff);
            }
            4 | 5 => {
                let ns = usize::from(b.u8() % 2);
                let budget = 1 + usize::from(b.u8() % 8);
                let device = &mut attached.namespaces[ns];
                let mut done = Vec::new();
                device.poll_completions(budget, &mut |c| done.push(c));
                assert!(done.len() <= budget);
                for c in done {
                    ledger.completed(c, &mut pool);
                }
            }
            6 => {
                NVME_NOW.fetch_add(u64::from(b.u8()) * 500_000_000, Ordering::Relaxed);
                attached.controller.check_timeouts();
            }
            _ => {
                if b.u8() == 0xff {
                    fake.state().csts |= 2;
                }
            }
        }
    }
    // The device finishes everything it holds, then what it never answers times out.
    fake.state().hold = false;
    fake.release_one(0);
    while !fake.state().held.is_empty() {
        fake.release_one(0);
    }
    for ns in attached.namespaces.iter_mut() {
        drain(ns, 64, &mut ledger, &mut pool);
    }
    NVME_NOW.fetch_add(60_000_000_000, Ordering::Relaxed);
    attached.controller.check_timeouts();
    for ns in attached.namespaces.iter_mut() {
        drain(ns, 64, &mut ledger, &mut pool);
        assert_eq!(ns.in_flight(), 0, "requests left in the driver");
    }
    assert!(
        ledger.open.is_empty(),
        "requests never completed: {:?}",
        ledger.open.keys().collect::<Vec<_>>()
    );
    assert_eq!(pool.available(), pool.total(), "buffers lost");
    drop(attached);
    vectors.release();
}

/// `virtio_used_ring`: a virtio-blk device (the fake) whose used ring takes, next to the
/// real completions of the requests it fetched (in any order, with any status byte),
/// arbitrary elements (any ID, any length) and jumps of its index; the input interleaves
/// them with submissions and polls with small budgets.
///
/// Checks: the driver never panics; no request completes twice, no completion for a tag it
/// never took, every buffer is either back or with a request still in flight; and when the
/// used ring told no lies, every request it accepted completes exactly once. (A lying used
/// ring can take back a real completion, by moving its index backwards or by overwriting an
/// element the driver has not read yet; virtio-blk has no command deadline, so such a
/// request stays in flight.)
pub fn virtio_used_ring(data: &[u8]) {
    with_dma_reclaimed(|| virtio_run(data));
}

fn virtio_run(data: &[u8]) {
    let mut b = Bytes(data);
    let queue_size = [8u32, 16, 256][usize::from(b.u8() % 3)];
    let features = BlkFeatures::VERSION_1.bits()
        | BlkFeatures::FLUSH.bits()
        | BlkFeatures::SEG_MAX.bits()
        | BlkFeatures::DISCARD.bits();
    let fake = FakeBlk::new(64, features);
    {
        let mut f = fake.borrow_mut();
        f.max_queue_size = queue_size;
        f.set_config32(crate::virtio_blk::regs::config::MAX_DISCARD_SECTORS, 64);
        f.set_config32(crate::virtio_blk::regs::config::MAX_DISCARD_SEG, 1);
    }
    let blk = VirtioBlk::<FakeVirtioHal, FakeTransport>::new(
        disk_name("vd", 0),
        None,
        FakeTransport(fake.clone()),
        Some(FakeVectors(fake.clone())),
        VectorAssignment {
            config_entry: Some(0),
            queue_entry: Some(1),
            cpu_vectors: [Some(0x30), Some(0x31)],
        },
        VirtioBlkConfig::default(),
    );
    let mut blk = blk.expect("the fake device initialises");
    let mut pool = BufferPool::new::<FakeDma>(0, 8, 4096).expect("pool");
    let mut ledger = Ledger::default();
    let live = |f: &FakeBlk| f.queue.is_some();
    let mut lied = false;
    while !b.is_empty() {
        match b.u8() % 8 {
            0 | 1 => {
                let tag = ledger.tag();
                if let Some(r) = request(&mut b, tag, 64, &mut pool) {
                    submit(&mut blk, r, &mut ledger, &mut pool);
                }
            }
            2 | 3 => {
                // The device serves one fetched request, with the status the input gives
                // (mostly OK).
                let pick = usize::from(b.u8());
                let status = b.u8();
                let mut f = fake.borrow_mut();
                if live(&f) {
                    f.fetch();
                    if !f.pending.is_empty() {
                        let n = f.pending.len();
                        let head = f.pending.remove(pick % n);
                        if status >= 0xf0 {
                            f.fail_status.push(status & 3);
                        }
                        f.complete(head);
                    }
                }
            }
            4 => {
                let (id, len) = (u32::from(b.u16()), u32::from(b.u16()));
                let mut f = fake.borrow_mut();
                if live(&f) {
                    f.push_used(id % (queue_size + 2), len);
                    lied = true;
                }
            }
            5 => {
                let jump = b.u16();
                let mut f = fake.borrow_mut();
                if live(&f) {
                    f.bump_used_idx(jump);
                    lied = true;
                }
            }
            _ => {
                let budget = 1 + usize::from(b.u8() % 8);
                let mut done = Vec::new();
                let outcome = blk.poll_completions(budget, &mut |c| done.push(c));
                assert_eq!(outcome.completed, done.len());
                assert!(done.len() <= budget);
                for c in done {
                    ledger.completed(c, &mut pool);
                }
            }
        }
    }
    // The device serves everything it fetched; then the driver has nothing left.
    for _ in 0..4 {
        {
            let mut f = fake.borrow_mut();
            if live(&f) {
                f.complete_all(false);
            }
        }
        drain(&mut blk, 64, &mut ledger, &mut pool);
    }
    let with_buffers = ledger.open.values().filter(|&&b| b).count();
    assert_eq!(
        pool.available() + with_buffers,
        pool.total(),
        "buffers lost"
    );
    if lied {
        // At most the driver's own GET_ID besides the requests still open.
        let open = ledger.open.len();
        assert!(
            (open..=open + 1).contains(&blk.in_flight()),
            "in flight: {}",
            blk.in_flight()
        );
        return;
    }
    assert!(
        ledger.open.is_empty(),
        "requests never completed: {:?}",
        ledger.open.keys().collect::<Vec<_>>()
    );
    assert_eq!(blk.in_flight(), 0, "requests left in the driver");
}

/// Seed inputs of `nvme_completions`.
pub fn nvme_completions_seeds() -> Vec<Vec<u8>> {
    vec![
        // Separate pairs: writes and reads on both namespaces, completed in reverse, polled.
        vec![
            0, 0, 0, 1, 3, 0, 2, 0, 1, 1, 5, 0, 1, 1, 0, 0, 4, 0, 2, 3, 2, 0, 4, 0, 8, 4, 1, 8,
        ],
        // Shared pair: flush and discard, a bogus completion, a poll.
        vec![
            1, 0, 0, 2, 0, 0, 0, 1, 3, 4, 0, 0, 3, 1, 7, 0, 1, 0, 0, 0, 0, 0, 0, 4, 0, 8,
        ],
        // A command that never completes: the deadline passes.
        vec![0, 0, 0, 1, 0, 0, 0, 1, 6, 200, 4, 0, 8],
        // A stale-phase entry, a fatal status.
        vec![
            0, 0, 0, 0, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 255, 7, 255, 4, 0, 8,
        ],
    ]
}

/// Seed inputs of `virtio_used_ring`.
pub fn virtio_used_ring_seeds() -> Vec<Vec<u8>> {
    vec![
        // Queue of 8: write, read, flush, served in order, polled.
        vec![
            0, 1, 1, 0, 0, 2, 0, 0, 5, 0, 0, 0, 2, 2, 0, 0, 2, 0, 0, 2, 0, 0, 2, 0, 0, 6, 8,
        ],
        // Queue of 256: a failing status, a bogus used element, polls.
        vec![2, 0, 0, 4, 0, 1, 2, 0, 0, 240, 6, 8, 4, 7, 0, 16, 0, 6, 8],
        // Queue of 16: a discard, an index jump.
        vec![1, 0, 3, 9, 0, 2, 2, 0, 0, 5, 3, 0, 6, 8],
    ]
}
