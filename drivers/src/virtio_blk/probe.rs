//! PCI glue for virtio-blk: from an enumerated [`PciFunction`] to a running [`VirtioBlk`],
//! through the bring-up shared with virtio-net ([`crate::virtio::probe`]): the function is
//! claimed and checked, its MSI-X entries routed, the device initialised, and the function
//! unmasked; on failure the claim gives every vector back and disables MSI-X again.
//!
//! MSI-X entries: 0 = configuration changes and 1 = queue 0 when the table has two entries or
//! more, otherwise 0 = queue 0 and no configuration interrupt.
//!
//! A function without an MSI-X capability is refused ([`VirtioBlkError::NoMsix`]) unless
//! [`VirtioBlkConfig::polled_fallback`] is set; then it is brought up in polled mode (no
//! interrupts; [`crate::block::BlockDevice::needs_polling`] is true and the main loop must poll
//! it while it has requests in flight).

use super::device::{VectorAssignment, VirtioBlk};
use super::{VirtioBlkConfig, VirtioBlkError};
use crate::hal::{ConfigAccess, MmioMapper};
use crate::info::{reason, DeviceInfo, DeviceName};
use crate::msix::InterruptOwner;
use crate::pci::PciFunction;
use crate::virtio::{is_virtio_device, ProbeContext, VirtioPci};
use alloc::boxed::Box;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::Hal;

/// Transitional virtio-blk device ID.
pub const DEVICE_ID_TRANSITIONAL: u16 = 0x1001;
/// Modern virtio-blk device ID (0x1040 + 2).
pub const DEVICE_ID_MODERN: u16 = 0x1042;

/// The driver type the kernel gets from [`probe`].
pub type VirtioBlkPci<H> = VirtioBlk<H, PciTransport>;

/// Whether `function` is a virtio block device.
pub fn is_virtio_blk(function: &PciFunction) -> bool {
    is_virtio_device(function, DEVICE_ID_TRANSITIONAL, DEVICE_ID_MODERN)
}

/// Why a device could not be initialised, with its description for the console.
#[derive(Debug)]
pub struct ProbeFailure {
    /// The error.
    pub error: VirtioBlkError,
    /// `devices` entry in state `InitFailed`.
    pub info: DeviceInfo,
}

