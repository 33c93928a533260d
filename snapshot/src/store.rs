//! One persistent exception store: the loader (sans-I/O) and the in-memory store state the
//! engine appends to.
//!
//! [`Loader`] walks a COW device the way Linux `read_header()` / `read_exceptions()` in
//! `dm-snap-persistent.c` do, but checks more: every record must point inside the COW device
//! and not at a metadata chunk, inside the origin, and no chunk may be referenced twice. It
//! never panics on disk bytes; a damaged store is a [`LoadError`] naming the problem. The
//! caller performs the reads the loader asks for ([`Loader::next_read`]) and hands the bytes
//! back ([`Loader::supply`]).
//!
//! [`StoreState`] is what the engine keeps per store: geometry, next free chunk, the current
//! area's in-memory image and how many of its records are committed. Allocation follows Linux
//! `persistent_prepare_exception()` (`ENOSPC` when `(next_free + 1) * chunk > cow size`).

use alloc::vec;
use alloc::vec::Vec;

use crate::format::{
    decode_merge_marker, Binding, BindingError, Geometry, Header, Record, SECTOR_BYTES,
    SNAPSHOT_DISK_VERSION, SNAP_MAGIC,
};
use crate::table::{ExceptionTable, Grow, TableBuilder};

/// Why a store could not be loaded. Every variant names what on disk is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Header magic is 0: no store here yet (Linux would create one).
    Unformatted,
    /// Header magic is neither `SnAp` nor 0.
    BadMagic(u32),
    /// Header version is not 1.
    BadVersion(u32),
    /// Chunk size is zero, not a power of two or above the format's 2^21 sectors.
    BadChunkSize(u32),
    /// Chunk size is valid for the format but above what this loader's user can serve
    /// ([`Loader::max_chunk_sectors`]; snapfw: its copy buffers, 512 KiB). Checked before
    /// anything is allocated for the chunk.
    ChunkTooLarge {
        /// Chunk size in the header, in sectors.
        chunk_sectors: u32,
        /// The largest chunk size served, in sectors.
        max_sectors: u32,
    },
    /// Chunk size is not a multiple of the origin's or the COW device's logical block size.
    ChunkSizeMismatch {
        /// Chunk size in the header.
        chunk_sectors: u32,
    },
    /// The COW device cannot hold the header chunk and the first area.
    CowTooSmall,
    /// snapfw's merge marker names a chunk for origin chunk 0 that is not a data chunk of
    /// the device.
    BadMergeMarker {
        /// The chunk it names.
        saved_chunk: u64,
    },
    /// A record's `new_chunk` is past the end of the COW device.
    RecordPastCowEnd {
        /// Area index.
        area: u64,
        /// Record index in the area.
        index: u64,
        /// The offending COW chunk.
        new_chunk: u64,
    },
    /// A record's `new_chunk` is the header or a metadata area.
    RecordOnMetadata {
        /// Area index.
        area: u64,
        /// Record index in the area.
        index: u64,
        /// The offending COW chunk.
        new_chunk: u64,
    },
    /// A record's `old_chunk` is past the end of the origin.
    RecordPastOriginEnd {
        /// Area index.
        area: u64,
        /// Record index in the area.
        index: u64,
        /// The offending origin chunk.
        old_chunk: u64,
    },
    /// Two records name the same origin chunk.
    DuplicateOriginChunk {
        /// The origin chunk.
        old_chunk: u64,
    },
    /// Two records name the same COW chunk.
    DuplicateCowChunk {
        /// The COW chunk.
        new_chunk: u64,
    },
    /// More runs than the table limit given to the loader.
    TableFull,
    /// The heap could not serve the memory the store needs (its exception table, or the
    /// check of an unsorted store).
    OutOfMemory,
    /// The caller supplied fewer bytes than the loader asked for.
    ShortRead,
    /// `supply` was called when no read was outstanding.
    NotReading,
}

