//! Host-side reader of COW stores: loads a dm-snapshot persistent store from a COW image with
//! the `snapshot` crate's loader and reconstructs what the snapshot reads as, from the origin
//! image and the COW image, the way Linux's dm-snapshot would. Tests compare its SHA-256 with
//! the appliance's `checksum` of the snapshot.

use std::os::unix::fs::FileExt;
use std::path::Path;

use snapshot::format::{Binding, Geometry, Header, Record};
use snapshot::{LoadError, LoadParams, LoadedStore, Loader};

/// A COW store as found in an image, or a region of one.
pub struct CowImage<'a> {
    /// The bytes of the COW device (or region).
    pub bytes: &'a [u8],
}

impl CowImage<'_> {
    /// Loads the store (exception table, header, binding) for an origin of `origin_bytes`.
    pub fn load(&self, origin_bytes: u64) -> Result<LoadedStore, LoadError> {
        let params = LoadParams {
            cow_sectors: self.bytes.len() as u64 / 512,
            cow_block_sectors: 1,
            origin_sectors: origin_bytes / 512,
            origin_block_sectors: 1,
            table_runs: 1 << 20,
        };
        Loader::load_with(params, |read| {
            let start = (read.sector * 512) as usize;
            let end = start + read.sectors as usize * 512;
            self.bytes
                .get(start..end)
                .map(<[u8]>::to_vec)
                .unwrap_or_default()
        })
    }

    /// The snapshot's contents: each origin chunk, or its copy in the COW store where the
    /// table has one.
    pub fn snapshot_view(&self, origin: &[u8]) -> Result<Vec<u8>, LoadError> {
        let store = self.load(origin.len() as u64)?;
        let chunk = store.state.chunk_sectors() as usize * 512;
        let mut view = origin.to_vec();
        for (index, piece) in view.chunks_mut(chunk).enumerate() {
            if let Some(new_chunk) = store.table.lookup(index as u64) {
                let at = new_chunk as usize * chunk;
                if let Some(copy) = self.bytes.get(at..at + piece.len()) {
                    piece.copy_from_slice(copy);
                }
            }
        }
        Ok(view)
    }
}

/// Writes a store of `chunk_sectors` chunks bound to an origin (`serial`, `origin_bytes`) at
/// the start of `img`: header and binding in chunk 0, area 0 with `copies` (origin chunk →
/// COW chunk 2, 3, …) and the copied data (`fill` bytes).
pub fn bound_store(
    img: &crate::Image,
    name: &str,
    chunk_sectors: u32,
    serial: &str,
    origin_bytes: u64,
    copies: &[(u64, u8)],
) {
    use snapshot::format::{Binding, BoundedBytes, Header, Record};
    let mut chunk0 = vec![0u8; 4096];
    Header::new(chunk_sectors).encode(&mut chunk0);
    Binding {
        name: BoundedBytes::new(name.as_bytes()).unwrap(),
        origin_serial: BoundedBytes::new(serial.as_bytes()).unwrap(),
        origin_sectors: origin_bytes / 512,
        chunk_sectors,
        created_unix_seconds: 0,
        region_start: 0,
        region_sectors: std::fs::metadata(&img.path).unwrap().len() / 512,
        flags: 0,
        // Found by its serial, which the tests give each origin alone.
        origin_id: snapshot::OriginId::Serial,
    }
    .encode(&mut chunk0);
    img.write(0, &chunk0);
    let chunk = u64::from(chunk_sectors) * 512;
    if copies.is_empty() {
        return;
    }
    let mut area = vec![0u8; 4096];
    for (i, &(old, fill)) in copies.iter().enumerate() {
        let new = 2 + i as u64;
        assert!(Record {
            old_chunk: old,
            new_chunk: new
        }
        .encode(&mut area, i));
        img.write(new * chunk, &vec![fill; chunk as usize]);
    }
    img.write(chunk, &area);
}

/// Loads the store at the start of the COW image file `path` for an origin of
/// `origin_bytes`, reading only what the loader asks for (for sparse terabyte images).
pub fn load_file(path: &Path, origin_bytes: u64) -> Result<LoadedStore, LoadError> {
    let f = std::fs::File::open(path).expect("open COW image");
    let len = f.metadata().expect("COW image size").len();
    let params = LoadParams {
        cow_sectors: len / 512,
        cow_block_sectors: 1,
        origin_sectors: origin_bytes / 512,
        origin_block_sectors: 1,
        table_runs: usize::MAX,
    };
    Loader::load_with(params, |read| {
        let mut buf = vec![0u8; read.sectors as usize * 512];
        match f.read_exact_at(&mut buf, read.sector * 512) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        }
    })
}

