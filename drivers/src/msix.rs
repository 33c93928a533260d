//! MSI-X: the capability, the vector table and pending-bit array in device memory, and the
//! [`VectorRegistry`] that maps CPU interrupt vectors back to device queues.
//!
//! Spec: PCI Local Bus 3.0 §6.8.2 (MSI-X capability and table structure); Intel SDM Vol. 3
//! §11.11 (message address `0xFEE0_0000 | apic_id << 12`, data = vector, fixed delivery, edge).
//!
//! Bring-up for one function (done by each driver's probe):
//! 1. [`MsixCapability::read`] the capability, [`MsixTable::map`] its table and PBA;
//! 2. [`MsixCapability::enable_masked`] (enable + function mask, so nothing fires half-set);
//! 3. for each queue: [`VectorRegistry::allocate`] a CPU vector, [`MsixTable::program`] an
//!    entry with [`MsiMessage::fixed`] and [`MsixTable::unmask`] it;
//! 4. [`MsixCapability::unmask_function`].
//!
//! At run time the kernel's interrupt stub calls [`VectorRegistry::dispatch`], then sends EOI.

mod registry;
// The table module maps device memory: one of the crate's named `unsafe` places.
#[allow(unsafe_code)]
mod table;

pub use registry::{InterruptOwner, VectorRegistry, FIRST_DEVICE_VECTOR, LAST_DEVICE_VECTOR};
pub use table::{MsiMessage, MsixCapability, MsixTable, ENTRY_SIZE};

use crate::hal::HalError;
use crate::pci::PciError;

/// Errors of MSI-X setup and the vector registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixError {
    /// The function has no MSI-X capability.
    NoCapability,
    /// An entry index beyond the table size.
    EntryOutOfRange {
        /// Requested entry.
        entry: u16,
        /// Number of entries in the table.
        table_size: u16,
    },
    /// The vector is not usable for device interrupts (exceptions live below 32).
    InvalidVector(u8),
    /// Every vector of the registry's range is taken.
    NoFreeVector,
    /// The vector is not allocated to anyone.
    VectorNotAllocated(u8),
    /// Locating the table or PBA in its BAR failed.
    Pci(PciError),
    /// Mapping or accessing the table failed.
    Hal(HalError),
}

impl From<PciError> for MsixError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}

impl From<HalError> for MsixError {
    fn from(e: HalError) -> Self {
        Self::Hal(e)
    }
}

impl core::fmt::Display for MsixError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoCapability => write!(f, "no MSI-X capability"),
            Self::EntryOutOfRange { entry, table_size } => {
                write!(f, "MSI-X entry {entry} beyond table of {table_size}")
            }
            Self::InvalidVector(v) => write!(f, "vector {v} unusable for devices"),
            Self::NoFreeVector => write!(f, "no free interrupt vector"),
            Self::VectorNotAllocated(v) => write!(f, "vector {v} not allocated"),
            Self::Pci(e) => write!(f, "MSI-X: {e}"),
            Self::Hal(e) => write!(f, "MSI-X: {e}"),
        }
    }
}