/// Largest chunk size a loader accepts unless told otherwise ([`Loader::max_chunk_sectors`]),
/// in sectors: 512 KiB, the largest LVM creates and the largest `snapshot create --chunk`
/// takes. The format allows 2^21 sectors (1 GiB), but the loader reads one chunk at a time and
/// the store keeps one in memory, so a larger header is refused ([`LoadError::ChunkTooLarge`])
/// before anything is read or allocated for it.
pub const MAX_LOAD_CHUNK_SECTORS: u32 = 1024;

/// Devices and limits the loader checks a store against.
#[derive(Clone, Copy, Debug)]
pub struct LoadParams {
    /// COW device capacity in sectors.
    pub cow_sectors: u64,
    /// COW device logical block size in sectors.
    pub cow_block_sectors: u32,
    /// Origin capacity in sectors.
    pub origin_sectors: u64,
    /// Origin logical block size in sectors.
    pub origin_block_sectors: u32,
    /// The most runs the exception table may grow to (it is further capped at the store's
    /// chunk count once the header is read, and grows only as records are found).
    pub table_runs: usize,
}

/// A read the loader needs: `sectors` sectors from `sector` of the COW device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadRead {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u32,
}

enum LoadPhase {
    Header,
    Area(u64),
    Done,
}

/// Sans-I/O store loader: ask [`next_read`](Self::next_read), supply the bytes, repeat, then
/// [`finish`](Self::finish).
pub struct Loader {
    params: LoadParams,
    max_chunk_sectors: u32,
    phase: LoadPhase,
    header: Option<Header>,
    binding: Result<Binding, BindingError>,
    merging: Option<crate::format::MergeMarker>,
    autoextend: Option<crate::format::AutoExtend>,
    geometry: Option<Geometry>,
    table: Option<TableBuilder>,
    max_new: u64,
    monotonic: bool,
    area_image: Vec<u8>,
    current_area: u64,
    committed: u64,
    records: u64,
    error: Option<LoadError>,
}

/// A store read from disk.
#[derive(Clone, Debug)]
pub struct LoadedStore {
    /// The store's state, ready to append to.
    pub state: StoreState,
    /// Completed exceptions (empty for an invalid store).
    pub table: ExceptionTable,
    /// Whether the header says valid.
    pub valid: bool,
    /// snapfw's binding record, or why there is none (`Absent` = unbound, e.g. made by Linux).
    pub binding: Result<Binding, BindingError>,
    /// Number of records read.
    pub records: u64,
    /// snapfw's merge marker is set: a merge into the origin was under way. Attaching the
    /// store resumes it ([`Engine::attach_snapshot`](crate::Engine::attach_snapshot)).
    /// Meanwhile the origin's contents are only meaningful through this store.
    pub merging: bool,
    /// The COW chunk holding origin chunk 0 while the origin carries snapfw's
    /// [`OriginMarker`](crate::format::OriginMarker) (the merge marker names it); `None` when
    /// not merging, or for a marker written before origins were marked.
    pub merge_saved_chunk: Option<u64>,
    /// snapfw's auto-extend policy recorded in chunk 0, if any.
    pub autoextend: Option<crate::format::AutoExtend>,
}

impl Loader {
    /// Starts loading a store on a COW device described by `params`.
    pub fn new(params: LoadParams) -> Self {
        Loader {
            params,
            max_chunk_sectors: MAX_LOAD_CHUNK_SECTORS,
            phase: LoadPhase::Header,
            header: None,
            binding: Err(BindingError::Absent),
            merging: None,
            autoextend: None,
            geometry: None,
            table: None,
            max_new: 0,
            monotonic: true,
            area_image: Vec::new(),
            current_area: 0,
            committed: 0,
            records: 0,
            error: None,
        }
    }

    /// Refuses stores whose chunks are larger than `sectors` ([`LoadError::ChunkTooLarge`]),
    /// before anything is allocated or read for a chunk.
    pub fn max_chunk_sectors(mut self, sectors: u32) -> Self {
        self.max_chunk_sectors = sectors;
        self
    }

    /// The next read to perform, or `None` when [`finish`](Self::finish) can be called.
    pub fn next_read(&self) -> Option<LoadRead> {
        if self.error.is_some() {
            return None;
        }
        match self.phase {
            LoadPhase::Header => Some(LoadRead {
                sector: 0,
                sectors: self.params.cow_block_sectors.max(1),
            }),
            LoadPhase::Area(k) => {
                let g = self.geometry?;
                Some(LoadRead {
                    sector: g.chunk_sector(g.area_chunk(k)),
                    sectors: g.chunk_sectors,
                })
            }
            LoadPhase::Done => None,
        }
    }

