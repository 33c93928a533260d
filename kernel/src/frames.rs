//! Physical memory: which frames the memory map lets us use ([`usable_ranges`]), the frame
//! allocator over all of them ([`FrameAllocator`]) and how far the heap may grow into them
//! ([`heap_growth`]). Pure logic, tested on the host.
//!
//! The allocator keeps one bitmap per zone: the *low* zone covers the first 4 GiB (the boot
//! stub's identity map) with a bitmap inside the allocator, so it works before anything else
//! is mapped; each *high* zone is one usable range above 4 GiB, mapped by the kernel at boot,
//! whose bitmap the kernel carves from the range's own first frames. Frames are handed out as
//! physically contiguous, aligned runs (DMA pools, heap arenas, page tables) and taken back
//! when a pool is dropped.

use boot::multiboot::{MemoryRegion, RegionKind};

/// Frame size.
pub const FRAME_SIZE: u64 = 4096;
/// End (exclusive) of the low zone: the identity-mapped first 4 GiB.
pub const LIMIT: u64 = 1 << 32;
/// Highest physical address used (exclusive): what four-level paging maps in the kernel's
/// identity map (PML4 entries below 128, as `arch::paging` builds them).
pub const PHYS_LIMIT: u64 = 1 << 46;
/// High zones are mapped with 2 MiB pages, so they start and end on 2 MiB.
pub const HIGH_ALIGN: u64 = 2 << 20;
/// Most usable ranges above 4 GiB that become zones (the rest are left unused and logged).
pub const MAX_HIGH_ZONES: usize = 32;
/// Most usable ranges [`usable_ranges`] returns.
pub const MAX_RANGES: usize = 160;

const LOW_FRAMES: usize = (LIMIT / FRAME_SIZE) as usize;
const LOW_WORDS: usize = LOW_FRAMES / 64;

/// A physical range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Range {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// A sorted list of disjoint ranges, without allocation.
#[derive(Clone, Debug)]
pub struct Ranges {
    items: [Range; MAX_RANGES],
    len: usize,
    /// Ranges were dropped because the list was full.
    pub truncated: bool,
}

impl Ranges {
    const fn new() -> Ranges {
        Ranges {
            items: [Range { start: 0, end: 0 }; MAX_RANGES],
            len: 0,
            truncated: false,
        }
    }

    /// The ranges, lowest first.
    pub fn as_slice(&self) -> &[Range] {
        &self.items[..self.len]
    }

    /// Bytes in all ranges.
    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(Range::len).sum()
    }

    fn insert_at(&mut self, at: usize, r: Range) {
        if self.len == MAX_RANGES {
            self.truncated = true;
            return;
        }
        self.items.copy_within(at..self.len, at + 1);
        self.items[at] = r;
        self.len += 1;
    }

    /// Appends `r`, above every range.
    fn push(&mut self, r: Range) {
        self.insert_at(self.len, r);
    }

    fn remove_at(&mut self, at: usize) {
        self.items.copy_within(at + 1..self.len, at);
        self.len -= 1;
    }

    /// Adds `r`, merging it with the ranges it overlaps or touches.
    fn add(&mut self, mut r: Range) {
        if r.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.len {
            let cur = self.items[i];
            if cur.end < r.start {
                i += 1;
            } else if cur.start > r.end {
                break;
            } else {
                r.start = r.start.min(cur.start);
                r.end = r.end.max(cur.end);
                self.remove_at(i);
            }
        }
        self.insert_at(i, r);
    }

    /// Removes `r` from every range.
    fn subtract(&mut self, r: Range) {
        if r.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.len {
            let cur = self.items[i];
            if cur.end <= r.start || cur.start >= r.end {
                i += 1;
                continue;
            }
            let left = Range {
                start: cur.start,
                end: r.start,
            };
            let right = Range {
                start: r.end,
                end: cur.end,
            };
            self.remove_at(i);
            if !right.is_empty() {
                self.insert_at(i, right);
            }
            if !left.is_empty() {
                self.insert_at(i, left);
                i += 1;
            }
        }
    }
}

