//! The MSI-X capability registers and the vector table / PBA in device memory
//! (PCI Local Bus 3.0 §6.8.2).

use super::MsixError;
use crate::hal::{map_region, ConfigAccess, MmioMapper, MmioRegion, PciAddress};
use crate::pci::{bar_structure, find_capability, regs::CAP_ID_MSIX, Bar};

/// Bytes per table entry.
pub const ENTRY_SIZE: usize = 16;
/// Entry: message address, low dword.
const ENTRY_ADDRESS_LOW: usize = 0x0;
/// Entry: message address, high dword.
const ENTRY_ADDRESS_HIGH: usize = 0x4;
/// Entry: message data.
const ENTRY_DATA: usize = 0x8;
/// Entry: vector control (bit 0 = mask).
const ENTRY_VECTOR_CONTROL: usize = 0xc;
/// Vector control: the entry is masked.
const VECTOR_MASKED: u32 = 1;

/// Capability: message control register (offset from the capability header).
const MESSAGE_CONTROL: u16 = 0x2;
/// Capability: table offset and BIR.
const TABLE_OFFSET_BIR: u16 = 0x4;
/// Capability: PBA offset and BIR.
const PBA_OFFSET_BIR: u16 = 0x8;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask (all vectors masked).
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// A message for the local APIC: where the device writes and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (64 bits).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl MsiMessage {
    /// Fixed delivery, edge-triggered, physical destination `apic_id`, vector `vector`
    /// (Intel SDM Vol. 3 §11.11.1 and §11.11.2).
    pub fn fixed(apic_id: u8, vector: u8) -> Result<Self, MsixError> {
        if vector < 32 {
            return Err(MsixError::InvalidVector(vector));
        }
        Ok(Self {
            address: 0xfee0_0000 | (u64::from(apic_id) << 12),
            data: u32::from(vector),
        })
    }
}

/// The MSI-X capability of one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// The function.
    pub addr: PciAddress,
    /// Offset of the capability header in configuration space.
    pub offset: u16,
    /// Number of table entries.
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR.
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR.
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Reads the capability of `addr`.
    pub fn read<C: ConfigAccess + ?Sized>(cfg: &C, addr: PciAddress) -> Result<Self, MsixError> {
        let cap = find_capability(cfg, addr, CAP_ID_MSIX)?.ok_or(MsixError::NoCapability)?;
        let control = cfg.read16(addr, cap.offset + MESSAGE_CONTROL);
        let table = cfg.read32(addr, cap.offset + TABLE_OFFSET_BIR);
        let pba = cfg.read32(addr, cap.offset + PBA_OFFSET_BIR);
        Ok(Self {
            addr,
            offset: cap.offset,
            table_size: (control & 0x7ff) + 1,
            table_bar: (table & 0x7) as u8,
            table_offset: table & !0x7,
            pba_bar: (pba & 0x7) as u8,
            pba_offset: pba & !0x7,
        })
    }

    fn control<C: ConfigAccess + ?Sized>(&self, cfg: &C) -> u16 {
        cfg.read16(self.addr, self.offset + MESSAGE_CONTROL)
    }

    fn set_control<C: ConfigAccess + ?Sized>(&self, cfg: &C, control: u16) {
        cfg.write16(self.addr, self.offset + MESSAGE_CONTROL, control);
    }

    /// Enables MSI-X with the function mask set: the device uses MSI-X (not INTx) but sends
    /// nothing until [`MsixCapability::unmask_function`].
    pub fn enable_masked<C: ConfigAccess + ?Sized>(&self, cfg: &C) {
        let control = self.control(cfg);
        self.set_control(cfg, control | CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
    }

    /// Clears the function mask; entries still obey their own mask bits.
    pub fn unmask_function<C: ConfigAccess + ?Sized>(&self, cfg: &C) {
        let control = self.control(cfg);
        self.set_control(cfg, (control | CONTROL_ENABLE) & !CONTROL_FUNCTION_MASK);
    }

    /// Turns MSI-X off.
    pub fn disable<C: ConfigAccess + ?Sized>(&self, cfg: &C) {
        let control = self.control(cfg);
        self.set_control(cfg, control & !(CONTROL_ENABLE | CONTROL_FUNCTION_MASK));
    }

    /// Whether MSI-X is enabled and the function unmasked.
    pub fn is_active<C: ConfigAccess + ?Sized>(&self, cfg: &C) -> bool {
        self.control(cfg) & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK) == CONTROL_ENABLE
    }
}

