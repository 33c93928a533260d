//! virtio-net over virtio-pci, built directly on virtio-drivers' `PciTransport` and `VirtQueue`
//! (not its `VirtIONetRaw`, which finishes initialisation before we could assign MSI-X
//! vectors, and not `VirtIONet`, which allocates per packet).
//!
//! - [`probe()`]: PCI glue — BARs, bus mastering, MSI-X entries, common configuration,
//!   transport — and then [`VirtioNet::new`].
//! - `device`: initialisation, the receive and transmit halves ([`NetRx`], [`NetTx`]), link
//!   status and counters.
//! - `queue`: a virtqueue with its packet buffers and token table (the driver's `unsafe`).
//! - `regs`: feature bits, configuration layout, the packet header.
//!
//! Spec: virtio 1.2 §5.1 (network device), §4.1 (virtio over PCI), §2.7 (split virtqueues).
//!
//! What we negotiate: `VERSION_1`, `MAC`, `STATUS`, `MTU` — no checksum or segmentation
//! offloads, no mergeable receive buffers, no control queue, one queue pair. Every packet is
//! one descriptor holding the 12-byte header and the frame, in a buffer of [`BUFFER_SIZE`]
//! bytes. All buffers (one per descriptor of each queue) are allocated at start-up; receive
//! buffers stay posted, transmit buffers come back to a free list; nothing is allocated per
//! packet. When no transmit buffer is free, [`NetTx::alloc`] returns `None` (back-pressure;
//! TCP retransmits).
//!
//! The virtio-pci helpers shared with virtio-blk (common configuration mapping, capability
//! checks, vector assignment) live in `virtio_blk::common_regs`; their errors arrive here as
//! [`VirtioNetError::Pci`].

mod device;
pub mod probe;
#[allow(unsafe_code)]
mod queue;
pub mod regs;

pub use device::{
    fallback_mac, MacDisplay, NetCounters, NetRx, NetTx, NetVectors, RxPacket, TxPacket, VirtioNet,
};
pub use probe::{is_virtio_net, probe, VirtioNetPci};
pub use queue::{choose_queue_size, QueueError, MAX_QUEUE_SIZE, MIN_QUEUE_SIZE};

use crate::hal::HalError;
use crate::msix::MsixError;
use crate::pci::PciError;
use crate::virtio_blk::VirtioBlkError;

/// Bytes per packet buffer: the 12-byte header and a 1514-byte frame, rounded to two buffers
/// per page.
pub const BUFFER_SIZE: usize = 2048;
/// `receiveq1`.
pub const QUEUE_RECEIVE: u16 = 0;
/// `transmitq1`.
pub const QUEUE_TRANSMIT: u16 = 1;

/// Driver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// Largest virtqueue to set up (at most [`MAX_QUEUE_SIZE`]); each queue gets as many
    /// buffers.
    pub max_queue_size: u16,
}

impl Default for VirtioNetConfig {
    fn default() -> Self {
        Self {
            max_queue_size: MAX_QUEUE_SIZE,
        }
    }
}

/// Errors of virtio-net initialisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtioNetError {
    /// The PCI function is not a virtio network device.
    NotNetworkDevice,
    /// The device did not accept our features (FEATURES_OK did not stick).
    FeaturesRejected,
    /// The device does not offer `VIRTIO_F_VERSION_1`.
    LegacyDevice,
    /// A queue is missing or smaller than [`MIN_QUEUE_SIZE`].
    QueueTooSmall {
        /// The queue.
        queue: u16,
        /// Its maximum size.
        max: u32,
    },
    /// Setting up a queue or its buffers failed.
    Queue(QueueError),
    /// virtio-pci setup failed (common configuration, capabilities, vector assignment).
    Pci(VirtioBlkError),
    /// virtio-drivers' PCI transport could not be set up.
    Transport(virtio_drivers::transport::pci::VirtioPciError),
    /// MSI-X setup failed.
    Msix(MsixError),
}

impl From<VirtioBlkError> for VirtioNetError {
    fn from(e: VirtioBlkError) -> Self {
        Self::Pci(e)
    }
}
impl From<PciError> for VirtioNetError {
    fn from(e: PciError) -> Self {
        Self::Pci(VirtioBlkError::Pci(e))
    }
}
impl From<HalError> for VirtioNetError {
    fn from(e: HalError) -> Self {
        Self::Pci(VirtioBlkError::Hal(e))
    }
}
impl From<MsixError> for VirtioNetError {
    fn from(e: MsixError) -> Self {
        Self::Msix(e)
    }
}
impl From<virtio_drivers::transport::pci::VirtioPciError> for VirtioNetError {
    fn from(e: virtio_drivers::transport::pci::VirtioPciError) -> Self {
        Self::Transport(e)
    }
}

impl core::fmt::Display for VirtioNetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotNetworkDevice => write!(f, "not a virtio network device"),
            Self::FeaturesRejected => write!(f, "device rejected feature set"),
            Self::LegacyDevice => write!(f, "legacy virtio device (no VERSION_1)"),
            Self::QueueTooSmall { queue, max } => {
                write!(f, "queue {queue} too small ({max} descriptors)")
            }
            Self::Queue(e) => write!(f, "queue setup: {e:?}"),
            Self::Pci(e) => write!(f, "{e}"),
            Self::Transport(e) => write!(f, "virtio-pci transport: {e}"),
            Self::Msix(e) => write!(f, "{e}"),
        }
    }
}
