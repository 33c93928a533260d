//! Queue memory shared with the controller: submission and completion rings, PRP list pages
//! and the admin data page (NVMe Base 2.0 §3.3 "Queue Mechanism", §4.1 PRP lists).
//!
//! This is one of the driver's two `unsafe` places: DMA memory that the controller reads and
//! writes behind the compiler's back is only ever touched with volatile accesses through raw
//! pointers, never through Rust references. Ring arithmetic (tail/head wrap, phase tag flip)
//! lives here too, so the rest of the driver deals in [`Command`] and [`CompletionEntry`]
//! values only.
//!
//! Ordering: entries and PRP lists are written before a `Release` fence and the doorbell
//! write (x86 keeps stores in order; the fence keeps the compiler from reordering). A
//! completion's dword 3 (phase tag) is read first, then an `Acquire` fence, then the rest.
//!
//! All memory comes from [`DmaAllocator`] at init and is leaked: the controller may keep DMA
//! addresses after a failure, so queue memory is never given back.

use super::cmd::{Command, CompletionEntry, CQE_SIZE, SQE_SIZE};
use super::prp::ListPages;
use super::regs::{Doorbells, RegisterAccess};
use crate::hal::{Dma, DmaAllocator, HalError, PAGE_SIZE};
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};

/// A leaked, physically contiguous DMA region reached only through raw pointers.
#[derive(Debug)]
struct Region {
    base: NonNull<u8>,
    phys: u64,
    len: usize,
}

// SAFETY: the region is exclusively owned by the queue that holds it (the controller is the
// only other party, and it is not a Rust thread); moving it between CPUs is fine.
unsafe impl Send for Region {}

impl Region {
    fn new<A: DmaAllocator>(bytes: usize) -> Result<Self, HalError> {
        let slice = Dma::<A>::new(bytes)?.leak();
        let len = slice.data.len();
        let base = NonNull::new(slice.data.as_mut_ptr()).ok_or(HalError::ZeroLength)?;
        // From here on the memory is reached through `base` only; the `&'static mut` is gone.
        Ok(Self {
            base,
            phys: slice.phys,
            len,
        })
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        if offset
            .checked_add(bytes.len())
            .is_none_or(|end| end > self.len)
        {
            return;
        }
        for (i, &b) in bytes.iter().enumerate() {
            // Volatile because the device reads it asynchronously.
            // SAFETY: `offset + i < len` (checked above) and the region is valid, leaked DMA
            // memory that only this handle and the device access.
            unsafe { self.base.as_ptr().add(offset + i).write_volatile(b) };
        }
    }

    fn write_u64(&self, offset: usize, value: u64) {
        if !offset.is_multiple_of(8) || offset + 8 > self.len {
            return;
        }
        // SAFETY: in bounds and 8-byte aligned (regions are page aligned, offset checked).
        unsafe {
            self.base
                .as_ptr()
                .add(offset)
                .cast::<u64>()
                .write_volatile(value.to_le())
        };
    }

    fn write_u32(&self, offset: usize, value: u32) {
        if !offset.is_multiple_of(4) || offset + 4 > self.len {
            return;
        }
        // SAFETY: in bounds and 4-byte aligned (regions are page aligned, offset checked);
        // volatile because the device reads it asynchronously.
        unsafe {
            self.base
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .write_volatile(value.to_le())
        };
    }

    fn read_u32(&self, offset: usize) -> u32 {
        if !offset.is_multiple_of(4) || offset + 4 > self.len {
            return 0;
        }
        // SAFETY: in bounds and 4-byte aligned; volatile because the device writes it.
        u32::from_le(unsafe { self.base.as_ptr().add(offset).cast::<u32>().read_volatile() })
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        if offset
            .checked_add(out.len())
            .is_none_or(|end| end > self.len)
        {
            return;
        }
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above), valid leaked DMA memory.
            *b = unsafe { self.base.as_ptr().add(offset + i).read_volatile() };
        }
    }

    fn zero(&self) {
        for i in 0..self.len {
            // SAFETY: `i < len`, valid leaked DMA memory.
            unsafe { self.base.as_ptr().add(i).write_volatile(0) };
        }
    }
}

/// Why a queue operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// No free submission slot.
    Full,
}

