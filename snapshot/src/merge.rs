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
//! 0. Write the *merge marker* into the header block (FUA, or write + flush) so a reboot
//!    resumes: see [`crate::format::encode_merge_marker`] for where it lives and why.
//! 1. Take the newest record (highest index of the current area; when the area is used up,
//!    read the previous area back from disk) and the records before it whose `old_chunk` *and*
//!    `new_chunk` are both consecutive: one run, at most one copy buffer long.
//! 2. The run's origin chunks are about to change: every *other* snapshot of the origin copies
//!    them first, exactly as for an origin write (Linux `origin_write_extent()`).
//! 3. Block I/O to the run's chunks and wait for origin I/O already in flight on them.
//! 4. Read the run from the COW device into a copy buffer, write it to the origin, flush the
//!    origin.
//! 5. Zero the run's records in the area image; flush the COW device, write the area with FUA
//!    (or write + flush): Linux's `REQ_PREFLUSH | REQ_FUA`.
//! 6. Drop the run from the in-memory table, release the blocked I/O (it now goes to the
//!    origin), next run.
//! 7. Store empty (area 0 all zero): wipe chunk 0 (the header, binding and marker), free the
//!    slot, [`Event::MergeDone`].
//!
//! A crash anywhere is safe: a record still on disk means its COW chunk still holds the
//! snapshot's data (and any origin write redirected there), and copying it again gives the
//! same origin; a record gone means the copy was durable on the origin before the area write.
//! Writes to a run's chunks wait until its area write is durable, so a repeated copy never
//! overwrites them.
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
//! disk for that run is unknown, so I/O to those chunks fails until the store is attached again.
//!
//! # Memory
//! Nothing is allocated: the merge borrows one of the engine's copy buffers per run, reads
//! areas back into the snapshot's area buffer, and its state is a small inline struct.

use super::*;
use crate::format::encode_merge_marker;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Found at attach time: redirect I/O but write nothing until
    /// [`Engine::resume_merge`] (every other store of the origin must be attached first, or
    /// the merge would overwrite origin chunks they have not copied).
    Held,
    /// Write the header block with the merge marker.
    Marker,
    /// Flush after the marker (COW device without FUA).
    MarkerFlush,
    /// Pick the next run (or step back an area, or finish).
    Prepare,
    /// Read the previous metadata area back into the area buffer.
    ReadArea,
    /// Wait until every other snapshot holds the run's origin chunks.
    Clear,
    /// The run is blocked; wait for origin I/O in flight on it, and for a copy buffer.
    Drain,
    CopyRead,
    CopyWrite,
    OriginFlush,
    CowFlush,
    AreaWrite,
    AreaFlush,
    /// Store empty: wipe chunk 0.
    Wipe,
    WipeFlush,
    /// Free the slot once nothing is in flight on the COW device.
    Remove,
    /// Stopped on an error.
    Stopped,
}

/// The state of the merge running on an origin.
#[derive(Clone, Copy, Debug)]
pub(super) struct Merge {
    snap: u16,
    phase: Phase,
    inflight: bool,
    failed: bool,
    total: u64,
    cs: u64,
    run_old: u64,
    run_new: u64,
    run_len: u64,
    /// I/O to the run's chunks waits.
    active: bool,
    buffer: u32,
    /// Chunks `[start, start + len)` whose on-disk state is unknown after a failed area write.
    fenced: Option<(u64, u64)>,
}

impl Merge {
    fn blocks(&self, c: u64) -> bool {
        self.active && c >= self.run_old && c < self.run_old + self.run_len
    }

    fn fences(&self, c: u64) -> bool {
        self.fenced
            .is_some_and(|(start, len)| c >= start && c < start + len)
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
        self.begin_merge(s, Phase::Marker);
        Ok(())
    }

