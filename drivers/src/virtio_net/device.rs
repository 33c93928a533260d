//! The virtio-net device: initialisation (virtio 1.2 §3.1.1, §5.1.5), the receive and transmit
//! halves, link status and counters.
//!
//! The two halves ([`NetRx`], [`NetTx`]) can be borrowed at the same time
//! ([`VirtioNet::split`]), which is what a TCP/IP stack's receive path needs: it reads a frame
//! and may answer it at once. Neither half notifies the device; the owner calls
//! [`VirtioNet::kick`] once after a round of work, so a burst costs one notification.

use super::offload::{self, RxChecksum, MAX_IP_PACKET, MAX_TSO_FRAME};
use super::queue::{Direction, PacketQueue, QueueError};
use super::regs::{config, NetFeatures, HEADER_LEN, MAX_FRAME, STATUS_LINK_UP};
use super::{VirtioNetConfig, VirtioNetError, QUEUE_RECEIVE, QUEUE_TRANSMIT};
use crate::hal::PciAddress;
use crate::info::{reason, DeviceState, Reason};
use crate::virtio::{assign_config, assign_queue, choose_queue_size, VectorConfig};
use log::{info, warn};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::Hal;

/// Transmit buffers with segmentation offload: each takes a 64 KiB frame.
pub const TSO_TX_BUFFERS: u16 = 32;
/// Receive buffers with receive offload: each takes a 64 KiB frame (virtio 1.2 §5.1.6.3,
/// "big packets": without mergeable buffers one buffer holds a whole packet).
pub const LARGE_RX_BUFFERS: u16 = 64;
/// Bytes per transmit buffer with segmentation offload (and receive buffer with receive
/// offload): the header and the largest frame, in whole pages.
pub const TSO_BUFFER_SIZE: usize = (HEADER_LEN + MAX_TSO_FRAME).div_ceil(4096) * 4096;
/// The MSS a peer's SYN is raised to with segmentation offload: the largest IPv4 packet's
/// (no IP or TCP options).
const TSO_MSS: u16 = (MAX_IP_PACKET - 40) as u16;
/// The link MTU a receive buffer holds (and the default without `VIRTIO_NET_F_MTU`).
const LINK_MTU: u16 = (MAX_FRAME - 14) as u16;
/// The smallest link MTU taken from the device (IPv4's minimum).
const MIN_LINK_MTU: u16 = 576;

/// MSI-X table entries to program into the device (`None`: no interrupt for that source).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetVectors {
    /// Entry for configuration changes (link status).
    pub config_entry: Option<u16>,
    /// Entry for the receive queue.
    pub rx_entry: Option<u16>,
    /// Entry for the transmit queue.
    pub tx_entry: Option<u16>,
    /// CPU vectors behind those entries: receive, transmit, configuration.
    pub cpu_vectors: [Option<u8>; 3],
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Packets.
    pub packets: u64,
    /// Bytes of Ethernet frames (without the virtio header).
    pub bytes: u64,
    /// Packets dropped: receive — too short, a bad TCP checksum, or unread; transmit — no free buffer or too long.
    pub drops: u64,
    /// Device or ring errors.
    pub errors: u64,
}

/// A received frame taken from the ring; give it back with [`NetRx::recycle`].
#[derive(Debug)]
#[must_use = "a received packet holds a receive buffer until recycled"]
pub struct RxPacket {
    buffer: u16,
    len: usize,
}

