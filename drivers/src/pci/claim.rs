//! A driver's hold on the PCI function it brings up: [`Claim`] enables the function (memory
//! decoding, bus mastering, INTx off), maps its MSI-X table, and owns every CPU vector it
//! allocates for it. Until the driver calls [`Claim::keep`], dropping the claim undoes all of
//! it — entries masked, MSI-X off, vectors back in the registry, the command register as
//! firmware left it — so a probe that fails anywhere leaves nothing behind, whichever `?` it
//! returns through.
//!
//! Order of a bring-up (as Linux's `pci_enable_device` + `msix_capability_init`):
//! [`Claim::new`], [`Claim::map_msix`], then [`Claim::route`] each interrupt source and
//! [`Claim::enable_msix`] (function still masked) in whichever order the driver needs, the
//! device's own initialisation, and [`Claim::keep`], which unmasks the function.

use super::regs::COMMAND;
use super::{enable_function, probe_bars, Bar, ConfigAccess, PciAddress, PciError};
use crate::hal::MmioMapper;
use crate::msix::{
    InterruptOwner, MsiMessage, MsixCapability, MsixError, MsixTable, VectorRegistry,
};
use alloc::vec::Vec;

/// A function being brought up by its driver; rolled back on drop unless kept.
#[derive(Debug)]
pub struct Claim<'a, C: ConfigAccess + ?Sized> {
    cfg: &'a C,
    registry: &'a VectorRegistry,
    apic_id: u8,
    addr: PciAddress,
    bars: [Option<Bar>; 6],
    /// The command register before we enabled the function.
    command: u16,
    msix: Option<(MsixCapability, MsixTable)>,
    msix_enabled: bool,
    /// Table entries we routed (masked again on rollback).
    routed: Vec<u16>,
    /// CPU vectors we allocated.
    vectors: Vec<u8>,
    kept: bool,
}

impl<'a, C: ConfigAccess + ?Sized> Claim<'a, C> {
    /// Sizes the BARs of `addr` and enables the function: memory decoding and bus mastering
    /// on, INTx off. Vectors come from `registry` and interrupts go to local APIC `apic_id`.
    pub fn new(
        cfg: &'a C,
        registry: &'a VectorRegistry,
        apic_id: u8,
        addr: PciAddress,
    ) -> Result<Self, PciError> {
        let bars = probe_bars(cfg, addr)?;
        let command = cfg.read16(addr, COMMAND);
        enable_function(cfg, addr, true);
        Ok(Self {
            cfg,
            registry,
            apic_id,
            addr,
            bars,
            command,
            msix: None,
            msix_enabled: false,
            routed: Vec::new(),
            vectors: Vec::new(),
            kept: false,
        })
    }

    /// The function.
    pub fn addr(&self) -> PciAddress {
        self.addr
    }

    /// Its BARs, as sized by [`Claim::new`].
    pub fn bars(&self) -> &[Option<Bar>; 6] {
        &self.bars
    }

    /// Reads the MSI-X capability and maps the vector table and PBA (checked against the
    /// BARs). Returns the number of table entries, or `None` when the function has no MSI-X
    /// capability.
    pub fn map_msix<M: MmioMapper + ?Sized>(
        &mut self,
        mapper: &M,
    ) -> Result<Option<u16>, MsixError> {
        let cap = match MsixCapability::read(self.cfg, self.addr) {
            Ok(cap) => cap,
            Err(MsixError::NoCapability) => return Ok(None),
            Err(e) => return Err(e),
        };
        let table = MsixTable::map(&cap, &self.bars, mapper)?;
        let size = table.size();
        self.msix = Some((cap, table));
        Ok(Some(size))
    }

    /// Entries in the MSI-X table mapped by [`Claim::map_msix`] (`None` before, or without
    /// MSI-X).
    pub fn msix_entries(&self) -> Option<u16> {
        self.msix.as_ref().map(|(_, table)| table.size())
    }

    /// Allocates a CPU vector for `owner`, aims table `entry` at it (fixed delivery to the
    /// claim's APIC) and unmasks the entry. Needs [`Claim::map_msix`] first.
    pub fn route(&mut self, entry: u16, owner: InterruptOwner) -> Result<u8, MsixError> {
        let size = self.msix_entries().ok_or(MsixError::NoCapability)?;
        // Check the entry before a vector is taken for it.
        if entry >= size {
            return Err(MsixError::EntryOutOfRange {
                entry,
                table_size: size,
            });
        }
        let vector = self.allocate(owner)?;
        let message = MsiMessage::fixed(self.apic_id, vector)?;
        if let Some((_, table)) = &self.msix {
            self.routed.push(entry);
            table.program(entry, message)?;
            table.unmask(entry)?;
        }
        Ok(vector)
    }

