//! Shared harness for the engine tests: a reference model of every volume, a workload driver
//! on top of `snapshot::sim::World`, and the crash checker.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

pub use snapshot::sim::stamp;
use snapshot::sim::{Order, Rng, SimDisk, World, DATA_BIT};
use snapshot::*;

/// Per-sector history of one volume: what a crash may leave there.
#[derive(Clone, Debug)]
pub struct VolModel {
    hist: Vec<Vec<u64>>,
    floor: Vec<usize>,
    acked: Vec<usize>,
}

impl VolModel {
    pub fn new(initial: Vec<u64>) -> Self {
        let n = initial.len();
        VolModel {
            hist: initial.into_iter().map(|v| vec![v]).collect(),
            floor: vec![0; n],
            acked: vec![0; n],
        }
    }
    /// Records a submitted write; returns the history index per sector.
    fn submit(&mut self, sector: u64, values: &[u64]) -> Vec<usize> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let h = &mut self.hist[sector as usize + i];
                h.push(v);
                h.len() - 1
            })
            .collect()
    }
    fn ack(&mut self, sector: u64, idx: &[usize], fua: bool) {
        for (i, &k) in idx.iter().enumerate() {
            let x = sector as usize + i;
            self.acked[x] = self.acked[x].max(k);
            if fua {
                self.floor[x] = self.floor[x].max(k);
            }
        }
    }
    fn flush_done(&mut self, acked_at_submit: &[usize]) {
        for (f, &a) in self.floor.iter_mut().zip(acked_at_submit) {
            *f = (*f).max(a);
        }
    }
    pub fn current(&self, x: u64) -> u64 {
        self.hist[x as usize][self.acked[x as usize]]
    }
    /// What a live read may return: the last acknowledged write, or the data of a later write
    /// that failed (a failed write may have landed in part).
    pub fn live_allowed(&self, x: u64, v: u64) -> bool {
        self.hist[x as usize][self.acked[x as usize]..].contains(&v)
    }
    pub fn allowed(&self, x: u64, v: u64) -> bool {
        self.hist[x as usize][self.floor[x as usize]..].contains(&v)
    }
    pub fn sectors(&self) -> u64 {
        self.hist.len() as u64
    }
}

/// One step of a workload.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    OriginWrite {
        sector: u64,
        sectors: u32,
        fua: bool,
    },
    OriginRead {
        sector: u64,
        sectors: u32,
    },
    OriginFlush,
    SnapWrite {
        snap: u16,
        sector: u64,
        sectors: u32,
    },
    SnapRead {
        snap: u16,
        sector: u64,
        sectors: u32,
    },
    SnapFlush {
        snap: u16,
    },
    /// Create a snapshot (chunk sectors, COW chunks, writable, fua).
    Create {
        chunk: u32,
        cow_chunks: u64,
        writable: bool,
        fua: bool,
    },
    Delete {
        snap: u16,
    },
    /// Flush the snapshot and the origin, quiesce, start merging the snapshot into the
    /// origin, resume: from now on the origin model is the snapshot's contents.
    StartMerge {
        snap: u16,
    },
    /// Wait for everything in flight.
    Drain,
}

#[derive(Clone, Debug)]
enum Outstanding {
    Write {
        vol: Option<u16>,
        sector: u64,
        sectors: u32,
        idx: Vec<usize>,
        fua: bool,
    },
    Read {
        vol: Option<u16>,
        sector: u64,
        sectors: u32,
    },
    Flush {
        vol: Option<u16>,
        acked: Vec<usize>,
    },
}

