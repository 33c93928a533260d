//! Snapshot merge: roll the origin back to a snapshot (Linux's `snapshot-merge` target,
//! `lvconvert --merge`), crash-safe at every step, with origin I/O online.
//!
//! A child module of [`crate::engine`] (it drives the engine's pools and helpers); the
//! engine only hooks it in at a few places: [`Engine::start_merge`], `attach_snapshot` (a
//! store whose merge marker is set resumes), the snapshot state `Merging` in the step loop,
//! origin requests while a merge runs, and the completions of its I/O.
//!
//! # Protocol (as `snapshot_merge_next_chunks()` / `merge_callback()` in Linux `dm-snap.c`
//! and `persistent_prepare_merge()` / `persistent_commit_merge()` in
//! `dm-snap-persistent.c`)
//! 0. Keep origin chunk 0 in the store: chunk 0's own exception if it has one, else copy
//!    it into the next free chunk (read, write, flush). This *saved chunk* holds chunk 0 of
//!    the merged view until the end; I/O to origin chunk 0 goes there.
//! 1. Write the *merge marker*, naming the saved chunk, into the header block (FUA, or
//!    write and flush) so a reboot resumes: see [`crate::format::encode_merge_marker`] for
//!    where it lives and why.
//! 2. Once every other snapshot holds origin chunk 0, write the *origin marker*
//!    ([`crate::format::OriginMarker`]) over the origin's first block and flush the origin.
//!    From here until chunk 0 is written back the origin is half-merged, and says so: a boot
//!    that finds it without its store keeps it read-only instead of serving the mixture.
//!    (A store with no free chunk for chunk 0 merges without this, and says so in
//!    [`MergeProgress::origin_marked`].)
//! 3. Take the newest record (highest index of the current area; when the area is used up,
//!    the previous area, read back from disk ahead of time: see *Pipeline*) and the records
//!    before it whose `old_chunk` *and* `new_chunk` are both consecutive: one run, at most
//!    one copy buffer long. Runs go through a *pipeline* in that order: up to [`MAX_RUNS`]
//!    of them (one copy buffer each, at most three quarters of the engine's) are between
//!    being taken and being on the origin at any time, and the runs on the origin are
//!    committed in order, several under one origin flush and one area write (Linux merges
//!    one run at a time, which pays both per 128 KiB; the invariant below is the same).
//! 4. A run's origin chunks are about to change: every *other* snapshot of the origin copies
//!    them first, exactly as for an origin write (Linux `origin_write_extent()`).
//! 5. Block I/O to the run's chunks (until its commit is durable) and wait for origin I/O
//!    already in flight on them.
//! 6. Read the run from the COW device into its copy buffer and, as soon as that read is
//!    back, write it to the origin (up to [`READS_IN_FLIGHT`] reads at once, the writes as
//!    they come); once the write is back, its buffer is free. Chunk 0 is not copied: its
//!    record is only dropped (the saved chunk keeps it).
//! 7. Commit, one at a time and in order, the runs at the head of the pipeline whose writes
//!    are all back (once half the window is, or nothing else is being copied): flush the
//!    origin and the COW device together; zero every area those runs used up (the writes
//!    together: FUA, or plain and then a flush); zero their records (the top of what the
//!    area of the last of them holds) in that area's image and write it with FUA (or write
//!    and flush): Linux's `REQ_PREFLUSH | REQ_FUA`. A crash among them leaves areas that end
//!    at a zeroed one (any of them): the loader stops there, and every record it no longer
//!    sees belongs to the commit, whose copies were durable first. Later runs are copied
//!    meanwhile; their records are below the commit's, so none of them is zeroed by it.
//! 8. Drop the commit's runs from the in-memory table, release the blocked I/O (it now goes
//!    to the origin); the next commit may start. Commits never overlap: an area written
//!    twice is written in order (a newer image never lands before an older one), and no run
//!    is released before every record of it is durably gone.
//! 9. Store empty (area 0 all zero): write the saved chunk back over origin chunk 0, all but
//!    its first block, flush, then the first block (which removes the origin marker), flush;
//!    I/O to chunk 0 waits from here to the end. Then wipe chunk 0 of the store (the
//!    header, binding and marker; a store whose binding names its region gets a free-extent
//!    marker there instead, as after a deletion, so boot discovery walks past it), free the
//!    slot, [`Event::MergeDone`].
//!
//! A crash anywhere is safe: a record still on disk means its COW chunk still holds the
//! snapshot's data (and any origin write redirected there), and copying it again gives the
//! same origin; a record gone means the copy was durable on the origin before the area write.
//! Writes to a run's chunks wait until its commit's area write is durable, so a repeated copy
//! never overwrites them. (The crash tests check this, and catch the broken orderings:
//! flushing before the copies are back, zeroing used-up areas before the origin flush,
//! releasing runs before their area write, overlapping commits.)
//!
//! # Pipeline
//! Runs are taken from the area images in *slots*: the store's current area (copied from
//! the area buffer when the merge starts) and the areas below it, read ahead newest first
//! as slots come free, so that a run that steps down an area finds it in memory (read when
//! needed, one at a time, they left the devices idle for a round trip per area: with 4 KiB
//! chunks a quarter of the merge's time). A slot is freed once its area is all taken and no
//! run of it is left uncommitted; a commit zeroes records in its area's slot in place and
//! writes it from there (the slot does not change until the write is back: runs are only
//! taken below, and the next commit waits). The areas below the current one are never
//! written during a merge, so what was read ahead is what is on disk. A read-ahead that
//! fails stops the merge when a run needs that area, as a failed area read did.
//!
//! While a commit flushes and writes its area, the runs after it are read and written, so
//! the devices do not idle during commits, nor between batches of copies.
//!
//! # I/O while merging
//! The origin volume shows the snapshot's contents plus new writes (the merged view):
//! a chunk still in the store is read from and written to its COW chunk; other chunks go to
//! the origin, and origin writes to those still copy into every other snapshot first (the
//! merging snapshot takes no new exceptions). I/O to the run being merged waits. The merging
//! snapshot's own volume is refused with [`VolumeError::Merging`]: as with Linux, where the
//! snapshot device goes away when the merge starts, the origin is the one view.
//!
//! # Errors
//! An I/O error of the merge stops it ([`Event::MergeFailed`], status `Merge failed`): the
//! store and its redirection stay, so I/O goes on and the data stays right; the marker stays
//! on disk, so the next attach (boot) resumes; it stops once the merge's other I/O is back. If
//! the failed I/O was a commit's zeroing or area write, what is on disk for its runs is
//! unknown, so I/O to those chunks fails until the store is attached again.
//!
//! # Memory
//! Nothing is allocated on the I/O path: the merge borrows the engine's copy buffers (one
//! per run in copy), its state and the pipeline's runs are fixed-size inline structs, and
//! its slots (at most [`MAX_AHEAD`] chunks: 128 KiB with 4 KiB chunks, two from 32 KiB
//! chunks on) are allocated by [`Engine::reserve_merge`], which the console command that
//! starts the merge calls, or when a merge is found at attach. A heap that cannot serve
//! them leaves one slot, the area buffer itself: runs are then taken an area at a time.

use super::*;
use crate::format::{encode_merge_marker, Binding, FreeExtent};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Found at attach time: redirect I/O but write nothing until
    /// [`Engine::resume_merge`] (every other store of the origin must be attached first, or
    /// the merge would overwrite origin chunks they have not copied).
    Held,
    /// Pick the COW chunk that keeps origin chunk 0 while the origin carries the origin
    /// marker: chunk 0's own exception if it has one, else the next free chunk (copied by
    /// the three phases below). Waits for origin I/O in flight on chunk 0.
    Save,
    /// Read origin chunk 0 into a copy buffer.
    SaveRead,
    /// Write it to the saved chunk.
    SaveWrite,
    /// Flush the COW device, so the saved chunk is durable before the marker names it.
    SaveFlush,
    /// Write the header block with the merge marker.
    Marker,
    /// Flush after the marker (COW device without FUA).
    MarkerFlush,
    /// Every other snapshot must hold origin chunk 0 before the marker overwrites it; wait
    /// for that and for origin I/O in flight on it.
    MarkClear,
    /// Write the origin marker over the origin's first block.
    OriginMark,
    /// Flush the origin: from here on a boot without the store finds the origin marked.
    OriginMarkFlush,
    /// The runs, newest first, through the pipeline (see *Pipeline* in the module doc):
    /// taken from the areas (read ahead), copied several at once, committed in order; when
    /// the store is empty, go on to restore chunk 0 or wipe.
    Runs,
    /// Store empty: write the saved chunk back to origin chunk 0. First wait until every
    /// other snapshot holds origin chunk 0 and no I/O to it is in flight (from here until
    /// the merge ends, I/O to chunk 0 waits).
    RestoreClear,
    /// Read the saved chunk into a copy buffer.
    RestoreRead,
    /// Write all of origin chunk 0 but its first block (which keeps the marker)...
    RestoreTail,
    /// ...flush...
    RestoreTailFlush,
    /// ...then the first block, and flush: the marker is gone only once chunk 0 is whole.
    RestoreHead,
    RestoreHeadFlush,
    /// Store empty (and origin chunk 0 back): wipe chunk 0 of the store.
    Wipe,
    WipeFlush,
    /// Free the slot once nothing is in flight on the COW device.
    Remove,
    /// Stopped on an error.
    Stopped,
}

