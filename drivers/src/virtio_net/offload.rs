//! TCP segmentation offload for a stack that knows nothing of it (virtio 1.2 §5.1.6.2).
//!
//! With `VIRTIO_NET_F_CSUM` and `VIRTIO_NET_F_HOST_TSO4` the device takes one IPv4 TCP
//! segment of up to 64 KiB and cuts it into segments of the link's size itself, with their
//! checksums. The stack above (smoltcp) only cuts segments of the smaller of its own and the
//! peer's MSS, so rewrites on the frames make it produce large ones, and stay correct:
//!
//! - receive: a SYN whose MSS option is at least what the link carries ([`raise_syn_mss`])
//!   gets the MSS the interface's large frames allow: the device cuts every segment to the
//!   link's MSS, which is no larger than what the peer said it takes. A peer with a smaller MSS
//!   is left alone, and segments to it never need cutting. The TCP checksum is updated for
//!   the change (RFC 1624).
//! - transmit: our own SYN's MSS option, which the stack fills from its large frames, is
//!   lowered to the link's ([`lower_syn_mss`]): the peer still sends us frames a receive
//!   buffer holds, even when its own MTU is larger;
//! - transmit: every IPv4 TCP frame leaves with its checksum done by the device
//!   ([`prepare_tcp`]: the pseudo-header sum in the checksum field, `NEEDS_CSUM`); one whose
//!   payload is larger than the link's MSS is also marked for segmentation (`GSO_TCPV4`,
//!   `gso_size` = link MTU less the IP and TCP headers).
//!
//! Pure functions over frame bytes: tested on the host.

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const HDR_GSO_TCPV4: u8 = 1;

/// Largest IPv4 packet (total length is 16 bits).
pub const MAX_IP_PACKET: usize = 65535;
/// Largest Ethernet frame the device is given with segmentation offload: a 64 KiB IPv4
/// packet and the 14-byte Ethernet header.
pub const MAX_TSO_FRAME: usize = ETH_HEADER + MAX_IP_PACKET;

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_OPT_END: u8 = 0;
const TCP_OPT_NOP: u8 = 1;
const TCP_OPT_MSS: u8 = 2;

/// What the device must do to a transmitted frame (the header fields of §5.1.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxOffload {
    /// Where the checksum covers from (the TCP header's offset in the frame).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Segmentation: headers' length (Ethernet, IP, TCP) and payload bytes per segment.
    pub gso: Option<Gso>,
}

/// Segmentation fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    /// Ethernet, IP and TCP headers.
    pub hdr_len: u16,
    /// TCP payload bytes per segment on the link.
    pub gso_size: u16,
}

/// The IPv4 TCP segment in `frame`: (IP header offset, IP header length, TCP header offset,
/// TCP header length, end of the IP packet), when the frame is one (no fragments).
fn ipv4_tcp(frame: &[u8]) -> Option<(usize, usize, usize, usize, usize)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = ETH_HEADER;
    let vihl = *frame.get(ip)?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0xf) * 4;
    if ihl < 20 || *frame.get(ip + 9)? != PROTO_TCP {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([
        *frame.get(ip + 2)?,
        *frame.get(ip + 3)?,
    ]));
    let fragment = u16::from_be_bytes([*frame.get(ip + 6)?, *frame.get(ip + 7)?]);
    // More fragments, or an offset: not a whole segment.
    if fragment & 0x3fff != 0 {
        return None;
    }
    let tcp = ip + ihl;
    let end = ip + total;
    let doff = usize::from(*frame.get(tcp + 12)? >> 4) * 4;
    if doff < 20 || end > frame.len() || tcp + doff > end {
        return None;
    }
    Some((ip, ihl, tcp, doff, end))
}

