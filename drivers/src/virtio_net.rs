//! virtio-net over virtio-pci, built directly on virtio-drivers' `PciTransport` and `VirtQueue`
//! (not its `VirtIONetRaw`, which finishes initialisation before we could assign MSI-X
//! vectors, and not `VirtIONet`, which allocates per packet).
//!
//! - [`probe()`]: PCI glue — the bring-up shared with virtio-blk ([`crate::virtio`]) with
//!   virtio-net's MSI-X layout — and then [`VirtioNet::new`].
//! - `device`: initialisation, the receive and transmit halves ([`NetRx`], [`NetTx`]), link
//!   status and counters.
//! - `queue`: a [`crate::virtio::AnyQueue`] with its packet buffers and token table (the
//!   driver's `unsafe`).
//! - `regs`: feature bits, configuration layout, the packet header.
//!
//! Spec: virtio 1.2 §5.1 (network device), §4.1 (virtio over PCI), §2.7 (split virtqueues).
//!
//! What we negotiate: `VERSION_1`, `MAC`, `STATUS`, `MTU`, and `CSUM` with `HOST_TSO4` when
//! the device offers both (a tap backend does, QEMU's user networking does not): then the
//! device completes our TCP checksums and cuts TCP segments of up to 64 KiB to the link's
//! size (`offload`: what the frames need for that, host-tested). And `GUEST_CSUM` with
//! `GUEST_TSO4` when offered (tap again): the device hands us the host's TCP segments of up
//! to 64 KiB whole, their checksum partial (`NEEDS_CSUM`), checked (`DATA_VALID`) or
//! unchecked, which the receive half acts on before the stack sees the frame. No mergeable
//! receive buffers, no control queue, one queue pair. Every packet is one descriptor holding
//! the 12-byte header and the frame, in a buffer of [`BUFFER_SIZE`] bytes (transmit buffers
//! with segmentation offload: [`TSO_TX_BUFFERS`] of [`TSO_BUFFER_SIZE`]; receive buffers with
//! receive offload: [`LARGE_RX_BUFFERS`] of [`TSO_BUFFER_SIZE`]).
//! All buffers (one per descriptor of each queue, fewer for large transmit frames) are
//! allocated at start-up; receive buffers stay posted, transmit buffers come back to a free
//! list; nothing is allocated per packet. When no transmit buffer is free, [`NetTx::alloc`]
//! returns `None` (back-pressure; TCP retransmits).
//!
//! The virtio-pci bring-up shared with virtio-blk (claim, capability checks, common
//! configuration, vector assignment) lives in [`crate::virtio`]; its errors arrive here as
//! [`VirtioNetError::Setup`].

mod device;
pub mod offload;
pub mod probe;
#[allow(unsafe_code)]
mod queue;
pub mod regs;

pub use device::{
    fallback_mac, MacDisplay, NetCounters, NetRx, NetTx, NetVectors, RxPacket, TxPacket, VirtioNet,
    LARGE_RX_BUFFERS, TSO_BUFFER_SIZE, TSO_TX_BUFFERS,
};
pub use probe::{is_virtio_net, probe, VirtioNetPci};
pub use queue::QueueError;

use crate::virtio::{SetupError, MAX_QUEUE_SIZE};

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
    /// A queue is missing or smaller than [`crate::virtio::MIN_QUEUE_SIZE`].
    QueueTooSmall {
        /// The queue.
        queue: u16,
        /// Its maximum size.
        max: u32,
    },
    /// Setting up a queue or its buffers failed.
    Queue(QueueError),
    /// The virtio-pci bring-up failed (PCI, MSI-X, capabilities, vector assignment).
    Setup(SetupError),
}

impl From<SetupError> for VirtioNetError {
    fn from(e: SetupError) -> Self {
        Self::Setup(e)
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
            Self::Setup(e) => write!(f, "{e}"),
        }
    }
}
