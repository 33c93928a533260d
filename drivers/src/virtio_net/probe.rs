//! PCI glue for virtio-net: from an enumerated [`PciFunction`] to a running [`VirtioNet`],
//! in the same order as virtio-blk's probe (`crate::virtio_blk::probe`): BARs, bus mastering,
//! MSI-X entries for receive, transmit and configuration changes, common configuration,
//! transport, device initialisation, then the function is unmasked. On failure every vector
//! is released and MSI-X is disabled again.
//!
//! Without an MSI-X capability the device comes up without interrupts
//! ([`VirtioNet::has_interrupts`] is false) and its owner polls it from the main loop.

use super::device::{NetVectors, VirtioNet};
use super::{VirtioNetConfig, VirtioNetError, QUEUE_RECEIVE, QUEUE_TRANSMIT};
use crate::hal::{ConfigAccess, MmioMapper, VirtioConfigAccess};
use crate::msix::{InterruptOwner, MsiMessage, MsixCapability, MsixError, MsixTable};
use crate::pci::{enable_function, probe_bars, PciFunction};
use crate::virtio_blk::common_regs::{check_capabilities, CommonCfgVectors};
use crate::virtio_blk::probe::{ProbeContext, VIRTIO_VENDOR_ID};
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::Hal;

/// Transitional virtio-net device ID.
pub const DEVICE_ID_TRANSITIONAL: u16 = 0x1000;
/// Modern virtio-net device ID (0x1040 + 1).
pub const DEVICE_ID_MODERN: u16 = 0x1041;

/// The driver type the kernel gets from [`probe`].
pub type VirtioNetPci<H> = VirtioNet<H, PciTransport>;

/// Whether `function` is a virtio network device.
pub fn is_virtio_net(function: &PciFunction) -> bool {
    function.vendor_id == VIRTIO_VENDOR_ID
        && matches!(
            function.device_id,
            DEVICE_ID_TRANSITIONAL | DEVICE_ID_MODERN
        )
}

/// Brings up the virtio-net device at `function` (init time only). `device_index` is what the
/// interrupts' [`InterruptOwner::device`] carries: queue 0 = receive, 1 = transmit,
/// [`InterruptOwner::CONFIG_QUEUE`] = configuration changes. `mac_seed` makes a MAC when the
/// device offers none.
pub fn probe<H: Hal, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    device_index: u16,
    config: VirtioNetConfig,
    mac_seed: u64,
) -> Result<VirtioNetPci<H>, VirtioNetError> {
    let mut allocated: [Option<u8>; 3] = [None; 3];
    let mut msix: Option<MsixCapability> = None;
    let result = bring_up::<H, C, M>(
        ctx,
        function,
        device_index,
        config,
        mac_seed,
        &mut allocated,
        &mut msix,
    );
    result.map_err(|error| {
        for vector in allocated.into_iter().flatten() {
            let _ = ctx.registry.release(vector);
        }
        if let Some(cap) = msix {
            cap.disable(ctx.cfg);
        }
        log::error!("virtio-net at {} failed: {error}", function.addr);
        error
    })
}

fn bring_up<H: Hal, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    device_index: u16,
    config: VirtioNetConfig,
    mac_seed: u64,
    allocated: &mut [Option<u8>; 3],
    msix: &mut Option<MsixCapability>,
) -> Result<VirtioNetPci<H>, VirtioNetError> {
    if !is_virtio_net(function) {
        return Err(VirtioNetError::NotNetworkDevice);
    }
    let addr = function.addr;
    let bars = probe_bars(ctx.cfg, addr)?;
    enable_function(ctx.cfg, addr, true);
    let vectors = CommonCfgVectors::locate(ctx.cfg, addr, &bars, ctx.mapper)?;
    check_capabilities(ctx.cfg, addr, &bars, &vectors, QUEUE_RECEIVE)?;
    check_capabilities(ctx.cfg, addr, &bars, &vectors, QUEUE_TRANSMIT)?;
    let cap = match MsixCapability::read(ctx.cfg, addr) {
        Ok(cap) => Some(cap),
        Err(MsixError::NoCapability) => {
            log::warn!("virtio-net at {addr}: no MSI-X capability; polled");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let assignment = match cap {
        Some(cap) => program_msix(ctx, &cap, &bars, device_index, allocated, msix)?,
        None => NetVectors::default(),
    };
    let mut root = PciRoot::new(VirtioConfigAccess(ctx.cfg));
    let df = DeviceFunction {
        bus: addr.bus,
        device: addr.device,
        function: addr.function,
    };
    let transport = PciTransport::new::<H, _>(&mut root, df)?;
    let device = VirtioNet::new(
        Some(addr),
        transport,
        Some(vectors),
        assignment,
        config,
        mac_seed,
    )?;
    if let Some(cap) = cap {
        cap.unmask_function(ctx.cfg);
    }
    Ok(device)
}

/// Entries: 0 = receive, 1 = transmit, 2 = configuration changes; with a smaller table the
/// configuration interrupt is left out, then transmit shares the receive entry.
fn program_msix<C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    cap: &MsixCapability,
    bars: &[Option<crate::pci::Bar>; 6],
    device_index: u16,
    allocated: &mut [Option<u8>; 3],
    msix: &mut Option<MsixCapability>,
) -> Result<NetVectors, VirtioNetError> {
    let table = MsixTable::map(cap, bars, ctx.mapper)?;
    let size = cap.table_size;
    let owners = [
        Some(QUEUE_RECEIVE),
        (size >= 2).then_some(QUEUE_TRANSMIT),
        (size >= 3).then_some(InterruptOwner::CONFIG_QUEUE),
    ];
    let mut entries: [Option<u16>; 3] = [None; 3];
    for (entry, queue) in owners.iter().enumerate() {
        let Some(queue) = *queue else { continue };
        let vector = ctx.registry.allocate(InterruptOwner {
            device: device_index,
            queue,
        })?;
        allocated[entry] = Some(vector);
        table.program(entry as u16, MsiMessage::fixed(ctx.apic_id, vector)?)?;
        table.unmask(entry as u16)?;
        entries[entry] = Some(entry as u16);
    }
    cap.enable_masked(ctx.cfg);
    *msix = Some(*cap);
    Ok(NetVectors {
        rx_entry: entries[0],
        tx_entry: entries[1].or(entries[0]),
        config_entry: entries[2],
        cpu_vectors: *allocated,
    })
}