/// The vector table and pending-bit array of one function, in device memory.
#[derive(Debug)]
pub struct MsixTable {
    table: MmioRegion,
    pba: MmioRegion,
    size: u16,
}

impl MsixTable {
    /// Wraps already mapped table and PBA regions; they must hold `size` entries and bits.
    pub fn new(table: MmioRegion, pba: MmioRegion, size: u16) -> Result<Self, MsixError> {
        let entries = usize::from(size);
        // Touch the last entry and PBA dword once so short regions fail here, not later.
        table.read32((entries - 1) * ENTRY_SIZE + ENTRY_VECTOR_CONTROL)?;
        pba.read32((entries - 1) / 64 * 8)?;
        Ok(Self { table, pba, size })
    }

    /// Locates the table and PBA in the function's BARs (checked against BAR sizes) and maps
    /// them with `mapper`.
    pub fn map<M: MmioMapper + ?Sized>(
        cap: &MsixCapability,
        bars: &[Option<Bar>; 6],
        mapper: &M,
    ) -> Result<Self, MsixError> {
        let table_len = usize::from(cap.table_size) * ENTRY_SIZE;
        let pba_len = usize::from(cap.table_size).div_ceil(64) * 8;
        let table_phys = bar_structure(
            bars,
            cap.table_bar,
            u64::from(cap.table_offset),
            table_len as u64,
        )?;
        let pba_phys = bar_structure(bars, cap.pba_bar, u64::from(cap.pba_offset), pba_len as u64)?;
        // SAFETY: both ranges lie within memory BARs of the function whose driver calls us
        // (checked by `bar_structure`), and the spec reserves them for the MSI-X structures.
        let table = unsafe { map_region(mapper, table_phys, table_len) }?;
        // SAFETY: as above, for the pending-bit array.
        let pba = unsafe { map_region(mapper, pba_phys, pba_len) }?;
        Self::new(table, pba, cap.table_size)
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    fn entry(&self, entry: u16) -> Result<usize, MsixError> {
        if entry >= self.size {
            return Err(MsixError::EntryOutOfRange {
                entry,
                table_size: self.size,
            });
        }
        Ok(usize::from(entry) * ENTRY_SIZE)
    }

    /// Masks `entry`, writes its message, and leaves it masked.
    pub fn program(&self, entry: u16, message: MsiMessage) -> Result<(), MsixError> {
        let base = self.entry(entry)?;
        self.mask(entry)?;
        self.table
            .write32(base + ENTRY_ADDRESS_LOW, message.address as u32)?;
        self.table
            .write32(base + ENTRY_ADDRESS_HIGH, (message.address >> 32) as u32)?;
        self.table.write32(base + ENTRY_DATA, message.data)?;
        Ok(())
    }

    /// Reads back the message of `entry`.
    pub fn message(&self, entry: u16) -> Result<MsiMessage, MsixError> {
        let base = self.entry(entry)?;
        let low = self.table.read32(base + ENTRY_ADDRESS_LOW)?;
        let high = self.table.read32(base + ENTRY_ADDRESS_HIGH)?;
        Ok(MsiMessage {
            address: (u64::from(high) << 32) | u64::from(low),
            data: self.table.read32(base + ENTRY_DATA)?,
        })
    }

    /// Sets the mask bit of `entry`.
    pub fn mask(&self, entry: u16) -> Result<(), MsixError> {
        let at = self.entry(entry)? + ENTRY_VECTOR_CONTROL;
        let control = self.table.read32(at)?;
        self.table.write32(at, control | VECTOR_MASKED)?;
        Ok(())
    }

    /// Clears the mask bit of `entry`; a message pending in the PBA is then sent.
    pub fn unmask(&self, entry: u16) -> Result<(), MsixError> {
        let at = self.entry(entry)? + ENTRY_VECTOR_CONTROL;
        let control = self.table.read32(at)?;
        self.table.write32(at, control & !VECTOR_MASKED)?;
        Ok(())
    }

    /// Whether `entry` is masked.
    pub fn is_masked(&self, entry: u16) -> Result<bool, MsixError> {
        let at = self.entry(entry)? + ENTRY_VECTOR_CONTROL;
        Ok(self.table.read32(at)? & VECTOR_MASKED != 0)
    }

    /// Whether the pending bit of `entry` is set (a message held back by a mask).
    pub fn is_pending(&self, entry: u16) -> Result<bool, MsixError> {
        self.entry(entry)?;
        let dword = self.pba.read32(usize::from(entry / 32) * 4)?;
        Ok(dword & (1 << (entry % 32)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeMapper;
    use crate::pci::fake::{FakeFunction, FakePci};
    use crate::pci::probe_bars;

    /// A function with a 3-entry MSI-X table at BAR1+0x0 and its PBA at BAR1+0x800.
    pub(crate) fn msix_function(bar: &mut [u32]) -> (FakePci, PciAddress) {
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
        let phys = bar.as_mut_ptr() as u64;
        f.bar_mem64(1, phys, 0x1000, false);
        f.add_capability(0x09, &[0; 14]);
        let mut body = Vec::new();
        body.extend_from_slice(&2u16.to_le_bytes()); // table size 3
        body.extend_from_slice(&1u32.to_le_bytes()); // table: BIR 1, offset 0
        body.extend_from_slice(&(0x800u32 | 1).to_le_bytes()); // PBA: BIR 1, offset 0x800
        f.add_capability(CAP_ID_MSIX, &body);
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 6, 0);
        pci.insert(addr, f);
        (pci, addr)
    }

    #[test]
    fn reads_capability_and_programs_entries() {
        // The fake BAR must be aligned to its size for BAR sizing to round-trip.
        let mut backing = vec![0u32; 0x2000 / 4];
        let start = (0x1000 - (backing.as_ptr() as usize & 0xfff)) / 4 % 0x400;
        let bar = &mut backing[start..start + 0x400];
        for entry in 0..3 {
            bar[entry * 4 + 3] = 1; // entries start masked, as after reset
        }
        let (pci, addr) = msix_function(bar);
        let cap = MsixCapability::read(&pci, addr).unwrap();
        assert_eq!((cap.table_size, cap.table_bar, cap.table_offset), (3, 1, 0));
        assert_eq!((cap.pba_bar, cap.pba_offset), (1, 0x800));

        let bars = probe_bars(&pci, addr).unwrap();
        let table = MsixTable::map(&cap, &bars, &FakeMapper).unwrap();
        let message = MsiMessage::fixed(3, 0x41).unwrap();
        assert_eq!(
            message,
            MsiMessage {
                address: 0xfee0_3000,
                data: 0x41
            }
        );
        table.program(2, message).unwrap();
        assert_eq!(table.message(2).unwrap(), message);
        assert!(table.is_masked(2).unwrap());
        table.unmask(2).unwrap();
        assert!(!table.is_masked(2).unwrap());
        assert!(table.is_masked(1).unwrap());
        assert_eq!(
            table.program(3, message),
            Err(MsixError::EntryOutOfRange {
                entry: 3,
                table_size: 3
            })
        );
        assert!(!table.is_pending(1).unwrap());

        cap.enable_masked(&pci);
        assert!(!cap.is_active(&pci));
        cap.unmask_function(&pci);
        assert!(cap.is_active(&pci));
        assert_eq!(pci.read16(addr, cap.offset + MESSAGE_CONTROL), 0x8002);
        cap.disable(&pci);
        assert_eq!(pci.read16(addr, cap.offset + MESSAGE_CONTROL), 0x0002);

        assert_eq!(&bar[8..12], &[0xfee0_3000, 0, 0x41, 0]);
        bar[0x800 / 4] = 0b10;
        let table = MsixTable::map(&cap, &bars, &FakeMapper).unwrap();
        assert!(table.is_pending(1).unwrap());
    }

    #[test]
    fn rejects_exception_vectors_and_missing_capability() {
        assert_eq!(MsiMessage::fixed(0, 14), Err(MsixError::InvalidVector(14)));
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 1, 0);
        pci.insert(addr, FakeFunction::endpoint(1, 2, 3, 4));
        assert_eq!(
            MsixCapability::read(&pci, addr),
            Err(MsixError::NoCapability)
        );
    }

    #[test]
    fn table_outside_bar_is_refused() {
        let mut backing = vec![0u32; 0x2000 / 4];
        let start = (0x1000 - (backing.as_ptr() as usize & 0xfff)) / 4 % 0x400;
        let (pci, addr) = msix_function(&mut backing[start..start + 0x400]);
        let mut cap = MsixCapability::read(&pci, addr).unwrap();
        let bars = probe_bars(&pci, addr).unwrap();
        cap.pba_offset = 0xffc;
        assert!(matches!(
            MsixTable::map(&cap, &bars, &FakeMapper),
            Err(MsixError::Pci(_))
        ));
        cap.pba_offset = 0x800;
        cap.table_bar = 0;
        assert!(matches!(
            MsixTable::map(&cap, &bars, &FakeMapper),
            Err(MsixError::Pci(_))
        ));
    }
}
