//! NVMe controller registers (NVMe Base 2.0 §3.1.4, "Controller Properties" of the PCIe
//! transport): offsets, the fields of CAP/CC/CSTS/AQA we use, doorbell addressing, and the
//! [`RegisterAccess`] handle the rest of the driver goes through.
//!
//! The driver is generic over [`RegisterAccess`] so that host tests drive it with a fake
//! controller (`nvme::fake`) that reacts to register writes; on hardware it is
//! [`MmioRegisters`], a bounds-checked [`MmioRegion`] on BAR0. Mapping BAR0 is the one
//! `unsafe` operation here. 64-bit registers are accessed as two 32-bit halves, low first
//! (as Linux's `lo_hi_readq`), which every controller must accept.

use crate::hal::{map_region, HalError, MmioMapper, MmioRegion};

/// `CAP`: Controller Capabilities (64 bits).
pub const CAP: usize = 0x00;
/// `VS`: Version.
pub const VS: usize = 0x08;
/// `INTMS`: Interrupt Mask Set (pin/MSI only; unused with MSI-X).
pub const INTMS: usize = 0x0c;
/// `INTMC`: Interrupt Mask Clear.
pub const INTMC: usize = 0x10;
/// `CC`: Controller Configuration.
pub const CC: usize = 0x14;
/// `CSTS`: Controller Status.
pub const CSTS: usize = 0x1c;
/// `AQA`: Admin Queue Attributes.
pub const AQA: usize = 0x24;
/// `ASQ`: Admin Submission Queue Base Address (64 bits).
pub const ASQ: usize = 0x28;
/// `ACQ`: Admin Completion Queue Base Address (64 bits).
pub const ACQ: usize = 0x30;
/// First doorbell register (`SQ0TDBL`).
pub const DOORBELLS: usize = 0x1000;

