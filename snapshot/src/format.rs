//! On-disk layout of Linux dm-snapshot's persistent exception store, version 1.
//!
//! Pure encode/decode and geometry, no I/O. See `shared/docs/dm-snapshot-format.md`
//! ("Chunk 0: header", "Exception records and areas"); the loader that walks a whole store is
//! in [`crate::store`]. Everything here mirrors Linux `dm-snap-persistent.c`: little-endian
//! fields, `epa = chunk_sectors * 512 / 16` records per metadata area, area `k` at chunk
//! `1 + k * (epa + 1)`, a record with `new_chunk == 0` ends the table.
//!
//! The *binding record* is snapfw's own: it lives in chunk 0 right after the 16-byte header
//! (bytes Linux leaves zero and never reads), names the snapshot and its origin, and carries a
//! checksum so random bytes are never mistaken for a binding.

/// Bytes per sector.
pub const SECTOR_BYTES: usize = 512;
/// `"SnAp"` read as a little-endian `u32`.
pub const SNAP_MAGIC: u32 = 0x7041_6E53;
/// The only store version Linux (and snapfw) accepts.
pub const SNAPSHOT_DISK_VERSION: u32 = 1;
/// Bytes of the header at the start of chunk 0.
pub const HEADER_BYTES: usize = 16;
/// Bytes of one exception record.
pub const RECORD_BYTES: usize = 16;
/// Largest chunk size Linux accepts, in sectors (2^21).
pub const MAX_CHUNK_SECTORS: u32 = 1 << 21;
/// Smallest chunk size snapfw creates stores with (a store must hold its header and a record).
pub const MIN_CHUNK_SECTORS: u32 = 1;

/// The 16-byte header in chunk 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `SNAP_MAGIC`, or 0 for "new store".
    pub magic: u32,
    /// 1 usable, 0 invalidated for good.
    pub valid: u32,
    /// Must be 1.
    pub version: u32,
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
}

impl Header {
    /// A valid header for a store with the given chunk size.
    pub fn new(chunk_sectors: u32) -> Self {
        Header {
            magic: SNAP_MAGIC,
            valid: 1,
            version: SNAPSHOT_DISK_VERSION,
            chunk_sectors,
        }
    }

    /// Decodes the header from the first 16 bytes of `bytes`; `None` if `bytes` is shorter.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        Some(Header {
            magic: read_u32(bytes, 0)?,
            valid: read_u32(bytes, 4)?,
            version: read_u32(bytes, 8)?,
            chunk_sectors: read_u32(bytes, 12)?,
        })
    }

    /// Encodes into the first 16 bytes of `out` (which must hold at least 16 bytes).
    pub fn encode(&self, out: &mut [u8]) {
        write_u32(out, 0, self.magic);
        write_u32(out, 4, self.valid);
        write_u32(out, 8, self.version);
        write_u32(out, 12, self.chunk_sectors);
    }
}

/// One exception: origin chunk `old_chunk` is preserved in COW chunk `new_chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Record {
    /// Chunk index on the origin.
    pub old_chunk: u64,
    /// Chunk index on the COW device; 0 terminates the table.
    pub new_chunk: u64,
}

impl Record {
    /// Decodes record `index` of an area buffer; `None` past the end of `area`.
    pub fn decode(area: &[u8], index: usize) -> Option<Self> {
        let at = index.checked_mul(RECORD_BYTES)?;
        Some(Record {
            old_chunk: read_u64(area, at)?,
            new_chunk: read_u64(area, at.checked_add(8)?)?,
        })
    }

    /// Encodes as record `index` of an area buffer. Returns false if it does not fit.
    pub fn encode(&self, area: &mut [u8], index: usize) -> bool {
        let at = index * RECORD_BYTES;
        if at + RECORD_BYTES > area.len() {
            return false;
        }
        area[at..at + 8].copy_from_slice(&self.old_chunk.to_le_bytes());
        area[at + 8..at + 16].copy_from_slice(&self.new_chunk.to_le_bytes());
        true
    }
}

/// Geometry of a store with a given chunk size: where areas are, which chunks are metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Chunk size in sectors (a power of two).
    pub chunk_sectors: u32,
    /// Records per metadata area: `chunk_sectors * 512 / 16`.
    pub exceptions_per_area: u64,
}

impl Geometry {
    /// Geometry for a power-of-two chunk size in `1..=MAX_CHUNK_SECTORS`; `None` otherwise.
    pub fn new(chunk_sectors: u32) -> Option<Self> {
        if chunk_sectors == 0
            || !chunk_sectors.is_power_of_two()
            || chunk_sectors > MAX_CHUNK_SECTORS
        {
            return None;
        }
        Some(Geometry {
            chunk_sectors,
            exceptions_per_area: u64::from(chunk_sectors) * SECTOR_BYTES as u64
                / RECORD_BYTES as u64,
        })
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_sectors as usize * SECTOR_BYTES
    }

    /// Distance in chunks between consecutive metadata areas.
    pub fn stride(&self) -> u64 {
        self.exceptions_per_area + 1
    }

    /// Chunk index of metadata area `area`.
    pub fn area_chunk(&self, area: u64) -> u64 {
        1 + area.saturating_mul(self.stride())
    }

    /// Whether COW chunk `chunk` holds the header or a metadata area.
    pub fn is_metadata_chunk(&self, chunk: u64) -> bool {
        chunk == 0 || chunk % self.stride() == 1
    }

    /// The chunk after `chunk` that can hold data (skips a metadata area, as Linux's
    /// `skip_metadata` does).
    pub fn next_data_chunk(&self, chunk: u64) -> u64 {
        let mut next = chunk + 1;
        if next % self.stride() == 1 {
            next += 1;
        }
        next
    }

    /// Sector of chunk `chunk`.
    pub fn chunk_sector(&self, chunk: u64) -> u64 {
        chunk.saturating_mul(u64::from(self.chunk_sectors))
    }

    /// The metadata area that describes data chunk `chunk`.
    pub fn area_of_data_chunk(&self, chunk: u64) -> u64 {
        (chunk.saturating_sub(1)) / self.stride()
    }
}

