//! NVMe commands: the 64-byte submission queue entry ([`Command`]), the 16-byte completion
//! queue entry ([`CompletionEntry`]), builders for the admin and NVM commands the driver
//! issues, and parsers for the Identify data structures. All safe code: queues copy entries in
//! and out of DMA memory (`queue`), this module only deals in values and byte slices.
//!
//! Spec: NVMe Base 2.0 §4.2 (SQE), §4.6 (CQE), §5.x admin commands (Create/Delete I/O
//! Completion/Submission Queue §5.4–5.7, Identify §5.17, Set/Get Features §5.27/§5.15 with
//! Number of Queues §5.27.1.5 and Volatile Write Cache §5.27.1.4); NVM Command Set 1.0 §3
//! (Read, Write with FUA, Flush, Dataset Management) and §4.1.5 (Identify Namespace).

use super::status::StatusField;
use crate::info::FixedString;

/// Admin opcode: Delete I/O Submission Queue.
pub const ADMIN_DELETE_SQ: u8 = 0x00;
/// Admin opcode: Create I/O Submission Queue.
pub const ADMIN_CREATE_SQ: u8 = 0x01;
/// Admin opcode: Delete I/O Completion Queue.
pub const ADMIN_DELETE_CQ: u8 = 0x04;
/// Admin opcode: Create I/O Completion Queue.
pub const ADMIN_CREATE_CQ: u8 = 0x05;
/// Admin opcode: Identify.
pub const ADMIN_IDENTIFY: u8 = 0x06;
/// Admin opcode: Set Features.
pub const ADMIN_SET_FEATURES: u8 = 0x09;
/// Admin opcode: Get Features.
pub const ADMIN_GET_FEATURES: u8 = 0x0a;

/// NVM opcode: Flush.
pub const NVM_FLUSH: u8 = 0x00;
/// NVM opcode: Write.
pub const NVM_WRITE: u8 = 0x01;
/// NVM opcode: Read.
pub const NVM_READ: u8 = 0x02;
/// NVM opcode: Dataset Management.
pub const NVM_DATASET_MANAGEMENT: u8 = 0x09;

/// Identify CNS: namespace data structure for `NSID`.
pub const CNS_NAMESPACE: u8 = 0x00;
/// Identify CNS: controller data structure.
pub const CNS_CONTROLLER: u8 = 0x01;
/// Identify CNS: active namespace ID list (NSIDs above `NSID`).
pub const CNS_ACTIVE_NAMESPACES: u8 = 0x02;

/// Feature: Volatile Write Cache.
pub const FEATURE_VOLATILE_WRITE_CACHE: u8 = 0x06;
/// Feature: Number of Queues.
pub const FEATURE_NUMBER_OF_QUEUES: u8 = 0x07;

/// Write CDW12 bit 30: Force Unit Access.
pub const FUA: u32 = 1 << 30;
/// Dataset Management CDW11 bit 2: Attribute – Deallocate.
pub const DSM_DEALLOCATE: u32 = 1 << 2;

/// Size of a submission queue entry.
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry.
pub const CQE_SIZE: usize = 16;
/// Size of an Identify data structure.
pub const IDENTIFY_SIZE: usize = 4096;

/// A submission queue entry, as 16 dwords (NVMe Base 2.0 Figure 88).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// The dwords, little-endian on the wire.
    pub dw: [u32; 16],
}

impl Command {
    /// A command with `opcode` and `nsid`, everything else zero (PRP data transfer).
    pub fn new(opcode: u8, nsid: u32) -> Self {
        let mut dw = [0; 16];
        dw[0] = u32::from(opcode);
        dw[1] = nsid;
        Self { dw }
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.dw[0] as u8
    }

