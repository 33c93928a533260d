//! Identity mappings beyond the boot map. The boot stub maps the first 4 GiB with 2 MiB
//! pages; RAM above that is mapped at boot by [`map_ram`] (write-back), and PCI BARs that
//! firmware placed there (64-bit BARs, e.g. OVMF's 64-bit window) by [`map_identity`]
//! (uncached) when a driver maps them. Both extend the same page-table tree (PML4 → PDPT →
//! PD, 2 MiB pages). Intel SDM vol. 3A §4.5.

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const TWO_MIB: u64 = 2 << 20;

/// Why a mapping could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No frame left for a page table.
    OutOfFrames,
    /// The range is beyond the 48-bit physical address space we map.
    OutOfRange,
}

static LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Returns the table the entry at `entry` points to, creating it (zeroed, from `frame`) if
/// absent.
///
/// # Safety
/// `entry` must point at an entry of a live page table of the current hierarchy.
unsafe fn next_table(
    entry: *mut u64,
    frame: &mut dyn FnMut() -> Option<u64>,
) -> Result<*mut u64, MapError> {
    // SAFETY: guaranteed by the caller.
    let value = unsafe { entry.read_volatile() };
    if value & PRESENT != 0 {
        return Ok((value & ADDRESS_MASK) as *mut u64);
    }
    let table = frame().ok_or(MapError::OutOfFrames)?;
    // SAFETY: as above; the new table is a zeroed, identity-mapped frame that nothing else
    // references.
    unsafe { entry.write_volatile(table | PRESENT | WRITABLE) };
    Ok(table as *mut u64)
}

/// Identity-maps `[start, end)` (2 MiB aligned) with 2 MiB pages of `flags`, above the boot
/// map's 4 GiB; entries already present stay as they are.
fn map_range(
    start: u64,
    end: u64,
    flags: u64,
    frame: &mut dyn FnMut() -> Option<u64>,
) -> Result<(), MapError> {
    if end > crate::frames::PHYS_LIMIT {
        return Err(MapError::OutOfRange);
    }
    let _guard = LOCK.lock();
    let pml4 = boot::page_table_root() as *mut u64;
    let mut at = start.max(1 << 32);
    while at < end {
        let (i4, i3, i2) = ((at >> 39) & 511, (at >> 30) & 511, (at >> 21) & 511);
        // SAFETY: `pml4` is the live root built by the boot stub; each level's entry index
        // is below 512, and tables are identity-mapped frames.
        unsafe {
            let pdpt = next_table(pml4.add(i4 as usize), frame)?;
            let pd = next_table(pdpt.add(i3 as usize), frame)?;
            let entry = pd.add(i2 as usize);
            if entry.read_volatile() & PRESENT == 0 {
                entry.write_volatile(at | flags | HUGE);
            }
        }
        at += TWO_MIB;
    }
    // New entries only (never changed ones), so no TLB shootdown is needed; reload CR3 anyway
    // to drop any cached "not present" walk results.
    let (root, cr3_flags) = x86_64::registers::control::Cr3::read();
    // SAFETY: writes back the same root and flags.
    unsafe { x86_64::registers::control::Cr3::write(root, cr3_flags) };
    Ok(())
}

/// Identity-maps `[phys, phys+len)` (rounded out to 2 MiB) as uncached device memory, with
/// page tables from `frame` (zeroed, identity-mapped frames). Ranges already mapped (the
/// first 4 GiB, RAM) are left as they are.
pub fn map_identity(
    phys: u64,
    len: u64,
    frame: &mut dyn FnMut() -> Option<u64>,
) -> Result<(), MapError> {
    let start = phys & !(TWO_MIB - 1);
    let end = phys
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(TWO_MIB))
        .ok_or(MapError::OutOfRange)?;
    map_range(
        start,
        end,
        PRESENT | WRITABLE | WRITE_THROUGH | CACHE_DISABLE,
        frame,
    )
}

/// Identity-maps the RAM `[start, end)` (2 MiB aligned, above 4 GiB) write-back cached, with
/// page tables from `frame` (zeroed, identity-mapped frames): at boot, before the frame
/// allocator has the memory being mapped.
pub fn map_ram(
    start: u64,
    end: u64,
    frame: &mut dyn FnMut() -> Option<u64>,
) -> Result<(), MapError> {
    if !start.is_multiple_of(TWO_MIB) || !end.is_multiple_of(TWO_MIB) {
        return Err(MapError::OutOfRange);
    }
    map_range(start, end, PRESENT | WRITABLE, frame)
}
