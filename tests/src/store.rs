//! Large COW stores written on the host in dm-snapshot's persistent format (with the
//! `snapshot` crate's encoders), for tests that need more exceptions than a test could have
//! the appliance copy: millions of scattered exceptions in a sparse image, written in seconds.

use std::os::unix::fs::FileExt;

use snapshot::format::{Binding, BoundedBytes, Header, Record};

use crate::Image;

/// Chunk size of the stores written here (4 KiB, 8 sectors).
pub const CHUNK: u64 = 4096;
/// Exception records per metadata area of a 4 KiB-chunk store.
const PER_AREA: u64 = CHUNK / 16;

/// A store of `exceptions` scattered exceptions written by [`write_scattered_store`].
pub struct ScatteredStore {
    /// Bytes the COW image needs.
    pub cow_bytes: u64,
    /// The origin chunk of exception `i`.
    origin_chunks: u64,
}

impl ScatteredStore {
    /// The layout of `exceptions` exceptions over an origin of `origin_chunks` chunks (a power
    /// of two, at least `exceptions`).
    pub fn new(exceptions: u64, origin_chunks: u64) -> ScatteredStore {
        assert!(origin_chunks.is_power_of_two() && origin_chunks >= exceptions);
        let areas = exceptions.div_ceil(PER_AREA);
        ScatteredStore {
            // Chunk 0, then each area and its data chunks, then the zeroed area that ends it.
            cow_bytes: (1 + areas * (PER_AREA + 1) + 1) * CHUNK,
            origin_chunks,
        }
    }

    /// The origin chunk exception `i` copies: an odd multiplier is a bijection modulo a power
    /// of two, so the chunks are distinct and scattered (almost no two are neighbours, so a
    /// table holds one run per exception, as for random writes).
    pub fn origin_chunk(&self, i: u64) -> u64 {
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x5eed) & (self.origin_chunks - 1)
    }

    /// The COW chunk that holds exception `i`'s copy.
    pub fn cow_chunk(&self, i: u64) -> u64 {
        let (area, slot) = (i / PER_AREA, i % PER_AREA);
        1 + area * (PER_AREA + 1) + 1 + slot
    }
}

/// Writes into `img` (sparse, at least `ScatteredStore::cow_bytes`) a store named `name`
/// bound to the origin with serial `serial` of `origin_chunks` 4 KiB chunks, holding
/// `exceptions` exceptions; the copies of the exceptions in `filled` hold their index's low
/// byte plus one (the other copies are zeros, as the image is sparse).
pub fn write_scattered_store(
    img: &Image,
    name: &str,
    serial: &str,
    origin_chunks: u64,
    exceptions: u64,
    filled: &[u64],
) -> ScatteredStore {
    let store = ScatteredStore::new(exceptions, origin_chunks);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .expect("open image");
    let image_bytes = file.metadata().expect("image size").len();
    assert!(image_bytes >= store.cow_bytes, "the image is too small");
    let mut chunk0 = vec![0u8; CHUNK as usize];
    Header::new((CHUNK / 512) as u32).encode(&mut chunk0);
    Binding {
        name: BoundedBytes::new(name.as_bytes()).unwrap(),
        origin_serial: BoundedBytes::new(serial.as_bytes()).unwrap(),
        origin_sectors: origin_chunks * CHUNK / 512,
        chunk_sectors: (CHUNK / 512) as u32,
        created_unix_seconds: 0,
        region_start: 0,
        region_sectors: image_bytes / 512,
        flags: 0,
        origin_id: snapshot::OriginId::Serial,
    }
    .encode(&mut chunk0);
    file.write_all_at(&chunk0, 0).expect("write chunk 0");
    let mut area = vec![0u8; CHUNK as usize];
    let areas = exceptions.div_ceil(PER_AREA);
    for a in 0..areas {
        area.fill(0);
        for slot in 0..PER_AREA {
            let i = a * PER_AREA + slot;
            if i == exceptions {
                break;
            }
            assert!(Record {
                old_chunk: store.origin_chunk(i),
                new_chunk: store.cow_chunk(i),
            }
            .encode(&mut area, slot as usize));
        }
        let at = (1 + a * (PER_AREA + 1)) * CHUNK;
        file.write_all_at(&area, at).expect("write area");
    }
    for &i in filled {
        let data = vec![(i as u8).wrapping_add(1); CHUNK as usize];
        file.write_all_at(&data, store.cow_chunk(i) * CHUNK)
            .expect("write copy");
    }
    file.sync_all().expect("sync image");
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_loads_on_the_host_with_every_exception() {
        let origin_chunks = 1 << 12;
        let n = 1000;
        let store_layout = ScatteredStore::new(n, origin_chunks);
        let img = Image::new("store-unit", store_layout.cow_bytes);
        let store = write_scattered_store(&img, "big", "ORIGIN", origin_chunks, n, &[0, 999]);
        let bytes = std::fs::read(&img.path).unwrap();
        let loaded = crate::cow::CowImage { bytes: &bytes }
            .load(origin_chunks * CHUNK)
            .unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..n {
            assert!(seen.insert(store.origin_chunk(i)), "chunk {i} repeats");
        }
        let view = crate::cow::CowImage { bytes: &bytes }
            .snapshot_view(&vec![0xEEu8; (origin_chunks * CHUNK) as usize])
            .unwrap();
        let at = |i: u64| (store.origin_chunk(i) * CHUNK) as usize;
        assert!(view[at(0)..at(0) + CHUNK as usize].iter().all(|b| *b == 1));
        assert!(view[at(999)..at(999) + 4096].iter().all(|b| *b == 0xE8)); // 999 & 0xff = 0xe7
        assert!(view[at(5)..at(5) + 4096].iter().all(|b| *b == 0));
        let unmapped = (0..origin_chunks).find(|c| !seen.contains(c)).unwrap();
        let u = (unmapped * CHUNK) as usize;
        assert_eq!(view[u], 0xEE);
        drop(loaded);
    }
}
