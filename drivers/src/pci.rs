//! PCI: enumeration of functions, BAR decoding and sizing, capability lists, and enabling the
//! functions we drive.
//!
//! A driver brings its function up under a [`Claim`], which enables it, owns its MSI-X vectors
//! and undoes both when the probe fails.
//!
//! Everything goes through a [`ConfigAccess`] supplied by the kernel (ports or ECAM), so host
//! tests run against hand-built configuration spaces (`pci::fake`). Enumeration happens once at
//! boot and allocates; nothing here runs on the I/O path.
//!
//! Spec: PCI Local Bus 3.0 §6 (configuration space), PCI-to-PCI Bridge 1.2 §3.2, PCI Express
//! Base 4.0 §7.5 and §7.6 (extended capabilities).

mod bar;
mod capability;
mod claim;
mod enumerate;
#[cfg(test)]
pub mod fake;
pub mod regs;

pub use crate::hal::{ConfigAccess, PciAddress};
pub use bar::{probe_bar, probe_bars, Bar, BarKind};
pub use capability::{
    capabilities, extended_capabilities, find_capability, Capability, CapabilityIter,
    ExtendedCapabilityIter,
};
pub use claim::Claim;
pub use enumerate::{enumerate, PciFunction, ScanMode};

use regs::{Command, COMMAND};

/// Errors of PCI enumeration and configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// No function answers at this address (vendor ID reads as 0xFFFF).
    NoFunction(PciAddress),
    /// A BAR index outside 0..6 (0..2 for bridges) was requested.
    BarIndexOutOfRange(u8),
    /// A BAR has a reserved type encoding, or a 64-bit BAR occupies the last slot.
    InvalidBar(u8),
    /// A BAR needed by a driver is not implemented or has no address assigned.
    BarNotAssigned(u8),
    /// A BAR needed by a driver is an I/O BAR where memory was expected.
    UnexpectedIoBar(u8),
    /// A structure described by a capability lies outside its BAR.
    OutsideBar {
        /// The BAR index.
        bar: u8,
        /// Offset of the structure within the BAR.
        offset: u64,
        /// Length of the structure.
        len: u64,
    },
    /// A capability list loops or points into the standard header.
    MalformedCapabilityList(PciAddress),
    /// A required capability is missing.
    MissingCapability(u8),
}

impl core::fmt::Display for PciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoFunction(a) => write!(f, "no PCI function at {a}"),
            Self::BarIndexOutOfRange(i) => write!(f, "BAR index {i} out of range"),
            Self::InvalidBar(i) => write!(f, "BAR{i} has an invalid type"),
            Self::BarNotAssigned(i) => write!(f, "BAR{i} is not assigned"),
            Self::UnexpectedIoBar(i) => write!(f, "BAR{i} is an I/O BAR, expected memory"),
            Self::OutsideBar { bar, offset, len } => {
                write!(f, "structure {offset:#x}+{len:#x} outside BAR{bar}")
            }
            Self::MalformedCapabilityList(a) => write!(f, "malformed capability list at {a}"),
            Self::MissingCapability(id) => write!(f, "capability {id:#04x} missing"),
        }
    }
}

/// Sets memory-space decoding and bus mastering for a function we drive, and (optionally)
/// disables its legacy INTx pin, which MSI-X makes unnecessary. Returns the new command value.
///
/// Only drivers call this, for their own devices: functions nobody drives stay as firmware left
/// them.
pub fn enable_function<C: ConfigAccess + ?Sized>(
    cfg: &C,
    addr: PciAddress,
    disable_intx: bool,
) -> Command {
    let mut command = Command::from_bits_retain(cfg.read16(addr, COMMAND));
    command |= Command::MEMORY_SPACE | Command::BUS_MASTER;
    if disable_intx {
        command |= Command::INTX_DISABLE;
    }
    // Write the whole dword with the status half zero: status bits are write-1-to-clear.
    cfg.write32(addr, COMMAND, u32::from(command.bits()));
    command
}

/// Checks that a structure of `len` bytes at `offset` in BAR `index` lies within the BAR, and
/// returns its physical address.
pub fn bar_structure(
    bars: &[Option<Bar>; 6],
    index: u8,
    offset: u64,
    len: u64,
) -> Result<u64, PciError> {
    let bar = bars
        .get(usize::from(index))
        .ok_or(PciError::BarIndexOutOfRange(index))?
        .ok_or(PciError::BarNotAssigned(index))?;
    if bar.kind == BarKind::Io {
        return Err(PciError::UnexpectedIoBar(index));
    }
    if bar.address == 0 {
        return Err(PciError::BarNotAssigned(index));
    }
    match offset.checked_add(len) {
        Some(end) if end <= bar.size && len > 0 => Ok(bar.address + offset),
        _ => Err(PciError::OutsideBar {
            bar: index,
            offset,
            len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeFunction, FakePci};
    use super::*;

    #[test]
    fn enable_sets_bits_and_preserves_status() {
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 0x01, 0x00);
        f.set16(regs::STATUS, 0x0010);
        f.set16(COMMAND, 0x0001);
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 3, 0);
        pci.insert(addr, f);
        let command = enable_function(&pci, addr, true);
        assert_eq!(
            command,
            Command::IO_SPACE | Command::MEMORY_SPACE | Command::BUS_MASTER | Command::INTX_DISABLE
        );
        assert_eq!(pci.read16(addr, COMMAND), 0x0407);
        assert_eq!(pci.read16(addr, regs::STATUS), 0x0010);
    }

    #[test]
    fn bar_structure_bounds() {
        let bars = [
            Some(Bar {
                kind: BarKind::Memory {
                    is_64bit: true,
                    prefetchable: true,
                },
                address: 0x1_0000_0000,
                size: 0x4000,
            }),
            None,
            Some(Bar {
                kind: BarKind::Io,
                address: 0xc000,
                size: 0x40,
            }),
            Some(Bar {
                kind: BarKind::Memory {
                    is_64bit: false,
                    prefetchable: false,
                },
                address: 0,
                size: 0x1000,
            }),
            None,
            None,
        ];
        assert_eq!(bar_structure(&bars, 0, 0x3000, 0x1000), Ok(0x1_0000_3000));
        assert!(matches!(
            bar_structure(&bars, 0, 0x3001, 0x1000),
            Err(PciError::OutsideBar { .. })
        ));
        assert!(matches!(
            bar_structure(&bars, 0, u64::MAX, 2),
            Err(PciError::OutsideBar { .. })
        ));
        assert_eq!(
            bar_structure(&bars, 1, 0, 4),
            Err(PciError::BarNotAssigned(1))
        );
        assert_eq!(
            bar_structure(&bars, 2, 0, 4),
            Err(PciError::UnexpectedIoBar(2))
        );
        assert_eq!(
            bar_structure(&bars, 3, 0, 4),
            Err(PciError::BarNotAssigned(3))
        );
        assert_eq!(
            bar_structure(&bars, 9, 0, 4),
            Err(PciError::BarIndexOutOfRange(9))
        );
    }
}
