//! The copy-on-write engine: a deterministic state machine between volume requests and device
//! I/O. See the crate documentation for the protocol; this module is its implementation.
//!
//! Structure (all pools sized in [`Engine::new`], nothing allocated afterwards):
//! - request slots, with a FIFO of requests that still have something to do (`waiting`);
//! - pending exceptions (allocated COW chunk, copy in progress or copied, not yet durable),
//!   kept per snapshot in allocation order so commits take a prefix (dm-snap.c's
//!   `exception_sequence` rule);
//! - copy jobs: one origin read into a copy buffer, then one write per snapshot and run of
//!   consecutive chunks (dm-snap.c copies chunk by chunk with kcopyd);
//! - per-snapshot commit state machine: [zero next area] → flush → area write (FUA) [→ flush]
//!   (`persistent_commit_exception()` in dm-snap-persistent.c does the same with
//!   REQ_PREFLUSH|REQ_FUA, but only when the pipeline is idle or the area full); the first
//!   flush is left out when a completed commit flush was sent after every copy of the batch
//!   had completed (commit flushes are numbered; each copy notes how many had been sent);
//! - I/O slots: every emitted [`Io`] has a slot that says what to do when it completes.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use crate::format::{
    encode_chunk0, BoundedBytes, Geometry, Header, OriginMarker, Record, BINDING_NAME_BYTES,
    ORIGIN_MARKER_COW_BYTES, SECTOR_BYTES,
};
use crate::store::{LoadedStore, StoreState};
use crate::table::{ExceptionTable, Grow, SEGMENT_RUNS};
use crate::types::*;

// The merge state machine lives in `src/merge.rs`, as a child of this module so it can use
// the engine's pools and helpers.
#[path = "merge.rs"]
mod merge;

const NIL: u32 = u32::MAX;
/// Most group commits in flight per snapshot (area writes are still issued one at a time).
const MAX_BATCHES: usize = 4;
/// Most copy jobs whose writes wait for the reads in flight (see `defer_job_writes`): about
/// what one device write of consecutive COW chunks carries.
const DEFERRED_JOBS_MAX: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqPhase {
    Free,
    /// In the `waiting` FIFO: something left to do.
    Waiting,
    /// Everything emitted; completes when `ios` reaches 0.
    Issued,
}

#[derive(Clone, Copy, Debug)]
struct ReqSlot {
    req: VolumeRequest,
    phase: ReqPhase,
    ios: u32,
    origin_reads: u32,
    failed: Option<VolumeError>,
    cursor: u64,
    overwrite_chunk: Option<u64>,
    admitted: bool,
    /// For an origin write held for copies: the tick it was first held.
    held_since: Option<u64>,
    /// Counted in `Engine::origin_writes_issued`.
    counted_issue: bool,
    /// `Engine::epoch` when this request last found nothing to do.
    seen_epoch: u64,
    /// The pending exception this request waits for (NIL: waiting on something else,
    /// which bumps the epoch), and its generation when the request looked.
    blocked_on: u32,
    blocked_gen: u32,
    /// For an origin write that met a snapshot whose invalidation is not durable:
    /// `Engine::invalidation_failures` then. A failure counted after it fails the write.
    stuck_mark: Option<u64>,
    /// Bumped at each submit into this slot: a direct I/O's token names the request it was
    /// given for (see [`Engine::submit_direct`]).
    generation: u32,
    /// This request's direct I/O, while it is out: the tick it was given and whether it
    /// reads a snapshot's chunk from the origin.
    direct: Option<(u64, bool)>,
}