/// Knobs of a run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub origin_sectors: u64,
    pub qd: usize,
    pub order: Order,
    pub seed: u64,
    /// Crash images per completion point besides "none kept" and "all kept".
    pub random_crashes: u32,
    pub broken_ordering: bool,
    pub skip_commit_flush: bool,
    /// Negative control: a commit flush sent before a copy completed counts as covering it.
    pub flush_covers_earlier_copies: bool,
    pub pending_exceptions: u32,
    pub copy_buffers: u32,
    pub copy_buffer_sectors: u32,
    pub hold_bound: u64,
    /// Commits in flight per snapshot (odd seeds pipeline four, even seeds run one).
    pub commits_in_flight: u32,
    pub fail_every: Option<u64>,
    /// A COW device that dies: once this many writes to COW devices have completed, every
    /// later write to a COW device fails (reads go on), as an NVMe drive that went read-only.
    pub cow_writes_fail_after: Option<u64>,
    /// With `cow_writes_fail_after`: flushes to the dead COW device fail too (else they
    /// succeed, with nothing to make durable).
    pub dead_cow_flushes_fail: bool,
    /// With `cow_writes_fail_after`: only this snapshot slot's COW device dies (all when
    /// `None`); writes to the others are not counted.
    pub dead_cow_slot: Option<u16>,
    /// With `cow_writes_fail_after`: the dead COW device comes back after this many failed
    /// I/Os (a path that recovers).
    pub cow_recovers_after: Option<u64>,
    /// `EngineConfig::invalidation_retry_ticks` (the engine's default when `None`).
    pub invalidation_retry_ticks: Option<u64>,
    /// A failed write lands a pseudo-random prefix of its sectors before the error.
    pub torn_failures: bool,
    /// A device that lies: after this many flushes (any device), every flush is acknowledged
    /// without making anything durable.
    pub ignore_flushes_after: Option<u64>,
    /// Check every n-th completion point (1 = all).
    pub check_every: u64,
    /// Negative control for merges: zero merged records before the origin copy is durable.
    pub merge_skip_origin_flush: bool,
    /// Negative control for merges: release a run's I/O before its records are zeroed.
    pub merge_release_early: bool,
    /// Negative control: merge without marking the origin.
    pub merge_unmarked: bool,
    /// Negative control: a merge batch spanning areas zeroes the used-up areas before the
    /// origin flush.
    pub merge_zero_areas_early: bool,
    /// Negative control: a merge batch flushes the origin before its copy writes are back.
    pub merge_flush_early: bool,
    /// Negative control: a merge's commits overlap (a later area write may land first).
    pub merge_commits_unordered: bool,
}

impl RunConfig {
    pub fn new(origin_sectors: u64, qd: usize, order: Order, seed: u64) -> Self {
        RunConfig {
            origin_sectors,
            qd,
            order,
            seed,
            random_crashes: 2,
            broken_ordering: false,
            skip_commit_flush: false,
            flush_covers_earlier_copies: false,
            pending_exceptions: 64,
            copy_buffers: 8,
            copy_buffer_sectors: 16,
            hold_bound: 3,
            commits_in_flight: if seed % 2 == 1 { 4 } else { 1 },
            fail_every: None,
            cow_writes_fail_after: None,
            dead_cow_flushes_fail: false,
            dead_cow_slot: None,
            cow_recovers_after: None,
            invalidation_retry_ticks: None,
            torn_failures: false,
            ignore_flushes_after: None,
            check_every: 1,
            merge_skip_origin_flush: false,
            merge_release_early: false,
            merge_unmarked: false,
            merge_zero_areas_early: false,
            merge_flush_early: false,
            merge_commits_unordered: false,
        }
    }
}

pub struct SnapModel {
    pub model: VolModel,
    pub created: bool,
    pub invalidated: bool,
    pub deleted: bool,
    pub chunk: u32,
    pub cow_sectors: u64,
}

/// The outcome of a run.
#[derive(Debug, Default)]
pub struct Outcome {
    pub crash_states: u64,
    pub violations: Vec<String>,
    pub completions: u64,
}

/// A crash-image checker that replaces [`Harness::check_image`].
pub type CheckFn = fn(&Harness, &[u64], &BTreeMap<u16, Vec<u64>>) -> Result<(), String>;

pub struct Harness {
    /// Replaces the built-in crash check when set.
    pub custom_check: Option<CheckFn>,
    /// The snapshot being merged (set by `Op::StartMerge`).
    pub merging: Option<u16>,
    /// `Event::MergeStarted` seen (the merge marker is durable).
    pub merge_started: bool,
    /// `Event::MergeDone` seen.
    pub merge_done: bool,
    /// `Event::MergeFailed` seen.
    pub merge_failed: bool,
    /// What `start_merge` said if it refused.
    pub merge_refused: Option<MergeError>,
    pub world: World,
    pub cfg: RunConfig,
    pub origin: VolModel,
    pub snaps: BTreeMap<u16, SnapModel>,
    outstanding: BTreeMap<u64, Outstanding>,
    next_tag: u64,
    next_write: u64,
    pub outcome: Outcome,
    point: u64,
    crash_rng: Rng,
}