/// The RAM the kernel may use: every usable range of the memory map, less anything any
/// entry calls otherwise (firmware maps can overlap: what one entry reserves stays reserved),
/// less `reserved` (the first MiB, the image), cut to whole frames below [`PHYS_LIMIT`]. Parts
/// above 4 GiB are cut to [`HIGH_ALIGN`] as they are mapped with 2 MiB pages.
pub fn usable_ranges(regions: &[MemoryRegion], reserved: &[Range]) -> Ranges {
    let mut ranges = Ranges::new();
    for r in regions.iter().filter(|r| r.kind == RegionKind::Usable) {
        let end = r.start.saturating_add(r.len).min(PHYS_LIMIT);
        ranges.add(Range {
            start: r.start,
            end,
        });
    }
    for r in regions.iter().filter(|r| r.kind != RegionKind::Usable) {
        ranges.subtract(Range {
            start: r.start,
            end: r.start.saturating_add(r.len),
        });
    }
    for r in reserved {
        ranges.subtract(*r);
    }
    // The 4 GiB line splits a range into its identity-mapped part and its high part, which
    // stay apart (they become different zones).
    let mut out = Ranges::new();
    out.truncated = ranges.truncated;
    for r in ranges.as_slice() {
        let pieces = [
            Range {
                start: r.start,
                end: r.end.min(LIMIT),
            },
            Range {
                start: r.start.max(LIMIT),
                end: r.end,
            },
        ];
        for (i, p) in pieces.into_iter().enumerate() {
            let align = if i == 0 { FRAME_SIZE } else { HIGH_ALIGN };
            let p = Range {
                start: p.start.next_multiple_of(align),
                end: p.end & !(align - 1),
            };
            if p.end > p.start {
                out.push(p);
            }
        }
    }
    out
}

/// Frames at the start of a high zone of `len` bytes that hold its own bitmap.
pub fn bitmap_frames(len: u64) -> u64 {
    (len / FRAME_SIZE)
        .div_ceil(64)
        .saturating_mul(8)
        .div_ceil(FRAME_SIZE)
}

/// The most the heap starts with (it grows beyond on demand, see [`heap_growth`]).
pub const HEAP_INITIAL_MAX: u64 = 128 << 20;
/// The least the heap grows by.
pub const HEAP_GROWTH_MIN: u64 = 16 << 20;

/// Frames the heap leaves free for DMA pools made after boot (snapshot bounce pools, devices):
/// an eighth of memory, at least 32 MiB and at most 512 MiB.
pub fn dma_reserve(total_bytes: u64) -> u64 {
    (total_bytes / 8).clamp(32 << 20, 512 << 20)
}

/// How much a heap of `heap_total` bytes that cannot serve an allocation of `needed` bytes
/// (alignment and bookkeeping included) grows by, given `free` bytes of free frames of which
/// `reserve` stay for DMA: at least `needed`, otherwise as much as it has already (so a large
/// heap takes few arenas), at least [`HEAP_GROWTH_MIN`], in 2 MiB steps. `None`: memory is
/// short, the allocation fails.
pub fn heap_growth(needed: u64, heap_total: u64, free: u64, reserve: u64) -> Option<u64> {
    let needed = needed.checked_next_multiple_of(HIGH_ALIGN)?;
    let room = free.saturating_sub(reserve) & !(HIGH_ALIGN - 1);
    let grow = needed.max(heap_total).max(HEAP_GROWTH_MIN).min(room);
    (grow >= needed).then_some(grow)
}

fn is_free(words: &[u64], i: usize) -> bool {
    words[i / 64] & (1 << (i % 64)) != 0
}