/// Most bytes of a snapshot name in a binding.
pub const BINDING_NAME_BYTES: usize = 64;
/// Most bytes of an origin serial number in a binding.
pub const BINDING_SERIAL_BYTES: usize = 40;
/// Magic at the start of a version-1 binding record (no region, no flags): `"snapfwB1"`.
pub const BINDING_MAGIC_V1: [u8; 8] = *b"snapfwB1";
/// Magic at the start of a version-2 binding record (no origin identity): `"snapfwB2"`.
pub const BINDING_MAGIC_V2: [u8; 8] = *b"snapfwB2";
/// Magic at the start of the binding record snapfw writes: `"snapfwB3"`.
pub const BINDING_MAGIC: [u8; 8] = *b"snapfwB3";
/// Bytes of a version-1 binding.
pub const BINDING_V1_BYTES: usize =
    8 + 1 + BINDING_NAME_BYTES + 1 + BINDING_SERIAL_BYTES + 8 + 4 + 8 + 4;
/// Bytes of a version-2 binding (version 1 plus region start, region length and flags before
/// the checksum).
pub const BINDING_V2_BYTES: usize = BINDING_V1_BYTES + 8 + 8 + 4;
/// Bytes the binding occupies after the header (version 3 adds the origin's identity: a kind
/// byte, a namespace ID and 16 identifier bytes, before the checksum).
pub const BINDING_BYTES: usize = BINDING_V2_BYTES + 1 + 4 + 16;
/// Binding flag: the snapshot accepts writes.
pub const BINDING_FLAG_WRITABLE: u32 = 1;
/// Byte offset of the binding record in chunk 0.
pub const BINDING_OFFSET: usize = HEADER_BYTES;

/// snapfw's binding record: which snapshot this store is and which origin it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Snapshot name (UTF-8 not required; at most 64 bytes).
    pub name: BoundedBytes<BINDING_NAME_BYTES>,
    /// Origin device serial number (at most 40 bytes).
    pub origin_serial: BoundedBytes<BINDING_SERIAL_BYTES>,
    /// Origin capacity in sectors.
    pub origin_sectors: u64,
    /// Chunk size in sectors (the header's, repeated so a binding can be checked on its own).
    pub chunk_sectors: u32,
    /// Creation time, seconds since the Unix epoch (as the caller's clock tells).
    pub created_unix_seconds: u64,
    /// First sector of the store on its device (0 for a whole-device store). Boot discovery
    /// checks it against where the store was found and looks for the next store (or free
    /// extent marker) at `region_start + region_sectors`.
    pub region_start: u64,
    /// Sectors of the store's region; 0 when unknown (a version-1 binding: the whole device).
    pub region_sectors: u64,
    /// `BINDING_FLAG_*` bits.
    pub flags: u32,
    /// What identifies the origin besides `origin_serial` and `origin_sectors`.
    pub origin_id: OriginId,
}

/// How a binding identifies its origin device (version 3). Boot discovery re-attaches a store
/// only to the one device this identity names unambiguously (see the kernel's
/// `storage::identity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginId {
    /// A binding from before version 3: the serial number (and size) is all there is.
    Legacy,
    /// The device's serial number (`origin_serial`), e.g. a virtio-blk disk's `serial=`.
    Serial,
    /// An NVMe namespace's NGUID.
    Nguid([u8; 16]),
    /// An NVMe namespace's EUI-64.
    Eui64([u8; 8]),
    /// An NVMe namespace without NGUID or EUI-64: its controller's serial number
    /// (`origin_serial`) and this namespace ID.
    NvmeNamespace(u32),
    /// Chosen by the operator (`snapshot attach`) for an origin that has no identity of its
    /// own: the PCI location (bus, device, function) of the origin and of the device holding
    /// the store, and the origin's namespace ID (0 when not NVMe).
    Location {
        /// Origin's PCI bus, device, function.
        origin_pci: [u8; 3],
        /// Origin's NVMe namespace ID, 0 for other devices.
        nsid: u32,
        /// PCI bus, device, function of the device that holds the store.
        cow_pci: [u8; 3],
    },
}

impl OriginId {
    /// (kind byte, namespace ID, identifier bytes) as stored.
    fn to_raw(self) -> (u8, u32, [u8; 16]) {
        let mut id = [0u8; 16];
        match self {
            OriginId::Legacy => (0, 0, id),
            OriginId::Serial => (1, 0, id),
            OriginId::Nguid(g) => (2, 0, g),
            OriginId::Eui64(e) => {
                id[..8].copy_from_slice(&e);
                (3, 0, id)
            }
            OriginId::NvmeNamespace(nsid) => (4, nsid, id),
            OriginId::Location {
                origin_pci,
                nsid,
                cow_pci,
            } => {
                id[..3].copy_from_slice(&origin_pci);
                id[3..6].copy_from_slice(&cow_pci);
                (5, nsid, id)
            }
        }
    }

    /// The identity stored as `(kind, nsid, id)`; `None` for an unknown kind.
    fn from_raw(kind: u8, nsid: u32, id: [u8; 16]) -> Option<Self> {
        let mut eui = [0u8; 8];
        eui.copy_from_slice(&id[..8]);
        let pci = |at: usize| [id[at], id[at + 1], id[at + 2]];
        Some(match kind {
            0 => OriginId::Legacy,
            1 => OriginId::Serial,
            2 => OriginId::Nguid(id),
            3 => OriginId::Eui64(eui),
            4 => OriginId::NvmeNamespace(nsid),
            5 => OriginId::Location {
                origin_pci: pci(0),
                nsid,
                cow_pci: pci(3),
            },
            _ => return None,
        })
    }
}

/// A byte string of at most `N` bytes, stored inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BoundedBytes<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> core::fmt::Debug for BoundedBytes<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match core::str::from_utf8(self.as_bytes()) {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "{:?}", self.as_bytes()),
        }
    }
}

impl<const N: usize> BoundedBytes<N> {
    /// `None` if `bytes` is longer than `N` (or than 255).
    pub fn new(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > N || bytes.len() > 255 {
            return None;
        }
        let mut out = [0u8; N];
        out[..bytes.len()].copy_from_slice(bytes);
        Some(BoundedBytes {
            len: bytes.len() as u8,
            bytes: out,
        })
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(N)]
    }
}

