//! NVMe over PCIe: our own interrupt-driven driver. Every namespace of a controller becomes a
//! [`crate::block::BlockDevice`] (`nvme0n1`, `nvme0n2`, …) that plugs in next to virtio-blk.
//!
//! # Modules
//! - `regs`: register layout (CAP, CC, CSTS, AQA, doorbells) and [`RegisterAccess`];
//!   [`MmioRegisters`] maps BAR0 (`unsafe`, one of two places).
//! - `queue`: submission/completion rings, PRP list pages and the admin data page in DMA
//!   memory (`unsafe`, the other place), with tail/head wrap and phase-tag tracking.
//! - `init`: the bring-up state machine ([`BringUp`]: Disable → WaitNotReady → Configure →
//!   Enable → WaitReady → Ready, a deadline each from `CAP.TO`).
//! - `cmd`: submission/completion entries, admin and NVM command builders, Identify parsing.
//! - `prp`: PRP1/PRP2 and chained PRP lists for physically contiguous buffers.
//! - `status`: completion status (SCT/SC) → [`Status`], named as in the spec.
//! - `controller`: the shared controller state: admin commands at init, I/O queue pairs with
//!   their in-flight tables (keyed by command ID), MDTS splitting, completion routing to
//!   namespaces, timeouts and failure.
//! - `namespace`: [`NvmeNamespace`], the `BlockDevice` per namespace, and [`NvmeController`],
//!   the kernel's handle on the controller (console info, timeout checks, shutdown).
//! - `probe`: PCI glue (BAR0, bus mastering, MSI-X table, vectors) around
//!   [`controller::attach`].
//!
//! Spec: NVM Express Base 2.0 (§3 controller registers and initialisation, §4 data
//! structures, §5 admin commands) and NVM Command Set 1.0 (I/O commands, Identify Namespace).
//!
//! # Integration (for the kernel)
//! ```ignore
//! static CLOCK: fn() -> u64 = timer::now_ns;        // monotonic nanoseconds
//! let ctx = nvme::ProbeContext {
//!     cfg: &cfg, mapper: &hal, registry: &REGISTRY /* &'static */, apic_id, clock: &CLOCK,
//! };
//! for (n, function) in functions.iter().filter(|f| nvme::is_nvme(f)).enumerate() {
//!     let first_index = storage.disks.len() as u16;
//!     match nvme::probe::<KernelHal, _, _>(&ctx, function, n as u32, first_index,
//!                                          NvmeConfig::default()) {
//!         Ok(attached) => {
//!             // attached.namespaces[i] has device index first_index + i: push them in order.
//!             // attached.failed: namespaces that could not be used (DeviceInfo::InitFailed).
//!             // attached.controller: keep it; call check_timeouts() from a periodic timer
//!             //   (every 100 ms or so) and show controller_info() in `devices`.
//!         }
//!         Err(failure) => storage.failed.push(failure.info),
//!     }
//! }
//! ```
//! Interrupts: the admin queue has MSI-X entry 0 (owner: first namespace, queue
//! [`crate::msix::InterruptOwner::CONFIG_QUEUE`]); I/O queue pair *q* (qid *q*) has entry *q*,
//! owned by the first namespace using it. With fewer queue pairs than namespaces, namespaces
//! share pairs; each namespace without a pair vector of its own gets a software "wake" vector
//! (queue [`WAKE_QUEUE`], no MSI-X entry) that the driver marks pending with
//! [`crate::msix::VectorRegistry::repend`] when it drains a completion for that namespace from
//! a shared completion queue. A poll that woke another namespace reports `more`, so the main
//! loop runs again and picks that vector up. The main loop itself stays as for virtio-blk:
//! `interrupt(queue)` then `poll_completions(budget)` for each owner whose vector fired.

pub mod cmd;
pub mod controller;
pub mod init;
mod namespace;
pub mod probe;
mod prp;
#[allow(unsafe_code)]
mod queue;
#[allow(unsafe_code)]
pub mod regs;
pub mod status;

#[cfg(any(test, feature = "fuzz"))]
// The fuzz targets use part of the fake.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

pub use cmd::{IdentifyController, IdentifyNamespace};
pub use controller::{attach, AttachParams, Attached, ControllerInfo, VectorSetup, WriteCache};
pub use init::{BringUp, State as BringUpState};
pub use namespace::{NvmeController, NvmeNamespace};
pub use probe::{is_nvme, probe, NvmePci, ProbeContext, ProbeFailure};
pub use prp::{build as build_prps, list_pages_needed, ListPages, PrpError, Prps};
pub use regs::{MmioRegisters, RegisterAccess};
pub use status::{Status, StatusField};

use crate::hal::HalError;
use crate::msix::MsixError;
use crate::pci::PciError;

/// The clock the driver reads deadlines from: monotonic nanoseconds since any origin.
pub type Clock = &'static (dyn Fn() -> u64 + Sync);

/// Queue number of the software wake-up vectors of namespaces that share a completion queue
/// (see the module documentation).
pub const WAKE_QUEUE: u16 = 0xfffe;

