//! MSI-X vector assignment in the virtio-pci common configuration structure (virtio 1.2
//! §4.1.4.3, §4.1.5.1.2). virtio-drivers' `PciTransport` does not expose these fields, and once
//! MSI-X is enabled a queue without a vector raises no interrupt at all, so we map the common
//! configuration ourselves and write `config_msix_vector` / `queue_msix_vector`.
//!
//! The value written is an MSI-X *table entry index*; the CPU vector lives in that entry's
//! message data (see [`crate::msix`]). The device answers [`NO_VECTOR`] on read-back when it
//! cannot use the entry, which we turn into an error.

use super::regs::{common, vendor_cap, NO_VECTOR};
use super::SetupError;
use crate::hal::{map_region, ConfigAccess, MmioMapper, MmioRegion, PciAddress};
use crate::pci::{bar_structure, capabilities, regs::CAP_ID_VENDOR, Bar};

/// Checks, before virtio-drivers' `PciTransport` trusts them (it indexes and adds without
/// checks, so a bad value would panic), the device-supplied structure locations: the first
/// capability of each type 1..=4 names a valid memory BAR and lies inside it, and the
/// notification address of `queue` lies inside the notification structure, and no vendor
/// capability sits so high that 8-bit offset arithmetic would overflow. (Capability loops,
/// on which virtio-drivers' iterator would spin forever, are caught by our own walk.)
pub(crate) fn check_capabilities<C: ConfigAccess + ?Sized>(
    cfg: &C,
    addr: PciAddress,
    bars: &[Option<Bar>; 6],
    common: &CommonCfgVectors,
    queue: u16,
) -> Result<(), SetupError> {
    let mut seen = [false; vendor_cap::DEVICE_CFG as usize + 1];
    let mut notify = None;
    for cap in capabilities(cfg, addr) {
        let cap = cap?;
        if cap.id != u16::from(CAP_ID_VENDOR) || cfg.read8(addr, cap.offset + vendor_cap::LEN) < 16
        {
            continue;
        }
        let cfg_type = cfg.read8(addr, cap.offset + vendor_cap::CFG_TYPE);
        // virtio-drivers adds field offsets (up to 16) to the 8-bit capability offset.
        if cap.offset + vendor_cap::NOTIFY_OFF_MULTIPLIER > 0xff {
            return Err(SetupError::BadCapability { cfg_type });
        }
        if !(1..=vendor_cap::DEVICE_CFG).contains(&cfg_type) || seen[usize::from(cfg_type)] {
            continue;
        }
        seen[usize::from(cfg_type)] = true;
        let bar = cfg.read8(addr, cap.offset + vendor_cap::BAR);
        let offset = cfg.read32(addr, cap.offset + vendor_cap::OFFSET);
        let length = cfg.read32(addr, cap.offset + vendor_cap::LENGTH);
        if offset.checked_add(length).is_none() {
            return Err(SetupError::BadCapability { cfg_type });
        }
        bar_structure(bars, bar, u64::from(offset), u64::from(length).max(1))
            .map_err(|_| SetupError::BadCapability { cfg_type })?;
        if cfg_type == vendor_cap::NOTIFY_CFG {
            let multiplier = cfg.read32(addr, cap.offset + vendor_cap::NOTIFY_OFF_MULTIPLIER);
            notify = Some((length, multiplier));
        }
    }
    let Some((length, multiplier)) = notify else {
        return Err(SetupError::BadCapability {
            cfg_type: vendor_cap::NOTIFY_CFG,
        });
    };
    let notify_off = common.queue_notify_off(queue)?;
    let at = u64::from(notify_off) * u64::from(multiplier);
    if at + 2 > u64::from(length) {
        return Err(SetupError::NotifyOutOfRange { queue });
    }
    Ok(())
}

/// Programs MSI-X table entries into a virtio device's common configuration.
pub trait VectorConfig {
    /// Writes `config_msix_vector` and returns what the device reads back.
    fn set_config_vector(&mut self, entry: u16) -> Result<u16, SetupError>;
    /// Selects `queue`, writes `queue_msix_vector`, and returns what the device reads back.
    fn set_queue_vector(&mut self, queue: u16, entry: u16) -> Result<u16, SetupError>;
}

/// Assigns `entry` to configuration changes; refusal is an error.
pub fn assign_config<V: VectorConfig + ?Sized>(v: &mut V, entry: u16) -> Result<(), SetupError> {
    let got = v.set_config_vector(entry)?;
    if got != entry || got == NO_VECTOR {
        return Err(SetupError::VectorRefused { queue: None, entry });
    }
    Ok(())
}