/// Why chunk 0's bytes after the header are not a binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingError {
    /// All zero: a store made by Linux or never bound.
    Absent,
    /// Something else is there (no magic, bad lengths or bad checksum).
    Corrupt,
}

impl Binding {
    /// Encodes at `BINDING_OFFSET` of chunk 0 (`chunk0` must be at least 512 bytes).
    pub fn encode(&self, chunk0: &mut [u8]) {
        let mut buf = [0u8; BINDING_BYTES];
        let mut at = 0;
        buf[at..at + 8].copy_from_slice(&BINDING_MAGIC);
        at += 8;
        let name = self.name.as_bytes();
        buf[at] = name.len() as u8;
        at += 1;
        buf[at..at + name.len()].copy_from_slice(name);
        at += BINDING_NAME_BYTES;
        let serial = self.origin_serial.as_bytes();
        buf[at] = serial.len() as u8;
        at += 1;
        buf[at..at + serial.len()].copy_from_slice(serial);
        at += BINDING_SERIAL_BYTES;
        buf[at..at + 8].copy_from_slice(&self.origin_sectors.to_le_bytes());
        at += 8;
        buf[at..at + 4].copy_from_slice(&self.chunk_sectors.to_le_bytes());
        at += 4;
        buf[at..at + 8].copy_from_slice(&self.created_unix_seconds.to_le_bytes());
        at += 8;
        buf[at..at + 8].copy_from_slice(&self.region_start.to_le_bytes());
        at += 8;
        buf[at..at + 8].copy_from_slice(&self.region_sectors.to_le_bytes());
        at += 8;
        buf[at..at + 4].copy_from_slice(&self.flags.to_le_bytes());
        at += 4;
        let (kind, nsid, id) = self.origin_id.to_raw();
        buf[at] = kind;
        at += 1;
        buf[at..at + 4].copy_from_slice(&nsid.to_le_bytes());
        at += 4;
        buf[at..at + 16].copy_from_slice(&id);
        at += 16;
        let sum = crc32c(&buf[..at]);
        buf[at..at + 4].copy_from_slice(&sum.to_le_bytes());
        chunk0[BINDING_OFFSET..BINDING_OFFSET + BINDING_BYTES].copy_from_slice(&buf);
    }

    /// Decodes the binding from chunk 0 (at least its first sector).
    pub fn decode(chunk0: &[u8]) -> Result<Self, BindingError> {
        let buf = chunk0
            .get(BINDING_OFFSET..BINDING_OFFSET + BINDING_BYTES)
            .ok_or(BindingError::Corrupt)?;
        if buf.iter().all(|&b| b == 0) {
            return Err(BindingError::Absent);
        }
        let len = if buf[..8] == BINDING_MAGIC {
            BINDING_BYTES
        } else if buf[..8] == BINDING_MAGIC_V2 {
            BINDING_V2_BYTES
        } else if buf[..8] == BINDING_MAGIC_V1 {
            BINDING_V1_BYTES
        } else {
            return Err(BindingError::Corrupt);
        };
        let buf = &buf[..len];
        let sum_at = len - 4;
        let stored = read_u32(buf, sum_at).ok_or(BindingError::Corrupt)?;
        if crc32c(&buf[..sum_at]) != stored {
            return Err(BindingError::Corrupt);
        }
        let mut at = 8;
        let name_len = usize::from(buf[at]);
        at += 1;
        let name = buf
            .get(at..at + name_len.min(BINDING_NAME_BYTES + 1))
            .and_then(BoundedBytes::new)
            .ok_or(BindingError::Corrupt)?;
        at += BINDING_NAME_BYTES;
        let serial_len = usize::from(buf[at]);
        at += 1;
        let origin_serial = buf
            .get(at..at + serial_len.min(BINDING_SERIAL_BYTES + 1))
            .and_then(BoundedBytes::new)
            .ok_or(BindingError::Corrupt)?;
        at += BINDING_SERIAL_BYTES;
        let origin_sectors = read_u64(buf, at).ok_or(BindingError::Corrupt)?;
        at += 8;
        let chunk_sectors = read_u32(buf, at).ok_or(BindingError::Corrupt)?;
        at += 4;
        let created_unix_seconds = read_u64(buf, at).ok_or(BindingError::Corrupt)?;
        at += 8;
        let (region_start, region_sectors, flags) = if len >= BINDING_V2_BYTES {
            (
                read_u64(buf, at).ok_or(BindingError::Corrupt)?,
                read_u64(buf, at + 8).ok_or(BindingError::Corrupt)?,
                read_u32(buf, at + 16).ok_or(BindingError::Corrupt)?,
            )
        } else {
            (0, 0, 0)
        };
        at += 20;
        let origin_id = if len == BINDING_BYTES {
            let kind = buf[at];
            let nsid = read_u32(buf, at + 1).ok_or(BindingError::Corrupt)?;
            let mut id = [0u8; 16];
            id.copy_from_slice(buf.get(at + 5..at + 21).ok_or(BindingError::Corrupt)?);
            OriginId::from_raw(kind, nsid, id).ok_or(BindingError::Corrupt)?
        } else {
            OriginId::Legacy
        };
        Ok(Binding {
            name,
            origin_serial,
            origin_sectors,
            chunk_sectors,
            created_unix_seconds,
            region_start,
            region_sectors,
            flags,
            origin_id,
        })
    }
}