    /// The read `n` reads after [`next_read`](Self::next_read) (`n == 0`: that one), if the
    /// loader gets there: it does while every area before it is full, and the device holds
    /// it. A caller may issue these ahead of time (metadata areas are not contiguous, so a
    /// store of 10 million exceptions in 4 KiB chunks is 39 063 reads) and supply them in
    /// order; reads past the area that ends the table are not asked for and can be dropped.
    pub fn read_ahead(&self, n: u64) -> Option<LoadRead> {
        if n == 0 {
            return self.next_read();
        }
        if self.error.is_some() {
            return None;
        }
        let LoadPhase::Area(k) = self.phase else {
            return None;
        };
        let g = self.geometry?;
        let area = k.checked_add(n)?;
        let chunk = g.area_chunk(area);
        if chunk >= self.params.cow_sectors / u64::from(g.chunk_sectors) {
            return None;
        }
        Some(LoadRead {
            sector: g.chunk_sector(chunk),
            sectors: g.chunk_sectors,
        })
    }

    fn fail(&mut self, e: LoadError) -> Result<(), LoadError> {
        self.error = Some(e);
        self.phase = LoadPhase::Done;
        Err(e)
    }

    /// Hands over the bytes of the read [`next_read`](Self::next_read) asked for.
    pub fn supply(&mut self, data: &[u8]) -> Result<(), LoadError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.phase {
            LoadPhase::Header => self.supply_header(data),
            LoadPhase::Area(k) => self.supply_area(k, data),
            LoadPhase::Done => Err(LoadError::NotReading),
        }
    }

    fn supply_header(&mut self, data: &[u8]) -> Result<(), LoadError> {
        let Some(h) = Header::decode(data) else {
            return self.fail(LoadError::ShortRead);
        };
        if h.magic == 0 {
            return self.fail(LoadError::Unformatted);
        }
        if h.magic != SNAP_MAGIC {
            return self.fail(LoadError::BadMagic(h.magic));
        }
        if h.version != SNAPSHOT_DISK_VERSION {
            return self.fail(LoadError::BadVersion(h.version));
        }
        let Some(g) = Geometry::new(h.chunk_sectors) else {
            return self.fail(LoadError::BadChunkSize(h.chunk_sectors));
        };
        if h.chunk_sectors > self.max_chunk_sectors {
            return self.fail(LoadError::ChunkTooLarge {
                chunk_sectors: h.chunk_sectors,
                max_sectors: self.max_chunk_sectors,
            });
        }
        let cow_bs = self.params.cow_block_sectors.max(1);
        let origin_bs = self.params.origin_block_sectors.max(1);
        if !h.chunk_sectors.is_multiple_of(cow_bs) || !h.chunk_sectors.is_multiple_of(origin_bs) {
            return self.fail(LoadError::ChunkSizeMismatch {
                chunk_sectors: h.chunk_sectors,
            });
        }
        if self.params.cow_sectors / u64::from(h.chunk_sectors) < 2 {
            return self.fail(LoadError::CowTooSmall);
        }
        self.binding = Binding::decode(data);
        self.merging = decode_merge_marker(data);
        self.autoextend = crate::format::AutoExtend::decode(data);
        if let Some(saved) = self.merging.and_then(|m| m.saved_chunk) {
            // The chunk holding origin chunk 0 must be a data chunk inside the device.
            let fits = saved
                .checked_add(1)
                .and_then(|n| n.checked_mul(u64::from(h.chunk_sectors)))
                .is_some_and(|end| end <= self.params.cow_sectors);
            if saved == 0 || g.is_metadata_chunk(saved) || !fits {
                return self.fail(LoadError::BadMergeMarker { saved_chunk: saved });
            }
        }
        self.header = Some(h);
        self.geometry = Some(g);
        if h.valid == 0 {
            // Linux does not read the exceptions of an invalid store.
            self.phase = LoadPhase::Done;
        } else {
            // Sized by what is found: the table's nodes grow record by record, up to one run
            // per chunk of the store, and its bucket array is sized once, when every record
            // is in (`TableBuilder`).
            let chunks = self.params.cow_sectors / u64::from(h.chunk_sectors);
            let limit = (self.params.table_runs as u64).min(chunks) as usize;
            self.table = Some(TableBuilder::new(limit));
            self.phase = LoadPhase::Area(0);
        }
        Ok(())
    }

    fn supply_area(&mut self, k: u64, data: &[u8]) -> Result<(), LoadError> {
        let Some(g) = self.geometry else {
            return self.fail(LoadError::NotReading);
        };
        if data.len() < g.chunk_bytes() {
            return self.fail(LoadError::ShortRead);
        }
        let cow_chunks = self.params.cow_sectors / u64::from(g.chunk_sectors);
        let origin_chunks = self
            .params
            .origin_sectors
            .div_ceil(u64::from(g.chunk_sectors));
        let mut full = true;
        let mut i = 0u64;
        while i < g.exceptions_per_area {
            let Some(r) = Record::decode(data, i as usize) else {
                return self.fail(LoadError::ShortRead);
            };
            if r.new_chunk == 0 {
                full = false;
                break;
            }
            if r.new_chunk >= cow_chunks {
                return self.fail(LoadError::RecordPastCowEnd {
                    area: k,
                    index: i,
                    new_chunk: r.new_chunk,
                });
            }
            if g.is_metadata_chunk(r.new_chunk) {
                return self.fail(LoadError::RecordOnMetadata {
                    area: k,
                    index: i,
                    new_chunk: r.new_chunk,
                });
            }
            if r.old_chunk >= origin_chunks {
                return self.fail(LoadError::RecordPastOriginEnd {
                    area: k,
                    index: i,
                    old_chunk: r.old_chunk,
                });
            }
            let Some(table) = self.table.as_mut() else {
                return self.fail(LoadError::NotReading);
            };
            // Appended in order; origin chunks named twice are found when the table is linked
            // (`finish`).
            match table.push(r.old_chunk, r.new_chunk) {
                Ok(()) => {}
                Err(Grow::NoMemory) => return self.fail(LoadError::OutOfMemory),
                Err(Grow::Full) => return self.fail(LoadError::TableFull),
            }
            if r.new_chunk <= self.max_new {
                // Stores written before Linux fixed commit order are not sorted; they are
                // checked for COW chunks named twice the slow way at the end, from the table.
                self.monotonic = false;
            } else {
                self.max_new = r.new_chunk;
            }
            self.records += 1;
            i += 1;
        }
        if full && g.area_chunk(k + 1) < cow_chunks {
            self.phase = LoadPhase::Area(k + 1);
        } else {
            // Keep the current area's image, without anything after the terminator: records a
            // torn area write left behind it must not come back when the area is rewritten.
            let Some(mut image) = zeroed(g.chunk_bytes()) else {
                return self.fail(LoadError::OutOfMemory);
            };
            let keep = (i as usize) * crate::format::RECORD_BYTES;
            image[..keep].copy_from_slice(&data[..keep]);
            self.area_image = image;
            self.current_area = k;
            self.committed = i;
            if full {
                // The last area is full and no further area fits on the device.
                self.current_area = k + 1;
                self.committed = 0;
                self.area_image.fill(0);
            }
            self.phase = LoadPhase::Done;
        }
        Ok(())
    }

    fn check_duplicates(&self, table: &ExceptionTable) -> Result<(), LoadError> {
        if self.monotonic {
            return Ok(());
        }
        // Collect every new_chunk (the monotonic prefix is implied by the table).
        let mut all: Vec<u64> = Vec::new();
        let count = table.len() as usize;
        if all.try_reserve_exact(count).is_err() {
            return Err(LoadError::OutOfMemory);
        }
        table.for_each_run(|r| {
            for j in 0..r.len {
                all.push(r.new_chunk + j);
            }
        });
        all.sort_unstable();
        for w in all.windows(2) {
            if w[0] == w[1] {
                return Err(LoadError::DuplicateCowChunk { new_chunk: w[0] });
            }
        }
        Ok(())
    }

    /// Finishes loading; call once [`next_read`](Self::next_read) returns `None`.
    pub fn finish(mut self) -> Result<LoadedStore, LoadError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let (Some(h), Some(g)) = (self.header, self.geometry) else {
            return Err(LoadError::NotReading);
        };
        if !matches!(self.phase, LoadPhase::Done) {
            return Err(LoadError::ShortRead);
        }
        let table = match self.table.take() {
            Some(b) => b.finish().map_err(|d| LoadError::DuplicateOriginChunk {
                old_chunk: d.old_chunk,
            })?,
            None => ExceptionTable::new(self.params.table_runs),
        };
        self.check_duplicates(&table)?;
        let valid = h.valid != 0;
        let mut next_free = 2u64.max(self.max_new + 1);
        if next_free % g.stride() == 1 {
            next_free += 1;
        }
        let mut area = core::mem::take(&mut self.area_image);
        if area.len() != g.chunk_bytes() {
            area = zeroed(g.chunk_bytes()).ok_or(LoadError::OutOfMemory)?;
        }
        let state = StoreState {
            geometry: g,
            cow_sectors: self.params.cow_sectors,
            origin_sectors: self.params.origin_sectors,
            next_free,
            current_area: self.current_area,
            committed_in_area: self.committed,
            area,
        };
        Ok(LoadedStore {
            state,
            table,
            valid,
            binding: self.binding.clone(),
            records: self.records,
            merging: self.merging.is_some() && valid,
            merge_saved_chunk: self.merging.and_then(|m| m.saved_chunk).filter(|_| valid),
            autoextend: self.autoextend,
        })
    }

    /// Runs the loader to the end with a synchronous read function (tools and tests).
    pub fn load_with(
        params: LoadParams,
        mut read: impl FnMut(LoadRead) -> Vec<u8>,
    ) -> Result<LoadedStore, LoadError> {
        let mut loader = Loader::new(params);
        while let Some(r) = loader.next_read() {
            let data = read(r);
            loader.supply(&data)?;
        }
        loader.finish()
    }
}

