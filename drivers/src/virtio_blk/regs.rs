//! virtio-blk wire formats: feature bits, the device configuration layout, request header,
//! discard segment and status codes (virtio 1.2 §5.2). The virtio-pci layouts both drivers
//! program are in `crate::virtio::regs`.

use bitflags::bitflags;

bitflags! {
    /// Feature bits we may negotiate (virtio 1.2 §5.2.3 and §6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct BlkFeatures: u64 {
        /// `VIRTIO_BLK_F_SIZE_MAX`: `size_max` bounds each segment.
        const SIZE_MAX = 1 << 1;
        /// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` bounds segments per request.
        const SEG_MAX = 1 << 2;
        /// `VIRTIO_BLK_F_RO`: the device is read-only.
        const RO = 1 << 5;
        /// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is the logical block size.
        const BLK_SIZE = 1 << 6;
        /// `VIRTIO_BLK_F_FLUSH`: flush command (and a possibly volatile cache).
        const FLUSH = 1 << 9;
        /// `VIRTIO_BLK_F_TOPOLOGY`: physical block and optimal I/O hints.
        const TOPOLOGY = 1 << 10;
        /// `VIRTIO_BLK_F_CONFIG_WCE`: `writeback` reports (and can set) the cache mode.
        const CONFIG_WCE = 1 << 11;
        /// `VIRTIO_BLK_F_DISCARD`: discard command.
        const DISCARD = 1 << 13;
        /// `VIRTIO_F_RING_EVENT_IDX`: `used_event`/`avail_event` notification suppression.
        const RING_EVENT_IDX = 1 << 29;
        /// `VIRTIO_F_VERSION_1`: a modern (non-legacy) device; required.
        const VERSION_1 = 1 << 32;
    }
}

/// Device configuration (`struct virtio_blk_config`) byte offsets.
pub mod config {
    /// `capacity`: le64, in 512-byte sectors (read as two le32: config space is only
    /// guaranteed 4-byte aligned).
    pub const CAPACITY: usize = 0;
    /// `size_max`: le32, largest segment in bytes.
    pub const SIZE_MAX: usize = 8;
    /// `seg_max`: le32, segments per request.
    pub const SEG_MAX: usize = 12;
    /// `blk_size`: le32, logical block size.
    pub const BLK_SIZE: usize = 20;
    /// `writeback`: u8, 1 = write-back cache, 0 = write-through.
    pub const WRITEBACK: usize = 32;
    /// `max_discard_sectors`: le32.
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// `max_discard_seg`: le32.
    pub const MAX_DISCARD_SEG: usize = 40;
    /// `discard_sector_alignment`: le32.
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
}

/// Sector size of the virtio-blk protocol: `sector` and `capacity` always count 512 bytes.
pub const SECTOR_SIZE: u64 = 512;

/// `VIRTIO_BLK_T_IN`: read.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`: flush the volatile cache.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`: read the 20-byte device ID (serial).
pub const T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`: discard ranges.
pub const T_DISCARD: u32 = 11;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;
/// Written into the status byte before submission; a device that completes without writing
/// the status leaves it, and we report an I/O error.
pub const STATUS_UNSET: u8 = 0xff;

/// Length of the device ID returned by `GET_ID`.
pub const ID_LEN: usize = 20;
/// Length of `struct virtio_blk_req`'s header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: usize = 16;
/// Length of `struct virtio_blk_discard_write_zeroes`.
pub const DISCARD_SEGMENT_LEN: usize = 16;

/// Encodes a request header.
pub fn encode_header(out: &mut [u8; HEADER_LEN], request_type: u32, sector: u64) {
    out[0..4].copy_from_slice(&request_type.to_le_bytes());
    out[4..8].copy_from_slice(&0u32.to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
}

/// Encodes one discard segment (`flags` = 0: no unmap hint needed for discard).
pub fn encode_discard(out: &mut [u8; DISCARD_SEGMENT_LEN], sector: u64, sectors: u32) {
    out[0..8].copy_from_slice(&sector.to_le_bytes());
    out[8..12].copy_from_slice(&sectors.to_le_bytes());
    out[12..16].copy_from_slice(&0u32.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_discard_layout() {
        let mut h = [0u8; HEADER_LEN];
        encode_header(&mut h, T_OUT, 0x0102_0304_0506_0708);
        assert_eq!(h, [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        let mut d = [0xffu8; DISCARD_SEGMENT_LEN];
        encode_discard(&mut d, 9, 0x10);
        assert_eq!(d, [9, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(BlkFeatures::VERSION_1.bits(), 1 << 32);
        assert_eq!(BlkFeatures::FLUSH.bits(), 0x200);
    }
}
