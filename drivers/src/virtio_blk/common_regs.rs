//! MSI-X vector assignment in the virtio-pci common configuration structure (virtio 1.2
//! §4.1.4.3, §4.1.5.1.2). virtio-drivers' `PciTransport` does not expose these fields, and once
//! MSI-X is enabled a queue without a vector raises no interrupt at all, so we map the common
//! configuration ourselves and write `config_msix_vector` / `queue_msix_vector`.
//!
//! The value written is an MSI-X *table entry index*; the CPU vector lives in that entry's
//! message data (see [`crate::msix`]). The device answers [`NO_VECTOR`] on read-back when it
//! cannot use the entry, which we turn into an error.

use super::regs::{common, NO_VECTOR};
use super::VirtioBlkError;
use crate::hal::{map_region, ConfigAccess, MmioMapper, MmioRegion, PciAddress};
use crate::pci::{bar_structure, capabilities, regs::CAP_ID_VENDOR, Bar};

/// `VIRTIO_PCI_CAP_COMMON_CFG`: the `cfg_type` of the common configuration capability.
const CAP_COMMON_CFG: u8 = 1;
/// Offset of `cfg_type` in `struct virtio_pci_cap`.
const CAP_CFG_TYPE: u16 = 3;
/// Offset of `bar` in `struct virtio_pci_cap`.
const CAP_BAR: u16 = 4;
/// Offset of `offset` in `struct virtio_pci_cap`.
const CAP_OFFSET: u16 = 8;
/// Offset of `length` in `struct virtio_pci_cap`.
const CAP_LENGTH: u16 = 12;

/// Programs MSI-X table entries into a virtio device's common configuration.
pub trait VectorConfig {
    /// Writes `config_msix_vector` and returns what the device reads back.
    fn set_config_vector(&mut self, entry: u16) -> Result<u16, VirtioBlkError>;
    /// Selects `queue`, writes `queue_msix_vector`, and returns what the device reads back.
    fn set_queue_vector(&mut self, queue: u16, entry: u16) -> Result<u16, VirtioBlkError>;
}

/// Assigns `entry` to configuration changes; refusal is an error.
pub fn assign_config<V: VectorConfig + ?Sized>(
    v: &mut V,
    entry: u16,
) -> Result<(), VirtioBlkError> {
    let got = v.set_config_vector(entry)?;
    if got != entry || got == NO_VECTOR {
        return Err(VirtioBlkError::VectorRefused { queue: None, entry });
    }
    Ok(())
}

/// Assigns `entry` to `queue`; refusal is an error.
pub fn assign_queue<V: VectorConfig + ?Sized>(
    v: &mut V,
    queue: u16,
    entry: u16,
) -> Result<(), VirtioBlkError> {
    let got = v.set_queue_vector(queue, entry)?;
    if got != entry || got == NO_VECTOR {
        return Err(VirtioBlkError::VectorRefused {
            queue: Some(queue),
            entry,
        });
    }
    Ok(())
}

/// The vector fields of a mapped `virtio_pci_common_cfg`.
#[derive(Debug)]
pub struct CommonCfgVectors {
    regs: MmioRegion,
}

impl CommonCfgVectors {
    /// Wraps a mapped common configuration structure (at least [`common::LEN`] bytes).
    pub fn new(regs: MmioRegion) -> Result<Self, VirtioBlkError> {
        regs.read16(common::QUEUE_MSIX_VECTOR)?;
        Ok(Self { regs })
    }

    /// Finds the common configuration capability of `addr`, checks it against its BAR and maps
    /// it.
    pub fn locate<C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
        cfg: &C,
        addr: PciAddress,
        bars: &[Option<Bar>; 6],
        mapper: &M,
    ) -> Result<Self, VirtioBlkError> {
        for cap in capabilities(cfg, addr) {
            let cap = cap?;
            if cap.id != u16::from(CAP_ID_VENDOR)
                || cfg.read8(addr, cap.offset + CAP_CFG_TYPE) != CAP_COMMON_CFG
            {
                continue;
            }
            let bar = cfg.read8(addr, cap.offset + CAP_BAR);
            let offset = u64::from(cfg.read32(addr, cap.offset + CAP_OFFSET));
            let length = u64::from(cfg.read32(addr, cap.offset + CAP_LENGTH));
            if length < common::LEN as u64 {
                return Err(VirtioBlkError::MissingCommonConfig);
            }
            let phys = bar_structure(bars, bar, offset, common::LEN as u64)?;
            // SAFETY: the range lies within a memory BAR of the device we are initialising
            // (checked by `bar_structure`) and holds its common configuration structure.
            let regs = unsafe { map_region(mapper, phys, common::LEN) }?;
            return Self::new(regs);
        }
        Err(VirtioBlkError::MissingCommonConfig)
    }

    /// `num_queues`.
    pub fn num_queues(&self) -> Result<u16, VirtioBlkError> {
        Ok(self.regs.read16(common::NUM_QUEUES)?)
    }
}

