//! PCI glue for virtio-blk: from an enumerated [`PciFunction`] to a running [`VirtioBlk`].
//!
//! Order (as Linux's virtio_pci_modern): size BARs, enable memory decoding and bus mastering
//! (INTx off), map the MSI-X table, allocate CPU vectors and program table entries, enable
//! MSI-X with the function masked, build the virtio-drivers transport, initialise the device
//! (which writes `config_msix_vector` / `queue_msix_vector`), then unmask the function.
//! On failure every vector is released and MSI-X is disabled again.
//!
//! A function without an MSI-X capability is refused ([`VirtioBlkError::NoMsix`]) unless
//! [`VirtioBlkConfig::polled_fallback`] is set; then it is brought up in polled mode (no
//! interrupts; [`crate::block::BlockDevice::needs_polling`] is true and the main loop must poll
//! it while it has requests in flight).

use super::common_regs::{check_capabilities, CommonCfgVectors};
use super::device::{VectorAssignment, VirtioBlk};
use super::{VirtioBlkConfig, VirtioBlkError};
use crate::hal::VirtioConfigAccess;
use crate::hal::{ConfigAccess, MmioMapper};
use crate::info::{reason, DeviceInfo, DeviceName};
use crate::msix::{
    InterruptOwner, MsiMessage, MsixCapability, MsixError, MsixTable, VectorRegistry,
};
use crate::pci::{enable_function, probe_bars, PciFunction};
use alloc::boxed::Box;
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::Hal;

/// The virtio PCI vendor ID.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// Transitional virtio-blk device ID.
pub const DEVICE_ID_TRANSITIONAL: u16 = 0x1001;
/// Modern virtio-blk device ID (0x1040 + 2).
pub const DEVICE_ID_MODERN: u16 = 0x1042;

/// The driver type the kernel gets from [`probe`].
pub type VirtioBlkPci<H> = VirtioBlk<H, PciTransport>;

/// Whether `function` is a virtio block device.
pub fn is_virtio_blk(function: &PciFunction) -> bool {
    function.vendor_id == VIRTIO_VENDOR_ID
        && matches!(
            function.device_id,
            DEVICE_ID_TRANSITIONAL | DEVICE_ID_MODERN
        )
}

/// Why a device could not be initialised, with its description for the console.
#[derive(Debug)]
pub struct ProbeFailure {
    /// The error.
    pub error: VirtioBlkError,
    /// `devices` entry in state `InitFailed`.
    pub info: DeviceInfo,
}

/// What the kernel lends the probe.
#[derive(Debug)]
pub struct ProbeContext<'a, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized> {
    /// PCI configuration access.
    pub cfg: &'a C,
    /// MMIO mapper for BARs.
    pub mapper: &'a M,
    /// Where interrupt vectors are allocated.
    pub registry: &'a VectorRegistry,
    /// Local APIC ID of the CPU that takes the interrupts (the boot CPU).
    pub apic_id: u8,
}

/// Brings up the virtio-blk device at `function` (init time only; the failure is boxed
/// because a [`DeviceInfo`] is a few hundred bytes).
///
/// Brings up the virtio-blk device at `function`. `device_index` is the kernel's index for
/// this device (what [`InterruptOwner::device`] will carry); `name` is from
/// [`crate::info::disk_name`]`("vd", n)`.
pub fn probe<H: Hal, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    device_index: u16,
    name: DeviceName,
    config: VirtioBlkConfig,
) -> Result<VirtioBlkPci<H>, Box<ProbeFailure>> {
    let mut allocated: [Option<u8>; 2] = [None; 2];
    let mut msix: Option<MsixCapability> = None;
    let result = bring_up::<H, C, M>(
        ctx,
        function,
        device_index,
        name,
        config,
        &mut allocated,
        &mut msix,
    );
    result.map_err(|error| {
        for vector in allocated.into_iter().flatten() {
            // Releasing a vector we allocated cannot fail.
            let _ = ctx.registry.release(vector);
        }
        if let Some(cap) = msix {
            cap.disable(ctx.cfg);
        }
        log::error!("{name}: virtio-blk at {} failed: {error}", function.addr);
        let info = DeviceInfo::init_failed(
            name,
            "virtio-blk",
            Some(function.addr),
            reason(format_args!("{error}")),
        );
        Box::new(ProbeFailure { error, info })
    })
}

