//! Format round trips against hand-made byte images of Linux stores, loader error cases, and
//! the loader fuzz (property test, 100,000 cases).

use proptest::prelude::*;
use snapshot::format::*;
use snapshot::sim::{Order, SimDisk, World};
use snapshot::*;

const CS: u32 = 1; // 512-byte chunks: 32 records per area, stride 33.

fn put_u32(img: &mut [u8], at: usize, v: u32) {
    img[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(img: &mut [u8], at: usize, v: u64) {
    img[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A store as Linux writes it, byte by byte: header, area 0 full (32 records), area 1 with
/// `extra` records and a terminator.
fn linux_image(cow_chunks: usize, extra: u64) -> Vec<u8> {
    let mut img = vec![0u8; cow_chunks * 512];
    img[0..4].copy_from_slice(b"SnAp");
    put_u32(&mut img, 4, 1);
    put_u32(&mut img, 8, 1);
    put_u32(&mut img, 12, CS);
    // Area 0 at chunk 1 describes data chunks 2..=33.
    for i in 0..32u64 {
        put_u64(&mut img, 512 + (i as usize) * 16, 100 + i);
        put_u64(&mut img, 512 + (i as usize) * 16 + 8, 2 + i);
    }
    // Area 1 at chunk 34 describes chunks 35..=66.
    for i in 0..extra {
        put_u64(&mut img, 34 * 512 + (i as usize) * 16, 10 + i);
        put_u64(&mut img, 34 * 512 + (i as usize) * 16 + 8, 35 + i);
    }
    img
}

fn params(cow_chunks: u64) -> LoadParams {
    LoadParams {
        cow_sectors: cow_chunks * u64::from(CS),
        cow_block_sectors: 1,
        origin_sectors: 1000,
        origin_block_sectors: 1,
        table_runs: 256,
    }
}

fn load(img: &[u8], p: LoadParams) -> Result<LoadedStore, LoadError> {
    Loader::load_with(p, |r| {
        let a = (r.sector as usize * 512).min(img.len());
        let b = (a + r.sectors as usize * 512).min(img.len());
        img[a..b].to_vec()
    })
}

#[test]
fn loads_a_linux_store() {
    let img = linux_image(80, 3);
    let st = load(&img, params(80)).unwrap();
    assert!(st.valid);
    assert_eq!(st.records, 35);
    assert_eq!(
        st.binding,
        Err(BindingError::Absent),
        "a Linux store is unbound"
    );
    assert_eq!(st.table.len(), 35);
    assert_eq!(st.table.lookup(100), Some(2));
    assert_eq!(st.table.lookup(131), Some(33));
    assert_eq!(st.table.lookup(12), Some(37));
    assert_eq!(st.table.lookup(13), None);
    assert_eq!(st.state.next_free, 38);
    assert_eq!(st.state.current_area, 1);
    assert_eq!(st.state.committed_in_area, 3);
    // dmsetup status: allocated/total metadata.
    assert_eq!(Status::Usage(st.state.usage()).to_string(), "38/80 3");
    // Sequential fill: the table holds runs, not records: 100..=131 in one run per group of
    // RUN_MAX chunks it touches, and 12 alone.
    let run_max = snapshot::table::RUN_MAX;
    assert_eq!(
        st.table.runs() as u64,
        (131 / run_max - 100 / run_max + 1) + 1
    );
}

#[test]
fn full_area_followed_by_zero_area() {
    let img = linux_image(80, 0);
    let st = load(&img, params(80)).unwrap();
    assert_eq!(st.records, 32);
    // next_free = 34 is the metadata chunk of area 1: skipped.
    assert_eq!(st.state.next_free, 35);
    assert_eq!(st.state.current_area, 1);
    assert_eq!(st.state.committed_in_area, 0);
}

#[test]
fn records_after_the_terminator_are_ignored_and_cleared() {
    let mut img = linux_image(80, 3);
    // A torn area write left a record in a later slot (after the terminator at index 3).
    put_u64(&mut img, 34 * 512 + 5 * 16, 77);
    put_u64(&mut img, 34 * 512 + 5 * 16 + 8, 40);
    let st = load(&img, params(80)).unwrap();
    assert_eq!(st.records, 35);
    assert_eq!(st.table.lookup(77), None);
    assert!(
        st.state.area[3 * 16..].iter().all(|&b| b == 0),
        "stray bytes kept in the area image"
    );
}

#[test]
fn loader_errors_name_the_problem() {
    let base = linux_image(80, 3);
    let p = params(80);
    let mut img = base.clone();
    img[0..4].copy_from_slice(&[0, 0, 0, 0]);
    assert_eq!(load(&img, p).unwrap_err(), LoadError::Unformatted);
    let mut img = base.clone();
    img[0] = b'X';
    assert!(matches!(load(&img, p), Err(LoadError::BadMagic(_))));
    let mut img = base.clone();
    put_u32(&mut img, 8, 2);
    assert_eq!(load(&img, p).unwrap_err(), LoadError::BadVersion(2));
    let mut img = base.clone();
    put_u32(&mut img, 12, 3);
    assert_eq!(load(&img, p).unwrap_err(), LoadError::BadChunkSize(3));
    let mut img = base.clone();
    put_u32(&mut img, 12, 0);
    assert_eq!(load(&img, p).unwrap_err(), LoadError::BadChunkSize(0));
    let mut q = p;
    q.cow_block_sectors = 8; // 4 KiB COW blocks, 512-byte chunks
    assert_eq!(
        load(&base, q).unwrap_err(),
        LoadError::ChunkSizeMismatch { chunk_sectors: 1 }
    );
    let mut img = base.clone();
    put_u64(&mut img, 34 * 512 + 8, 80);
    assert_eq!(
        load(&img, p).unwrap_err(),
        LoadError::RecordPastCowEnd {
            area: 1,
            index: 0,
            new_chunk: 80
        }
    );
    let mut img = base.clone();
    put_u64(&mut img, 34 * 512 + 8, 34);
    assert_eq!(
        load(&img, p).unwrap_err(),
        LoadError::RecordOnMetadata {
            area: 1,
            index: 0,
            new_chunk: 34
        }
    );
    let mut img = base.clone();
    put_u64(&mut img, 34 * 512, 1000);
    assert_eq!(
        load(&img, p).unwrap_err(),
        LoadError::RecordPastOriginEnd {
            area: 1,
            index: 0,
            old_chunk: 1000
        }
    );
    let mut img = base.clone();
    put_u64(&mut img, 34 * 512, 100);
    assert_eq!(
        load(&img, p).unwrap_err(),
        LoadError::DuplicateOriginChunk { old_chunk: 100 }
    );
    let mut img = base.clone();
    put_u64(&mut img, 34 * 512 + 8, 5); // out of order and a duplicate of chunk 5
    assert_eq!(
        load(&img, p).unwrap_err(),
        LoadError::DuplicateCowChunk { new_chunk: 5 }
    );
    // Out of order without duplicates: a store from before Linux ordered its commits.
    let mut img = base.clone();
    put_u64(&mut img, 34 * 512 + 8, 40);
    put_u64(&mut img, 34 * 512 + 16 + 8, 36);
    let st = load(&img, p).unwrap();
    assert_eq!(st.state.next_free, 41);
    assert_eq!(load(&base[..600], p).unwrap_err(), LoadError::ShortRead);
    let mut q = p;
    q.table_runs = 1;
    assert_eq!(load(&base, q).unwrap_err(), LoadError::TableFull);
}

/// Records of one run may come in any order (commits finish out of order), and an origin
/// chunk named again inside a run that its neighbours' records already made is still found.
#[test]
fn runs_join_whatever_the_record_order_and_duplicates_inside_runs_are_found() {
    let mut img = linux_image(80, 0);
    for (i, (old, new)) in [(12u64, 37u64), (10, 35), (11, 36), (9, 40)]
        .iter()
        .enumerate()
    {
        put_u64(&mut img, 34 * 512 + i * 16, *old);
        put_u64(&mut img, 34 * 512 + i * 16 + 8, *new);
    }
    let st = load(&img, params(80)).unwrap();
    assert_eq!(st.records, 36);
    assert_eq!(st.table.lookup(10), Some(35));
    assert_eq!(st.table.lookup(12), Some(37));
    assert_eq!(st.table.lookup(9), Some(40));
    // 100..=131 in 5 runs (groups of 8 from 96), 10..=12 in one, 9 alone.
    assert_eq!(st.table.runs(), 5 + 1 + 1);
    // Origin chunk 11 again, after its run formed (10, 11, 12 → 35, 36, 37).
    put_u64(&mut img, 34 * 512 + 4 * 16, 11);
    put_u64(&mut img, 34 * 512 + 4 * 16 + 8, 41);
    assert_eq!(
        load(&img, params(80)).unwrap_err(),
        LoadError::DuplicateOriginChunk { old_chunk: 11 }
    );
    // And inside a run of area 0 (100..=131 → 2..=33), named by a record that would extend
    // the run before it.
    let mut img = linux_image(80, 2);
    put_u64(&mut img, 34 * 512 + 2 * 16, 12);
    put_u64(&mut img, 34 * 512 + 2 * 16 + 8, 37);
    put_u64(&mut img, 34 * 512 + 3 * 16, 105);
    put_u64(&mut img, 34 * 512 + 3 * 16 + 8, 38);
    assert_eq!(
        load(&img, params(80)).unwrap_err(),
        LoadError::DuplicateOriginChunk { old_chunk: 105 }
    );
}

#[test]
fn invalid_store_loads_as_invalid() {
    let mut img = linux_image(80, 3);
    put_u32(&mut img, 4, 0);
    let st = load(&img, params(80)).unwrap();
    assert!(!st.valid);
    assert!(st.table.is_empty());
}

#[test]
fn binding_is_found_after_the_header() {
    let mut img = linux_image(80, 3);
    let b = Binding {
        name: BoundedBytes::new(b"daily-1").unwrap(),
        origin_serial: BoundedBytes::new(b"VIRTIO-0001").unwrap(),
        origin_sectors: 1000,
        chunk_sectors: CS,
        created_unix_seconds: 1_750_000_000,
        region_start: 0,
        region_sectors: 80 * CS as u64,
        flags: BINDING_FLAG_WRITABLE,
        origin_id: snapshot::OriginId::Serial,
    };
    b.encode(&mut img[..512]);
    let st = load(&img, params(80)).unwrap();
    assert_eq!(st.binding, Ok(b));
    img[40] ^= 0xFF;
    assert_eq!(
        load(&img, params(80)).unwrap().binding,
        Err(BindingError::Corrupt)
    );
}

/// Engine round trip: create a store with a binding through the engine, reload it from the
/// simulated disk byte for byte, attach it, write more, reload again.
#[test]
fn engine_store_reloads_and_appends() {
    let origin_sectors = 256;
    let mut ec = EngineConfig::new(origin_sectors);
    ec.copy_buffer_sectors = 8;
    let engine = Engine::new(ec).unwrap();
    let mut world = World::new(
        engine,
        SimDisk::new(origin_sectors, |s| (1 << 63) | s),
        Order::InOrder,
        1,
    );
    let binding = Binding {
        name: BoundedBytes::new(b"s1").unwrap(),
        origin_serial: BoundedBytes::new(b"SER").unwrap(),
        origin_sectors,
        chunk_sectors: 1,
        created_unix_seconds: 1,
        region_start: 0,
        region_sectors: 120,
        flags: 0,
        origin_id: snapshot::OriginId::NvmeNamespace(1),
    };
    let sc = SnapshotConfig {
        chunk_sectors: 1,
        cow_sectors: 120,
        cow_block_sectors: 1,
        cow_fua: true,
        writable: false,
        table_runs: 120,
        binding: Some(binding.clone()),
    };
    world.engine.quiesce_origin();
    world.settle(100);
    let id = world.engine.create_snapshot(&sc).unwrap();
    world.cows[id.0 as usize] = Some(SimDisk::new(120, |_| 0));
    world.settle(100);
    world.engine.resume_origin();
    let mut tag = 1;
    let mut write = |world: &mut World, sector: u64| {
        world.write_origin(tag, sector, 1).unwrap();
        tag += 1;
        world.settle(1000);
    };
    for s in 0..40 {
        write(&mut world, s * 3);
    }
    let p = LoadParams {
        cow_sectors: 120,
        cow_block_sectors: 1,
        origin_sectors,
        origin_block_sectors: 1,
        table_runs: 120,
    };
    let bytes_of = |world: &World| {
        world
            .contents
            .image_bytes(&world.cows[0].as_ref().unwrap().durable)
    };
    let img = bytes_of(&world);
    let st = load(&img, p).unwrap();
    assert_eq!(st.records, 40);
    assert_eq!(st.binding, Ok(binding));
    assert_eq!(
        Status::Usage(st.state.usage()),
        world.engine.status(id).unwrap()
    );
    // A second engine adopts the store and keeps appending.
    let mut ec2 = EngineConfig::new(origin_sectors);
    ec2.copy_buffer_sectors = 8;
    let mut world2 = World::new(
        Engine::new(ec2).unwrap(),
        world.origin.clone(),
        Order::Reversed,
        2,
    );
    world2.contents = std::mem::take(&mut world.contents);
    let id2 = world2.engine.attach_snapshot(st, &sc).unwrap();
    world2.cows[id2.0 as usize] = world.cows[0].take();
    for s in 0..30 {
        write(&mut world2, s * 3 + 1);
    }
    let img = bytes_of(&world2);
    let st = load(&img, p).unwrap();
    assert_eq!(st.records, 70);
    assert_eq!(world2.engine.status(id2).unwrap().to_string(), "74/120 4");
}

fn valid_seed_image(kind: u8) -> Vec<u8> {
    match kind % 3 {
        0 => linux_image(80, 3),
        1 => linux_image(80, 0),
        _ => {
            let mut i = linux_image(80, 31);
            put_u32(&mut i, 4, 0);
            i
        }
    }
}

proptest! {
    // 100,000 cases: half raw random headers over a valid image, half byte mutations of
    // valid images. The loader must never panic; what it accepts must be self-consistent.
    #![proptest_config(ProptestConfig { cases: 50_000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn loader_never_panics_on_mutations(kind in any::<u8>(), muts in proptest::collection::vec((0usize..80 * 512, any::<u8>()), 1..12), cow in 2u64..90, block in 0u32..3) {
        let mut img = valid_seed_image(kind);
        for (at, b) in muts {
            img[at] = b;
        }
        check_loader(&img, cow, block);
    }

    #[test]
    fn loader_never_panics_on_random_bytes(head in proptest::collection::vec(any::<u8>(), 0..1100), cow in 0u64..90, block in 0u32..3) {
        let mut img = vec![0u8; 80 * 512];
        img[..head.len()].copy_from_slice(&head);
        if head.len() > 4 && head[0] & 1 == 0 {
            // Often keep a plausible header so the record paths get random records.
            img[0..4].copy_from_slice(b"SnAp");
            put_u32(&mut img, 8, 1);
            put_u32(&mut img, 12, 1 << (head[1] % 4));
        }
        check_loader(&img, cow, block);
    }
}

static FUZZ_CASES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn check_loader(img: &[u8], cow: u64, block: u32) {
    let n = FUZZ_CASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if n.is_multiple_of(25_000) {
        println!("loader fuzz cases run: {n}");
    }
    let p = LoadParams {
        cow_sectors: cow,
        cow_block_sectors: 1 << block,
        origin_sectors: 1000,
        origin_block_sectors: 1,
        table_runs: 64,
    };
    if let Ok(st) = load(img, p) {
        let g = st.state.geometry;
        let cow_chunks = cow / u64::from(g.chunk_sectors);
        let mut seen = std::collections::BTreeSet::new();
        st.table.for_each_run(|r| {
            for j in 0..r.len {
                let n = r.new_chunk + j;
                assert!(
                    n < cow_chunks && !g.is_metadata_chunk(n),
                    "accepted bad chunk {n}"
                );
                assert!(seen.insert(n), "accepted duplicate {n}");
            }
        });
        assert!(st.state.next_free >= 2);
    }
}

#[test]
fn a_chunk_size_past_the_limit_is_refused_before_any_chunk_is_read() {
    // 2^21-sector (1 GiB) chunks are valid for the format; a loader told to serve at most
    // 512 KiB refuses them after the header, without asking for a chunk-sized read.
    let mut img = vec![0u8; 4096];
    img[0..4].copy_from_slice(b"SnAp");
    put_u32(&mut img, 4, 1);
    put_u32(&mut img, 8, 1);
    put_u32(&mut img, 12, 1 << 21);
    let p = LoadParams {
        cow_sectors: 1 << 25, // 16 GiB
        cow_block_sectors: 1,
        origin_sectors: 1 << 20,
        origin_block_sectors: 1,
        table_runs: usize::MAX,
    };
    let mut loader = Loader::new(p).max_chunk_sectors(1024);
    let first = loader.next_read().unwrap();
    assert_eq!((first.sector, first.sectors), (0, 1));
    assert_eq!(
        loader.supply(&img[..512]),
        Err(LoadError::ChunkTooLarge {
            chunk_sectors: 1 << 21,
            max_sectors: 1024
        })
    );
    assert_eq!(loader.next_read(), None);
    // 512 KiB chunks are served, and the table of an empty store costs next to nothing.
    put_u32(&mut img, 12, 1024);
    let st = Loader::load_with(p, |r| {
        assert!(r.sectors <= 1024, "a read of {} sectors", r.sectors);
        let mut v = vec![0u8; r.sectors as usize * 512];
        if r.sector == 0 {
            v[..512].copy_from_slice(&img[..512]);
        }
        v
    })
    .unwrap();
    assert_eq!(st.table.limit(), (1 << 25) / 1024);
    assert!(
        st.table.reserved_bytes() < 4096,
        "{}",
        st.table.reserved_bytes()
    );
}
