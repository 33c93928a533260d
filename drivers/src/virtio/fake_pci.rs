//! A virtio-pci function for host tests: a fake configuration space (`pci::fake`) whose
//! vendor capabilities point into one BAR of plain host memory. Registers read back what was
//! written, which is enough for a device that accepts everything, so virtio-drivers' real
//! `PciTransport` and our probes run against it unchanged.

use super::regs::common;
use super::{ProbeContext, VIRTIO_VENDOR_ID};
use crate::hal::fake::FakeMapper;
use crate::hal::PciAddress;
use crate::msix::VectorRegistry;
use crate::pci::fake::{FakeFunction, FakePci};
use crate::pci::regs::{CAP_ID_MSIX, CAP_ID_VENDOR};

/// Size of BAR4, which holds every structure.
pub(crate) const BAR_SIZE: usize = 0x4000;
/// The common configuration.
pub(crate) const COMMON: usize = 0x0;
/// The ISR status byte.
pub(crate) const ISR: usize = 0x1000;
/// The device configuration.
pub(crate) const DEVICE: usize = 0x2000;
/// The notification structure (multiplier 4).
pub(crate) const NOTIFY: usize = 0x3000;
/// The MSI-X table.
pub(crate) const MSIX_TABLE: usize = 0x3800;
/// The MSI-X pending-bit array.
pub(crate) const MSIX_PBA: usize = 0x3c00;

/// Modern virtio-net device ID; any other ID gets virtio-blk's features and configuration.
const NET: u16 = 0x1041;

/// The body of a `struct virtio_pci_cap` (from `cap_len` on) for `bar`; `extra` is the notify
/// capability's `notify_off_multiplier`.
pub(crate) fn virtio_cap(
    cfg_type: u8,
    bar: u8,
    offset: usize,
    length: usize,
    extra: Option<u32>,
) -> Vec<u8> {
    let cap_len = if extra.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, bar, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(extra) = extra {
        body.extend_from_slice(&extra.to_le_bytes());
    }
    body
}

/// A BAR-sized, BAR-aligned piece of host memory.
pub(crate) struct Bar {
    backing: Vec<u8>,
    start: usize,
}

impl Bar {
    pub(crate) fn new() -> Self {
        let backing = vec![0u8; 2 * BAR_SIZE];
        let start = (BAR_SIZE - (backing.as_ptr() as usize % BAR_SIZE)) % BAR_SIZE;
        Self { backing, start }
    }
    pub(crate) fn bytes(&mut self) -> &mut [u8] {
        &mut self.backing[self.start..self.start + BAR_SIZE]
    }
    fn phys(&mut self) -> u64 {
        self.bytes().as_mut_ptr() as u64
    }
    pub(crate) fn u16_at(&mut self, offset: usize) -> u16 {
        let b = self.bytes();
        u16::from_le_bytes([b[offset], b[offset + 1]])
    }
    pub(crate) fn u32_at(&mut self, offset: usize) -> u32 {
        let b = self.bytes();
        u32::from_le_bytes(b[offset..offset + 4].try_into().unwrap())
    }
    /// `queue_notify_off` (the same for every queue: `queue_select` is plain memory too).
    pub(crate) fn set_notify_off(&mut self, off: u16) {
        let at = COMMON + common::QUEUE_NOTIFY_OFF;
        self.bytes()[at..at + 2].copy_from_slice(&off.to_le_bytes());
    }
}

/// How the fake function's MSI-X capability looks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Msix {
    /// A table of this many entries (1..=4) and its PBA inside BAR4.
    Entries(u16),
    /// No capability.
    Missing,
    /// The 4-entry table lies beyond the end of BAR4.
    OutsideBar,
}

/// A virtio function with device ID `device_id` whose structures live in `bar` (BAR4):
/// queues of 128 descriptors; virtio-net (0x1041) offers `VERSION_1 | MAC | STATUS` with MAC
/// 52:54:00:12:34:56 and the link up, anything else virtio-blk's `VERSION_1 | FLUSH` and
/// 4096 sectors.
pub(crate) fn virtio_function(bar: &mut Bar, device_id: u16, msix_mode: Msix) -> FakeFunction {
    let b = bar.bytes();
    // Common config: queue_size (max) = 128 for every queue.
    b[COMMON + 0x18..COMMON + 0x1a].copy_from_slice(&128u16.to_le_bytes());
    // device_feature reads the same word for both selects (plain memory): bit 0 of the high
    // word is VERSION_1; the other bits are harmless where the driver does not want them.
    let (features, config): (u32, &[u8]) = if device_id == NET {
        (
            (1 << 16) | (1 << 5) | 1,
            &[0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0],
        )
    } else {
        ((1 << 9) | 1, &4096u64.to_le_bytes())
    };
    b[COMMON + 0x04..COMMON + 0x08].copy_from_slice(&features.to_le_bytes());
    b[DEVICE..DEVICE + config.len()].copy_from_slice(config);
    for entry in 0..4 {
        b[MSIX_TABLE + 16 * entry + 12] = 1; // masked after reset
    }
    let mut f = FakeFunction::endpoint(VIRTIO_VENDOR_ID, device_id, 1, 0);
    f.bar_mem64(4, bar.phys(), BAR_SIZE as u64, true);
    f.add_capability(CAP_ID_VENDOR, &virtio_cap(1, 4, COMMON, 0x38, None));
    f.add_capability(CAP_ID_VENDOR, &virtio_cap(3, 4, ISR, 4, None));
    f.add_capability(CAP_ID_VENDOR, &virtio_cap(4, 4, DEVICE, 0x40, None));
    f.add_capability(CAP_ID_VENDOR, &virtio_cap(2, 4, NOTIFY, 0x100, Some(4)));
    let (table, entries) = match msix_mode {
        Msix::Missing => return f,
        Msix::OutsideBar => (BAR_SIZE, 4),
        Msix::Entries(n) => (MSIX_TABLE, n),
    };
    let mut msix = Vec::new();
    msix.extend_from_slice(&(entries - 1).to_le_bytes());
    msix.extend_from_slice(&(table as u32 | 4).to_le_bytes());
    msix.extend_from_slice(&(MSIX_PBA as u32 | 4).to_le_bytes());
    f.add_capability(CAP_ID_MSIX, &msix);
    f
}

/// A configuration space holding `function` at `addr`.
pub(crate) fn fake_pci(addr: PciAddress, function: FakeFunction) -> FakePci {
    let pci = FakePci::new();
    pci.insert(addr, function);
    pci
}

/// A probe context over `pci` with interrupts for APIC `apic_id`.
pub(crate) fn ctx<'a>(
    pci: &'a FakePci,
    registry: &'a VectorRegistry,
    apic_id: u8,
) -> ProbeContext<'a, FakePci, FakeMapper> {
    ProbeContext {
        cfg: pci,
        mapper: &FakeMapper,
        registry,
        apic_id,
    }
}
