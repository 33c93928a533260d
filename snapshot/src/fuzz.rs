//! Bodies of the fuzz targets in `tests/fuzz/` (cargo fuzz) that exercise this crate. Each
//! takes the fuzzer's bytes, never panics on them unless the code under test is wrong, and
//! checks what must hold whatever the bytes are. The fuzz targets call these functions, and
//! so does `tests/tests/fuzz_corpus.rs`, which replays every file of each target's corpus
//! (`tests/fuzz/corpus/TARGET/`) on the stable toolchain: `cargo test -p tests --test fuzz_corpus`.
//!
//! Built with the `fuzz` feature (the fuzz crate and the `tests` crate turn it on) (the fuzz crate turns it on); not part
//! of the appliance.

use alloc::vec;
use alloc::vec::Vec;

use crate::format::{
    decode_merge_marker, encode_merge_marker, Binding, BindingError, FreeExtent, Geometry, Header,
    Record, BINDING_BYTES, BINDING_OFFSET, FREE_EXTENT_BYTES, SECTOR_BYTES,
};
use crate::store::{LoadParams, Loader};

/// Bytes of the parameter block in front of a `store_loader` input.
pub const LOADER_PARAM_BYTES: usize = 12;

/// Largest read the loader may ask for: one chunk of the largest size snapfw creates (512
/// KiB). A header that claims bigger chunks (Linux's format allows 1 GiB) must be refused
/// before the appliance allocates a read buffer and an area image of that size at boot.
pub const LOADER_MAX_READ_BYTES: usize = 512 << 10;

