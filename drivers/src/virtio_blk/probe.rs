//! PCI glue for virtio-blk: from an enumerated [`PciFunction`] to a running [`VirtioBlk`].
//!
//! Order (as Linux's virtio_pci_modern): size BARs, enable memory decoding and bus mastering
//! (INTx off), map the MSI-X table, allocate CPU vectors and program table entries, enable
//! MSI-X with the function masked, build the virtio-drivers transport, initialise the device
//! (which writes `config_msix_vector` / `queue_msix_vector`), then unmask the function.
//! On failure every vector is released and MSI-X is disabled again.

use super::device::{VectorAssignment, VirtioBlk};
use super::vectors::CommonCfgVectors;
use super::{VirtioBlkConfig, VirtioBlkError};
use crate::hal::{ConfigAccess, MmioMapper, PciAddress};
use crate::info::{reason, DeviceInfo, DeviceName};
use crate::msix::{InterruptOwner, MsiMessage, MsixCapability, MsixTable, VectorRegistry};
use crate::pci::{enable_function, probe_bars, PciFunction};
use alloc::boxed::Box;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
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

/// virtio-drivers' configuration access, over ours.
struct ConfigAdapter<'a, C: ConfigAccess + ?Sized>(&'a C);

// The trait's `unsafe_clone` is an `unsafe fn` by signature only: a shared reference clones
// safely, and every access goes through our (safe) `ConfigAccess`.
#[allow(unsafe_code)]
impl<C: ConfigAccess + ?Sized> ConfigurationAccess for ConfigAdapter<'_, C> {
    fn read_word(&self, df: DeviceFunction, register_offset: u8) -> u32 {
        self.0.read32(
            PciAddress::new(df.bus, df.device, df.function),
            u16::from(register_offset),
        )
    }

    fn write_word(&mut self, df: DeviceFunction, register_offset: u8, data: u32) {
        self.0.write32(
            PciAddress::new(df.bus, df.device, df.function),
            u16::from(register_offset),
            data,
        )
    }

    unsafe fn unsafe_clone(&self) -> Self {
        Self(self.0)
    }
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

    let cap = MsixCapability::read(ctx.cfg, addr)?;
    let table = MsixTable::map(&cap, &bars, ctx.mapper)?;
    let vectors = CommonCfgVectors::locate(ctx.cfg, addr, &bars, ctx.mapper)?;

    // Entry 0: configuration changes (when the table has room), next entry: queue 0.
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
    *msix = Some(cap);

    let mut root = PciRoot::new(ConfigAdapter(ctx.cfg));
    let df = DeviceFunction {
        bus: addr.bus,
        device: addr.device,
        function: addr.function,
    };
    let transport = PciTransport::new::<H, _>(&mut root, df)?;
    let assignment = VectorAssignment {
        config_entry,
        queue_entry: Some(queue_entry),
        cpu_vectors: [Some(queue_vector), config_vector],
    };
    let device = VirtioBlk::new(
        name,
        Some(addr),
        transport,
        Some(vectors),
        assignment,
        config,
    )?;
    cap.unmask_function(ctx.cfg);
    Ok(device)
}
