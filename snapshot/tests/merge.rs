//! Snapshot merge: crash enumeration with concurrent origin I/O and a second snapshot, resume
//! after every crash, error handling, refusals, and a negative control.
//!
//! At every I/O completion point during a merge, crash images are taken (volatile writes
//! kept in several ways, torn at sector granularity) and checked:
//! - the merging store loads with the plain (Linux-rules) loader, still valid, with its merge
//!   marker once `MergeStarted` was reported (or it is wiped: the merge finished);
//! - the merged view (a chunk still in the store from its COW chunk, others from the origin)
//!   is what the origin model allows: the snapshot's contents plus the origin writes made
//!   during the merge (acknowledged ones once flushed);
//! - every other snapshot still reads its own frozen contents (plus its own writes);
//! - a fresh engine that attaches the stores resumes the merge by itself and runs it to the
//!   end: the origin then equals the merged view exactly, the store is wiped, and the other
//!   snapshots still read what they read in the crash image.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use common::*;
use snapshot::sim::{Order, SimDisk, World};
use snapshot::*;

static MERGE_STATES: AtomicU64 = AtomicU64::new(0);
thread_local! {
    /// Crash states checked while a merge was under way (the rest are before it starts), in
    /// this test's thread.
    static DURING_MERGE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

const ORDERS: [Order; 3] = [Order::InOrder, Order::Reversed, Order::Random];

fn w(sector: u64, sectors: u32) -> Op {
    Op::OriginWrite {
        sector,
        sectors,
        fua: false,
    }
}

fn create(chunk: u32, cow_chunks: u64, fua: bool) -> Op {
    Op::Create {
        chunk,
        cow_chunks,
        writable: true,
        fua,
    }
}

fn load(h: &Harness, s: u16, img: &[u64]) -> Result<LoadedStore, LoadError> {
    let m = &h.snaps[&s];
    let params = LoadParams {
        cow_sectors: m.cow_sectors,
        cow_block_sectors: 1,
        origin_sectors: h.origin.sectors(),
        origin_block_sectors: 1,
        table_runs: m.cow_sectors as usize,
    };
    let contents = &h.world.contents;
    Loader::load_with(params, |r| {
        let a = r.sector as usize;
        let b = (a + r.sectors as usize).min(img.len());
        contents.image_bytes(&img[a.min(b)..b])
    })
}

/// A snapshot's view over an origin image.
fn view(table: &snapshot::table::ExceptionTable, cs: u64, cow: &[u64], origin: &[u64]) -> Vec<u64> {
    (0..origin.len() as u64)
        .map(|x| match table.lookup(x / cs) {
            Some(n) => cow.get((n * cs + x % cs) as usize).copied().unwrap_or(0),
            None => origin[x as usize],
        })
        .collect()
}

/// The crash check used while a merge runs (before it, the harness's own check).
fn merge_check(
    h: &Harness,
    origin_img: &[u64],
    cows: &BTreeMap<u16, Vec<u64>>,
) -> Result<(), String> {
    let Some(ms) = h.merging else {
        return h.check_image(origin_img, cows);
    };
    DURING_MERGE.with(|d| d.set(d.get() + 1));
    let mcs = u64::from(h.snaps[&ms].chunk);
    let mimg = &cows[&ms];
    // The merged view as a boot would see it.
    let (merged, marker) = match load(h, ms, mimg) {
        Ok(l) => {
            if !l.valid {
                return Err("merging store loads invalid".into());
            }
            if !l.merging && h.merge_started {
                return Err("merge marker lost after MergeStarted".into());
            }
            let mut v = view(&l.table, mcs, mimg, origin_img);
            if let Some(saved) = l.merge_saved_chunk {
                // Origin chunk 0 lives in the saved chunk while the origin is marked.
                for x in 0..mcs.min(v.len() as u64) {
                    v[x as usize] = mimg.get((saved * mcs + x) as usize).copied().unwrap_or(0);
                }
            }
            (v, l.merging)
        }
        Err(LoadError::Unformatted) => (origin_img.to_vec(), false),
        Err(e) => return Err(format!("merging store does not load: {e:?}")),
    };
    for (x, &v) in merged.iter().enumerate() {
        if !h.origin.allowed(x as u64, v) {
            return Err(format!(
                "merged view sector {x} holds {v:#x}, expected {:#x}",
                h.origin.current(x as u64)
            ));
        }
    }
    // The origin on its own, as a boot that does not find the store would see it: either it
    // carries the origin marker (and the store can finish the merge: it is merging and keeps
    // chunk 0), or it is right as it is (nothing merged yet, or all of it and chunk 0 back).
    let block0 = h.world.contents.image_bytes(&origin_img[..1]);
    match OriginMarker::decode(&block0) {
        Some(o) => {
            let saved = load(h, ms, mimg).ok().and_then(|l| l.merge_saved_chunk);
            if saved != Some(o.saved_chunk) {
                return Err(format!(
                    "origin marked (saved chunk {}) but the store says {saved:?}",
                    o.saved_chunk
                ));
            }
        }
        None if h.merge_started => {
            if let Some(x) =
                (0..origin_img.len()).find(|&x| !h.origin.allowed(x as u64, origin_img[x]))
            {
                return Err(format!(
                    "origin not marked but half-merged: sector {x} holds {:#x}, expected {:#x}",
                    origin_img[x],
                    h.origin.current(x as u64)
                ));
            }
        }
        None => {}
    }
    // Other snapshots: their frozen contents, over the raw origin.
    let mut others = BTreeMap::new();
    for (&s, m) in &h.snaps {
        if s == ms || !m.created || m.deleted {
            continue;
        }
        let Some(img) = cows.get(&s) else { continue };
        let l = load(h, s, img).map_err(|e| format!("snapshot {s}: load failed: {e:?}"))?;
        if !l.valid {
            if m.invalidated {
                continue;
            }
            return Err(format!("snapshot {s} loads invalid"));
        }
        let v = view(&l.table, u64::from(m.chunk), img, origin_img);
        for (x, &val) in v.iter().enumerate() {
            if !m.model.allowed(x as u64, val) {
                return Err(format!(
                    "snapshot {s} sector {x} reads {val:#x} during merge, expected {:#x}",
                    m.model.current(x as u64)
                ));
            }
        }
        others.insert(s, v);
    }
    resume_and_check(h, origin_img, cows, &merged, marker, &others)
}

/// Boots a fresh engine on the crash images, lets it finish the merge, and checks the result.
fn resume_and_check(
    h: &Harness,
    origin_img: &[u64],
    cows: &BTreeMap<u16, Vec<u64>>,
    merged: &[u64],
    marker: bool,
    others: &BTreeMap<u16, Vec<u64>>,
) -> Result<(), String> {
    let ms = h.merging.unwrap_or(0);
    let mut ec = EngineConfig::new(h.origin.sectors());
    ec.max_snapshots = 4;
    ec.copy_buffers = 4;
    ec.copy_buffer_sectors = h.cfg.copy_buffer_sectors;
    let engine = Engine::new(ec).map_err(|e| format!("{e:?}"))?;
    let origin = SimDisk::new(origin_img.len() as u64, |x| origin_img[x as usize]);
    let mut world = World::new(engine, origin, Order::Random, h.point_seed());
    world.contents = h.world.contents.clone();
    let mut merging_id = None;
    let mut ids = BTreeMap::new();
    for (&s, img) in cows {
        let m = &h.snaps[&s];
        let Ok(l) = load(h, s, img) else { continue };
        if !l.valid {
            continue;
        }
        let resumes = l.merging;
        let sc = SnapshotConfig {
            chunk_sectors: m.chunk,
            cow_sectors: m.cow_sectors,
            cow_block_sectors: 1,
            cow_fua: s % 2 == 0,
            writable: true,
            table_runs: m.cow_sectors as usize,
            binding: None,
        };
        let id = world
            .engine
            .attach_snapshot(l, &sc)
            .map_err(|e| format!("attach {s}: {e:?}"))?;
        world.cows[id.0 as usize] = Some(SimDisk::new(m.cow_sectors, |x| img[x as usize]));
        ids.insert(s, id);
        if s == ms {
            merging_id = Some(id);
            if resumes != marker {
                return Err("loader and check disagree on the marker".into());
            }
        }
    }
    // Every store is attached: let a resumed merge run.
    let held = world.engine.resume_merge();
    if held != (marker && merging_id.is_some()) {
        return Err(format!("resume_merge said {held}, marker {marker}"));
    }
    if let Some(id) = merging_id {
        if world.engine.merge_progress().is_none() {
            // The marker never became durable: the operator starts the merge again.
            world.engine.quiesce_origin();
            world
                .engine
                .start_merge(id)
                .map_err(|e| format!("restart merge: {e:?}"))?;
            world.engine.resume_origin();
        }
    }
    world.settle(1_000_000);
    if world.engine.merge_progress().is_some() {
        return Err(format!(
            "resumed merge did not finish: {}",
            world.engine.debug_state()
        ));
    }
    if merging_id.is_some()
        && !world
            .events
            .iter()
            .any(|e| matches!(e, Event::MergeDone { .. }))
    {
        return Err("no MergeDone after resume".into());
    }
    if world.origin.current != merged {
        let x = (0..merged.len())
            .find(|&x| world.origin.current[x] != merged[x])
            .unwrap_or(0);
        return Err(format!(
            "after resumed merge origin sector {x} = {:#x}, merged view had {:#x}",
            world.origin.current[x], merged[x]
        ));
    }
    if world.origin.durable != world.origin.current {
        return Err("merged origin not durable when MergeDone".into());
    }
    if let Some(id) = merging_id {
        let cow = world.cows[id.0 as usize]
            .as_ref()
            .map(|d| d.durable.clone());
        if let Some(c) = cow {
            let cs = h.snaps[&ms].chunk as usize;
            if c[..2 * cs].iter().any(|&v| v != 0) {
                return Err("store not wiped (chunk 0 / area 0) after merge".into());
            }
        }
    }
    for (&s, before) in others {
        let Some(&id) = ids.get(&s) else {
            continue;
        };
        let cs = u64::from(h.snaps[&s].chunk);
        let now = world.origin.current.clone();
        let mut table = snapshot::table::ExceptionTable::with_capacity(1024);
        world.engine.for_each_exception(id, |o, n, _| {
            let _ = table.insert(o, n);
        });
        let cow = world.cows[id.0 as usize]
            .as_ref()
            .map(|d| d.current.clone())
            .unwrap_or_default();
        let after = view(&table, cs, &cow, &now);
        if &after != before {
            return Err(format!("snapshot {s} changed by the resumed merge"));
        }
    }
    Ok(())
}

trait PointSeed {
    fn point_seed(&self) -> u64;
}

impl PointSeed for Harness {
    fn point_seed(&self) -> u64 {
        self.outcome.crash_states ^ self.cfg.seed.rotate_left(17)
    }
}

fn new_harness(cfg: RunConfig) -> Harness {
    let mut h = Harness::new(cfg);
    h.custom_check = Some(merge_check);
    h
}

fn run_merge(name: &str, cfg: RunConfig, ops: &[Op]) -> Harness {
    let mut h = new_harness(cfg);
    let during = DURING_MERGE.with(|d| d.get());
    h.run(ops);
    let during = DURING_MERGE.with(|d| d.get()) - during;
    MERGE_STATES.fetch_add(h.outcome.crash_states, AtomicOrdering::Relaxed);
    assert!(
        h.outcome.violations.is_empty(),
        "{name}: {} violations, first: {:#?}",
        h.outcome.violations.len(),
        &h.outcome.violations[..h.outcome.violations.len().min(5)]
    );
    assert!(
        h.merging.is_some(),
        "{name}: merge refused: {:?}",
        h.merge_refused
    );
    assert!(
        h.merge_done,
        "{name}: no MergeDone: {}",
        h.world.engine.debug_state()
    );
    assert!(
        h.world.engine.is_idle(),
        "{name}: not idle: {}",
        h.world.engine.debug_state()
    );
    assert!(h.world.engine.merge_progress().is_none());
    // The live origin is the model: the snapshot's contents plus the writes made since.
    for x in 0..h.origin.sectors() {
        assert_eq!(
            h.world.origin.current[x as usize],
            h.origin.current(x),
            "{name}: origin sector {x} after the merge"
        );
    }
    // The same line format as tests/crash.rs: `make test` sums the number before
    // "crash states checked".
    println!(
        "{name} ({during} during the merge, each resumed to the end): {} crash states checked",
        h.outcome.crash_states
    );
    h
}

/// Scribble over the origin after snapshot 0, take snapshot 1, merge 0 with origin I/O going on.
fn scripted(chunk: u32, other_chunk: u32, fua: bool) -> Vec<Op> {
    let c = chunk;
    let mut ops = vec![create(c, 60, fua)];
    for i in 0..10u64 {
        ops.push(w(i * 6 % 60, 3 + (i % 3) as u32));
    }
    ops.push(Op::SnapWrite {
        snap: 0,
        sector: 20,
        sectors: 5,
    });
    ops.push(create(other_chunk, 80, !fua));
    ops.push(w(2, 6));
    ops.push(w(40, 10));
    ops.push(Op::StartMerge { snap: 0 });
    // Concurrent origin I/O: writes to merged and unmerged chunks, reads, flushes.
    ops.push(w(0, 4));
    ops.push(Op::OriginRead {
        sector: 0,
        sectors: 64,
    });
    ops.push(w(21, 2));
    ops.push(w(44, 9));
    ops.push(Op::OriginFlush);
    ops.push(w(58, 6));
    ops.push(Op::SnapRead {
        snap: 1,
        sector: 0,
        sectors: 64,
    });
    ops.push(Op::OriginRead {
        sector: 10,
        sectors: 30,
    });
    ops.push(w(30, 4));
    ops.push(Op::OriginFlush);
    ops
}

#[test]
fn merge_scripted_with_second_snapshot() {
    let mut total = 0;
    for (i, order) in ORDERS.into_iter().enumerate() {
        for (chunk, other, fua) in [(2u32, 4u32, true), (2, 2, false), (4, 2, true)] {
            let mut cfg = RunConfig::new(64, 4, order, 500 + i as u64 + u64::from(chunk));
            cfg.copy_buffer_sectors = 8;
            let h = run_merge(
                &format!("merge scripted {order:?} chunk {chunk}/{other} fua {fua}"),
                cfg,
                &scripted(chunk, other, fua),
            );
            total += h.outcome.crash_states;
        }
    }
    println!("MERGE CRASH STATES CHECKED (scripted): {total}");
}

/// One-sector chunks: 32 records per area, so the merge walks back over several areas.
#[test]
fn merge_across_areas() {
    let mut total = 0;
    for (i, order) in ORDERS.into_iter().enumerate() {
        let mut ops = vec![create(1, 120, i != 1)];
        for s in (0..90u64).rev() {
            // Out of order, in pairs: runs of two consecutive records and single ones.
            ops.push(w(s * 7 % 90, 1 + (s % 2) as u32));
        }
        ops.push(create(2, 80, true));
        ops.push(Op::StartMerge { snap: 0 });
        for s in 0..12u64 {
            ops.push(w(s * 11 % 90, 2));
        }
        ops.push(Op::OriginFlush);
        let mut cfg = RunConfig::new(96, 8, order, 600 + i as u64);
        cfg.random_crashes = 1;
        cfg.copy_buffer_sectors = 4;
        let h = run_merge(&format!("merge across areas {order:?}"), cfg, &ops);
        total += h.outcome.crash_states;
    }
    println!("MERGE CRASH STATES CHECKED (areas): {total}");
}

/// Issue 20: stored in order, one-sector chunks make 32 records per area and four runs of
/// eight; with twelve runs a batch, batches use up an area and go on into the ones below
/// (zeroed together at the commit: FUA writes, or plain writes and a flush). Every crash state of those multi-area batches is
/// checked.
fn spanning_ops(fua: bool) -> Vec<Op> {
    let mut ops = vec![create(1, 140, fua)];
    // In order, eight chunks a write: runs of eight consecutive records.
    for s in 0..13u64 {
        ops.push(w(s * 8, 8));
    }
    // A few scattered ones on top, so the newest area ends in short runs.
    for s in [105u64, 107, 110, 113, 116, 119] {
        ops.push(w(s, 1));
    }
    ops.push(create(2, 80, !fua));
    ops.push(Op::StartMerge { snap: 0 });
    for s in 0..10u64 {
        ops.push(w(s * 13 % 110, 2));
    }
    ops.push(Op::OriginRead {
        sector: 0,
        sectors: 120,
    });
    ops.push(Op::OriginFlush);
    ops
}

fn spanning_cfg(order: Order, seed: u64) -> RunConfig {
    let mut cfg = RunConfig::new(120, 4, order, seed);
    cfg.copy_buffer_sectors = 8;
    // Twelve runs a batch (three quarters of the copy buffers): three areas' worth.
    cfg.copy_buffers = 16;
    cfg
}

#[test]
fn merge_batches_span_areas() {
    let mut total = 0;
    for (i, order) in ORDERS.into_iter().enumerate() {
        let h = run_merge(
            &format!("merge batches spanning areas {order:?}"),
            spanning_cfg(order, 960 + i as u64),
            &spanning_ops(i != 1),
        );
        let st = h.world.engine.stats();
        // 110 records in four areas: batches that used up areas, fewer batches than areas.
        assert!(st.merge_areas_zeroed >= 2, "no batch spanned areas: {st:?}");
        // Every area below the newest came from the read-ahead.
        assert_eq!(st.merge_areas_read_ahead, 3, "{st:?}");
        // Commits take several runs each (the store holds about twenty).
        assert!(
            st.merge_batches <= 6,
            "{} commits for four areas",
            st.merge_batches
        );
        total += h.outcome.crash_states;
    }
    println!("MERGE CRASH STATES CHECKED (spanning areas): {total}");
}

/// Negative control for batches spanning areas: zeroing the used-up areas before the origin
/// copies are durable loses their records' data in some crash state.
#[test]
fn merge_zeroing_used_up_areas_early_is_caught() {
    let mut caught = 0;
    for (i, order) in ORDERS.into_iter().enumerate() {
        let mut cfg = spanning_cfg(order, 970 + i as u64);
        cfg.merge_zero_areas_early = true;
        let mut h = new_harness(cfg);
        h.run(&spanning_ops(i != 1));
        MERGE_STATES.fetch_add(h.outcome.crash_states, AtomicOrdering::Relaxed);
        assert!(h.world.engine.stats().merge_areas_zeroed > 0);
        if let Some(v) = h.outcome.violations.first() {
            caught += 1;
            println!("negative control (used-up areas zeroed early, {order:?}) caught: {v}");
        }
    }
    assert_eq!(
        caught,
        ORDERS.len(),
        "zeroing areas early escaped the crash enumeration"
    );
}

/// Random workloads: a merge starts in the middle, random origin/snapshot I/O continues.
#[test]
fn merge_random_workloads() {
    let mut total = 0;
    for seed in 0..9u64 {
        let chunk = [1u32, 2, 4][seed as usize % 3];
        let cow = 200 / u64::from(chunk) + 8;
        let mut ops = random_ops(700 + seed, 64, 30, chunk, cow, 2);
        ops.push(Op::StartMerge { snap: 0 });
        // After the merge started: origin and other-snapshot I/O only (snapshot 0's own
        // volume is refused; the harness skips it).
        for op in random_ops(800 + seed, 64, 25, chunk, cow, 2)
            .into_iter()
            .skip(1)
        {
            if !matches!(op, Op::Create { .. }) {
                ops.push(op);
            }
        }
        let mut cfg = RunConfig::new(
            64,
            [1, 4, 16][seed as usize % 3],
            ORDERS[seed as usize % 3],
            700 + seed,
        );
        cfg.random_crashes = 1;
        cfg.copy_buffer_sectors = [4u32, 8, 16][seed as usize % 3].max(chunk * 2);
        cfg.copy_buffers = [1, 3, 8][seed as usize % 3];
        let h = run_merge(&format!("merge random seed {seed}"), cfg, &ops);
        total += h.outcome.crash_states;
    }
    println!("MERGE CRASH STATES CHECKED (random): {total}");
}

/// Runs a broken merge (`broken` sets the test-only flag on the config of each order) and
/// requires a violation containing `symptom` in every order.
fn negative_control(
    what: &str,
    seed: u64,
    qd: usize,
    ops: &[Op],
    symptom: &str,
    broken: fn(&mut RunConfig),
) {
    let mut caught = 0;
    for (i, order) in ORDERS.into_iter().enumerate() {
        let mut cfg = RunConfig::new(64, qd, order, seed + i as u64);
        cfg.copy_buffer_sectors = 8;
        broken(&mut cfg);
        let mut h = new_harness(cfg);
        h.run(ops);
        MERGE_STATES.fetch_add(h.outcome.crash_states, AtomicOrdering::Relaxed);
        if let Some(v) = h.outcome.violations.iter().find(|v| v.contains(symptom)) {
            caught += 1;
            println!("negative control ({what}, {order:?}) caught: {v}");
        }
    }
    assert_eq!(caught, ORDERS.len(), "{what} escaped the crash enumeration");
}

/// Negative control: zeroing merged records before the origin copy is durable must be caught.
#[test]
fn merge_without_origin_flush_is_caught() {
    negative_control(
        "the missing origin flush",
        900,
        4,
        &scripted(2, 4, true),
        "",
        |c| c.merge_skip_origin_flush = true,
    );
}

/// Negative control for the copy phase, where each run's write follows its own read and the
/// flushes follow every write: flushing the origin (and the COW device, together) once the
/// last write is issued, not once every write is back, must be caught.
#[test]
fn merge_flushing_before_the_copies_are_back_is_caught() {
    negative_control(
        "flushing before the copies are back",
        960,
        4,
        &scripted(2, 4, true),
        "",
        |c| c.merge_flush_early = true,
    );
}

/// Negative control for the origin marker: merging without it leaves, in some crash state,
/// an origin that is half-merged and unmarked (a boot without the store would serve it).
#[test]
fn merge_without_origin_marker_is_caught() {
    negative_control(
        "an unmarked half-merged origin",
        940,
        4,
        &scripted(2, 4, true),
        "origin not marked but half-merged",
        |c| c.merge_unmarked = true,
    );
}

/// Origin chunk 0 never written after the snapshot: the merge copies it into a free chunk
/// of the store (the saved chunk) before it marks the origin, and writes it back last. Crash
/// states all along, with origin writes to chunk 0 during the merge (they go to the saved
/// chunk).
#[test]
fn merge_saves_an_uncopied_chunk_0() {
    let mut total = 0;
    for (i, order) in ORDERS.into_iter().enumerate() {
        for fua in [true, false] {
            let mut cfg = RunConfig::new(64, 4, order, 980 + i as u64);
            cfg.copy_buffer_sectors = 8;
            let mut ops = vec![create(4, 40, fua)];
            for i in 1..8u64 {
                ops.push(w(i * 7, 5));
            }
            ops.push(Op::StartMerge { snap: 0 });
            ops.push(w(1, 2));
            ops.push(Op::OriginRead {
                sector: 0,
                sectors: 16,
            });
            ops.push(w(0, 6));
            ops.push(Op::OriginFlush);
            ops.push(w(30, 4));
            let h = run_merge(
                &format!("merge saving chunk 0 {order:?} fua {fua}"),
                cfg,
                &ops,
            );
            total += h.outcome.crash_states;
        }
    }
    println!("MERGE CRASH STATES CHECKED (chunk 0 saved): {total}");
}

/// Writes that meet the merge on the run it is copying (QD 1, FUA): they wait until the
/// run's records are durably gone, then land on the origin.
#[test]
fn merge_with_writes_chasing_the_merge() {
    let mut total = 0;
    for (i, order) in ORDERS.into_iter().enumerate() {
        let mut cfg = RunConfig::new(64, 1, order, 960 + i as u64);
        cfg.copy_buffer_sectors = 8;
        let h = run_merge(
            &format!("merge chased by FUA writes {order:?}"),
            cfg,
            &chasing_ops(),
        );
        total += h.outcome.crash_states;
    }
    println!("MERGE CRASH STATES CHECKED (chasing writes): {total}");
}

fn chasing_ops() -> Vec<Op> {
    let mut ops = vec![create(2, 60, true), create(4, 40, false)];
    for c in 0..24u64 {
        ops.push(w(c * 2, 2));
    }
    ops.push(Op::StartMerge { snap: 0 });
    // FUA writes (durable when acknowledged) chasing the merge from the newest chunk down.
    for c in (0..24u64).rev() {
        ops.push(Op::OriginWrite {
            sector: c * 2,
            sectors: 1,
            fua: true,
        });
    }
    ops
}

/// Second negative control: letting I/O reach a run's origin chunks before its records are
/// zeroed on disk must be caught (a crash then copies the old COW chunk over a newer write).
/// A released run is caught only if a chasing write lands between its release and its area
/// write: in order and reversed that always happens; at random it depends on the order (a
/// commit takes several runs, so there are few commits), so six random orders run and most
/// of them must catch it.
#[test]
fn merge_releasing_a_run_early_is_caught() {
    let mut caught = 0;
    let orders = [(Order::InOrder, 950), (Order::Reversed, 951)]
        .into_iter()
        .chain((0..6).map(|k| (Order::Random, 1950 + k)));
    for (order, seed) in orders {
        // QD 1: each write meets the merge where it is, often blocked on the run.
        let mut cfg = RunConfig::new(64, 1, order, seed);
        cfg.copy_buffer_sectors = 8;
        cfg.merge_release_early = true;
        let mut h = new_harness(cfg);
        h.run(&chasing_ops());
        MERGE_STATES.fetch_add(h.outcome.crash_states, AtomicOrdering::Relaxed);
        match h.outcome.violations.first() {
            Some(v) => {
                caught += 1;
                println!(
                    "negative control (releasing a run early, {order:?} seed {seed}) caught: {v}"
                );
            }
            None => {
                assert_eq!(
                    order,
                    Order::Random,
                    "releasing a run early escaped {order:?}"
                );
            }
        }
    }
    assert!(
        caught >= 6,
        "releasing a run early escaped {} of 8 orders",
        8 - caught
    );
}

/// Negative control for the pipeline's commits: they go one at a time, in order, so an
/// area is never rewritten with an older image after a newer one. Starting the next commit
/// while the previous one's area write is in flight (and releasing each commit's runs when
/// its own area write is back) must be caught: the older image can land last, bringing back
/// records of runs already released to a write. The writes chase the merge over all the
/// chunks in a scattered order, so they meet the later commit's runs. Completed in issue
/// order, the area writes land in order and nothing can be caught; reversed and at random
/// (six orders) it is.
#[test]
fn merge_overlapping_commits_is_caught() {
    let mut ops = vec![create(2, 60, true), create(2, 40, false)];
    for c in 0..24u64 {
        ops.push(w(c * 2, 2));
    }
    ops.push(Op::StartMerge { snap: 0 });
    // Every chunk but 0 (which lives in the saved chunk while the merge runs), in a
    // scattered order, twice.
    for k in 0..46u64 {
        ops.push(Op::OriginWrite {
            sector: (k * 7 % 23 + 1) * 2,
            sectors: 1,
            fua: true,
        });
    }
    let mut caught = 0;
    let orders = [(Order::Reversed, 931)]
        .into_iter()
        .chain((0..6).map(|k| (Order::Random, 1930 + k)));
    for (order, seed) in orders {
        // One chunk a run: many small commits.
        let mut cfg = RunConfig::new(64, 8, order, seed);
        cfg.copy_buffer_sectors = 2;
        cfg.merge_commits_unordered = true;
        let mut h = new_harness(cfg);
        h.run(&ops);
        MERGE_STATES.fetch_add(h.outcome.crash_states, AtomicOrdering::Relaxed);
        match h.outcome.violations.first() {
            Some(v) => {
                caught += 1;
                println!(
                    "negative control (overlapping commits, {order:?} seed {seed}) caught: {v}"
                );
            }
            None => assert_eq!(
                order,
                Order::Random,
                "overlapping commits escaped {order:?}"
            ),
        }
    }
    assert_eq!(
        caught, 7,
        "overlapping commits escaped the crash enumeration"
    );
}

fn small_world(chunk: u32, fua: bool) -> (World, SnapId) {
    let mut ec = EngineConfig::new(64);
    ec.max_snapshots = 4;
    ec.copy_buffer_sectors = 8;
    let engine = Engine::new(ec).unwrap();
    let origin = SimDisk::new(64, |s| stamp(0, s));
    let mut world = World::new(engine, origin, Order::InOrder, 1);
    world.engine.quiesce_origin();
    let sc = SnapshotConfig {
        chunk_sectors: chunk,
        cow_sectors: 64 * u64::from(chunk),
        cow_block_sectors: 1,
        cow_fua: fua,
        writable: true,
        table_runs: 64,
        binding: None,
    };
    let id = world.engine.create_snapshot(&sc).unwrap();
    world.cows[id.0 as usize] = Some(SimDisk::new(sc.cow_sectors, |_| 0));
    world.settle(1000);
    world.engine.resume_origin();
    for (tag, s) in [(1u64, 0u64), (2, 9), (3, 30), (4, 31)] {
        world.write_origin(tag, s, 1).unwrap();
    }
    world.settle(10_000);
    (world, id)
}

#[test]
fn merge_refusals_progress_and_snapshot_volume() {
    let (mut world, id) = small_world(2, true);
    assert_eq!(
        world.engine.start_merge(SnapId(3)),
        Err(MergeError::NoSuchSnapshot)
    );
    assert_eq!(world.engine.start_merge(id), Err(MergeError::NotQuiesced));
    world.engine.quiesce_origin();
    world.pump();
    assert_eq!(world.engine.start_merge(id), Ok(()));
    assert_eq!(
        world.engine.start_merge(id),
        Err(MergeError::AlreadyMerging)
    );
    let sc = SnapshotConfig {
        chunk_sectors: 2,
        cow_sectors: 128,
        cow_block_sectors: 1,
        cow_fua: true,
        writable: false,
        table_runs: 64,
        binding: None,
    };
    assert_eq!(
        world.engine.create_snapshot(&sc),
        Err(EngineError::MergeRunning)
    );
    world.engine.resume_origin();
    let p = world.engine.merge_progress().unwrap();
    assert_eq!(
        (p.snap, p.chunks_total, p.chunks_left, p.failed),
        (id, 3, 3, false)
    );
    // The merging snapshot's own volume is gone.
    world
        .submit(
            VolumeRequest {
                tag: 50,
                volume: Volume::Snapshot(id),
                op: VolumeOp::Read,
                sector: 0,
                sectors: 1,
            },
            vec![0],
        )
        .unwrap();
    world.pump();
    assert_eq!(
        world.take_completion(50).map(|c| c.result),
        Some(Err(VolumeError::Merging))
    );
    let mut lefts = vec![];
    while world.complete_one() {
        if let Some(p) = world.engine.merge_progress() {
            lefts.push(p.chunks_left);
        }
    }
    // Chunks 15 (sectors 30, 31), 4 (9) and 0: three runs of one, merged as one batch (one
    // origin flush, one area write).
    lefts.dedup();
    assert_eq!(lefts, vec![3, 0]);
    assert!(world.events.contains(&Event::MergeStarted {
        snap: id,
        resumed: false
    }));
    assert!(world.events.contains(&Event::MergeDone { snap: id }));
    assert_eq!(world.engine.status(id), None);
    for s in 0..64u64 {
        assert_eq!(world.origin.durable[s as usize], stamp(0, s), "sector {s}");
    }
    // Invalid snapshots are refused.
    let (mut world, id) = small_world(2, false);
    world.engine.quiesce_origin();
    world.pump();
    world.engine.delete_snapshot(id).unwrap();
    assert_eq!(
        world.engine.start_merge(id),
        Err(MergeError::NoSuchSnapshot)
    );
}

/// A merge I/O error stops the merge (`Merge failed`), origin I/O goes on through the store,
/// and attaching the store again resumes and finishes the merge.
#[test]
fn merge_error_stops_then_resume_finishes() {
    for fail_on in 0..4u32 {
        let (mut world, id) = small_world(2, true);
        world.engine.quiesce_origin();
        world.pump();
        world.engine.start_merge(id).unwrap();
        world.engine.resume_origin();
        // Fail the first merge I/O of the kind chosen.
        let mut armed = true;
        world.fail = Some(Box::new(move |io: &Io| {
            let hit = match fail_on {
                0 => io.device == Device::Origin && matches!(io.op, IoOp::Write { .. }),
                1 => io.device == Device::Origin && io.op == IoOp::Flush,
                2 => io.device != Device::Origin && io.op == IoOp::Read && io.sector > 0,
                _ => {
                    io.device != Device::Origin
                        && matches!(io.op, IoOp::Write { .. })
                        && io.sector == 2
                }
            };
            let f = armed && hit;
            if f {
                armed = false;
            }
            f
        }));
        world.settle(10_000);
        world.fail = None;
        assert!(
            world.events.contains(&Event::MergeFailed { snap: id }),
            "case {fail_on}"
        );
        assert_eq!(world.engine.status(id), Some(Status::MergeFailed));
        assert_eq!(world.engine.status(id).unwrap().to_string(), "Merge failed");
        assert!(world.engine.merge_progress().unwrap().failed);
        // Origin I/O continues: write and read back an unmerged and an untouched chunk.
        for (tag, s) in [(60u64, 31u64), (61, 50)] {
            world.write_origin(tag, s, 1).unwrap();
        }
        world.settle(10_000);
        let ok = |w: &mut World, t| w.take_completion(t).map(|c| c.result);
        if fail_on == 3 {
            // Area write failed on the run holding sector 31: its chunks are fenced.
            assert_eq!(ok(&mut world, 60), Some(Err(VolumeError::Io)));
        } else {
            assert_eq!(ok(&mut world, 60), Some(Ok(())));
        }
        assert_eq!(ok(&mut world, 61), Some(Ok(())));
        world
            .submit(
                VolumeRequest {
                    tag: 62,
                    volume: Volume::Origin,
                    op: VolumeOp::Flush,
                    sector: 0,
                    sectors: 0,
                },
                vec![],
            )
            .unwrap();
        world.settle(10_000);
        // Reattach ("reboot") from the durable images: the merge resumes and finishes.
        let cow = world.cows[id.0 as usize].clone().unwrap();
        let contents = world.contents.clone();
        let params = LoadParams {
            cow_sectors: cow.sectors(),
            cow_block_sectors: 1,
            origin_sectors: 64,
            origin_block_sectors: 1,
            table_runs: 64,
        };
        let loaded = Loader::load_with(params, |r| {
            let a = r.sector as usize;
            contents.image_bytes(&cow.durable[a..a + r.sectors as usize])
        })
        .unwrap();
        assert!(loaded.merging, "case {fail_on}");
        let mut ec = EngineConfig::new(64);
        ec.copy_buffer_sectors = 8;
        let origin = world.origin.durable.clone();
        let mut w2 = World::new(
            Engine::new(ec).unwrap(),
            SimDisk::new(64, |x| origin[x as usize]),
            Order::Random,
            3,
        );
        w2.contents = contents.clone();
        let sc = SnapshotConfig {
            chunk_sectors: 2,
            cow_sectors: cow.sectors(),
            cow_block_sectors: 1,
            cow_fua: true,
            writable: true,
            table_runs: 64,
            binding: None,
        };
        let id2 = w2.engine.attach_snapshot(loaded, &sc).unwrap();
        let durable = cow.durable.clone();
        w2.cows[id2.0 as usize] = Some(SimDisk::new(cow.sectors(), |x| durable[x as usize]));
        // Held until every store is attached: nothing is written yet.
        w2.settle(10_000);
        assert!(w2.origin.durable.iter().zip(&origin).all(|(a, b)| a == b));
        assert!(!w2.engine.merge_progress().unwrap().failed);
        assert!(w2.engine.resume_merge());
        assert!(!w2.engine.resume_merge());
        w2.settle(10_000);
        assert!(
            w2.events.contains(&Event::MergeDone { snap: id2 }),
            "case {fail_on}"
        );
        for s in 0..64u64 {
            let want = match s {
                31 if fail_on != 3 => stamp(60, 31),
                50 => stamp(61, 50),
                _ => stamp(0, s),
            };
            assert_eq!(
                w2.origin.durable[s as usize], want,
                "case {fail_on} sector {s}"
            );
        }
    }
}

/// Issue 20: the areas below the current one are read ahead, while the batches above them are
/// copied and committed (not one at a time when a batch gets there); a read ahead that fails
/// stops the merge when it needs that area (`MergeFailed`, I/O goes on), and the next attach
/// resumes it to the end.
#[test]
fn merge_reads_areas_ahead_and_a_failed_one_stops_it() {
    use std::cell::RefCell;
    use std::rc::Rc;
    for fail in [false, true] {
        let mut ec = EngineConfig::new(64);
        ec.copy_buffer_sectors = 4;
        // Three runs of four chunks a batch: the first batch does not use up area 1.
        ec.copy_buffers = 4;
        let mut world = World::new(
            Engine::new(ec).unwrap(),
            SimDisk::new(64, |s| stamp(0, s)),
            Order::InOrder,
            7,
        );
        world.engine.quiesce_origin();
        let sc = SnapshotConfig {
            chunk_sectors: 1,
            cow_sectors: 128,
            cow_block_sectors: 1,
            cow_fua: true,
            writable: true,
            table_runs: 128,
            binding: None,
        };
        let id = world.engine.create_snapshot(&sc).unwrap();
        world.cows[id.0 as usize] = Some(SimDisk::new(128, |_| 0));
        world.settle(1000);
        world.engine.resume_origin();
        // 48 one-sector chunks in order: area 0 full (32 records), area 1 with 16.
        for s in 0..48u64 {
            world.write_origin(100 + s, s, 1).unwrap();
            world.settle(10_000);
        }
        let g = snapshot::format::Geometry::new(1).unwrap();
        let area0 = g.chunk_sector(g.area_chunk(0));
        let area1 = g.chunk_sector(g.area_chunk(1));
        // Completion order of the COW I/Os that matter: area 0 read, area 1 written.
        let seen: Rc<RefCell<Vec<&'static str>>> = Rc::default();
        let log = seen.clone();
        world.fail = Some(Box::new(move |io: &Io| {
            if io.device == Device::Origin {
                return false;
            }
            match io.op {
                IoOp::Read if io.sector == area0 => {
                    log.borrow_mut().push("read area 0");
                    fail
                }
                IoOp::Write { .. } if io.sector == area1 => {
                    log.borrow_mut().push("write area 1");
                    false
                }
                _ => false,
            }
        }));
        world.engine.quiesce_origin();
        world.pump();
        world.engine.start_merge(id).unwrap();
        world.engine.resume_origin();
        world.settle(100_000);
        world.fail = None;
        let seen = seen.borrow().clone();
        assert_eq!(
            seen.first(),
            Some(&"read area 0"),
            "area 0 read before area 1's first commit (fail {fail}): {seen:?}"
        );
        if !fail {
            assert!(seen.contains(&"write area 1"), "{seen:?}");
            assert!(world.events.contains(&Event::MergeDone { snap: id }));
            assert_eq!(world.engine.stats().merge_areas_read_ahead, 1);
            for s in 0..64u64 {
                assert_eq!(world.origin.durable[s as usize], stamp(0, s), "sector {s}");
            }
            continue;
        }
        // The merge stopped when it needed area 0 (area 1's runs may or may not have been
        // committed by then).
        assert!(world.events.contains(&Event::MergeFailed { snap: id }));
        assert_eq!(world.engine.stats().merge_areas_read_ahead, 0);
        assert!(world.engine.merge_progress().unwrap().chunks_left >= 32);
        // Origin I/O goes on through the store.
        world.write_origin(200, 5, 1).unwrap();
        world.settle(10_000);
        assert_eq!(world.take_completion(200).map(|c| c.result), Some(Ok(())));
        let flush = VolumeRequest {
            tag: 201,
            volume: Volume::Origin,
            op: VolumeOp::Flush,
            sector: 0,
            sectors: 0,
        };
        world.submit(flush, vec![]).unwrap();
        world.settle(10_000);
        // Reattach ("reboot") from the durable images: the merge resumes and finishes.
        let cow = world.cows[id.0 as usize].clone().unwrap();
        let contents = world.contents.clone();
        let params = LoadParams {
            cow_sectors: 128,
            cow_block_sectors: 1,
            origin_sectors: 64,
            origin_block_sectors: 1,
            table_runs: 128,
        };
        let loaded = Loader::load_with(params, |r| {
            let a = r.sector as usize;
            contents.image_bytes(&cow.durable[a..a + r.sectors as usize])
        })
        .unwrap();
        assert!(loaded.merging);
        let mut ec = EngineConfig::new(64);
        ec.copy_buffer_sectors = 4;
        let origin = world.origin.durable.clone();
        let mut w2 = World::new(
            Engine::new(ec).unwrap(),
            SimDisk::new(64, |x| origin[x as usize]),
            Order::Random,
            3,
        );
        w2.contents = contents.clone();
        let id2 = w2.engine.attach_snapshot(loaded, &sc).unwrap();
        let durable = cow.durable.clone();
        w2.cows[id2.0 as usize] = Some(SimDisk::new(128, |x| durable[x as usize]));
        assert!(w2.engine.resume_merge());
        w2.settle(100_000);
        assert!(w2.events.contains(&Event::MergeDone { snap: id2 }));
        for s in 0..64u64 {
            // The write made while the merge was stopped went to the store (chunk 5 was not
            // merged yet), and the resumed merge brought it to the origin.
            let want = if s == 5 { stamp(200, 5) } else { stamp(0, s) };
            assert_eq!(w2.origin.durable[s as usize], want, "sector {s}");
        }
    }
}

/// A snapshot without exceptions merges at once: marker, wipe, gone; the origin is untouched.
/// A store whose binding names its region leaves a free-extent marker instead of zeroes.
#[test]
fn merging_an_empty_snapshot_just_removes_it() {
    for (fua, region) in [(true, false), (false, false), (true, true)] {
        let mut ec = EngineConfig::new(64);
        ec.copy_buffer_sectors = 8;
        let mut world = World::new(
            Engine::new(ec).unwrap(),
            SimDisk::new(64, |s| stamp(0, s)),
            Order::Random,
            7,
        );
        world.engine.quiesce_origin();
        let sc = SnapshotConfig {
            chunk_sectors: 4,
            cow_sectors: 64,
            cow_block_sectors: 1,
            cow_fua: fua,
            writable: false,
            table_runs: 16,
            binding: region.then(|| Binding {
                name: BoundedBytes::new(b"m").unwrap(),
                origin_serial: BoundedBytes::new(b"o").unwrap(),
                origin_sectors: 64,
                chunk_sectors: 4,
                created_unix_seconds: 0,
                region_start: 2048,
                region_sectors: 64,
                flags: 0,
                origin_id: snapshot::OriginId::Serial,
            }),
        };
        let id = world.engine.create_snapshot(&sc).unwrap();
        world.cows[id.0 as usize] = Some(SimDisk::new(64, |_| 0));
        world.settle(1000);
        world.engine.start_merge(id).unwrap();
        world.engine.resume_origin();
        world.settle(1000);
        assert!(world.events.contains(&Event::MergeDone { snap: id }));
        assert_eq!(world.engine.status(id), None);
        assert!(world.engine.is_idle());
        let cow = world.cows[id.0 as usize].as_ref().unwrap();
        let head = world.contents.image_bytes(&cow.durable[..1]);
        if region {
            assert_eq!(
                snapshot::format::FreeExtent::decode(&head),
                Some(snapshot::format::FreeExtent {
                    start: 2048,
                    sectors: 64
                })
            );
            assert!(cow.durable[1..8].iter().all(|&v| v == 0));
        } else {
            assert!(cow.durable[..8].iter().all(|&v| v == 0), "fua {fua}");
        }
        assert_eq!(world.origin.flushes, 1, "only the creation's flush");
        assert!((0..64).all(|s| world.origin.durable[s as usize] == stamp(0, s)));
    }
}

/// The second snapshot's COW device dies (writes fail, reads work) right after it is created:
/// its store cannot be marked invalid, so it may still load as valid. The merge of snapshot 0
/// copies merged chunks over the origin; where the dead snapshot has no copy of them it must
/// wait (retrying the header write now and then): it finishes once the device comes back,
/// or once the operator deletes the dead snapshot. In every crash state the dead store, if it
/// loads valid, still reads its own snapshot.
#[test]
fn merge_waits_for_a_snapshot_that_cannot_be_invalidated() {
    let mut total = 0;
    for (i, order) in ORDERS.into_iter().enumerate() {
        for recovers in [Some(2u64), None] {
            for fua in [true, false] {
                let mut cfg = RunConfig::new(64, 4, order, 900 + i as u64);
                cfg.copy_buffer_sectors = 8;
                cfg.cow_writes_fail_after = Some(2);
                cfg.dead_cow_slot = Some(1);
                // Snapshot 1 is created with FUA when snapshot 0 is not; without, its create
                // ends with a flush, which must work for it to exist at all.
                cfg.dead_cow_flushes_fail = !fua;
                cfg.cow_recovers_after = recovers;
                cfg.invalidation_retry_ticks = Some(5);
                let name = format!("merge beside a dead COW {order:?} back {recovers:?} fua {fua}");
                let mut h = new_harness(cfg);
                h.run(&scripted(2, 4, fua));
                assert!(
                    h.merging.is_some(),
                    "{name}: merge refused: {:?}",
                    h.merge_refused
                );
                // Time passes with nothing in flight: the waiting merge retries the header.
                for _ in 0..40 {
                    if h.merge_done {
                        break;
                    }
                    h.world.now += 10;
                    h.world.pump();
                    h.drain();
                }
                if recovers.is_none() {
                    assert!(
                        !h.merge_done,
                        "{name}: the merge went over chunks of a store that still loads valid"
                    );
                    assert!(h.world.engine.invalidation_failed(SnapId(1)), "{name}");
                    h.apply(Op::Delete { snap: 1 });
                    h.drain();
                }
                assert!(
                    h.merge_done,
                    "{name}: no MergeDone: {}",
                    h.world.engine.debug_state()
                );
                assert!(
                    h.outcome.violations.is_empty(),
                    "{name}: {} violations, first: {:#?}",
                    h.outcome.violations.len(),
                    &h.outcome.violations[..h.outcome.violations.len().min(5)]
                );
                assert!(
                    h.world.engine.is_idle(),
                    "{name}: {}",
                    h.world.engine.debug_state()
                );
                MERGE_STATES.fetch_add(h.outcome.crash_states, AtomicOrdering::Relaxed);
                println!("{name}: {} crash states checked", h.outcome.crash_states);
                total += h.outcome.crash_states;
            }
        }
    }
    println!("MERGE CRASH STATES CHECKED (beside a dead COW device): {total}");
}