/// Raw access to the controller's registers.
///
/// Reads of a register that cannot be read (outside the mapping) return all ones, like a
/// removed PCIe device; callers treat an all-ones `CSTS` as a fatal controller state.
pub trait RegisterAccess {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: usize) -> u32;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: usize, value: u32);

    /// Bytes of register space (BAR0 length): doorbells must lie below.
    fn size(&self) -> usize {
        usize::MAX
    }

    /// Reads a 64-bit register as two halves, low first.
    fn read64(&self, offset: usize) -> u64 {
        let low = self.read32(offset);
        let high = self.read32(offset + 4);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Writes a 64-bit register as two halves, low first.
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

/// The registers of a real controller: BAR0 behind a bounds-checked [`MmioRegion`].
#[derive(Debug)]
pub struct MmioRegisters {
    region: MmioRegion,
}

impl MmioRegisters {
    /// Maps `len` bytes of BAR0 at `phys` (at least the 4 KiB of properties plus one page of
    /// doorbells).
    pub fn map<M: MmioMapper + ?Sized>(
        mapper: &M,
        phys: u64,
        len: usize,
    ) -> Result<Self, HalError> {
        if len < DOORBELLS + 8 {
            return Err(HalError::OutOfBounds {
                offset: DOORBELLS,
                width: 8,
                len,
            });
        }
        // SAFETY: `phys..phys + len` is BAR0 of an NVMe function that this driver alone drives
        // (the probe sized and enabled it); it is device memory, not RAM.
        let region = unsafe { map_region(mapper, phys, len) }?;
        Ok(Self { region })
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// Whether the mapping is empty (never: `map` refuses short BARs).
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }
}

impl RegisterAccess for MmioRegisters {
    fn size(&self) -> usize {
        self.region.len()
    }

    fn read32(&self, offset: usize) -> u32 {
        self.region.read32(offset).unwrap_or(u32::MAX)
    }

    fn write32(&self, offset: usize, value: u32) {
        // Offsets are checked against the mapping at init (`Doorbells::check`); a failure here
        // would be a driver bug, and dropping the write is the safe outcome.
        let _ = self.region.write32(offset, value);
    }
}

/// Decoded `CAP` (NVMe Base 2.0 Figure 36).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// `MQES`: Maximum Queue Entries Supported, as a count (the register is 0's based).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    /// `CQR`: Contiguous Queues Required.
    pub fn contiguous_queues_required(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// `TO`: worst-case time for `CSTS.RDY` to change after `CC.EN` changes, in
    /// nanoseconds (the register counts 500 ms units).
    pub fn timeout_ns(self) -> u64 {
        ((self.0 >> 24) & 0xff) * 500_000_000
    }
    /// `DSTRD`: Doorbell Stride; doorbells are `4 << DSTRD` bytes apart.
    pub fn doorbell_stride(self) -> usize {
        4 << ((self.0 >> 32) & 0xf)
    }
    /// `CSS` bit 0: the NVM command set is supported.
    pub fn nvm_command_set(self) -> bool {
        (self.0 >> 37) & 1 != 0
    }
    /// `MPSMIN`: minimum memory page size, as a power of two exponent (12 = 4 KiB).
    pub fn page_size_min_shift(self) -> u32 {
        12 + ((self.0 >> 48) & 0xf) as u32
    }
    /// `MPSMAX`: maximum memory page size exponent.
    pub fn page_size_max_shift(self) -> u32 {
        12 + ((self.0 >> 52) & 0xf) as u32
    }
}

/// `CC` fields (NVMe Base 2.0 Figure 41).
pub mod cc {
    /// `EN`: Enable.
    pub const EN: u32 = 1 << 0;
    /// `CSS` = 000b: NVM command set.
    pub const CSS_NVM: u32 = 0 << 4;
    /// `MPS` shift: memory page size is `2 ^ (12 + MPS)`.
    pub const MPS_SHIFT: u32 = 7;
    /// `AMS` = 000b: round robin arbitration.
    pub const AMS_RR: u32 = 0 << 11;
    /// `SHN` = 01b: normal shutdown notification.
    pub const SHN_NORMAL: u32 = 1 << 14;
    /// `SHN` mask.
    pub const SHN_MASK: u32 = 3 << 14;
    /// `IOSQES` shift: I/O submission queue entry size `2 ^ n` (6 = 64 bytes).
    pub const IOSQES_SHIFT: u32 = 16;
    /// `IOCQES` shift: I/O completion queue entry size `2 ^ n` (4 = 16 bytes).
    pub const IOCQES_SHIFT: u32 = 20;
}

/// `CSTS` fields (NVMe Base 2.0 Figure 42).
pub mod csts {
    /// `RDY`: Ready.
    pub const RDY: u32 = 1 << 0;
    /// `CFS`: Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// `SHST` mask: shutdown status.
    pub const SHST_MASK: u32 = 3 << 2;
    /// `SHST` = 10b: shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// `AQA` value for admin queues of `sq_entries` and `cq_entries` (0's based fields `ASQS`
/// 11:0 and `ACQS` 27:16).
pub fn aqa(sq_entries: u16, cq_entries: u16) -> u32 {
    (u32::from(cq_entries.saturating_sub(1)) & 0xfff) << 16
        | (u32::from(sq_entries.saturating_sub(1)) & 0xfff)
}

/// Doorbell addressing (NVMe Base 2.0 §3.1.4.22 / .23): submission queue `y` tail doorbell at
/// `0x1000 + 2y * stride`, completion queue `y` head doorbell at `0x1000 + (2y + 1) * stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doorbells {
    stride: usize,
}

impl Doorbells {
    /// Doorbells with the stride from `CAP.DSTRD`.
    pub fn new(cap: Capabilities) -> Self {
        Self {
            stride: cap.doorbell_stride(),
        }
    }

    /// Offset of submission queue `qid`'s tail doorbell.
    pub fn sq_tail(self, qid: u16) -> usize {
        DOORBELLS + 2 * usize::from(qid) * self.stride
    }

    /// Offset of completion queue `qid`'s head doorbell.
    pub fn cq_head(self, qid: u16) -> usize {
        DOORBELLS + (2 * usize::from(qid) + 1) * self.stride
    }

    /// Whether the doorbells of queues `0..=max_qid` lie within a mapping of `len` bytes.
    pub fn fit(self, max_qid: u16, len: usize) -> bool {
        self.cq_head(max_qid) + 4 <= len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_fields() {
        // QEMU's nvme: MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap = Capabilities(0x0040_0020_0f01_07ff);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.contiguous_queues_required());
        assert_eq!(cap.timeout_ns(), 7_500_000_000);
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(cap.nvm_command_set());
        assert_eq!(cap.page_size_min_shift(), 12);
        assert_eq!(cap.page_size_max_shift(), 16);
        let strided = Capabilities(3 << 32);
        let db = Doorbells::new(strided);
        assert_eq!((db.sq_tail(0), db.cq_head(0)), (0x1000, 0x1020));
        assert_eq!((db.sq_tail(2), db.cq_head(2)), (0x1080, 0x10a0));
        assert!(db.fit(2, 0x10a4));
        assert!(!db.fit(2, 0x10a3));
        assert_eq!(aqa(32, 64), 63 << 16 | 31);
    }
}
