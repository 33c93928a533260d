//! Memory: the frame allocator filled from the boot memory map, and the kernel heap
//! (`linked_list_allocator`) carved out of it at boot. The heap counts allocations so the
//! console can prove the I/O path allocates nothing after start-up.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU64, Ordering};

use boot::multiboot::{BootInfo, RegionKind};
use linked_list_allocator::LockedHeap;

use crate::arch::cpu;
use crate::frames::{FrameAllocator, FRAME_SIZE};

/// The heap's cap: start-up structures (tables, engine pools) live there; DMA buffers come
/// from frames, so the heap takes a quarter of usable memory at most.
const HEAP_MAX: u64 = 128 << 20;

struct CountingHeap {
    heap: LockedHeap,
    allocations: AtomicU64,
    frees: AtomicU64,
}

// SAFETY: delegates to `LockedHeap`, which is a correct allocator; the counters are atomics.
unsafe impl GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { self.heap.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.frees.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { self.heap.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    heap: LockedHeap::empty(),
    allocations: AtomicU64::new(0),
    frees: AtomicU64::new(0),
};

static FRAMES: spin::Mutex<FrameAllocator> = spin::Mutex::new(FrameAllocator::new());

/// Memory figures for the `mem` command.
pub struct MemoryStats {
    /// Heap size in bytes.
    pub heap_total: u64,
    /// Heap bytes in use.
    pub heap_used: u64,
    /// Frames managed by the frame allocator (the heap is carved from them).
    pub frames_total: u64,
    /// Frames free.
    pub frames_free: u64,
    /// Heap allocations since boot.
    pub allocations: u64,
    /// Heap frees since boot.
    pub frees: u64,
}

/// Fills the frame allocator from the memory map and creates the heap.
/// Returns the heap size, or an error message when there is not enough memory.
pub fn init(boot: &BootInfo) -> Result<u64, &'static str> {
    let (image_start, image_end) = boot::image_range();
    let mut frames = FRAMES.lock();
    for region in boot
        .regions()
        .iter()
        .filter(|r| r.kind == RegionKind::Usable)
    {
        frames.add_range(region.start, region.len);
    }
    // Firmware maps can overlap: whatever any entry calls reserved stays reserved.
    for region in boot
        .regions()
        .iter()
        .filter(|r| r.kind != RegionKind::Usable)
    {
        frames.reserve_range(region.start, region.len);
    }
    // Real-mode area, BIOS data, EBDA: never ours. Then the image itself.
    frames.reserve_range(0, 0x10_0000);
    frames.reserve_range(image_start, image_end - image_start);
    let usable = frames.total() * FRAME_SIZE;
    let mut heap_bytes = (usable / 4).min(HEAP_MAX) & !(FRAME_SIZE * 512 - 1);
    let mut heap_start = None;
    while heap_bytes >= 4 << 20 {
        if let Some(p) = frames.allocate((heap_bytes / FRAME_SIZE) as usize, 512) {
            heap_start = Some(p);
            break;
        }
        heap_bytes /= 2;
    }
    let Some(start) = heap_start else {
        return Err("not enough contiguous memory for a 4 MiB heap");
    };
    // SAFETY: the frames [start, start+heap_bytes) were just taken from the allocator, are
    // usable RAM per the memory map, identity-mapped, and owned by nothing else.
    unsafe { HEAP.heap.lock().init(start as *mut u8, heap_bytes as usize) };
    Ok(heap_bytes)
}

/// Allocates `count` physically contiguous frames aligned to `align` frames, zeroed.
pub fn allocate_frames(count: usize, align: usize) -> Option<u64> {
    let p = cpu::without_interrupts(|| FRAMES.lock().allocate(count, align))?;
    // SAFETY: the frames were just handed out by the allocator: identity-mapped RAM that no
    // one else references.
    unsafe { core::ptr::write_bytes(p as *mut u8, 0, count * FRAME_SIZE as usize) };
    Some(p)
}

/// Returns frames from [`allocate_frames`].
pub fn free_frames(address: u64, count: usize) {
    cpu::without_interrupts(|| FRAMES.lock().free(address, count));
}

/// Current memory figures.
pub fn stats() -> MemoryStats {
    let (heap_total, heap_used) = cpu::without_interrupts(|| {
        let h = HEAP.heap.lock();
        (h.size() as u64, h.used() as u64)
    });
    let (frames_total, frames_free) = cpu::without_interrupts(|| {
        let f = FRAMES.lock();
        (f.total(), f.free_frames())
    });
    MemoryStats {
        heap_total,
        heap_used,
        frames_total,
        frames_free,
        allocations: HEAP.allocations.load(Ordering::Relaxed),
        frees: HEAP.frees.load(Ordering::Relaxed),
    }
}

/// Heap allocations since boot (for the I/O-path allocation guard), less those the
/// snapshot engine's exception tables made to grow: that growth is the one allocation the
/// I/O path is designed to make (fallible, see `snapshot::table`), and `mem` counts it apart.
pub fn allocation_count() -> u64 {
    HEAP.allocations
        .load(Ordering::Relaxed)
        .saturating_sub(snapshot::table::growth_allocations())
}

/// Reads identity-mapped physical memory for boot-info and ACPI parsing.
pub struct IdentityMemory;

impl boot::multiboot::PhysMem for IdentityMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let end = match addr.checked_add(buf.len() as u64) {
            Some(e) => e,
            None => return false,
        };
        // Only the identity-mapped first 4 GiB, and never the null page.
        if addr < 0x1000 && addr != 0x40E || end > crate::frames::LIMIT {
            return false;
        }
        // Callers only ask for memory the loader or firmware pointed at.
        // SAFETY: the range lies in the identity-mapped first 4 GiB (checked above); reads
        // of RAM or firmware tables have no side effects.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }
}