impl RxPacket {
    /// Length of the Ethernet frame.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A transmit buffer being filled; send it with [`NetTx::send`] or return it with
/// [`NetTx::discard`].
#[derive(Debug)]
#[must_use = "a transmit packet holds a transmit buffer until sent or discarded"]
pub struct TxPacket {
    buffer: u16,
}

/// The receive half.
#[derive(Debug)]
pub struct NetRx<H: Hal> {
    queue: PacketQueue<H>,
    counters: NetCounters,
    failed: Option<QueueError>,
    /// With segmentation offload: the link's MSS, at or above which a peer's SYN gets the
    /// MSS of large frames ([`offload::raise_syn_mss`]).
    raise_mss_from: Option<u16>,
    /// With receive offload: the header's checksum state is acted on, and frames of up to
    /// 64 KiB arrive.
    large: bool,
    /// Frames received larger than the link's largest.
    large_frames: u64,
}

impl<H: Hal> NetRx<H> {
    /// Takes the next received frame, if any.
    pub fn receive(&mut self) -> Option<RxPacket> {
        if self.failed.is_some() {
            return None;
        }
        loop {
            match self.queue.pop() {
                Ok(None) => return None,
                Ok(Some((buffer, written))) => {
                    if written < HEADER_LEN + 14 {
                        // A runt: nothing a stack could use. Back to the device.
                        self.counters.drops += 1;
                        if let Err(e) = self.queue.post_receive(buffer) {
                            self.fail(e);
                            return None;
                        }
                        continue;
                    }
                    let len = written - HEADER_LEN;
                    if self.large && !self.check_offloaded(buffer, len) {
                        self.counters.drops += 1;
                        if let Err(e) = self.queue.post_receive(buffer) {
                            self.fail(e);
                            return None;
                        }
                        continue;
                    }
                    if len > MAX_FRAME {
                        self.large_frames += 1;
                    }
                    if let Some(link_mss) = self.raise_mss_from {
                        if let Some(frame) = self
                            .queue
                            .buffer_mut(buffer)
                            .and_then(|b| b.get_mut(HEADER_LEN..HEADER_LEN + len))
                        {
                            offload::raise_syn_mss(frame, link_mss, TSO_MSS);
                        }
                    }
                    self.counters.packets += 1;
                    self.counters.bytes += len as u64;
                    return Some(RxPacket { buffer, len });
                }
                Err(e) => {
                    self.fail(e);
                    return None;
                }
            }
        }
    }

    /// With receive offload, before the stack sees a frame: a partial checksum of anything
    /// but TCP is completed (the stack checks UDP's and ICMP's itself), a partial TCP one is
    /// left to the stack, which then does not check TCP checksums ([`NetRx::offloads_tcp`]):
    /// the segment came from the host's own stack, not a wire. A TCP checksum nobody checked
    /// is checked here. `false`: drop the frame.
    fn check_offloaded(&mut self, buffer: u16, len: usize) -> bool {
        let Some((header, frame)) = self
            .queue
            .buffer_mut(buffer)
            .and_then(|b| b.get_mut(..HEADER_LEN + len))
            .map(|b| b.split_at_mut(HEADER_LEN))
        else {
            return false;
        };
        match offload::rx_checksum(header) {
            RxChecksum::Valid => true,
            RxChecksum::Partial { .. } if offload::is_ipv4_tcp(frame) => true,
            RxChecksum::Partial {
                csum_start,
                csum_offset,
            } => offload::complete_checksum(frame, csum_start, csum_offset),
            RxChecksum::Unchecked => offload::tcp_checksum_ok(frame),
        }
    }

    /// Whether TCP frames come with their checksum state from the device (receive offload):
    /// the stack must not check TCP checksums itself.
    pub fn offloads_tcp(&self) -> bool {
        self.large
    }

    /// Frames received larger than the link's largest (with receive offload).
    pub fn large_frames(&self) -> u64 {
        self.large_frames
    }

    /// The frame of a packet from [`NetRx::receive`].
    pub fn frame(&self, packet: &RxPacket) -> &[u8] {
        self.queue
            .buffer(packet.buffer)
            .and_then(|b| b.get(HEADER_LEN..HEADER_LEN + packet.len))
            .unwrap_or(&[])
    }

    /// Gives a packet's buffer back to the device.
    pub fn recycle(&mut self, packet: RxPacket) {
        if let Err(e) = self.queue.post_receive(packet.buffer) {
            self.fail(e);
        }
    }

    /// Counts a frame the stack could not take.
    pub fn count_drop(&mut self) {
        self.counters.drops += 1;
    }

    /// Whether the device has frames waiting.
    pub fn has_pending(&self) -> bool {
        self.failed.is_none() && self.queue.has_used()
    }