/// `store_loader`: the loader walks a COW device whose bytes are the input.
///
/// Input: a 12-byte parameter block, then the device's contents from sector 0 (everything
/// after the input reads as zeroes, as a fresh disk does):
/// - byte 0, 1: log2 of the COW and of the origin logical block size in sectors (`& 3`);
/// - bytes 2..6: COW device size in sectors (`u32` little-endian);
/// - bytes 6..10: origin size in sectors (`u32` little-endian);
/// - bytes 10..12: exception table capacity in runs, minus one (`u16` little-endian).
///
/// Checks: the loader never panics, never asks for a read outside the device (other than
/// the header block of a device too small for one) or larger than
/// [`LOADER_MAX_READ_BYTES`], terminates, and a store it accepts is consistent: every
/// exception in its table points inside both devices and at no metadata chunk, no COW chunk
/// is used twice, the allocation point and the current area are where the next record and
/// chunk go.
pub fn store_loader(data: &[u8]) {
    let mut p = [0u8; LOADER_PARAM_BYTES];
    let n = data.len().min(LOADER_PARAM_BYTES);
    p[..n].copy_from_slice(&data[..n]);
    let image = &data[n..];
    let params = LoadParams {
        cow_block_sectors: 1 << (p[0] & 3),
        origin_block_sectors: 1 << (p[1] & 3),
        cow_sectors: u64::from(u32::from_le_bytes([p[2], p[3], p[4], p[5]])),
        origin_sectors: u64::from(u32::from_le_bytes([p[6], p[7], p[8], p[9]])),
        table_runs: usize::from(u16::from_le_bytes([p[10], p[11]])) + 1,
    };
    let mut loader = Loader::new(params);
    let mut reads = 0u64;
    while let Some(r) = loader.next_read() {
        reads += 1;
        // Every read but the header's moves on to a later area: a device of `cow_sectors`
        // has fewer areas than sectors.
        assert!(
            reads <= params.cow_sectors.max(1) + 1,
            "the loader does not finish"
        );
        let bytes = r.sectors as usize * SECTOR_BYTES;
        assert!(
            bytes <= LOADER_MAX_READ_BYTES,
            "the loader asks for a {bytes}-byte read"
        );
        let end = r.sector.checked_add(u64::from(r.sectors));
        assert!(
            reads == 1 || end.is_some_and(|e| e <= params.cow_sectors),
            "read {r:?} past the end of a {}-sector device",
            params.cow_sectors
        );
        let mut buf = vec![0u8; bytes];
        let at =
            usize::try_from(r.sector.saturating_mul(SECTOR_BYTES as u64)).unwrap_or(usize::MAX);
        if at < image.len() {
            let have = (image.len() - at).min(bytes);
            buf[..have].copy_from_slice(&image[at..at + have]);
        }
        if loader.supply(&buf).is_err() {
            // The loader keeps its error; `next_read` says there is nothing more to read.
            assert!(
                loader.next_read().is_none(),
                "a failed loader asks for more"
            );
        }
    }
    let Ok(st) = loader.finish() else {
        return;
    };
    let g = st.state.geometry;
    let cs = u64::from(g.chunk_sectors);
    let cow_chunks = params.cow_sectors / cs;
    let origin_chunks = params.origin_sectors.div_ceil(cs);
    assert!(
        cow_chunks >= 2,
        "a store on a device without room for area 0"
    );
    assert_eq!(st.state.area.len(), g.chunk_bytes());
    assert_eq!(st.state.cow_sectors, params.cow_sectors);
    assert!(st.state.committed_in_area <= g.exceptions_per_area);
    assert!(
        !st.merging || st.valid,
        "an invalid store reported as merging"
    );
    if !st.valid {
        assert_eq!(st.table.len(), 0, "an invalid store's exceptions were read");
        return;
    }
    assert_eq!(
        st.table.len(),
        st.records,
        "every record is in the table once"
    );
    let mut cow_used: Vec<u64> = Vec::new();
    let mut max_new = 1;
    st.table.for_each_run(|run| {
        for j in 0..run.len {
            let (old, new) = (run.old_chunk + j, run.new_chunk + j);
            assert!(old < origin_chunks, "origin chunk {old} past the origin");
            assert!(new < cow_chunks, "COW chunk {new} past the device");
            assert!(!g.is_metadata_chunk(new), "COW chunk {new} is metadata");
            assert_eq!(st.table.lookup(old), Some(new));
            cow_used.push(new);
            max_new = max_new.max(new);
        }
    });
    cow_used.sort_unstable();
    assert!(
        cow_used.windows(2).all(|w| w[0] != w[1]),
        "a COW chunk holds two exceptions"
    );
    // The next chunk handed out is past every chunk in use and is not metadata.
    assert!(st.state.next_free > max_new);
    assert!(!g.is_metadata_chunk(st.state.next_free));
    // Records in the current area's image are exactly the committed ones.
    for i in 0..g.exceptions_per_area as usize {
        let r = Record::decode(&st.state.area, i).expect("an area holds its records");
        assert_eq!(
            r.new_chunk != 0,
            (i as u64) < st.state.committed_in_area,
            "record {i} of the current area"
        );
    }
}