/// Sets bits `[from, to)` free or used; returns how many changed.
fn set_range(words: &mut [u64], from: usize, to: usize, free: bool) -> u64 {
    let mut changed = 0u64;
    let mut i = from;
    while i < to {
        let w = i / 64;
        let lo = i % 64;
        let hi = (to - w * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        let old = words[w];
        words[w] = if free { old | mask } else { old & !mask };
        changed += u64::from((old ^ words[w]).count_ones());
        i = w * 64 + hi;
    }
    changed
}

/// The first used frame in `[from, to)`, skipping whole free words.
fn first_used(words: &[u64], from: usize, to: usize) -> Option<usize> {
    let mut i = from;
    while i < to {
        if i.is_multiple_of(64) && i + 64 <= to && words[i / 64] == u64::MAX {
            i += 64;
            continue;
        }
        if !is_free(words, i) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// One zone's bitmap (bit set = frame free) of `frames` frames from frame number `first`.
struct Bitmap<'a> {
    words: &'a mut [u64],
    first: u64,
    frames: usize,
    hint: &'a mut usize,
}

impl Bitmap<'_> {
    /// The lowest index at or after `i` whose frame number is a multiple of `align`.
    fn aligned(&self, i: usize, align: usize) -> usize {
        let n = (self.first + i as u64).next_multiple_of(align as u64);
        (n - self.first) as usize
    }

    fn allocate(&mut self, count: usize, align: usize) -> Option<usize> {
        while *self.hint < self.words.len() && self.words[*self.hint] == 0 {
            *self.hint += 1;
        }
        let mut start = self.aligned(*self.hint * 64, align);
        while start.checked_add(count)? <= self.frames {
            if self.words[start / 64] == 0 {
                start = self.aligned((start / 64 + 1) * 64, align);
                continue;
            }
            match first_used(self.words, start, start + count) {
                None => {
                    set_range(self.words, start, start + count, false);
                    return Some(start);
                }
                Some(used) => start = self.aligned(used + 1, align),
            }
        }
        None
    }

    fn largest_free_run(&self) -> u64 {
        let (mut best, mut run) = (0u64, 0u64);
        let mut f = 0;
        while f < self.frames {
            let word = self.words[f / 64];
            if f.is_multiple_of(64) && f + 64 <= self.frames && (word == 0 || word == u64::MAX) {
                run = if word == 0 { 0 } else { run + 64 };
                best = best.max(run);
                f += 64;
                continue;
            }
            if is_free(self.words, f) {
                run += 1;
                best = best.max(run);
            } else {
                run = 0;
            }
            f += 1;
        }
        best
    }
}

/// A usable range above 4 GiB with its bitmap.
struct HighZone {
    first: u64,
    frames: usize,
    words: &'static mut [u64],
    hint: usize,
}

/// Where [`FrameAllocator::allocate`] looks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefer {
    /// The lowest zone first (DMA pools, page tables).
    Low,
    /// The highest zone first (heap arenas), keeping low memory for devices.
    High,
}

/// Why a high zone was not added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneError {
    /// [`MAX_HIGH_ZONES`] zones exist already.
    Full,
    /// The range is below 4 GiB, not aligned, or overlaps a zone.
    BadRange,
    /// The bitmap is too small for the range.
    BitmapTooSmall,
}