/// One's-complement sum of `bytes` (big-endian 16-bit words) added to `sum`, not folded.
fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut pairs = bytes.chunks_exact(2);
    for p in &mut pairs {
        sum += u32::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Prepares an IPv4 TCP frame for the device's checksum (and, when its payload is larger
/// than a link of `link_mtu` carries, segmentation): writes the pseudo-header sum into the
/// TCP checksum field and returns the header fields. `None` for any other frame (sent as
/// it is, its checksums done by the stack).
pub fn prepare_tcp(frame: &mut [u8], link_mtu: u16) -> Option<TxOffload> {
    let (ip, ihl, tcp, doff, end) = ipv4_tcp(frame)?;
    let tcp_len = end - tcp;
    // Pseudo-header: source, destination, zero and protocol, TCP length.
    let mut sum = sum_words(0, &frame[ip + 12..ip + 20]);
    sum += u32::from(PROTO_TCP);
    sum += tcp_len as u32;
    // Not complemented: the device adds the segment's bytes and complements (§5.1.6.2).
    let partial = fold(sum);
    frame[tcp + 16..tcp + 18].copy_from_slice(&partial.to_be_bytes());
    let payload = tcp_len - doff;
    let mss = usize::from(link_mtu).saturating_sub(ihl + doff);
    let gso = (payload > mss && mss > 0).then_some(Gso {
        hdr_len: (tcp + doff) as u16,
        gso_size: mss as u16,
    });
    Some(TxOffload {
        csum_start: tcp as u16,
        csum_offset: 16,
        gso,
    })
}

/// Where the MSS option's value sits in the IPv4 SYN in `frame` (and the TCP header's offset).
fn syn_mss_at(frame: &[u8]) -> Option<(usize, usize)> {
    let (_, _, tcp, doff, _) = ipv4_tcp(frame)?;
    if frame[tcp + 13] & TCP_FLAG_SYN == 0 {
        return None;
    }
    let mut at = tcp + 20;
    let options_end = tcp + doff;
    while at < options_end {
        match frame[at] {
            TCP_OPT_END => return None,
            TCP_OPT_NOP => at += 1,
            kind => {
                let len = usize::from(*frame.get(at + 1)?);
                if len < 2 || at + len > options_end {
                    return None;
                }
                if kind == TCP_OPT_MSS && len == 4 {
                    return Some((at + 2, tcp));
                }
                at += len;
            }
        }
    }
    None
}

/// Sets the MSS option at `at` of the segment at `tcp` to `new` and updates the TCP checksum
/// for it (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
fn set_mss(frame: &mut [u8], at: usize, tcp: usize, new: u16) {
    let old = u16::from_be_bytes([frame[at], frame[at + 1]]);
    frame[at..at + 2].copy_from_slice(&new.to_be_bytes());
    let check = u16::from_be_bytes([frame[tcp + 16], frame[tcp + 17]]);
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    frame[tcp + 16..tcp + 18].copy_from_slice(&(!fold(sum)).to_be_bytes());
}

/// In a received IPv4 SYN whose MSS option is at least `link_mss`, sets the option to
/// `raised` and updates the TCP checksum for it. Returns whether the frame changed.
pub fn raise_syn_mss(frame: &mut [u8], link_mss: u16, raised: u16) -> bool {
    let Some((at, tcp)) = syn_mss_at(frame) else {
        return false;
    };
    let old = u16::from_be_bytes([frame[at], frame[at + 1]]);
    if old < link_mss || old >= raised {
        return false;
    }
    set_mss(frame, at, tcp, raised);
    true
}

/// In an IPv4 SYN we send whose MSS option is larger than `link_mss` (the stack offers what
/// its large frames hold), sets the option to `link_mss`: what we receive still comes in
/// frames of the link's size, whatever the peer's own MTU. Returns whether the frame changed.
pub fn lower_syn_mss(frame: &mut [u8], link_mss: u16) -> bool {
    let Some((at, tcp)) = syn_mss_at(frame) else {
        return false;
    };
    if u16::from_be_bytes([frame[at], frame[at + 1]]) <= link_mss {
        return false;
    }
    set_mss(frame, at, tcp, link_mss);
    true
}

/// `VIRTIO_NET_HDR_F_DATA_VALID`: the device (the host) has checked the packet's checksums.
pub const HDR_F_DATA_VALID: u8 = 2;

/// What a received frame's header says of its checksum (with `VIRTIO_NET_F_GUEST_CSUM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxChecksum {
    /// `NEEDS_CSUM`: the checksum at `csum_start + csum_offset` holds only the partial sum
    /// the sender's stack left for a device to complete (the packet never crossed a wire).
    Partial {
        /// Where the checksum covers from.
        csum_start: u16,
        /// Where the checksum goes, from `csum_start`.
        csum_offset: u16,
    },
    /// `DATA_VALID`: the host has checked it.
    Valid,
    /// Neither: nobody has checked it.
    Unchecked,
}