/// Most runs in copy at once (taken and not yet copied), and so most copy buffers the merge
/// holds (at most three quarters of the engine's: see `merge_buffers`).
const MAX_RUNS: usize = 24;

/// Runs in the pipeline: taken from the areas and not yet committed.
const QUEUE: usize = 32;

/// Most copy reads in flight: later runs are read as earlier ones are written.
const READS_IN_FLIGHT: usize = 16;

/// Most metadata areas read ahead of the one runs are taken from (and held for commits).
const MAX_AHEAD: usize = 32;

/// The `run` of a read-ahead's I/O context: this bit and the slot.
const AHEAD_RUN: u16 = 0x8000;
/// The `run` of a commit's I/O context.
const COMMIT_RUN: u16 = 0x4000;

/// A read-ahead slot: the area it holds (or is reading), or free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Ahead {
    #[default]
    Free,
    Reading(u64),
    Ready(u64),
    /// Its read failed: the merge stops when it needs that area.
    Failed(u64),
}

/// Where a run of the pipeline is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Stage {
    /// Taken from its area; waits until every other snapshot holds its origin chunks.
    #[default]
    Taken,
    /// I/O to its chunks waits from here until its commit is durable; waits for origin I/O
    /// already in flight on them.
    Blocked,
    /// Drained: its read is to be emitted (a copy buffer and a read slot free).
    Ready,
    Reading,
    /// Read: its write is to be emitted.
    Write,
    Writing,
    /// On the origin (not durable until its commit's origin flush).
    Done,
}

/// A run of consecutive chunks (on the origin and on the COW device) in the pipeline.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct QRun {
    old: u64,
    new: u64,
    len: u64,
    /// The area its records are in, and how many records of it are below them (what that
    /// area keeps once the run is committed).
    area: u64,
    below: u64,
    stage: Stage,
    buffer: u32,
}

/// The runs in the pipeline, oldest (newest records) first: a ring.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Queue {
    runs: [QRun; QUEUE],
    head: usize,
    len: usize,
}

impl Queue {
    fn at(&self, i: usize) -> &QRun {
        &self.runs[(self.head + i) % QUEUE]
    }

    fn at_mut(&mut self, i: usize) -> &mut QRun {
        &mut self.runs[(self.head + i) % QUEUE]
    }

    fn holds(&self, i: usize, c: u64) -> bool {
        let r = self.at(i);
        c >= r.old && c < r.old + r.len
    }
}

/// Where the commit in flight is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum CPhase {
    #[default]
    Idle,
    /// Flush the origin and the COW device (together).
    Flush,
    /// Zero the areas the commit used up (together; FUA, or plain writes and then a flush).
    Zero,
    ZeroFlush,
    /// Write its area (FUA, or write and flush).
    Area,
    AreaFlush,
    /// (Negative control that flushes before the writes are back: its area is written, its
    /// runs' writes are not all back yet.)
    Finish,
    /// (Negative control that lets commits overlap: durable before the older commit, which
    /// holds the head of the pipeline; its runs are released, and leave the pipeline with
    /// the older's.)
    Done,
}

/// The commit in flight: the first `runs` runs of the queue, all on the origin.
#[derive(Clone, Copy, Debug, Default)]
struct Commit {
    phase: CPhase,
    ios: u32,
    /// I/Os of the phase emitted so far.
    emitted: u32,
    runs: usize,
    /// Its first run's place in the pipeline (0 but for the negative control that lets
    /// commits overlap), and its number (its I/O's context carries the parity).
    first: usize,
    seq: u16,
    /// The area it writes (its last run's), the records that area keeps, and how many
    /// areas above it were used up (zeroed).
    area: u64,
    below: u64,
    zero: u64,
    /// The read-ahead slot holding that area.
    slot: usize,
    /// (Negative control) its runs left the table before the area write.
    released: bool,
}

/// The state of the merge running on an origin.
#[derive(Clone, Copy, Debug)]
pub(super) struct Merge {
    snap: u16,
    phase: Phase,
    /// I/Os of the current phase in flight (phase `Runs`: copy reads and writes).
    ios: u32,
    /// An I/O failed (stop once the others are back).
    io_failed: bool,
    /// Stop with the commit's runs fenced (its metadata write failed).
    fence_on_stop: bool,
    failed: bool,
    total: u64,
    cs: u64,
    /// I/O to the commit's chunks fails: their state on disk is unknown after a failed area
    /// write (or the table could not drop them).
    fenced: bool,
    /// The wipe writes a free-extent marker (in the header buffer) instead of zeroes.
    wipe_marker: bool,
    /// The COW chunk keeping origin chunk 0 while the origin is marked (`None`: the merge
    /// runs without marking the origin, see [`Phase::Save`]). I/O to origin chunk 0 goes
    /// there, and the batches leave chunk 0 alone.
    saved: Option<u64>,
    /// The copy buffer of the save or restore phases.
    buffer: u32,
    /// Origin chunk 0 is being written back (I/O to it waits until the merge ends).
    restoring: bool,
    /// It was written back: the store can be wiped.
    restored: bool,
    /// [`Event::MergeStarted`] was reported.
    announced: bool,
    /// The areas from the one runs are taken from down, in the engine's `merge_ahead`
    /// (`ahead_slots` chunks): used in ring order from `ahead_head`, the highest area still
    /// needed (by the cursor or by a commit).
    ahead: [Ahead; MAX_AHEAD],
    ahead_slots: usize,
    ahead_head: usize,
    /// The next area to read ahead.
    ahead_next: Option<u64>,
    /// The cursor: the slot and area runs are taken from, and the records of that area not
    /// taken yet; `exhausted` once area 0 is all taken.
    cur_slot: usize,
    cur_area: u64,
    cur_top: u64,
    exhausted: bool,
    /// What is durable: the area the last commit wrote and the records it keeps.
    done_area: u64,
    done_below: u64,
    commit: Commit,
    /// (Negative control that lets commits overlap: the older commit, its area write in
    /// flight.)
    older: Commit,
    /// Commits started.
    commits: u16,
}

impl Merge {
    /// Where origin chunk `c` of the merged view lives now, given the store's table lookup.
    fn redirect(&self, c: u64, table: Option<u64>) -> Option<u64> {
        match self.saved {
            Some(s) if c == 0 => Some(s),
            _ => table,
        }
    }
}

impl Engine {
    /// Starts merging snapshot `snap` into the origin (roll the origin back to it). The origin
    /// must be quiesced (call [`resume_origin`](Self::resume_origin) right after); the
    /// snapshot must be valid with nothing in flight. From now on its own volume is refused
    /// ([`VolumeError::Merging`]) and the origin shows its contents.
    /// [`Event::MergeStarted`] once the marker is durable, [`Event::MergeDone`] when the store
    /// is empty and wiped (the slot is free then), [`Event::MergeFailed`] on an error.
    /// Progress: [`merge_progress`](Self::merge_progress).
    pub fn start_merge(&mut self, snap: SnapId) -> Result<(), MergeError> {
        if self.merge.is_some() {
            return Err(MergeError::AlreadyMerging);
        }
        let s = snap.0 as usize;
        let Some(Some(x)) = self.snaps.get(s) else {
            return Err(MergeError::NoSuchSnapshot);
        };
        if x.state != SnapState::Active {
            return Err(MergeError::NoSuchSnapshot);
        }
        if !x.valid || x.overflow {
            return Err(MergeError::SnapshotInvalid);
        }
        if !self.is_quiesced() {
            return Err(MergeError::NotQuiesced);
        }
        let busy = !x.order.is_empty()
            || x.batches.iter().any(Option::is_some)
            || x.meta_inflight
            || x.header_phase != HeaderPhase::None
            || x.inflight != 0
            || self
                .reqs
                .iter()
                .any(|r| r.phase != ReqPhase::Free && r.req.volume == Volume::Snapshot(snap));
        if busy {
            return Err(MergeError::Busy);
        }
        self.begin_merge(s, Phase::Save, None);
        Ok(())
    }

