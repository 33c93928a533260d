//! virtio-net wire formats: feature bits, the device configuration layout and the per-packet
//! header (virtio 1.2 §5.1).

use bitflags::bitflags;

use super::offload::{TxOffload, HDR_F_NEEDS_CSUM, HDR_GSO_TCPV4};

bitflags! {
    /// Feature bits we may negotiate (virtio 1.2 §5.1.3 and §6). No mergeable receive
    /// buffers, no control queue: every received packet fits one buffer (of
    /// [`super::BUFFER_SIZE`] bytes, or of [`super::TSO_BUFFER_SIZE`] with receive offload).
    /// Transmit checksum and TCPv4 segmentation offload when the device offers both, and
    /// the same for receive (see [`super::offload`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct NetFeatures: u64 {
        /// `VIRTIO_NET_F_CSUM`: the device completes checksums of packets we send.
        const CSUM = 1 << 0;
        /// `VIRTIO_NET_F_GUEST_CSUM`: we take packets whose checksum is partial or unchecked
        /// (the header says which).
        const GUEST_CSUM = 1 << 1;
        /// `VIRTIO_NET_F_MTU`: `mtu` in the configuration (read only for the console).
        const MTU = 1 << 3;
        /// `VIRTIO_NET_F_MAC`: the device has a MAC address in its configuration.
        const MAC = 1 << 5;
        /// `VIRTIO_NET_F_GUEST_TSO4`: we take TCPv4 packets of up to 64 KiB (needs
        /// `GUEST_CSUM`); every receive buffer must then hold one.
        const GUEST_TSO4 = 1 << 7;
        /// `VIRTIO_NET_F_HOST_TSO4`: the device segments TCPv4 packets we send (needs `CSUM`).
        const HOST_TSO4 = 1 << 11;
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

/// Writes the header of a packet we transmit: without `offload`, no checksum offload
/// (`flags` 0), no segmentation (`gso_type` `VIRTIO_NET_HDR_GSO_NONE`), everything else
/// zero; with it, `NEEDS_CSUM` and its checksum fields, and `GSO_TCPV4` with its sizes when
/// it asks for segmentation.
pub fn encode_tx_header(header: &mut [u8; HEADER_LEN], offload: Option<&TxOffload>) {
    *header = [0; HEADER_LEN];
    let Some(o) = offload else { return };
    header[0] = HDR_F_NEEDS_CSUM;
    if let Some(gso) = o.gso {
        header[1] = HDR_GSO_TCPV4;
        header[2..4].copy_from_slice(&gso.hdr_len.to_le_bytes());
        header[4..6].copy_from_slice(&gso.gso_size.to_le_bytes());
    }
    header[6..8].copy_from_slice(&o.csum_start.to_le_bytes());
    header[8..10].copy_from_slice(&o.csum_offset.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_all_zero_and_frames_fit_buffers() {
        let mut h = [0xffu8; HEADER_LEN];
        encode_tx_header(&mut h, None);
        assert_eq!(h, [0; HEADER_LEN]);
        // virtio 1.2 §5.1.6.3.1: without offloads or MRG_RXBUF a receive buffer must hold
        // the header and a 1514-byte frame.
        const { assert!(HEADER_LEN + MAX_FRAME <= super::super::BUFFER_SIZE) };
    }

    #[test]
    fn offloaded_headers_carry_checksum_and_segmentation_fields() {
        use super::super::offload::Gso;
        let mut h = [0xffu8; HEADER_LEN];
        let csum_only = TxOffload {
            csum_start: 34,
            csum_offset: 16,
            gso: None,
        };
        encode_tx_header(&mut h, Some(&csum_only));
        assert_eq!(h, [1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0]);
        let gso = TxOffload {
            gso: Some(Gso {
                hdr_len: 54,
                gso_size: 1460,
            }),
            ..csum_only
        };
        encode_tx_header(&mut h, Some(&gso));
        assert_eq!(h, [1, 1, 54, 0, 0xb4, 0x05, 34, 0, 16, 0, 0, 0]);
    }
}