    /// `CID`: the command identifier (CDW0 31:16).
    pub fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }

    /// Sets the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        self.dw[0] = (self.dw[0] & 0xffff) | u32::from(cid) << 16;
    }

    /// `NSID`.
    pub fn nsid(&self) -> u32 {
        self.dw[1]
    }

    /// `PRP1` (DPTR bits 63:0).
    pub fn prp1(&self) -> u64 {
        u64::from(self.dw[7]) << 32 | u64::from(self.dw[6])
    }

    /// `PRP2` (DPTR bits 127:64).
    pub fn prp2(&self) -> u64 {
        u64::from(self.dw[9]) << 32 | u64::from(self.dw[8])
    }

    /// Sets the data pointer.
    pub fn set_prps(&mut self, prp1: u64, prp2: u64) {
        self.dw[6] = prp1 as u32;
        self.dw[7] = (prp1 >> 32) as u32;
        self.dw[8] = prp2 as u32;
        self.dw[9] = (prp2 >> 32) as u32;
    }

    /// `CDW10`..`CDW15` by number (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        self.dw.get(n).copied().unwrap_or(0)
    }

    /// The entry as bytes.
    pub fn to_bytes(self) -> [u8; SQE_SIZE] {
        let mut out = [0u8; SQE_SIZE];
        for (chunk, dw) in out.chunks_exact_mut(4).zip(self.dw) {
            chunk.copy_from_slice(&dw.to_le_bytes());
        }
        out
    }

    /// Parses an entry (for the fake controller).
    pub fn from_bytes(bytes: &[u8; SQE_SIZE]) -> Self {
        let mut dw = [0u32; 16];
        for (d, chunk) in dw.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Self { dw }
    }

    /// Identify with `cns` for `nsid`; the 4 KiB answer goes to `page` (PRP1, page-aligned).
    pub fn identify(cns: u8, nsid: u32, page: u64) -> Self {
        let mut c = Self::new(ADMIN_IDENTIFY, nsid);
        c.set_prps(page, 0);
        c.dw[10] = u32::from(cns);
        c
    }

    /// Set Features Number of Queues: ask for `sq` I/O submission and `cq` I/O completion
    /// queues (both at least 1).
    pub fn set_number_of_queues(sq: u16, cq: u16) -> Self {
        let mut c = Self::new(ADMIN_SET_FEATURES, 0);
        c.dw[10] = u32::from(FEATURE_NUMBER_OF_QUEUES);
        c.dw[11] = u32::from(cq.saturating_sub(1)) << 16 | u32::from(sq.saturating_sub(1));
        c
    }

    /// Get Features for feature `fid` (current value).
    pub fn get_features(fid: u8) -> Self {
        let mut c = Self::new(ADMIN_GET_FEATURES, 0);
        c.dw[10] = u32::from(fid);
        c
    }

    /// Set Features Volatile Write Cache: `WCE` = `enable`.
    pub fn set_volatile_write_cache(enable: bool) -> Self {
        let mut c = Self::new(ADMIN_SET_FEATURES, 0);
        c.dw[10] = u32::from(FEATURE_VOLATILE_WRITE_CACHE);
        c.dw[11] = u32::from(enable);
        c
    }

    /// Create I/O Completion Queue `qid` of `entries` at `phys` (physically contiguous),
    /// interrupting on MSI-X table entry `vector`.
    pub fn create_cq(qid: u16, entries: u16, phys: u64, vector: u16) -> Self {
        let mut c = Self::new(ADMIN_CREATE_CQ, 0);
        c.set_prps(phys, 0);
        c.dw[10] = u32::from(entries.saturating_sub(1)) << 16 | u32::from(qid);
        // IV 31:16, IEN bit 1, PC bit 0.
        c.dw[11] = u32::from(vector) << 16 | 1 << 1 | 1;
        c
    }

    /// Create I/O Submission Queue `qid` of `entries` at `phys`, completing to `cqid`.
    pub fn create_sq(qid: u16, entries: u16, phys: u64, cqid: u16) -> Self {
        let mut c = Self::new(ADMIN_CREATE_SQ, 0);
        c.set_prps(phys, 0);
        c.dw[10] = u32::from(entries.saturating_sub(1)) << 16 | u32::from(qid);
        // CQID 31:16, QPRIO 00b (urgent; ignored under round robin), PC bit 0.
        c.dw[11] = u32::from(cqid) << 16 | 1;
        c
    }

    /// Delete I/O Submission Queue `qid`.
    pub fn delete_sq(qid: u16) -> Self {
        let mut c = Self::new(ADMIN_DELETE_SQ, 0);
        c.dw[10] = u32::from(qid);
        c
    }

    /// Delete I/O Completion Queue `qid`.
    pub fn delete_cq(qid: u16) -> Self {
        let mut c = Self::new(ADMIN_DELETE_CQ, 0);
        c.dw[10] = u32::from(qid);
        c
    }

    /// Read or Write of `blocks` (1..=65536) logical blocks at `lba`; PRPs set separately.
    pub fn read_write(write: bool, nsid: u32, lba: u64, blocks: u32, fua: bool) -> Self {
        let mut c = Self::new(if write { NVM_WRITE } else { NVM_READ }, nsid);
        c.dw[10] = lba as u32;
        c.dw[11] = (lba >> 32) as u32;
        c.dw[12] = (blocks.saturating_sub(1) & 0xffff) | if fua { FUA } else { 0 };
        c
    }

    /// Flush of `nsid`'s volatile write cache.
    pub fn flush(nsid: u32) -> Self {
        Self::new(NVM_FLUSH, nsid)
    }

    /// Dataset Management, deallocate, with one range stored at `ranges` (see
    /// [`dsm_range`]).
    pub fn deallocate(nsid: u32, ranges: u64) -> Self {
        let mut c = Self::new(NVM_DATASET_MANAGEMENT, nsid);
        c.set_prps(ranges, 0);
        c.dw[10] = 0; // NR: one range (0's based)
        c.dw[11] = DSM_DEALLOCATE;
        c
    }
}

