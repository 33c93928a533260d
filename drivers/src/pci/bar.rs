//! Base address registers: decoding and sizing (PCI Local Bus 3.0 §6.2.5.1).
//!
//! Sizing writes all-ones to the BAR (both halves for 64-bit BARs), reads back the mask and
//! restores the original value, with memory and I/O decoding disabled meanwhile so that the
//! device does not claim the transient all-ones address.

use super::regs::{Command, BAR0, COMMAND, HEADER_TYPE, HEADER_TYPE_BRIDGE};
use super::{ConfigAccess, PciAddress, PciError};

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Memory space.
    Memory {
        /// Whether the BAR occupies two slots (64-bit address).
        is_64bit: bool,
        /// Whether the range is prefetchable.
        prefetchable: bool,
    },
    /// I/O space.
    Io,
}

/// A decoded, sized base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Memory or I/O.
    pub kind: BarKind,
    /// Base address assigned by firmware (0 when unassigned).
    pub address: u64,
    /// Size of the decoded range in bytes (a power of two).
    pub size: u64,
}

impl Bar {
    /// Whether this BAR also uses the next slot.
    pub fn is_64bit(&self) -> bool {
        matches!(self.kind, BarKind::Memory { is_64bit: true, .. })
    }
}

/// Number of BARs of the function's header type (6 for endpoints, 2 for bridges).
fn bar_count<C: ConfigAccess + ?Sized>(cfg: &C, addr: PciAddress) -> u8 {
    if cfg.read8(addr, HEADER_TYPE) & 0x7f == HEADER_TYPE_BRIDGE {
        2
    } else {
        6
    }
}

/// Decodes and sizes BAR `index`; `Ok(None)` for an unimplemented BAR (and for the upper half
/// of a 64-bit BAR, which the caller skips).
pub fn probe_bar<C: ConfigAccess + ?Sized>(
    cfg: &C,
    addr: PciAddress,
    index: u8,
) -> Result<Option<Bar>, PciError> {
    if index >= bar_count(cfg, addr) {
        return Err(PciError::BarIndexOutOfRange(index));
    }
    let offset = BAR0 + 4 * u16::from(index);
    let original = cfg.read32(addr, offset);

    // Stop decoding while the BAR holds the sizing pattern.
    let command = cfg.read16(addr, COMMAND);
    let quiet = command & !(Command::IO_SPACE | Command::MEMORY_SPACE).bits();
    if quiet != command {
        cfg.write32(addr, COMMAND, u32::from(quiet));
    }
    let result = size_bar(cfg, addr, index, offset, original);
    if quiet != command {
        cfg.write32(addr, COMMAND, u32::from(command));
    }
    result
}

fn size_bar<C: ConfigAccess + ?Sized>(
    cfg: &C,
    addr: PciAddress,
    index: u8,
    offset: u16,
    original: u32,
) -> Result<Option<Bar>, PciError> {
    cfg.write32(addr, offset, u32::MAX);
    let mask_low = cfg.read32(addr, offset);
    cfg.write32(addr, offset, original);

    if original & 1 == 1 {
        // I/O BAR: bits 31:2 are address; the upper 16 bits may be hardwired to zero.
        let mask = mask_low & !0x3;
        if mask == 0 {
            return Ok(None);
        }
        let size = u64::from((!mask & 0xffff).wrapping_add(1) & 0xffff);
        let size = if size == 0 { 0x1_0000 } else { size };
        return Ok(Some(Bar {
            kind: BarKind::Io,
            address: u64::from(original & !0x3),
            size,
        }));
    }

    let prefetchable = original & 0x8 != 0;
    match (original >> 1) & 0x3 {
        0b00 => {
            let mask = mask_low & !0xf;
            if mask == 0 {
                return Ok(None);
            }
            Ok(Some(Bar {
                kind: BarKind::Memory {
                    is_64bit: false,
                    prefetchable,
                },
                address: u64::from(original & !0xf),
                size: u64::from((!mask).wrapping_add(1)),
            }))
        }
        0b10 => {
            if index >= bar_count(cfg, addr) - 1 {
                return Err(PciError::InvalidBar(index));
            }
            let high_offset = offset + 4;
            let original_high = cfg.read32(addr, high_offset);
            cfg.write32(addr, high_offset, u32::MAX);
            let mask_high = cfg.read32(addr, high_offset);
            cfg.write32(addr, high_offset, original_high);
            let mask = (u64::from(mask_high) << 32) | u64::from(mask_low & !0xf);
            if mask == 0 {
                return Ok(None);
            }
            Ok(Some(Bar {
                kind: BarKind::Memory {
                    is_64bit: true,
                    prefetchable,
                },
                address: (u64::from(original_high) << 32) | u64::from(original & !0xf),
                size: (!mask).wrapping_add(1),
            }))
        }
        _ => Err(PciError::InvalidBar(index)),
    }
}