    /// Installs the merge of a store attached with its merge marker set, held until
    /// [`resume_merge`](Self::resume_merge).
    pub(super) fn hold_resumed_merge(&mut self, snap: SnapId, saved: Option<u64>) {
        self.begin_merge(snap.0 as usize, Phase::Held, saved);
    }

    /// Lets a merge found at attach time (its store carried the merge marker) run. Call it
    /// once every store of this origin is attached (at boot: after discovery): until then
    /// the origin is served through the merging store but nothing is merged, because the
    /// merge must first copy into every other snapshot the origin chunks it overwrites.
    /// Returns whether a merge was waiting. [`Event::MergeStarted`] (`resumed: true`).
    pub fn resume_merge(&mut self) -> bool {
        let Some(m) = self.merge.as_mut() else {
            return false;
        };
        if m.phase != Phase::Held {
            return false;
        }
        // Mark the origin again before merging anything (the marker may not have become
        // durable before the crash, or the merge may have restored chunk 0 already: writing
        // it again is harmless, the saved chunk still holds chunk 0). A store marked before
        // saved chunks existed gets one now.
        m.phase = if m.saved.is_some() {
            Phase::MarkClear
        } else {
            Phase::Save
        };
        m.announced = true;
        let snap = SnapId(m.snap);
        self.epoch += 1;
        self.dirty = true;
        self.push_event(Event::MergeStarted {
            snap,
            resumed: true,
        });
        true
    }

    /// Whether a merge is running (not held, not stopped): no other store may be attached
    /// then, since the origin already holds merged chunks that store never copied.
    pub(super) fn merge_running(&self) -> bool {
        self.merge.as_ref().is_some_and(|m| m.phase != Phase::Held)
    }

    /// Allocates the area slots a merge of `snap` will use (see [`start_merge`]): call it
    /// from the command that starts the merge, so that the merge job allocates nothing. The
    /// slots hold the area runs are taken from and the areas read ahead below it, one chunk
    /// each: enough for three windows of the longest runs (those in copy, those committing,
    /// and the next), at most 32 (4 KiB chunks: 32 areas of 256 records, 128 KiB; from 32
    /// KiB chunks on, two).
    ///
    /// [`start_merge`]: Self::start_merge
    pub fn reserve_merge(&mut self, snap: SnapId) {
        if self.merge.is_some() {
            return;
        }
        let Some(Some(x)) = self.snaps.get(snap.0 as usize) else {
            return;
        };
        let (want, cb) = merge_slots(&self.cfg, x);
        self.merge_ahead = Vec::new();
        self.merge_ahead = alloc_slots(want, cb);
    }

    fn begin_merge(&mut self, s: usize, phase: Phase, saved: Option<u64>) {
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        // The area runs are taken from first (the store's current one, copied from the area
        // buffer) and the areas below it, read ahead: see `reserve_merge`. Slots reserved by
        // the console command are used as they are (however many); otherwise (a merge found
        // at attach)
        // allocated now, never on the I/O path. A heap that cannot serve them leaves one
        // slot, the area buffer itself (the merging store takes no exceptions), and runs are
        // taken an area at a time.
        let (want, cb) = merge_slots(&self.cfg, x);
        let mut slots = core::mem::take(&mut self.merge_ahead);
        if slots.is_empty() || slots.iter().any(|v| v.len() != cb) {
            slots = alloc_slots(want, cb);
        }
        if let Some(top) = slots.first_mut() {
            top.copy_from_slice(&x.store.area);
        } else if slots.try_reserve_exact(1).is_ok() {
            slots.push(core::mem::take(&mut x.store.area));
        }
        let ahead_slots = slots.len();
        self.merge_ahead = slots;
        self.merge_q = Queue::default();
        let mut ahead = [Ahead::Free; MAX_AHEAD];
        ahead[0] = Ahead::Ready(x.store.current_area);
        let ahead_next = x.store.current_area.checked_sub(1);
        let (cur_area, cur_top) = (x.store.current_area, x.store.committed_in_area);
        x.state = SnapState::Merging;
        self.merge = Some(Merge {
            snap: s as u16,
            phase,
            ios: 0,
            io_failed: ahead_slots == 0,
            fence_on_stop: false,
            failed: false,
            total: x.table.len(),
            cs: x.store.chunk_sectors(),
            fenced: false,
            wipe_marker: false,
            saved,
            buffer: NIL,
            restoring: false,
            restored: false,
            announced: false,
            ahead,
            ahead_slots,
            ahead_head: 0,
            ahead_next,
            cur_slot: 0,
            cur_area,
            cur_top,
            exhausted: cur_area == 0 && cur_top == 0,
            done_area: cur_area,
            done_below: cur_top,
            commit: Commit::default(),
            older: Commit::default(),
            commits: 0,
        });
        self.epoch += 1;
        self.dirty = true;
    }

    /// How far the running merge is, if one runs (or stopped with an error) on this origin.
    pub fn merge_progress(&self) -> Option<MergeProgress> {
        let m = self.merge.as_ref()?;
        let x = self.snaps.get(m.snap as usize)?.as_ref()?;
        Some(MergeProgress {
            snap: SnapId(m.snap),
            chunks_total: m.total,
            chunks_left: x.table.len(),
            chunk_sectors: x.store.geometry.chunk_sectors,
            failed: m.failed,
            origin_marked: m.saved.is_some(),
        })
    }

    pub(super) fn merge_failed(&self, snap: SnapId) -> bool {
        self.merge
            .as_ref()
            .is_some_and(|m| m.failed && m.snap == snap.0)
    }

    pub(super) fn merge_is_idle(&self) -> bool {
        self.merge.as_ref().is_none_or(|m| m.failed)
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(m) = self.merge.as_mut() {
            m.phase = phase;
        }
        // Waiting origin requests may depend on it (the marker, the run blocked or not).
        self.epoch += 1;
        self.progress += 1;
    }

    /// What a run copies: origin sectors `[start, end)` from COW sector `cow`; `None` if
    /// nothing (a run of chunk 0 alone while the saved chunk holds it: its record is only
    /// dropped, and the saved chunk goes back to the origin when the store is empty).
    fn copy_range(&self, m: &Merge, r: &QRun) -> Option<(u64, u64, u64)> {
        let cs = m.cs;
        let skip = u64::from(r.old == 0 && m.saved.is_some());
        let start = (r.old + skip) * cs;
        let end = ((r.old + r.len) * cs).min(self.cfg.origin_sectors);
        (start < end).then_some((start, end, (r.new + skip) * cs))
    }

    /// The end of origin chunk 0 (the origin may be smaller than a chunk).
    fn chunk0_end(&self, m: &Merge) -> u64 {
        m.cs.min(self.cfg.origin_sectors)
    }

    /// Whether an origin request has I/O in flight on origin sectors `[start, end)`.
    fn origin_io_on(&self, start: u64, end: u64) -> bool {
        self.reqs.iter().any(|r| {
            r.phase != ReqPhase::Free
                && r.req.volume == Volume::Origin
                && r.ios > 0
                && r.req.sector < end
                && start < r.req.sector + u64::from(r.req.sectors)
        })
    }

    /// Takes a copy buffer for the save or restore phases (false: none free yet).
    fn take_merge_buffer(&mut self) -> bool {
        if self.merge.is_some_and(|m| m.buffer != NIL) {
            return true;
        }
        let Some(b) = self.free_buffers.pop() else {
            return false;
        };
        if let Some(m) = self.merge.as_mut() {
            m.buffer = b;
        }
        true
    }

    /// The save phase: pick the chunk that keeps origin chunk 0 (see [`Phase::Save`]).
    fn choose_saved_chunk(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        let Some(x) = self.snaps[s].as_ref() else {
            return;
        };
        if self.cfg.unsafe_merge_unmarked || x.table.is_empty() {
            // (An empty store merges nothing: the origin never holds merged chunks.)
            self.set_phase(Phase::Marker);
            return;
        }
        if let Some(e) = x.table.lookup(0) {
            // Chunk 0 is in the store already: its COW chunk keeps it. The merging store takes
            // no new exceptions, so nothing reuses that chunk when its record is merged.
            if let Some(mm) = self.merge.as_mut() {
                mm.saved = Some(e);
            }
            self.set_phase(Phase::Marker);
            return;
        }
        let next = x.store.next_free;
        let fits = next
            .checked_add(1)
            .and_then(|n| n.checked_mul(m.cs))
            .is_some_and(|end| end <= x.store.cow_sectors);
        if !fits {
            // No chunk is free: merge without marking the origin (as before origins were
            // marked); the caller sees `origin_marked: false` and warns.
            self.set_phase(Phase::Marker);
            return;
        }
        let end = self.chunk0_end(&m);
        if self.origin_io_on(0, end) || !self.take_merge_buffer() {
            return;
        }
        if let Some(mm) = self.merge.as_mut() {
            mm.saved = Some(next);
        }
        self.set_phase(Phase::SaveRead);
    }

