//! virtio-blk over virtio-pci, built directly on virtio-drivers' `PciTransport` and
//! `VirtQueue` (not its `VirtIOBlk`, whose 16-entry queue and blocking flush do not fit an
//! interrupt-driven appliance).
//!
//! - [`probe()`]: PCI glue — BARs, bus mastering, MSI-X table, vector allocation, common
//!   configuration, transport — and then [`VirtioBlk::new`].
//! - `device`: initialisation and the [`crate::block::BlockDevice`] implementation.
//! - `queue`: the virtqueue, per-request DMA memory and in-flight table (`unsafe` for the
//!   virtqueue buffer contract; `common_regs` has the other, for mapping).
//! - `common_regs`: `config_msix_vector` / `queue_msix_vector` in the common configuration.
//! - `regs`: wire formats.
//!
//! Spec: virtio 1.2 §4.1 (virtio over PCI), §5.2 (block device), §2.7 (split virtqueues).
//!
//! Limits (documented, not bugs): one request queue (no `VIRTIO_BLK_F_MQ` yet); one data
//! segment per request, so the largest transfer is one pool buffer (bounded by `size_max`);
//! no `VIRTIO_F_INDIRECT_DESC` (virtio-drivers allocates per request for it), so a queue of
//! N descriptors carries N/3 requests; `RING_EVENT_IDX` is off by default because
//! virtio-drivers 0.13's `should_notify` compares indices without wrap-around arithmetic.

#[allow(unsafe_code)]
pub(crate) mod common_regs;
mod device;
pub mod probe;
#[allow(unsafe_code)]
mod queue;
pub mod regs;

#[cfg(any(test, feature = "fuzz"))]
// The fuzz targets use part of the fake.
#[cfg_attr(not(test), allow(dead_code))]
#[allow(unsafe_code)]
pub(crate) mod fake_queue;
#[cfg(test)]
mod tests;

pub use common_regs::{CommonCfgVectors, VectorConfig};
pub use device::{VectorAssignment, VirtioBlk};
pub use probe::{is_virtio_blk, probe, ProbeContext, ProbeFailure, VirtioBlkPci};
pub use queue::{choose_queue_size, MAX_QUEUE_SIZE, MIN_QUEUE_SIZE};

use crate::hal::HalError;
use crate::msix::MsixError;
use crate::pci::PciError;

/// Driver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    /// Largest virtqueue to set up (at most [`MAX_QUEUE_SIZE`]).
    pub max_queue_size: u16,
    /// Most requests in flight (at most queue size / 3).
    pub max_depth: u16,
    /// Largest transfer in bytes: the size of the caller's pool buffers.
    pub max_transfer_bytes: u32,
    /// Negotiate `VIRTIO_F_RING_EVENT_IDX` (see the module documentation).
    pub event_idx: bool,
    /// Bring up functions without MSI-X in polled mode. Off by default: only turn it on when
    /// the main loop polls devices whose `BlockDevice::needs_polling` is true (as
    /// `service::Servicer` does); otherwise such a device would never complete anything.
    pub polled_fallback: bool,
}

impl Default for VirtioBlkConfig {
    fn default() -> Self {
        Self {
            max_queue_size: MAX_QUEUE_SIZE,
            max_depth: MAX_QUEUE_SIZE / 3,
            max_transfer_bytes: 128 * 1024,
            event_idx: false,
            polled_fallback: false,
        }
    }
}

/// Errors of virtio-blk initialisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtioBlkError {
    /// The PCI function is not a virtio block device.
    NotBlockDevice,
    /// The device did not accept our features (FEATURES_OK did not stick).
    FeaturesRejected,
    /// The device does not offer `VIRTIO_F_VERSION_1`.
    LegacyDevice,
    /// The function has no MSI-X capability and polled mode is off
    /// ([`VirtioBlkConfig::polled_fallback`]).
    NoMsix,
    /// The device's queue 0 is missing or smaller than [`MIN_QUEUE_SIZE`].
    QueueTooSmall(u32),
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
    /// The device reports an unusable logical block size.
    BadBlockSize(u32),
    /// virtio-drivers' PCI transport could not be set up.
    Transport(virtio_drivers::transport::pci::VirtioPciError),
    /// virtio-drivers reported an error.
    Virtio(virtio_drivers::Error),
    /// PCI configuration failed.
    Pci(PciError),
    /// MSI-X setup failed.
    Msix(MsixError),
    /// DMA or MMIO failed.
    Hal(HalError),
}

impl From<PciError> for VirtioBlkError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}
impl From<MsixError> for VirtioBlkError {
    fn from(e: MsixError) -> Self {
        Self::Msix(e)
    }
}
impl From<HalError> for VirtioBlkError {
    fn from(e: HalError) -> Self {
        Self::Hal(e)
    }
}
impl From<virtio_drivers::Error> for VirtioBlkError {
    fn from(e: virtio_drivers::Error) -> Self {
        Self::Virtio(e)
    }
}
impl From<virtio_drivers::transport::pci::VirtioPciError> for VirtioBlkError {
    fn from(e: virtio_drivers::transport::pci::VirtioPciError) -> Self {
        Self::Transport(e)
    }
}

impl core::fmt::Display for VirtioBlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotBlockDevice => write!(f, "not a virtio block device"),
            Self::FeaturesRejected => write!(f, "device rejected feature set"),
            Self::LegacyDevice => write!(f, "legacy virtio device (no VERSION_1)"),
            Self::NoMsix => write!(f, "no MSI-X capability (polled mode disabled)"),
            Self::QueueTooSmall(n) => write!(f, "queue 0 too small ({n} descriptors)"),
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
            Self::BadBlockSize(b) => write!(f, "unusable block size {b}"),
            Self::Transport(e) => write!(f, "virtio-pci transport: {e}"),
            Self::Virtio(e) => write!(f, "virtio: {e}"),
            Self::Pci(e) => write!(f, "{e}"),
            Self::Msix(e) => write!(f, "{e}"),
            Self::Hal(e) => write!(f, "{e}"),
        }
    }
}
