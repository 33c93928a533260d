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
//!    the previous area, read back from disk ahead of time: see *Read-ahead*) and the records before it whose `old_chunk` *and*
//!    `new_chunk` are both consecutive: one run, at most one copy buffer long. snapfw takes
//!    up to [`MAX_RUNS`] such runs from the top of the area as one *batch* (one copy buffer
//!    each, at most three quarters of the engine's): Linux merges one run at a time, which
//!    pays an origin flush and an area write per 128 KiB; the invariant below is the same. A
//!    batch that uses up its area and has room for more runs goes on into the area below (read
//!    back into the area buffer): the used-up areas are zeroed at the commit (step 7).
//! 4. The batch's origin chunks are about to change: every *other* snapshot of the origin
//!    copies them first, exactly as for an origin write (Linux `origin_write_extent()`).
//! 5. Block I/O to the batch's chunks and wait for origin I/O already in flight on them.
//! 6. Read each run from the COW device into its copy buffer and, as soon as that read is
//!    back, write it to the origin (every run of the batch in flight at once); once every
//!    write is back, flush the origin. Chunk 0 is not copied: its record is only dropped
//!    (the saved chunk keeps it).
//! 7. Zero the batch's records (the top of the area) in the area image; flush the COW device
//!    (together with the origin flush of step 6), zero every area the batch used up (the
//!    writes together: FUA, or plain and then a flush), then write the area with FUA (or
//!    write + flush): Linux's `REQ_PREFLUSH | REQ_FUA`. A crash among them
//!    leaves areas that end at a zeroed one (any of them): the loader stops there, and every
//!    record it no longer sees belongs to the batch, whose copies were durable first; the
//!    area below is rewritten only once the areas above it are durably zero.
//! 8. Drop the batch from the in-memory table, release the blocked I/O (it now goes to the
//!    origin), next batch.
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
//! Writes to a batch's chunks wait until its area write is durable, so a repeated copy never
//! overwrites them. (The crash tests check this, and catch the two broken orderings.)
//!
//! # Read-ahead
//! The areas below the current one are read into read-ahead slots while the batches above
//! them are copied and committed, newest first, as slots come free: enough slots for two
//! batches of the longest runs (4 KiB chunks: 16 areas of 256 records; one from 64 KiB
//! chunks on). A batch that steps down to an area takes it from its slot instead of reading
//! it then (which left the devices idle for a round trip per area: with 4 KiB chunks a
//! quarter of the merge's time). The areas below the current one are never written during a
//! merge, so what was read ahead is what is on disk. A read-ahead that fails stops the merge
//! when a batch needs that area, as a failed area read did.
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
//! on disk, so the next attach (boot) resumes. If the failed I/O was the area write, what is on
//! disk for that batch is unknown, so I/O to those chunks fails until the store is attached
//! again.
//!
//! # Memory
//! Nothing is allocated on the I/O path: the merge borrows the engine's copy buffers (one
//! per run), its state is a small inline struct, and its read-ahead slots (at most
//! [`MAX_AHEAD`] chunks, 64 KiB with 4 KiB chunks, one chunk from 64 KiB chunks on) are
//! allocated when it starts or is found at attach; a heap that cannot serve them leaves it
//! reading each area into the snapshot's area buffer when it gets there.

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
    /// Pick the next batch of runs (or step back an area, or finish).
    Prepare,
    /// The previous metadata area into the area buffer: from its read-ahead slot (waiting
    /// for its read), or read now without read-ahead.
    ReadArea,
    /// Wait until every other snapshot holds the batch's origin chunks.
    Clear,
    /// The batch is blocked; wait for origin I/O in flight on it, and for copy buffers.
    Drain,
    /// Read each run from the COW device into its copy buffer and, as soon as that read is
    /// back, write it to the origin: every run's copy in flight at once.
    Copy,
    /// Flush the origin and the COW device (together).
    OriginFlush,
    /// Flush the COW device alone (only the negative control that skips the origin flush).
    CowFlush,
    /// A batch that used up newer areas: zero all of them (together; FUA, or plain writes
    /// and then a flush), so they are durably zero before the area below is rewritten.
    ZeroArea,
    ZeroFlush,
    AreaWrite,
    AreaFlush,
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

/// Most runs merged under one origin flush and one area write.
const MAX_RUNS: usize = 16;

