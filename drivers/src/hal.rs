//! Hardware abstraction layer: everything the drivers need from the kernel.
//!
//! The drivers never touch the CPU or page tables themselves. The kernel implements a few small
//! traits and hands them in at initialisation:
//!
//! - [`PortIo`]: 32-bit port I/O, used by [`PortConfigAccess`] for PCI configuration mechanism #1
//!   (ports `0xCF8`/`0xCFC`, PCI Local Bus 3.0 §3.2.2.3.2).
//! - [`ConfigAccess`]: PCI configuration space access. The crate provides [`PortConfigAccess`]
//!   (legacy ports, 256 bytes per function), [`EcamConfigAccess`] (PCIe ECAM from the ACPI MCFG
//!   table, 4 KiB per function) and [`ConfigMechanism`] (either).
//! - [`MmioMapper`]: maps device memory (BARs, ECAM) uncached; BARs may be above 4 GiB. The
//!   result is wrapped in an [`MmioRegion`], a bounds-checked handle that is unsafe to create and
//!   safe to use.
//! - [`DmaAllocator`]: physically contiguous, zeroed, page-aligned memory. [`Dma`] is the owned
//!   value that knows its physical address and frees itself; [`Dma::leak`] turns it into a
//!   [`DmaSlice`] for pools that live as long as the appliance.
//! - `virtio_drivers::Hal` (foreign trait): the virtio-blk driver is generic over it. The kernel
//!   implements it for the same zero-sized type as [`DmaAllocator`]; `share` must return the
//!   physical address without copying or allocating (identity-mapped memory), `unshare` is a no-op.
//!
//! Host tests use the fakes in `hal::fake` (std memory, physical address == virtual address).

mod config;
mod dma;
#[cfg(any(test, feature = "fuzz"))]
pub mod fake;
mod mmio;

pub use config::{
    ConfigAccess, ConfigMechanism, EcamConfigAccess, PciAddress, PortConfigAccess, PortIo,
    VirtioConfigAccess,
};
pub use dma::{Dma, DmaAllocator, DmaSlice, VirtioDma};
pub use mmio::{map_region, MmioMapper, MmioRegion};

/// The size of a page of DMA memory, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// Errors of the hardware abstraction layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalError {
    /// The kernel could not supply the requested DMA memory.
    DmaExhausted {
        /// Number of pages requested.
        pages: usize,
    },
    /// The kernel could not map the requested device memory.
    MapFailed {
        /// Physical address of the range.
        phys: u64,
        /// Length of the range in bytes.
        len: usize,
    },
    /// A register access fell outside its MMIO region.
    OutOfBounds {
        /// Offset of the access within the region.
        offset: usize,
        /// Width of the access in bytes.
        width: usize,
        /// Length of the region in bytes.
        len: usize,
    },
    /// A register access was not naturally aligned.
    Misaligned {
        /// Offset of the access within the region.
        offset: usize,
    },
    /// A region or allocation of zero bytes was requested.
    ZeroLength,
}

impl core::fmt::Display for HalError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::DmaExhausted { pages } => write!(f, "out of DMA memory ({pages} pages)"),
            Self::MapFailed { phys, len } => write!(f, "cannot map MMIO {phys:#x}+{len:#x}"),
            Self::OutOfBounds { offset, width, len } => {
                write!(
                    f,
                    "MMIO access {offset:#x}/{width} outside region of {len:#x}"
                )
            }
            Self::Misaligned { offset } => write!(f, "misaligned MMIO access at {offset:#x}"),
            Self::ZeroLength => write!(f, "zero-length region"),
        }
    }
}