/// A submission queue: the host produces at the tail, the controller consumes at the head
/// (reported back in each completion's `SQHD`).
#[derive(Debug)]
pub struct SubmissionQueue {
    ring: Region,
    qid: u16,
    entries: u16,
    tail: u16,
    head: u16,
    doorbell: usize,
}

impl SubmissionQueue {
    /// Allocates a zeroed ring of `entries` (2..=65536 in principle; we cap at 4096).
    pub fn new<A: DmaAllocator>(
        qid: u16,
        entries: u16,
        doorbells: Doorbells,
    ) -> Result<Self, HalError> {
        let entries = entries.clamp(2, 4096);
        Ok(Self {
            ring: Region::new::<A>(usize::from(entries) * SQE_SIZE)?,
            qid,
            entries,
            tail: 0,
            head: 0,
            doorbell: doorbells.sq_tail(qid),
        })
    }

    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Physical address of the ring.
    pub fn phys(&self) -> u64 {
        self.ring.phys
    }

    /// Entries the controller has not consumed yet.
    pub fn used(&self) -> u16 {
        (self.tail + self.entries - self.head) % self.entries
    }

    /// Free slots (one slot always stays empty: head == tail means empty).
    pub fn free(&self) -> u16 {
        self.entries - 1 - self.used()
    }

    /// The tail index (for tests).
    #[cfg(test)]
    pub fn tail(&self) -> u16 {
        self.tail
    }

    /// Copies `command` into the slot at the tail and advances the tail (not yet visible to
    /// the controller: call [`SubmissionQueue::ring_doorbell`]).
    pub fn push(&mut self, command: &Command) -> Result<(), QueueError> {
        if self.free() == 0 {
            return Err(QueueError::Full);
        }
        let at = usize::from(self.tail) * SQE_SIZE;
        for (i, dw) in command.dw.iter().enumerate() {
            self.ring.write_u32(at + 4 * i, *dw);
        }
        self.tail = (self.tail + 1) % self.entries;
        Ok(())
    }

    /// Tells the controller about every entry pushed so far.
    pub fn ring_doorbell<R: RegisterAccess + ?Sized>(&self, regs: &R) {
        fence(Ordering::Release);
        regs.write32(self.doorbell, u32::from(self.tail));
    }

    /// Records the controller's head pointer from a completion's `SQHD`; out-of-range values
    /// are ignored (and reported as `false`).
    pub fn update_head(&mut self, head: u16) -> bool {
        if head >= self.entries {
            return false;
        }
        self.head = head;
        true
    }

    /// Forgets every entry (after a controller reset).
    pub fn reset(&mut self) {
        self.head = 0;
        self.tail = 0;
        self.ring.zero();
    }
}

/// A completion queue: the controller produces entries with a phase tag that flips on every
/// pass through the ring; the host consumes at the head.
#[derive(Debug)]
pub struct CompletionQueue {
    ring: Region,
    qid: u16,
    entries: u16,
    head: u16,
    phase: bool,
    doorbell: usize,
}

impl CompletionQueue {
    /// Allocates a zeroed ring of `entries`. Zeroed memory has phase 0 everywhere, and the
    /// controller's first pass writes phase 1 (NVMe Base 2.0 §4.6).
    pub fn new<A: DmaAllocator>(
        qid: u16,
        entries: u16,
        doorbells: Doorbells,
    ) -> Result<Self, HalError> {
        let entries = entries.clamp(2, 4096);
        Ok(Self {
            ring: Region::new::<A>(usize::from(entries) * CQE_SIZE)?,
            qid,
            entries,
            head: 0,
            phase: true,
            doorbell: doorbells.cq_head(qid),
        })
    }

    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Physical address of the ring.
    pub fn phys(&self) -> u64 {
        self.ring.phys
    }

    /// Number of entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// The head index and expected phase (for tests).
    #[cfg(test)]
    pub fn position(&self) -> (u16, bool) {
        (self.head, self.phase)
    }

    /// The entry at the head if the controller has posted it (its phase tag matches ours).
    pub fn peek(&self) -> Option<CompletionEntry> {
        let at = usize::from(self.head) * CQE_SIZE;
        let dw3 = self.ring.read_u32(at + 12);
        if (dw3 & (1 << 16) != 0) != self.phase {
            return None;
        }
        // The rest of the entry is valid once the phase tag is seen.
        fence(Ordering::Acquire);
        Some(CompletionEntry::from_dwords([
            self.ring.read_u32(at),
            self.ring.read_u32(at + 4),
            self.ring.read_u32(at + 8),
            dw3,
        ]))
    }