/// `decoders`: the decoders of what snapfw keeps in chunk 0 and in free space, on arbitrary
/// bytes: header, binding record, merge marker, free-extent marker, exception records.
///
/// The input is read as chunk 0 (or the sector a free-extent marker would be in). Checks:
/// no decoder panics; a binding, marker or free extent that decodes encodes back to the same
/// bytes and decodes to the same value; a short buffer is refused, not read past.
pub fn decoders(data: &[u8]) {
    let _ = Header::decode(data);
    match Binding::decode(data) {
        Ok(b) => {
            assert!(b.name.as_bytes().len() <= crate::format::BINDING_NAME_BYTES);
            assert!(b.origin_serial.as_bytes().len() <= crate::format::BINDING_SERIAL_BYTES);
            // A binding re-encodes to a record that decodes to the same binding (a version-1
            // record comes back as version 2 with no region and no flags).
            let mut chunk0 = vec![0u8; SECTOR_BYTES];
            b.encode(&mut chunk0);
            assert_eq!(Binding::decode(&chunk0), Ok(b.clone()));
            let _ = alloc::format!("{b:?}");
        }
        Err(BindingError::Absent) => {
            let all_zero = data
                .get(BINDING_OFFSET..BINDING_OFFSET + BINDING_BYTES)
                .is_some_and(|b| b.iter().all(|&x| x == 0));
            assert!(all_zero, "Absent for a record that is not all zeroes");
        }
        Err(BindingError::Corrupt) => {}
    }
    if let Some(marker) = decode_merge_marker(data) {
        let mut again = vec![0u8; SECTOR_BYTES];
        encode_merge_marker(&mut again, marker.saved_chunk);
        assert_eq!(decode_merge_marker(&again), Some(marker));
    }
    if let Some(a) = crate::format::AutoExtend::decode(data) {
        let mut again = vec![0u8; SECTOR_BYTES];
        crate::format::AutoExtend::encode(Some(a), &mut again);
        assert_eq!(crate::format::AutoExtend::decode(&again), Some(a));
    }
    if let Some(o) = crate::format::OriginMarker::decode(data) {
        // What decodes re-encodes to the same marker.
        let mut again = vec![0u8; SECTOR_BYTES];
        o.encode(&mut again);
        assert_eq!(crate::format::OriginMarker::decode(&again), Some(o));
        let _ = alloc::format!("{o:?}");
    }
    if let Some(f) = FreeExtent::decode(data) {
        let mut sector = [0u8; FREE_EXTENT_BYTES];
        f.encode(&mut sector);
        assert_eq!(&sector[..], &data[..FREE_EXTENT_BYTES]);
        assert_eq!(FreeExtent::decode(&sector), Some(f));
    }
    // Exception records, as the loader reads them from an area of any chunk size.
    let chunk_sectors = data
        .get(12..16)
        .map_or(1, |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    if let Some(g) = Geometry::new(chunk_sectors) {
        let records = (data.len() / crate::format::RECORD_BYTES) as u64;
        for i in 0..records.min(g.exceptions_per_area) {
            let r = Record::decode(data, i as usize).expect("a record inside the buffer");
            let mut out = [0u8; 16];
            assert!(r.encode(&mut out, 0));
            assert_eq!(Record::decode(&out, 0), Some(r));
        }
    }
    assert_eq!(Record::decode(data, data.len() / 16), None);
    assert_eq!(Record::decode(data, usize::MAX), None);
}

/// Seed inputs of `store_loader`: stores as Linux and snapfw write them (bound and unbound,
/// one and two areas, merging, invalid), and a few damaged ones.
pub fn store_loader_seeds() -> Vec<Vec<u8>> {
    use crate::format::{encode_chunk0, BoundedBytes, BINDING_FLAG_WRITABLE};
    let binding = |chunk_sectors| Binding {
        name: BoundedBytes::new(b"nightly").expect("short"),
        origin_serial: BoundedBytes::new(b"SNAPFW-VDA").expect("short"),
        origin_sectors: 4096,
        chunk_sectors,
        created_unix_seconds: 1_700_000_000,
        region_start: 0,
        region_sectors: 0,
        flags: BINDING_FLAG_WRITABLE,
        origin_id: crate::format::OriginId::Serial,
    };
    // params: block shifts, COW sectors, origin sectors, table runs - 1.
    let params = |cow: u32, origin: u32, runs: u16| {
        let mut p = vec![0u8, 0];
        p.extend_from_slice(&cow.to_le_bytes());
        p.extend_from_slice(&origin.to_le_bytes());
        p.extend_from_slice(&runs.to_le_bytes());
        p
    };
    // A store of `chunk`-sector chunks with `records` exceptions (origin chunk 3 * i + 1 in
    // the i-th data chunk), the areas they need, optionally bound and merging.
    let store = |chunk: u32, records: u64, bound: bool, merging: bool, valid: bool| {
        let g = Geometry::new(chunk).expect("chunk size");
        let cb = g.chunk_bytes();
        let mut img = vec![0u8; cb];
        let mut h = Header::new(chunk);
        h.valid = u32::from(valid);
        let b = binding(chunk);
        encode_chunk0(&mut img, &h, bound.then_some(&b));
        if merging {
            encode_merge_marker(&mut img, None);
        }
        let mut chunk_no = 2u64;
        for i in 0..records {
            let area = g.area_of_data_chunk(chunk_no);
            let at = g.area_chunk(area) as usize * cb;
            let index = (i % g.exceptions_per_area) as usize;
            if img.len() < at + cb {
                img.resize(at + cb, 0);
            }
            let r = Record {
                old_chunk: 3 * i + 1,
                new_chunk: chunk_no,
            };
            assert!(r.encode(&mut img[at..at + cb], index));
            chunk_no = g.next_data_chunk(chunk_no);
        }
        img
    };
    let mut out = Vec::new();
    for (chunk, records, bound, merging, valid) in [
        (1, 0, false, false, true),
        (1, 3, false, false, true),
        (1, 40, true, false, true),
        (1, 70, true, true, true),
        (2, 20, true, false, true),
        (8, 5, true, false, true),
        (1, 10, true, false, false),
    ] {
        let mut input = params(512, 4096, 255);
        input.extend(store(chunk, records, bound, merging, valid));
        out.push(input);
    }
    // Damage: a record on metadata, a duplicate COW chunk out of order, a COW device too small, 4 KiB blocks with 512-byte chunks.
    let mut on_meta = params(512, 4096, 255);
    on_meta.extend(store(1, 3, false, false, true));
    on_meta[LOADER_PARAM_BYTES + 512 + 24..LOADER_PARAM_BYTES + 512 + 32]
        .copy_from_slice(&1u64.to_le_bytes());
    out.push(on_meta);
    let mut dup = params(512, 4096, 255);
    dup.extend(store(1, 3, false, false, true));
    dup[LOADER_PARAM_BYTES + 512 + 40..LOADER_PARAM_BYTES + 512 + 48]
        .copy_from_slice(&2u64.to_le_bytes());
    out.push(dup);
    let mut small = params(1, 4096, 0);
    small.extend(store(1, 0, true, false, true));
    out.push(small);
    let mut blocks = params(512, 4096, 255);
    blocks[0] = 3;
    blocks.extend(store(1, 3, false, false, true));
    out.push(blocks);
    out
}

/// Seed inputs of `decoders`: chunk 0 with a version-3 binding and a merge marker, a
/// version-1 binding, a free-extent marker, an area of records.
pub fn decoders_seeds() -> Vec<Vec<u8>> {
    use crate::format::{encode_chunk0, BoundedBytes, BINDING_MAGIC_V1, BINDING_V1_BYTES};
    let b = Binding {
        name: BoundedBytes::new(b"s1").expect("short"),
        origin_serial: BoundedBytes::new(b"SER").expect("short"),
        origin_sectors: 1 << 20,
        chunk_sectors: 8,
        created_unix_seconds: 7,
        region_start: 2048,
        region_sectors: 65536,
        flags: 1,
        origin_id: crate::format::OriginId::Eui64([0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 1]),
    };
    let mut c0 = vec![0u8; SECTOR_BYTES];
    encode_chunk0(&mut c0, &Header::new(8), Some(&b));
    encode_merge_marker(&mut c0, Some(3));
    let mut v1 = c0.clone();
    v1[BINDING_OFFSET..BINDING_OFFSET + 8].copy_from_slice(&BINDING_MAGIC_V1);
    let end = BINDING_OFFSET + BINDING_V1_BYTES;
    let sum = crate::format::crc32c(&v1[BINDING_OFFSET..end - 4]);
    v1[end - 4..end].copy_from_slice(&sum.to_le_bytes());
    let mut free = vec![0u8; SECTOR_BYTES];
    FreeExtent {
        start: 4096,
        sectors: 12_288,
    }
    .encode(&mut free);
    let mut area = vec![0u8; SECTOR_BYTES];
    for i in 0..20u64 {
        Record {
            old_chunk: i * 5,
            new_chunk: i + 2,
        }
        .encode(&mut area, i as usize);
    }
    let mut origin = vec![0u8; SECTOR_BYTES];
    crate::format::OriginMarker {
        name: BoundedBytes::new(b"s1").expect("short"),
        cow: BoundedBytes::new(b"vdb, virtio-blk serial 'COW'").expect("short"),
        region_start: 2048,
        chunk_sectors: 8,
        saved_chunk: 9,
    }
    .encode(&mut origin);
    vec![c0, v1, free, area, vec![0u8; 40], origin]
}