/// Where a run's copy is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Copying {
    /// Its read is to be emitted.
    #[default]
    Read,
    Reading,
    /// Read: its write is to be emitted.
    Write,
    Writing,
    Done,
}

/// Most copy reads of a batch in flight: the later runs are read as earlier ones are
/// written, so reads and writes overlap instead of running as two waves.
const READS_IN_FLIGHT: usize = 4;

/// Most metadata areas read ahead of the one a batch is taken from.
const MAX_AHEAD: usize = 16;

/// The `run` of a read-ahead's I/O context: this bit and the slot.
const AHEAD_RUN: u16 = 0x8000;

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

/// Runs of consecutive chunks (on the origin and on the COW device).
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    old: u64,
    new: u64,
    len: u64,
}

/// The state of the merge running on an origin.
#[derive(Clone, Copy, Debug)]
pub(super) struct Merge {
    snap: u16,
    phase: Phase,
    /// I/Os of the current phase in flight.
    ios: u32,
    /// Runs of the current copy phase emitted so far.
    emitted: usize,
    /// An I/O of the current phase failed (stop once the others are back).
    io_failed: bool,
    failed: bool,
    total: u64,
    cs: u64,
    /// The batch: the newest records of the current area, newest run first.
    runs: [Run; MAX_RUNS],
    nruns: usize,
    /// Records the batch zeroes (the top of the current area).
    records: u64,
    /// Areas above the current one the batch used up: zeroed (newest first) before the
    /// current area is written. The batch's runs came from them first.
    zero_areas: u64,
    buffers: [u32; MAX_RUNS],
    /// Each run's copy (phase `Copy`).
    copying: [Copying; MAX_RUNS],
    /// I/O to the batch's chunks waits.
    active: bool,
    /// I/O to the batch's chunks fails: their state on disk is unknown after a failed area
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
    /// The read-ahead of the areas below the current one, in the engine's `merge_ahead`
    /// (`ahead_slots` chunks; none: each area is read when the batch reaches it). Slots are
    /// used in ring order from `ahead_head`, which holds the next area down.
    ahead: [Ahead; MAX_AHEAD],
    ahead_slots: usize,
    ahead_head: usize,
    /// The next area to read ahead.
    ahead_next: Option<u64>,
}

impl Merge {
    fn in_batch(&self, c: u64) -> bool {
        self.runs[..self.nruns]
            .iter()
            .any(|r| c >= r.old && c < r.old + r.len)
    }

    fn blocks(&self, c: u64) -> bool {
        (self.active && self.in_batch(c)) || (c == 0 && self.restoring)
    }

    /// Where origin chunk `c` of the merged view lives now, given the store's table lookup.
    fn redirect(&self, c: u64, table: Option<u64>) -> Option<u64> {
        match self.saved {
            Some(s) if c == 0 => Some(s),
            _ => table,
        }
    }

