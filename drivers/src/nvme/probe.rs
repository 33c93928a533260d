//! PCI glue for NVMe: from an enumerated [`PciFunction`] to running namespaces.
//!
//! Order (as Linux's `nvme_pci_enable` + `nvme_setup_io_queues`): size BARs, enable memory
//! decoding and bus mastering (INTx off), map BAR0, map the MSI-X table and enable MSI-X with
//! the function masked, then [`attach`] (bring-up, Identify, queues; it routes table entries
//! through [`VectorSetup`] as it creates completion queues), then unmask the function. All of
//! it happens under a [`Claim`]: on failure every vector is released, MSI-X is disabled, the
//! function stops decoding and mastering, and the controller is left disabled.

use super::controller::{attach, AttachParams, Attached, VectorSetup};
use super::regs::MmioRegisters;
use super::{Clock, NvmeConfig, NvmeError};
use crate::hal::{ConfigAccess, DmaAllocator, MmioMapper};
use crate::info::{reason, DeviceInfo, DeviceName};
use crate::msix::{InterruptOwner, VectorRegistry};
use crate::pci::{bar_structure, Claim, PciError, PciFunction};
use alloc::boxed::Box;
use core::fmt::Write;

/// Mass storage class.
pub const CLASS_STORAGE: u8 = 0x01;
/// Non-volatile memory controller subclass.
pub const SUBCLASS_NVM: u8 = 0x08;
/// NVM Express programming interface.
pub const PROG_IF_NVME: u8 = 0x02;

/// The namespaces' register type on hardware.
pub type NvmePci = Attached<MmioRegisters>;

/// Whether `function` is an NVMe controller (class 01h, subclass 08h, interface 02h).
pub fn is_nvme(function: &PciFunction) -> bool {
    function.class == CLASS_STORAGE
        && function.subclass == SUBCLASS_NVM
        && function.prog_if == PROG_IF_NVME
}

/// What the kernel lends the probe: as [`crate::virtio::ProbeContext`], plus the clock, and a
/// `'static` registry (the driver posts wake-ups to it at run time).
pub struct ProbeContext<'a, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized> {
    /// PCI configuration access.
    pub cfg: &'a C,
    /// MMIO mapper for BAR0 and the MSI-X table.
    pub mapper: &'a M,
    /// Where interrupt vectors are allocated and wake-ups posted.
    pub registry: &'static VectorRegistry,
    /// Local APIC ID of the CPU that takes the interrupts (the boot CPU).
    pub apic_id: u8,
    /// Monotonic nanoseconds: bring-up deadlines and I/O timeouts.
    pub clock: Clock,
}

/// Why a controller could not be initialised, with its description for the console.
#[derive(Debug)]
pub struct ProbeFailure {
    /// The error.
    pub error: NvmeError,
    /// `devices` entry in state `InitFailed` (named after the controller, e.g. `nvme0`).
    pub info: DeviceInfo,
}

/// Vectors from the registry, routed through the function's MSI-X table by its claim (which
/// gives them back if the probe fails).
impl<C: ConfigAccess + ?Sized> VectorSetup for Claim<'_, C> {
    fn table_size(&self) -> u16 {
        self.msix_entries().unwrap_or(0)
    }

    fn route(&mut self, entry: u16, owner: InterruptOwner) -> Result<u8, NvmeError> {
        Ok(Claim::route(self, entry, owner)?)
    }

    fn software(&mut self, owner: InterruptOwner) -> Result<u8, NvmeError> {
        Ok(self.allocate(owner)?)
    }
}

/// Brings up the NVMe controller at `function` (init time only).
///
/// `controller_number` names it (`nvme<N>`, namespaces `nvme<N>n<NSID>`);
/// `first_device_index` is the kernel's device index for the first usable namespace, the
/// others follow in order (push `namespaces` into the device table in this order).
pub fn probe<A: DmaAllocator, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    controller_number: u32,
    first_device_index: u16,
    config: NvmeConfig,
) -> Result<NvmePci, Box<ProbeFailure>> {
    let mut name = DeviceName::new();
    let _ = write!(name, "nvme{controller_number}");
    bring_up::<A, C, M>(ctx, function, name, first_device_index, config).map_err(|error| {
        log::error!(
            "{name}: NVMe controller at {} failed: {error}",
            function.addr
        );
        let info = DeviceInfo::init_failed(
            name,
            "nvme",
            Some(function.addr),
            reason(format_args!("{error}")),
        );
        Box::new(ProbeFailure { error, info })
    })
}

fn bring_up<A: DmaAllocator, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    name: DeviceName,
    first_device_index: u16,
    config: NvmeConfig,
) -> Result<NvmePci, NvmeError> {
    if !is_nvme(function) {
        return Err(NvmeError::NotNvme);
    }
    let addr = function.addr;
    let mut claim = Claim::new(ctx.cfg, ctx.registry, ctx.apic_id, addr)?;
    let bars = claim.bars();
    let bar0 = bars[0].ok_or(PciError::BarNotAssigned(0))?;
    // Map what we can use: the properties page plus doorbells (BARs are at least 16 KiB on
    // real controllers; cap the mapping so a huge BAR does not cost page tables).
    let len = bar0.size.min(1 << 20) as usize;
    let phys = bar_structure(bars, 0, 0, len as u64)?;
    let regs = MmioRegisters::map(ctx.mapper, phys, len)?;
    if claim.map_msix(ctx.mapper)?.is_none() {
        return Err(NvmeError::NoMsix);
    }
    claim.enable_msix();
    let attached = attach::<MmioRegisters, A>(
        regs,
        AttachParams {
            name,
            pci: Some(addr),
            first_device_index,
            config,
            clock: ctx.clock,
            registry: ctx.registry,
            vectors: &mut claim,
        },
    )?;
    claim.keep();
    Ok(attached)
}