/// `len` zero bytes, or `None` when the heap cannot serve them (a store must not halt the
/// machine that reads it).
fn zeroed(len: usize) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, 0);
    Some(v)
}

/// Usage as `dmsetup status` reports it, in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// `next_free * chunk_sectors`.
    pub allocated_sectors: u64,
    /// COW device size.
    pub total_sectors: u64,
    /// `(current_area + 2) * chunk_sectors`.
    pub metadata_sectors: u64,
}

/// In-memory state of one persistent store.
#[derive(Clone, Debug)]
pub struct StoreState {
    /// Chunk size and area layout.
    pub geometry: Geometry,
    /// COW device size in sectors.
    pub cow_sectors: u64,
    /// Origin size in sectors.
    pub origin_sectors: u64,
    /// Next chunk to allocate.
    pub next_free: u64,
    /// Area records are appended to.
    pub current_area: u64,
    /// Records of the current area that are committed or being committed.
    pub committed_in_area: u64,
    /// In-memory image of the current area (one chunk).
    pub area: Vec<u8>,
}

impl StoreState {
    /// State of a freshly created store (area 0 empty, first data chunk 2).
    pub fn fresh(geometry: Geometry, cow_sectors: u64, origin_sectors: u64) -> Self {
        StoreState {
            geometry,
            cow_sectors,
            origin_sectors,
            next_free: 2,
            current_area: 0,
            committed_in_area: 0,
            area: vec![0u8; geometry.chunk_bytes()],
        }
    }

