//! What virtio-blk ([`crate::virtio_blk`]) and virtio-net ([`crate::virtio_net`]) share: the
//! virtio-pci bring-up around virtio-drivers' `PciTransport`, the MSI-X vector fields of the
//! common configuration, and the split virtqueue of any supported size.
//!
//! - [`probe`]: [`ProbeContext`], and [`VirtioPci`]: a function claimed
//!   ([`crate::pci::Claim`]), its structures checked, its common configuration and MSI-X
//!   table mapped, its interrupt sources routed, then the transport; rolled back on drop
//!   unless the driver keeps it.
//! - [`common_regs`]: `config_msix_vector` / `queue_msix_vector` ([`VectorConfig`],
//!   [`CommonCfgVectors`]) and the capability checks that keep virtio-drivers from trusting
//!   bad locations (`unsafe` for mapping the structure).
//! - `queue`: [`AnyQueue`], one `VirtQueue` of 8 to 256 descriptors behind one type, and
//!   [`choose_queue_size`] (`unsafe` for forwarding the virtqueue buffer contract).
//! - [`regs`]: the virtio-pci capability and common configuration layouts.
//!
//! Each driver keeps what is its own: which functions it takes, how its MSI-X table entries
//! are laid out, feature negotiation, its queues' buffers and its errors.
//!
//! Spec: virtio 1.2 §4.1 (virtio over PCI), §2.7 (split virtqueues).

#[allow(unsafe_code)]
pub mod common_regs;
pub mod probe;
#[allow(unsafe_code)]
mod queue;
pub mod regs;

#[cfg(test)]
pub(crate) mod fake_pci;

pub use common_regs::{assign_config, assign_queue, CommonCfgVectors, VectorConfig};
pub use probe::{ProbeContext, VirtioPci};
pub use queue::{choose_queue_size, AnyQueue, MAX_QUEUE_SIZE, MIN_QUEUE_SIZE};

use crate::hal::HalError;
use crate::msix::MsixError;
use crate::pci::{PciError, PciFunction};

/// The virtio PCI vendor ID.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;

/// Whether `function` is a virtio device with the transitional (`0x1000 + n`) or modern
/// (`0x1040 + virtio device ID`) PCI device ID given.
pub fn is_virtio_device(function: &PciFunction, transitional: u16, modern: u16) -> bool {
    function.vendor_id == VIRTIO_VENDOR_ID
        && (function.device_id == transitional || function.device_id == modern)
}

/// Errors of the virtio-pci bring-up both drivers share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// The device refused an MSI-X table entry (read back `NO_VECTOR`); `queue` is `None` for
    /// the configuration vector.
    VectorRefused {
        /// The queue, or `None` for configuration changes.
        queue: Option<u16>,
        /// The table entry we asked for.
        entry: u16,
    },
    /// No `VIRTIO_PCI_CAP_COMMON_CFG` capability (or a short one).
    MissingCommonConfig,
    /// A virtio structure capability (`cfg_type`) points outside its BAR, at a bad BAR, or is
    /// missing (notification).
    BadCapability {
        /// `cfg_type` of the capability.
        cfg_type: u8,
    },
    /// The queue's notification address lies outside the notification structure.
    NotifyOutOfRange {
        /// The queue.
        queue: u16,
    },
    /// virtio-drivers' PCI transport could not be set up.
    Transport(virtio_drivers::transport::pci::VirtioPciError),
    /// PCI configuration failed.
    Pci(PciError),
    /// MSI-X setup failed.
    Msix(MsixError),
    /// MMIO failed.
    Hal(HalError),
}

impl From<PciError> for SetupError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}
impl From<MsixError> for SetupError {
    fn from(e: MsixError) -> Self {
        Self::Msix(e)
    }
}
impl From<HalError> for SetupError {
    fn from(e: HalError) -> Self {
        Self::Hal(e)
    }
}
impl From<virtio_drivers::transport::pci::VirtioPciError> for SetupError {
    fn from(e: virtio_drivers::transport::pci::VirtioPciError) -> Self {
        Self::Transport(e)
    }
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::VectorRefused { queue: None, entry } => {
                write!(f, "config interrupt refused MSI-X entry {entry}")
            }
            Self::VectorRefused {
                queue: Some(q),
                entry,
            } => write!(f, "queue {q} refused MSI-X entry {entry}"),
            Self::MissingCommonConfig => write!(f, "no virtio common configuration capability"),
            Self::BadCapability { cfg_type } => {
                write!(f, "bad virtio capability (type {cfg_type})")
            }
            Self::NotifyOutOfRange { queue } => {
                write!(f, "queue {queue} notify address out of range")
            }
            Self::Transport(e) => write!(f, "virtio-pci transport: {e}"),
            Self::Pci(e) => write!(f, "{e}"),
            Self::Msix(e) => write!(f, "{e}"),
            Self::Hal(e) => write!(f, "{e}"),
        }
    }
}