/// Driver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvmeConfig {
    /// Entries of the admin queues (within `CAP.MQES`).
    pub admin_queue_entries: u16,
    /// Entries of each I/O queue (within `CAP.MQES`, at most 4096).
    pub io_queue_entries: u16,
    /// Most I/O queue pairs to create (at most one per namespace is useful).
    pub max_io_queues: u16,
    /// Most requests in flight per namespace.
    pub max_depth: u16,
    /// Largest request in bytes: the size of the caller's pool buffers. Requests larger
    /// than the controller's MDTS are split into several commands.
    pub max_transfer_bytes: u32,
    /// Most namespaces to attach.
    pub max_namespaces: u32,
    /// Deadline of each admin command at init.
    pub admin_timeout_ns: u64,
    /// Deadline of each I/O command.
    pub io_timeout_ns: u64,
    /// How often the I/O path looks for expired commands and `CSTS.CFS`.
    pub check_interval_ns: u64,
    /// Turn the volatile write cache on or off at init (`None`: leave it as it is).
    pub write_cache: Option<bool>,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        Self {
            admin_queue_entries: 32,
            io_queue_entries: 256,
            max_io_queues: 8,
            max_depth: 64,
            max_transfer_bytes: 128 * 1024,
            max_namespaces: 64,
            admin_timeout_ns: 5_000_000_000,
            io_timeout_ns: 30_000_000_000,
            check_interval_ns: 100_000_000,
            write_cache: None,
        }
    }
}

/// Errors of NVMe initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmeError {
    /// The PCI function is not an NVMe controller (class 01h, subclass 08h, interface 02h).
    NotNvme,
    /// The function has no MSI-X capability (the driver is interrupt driven).
    NoMsix,
    /// `CSTS.CFS` (Controller Fatal Status) was set.
    ControllerFatal {
        /// The bring-up state or command during which it was seen.
        during: &'static str,
    },
    /// `CSTS` reads all ones: the function does not answer.
    NotResponding {
        /// The bring-up state or command during which it was seen.
        during: &'static str,
    },
    /// `CSTS.RDY` did not change within `CAP.TO`.
    Timeout {
        /// The bring-up state.
        during: &'static str,
        /// How long we waited.
        waited_ms: u64,
    },
    /// An admin command did not complete within its deadline.
    CommandTimeout {
        /// The command.
        what: &'static str,
    },
    /// An admin command failed.
    Command {
        /// The command.
        what: &'static str,
        /// Its status.
        status: Status,
    },
    /// The controller does not support the NVM command set (`CAP.CSS`).
    NoNvmCommandSet,
    /// The controller does not support 4 KiB memory pages (`CAP.MPSMIN`/`MPSMAX`).
    UnsupportedPageSize {
        /// Smallest page size.
        min: u32,
        /// Largest page size.
        max: u32,
    },
    /// The controller does not support 64-byte submission / 16-byte completion entries.
    UnsupportedEntrySize,
    /// A queue size beyond `CAP.MQES`.
    QueueTooLarge {
        /// Entries asked for.
        entries: u32,
        /// Most the controller allows.
        max: u32,
    },
    /// The controller's MDTS is smaller than a logical block.
    TransferTooSmall,
    /// No usable namespace.
    NoNamespaces,
    /// The controller granted no I/O queues.
    NoIoQueues,
    /// The doorbells we need lie outside BAR0.
    DoorbellsOutsideBar,
    /// PCI configuration failed.
    Pci(PciError),
    /// MSI-X setup failed.
    Msix(MsixError),
    /// DMA or MMIO failed.
    Hal(HalError),
}

impl From<PciError> for NvmeError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}
impl From<MsixError> for NvmeError {
    fn from(e: MsixError) -> Self {
        Self::Msix(e)
    }
}
impl From<HalError> for NvmeError {
    fn from(e: HalError) -> Self {
        Self::Hal(e)
    }
}

impl core::fmt::Display for NvmeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotNvme => write!(f, "not an NVMe controller"),
            Self::NoMsix => write!(f, "no MSI-X capability"),
            Self::ControllerFatal { during } => {
                write!(f, "controller fatal status (CSTS.CFS) during {during}")
            }
            Self::NotResponding { during } => {
                write!(
                    f,
                    "controller not responding (CSTS all ones) during {during}"
                )
            }
            Self::Timeout { during, waited_ms } => {
                write!(
                    f,
                    "controller timed out in {during} after {waited_ms} ms (CAP.TO)"
                )
            }
            Self::CommandTimeout { what } => write!(f, "{what} timed out"),
            Self::Command { what, status } => write!(f, "{what} failed: {status}"),
            Self::NoNvmCommandSet => write!(f, "NVM command set not supported"),
            Self::UnsupportedPageSize { min, max } => {
                write!(
                    f,
                    "4 KiB pages not supported (controller: {min}..{max} bytes)"
                )
            }
            Self::UnsupportedEntrySize => write!(f, "64/16-byte queue entries not supported"),
            Self::QueueTooLarge { entries, max } => {
                write!(f, "queue of {entries} entries exceeds CAP.MQES ({max})")
            }
            Self::TransferTooSmall => write!(f, "MDTS smaller than a logical block"),
            Self::NoNamespaces => write!(f, "no usable namespace"),
            Self::NoIoQueues => write!(f, "controller granted no I/O queues"),
            Self::DoorbellsOutsideBar => write!(f, "doorbells outside BAR0"),
            Self::Pci(e) => write!(f, "{e}"),
            Self::Msix(e) => write!(f, "{e}"),
            Self::Hal(e) => write!(f, "{e}"),
        }
    }
}