/// Assigns `entry` to `queue`; refusal is an error.
pub fn assign_queue<V: VectorConfig + ?Sized>(
    v: &mut V,
    queue: u16,
    entry: u16,
) -> Result<(), SetupError> {
    let got = v.set_queue_vector(queue, entry)?;
    if got != entry || got == NO_VECTOR {
        return Err(SetupError::VectorRefused {
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
    pub fn new(regs: MmioRegion) -> Result<Self, SetupError> {
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
    ) -> Result<Self, SetupError> {
        for cap in capabilities(cfg, addr) {
            let cap = cap?;
            if cap.id != u16::from(CAP_ID_VENDOR)
                || cfg.read8(addr, cap.offset + vendor_cap::CFG_TYPE) != vendor_cap::COMMON_CFG
            {
                continue;
            }
            let bar = cfg.read8(addr, cap.offset + vendor_cap::BAR);
            let offset = u64::from(cfg.read32(addr, cap.offset + vendor_cap::OFFSET));
            let length = u64::from(cfg.read32(addr, cap.offset + vendor_cap::LENGTH));
            if length < common::LEN as u64 {
                return Err(SetupError::MissingCommonConfig);
            }
            let phys = bar_structure(bars, bar, offset, common::LEN as u64)?;
            // SAFETY: the range lies within a memory BAR of the device we are initialising
            // (checked by `bar_structure`) and holds its common configuration structure.
            let regs = unsafe { map_region(mapper, phys, common::LEN) }?;
            return Self::new(regs);
        }
        Err(SetupError::MissingCommonConfig)
    }

    /// `queue_notify_off` of `queue`.
    pub fn queue_notify_off(&self, queue: u16) -> Result<u16, SetupError> {
        self.regs.write16(common::QUEUE_SELECT, queue)?;
        Ok(self.regs.read16(common::QUEUE_NOTIFY_OFF)?)
    }

    /// `num_queues`.
    pub fn num_queues(&self) -> Result<u16, SetupError> {
        Ok(self.regs.read16(common::NUM_QUEUES)?)
    }
}

impl VectorConfig for CommonCfgVectors {
    fn set_config_vector(&mut self, entry: u16) -> Result<u16, SetupError> {
        self.regs.write16(common::CONFIG_MSIX_VECTOR, entry)?;
        Ok(self.regs.read16(common::CONFIG_MSIX_VECTOR)?)
    }

    fn set_queue_vector(&mut self, queue: u16, entry: u16) -> Result<u16, SetupError> {
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
    use crate::virtio::fake_pci;

    fn virtio_cap(cfg_type: u8, bar: u8, offset: u32, length: u32) -> Vec<u8> {
        fake_pci::virtio_cap(cfg_type, bar, offset as usize, length as usize, None)
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
        fn set_config_vector(&mut self, _entry: u16) -> Result<u16, SetupError> {
            Ok(NO_VECTOR)
        }
        fn set_queue_vector(&mut self, _queue: u16, _entry: u16) -> Result<u16, SetupError> {
            Ok(NO_VECTOR)
        }
    }

    #[test]
    fn refusal_is_an_error() {
        assert_eq!(
            assign_config(&mut Refusing, 0),
            Err(SetupError::VectorRefused {
                queue: None,
                entry: 0
            })
        );
        assert_eq!(
            assign_queue(&mut Refusing, 0, 1),
            Err(SetupError::VectorRefused {
                queue: Some(0),
                entry: 1
            })
        );
    }

    #[test]
    fn capability_checks_catch_what_would_panic_virtio_drivers() {
        let mut backing = vec![0u16; 0x2000 / 2];
        let start = (0x1000 - (backing.as_ptr() as usize & 0xfff)) / 2 % 0x800;
        let bar = &mut backing[start..start + 0x800];
        let phys = bar.as_mut_ptr() as u64;
        let build = |notify: Vec<u8>, isr: Vec<u8>| {
            let mut f = FakeFunction::endpoint(0x1af4, 0x1042, 1, 0);
            f.bar_mem64(4, phys, 0x1000, false);
            f.add_capability(CAP_ID_VENDOR, &virtio_cap(1, 4, 0x100, 0x38));
            f.add_capability(CAP_ID_VENDOR, &isr);
            f.add_capability(CAP_ID_VENDOR, &virtio_cap(4, 4, 0x200, 0x40));
            f.add_capability(CAP_ID_VENDOR, &notify);
            let pci = FakePci::new();
            pci.insert(PciAddress::new(0, 4, 0), f);
            pci
        };
        let notify = |length: usize, multiplier: u32| {
            fake_pci::virtio_cap(2, 4, 0x800, length, Some(multiplier))
        };
        let addr = PciAddress::new(0, 4, 0);
        let check = |pci: &FakePci| {
            let bars = probe_bars(pci, addr).unwrap();
            let v = CommonCfgVectors::locate(pci, addr, &bars, &FakeMapper).unwrap();
            check_capabilities(pci, addr, &bars, &v, 0)
        };
        // queue_notify_off of queue 0 = 3 (plain memory holds it for every queue).
        bar[(0x100 + common::QUEUE_NOTIFY_OFF) / 2] = 3;
        assert_eq!(
            check(&build(notify(0x100, 4), virtio_cap(3, 4, 0x300, 4))),
            Ok(())
        );
        assert_eq!(
            check(&build(notify(12, 4), virtio_cap(3, 4, 0x300, 4))),
            Err(SetupError::NotifyOutOfRange { queue: 0 })
        );
        assert_eq!(
            check(&build(notify(0x100, 4), virtio_cap(3, 77, 0x300, 4))),
            Err(SetupError::BadCapability { cfg_type: 3 }),
            "BAR index beyond 5"
        );
        assert_eq!(
            check(&build(
                notify(0x100, 4),
                virtio_cap(3, 4, 0xffff_fff0, 0x20)
            )),
            Err(SetupError::BadCapability { cfg_type: 3 }),
            "offset + length overflows"
        );
        assert_eq!(
            check(&build(notify(0x100, 4), virtio_cap(3, 4, 0xff0, 0x20))),
            Err(SetupError::BadCapability { cfg_type: 3 }),
            "outside the BAR"
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
            SetupError::MissingCommonConfig
        );
    }
}