/// How a crafted store's exceptions spread over the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Origin chunks 0, 1, 2, … in order: runs of eight in the table.
    Sequential,
    /// Origin chunks in a pseudo-random order (a bijection of the origin's chunks): one run
    /// per exception.
    Random,
}

/// The origin chunk of the `i`-th exception of a store filled `fill` on an origin of
/// `origin_chunks` chunks: a permutation of `0..origin_chunks` (cycle-walking an odd
/// multiplier on the next power of two).
pub fn fill_chunk(fill: Fill, i: u64, origin_chunks: u64) -> u64 {
    match fill {
        Fill::Sequential => i,
        Fill::Random => {
            let mask = origin_chunks.next_power_of_two() - 1;
            let step = |x: u64| {
                (x.wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1)
                    .wrapping_add(0x5EED))
                    & mask
            };
            let mut x = step(i);
            while x >= origin_chunks {
                x = step(x);
            }
            x
        }
    }
}

/// Bytes of COW device a store written by [`write_store`] with `exceptions` records of
/// `chunk_sectors` chunks uses: chunk 0, every full area with its data chunks, then the area
/// that ends the table with the data chunks of its records.
pub fn store_bytes(chunk_sectors: u32, exceptions: u64) -> u64 {
    let g = Geometry::new(chunk_sectors).expect("chunk size");
    let epa = g.exceptions_per_area;
    let last = g.area_chunk(exceptions / epa);
    (last + 1 + exceptions % epa) * g.chunk_bytes() as u64
}