/// Marks the low word of an [`IoToken`] that names a request's direct I/O (the request slot
/// in the bits below it) rather than an engine I/O slot.
const DIRECT_TOKEN: u32 = 1 << 31;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PState {
    Free,
    Copying,
    Copied,
    Committing,
    /// Its snapshot was invalidated while the copy job still links it.
    Dead,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    snap: u16,
    old: u64,
    new: u64,
    state: PState,
    next_in_job: u32,
    /// Linked into a copy job that has not finished: the job frees it.
    in_job: bool,
    /// Next entry in the same `pending_index` bucket.
    next_in_hash: u32,
    alloc_tick: u64,
    /// Tick its copy reached the COW device.
    copied_tick: u64,
    /// Commit flushes its snapshot had sent when its copy completed: a commit flush sent
    /// after it (a higher number) makes the copy durable.
    copied_flush: u64,
    /// Bumped whenever the entry leaves a state a request may wait on (retired, freed,
    /// its job finished); kept across reuse of the slot, so a waiter never misses a change.
    generation: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JobPhase {
    Free,
    NeedRead,
    Reading,
    Writing,
}

#[derive(Clone, Copy, Debug)]
struct Job {
    phase: JobPhase,
    /// Copy buffer, or NIL for an overwrite job (data comes from the request).
    buffer: u32,
    overwrite_req: u32,
    overwrite_offset: u64,
    read_start: u64,
    read_sectors: u32,
    first: u32,
    last: u32,
    emit: u32,
    writes_inflight: u32,
    queued: bool,
}

impl Job {
    /// A free job slot.
    const FREE: Job = Job {
        phase: JobPhase::Free,
        buffer: NIL,
        overwrite_req: NIL,
        overwrite_offset: 0,
        read_start: 0,
        read_sectors: 0,
        first: NIL,
        last: NIL,
        emit: NIL,
        writes_inflight: 0,
        queued: false,
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommitPhase {
    ZeroNext,
    Flush,
    /// Flushed; the area write waits for the older batch's area write to complete.
    WaitTurn,
    AreaWrite,
    PostFlush,
}

/// One group commit: `count` records at the front of the snapshot's order (after the older
/// batch's), with its own I/O in flight.
#[derive(Clone, Copy, Debug)]
struct Batch {
    id: u32,
    phase: CommitPhase,
    count: u64,
    full: bool,
    inflight: bool,
    appended: bool,
    /// Tick the commit started.
    started: u64,
    /// Number of its flush in flight (see `Snap::flushes_sent`).
    flush_seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CreateStep {
    FlushOrigin,
    ZeroArea,
    FlushCow,
    WriteHeader,
    HeaderFlush,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SnapState {
    Creating(CreateStep),
    Active,
    Deleting,
    /// Being merged into the origin (see `merge.rs`): no new exceptions, no snapshot I/O.
    Merging,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeaderPhase {
    None,
    Write,
    Flush,
}

/// [`Snap::extend_io`] steps, in the order they are written.
const EXTEND_ZERO: u8 = 1;
const EXTEND_MARKER: u8 = 2;
const EXTEND_FLUSH: u8 = 4;

struct Snap {
    state: SnapState,
    valid: bool,
    overflow: bool,
    writable: bool,
    cow_fua: bool,
    cow_block_sectors: u32,
    store: StoreState,
    table: ExceptionTable,
    order: VecDeque<u32>,
    /// Commits in flight, oldest first: newer ones flush while the oldest writes its area.
    batches: [Option<Batch>; MAX_BATCHES],
    meta_inflight: bool,
    /// Tick the last commit ended (the hold bound counts from here at the earliest).
    last_commit_end: u64,
    /// Commit flushes sent to the COW device, numbered from 1 in the order sent.
    flushes_sent: u64,
    /// The highest-numbered commit flush that completed: every copy that had completed
    /// before it was sent is durable.
    flushes_done: u64,
    header: Vec<u8>,
    header_phase: HeaderPhase,
    /// Changes made to `header` (invalidation, a rewritten binding), counted; the header is
    /// written again until what is durable is the latest.
    header_gen: u64,
    /// The change count and phase of the header write or flush in flight.
    header_sent: (u64, HeaderPhase),
    /// The change that carries a binding [`Engine::rewrite_binding`] asked for (0: none).
    binding_gen: u64,
    /// [`Engine::extend_snapshot`] under way: the new size, applied when the binding that
    /// records it is durable.
    extend_to: Option<u64>,
    /// Its binding, written once the area below is zeroed.
    extend_binding: Option<crate::format::Binding>,
    /// An area chunk the extension brings into the store that was never zeroed (it lay
    /// past the old end).
    extend_area: u64,
    /// What the extension still writes before its binding: [`EXTEND_ZERO`] that area,
    /// [`EXTEND_MARKER`] a free-extent marker after the new end, [`EXTEND_FLUSH`].
    extend_io: u8,
    /// The marker's block.
    extend_marker: Vec<u8>,
    wipe: bool,
    /// The wipe is written; a flush makes it durable (COW device without FUA).
    wipe_flush: bool,
    /// The wipe's write or flush failed: the store may still be found.
    wipe_failed: bool,
    inflight: u32,
    thresholds_fired: u8,
    /// Invalid in memory, but the header write (or flush) that marks the store invalid
    /// failed: the store may still load as valid. Origin writes to chunks outside `table`
    /// fail until a retry of the header write succeeds (see [`Engine::invalidation_failed`]).
    invalidation_stuck: bool,
    /// Tick the last failed attempt at that header write ended.
    invalidation_attempt_end: u64,
    /// What a merge writes over the origin's first block names this store by
    /// ([`Engine::set_merge_label`]).
    merge_label: OriginMarker,
    /// The origin marker's block, encoded when a merge writes it (one origin logical block).
    origin_mark: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoCtx {
    Free,
    Request {
        req: u32,
        origin_read: bool,
    },
    JobRead {
        job: u32,
    },
    JobWrite {
        job: u32,
        snap: u16,
        first: u32,
        count: u32,
    },
    Commit {
        snap: u16,
        batch: u32,
    },
    Create {
        snap: u16,
    },
    Header {
        snap: u16,
    },
    Wipe {
        snap: u16,
    },
    /// Zeroing an area an extension brings into the store.
    Extend {
        snap: u16,
    },
    /// An I/O of the running merge: of run `run` of its batch (copies), on the COW device
    /// or the origin.
    Merge {
        snap: u16,
        run: u16,
        cow: bool,
    },
    /// An origin request's I/O sent to the merging snapshot's COW device.
    MergeRedirect {
        req: u32,
        snap: u16,
    },
}

#[derive(Clone, Copy, Debug)]
struct IoSlot {
    generation: u32,
    ctx: IoCtx,
    /// Tick the I/O was emitted at, and the phase its latency counts toward.
    emitted: u64,
    timed: Timed,
}

/// Which [`PhaseTimes`] entry an I/O's latency goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timed {
    No,
    CopyRead,
    CopyWrite,
    CommitFlush,
    AreaWrite,
    OriginWrite,
}

/// The snapshot engine for one origin. See the crate documentation.
pub struct Engine {
    cfg: EngineConfig,
    now: u64,
    reqs: Vec<ReqSlot>,
    free_reqs: Vec<u32>,
    waiting: VecDeque<u32>,
    pending: Vec<Pending>,
    free_pending: Vec<u32>,
    /// Buckets of a chained hash over live pending exceptions, keyed by (snapshot, origin chunk).
    pending_index: Vec<u32>,
    jobs: Vec<Job>,
    free_jobs: Vec<u32>,
    /// Jobs with an I/O to emit.
    job_work: VecDeque<u32>,
    free_buffers: Vec<u32>,
    snaps: Vec<Option<Snap>>,
    io: Vec<IoSlot>,
    free_io: Vec<u32>,
    outbox: VecDeque<Io>,
    /// Set by `submit_direct` while it runs: the request's first I/O, if the fast path
    /// issues it at once, goes to `direct_out` for the caller instead of the outbox.
    direct_wanted: bool,
    direct_out: Option<Io>,
    completions: VecDeque<VolumeCompletion>,
    events: VecDeque<Event>,
    events_dropped: u64,
    quiescing: bool,
    quiesce_reported: bool,
    origin_writes_active: u32,
    /// Origin writes sent to the device by `advance_origin_write` and not finished.
    origin_writes_issued: u32,
    origin_reads_redirected: u32,
    dirty: bool,
    progress: u64,
    /// Bumped whenever something a waiting request may wait for changes (a commit, a freed
    /// resource, an invalidation...): waiting requests are re-evaluated only then.
    epoch: u64,
    /// A request found a pool (pending exceptions, copy jobs, copy buffers) empty: the next
    /// free of one bumps the epoch so waiting requests look again.
    starved: bool,
    /// Pending-exception generation bumps so far (see `Pending::generation`).
    generation_bumps: u64,
    /// Requests added to `waiting` so far.
    waiting_added: u64,
    /// (epoch, generation bumps, waiting added) at the last scan of `waiting`, and whether a
    /// request progressed in it: with neither changed, a scan would find nothing to do.
    last_scan: (u64, u64, u64),
    rescan: bool,
    /// A commit waited for `step_requests` to look at the waiting requests first.
    commit_deferred: bool,
    batch_seq: u32,
    io_starved: bool,
    progress_mark: u64,
    stats: EngineStats,
    /// The merge running on this origin, if any (one at a time).
    merge: Option<merge::Merge>,
    /// The running merge's metadata areas (the one runs are taken from and the ones read
    /// ahead below it), one chunk each, allocated when the merge starts.
    merge_ahead: Vec<Vec<u8>>,
    /// The running merge's runs in the pipeline.
    merge_q: merge::Queue,
    /// Copy jobs whose origin read is in flight.
    jobs_reading: u32,
    /// Copy jobs whose writes wait for the reads in flight (see `defer_job_writes`), in
    /// (snapshot, COW chunk) order; capacity for every job.
    deferred_jobs: Vec<u32>,
    /// Failed attempts at writing an invalidated snapshot's header so far.
    invalidation_failures: u64,
}

impl Engine {
    /// Creates an engine; every pool is allocated here.
    pub fn new(cfg: EngineConfig) -> Result<Self, EngineError> {
        if cfg.request_slots == 0
            || cfg.io_slots < 4
            || cfg.io_slots >= DIRECT_TOKEN
            || cfg.request_slots >= DIRECT_TOKEN
            || cfg.pending_exceptions == 0
            || cfg.copy_buffers == 0
            || cfg.max_snapshots == 0
            || !cfg.copy_buffer_sectors.is_power_of_two()
            || cfg.origin_sectors == 0
        {
            return Err(EngineError::BadConfig);
        }
        let nreq = cfg.request_slots as usize;
        let njobs = cfg.copy_buffers as usize + nreq;
        let nio = cfg.io_slots as usize;
        let npend = cfg.pending_exceptions as usize;
        let mut snaps = Vec::with_capacity(cfg.max_snapshots as usize);
        for _ in 0..cfg.max_snapshots {
            snaps.push(None);
        }
        Ok(Engine {
            now: 0,
            reqs: vec![
                ReqSlot {
                    req: VolumeRequest {
                        tag: 0,
                        volume: Volume::Origin,
                        op: VolumeOp::Flush,
                        sector: 0,
                        sectors: 0
                    },
                    phase: ReqPhase::Free,
                    ios: 0,
                    origin_reads: 0,
                    failed: None,
                    cursor: 0,
                    overwrite_chunk: None,
                    admitted: false,
                    held_since: None,
                    counted_issue: false,
                    seen_epoch: u64::MAX,
                    blocked_on: NIL,
                    blocked_gen: 0,
                    stuck_mark: None,
                    generation: 0,
                    direct: None,
                };
                nreq
            ],
            free_reqs: (0..nreq as u32).rev().collect(),
            waiting: VecDeque::with_capacity(nreq),
            pending: vec![
                Pending {
                    snap: 0,
                    old: 0,
                    new: 0,
                    state: PState::Free,
                    next_in_job: NIL,
                    in_job: false,
                    next_in_hash: NIL,
                    alloc_tick: 0,
                    copied_tick: 0,
                    copied_flush: 0,
                    generation: 0,
                };
                npend
            ],
            free_pending: (0..npend as u32).rev().collect(),
            pending_index: vec![NIL; (npend * 2).next_power_of_two()],
            jobs: vec![Job::FREE; njobs],
            free_jobs: (0..njobs as u32).rev().collect(),
            job_work: VecDeque::with_capacity(njobs),
            free_buffers: (0..cfg.copy_buffers).rev().collect(),
            snaps,
            io: vec![
                IoSlot {
                    generation: 0,
                    ctx: IoCtx::Free,
                    emitted: 0,
                    timed: Timed::No,
                };
                nio
            ],
            free_io: (0..nio as u32).rev().collect(),
            outbox: VecDeque::with_capacity(nio),
            direct_wanted: false,
            direct_out: None,
            completions: VecDeque::with_capacity(nreq),
            events: VecDeque::with_capacity(64 + 8 * cfg.max_snapshots as usize),
            events_dropped: 0,
            quiescing: false,
            quiesce_reported: false,
            origin_writes_active: 0,
            origin_writes_issued: 0,
            origin_reads_redirected: 0,
            dirty: false,
            progress: 0,
            epoch: 0,
            starved: false,
            generation_bumps: 0,
            waiting_added: 0,
            last_scan: (u64::MAX, 0, 0),
            rescan: true,
            commit_deferred: false,
            batch_seq: 0,
            io_starved: false,
            progress_mark: 0,
            stats: EngineStats::default(),
            merge: None,
            merge_ahead: Vec::new(),
            merge_q: merge::Queue::default(),
            jobs_reading: 0,
            deferred_jobs: Vec::with_capacity(njobs),
            invalidation_failures: 0,
            cfg,
        })
    }

    // ----------------------------------------------------------------------------------------
    // Public API
    // ----------------------------------------------------------------------------------------

    /// Sets the current time in ticks (monotonic; the unit is the caller's).
    pub fn tick(&mut self, now: u64) {
        if now > self.now {
            self.now = now;
            self.dirty = true;
        }
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Takes a volume request. `Err(Busy)` when every request slot is in use: keep it and
    /// submit it again after a completion. Invalid requests complete with an error.
    pub fn submit(&mut self, req: VolumeRequest) -> Result<(), SubmitError> {
        let Some(idx) = self.free_reqs.pop() else {
            return Err(SubmitError::Busy);
        };
        let generation = self.reqs[idx as usize].generation.wrapping_add(1);
        self.reqs[idx as usize] = ReqSlot {
            req,
            phase: ReqPhase::Waiting,
            ios: 0,
            origin_reads: 0,
            failed: None,
            cursor: req.sector,
            overwrite_chunk: None,
            admitted: false,
            held_since: None,
            counted_issue: false,
            seen_epoch: u64::MAX,
            blocked_on: NIL,
            blocked_gen: 0,
            stuck_mark: None,
            generation,
            direct: None,
        };
        let check = self.check_request(&req);
        if let Err(e) = check {
            self.fail_request(idx, e);
        } else if self.fast_path(idx) {
            // Issued at once: nothing for the engine's passes to do.
            self.stats.fast_requests += 1;
            return Ok(());
        } else {
            self.waiting.push_back(idx);
            self.waiting_added += 1;
        }
        self.dirty = true;
        Ok(())
    }

    /// Like [`submit`](Self::submit), but a request the fast path issues at once (an origin
    /// read, an origin write to chunks every snapshot has copied, a snapshot read) comes back
    /// as its I/O for the caller to issue now, without an engine I/O slot or the outbox;
    /// its completion goes to [`complete_io`](Self::complete_io) like any other. A snapshot
    /// read that spans pieces on different devices gives its first piece here and the rest
    /// through [`poll_io`](Self::poll_io). `Ok(None)`: the request waits in the engine.
    pub fn submit_direct(&mut self, req: VolumeRequest) -> Result<Option<Io>, SubmitError> {
        self.direct_wanted = true;
        let submitted = self.submit(req);
        self.direct_wanted = false;
        submitted.map(|()| self.direct_out.take())
    }

    /// Issues request `idx` at once, without a pass over the waiting requests, when it needs
    /// nothing but the table to decide: an origin write to chunks every tracking snapshot
    /// has copied (one table lookup per snapshot and chunk), an origin read, or a snapshot
    /// read, while no merge, quiesce or invalidation is under way. Whether it went out;
    /// anything else waits in `waiting` as before.
    fn fast_path(&mut self, idx: u32) -> bool {
        if self.merge.is_some() || self.quiescing {
            return false;
        }
        let r = self.reqs[idx as usize].req;
        match (r.volume, r.op) {
            (Volume::Origin, VolumeOp::Read) => {
                self.issue_whole(idx, Device::Origin, IoOp::Read, true)
            }
            (Volume::Snapshot(id), VolumeOp::Read) if self.tracking(id.0 as usize) => {
                self.advance_snapshot_read(idx, id.0 as usize)
            }
            (Volume::Origin, VolumeOp::Write { fua }) => {
                // What `advance_origin_write` waits for besides copies: a store whose
                // invalidation is not durable, a delete, a snapshot read sent to the origin.
                if self.origin_reads_redirected > 0
                    || self
                        .snaps
                        .iter()
                        .flatten()
                        .any(|x| x.invalidation_stuck || !x.valid || x.state != SnapState::Active)
                {
                    return false;
                }
                let start = r.sector;
                let end = start + u64::from(r.sectors);
                if !self.copies_of(start, end).0 {
                    return false;
                }
                self.reqs[idx as usize].admitted = true;
                self.origin_writes_active += 1;
                self.stats.origin_writes += 1;
                if !self.issue_whole(idx, Device::Origin, IoOp::Write { fua }, true) {
                    // No I/O slot: it waits, admitted, like any other.
                    return false;
                }
                self.origin_writes_issued += 1;
                self.reqs[idx as usize].counted_issue = true;
                true
            }
            _ => false,
        }
    }

    /// The next I/O to issue, if any. Drives the engine's internal state machines.
    pub fn poll_io(&mut self) -> Option<Io> {
        if self.dirty {
            self.process();
        }
        self.outbox.pop_front()
    }

    /// Reports completion of an issued I/O. For reads, the data must be in the buffer.
    pub fn complete_io(
        &mut self,
        token: IoToken,
        result: Result<(), IoError>,
    ) -> Result<(), EngineError> {
        let idx = (token.0 & 0xFFFF_FFFF) as usize;
        let generation = (token.0 >> 32) as u32;
        if idx as u32 & DIRECT_TOKEN != 0 {
            return self.complete_direct(idx as u32 & !DIRECT_TOKEN, generation, result);
        }
        let Some(slot) = self.io.get(idx) else {
            return Err(EngineError::UnknownToken);
        };
        if slot.generation != generation || slot.ctx == IoCtx::Free {
            return Err(EngineError::UnknownToken);
        }
        let ctx = slot.ctx;
        let took = self.now.saturating_sub(slot.emitted);
        let ph = &mut self.stats.phases;
        match slot.timed {
            Timed::No => {}
            Timed::CopyRead => ph.copy_read.add(took),
            Timed::CopyWrite => ph.copy_write.add(took),
            Timed::CommitFlush => ph.commit_flush.add(took),
            Timed::AreaWrite => ph.area_write.add(took),
            Timed::OriginWrite => ph.origin_write.add(took),
        }
        self.io[idx].ctx = IoCtx::Free;
        self.io[idx].generation = self.io[idx].generation.wrapping_add(1);
        self.free_io.push(idx as u32);
        self.dirty = true;
        if self.io_starved {
            self.io_starved = false;
            self.epoch += 1;
        }
        let ok = result.is_ok();
        match ctx {
            IoCtx::Free => {}
            IoCtx::Request { req, origin_read } => self.on_request_io(req, origin_read, ok),
            IoCtx::JobRead { job } => self.on_job_read(job, ok),
            IoCtx::JobWrite {
                job,
                snap,
                first,
                count,
            } => self.on_job_write(job, snap, first, count, ok),
            IoCtx::Commit { snap, batch } => self.on_commit_io(snap, batch, ok),
            IoCtx::Create { snap } => self.on_create_io(snap, ok),
            IoCtx::Header { snap } => self.on_header_io(snap, ok),
            IoCtx::Wipe { snap } => self.on_wipe_io(snap, ok),
            IoCtx::Extend { snap } => self.on_extend_io(snap, ok),
            IoCtx::Merge { snap, run, cow } => self.on_merge_io(snap, run, cow, ok),
            IoCtx::MergeRedirect { req, snap } => {
                self.io_done_on(snap);
                self.on_request_io(req, false, ok);
            }
        }
        Ok(())
    }

    /// A request's direct I/O is back (see [`submit_direct`](Self::submit_direct)).
    fn complete_direct(
        &mut self,
        idx: u32,
        generation: u32,
        result: Result<(), IoError>,
    ) -> Result<(), EngineError> {
        let Some(slot) = self.reqs.get_mut(idx as usize) else {
            return Err(EngineError::UnknownToken);
        };
        if slot.generation != generation || slot.phase == ReqPhase::Free {
            return Err(EngineError::UnknownToken);
        }
        let Some((given, origin_read)) = slot.direct.take() else {
            return Err(EngineError::UnknownToken);
        };
        if slot.req.volume == Volume::Origin && matches!(slot.req.op, VolumeOp::Write { .. }) {
            let took = self.now.saturating_sub(given);
            self.stats.phases.origin_write.add(took);
        }
        self.dirty = true;
        self.on_request_io(idx, origin_read, result.is_ok());
        Ok(())
    }

    /// Whether finished volume requests wait for [`Engine::poll_completion`].
    pub fn has_completions(&self) -> bool {
        !self.completions.is_empty()
    }

    /// The next completed volume request, if any.
    pub fn poll_completion(&mut self) -> Option<VolumeCompletion> {
        let c = self.completions.pop_front();
        if c.is_some() && self.completions.is_empty() {
            // A commit may have waited for these to be taken (see `maybe_start_commit`).
            self.dirty = true;
        }
        c
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes of an engine-owned metadata buffer named by an [`IoBuffer::Meta`]; copy them when
    /// issuing the write. They do not change until that write completes.
    pub fn meta_bytes(&self, buffer: &IoBuffer) -> Option<&[u8]> {
        let IoBuffer::Meta { snap, kind } = buffer else {
            return None;
        };
        let s = self.snaps.get(snap.0 as usize)?.as_ref()?;
        Some(match kind {
            MetaKind::Area => &s.store.area,
            MetaKind::Header => &s.header,
            MetaKind::OriginMark => &s.origin_mark,
            MetaKind::ExtendMarker => &s.extend_marker,
            MetaKind::MergeArea(slot) => return self.merge_ahead_bytes(*snap, *slot),
        })
    }

    /// The bytes of an engine-owned metadata buffer, to fill in the data of a *read* into an
    /// [`IoBuffer::Meta`] before [`complete_io`](Self::complete_io) (a merge reads earlier
    /// metadata areas back).
    pub fn meta_bytes_mut(&mut self, buffer: &IoBuffer) -> Option<&mut [u8]> {
        let IoBuffer::Meta { snap, kind } = buffer else {
            return None;
        };
        if let MetaKind::MergeArea(slot) = kind {
            return self.merge_ahead_bytes_mut(*snap, *slot);
        }
        let s = self.snaps.get_mut(snap.0 as usize)?.as_mut()?;
        Some(match kind {
            MetaKind::Area => &mut s.store.area,
            MetaKind::Header => &mut s.header,
            MetaKind::OriginMark => &mut s.origin_mark,
            MetaKind::ExtendMarker => &mut s.extend_marker,
            MetaKind::MergeArea(_) => return None,
        })
    }

    /// Stop admitting origin writes; [`Event::OriginQuiesced`] once none is in flight.
    pub fn quiesce_origin(&mut self) {
        self.quiescing = true;
        self.quiesce_reported = false;
        self.dirty = true;
    }

    /// Whether origin writes are quiesced and none is in flight.
    pub fn is_quiesced(&self) -> bool {
        self.quiescing && self.origin_writes_active == 0
    }

    /// Admit origin writes again.
    pub fn resume_origin(&mut self) {
        self.quiescing = false;
        self.dirty = true;
        self.epoch += 1;
    }

    /// Creates a snapshot of the (quiesced) origin on a fresh COW device: flush the origin,
    /// zero chunk 0 and area 0, flush, write the header (FUA). [`Event::SnapshotCreated`] when
    /// durable; then call [`resume_origin`](Self::resume_origin).
    pub fn create_snapshot(&mut self, cfg: &SnapshotConfig) -> Result<SnapId, EngineError> {
        if !self.is_quiesced() {
            return Err(EngineError::NotQuiesced);
        }
        if self.merge.is_some() {
            return Err(EngineError::MergeRunning);
        }
        let g = self.check_snapshot_config(cfg)?;
        let store = StoreState::fresh(g, cfg.cow_sectors, self.cfg.origin_sectors);
        // The table starts empty and grows as exceptions are added, up to one run per data
        // chunk of the store (or `table_runs`, if smaller).
        let table = ExceptionTable::new(cfg.table_runs.min(store.cow_chunks() as usize));
        let id = self.install(
            cfg,
            store,
            table,
            SnapState::Creating(CreateStep::FlushOrigin),
            true,
        )?;
        Ok(id)
    }

    /// Attaches a store read by [`Loader`](crate::store::Loader). The origin must not have
    /// origin writes in flight (quiesce first, or attach before serving).
    pub fn attach_snapshot(
        &mut self,
        loaded: LoadedStore,
        cfg: &SnapshotConfig,
    ) -> Result<SnapId, EngineError> {
        if self.origin_writes_active != 0 {
            return Err(EngineError::NotQuiesced);
        }
        let g = self.check_snapshot_config(cfg)?;
        if loaded.state.geometry != g || loaded.state.cow_sectors != cfg.cow_sectors {
            return Err(EngineError::StoreMismatch);
        }
        let valid = loaded.valid;
        let merging = loaded.merging && valid;
        let saved = loaded.merge_saved_chunk;
        let autoextend = loaded.autoextend;
        if (merging && self.merge.is_some()) || self.merge_running() {
            return Err(EngineError::MergeRunning);
        }
        let id = self.install(cfg, loaded.state, loaded.table, SnapState::Active, valid)?;
        // The header block is rebuilt from the configuration: keep what else chunk 0 held
        // that later header writes must not lose.
        if let Some(Some(x)) = self.snaps.get_mut(id.0 as usize) {
            crate::format::AutoExtend::encode(autoextend, &mut x.header);
        }
        if merging {
            self.hold_resumed_merge(id, saved);
        } else if valid {
            self.check_usage(id.0 as usize);
        }
        Ok(id)
    }

    /// Rewrites snapshot `snap`'s binding record (a rename, the writable flag, a larger
    /// region): it is written into the header block, in the store's first sector with the
    /// header, so a crash leaves the old binding or the new one, never a mix. I/O goes on
    /// meanwhile. [`Event::BindingWritten`] says when it is durable (or that the write
    /// failed). One at a time; the snapshot must be active and valid.
    pub fn rewrite_binding(
        &mut self,
        snap: SnapId,
        binding: &crate::format::Binding,
    ) -> Result<(), EngineError> {
        self.rewrite_header(snap, |header| binding.encode(header))
    }

    /// Changes snapshot `snap`'s header block with `change` and has it written (the one way
    /// a valid store's chunk 0 is rewritten: [`rewrite_binding`](Self::rewrite_binding),
    /// [`set_autoextend`](Self::set_autoextend)).
    fn rewrite_header(
        &mut self,
        snap: SnapId,
        change: impl FnOnce(&mut [u8]),
    ) -> Result<(), EngineError> {
        let Some(Some(x)) = self.snaps.get_mut(snap.0 as usize) else {
            return Err(EngineError::NoSuchSnapshot);
        };
        if x.state != SnapState::Active || !x.valid {
            return Err(EngineError::NoSuchSnapshot);
        }
        if x.binding_gen != 0 || x.extend_to.is_some() {
            return Err(EngineError::Busy);
        }
        change(&mut x.header);
        Self::schedule_header_write(x);
        self.dirty = true;
        Ok(())
    }

    /// The header block changed: count the change and write it (a write already in flight
    /// is followed by another, see `on_header_io`).
    fn schedule_header_write(x: &mut Snap) {
        x.header_gen += 1;
        x.binding_gen = x.header_gen;
        if x.header_phase == HeaderPhase::None {
            x.header_phase = HeaderPhase::Write;
        }
    }

    /// Grows snapshot `snap`'s store to `cow_sectors` (its device or region grew: the
    /// caller checked the space is free). `binding` is the store's binding with the new
    /// region. If the extension brings an area into the store that was never zeroed (the
    /// store had filled the area before it, up to its old end), that area is zeroed and
    /// flushed first; then the binding is rewritten ([`rewrite_binding`](Self::rewrite_binding)),
    /// and only once it is durable does the store allocate from the new space, so a crash
    /// leaves the old store or the larger one. [`Event::BindingWritten`] ends it. Linux reads
    /// the larger store as it is (dm-snapshot takes the COW device's size as it finds it).
    pub fn extend_snapshot(
        &mut self,
        snap: SnapId,
        cow_sectors: u64,
        binding: &crate::format::Binding,
        marker: Option<crate::format::FreeExtent>,
    ) -> Result<(), EngineError> {
        let Some(Some(x)) = self.snaps.get_mut(snap.0 as usize) else {
            return Err(EngineError::NoSuchSnapshot);
        };
        if x.state != SnapState::Active || !x.valid || x.overflow {
            return Err(EngineError::NoSuchSnapshot);
        }
        if x.binding_gen != 0 || x.extend_to.is_some() {
            return Err(EngineError::Busy);
        }
        let cs = x.store.chunk_sectors();
        if cow_sectors <= x.store.cow_sectors || !cow_sectors.is_multiple_of(cs) {
            return Err(EngineError::BadSize);
        }
        let g = x.store.geometry;
        let area = g.area_chunk(x.store.current_area);
        let (old, new) = (x.store.cow_chunks(), cow_sectors / cs);
        x.extend_to = Some(cow_sectors);
        x.extend_io = 0;
        if area >= old && area < new {
            x.extend_area = area;
            x.extend_io |= EXTEND_ZERO;
        }
        if let Some(m) = marker {
            // (The block was allocated with the snapshot: an auto-extension allocates nothing.)
            x.extend_marker.fill(0);
            m.encode(&mut x.extend_marker);
            x.extend_io |= EXTEND_MARKER;
        }
        if x.extend_io != 0 {
            x.extend_io |= EXTEND_FLUSH;
            x.extend_binding = Some(binding.clone());
            self.dirty = true;
            return Ok(());
        }
        self.start_extend_binding(snap.0 as usize, binding);
        Ok(())
    }

    fn start_extend_binding(&mut self, s: usize, binding: &crate::format::Binding) {
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        binding.encode(&mut x.header);
        Self::schedule_header_write(x);
        self.dirty = true;
    }

    fn on_extend_io(&mut self, sid: u16, ok: bool) {
        self.io_done_on(sid);
        self.epoch += 1;
        let s = sid as usize;
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        x.meta_inflight = false;
        if !ok || !x.valid {
            x.extend_io = 0;
            x.extend_to = None;
            x.extend_binding = None;
            self.push_event(Event::BindingWritten {
                snap: SnapId(sid),
                ok: false,
            });
            return;
        }
        // The steps go in order: zero, marker, flush.
        let done = x.extend_io & x.extend_io.wrapping_neg();
        x.extend_io &= !done;
        if x.extend_io != 0 {
            return;
        }
        if let Some(b) = x.extend_binding.take() {
            self.start_extend_binding(s, &b);
        }
    }

    /// Records (or clears) snapshot `snap`'s auto-extend policy in its store (chunk 0, with
    /// the binding: one sector). [`Event::BindingWritten`] when durable, as for
    /// [`rewrite_binding`](Self::rewrite_binding).
    pub fn set_autoextend(
        &mut self,
        snap: SnapId,
        policy: Option<crate::format::AutoExtend>,
    ) -> Result<(), EngineError> {
        self.rewrite_header(snap, |header| {
            crate::format::AutoExtend::encode(policy, header)
        })
    }

    /// Snapshot `snap`'s auto-extend policy, as its store records it.
    pub fn autoextend(&self, snap: SnapId) -> Option<crate::format::AutoExtend> {
        let x = self.snaps.get(snap.0 as usize)?.as_ref()?;
        crate::format::AutoExtend::decode(&x.header)
    }

    /// Whether an extension of snapshot `snap` is under way.
    pub fn extending(&self, snap: SnapId) -> bool {
        self.snaps
            .get(snap.0 as usize)
            .and_then(Option::as_ref)
            .is_some_and(|x| x.extend_to.is_some())
    }

    /// Lets snapshot `snap`'s volume take writes, or refuses them ([`VolumeError::ReadOnly`])
    /// from the next request on. Requests already admitted finish. (The flag on disk is the
    /// binding's: rewrite it with [`rewrite_binding`](Self::rewrite_binding).)
    pub fn set_writable(&mut self, snap: SnapId, writable: bool) -> Result<(), EngineError> {
        let Some(Some(x)) = self.snaps.get_mut(snap.0 as usize) else {
            return Err(EngineError::NoSuchSnapshot);
        };
        x.writable = writable;
        Ok(())
    }

    /// The binding record in snapshot `snap`'s header block, if it has one (stores adopted
    /// without one, e.g. made by Linux, have none).
    pub fn binding(&self, snap: SnapId) -> Option<crate::format::Binding> {
        let x = self.snaps.get(snap.0 as usize)?.as_ref()?;
        crate::format::Binding::decode(&x.header).ok()
    }

    /// Names the store in the [`OriginMarker`] a merge of snapshot `snap` writes over the
    /// origin's first block: the snapshot's name and a description of its COW device and
    /// region, which a boot that finds the origin marked but not the store shows to the
    /// operator. Call it after create or attach (before a merge starts or resumes); values
    /// too long are cut.
    pub fn set_merge_label(&mut self, snap: SnapId, name: &[u8], cow: &[u8], region_start: u64) {
        let Some(Some(x)) = self.snaps.get_mut(snap.0 as usize) else {
            return;
        };
        if let Some(n) = BoundedBytes::new(&name[..name.len().min(BINDING_NAME_BYTES)]) {
            x.merge_label.name = n;
        }
        if let Some(c) = BoundedBytes::new(&cow[..cow.len().min(ORIGIN_MARKER_COW_BYTES)]) {
            x.merge_label.cow = c;
        }
        x.merge_label.region_start = region_start;
    }

    /// Deletes a snapshot of the quiesced origin: invalidate it, wipe chunk 0, forget it.
    /// [`Event::SnapshotDeleted`] when done.
    pub fn delete_snapshot(&mut self, snap: SnapId) -> Result<(), EngineError> {
        if !self.is_quiesced() {
            return Err(EngineError::NotQuiesced);
        }
        let s = snap.0 as usize;
        match self.snaps.get(s) {
            Some(Some(x)) if x.state == SnapState::Active => {}
            _ => return Err(EngineError::NoSuchSnapshot),
        }
        self.invalidate(s, InvalidReason::Deleted);
        let rebinding = self.snaps[s].as_mut().is_some_and(|x| {
            let extending = x.extend_to.take().is_some();
            x.extend_binding = None;
            x.extend_io = 0;
            core::mem::take(&mut x.binding_gen) != 0 || extending
        });
        if rebinding {
            // A binding rewrite still in the works is given up with the snapshot.
            self.push_event(Event::BindingWritten { snap, ok: false });
        }
        if let Some(x) = self.snaps[s].as_mut() {
            x.state = SnapState::Deleting;
            x.header_phase = HeaderPhase::None;
            x.wipe = true;
        }
        self.dirty = true;
        Ok(())
    }

    /// Status as `dmsetup status` prints it.
    pub fn status(&self, snap: SnapId) -> Option<Status> {
        let s = self.snaps.get(snap.0 as usize)?.as_ref()?;
        if self.merge_failed(snap) {
            return Some(Status::MergeFailed);
        }
        Some(if s.overflow {
            Status::Overflow
        } else if !s.valid {
            Status::Invalid
        } else {
            Status::Usage(s.store.usage())
        })
    }

    /// Whether `snap` is invalid but its store could not be marked invalid on disk (the header
    /// write failed, e.g. a COW device gone read-only): the store may still load as valid,
    /// so origin writes to chunks it has no copy of fail with [`VolumeError::Io`] (writes to
    /// chunks it has a copy of, and reads, go on). Ends when a retry of the header write
    /// succeeds ([`Event::InvalidationDurable`]) or the snapshot is deleted.
    pub fn invalidation_failed(&self, snap: SnapId) -> bool {
        self.snaps
            .get(snap.0 as usize)
            .and_then(Option::as_ref)
            .is_some_and(|x| x.invalidation_stuck && x.state == SnapState::Active)
    }

    /// Every exception the engine knows for `snap`: `(old, new, committed)`.
    pub fn for_each_exception(&self, snap: SnapId, mut f: impl FnMut(u64, u64, bool)) {
        let Some(Some(s)) = self.snaps.get(snap.0 as usize) else {
            return;
        };
        s.table.for_each_run(|r| {
            for j in 0..r.len {
                f(r.old_chunk + j, r.new_chunk + j, true);
            }
        });
        for &p in &s.order {
            let p = &self.pending[p as usize];
            f(p.old, p.new, false);
        }
    }

    /// Whether origin chunk `chunk` has an exception in `snap`, committed or being copied
    /// (the origin chunk was written since the snapshot was taken, or the snapshot's chunk
    /// was written): one table lookup, no scan. `None` if there is no such snapshot.
    pub fn has_exception(&self, snap: SnapId, chunk: u64) -> Option<bool> {
        let s = self.snaps.get(snap.0 as usize)?.as_ref()?;
        Some(s.table.lookup(chunk).is_some() || self.pending_of(snap.0 as usize, chunk).is_some())
    }

    /// Bytes reserved by and used in `snap`'s exception table: `(reserved, used, exceptions)`.
    pub fn table_memory(&self, snap: SnapId) -> Option<(usize, usize, u64)> {
        let s = self.snaps.get(snap.0 as usize)?.as_ref()?;
        Some((
            s.table.reserved_bytes(),
            s.table.used_bytes(),
            s.table.len(),
        ))
    }

    /// Whether nothing is in flight or waiting.
    pub fn is_idle(&self) -> bool {
        self.free_io.len() == self.io.len()
            && self.free_reqs.len() == self.reqs.len()
            && self.outbox.is_empty()
            && self.snaps.iter().flatten().all(|s| s.order.is_empty())
            && self.merge_is_idle()
    }

    /// A one-line summary of pools and queues, for diagnostics.
    pub fn debug_state(&self) -> alloc::string::String {
        let mut out = alloc::format!(
            "io {}/{} req {}/{} waiting {} pending {}/{} jobs {}/{} buffers {}/{} origin_writes {} redirected {} quiescing {}",
            self.io.len() - self.free_io.len(),
            self.io.len(),
            self.reqs.len() - self.free_reqs.len(),
            self.reqs.len(),
            self.waiting.len(),
            self.pending.len() - self.free_pending.len(),
            self.pending.len(),
            self.jobs.len() - self.free_jobs.len(),
            self.jobs.len(),
            self.cfg.copy_buffers as usize - self.free_buffers.len(),
            self.cfg.copy_buffers,
            self.origin_writes_active,
            self.origin_reads_redirected,
            self.quiescing,
        );
        for (i, s) in self.snaps.iter().enumerate() {
            if let Some(x) = s {
                out.push_str(&alloc::format!(
                    "; snap {i}: {:?} valid {} order {} commit {:?} header {:?} meta_inflight {} inflight {}",
                    x.state,
                    x.valid,
                    x.order.len(),
                    x.batches,
                    x.header_phase,
                    x.meta_inflight,
                    x.inflight
                ));
            }
        }
        for &w in &self.waiting {
            let r = &self.reqs[w as usize];
            out.push_str(&alloc::format!(
                "; waiting {:?} cursor {} ios {}",
                r.req,
                r.cursor,
                r.ios
            ));
        }
        for &p in self.snaps.iter().flatten().flat_map(|x| x.order.iter()) {
            let e = &self.pending[p as usize];
            out.push_str(&alloc::format!(
                "; pe {}:{}->{} {:?}",
                e.snap,
                e.old,
                e.new,
                e.state
            ));
        }
        out
    }

    /// Events dropped because the event queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    // ----------------------------------------------------------------------------------------
    // Helpers
    // ----------------------------------------------------------------------------------------

    fn check_snapshot_config(&self, cfg: &SnapshotConfig) -> Result<Geometry, EngineError> {
        let g = Geometry::new(cfg.chunk_sectors).ok_or(EngineError::BadConfig)?;
        let bs = cfg.cow_block_sectors.max(1);
        if cfg.chunk_sectors > self.cfg.copy_buffer_sectors
            || !cfg.chunk_sectors.is_multiple_of(bs)
            || !cfg
                .chunk_sectors
                .is_multiple_of(self.cfg.origin_block_sectors.max(1))
            || cfg.cow_sectors / u64::from(cfg.chunk_sectors) < 3
            || cfg.table_runs == 0
            || g.chunk_bytes() < bs as usize * SECTOR_BYTES
        {
            return Err(EngineError::BadConfig);
        }
        Ok(g)
    }

    fn install(
        &mut self,
        cfg: &SnapshotConfig,
        store: StoreState,
        table: ExceptionTable,
        state: SnapState,
        valid: bool,
    ) -> Result<SnapId, EngineError> {
        let Some(s) = self.snaps.iter().position(|x| x.is_none()) else {
            return Err(EngineError::NoSnapshotSlot);
        };
        // Room for one segment of runs more than it holds, allocated here rather than on
        // the I/O path: a snapshot that stays under it never allocates after this. (A heap
        // that cannot serve it now gets asked again on the first write that needs it.)
        let mut table = table;
        let headroom = SEGMENT_RUNS.min(table.free_runs());
        let _ = table.make_room(headroom);
        let block = cfg.cow_block_sectors.max(1) as usize * SECTOR_BYTES;
        let mut header = vec![0u8; block];
        let mut h = Header::new(cfg.chunk_sectors);
        if !valid {
            h.valid = 0;
        }
        encode_chunk0(&mut header, &h, cfg.binding.as_ref());
        self.snaps[s] = Some(Snap {
            state,
            valid,
            overflow: false,
            writable: cfg.writable,
            cow_fua: cfg.cow_fua,
            cow_block_sectors: cfg.cow_block_sectors.max(1),
            store,
            table,
            order: VecDeque::with_capacity(self.cfg.pending_exceptions as usize),
            batches: [None; MAX_BATCHES],
            meta_inflight: false,
            last_commit_end: 0,
            flushes_sent: 0,
            flushes_done: 0,
            header,
            header_phase: HeaderPhase::None,
            header_gen: 0,
            header_sent: (0, HeaderPhase::None),
            binding_gen: 0,
            extend_to: None,
            extend_binding: None,
            extend_area: 0,
            extend_io: 0,
            extend_marker: vec![0u8; block],
            wipe: false,
            wipe_flush: false,
            wipe_failed: false,
            inflight: 0,
            thresholds_fired: 0,
            invalidation_stuck: false,
            invalidation_attempt_end: 0,
            merge_label: OriginMarker::default(),
            origin_mark: vec![0u8; self.cfg.origin_block_sectors.max(1) as usize * SECTOR_BYTES],
        });
        self.dirty = true;
        Ok(SnapId(s as u16))
    }

    fn check_request(&self, req: &VolumeRequest) -> Result<(), VolumeError> {
        if let Volume::Snapshot(id) = req.volume {
            match self.snaps.get(id.0 as usize) {
                Some(Some(s)) if s.state == SnapState::Merging => {
                    return Err(VolumeError::Merging);
                }
                Some(Some(s)) if s.state == SnapState::Active => {
                    if !s.valid {
                        return Err(VolumeError::SnapshotInvalid);
                    }
                    if matches!(req.op, VolumeOp::Write { .. }) && !s.writable {
                        return Err(VolumeError::ReadOnly);
                    }
                }
                _ => return Err(VolumeError::NoSuchVolume),
            }
        }
        if req.op != VolumeOp::Flush {
            let end = req.sector.checked_add(u64::from(req.sectors));
            if req.sectors == 0 || end.is_none_or(|e| e > self.cfg.origin_sectors) {
                return Err(VolumeError::OutOfRange);
            }
        }
        Ok(())
    }

    fn emit(
        &mut self,
        ctx: IoCtx,
        device: Device,
        op: IoOp,
        sector: u64,
        sectors: u32,
        buffer: IoBuffer,
    ) -> bool {
        // `submit_direct`'s request: its first I/O goes to the caller, under a token that
        // names the request, not an I/O slot.
        let direct = match (self.direct_wanted, ctx) {
            (true, IoCtx::Request { req, origin_read }) => Some((req, origin_read)),
            _ => None,
        };
        let token = if let Some((req, origin_read)) = direct {
            self.direct_wanted = false;
            let slot = &mut self.reqs[req as usize];
            slot.direct = Some((self.now, origin_read));
            IoToken((u64::from(slot.generation) << 32) | u64::from(DIRECT_TOKEN | req))
        } else {
            let Some(idx) = self.free_io.pop() else {
                self.io_starved = true;
                return false;
            };
            let slot = &mut self.io[idx as usize];
            slot.ctx = ctx;
            slot.emitted = self.now;
            slot.timed = match (ctx, op, device) {
                (IoCtx::Request { .. }, IoOp::Write { .. }, Device::Origin) => Timed::OriginWrite,
                (IoCtx::JobRead { .. }, _, _) => Timed::CopyRead,
                (IoCtx::JobWrite { .. }, _, _) => Timed::CopyWrite,
                (IoCtx::Commit { .. }, IoOp::Flush, _) => Timed::CommitFlush,
                (IoCtx::Commit { .. }, IoOp::Write { .. }, _) => Timed::AreaWrite,
                _ => Timed::No,
            };
            IoToken((u64::from(slot.generation) << 32) | u64::from(idx))
        };
        if let Device::Cow(s) = device {
            if let Some(Some(x)) = self.snaps.get_mut(s.0 as usize) {
                x.inflight += 1;
            }
        }
        let io = Io {
            token,
            device,
            op,
            sector,
            sectors,
            buffer,
        };
        if direct.is_some() {
            self.direct_out = Some(io);
        } else {
            self.outbox.push_back(io);
        }
        self.progress += 1;
        true
    }

    fn io_done_on(&mut self, s: u16) {
        if let Some(Some(x)) = self.snaps.get_mut(s as usize) {
            x.inflight = x.inflight.saturating_sub(1);
        }
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() < self.events.capacity() {
            self.events.push_back(e);
        } else {
            self.events_dropped += 1;
        }
    }

    fn fail_request(&mut self, idx: u32, e: VolumeError) {
        let r = &mut self.reqs[idx as usize];
        if r.failed.is_none() {
            r.failed = Some(e);
        }
        r.phase = ReqPhase::Issued;
        self.finish_if_done(idx);
    }

    fn finish_if_done(&mut self, idx: u32) {
        let r = self.reqs[idx as usize];
        if r.phase != ReqPhase::Issued || r.ios != 0 {
            return;
        }
        let mut result = match r.failed {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let Volume::Snapshot(id) = r.req.volume {
            let valid = matches!(self.snaps.get(id.0 as usize), Some(Some(s)) if s.valid);
            if !valid && result.is_ok() {
                result = Err(VolumeError::SnapshotInvalid);
            }
        }
        if r.req.volume == Volume::Origin
            && matches!(r.req.op, VolumeOp::Write { .. })
            && r.admitted
        {
            self.origin_writes_active -= 1;
        }
        if r.counted_issue {
            self.origin_writes_issued -= 1;
            self.reqs[idx as usize].counted_issue = false;
        }
        self.reqs[idx as usize].phase = ReqPhase::Free;
        self.free_reqs.push(idx);
        self.completions.push_back(VolumeCompletion {
            tag: r.req.tag,
            result,
        });
        self.progress += 1;
        self.dirty = true;
    }

    /// Drops a pending exception that left its snapshot's order: freed now, or by its copy
    /// job when that finishes.
    fn retire_pending(&mut self, p: u32) {
        self.hash_remove(p);
        let pe = &mut self.pending[p as usize];
        pe.generation = pe.generation.wrapping_add(1);
        self.generation_bumps += 1;
        if pe.in_job {
            pe.state = PState::Dead;
        } else {
            pe.state = PState::Free;
            self.free_pending.push(p);
            self.wake_starved();
        }
    }

    /// Requests that found a pool empty look again (something was just freed).
    fn wake_starved(&mut self) {
        if self.starved {
            self.starved = false;
            self.epoch += 1;
        }
    }

    fn pending_bucket(&self, s: u16, old: u64) -> usize {
        let h = (old ^ (u64::from(s) << 48)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> 32) as usize & (self.pending_index.len() - 1)
    }

    fn hash_insert(&mut self, p: u32) {
        let e = self.pending[p as usize];
        let b = self.pending_bucket(e.snap, e.old);
        self.pending[p as usize].next_in_hash = self.pending_index[b];
        self.pending_index[b] = p;
    }

    fn hash_remove(&mut self, p: u32) {
        let e = self.pending[p as usize];
        let b = self.pending_bucket(e.snap, e.old);
        let mut prev = NIL;
        let mut i = self.pending_index[b];
        while i != NIL {
            let next = self.pending[i as usize].next_in_hash;
            if i == p {
                if prev == NIL {
                    self.pending_index[b] = next;
                } else {
                    self.pending[prev as usize].next_in_hash = next;
                }
                self.pending[p as usize].next_in_hash = NIL;
                return;
            }
            prev = i;
            i = next;
        }
    }

    fn pending_of(&self, s: usize, old: u64) -> Option<u32> {
        let mut i = self.pending_index[self.pending_bucket(s as u16, old)];
        while i != NIL {
            let e = &self.pending[i as usize];
            if e.old == old && e.snap as usize == s {
                return Some(i);
            }
            i = e.next_in_hash;
        }
        None
    }

    fn tracking(&self, s: usize) -> bool {
        matches!(&self.snaps[s], Some(x) if x.valid && x.state == SnapState::Active)
    }

    fn check_usage(&mut self, s: usize) {
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        let u = x.store.usage();
        let mut fire = [None, None];
        for (i, &t) in self.cfg.usage_thresholds.iter().enumerate() {
            let bit = 1u8 << i;
            if t > 0
                && x.thresholds_fired & bit == 0
                && u128::from(u.allocated_sectors) * 100
                    >= u128::from(t) * u128::from(u.total_sectors)
            {
                x.thresholds_fired |= bit;
                fire[i] = Some(t);
            }
        }
        for t in fire.into_iter().flatten() {
            self.push_event(Event::UsageThreshold {
                snap: SnapId(s as u16),
                percent: t,
            });
        }
    }

    /// Invalidates snapshot `s`: frees its pending exceptions, fails its waiting requests,
    /// writes the header with `valid = 0` (except for deletion, which wipes).
    fn invalidate(&mut self, s: usize, reason: InvalidReason) {
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        if !x.valid {
            return;
        }
        x.valid = false;
        x.batches = [None; MAX_BATCHES];
        self.epoch += 1;
        x.overflow = matches!(reason, InvalidReason::CowFull | InvalidReason::TableFull);
        let order = core::mem::take(&mut x.order);
        if reason != InvalidReason::Deleted {
            let mut h = Header::new(x.store.geometry.chunk_sectors);
            h.valid = 0;
            h.encode(&mut x.header);
            x.header_gen += 1;
            x.header_phase = HeaderPhase::Write;
        }
        for &p in &order {
            self.retire_pending(p);
        }
        if let Some(x) = self.snaps[s].as_mut() {
            x.order = order;
            x.order.clear();
        }
        self.push_event(Event::Invalidated {
            snap: SnapId(s as u16),
            reason,
        });
        self.dirty = true;
        self.progress += 1;
    }

    // ----------------------------------------------------------------------------------------
    // The driver loop
    // ----------------------------------------------------------------------------------------

    fn process(&mut self) {
        self.dirty = false;
        for _ in 0..16 {
            let before = self.progress;
            self.step_snapshots();
            self.step_jobs();
            self.step_requests();
            if self.quiescing && self.origin_writes_active == 0 && !self.quiesce_reported {
                self.quiesce_reported = true;
                self.push_event(Event::OriginQuiesced);
            }
            // A commit held back for requests not yet looked at decides again, now that
            // `step_requests` has looked.
            if self.progress == before && !core::mem::take(&mut self.commit_deferred) {
                return;
            }
        }
        // Still making progress after the pass budget: come back on the next poll.
        self.dirty = true;
    }

    fn step_snapshots(&mut self) {
        for s in 0..self.snaps.len() {
            let Some(x) = self.snaps[s].as_ref() else {
                continue;
            };
            let sid = s as u16;
            let dev = Device::Cow(SnapId(sid));
            if x.meta_inflight {
                continue;
            }
            match x.state {
                SnapState::Creating(step) => {
                    let cs = x.store.chunk_sectors();
                    let bs = x.cow_block_sectors;
                    let fua = x.cow_fua;
                    let ctx = IoCtx::Create { snap: sid };
                    let emitted = match step {
                        CreateStep::FlushOrigin => {
                            self.emit(ctx, Device::Origin, IoOp::Flush, 0, 0, IoBuffer::None)
                        }
                        CreateStep::ZeroArea => self.emit(
                            ctx,
                            dev,
                            IoOp::Write { fua: false },
                            0,
                            (2 * cs) as u32,
                            IoBuffer::Zeroes,
                        ),
                        CreateStep::FlushCow | CreateStep::HeaderFlush => {
                            self.emit(ctx, dev, IoOp::Flush, 0, 0, IoBuffer::None)
                        }
                        CreateStep::WriteHeader => self.emit(
                            ctx,
                            dev,
                            IoOp::Write { fua },
                            0,
                            bs,
                            IoBuffer::Meta {
                                snap: SnapId(sid),
                                kind: MetaKind::Header,
                            },
                        ),
                    };
                    if emitted {
                        self.set_meta_inflight(s);
                    }
                }
                SnapState::Deleting => {
                    if x.wipe {
                        // Zero chunk 0 (header and binding): FUA where the device has it,
                        // else a write and a flush.
                        let cs = x.store.chunk_sectors() as u32;
                        let fua = x.cow_fua;
                        if self.emit(
                            IoCtx::Wipe { snap: sid },
                            dev,
                            IoOp::Write { fua },
                            0,
                            cs,
                            IoBuffer::Zeroes,
                        ) {
                            if let Some(x) = self.snaps[s].as_mut() {
                                x.wipe = false;
                                x.wipe_flush = !fua;
                                x.meta_inflight = true;
                            }
                        }
                    } else if x.wipe_flush {
                        if self.emit(
                            IoCtx::Wipe { snap: sid },
                            dev,
                            IoOp::Flush,
                            0,
                            0,
                            IoBuffer::None,
                        ) {
                            if let Some(x) = self.snaps[s].as_mut() {
                                x.wipe_flush = false;
                                x.meta_inflight = true;
                            }
                        }
                    } else if x.inflight == 0 {
                        let failed = x.wipe_failed;
                        self.snaps[s] = None;
                        self.epoch += 1;
                        if failed {
                            self.push_event(Event::SnapshotWipeFailed { snap: SnapId(sid) });
                        }
                        self.push_event(Event::SnapshotDeleted { snap: SnapId(sid) });
                        self.progress += 1;
                    }
                }
                SnapState::Merging => self.step_merge(s),
                SnapState::Active => {
                    if x.extend_io != 0 {
                        let g = x.store.geometry;
                        let ctx = IoCtx::Extend { snap: sid };
                        let op = IoOp::Write { fua: false };
                        let emitted = if x.extend_io & EXTEND_ZERO != 0 {
                            let sector = g.chunk_sector(x.extend_area);
                            self.emit(ctx, dev, op, sector, g.chunk_sectors, IoBuffer::Zeroes)
                        } else if x.extend_io & EXTEND_MARKER != 0 {
                            let at = x.extend_to.unwrap_or(0);
                            let n = x.cow_block_sectors;
                            let kind = MetaKind::ExtendMarker;
                            let buffer = IoBuffer::Meta {
                                snap: SnapId(sid),
                                kind,
                            };
                            self.emit(ctx, dev, op, at, n, buffer)
                        } else {
                            self.emit(ctx, dev, IoOp::Flush, 0, 0, IoBuffer::None)
                        };
                        if emitted {
                            self.set_meta_inflight(s);
                        }
                        continue;
                    }
                    if x.header_phase != HeaderPhase::None {
                        let op = if x.header_phase == HeaderPhase::Write {
                            IoOp::Write { fua: x.cow_fua }
                        } else {
                            IoOp::Flush
                        };
                        let (sectors, buffer) = if x.header_phase == HeaderPhase::Write {
                            (
                                x.cow_block_sectors,
                                IoBuffer::Meta {
                                    snap: SnapId(sid),
                                    kind: MetaKind::Header,
                                },
                            )
                        } else {
                            (0, IoBuffer::None)
                        };
                        if self.emit(IoCtx::Header { snap: sid }, dev, op, 0, sectors, buffer) {
                            if let Some(x) = self.snaps[s].as_mut() {
                                // A flush makes durable what the write before it sent.
                                x.header_sent = match x.header_phase {
                                    HeaderPhase::Write => (x.header_gen, HeaderPhase::Write),
                                    _ => (x.header_sent.0, HeaderPhase::Flush),
                                };
                            }
                            self.set_meta_inflight(s);
                        }
                        continue;
                    }
                    if !x.valid {
                        continue;
                    }
                    self.maybe_start_commit(s);
                    self.emit_commit_steps(s);
                }
            }
        }
    }

    fn set_meta_inflight(&mut self, s: usize) {
        if let Some(x) = self.snaps[s].as_mut() {
            x.meta_inflight = true;
        }
    }

    /// Starts a commit of `s`'s copied records if the policy says so.
    fn maybe_start_commit(&mut self, s: usize) {
        let policy = self.cfg.commit_policy;
        let bound = self.cfg.hold_bound_ticks;
        let now = self.now;
        self.batch_seq = self.batch_seq.wrapping_add(1);
        let next_id = self.batch_seq;
        let looked_at = self.requests_looked_at();
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        // Linux commits one area write at a time; snapfw lets the next batch flush while the
        // previous one writes its area (never across an area boundary).
        let max_batches = if policy == CommitPolicy::Grouped {
            (self.cfg.commits_in_flight as usize).clamp(1, MAX_BATCHES)
        } else {
            1
        };
        let busy = x.batches.iter().flatten().count();
        if busy >= max_batches {
            return;
        }
        // A batch that fills its area moves the next batches to the next area; allow one such
        // crossing in flight at a time.
        let full_at = x.batches.iter().flatten().position(|b| b.full);
        let skip: usize = x.batches.iter().flatten().map(|b| b.count as usize).sum();
        let mut k = 0u64;
        for &p in x.order.iter().skip(skip) {
            if self.pending[p as usize].state == PState::Copied {
                k += 1;
            } else {
                break;
            }
        }
        if k == 0 {
            return;
        }
        let room = match full_at {
            // Room in the next area, after the batches queued behind the full one.
            Some(f) => {
                let behind: u64 = x
                    .batches
                    .iter()
                    .flatten()
                    .skip(f + 1)
                    .map(|b| b.count)
                    .sum();
                // Stay strictly below full: one crossing at a time.
                (x.store.geometry.exceptions_per_area - behind).saturating_sub(1)
            }
            None => {
                // Records of older batches not yet in the area image still take room.
                let unappended: u64 = x
                    .batches
                    .iter()
                    .flatten()
                    .filter(|b| !b.appended)
                    .map(|b| b.count)
                    .sum();
                x.store.area_room().saturating_sub(unappended)
            }
        };
        if room == 0 {
            return;
        }
        // Linux's "idle": no copy in flight. snapfw also waits while released origin writes
        // are still on the device or their completions not yet taken by the caller: their
        // submitters tend to write again at once, and the next copies then join this commit
        // instead of waiting for another one. Waiting requests that have not been looked at
        // since they arrived or since something they may wait for changed (a copy buffer
        // came free) count as busy too: their copies are about to start. (The hold bound
        // still applies, so a write waiting on something else cannot stall a commit.)
        let no_copies = k == (x.order.len() - skip) as u64;
        let idle = match policy {
            CommitPolicy::Grouped => {
                let quiet =
                    no_copies && self.origin_writes_issued == 0 && self.completions.is_empty();
                if quiet && !looked_at {
                    self.commit_deferred = true;
                }
                quiet && looked_at
            }
            CommitPolicy::LinuxIdle => no_copies,
        };
        let oldest = x
            .order
            .get(skip)
            .map(|&p| self.pending[p as usize].alloc_tick)
            .unwrap_or(now);
        // Waiting during a commit that could not take it does not count toward the bound.
        let waited = now.saturating_sub(oldest.max(x.last_commit_end));
        let overdue = policy == CommitPolicy::Grouped && waited >= bound;
        if !(idle || k >= room || overdue) {
            return;
        }
        let n = k.min(room);
        for i in skip..skip + n as usize {
            let p = x.order[i] as usize;
            self.pending[p].state = PState::Committing;
            let waited = now.saturating_sub(self.pending[p].copied_tick);
            self.stats.phases.batch_wait.add(waited);
        }
        let full = full_at.is_none() && n == room;
        let next_area = x.store.geometry.area_chunk(x.store.current_area + 1);
        // A commit flush sent after every copy of the batch had completed (the previous
        // batch's flush after its area write, on a device without FUA) already made them
        // durable: no flush of its own.
        let early = u64::from(self.cfg.unsafe_flush_covers_earlier_copies);
        let flushed = (skip..skip + n as usize)
            .all(|i| self.pending[x.order[i] as usize].copied_flush < x.flushes_done + early);
        let flush = if self.cfg.unsafe_skip_commit_flush || flushed {
            if flushed && !(full && next_area < x.store.cow_chunks()) {
                self.stats.commit_flushes_saved += 1;
            }
            CommitPhase::WaitTurn
        } else {
            CommitPhase::Flush
        };
        let mut batch = Batch {
            id: next_id,
            phase: if full && next_area < x.store.cow_chunks() {
                CommitPhase::ZeroNext
            } else {
                flush
            },
            count: n,
            full,
            inflight: false,
            appended: false,
            started: now,
            flush_seq: 0,
        };
        if busy == 0 {
            Self::append_batch(x, &self.pending, &mut batch);
        }
        x.batches[busy] = Some(batch);
        self.progress += 1;
    }

    /// Appends the oldest batch's records (the first `count` of the order) to the area image.
    fn append_batch(x: &mut Snap, pending: &[Pending], b: &mut Batch) {
        for i in 0..b.count as usize {
            let pe = pending[x.order[i] as usize];
            x.store.append(Record {
                old_chunk: pe.old,
                new_chunk: pe.new,
            });
        }
        b.appended = true;
    }

    fn emit_commit_steps(&mut self, s: usize) {
        for i in 0..MAX_BATCHES {
            let Some(x) = self.snaps[s].as_mut() else {
                return;
            };
            let Some(mut b) = x.batches[i] else {
                continue;
            };
            if b.inflight {
                continue;
            }
            if b.phase == CommitPhase::WaitTurn {
                if i != 0 {
                    continue;
                }
                if !b.appended {
                    Self::append_batch(x, &self.pending, &mut b);
                }
                b.phase = CommitPhase::AreaWrite;
                x.batches[0] = Some(b);
            }
            let sid = s as u16;
            let dev = Device::Cow(SnapId(sid));
            let g = x.store.geometry;
            let ctx = IoCtx::Commit {
                snap: sid,
                batch: b.id,
            };
            let area_sector = x.store.area_sector();
            let next_area = g.area_chunk(x.store.current_area + 1);
            let fua = x.cow_fua;
            let emitted = match b.phase {
                CommitPhase::ZeroNext => self.emit(
                    ctx,
                    dev,
                    IoOp::Write { fua: false },
                    g.chunk_sector(next_area),
                    g.chunk_sectors,
                    IoBuffer::Zeroes,
                ),
                CommitPhase::Flush | CommitPhase::PostFlush => {
                    let ok = self.emit(ctx, dev, IoOp::Flush, 0, 0, IoBuffer::None);
                    if ok {
                        self.stats.commit_flushes += 1;
                        if let Some(x) = self.snaps[s].as_mut() {
                            x.flushes_sent += 1;
                            b.flush_seq = x.flushes_sent;
                            x.batches[i] = Some(b);
                        }
                    }
                    ok
                }
                CommitPhase::WaitTurn => false,
                CommitPhase::AreaWrite => self.emit(
                    ctx,
                    dev,
                    IoOp::Write { fua },
                    area_sector,
                    g.chunk_sectors,
                    IoBuffer::Meta {
                        snap: SnapId(sid),
                        kind: MetaKind::Area,
                    },
                ),
            };
            if emitted {
                if let Some(Some(b)) = self.snaps[s].as_mut().map(|x| x.batches[i].as_mut()) {
                    b.inflight = true;
                }
            }
        }
    }

    fn on_commit_io(&mut self, sid: u16, id: u32, ok: bool) {
        self.io_done_on(sid);
        let s = sid as usize;
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        let Some(i) = x.batches.iter().position(|b| b.is_some_and(|b| b.id == id)) else {
            // The snapshot was invalidated meanwhile.
            return;
        };
        let Some(mut b) = x.batches[i] else {
            return;
        };
        b.inflight = false;
        if !x.valid {
            x.batches[i] = None;
            return;
        }
        if !ok {
            self.invalidate(s, InvalidReason::MetadataError);
            return;
        }
        if matches!(b.phase, CommitPhase::Flush | CommitPhase::PostFlush) {
            x.flushes_done = x.flushes_done.max(b.flush_seq);
        }
        b.phase = match b.phase {
            CommitPhase::ZeroNext if self.cfg.unsafe_skip_commit_flush => CommitPhase::WaitTurn,
            CommitPhase::ZeroNext => CommitPhase::Flush,
            CommitPhase::Flush => CommitPhase::WaitTurn,
            CommitPhase::AreaWrite if !x.cow_fua => CommitPhase::PostFlush,
            CommitPhase::AreaWrite | CommitPhase::PostFlush => {
                // Durable (only the oldest batch writes its area).
                x.batches.rotate_left(1);
                x.batches[MAX_BATCHES - 1] = None;
                self.finish_batch(s, b);
                return;
            }
            CommitPhase::WaitTurn => CommitPhase::WaitTurn,
        };
        x.batches[i] = Some(b);
        self.progress += 1;
    }

    /// A batch's area write is durable: move its records into the table.
    fn finish_batch(&mut self, s: usize, b: Batch) {
        let mut table_full = false;
        for _ in 0..b.count {
            let Some(x) = self.snaps[s].as_mut() else {
                break;
            };
            let Some(p) = x.order.pop_front() else {
                break;
            };
            let pe = self.pending[p as usize];
            if x.table.insert(pe.old, pe.new).is_err() {
                table_full = true;
            }
            self.retire_pending(p);
        }
        if let Some(x) = self.snaps[s].as_mut() {
            if b.full {
                x.store.advance_area();
            }
        }
        self.stats.commits += 1;
        self.stats
            .phases
            .commit
            .add(self.now.saturating_sub(b.started));
        if let Some(x) = self.snaps[s].as_mut() {
            x.last_commit_end = self.now;
        }
        self.stats.records_committed += b.count;
        self.progress += 1;
        if table_full {
            self.invalidate(s, InvalidReason::TableFull);
        }
    }

    fn on_create_io(&mut self, sid: u16, ok: bool) {
        let s = sid as usize;
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        x.meta_inflight = false;
        let SnapState::Creating(step) = x.state else {
            return;
        };
        if step != CreateStep::FlushOrigin {
            x.inflight = x.inflight.saturating_sub(1);
        }
        if !ok {
            if x.inflight == 0 {
                self.snaps[s] = None;
            } else {
                x.valid = false;
                x.state = SnapState::Deleting;
            }
            self.push_event(Event::SnapshotCreateFailed { snap: SnapId(sid) });
            return;
        }
        let next = match step {
            CreateStep::FlushOrigin => Some(CreateStep::ZeroArea),
            CreateStep::ZeroArea => Some(CreateStep::FlushCow),
            CreateStep::FlushCow => Some(CreateStep::WriteHeader),
            CreateStep::WriteHeader if !x.cow_fua => Some(CreateStep::HeaderFlush),
            _ => None,
        };
        match next {
            Some(n) => x.state = SnapState::Creating(n),
            None => {
                x.state = SnapState::Active;
                self.push_event(Event::SnapshotCreated { snap: SnapId(sid) });
            }
        }
        self.progress += 1;
    }

    fn on_header_io(&mut self, sid: u16, ok: bool) {
        self.io_done_on(sid);
        let now = self.now;
        let Some(x) = self.snaps[sid as usize].as_mut() else {
            return;
        };
        x.meta_inflight = false;
        self.epoch += 1;
        let (sent_gen, sent_phase) = x.header_sent;
        x.header_phase = if ok && sent_phase == HeaderPhase::Write && !x.cow_fua {
            HeaderPhase::Flush
        } else if ok && x.header_gen > sent_gen {
            // The header changed since this write was sent: write the latest.
            HeaderPhase::Write
        } else {
            HeaderPhase::None
        };
        let binding_done = x.header_phase == HeaderPhase::None && x.binding_gen != 0;
        if x.binding_gen != 0 && (!ok || (binding_done && sent_gen >= x.binding_gen)) {
            x.binding_gen = 0;
            if let Some(sectors) = x.extend_to.take() {
                if ok && x.valid {
                    // The binding that records the larger store is durable: use it.
                    x.store.cow_sectors = sectors;
                    let chunks = x.store.cow_chunks();
                    x.table.raise_limit(chunks.min(usize::MAX as u64) as usize);
                    x.thresholds_fired = 0;
                }
            }
            let snap = SnapId(sid);
            self.push_event(Event::BindingWritten { snap, ok });
        }
        let Some(x) = self.snaps[sid as usize].as_mut() else {
            return;
        };
        if !ok && x.valid {
            // Only a binding was being written: the store is as it was, or holds the new
            // binding (one sector). Nothing else depends on it.
            x.header_phase = HeaderPhase::None;
            return;
        }
        // The header write (or its flush) marks the store invalid on disk. If it failed, the
        // store may still load as valid, with the records committed so far: origin writes to
        // chunks it has no copy of must not be released (`stuck_guard`) until a retry works.
        let event = if !ok {
            x.invalidation_attempt_end = now;
            let first = !x.invalidation_stuck;
            x.invalidation_stuck = true;
            self.invalidation_failures += 1;
            first.then_some(Event::InvalidationFailed { snap: SnapId(sid) })
        } else if x.header_phase == HeaderPhase::None && x.invalidation_stuck {
            x.invalidation_stuck = false;
            Some(Event::InvalidationDurable { snap: SnapId(sid) })
        } else {
            None
        };
        if let Some(e) = event {
            self.push_event(e);
        }
    }

    fn on_wipe_io(&mut self, sid: u16, ok: bool) {
        self.io_done_on(sid);
        self.epoch += 1;
        if let Some(x) = self.snaps[sid as usize].as_mut() {
            x.meta_inflight = false;
            if !ok {
                x.wipe_failed = true;
                x.wipe_flush = false;
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Copy jobs
    // ----------------------------------------------------------------------------------------

    fn queue_job(&mut self, j: u32) {
        let job = &mut self.jobs[j as usize];
        if !job.queued {
            job.queued = true;
            self.job_work.push_back(j);
        }
    }

    fn step_jobs(&mut self) {
        for _ in 0..self.job_work.len() {
            let Some(j) = self.job_work.pop_front() else {
                break;
            };
            self.jobs[j as usize].queued = false;
            let job = self.jobs[j as usize];
            match job.phase {
                JobPhase::NeedRead => {
                    if self.emit(
                        IoCtx::JobRead { job: j },
                        Device::Origin,
                        IoOp::Read,
                        job.read_start,
                        job.read_sectors,
                        IoBuffer::Copy {
                            index: job.buffer,
                            byte_offset: 0,
                        },
                    ) {
                        self.jobs[j as usize].phase = JobPhase::Reading;
                        self.jobs_reading += 1;
                    } else {
                        self.queue_job(j);
                    }
                }
                JobPhase::Writing if job.emit != NIL => self.emit_job_writes(j),
                _ => {}
            }
        }
    }

    fn emit_job_writes(&mut self, j: u32) {
        loop {
            let job = self.jobs[j as usize];
            let mut p = job.emit;
            // Skip exceptions whose snapshot died.
            while p != NIL && self.pending[p as usize].state == PState::Dead {
                p = self.pending[p as usize].next_in_job;
            }
            self.jobs[j as usize].emit = p;
            if p == NIL {
                self.maybe_finish_job(j);
                return;
            }
            let first = self.pending[p as usize];
            let mut count = 1u32;
            let mut q = first.next_in_job;
            while q != NIL {
                let e = self.pending[q as usize];
                if e.state != PState::Copying
                    || e.snap != first.snap
                    || e.old != first.old + u64::from(count)
                    || e.new != first.new + u64::from(count)
                {
                    break;
                }
                count += 1;
                q = e.next_in_job;
            }
            let Some(x) = self.snaps[first.snap as usize].as_ref() else {
                return;
            };
            let cs = x.store.chunk_sectors();
            let start = first.old * cs;
            let end = ((first.old + u64::from(count)) * cs).min(self.cfg.origin_sectors);
            let sectors = (end - start) as u32;
            let buffer = if job.buffer == NIL {
                IoBuffer::Caller {
                    tag: self.reqs[job.overwrite_req as usize].req.tag,
                    byte_offset: job.overwrite_offset,
                }
            } else {
                IoBuffer::Copy {
                    index: job.buffer,
                    byte_offset: (start - job.read_start) * SECTOR_BYTES as u64,
                }
            };
            let ctx = IoCtx::JobWrite {
                job: j,
                snap: first.snap,
                first: p,
                count,
            };
            let dev = Device::Cow(SnapId(first.snap));
            if !self.emit(
                ctx,
                dev,
                IoOp::Write { fua: false },
                first.new * cs,
                sectors,
                buffer,
            ) {
                self.queue_job(j);
                return;
            }
            self.stats.copy_writes += 1;
            if job.buffer == NIL {
                self.reqs[job.overwrite_req as usize].ios += 1;
            }
            self.jobs[j as usize].writes_inflight += 1;
            self.jobs[j as usize].emit = q;
        }
    }

    fn maybe_finish_job(&mut self, j: u32) {
        let job = self.jobs[j as usize];
        if job.phase != JobPhase::Writing || job.emit != NIL || job.writes_inflight != 0 {
            return;
        }
        // Free dead exceptions still linked to the job.
        let mut p = job.first;
        while p != NIL {
            let next = self.pending[p as usize].next_in_job;
            debug_assert!(self.pending[p as usize].state != PState::Copying);
            self.pending[p as usize].next_in_job = NIL;
            self.pending[p as usize].in_job = false;
            self.pending[p as usize].generation =
                self.pending[p as usize].generation.wrapping_add(1);
            self.generation_bumps += 1;
            if self.pending[p as usize].state == PState::Dead {
                self.pending[p as usize].state = PState::Free;
                self.free_pending.push(p);
            }
            p = next;
        }
        if job.buffer != NIL {
            self.free_buffers.push(job.buffer);
        }
        self.jobs[j as usize].phase = JobPhase::Free;
        self.free_jobs.push(j);
        self.wake_starved();
        self.progress += 1;
    }

    fn on_job_read(&mut self, j: u32, ok: bool) {
        let job = self.jobs[j as usize];
        if !ok {
            // Every snapshot with a live exception in this job loses it.
            let mut p = job.first;
            while p != NIL {
                let e = self.pending[p as usize];
                if e.state == PState::Copying {
                    self.invalidate(e.snap as usize, InvalidReason::CopyError);
                }
                p = e.next_in_job;
            }
            self.jobs[j as usize].emit = NIL;
        }
        self.jobs[j as usize].phase = JobPhase::Writing;
        self.jobs_reading = self.jobs_reading.saturating_sub(1);
        if ok {
            self.defer_job_writes(j);
        } else {
            self.maybe_finish_job(j);
        }
        if self.jobs_reading == 0 || self.deferred_jobs.len() >= DEFERRED_JOBS_MAX {
            self.emit_deferred_writes();
        }
    }

    /// Keeps job `j`'s copy writes back until the copy reads in flight are back, in the order
    /// of their COW chunks: random origin chunks get consecutive COW chunks, so the writes of
    /// one burst of copies then reach the device side by side and go down as one large write
    /// (`volume`'s origin merges consecutive copy writes), instead of one at a time as each
    /// read comes back. Commits wait for every copy anyway, so this delays no commit by more
    /// than the last read of its burst.
    fn defer_job_writes(&mut self, j: u32) {
        let key = |e: &Self, j: u32| {
            let p = e.jobs[j as usize].emit;
            if p == NIL {
                (u16::MAX, 0)
            } else {
                (e.pending[p as usize].snap, e.pending[p as usize].new)
            }
        };
        let k = key(self, j);
        let at = self
            .deferred_jobs
            .iter()
            .rposition(|&d| key(self, d) <= k)
            .map_or(0, |i| i + 1);
        if self.deferred_jobs.len() < self.deferred_jobs.capacity() {
            // Never reallocates: capacity is the number of jobs.
            self.deferred_jobs.insert(at, j);
        } else {
            self.emit_job_writes(j);
        }
    }

    /// Emits the copy writes held back by [`Engine::defer_job_writes`], in COW order.
    fn emit_deferred_writes(&mut self) {
        let n = self.deferred_jobs.len();
        for i in 0..n {
            let j = self.deferred_jobs[i];
            self.emit_job_writes(j);
        }
        self.deferred_jobs.clear();
    }

    fn on_job_write(&mut self, j: u32, sid: u16, first: u32, count: u32, ok: bool) {
        self.io_done_on(sid);
        let job = self.jobs[j as usize];
        self.jobs[j as usize].writes_inflight -= 1;
        if job.buffer == NIL {
            let r = job.overwrite_req;
            self.reqs[r as usize].ios -= 1;
            if !ok {
                self.reqs[r as usize].failed = Some(VolumeError::Io);
            }
        }
        if !ok {
            self.invalidate(sid as usize, InvalidReason::CopyError);
        } else {
            let flushes_sent = self.snaps[sid as usize]
                .as_ref()
                .map_or(u64::MAX, |x| x.flushes_sent);
            let mut p = first;
            for _ in 0..count {
                if p == NIL {
                    break;
                }
                let e = &mut self.pending[p as usize];
                if e.state == PState::Copying {
                    e.state = PState::Copied;
                    e.copied_tick = self.now;
                    e.copied_flush = flushes_sent;
                    self.stats
                        .phases
                        .copy
                        .add(self.now.saturating_sub(e.alloc_tick));
                }
                if self.cfg.unsafe_release_before_commit {
                    self.epoch += 1;
                }
                p = e.next_in_job;
            }
        }
        self.maybe_finish_job(j);
        if job.buffer == NIL {
            self.finish_if_done(job.overwrite_req);
        }
    }

    fn new_job(&mut self, with_buffer: bool) -> Option<u32> {
        if with_buffer && self.free_buffers.is_empty() {
            return None;
        }
        let j = self.free_jobs.pop()?;
        let buffer = if with_buffer {
            self.free_buffers.pop().unwrap_or(NIL)
        } else {
            NIL
        };
        self.jobs[j as usize] = Job {
            phase: JobPhase::NeedRead,
            buffer,
            ..Job::FREE
        };
        self.stats.copy_jobs += u64::from(with_buffer);
        Some(j)
    }

    fn link(&mut self, j: u32, p: u32) {
        let job = &mut self.jobs[j as usize];
        if job.last == NIL {
            job.first = p;
        } else {
            self.pending[job.last as usize].next_in_job = p;
        }
        job.last = p;
        self.pending[p as usize].in_job = true;
        if job.emit == NIL {
            job.emit = p;
        }
    }

    /// Allocates a pending exception for `(s, old)`; the caller checked capacity.
    fn alloc_pending(&mut self, s: usize, old: u64) -> Option<u32> {
        let now = self.now;
        let x = self.snaps[s].as_mut()?;
        let new = x.store.allocate()?;
        let p = self.free_pending.pop()?;
        let generation = self.pending[p as usize].generation;
        self.pending[p as usize] = Pending {
            generation,
            snap: s as u16,
            old,
            new,
            state: PState::Copying,
            next_in_job: NIL,
            in_job: false,
            next_in_hash: NIL,
            alloc_tick: now,
            copied_tick: 0,
            copied_flush: 0,
        };
        x.order.push_back(p);
        self.hash_insert(p);
        Some(p)
    }

    /// Whether snapshot `s` can take `n` more exceptions; invalidates it (overflow) if not.
    fn reserve(&mut self, s: usize, n: u64) -> bool {
        let Some(x) = self.snaps[s].as_ref() else {
            return false;
        };
        let cs = x.store.chunk_sectors();
        let g = x.store.geometry;
        let fits_in = |sectors: u64| {
            let mut next = x.store.next_free;
            for _ in 0..n {
                if (next + 1) * cs > sectors {
                    return false;
                }
                next = g.next_data_chunk(next);
            }
            true
        };
        if !fits_in(x.store.cow_sectors) {
            if x.extend_to.is_some_and(fits_in) {
                // The store is being extended: the copy waits for the larger size.
                return false;
            }
            self.invalidate(s, InvalidReason::CowFull);
            return false;
        }
        // The table grows here, before a COW chunk is taken, so a commit never allocates.
        // This is the only allocation on the I/O path: one fallible 16 KiB segment per 1024
        // runs (see `table`). A heap that cannot serve it invalidates the snapshot, as
        // dm-snapshot does when it cannot allocate an exception (`-ENOMEM`).
        let need = x.order.len() + n as usize;
        let grown = self.snaps[s].as_mut().map(|x| x.table.make_room(need));
        match grown {
            Some(Ok(())) => true,
            Some(Err(Grow::NoMemory)) => {
                self.invalidate(s, InvalidReason::OutOfMemory);
                false
            }
            _ => {
                self.invalidate(s, InvalidReason::TableFull);
                false
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Volume requests
    // ----------------------------------------------------------------------------------------

    /// Whether [`Engine::step_requests`] would find nothing new to look at.
    fn requests_looked_at(&self) -> bool {
        !self.rescan && (self.epoch, self.generation_bumps, self.waiting_added) == self.last_scan
    }

    fn step_requests(&mut self) {
        if self.requests_looked_at() {
            return;
        }
        let key = (self.epoch, self.generation_bumps, self.waiting_added);
        self.last_scan = key;
        self.rescan = false;
        let n = self.waiting.len();
        for _ in 0..n {
            let Some(idx) = self.waiting.pop_front() else {
                break;
            };
            if self.reqs[idx as usize].phase != ReqPhase::Waiting {
                continue;
            }
            let r = &self.reqs[idx as usize];
            let unchanged = r.blocked_on == NIL
                || self.pending[r.blocked_on as usize].generation == r.blocked_gen;
            if r.seen_epoch == self.epoch && unchanged {
                // Nothing it could be waiting for has changed.
                self.waiting.push_back(idx);
                continue;
            }
            let epoch = self.epoch;
            self.progress_mark = self.progress;
            self.stats.requests_examined += 1;
            if !self.advance_request(idx) {
                let r = &mut self.reqs[idx as usize];
                // Only park it if it made no progress; otherwise look again next pass.
                r.seen_epoch = if self.progress_mark == self.progress {
                    epoch
                } else {
                    self.rescan = true;
                    u64::MAX
                };
                self.waiting.push_back(idx);
            }
        }
    }

    /// Returns true when the request left the waiting state.
    fn advance_request(&mut self, idx: u32) -> bool {
        self.reqs[idx as usize].blocked_on = NIL;
        let r = self.reqs[idx as usize];
        if self.merge.is_some() && r.req.volume == Volume::Origin {
            return self.advance_origin_merging(idx);
        }
        match (r.req.volume, r.req.op) {
            (Volume::Origin, VolumeOp::Read) => {
                self.issue_whole(idx, Device::Origin, IoOp::Read, true)
            }
            (Volume::Origin, VolumeOp::Flush) => {
                self.issue_whole(idx, Device::Origin, IoOp::Flush, false)
            }
            (Volume::Origin, VolumeOp::Write { fua }) => self.advance_origin_write(idx, fua),
            (Volume::Snapshot(id), op) => {
                let s = id.0 as usize;
                if !self.tracking(s) {
                    self.fail_request(idx, VolumeError::SnapshotInvalid);
                    return true;
                }
                match op {
                    VolumeOp::Flush => self.issue_whole(idx, Device::Cow(id), IoOp::Flush, false),
                    VolumeOp::Read => self.advance_snapshot_read(idx, s),
                    VolumeOp::Write { fua } => self.advance_snapshot_write(idx, s, fua),
                }
            }
        }
    }

    /// Request `idx` waits for pending exception `p` to change (commit or job end).
    fn block_on(&mut self, idx: u32, p: u32) {
        let generation = self.pending[p as usize].generation;
        let r = &mut self.reqs[idx as usize];
        r.blocked_on = p;
        r.blocked_gen = generation;
    }

    fn issue_whole(&mut self, idx: u32, dev: Device, op: IoOp, data: bool) -> bool {
        let r = self.reqs[idx as usize].req;
        let (sector, sectors, buffer) = if data {
            (
                r.sector,
                r.sectors,
                IoBuffer::Caller {
                    tag: r.tag,
                    byte_offset: 0,
                },
            )
        } else {
            (0, 0, IoBuffer::None)
        };
        if !self.emit(
            IoCtx::Request {
                req: idx,
                origin_read: false,
            },
            dev,
            op,
            sector,
            sectors,
            buffer,
        ) {
            return false;
        }
        let slot = &mut self.reqs[idx as usize];
        slot.ios += 1;
        slot.phase = ReqPhase::Issued;
        true
    }

    /// Whether origin sectors `[start, end)` are safe in every tracking snapshot: `(clear,
    /// need_alloc, blocked)` — clear when each chunk is in the table (or, with the test-only
    /// `unsafe_release_before_commit`, copied); `need_alloc` when some chunk has no exception
    /// yet; `blocked` the first pending exception still to commit (NIL if none).
    pub(super) fn copies_of(&self, start: u64, end: u64) -> (bool, bool, u32) {
        let mut clear = true;
        let mut need_alloc = false;
        let mut blocked = NIL;
        for s in 0..self.snaps.len() {
            if !self.tracking(s) {
                continue;
            }
            let Some(x) = self.snaps[s].as_ref() else {
                continue;
            };
            let cs = x.store.chunk_sectors();
            for c in start / cs..=(end - 1) / cs {
                if x.table.lookup(c).is_some() {
                    continue;
                }
                match self.pending_of(s, c) {
                    Some(p) => {
                        let st = self.pending[p as usize].state;
                        if !(self.cfg.unsafe_release_before_commit
                            && matches!(st, PState::Copied | PState::Committing))
                        {
                            clear = false;
                            if blocked == NIL {
                                blocked = p;
                            }
                        }
                    }
                    None => {
                        clear = false;
                        need_alloc = true;
                    }
                }
            }
        }
        (clear, need_alloc, blocked)
    }

    fn advance_origin_write(&mut self, idx: u32, fua: bool) -> bool {
        let r = self.reqs[idx as usize];
        if !r.admitted {
            if self.quiescing {
                return false;
            }
            self.reqs[idx as usize].admitted = true;
            self.origin_writes_active += 1;
            self.stats.origin_writes += 1;
        }
        let start = r.req.sector;
        let end = start + u64::from(r.req.sectors);
        match self.stuck_guard(idx, start, end) {
            Some(true) => return false,
            Some(false) => {
                self.stats.origin_writes_refused += 1;
                self.fail_request(idx, VolumeError::Io);
                return true;
            }
            None => {}
        }
        let (clear, need_alloc, blocked) = self.copies_of(start, end);
        if !need_alloc && blocked != NIL {
            self.block_on(idx, blocked);
        }
        if need_alloc || !clear {
            if r.held_since.is_none() {
                self.stats.held_writes += 1;
                self.reqs[idx as usize].held_since = Some(self.now);
            }
            if need_alloc {
                self.plan_origin_copies(start, end);
            }
            return false;
        }
        // An invalidated store's header must be durable before the write it gave up on goes
        // down, or a crash could leave a valid-looking store missing that chunk's copy.
        if self.snaps.iter().flatten().any(|x| {
            (!x.valid && (x.header_phase != HeaderPhase::None || x.meta_inflight))
                || x.state == SnapState::Deleting
        }) {
            return false;
        }
        if self.origin_reads_redirected > 0 && self.conflicts_with_redirected_read(start, end) {
            return false;
        }
        let issued = self.issue_whole(idx, Device::Origin, IoOp::Write { fua }, true);
        if issued {
            self.origin_writes_issued += 1;
            self.reqs[idx as usize].counted_issue = true;
            if let Some(since) = self.reqs[idx as usize].held_since.take() {
                self.stats.hold_ticks.record(self.now.saturating_sub(since));
            }
        }
        issued
    }

    /// The fail-safe for snapshots whose invalidation is not durable (the header write or
    /// flush that marks the store invalid failed, so the store may still load as valid and
    /// would then read whatever the origin holds for every chunk it has no copy of). `None`
    /// when origin write `idx` over `[start, end)` touches no such chunk; else `Some(true)`
    /// to wait for a retry of the header write (started here when the last attempt ended at
    /// least `invalidation_retry_ticks` ago), `Some(false)` to fail the write with an I/O
    /// error: an attempt failed since the write first got here, or none is due.
    pub(super) fn stuck_guard(&mut self, idx: u32, start: u64, end: u64) -> Option<bool> {
        let (exposed, retrying) = self.stuck_exposed(start, end);
        if !exposed {
            return None;
        }
        let failures = self.invalidation_failures;
        let mark = *self.reqs[idx as usize].stuck_mark.get_or_insert(failures);
        if failures > mark {
            return Some(false);
        }
        if retrying {
            return Some(true);
        }
        Some(self.retry_invalidation())
    }

    /// Starts another attempt at the header write of every snapshot whose invalidation is not
    /// durable and whose last attempt ended `invalidation_retry_ticks` ago or more. Whether
    /// one started.
    pub(super) fn retry_invalidation(&mut self) -> bool {
        let due = self
            .now
            .checked_sub(self.cfg.invalidation_retry_ticks.max(1));
        let mut started = false;
        for x in self.snaps.iter_mut().flatten() {
            if x.invalidation_stuck
                && x.state == SnapState::Active
                && x.header_phase == HeaderPhase::None
                && !x.meta_inflight
                && due.is_some_and(|d| x.invalidation_attempt_end <= d)
            {
                x.header_phase = HeaderPhase::Write;
                started = true;
            }
        }
        if started {
            self.dirty = true;
            self.progress += 1;
        }
        started
    }

    /// Whether overwriting origin sectors `[start, end)` would change what a snapshot whose
    /// invalidation is not durable reads (a chunk its store has no copy of), and whether a
    /// header write of such a snapshot is in flight.
    pub(super) fn stuck_exposed(&self, start: u64, end: u64) -> (bool, bool) {
        let mut exposed = false;
        let mut retrying = false;
        for x in self.snaps.iter().flatten() {
            if !x.invalidation_stuck || x.state != SnapState::Active {
                continue;
            }
            let cs = x.store.chunk_sectors();
            if (start / cs..=(end - 1) / cs).all(|c| x.table.lookup(c).is_some()) {
                continue;
            }
            exposed = true;
            retrying |= x.header_phase != HeaderPhase::None || x.meta_inflight;
        }
        (exposed, retrying)
    }

    fn conflicts_with_redirected_read(&self, start: u64, end: u64) -> bool {
        self.reqs.iter().any(|r| {
            r.origin_reads > 0
                && r.req.sector < end
                && start < r.req.sector + u64::from(r.req.sectors)
        })
    }

    /// Creates copy jobs for every uncopied chunk of `[start, end)`, one per aligned window
    /// of `copy_buffer_sectors`, as far as the pools allow.
    fn plan_origin_copies(&mut self, start: u64, end: u64) {
        let w = u64::from(self.cfg.copy_buffer_sectors);
        let mut win = start / w * w;
        while win < end {
            let lo = start.max(win);
            let hi = end.min(win + w);
            if !self.plan_window(lo, hi) {
                return;
            }
            win += w;
        }
    }

    /// Plans one job for `[lo, hi)` (inside one window). Returns false when out of resources.
    fn plan_window(&mut self, lo: u64, hi: u64) -> bool {
        let nsnaps = self.snaps.len();
        // Pass 1: count what is needed.
        let mut total = 0u64;
        for s in 0..nsnaps {
            if !self.tracking(s) {
                continue;
            }
            let n = self.count_needed(s, lo, hi);
            if n > 0 && self.reserve(s, n) {
                total += n;
            }
        }
        if total == 0 {
            return true;
        }
        if self.free_pending.is_empty() {
            self.starved = true;
            return false;
        }
        let Some(j) = self.new_job(true) else {
            self.starved = true;
            return false;
        };
        // Pass 2: allocate in (snapshot, chunk) order, link into the job, as far as the pool
        // of pending exceptions allows (the rest waits for a later job).
        let mut complete = true;
        let mut read_lo = u64::MAX;
        let mut read_hi = 0u64;
        for s in 0..nsnaps {
            if !self.tracking(s) {
                continue;
            }
            let Some(x) = self.snaps[s].as_ref() else {
                continue;
            };
            let cs = x.store.chunk_sectors();
            for c in lo / cs..=(hi - 1) / cs {
                let has = self.snaps[s]
                    .as_ref()
                    .is_some_and(|x| x.table.lookup(c).is_some());
                if has || self.pending_of(s, c).is_some() {
                    continue;
                }
                if self.free_pending.is_empty() {
                    self.starved = true;
                    complete = false;
                    break;
                }
                let Some(p) = self.alloc_pending(s, c) else {
                    continue;
                };
                self.link(j, p);
                read_lo = read_lo.min(c * cs);
                read_hi = read_hi.max(((c + 1) * cs).min(self.cfg.origin_sectors));
            }
            self.check_usage(s);
        }
        if read_lo >= read_hi {
            // Nothing allocated after all.
            self.jobs[j as usize].phase = JobPhase::Writing;
            self.maybe_finish_job(j);
            return true;
        }
        let job = &mut self.jobs[j as usize];
        job.read_start = read_lo;
        job.read_sectors = (read_hi - read_lo) as u32;
        job.phase = JobPhase::NeedRead;
        self.queue_job(j);
        self.progress += 1;
        complete
    }

    fn count_needed(&self, s: usize, lo: u64, hi: u64) -> u64 {
        let Some(x) = self.snaps[s].as_ref() else {
            return 0;
        };
        let cs = x.store.chunk_sectors();
        let mut n = 0;
        for c in lo / cs..=(hi - 1) / cs {
            if x.table.lookup(c).is_none() && self.pending_of(s, c).is_none() {
                n += 1;
            }
        }
        n
    }

    fn advance_snapshot_read(&mut self, idx: u32, s: usize) -> bool {
        let r = self.reqs[idx as usize];
        let end = r.req.sector + u64::from(r.req.sectors);
        let sid = SnapId(s as u16);
        let mut cursor = r.cursor;
        while cursor < end {
            // Map [cursor, piece_end) and extend while the mapping stays contiguous.
            let (dev, target, mut piece_end) = self.map_snapshot_sector(s, cursor, end);
            while piece_end < end {
                let (d2, t2, e2) = self.map_snapshot_sector(s, piece_end, end);
                if d2 != dev || t2 != target + (piece_end - cursor) {
                    break;
                }
                piece_end = e2;
            }
            let origin_read = dev == Device::Origin;
            let device = if origin_read {
                Device::Origin
            } else {
                Device::Cow(sid)
            };
            let buffer = IoBuffer::Caller {
                tag: r.req.tag,
                byte_offset: (cursor - r.req.sector) * SECTOR_BYTES as u64,
            };
            let ctx = IoCtx::Request {
                req: idx,
                origin_read,
            };
            if !self.emit(
                ctx,
                device,
                IoOp::Read,
                target,
                (piece_end - cursor) as u32,
                buffer,
            ) {
                self.reqs[idx as usize].cursor = cursor;
                return false;
            }
            let slot = &mut self.reqs[idx as usize];
            slot.ios += 1;
            if origin_read {
                slot.origin_reads += 1;
                self.origin_reads_redirected += 1;
            }
            cursor = piece_end;
        }
        let slot = &mut self.reqs[idx as usize];
        slot.cursor = cursor;
        slot.phase = ReqPhase::Issued;
        true
    }

    /// Where sector `sector` of snapshot `s` lives: (device, target sector, end of its chunk
    /// piece within `end`).
    fn map_snapshot_sector(&self, s: usize, sector: u64, end: u64) -> (Device, u64, u64) {
        let Some(x) = self.snaps[s].as_ref() else {
            return (Device::Origin, sector, end);
        };
        let cs = x.store.chunk_sectors();
        let c = sector / cs;
        let off = sector - c * cs;
        let piece_end = ((c + 1) * cs).min(end);
        let new = x.table.lookup(c).or_else(|| {
            self.pending_of(s, c).and_then(|p| {
                let e = self.pending[p as usize];
                matches!(e.state, PState::Copied | PState::Committing).then_some(e.new)
            })
        });
        match new {
            Some(n) => (Device::Cow(SnapId(s as u16)), n * cs + off, piece_end),
            None => (Device::Origin, sector, piece_end),
        }
    }

    fn advance_snapshot_write(&mut self, idx: u32, s: usize, fua: bool) -> bool {
        let r = self.reqs[idx as usize];
        let end = r.req.sector + u64::from(r.req.sectors);
        let sid = SnapId(s as u16);
        let Some(cs) = self.snaps[s].as_ref().map(|x| x.store.chunk_sectors()) else {
            return false;
        };
        let mut cursor = r.cursor;
        while cursor < end {
            let c = cursor / cs;
            let piece_end = ((c + 1) * cs).min(end);
            let mapped = self.snaps[s].as_ref().and_then(|x| x.table.lookup(c));
            if let Some(new) = mapped {
                if self.reqs[idx as usize].overwrite_chunk == Some(c) {
                    // Our own data went down with the exception.
                    self.reqs[idx as usize].overwrite_chunk = None;
                    cursor = piece_end;
                    continue;
                }
                let buffer = IoBuffer::Caller {
                    tag: r.req.tag,
                    byte_offset: (cursor - r.req.sector) * SECTOR_BYTES as u64,
                };
                let target = new * cs + (cursor - c * cs);
                let ctx = IoCtx::Request {
                    req: idx,
                    origin_read: false,
                };
                if !self.emit(
                    ctx,
                    Device::Cow(sid),
                    IoOp::Write { fua },
                    target,
                    (piece_end - cursor) as u32,
                    buffer,
                ) {
                    break;
                }
                self.reqs[idx as usize].ios += 1;
                cursor = piece_end;
                continue;
            }
            if let Some(p) = self.pending_of(s, c) {
                self.block_on(idx, p);
                break;
            }
            // No exception yet: allocate one.
            if !self.reserve(s, 1) {
                self.reqs[idx as usize].cursor = cursor;
                self.fail_request(idx, VolumeError::SnapshotInvalid);
                return true;
            }
            if self.free_pending.is_empty() {
                self.starved = true;
                break;
            }
            let chunk_end = ((c + 1) * cs).min(self.cfg.origin_sectors);
            let whole = cursor == c * cs && piece_end == chunk_end;
            let Some(j) = self.new_job(!whole) else {
                self.starved = true;
                break;
            };
            let Some(p) = self.alloc_pending(s, c) else {
                // Cannot happen after `reserve`; give the job back.
                self.jobs[j as usize].phase = JobPhase::Writing;
                self.maybe_finish_job(j);
                break;
            };
            self.link(j, p);
            self.check_usage(s);
            let job = &mut self.jobs[j as usize];
            if whole {
                job.overwrite_req = idx;
                job.overwrite_offset = (cursor - r.req.sector) * SECTOR_BYTES as u64;
                job.phase = JobPhase::Writing;
                self.reqs[idx as usize].overwrite_chunk = Some(c);
            } else {
                job.read_start = c * cs;
                job.read_sectors = (chunk_end - c * cs) as u32;
                job.phase = JobPhase::NeedRead;
            }
            self.queue_job(j);
            self.progress += 1;
            break;
        }
        self.reqs[idx as usize].cursor = cursor;
        if cursor >= end {
            self.reqs[idx as usize].phase = ReqPhase::Issued;
            self.finish_if_done(idx);
            return true;
        }
        false
    }

    fn on_request_io(&mut self, idx: u32, origin_read: bool, ok: bool) {
        let r = self.reqs[idx as usize];
        if r.phase == ReqPhase::Free {
            return;
        }
        if let Volume::Snapshot(id) = r.req.volume {
            if !origin_read {
                self.io_done_on(id.0);
            }
        }
        let slot = &mut self.reqs[idx as usize];
        slot.ios -= 1;
        if origin_read {
            slot.origin_reads -= 1;
            self.origin_reads_redirected -= 1;
            self.epoch += 1;
        }
        if !ok && slot.failed.is_none() {
            slot.failed = Some(VolumeError::Io);
        }
        self.finish_if_done(idx);
    }
}
