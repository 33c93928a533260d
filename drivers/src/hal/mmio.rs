//! Memory-mapped I/O: [`MmioRegion`], a bounds-checked handle on a range of device memory.
//!
//! Handles are unsafe to create (the creator vouches for the mapping) and safe to use: every
//! access is volatile, naturally aligned and checked against the region's length, so offsets
//! that come from a device (capability offsets, BIR offsets) cannot reach outside the region.
//! No Rust reference to device memory is ever formed.

use super::HalError;
use core::ptr::NonNull;

/// Maps device memory for the drivers; implemented by the kernel.
pub trait MmioMapper {
    /// Maps `len` bytes of device memory at physical address `phys` uncached and returns the
    /// virtual address of `phys`. The kernel identity-maps low memory, but BARs can be placed
    /// above 4 GiB and may need a new mapping. Mappings are never removed.
    fn map_mmio(&self, phys: u64, len: usize) -> Result<NonNull<u8>, HalError>;
}

/// Maps `len` bytes at `phys` with `mapper` and wraps them in an [`MmioRegion`].
///
/// # Safety
///
/// `phys..phys + len` must be device memory (a BAR range or an ECAM window) that the caller is
/// entitled to drive, and not ordinary RAM that Rust code uses.
pub unsafe fn map_region<M: MmioMapper + ?Sized>(
    mapper: &M,
    phys: u64,
    len: usize,
) -> Result<MmioRegion, HalError> {
    if len == 0 {
        return Err(HalError::ZeroLength);
    }
    let virt = mapper.map_mmio(phys, len)?;
    // SAFETY: the mapper returned a mapping of `len` bytes of device memory, which our caller
    // guarantees is theirs to drive; mappings are never removed, so it outlives the handle.
    Ok(unsafe { MmioRegion::new(virt, len) })
}

/// A range of device memory accessed with volatile, bounds-checked loads and stores.
#[derive(Debug)]
pub struct MmioRegion {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: device memory may be accessed from any CPU; the handle holds no thread-local state.
unsafe impl Send for MmioRegion {}

impl MmioRegion {
    /// Wraps `len` bytes of mapped memory at `base`.
    ///
    /// # Safety
    ///
    /// `base..base + len` must stay mapped and valid for volatile reads and writes for the life
    /// of the handle and of every [`MmioRegion::subregion`] taken from it, and no Rust reference
    /// may point into it meanwhile.
    pub const unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        Self { base, len }
    }

    /// Length of the region in bytes.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has length zero.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A handle on `len` bytes at `offset` within this region.
    pub fn subregion(&self, offset: usize, len: usize) -> Result<MmioRegion, HalError> {
        let end = offset.checked_add(len).ok_or(HalError::OutOfBounds {
            offset,
            width: len,
            len: self.len,
        })?;
        if end > self.len {
            return Err(HalError::OutOfBounds {
                offset,
                width: len,
                len: self.len,
            });
        }
        if len == 0 {
            return Err(HalError::ZeroLength);
        }
        // SAFETY: `offset + len <= self.len`, so the new range lies within ours, which our own
        // creator vouched for with the same lifetime and aliasing rules.
        Ok(unsafe { MmioRegion::new(self.base.add(offset), len) })
    }

    fn pointer(&self, offset: usize, width: usize) -> Result<*mut u8, HalError> {
        if !offset.is_multiple_of(width) {
            return Err(HalError::Misaligned { offset });
        }
        match offset.checked_add(width) {
            Some(end) if end <= self.len => Ok(self.base.as_ptr().wrapping_add(offset)),
            _ => Err(HalError::OutOfBounds {
                offset,
                width,
                len: self.len,
            }),
        }
    }

    /// Reads the byte at `offset`.
    pub fn read8(&self, offset: usize) -> Result<u8, HalError> {
        let p = self.pointer(offset, 1)?;
        // SAFETY: `pointer` checked that the byte lies within the region, which is valid for
        // volatile access (constructor contract).
        Ok(unsafe { p.read_volatile() })
    }

    /// Reads the naturally aligned 16-bit register at `offset`.
    pub fn read16(&self, offset: usize) -> Result<u16, HalError> {
        let p = self.pointer(offset, 2)?.cast::<u16>();
        // SAFETY: `pointer` checked bounds and alignment within the region.
        Ok(unsafe { p.read_volatile() })
    }

    /// Reads the naturally aligned 32-bit register at `offset`.
    pub fn read32(&self, offset: usize) -> Result<u32, HalError> {
        let p = self.pointer(offset, 4)?.cast::<u32>();
        // SAFETY: `pointer` checked bounds and alignment within the region.
        Ok(unsafe { p.read_volatile() })
    }

    /// Writes the byte at `offset`.
    pub fn write8(&self, offset: usize, value: u8) -> Result<(), HalError> {
        let p = self.pointer(offset, 1)?;
        // SAFETY: `pointer` checked that the byte lies within the region.
        unsafe { p.write_volatile(value) };
        Ok(())
    }

    /// Writes the naturally aligned 16-bit register at `offset`.
    pub fn write16(&self, offset: usize, value: u16) -> Result<(), HalError> {
        let p = self.pointer(offset, 2)?.cast::<u16>();
        // SAFETY: `pointer` checked bounds and alignment within the region.
        unsafe { p.write_volatile(value) };
        Ok(())
    }

    /// Writes the naturally aligned 32-bit register at `offset`.
    pub fn write32(&self, offset: usize, value: u32) -> Result<(), HalError> {
        let p = self.pointer(offset, 4)?.cast::<u32>();
        // SAFETY: `pointer` checked bounds and alignment within the region.
        unsafe { p.write_volatile(value) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_checked() {
        let mut memory = [0u32; 4];
        // SAFETY: `memory` outlives `region` and is only accessed through it until the end.
        let region =
            unsafe { MmioRegion::new(NonNull::new(memory.as_mut_ptr().cast()).unwrap(), 16) };
        region.write32(4, 0xaabb_ccdd).unwrap();
        assert_eq!(region.read16(6).unwrap(), 0xaabb);
        assert_eq!(region.read8(4).unwrap(), 0xdd);
        assert_eq!(region.read32(2), Err(HalError::Misaligned { offset: 2 }));
        assert!(matches!(
            region.read32(16),
            Err(HalError::OutOfBounds { .. })
        ));
        assert!(matches!(
            region.read8(usize::MAX),
            Err(HalError::OutOfBounds { .. })
        ));
        let sub = region.subregion(8, 8).unwrap();
        sub.write16(2, 0x1122).unwrap();
        assert!(sub.read32(8).is_err());
        assert!(region.subregion(12, 8).is_err());
        assert!(region.subregion(usize::MAX, 2).is_err());
        assert_eq!(memory[1], 0xaabb_ccdd);
        assert_eq!(memory[2], 0x1122_0000);
    }
}