    /// Asks the device for (`true`) or against an interrupt for frames it receives. An owner
    /// that polls the ring while it is busy anyway turns them off, and on again before it
    /// sleeps; then it must look at the ring once more ([`NetRx::has_pending`]): a frame that
    /// came in while they were off raised none.
    pub fn set_interrupts(&mut self, enable: bool) {
        self.queue.set_interrupts(enable);
    }

    /// Counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn fail(&mut self, e: QueueError) {
        self.counters.errors += 1;
        if self.failed.is_none() {
            warn!("virtio-net: receive ring error: {e:?}; receive stopped");
            self.failed = Some(e);
        }
    }
}

/// The transmit half.
#[derive(Debug)]
pub struct NetTx<H: Hal> {
    queue: PacketQueue<H>,
    counters: NetCounters,
    failed: Option<QueueError>,
    /// Largest frame a buffer takes.
    max_frame: usize,
    /// With checksum and segmentation offload: the link's MTU, segments are cut to.
    offload_mtu: Option<u16>,
    /// Frames sent for the device to segment.
    segmented: u64,
}

impl<H: Hal> NetTx<H> {
    /// Takes back buffers the device has sent.
    pub fn reclaim(&mut self) {
        if self.failed.is_some() {
            return;
        }
        loop {
            match self.queue.pop() {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// A free transmit buffer (after reclaiming sent ones), or `None`: back-pressure.
    pub fn alloc(&mut self) -> Option<TxPacket> {
        if self.failed.is_some() {
            return None;
        }
        if self.queue.free_count() == 0 {
            self.reclaim();
        }
        self.queue.take_free().map(|buffer| TxPacket { buffer })
    }

    /// Whether a buffer is free (after reclaiming sent ones).
    pub fn can_send(&mut self) -> bool {
        if self.queue.free_count() == 0 {
            self.reclaim();
        }
        self.failed.is_none() && self.queue.free_count() > 0
    }

    /// The first `len` bytes of the packet's frame (at most [`NetTx::max_frame`]; `None` if
    /// longer).
    pub fn frame_mut(&mut self, packet: &TxPacket, len: usize) -> Option<&mut [u8]> {
        if len > self.max_frame {
            return None;
        }
        self.queue
            .buffer_mut(packet.buffer)
            .and_then(|b| b.get_mut(HEADER_LEN..HEADER_LEN + len))
    }

    /// Queues the packet's first `len` frame bytes for the device (sent after the next
    /// [`VirtioNet::kick`]).
    /// With offloads, an IPv4 TCP frame leaves with its checksum (and, when larger than the
    /// link carries, its segmentation) left to the device ([`offload::prepare_tcp`]).
    pub fn send(&mut self, packet: TxPacket, len: usize) {
        if len == 0 || len > self.max_frame {
            self.counters.drops += 1;
            self.queue.give_back(packet.buffer);
            return;
        }
        if let Some(buffer) = self.queue.buffer_mut(packet.buffer) {
            let (header, frame) = buffer.split_at_mut(HEADER_LEN);
            let offload = match (self.offload_mtu, frame.get_mut(..len)) {
                (Some(mtu), Some(frame)) => {
                    offload::lower_syn_mss(frame, mtu - 40);
                    offload::prepare_tcp(frame, mtu)
                }
                _ => None,
            };
            if offload.is_some_and(|o| o.gso.is_some()) {
                self.segmented += 1;
            }
            if let Ok(header) = <&mut [u8; HEADER_LEN]>::try_from(header) {
                super::regs::encode_tx_header(header, offload.as_ref());
            }
        }
        match self.queue.post_transmit(packet.buffer, HEADER_LEN + len) {
            Ok(()) => {
                self.counters.packets += 1;
                self.counters.bytes += len as u64;
            }
            Err(e) => {
                self.queue.give_back(packet.buffer);
                self.fail(e);
            }
        }
    }

    /// Returns an unsent packet's buffer.
    pub fn discard(&mut self, packet: TxPacket) {
        self.queue.give_back(packet.buffer);
    }

    /// Counts a frame that could not be sent (no buffer).
    pub fn count_drop(&mut self) {
        self.counters.drops += 1;
    }

    /// Counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Largest frame it sends: [`MAX_FRAME`], or [`offload::MAX_TSO_FRAME`] with
    /// segmentation offload.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Whether the device completes TCP checksums (and segments large frames).
    pub fn offloads_tcp(&self) -> bool {
        self.offload_mtu.is_some()
    }

    /// Frames the device was asked to segment.
    pub fn segmented(&self) -> u64 {
        self.segmented
    }

    /// Buffers in the device's hands.
    pub fn in_flight(&self) -> usize {
        self.queue.posted()
    }

    fn fail(&mut self, e: QueueError) {
        self.counters.errors += 1;
        if self.failed.is_none() {
            warn!("virtio-net: transmit ring error: {e:?}; transmit stopped");
            self.failed = Some(e);
        }
    }
}

/// The virtio-net driver for one device: generic over the virtio HAL and the transport.
#[derive(Debug)]
pub struct VirtioNet<H: Hal, T: Transport> {
    pci: Option<PciAddress>,
    transport: T,
    vectors: NetVectors,
    features: NetFeatures,
    mac: [u8; 6],
    mtu: Option<u16>,
    link_up: bool,
    rx: NetRx<H>,
    tx: NetTx<H>,
    config_interrupts: u64,
    queue_interrupts: u64,
}

/// A locally administered unicast MAC for devices that give none (`02:…`).
pub fn fallback_mac(seed: u64) -> [u8; 6] {
    let b = seed.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

impl<H: Hal, T: Transport> VirtioNet<H, T> {
    /// Initialises the device: reset, features, queues (with their MSI-X entries), receive
    /// buffers posted, DRIVER_OK. `mac_seed` makes a MAC when the device has none.
    ///
    /// On error the device is left reset (status 0).
    pub fn new<V: VectorConfig>(
        pci: Option<PciAddress>,
        mut transport: T,
        mut vector_config: Option<V>,
        vectors: NetVectors,
        config: VirtioNetConfig,
        mac_seed: u64,
    ) -> Result<Self, VirtioNetError> {
        if transport.device_type() != DeviceType::Network {
            return Err(VirtioNetError::NotNetworkDevice);
        }
        match Self::bring_up(&mut transport, vector_config.as_mut(), vectors, config) {
            Ok((features, rx, tx)) => {
                let mac = if features.contains(NetFeatures::MAC) {
                    let mut mac = [0u8; 6];
                    for (i, m) in mac.iter_mut().enumerate() {
                        *m = transport
                            .read_config_space::<u8>(config::MAC + i)
                            .unwrap_or(0);
                    }
                    mac
                } else {
                    fallback_mac(mac_seed)
                };
                let mtu = if features.contains(NetFeatures::MTU) {
                    transport.read_config_space::<u16>(config::MTU).ok()
                } else {
                    None
                };
                let mut device = Self {
                    pci,
                    transport,
                    vectors,
                    features,
                    mac,
                    mtu,
                    link_up: true,
                    rx,
                    tx,
                    config_interrupts: 0,
                    queue_interrupts: 0,
                };
                device.link_up = device.read_link();
                if features.contains(NetFeatures::CSUM | NetFeatures::HOST_TSO4) {
                    // Segments are cut to the link's MTU (what the device reports, at most
                    // what a receive buffer holds).
                    let link_mtu = mtu
                        .filter(|&m| m >= MIN_LINK_MTU)
                        .unwrap_or(LINK_MTU)
                        .min(LINK_MTU);
                    device.tx.offload_mtu = Some(link_mtu);
                    device.rx.raise_mss_from = Some(link_mtu - 40);
                }
                info!(
                    "virtio-net: MAC {}, rx/tx queues {}/{}, link {}{}{}",
                    MacDisplay(device.mac),
                    device.rx.queue.size(),
                    device.tx.queue.size(),
                    if device.link_up { "up" } else { "down" },
                    if device.tx.offload_mtu.is_some() {
                        ", TCP segmentation offload"
                    } else {
                        ""
                    },
                    if device.rx.large {
                        ", receive offload"
                    } else {
                        ""
                    }
                );
                Ok(device)
            }
            Err(e) => {
                transport.set_status(DeviceStatus::FAILED);
                transport.set_status(DeviceStatus::empty());
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn bring_up<V: VectorConfig>(
        transport: &mut T,
        mut vector_config: Option<&mut V>,
        vectors: NetVectors,
        config: VirtioNetConfig,
    ) -> Result<(NetFeatures, NetRx<H>, NetTx<H>), VirtioNetError> {
        let supported = NetFeatures::VERSION_1
            | NetFeatures::MAC
            | NetFeatures::STATUS
            | NetFeatures::MTU
            | NetFeatures::CSUM
            | NetFeatures::HOST_TSO4
            | NetFeatures::GUEST_CSUM
            | NetFeatures::GUEST_TSO4;
        let offered = NetFeatures::from_bits_truncate(transport.read_device_features());
        // Segmentation needs the checksum offload; either alone is of no use to us. The same
        // holds for receive (and the spec forbids GUEST_TSO4 without GUEST_CSUM).
        let tso = NetFeatures::CSUM | NetFeatures::HOST_TSO4;
        let rx_tso = NetFeatures::GUEST_CSUM | NetFeatures::GUEST_TSO4;
        let mut supported = supported;
        for pair in [tso, rx_tso] {
            if !offered.contains(pair) {
                supported -= pair;
            }
        }
        let features = transport.begin_init(supported);
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(VirtioNetError::FeaturesRejected);
        }
        if !features.contains(NetFeatures::VERSION_1) {
            return Err(VirtioNetError::LegacyDevice);
        }
        if let (Some(v), Some(entry)) = (vector_config.as_mut(), vectors.config_entry) {
            assign_config(&mut **v, entry)?;
        }
        let mut queues = [None, None];
        for (slot, (index, direction, entry)) in queues.iter_mut().zip([
            (QUEUE_RECEIVE, Direction::Receive, vectors.rx_entry),
            (QUEUE_TRANSMIT, Direction::Transmit, vectors.tx_entry),
        ]) {
            let max = transport.max_queue_size(index);
            let size = choose_queue_size(max, config.max_queue_size)
                .ok_or(VirtioNetError::QueueTooSmall { queue: index, max })?;
            let queue = if direction == Direction::Transmit && features.contains(tso) {
                // Frames of up to 64 KiB: fewer buffers, each large enough for one.
                PacketQueue::<H>::with_buffers(
                    transport,
                    index,
                    size,
                    direction,
                    TSO_TX_BUFFERS,
                    TSO_BUFFER_SIZE,
                )?
            } else if direction == Direction::Receive && features.contains(rx_tso) {
                // Packets of up to 64 KiB, each in one buffer.
                PacketQueue::<H>::with_buffers(
                    transport,
                    index,
                    size,
                    direction,
                    LARGE_RX_BUFFERS,
                    TSO_BUFFER_SIZE,
                )?
            } else {
                PacketQueue::<H>::new(transport, index, size, direction)?
            };
            // The vector is set after the queue's addresses and before DRIVER_OK.
            if let (Some(v), Some(entry)) = (vector_config.as_mut(), entry) {
                assign_queue(&mut **v, index, entry)?;
            }
            *slot = Some(queue);
        }
        let [Some(mut rx), Some(mut tx)] = queues else {
            return Err(VirtioNetError::Queue(QueueError::Virtio(
                virtio_drivers::Error::InvalidParam,
            )));
        };
        rx.post_all_receive()?;
        // Sent buffers are reclaimed when new ones are needed; the transmit interrupt only
        // matters when the pool ran dry (see `VirtioNet::arm_tx_interrupt`).
        tx.set_interrupts(false);
        transport.finish_init();
        rx.kick(transport);
        let rx = NetRx {
            queue: rx,
            counters: NetCounters::default(),
            failed: None,
            raise_mss_from: None,
            large: features.contains(rx_tso),
            large_frames: 0,
        };
        let tx = NetTx {
            max_frame: if features.contains(tso) {
                MAX_TSO_FRAME
            } else {
                MAX_FRAME
            },
            queue: tx,
            counters: NetCounters::default(),
            failed: None,
            offload_mtu: None,
            segmented: 0,
        };
        Ok((features, rx, tx))
    }

    fn read_link(&self) -> bool {
        if !self.features.contains(NetFeatures::STATUS) {
            return true;
        }
        self.transport
            .read_config_space::<u16>(config::STATUS)
            .map(|s| s & STATUS_LINK_UP != 0)
            .unwrap_or(true)
    }

    /// Receive counters.
    pub fn rx_counters(&self) -> NetCounters {
        self.rx.counters
    }

    /// Transmit counters.
    pub fn tx_counters(&self) -> NetCounters {
        self.tx.counters
    }

    /// Both halves at once.
    pub fn split(&mut self) -> (&mut NetRx<H>, &mut NetTx<H>) {
        (&mut self.rx, &mut self.tx)
    }

    /// The receive half.
    pub fn rx(&mut self) -> &mut NetRx<H> {
        &mut self.rx
    }

    /// The transmit half.
    pub fn tx(&mut self) -> &mut NetTx<H> {
        &mut self.tx
    }

    /// The receive half, to look at.
    pub fn rx_ref(&self) -> &NetRx<H> {
        &self.rx
    }

    /// The transmit half, to look at.
    pub fn tx_ref(&self) -> &NetTx<H> {
        &self.tx
    }

    /// Notifies the device of buffers posted since the last call (receive and transmit).
    pub fn kick(&mut self) {
        self.rx.queue.kick(&mut self.transport);
        self.tx.queue.kick(&mut self.transport);
    }

    /// Asks for a transmit interrupt while the transmit pool is empty, so the owner is woken
    /// when buffers come back; turns it off again otherwise. Returns whether a buffer is free.
    pub fn arm_tx_interrupt(&mut self) -> bool {
        let free = self.tx.can_send();
        self.tx.queue.set_interrupts(!free);
        if !free {
            // A completion between the check and the flag would raise no interrupt: look again.
            return self.tx.can_send();
        }
        free
    }

    /// An interrupt arrived for `queue` (`InterruptOwner::CONFIG_QUEUE` for configuration
    /// changes): re-reads the link state and the device status.
    pub fn interrupt(&mut self, queue: u16) -> Option<Reason> {
        if queue == crate::msix::InterruptOwner::CONFIG_QUEUE {
            self.config_interrupts += 1;
            if self
                .transport
                .get_status()
                .contains(DeviceStatus::DEVICE_NEEDS_RESET)
            {
                return Some(reason(format_args!("device needs reset")));
            }
            let up = self.read_link();
            if up != self.link_up {
                info!("virtio-net: link {}", if up { "up" } else { "down" });
                self.link_up = up;
            }
        } else {
            self.queue_interrupts += 1;
        }
        None
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's MTU, when it reports one.
    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    /// Whether the link is up (always true without `VIRTIO_NET_F_STATUS`).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Whether the device reports link status.
    pub fn has_link_status(&self) -> bool {
        self.features.contains(NetFeatures::STATUS)
    }

    /// Negotiated features.
    pub fn features(&self) -> NetFeatures {
        self.features
    }

    /// PCI address.
    pub fn pci(&self) -> Option<PciAddress> {
        self.pci
    }

    /// MSI-X assignment.
    pub fn vectors(&self) -> NetVectors {
        self.vectors
    }

    /// Whether the device raises interrupts (false: the owner must poll).
    pub fn has_interrupts(&self) -> bool {
        self.vectors.rx_entry.is_some()
    }

    /// Interrupts taken: (queues, configuration).
    pub fn interrupts(&self) -> (u64, u64) {
        (self.queue_interrupts, self.config_interrupts)
    }

    /// Device state for the console: failed when a ring is broken.
    pub fn state(&self) -> DeviceState {
        match (self.rx.failed, self.tx.failed) {
            (None, None) => DeviceState::Online,
            (Some(e), _) | (_, Some(e)) => DeviceState::Failed(reason(format_args!("{e:?}"))),
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug)]
pub struct MacDisplay(pub [u8; 6]);

impl core::fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl From<QueueError> for VirtioNetError {
    fn from(e: QueueError) -> Self {
        Self::Queue(e)
    }
}