impl Harness {
    pub fn new(cfg: RunConfig) -> Self {
        let mut ec = EngineConfig::new(cfg.origin_sectors);
        ec.max_snapshots = 4;
        ec.request_slots = 96;
        ec.io_slots = 256;
        ec.pending_exceptions = cfg.pending_exceptions;
        ec.copy_buffers = cfg.copy_buffers;
        ec.copy_buffer_sectors = cfg.copy_buffer_sectors;
        ec.hold_bound_ticks = cfg.hold_bound;
        ec.commits_in_flight = cfg.commits_in_flight;
        ec.unsafe_release_before_commit = cfg.broken_ordering;
        ec.unsafe_skip_commit_flush = cfg.skip_commit_flush;
        ec.unsafe_flush_covers_earlier_copies = cfg.flush_covers_earlier_copies;
        ec.unsafe_merge_skip_origin_flush = cfg.merge_skip_origin_flush;
        ec.unsafe_merge_release_early = cfg.merge_release_early;
        ec.unsafe_merge_unmarked = cfg.merge_unmarked;
        ec.unsafe_merge_zero_areas_early = cfg.merge_zero_areas_early;
        ec.unsafe_merge_flush_early = cfg.merge_flush_early;
        ec.unsafe_merge_commits_unordered = cfg.merge_commits_unordered;
        if let Some(t) = cfg.invalidation_retry_ticks {
            ec.invalidation_retry_ticks = t;
        }
        let engine = Engine::new(ec).expect("engine config");
        let origin = SimDisk::new(cfg.origin_sectors, |s| stamp(0, s));
        let init: Vec<u64> = origin.current.clone();
        let mut world = World::new(engine, origin, cfg.order, cfg.seed);
        if cfg.fail_every.is_some() || cfg.cow_writes_fail_after.is_some() {
            let (every, dead_after) = (cfg.fail_every, cfg.cow_writes_fail_after);
            let dead_flushes = cfg.dead_cow_flushes_fail;
            let recovers_after = cfg.cow_recovers_after;
            let slot = cfg.dead_cow_slot;
            let mut count = 0u64;
            let mut cow_writes = 0u64;
            let mut dead_failures = 0u64;
            world.fail = Some(Box::new(move |io: &Io| {
                count += 1;
                if every.is_some_and(|n| count.is_multiple_of(n)) {
                    return true;
                }
                let (Some(n), Device::Cow(id)) = (dead_after, io.device) else {
                    return false;
                };
                if slot.is_some_and(|s| s != id.0) {
                    return false;
                }
                let dead = cow_writes >= n && recovers_after.is_none_or(|k| dead_failures < k);
                let fail = match io.op {
                    IoOp::Write { .. } => dead,
                    IoOp::Flush => dead_flushes && dead,
                    IoOp::Read => false,
                };
                if fail {
                    dead_failures += 1;
                } else if matches!(io.op, IoOp::Write { .. }) {
                    cow_writes += 1;
                }
                fail
            }));
        }
        if cfg.torn_failures {
            let mut rng = Rng::new(cfg.seed ^ 0x7EA2);
            world.partial_fail = Some(Box::new(move |io: &Io| {
                rng.below(u64::from(io.sectors)) as u32
            }));
        }
        if let Some(n) = cfg.ignore_flushes_after {
            let mut count = 0u64;
            world.ignore_flush = Some(Box::new(move |_io: &Io| {
                count += 1;
                count > n
            }));
        }
        Harness {
            custom_check: None,
            merging: None,
            merge_started: false,
            merge_done: false,
            merge_failed: false,
            merge_refused: None,
            world,
            origin: VolModel::new(init),
            snaps: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            next_tag: 1,
            next_write: 1,
            outcome: Outcome::default(),
            point: 0,
            crash_rng: Rng::new(cfg.seed ^ 0xC0FFEE),
            cfg,
        }
    }