impl VectorConfig for CommonCfgVectors {
    fn set_config_vector(&mut self, entry: u16) -> Result<u16, VirtioBlkError> {
        self.regs.write16(common::CONFIG_MSIX_VECTOR, entry)?;
        Ok(self.regs.read16(common::CONFIG_MSIX_VECTOR)?)
    }

    fn set_queue_vector(&mut self, queue: u16, entry: u16) -> Result<u16, VirtioBlkError> {
        // `queue_select` is shared with virtio-drivers' transport, which rewrites it before
        // every access of its own; both run on the same CPU, never interleaved.
        self.regs.write16(common::QUEUE_SELECT, queue)?;
        self.regs.write16(common::QUEUE_MSIX_VECTOR, entry)?;
        Ok(self.regs.read16(common::QUEUE_MSIX_VECTOR)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeMapper;
    use crate::pci::fake::{FakeFunction, FakePci};
    use crate::pci::probe_bars;

    fn virtio_cap(cfg_type: u8, bar: u8, offset: u32, length: u32) -> Vec<u8> {
        let mut body = vec![16, cfg_type, bar, 0, 0, 0];
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&length.to_le_bytes());
        body
    }

    #[test]
    fn locates_and_programs_common_cfg() {
        let mut backing = vec![0u16; 0x2000 / 2];
        let start = (0x1000 - (backing.as_ptr() as usize & 0xfff)) / 2 % 0x800;
        let bar = &mut backing[start..start + 0x800];
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
        f.bar_mem64(4, bar.as_mut_ptr() as u64, 0x1000, false);
        f.add_capability(CAP_ID_VENDOR, &virtio_cap(3, 4, 0x400, 4)); // ISR first
        f.add_capability(CAP_ID_VENDOR, &virtio_cap(1, 4, 0x100, 0x38));
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 4, 0);
        pci.insert(addr, f);
        let bars = probe_bars(&pci, addr).unwrap();
        let mut v = CommonCfgVectors::locate(&pci, addr, &bars, &FakeMapper).unwrap();
        // Plain memory "accepts" every write: reads back what was written.
        assert_eq!(v.set_queue_vector(0, 1).unwrap(), 1);
        assert_eq!(bar[(0x100 + common::QUEUE_SELECT) / 2], 0);
        assert_eq!(bar[(0x100 + common::QUEUE_MSIX_VECTOR) / 2], 1);
        assign_config(&mut v, 0).unwrap();
        assert_eq!(bar[(0x100 + common::CONFIG_MSIX_VECTOR) / 2], 0);
    }

    struct Refusing;
    impl VectorConfig for Refusing {
        fn set_config_vector(&mut self, _entry: u16) -> Result<u16, VirtioBlkError> {
            Ok(NO_VECTOR)
        }
        fn set_queue_vector(&mut self, _queue: u16, _entry: u16) -> Result<u16, VirtioBlkError> {
            Ok(NO_VECTOR)
        }
    }

    #[test]
    fn refusal_is_an_error() {
        assert_eq!(
            assign_config(&mut Refusing, 0),
            Err(VirtioBlkError::VectorRefused {
                queue: None,
                entry: 0
            })
        );
        assert_eq!(
            assign_queue(&mut Refusing, 0, 1),
            Err(VirtioBlkError::VectorRefused {
                queue: Some(0),
                entry: 1
            })
        );
    }

    #[test]
    fn missing_or_short_capability() {
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 4, 0);
        let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
        f.bar_mem32(0, 0x1000_0000, 0x1000, false);
        f.add_capability(CAP_ID_VENDOR, &virtio_cap(1, 0, 0, 0x10));
        pci.insert(addr, f);
        let bars = probe_bars(&pci, addr).unwrap();
        assert_eq!(
            CommonCfgVectors::locate(&pci, addr, &bars, &FakeMapper).unwrap_err(),
            VirtioBlkError::MissingCommonConfig
        );
    }
}
