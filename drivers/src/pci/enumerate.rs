//! Enumeration: find every function, either by following bridges from bus 0 (the usual way)
//! or by brute force over all 256 buses (for firmware that leaves bridges unconfigured buses
//! numbers we cannot follow). Enumeration only reads configuration space.

use super::regs::*;
use super::{ConfigAccess, PciAddress};
use alloc::vec::Vec;

/// How to find buses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScanMode {
    /// Bus 0, then the secondary bus of every PCI-to-PCI bridge (and one root bus per function
    /// of a multi-function host bridge at 00:00.0).
    #[default]
    FollowBridges,
    /// Every device on every bus 0..=255.
    BruteForce,
}

/// A function found during enumeration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Where it is.
    pub addr: PciAddress,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Base class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision ID.
    pub revision: u8,
    /// Header type without the multi-function bit.
    pub header_type: u8,
    /// Whether the device has several functions.
    pub multifunction: bool,
    /// Subsystem vendor ID (0 for bridges).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (0 for bridges).
    pub subsystem_id: u16,
    /// For bridges: the secondary bus number.
    pub secondary_bus: Option<u8>,
}

impl PciFunction {
    /// Reads the identification of the function at `addr`, or `None` if nothing answers.
    pub fn read<C: ConfigAccess + ?Sized>(cfg: &C, addr: PciAddress) -> Option<Self> {
        let id = cfg.read32(addr, VENDOR_ID);
        let vendor_id = id as u16;
        if vendor_id == 0xffff || vendor_id == 0 {
            return None;
        }
        let class = cfg.read32(addr, REVISION_ID);
        let header = cfg.read8(addr, HEADER_TYPE);
        let header_type = header & 0x7f;
        let (subsystem_vendor_id, subsystem_id, secondary_bus) =
            if header_type == HEADER_TYPE_ENDPOINT {
                let sub = cfg.read32(addr, SUBSYSTEM_VENDOR_ID);
                (sub as u16, (sub >> 16) as u16, None)
            } else if header_type == HEADER_TYPE_BRIDGE {
                (0, 0, Some(cfg.read8(addr, SECONDARY_BUS)))
            } else {
                (0, 0, None)
            };
        Some(Self {
            addr,
            vendor_id,
            device_id: (id >> 16) as u16,
            class: (class >> 24) as u8,
            subclass: (class >> 16) as u8,
            prog_if: (class >> 8) as u8,
            revision: class as u8,
            header_type,
            multifunction: header & HEADER_TYPE_MULTIFUNCTION != 0,
            subsystem_vendor_id,
            subsystem_id,
            secondary_bus,
        })
    }

    /// Whether this is a PCI-to-PCI bridge.
    pub fn is_bridge(&self) -> bool {
        self.header_type == HEADER_TYPE_BRIDGE
    }
}

/// Finds every function, in bus/device/function order of discovery (bus 0 first, then the
/// buses behind bridges depth-first, as Linux numbers them).
pub fn enumerate<C: ConfigAccess + ?Sized>(cfg: &C, mode: ScanMode) -> Vec<PciFunction> {
    let mut found = Vec::new();
    let mut scanned = [false; 256];
    match mode {
        ScanMode::BruteForce => {
            for bus in 0..=255u8 {
                scan_bus(cfg, bus, &mut found, &mut scanned, false);
            }
        }
        ScanMode::FollowBridges => {
            scan_bus(cfg, 0, &mut found, &mut scanned, true);
            // A multi-function host bridge at 00:00.0 means several host controllers: function
            // f is responsible for bus f.
            let host = PciAddress::new(0, 0, 0);
            if PciFunction::read(cfg, host).is_some_and(|f| f.multifunction) {
                for function in 1..8u8 {
                    if PciFunction::read(cfg, PciAddress::new(0, 0, function)).is_some() {
                        scan_bus(cfg, function, &mut found, &mut scanned, true);
                    }
                }
            }
        }
    }
    found
}