    /// A new harness on a crash image of this one (`mode`/`seed` as in
    /// [`SimDisk::crash_image`]): a fresh engine loads and attaches every store that loads
    /// valid; the model starts from what the images hold.
    pub fn reborn_after_crash(&self, mode: u32, seed: u64, order: Order, qd: usize) -> Harness {
        let mut cfg = self.cfg.clone();
        cfg.order = order;
        cfg.qd = qd;
        cfg.seed = seed;
        cfg.broken_ordering = false;
        cfg.skip_commit_flush = false;
        cfg.flush_covers_earlier_copies = false;
        cfg.fail_every = None;
        cfg.cow_writes_fail_after = None;
        cfg.cow_recovers_after = None;
        cfg.torn_failures = false;
        cfg.ignore_flushes_after = None;
        let mut h = Harness::new(cfg);
        let origin_img = self.world.origin.crash_image(mode, seed);
        h.world.origin = SimDisk::new(origin_img.len() as u64, |x| origin_img[x as usize]);
        h.world.contents = self.world.contents.clone();
        h.origin = VolModel::new(origin_img.clone());
        h.next_write = self.next_write + 1_000_000;
        for (&s, m) in &self.snaps {
            if !m.created || m.deleted {
                continue;
            }
            let Some(Some(d)) = self.world.cows.get(s as usize) else {
                continue;
            };
            let img = d.crash_image(mode, seed.rotate_left(7) ^ u64::from(s));
            let params = LoadParams {
                cow_sectors: m.cow_sectors,
                cow_block_sectors: 1,
                origin_sectors: self.origin.sectors(),
                origin_block_sectors: 1,
                table_runs: m.cow_sectors as usize,
            };
            let contents = &h.world.contents;
            let Ok(loaded) = Loader::load_with(params, |r| {
                let a = r.sector as usize;
                let b = (a + r.sectors as usize).min(img.len());
                contents.image_bytes(&img[a.min(b)..b])
            }) else {
                continue;
            };
            if !loaded.valid {
                continue;
            }
            let cs = u64::from(m.chunk);
            let view: Vec<u64> = (0..self.origin.sectors())
                .map(|x| match loaded.table.lookup(x / cs) {
                    Some(n) => img[(n * cs + x % cs) as usize],
                    None => origin_img[x as usize],
                })
                .collect();
            let sc = SnapshotConfig {
                chunk_sectors: m.chunk,
                cow_sectors: m.cow_sectors,
                cow_block_sectors: 1,
                cow_fua: true,
                writable: true,
                table_runs: m.cow_sectors as usize,
                binding: None,
            };
            let id = h.world.engine.attach_snapshot(loaded, &sc).expect("attach");
            h.world.cows[id.0 as usize] = Some(SimDisk::new(m.cow_sectors, |x| img[x as usize]));
            h.snaps.insert(
                id.0,
                SnapModel {
                    model: VolModel::new(view),
                    created: true,
                    invalidated: false,
                    deleted: false,
                    chunk: m.chunk,
                    cow_sectors: m.cow_sectors,
                },
            );
        }
        h
    }

    fn overlaps_write(&self, vol: Option<u16>, sector: u64, sectors: u32) -> bool {
        let end = sector + u64::from(sectors);
        self.outstanding.values().any(|o| match o {
            Outstanding::Write {
                vol: v,
                sector: s,
                sectors: n,
                ..
            } => *v == vol && *s < end && sector < s + u64::from(*n),
            Outstanding::Read {
                vol: v,
                sector: s,
                sectors: n,
            } => *v == vol && *s < end && sector < s + u64::from(*n),
            _ => false,
        })
    }

    /// Completes one I/O, processes volume completions and checks crash states.
    pub fn step(&mut self) -> bool {
        if !self.world.complete_one() {
            return false;
        }
        self.absorb();
        self.point += 1;
        if self.point.is_multiple_of(self.cfg.check_every) {
            self.check_crashes();
        }
        true
    }