/// The frame allocator: the low zone's bitmap and the high zones.
pub struct FrameAllocator {
    low: [u64; LOW_WORDS],
    low_hint: usize,
    high: [Option<HighZone>; MAX_HIGH_ZONES],
    high_count: usize,
    total: u64,
    free_count: u64,
    high_total: u64,
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
            low: [0; LOW_WORDS],
            low_hint: 0,
            high: [const { None }; MAX_HIGH_ZONES],
            high_count: 0,
            total: 0,
            free_count: 0,
            high_total: 0,
        }
    }

    fn low_bitmap(&mut self) -> Bitmap<'_> {
        Bitmap {
            words: &mut self.low,
            first: 0,
            frames: LOW_FRAMES,
            hint: &mut self.low_hint,
        }
    }

    fn zone_bitmap(zone: &mut HighZone) -> Bitmap<'_> {
        Bitmap {
            words: zone.words,
            first: zone.first,
            frames: zone.frames,
            hint: &mut zone.hint,
        }
    }

    /// Adds the whole frames inside `[start, start+len)` below [`LIMIT`] as free.
    pub fn add_range(&mut self, start: u64, len: u64) {
        let first = start.div_ceil(FRAME_SIZE).min(LOW_FRAMES as u64) as usize;
        let end = (start.saturating_add(len).min(LIMIT) / FRAME_SIZE) as usize;
        if first < end {
            let added = set_range(&mut self.low, first, end, true);
            self.total += added;
            self.free_count += added;
        }
    }

    /// Removes every frame below [`LIMIT`] touching `[start, start+len)`.
    pub fn reserve_range(&mut self, start: u64, len: u64) {
        let first = (start / FRAME_SIZE).min(LOW_FRAMES as u64) as usize;
        let end = start.saturating_add(len).min(LIMIT).div_ceil(FRAME_SIZE) as usize;
        if first < end {
            let removed = set_range(&mut self.low, first, end, false);
            self.total -= removed;
            self.free_count -= removed;
        }
    }

    /// Adds `range` (above 4 GiB, frame-aligned, disjoint from the zones) as a zone of free
    /// frames whose bitmap is `words` (one bit per frame; its contents are overwritten).
    pub fn add_high_zone(
        &mut self,
        range: Range,
        words: &'static mut [u64],
    ) -> Result<(), ZoneError> {
        if self.high_count == MAX_HIGH_ZONES {
            return Err(ZoneError::Full);
        }
        if range.start < LIMIT
            || range.is_empty()
            || range.end > PHYS_LIMIT
            || !range.start.is_multiple_of(FRAME_SIZE)
            || !range.end.is_multiple_of(FRAME_SIZE)
            || self.high[..self.high_count].iter().flatten().any(|z| {
                let (s, e) = (
                    z.first * FRAME_SIZE,
                    (z.first + z.frames as u64) * FRAME_SIZE,
                );
                range.start < e && s < range.end
            })
        {
            return Err(ZoneError::BadRange);
        }
        let frames = (range.len() / FRAME_SIZE) as usize;
        if words.len() * 64 < frames {
            return Err(ZoneError::BitmapTooSmall);
        }
        words.fill(0);
        set_range(words, 0, frames, true);
        self.high[self.high_count] = Some(HighZone {
            first: range.start / FRAME_SIZE,
            frames,
            words,
            hint: 0,
        });
        self.high_count += 1;
        self.total += frames as u64;
        self.free_count += frames as u64;
        self.high_total += frames as u64;
        Ok(())
    }

    /// Allocates `count` contiguous frames aligned to `align` frames (a power of two), from
    /// the lowest zone that has them (`Prefer::Low`) or the highest (`Prefer::High`); returns
    /// the physical address of the first. Fully used bitmap words are skipped 64 frames at a
    /// time, and each zone's search starts at its lowest word that may have a free frame.
    pub fn allocate_in(&mut self, count: usize, align: usize, prefer: Prefer) -> Option<u64> {
        if count == 0 || !align.is_power_of_two() || count as u64 > self.free_count {
            return None;
        }
        let zones = self.high_count + 1;
        for n in 0..zones {
            let zone = match prefer {
                Prefer::Low => n,
                Prefer::High => zones - 1 - n,
            };
            let found = if zone == 0 {
                self.low_bitmap()
                    .allocate(count, align)
                    .map(|i| i as u64 * FRAME_SIZE)
            } else {
                let z = self.high[zone - 1].as_mut()?;
                let first = z.first;
                Self::zone_bitmap(z)
                    .allocate(count, align)
                    .map(|i| (first + i as u64) * FRAME_SIZE)
            };
            if let Some(address) = found {
                self.free_count -= count as u64;
                return Some(address);
            }
        }
        None
    }

    /// [`allocate_in`](Self::allocate_in) from the lowest zone first.
    pub fn allocate(&mut self, count: usize, align: usize) -> Option<u64> {
        self.allocate_in(count, align, Prefer::Low)
    }

    /// Returns frames from [`allocate`](Self::allocate).
    pub fn free(&mut self, address: u64, count: usize) {
        let first = address / FRAME_SIZE;
        let end = first.saturating_add(count as u64);
        if first < LOW_FRAMES as u64 {
            let to = end.min(LOW_FRAMES as u64) as usize;
            self.free_count += set_range(&mut self.low, first as usize, to, true);
            self.low_hint = self.low_hint.min(first as usize / 64);
            return;
        }
        for z in self.high[..self.high_count].iter_mut().flatten() {
            if first >= z.first && first < z.first + z.frames as u64 {
                let from = (first - z.first) as usize;
                let to = (end - z.first).min(z.frames as u64) as usize;
                self.free_count += set_range(z.words, from, to, true);
                z.hint = z.hint.min(from / 64);
                return;
            }
        }
    }

    /// Frames managed.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Frames managed above 4 GiB.
    pub fn high_total(&self) -> u64 {
        self.high_total
    }

    /// Zones: the low one and the high ones.
    pub fn zones(&self) -> usize {
        1 + self.high_count
    }

    /// Frames free.
    pub fn free_frames(&self) -> u64 {
        self.free_count
    }

    /// The largest run of contiguous free frames in any zone.
    pub fn largest_free_run(&mut self) -> u64 {
        let mut best = self.low_bitmap().largest_free_run();
        for z in self.high[..self.high_count].iter_mut().flatten() {
            best = best.max(Self::zone_bitmap(z).largest_free_run());
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn region(start: u64, len: u64, kind: RegionKind) -> MemoryRegion {
        MemoryRegion { start, len, kind }
    }

    fn leak_bitmap(len: u64) -> &'static mut [u64] {
        let words = (len / FRAME_SIZE).div_ceil(64) as usize;
        Box::leak(vec![0u64; words].into_boxed_slice())
    }

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
        a.add_range(0xFFFF_F000, 0x10000); // past 4 GiB is not the low zone's
        assert_eq!(a.total(), 2);
        assert_eq!(a.largest_free_run(), 1);
    }

    /// QEMU's q35 with `-m 8G` as OVMF reports it: low RAM with holes, the 32-bit PCI hole,
    /// then 6 GiB above 4 GiB.
    fn eight_gib() -> Vec<MemoryRegion> {
        vec![
            region(0, 0xA0000, RegionKind::Usable),
            region(0x100000, 0x7F00000, RegionKind::Usable),
            region(0x8000000, 0x800000, RegionKind::AcpiNvs),
            region(0x8800000, 0x7000_0000 - 0x880_0000, RegionKind::Usable),
            region(0x7000_0000, 0x1000_0000, RegionKind::Reserved),
            region(0xB000_0000, 0x1000_0000, RegionKind::Reserved),
            region(LIMIT, 6 * GIB, RegionKind::Usable),
        ]
    }

    #[test]
    fn usable_ranges_take_memory_above_4_gib_and_leave_what_any_entry_reserves() {
        let image = Range {
            start: 0x100000,
            end: 0x200000,
        };
        let first_mib = Range {
            start: 0,
            end: 0x100000,
        };
        let r = usable_ranges(&eight_gib(), &[first_mib, image]);
        assert_eq!(
            r.as_slice(),
            &[
                Range {
                    start: 0x200000,
                    end: 0x8000000
                },
                Range {
                    start: 0x8800000,
                    end: 0x7000_0000
                },
                Range {
                    start: LIMIT,
                    end: LIMIT + 6 * GIB
                },
            ]
        );
        assert_eq!(r.total(), 0x7E00000 + 0x6780_0000 + 6 * GIB);

        // A range across the 4 GiB line is split there; a reserved entry inside a usable
        // one (overlapping maps) punches a hole; high parts shrink to 2 MiB.
        let map = [
            region(0x1000_0000, 4 * GIB, RegionKind::Usable),
            region(0x1_0800_0000, 0x1000, RegionKind::Reserved),
            region(0x2_0000_1000, 0x10_0000, RegionKind::Usable),
            region(0x3_0000_0000, 0x30_0000, RegionKind::Usable),
        ];
        let r = usable_ranges(&map, &[]);
        assert_eq!(
            r.as_slice(),
            &[
                Range {
                    start: 0x1000_0000,
                    end: LIMIT
                },
                Range {
                    start: LIMIT,
                    end: 0x1_0800_0000
                },
                Range {
                    start: 0x1_0820_0000,
                    end: 0x1_1000_0000
                },
                Range {
                    start: 0x3_0000_0000,
                    end: 0x3_0020_0000
                },
            ]
        );
        // Adjacent and duplicate entries merge; beyond the mapped address space is dropped.
        let map = [
            region(0x1_0000_0000, GIB, RegionKind::Usable),
            region(0x1_4000_0000, GIB, RegionKind::Usable),
            region(0x1_0000_0000, GIB, RegionKind::Usable),
            region(PHYS_LIMIT - GIB, 4 * GIB, RegionKind::Usable),
            region(0x1000, u64::MAX, RegionKind::Bad),
        ];
        assert_eq!(usable_ranges(&map, &[]).as_slice(), &[]);
        let r = usable_ranges(&map[..4], &[]);
        assert_eq!(
            r.as_slice(),
            &[
                Range {
                    start: LIMIT,
                    end: LIMIT + 2 * GIB
                },
                Range {
                    start: PHYS_LIMIT - GIB,
                    end: PHYS_LIMIT
                },
            ]
        );
    }

    #[test]
    fn a_map_of_many_fragments_does_not_overflow() {
        let map: Vec<MemoryRegion> = (0..400)
            .map(|i| {
                region(
                    LIMIT + i * 8 * HIGH_ALIGN,
                    4 * HIGH_ALIGN,
                    RegionKind::Usable,
                )
            })
            .collect();
        let r = usable_ranges(&map, &[]);
        assert!(r.truncated);
        assert_eq!(r.as_slice().len(), MAX_RANGES);
    }

    #[test]
    fn high_zones_serve_allocations_above_4_gib() {
        let mut a = Box::new(FrameAllocator::new());
        a.add_range(0x100000, 64 << 20);
        let high = Range {
            start: LIMIT,
            end: LIMIT + 6 * GIB,
        };
        a.add_high_zone(high, leak_bitmap(high.len())).unwrap();
        assert_eq!(a.total(), (64 << 20) / FRAME_SIZE + 6 * GIB / FRAME_SIZE);
        assert_eq!(a.high_total(), 6 * GIB / FRAME_SIZE);
        assert_eq!(a.zones(), 2);
        // Low first for DMA, high first for the heap.
        let dma = a.allocate(16, 1).unwrap();
        assert!(dma < LIMIT);
        let arena = a
            .allocate_in(GIB as usize / 4096, 512, Prefer::High)
            .unwrap();
        assert_eq!(arena, LIMIT);
        // More than the low zone holds comes from above 4 GiB.
        let big = a.allocate(32768, 512).unwrap();
        assert_eq!(big, LIMIT + GIB);
        // Alignment is of the physical address, not of the index in the zone.
        let odd = Range {
            start: 0x3_0000_3000,
            end: 0x3_0100_0000,
        };
        a.add_high_zone(odd, leak_bitmap(odd.len())).unwrap();
        let p = a.allocate_in(16, 16, Prefer::High).unwrap();
        assert_eq!(p, 0x3_0001_0000);
        let free = a.free_frames();
        a.free(p, 16);
        a.free(big, 32768);
        assert_eq!(a.free_frames(), free + 16 + 32768);
        assert_eq!(a.allocate(32768, 512), Some(big));
        assert_eq!(
            a.largest_free_run(),
            (5 * GIB - 128 * (1 << 20)) / FRAME_SIZE
        );
    }

    #[test]
    fn bad_zones_are_refused() {
        let mut a = Box::new(FrameAllocator::new());
        let r = Range {
            start: LIMIT,
            end: LIMIT + GIB,
        };
        assert_eq!(
            a.add_high_zone(
                Range {
                    start: 0x1000,
                    end: 0x2000
                },
                leak_bitmap(4096)
            ),
            Err(ZoneError::BadRange)
        );
        assert_eq!(
            a.add_high_zone(r, leak_bitmap(4096)),
            Err(ZoneError::BitmapTooSmall)
        );
        a.add_high_zone(r, leak_bitmap(r.len())).unwrap();
        assert_eq!(
            a.add_high_zone(r, leak_bitmap(r.len())),
            Err(ZoneError::BadRange)
        );
        for i in 1..MAX_HIGH_ZONES as u64 {
            let z = Range {
                start: LIMIT + i * GIB,
                end: LIMIT + i * GIB + HIGH_ALIGN,
            };
            a.add_high_zone(z, leak_bitmap(z.len())).unwrap();
        }
        let z = Range {
            start: 0x100_0000_0000,
            end: 0x100_0020_0000,
        };
        assert_eq!(
            a.add_high_zone(z, leak_bitmap(z.len())),
            Err(ZoneError::Full)
        );
    }

    #[test]
    fn a_zone_bitmap_fits_its_first_frames() {
        assert_eq!(bitmap_frames(GIB), 8); // 262144 frames, 32 KiB of bits
        assert_eq!(bitmap_frames(HIGH_ALIGN), 1);
        assert_eq!(bitmap_frames(1 << 40), 8192);
    }

    #[test]
    fn the_heap_grows_by_what_it_has_and_leaves_the_dma_reserve() {
        const MIB: u64 = 1 << 20;
        let reserve = dma_reserve(8 * GIB);
        assert_eq!(reserve, 512 * MIB);
        assert_eq!(dma_reserve(512 * MIB), 64 * MIB);
        assert_eq!(dma_reserve(64 * MIB), 32 * MIB);
        // A small allocation grows by the heap's own size (doubling).
        assert_eq!(
            heap_growth(100, 128 * MIB, 7 * GIB, reserve),
            Some(128 * MIB)
        );
        assert_eq!(heap_growth(100, 0, 7 * GIB, reserve), Some(16 * MIB));
        // A large one by at least itself, rounded to 2 MiB.
        assert_eq!(
            heap_growth(300 * MIB + 1, 128 * MIB, 7 * GIB, reserve),
            Some(302 * MIB)
        );
        // Never into the reserve: what is left, if it is enough, else nothing.
        assert_eq!(heap_growth(100, 4 * GIB, GIB, reserve), Some(512 * MIB));
        assert_eq!(heap_growth(600 * MIB, 4 * GIB, GIB, reserve), None);
        assert_eq!(heap_growth(100, 0, reserve, reserve), None);
        assert_eq!(heap_growth(u64::MAX, 0, u64::MAX, 0), None);
    }
}