/// The checksum state in a received packet's header bytes.
pub fn rx_checksum(header: &[u8]) -> RxChecksum {
    let flags = header.first().copied().unwrap_or(0);
    let le = |at: usize| {
        u16::from_le_bytes([
            header.get(at).copied().unwrap_or(0),
            header.get(at + 1).copied().unwrap_or(0),
        ])
    };
    if flags & HDR_F_NEEDS_CSUM != 0 {
        RxChecksum::Partial {
            csum_start: le(6),
            csum_offset: le(8),
        }
    } else if flags & HDR_F_DATA_VALID != 0 {
        RxChecksum::Valid
    } else {
        RxChecksum::Unchecked
    }
}

/// Whether `frame` is a whole IPv4 TCP segment (what a stack that trusts the device's
/// checksum state may take without looking at the TCP checksum).
pub fn is_ipv4_tcp(frame: &[u8]) -> bool {
    ipv4_tcp(frame).is_some()
}

/// Completes a partial checksum the way a device would (virtio 1.2 §5.1.6.2): the one's
/// complement of the sum from `csum_start` to the end of the frame, written at
/// `csum_start + csum_offset`. `false` (frame untouched) when the offsets do not fit.
pub fn complete_checksum(frame: &mut [u8], csum_start: u16, csum_offset: u16) -> bool {
    let start = usize::from(csum_start);
    let at = start + usize::from(csum_offset);
    if start >= frame.len() || at + 2 > frame.len() {
        return false;
    }
    // The field holds the pseudo-header sum: it is summed along with the rest.
    let sum = sum_words(0, &frame[start..]);
    frame[at..at + 2].copy_from_slice(&(!fold(sum)).to_be_bytes());
    true
}