/// Byte offset in chunk 0 of snapfw's *merge marker* (after the binding record, inside the
/// first 512-byte sector so that setting it is one atomic sector write).
pub const MERGE_MARKER_OFFSET: usize = 256;
/// Magic of the first merge marker: `"snapfwM1"` (flags only; still read).
pub const MERGE_MARKER_MAGIC: [u8; 8] = *b"snapfwM1";
/// Bytes of a `snapfwM1` marker: magic, `u32` flags (bit 0: merging), CRC-32C of the first 12.
pub const MERGE_MARKER_BYTES: usize = 16;
/// Magic of the merge marker written now: `"snapfwM2"`.
pub const MERGE_MARKER_MAGIC_V2: [u8; 8] = *b"snapfwM2";
/// Bytes of a `snapfwM2` marker: magic, `u32` flags (bit 0: merging, bit 1: a saved chunk
/// follows), `u64` saved chunk, CRC-32C of the first 20.
pub const MERGE_MARKER_V2_BYTES: usize = 24;
// The marker follows the binding and stays in the first sector.
const _: () = assert!(
    BINDING_OFFSET + BINDING_BYTES <= MERGE_MARKER_OFFSET
        && MERGE_MARKER_OFFSET + MERGE_MARKER_V2_BYTES <= SECTOR_BYTES
);

/// What a merge marker says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeMarker {
    /// The COW chunk that holds origin chunk 0 (as the merged view shows it) while the
    /// origin's first block carries an [`OriginMarker`]; `None` in a `snapfwM1` marker
    /// (written before origins were marked) or when no chunk was free for it.
    pub saved_chunk: Option<u64>,
}

/// Writes the merge marker ("this store is being merged into its origin") into chunk 0.
///
/// Where and why: Linux keeps the "merging" state outside the store (LVM metadata asks for
/// the `snapshot-merge` target at activation). snapfw has no LVM, so the flag lives in the
/// store itself, in bytes of chunk 0 that Linux leaves zero and never reads (like the binding
/// record, but independent of it so an unbound store can merge too). The 16-byte header and
/// every metadata area keep their Linux meaning, so Linux can still load the store at every
/// step of a merge. Linux rewrites chunk 0 from a zeroed buffer only when it creates or
/// invalidates a store, and an invalid store is never merged.
///
/// `saved_chunk` names the COW chunk holding origin chunk 0 during the merge (see
/// [`OriginMarker`]).
pub fn encode_merge_marker(chunk0: &mut [u8], saved_chunk: Option<u64>) {
    let mut buf = [0u8; MERGE_MARKER_V2_BYTES];
    buf[..8].copy_from_slice(&MERGE_MARKER_MAGIC_V2);
    let flags = 1u32 | if saved_chunk.is_some() { 2 } else { 0 };
    buf[8..12].copy_from_slice(&flags.to_le_bytes());
    buf[12..20].copy_from_slice(&saved_chunk.unwrap_or(0).to_le_bytes());
    let sum = crc32c(&buf[..20]);
    buf[20..24].copy_from_slice(&sum.to_le_bytes());
    if let Some(out) =
        chunk0.get_mut(MERGE_MARKER_OFFSET..MERGE_MARKER_OFFSET + MERGE_MARKER_V2_BYTES)
    {
        out.copy_from_slice(&buf);
    }
}

/// The merge marker in chunk 0 (at least its first sector), if a valid one with the merging
/// flag set is there. Anything else (zeroes, garbage, a bad checksum) reads as "not merging".
pub fn decode_merge_marker(chunk0: &[u8]) -> Option<MergeMarker> {
    let buf = chunk0.get(MERGE_MARKER_OFFSET..MERGE_MARKER_OFFSET + MERGE_MARKER_BYTES)?;
    if buf[..8] == MERGE_MARKER_MAGIC {
        let ok = read_u32(buf, 12) == Some(crc32c(&buf[..12]))
            && read_u32(buf, 8).is_some_and(|f| f & 1 == 1);
        return ok.then_some(MergeMarker { saved_chunk: None });
    }
    let buf = chunk0.get(MERGE_MARKER_OFFSET..MERGE_MARKER_OFFSET + MERGE_MARKER_V2_BYTES)?;
    if buf[..8] != MERGE_MARKER_MAGIC_V2 || read_u32(buf, 20) != Some(crc32c(&buf[..20])) {
        return None;
    }
    let flags = read_u32(buf, 8)?;
    if flags & 1 == 0 {
        return None;
    }
    let saved = read_u64(buf, 12)?;
    Some(MergeMarker {
        saved_chunk: (flags & 2 != 0).then_some(saved),
    })
}

/// Byte offset in chunk 0 of snapfw's *auto-extend policy* record (after the merge marker,
/// in the first sector, so it is written with the binding in one sector write).
pub const AUTOEXTEND_OFFSET: usize = 288;
/// Magic of the auto-extend record: `"snapfwA1"`.
pub const AUTOEXTEND_MAGIC: [u8; 8] = *b"snapfwA1";
/// Bytes of the auto-extend record: magic, threshold (percent), kind (0: by percent of the
/// store, 1: by sectors), two zero bytes, the amount (`u64`), CRC-32C of the first 20.
pub const AUTOEXTEND_BYTES: usize = 24;
const _: () = assert!(
    MERGE_MARKER_OFFSET + MERGE_MARKER_V2_BYTES <= AUTOEXTEND_OFFSET
        && AUTOEXTEND_OFFSET + AUTOEXTEND_BYTES <= SECTOR_BYTES
);

/// How much an auto-extension adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtendBy {
    /// A percentage of the store's size at the time (1..=1000).
    Percent(u16),
    /// A number of sectors.
    Sectors(u64),
}

/// A snapshot's auto-extend policy (LVM's `snapshot_autoextend_threshold` /
/// `snapshot_autoextend_percent`): when the store is `threshold` percent used, it grows by
/// `by`, as far as free space allows. Kept in chunk 0 where Linux does not look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoExtend {
    /// Usage (percent, 1..=99) that starts an extension.
    pub threshold: u8,
    /// How much each extension adds.
    pub by: ExtendBy,
}

impl AutoExtend {
    /// Writes the record into chunk 0 (`None` clears it).
    pub fn encode(policy: Option<AutoExtend>, chunk0: &mut [u8]) {
        let Some(out) = chunk0.get_mut(AUTOEXTEND_OFFSET..AUTOEXTEND_OFFSET + AUTOEXTEND_BYTES)
        else {
            return;
        };
        out.fill(0);
        let Some(p) = policy else {
            return;
        };
        out[..8].copy_from_slice(&AUTOEXTEND_MAGIC);
        out[8] = p.threshold;
        let (kind, amount) = match p.by {
            ExtendBy::Percent(n) => (0u8, u64::from(n)),
            ExtendBy::Sectors(n) => (1u8, n),
        };
        out[9] = kind;
        out[12..20].copy_from_slice(&amount.to_le_bytes());
        let sum = crc32c(&out[..20]);
        out[20..24].copy_from_slice(&sum.to_le_bytes());
    }