/// A Dataset Management range (NVM Command Set 1.0 Figure 39): context attributes, length in
/// logical blocks, starting LBA.
pub fn dsm_range(lba: u64, blocks: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[4..8].copy_from_slice(&blocks.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    out
}

/// A completion queue entry (NVMe Base 2.0 Figure 90).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionEntry {
    /// DW0: command specific result.
    pub result: u32,
    /// `SQHD`: submission queue head pointer.
    pub sq_head: u16,
    /// `SQID`: submission queue the command came from.
    pub sq_id: u16,
    /// `CID`.
    pub cid: u16,
    /// `P`: phase tag.
    pub phase: bool,
    /// The status field.
    pub status: StatusField,
}

impl CompletionEntry {
    /// Decodes the four dwords.
    pub fn from_dwords(dw: [u32; 4]) -> Self {
        Self {
            result: dw[0],
            sq_head: dw[2] as u16,
            sq_id: (dw[2] >> 16) as u16,
            cid: dw[3] as u16,
            phase: dw[3] & (1 << 16) != 0,
            status: StatusField::from_dw3(dw[3]),
        }
    }

    /// Encodes the four dwords (for the fake controller).
    pub fn to_dwords(self) -> [u32; 4] {
        [
            self.result,
            0,
            u32::from(self.sq_id) << 16 | u32::from(self.sq_head),
            u32::from(self.status.0) << 17 | u32::from(self.phase) << 16 | u32::from(self.cid),
        ]
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// What we use of the Identify Controller data structure (NVMe Base 2.0 Figure 275).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    /// `VID`: PCI vendor ID.
    pub vendor_id: u16,
    /// `SN`: serial number.
    pub serial: FixedString<20>,
    /// `MN`: model number.
    pub model: FixedString<40>,
    /// `FR`: firmware revision.
    pub firmware: FixedString<8>,
    /// `MDTS`: maximum data transfer size, as a power of two in units of `CAP.MPSMIN`
    /// (0 = no limit).
    pub mdts: u8,
    /// `CNTLID`: controller ID.
    pub controller_id: u16,
    /// `VER`: version (major 31:16, minor 15:8), 0 before NVMe 1.2.
    pub version: u32,
    /// `SQES`: required (3:0) and maximum (7:4) submission queue entry size exponents.
    pub sqes: u8,
    /// `CQES`: required (3:0) and maximum (7:4) completion queue entry size exponents.
    pub cqes: u8,
    /// `NN`: number of namespaces (highest valid NSID).
    pub namespace_count: u32,
    /// `ONCS`: optional NVM command support.
    pub oncs: u16,
    /// `VWC`: volatile write cache (bit 0: present).
    pub vwc: u8,
}

impl IdentifyController {
    /// Parses a 4 KiB Identify Controller page.
    pub fn parse(page: &[u8; IDENTIFY_SIZE]) -> Self {
        Self {
            vendor_id: le16(page, 0),
            serial: FixedString::from_device_bytes(&page[4..24]),
            model: FixedString::from_device_bytes(&page[24..64]),
            firmware: FixedString::from_device_bytes(&page[64..72]),
            mdts: page[77],
            controller_id: le16(page, 78),
            version: le32(page, 80),
            sqes: page[512],
            cqes: page[513],
            namespace_count: le32(page, 516),
            oncs: le16(page, 520),
            vwc: page[525],
        }
    }