    fn fences(&self, c: u64) -> bool {
        self.fenced && self.in_batch(c)
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

    fn begin_merge(&mut self, s: usize, phase: Phase, saved: Option<u64>) {
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        // Read the areas below ahead: enough of them for two batches of the longest runs,
        // at most MAX_AHEAD chunks (4 KiB chunks: 16 areas of 256 records, 64 KiB; from 64
        // KiB chunks on, one). Allocated now, never on the I/O path; without the memory the
        // merge reads each area when it gets there.
        let g = x.store.geometry;
        let max_chunks =
            (u64::from(self.cfg.copy_buffer_sectors) / u64::from(g.chunk_sectors)).max(1);
        let want = (2 * MAX_RUNS as u64 * max_chunks).div_ceil(g.exceptions_per_area);
        let mut ahead_slots = want.clamp(1, MAX_AHEAD as u64).min(x.store.current_area) as usize;
        self.merge_ahead = Vec::new();
        let bytes = ahead_slots * g.chunk_bytes();
        if self.merge_ahead.try_reserve_exact(bytes).is_ok() {
            self.merge_ahead.resize(bytes, 0);
        } else {
            ahead_slots = 0;
        }
        let ahead_next = x.store.current_area.checked_sub(1);
        x.state = SnapState::Merging;
        self.merge = Some(Merge {
            snap: s as u16,
            phase,
            ios: 0,
            emitted: 0,
            io_failed: false,
            failed: false,
            total: x.table.len(),
            cs: x.store.chunk_sectors(),
            runs: [Run::default(); MAX_RUNS],
            nruns: 0,
            records: 0,
            zero_areas: 0,
            buffers: [NIL; MAX_RUNS],
            copying: [Copying::Read; MAX_RUNS],
            active: false,
            fenced: false,
            wipe_marker: false,
            saved,
            buffer: NIL,
            restoring: false,
            restored: false,
            announced: false,
            ahead: [Ahead::Free; MAX_AHEAD],
            ahead_slots,
            ahead_head: 0,
            ahead_next,
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
    fn copy_range(&self, m: &Merge, r: &Run) -> Option<(u64, u64, u64)> {
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
        self.read_ahead(s);
        if m.phase == Phase::Copy {
            self.step_copies(s);
            return;
        }
        // (The negative control issues the batch's flushes while its writes are in flight.)
        let flush_early = self.cfg.unsafe_merge_flush_early && m.phase == Phase::OriginFlush;
        if m.ios > 0 && !flush_early {
            return;
        }
        let Some(x) = self.snaps[s].as_ref() else {
            return;
        };
        let sid = SnapId(m.snap);
        let cow = Device::Cow(sid);
        let fua = x.cow_fua;
        let g = x.store.geometry;
        let area_sector = x.store.area_sector();
        let header_sectors = x.cow_block_sectors;
        let meta = |kind| IoBuffer::Meta { snap: sid, kind };
        let emitted = match m.phase {
            Phase::Stopped | Phase::Held | Phase::Copy => return,
            Phase::Prepare => {
                self.prepare_batch(s);
                return;
            }
            Phase::Clear => {
                // Every run, so that the other snapshots' copies are planned together.
                let mut clear = true;
                for r in &m.runs[..m.nruns] {
                    if let Some((start, end, _)) = self.copy_range(&m, r) {
                        clear &= self.merge_range_clear(start, end, None);
                    }
                }
                if clear {
                    if let Some(m) = self.merge.as_mut() {
                        m.active = true;
                    }
                    self.set_phase(Phase::Drain);
                }
                return;
            }
            Phase::Drain => {
                let cs = m.cs;
                let busy = self.reqs.iter().any(|r| {
                    r.phase != ReqPhase::Free
                        && r.req.volume == Volume::Origin
                        && r.ios > 0
                        && m.runs[..m.nruns].iter().any(|run| {
                            let (start, end) = (run.old * cs, (run.old + run.len) * cs);
                            r.req.sector < end && start < r.req.sector + u64::from(r.req.sectors)
                        })
                });
                if busy {
                    return;
                }
                // One copy buffer per run; leave a quarter of them to origin writes' copies.
                // With fewer buffers, merge fewer runs (the newest ones: the area stays a
                // prefix).
                let spare = self.merge_buffers();
                let want = m.nruns.min(spare);
                let mut got = 0;
                let mut buffers = [NIL; MAX_RUNS];
                while got < want {
                    let Some(b) = self.free_buffers.pop() else {
                        break;
                    };
                    buffers[got] = b;
                    got += 1;
                }
                // A batch that used up newer areas is merged whole (its runs from those areas
                // are no longer in the area buffer): wait for a buffer per run.
                if got == 0 || (m.zero_areas > 0 && got < m.nruns) {
                    self.free_buffers.extend(buffers[..got].iter().copied());
                    return;
                }
                if let Some(m) = self.merge.as_mut() {
                    m.buffers = buffers;
                    if got < m.nruns {
                        m.nruns = got;
                        m.records = m.runs[..got].iter().map(|r| r.len).sum();
                    }
                    m.emitted = 0;
                    m.copying = [Copying::Read; MAX_RUNS];
                }
                self.set_phase(Phase::Copy);
                return;
            }
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
            Phase::MarkerFlush
            | Phase::SaveFlush
            | Phase::CowFlush
            | Phase::ZeroFlush
            | Phase::AreaFlush
            | Phase::WipeFlush => self.emit_merge(0, cow, IoOp::Flush, 0, 0, IoBuffer::None),
            Phase::ZeroArea => {
                // Every used-up area at once (FUA writes on a COW device with FUA; else plain
                // writes that `ZeroFlush` makes durable together), durable before the area
                // below is written.
                let first = x.store.current_area + 1;
                let mut k = m.emitted as u64;
                while k < m.zero_areas {
                    let sector = g.chunk_sector(g.area_chunk(first + k));
                    let op = IoOp::Write { fua };
                    if !self.emit_merge(0, cow, op, sector, g.chunk_sectors, IoBuffer::Zeroes) {
                        break;
                    }
                    k += 1;
                    if let Some(mm) = self.merge.as_mut() {
                        mm.ios += 1;
                        mm.emitted = k as usize;
                    }
                }
                // Waits for them in `on_merge_io`.
                return;
            }
            Phase::ReadArea if self.take_ahead(s) => return,
            Phase::ReadArea => self.emit_merge(
                0,
                cow,
                IoOp::Read,
                area_sector,
                g.chunk_sectors,
                meta(MetaKind::Area),
            ),
            Phase::OriginFlush => {
                // The origin and the COW device together: the area write waits for both.
                let mut k = m.emitted;
                while k < 2 {
                    let dev = if k == 0 { Device::Origin } else { cow };
                    if !self.emit_merge(0, dev, IoOp::Flush, 0, 0, IoBuffer::None) {
                        break;
                    }
                    k += 1;
                    if let Some(mm) = self.merge.as_mut() {
                        mm.ios += 1;
                        mm.emitted = k;
                    }
                }
                return;
            }
            Phase::AreaWrite => {
                // Zero the batch's records (the newest `records` of the area), then write the
                // area. Idempotent if the emit has to be retried.
                if let Some(x) = self.snaps[s].as_mut() {
                    let top = x.store.committed_in_area;
                    for i in top - m.records..top {
                        Record {
                            old_chunk: 0,
                            new_chunk: 0,
                        }
                        .encode(&mut x.store.area, i as usize);
                    }
                }
                self.emit_merge(
                    0,
                    cow,
                    IoOp::Write { fua },
                    area_sector,
                    g.chunk_sectors,
                    meta(MetaKind::Area),
                )
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

    /// The copy phase: each run is read (COW device) into its copy buffer and written
    /// (origin) as soon as its read is back, every run at once. The origin flush follows
    /// once every write is back.
    fn step_copies(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        let mut reading = m.copying[..m.nruns]
            .iter()
            .filter(|c| **c == Copying::Reading)
            .count();
        for k in 0..m.nruns {
            if self.merge.is_none_or(|m| m.io_failed) {
                break;
            }
            let state = m.copying[k];
            if !matches!(state, Copying::Read | Copying::Write)
                || (state == Copying::Read && reading >= READS_IN_FLIGHT)
            {
                continue;
            }
            let r = m.runs[k];
            let Some((start, end, cow_start)) = self.copy_range(&m, &r) else {
                // Nothing to copy for this run (chunk 0, kept in the saved chunk).
                if let Some(mm) = self.merge.as_mut() {
                    mm.copying[k] = Copying::Done;
                }
                continue;
            };
            let copy = IoBuffer::Copy {
                index: m.buffers[k],
                byte_offset: 0,
            };
            let sectors = (end - start) as u32;
            let (ok, next) = if state == Copying::Read {
                let cow = Device::Cow(SnapId(m.snap));
                let ok = self.emit_merge(k, cow, IoOp::Read, cow_start, sectors, copy);
                reading += usize::from(ok);
                (ok, Copying::Reading)
            } else {
                let op = IoOp::Write { fua: false };
                let ok = self.emit_merge(k, Device::Origin, op, start, sectors, copy);
                (ok, Copying::Writing)
            };
            if !ok {
                break;
            }
            if let Some(mm) = self.merge.as_mut() {
                mm.ios += 1;
                mm.copying[k] = next;
            }
        }
        let Some(m) = self.merge else {
            return;
        };
        // (The negative control flushes once the last write is issued.)
        let flush_early = self.cfg.unsafe_merge_flush_early
            && !m.io_failed
            && m.copying[..m.nruns]
                .iter()
                .all(|c| matches!(c, Copying::Writing | Copying::Done));
        if m.ios > 0 && !flush_early {
            return;
        }
        if m.io_failed {
            self.stop_merge(false);
            return;
        }
        if !flush_early && m.copying[..m.nruns].iter().any(|c| *c != Copying::Done) {
            return;
        }
        let next = if self.cfg.unsafe_merge_zero_areas_early && m.zero_areas > 0 {
            Phase::ZeroArea
        } else if self.cfg.unsafe_merge_skip_origin_flush {
            Phase::CowFlush
        } else {
            Phase::OriginFlush
        };
        if let Some(mm) = self.merge.as_mut() {
            mm.emitted = 0;
        }
        self.set_phase(next);
        let _ = s;
    }

    /// The most copy buffers a batch takes: three quarters of the engine's (at least one
    /// left to origin writes' copies, when there are two).
    fn merge_buffers(&self) -> usize {
        let n = self.cfg.copy_buffers as usize;
        (n - (n / 4).max(1)).max(1)
    }

    /// Picks the next batch: up to [`MAX_RUNS`] runs from the top of the current area, each
    /// as Linux `persistent_prepare_merge()` picks one.
    fn prepare_batch(&mut self, s: usize) {
        // One copy buffer per run (see `Phase::Drain`).
        let max_runs = MAX_RUNS.min(self.merge_buffers());
        let (max_chunks, mut runs, mut nruns) = {
            let Some(m) = self.merge.as_ref() else {
                return;
            };
            let max_chunks = (u64::from(self.cfg.copy_buffer_sectors) / m.cs).max(1);
            if m.zero_areas > 0 {
                // Going on from the area above, which this batch used up.
                (max_chunks, m.runs, m.nruns)
            } else {
                (max_chunks, [Run::default(); MAX_RUNS], 0)
            }
        };
        let spanning = nruns > 0;
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        let committed = x.store.committed_in_area;
        let restore = self
            .merge
            .as_ref()
            .is_some_and(|m| m.saved.is_some() && !m.restored);
        if committed == 0 && !spanning {
            if x.store.current_area == 0 && restore {
                // The store is empty: origin chunk 0 goes back first, the store is wiped
                // after.
                self.set_phase(Phase::RestoreClear);
            } else if x.store.current_area == 0 {
                // The store is empty. A store in a region of a device that holds several
                // leaves a free-extent marker where its header was (its binding gives the
                // region), as a deletion does, so boot discovery still walks past it to the
                // stores after it; otherwise chunk 0 is zeroed.
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
            } else {
                x.store.current_area -= 1;
                self.set_phase(Phase::ReadArea);
            }
            return;
        }
        let record = |i: u64| Record::decode(&x.store.area, i as usize);
        let mut top = committed;
        while top > 0 && nruns < max_runs {
            let Some(last) = record(top - 1) else {
                break;
            };
            if last.new_chunk == 0 || x.table.lookup(last.old_chunk) != Some(last.new_chunk) {
                break;
            }
            let mut n = 1u64;
            while n < top && n < max_chunks && n <= last.old_chunk && n < last.new_chunk {
                let Some(r) = record(top - 1 - n) else {
                    break;
                };
                if r.old_chunk != last.old_chunk - n
                    || r.new_chunk != last.new_chunk - n
                    || x.table.lookup(r.old_chunk) != Some(r.new_chunk)
                {
                    break;
                }
                n += 1;
            }
            runs[nruns] = Run {
                old: last.old_chunk + 1 - n,
                new: last.new_chunk + 1 - n,
                len: n,
            };
            nruns += 1;
            top -= n;
        }
        if nruns == 0 {
            // The area read back does not match the table loaded from the same disk.
            self.stop_merge(false);
            return;
        }
        // The batch used the whole area and has room for more runs: it goes on with the area
        // below (read back into the area buffer), and this one is zeroed at the commit, before
        // the area below is written (Linux merges one area at a time: an origin flush, a COW
        // flush and an area write per area).
        if top == 0 && nruns < max_runs && x.store.current_area > 0 {
            x.store.current_area -= 1;
            if let Some(m) = self.merge.as_mut() {
                m.runs = runs;
                m.nruns = nruns;
                m.records = 0;
                m.zero_areas += 1;
            }
            self.set_phase(Phase::ReadArea);
            return;
        }
        if let Some(m) = self.merge.as_mut() {
            m.runs = runs;
            m.nruns = nruns;
            m.records = committed - top;
        }
        self.stats.merge_batches += 1;
        self.set_phase(Phase::Clear);
    }

    /// Reads ahead the areas below the current one into free slots (while batches are
    /// taken: the areas are read during the copies and commits of the batches above).
    fn read_ahead(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        let batching = matches!(
            m.phase,
            Phase::Prepare
                | Phase::ReadArea
                | Phase::Clear
                | Phase::Drain
                | Phase::Copy
                | Phase::OriginFlush
                | Phase::CowFlush
                | Phase::ZeroArea
                | Phase::ZeroFlush
                | Phase::AreaWrite
                | Phase::AreaFlush
        );
        if !batching || m.failed || m.ahead_slots == 0 {
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

    /// Phase `ReadArea` with the read-ahead: the current area (the batch just stepped down
    /// to it) from its slot into the area buffer. False: not read ahead, read it now.
    fn take_ahead(&mut self, s: usize) -> bool {
        let Some(m) = self.merge else {
            return false;
        };
        if m.ahead_slots == 0 {
            return false;
        }
        let Some(x) = self.snaps[s].as_mut() else {
            return false;
        };
        let area = x.store.current_area;
        let head = m.ahead_head;
        match m.ahead[head] {
            Ahead::Reading(a) if a == area => true,
            Ahead::Failed(a) if a == area => {
                self.stop_merge(false);
                true
            }
            Ahead::Ready(a) if a == area => {
                let g = x.store.geometry;
                let cb = g.chunk_bytes();
                x.store
                    .area
                    .copy_from_slice(&self.merge_ahead[head * cb..(head + 1) * cb]);
                x.store.committed_in_area = g.exceptions_per_area;
                self.stats.merge_areas_read_ahead += 1;
                if let Some(mm) = self.merge.as_mut() {
                    mm.ahead[head] = Ahead::Free;
                    mm.ahead_head = (head + 1) % mm.ahead_slots;
                }
                self.set_phase(Phase::Prepare);
                true
            }
            _ => false,
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

    /// The bytes of read-ahead slot `slot` of the merge of `snap`.
    pub(super) fn merge_ahead_bytes(&self, snap: SnapId, slot: u8) -> Option<&[u8]> {
        let m = self.merge.as_ref().filter(|m| m.snap == snap.0)?;
        let cb = self
            .snaps
            .get(snap.0 as usize)?
            .as_ref()?
            .store
            .geometry
            .chunk_bytes();
        let slot = usize::from(slot);
        if slot >= m.ahead_slots {
            return None;
        }
        self.merge_ahead.get(slot * cb..(slot + 1) * cb)
    }

    pub(super) fn merge_ahead_bytes_mut(&mut self, snap: SnapId, slot: u8) -> Option<&mut [u8]> {
        let m = self.merge.as_ref().filter(|m| m.snap == snap.0)?;
        let cb = self
            .snaps
            .get(snap.0 as usize)?
            .as_ref()?
            .store
            .geometry
            .chunk_bytes();
        let slot = usize::from(slot);
        if slot >= m.ahead_slots {
            return None;
        }
        self.merge_ahead.get_mut(slot * cb..(slot + 1) * cb)
    }

    /// Completion of a merge I/O (of run `run` of the batch, on the COW device or not).
    pub(super) fn on_merge_io(&mut self, sid: u16, run: u16, cow: bool, ok: bool) {
        if run & AHEAD_RUN != 0 {
            self.on_ahead_io(sid, usize::from(run & !AHEAD_RUN), ok);
            return;
        }
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        m.ios = m.ios.saturating_sub(1);
        let phase = m.phase;
        if phase == Phase::Copy {
            // The copy step emits the run's write, or moves on once every run is back.
            if let Some(c) = m.copying.get_mut(run as usize) {
                *c = match *c {
                    Copying::Reading => Copying::Write,
                    _ => Copying::Done,
                };
            }
            m.io_failed |= !ok;
        }
        if cow {
            self.io_done_on(sid);
        }
        if phase == Phase::Copy {
            self.progress += 1;
            return;
        }
        if !ok {
            self.release_merge_buffer();
            // After a failed write of the batch's metadata, what is on disk for its records
            // is unknown: fence the batch.
            self.stop_merge(matches!(
                phase,
                Phase::ZeroArea | Phase::ZeroFlush | Phase::AreaWrite | Phase::AreaFlush
            ));
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
                Phase::Prepare
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
                Phase::Prepare
            }
            Phase::ReadArea => {
                if let Some(x) = self.snaps[s].as_mut() {
                    x.store.committed_in_area = x.store.geometry.exceptions_per_area;
                }
                Phase::Prepare
            }
            // Both flushes (the origin's and the COW device's) must be back. (The negative
            // control releases the batch as soon as the origin's is.)
            Phase::OriginFlush if self.merge.is_some_and(|m| m.ios > 0 || m.emitted < 2) => {
                if !cow && self.cfg.unsafe_merge_release_early {
                    self.release_batch_early(s);
                }
                return;
            }
            Phase::OriginFlush | Phase::CowFlush => {
                if phase == Phase::OriginFlush && !cow && self.cfg.unsafe_merge_release_early {
                    self.release_batch_early(s);
                }
                match self.merge.as_mut() {
                    Some(m) if m.zero_areas > 0 => {
                        m.emitted = 0;
                        Phase::ZeroArea
                    }
                    _ => Phase::AreaWrite,
                }
            }
            // The zeroing writes go down together; once all are back, one flush (none after
            // FUA writes).
            Phase::ZeroArea => match self.merge.as_ref() {
                Some(m) if m.ios > 0 || (m.emitted as u64) < m.zero_areas => return,
                _ if !fua => Phase::ZeroFlush,
                _ => self.areas_zeroed(),
            },
            Phase::ZeroFlush => self.areas_zeroed(),
            Phase::AreaWrite if !fua => Phase::AreaFlush,
            Phase::AreaWrite | Phase::AreaFlush => {
                self.finish_batch_merge(s);
                return;
            }
            Phase::Wipe if !fua => Phase::WipeFlush,
            Phase::Wipe | Phase::WipeFlush => Phase::Remove,
            other => other,
        };
        self.set_phase(next);
    }

    /// The used-up areas are durably zero: the area below is written next.
    fn areas_zeroed(&mut self) -> Phase {
        if let Some(m) = self.merge.as_mut() {
            self.stats.merge_areas_zeroed += m.zero_areas;
            m.zero_areas = 0;
            m.emitted = 0;
        }
        if self.cfg.unsafe_merge_zero_areas_early {
            // (The negative control zeroed them before the origin flush.)
            Phase::OriginFlush
        } else {
            Phase::AreaWrite
        }
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

    /// Gives the batch's copy buffers back.
    fn release_merge_buffers(&mut self) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        for b in m.buffers.iter_mut() {
            if *b != NIL {
                self.free_buffers.push(*b);
                *b = NIL;
            }
        }
        // Requests that found no copy buffer look again.
        self.wake_starved();
    }

    /// The batch's area write is durable: Linux `persistent_commit_merge()` +
    /// `remove_single_exception_chunk()`.
    fn finish_batch_merge(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        let mut table_full = false;
        if let Some(x) = self.snaps[s].as_mut() {
            x.store.committed_in_area -= m.records;
            // Newest first: these come off the end of table runs.
            for r in &m.runs[..m.nruns] {
                for k in (0..r.len).rev() {
                    table_full |= x.table.remove(r.old + k).is_err();
                }
            }
            // What Linux reports as allocated from now on (only usage reads it).
            let g = x.store.geometry;
            x.store.next_free =
                x.store.current_area * g.exceptions_per_area + x.store.committed_in_area + 1;
        }
        self.release_merge_buffers();
        if let Some(mm) = self.merge.as_mut() {
            mm.active = false;
        }
        self.epoch += 1;
        if table_full {
            // The records are gone on disk but the table could not split a run to drop
            // some chunks: fence the batch rather than redirect I/O to a freed COW chunk.
            self.stop_merge(true);
        } else {
            self.set_phase(Phase::Prepare);
        }
    }

    /// The negative control's broken ordering: the batch leaves the table (I/O to it goes
    /// to the origin) before its records are zeroed on disk.
    fn release_batch_early(&mut self, s: usize) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        m.active = false;
        let (runs, n) = (m.runs, m.nruns);
        if let Some(x) = self.snaps[s].as_mut() {
            for r in &runs[..n] {
                for k in (0..r.len).rev() {
                    let _ = x.table.remove(r.old + k);
                }
            }
        }
        self.epoch += 1;
    }

    /// Stops the merge on an error: I/O goes on through the store's redirection.
    fn stop_merge(&mut self, fence: bool) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        m.failed = true;
        m.phase = Phase::Stopped;
        m.fenced = fence;
        m.active = false;
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
            if m.fences(c) {
                self.reqs[idx as usize].cursor = cursor;
                self.fail_request(idx, VolumeError::Io);
                return true;
            }
            if m.blocks(c) {
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
                if m.blocks(c2) || m.fences(c2) {
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