fn bring_up<H: Hal, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    device_index: u16,
    name: DeviceName,
    config: VirtioBlkConfig,
    allocated: &mut [Option<u8>; 2],
    msix: &mut Option<MsixCapability>,
) -> Result<VirtioBlkPci<H>, VirtioBlkError> {
    if !is_virtio_blk(function) {
        return Err(VirtioBlkError::NotBlockDevice);
    }
    let addr = function.addr;
    let bars = probe_bars(ctx.cfg, addr)?;
    enable_function(ctx.cfg, addr, true);

    let vectors = CommonCfgVectors::locate(ctx.cfg, addr, &bars, ctx.mapper)?;
    check_capabilities(ctx.cfg, addr, &bars, &vectors, 0)?;
    let cap = match MsixCapability::read(ctx.cfg, addr) {
        Ok(cap) => Some(cap),
        Err(MsixError::NoCapability) if config.polled_fallback => {
            log::warn!("{name}: no MSI-X capability, falling back to polling");
            None
        }
        Err(MsixError::NoCapability) => return Err(VirtioBlkError::NoMsix),
        Err(e) => return Err(e.into()),
    };
    let assignment = match cap {
        Some(cap) => program_msix(ctx, &cap, &bars, device_index, allocated, msix)?,
        None => VectorAssignment::default(),
    };

    let mut root = PciRoot::new(VirtioConfigAccess(ctx.cfg));
    let df = DeviceFunction {
        bus: addr.bus,
        device: addr.device,
        function: addr.function,
    };
    let transport = PciTransport::new::<H, _>(&mut root, df)?;
    let device = VirtioBlk::new(
        name,
        Some(addr),
        transport,
        Some(vectors),
        assignment,
        config,
    )?;
    if let Some(cap) = cap {
        cap.unmask_function(ctx.cfg);
    }
    Ok(device)
}