    /// `ONCS` bit 2: Dataset Management is supported.
    pub fn supports_dataset_management(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    /// `VWC` bit 0: a volatile write cache is present.
    pub fn volatile_write_cache_present(&self) -> bool {
        self.vwc & 1 != 0
    }

    /// Largest transfer in bytes for a minimum page size of `2^page_shift`, `None` when
    /// unlimited.
    pub fn max_transfer_bytes(&self, page_shift: u32) -> Option<u64> {
        (self.mdts != 0).then(|| 1u64 << (u32::from(self.mdts) + page_shift).min(40))
    }
}

/// What we use of the Identify Namespace data structure (NVM Command Set 1.0 Figure 97).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// `NSZE`: namespace size in logical blocks.
    pub size: u64,
    /// `NCAP`: namespace capacity.
    pub capacity: u64,
    /// Logical block size exponent (`LBADS` of the format in use).
    pub lba_shift: u8,
    /// Metadata bytes per block of the format in use (`MS`); we support only 0.
    pub metadata_size: u16,
    /// `NSATTR` bit 0: the namespace is write protected.
    pub write_protected: bool,
    /// `NGUID`: namespace globally unique identifier (bytes 104..120); all zero when the
    /// controller does not report one.
    pub nguid: [u8; 16],
    /// `EUI64`: IEEE extended unique identifier (bytes 120..128); all zero when not reported.
    pub eui64: [u8; 8],
}

impl IdentifyNamespace {
    /// Parses a 4 KiB Identify Namespace page.
    pub fn parse(page: &[u8; IDENTIFY_SIZE]) -> Self {
        let flbas = page[26];
        // FLBAS 3:0 is the format index; NVMe 2.0 adds bits 6:5 as its upper bits.
        let index = usize::from(flbas & 0xf) | usize::from((flbas >> 5) & 3) << 4;
        let lbaf = le32(page, 128 + 4 * index.min(63));
        Self {
            size: le64(page, 0),
            capacity: le64(page, 8),
            lba_shift: (lbaf >> 16) as u8,
            metadata_size: lbaf as u16,
            write_protected: page[99] & 1 != 0,
            nguid: page[104..120].try_into().unwrap_or([0; 16]),
            eui64: page[120..128].try_into().unwrap_or([0; 8]),
        }
    }