    fn absorb(&mut self) {
        for e in std::mem::take(&mut self.world.events) {
            match e {
                Event::SnapshotCreated { snap } => {
                    if let Some(m) = self.snaps.get_mut(&snap.0) {
                        m.created = true;
                    }
                }
                Event::Invalidated { snap, .. } => {
                    if let Some(m) = self.snaps.get_mut(&snap.0) {
                        m.invalidated = true;
                    }
                }
                Event::SnapshotDeleted { snap } => {
                    if let Some(m) = self.snaps.get_mut(&snap.0) {
                        m.deleted = true;
                    }
                }
                Event::SnapshotCreateFailed { snap } => {
                    self.snaps.remove(&snap.0);
                }
                Event::MergeStarted { .. } => self.merge_started = true,
                Event::MergeDone { snap } => {
                    self.merge_done = true;
                    if let Some(m) = self.snaps.get_mut(&snap.0) {
                        m.deleted = true;
                    }
                }
                Event::MergeFailed { .. } => self.merge_failed = true,
                _ => {}
            }
        }
        for c in std::mem::take(&mut self.world.completed) {
            let Some(o) = self.outstanding.remove(&c.tag) else {
                continue;
            };
            let buf = self.world.buffers.remove(&c.tag);
            if c.result.is_err() {
                continue;
            }
            match o {
                Outstanding::Write {
                    vol,
                    sector,
                    idx,
                    fua,
                    ..
                } => match vol {
                    None => self.origin.ack(sector, &idx, fua),
                    Some(s) => {
                        if let Some(m) = self.snaps.get_mut(&s) {
                            m.model.ack(sector, &idx, fua)
                        }
                    }
                },
                Outstanding::Flush { vol, acked } => match vol {
                    None => self.origin.flush_done(&acked),
                    Some(s) => {
                        if let Some(m) = self.snaps.get_mut(&s) {
                            m.model.flush_done(&acked)
                        }
                    }
                },
                Outstanding::Read {
                    vol,
                    sector,
                    sectors,
                } => {
                    let buf = buf.unwrap_or_default();
                    let model = match vol {
                        None => Some(&self.origin),
                        Some(s) => self
                            .snaps
                            .get(&s)
                            .filter(|m| !m.invalidated)
                            .map(|m| &m.model),
                    };
                    if let Some(m) = model {
                        for i in 0..sectors as u64 {
                            let want = m.current(sector + i);
                            let got = buf.get(i as usize).copied().unwrap_or(0);
                            if !m.live_allowed(sector + i, got) {
                                self.outcome.violations.push(format!(
                                    "live read of {vol:?} sector {} returned {got:#x}, expected {want:#x}",
                                    sector + i
                                ));
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    fn submit(&mut self, req: VolumeRequest, buf: Vec<u64>, o: Outstanding) {
        loop {
            match self.world.submit(req, buf.clone()) {
                Ok(()) => break,
                Err(SubmitError::Busy) => {
                    if !self.step() {
                        panic!("engine busy with nothing in flight");
                    }
                }
            }
        }
        self.outstanding.insert(req.tag, o);
        self.world.pump();
        self.absorb();
    }

    fn wait_for_room(&mut self, vol: Option<u16>, sector: u64, sectors: u32) {
        while self.outstanding.len() >= self.cfg.qd || self.overlaps_write(vol, sector, sectors) {
            if !self.step() {
                break;
            }
        }
    }

    pub fn drain(&mut self) {
        while !self.outstanding.is_empty() {
            if !self.step() {
                break;
            }
        }
        while self.step() {}
    }

    pub fn run(&mut self, ops: &[Op]) {
        for &op in ops {
            self.apply(op);
        }
        self.drain();
    }

    fn snap_ok(&self, s: u16) -> bool {
        self.merging != Some(s)
            && self
                .snaps
                .get(&s)
                .is_some_and(|m| m.created && !m.invalidated && !m.deleted)
    }

    pub fn apply(&mut self, op: Op) {
        let tag = self.next_tag;
        self.next_tag += 1;
        match op {
            Op::OriginWrite {
                sector,
                sectors,
                fua,
            } => {
                self.wait_for_room(None, sector, sectors);
                let w = self.next_write;
                self.next_write += 1;
                let vals: Vec<u64> = (0..sectors as u64).map(|i| stamp(w, sector + i)).collect();
                let idx = self.origin.submit(sector, &vals);
                let req = VolumeRequest {
                    tag,
                    volume: Volume::Origin,
                    op: VolumeOp::Write { fua },
                    sector,
                    sectors,
                };
                self.submit(
                    req,
                    vals,
                    Outstanding::Write {
                        vol: None,
                        sector,
                        sectors,
                        idx,
                        fua,
                    },
                );
            }
            Op::OriginRead { sector, sectors } => {
                self.wait_for_room(None, sector, sectors);
                let req = VolumeRequest {
                    tag,
                    volume: Volume::Origin,
                    op: VolumeOp::Read,
                    sector,
                    sectors,
                };
                self.submit(
                    req,
                    vec![0; sectors as usize],
                    Outstanding::Read {
                        vol: None,
                        sector,
                        sectors,
                    },
                );
            }
            Op::OriginFlush => {
                self.wait_for_room(None, 0, 0);
                let acked = self.origin.acked.clone();
                let req = VolumeRequest {
                    tag,
                    volume: Volume::Origin,
                    op: VolumeOp::Flush,
                    sector: 0,
                    sectors: 0,
                };
                self.submit(req, Vec::new(), Outstanding::Flush { vol: None, acked });
            }
            Op::SnapWrite {
                snap,
                sector,
                sectors,
            } => {
                if !self.snap_ok(snap) {
                    return;
                }
                self.wait_for_room(Some(snap), sector, sectors);
                if !self.snap_ok(snap) {
                    return;
                }
                let w = self.next_write;
                self.next_write += 1;
                let vals: Vec<u64> = (0..sectors as u64)
                    .map(|i| stamp(w, sector + i) | (1 << 62))
                    .collect();
                let Some(m) = self.snaps.get_mut(&snap) else {
                    return;
                };
                let idx = m.model.submit(sector, &vals);
                let req = VolumeRequest {
                    tag,
                    volume: Volume::Snapshot(SnapId(snap)),
                    op: VolumeOp::Write { fua: false },
                    sector,
                    sectors,
                };
                self.submit(
                    req,
                    vals,
                    Outstanding::Write {
                        vol: Some(snap),
                        sector,
                        sectors,
                        idx,
                        fua: false,
                    },
                );
            }
            Op::SnapRead {
                snap,
                sector,
                sectors,
            } => {
                if !self.snap_ok(snap) {
                    return;
                }
                self.wait_for_room(Some(snap), sector, sectors);
                if !self.snap_ok(snap) {
                    return;
                }
                let req = VolumeRequest {
                    tag,
                    volume: Volume::Snapshot(SnapId(snap)),
                    op: VolumeOp::Read,
                    sector,
                    sectors,
                };
                self.submit(
                    req,
                    vec![0; sectors as usize],
                    Outstanding::Read {
                        vol: Some(snap),
                        sector,
                        sectors,
                    },
                );
            }
            Op::SnapFlush { snap } => {
                if !self.snap_ok(snap) {
                    return;
                }
                self.wait_for_room(Some(snap), 0, 0);
                let Some(m) = self.snaps.get(&snap) else {
                    return;
                };
                let acked = m.model.acked.clone();
                let req = VolumeRequest {
                    tag,
                    volume: Volume::Snapshot(SnapId(snap)),
                    op: VolumeOp::Flush,
                    sector: 0,
                    sectors: 0,
                };
                self.submit(
                    req,
                    Vec::new(),
                    Outstanding::Flush {
                        vol: Some(snap),
                        acked,
                    },
                );
            }
            Op::Create {
                chunk,
                cow_chunks,
                writable,
                fua,
            } => {
                self.world.engine.quiesce_origin();
                self.world.pump();
                while !self.world.engine.is_quiesced() {
                    if !self.step() {
                        break;
                    }
                }
                let cow_sectors = cow_chunks * u64::from(chunk);
                let sc = SnapshotConfig {
                    chunk_sectors: chunk,
                    cow_sectors,
                    cow_block_sectors: 1,
                    cow_fua: fua,
                    writable,
                    table_runs: cow_chunks as usize,
                    binding: None,
                };
                let id = match self.world.engine.create_snapshot(&sc) {
                    Ok(id) => id,
                    Err(EngineError::NoSnapshotSlot) => {
                        self.world.engine.resume_origin();
                        self.world.pump();
                        return;
                    }
                    Err(e) => panic!("create: {e:?}: {}", self.world.engine.debug_state()),
                };
                // A fresh COW device full of garbage stamps (never valid metadata).
                self.world.cows[id.0 as usize] = Some(SimDisk::new(cow_sectors, |s| {
                    DATA_BIT | (0xFF_FFFF << 24) | s
                }));
                // The snapshot holds the origin as acknowledged now.
                let init: Vec<u64> = (0..self.origin.sectors())
                    .map(|x| self.origin.current(x))
                    .collect();
                // The engine flushes the origin before the header goes down.
                let acked = self.origin.acked.clone();
                self.snaps.insert(
                    id.0,
                    SnapModel {
                        model: VolModel::new(init),
                        created: false,
                        invalidated: false,
                        deleted: false,
                        chunk,
                        cow_sectors,
                    },
                );
                self.world.pump();
                while !self.snaps.get(&id.0).is_none_or(|m| m.created) {
                    if !self.step() {
                        break;
                    }
                }
                if self.snaps.contains_key(&id.0) {
                    self.origin.flush_done(&acked);
                }
                self.world.engine.resume_origin();
                self.world.pump();
            }
            Op::Delete { snap } => {
                if !self
                    .snaps
                    .get(&snap)
                    .is_some_and(|m| m.created && !m.deleted)
                {
                    return;
                }
                // Drain this snapshot's requests first.
                while self.outstanding.values().any(|o| match o {
                    Outstanding::Write { vol, .. }
                    | Outstanding::Read { vol, .. }
                    | Outstanding::Flush { vol, .. } => *vol == Some(snap),
                }) {
                    if !self.step() {
                        break;
                    }
                }
                self.world.engine.quiesce_origin();
                self.world.pump();
                while !self.world.engine.is_quiesced() {
                    if !self.step() {
                        break;
                    }
                }
                if self.world.engine.delete_snapshot(SnapId(snap)).is_ok() {
                    if let Some(m) = self.snaps.get_mut(&snap) {
                        m.invalidated = true;
                    }
                    self.world.pump();
                    while !self.snaps.get(&snap).is_none_or(|m| m.deleted) {
                        if !self.step() {
                            break;
                        }
                    }
                    self.snaps.remove(&snap);
                    self.world.cows[snap as usize] = None;
                }
                self.world.engine.resume_origin();
                self.world.pump();
            }
            Op::StartMerge { snap } => {
                if self.merging.is_some() || !self.snap_ok(snap) {
                    return;
                }
                // Everything acknowledged first, then flushed: the model below takes every
                // acknowledged write as durable.
                self.drain();
                self.apply(Op::SnapFlush { snap });
                self.apply(Op::OriginFlush);
                self.drain();
                if !self.snap_ok(snap) {
                    return;
                }
                self.world.engine.quiesce_origin();
                self.world.pump();
                while !self.world.engine.is_quiesced() {
                    if !self.step() {
                        break;
                    }
                }
                match self.world.engine.start_merge(SnapId(snap)) {
                    Ok(()) => {
                        // Everything is flushed: the origin now reads as the snapshot, durably.
                        let m = &self.snaps[&snap].model;
                        let view = (0..m.sectors()).map(|x| m.current(x)).collect();
                        self.origin = VolModel::new(view);
                        self.merging = Some(snap);
                    }
                    Err(e) => self.merge_refused = Some(e),
                }
                self.world.engine.resume_origin();
                self.world.pump();
            }
            Op::Drain => self.drain(),
        }
    }

    /// Builds crash images at this point and checks every invariant on each.
    pub fn check_crashes(&mut self) {
        let modes = 2 + self.cfg.random_crashes;
        for mode in 0..modes {
            let seed = self.crash_rng.next_u64();
            let origin_img = self.world.origin.crash_image(mode, seed);
            let mut cow_imgs = BTreeMap::new();
            for &s in self.snaps.keys() {
                if let Some(Some(d)) = self.world.cows.get(s as usize) {
                    cow_imgs.insert(s, d.crash_image(mode, seed.rotate_left(7) ^ u64::from(s)));
                }
            }
            self.outcome.crash_states += 1;
            let checked = match self.custom_check {
                Some(f) => f(self, &origin_img, &cow_imgs),
                None => self.check_image(&origin_img, &cow_imgs),
            };
            if let Err(e) = checked {
                if self.outcome.violations.len() < 20 {
                    self.outcome
                        .violations
                        .push(format!("point {} mode {mode}: {e}", self.point));
                }
            }
        }
    }

    pub fn check_image(
        &self,
        origin_img: &[u64],
        cows: &BTreeMap<u16, Vec<u64>>,
    ) -> Result<(), String> {
        // (2) the origin holds every write acknowledged before its last completed flush.
        for x in 0..self.origin.sectors() {
            if !self.origin.allowed(x, origin_img[x as usize]) {
                return Err(format!(
                    "origin sector {x} holds {:#x}, not allowed",
                    origin_img[x as usize]
                ));
            }
        }
        for (&s, m) in &self.snaps {
            let Some(img) = cows.get(&s) else { continue };
            let params = LoadParams {
                cow_sectors: m.cow_sectors,
                cow_block_sectors: 1,
                origin_sectors: self.origin.sectors(),
                origin_block_sectors: 1,
                table_runs: m.cow_sectors as usize,
            };
            let contents = &self.world.contents;
            let loaded = Loader::load_with(params, |r| {
                let a = r.sector as usize;
                let b = (a + r.sectors as usize).min(img.len());
                contents.image_bytes(&img[a.min(b)..b])
            });
            let loaded = match loaded {
                Ok(l) => l,
                // Before creation completes the device may hold anything (it was never a
                // store); after deletion chunk 0 is zero.
                Err(_) if !m.created => continue,
                Err(LoadError::Unformatted) if m.deleted => continue,
                Err(e) => return Err(format!("snapshot {s}: load failed: {e:?}")),
            };
            if !loaded.valid {
                if !m.invalidated {
                    return Err(format!(
                        "snapshot {s} loads invalid but was never invalidated"
                    ));
                }
                continue;
            }
            // (3)/(4): every loaded record is one the engine allocated; no COW chunk twice.
            let mut known = BTreeSet::new();
            self.world.engine.for_each_exception(SnapId(s), |o, n, _| {
                known.insert((o, n));
            });
            let cs = u64::from(m.chunk);
            let mut seen_new = BTreeSet::new();
            let mut map = BTreeMap::new();
            let mut bad = None;
            loaded.table.for_each_run(|r| {
                for j in 0..r.len {
                    let (o, n) = (r.old_chunk + j, r.new_chunk + j);
                    if !seen_new.insert(n) {
                        bad = Some(format!("snapshot {s}: COW chunk {n} referenced twice"));
                    }
                    if !m.invalidated && !known.contains(&(o, n)) {
                        bad = Some(format!(
                            "snapshot {s}: record {o}->{n} unknown to the engine"
                        ));
                    }
                    map.insert(o, n);
                }
            });
            if let Some(b) = bad {
                return Err(b);
            }
            if loaded.state.next_free * cs > m.cow_sectors + cs {
                return Err(format!("snapshot {s}: next free chunk past the end"));
            }
            if !m.created {
                continue;
            }
            // (1) the snapshot reads its creation-time contents plus its own flushed writes.
            for x in 0..self.origin.sectors() {
                let c = x / cs;
                let v = match map.get(&c) {
                    Some(&n) => img.get((n * cs + x % cs) as usize).copied().unwrap_or(0),
                    None => origin_img[x as usize],
                };
                if !m.model.allowed(x, v) {
                    return Err(format!(
                        "snapshot {s} sector {x} (chunk {c}, {}) reads {v:#x}, expected {:#x}",
                        if map.contains_key(&c) {
                            "COW"
                        } else {
                            "origin"
                        },
                        m.model.current(x)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A seeded random workload over `sectors` sectors with up to `snaps` snapshots.
pub fn random_ops(
    seed: u64,
    sectors: u64,
    n: usize,
    chunk: u32,
    cow_chunks: u64,
    snaps: u16,
) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let mut ops = vec![Op::Create {
        chunk,
        cow_chunks,
        writable: true,
        fua: !seed.is_multiple_of(3),
    }];
    let mut created = 1u16;
    for _ in 0..n {
        let len = 1 + rng.below(u64::from(chunk) * 3) as u32;
        let sector = rng.below(sectors - u64::from(len));
        let r = rng.below(100);
        ops.push(match r {
            0..=54 => Op::OriginWrite {
                sector,
                sectors: len,
                fua: rng.below(10) == 0,
            },
            55..=62 => Op::OriginRead {
                sector,
                sectors: len,
            },
            63..=67 => Op::OriginFlush,
            68..=77 => Op::SnapWrite {
                snap: rng.below(u64::from(created)) as u16,
                sector,
                sectors: len,
            },
            78..=87 => Op::SnapRead {
                snap: rng.below(u64::from(created)) as u16,
                sector,
                sectors: len,
            },
            88..=92 => Op::SnapFlush {
                snap: rng.below(u64::from(created)) as u16,
            },
            _ => {
                if created < snaps {
                    created += 1;
                    let ch = if rng.below(2) == 0 { chunk } else { chunk * 2 };
                    Op::Create {
                        chunk: ch,
                        cow_chunks: cow_chunks * u64::from(chunk) / u64::from(ch),
                        writable: true,
                        fua: rng.below(2) == 0,
                    }
                } else {
                    Op::OriginFlush
                }
            }
        });
    }
    ops
}