    /// Consumes the head entry: advances the head, flipping the expected phase on wrap.
    pub fn advance(&mut self) {
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
    }

    /// Tells the controller how far we have consumed.
    pub fn ring_doorbell<R: RegisterAccess + ?Sized>(&self, regs: &R) {
        regs.write32(self.doorbell, u32::from(self.head));
    }

    /// Forgets every entry (after a controller reset).
    pub fn reset(&mut self) {
        self.head = 0;
        self.phase = true;
        self.ring.zero();
    }
}

/// Pages of DMA memory for PRP lists and Dataset Management ranges, `per_command` pages for
/// each command slot of a queue.
#[derive(Debug)]
pub struct ListPool {
    pages: Vec<Region>,
    per_command: usize,
}

impl ListPool {
    /// Allocates `per_command` pages for each of `commands` slots.
    pub fn new<A: DmaAllocator>(commands: usize, per_command: usize) -> Result<Self, HalError> {
        let mut pages = Vec::with_capacity(commands * per_command);
        for _ in 0..commands * per_command {
            pages.push(Region::new::<A>(PAGE_SIZE)?);
        }
        Ok(Self { pages, per_command })
    }

    /// Pages per command slot.
    #[cfg(test)]
    pub fn per_command(&self) -> usize {
        self.per_command
    }

    /// The list pages of command slot `cid`.
    pub fn for_command(&mut self, cid: u16) -> CommandLists<'_> {
        let first = usize::from(cid) * self.per_command;
        let end = (first + self.per_command).min(self.pages.len());
        CommandLists {
            pages: self.pages.get(first..end).unwrap_or(&[]),
        }
    }
}

/// The list pages of one command slot.
#[derive(Debug)]
pub struct CommandLists<'a> {
    pages: &'a [Region],
}

impl CommandLists<'_> {
    /// Stores `bytes` at the start of the first page (a Dataset Management range) and returns
    /// its physical address.
    pub fn store(&mut self, bytes: &[u8]) -> Option<u64> {
        let page = self.pages.first()?;
        page.write(0, bytes);
        Some(page.phys)
    }
}

impl ListPages for CommandLists<'_> {
    fn page_phys(&self, index: usize) -> Option<u64> {
        self.pages.get(index).map(|p| p.phys)
    }

    fn write(&mut self, index: usize, slot: usize, value: u64) {
        if let Some(page) = self.pages.get(index) {
            page.write_u64(slot * 8, value);
        }
    }
}

/// One page for admin command data (Identify answers).
#[derive(Debug)]
pub struct DataPage {
    region: Region,
}

impl DataPage {
    /// Allocates a zeroed page.
    pub fn new<A: DmaAllocator>() -> Result<Self, HalError> {
        Ok(Self {
            region: Region::new::<A>(PAGE_SIZE)?,
        })
    }

    /// Physical address.
    pub fn phys(&self) -> u64 {
        self.region.phys
    }

    /// Zeroes the page before a command fills it.
    pub fn clear(&self) {
        self.region.zero();
    }

    /// Copies the page out.
    pub fn read(&self, out: &mut [u8; PAGE_SIZE]) {
        fence(Ordering::Acquire);
        self.region.read(0, out);
    }
}