fn scan_bus<C: ConfigAccess + ?Sized>(
    cfg: &C,
    bus: u8,
    found: &mut Vec<PciFunction>,
    scanned: &mut [bool; 256],
    follow_bridges: bool,
) {
    if scanned[usize::from(bus)] {
        return;
    }
    scanned[usize::from(bus)] = true;
    for device in 0..32u8 {
        let Some(first) = PciFunction::read(cfg, PciAddress::new(bus, device, 0)) else {
            continue;
        };
        let functions = if first.multifunction { 8 } else { 1 };
        for function in 0..functions {
            let function = if function == 0 {
                Some(first)
            } else {
                PciFunction::read(cfg, PciAddress::new(bus, device, function))
            };
            let Some(function) = function else { continue };
            found.push(function);
            if follow_bridges {
                if let Some(secondary) = function.secondary_bus {
                    // Bus 0 behind a bridge means firmware did not configure it.
                    if secondary != 0 && secondary > bus {
                        scan_bus(cfg, secondary, found, scanned, true);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::{FakeFunction, FakePci};

    fn topology() -> FakePci {
        let pci = FakePci::new();
        pci.insert(
            PciAddress::new(0, 0, 0),
            FakeFunction::endpoint(0x8086, 0x29c0, 6, 0),
        );
        pci.insert(
            PciAddress::new(0, 2, 0),
            FakeFunction::endpoint(0x1af4, 0x1042, 1, 0),
        );
        // Multi-function device: functions 0 and 3 present.
        pci.insert(
            PciAddress::new(0, 3, 0),
            FakeFunction::endpoint(0x1af4, 0x1001, 1, 0).multifunction(),
        );
        pci.insert(
            PciAddress::new(0, 3, 3),
            FakeFunction::endpoint(0x1af4, 0x1001, 1, 0),
        );
        // Function 5 of a single-function device must not be found.
        pci.insert(
            PciAddress::new(0, 2, 5),
            FakeFunction::endpoint(0xdead, 0xbeef, 1, 0),
        );
        // Bridge to bus 1, which has a bridge to bus 2.
        pci.insert(PciAddress::new(0, 4, 0), FakeFunction::bridge(1, 2));
        pci.insert(PciAddress::new(1, 0, 0), FakeFunction::bridge(2, 2));
        pci.insert(
            PciAddress::new(2, 5, 0),
            FakeFunction::endpoint(0x1b36, 0x0010, 1, 8),
        );
        pci.insert(
            PciAddress::new(0, 5, 0),
            FakeFunction::endpoint(0x1af4, 0x1042, 1, 0),
        );
        // Unreachable bus 9 (no bridge): only brute force finds it.
        pci.insert(
            PciAddress::new(9, 0, 0),
            FakeFunction::endpoint(0x1af4, 0x1042, 1, 0),
        );
        pci
    }

    #[test]
    fn follows_bridges_depth_first() {
        let pci = topology();
        let found = enumerate(&pci, ScanMode::FollowBridges);
        let addrs: Vec<String> = found.iter().map(|f| f.addr.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "00:00.0", "00:02.0", "00:03.0", "00:03.3", "00:04.0", "01:00.0", "02:05.0",
                "00:05.0"
            ]
        );
        let nvme = found.iter().find(|f| f.addr.bus == 2).unwrap();
        assert_eq!(
            (nvme.vendor_id, nvme.device_id, nvme.class, nvme.subclass),
            (0x1b36, 0x0010, 1, 8)
        );
        assert!(found[4].is_bridge());
        assert_eq!(found[4].secondary_bus, Some(1));
    }

    #[test]
    fn brute_force_finds_orphan_buses() {
        let pci = topology();
        let found = enumerate(&pci, ScanMode::BruteForce);
        assert_eq!(found.len(), 9);
        assert!(found.iter().any(|f| f.addr == PciAddress::new(9, 0, 0)));
    }

    #[test]
    fn bridge_loops_terminate() {
        let pci = FakePci::new();
        pci.insert(PciAddress::new(0, 1, 0), FakeFunction::bridge(1, 1));
        pci.insert(PciAddress::new(1, 1, 0), FakeFunction::bridge(1, 1)); // points at its own bus
        let found = enumerate(&pci, ScanMode::FollowBridges);
        assert_eq!(found.len(), 2);
    }
}