/// Writes a valid dm-snapshot store with `exceptions` records into the image file `path`
/// (which must be large enough): chunk 0 (header and, if given, snapfw's `binding`), then every
/// metadata area the records need, with COW chunks allocated in order as the engine does
/// (2, 3, … skipping areas). Data chunks are not written (they read as zeroes in a sparse
/// image), except those `data` returns bytes for: it is called with (origin chunk, COW chunk)
/// and may return the chunk's contents. Returns the COW chunk of each exception, in order.
/// The image needs [`store_bytes`] bytes. The one writer of crafted stores: sequential,
/// random ([`fill_chunk`]) or any other order of origin chunks.
pub fn write_store(
    path: &Path,
    chunk_sectors: u32,
    binding: Option<&Binding>,
    exceptions: u64,
    old_of: impl Fn(u64) -> u64,
    mut data: impl FnMut(u64, u64) -> Option<Vec<u8>>,
) -> Vec<u64> {
    let g = Geometry::new(chunk_sectors).expect("chunk size");
    let chunk = g.chunk_bytes();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open COW image");
    let mut chunk0 = vec![0u8; chunk];
    Header::new(chunk_sectors).encode(&mut chunk0);
    if let Some(b) = binding {
        b.encode(&mut chunk0);
    }
    f.write_all_at(&chunk0, 0).expect("write chunk 0");
    let epa = g.exceptions_per_area;
    let mut area = vec![0u8; chunk];
    let mut new = 2u64;
    let mut news = Vec::with_capacity(exceptions as usize);
    let mut k = 0u64;
    let mut i = 0u64;
    // The area after the last full one is written too (all zero: it ends the table).
    loop {
        area.fill(0);
        let mut n = 0;
        while n < epa && i < exceptions {
            let old = old_of(i);
            assert!(Record {
                old_chunk: old,
                new_chunk: new
            }
            .encode(&mut area, n as usize));
            if let Some(bytes) = data(old, new) {
                f.write_all_at(&bytes, new * chunk as u64)
                    .expect("write data chunk");
            }
            news.push(new);
            new = g.next_data_chunk(new);
            n += 1;
            i += 1;
        }
        f.write_all_at(&area, g.area_chunk(k) * chunk as u64)
            .expect("write area");
        if n < epa {
            break;
        }
        k += 1;
    }
    f.sync_all().expect("sync COW image");
    news
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store as Linux writes it: 4 KiB chunks (8 sectors), header in chunk 0, area 0 in
    /// chunk 1 with two records (origin chunk 3 → COW chunk 2, origin chunk 7 → COW chunk 3)
    /// and the terminator, data chunks after it.
    fn linux_store() -> (Vec<u8>, Vec<u8>) {
        const CHUNK: usize = 4096;
        let origin: Vec<u8> = (0..16 * CHUNK).map(|i| (i / CHUNK) as u8).collect();
        let mut cow = vec![0u8; 8 * CHUNK];
        cow[0..4].copy_from_slice(&0x7041_6E53u32.to_le_bytes()); // "SnAp"
        cow[4..8].copy_from_slice(&1u32.to_le_bytes()); // valid
        cow[8..12].copy_from_slice(&1u32.to_le_bytes()); // version
        cow[12..16].copy_from_slice(&8u32.to_le_bytes()); // chunk size in sectors
        for (i, (old, new)) in [(3u64, 2u64), (7, 3)].into_iter().enumerate() {
            let at = CHUNK + i * 16;
            cow[at..at + 8].copy_from_slice(&old.to_le_bytes());
            cow[at + 8..at + 16].copy_from_slice(&new.to_le_bytes());
            cow[new as usize * CHUNK..(new as usize + 1) * CHUNK].fill(0xA0 + old as u8);
        }
        (origin, cow)
    }

    #[test]
    fn view_replaces_exactly_the_copied_chunks() {
        let (origin, cow) = linux_store();
        let image = CowImage { bytes: &cow };
        let store = image.load(origin.len() as u64).unwrap();
        assert!(store.valid);
        assert_eq!(store.records, 2);
        let view = image.snapshot_view(&origin).unwrap();
        for (chunk, piece) in view.chunks(4096).enumerate() {
            let expected = match chunk {
                3 => 0xA3,
                7 => 0xA7,
                c => c as u8,
            };
            assert!(piece.iter().all(|b| *b == expected), "chunk {chunk}");
        }
    }

    /// A store of scattered exceptions written on the host loads with every exception, fits
    /// the bytes `store_bytes` gives, and reads as its copies where written.
    #[test]
    fn a_written_store_loads_with_every_exception() {
        let origin_chunks = 5000; // not a power of two: the fill walks cycles
        let n = 3 * 256 + 7;
        let len = store_bytes(8, n);
        let img = crate::Image::new("cow-unit", len);
        let old = |i: u64| fill_chunk(Fill::Random, i, origin_chunks);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..n {
            assert!(
                old(i) < origin_chunks && seen.insert(old(i)),
                "chunk {i} repeats"
            );
        }
        let news = write_store(&img.path, 8, None, n, old, |o, _| {
            (o == old(0) || o == old(n - 1)).then(|| vec![0xA5; 4096])
        });
        assert_eq!(news[..3], [2, 3, 4]);
        assert_eq!(
            news[256],
            2 + 256 + 1,
            "the area of the next 256 records is skipped"
        );
        assert_eq!(
            (news[n as usize - 1] + 1) * 4096,
            len,
            "the last data chunk ends it"
        );
        assert_eq!(std::fs::metadata(&img.path).unwrap().len(), len);
        let bytes = std::fs::read(&img.path).unwrap();
        let store = CowImage { bytes: &bytes }
            .load(origin_chunks * 4096)
            .unwrap();
        assert_eq!(store.table.len(), n);
        for i in [0, 1, 255, 256, n - 1] {
            assert_eq!(store.table.lookup(old(i)), Some(news[i as usize]));
        }
        let view = CowImage { bytes: &bytes }
            .snapshot_view(&vec![0xEE; (origin_chunks * 4096) as usize])
            .unwrap();
        let at = |c: u64| (c * 4096) as usize;
        assert!(view[at(old(0))..at(old(0)) + 4096]
            .iter()
            .all(|b| *b == 0xA5));
        assert!(view[at(old(5))..at(old(5)) + 4096].iter().all(|b| *b == 0));
        let unmapped = (0..origin_chunks).find(|c| !seen.contains(c)).unwrap();
        assert_eq!(view[at(unmapped)], 0xEE);
    }

    #[test]
    fn a_corrupt_store_is_an_error_not_a_panic() {
        let (origin, mut cow) = linux_store();
        cow[0] ^= 0xff; // magic
        assert!(CowImage { bytes: &cow }.snapshot_view(&origin).is_err());
        let (origin, mut cow) = linux_store();
        cow[4096 + 8..4096 + 16].copy_from_slice(&1u64.to_le_bytes()); // record → area chunk
        assert!(CowImage { bytes: &cow }.snapshot_view(&origin).is_err());
    }
}