/// Maps the MSI-X table, allocates CPU vectors (queue 0, and configuration changes when the
/// table has a second entry), programs and unmasks their entries, and enables MSI-X with the
/// function still masked.
fn program_msix<C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    cap: &MsixCapability,
    bars: &[Option<crate::pci::Bar>; 6],
    device_index: u16,
    allocated: &mut [Option<u8>; 2],
    msix: &mut Option<MsixCapability>,
) -> Result<VectorAssignment, VirtioBlkError> {
    let table = MsixTable::map(cap, bars, ctx.mapper)?;
    let queue_vector = ctx.registry.allocate(InterruptOwner {
        device: device_index,
        queue: 0,
    })?;
    allocated[0] = Some(queue_vector);
    let config_vector = if cap.table_size >= 2 {
        let v = ctx.registry.allocate(InterruptOwner {
            device: device_index,
            queue: InterruptOwner::CONFIG_QUEUE,
        })?;
        allocated[1] = Some(v);
        Some(v)
    } else {
        None
    };
    // Entry 0: configuration changes (when the table has room), next entry: queue 0.
    let (config_entry, queue_entry) = if config_vector.is_some() {
        (Some(0), 1)
    } else {
        (None, 0)
    };
    if let (Some(entry), Some(vector)) = (config_entry, config_vector) {
        table.program(entry, MsiMessage::fixed(ctx.apic_id, vector)?)?;
        table.unmask(entry)?;
    }
    table.program(queue_entry, MsiMessage::fixed(ctx.apic_id, queue_vector)?)?;
    table.unmask(queue_entry)?;
    cap.enable_masked(ctx.cfg);
    *msix = Some(*cap);
    Ok(VectorAssignment {
        config_entry,
        queue_entry: Some(queue_entry),
        cpu_vectors: [Some(queue_vector), config_vector],
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! The whole PCI path against virtio-drivers' real `PciTransport`, with the device's BAR
    //! as plain host memory (registers read back what was written, which is enough for a
    //! device that accepts everything).

    use super::*;
    use crate::block::BlockDevice;
    use crate::hal::fake::{FakeMapper, FakeVirtioHal};
    use crate::hal::PciAddress;
    use crate::info::{disk_name, DeviceState};
    use crate::msix::FIRST_DEVICE_VECTOR;
    use crate::pci::fake::{FakeFunction, FakePci};
    use crate::pci::regs::{CAP_ID_MSIX, CAP_ID_VENDOR};
    use crate::pci::{enumerate, ScanMode};
    use crate::virtio_blk::regs::common;

    const BAR_SIZE: usize = 0x4000;
    const COMMON: usize = 0x0;
    const ISR: usize = 0x1000;
    const DEVICE: usize = 0x2000;
    const NOTIFY: usize = 0x3000;
    const MSIX_TABLE: usize = 0x3800;
    const MSIX_PBA: usize = 0x3c00;

    fn virtio_cap(cfg_type: u8, offset: usize, length: usize, extra: Option<u32>) -> Vec<u8> {
        let cap_len = if extra.is_some() { 20 } else { 16 };
        let mut body = vec![cap_len, cfg_type, 4, 0, 0, 0];
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
        fn bytes(&mut self) -> &mut [u8] {
            &mut self.backing[self.start..self.start + BAR_SIZE]
        }
        fn phys(&mut self) -> u64 {
            self.bytes().as_mut_ptr() as u64
        }
        fn u16_at(&mut self, offset: usize) -> u16 {
            let b = self.bytes();
            u16::from_le_bytes([b[offset], b[offset + 1]])
        }
        fn u32_at(&mut self, offset: usize) -> u32 {
            let b = self.bytes();
            u32::from_le_bytes(b[offset..offset + 4].try_into().unwrap())
        }
    }

    /// How the fake function's MSI-X capability looks.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Msix {
        /// A 4-entry table and PBA inside BAR4.
        Good,
        /// No capability.
        Missing,
        /// The table lies beyond the end of BAR4.
        OutsideBar,
    }

    pub(crate) fn virtio_blk_function(bar: &mut Bar, msix_mode: Msix) -> FakeFunction {
        let b = bar.bytes();
        // Common config: queue_size (max) = 128 for queue 0; device config: 4096 sectors.
        b[COMMON + 0x18..COMMON + 0x1a].copy_from_slice(&128u16.to_le_bytes());
        // device_feature reads VERSION_1 | FLUSH for both selects (plain memory): harmless.
        b[COMMON + 0x04..COMMON + 0x08].copy_from_slice(&((1u32 << 9) | 1).to_le_bytes());
        b[DEVICE..DEVICE + 8].copy_from_slice(&4096u64.to_le_bytes());
        for entry in 0..4 {
            b[MSIX_TABLE + 16 * entry + 12] = 1; // masked after reset
        }
        let mut f = FakeFunction::endpoint(VIRTIO_VENDOR_ID, DEVICE_ID_MODERN, 1, 0);
        f.bar_mem64(4, bar.phys(), BAR_SIZE as u64, true);
        f.add_capability(CAP_ID_VENDOR, &virtio_cap(1, COMMON, 0x38, None));
        f.add_capability(CAP_ID_VENDOR, &virtio_cap(3, ISR, 4, None));
        f.add_capability(CAP_ID_VENDOR, &virtio_cap(4, DEVICE, 0x40, None));
        f.add_capability(CAP_ID_VENDOR, &virtio_cap(2, NOTIFY, 0x100, Some(4)));
        if msix_mode != Msix::Missing {
            let table = if msix_mode == Msix::OutsideBar {
                BAR_SIZE
            } else {
                MSIX_TABLE
            };
            let mut msix = Vec::new();
            msix.extend_from_slice(&3u16.to_le_bytes()); // 4 entries
            msix.extend_from_slice(&(table as u32 | 4).to_le_bytes());
            msix.extend_from_slice(&(MSIX_PBA as u32 | 4).to_le_bytes());
            f.add_capability(CAP_ID_MSIX, &msix);
        }
        f
    }

    #[test]
    fn probe_brings_up_device_with_msix() {
        let mut bar = Bar::new();
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 4, 0);
        pci.insert(addr, virtio_blk_function(&mut bar, Msix::Good));
        pci.insert(
            PciAddress::new(0, 1, 0),
            FakeFunction::endpoint(0x8086, 0x100e, 2, 0),
        );
        let registry = VectorRegistry::new();
        let ctx = ProbeContext {
            cfg: &pci,
            mapper: &FakeMapper,
            registry: &registry,
            apic_id: 2,
        };

        let functions = enumerate(&pci, ScanMode::FollowBridges);
        let disks: Vec<_> = functions.iter().filter(|f| is_virtio_blk(f)).collect();
        assert_eq!(disks.len(), 1);
        let blk = probe::<FakeVirtioHal, _, _>(
            &ctx,
            disks[0],
            3,
            disk_name("vd", 0),
            VirtioBlkConfig::default(),
        )
        .expect("probe");

        // Vectors: queue 0 got the first free CPU vector, config changes the next; MSI-X
        // entry 0 = config, entry 1 = queue 0, both aimed at APIC 2 and unmasked.
        let queue_vector = FIRST_DEVICE_VECTOR;
        assert_eq!(
            registry.owner(queue_vector),
            Some(InterruptOwner {
                device: 3,
                queue: 0
            })
        );
        assert_eq!(
            registry.owner(queue_vector + 1),
            Some(InterruptOwner {
                device: 3,
                queue: InterruptOwner::CONFIG_QUEUE
            })
        );
        assert_eq!(bar.u32_at(MSIX_TABLE + 16), 0xfee0_2000);
        assert_eq!(bar.u32_at(MSIX_TABLE + 16 + 8), u32::from(queue_vector));
        assert_eq!(bar.u32_at(MSIX_TABLE + 16 + 12), 0, "queue entry unmasked");
        assert_eq!(bar.u32_at(MSIX_TABLE + 8), u32::from(queue_vector) + 1);
        assert_eq!(
            bar.u32_at(MSIX_TABLE + 2 * 16 + 12),
            1,
            "unused entries stay masked"
        );
        // The common configuration carries the entry numbers.
        assert_eq!(bar.u16_at(COMMON + common::CONFIG_MSIX_VECTOR), 0);
        assert_eq!(bar.u16_at(COMMON + common::QUEUE_MSIX_VECTOR), 1);
        // MSI-X on and unmasked; memory decoding, bus mastering on; INTx off.
        let cap = MsixCapability::read(&pci, addr).unwrap();
        assert!(cap.is_active(&pci));
        assert_eq!(pci.read16(addr, 0x04) & 0x0406, 0x0406);

        let g = blk.geometry();
        assert_eq!(
            (g.capacity_blocks, g.block_size, g.queue_depth),
            (4096, 512, 128 / 3)
        );
        let info = blk.info();
        assert_eq!(info.state, DeviceState::Online);
        assert_eq!(info.vectors(), &[queue_vector, queue_vector + 1]);
        assert_eq!(info.pci, Some(addr));
        drop(blk);
    }

    #[test]
    fn probe_without_msix_falls_back_to_polling() {
        let mut bar = Bar::new();
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 5, 0);
        pci.insert(addr, virtio_blk_function(&mut bar, Msix::Missing));
        let registry = VectorRegistry::new();
        let ctx = ProbeContext {
            cfg: &pci,
            mapper: &FakeMapper,
            registry: &registry,
            apic_id: 0,
        };
        let function = PciFunction::read(&pci, addr).unwrap();
        let name = disk_name("vd", 0);
        let refused =
            probe::<FakeVirtioHal, _, _>(&ctx, &function, 0, name, VirtioBlkConfig::default())
                .unwrap_err();
        assert_eq!(refused.error, VirtioBlkError::NoMsix, "polling is opt-in");
        let config = VirtioBlkConfig {
            polled_fallback: true,
            ..VirtioBlkConfig::default()
        };
        let blk =
            probe::<FakeVirtioHal, _, _>(&ctx, &function, 0, name, config).expect("polled mode");
        assert!(blk.needs_polling());
        assert!(blk.info().vectors().is_empty());
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);
        assert_eq!(
            bar.u16_at(COMMON + common::QUEUE_MSIX_VECTOR),
            0,
            "no vector written"
        );
    }

    #[test]
    fn probe_failure_releases_vectors_and_reports() {
        let mut bar = Bar::new();
        let pci = FakePci::new();
        let addr = PciAddress::new(0, 5, 0);
        pci.insert(addr, virtio_blk_function(&mut bar, Msix::OutsideBar));
        let registry = VectorRegistry::new();
        let ctx = ProbeContext {
            cfg: &pci,
            mapper: &FakeMapper,
            registry: &registry,
            apic_id: 0,
        };
        let function = PciFunction::read(&pci, addr).unwrap();
        let failure = probe::<FakeVirtioHal, _, _>(
            &ctx,
            &function,
            0,
            disk_name("vd", 1),
            VirtioBlkConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(
            failure.error,
            VirtioBlkError::Msix(crate::msix::MsixError::Pci(_))
        ));
        assert!(failure.info.to_string().contains("vdb"));
        assert!(matches!(failure.info.state, DeviceState::InitFailed(_)));
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);

        // A function that is not a block device is refused before anything is touched.
        let mut bar = Bar::new();
        let pci = FakePci::new();
        pci.insert(addr, virtio_blk_function(&mut bar, Msix::Good));
        let ctx = ProbeContext {
            cfg: &pci,
            mapper: &FakeMapper,
            registry: &registry,
            apic_id: 0,
        };
        let not_blk = PciFunction {
            device_id: 0x1041,
            ..PciFunction::read(&pci, addr).unwrap()
        };
        let failure = probe::<FakeVirtioHal, _, _>(
            &ctx,
            &not_blk,
            0,
            disk_name("vd", 1),
            VirtioBlkConfig::default(),
        )
        .unwrap_err();
        assert_eq!(failure.error, VirtioBlkError::NotBlockDevice);
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);
    }
}