/// Brings up the virtio-blk device at `function` (init time only; the failure is boxed
/// because a [`DeviceInfo`] is a few hundred bytes). `device_index` is the kernel's index for
/// this device (what [`InterruptOwner::device`] will carry); `name` is from
/// [`crate::info::disk_name`]`("vd", n)`.
pub fn probe<H: Hal, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    device_index: u16,
    name: DeviceName,
    config: VirtioBlkConfig,
) -> Result<VirtioBlkPci<H>, Box<ProbeFailure>> {
    bring_up::<H, C, M>(ctx, function, device_index, name, config).map_err(|error| {
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
) -> Result<VirtioBlkPci<H>, VirtioBlkError> {
    if !is_virtio_blk(function) {
        return Err(VirtioBlkError::NotBlockDevice);
    }
    let (mut pci, common) = VirtioPci::claim(ctx, function, &[0])?;
    let assignment = match pci.msix_entries() {
        Some(entries) => {
            let (config_entry, queue_entry) = msix_layout(entries);
            let config_route = config_entry.map(|e| (e, InterruptOwner::CONFIG_QUEUE));
            let [queue_vector, config_vector] =
                pci.route(device_index, [Some((queue_entry, 0)), config_route])?;
            VectorAssignment {
                config_entry,
                queue_entry: Some(queue_entry),
                cpu_vectors: [queue_vector, config_vector],
            }
        }
        None if config.polled_fallback => {
            log::warn!("{name}: no MSI-X capability, falling back to polling");
            VectorAssignment::default()
        }
        None => return Err(VirtioBlkError::NoMsix),
    };
    let transport = pci.transport::<H>()?;
    let device = VirtioBlk::new(
        name,
        Some(function.addr),
        transport,
        Some(common),
        assignment,
        config,
    )?;
    pci.keep();
    Ok(device)
}

/// `(configuration entry, queue 0 entry)` for a table of `entries`: configuration changes
/// take entry 0 when there is room for both.
fn msix_layout(entries: u16) -> (Option<u16>, u16) {
    if entries >= 2 {
        (Some(0), 1)
    } else {
        (None, 0)
    }
}

#[cfg(test)]
mod tests {
    //! virtio-blk's own part of the PCI path (its MSI-X layout, its polling policy, its
    //! failure report) against virtio-drivers' real `PciTransport` over `virtio::fake_pci`;
    //! the shared claim and checks are tested in `virtio::probe`.

    use super::*;
    use crate::block::BlockDevice;
    use crate::hal::fake::{FakeMapper, FakeVirtioHal};
    use crate::hal::PciAddress;
    use crate::info::{disk_name, DeviceState};
    use crate::msix::{MsixCapability, MsixError, VectorRegistry, FIRST_DEVICE_VECTOR};
    use crate::pci::fake::{FakeFunction, FakePci};
    use crate::pci::{enumerate, ScanMode};
    use crate::virtio::fake_pci::{ctx, fake_pci, virtio_function, Bar, Msix, COMMON, MSIX_TABLE};
    use crate::virtio::regs::common;
    use crate::virtio::SetupError;

    const ADDR: PciAddress = PciAddress::new(0, 4, 0);

    /// A configuration space with a virtio-blk function at [`ADDR`] whose BAR is `bar`.
    fn disk(bar: &mut Bar, msix: Msix) -> (FakePci, PciFunction) {
        let pci = fake_pci(ADDR, virtio_function(bar, DEVICE_ID_MODERN, msix));
        let function = PciFunction::read(&pci, ADDR).unwrap();
        (pci, function)
    }

    /// Probes `function` as `vdb`, device index 3.
    fn probe_vdb(
        ctx: &ProbeContext<'_, FakePci, FakeMapper>,
        function: &PciFunction,
        config: VirtioBlkConfig,
    ) -> Result<VirtioBlkPci<FakeVirtioHal>, Box<ProbeFailure>> {
        probe::<FakeVirtioHal, _, _>(ctx, function, 3, disk_name("vd", 1), config)
    }

    fn config_vector(bar: &mut Bar) -> u16 {
        bar.u16_at(COMMON + common::CONFIG_MSIX_VECTOR)
    }

    fn queue_vector(bar: &mut Bar) -> u16 {
        bar.u16_at(COMMON + common::QUEUE_MSIX_VECTOR)
    }

    #[test]
    fn probe_brings_up_device_with_msix() {
        let mut bar = Bar::new();
        let (pci, _) = disk(&mut bar, Msix::Entries(4));
        pci.insert(
            PciAddress::new(0, 1, 0),
            FakeFunction::endpoint(0x8086, 0x100e, 2, 0),
        );
        let registry = VectorRegistry::new();
        let functions = enumerate(&pci, ScanMode::FollowBridges);
        let disks: Vec<_> = functions.iter().filter(|f| is_virtio_blk(f)).collect();
        assert_eq!(disks.len(), 1);
        let blk = probe_vdb(
            &ctx(&pci, &registry, 2),
            disks[0],
            VirtioBlkConfig::default(),
        )
        .expect("probe");

        // Vectors: queue 0 got the first free CPU vector, config changes the next; MSI-X
        // entry 0 = config, entry 1 = queue 0, both aimed at APIC 2 and unmasked.
        let v = FIRST_DEVICE_VECTOR;
        for (vector, queue) in [(v, 0), (v + 1, InterruptOwner::CONFIG_QUEUE)] {
            assert_eq!(
                registry.owner(vector),
                Some(InterruptOwner { device: 3, queue })
            );
        }
        assert_eq!(bar.u32_at(MSIX_TABLE + 16), 0xfee0_2000);
        assert_eq!(bar.u32_at(MSIX_TABLE + 16 + 8), u32::from(v));
        assert_eq!(bar.u32_at(MSIX_TABLE + 16 + 12), 0, "queue entry unmasked");
        assert_eq!(bar.u32_at(MSIX_TABLE + 8), u32::from(v) + 1);
        assert_eq!(bar.u32_at(MSIX_TABLE + 12), 0, "config entry unmasked");
        assert_eq!(
            bar.u32_at(MSIX_TABLE + 2 * 16 + 12),
            1,
            "unused entries stay masked"
        );
        // The common configuration carries the entry numbers.
        assert_eq!((config_vector(&mut bar), queue_vector(&mut bar)), (0, 1));
        // MSI-X on and unmasked; memory decoding, bus mastering on; INTx off.
        let cap = MsixCapability::read(&pci, ADDR).unwrap();
        assert!(cap.is_active(&pci));
        assert_eq!(pci.read16(ADDR, 0x04) & 0x0406, 0x0406);

        let g = blk.geometry();
        assert_eq!(
            (g.capacity_blocks, g.block_size, g.queue_depth),
            (4096, 512, 128 / 3)
        );
        let info = blk.info();
        assert_eq!(info.state, DeviceState::Online);
        assert_eq!(info.vectors(), &[v, v + 1]);
        assert_eq!(info.pci, Some(ADDR));
    }

    #[test]
    fn a_one_entry_table_serves_queue_0_only() {
        assert_eq!(msix_layout(1), (None, 0));
        assert_eq!(msix_layout(2), (Some(0), 1));
        let mut bar = Bar::new();
        let (pci, function) = disk(&mut bar, Msix::Entries(1));
        let registry = VectorRegistry::new();
        let blk = probe_vdb(
            &ctx(&pci, &registry, 0),
            &function,
            VirtioBlkConfig::default(),
        )
        .expect("probe");
        assert_eq!(blk.info().vectors(), &[FIRST_DEVICE_VECTOR]);
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR + 1), None);
        assert_eq!(queue_vector(&mut bar), 0);
        assert_eq!(
            config_vector(&mut bar),
            0,
            "no configuration vector written"
        );
        assert!(!blk.needs_polling());
    }

    #[test]
    fn probe_without_msix_falls_back_to_polling() {
        let mut bar = Bar::new();
        let (pci, function) = disk(&mut bar, Msix::Missing);
        let registry = VectorRegistry::new();
        let ctx = ctx(&pci, &registry, 0);
        let refused = probe_vdb(&ctx, &function, VirtioBlkConfig::default()).unwrap_err();
        assert_eq!(refused.error, VirtioBlkError::NoMsix, "polling is opt-in");
        assert_eq!(pci.read16(ADDR, 0x04), 0, "refused function left disabled");
        let config = VirtioBlkConfig {
            polled_fallback: true,
            ..VirtioBlkConfig::default()
        };
        let blk = probe_vdb(&ctx, &function, config).expect("polled mode");
        assert!(blk.needs_polling());
        assert!(blk.info().vectors().is_empty());
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);
        assert_eq!(queue_vector(&mut bar), 0, "no vector written");
    }

    #[test]
    fn probe_failure_releases_vectors_and_reports() {
        let mut bar = Bar::new();
        let (pci, function) = disk(&mut bar, Msix::OutsideBar);
        let registry = VectorRegistry::new();
        let failure = probe_vdb(
            &ctx(&pci, &registry, 0),
            &function,
            VirtioBlkConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(
            failure.error,
            VirtioBlkError::Setup(SetupError::Msix(MsixError::Pci(_)))
        ));
        assert!(failure.info.to_string().contains("vdb"));
        assert!(matches!(failure.info.state, DeviceState::InitFailed(_)));
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);

        // The device initialisation fails after both vectors were routed: both come back and
        // MSI-X is off again.
        let mut bar = Bar::new();
        let (pci, mut function) = disk(&mut bar, Msix::Entries(4));
        let ctx = ctx(&pci, &registry, 0);
        bar.bytes()[COMMON + 0x18..COMMON + 0x1a].copy_from_slice(&4u16.to_le_bytes());
        let failure = probe_vdb(&ctx, &function, VirtioBlkConfig::default()).unwrap_err();
        assert_eq!(failure.error, VirtioBlkError::QueueTooSmall(4));
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR + 1), None);
        let cap = MsixCapability::read(&pci, ADDR).unwrap();
        assert!(!cap.is_active(&pci));

        // A function that is not a block device is refused before anything is touched.
        function.device_id = 0x1041;
        let failure = probe_vdb(&ctx, &function, VirtioBlkConfig::default()).unwrap_err();
        assert_eq!(failure.error, VirtioBlkError::NotBlockDevice);
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);
    }
}