/// Host tests: "physical" memory is host memory (the fake DMA allocator identity-maps), so the
/// fake controller reaches the driver's queues and buffers through these.
#[cfg(any(test, feature = "fuzz"))]
pub(crate) mod phys {
    /// Copies `out.len()` bytes from physical address `phys`.
    pub(crate) fn read(phys: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            // Host tests only; volatile like a device's access.
            // SAFETY: `phys` is an address the driver handed to the fake controller (rings,
            // PRP lists, pool buffers), all allocated by `FakeDma` and alive for the test.
            *b = unsafe { ((phys as usize + i) as *const u8).read_volatile() };
        }
    }

    /// Copies `data` to physical address `phys`.
    pub(crate) fn write(phys: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: as in `read`: memory the driver gave the (fake) device to write.
            unsafe { ((phys as usize + i) as *mut u8).write_volatile(b) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeDma;
    use crate::nvme::regs::Capabilities;
    use crate::nvme::status::StatusField;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Recorder(RefCell<Vec<(usize, u32)>>);

    impl RegisterAccess for Recorder {
        fn read32(&self, _offset: usize) -> u32 {
            0
        }
        fn write32(&self, offset: usize, value: u32) {
            self.0.borrow_mut().push((offset, value));
        }
    }

    fn post(cq: &CompletionQueue, slot: u16, cid: u16, phase: bool) {
        let entry = CompletionEntry {
            cid,
            phase,
            sq_head: 0,
            sq_id: 1,
            result: 0,
            status: StatusField(0),
        };
        let mut bytes = [0u8; 16];
        for (c, d) in bytes.chunks_exact_mut(4).zip(entry.to_dwords()) {
            c.copy_from_slice(&d.to_le_bytes());
        }
        phys::write(cq.phys() + u64::from(slot) * 16, &bytes);
    }

    #[test]
    fn submission_ring_wraps_and_refuses_when_full() {
        let db = Doorbells::new(Capabilities(0));
        let mut sq = SubmissionQueue::new::<FakeDma>(1, 4, db).unwrap();
        let regs = Recorder::default();
        for cid in 0..3 {
            let mut c = Command::flush(1);
            c.set_cid(cid);
            sq.push(&c).unwrap();
        }
        assert_eq!(sq.push(&Command::flush(1)), Err(QueueError::Full));
        sq.ring_doorbell(&regs);
        assert_eq!(regs.0.borrow().last(), Some(&(0x1008, 3)));
        let mut raw = [0u8; 64];
        phys::read(sq.phys() + 2 * 64, &mut raw);
        assert_eq!(Command::from_bytes(&raw).cid(), 2);
        // The controller consumed two: two slots free, the tail wraps to 0 then 1.
        assert!(sq.update_head(2));
        assert!(!sq.update_head(4));
        assert_eq!(sq.free(), 2);
        sq.push(&Command::flush(1)).unwrap();
        assert_eq!(sq.tail(), 0);
        sq.push(&Command::flush(1)).unwrap();
        assert_eq!((sq.tail(), sq.free()), (1, 0));
    }

    #[test]
    fn completion_phase_flips_on_wrap() {
        let db = Doorbells::new(Capabilities(0));
        let mut cq = CompletionQueue::new::<FakeDma>(1, 3, db).unwrap();
        assert_eq!(cq.peek(), None, "zeroed ring has phase 0: nothing posted");
        let mut seen = Vec::new();
        // Three passes through a ring of three: phases 1, 0, 1.
        for pass in 0..3u16 {
            let phase = pass % 2 == 0;
            for slot in 0..3 {
                post(&cq, slot, pass * 10 + slot, phase);
                let e = cq.peek().expect("posted");
                assert_eq!(e.phase, phase);
                seen.push(e.cid);
                cq.advance();
                // The stale entry of the previous pass at the next slot is not taken.
                if slot < 2 {
                    assert_eq!(cq.peek(), None);
                }
            }
            assert_eq!(cq.position(), (0, pass % 2 == 1));
        }
        assert_eq!(seen, vec![0, 1, 2, 10, 11, 12, 20, 21, 22]);
        let regs = Recorder::default();
        cq.ring_doorbell(&regs);
        assert_eq!(regs.0.borrow().last(), Some(&(0x100c, 0)));
        cq.reset();
        assert_eq!(cq.position(), (0, true));
    }

    #[test]
    fn list_pages_and_data_page() {
        let mut pool = ListPool::new::<FakeDma>(2, 2).unwrap();
        let mut lists = pool.for_command(1);
        let p0 = lists.page_phys(0).unwrap();
        assert!(lists.page_phys(2).is_none());
        lists.write(0, 3, 0xabcd_e000);
        let mut raw = [0u8; 8];
        phys::read(p0 + 24, &mut raw);
        assert_eq!(u64::from_le_bytes(raw), 0xabcd_e000);
        assert_eq!(lists.store(&[1, 2, 3]), Some(p0));
        assert_eq!(pool.per_command(), 2);
        let page = DataPage::new::<FakeDma>().unwrap();
        phys::write(page.phys() + 5, &[7]);
        let mut out = [0u8; PAGE_SIZE];
        page.read(&mut out);
        assert_eq!(out[5], 7);
        page.clear();
        page.read(&mut out);
        assert_eq!(out[5], 0);
    }
}
