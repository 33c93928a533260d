//! virtio-blk over virtio-pci, built directly on virtio-drivers' `PciTransport` and
//! `VirtQueue` (not its `VirtIOBlk`, whose 16-entry queue and blocking flush do not fit an
//! interrupt-driven appliance).
//!
//! - [`probe()`]: PCI glue — the bring-up shared with virtio-net ([`crate::virtio`]) with
//!   virtio-blk's MSI-X layout — and then [`VirtioBlk::new`].
//! - `device`: initialisation and the [`crate::block::BlockDevice`] implementation.
//! - `queue`: the request queue over a [`crate::virtio::AnyQueue`]: per-request DMA memory and
//!   the in-flight table (`unsafe` for the virtqueue buffer contract).
//! - `regs`: wire formats.
//!
//! Spec: virtio 1.2 §4.1 (virtio over PCI), §5.2 (block device), §2.7 (split virtqueues).
//!
//! Limits (documented, not bugs): one request queue (no `VIRTIO_BLK_F_MQ` yet); one data
//! segment per request, so the largest transfer is one pool buffer (bounded by `size_max`);
//! no `VIRTIO_F_INDIRECT_DESC` (virtio-drivers allocates per request for it), so a queue of
//! N descriptors carries N/3 requests; `RING_EVENT_IDX` is off by default because
//! virtio-drivers 0.13's `should_notify` compares indices without wrap-around arithmetic.

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

pub use device::{VectorAssignment, VirtioBlk};
pub use probe::{is_virtio_blk, probe, ProbeFailure, VirtioBlkPci};

use crate::hal::HalError;
use crate::virtio::{SetupError, MAX_QUEUE_SIZE};

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
    /// The device's queue 0 is missing or smaller than [`crate::virtio::MIN_QUEUE_SIZE`].
    QueueTooSmall(u32),
    /// The device reports an unusable logical block size.
    BadBlockSize(u32),
    /// virtio-drivers reported an error.
    Virtio(virtio_drivers::Error),
    /// No DMA memory for the request slots.
    Hal(HalError),
    /// The virtio-pci bring-up failed (PCI, MSI-X, capabilities, vector assignment).
    Setup(SetupError),
}

impl From<SetupError> for VirtioBlkError {
    fn from(e: SetupError) -> Self {
        Self::Setup(e)
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

impl core::fmt::Display for VirtioBlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotBlockDevice => write!(f, "not a virtio block device"),
            Self::FeaturesRejected => write!(f, "device rejected feature set"),
            Self::LegacyDevice => write!(f, "legacy virtio device (no VERSION_1)"),
            Self::NoMsix => write!(f, "no MSI-X capability (polled mode disabled)"),
            Self::QueueTooSmall(n) => write!(f, "queue 0 too small ({n} descriptors)"),
            Self::BadBlockSize(b) => write!(f, "unusable block size {b}"),
            Self::Virtio(e) => write!(f, "virtio: {e}"),
            Self::Hal(e) => write!(f, "{e}"),
            Self::Setup(e) => write!(f, "{e}"),
        }
    }
}