    /// COW chunks on the device.
    pub fn cow_chunks(&self) -> u64 {
        self.cow_sectors / u64::from(self.geometry.chunk_sectors)
    }

    /// Allocates the next COW chunk, or `None` when the store is full (Linux's rule).
    pub fn allocate(&mut self) -> Option<u64> {
        let cs = u64::from(self.geometry.chunk_sectors);
        if self.next_free.checked_add(1)?.checked_mul(cs)? > self.cow_sectors {
            return None;
        }
        let c = self.next_free;
        self.next_free = self.geometry.next_data_chunk(c);
        Some(c)
    }

    /// Room left in the current area, in records.
    pub fn area_room(&self) -> u64 {
        self.geometry.exceptions_per_area - self.committed_in_area
    }

    /// Appends a record to the in-memory area. Returns false if the area is full.
    pub fn append(&mut self, r: Record) -> bool {
        if self.area_room() == 0 {
            return false;
        }
        let ok = r.encode(&mut self.area, self.committed_in_area as usize);
        if ok {
            self.committed_in_area += 1;
        }
        ok
    }

    /// After a full area is durable: move to the next one.
    pub fn advance_area(&mut self) {
        self.current_area += 1;
        self.committed_in_area = 0;
        self.area.fill(0);
    }

    /// First sector of the current area.
    pub fn area_sector(&self) -> u64 {
        self.geometry
            .chunk_sector(self.geometry.area_chunk(self.current_area))
    }