    /// The policy in chunk 0, if a valid record is there.
    pub fn decode(chunk0: &[u8]) -> Option<AutoExtend> {
        let b = chunk0.get(AUTOEXTEND_OFFSET..AUTOEXTEND_OFFSET + AUTOEXTEND_BYTES)?;
        if b[..8] != AUTOEXTEND_MAGIC || read_u32(b, 20)? != crc32c(&b[..20]) {
            return None;
        }
        let threshold = b[8];
        let amount = read_u64(b, 12)?;
        let by = match b[9] {
            0 if (1..=1000).contains(&amount) => ExtendBy::Percent(amount as u16),
            1 if amount > 0 => ExtendBy::Sectors(amount),
            _ => return None,
        };
        (1..=99)
            .contains(&threshold)
            .then_some(AutoExtend { threshold, by })
    }
}

/// Magic of an origin marker: `"snapfwO1"`.
pub const ORIGIN_MARKER_MAGIC: [u8; 8] = *b"snapfwO1";
/// Most bytes of the COW store's description in an origin marker.
pub const ORIGIN_MARKER_COW_BYTES: usize = 64;
/// Bytes of the encoded origin marker (at the start of the origin's first block).
pub const ORIGIN_MARKER_BYTES: usize =
    8 + 1 + BINDING_NAME_BYTES + 1 + ORIGIN_MARKER_COW_BYTES + 8 + 4 + 8 + 4;
/// Where the marker's plain-text note starts (for someone who dumps the disk).
const ORIGIN_MARKER_NOTE_OFFSET: usize = 256;
const ORIGIN_MARKER_NOTE: &[u8] = b"snapfw: this disk is half-way through a snapshot merge. \
Its first chunk is kept in the COW store named above (saved_chunk) until the merge ends; \
attach that store to finish the merge.";
const _: () = assert!(
    ORIGIN_MARKER_BYTES <= ORIGIN_MARKER_NOTE_OFFSET
        && ORIGIN_MARKER_NOTE_OFFSET + ORIGIN_MARKER_NOTE.len() <= SECTOR_BYTES
);

/// What snapfw writes over an origin's first logical block while a merge into it runs: the
/// origin is then *half-merged* (some chunks hold the snapshot's data, others still the
/// newer data), and is only right when read through its merging store. If that store's
/// device is missing at boot, discovery finds this marker and keeps the origin read-only
/// instead of serving the mixture; the merge resumes when the store comes back.
///
/// The origin's own first chunk (as the merged view shows it) is kept in COW chunk
/// `saved_chunk` meanwhile (also named by the store's [`MergeMarker`]), and the merge writes
/// it back last: the chunk after its first block, a flush, then the first block, so a
/// device without the marker never holds a partly restored chunk 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginMarker {
    /// The merging snapshot's name (empty if the store is unbound).
    pub name: BoundedBytes<BINDING_NAME_BYTES>,
    /// Which COW store merges into this origin, as the appliance describes its device (e.g.
    /// `vdb, serial "cow-1"`), for the operator.
    pub cow: BoundedBytes<ORIGIN_MARKER_COW_BYTES>,
    /// First sector of the store's region on its device.
    pub region_start: u64,
    /// The store's chunk size in sectors.
    pub chunk_sectors: u32,
    /// The COW chunk holding origin chunk 0.
    pub saved_chunk: u64,
}

impl Default for OriginMarker {
    fn default() -> Self {
        OriginMarker {
            name: BoundedBytes::new(b"").unwrap_or_else(|| unreachable!()),
            cow: BoundedBytes::new(b"").unwrap_or_else(|| unreachable!()),
            region_start: 0,
            chunk_sectors: 0,
            saved_chunk: 0,
        }
    }
}

impl OriginMarker {
    /// Encodes over `block` (the origin's first logical block; the rest of it is zeroed).
    /// Does nothing if `block` is shorter than a sector.
    pub fn encode(&self, block: &mut [u8]) {
        if block.len() < SECTOR_BYTES {
            return;
        }
        block.fill(0);
        let mut at = 0;
        block[..8].copy_from_slice(&ORIGIN_MARKER_MAGIC);
        at += 8;
        block[at] = self.name.as_bytes().len() as u8;
        block[at + 1..at + 1 + self.name.as_bytes().len()].copy_from_slice(self.name.as_bytes());
        at += 1 + BINDING_NAME_BYTES;
        block[at] = self.cow.as_bytes().len() as u8;
        block[at + 1..at + 1 + self.cow.as_bytes().len()].copy_from_slice(self.cow.as_bytes());
        at += 1 + ORIGIN_MARKER_COW_BYTES;
        block[at..at + 8].copy_from_slice(&self.region_start.to_le_bytes());
        at += 8;
        block[at..at + 4].copy_from_slice(&self.chunk_sectors.to_le_bytes());
        at += 4;
        block[at..at + 8].copy_from_slice(&self.saved_chunk.to_le_bytes());
        at += 8;
        let sum = crc32c(&block[..at]);
        block[at..at + 4].copy_from_slice(&sum.to_le_bytes());
        block[ORIGIN_MARKER_NOTE_OFFSET..ORIGIN_MARKER_NOTE_OFFSET + ORIGIN_MARKER_NOTE.len()]
            .copy_from_slice(ORIGIN_MARKER_NOTE);
    }

