//! Memory: the frame allocator filled from every usable range of the boot memory map (RAM
//! above 4 GiB mapped here at boot), and the kernel heap: arenas of frames, each a
//! `linked_list_allocator` heap, the first made at boot and more added when an allocation
//! does not fit, up to all free frames but a reserve kept for DMA pools (`frames::heap_growth`).
//! So exception tables and other start-up structures can use all of the memory, and an
//! allocation that memory cannot serve fails (fallible table growth refuses that store) rather
//! than stopping the appliance. The heap counts allocations so the console can prove the I/O
//! path allocates nothing after start-up.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use boot::multiboot::BootInfo;
use linked_list_allocator::Heap;

use crate::arch::{cpu, paging};
use crate::frames::{self, FrameAllocator, Prefer, Range, FRAME_SIZE, LIMIT};

/// Most heap arenas (the heap doubles as it grows, so a few cover any memory size).
const MAX_ARENAS: usize = 48;
/// Heap arenas are 2 MiB aligned multiples of 2 MiB.
const ARENA_ALIGN: u64 = 2 << 20;

struct Arenas {
    heaps: [Heap; MAX_ARENAS],
    count: usize,
    total: u64,
    /// Allocations the heap could not serve even after trying to grow.
    failed: u64,
}

impl Arenas {
    fn used(&self) -> u64 {
        self.heaps[..self.count]
            .iter()
            .map(|h| h.used() as u64)
            .sum()
    }

    /// Adds the frames `[start, start+bytes)` as a new arena.
    ///
    /// # Safety
    /// The range must be identity-mapped RAM, taken from the frame allocator for the heap
    /// and used by nothing else.
    unsafe fn add(&mut self, start: u64, bytes: u64) -> bool {
        if self.count == MAX_ARENAS {
            return false;
        }
        // SAFETY: guaranteed by the caller.
        unsafe { self.heaps[self.count].init(start as *mut u8, bytes as usize) };
        self.count += 1;
        self.total += bytes;
        true
    }

    /// Takes a new arena from the frames for an allocation of `layout` and serves it there.
    fn grow(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        if self.count == MAX_ARENAS {
            return None;
        }
        // The allocation, its alignment padding and the allocator's hole bookkeeping.
        let needed = (layout.size() as u64)
            .checked_add(layout.align() as u64)?
            .checked_add(4096)?;
        let min = needed.checked_next_multiple_of(ARENA_ALIGN)?;
        let start = cpu::without_interrupts(|| {
            let mut f = FRAMES.lock();
            let total = f.total() * FRAME_SIZE;
            let free = f.free_frames() * FRAME_SIZE;
            let mut bytes =
                frames::heap_growth(needed, self.total, free, frames::dma_reserve(total))?;
            // Contiguous runs may be shorter than what is free: halve down to the minimum.
            loop {
                let count = (bytes / FRAME_SIZE) as usize;
                let align = (ARENA_ALIGN / FRAME_SIZE) as usize;
                if let Some(p) = f.allocate_in(count, align, Prefer::High) {
                    return Some((p, bytes));
                }
                if bytes <= min {
                    return None;
                }
                bytes = (bytes / 2).max(min) & !(ARENA_ALIGN - 1);
            }
        });
        let (start, bytes) = start?;
        // SAFETY: the frames were just taken from the allocator for the heap: identity-mapped
        // RAM (every zone is mapped at boot) that nothing else uses.
        if !unsafe { self.add(start, bytes) } {
            return None;
        }
        self.heaps[self.count - 1].allocate_first_fit(layout).ok()
    }
}

struct CountingHeap {
    arenas: spin::Mutex<Arenas>,
    allocations: AtomicU64,
    frees: AtomicU64,
}

// SAFETY: each arena is a `linked_list_allocator::Heap` (a correct allocator) over frames owned
// by the heap alone; a pointer is returned to the arena whose range holds it; the counters are
// atomics.
unsafe impl GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        let mut arenas = self.arenas.lock();
        let count = arenas.count;
        // Newest (largest) arena first.
        for heap in arenas.heaps[..count].iter_mut().rev() {
            if let Ok(p) = heap.allocate_first_fit(layout) {
                return p.as_ptr();
            }
        }
        match arenas.grow(layout) {
            Some(p) => p.as_ptr(),
            None => {
                arenas.failed += 1;
                core::ptr::null_mut()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.frees.fetch_add(1, Ordering::Relaxed);
        let mut arenas = self.arenas.lock();
        let count = arenas.count;
        let Some(p) = NonNull::new(ptr) else {
            return;
        };
        if let Some(heap) = arenas.heaps[..count]
            .iter_mut()
            .find(|h| h.bottom() <= ptr && ptr < h.top())
        {
            // SAFETY: `ptr` came from this arena's `allocate_first_fit` with `layout` (same
            // contract as ours).
            unsafe { heap.deallocate(p, layout) };
        }
    }
}

#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    arenas: spin::Mutex::new(Arenas {
        heaps: [const { Heap::empty() }; MAX_ARENAS],
        count: 0,
        total: 0,
        failed: 0,
    }),
    allocations: AtomicU64::new(0),
    frees: AtomicU64::new(0),
};

static FRAMES: spin::Mutex<FrameAllocator> = spin::Mutex::new(FrameAllocator::new());

