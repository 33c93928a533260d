//! virtio-net wire formats: feature bits, the device configuration layout and the per-packet
//! header (virtio 1.2 §5.1).

use bitflags::bitflags;

bitflags! {
    /// Feature bits we may negotiate (virtio 1.2 §5.1.3 and §6). No offloads, no mergeable
    /// receive buffers, no control queue: every packet fits one buffer of
    /// [`super::BUFFER_SIZE`] bytes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct NetFeatures: u64 {
        /// `VIRTIO_NET_F_MTU`: `mtu` in the configuration (read only for the console).
        const MTU = 1 << 3;
        /// `VIRTIO_NET_F_MAC`: the device has a MAC address in its configuration.
        const MAC = 1 << 5;
        /// `VIRTIO_NET_F_STATUS`: `status` reports the link state.
        const STATUS = 1 << 16;
        /// `VIRTIO_F_VERSION_1`: a modern (non-legacy) device; required.
        const VERSION_1 = 1 << 32;
    }
}

/// Device configuration (`struct virtio_net_config`) byte offsets.
pub mod config {
    /// `mac`: 6 bytes.
    pub const MAC: usize = 0;
    /// `status`: le16, bit 0 = `VIRTIO_NET_S_LINK_UP`.
    pub const STATUS: usize = 6;
    /// `mtu`: le16 (with `VIRTIO_NET_F_MTU`).
    pub const MTU: usize = 10;
}

/// `VIRTIO_NET_S_LINK_UP` in `status`.
pub const STATUS_LINK_UP: u16 = 1;

/// Size of `struct virtio_net_hdr` with `VIRTIO_F_VERSION_1` (which always carries
/// `num_buffers`): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const HEADER_LEN: usize = 12;

/// Largest Ethernet frame without offloads: 1500 bytes of payload and a 14-byte header (no
/// VLAN tag, no FCS).
pub const MAX_FRAME: usize = 1514;

/// Writes the header of a packet we transmit: no checksum offload (`flags` 0), no
/// segmentation (`gso_type` `VIRTIO_NET_HDR_GSO_NONE`), everything else zero.
pub fn encode_tx_header(header: &mut [u8; HEADER_LEN]) {
    *header = [0; HEADER_LEN];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_all_zero_and_frames_fit_buffers() {
        let mut h = [0xffu8; HEADER_LEN];
        encode_tx_header(&mut h);
        assert_eq!(h, [0; HEADER_LEN]);
        // virtio 1.2 §5.1.6.3.1: without offloads or MRG_RXBUF a receive buffer must hold
        // the header and a 1514-byte frame.
        const { assert!(HEADER_LEN + MAX_FRAME <= super::super::BUFFER_SIZE) };
    }
}