/// Whether the TCP checksum of the IPv4 TCP segment in `frame` is right. `true` for any
/// other frame (the stack checks those itself).
pub fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let Some((ip, _, tcp, _, end)) = ipv4_tcp(frame) else {
        return true;
    };
    let mut sum = sum_words(0, &frame[ip + 12..ip + 20]);
    sum += u32::from(PROTO_TCP);
    sum += (end - tcp) as u32;
    fold(sum_words(sum, &frame[tcp..end])) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame with an IPv4 TCP segment from 10.0.0.1:1000 to 10.0.0.2:2000 with
    /// `options`, `flags` and `payload`, its IP and TCP checksums filled.
    fn frame(options: &[u8], flags: u8, payload: &[u8]) -> Vec<u8> {
        let tcp_len = 20 + options.len() + payload.len();
        let total = 20 + tcp_len;
        let mut f = vec![0u8; 14 + total];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = 14;
        f[ip] = 0x45;
        f[ip + 2..ip + 4].copy_from_slice(&(total as u16).to_be_bytes());
        f[ip + 6] = 0x40; // DF
        f[ip + 8] = 64;
        f[ip + 9] = 6;
        f[ip + 12..ip + 16].copy_from_slice(&[10, 0, 0, 1]);
        f[ip + 16..ip + 20].copy_from_slice(&[10, 0, 0, 2]);
        let c = !fold(sum_words(0, &f[ip..ip + 20]));
        f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
        let t = ip + 20;
        f[t..t + 2].copy_from_slice(&1000u16.to_be_bytes());
        f[t + 2..t + 4].copy_from_slice(&2000u16.to_be_bytes());
        f[t + 12] = (((20 + options.len()) / 4) as u8) << 4;
        f[t + 13] = flags;
        f[t + 14..t + 16].copy_from_slice(&8192u16.to_be_bytes());
        f[t + 20..t + 20 + options.len()].copy_from_slice(options);
        f[t + 20 + options.len()..].copy_from_slice(payload);
        let c = tcp_checksum(&f);
        f[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// The TCP checksum of `f` computed whole (with its checksum field as zero).
    fn tcp_checksum(f: &[u8]) -> u16 {
        let t = 34;
        let mut seg = f[t..].to_vec();
        seg[16] = 0;
        seg[17] = 0;
        let mut sum = sum_words(0, &f[26..34]);
        sum += 6 + seg.len() as u32;
        !fold(sum_words(sum, &seg))
    }

    #[test]
    fn syn_mss_at_least_the_links_is_raised_with_a_valid_checksum() {
        // MSS 1460, SACK permitted, NOP, window scale 7.
        let opts = [2, 4, 0x05, 0xb4, 4, 2, 1, 3, 3, 7, 0, 0];
        let mut f = frame(&opts, 0x02, &[]);
        assert!(raise_syn_mss(&mut f, 1460, 65495));
        assert_eq!(&f[54..58], &[2, 4, 0xff, 0xd7]);
        assert_eq!(u16::from_be_bytes([f[50], f[51]]), tcp_checksum(&f));
        // Once raised it stays as it is.
        assert!(!raise_syn_mss(&mut f, 1460, 65495));
    }

    #[test]
    fn small_mss_options_and_other_segments_are_left_alone() {
        let mut small = frame(&[2, 4, 0x05, 0x00, 0, 0, 0, 0], 0x02, &[]);
        let before = small.clone();
        assert!(!raise_syn_mss(&mut small, 1460, 65495));
        assert_eq!(small, before);
        // The same option on a segment without SYN.
        let mut ack = frame(&[2, 4, 0x05, 0xb4], 0x10, b"data");
        let before = ack.clone();
        assert!(!raise_syn_mss(&mut ack, 1460, 65495));
        assert_eq!(ack, before);
        // No MSS option; an option running past the header.
        let mut none = frame(&[1, 1, 4, 2], 0x02, &[]);
        assert!(!raise_syn_mss(&mut none, 1460, 65495));
        let mut bad = frame(&[1, 2, 9, 0], 0x02, &[]);
        assert!(!raise_syn_mss(&mut bad, 1460, 65495));
        // Not TCP: an ARP frame, a truncated one.
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(!raise_syn_mss(&mut arp, 1460, 65495));
        assert!(!raise_syn_mss(&mut ack[..40], 1460, 65495));
    }

    #[test]
    fn our_syn_offers_no_more_than_the_link_carries() {
        // SYN-ACK with MSS 65495, SACK permitted.
        let mut f = frame(&[2, 4, 0xff, 0xd7, 4, 2, 0, 0], 0x12, &[]);
        assert!(lower_syn_mss(&mut f, 1460));
        assert_eq!(&f[54..58], &[2, 4, 0x05, 0xb4]);
        assert_eq!(u16::from_be_bytes([f[50], f[51]]), tcp_checksum(&f));
        assert!(!lower_syn_mss(&mut f, 1460));
        // Smaller already, or no SYN: untouched.
        let mut small = frame(&[2, 4, 0x02, 0x18], 0x12, &[]);
        let before = small.clone();
        assert!(!lower_syn_mss(&mut small, 1460));
        assert_eq!(small, before);
        let mut data = frame(&[2, 4, 0xff, 0xd7], 0x10, b"x");
        let before = data.clone();
        assert!(!lower_syn_mss(&mut data, 1460));
        assert_eq!(data, before);
    }

    #[test]
    fn transmit_carries_the_pseudo_header_sum_and_segments_only_large_payloads() {
        let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
        let mut big = frame(&[], 0x18, &payload);
        let whole = tcp_checksum(&big);
        let offload = prepare_tcp(&mut big, 1500).expect("a TCP frame");
        assert_eq!(
            offload,
            TxOffload {
                csum_start: 34,
                csum_offset: 16,
                gso: Some(Gso {
                    hdr_len: 54,
                    gso_size: 1460
                }),
            }
        );
        // What the device does: sum from csum_start with the partial sum in place,
        // complemented, gives the whole segment's checksum.
        let device = !fold(sum_words(0, &big[34..]));
        assert_eq!(device, whole);
        // A payload that fits one link frame: checksum only.
        let mut small = frame(&[], 0x18, &payload[..1460]);
        assert_eq!(prepare_tcp(&mut small, 1500).and_then(|o| o.gso), None);
        // An odd length sums its last byte as the high half of a word.
        let mut odd = frame(&[], 0x18, &payload[..101]);
        let whole = tcp_checksum(&odd);
        assert!(prepare_tcp(&mut odd, 1500).is_some());
        assert_eq!(!fold(sum_words(0, &odd[34..])), whole);
    }

    #[test]
    fn frames_other_than_whole_ipv4_tcp_segments_are_not_touched() {
        let mut udp = frame(&[], 0x18, b"x");
        udp[14 + 9] = 17;
        assert_eq!(prepare_tcp(&mut udp, 1500), None);
        let mut fragment = frame(&[], 0x18, b"x");
        fragment[14 + 6] = 0x20; // more fragments
        assert_eq!(prepare_tcp(&mut fragment, 1500), None);
        let mut short = frame(&[], 0x18, b"xyz");
        let n = short.len();
        assert_eq!(prepare_tcp(&mut short[..n - 1], 1500), None);
    }

    #[test]
    fn received_headers_say_partial_valid_or_unchecked() {
        assert_eq!(
            rx_checksum(&[1, 1, 54, 0, 0xb4, 0x05, 34, 0, 16, 0, 0, 0]),
            RxChecksum::Partial {
                csum_start: 34,
                csum_offset: 16
            }
        );
        assert_eq!(
            rx_checksum(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            RxChecksum::Valid
        );
        assert_eq!(rx_checksum(&[0; 12]), RxChecksum::Unchecked);
        assert_eq!(rx_checksum(&[]), RxChecksum::Unchecked);
    }

    #[test]
    fn a_partial_checksum_is_completed_to_the_whole_one() {
        // A 64 KiB superframe (and an odd-length one) as the host's stack leaves it: the
        // pseudo-header sum in the field, as `prepare_tcp` writes it.
        for len in [65495usize, 1001] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            let good = frame(&[], 0x18, &payload);
            let mut f = good.clone();
            let o = prepare_tcp(&mut f, 1500).expect("a TCP frame");
            assert_ne!(f, good);
            assert!(!tcp_checksum_ok(&f));
            assert!(complete_checksum(&mut f, o.csum_start, o.csum_offset));
            assert_eq!(f, good);
            assert!(tcp_checksum_ok(&f));
        }
        let mut short = frame(&[], 0x10, &[]);
        let copy = short.clone();
        assert!(!complete_checksum(&mut short, 53, 1));
        assert!(!complete_checksum(&mut short, 54, 0));
        assert_eq!(short, copy);
    }

    #[test]
    fn tcp_checksums_are_checked_and_other_frames_pass() {
        let mut f = frame(&[], 0x18, b"some payload bytes");
        assert!(tcp_checksum_ok(&f));
        let last = f.len() - 1;
        f[last] ^= 0x40;
        assert!(!tcp_checksum_ok(&f));
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(tcp_checksum_ok(&arp));
        assert!(!is_ipv4_tcp(&arp));
        assert!(is_ipv4_tcp(&f));
    }
}
