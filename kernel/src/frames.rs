//! Physical frame allocator: a bitmap of 4 KiB frames below 4 GiB (the identity-mapped
//! range), filled from the boot memory map. It hands out physically contiguous, aligned
//! runs for DMA pools and the heap at start-up, and takes them back when a pool is dropped.
//! Pure logic, tested on the host.

/// Frame size.
pub const FRAME_SIZE: u64 = 4096;
/// Highest address managed (exclusive): the identity-mapped 4 GiB.
pub const LIMIT: u64 = 1 << 32;
const FRAMES: usize = (LIMIT / FRAME_SIZE) as usize;
const WORDS: usize = FRAMES / 64;

/// The bitmap: bit set = frame free.
pub struct FrameAllocator {
    free: [u64; WORDS],
    total: u64,
    free_count: u64,
    /// Lowest word that may have a free bit (search hint).
    hint: usize,
}

impl Default for FrameAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameAllocator {
    /// No memory at all.
    pub const fn new() -> Self {
        FrameAllocator {
            free: [0; WORDS],
            total: 0,
            free_count: 0,
            hint: 0,
        }
    }

    fn is_free(&self, frame: usize) -> bool {
        self.free[frame / 64] & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, frame: usize, free: bool) {
        if free {
            self.free[frame / 64] |= 1 << (frame % 64);
        } else {
            self.free[frame / 64] &= !(1 << (frame % 64));
        }
    }

    /// Adds the whole frames inside `[start, start+len)` below [`LIMIT`] as free.
    pub fn add_range(&mut self, start: u64, len: u64) {
        let first = start.div_ceil(FRAME_SIZE);
        let end = start.saturating_add(len).min(LIMIT) / FRAME_SIZE;
        for f in first..end {
            if !self.is_free(f as usize) {
                self.set(f as usize, true);
                self.total += 1;
                self.free_count += 1;
            }
        }
    }

    /// Removes every frame touching `[start, start+len)` (kernel image, boot data).
    pub fn reserve_range(&mut self, start: u64, len: u64) {
        let first = start / FRAME_SIZE;
        let end = start.saturating_add(len).min(LIMIT).div_ceil(FRAME_SIZE);
        for f in first..end {
            if self.is_free(f as usize) {
                self.set(f as usize, false);
                self.total -= 1;
                self.free_count -= 1;
            }
        }
    }

    /// Allocates `count` contiguous frames aligned to `align` frames (a power of two);
    /// returns the physical address of the first. Fully used bitmap words are skipped 64
    /// frames at a time, and the search starts at the lowest word that may have a free frame.
    pub fn allocate(&mut self, count: usize, align: usize) -> Option<u64> {
        if count == 0 || !align.is_power_of_two() || count as u64 > self.free_count {
            return None;
        }
        while self.hint < WORDS && self.free[self.hint] == 0 {
            self.hint += 1;
        }
        let mut start = (self.hint * 64).next_multiple_of(align);
        while start + count <= FRAMES {
            if self.free[start / 64] == 0 {
                start = (start / 64 + 1) * 64;
                start = start.next_multiple_of(align);
                continue;
            }
            match (start..start + count).find(|f| !self.is_free(*f)) {
                None => {
                    for f in start..start + count {
                        self.set(f, false);
                    }
                    self.free_count -= count as u64;
                    return Some(start as u64 * FRAME_SIZE);
                }
                Some(used) => start = (used + 1).next_multiple_of(align),
            }
        }
        None
    }

    /// Returns frames from [`allocate`](Self::allocate).
    pub fn free(&mut self, address: u64, count: usize) {
        let first = (address / FRAME_SIZE) as usize;
        for f in first..(first + count).min(FRAMES) {
            if !self.is_free(f) {
                self.set(f, true);
                self.free_count += 1;
            }
        }
        self.hint = self.hint.min(first / 64);
    }

    /// Frames managed.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Frames free.
    pub fn free_frames(&self) -> u64 {
        self.free_count
    }

    /// The largest run of contiguous free frames.
    pub fn largest_free_run(&self) -> u64 {
        let (mut best, mut run) = (0u64, 0u64);
        for f in 0..FRAMES {
            if self.free[f / 64] == 0 && f % 64 == 0 {
                best = best.max(run);
                run = 0;
                continue;
            }
            if self.is_free(f) {
                run += 1;
                best = best.max(run);
            } else {
                run = 0;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_allocate_and_free() {
        let mut a = Box::new(FrameAllocator::new());
        a.add_range(0x100000, 0x400000); // 1 MiB .. 5 MiB
        assert_eq!(a.total(), 1024);
        a.reserve_range(0x100000, 0x12345); // kernel image
        assert_eq!(a.free_frames(), 1024 - 19);
        let p = a.allocate(16, 16).unwrap();
        assert_eq!(p % (16 * FRAME_SIZE), 0);
        assert!(p >= 0x113000);
        let q = a.allocate(1, 1).unwrap();
        assert_ne!(p, q);
        a.free(p, 16);
        assert_eq!(a.allocate(16, 16), Some(p));
        assert_eq!(a.allocate(5000, 1), None);
    }

    #[test]
    fn many_allocations_after_a_large_one() {
        let mut a = Box::new(FrameAllocator::new());
        a.add_range(0x100000, 512 << 20);
        let heap = a.allocate(65536, 512).unwrap();
        let heap_end = heap + 65536 * FRAME_SIZE;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let p = a.allocate(32, 1).unwrap();
            let end = p + 32 * FRAME_SIZE;
            assert!(end <= heap || p >= heap_end, "{p:#x} overlaps the heap");
            assert!(seen.insert(p));
        }
        assert_eq!(a.free_frames(), a.total() - 65536 - 3200);
        a.free(heap, 65536);
        assert_eq!(a.allocate(1, 1), Some(heap));
    }

    #[test]
    fn partial_frames_are_not_usable() {
        let mut a = Box::new(FrameAllocator::new());
        a.add_range(0x1800, 0x2000); // covers only frame 2 fully
        assert_eq!(a.total(), 1);
        a.add_range(0xFFFF_F000, 0x10000); // past 4 GiB is ignored
        assert_eq!(a.total(), 2);
        assert_eq!(a.largest_free_run(), 1);
    }
}