    /// Allocates a CPU vector for `owner` that no table entry targets (a software wake-up);
    /// it is released with the claim's other vectors on rollback.
    pub fn allocate(&mut self, owner: InterruptOwner) -> Result<u8, MsixError> {
        let vector = self.registry.allocate(owner)?;
        self.vectors.push(vector);
        Ok(vector)
    }

    /// Enables MSI-X with the function masked: the device no longer uses INTx but sends
    /// nothing until [`Claim::keep`]. Does nothing without [`Claim::map_msix`].
    pub fn enable_msix(&mut self) {
        if let Some((cap, _)) = &self.msix {
            cap.enable_masked(self.cfg);
            self.msix_enabled = true;
        }
    }

    /// The driver is up: unmasks the function (when MSI-X is enabled) and keeps the function
    /// enabled and its vectors allocated for good.
    pub fn keep(mut self) {
        if let (Some((cap, _)), true) = (&self.msix, self.msix_enabled) {
            cap.unmask_function(self.cfg);
        }
        self.kept = true;
    }
}

impl<C: ConfigAccess + ?Sized> Drop for Claim<'_, C> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Some((cap, table)) = &self.msix {
            for &entry in &self.routed {
                // The entry was programmed through this table: it is in range.
                let _ = table.mask(entry);
            }
            if self.msix_enabled {
                cap.disable(self.cfg);
            }
        }
        for &vector in &self.vectors {
            // Releasing a vector we allocated cannot fail.
            let _ = self.registry.release(vector);
        }
        // The whole dword with the status half zero: status bits are write-1-to-clear.
        self.cfg
            .write32(self.addr, COMMAND, u32::from(self.command));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeMapper;
    use crate::msix::FIRST_DEVICE_VECTOR;
    use crate::pci::fake::{FakeFunction, FakePci};
    use crate::pci::regs::CAP_ID_MSIX;

    const TABLE: usize = 0x800;
    const PBA: usize = 0xc00;

    /// A function with `entries` MSI-X entries in BAR0, which is `bar` (host memory), every
    /// entry masked as after reset.
    fn function(bar: &mut [u32], entries: u16) -> FakeFunction {
        for entry in 0..usize::from(entries) {
            bar[(TABLE + 16 * entry + 12) / 4] = 1;
        }
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
        f.set16(COMMAND, 0x0001); // firmware left I/O decoding on
        f.bar_mem64(0, bar.as_mut_ptr() as u64, 0x1000, false);
        let mut msix = Vec::new();
        msix.extend_from_slice(&(entries - 1).to_le_bytes());
        msix.extend_from_slice(&(TABLE as u32).to_le_bytes());
        msix.extend_from_slice(&(PBA as u32).to_le_bytes());
        f.add_capability(CAP_ID_MSIX, &msix);
        f
    }

    /// 4 KiB of host memory aligned to 4 KiB, as a BAR.
    fn bar_memory(backing: &mut [u32]) -> &mut [u32] {
        let start = (0x1000 - (backing.as_ptr() as usize & 0xfff)) / 4 % 0x400;
        &mut backing[start..start + 0x400]
    }

    fn setup(entries: u16) -> (Vec<u32>, FakePci, PciAddress) {
        let mut backing = vec![0u32; 0x800];
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 6, 0);
        pci.insert(addr, function(bar_memory(&mut backing), entries));
        (backing, pci, addr)
    }

    #[test]
    fn kept_claim_keeps_function_vectors_and_unmasks() {
        let (mut backing, pci, addr) = setup(4);
        let registry = VectorRegistry::new();
        let mut claim = Claim::new(&pci, &registry, 3, addr).unwrap();
        assert_eq!(
            pci.read16(addr, COMMAND),
            0x0407,
            "decode, master, INTx off"
        );
        assert_eq!(claim.msix_entries(), None, "not mapped yet");
        assert_eq!(claim.map_msix(&FakeMapper).unwrap(), Some(4));
        assert_eq!(claim.msix_entries(), Some(4));
        let owner = InterruptOwner {
            device: 7,
            queue: 1,
        };
        let v = claim.route(2, owner).unwrap();
        let wake = claim
            .allocate(InterruptOwner {
                device: 7,
                queue: 9,
            })
            .unwrap();
        claim.enable_msix();
        let cap = MsixCapability::read(&pci, addr).unwrap();
        assert!(!cap.is_active(&pci), "enabled with the function masked");
        claim.keep();
        assert!(cap.is_active(&pci));
        assert_eq!(pci.read16(addr, COMMAND), 0x0407);
        assert_eq!(registry.owner(v), Some(owner));
        assert!(registry.owner(wake).is_some());
        let bar = bar_memory(&mut backing);
        assert_eq!(bar[(TABLE + 2 * 16) / 4], 0xfee0_3000, "aimed at APIC 3");
        assert_eq!(bar[(TABLE + 2 * 16 + 8) / 4], u32::from(v));
        assert_eq!(bar[(TABLE + 2 * 16 + 12) / 4], 0, "unmasked");
        assert_eq!(bar[(TABLE + 12) / 4], 1, "other entries stay masked");
    }

    #[test]
    fn dropped_claim_rolls_everything_back() {
        let (mut backing, pci, addr) = setup(2);
        let registry = VectorRegistry::new();
        {
            let mut claim = Claim::new(&pci, &registry, 0, addr).unwrap();
            claim.map_msix(&FakeMapper).unwrap();
            claim.enable_msix();
            for entry in 0..2 {
                claim
                    .route(
                        entry,
                        InterruptOwner {
                            device: 1,
                            queue: entry,
                        },
                    )
                    .unwrap();
            }
            claim
                .allocate(InterruptOwner {
                    device: 1,
                    queue: 5,
                })
                .unwrap();
            assert_eq!(registry.owner(FIRST_DEVICE_VECTOR + 2).unwrap().queue, 5);
            // An entry beyond the table takes no vector.
            assert_eq!(
                claim.route(
                    2,
                    InterruptOwner {
                        device: 1,
                        queue: 2
                    }
                ),
                Err(MsixError::EntryOutOfRange {
                    entry: 2,
                    table_size: 2
                })
            );
            assert_eq!(registry.owner(FIRST_DEVICE_VECTOR + 3), None);
        }
        for v in FIRST_DEVICE_VECTOR..FIRST_DEVICE_VECTOR + 4 {
            assert_eq!(registry.owner(v), None, "vector {v:#x} released");
        }
        let cap = MsixCapability::read(&pci, addr).unwrap();
        assert_eq!(
            pci.read16(addr, cap.offset + 2) & 0xc000,
            0,
            "MSI-X disabled, function mask clear"
        );
        let bar = bar_memory(&mut backing);
        assert_eq!(bar[(TABLE + 12) / 4], 1, "entry 0 masked again");
        assert_eq!(bar[(TABLE + 16 + 12) / 4], 1, "entry 1 masked again");
        assert_eq!(
            pci.read16(addr, COMMAND),
            0x0001,
            "command as firmware left it"
        );
    }

    #[test]
    fn without_msix_the_claim_still_enables_and_rolls_back() {
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 7, 0);
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
        f.bar_mem32(0, 0x1000_0000, 0x1000, false);
        pci.insert(addr, f);
        let registry = VectorRegistry::new();
        let mut claim = Claim::new(&pci, &registry, 0, addr).unwrap();
        assert_eq!(claim.map_msix(&FakeMapper), Ok(None));
        assert_eq!(
            claim.route(
                0,
                InterruptOwner {
                    device: 0,
                    queue: 0
                }
            ),
            Err(MsixError::NoCapability)
        );
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);
        claim.enable_msix();
        assert_eq!(claim.bars()[0].map(|b| b.address), Some(0x1000_0000));
        drop(claim);
        assert_eq!(pci.read16(addr, COMMAND), 0);

        let claim = Claim::new(&pci, &registry, 0, addr).unwrap();
        claim.keep();
        assert_eq!(pci.read16(addr, COMMAND), 0x0406);
    }

    #[test]
    fn a_table_outside_its_bar_is_refused() {
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 8, 0);
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
        f.bar_mem32(0, 0x1000_0000, 0x1000, false);
        let mut msix = Vec::new();
        msix.extend_from_slice(&3u16.to_le_bytes());
        msix.extend_from_slice(&0x1000u32.to_le_bytes()); // just past the BAR
        msix.extend_from_slice(&(PBA as u32).to_le_bytes());
        f.add_capability(CAP_ID_MSIX, &msix);
        pci.insert(addr, f);
        let registry = VectorRegistry::new();
        let mut claim = Claim::new(&pci, &registry, 0, addr).unwrap();
        assert!(matches!(
            claim.map_msix(&FakeMapper),
            Err(MsixError::Pci(PciError::OutsideBar { bar: 0, .. }))
        ));
    }
}