    /// Installs the merge of a store attached with its merge marker set, held until
    /// [`resume_merge`](Self::resume_merge).
    pub(super) fn hold_resumed_merge(&mut self, snap: SnapId) {
        self.begin_merge(snap.0 as usize, Phase::Held);
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
        m.phase = Phase::Prepare;
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

    fn begin_merge(&mut self, s: usize, phase: Phase) {
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        x.state = SnapState::Merging;
        encode_merge_marker(&mut x.header);
        self.merge = Some(Merge {
            snap: s as u16,
            phase,
            inflight: false,
            failed: false,
            total: x.table.len(),
            cs: x.store.chunk_sectors(),
            run_old: 0,
            run_new: 0,
            run_len: 0,
            active: false,
            buffer: NIL,
            fenced: None,
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

    /// Origin sectors of the current run.
    fn run_range(&self, m: &Merge) -> (u64, u64) {
        let start = m.run_old * m.cs;
        let end = ((m.run_old + m.run_len) * m.cs).min(self.cfg.origin_sectors);
        (start, end)
    }

    /// One step of the merge of snapshot `s` (called from the engine's step loop).
    pub(super) fn step_merge(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        if m.snap as usize != s || m.inflight {
            return;
        }
        let Some(x) = self.snaps[s].as_ref() else {
            return;
        };
        let sid = SnapId(m.snap);
        let cow = Device::Cow(sid);
        let ctx = IoCtx::Merge { snap: m.snap };
        let fua = x.cow_fua;
        let g = x.store.geometry;
        let area_sector = x.store.area_sector();
        let header_sectors = x.cow_block_sectors;
        let (start, end) = self.run_range(&m);
        let meta = |kind| IoBuffer::Meta { snap: sid, kind };
        let copy = IoBuffer::Copy {
            index: m.buffer,
            byte_offset: 0,
        };
        let emitted = match m.phase {
            Phase::Stopped | Phase::Held => return,
            Phase::Prepare => {
                self.prepare_run(s);
                return;
            }
            Phase::Clear => {
                if self.merge_range_clear(start, end) {
                    if let Some(m) = self.merge.as_mut() {
                        m.active = true;
                    }
                    self.epoch += 1;
                    self.set_phase(Phase::Drain);
                }
                return;
            }
            Phase::Drain => {
                let busy = self.reqs.iter().any(|r| {
                    r.phase != ReqPhase::Free
                        && r.req.volume == Volume::Origin
                        && r.ios > 0
                        && r.req.sector < end
                        && start < r.req.sector + u64::from(r.req.sectors)
                });
                if busy {
                    return;
                }
                let Some(b) = self.free_buffers.pop() else {
                    return;
                };
                if let Some(m) = self.merge.as_mut() {
                    m.buffer = b;
                }
                self.set_phase(Phase::CopyRead);
                return;
            }
            Phase::Remove => {
                if x.inflight == 0 {
                    self.snaps[s] = None;
                    self.merge = None;
                    self.epoch += 1;
                    self.progress += 1;
                    self.push_event(Event::MergeDone { snap: sid });
                }
                return;
            }
            Phase::Marker => self.emit(
                ctx,
                cow,
                IoOp::Write { fua },
                0,
                header_sectors,
                meta(MetaKind::Header),
            ),
            Phase::MarkerFlush | Phase::CowFlush | Phase::AreaFlush | Phase::WipeFlush => {
                self.emit(ctx, cow, IoOp::Flush, 0, 0, IoBuffer::None)
            }
            Phase::ReadArea => self.emit(
                ctx,
                cow,
                IoOp::Read,
                area_sector,
                g.chunk_sectors,
                meta(MetaKind::Area),
            ),
            Phase::CopyRead => self.emit(
                ctx,
                cow,
                IoOp::Read,
                m.run_new * m.cs,
                (end - start) as u32,
                copy,
            ),
            Phase::CopyWrite => self.emit(
                ctx,
                Device::Origin,
                IoOp::Write { fua: false },
                start,
                (end - start) as u32,
                copy,
            ),
            Phase::OriginFlush => self.emit(ctx, Device::Origin, IoOp::Flush, 0, 0, IoBuffer::None),
            Phase::AreaWrite => {
                // Zero the run's records (the newest `run_len` of the area), then write the
                // area. Idempotent if the emit has to be retried.
                if let Some(x) = self.snaps[s].as_mut() {
                    let top = x.store.committed_in_area;
                    for i in top - m.run_len..top {
                        Record {
                            old_chunk: 0,
                            new_chunk: 0,
                        }
                        .encode(&mut x.store.area, i as usize);
                    }
                }
                self.emit(
                    ctx,
                    cow,
                    IoOp::Write { fua },
                    area_sector,
                    g.chunk_sectors,
                    meta(MetaKind::Area),
                )
            }
            Phase::Wipe => self.emit(
                ctx,
                cow,
                IoOp::Write { fua },
                0,
                g.chunk_sectors,
                IoBuffer::Zeroes,
            ),
        };
        if emitted {
            if let Some(m) = self.merge.as_mut() {
                m.inflight = true;
            }
        }
    }

    /// Picks the next run: Linux `persistent_prepare_merge()`.
    fn prepare_run(&mut self, s: usize) {
        let max_chunks = {
            let Some(m) = self.merge.as_ref() else {
                return;
            };
            (u64::from(self.cfg.copy_buffer_sectors) / m.cs).max(1)
        };
        let Some(x) = self.snaps[s].as_mut() else {
            return;
        };
        let committed = x.store.committed_in_area;
        if committed == 0 {
            if x.store.current_area == 0 {
                self.set_phase(Phase::Wipe);
            } else {
                x.store.current_area -= 1;
                self.set_phase(Phase::ReadArea);
            }
            return;
        }
        let record = |i: u64| Record::decode(&x.store.area, i as usize);
        let Some(last) = record(committed - 1) else {
            self.stop_merge(false);
            return;
        };
        if last.new_chunk == 0 || x.table.lookup(last.old_chunk) != Some(last.new_chunk) {
            // The area read back does not match the table loaded from the same disk.
            self.stop_merge(false);
            return;
        }
        let mut n = 1u64;
        while n < committed && n < max_chunks && n <= last.old_chunk && n < last.new_chunk {
            let Some(r) = record(committed - 1 - n) else {
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
        if let Some(m) = self.merge.as_mut() {
            m.run_old = last.old_chunk + 1 - n;
            m.run_new = last.new_chunk + 1 - n;
            m.run_len = n;
        }
        self.set_phase(Phase::Clear);
    }

    /// Completion of a merge I/O.
    pub(super) fn on_merge_io(&mut self, sid: u16, ok: bool) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        m.inflight = false;
        let phase = m.phase;
        if !matches!(phase, Phase::CopyWrite | Phase::OriginFlush) {
            self.io_done_on(sid);
        }
        if !ok {
            self.stop_merge(matches!(phase, Phase::AreaWrite | Phase::AreaFlush));
            return;
        }
        let s = sid as usize;
        let fua = self.snaps[s].as_ref().is_some_and(|x| x.cow_fua);
        let next = match phase {
            Phase::Marker if !fua => Phase::MarkerFlush,
            Phase::Marker | Phase::MarkerFlush => {
                self.push_event(Event::MergeStarted {
                    snap: SnapId(sid),
                    resumed: false,
                });
                Phase::Prepare
            }
            Phase::ReadArea => {
                if let Some(x) = self.snaps[s].as_mut() {
                    x.store.committed_in_area = x.store.geometry.exceptions_per_area;
                }
                Phase::Prepare
            }
            Phase::CopyRead => Phase::CopyWrite,
            Phase::CopyWrite if self.cfg.unsafe_merge_skip_origin_flush => Phase::CowFlush,
            Phase::CopyWrite => Phase::OriginFlush,
            Phase::OriginFlush => {
                if self.cfg.unsafe_merge_release_early {
                    self.release_run_early(s);
                }
                Phase::CowFlush
            }
            Phase::CowFlush => Phase::AreaWrite,
            Phase::AreaWrite if !fua => Phase::AreaFlush,
            Phase::AreaWrite | Phase::AreaFlush => {
                self.finish_run(s);
                return;
            }
            Phase::Wipe if !fua => Phase::WipeFlush,
            Phase::Wipe | Phase::WipeFlush => Phase::Remove,
            other => other,
        };
        self.set_phase(next);
    }

    /// The run's area write is durable: Linux `persistent_commit_merge()` +
    /// `remove_single_exception_chunk()`.
    fn finish_run(&mut self, s: usize) {
        let Some(m) = self.merge else {
            return;
        };
        let mut unremoved = None;
        if let Some(x) = self.snaps[s].as_mut() {
            x.store.committed_in_area -= m.run_len;
            // Newest first: these come off the end of table runs.
            for k in (0..m.run_len).rev() {
                if x.table.remove(m.run_old + k).is_err() {
                    unremoved = Some(k + 1);
                    break;
                }
            }
            // What Linux reports as allocated from now on (only usage reads it).
            let g = x.store.geometry;
            x.store.next_free =
                x.store.current_area * g.exceptions_per_area + x.store.committed_in_area + 1;
        }
        if let Some(mm) = self.merge.as_mut() {
            mm.active = false;
            if mm.buffer != NIL {
                self.free_buffers.push(mm.buffer);
                mm.buffer = NIL;
            }
        }
        self.epoch += 1;
        match unremoved {
            None => self.set_phase(Phase::Prepare),
            Some(len) => {
                // The records are gone on disk but the table cannot split a run to drop
                // them: fence those chunks rather than redirect I/O to a freed COW chunk.
                self.stop_merge(false);
                if let Some(mm) = self.merge.as_mut() {
                    mm.fenced = Some((m.run_old, len));
                }
            }
        }
    }

    /// The negative control's broken ordering: the run leaves the table (I/O to it goes to
    /// the origin) before its records are zeroed on disk.
    fn release_run_early(&mut self, s: usize) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        m.active = false;
        let (start, len) = (m.run_old, m.run_len);
        if let Some(x) = self.snaps[s].as_mut() {
            for k in (0..len).rev() {
                let _ = x.table.remove(start + k);
            }
        }
        self.epoch += 1;
    }

    /// Stops the merge on an error: I/O goes on through the store's redirection.
    fn stop_merge(&mut self, area_uncertain: bool) {
        let Some(m) = self.merge.as_mut() else {
            return;
        };
        m.failed = true;
        m.phase = Phase::Stopped;
        if area_uncertain {
            m.fenced = Some((m.run_old, m.run_len));
        }
        m.active = false;
        if m.buffer != NIL {
            self.free_buffers.push(m.buffer);
            m.buffer = NIL;
        }
        let snap = SnapId(m.snap);
        self.epoch += 1;
        self.progress += 1;
        self.push_event(Event::MergeFailed { snap });
    }

    /// Whether origin sectors `[start, end)` may be overwritten now: every other snapshot
    /// holds (durably) a copy of them. Plans the missing copies. The same rule as an origin
    /// write (`advance_origin_write`).
    fn merge_range_clear(&mut self, start: u64, end: u64) -> bool {
        let mut clear = true;
        let mut need_alloc = false;
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
                        }
                    }
                    None => {
                        clear = false;
                        need_alloc = true;
                    }
                }
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
            x.header_phase != HeaderPhase::None
                || (x.meta_inflight && !x.valid)
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
        if matches!(m.phase, Phase::Marker | Phase::MarkerFlush) {
            // Until the marker is durable a crash brings back the unmerged store: a write
            // redirected into it now would be lost from the origin then.
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
            let lookup = |e: &Engine, c: u64| e.snaps[ms].as_ref().and_then(|x| x.table.lookup(c));
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
                    if write && !self.merge_range_clear(cursor, piece_end) {
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