    /// Decodes an origin's first sector; `None` for anything else (user data, a bad
    /// checksum, bad lengths).
    pub fn decode(block: &[u8]) -> Option<OriginMarker> {
        let b = block.get(..ORIGIN_MARKER_BYTES)?;
        if b[..8] != ORIGIN_MARKER_MAGIC {
            return None;
        }
        let sum_at = ORIGIN_MARKER_BYTES - 4;
        if read_u32(b, sum_at)? != crc32c(&b[..sum_at]) {
            return None;
        }
        let mut at = 8;
        let name_len = usize::from(b[at]).min(BINDING_NAME_BYTES + 1);
        let name = BoundedBytes::new(b.get(at + 1..at + 1 + name_len)?)?;
        at += 1 + BINDING_NAME_BYTES;
        let cow_len = usize::from(b[at]).min(ORIGIN_MARKER_COW_BYTES + 1);
        let cow = BoundedBytes::new(b.get(at + 1..at + 1 + cow_len)?)?;
        at += 1 + ORIGIN_MARKER_COW_BYTES;
        Some(OriginMarker {
            name,
            cow,
            region_start: read_u64(b, at)?,
            chunk_sectors: read_u32(b, at + 8)?,
            saved_chunk: read_u64(b, at + 12)?,
        })
    }
}

/// Magic of a free-extent marker: `"snapfwF1"`.
pub const FREE_EXTENT_MAGIC: [u8; 8] = *b"snapfwF1";
/// Bytes of a free-extent marker (at the start of its first sector).
pub const FREE_EXTENT_BYTES: usize = 8 + 8 + 8 + 4;

/// A marker snapfw writes at the start of unused space between COW regions on a device that
/// holds several stores, so boot discovery can walk the device from sector 0: at each step
/// it finds either a store (whose binding gives its region) or a marker (which gives the
/// length of the free extent), and stops at anything else. It is not a `SnAp` header, so
/// Linux and snapfw's "already holds a store" check both see free space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeExtent {
    /// First sector of the free extent (where the marker is).
    pub start: u64,
    /// Sectors of the free extent.
    pub sectors: u64,
}

impl FreeExtent {
    /// Encodes at the start of `sector` (at least [`FREE_EXTENT_BYTES`] long).
    pub fn encode(&self, sector: &mut [u8]) {
        sector[..8].copy_from_slice(&FREE_EXTENT_MAGIC);
        sector[8..16].copy_from_slice(&self.start.to_le_bytes());
        sector[16..24].copy_from_slice(&self.sectors.to_le_bytes());
        let sum = crc32c(&sector[..24]);
        sector[24..28].copy_from_slice(&sum.to_le_bytes());
    }

    /// Decodes a marker; `None` for anything else (including a marker with a bad checksum).
    pub fn decode(sector: &[u8]) -> Option<FreeExtent> {
        let b = sector.get(..FREE_EXTENT_BYTES)?;
        if b[..8] != FREE_EXTENT_MAGIC || crc32c(&b[..24]) != read_u32(b, 24)? {
            return None;
        }
        Some(FreeExtent {
            start: read_u64(b, 8)?,
            sectors: read_u64(b, 16)?,
        })
    }
}

/// The free extents that need a marker on a device holding stores in `regions` (`(start,
/// sectors)` pairs, any order, not overlapping): every gap from sector 0 up to the start of
/// the last store, so that a walk from sector 0 reaches every store. Space after the last
/// store needs none (the walk stops there).
pub fn free_extents(regions: &[(u64, u64)]) -> alloc::vec::Vec<FreeExtent> {
    let mut sorted: alloc::vec::Vec<(u64, u64)> = regions.to_vec();
    sorted.sort_unstable();
    let mut out = alloc::vec::Vec::new();
    let mut cursor = 0u64;
    for (start, sectors) in sorted {
        if start > cursor {
            out.push(FreeExtent {
                start: cursor,
                sectors: start - cursor,
            });
        }
        cursor = cursor.max(start.saturating_add(sectors));
    }
    out
}

/// CRC-32C (Castagnoli), bitwise; only used for the small binding record.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