    /// Gives the save/restore copy buffer back.
    fn release_merge_buffer(&mut self) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        if m.buffer != NIL {
            self.free_buffers.push(m.buffer);
            m.buffer = NIL;
            self.wake_starved();
        }
    }

    /// One step of the merge of snapshot `s` (called from the engine's step loop).
    pub(super) fn step_merge(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        if m.snap as usize != s {
            return;
        }
        if m.phase == Phase::Runs {
            self.step_runs(s);
            return;
        }
        if m.ios > 0 {
            return;
        }
        let Some(x) = self.snaps[s].as_ref() else {
            return;
        };
        let sid = SnapId(m.snap);
        let cow = Device::Cow(sid);
        let fua = x.cow_fua;
        let g = x.store.geometry;
        let header_sectors = x.cow_block_sectors;
        let meta = |kind| IoBuffer::Meta { snap: sid, kind };
        let emitted = match m.phase {
            Phase::Stopped | Phase::Held | Phase::Runs => return,
            Phase::Save => {
                self.choose_saved_chunk(s);
                return;
            }
            Phase::MarkClear => {
                let bs = u64::from(self.cfg.origin_block_sectors.max(1)).min(self.chunk0_end(&m));
                if self.merge_range_clear(0, bs, None) && !self.origin_io_on(0, bs) {
                    self.set_phase(Phase::OriginMark);
                }
                return;
            }
            Phase::RestoreClear => {
                if let Some(mm) = self.merge.as_mut() {
                    mm.restoring = true;
                }
                let end = self.chunk0_end(&m);
                if self.merge_range_clear(0, end, None)
                    && !self.origin_io_on(0, end)
                    && self.take_merge_buffer()
                {
                    self.set_phase(Phase::RestoreRead);
                }
                return;
            }
            Phase::Remove => {
                if x.inflight == 0 {
                    self.snaps[s] = None;
                    self.merge = None;
                    self.merge_ahead = Vec::new();
                    self.epoch += 1;
                    self.progress += 1;
                    self.push_event(Event::MergeDone { snap: sid });
                }
                return;
            }
            Phase::SaveRead | Phase::SaveWrite | Phase::RestoreRead => {
                let end = self.chunk0_end(&m) as u32;
                let copy = IoBuffer::Copy {
                    index: m.buffer,
                    byte_offset: 0,
                };
                let saved = m.saved.unwrap_or(0) * m.cs;
                match m.phase {
                    Phase::SaveRead => self.emit_merge(0, Device::Origin, IoOp::Read, 0, end, copy),
                    Phase::SaveWrite => {
                        self.emit_merge(0, cow, IoOp::Write { fua: false }, saved, end, copy)
                    }
                    _ => self.emit_merge(0, cow, IoOp::Read, saved, end, copy),
                }
            }
            Phase::RestoreTail | Phase::RestoreHead => {
                let end = self.chunk0_end(&m);
                let bs = u64::from(self.cfg.origin_block_sectors.max(1)).min(end);
                let (start, stop) = if m.phase == Phase::RestoreTail {
                    (bs, end)
                } else {
                    (0, bs)
                };
                let copy = IoBuffer::Copy {
                    index: m.buffer,
                    byte_offset: start * SECTOR_BYTES as u64,
                };
                let op = IoOp::Write { fua: false };
                self.emit_merge(0, Device::Origin, op, start, (stop - start) as u32, copy)
            }
            Phase::OriginMark => {
                let saved = m.saved.unwrap_or(0);
                let cs = m.cs as u32;
                let bs = self.cfg.origin_block_sectors.max(1);
                if let Some(x) = self.snaps[s].as_mut() {
                    let mut label = x.merge_label;
                    label.saved_chunk = saved;
                    label.chunk_sectors = cs;
                    label.encode(&mut x.origin_mark);
                }
                self.emit_merge(
                    0,
                    Device::Origin,
                    IoOp::Write { fua: false },
                    0,
                    bs,
                    meta(MetaKind::OriginMark),
                )
            }
            Phase::OriginMarkFlush | Phase::RestoreTailFlush | Phase::RestoreHeadFlush => {
                self.emit_merge(0, Device::Origin, IoOp::Flush, 0, 0, IoBuffer::None)
            }
            Phase::Marker => {
                if let Some(x) = self.snaps[s].as_mut() {
                    encode_merge_marker(&mut x.header, m.saved);
                }
                self.emit_merge(
                    0,
                    cow,
                    IoOp::Write { fua },
                    0,
                    header_sectors,
                    meta(MetaKind::Header),
                )
            }
            Phase::MarkerFlush | Phase::SaveFlush | Phase::WipeFlush => {
                self.emit_merge(0, cow, IoOp::Flush, 0, 0, IoBuffer::None)
            }
            Phase::Wipe if m.wipe_marker => self.emit_merge(
                0,
                cow,
                IoOp::Write { fua },
                0,
                header_sectors,
                meta(MetaKind::Header),
            ),
            Phase::Wipe => self.emit_merge(
                0,
                cow,
                IoOp::Write { fua },
                0,
                g.chunk_sectors,
                IoBuffer::Zeroes,
            ),
        };
        if emitted {
            if let Some(m) = self.merge.as_mut() {
                m.ios += 1;
            }
        }
    }

    /// Emits a merge I/O of run `run` (copies; 0 otherwise).
    fn emit_merge(
        &mut self,
        run: usize,
        device: Device,
        op: IoOp,
        sector: u64,
        sectors: u32,
        buffer: IoBuffer,
    ) -> bool {
        let Some(m) = self.merge else {
            return false;
        };
        let ctx = IoCtx::Merge {
            snap: m.snap,
            run: run as u16,
            cow: matches!(device, Device::Cow(_)),
        };
        self.emit(ctx, device, op, sector, sectors, buffer)
    }

    /// Phase `Runs`: the pipeline. Takes runs from the areas (newest first), lets each
    /// through once every other snapshot holds its chunks, copies several at once (each
    /// write as soon as its read is back), and commits the runs on the origin in order, one
    /// commit at a time, while later runs copy. When the store is empty, goes on to restore
    /// chunk 0 or wipe.
    fn step_runs(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        if m.io_failed {
            // Stop once nothing of the merge is in flight (the copy buffers are lent).
            if m.ios == 0 && m.commit.ios == 0 {
                self.stop_merge(m.fence_on_stop);
            }
            return;
        }
        self.release_slots();
        self.read_ahead(s);
        self.take_runs(s);
        self.let_runs_through();
        self.issue_copies(s);
        self.step_commit(s);
        let Some(m) = self.merge else {
            return;
        };
        if m.phase == Phase::Runs
            && !m.io_failed
            && m.exhausted
            && self.merge_q.len == 0
            && m.commit.phase == CPhase::Idle
            && m.ios == 0
        {
            self.store_empty(s);
        }
    }

    /// Frees the slots of areas nothing needs any more: the cursor took all of them and no
    /// run of the pipeline (nor the commit in flight, whose runs are in it) is from them.
    fn release_slots(&mut self) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        let n = m.ahead_slots;
        if n == 0 {
            return;
        }
        loop {
            let h = m.ahead_head;
            let Ahead::Ready(a) = m.ahead[h] else {
                break;
            };
            let cursor_past = m.cur_area < a || (m.cur_area == a && m.cur_top == 0);
            let q = &self.merge_q;
            let queued = (0..q.len).any(|i| q.at(i).area == a);
            if !cursor_past || queued || m.exhausted {
                break;
            }
            m.ahead[h] = Ahead::Free;
            m.ahead_head = (h + 1) % n;
        }
    }

    /// Takes runs from the cursor's area into the pipeline while it has room and fewer than
    /// `MAX_RUNS` of its runs are not on the origin yet; steps down an area when one is
    /// taken whole (its slot read ahead).
    fn take_runs(&mut self, s: usize) {
        let max_runs = MAX_RUNS.min(self.merge_buffers());
        loop {
            let Some(m) = self.merge else {
                return;
            };
            if m.exhausted || m.io_failed {
                return;
            }
            let q = &self.merge_q;
            let open = (0..q.len).filter(|&i| q.at(i).stage != Stage::Done).count();
            if q.len >= QUEUE || open >= max_runs {
                return;
            }
            let Some(x) = self.snaps[s].as_ref() else {
                return;
            };
            let g = x.store.geometry;
            if m.cur_top == 0 {
                if m.cur_area == 0 {
                    if let Some(mm) = self.merge.as_mut() {
                        mm.exhausted = true;
                    }
                    return;
                }
                // Step down: the next slot in ring order holds the area below.
                let next = (m.cur_slot + 1) % m.ahead_slots;
                let below = m.cur_area - 1;
                match m.ahead[next] {
                    Ahead::Ready(a) if a == below => {
                        self.stats.merge_areas_read_ahead += 1;
                        if let Some(mm) = self.merge.as_mut() {
                            mm.cur_slot = next;
                            mm.cur_area = below;
                            mm.cur_top = g.exceptions_per_area;
                        }
                        continue;
                    }
                    Ahead::Failed(a) if a == below => {
                        if let Some(mm) = self.merge.as_mut() {
                            mm.io_failed = true;
                        }
                    }
                    // Not read yet, or its slot not free yet.
                    _ => {}
                }
                return;
            }
            let max_chunks = (u64::from(self.cfg.copy_buffer_sectors) / m.cs).max(1);
            let img = &self.merge_ahead[m.cur_slot];
            let record = |i: u64| Record::decode(img, i as usize);
            let top = m.cur_top;
            let ok_rec = |r: Option<Record>| {
                r.filter(|r| r.new_chunk != 0 && x.table.lookup(r.old_chunk) == Some(r.new_chunk))
            };
            let Some(last) = ok_rec(record(top - 1)) else {
                // The area does not match the table loaded from the same disk.
                if let Some(mm) = self.merge.as_mut() {
                    mm.io_failed = true;
                }
                return;
            };
            let mut n = 1u64;
            while n < top && n < max_chunks && n <= last.old_chunk && n < last.new_chunk {
                let Some(r) = ok_rec(record(top - 1 - n)) else {
                    break;
                };
                if r.old_chunk != last.old_chunk - n || r.new_chunk != last.new_chunk - n {
                    break;
                }
                n += 1;
            }
            let run = QRun {
                old: last.old_chunk + 1 - n,
                new: last.new_chunk + 1 - n,
                len: n,
                area: m.cur_area,
                below: top - n,
                stage: Stage::Taken,
                buffer: NIL,
            };
            let q = &mut self.merge_q;
            *q.at_mut(q.len) = run;
            q.len += 1;
            if let Some(mm) = self.merge.as_mut() {
                mm.cur_top = top - n;
            }
        }
    }

    /// Lets taken runs through, in order, once every other snapshot holds their origin
    /// chunks (asked for every taken run, so that their copies are planned together): from
    /// then on I/O to them waits.
    fn let_runs_through(&mut self) {
        let Some(m) = self.merge else {
            return;
        };
        let mut prefix = true;
        let mut changed = false;
        for i in 0..self.merge_q.len {
            let r = *self.merge_q.at(i);
            if r.stage != Stage::Taken {
                continue;
            }
            let clear = match self.copy_range(&m, &r) {
                Some((start, end, _)) => self.merge_range_clear(start, end, None),
                None => true,
            };
            prefix &= clear;
            if prefix {
                self.merge_q.at_mut(i).stage = Stage::Blocked;
                changed = true;
            }
        }
        if changed {
            // Requests to those chunks wait from now on.
            self.epoch += 1;
        }
    }

    /// Emits the copies: a blocked run's read once origin I/O in flight on it is back and a
    /// copy buffer is free (three quarters of them at most; `READS_IN_FLIGHT` reads at
    /// once), its write as soon as the read is back.
    fn issue_copies(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        let sid = SnapId(m.snap);
        let cs = m.cs;
        let spare = self.merge_buffers();
        let q = &self.merge_q;
        let mut reading = (0..q.len)
            .filter(|&i| q.at(i).stage == Stage::Reading)
            .count();
        let mut held = (0..q.len).filter(|&i| q.at(i).buffer != NIL).count();
        for i in 0..self.merge_q.len {
            let r = *self.merge_q.at(i);
            match r.stage {
                Stage::Blocked => {
                    let (start, end) = (r.old * cs, (r.old + r.len) * cs);
                    if !self.origin_io_on(start, end) {
                        self.merge_q.at_mut(i).stage = if self.copy_range(&m, &r).is_some() {
                            Stage::Ready
                        } else {
                            // Chunk 0 alone, kept in the saved chunk: nothing to copy.
                            Stage::Done
                        };
                        self.progress += 1;
                    }
                }
                Stage::Ready if reading < READS_IN_FLIGHT && held < spare => {
                    let Some((_, _, cow_start)) = self.copy_range(&m, &r) else {
                        continue;
                    };
                    let Some(b) = self.free_buffers.pop() else {
                        break;
                    };
                    let (start, end, _) = self.copy_range(&m, &r).unwrap_or_default();
                    let copy = IoBuffer::Copy {
                        index: b,
                        byte_offset: 0,
                    };
                    let sectors = (end - start) as u32;
                    let run = (self.merge_q.head + i) % QUEUE;
                    if !self.emit_merge(run, Device::Cow(sid), IoOp::Read, cow_start, sectors, copy)
                    {
                        self.free_buffers.push(b);
                        break;
                    }
                    let qr = self.merge_q.at_mut(i);
                    qr.stage = Stage::Reading;
                    qr.buffer = b;
                    reading += 1;
                    held += 1;
                    if let Some(mm) = self.merge.as_mut() {
                        mm.ios += 1;
                    }
                }
                Stage::Write => {
                    let Some((start, end, _)) = self.copy_range(&m, &r) else {
                        continue;
                    };
                    let copy = IoBuffer::Copy {
                        index: r.buffer,
                        byte_offset: 0,
                    };
                    let op = IoOp::Write { fua: false };
                    let run = (self.merge_q.head + i) % QUEUE;
                    if !self.emit_merge(run, Device::Origin, op, start, (end - start) as u32, copy)
                    {
                        break;
                    }
                    self.merge_q.at_mut(i).stage = Stage::Writing;
                    if let Some(mm) = self.merge.as_mut() {
                        mm.ios += 1;
                    }
                }
                _ => {}
            }
        }
        let _ = s;
    }

    /// The commit: the runs at the head of the pipeline that are on the origin, in order, one
    /// commit at a time. Origin and COW flush, then the areas those runs used up are zeroed
    /// and the area of the last of them is written with their records zeroed (Linux's
    /// `persistent_commit_merge()`, for several runs). It starts when half the window is on
    /// the origin, or when nothing else is being copied.
    fn step_commit(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        let Some(x) = self.snaps[s].as_ref() else {
            return;
        };
        let fua = x.cow_fua;
        let g = x.store.geometry;
        let sid = SnapId(m.snap);
        let cow = Device::Cow(sid);
        let mut c = m.commit;
        let mut m = m;
        if self.cfg.unsafe_merge_commits_unordered
            && fua
            && c.phase == CPhase::Area
            && c.emitted == 1
            && m.older.phase == CPhase::Idle
        {
            // (The negative control starts the next commit while this one's area write is in
            // flight, as if it were durable.)
            m.older = c;
            m.done_area = c.area;
            m.done_below = c.below;
            c = Commit::default();
            if let Some(mm) = self.merge.as_mut() {
                mm.older = m.older;
                mm.done_area = m.done_area;
                mm.done_below = m.done_below;
                mm.commit = c;
            }
        }
        if c.phase == CPhase::Idle {
            // (The negative control also takes runs whose writes are only issued.)
            let early = self.cfg.unsafe_merge_flush_early;
            let q = &self.merge_q;
            let first = if m.older.phase != CPhase::Idle {
                m.older.first + m.older.runs
            } else {
                0
            };
            let on_origin = |st: Stage| st == Stage::Done || (early && st == Stage::Writing);
            let mut k = (first..q.len)
                .take_while(|&i| on_origin(q.at(i).stage))
                .count();
            if self.cfg.unsafe_merge_commits_unordered {
                // (The control commits a run at a time, so that the next commit has runs.)
                k = k.min(1);
            }
            if k == 0 {
                return;
            }
            let copying = (0..q.len).any(|i| {
                matches!(
                    q.at(i).stage,
                    Stage::Ready | Stage::Reading | Stage::Write | Stage::Writing
                )
            });
            let window = MAX_RUNS.min(self.merge_buffers());
            let eager = early || self.cfg.unsafe_merge_commits_unordered;
            if copying && k < (window / 2).max(1) && !eager {
                return;
            }
            let last = *q.at(first + k - 1);
            let Some(slot) = (0..m.ahead_slots).find(|&i| m.ahead[i] == Ahead::Ready(last.area))
            else {
                if let Some(mm) = self.merge.as_mut() {
                    mm.io_failed = true;
                }
                return;
            };
            c = Commit {
                phase: if self.cfg.unsafe_merge_zero_areas_early && m.done_area > last.area {
                    CPhase::Zero
                } else {
                    CPhase::Flush
                },
                ios: 0,
                emitted: 0,
                runs: k,
                first,
                seq: m.commits,
                area: last.area,
                below: last.below,
                zero: m.done_area - last.area,
                slot,
                released: false,
            };
            self.stats.merge_batches += 1;
            if let Some(mm) = self.merge.as_mut() {
                mm.commits = mm.commits.wrapping_add(1);
            }
        }
        let run = COMMIT_RUN | (c.seq & 1);
        let ctx = IoCtx::Merge {
            snap: m.snap,
            run,
            cow: true,
        };
        match c.phase {
            CPhase::Idle | CPhase::Done => {}
            CPhase::Finish => {
                // (Negative control: the area is written; its runs' writes are not all back.)
                let q = &self.merge_q;
                if (c.first..c.first + c.runs).all(|i| q.at(i).stage == Stage::Done) {
                    self.finish_commit(s, c);
                    return;
                }
            }
            CPhase::Flush => {
                // The origin and the COW device together (only the COW device for the
                // negative control that skips the origin flush).
                let skip = self.cfg.unsafe_merge_skip_origin_flush;
                while c.emitted < 2 {
                    if c.emitted == 0 && skip {
                        c.emitted = 1;
                        continue;
                    }
                    let (dev, ctx) = if c.emitted == 0 {
                        (
                            Device::Origin,
                            IoCtx::Merge {
                                snap: m.snap,
                                run,
                                cow: false,
                            },
                        )
                    } else {
                        (cow, ctx)
                    };
                    if !self.emit(ctx, dev, IoOp::Flush, 0, 0, IoBuffer::None) {
                        break;
                    }
                    c.emitted += 1;
                    c.ios += 1;
                }
            }
            CPhase::Zero => {
                // Every used-up area at once (FUA writes, or plain writes that `ZeroFlush`
                // makes durable together).
                while (c.emitted as u64) < c.zero {
                    let area = c.area + 1 + u64::from(c.emitted);
                    let sector = g.chunk_sector(g.area_chunk(area));
                    let op = IoOp::Write { fua };
                    if !self.emit(ctx, cow, op, sector, g.chunk_sectors, IoBuffer::Zeroes) {
                        break;
                    }
                    c.emitted += 1;
                    c.ios += 1;
                }
            }
            CPhase::ZeroFlush | CPhase::AreaFlush => {
                if c.emitted == 0 && self.emit(ctx, cow, IoOp::Flush, 0, 0, IoBuffer::None) {
                    c.emitted = 1;
                    c.ios += 1;
                }
            }
            CPhase::Area => {
                if c.emitted == 0 {
                    // Zero the records of the commit's runs in that area (the top of what it
                    // holds on disk), then write it. Its slot does not change until the
                    // write is back: the cursor only reads below, and the next commit waits.
                    let top = if c.area == m.done_area {
                        m.done_below
                    } else {
                        g.exceptions_per_area
                    };
                    let img = &mut self.merge_ahead[c.slot];
                    for i in c.below..top {
                        Record {
                            old_chunk: 0,
                            new_chunk: 0,
                        }
                        .encode(img, i as usize);
                    }
                    let buffer = IoBuffer::Meta {
                        snap: sid,
                        kind: MetaKind::MergeArea(c.slot as u8),
                    };
                    let sector = g.chunk_sector(g.area_chunk(c.area));
                    if self.emit(
                        ctx,
                        cow,
                        IoOp::Write { fua },
                        sector,
                        g.chunk_sectors,
                        buffer,
                    ) {
                        c.emitted = 1;
                        c.ios += 1;
                    }
                }
            }
        }
        self.set_commit(c);
        if self.cfg.unsafe_merge_commits_unordered
            && fua
            && c.phase == CPhase::Area
            && c.emitted == 1
            && m.older.phase == CPhase::Idle
        {
            // (The negative control: the next commit at once, its area write in flight.)
            self.step_commit(s);
        }
    }

    fn set_commit(&mut self, c: Commit) {
        if let Some(m) = self.merge.as_mut() {
            m.commit = c;
        }
    }

    /// A commit I/O is back (`parity`: of its commit's number).
    fn on_merge_commit_io(&mut self, s: usize, origin_flush: bool, ok: bool, parity: u16) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        // (The older commit exists only under the negative control that lets them overlap.)
        let older = m.older.phase != CPhase::Idle && m.older.seq & 1 == parity;
        let mut c = if older { m.older } else { m.commit };
        c.ios = c.ios.saturating_sub(1);
        let put = |m: &mut Merge, c: Commit| {
            if older {
                m.older = c;
            } else {
                m.commit = c;
            }
        };
        if !ok {
            m.io_failed = true;
            // After a failed write of the commit's metadata, what is on disk for its records
            // is unknown: fence its runs.
            m.fence_on_stop |= matches!(
                c.phase,
                CPhase::Zero | CPhase::ZeroFlush | CPhase::Area | CPhase::AreaFlush
            );
            put(m, c);
            self.progress += 1;
            return;
        }
        if origin_flush && c.phase == CPhase::Flush && self.cfg.unsafe_merge_release_early {
            // (The negative control releases the runs as soon as the origin flush is back.)
            c.released = true;
            put(m, c);
            self.release_commit_runs(s, c.first, c.runs);
            self.epoch += 1;
        }
        let fua = self.snaps[s].as_ref().is_some_and(|x| x.cow_fua);
        let done = c.ios == 0
            && match c.phase {
                CPhase::Flush => c.emitted >= 2,
                CPhase::Zero => u64::from(c.emitted) >= c.zero,
                _ => true,
            };
        if done {
            let zero_early = self.cfg.unsafe_merge_zero_areas_early;
            let prev = c.phase;
            c.emitted = 0;
            c.phase = match c.phase {
                CPhase::Flush if c.zero > 0 && !zero_early => CPhase::Zero,
                CPhase::Flush => CPhase::Area,
                CPhase::Zero if !fua => CPhase::ZeroFlush,
                CPhase::Zero | CPhase::ZeroFlush if zero_early => CPhase::Flush,
                CPhase::Zero | CPhase::ZeroFlush => CPhase::Area,
                CPhase::Area if !fua => CPhase::AreaFlush,
                _ => CPhase::Idle,
            };
            if matches!((prev, fua), (CPhase::Zero, true) | (CPhase::ZeroFlush, _)) {
                self.stats.merge_areas_zeroed += c.zero;
            }
            let q = &self.merge_q;
            let writes_back = (c.first..c.first + c.runs).all(|i| q.at(i).stage == Stage::Done);
            if c.phase == CPhase::Idle && !writes_back {
                c.phase = CPhase::Finish;
            }
            if let Some(m) = self.merge.as_mut() {
                put(m, c);
            }
            if c.phase == CPhase::Idle {
                self.finish_commit(s, c);
            }
        } else if let Some(m) = self.merge.as_mut() {
            put(m, c);
        }
        self.progress += 1;
    }

    /// Drops runs `first..first + n` of the pipeline from the table: their records are
    /// (about to be) gone from disk.
    fn release_commit_runs(&mut self, s: usize, first: usize, n: usize) -> bool {
        let mut table_full = false;
        if let Some(x) = self.snaps[s].as_mut() {
            for i in first..first + n {
                let r = *self.merge_q.at(i);
                // Newest first: these come off the end of table runs.
                for k in (0..r.len).rev() {
                    table_full |= x.table.remove(r.old + k).is_err();
                }
            }
        }
        table_full
    }

    /// The commit's area write is durable: Linux `persistent_commit_merge()` +
    /// `remove_single_exception_chunk()` for its runs; I/O to them goes to the origin.
    fn finish_commit(&mut self, s: usize, c: Commit) {
        let table_full = if c.released {
            false
        } else {
            self.release_commit_runs(s, c.first, c.runs)
        };
        if c.first > 0 {
            // (Negative control: a newer commit durable before the older one, which holds
            // the head of the pipeline. Its runs are released; they leave with the older's.)
            if let Some(m) = self.merge.as_mut() {
                m.commit = Commit {
                    phase: CPhase::Done,
                    released: true,
                    ..c
                };
            }
            self.epoch += 1;
            self.progress += 1;
            return;
        }
        if let Some(x) = self.snaps[s].as_mut() {
            let g = x.store.geometry;
            x.store.current_area = c.area;
            x.store.committed_in_area = c.below;
            // What Linux reports as allocated from now on (only usage reads it).
            x.store.next_free = c.area * g.exceptions_per_area + c.below + 1;
        }
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        if m.older.phase == CPhase::Idle {
            m.done_area = c.area;
            m.done_below = c.below;
        }
        if table_full {
            // The records are gone on disk but the table could not split a run to drop
            // some chunks: fence the runs rather than redirect I/O to a freed COW chunk.
            m.commit = Commit {
                phase: CPhase::Idle,
                runs: c.runs,
                ..Commit::default()
            };
            m.older = Commit::default();
            m.io_failed = true;
            m.fence_on_stop = true;
        } else {
            let mut popped = c.runs;
            if m.older.phase != CPhase::Idle {
                // (Negative control: the older commit is done; the newer one moves up.)
                m.older = Commit::default();
                if m.commit.phase == CPhase::Done {
                    popped += m.commit.runs;
                    m.commit = Commit::default();
                } else if m.commit.phase != CPhase::Idle {
                    m.commit.first -= c.runs;
                }
            } else {
                m.commit = Commit::default();
            }
            let q = &mut self.merge_q;
            q.head = (q.head + popped) % QUEUE;
            q.len -= popped;
        }
        self.epoch += 1;
        self.progress += 1;
    }

    /// The store is empty (area 0 all zero): origin chunk 0 goes back first, then the store is
    /// wiped.
    fn store_empty(&mut self, s: usize) {
        let restore = self
            .merge
            .as_ref()
            .is_some_and(|m| m.saved.is_some() && !m.restored);
        if restore {
            self.set_phase(Phase::RestoreClear);
            return;
        }
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        // A store in a region of a device that holds several leaves a free-extent marker
        // where its header was (its binding gives the region), as a deletion does, so boot
        // discovery still walks past it to the stores after it; otherwise chunk 0 is zeroed.
        let marker = match Binding::decode(&x.header) {
            Ok(b) if b.region_sectors > 0 => Some(FreeExtent {
                start: b.region_start,
                sectors: b.region_sectors,
            }),
            _ => None,
        };
        if let Some(f) = marker {
            x.header.fill(0);
            f.encode(&mut x.header);
        }
        if let Some(m) = self.merge.as_mut() {
            m.wipe_marker = marker.is_some();
        }
        self.set_phase(Phase::Wipe);
    }

    /// The most copy buffers the merge holds: three quarters of the engine's (at least one
    /// left to origin writes' copies, when there are two).
    fn merge_buffers(&self) -> usize {
        let n = self.cfg.copy_buffers as usize;
        (n - (n / 4).max(1)).max(1)
    }

    /// Reads ahead the areas below the cursor's into free slots, newest first.
    fn read_ahead(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        if m.phase != Phase::Runs || m.ahead_slots == 0 {
            return;
        }
        let Some(x) = self.snaps[s].as_ref() else {
            return;
        };
        let g = x.store.geometry;
        let sid = SnapId(m.snap);
        let n = m.ahead_slots;
        let mut used = m.ahead[..n].iter().filter(|a| **a != Ahead::Free).count();
        let mut next = m.ahead_next;
        while used < n {
            let Some(area) = next else {
                break;
            };
            let slot = (m.ahead_head + used) % n;
            let buffer = IoBuffer::Meta {
                snap: sid,
                kind: MetaKind::MergeArea(slot as u8),
            };
            let sector = g.chunk_sector(g.area_chunk(area));
            let ctx = IoCtx::Merge {
                snap: m.snap,
                run: AHEAD_RUN | slot as u16,
                cow: true,
            };
            if !self.emit(
                ctx,
                Device::Cow(sid),
                IoOp::Read,
                sector,
                g.chunk_sectors,
                buffer,
            ) {
                break;
            }
            if let Some(mm) = self.merge.as_mut() {
                mm.ahead[slot] = Ahead::Reading(area);
            }
            used += 1;
            next = area.checked_sub(1);
        }
        if let Some(mm) = self.merge.as_mut() {
            mm.ahead_next = next;
        }
    }

    /// Completion of a read-ahead of slot `slot`.
    fn on_ahead_io(&mut self, sid: u16, slot: usize, ok: bool) {
        if let Some(m) = self.merge.as_mut() {
            if let Some(a) = m.ahead.get_mut(slot) {
                *a = match *a {
                    Ahead::Reading(area) if ok => Ahead::Ready(area),
                    Ahead::Reading(area) => Ahead::Failed(area),
                    other => other,
                };
            }
        }
        self.io_done_on(sid);
        self.progress += 1;
    }

    /// The bytes of slot `slot` of the merge of `snap`.
    pub(super) fn merge_ahead_bytes(&self, snap: SnapId, slot: u8) -> Option<&[u8]> {
        self.merge.as_ref().filter(|m| m.snap == snap.0)?;
        self.merge_ahead.get(usize::from(slot)).map(|v| &v[..])
    }

    pub(super) fn merge_ahead_bytes_mut(&mut self, snap: SnapId, slot: u8) -> Option<&mut [u8]> {
        self.merge.as_ref().filter(|m| m.snap == snap.0)?;
        self.merge_ahead
            .get_mut(usize::from(slot))
            .map(|v| &mut v[..])
    }

    /// Whether I/O to origin chunk `c` waits: it is in a run let through and not committed
    /// yet, or chunk 0 is being written back.
    pub(super) fn merge_blocks(&self, m: &Merge, c: u64) -> bool {
        if c == 0 && m.restoring {
            return true;
        }
        if m.failed {
            return false;
        }
        let released = |k: &Commit, i: usize| k.released && i >= k.first && i < k.first + k.runs;
        let q = &self.merge_q;
        (0..q.len).any(|i| {
            q.at(i).stage != Stage::Taken
                && !released(&m.commit, i)
                && !released(&m.older, i)
                && q.holds(i, c)
        })
    }

    /// Whether I/O to origin chunk `c` fails: it is in the runs of a commit whose metadata
    /// write failed.
    pub(super) fn merge_fences(&self, m: &Merge, c: u64) -> bool {
        let k = &m.commit;
        m.fenced
            && (k.first..(k.first + k.runs).min(self.merge_q.len)).any(|i| self.merge_q.holds(i, c))
    }

    /// Completion of a merge I/O (`run`: the pipeline's ring index of a copy, a commit's or a
    /// read-ahead's; 0 in the other phases).
    pub(super) fn on_merge_io(&mut self, sid: u16, run: u16, cow: bool, ok: bool) {
        if run & AHEAD_RUN != 0 {
            self.on_ahead_io(sid, usize::from(run & !AHEAD_RUN), ok);
            return;
        }
        if cow {
            self.io_done_on(sid);
        }
        if run & !1 == COMMIT_RUN {
            self.on_merge_commit_io(sid as usize, !cow, ok, run & 1);
            return;
        }
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        m.ios = m.ios.saturating_sub(1);
        let phase = m.phase;
        if phase == Phase::Runs {
            // A copy: its write is emitted next, or it is on the origin (its buffer free).
            m.io_failed |= !ok;
            let r = &mut self.merge_q.runs[usize::from(run) % QUEUE];
            let mut free = NIL;
            r.stage = match r.stage {
                Stage::Reading if ok => Stage::Write,
                _ => {
                    free = core::mem::replace(&mut r.buffer, NIL);
                    Stage::Done
                }
            };
            if !ok && r.stage == Stage::Done {
                // (Not on the origin: the merge stops before anything commits it.)
                r.stage = Stage::Taken;
            }
            if free != NIL {
                self.free_buffers.push(free);
                self.wake_starved();
            }
            self.progress += 1;
            return;
        }
        if !ok {
            self.release_merge_buffer();
            self.stop_merge(false);
            return;
        }
        let s = sid as usize;
        let fua = self.snaps[s].as_ref().is_some_and(|x| x.cow_fua);
        let saved = self.merge.as_ref().is_some_and(|m| m.saved.is_some());
        let next = match phase {
            Phase::SaveRead => Phase::SaveWrite,
            Phase::SaveWrite => Phase::SaveFlush,
            Phase::SaveFlush => {
                self.release_merge_buffer();
                Phase::Marker
            }
            Phase::Marker if !fua => Phase::MarkerFlush,
            Phase::Marker | Phase::MarkerFlush if saved => Phase::MarkClear,
            Phase::Marker | Phase::MarkerFlush | Phase::OriginMarkFlush => {
                self.announce_merge(sid);
                Phase::Runs
            }
            Phase::OriginMark => Phase::OriginMarkFlush,
            Phase::RestoreRead => {
                let whole = self.merge.as_ref().is_some_and(|m| {
                    let end = self.chunk0_end(m);
                    u64::from(self.cfg.origin_block_sectors.max(1)) >= end
                });
                if whole {
                    Phase::RestoreHead
                } else {
                    Phase::RestoreTail
                }
            }
            Phase::RestoreTail => Phase::RestoreTailFlush,
            Phase::RestoreTailFlush => Phase::RestoreHead,
            Phase::RestoreHead => Phase::RestoreHeadFlush,
            Phase::RestoreHeadFlush => {
                self.release_merge_buffer();
                if let Some(m) = self.merge.as_mut() {
                    m.restored = true;
                }
                Phase::Runs
            }
            Phase::Wipe if !fua => Phase::WipeFlush,
            Phase::Wipe | Phase::WipeFlush => Phase::Remove,
            other => other,
        };
        self.set_phase(next);
    }

    /// Reports [`Event::MergeStarted`] once (a resumed merge reported it when resumed).
    fn announce_merge(&mut self, sid: u16) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        if !m.announced {
            m.announced = true;
            self.push_event(Event::MergeStarted {
                snap: SnapId(sid),
                resumed: false,
            });
        }
    }

    /// Gives back the copy buffers the pipeline's runs hold (nothing of theirs in flight).
    fn release_merge_buffers(&mut self) {
        let mut any = false;
        for r in self.merge_q.runs.iter_mut() {
            if r.buffer != NIL {
                self.free_buffers.push(r.buffer);
                r.buffer = NIL;
                any = true;
            }
        }
        if any {
            // Requests that found no copy buffer look again.
            self.wake_starved();
        }
    }

    /// Stops the merge on an error: I/O goes on through the store's redirection.
    fn stop_merge(&mut self, fence: bool) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        m.failed = true;
        m.phase = Phase::Stopped;
        m.fenced = fence;
        // A failed restore leaves chunk 0 where it was: in the saved chunk.
        m.restoring = false;
        let snap = SnapId(m.snap);
        self.release_merge_buffers();
        self.release_merge_buffer();
        self.epoch += 1;
        self.progress += 1;
        self.push_event(Event::MergeFailed { snap });
    }

    /// Whether origin sectors `[start, end)` may be overwritten now: every other snapshot
    /// holds (durably) a copy of them. Plans the missing copies. The same rule as an origin
    /// write (`advance_origin_write`); a waiting request (`req`) is parked on the pending
    /// exception it waits for, as there.
    ///
    /// A snapshot whose invalidation is not durable and has no copy of the range holds the
    /// merge's own copies back, retrying its header write now and then, until a retry lands
    /// or it is deleted; an origin write there fails before this is asked (`stuck_guard`).
    fn merge_range_clear(&mut self, start: u64, end: u64, req: Option<u32>) -> bool {
        if self.stuck_exposed(start, end).0 {
            self.retry_invalidation();
            return false;
        }
        let (clear, need_alloc, blocked) = self.copies_of(start, end);
        if let Some(idx) = req {
            if !need_alloc && blocked != NIL {
                self.block_on(idx, blocked);
            }
        }
        if need_alloc {
            self.plan_origin_copies(start, end);
            return false;
        }
        if !clear {
            return false;
        }
        if self.snaps.iter().flatten().any(|x| {
            (!x.valid && (x.header_phase != HeaderPhase::None || x.meta_inflight))
                || x.state == SnapState::Deleting
        }) {
            return false;
        }
        !(self.origin_reads_redirected > 0 && self.conflicts_with_redirected_read(start, end))
    }

    /// An origin request while a merge runs (or stopped): chunks still in the merging store go
    /// to their COW chunk, the others to the origin (writes copying into the other snapshots
    /// first). Returns true when the request left the waiting state.
    pub(super) fn advance_origin_merging(&mut self, idx: u32) -> bool {
        let Some(m) = self.merge else {
            return false;
        };
        if matches!(
            m.phase,
            Phase::Save
                | Phase::SaveRead
                | Phase::SaveWrite
                | Phase::SaveFlush
                | Phase::Marker
                | Phase::MarkerFlush
        ) {
            // Until the marker is durable a crash brings back the unmerged store: a write
            // redirected into it now would be lost from the origin then (and chunk 0 is
            // being saved). From then on chunk 0 lives in the saved chunk, so I/O goes on
            // while the origin is marked.
            return false;
        }
        let r = self.reqs[idx as usize];
        let ms = m.snap as usize;
        let cow = Device::Cow(SnapId(m.snap));
        let origin_ctx = IoCtx::Request {
            req: idx,
            origin_read: false,
        };
        let cow_ctx = IoCtx::MergeRedirect {
            req: idx,
            snap: m.snap,
        };
        let (fua, write) = match r.req.op {
            VolumeOp::Flush => {
                // Redirected writes are on the COW device: flush both.
                if self.free_io.len() < 2 {
                    self.io_starved = true;
                    return false;
                }
                for (ctx, dev) in [(origin_ctx, Device::Origin), (cow_ctx, cow)] {
                    if self.emit(ctx, dev, IoOp::Flush, 0, 0, IoBuffer::None) {
                        self.reqs[idx as usize].ios += 1;
                    }
                }
                self.reqs[idx as usize].phase = ReqPhase::Issued;
                return true;
            }
            VolumeOp::Read => (false, false),
            VolumeOp::Write { fua } => (fua, true),
        };
        if write && !r.admitted {
            if self.quiescing {
                return false;
            }
            self.reqs[idx as usize].admitted = true;
            self.origin_writes_active += 1;
            self.stats.origin_writes += 1;
        }
        let cs = m.cs;
        let end = r.req.sector + u64::from(r.req.sectors);
        let mut cursor = r.cursor;
        while cursor < end {
            let c = cursor / cs;
            if self.merge_fences(&m, c) {
                self.reqs[idx as usize].cursor = cursor;
                self.fail_request(idx, VolumeError::Io);
                return true;
            }
            if self.merge_blocks(&m, c) {
                break;
            }
            let lookup = |e: &Engine, c: u64| {
                m.redirect(c, e.snaps[ms].as_ref().and_then(|x| x.table.lookup(c)))
            };
            let mapped = lookup(self, c);
            // Extend the piece while the mapping stays contiguous and nothing blocks.
            let mut piece_end = ((c + 1) * cs).min(end);
            while piece_end < end {
                let c2 = piece_end / cs;
                if self.merge_blocks(&m, c2) || self.merge_fences(&m, c2) {
                    break;
                }
                let next = lookup(self, c2);
                let contiguous = match (mapped, next) {
                    (Some(a), Some(b)) => b == a + (c2 - c),
                    (None, None) => true,
                    _ => false,
                };
                if !contiguous {
                    break;
                }
                piece_end = ((c2 + 1) * cs).min(end);
            }
            let len = (piece_end - cursor) as u32;
            let buffer = IoBuffer::Caller {
                tag: r.req.tag,
                byte_offset: (cursor - r.req.sector) * SECTOR_BYTES as u64,
            };
            let op = if write {
                IoOp::Write { fua }
            } else {
                IoOp::Read
            };
            let emitted = match mapped {
                Some(n) => {
                    let target = n * cs + (cursor - c * cs);
                    self.emit(cow_ctx, cow, op, target, len, buffer)
                }
                None => {
                    if write {
                        match self.stuck_guard(idx, cursor, piece_end) {
                            Some(true) => break,
                            Some(false) => {
                                self.stats.origin_writes_refused += 1;
                                self.reqs[idx as usize].cursor = cursor;
                                self.fail_request(idx, VolumeError::Io);
                                return true;
                            }
                            None => {}
                        }
                    }
                    if write && !self.merge_range_clear(cursor, piece_end, Some(idx)) {
                        break;
                    }
                    self.emit(origin_ctx, Device::Origin, op, cursor, len, buffer)
                }
            };
            if !emitted {
                break;
            }
            self.reqs[idx as usize].ios += 1;
            cursor = piece_end;
        }
        let slot = &mut self.reqs[idx as usize];
        slot.cursor = cursor;
        if cursor >= end {
            slot.phase = ReqPhase::Issued;
            return true;
        }
        false
    }
}

/// How many area slots a merge of this snapshot takes, and their size.
fn merge_slots(cfg: &EngineConfig, x: &Snap) -> (usize, usize) {
    let g = x.store.geometry;
    let max_chunks = (u64::from(cfg.copy_buffer_sectors) / u64::from(g.chunk_sectors)).max(1);
    let want = 1 + (3 * MAX_RUNS as u64 * max_chunks).div_ceil(g.exceptions_per_area);
    let want = want.min(MAX_AHEAD as u64).min(x.store.current_area + 1) as usize;
    (want, g.chunk_bytes())
}

/// Up to `n` zeroed slots of `bytes` each (fewer if the heap cannot serve them).
fn alloc_slots(n: usize, bytes: usize) -> Vec<Vec<u8>> {
    let mut slots: Vec<Vec<u8>> = Vec::new();
    if slots.try_reserve_exact(n).is_ok() {
        for _ in 0..n {
            let mut v = Vec::new();
            if v.try_reserve_exact(bytes).is_err() {
                break;
            }
            v.resize(bytes, 0);
            slots.push(v);
        }
    }
    slots
}