    /// Logical block size in bytes, `None` when the format is unusable (below 512 bytes or
    /// above 64 KiB; a zeroed page for an inactive namespace lands here).
    pub fn block_size(&self) -> Option<u32> {
        (9..=16)
            .contains(&self.lba_shift)
            .then(|| 1u32 << self.lba_shift)
    }
}

/// Active NSIDs from an Identify CNS 02h page: ascending, ended by 0.
pub fn active_namespaces(page: &[u8; IDENTIFY_SIZE]) -> impl Iterator<Item = u32> + '_ {
    page.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&id| id != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_layout() {
        let mut c = Command::read_write(true, 3, 0x1_2345_6789, 8, true);
        c.set_cid(0xbeef);
        c.set_prps(0x1000, 0x2_0000_3000);
        assert_eq!(c.opcode(), NVM_WRITE);
        assert_eq!((c.cid(), c.nsid()), (0xbeef, 3));
        assert_eq!((c.cdw(10), c.cdw(11), c.cdw(12)), (0x2345_6789, 1, 7 | FUA));
        assert_eq!((c.prp1(), c.prp2()), (0x1000, 0x2_0000_3000));
        let bytes = c.to_bytes();
        assert_eq!(&bytes[0..4], &[0x01, 0, 0xef, 0xbe]);
        assert_eq!(Command::from_bytes(&bytes), c);

        let cq = Command::create_cq(2, 64, 0x8000, 2);
        assert_eq!((cq.cdw(10), cq.cdw(11)), (63 << 16 | 2, 2 << 16 | 3));
        let sq = Command::create_sq(2, 64, 0x9000, 2);
        assert_eq!((sq.cdw(10), sq.cdw(11)), (63 << 16 | 2, 2 << 16 | 1));
        let nq = Command::set_number_of_queues(4, 4);
        assert_eq!(nq.cdw(11), 3 << 16 | 3);
        assert_eq!(
            Command::read_write(false, 1, 0, 65536, false).cdw(12),
            0xffff
        );
        assert_eq!(
            &dsm_range(0x10, 8)[4..],
            &[8, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn completion_round_trip() {
        let e = CompletionEntry {
            result: 0x0003_0003,
            sq_head: 5,
            sq_id: 1,
            cid: 9,
            phase: true,
            status: StatusField(0x4080),
        };
        assert_eq!(CompletionEntry::from_dwords(e.to_dwords()), e);
    }

    #[test]
    fn identify_parsing() {
        let mut page = [0u8; IDENTIFY_SIZE];
        page[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        page[4..12].copy_from_slice(b"SER123  ");
        page[24..28].copy_from_slice(b"QEMU");
        page[24 + 4..64].fill(b' ');
        page[64..72].copy_from_slice(b"1.0     ");
        page[77] = 5;
        page[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
        page[512] = 0x66;
        page[513] = 0x44;
        page[516..520].copy_from_slice(&2u32.to_le_bytes());
        page[520..522].copy_from_slice(&0x0004u16.to_le_bytes());
        page[525] = 1;
        let id = IdentifyController::parse(&page);
        assert_eq!(id.serial.as_str(), "SER123");
        assert_eq!(id.model.as_str(), "QEMU");
        assert_eq!(id.firmware.as_str(), "1.0");
        assert_eq!(id.max_transfer_bytes(12), Some(128 * 1024));
        assert!(id.supports_dataset_management() && id.volatile_write_cache_present());
        assert_eq!(id.namespace_count, 2);

        let mut ns = [0u8; IDENTIFY_SIZE];
        ns[0..8].copy_from_slice(&1000u64.to_le_bytes());
        ns[26] = 1; // format 1
        ns[128 + 4..128 + 8].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let parsed = IdentifyNamespace::parse(&ns);
        assert_eq!((parsed.size, parsed.block_size()), (1000, Some(4096)));
        assert_eq!((parsed.nguid, parsed.eui64), ([0; 16], [0; 8]));
        ns[104..120].copy_from_slice(&[0xab; 16]);
        ns[120..128].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let parsed = IdentifyNamespace::parse(&ns);
        assert_eq!(parsed.nguid, [0xab; 16]);
        assert_eq!(parsed.eui64, [1, 2, 3, 4, 5, 6, 7, 8]);
        ns[26] = 0;
        assert_eq!(IdentifyNamespace::parse(&ns).block_size(), None);

        let mut list = [0u8; IDENTIFY_SIZE];
        list[0..4].copy_from_slice(&1u32.to_le_bytes());
        list[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(active_namespaces(&list).collect::<Vec<_>>(), vec![1, 7]);
    }
}