    /// Usage as Linux's `persistent_usage()` computes it.
    pub fn usage(&self) -> Usage {
        let cs = u64::from(self.geometry.chunk_sectors);
        Usage {
            allocated_sectors: self.next_free * cs,
            total_sectors: self.cow_sectors,
            metadata_sectors: (self.current_area + 2) * cs,
        }
    }

    /// Sector count of one chunk.
    pub fn chunk_sectors(&self) -> u64 {
        u64::from(self.geometry.chunk_sectors)
    }

    /// Bytes per sector (for completeness of the API).
    pub const SECTOR_BYTES: usize = SECTOR_BYTES;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Geometry, Header, Record};

    /// A store of 4 KiB chunks (256 records per area) with `records` records, on a device
    /// of `cow_chunks` chunks.
    fn image(records: u64, cow_chunks: u64) -> Vec<u8> {
        let g = Geometry::new(8).unwrap();
        let mut dev = vec![0u8; (cow_chunks * 4096) as usize];
        Header::new(8).encode(&mut dev);
        let mut new = 2;
        for i in 0..records {
            let (area, index) = (i / 256, (i % 256) as usize);
            let at = (g.area_chunk(area) * 4096) as usize;
            assert!(Record {
                old_chunk: i,
                new_chunk: new
            }
            .encode(&mut dev[at..at + 4096], index));
            new = g.next_data_chunk(new);
        }
        dev
    }

    fn params(cow_chunks: u64) -> LoadParams {
        LoadParams {
            cow_sectors: cow_chunks * 8,
            cow_block_sectors: 1,
            origin_sectors: 1 << 30,
            origin_block_sectors: 1,
            table_runs: usize::MAX,
        }
    }

    /// Reads asked for ahead are the reads the loader then asks for, in order, and none
    /// lies past the device.
    #[test]
    fn reads_ahead_are_the_reads_asked_for_later() {
        for (records, cow_chunks) in [(3 * 256 + 5, 2000), (3 * 256, 2000), (4 * 256, 4 * 257 + 1)]
        {
            let dev = image(records, cow_chunks);
            let mut loader = Loader::new(params(cow_chunks));
            assert_eq!(loader.read_ahead(1), None, "nothing ahead of the header");
            let mut promised: Vec<LoadRead> = Vec::new();
            let mut asked = Vec::new();
            while let Some(r) = loader.next_read() {
                asked.push(r);
                for n in 0..6 {
                    if let Some(a) = loader.read_ahead(n) {
                        assert!((a.sector + u64::from(a.sectors)) <= cow_chunks * 8);
                        let k = asked.len() - 1 + n as usize;
                        if let Some(p) = promised.get(k) {
                            assert_eq!(*p, a);
                        } else {
                            assert_eq!(promised.len(), k);
                            promised.push(a);
                        }
                    }
                }
                let at = (r.sector * 512) as usize;
                loader
                    .supply(&dev[at..at + r.sectors as usize * 512])
                    .unwrap();
            }
            assert_eq!(&promised[..asked.len()], &asked[..]);
            let store = loader.finish().unwrap();
            assert_eq!(store.table.len(), records);
        }
    }
}