/// Decodes and sizes all BARs of a function. The slot after a 64-bit BAR is `None`.
pub fn probe_bars<C: ConfigAccess + ?Sized>(
    cfg: &C,
    addr: PciAddress,
) -> Result<[Option<Bar>; 6], PciError> {
    let mut bars = [None; 6];
    let count = bar_count(cfg, addr);
    let mut index = 0;
    while index < count {
        let bar = probe_bar(cfg, addr, index)?;
        bars[usize::from(index)] = bar;
        index += if bar.is_some_and(|b| b.is_64bit()) {
            2
        } else {
            1
        };
    }
    Ok(bars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::{FakeFunction, FakePci};

    #[test]
    fn decodes_and_sizes_all_kinds() {
        let mut f = FakeFunction::endpoint(0x8086, 0x1234, 0x01, 0x08);
        f.bar_io(0, 0xc040, 0x40);
        f.bar_mem32(1, 0xfebd_0000, 0x1000, false);
        f.bar_mem64(2, 0x8_0000_0000, 0x4000, true);
        f.bar_mem64(4, 0x2_0000_0000, 0x1_0000_0000, false);
        f.set16(COMMAND, 0x0007);
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 4, 0);
        pci.insert(addr, f);

        let bars = probe_bars(&pci, addr).unwrap();
        assert_eq!(
            bars[0],
            Some(Bar {
                kind: BarKind::Io,
                address: 0xc040,
                size: 0x40
            })
        );
        assert_eq!(
            bars[1],
            Some(Bar {
                kind: BarKind::Memory {
                    is_64bit: false,
                    prefetchable: false
                },
                address: 0xfebd_0000,
                size: 0x1000
            })
        );
        assert_eq!(
            bars[2],
            Some(Bar {
                kind: BarKind::Memory {
                    is_64bit: true,
                    prefetchable: true
                },
                address: 0x8_0000_0000,
                size: 0x4000
            })
        );
        assert_eq!(bars[3], None);
        assert_eq!(
            bars[4].map(|b| (b.address, b.size)),
            Some((0x2_0000_0000, 0x1_0000_0000))
        );
        assert_eq!(bars[5], None);

        // Probing restored every BAR and the command register.
        assert_eq!(pci.read32(addr, BAR0), 0xc041);
        assert_eq!(pci.read32(addr, BAR0 + 8), 0x0000_000c);
        assert_eq!(pci.read32(addr, BAR0 + 12), 0x8);
        assert_eq!(pci.read16(addr, COMMAND), 0x0007);
        // Decoding was off while the sizing pattern was in place.
        assert!(pci.with(addr, |f| f.sized_while_decoding == 0));
    }

    #[test]
    fn rejects_bad_bars() {
        let mut f = FakeFunction::endpoint(0x8086, 0x1234, 0x01, 0x08);
        f.bar_mem64(5, 0x1000_0000, 0x1000, false);
        f.set32(BAR0, 0x4); // reserved type 0b10 in slot 0 is fine: it is a 64-bit BAR
        f.set32(BAR0 + 4 * 3, 0x2); // reserved memory type 0b01
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 5, 0);
        pci.insert(addr, f);
        assert_eq!(probe_bar(&pci, addr, 5), Err(PciError::InvalidBar(5)));
        assert_eq!(probe_bar(&pci, addr, 3), Err(PciError::InvalidBar(3)));
        assert_eq!(
            probe_bar(&pci, addr, 6),
            Err(PciError::BarIndexOutOfRange(6))
        );
        assert_eq!(probe_bar(&pci, addr, 1), Ok(None));
    }
}