/// Fills `chunk0` (a zeroed chunk-sized buffer is expected) with header and optional binding,
/// the way snapfw writes chunk 0.
pub fn encode_chunk0(chunk0: &mut [u8], header: &Header, binding: Option<&Binding>) {
    chunk0.fill(0);
    header.encode(chunk0);
    if let Some(b) = binding {
        b.encode(chunk0);
    }
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

fn write_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding {
        Binding {
            name: BoundedBytes::new(b"nightly").unwrap(),
            origin_serial: BoundedBytes::new(b"SER-1").unwrap(),
            origin_sectors: 1 << 20,
            chunk_sectors: 8,
            created_unix_seconds: 7,
            region_start: 2048,
            region_sectors: 65536,
            flags: BINDING_FLAG_WRITABLE,
            origin_id: OriginId::NvmeNamespace(2),
        }
    }

    #[test]
    fn binding_v3_round_trips_every_origin_identity() {
        let ids = [
            OriginId::Legacy,
            OriginId::Serial,
            OriginId::Nguid([0x5a; 16]),
            OriginId::Eui64([1, 2, 3, 4, 5, 6, 7, 8]),
            OriginId::NvmeNamespace(7),
            OriginId::Location {
                origin_pci: [0, 4, 0],
                nsid: 0,
                cow_pci: [0, 5, 0],
            },
        ];
        for origin_id in ids {
            let b = Binding {
                origin_id,
                ..binding()
            };
            let mut chunk0 = [0u8; 512];
            b.encode(&mut chunk0);
            assert_eq!(&chunk0[16..24], b"snapfwB3");
            assert_eq!(Binding::decode(&chunk0), Ok(b.clone()));
            // The record stays clear of the merge marker, in bytes Linux ignores.
            assert!(chunk0[16 + BINDING_BYTES..].iter().all(|&x| x == 0));
        }
        // An identity kind this version does not know is not a binding to act on.
        let mut chunk0 = [0u8; 512];
        binding().encode(&mut chunk0);
        let kind_at = 16 + BINDING_V2_BYTES - 4;
        chunk0[kind_at] = 9;
        let sum = crc32c(&chunk0[16..16 + BINDING_BYTES - 4]);
        chunk0[16 + BINDING_BYTES - 4..16 + BINDING_BYTES].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(Binding::decode(&chunk0), Err(BindingError::Corrupt));
    }

    #[test]
    fn binding_v2_and_v1_still_decode() {
        let mut chunk0 = [0u8; 512];
        binding().encode(&mut chunk0);
        // A version-2 record (what snapfw wrote before origin identities): the v3 fields up
        // to the flags, then the checksum.
        let mut v2 = [0u8; 512];
        v2[16..16 + BINDING_V2_BYTES - 4].copy_from_slice(&chunk0[16..16 + BINDING_V2_BYTES - 4]);
        v2[16..24].copy_from_slice(&BINDING_MAGIC_V2);
        let sum = crc32c(&v2[16..16 + BINDING_V2_BYTES - 4]);
        v2[16 + BINDING_V2_BYTES - 4..16 + BINDING_V2_BYTES].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(
            Binding::decode(&v2),
            Ok(Binding {
                origin_id: OriginId::Legacy,
                ..binding()
            })
        );
        for i in 16..16 + BINDING_V2_BYTES {
            let mut c = v2;
            c[i] ^= 0x10;
            assert!(Binding::decode(&c).is_err(), "v2 byte {i}");
        }
        // A version-1 record (what snapfw 0.1 wrote): same fields, no region or flags.
        let mut v1 = [0u8; 512];
        v1[16..16 + BINDING_V1_BYTES - 4].copy_from_slice(&chunk0[16..16 + BINDING_V1_BYTES - 4]);
        v1[16..24].copy_from_slice(&BINDING_MAGIC_V1);
        let sum = crc32c(&v1[16..16 + BINDING_V1_BYTES - 4]);
        v1[16 + BINDING_V1_BYTES - 4..16 + BINDING_V1_BYTES].copy_from_slice(&sum.to_le_bytes());
        let old = Binding::decode(&v1).unwrap();
        assert_eq!(
            old,
            Binding {
                region_start: 0,
                region_sectors: 0,
                flags: 0,
                origin_id: OriginId::Legacy,
                ..binding()
            }
        );
        // Any flipped bit of the v3 record is caught.
        for i in 16..16 + BINDING_BYTES {
            let mut c = chunk0;
            c[i] ^= 0x10;
            assert!(Binding::decode(&c).is_err(), "byte {i}");
        }
    }

    #[test]
    fn free_extents_cover_every_gap_before_the_last_store() {
        assert_eq!(free_extents(&[]), []);
        assert_eq!(free_extents(&[(0, 100)]), []);
        let fe = |start, sectors| FreeExtent { start, sectors };
        assert_eq!(free_extents(&[(100, 50)]), [fe(0, 100)]);
        assert_eq!(
            free_extents(&[(500, 10), (0, 100), (200, 100)]),
            [fe(100, 100), fe(300, 200)]
        );
        // Adjacent stores leave no gap.
        assert_eq!(free_extents(&[(0, 100), (100, 100)]), []);
    }

    #[test]
    fn free_extent_marker_round_trips_and_rejects_damage() {
        let mut sector = [0u8; 512];
        let m = FreeExtent {
            start: 4096,
            sectors: 12_288,
        };
        m.encode(&mut sector);
        assert_eq!(FreeExtent::decode(&sector), Some(m));
        for i in 0..FREE_EXTENT_BYTES {
            let mut s = sector;
            s[i] ^= 1;
            assert_eq!(FreeExtent::decode(&s), None, "byte {i}");
        }
        assert_eq!(FreeExtent::decode(&[0u8; 512]), None);
        assert_eq!(FreeExtent::decode(&sector[..10]), None);
    }

    #[test]
    fn header_bytes_match_linux() {
        let mut b = [0u8; 16];
        Header::new(8).encode(&mut b);
        assert_eq!(&b[0..4], b"SnAp");
        assert_eq!(b[4..8], [1, 0, 0, 0]);
        assert_eq!(b[8..12], [1, 0, 0, 0]);
        assert_eq!(b[12..16], [8, 0, 0, 0]);
        assert_eq!(Header::decode(&b), Some(Header::new(8)));
        assert_eq!(Header::decode(&b[..15]), None);
    }

    #[test]
    fn geometry_matches_linux() {
        let g = Geometry::new(8).unwrap();
        assert_eq!(g.exceptions_per_area, 256);
        assert_eq!(g.area_chunk(0), 1);
        assert_eq!(g.area_chunk(1), 258);
        assert!(g.is_metadata_chunk(0));
        assert!(g.is_metadata_chunk(1));
        assert!(g.is_metadata_chunk(258));
        assert!(!g.is_metadata_chunk(2));
        assert!(!g.is_metadata_chunk(257));
        assert_eq!(g.next_data_chunk(257), 259);
        assert_eq!(g.next_data_chunk(2), 3);
        assert_eq!(g.area_of_data_chunk(2), 0);
        assert_eq!(g.area_of_data_chunk(257), 0);
        assert_eq!(g.area_of_data_chunk(259), 1);
        assert!(Geometry::new(0).is_none());
        assert!(Geometry::new(12).is_none());
        assert!(Geometry::new(1 << 22).is_none());
        assert_eq!(Geometry::new(1).unwrap().exceptions_per_area, 32);
    }

    #[test]
    fn record_round_trip() {
        let mut area = [0u8; 64];
        let r = Record {
            old_chunk: 0x0102_0304_0506_0708,
            new_chunk: 9,
        };
        assert!(r.encode(&mut area, 3));
        assert!(!r.encode(&mut area, 4));
        assert_eq!(area[48], 8);
        assert_eq!(area[56], 9);
        assert_eq!(Record::decode(&area, 3), Some(r));
        assert_eq!(Record::decode(&area, 4), None);
    }

    #[test]
    fn binding_round_trip_and_checksum() {
        let b = Binding {
            name: BoundedBytes::new(b"nightly").unwrap(),
            origin_serial: BoundedBytes::new(b"SN-0042").unwrap(),
            origin_sectors: 1 << 30,
            chunk_sectors: 8,
            created_unix_seconds: 1_700_000_000,
            region_start: 0,
            region_sectors: 0,
            flags: 0,
            origin_id: OriginId::Serial,
        };
        let mut c0 = [0u8; 512];
        encode_chunk0(&mut c0, &Header::new(8), Some(&b));
        assert_eq!(Header::decode(&c0), Some(Header::new(8)));
        assert_eq!(Binding::decode(&c0), Ok(b));
        c0[40] ^= 1;
        assert_eq!(Binding::decode(&c0), Err(BindingError::Corrupt));
        let mut z = [0u8; 512];
        encode_chunk0(&mut z, &Header::new(8), None);
        assert_eq!(Binding::decode(&z), Err(BindingError::Absent));
        assert_eq!(Binding::decode(&z[..20]), Err(BindingError::Corrupt));
    }

    #[test]
    fn merge_marker_round_trip_and_independent_of_binding() {
        let b = Binding {
            name: BoundedBytes::new(b"n").unwrap(),
            origin_serial: BoundedBytes::new(b"s").unwrap(),
            origin_sectors: 64,
            chunk_sectors: 8,
            created_unix_seconds: 1,
            region_start: 2048,
            region_sectors: 4096,
            flags: BINDING_FLAG_WRITABLE,
            origin_id: OriginId::Eui64([3; 8]),
        };
        let mut c0 = [0u8; 512];
        encode_chunk0(&mut c0, &Header::new(8), Some(&b));
        assert_eq!(decode_merge_marker(&c0), None);
        encode_merge_marker(&mut c0, Some(77));
        assert_eq!(
            decode_merge_marker(&c0),
            Some(MergeMarker {
                saved_chunk: Some(77)
            })
        );
        assert_eq!(Binding::decode(&c0), Ok(b));
        assert_eq!(Header::decode(&c0), Some(Header::new(8)));
        encode_merge_marker(&mut c0, None);
        assert_eq!(
            decode_merge_marker(&c0),
            Some(MergeMarker { saved_chunk: None })
        );
        c0[MERGE_MARKER_OFFSET + 9] ^= 1;
        assert_eq!(decode_merge_marker(&c0), None);
        assert_eq!(decode_merge_marker(&c0[..200]), None);
    }

    #[test]
    fn autoextend_round_trip_clear_and_rejects() {
        let mut c0 = [0u8; 512];
        encode_merge_marker(&mut c0, Some(5));
        for p in [
            AutoExtend {
                threshold: 70,
                by: ExtendBy::Percent(20),
            },
            AutoExtend {
                threshold: 1,
                by: ExtendBy::Sectors(16384),
            },
        ] {
            AutoExtend::encode(Some(p), &mut c0);
            assert_eq!(AutoExtend::decode(&c0), Some(p));
            assert_eq!(
                decode_merge_marker(&c0),
                Some(MergeMarker {
                    saved_chunk: Some(5)
                }),
                "independent of the merge marker"
            );
        }
        for at in 0..AUTOEXTEND_BYTES {
            let mut c = c0;
            c[AUTOEXTEND_OFFSET + at] ^= 0x10;
            assert_eq!(AutoExtend::decode(&c), None, "byte {at}");
        }
        AutoExtend::encode(None, &mut c0);
        assert_eq!(AutoExtend::decode(&c0), None);
        assert!(c0[AUTOEXTEND_OFFSET..AUTOEXTEND_OFFSET + AUTOEXTEND_BYTES]
            .iter()
            .all(|&b| b == 0));
        // Out-of-range values with a good checksum are refused.
        for bad in [
            AutoExtend {
                threshold: 0,
                by: ExtendBy::Percent(20),
            },
            AutoExtend {
                threshold: 100,
                by: ExtendBy::Percent(20),
            },
            AutoExtend {
                threshold: 50,
                by: ExtendBy::Percent(0),
            },
            AutoExtend {
                threshold: 50,
                by: ExtendBy::Sectors(0),
            },
        ] {
            AutoExtend::encode(Some(bad), &mut c0);
            assert_eq!(AutoExtend::decode(&c0), None, "{bad:?}");
        }
    }

    #[test]
    fn first_merge_marker_still_reads() {
        // A store a merge marked before saved chunks existed: "snapfwM1", flags, CRC.
        let mut c0 = [0u8; 512];
        let mut m = [0u8; 16];
        m[..8].copy_from_slice(b"snapfwM1");
        m[8..12].copy_from_slice(&1u32.to_le_bytes());
        let sum = crc32c(&m[..12]);
        m[12..16].copy_from_slice(&sum.to_le_bytes());
        c0[MERGE_MARKER_OFFSET..MERGE_MARKER_OFFSET + 16].copy_from_slice(&m);
        assert_eq!(
            decode_merge_marker(&c0),
            Some(MergeMarker { saved_chunk: None })
        );
        c0[MERGE_MARKER_OFFSET + 8] = 0; // merging flag cleared
        assert_eq!(decode_merge_marker(&c0), None);
    }

    #[test]
    fn origin_marker_round_trip_and_rejects_user_data() {
        let m = OriginMarker {
            name: BoundedBytes::new(b"nightly").unwrap(),
            cow: BoundedBytes::new(b"vdb, serial \"cow-1\"").unwrap(),
            region_start: 2048,
            chunk_sectors: 16,
            saved_chunk: 12345,
        };
        for block in [512usize, 4096] {
            let mut b = vec![0xa5u8; block];
            m.encode(&mut b);
            assert_eq!(OriginMarker::decode(&b), Some(m));
            assert!(b[block - 1] == 0, "the rest of the block is zeroed");
            // Every single-byte change of the encoded part is refused.
            for at in 0..ORIGIN_MARKER_BYTES {
                let mut c = b.clone();
                c[at] ^= 0x40;
                assert_eq!(OriginMarker::decode(&c), None, "byte {at}");
            }
        }
        assert_eq!(OriginMarker::decode(&[0u8; 512]), None);
        assert_eq!(OriginMarker::decode(&[0u8; 100]), None);
        // A length byte past its field with a matching checksum is refused too.
        let mut b = vec![0u8; 512];
        m.encode(&mut b);
        b[8] = 200;
        let sum = crc32c(&b[..ORIGIN_MARKER_BYTES - 4]);
        b[ORIGIN_MARKER_BYTES - 4..ORIGIN_MARKER_BYTES].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(OriginMarker::decode(&b), None);
        // A small block (shorter than a sector) is left alone.
        let mut small = [7u8; 100];
        m.encode(&mut small);
        assert_eq!(small, [7u8; 100]);
    }

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
