//! Capability lists: the standard list from the capabilities pointer (PCI Local Bus 3.0 §6.7)
//! and the PCIe extended list at 0x100 (PCI Express Base 4.0 §7.6.2), with loop protection.

use super::regs::{Status, CAPABILITIES_POINTER, EXTENDED_CAPABILITIES, STATUS};
use super::{ConfigAccess, PciAddress, PciError};

/// One capability: its ID and the offset of its header in configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID (8 bits standard, 16 bits extended).
    pub id: u16,
    /// Offset of the capability header.
    pub offset: u16,
    /// Capability version (extended capabilities only; 0 for standard ones).
    pub version: u8,
}

/// At most 48 standard capabilities fit in 192 bytes.
const MAX_STANDARD: usize = 48;
/// At most 960 extended capabilities fit in 3840 bytes.
const MAX_EXTENDED: usize = 960;

/// Iterator over the standard capability list. Yields `Err` once and stops when the list is
/// malformed (loops, or points into the header).
#[derive(Debug)]
pub struct CapabilityIter<'a, C: ConfigAccess + ?Sized> {
    cfg: &'a C,
    addr: PciAddress,
    next: u16,
    seen: usize,
}

impl<C: ConfigAccess + ?Sized> Iterator for CapabilityIter<'_, C> {
    type Item = Result<Capability, PciError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == 0 {
            return None;
        }
        if self.next < 0x40 || self.seen >= MAX_STANDARD {
            self.next = 0;
            return Some(Err(PciError::MalformedCapabilityList(self.addr)));
        }
        let offset = self.next;
        let header = self.cfg.read16(self.addr, offset);
        self.next = (header >> 8) & 0xfc;
        self.seen += 1;
        Some(Ok(Capability {
            id: header & 0xff,
            offset,
            version: 0,
        }))
    }
}

/// The standard capability list of a function (empty when the status bit says there is none).
pub fn capabilities<C: ConfigAccess + ?Sized>(cfg: &C, addr: PciAddress) -> CapabilityIter<'_, C> {
    let status = Status::from_bits_retain(cfg.read16(addr, STATUS));
    let next = if status.contains(Status::CAPABILITIES_LIST) && status.bits() != u16::MAX {
        u16::from(cfg.read8(addr, CAPABILITIES_POINTER) & 0xfc)
    } else {
        0
    };
    CapabilityIter {
        cfg,
        addr,
        next,
        seen: 0,
    }
}

/// The first standard capability with `id`.
pub fn find_capability<C: ConfigAccess + ?Sized>(
    cfg: &C,
    addr: PciAddress,
    id: u8,
) -> Result<Option<Capability>, PciError> {
    for cap in capabilities(cfg, addr) {
        let cap = cap?;
        if cap.id == u16::from(id) {
            return Ok(Some(cap));
        }
    }
    Ok(None)
}

/// Iterator over the PCIe extended capability list.
#[derive(Debug)]
pub struct ExtendedCapabilityIter<'a, C: ConfigAccess + ?Sized> {
    cfg: &'a C,
    addr: PciAddress,
    next: u16,
    seen: usize,
}

impl<C: ConfigAccess + ?Sized> Iterator for ExtendedCapabilityIter<'_, C> {
    type Item = Result<Capability, PciError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == 0 {
            return None;
        }
        if self.next < EXTENDED_CAPABILITIES || self.seen >= MAX_EXTENDED {
            self.next = 0;
            return Some(Err(PciError::MalformedCapabilityList(self.addr)));
        }
        let offset = self.next;
        let header = self.cfg.read32(self.addr, offset);
        if header == 0 || header == u32::MAX {
            // An empty list has a zero header at 0x100.
            self.next = 0;
            return None;
        }
        self.next = ((header >> 20) & 0xffc) as u16;
        self.seen += 1;
        Some(Ok(Capability {
            id: header as u16,
            offset,
            version: ((header >> 16) & 0xf) as u8,
        }))
    }
}

/// The extended capability list (empty without ECAM).
pub fn extended_capabilities<C: ConfigAccess + ?Sized>(
    cfg: &C,
    addr: PciAddress,
) -> ExtendedCapabilityIter<'_, C> {
    let next = if cfg.extended() {
        EXTENDED_CAPABILITIES
    } else {
        0
    };
    ExtendedCapabilityIter {
        cfg,
        addr,
        next,
        seen: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::{FakeFunction, FakePci};
    use crate::pci::regs::{CAP_ID_MSIX, CAP_ID_VENDOR};

    #[test]
    fn walks_standard_list() {
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
        let a = f.add_capability(CAP_ID_VENDOR, &[16, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let b = f.add_capability(CAP_ID_MSIX, &[1, 0, 1, 0, 0, 0, 1, 8, 0, 0]);
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 1, 0);
        pci.insert(addr, f);
        let caps: Vec<_> = capabilities(&pci, addr).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            caps.iter().map(|c| (c.id, c.offset)).collect::<Vec<_>>(),
            vec![(u16::from(CAP_ID_VENDOR), a), (u16::from(CAP_ID_MSIX), b)]
        );
        assert_eq!(
            find_capability(&pci, addr, CAP_ID_MSIX)
                .unwrap()
                .map(|c| c.offset),
            Some(b)
        );
        assert_eq!(find_capability(&pci, addr, 0x05).unwrap(), None);
        // Absent function: no list.
        assert_eq!(capabilities(&pci, PciAddress::new(0, 2, 0)).count(), 0);
    }

    #[test]
    fn detects_loops_and_bad_pointers() {
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
        let a = f.add_capability(0x01, &[0, 0]);
        f.set8(a + 1, a as u8); // points to itself
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 1, 0);
        pci.insert(addr, f);
        let results: Vec<_> = capabilities(&pci, addr).collect();
        assert_eq!(results.len(), MAX_STANDARD + 1);
        assert_eq!(
            results.last(),
            Some(&Err(PciError::MalformedCapabilityList(addr)))
        );
        assert!(find_capability(&pci, addr, 0x11).is_err());

        pci.with(addr, |f| f.set8(a + 1, 0x10));
        let results: Vec<_> = capabilities(&pci, addr).collect();
        assert_eq!(results.len(), 2);
        assert!(results[1].is_err());
    }

    #[test]
    fn walks_extended_list() {
        let mut f = FakeFunction::endpoint(0x8086, 0x5845, 1, 8);
        // AER (id 1, v1) at 0x100 -> SR-IOV (id 0x10, v1) at 0x140 -> end.
        f.set32(0x100, 0x0001 | (1 << 16) | (0x140 << 20));
        f.set32(0x140, 0x0010 | (1 << 16));
        let mut pci = FakePci::new();
        let addr = PciAddress::new(0, 1, 0);
        pci.insert(addr, f);
        assert_eq!(extended_capabilities(&pci, addr).count(), 0);
        pci.extended = true;
        let caps: Vec<_> = extended_capabilities(&pci, addr)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            caps.iter().map(|c| (c.id, c.offset)).collect::<Vec<_>>(),
            vec![(1, 0x100), (0x10, 0x140)]
        );
        pci.with(addr, |f| f.set32(0x140, 0x0010 | (0x140 << 20)));
        assert!(extended_capabilities(&pci, addr).any(|c| c.is_err()));
    }
}