/// What the memory map gave, for the boot log and `mem`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryMap {
    /// Usable bytes the frame allocator manages.
    pub usable: u64,
    /// Of which above 4 GiB.
    pub above_4g: u64,
    /// Usable ranges.
    pub ranges: usize,
    /// Usable bytes left unused: ranges beyond what the allocator keeps, or that could not
    /// be mapped.
    pub unused: u64,
    /// The heap's first arena.
    pub heap: u64,
    /// The map had more usable ranges than [`frames::MAX_RANGES`]; the rest are not used.
    pub truncated: bool,
}

static MAP: spin::Once<MemoryMap> = spin::Once::new();

/// Memory figures for the `mem` command.
pub struct MemoryStats {
    /// Heap size in bytes (all arenas).
    pub heap_total: u64,
    /// Heap bytes in use.
    pub heap_used: u64,
    /// Heap arenas.
    pub heap_arenas: usize,
    /// Heap allocations that failed for want of memory.
    pub heap_failed: u64,
    /// Frames kept free for DMA pools: the heap does not grow into them.
    pub dma_reserve: u64,
    /// Frames managed by the frame allocator (the heap is carved from them).
    pub frames_total: u64,
    /// Frames free.
    pub frames_free: u64,
    /// Heap allocations since boot.
    pub allocations: u64,
    /// Heap frees since boot.
    pub frees: u64,
    /// The memory map as found at boot.
    pub map: MemoryMap,
}

/// Fills the frame allocator from the memory map (mapping RAM above 4 GiB) and creates the
/// heap's first arena. Returns what was found, or an error message when there is not enough
/// memory for a heap.
pub fn init(boot: &BootInfo) -> Result<MemoryMap, &'static str> {
    let (image_start, image_end) = boot::image_range();
    // Real-mode area, BIOS data, EBDA: never ours. Then the image itself.
    let reserved = [
        Range {
            start: 0,
            end: 0x10_0000,
        },
        Range {
            start: image_start,
            end: image_end,
        },
    ];
    let ranges = frames::usable_ranges(boot.regions(), &reserved);
    let mut map = MemoryMap {
        ranges: ranges.as_slice().len(),
        ..MemoryMap::default()
    };
    let mut frames = FRAMES.lock();
    for r in ranges.as_slice().iter().filter(|r| r.end <= LIMIT) {
        frames.add_range(r.start, r.len());
    }
    for r in ranges.as_slice().iter().filter(|r| r.start >= LIMIT) {
        // Page tables for the new mappings come from the low zone, mapped since boot.
        let mapped = paging::map_ram(r.start, r.end, &mut || {
            let p = frames.allocate(1, 1)?;
            // SAFETY: a frame just taken from the allocator, identity-mapped below 4 GiB,
            // that no one else references.
            unsafe { core::ptr::write_bytes(p as *mut u8, 0, FRAME_SIZE as usize) };
            Some(p)
        });
        let bitmap = frames::bitmap_frames(r.len()) * FRAME_SIZE;
        let zone = Range {
            start: r.start + bitmap,
            end: r.end,
        };
        if mapped.is_err() || zone.is_empty() {
            map.unused += r.len();
            continue;
        }
        let words = (r.len() / FRAME_SIZE).div_ceil(64) as usize;
        // The zone made of the rest of the range starts after the bitmap's bytes, so the
        // allocator never hands them out.
        // SAFETY: the range's first bytes are usable RAM per the memory map, just mapped,
        // owned by nothing else (see above).
        let bits = unsafe { core::slice::from_raw_parts_mut(r.start as *mut u64, words) };
        if frames.add_high_zone(zone, bits).is_err() {
            map.unused += r.len();
        }
    }
    map.usable = frames.total() * FRAME_SIZE;
    map.above_4g = frames.high_total() * FRAME_SIZE;
    map.truncated = ranges.truncated;
    let mut heap_bytes = (map.usable / 4).min(frames::HEAP_INITIAL_MAX) & !(ARENA_ALIGN - 1);
    let mut heap_start = None;
    while heap_bytes >= 4 << 20 {
        let count = (heap_bytes / FRAME_SIZE) as usize;
        if let Some(p) =
            frames.allocate_in(count, (ARENA_ALIGN / FRAME_SIZE) as usize, Prefer::High)
        {
            heap_start = Some(p);
            break;
        }
        heap_bytes /= 2;
    }
    drop(frames);
    let Some(start) = heap_start else {
        return Err("not enough contiguous memory for a 4 MiB heap");
    };
    // SAFETY: the frames [start, start+heap_bytes) were just taken from the allocator, are
    // usable RAM per the memory map, identity-mapped, and owned by nothing else.
    unsafe { HEAP.arenas.lock().add(start, heap_bytes) };
    map.heap = heap_bytes;
    MAP.call_once(|| map);
    Ok(map)
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
    let (heap_total, heap_used, heap_arenas, heap_failed) = {
        let a = HEAP.arenas.lock();
        (a.total, a.used(), a.count, a.failed)
    };
    let (frames_total, frames_free) = cpu::without_interrupts(|| {
        let f = FRAMES.lock();
        (f.total(), f.free_frames())
    });
    MemoryStats {
        heap_total,
        heap_used,
        heap_arenas,
        heap_failed,
        dma_reserve: frames::dma_reserve(frames_total * FRAME_SIZE),
        frames_total,
        frames_free,
        allocations: HEAP.allocations.load(Ordering::Relaxed),
        frees: HEAP.frees.load(Ordering::Relaxed),
        map: MAP.get().copied().unwrap_or_default(),
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
