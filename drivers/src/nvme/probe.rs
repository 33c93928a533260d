//! PCI glue for NVMe: from an enumerated [`PciFunction`] to running namespaces.
//!
//! Order (as Linux's `nvme_pci_enable` + `nvme_setup_io_queues`): size BARs, enable memory
//! decoding and bus mastering (INTx off), map BAR0, map the MSI-X table and enable MSI-X with
//! the function masked, then [`attach`] (bring-up, Identify, queues; it routes table entries
//! through [`VectorSetup`] as it creates completion queues), then unmask the function. On
//! failure every vector is released, MSI-X is disabled and the controller is left disabled.

use super::controller::{attach, AttachParams, Attached, VectorSetup};
use super::regs::MmioRegisters;
use super::{Clock, NvmeConfig, NvmeError};
use crate::hal::{ConfigAccess, DmaAllocator, MmioMapper};
use crate::info::{reason, DeviceInfo, DeviceName};
use crate::msix::{
    InterruptOwner, MsiMessage, MsixCapability, MsixError, MsixTable, VectorRegistry,
};
use crate::pci::{bar_structure, enable_function, probe_bars, PciFunction};
use alloc::boxed::Box;
use alloc::vec::Vec;
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

/// What the kernel lends the probe: as virtio-blk's context, plus the clock, and a
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

/// Vectors from the registry, routed through the function's MSI-X table.
struct MsixVectors<'a> {
    table: &'a MsixTable,
    registry: &'static VectorRegistry,
    apic_id: u8,
    allocated: Vec<u8>,
}

impl VectorSetup for MsixVectors<'_> {
    fn table_size(&self) -> u16 {
        self.table.size()
    }

    fn route(&mut self, entry: u16, owner: InterruptOwner) -> Result<u8, NvmeError> {
        let vector = self.registry.allocate(owner)?;
        self.allocated.push(vector);
        self.table
            .program(entry, MsiMessage::fixed(self.apic_id, vector)?)?;
        self.table.unmask(entry)?;
        Ok(vector)
    }

    fn software(&mut self, owner: InterruptOwner) -> Result<u8, NvmeError> {
        let vector = self.registry.allocate(owner)?;
        self.allocated.push(vector);
        Ok(vector)
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
    let mut allocated = Vec::new();
    let mut msix = None;
    let result = bring_up::<A, C, M>(
        ctx,
        function,
        name,
        first_device_index,
        config,
        &mut allocated,
        &mut msix,
    );
    result.map_err(|error| {
        for vector in allocated {
            // Releasing a vector we allocated cannot fail.
            let _ = ctx.registry.release(vector);
        }
        if let Some(cap) = msix {
            cap.disable(ctx.cfg);
        }
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
    allocated: &mut Vec<u8>,
    msix: &mut Option<MsixCapability>,
) -> Result<NvmePci, NvmeError> {
    if !is_nvme(function) {
        return Err(NvmeError::NotNvme);
    }
    let addr = function.addr;
    let bars = probe_bars(ctx.cfg, addr)?;
    let bar0 = bars[0].ok_or(crate::pci::PciError::BarNotAssigned(0))?;
    // Map what we can use: the properties page plus doorbells (BARs are at least 16 KiB on
    // real controllers; cap the mapping so a huge BAR does not cost page tables).
    let len = bar0.size.min(1 << 20) as usize;
    let phys = bar_structure(&bars, 0, 0, len as u64)?;
    enable_function(ctx.cfg, addr, true);
    let regs = MmioRegisters::map(ctx.mapper, phys, len)?;

    let cap = match MsixCapability::read(ctx.cfg, addr) {
        Ok(cap) => cap,
        Err(MsixError::NoCapability) => return Err(NvmeError::NoMsix),
        Err(e) => return Err(e.into()),
    };
    let table = MsixTable::map(&cap, &bars, ctx.mapper)?;
    cap.enable_masked(ctx.cfg);
    *msix = Some(cap);
    let mut vectors = MsixVectors {
        table: &table,
        registry: ctx.registry,
        apic_id: ctx.apic_id,
        allocated: Vec::new(),
    };
    let result = attach::<MmioRegisters, A>(
        regs,
        AttachParams {
            name,
            pci: Some(addr),
            first_device_index,
            config,
            clock: ctx.clock,
            registry: ctx.registry,
            vectors: &mut vectors,
        },
    );
    *allocated = core::mem::take(&mut vectors.allocated);
    let attached = result?;
    cap.unmask_function(ctx.cfg);
    Ok(attached)
}
