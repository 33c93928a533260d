//! Snapshot creation, deletion and merge as tasks of the main loop: each quiesces the origin
//! (its in-flight writes finish, new ones wait in the engine), lets the engine initialise,
//! wipe or start merging the COW store with its ordered, durable writes, and resumes the
//! origin. A merge then runs in the engine with origin I/O online; its task shows progress
//! until it is done (Ctrl-C leaves it running in the background).

use core::fmt::{self, Write};

use alloc::string::String;
use drivers::block::{BufferPool, Completion};
use snapshot::{Binding, BoundedBytes, MergeError, SnapId, SnapshotConfig};

use crate::extents::MarkerWriter;
use crate::origin::{Origin, Snap, SnapState};
use crate::tasks::Task;
use crate::Volumes;

/// The [`Task`] methods of a snapshot control task (`$task`: its progress line says it is
/// `$doing` the snapshot; it is done at step `$end`; `$markers`: the free-extent markers it
/// writes, whose I/O completes there): it steps with its `run`, ends early with its `fail`,
/// reports `error: snapshot NAME: ...` or its `report_ok`, cannot be cancelled and is not
/// I/O-path work.
macro_rules! control_task {
    (@markers $task:ident) => {
        None
    };
    (@markers $task:ident, $markers:ident) => {
        $task.$markers.as_mut()
    };
    ($task:ty, $doing:literal, $end:expr $(, $markers:ident)?) => {
        impl $task {
            /// Ends the task with `why`.
            fn fail(&mut self, why: &'static str) {
                self.error = Some(why);
                self.step = $end;
            }
        }

        impl Task for $task {
            fn step(&mut self, st: &mut Volumes, _now: u64) {
                self.run(st);
            }

            fn complete(&mut self, pool: &mut BufferPool, c: Completion, _now: u64) {
                let markers = control_task!(@markers self $(, $markers)?);
                MarkerWriter::complete_or_release(markers, pool, c);
            }

            fn done(&self) -> bool {
                self.step == $end
            }

            fn cancel(&mut self) {}

            fn io_path(&self) -> bool {
                false
            }

            fn progress(&self, out: &mut dyn Write, _now: u64) -> fmt::Result {
                write!(out, concat!($doing, " snapshot {}"), self.name)
            }

            fn report(&mut self, out: &mut dyn Write, _now: u64) -> fmt::Result {
                match self.error {
                    Some(e) => writeln!(out, "error: snapshot {}: {e}", self.name),
                    None => self.report_ok(out),
                }
            }
        }
    };
}

/// Whether the binding write of snapshot `id` has finished (and it then succeeded), taken
/// from its origin; `None` while it is in flight.
fn take_rebound(o: &mut Origin, id: SnapId) -> Option<bool> {
    match o.rebound {
        Some((done, ok)) if done == id => {
            o.rebound = None;
            Some(ok)
        }
        _ => None,
    }
}

/// Where the new store goes and how it is laid out.
pub struct CreateSpec {
    /// Snapshot name.
    pub name: String,
    /// Index into `Volumes::origins`.
    pub origin: usize,
    /// COW device.
    pub cow_disk: usize,
    /// First sector of the store on the COW device.
    pub cow_start: u64,
    /// Store size in sectors.
    pub cow_sectors: u64,
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
    /// Accept writes to the snapshot.
    pub writable: bool,
    /// A line for the operator after the creation (e.g. that the origin cannot be
    /// identified after a reboot).
    pub note: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Free-extent markers for the gaps before the new region, so boot finds the store.
    Markers,
    Quiesce,
    WaitQuiesced,
    WaitCreated(SnapId),
    Done,
}

/// `snapshot create`.
pub struct CreateTask {
    spec: CreateSpec,
    step: Step,
    markers: Option<MarkerWriter>,
    error: Option<&'static str>,
    started: u64,
    /// NBD writes sent straight to the origin before it was quiesced and not back yet (the
    /// snapshot waits for them).
    direct_waiting: u32,
    /// Ctrl-C while waiting for the origin: give up before anything is created.
    cancelled: bool,
}

impl CreateTask {
    /// A creation; the caller checked the spec.
    pub fn new(spec: CreateSpec, now: u64) -> CreateTask {
        CreateTask {
            spec,
            step: Step::Markers,
            markers: None,
            error: None,
            started: now,
            direct_waiting: 0,
            cancelled: false,
        }
    }

    fn config(&self, st: &Volumes) -> SnapshotConfig {
        let origin = st.origins[self.spec.origin].disk;
        let og = st.devices[origin].geometry();
        let info = st.devices[origin].info();
        let cg = st.devices[self.spec.cow_disk].geometry();
        // Names are checked (at most 64 bytes) and serials are at most 20 bytes, so both fit.
        let binding = match (
            BoundedBytes::new(self.spec.name.as_bytes()),
            BoundedBytes::new(info.serial.as_str().as_bytes()),
        ) {
            (Some(name), Some(origin_serial)) => Some(Binding {
                name,
                origin_serial,
                origin_sectors: og.capacity_blocks * u64::from(og.block_size / 512),
                chunk_sectors: self.spec.chunk_sectors,
                // 0 ("not recorded") when the RTC gave no date at boot.
                created_unix_seconds: (st.platform.unix_seconds)().unwrap_or(0),
                region_start: self.spec.cow_start,
                region_sectors: self.spec.cow_sectors,
                flags: if self.spec.writable {
                    snapshot::format::BINDING_FLAG_WRITABLE
                } else {
                    0
                },
                origin_id: crate::identity::origin_id_of(&crate::identity::DeviceId::of(&info)),
            }),
            _ => None,
        };
        SnapshotConfig {
            chunk_sectors: self.spec.chunk_sectors,
            cow_sectors: self.spec.cow_sectors,
            cow_block_sectors: (cg.block_size / 512).max(1),
            cow_fua: cg.fua,
            writable: self.spec.writable,
            table_runs: crate::table_limit(self.spec.cow_sectors, self.spec.chunk_sectors),
            binding,
        }
    }
}

impl Task for CreateTask {
    fn step(&mut self, st: &mut Volumes, _now: u64) {
        if self.step == Step::Markers {
            let spec = &self.spec;
            let m = self.markers.get_or_insert_with(|| {
                MarkerWriter::new(st, spec.cow_disk, Some((spec.cow_start, spec.cow_sectors)))
            });
            m.step(st);
            if !m.done() {
                return;
            }
            if m.error {
                self.error = Some("writing the free-extent markers on the COW device failed");
                self.step = Step::Done;
                return;
            }
            self.step = Step::Quiesce;
        }
        let cfg = (self.step == Step::WaitQuiesced).then(|| self.config(st));
        // NBD writes sent straight to the origin device before it was quiesced (from the
        // Quiesce step on they go through the engine, where they wait) must be back before
        // the snapshot goes live, or they would land after it without being copied.
        let direct = st
            .origins
            .get(self.spec.origin)
            .map_or(0, |o| st.direct_nbd_in_flight(o.disk));
        self.direct_waiting = direct;
        let Volumes {
            origins, instances, ..
        } = st;
        let Some(o) = origins.get_mut(self.spec.origin) else {
            self.error = Some("the origin went away");
            self.step = Step::Done;
            return;
        };
        match self.step {
            Step::WaitQuiesced if self.cancelled => {
                // Nothing is created yet: the origin goes on as before.
                o.engine.resume_origin();
                o.creating = false;
                self.error = Some("cancelled while waiting for the origin's I/O in flight");
                self.step = Step::Done;
            }
            Step::Quiesce => {
                o.creating = true;
                o.engine.quiesce_origin();
                self.step = Step::WaitQuiesced;
            }
            Step::WaitQuiesced if o.engine.is_quiesced() && direct == 0 => {
                let Some(cfg) = cfg else { return };
                match o.engine.create_snapshot(&cfg) {
                    Ok(id) => {
                        let instance = instances.take();
                        o.snaps.push(Snap {
                            name: self.spec.name.clone(),
                            id,
                            instance,
                            cow_disk: self.spec.cow_disk,
                            cow_start: self.spec.cow_start,
                            cow_sectors: self.spec.cow_sectors,
                            chunk_sectors: self.spec.chunk_sectors,
                            writable: self.spec.writable,
                            state: SnapState::Creating,
                            invalid: None,
                            auto_blocked: false,
                        });
                        self.step = Step::WaitCreated(id);
                    }
                    Err(_) => {
                        self.error = Some("the engine refused the store (chunk size or COW size)");
                        o.engine.resume_origin();
                        o.creating = false;
                        self.step = Step::Done;
                    }
                }
            }
            Step::WaitCreated(id) => {
                let state = o.snaps.iter().find(|s| s.id == id).map(|s| s.state);
                match state {
                    Some(SnapState::Creating) => {}
                    Some(SnapState::Active) => {
                        o.engine.resume_origin();
                        o.creating = false;
                        self.step = Step::Done;
                    }
                    _ => {
                        self.error = Some("initialising the COW store failed (I/O error)");
                        o.engine.resume_origin();
                        o.creating = false;
                        self.step = Step::Done;
                    }
                }
            }
            _ => {}
        }
    }

    fn complete(&mut self, pool: &mut BufferPool, c: Completion, _now: u64) {
        MarkerWriter::complete_or_release(self.markers.as_mut(), pool, c);
    }

    fn done(&self) -> bool {
        self.step == Step::Done
    }

    fn cancel(&mut self) {
        // Creation is short and must finish or fail cleanly: Ctrl-C is taken only while it
        // waits for the origin's I/O in flight (a device that never answers would hold it
        // forever), before anything is created.
        if matches!(self.step, Step::Quiesce | Step::WaitQuiesced) {
            self.cancelled = true;
        }
    }

    fn io_path(&self) -> bool {
        false
    }

    fn progress(&self, out: &mut dyn Write, _now: u64) -> fmt::Result {
        write!(out, "creating snapshot {}", self.spec.name)?;
        if self.step == Step::WaitQuiesced && self.direct_waiting > 0 {
            write!(
                out,
                ": waiting for {} NBD write(s) sent to the origin before it (Ctrl-C gives up)",
                self.direct_waiting
            )?;
        }
        Ok(())
    }

    fn report(&mut self, out: &mut dyn Write, now: u64) -> fmt::Result {
        match self.error {
            Some(e) => writeln!(out, "error: snapshot {}: {e}", self.spec.name),
            None => writeln!(
                out,
                "created snapshot {} ({} KiB chunks) in {} ms",
                self.spec.name,
                self.spec.chunk_sectors / 2,
                (now - self.started) / 1_000_000
            )
            .and_then(|()| match &self.spec.note {
                Some(note) => writeln!(out, "{note}"),
                None => Ok(()),
            }),
        }
    }
}

/// `snapshot delete`.
pub struct DeleteTask {
    name: String,
    origin: usize,
    id: SnapId,
    /// 0 quiesce, 1 wait quiesced, 2 wait deleted, 3 markers, 4 done.
    step: u8,
    error: Option<&'static str>,
    /// The COW device, and the markers that keep later stores on it reachable at boot.
    cow_disk: Option<usize>,
    markers: Option<MarkerWriter>,
    /// The store could not be marked invalid before the delete (a failed wipe then leaves a
    /// store that reads as valid).
    unmarked: bool,
}

impl DeleteTask {
    /// Deletes snapshot `id` of `origin`.
    pub fn new(name: String, origin: usize, id: SnapId) -> DeleteTask {
        DeleteTask {
            name,
            origin,
            id,
            step: 0,
            error: None,
            cow_disk: None,
            markers: None,
            unmarked: false,
        }
    }
}

impl DeleteTask {
    fn run(&mut self, st: &mut Volumes) {
        if self.step == 3 {
            let Some(disk) = self.cow_disk else {
                self.step = 4;
                return;
            };
            let m = self
                .markers
                .get_or_insert_with(|| MarkerWriter::new(st, disk, None));
            m.step(st);
            if m.done() {
                if m.error && self.error.is_none() {
                    self.error = Some("deleted, but writing free-extent markers failed");
                }
                self.step = 4;
            }
            return;
        }
        let Some(o) = st.origins.get_mut(self.origin) else {
            self.step = 4;
            return;
        };
        match self.step {
            0 => {
                o.engine.quiesce_origin();
                self.step = 1;
            }
            1 if o.engine.is_quiesced() => {
                self.unmarked = o.engine.invalidation_failed(self.id);
                if o.engine.delete_snapshot(self.id).is_err() {
                    o.engine.resume_origin();
                    self.fail("the engine does not know this snapshot");
                    return;
                }
                if let Some(s) = o.snaps.iter_mut().find(|s| s.id == self.id) {
                    s.state = SnapState::Deleting;
                    self.cow_disk = Some(s.cow_disk);
                }
                self.step = 2;
            }
            // The entry disappears once the engine reports the store wiped.
            2 if !o.snaps.iter().any(|s| s.id == self.id) => {
                o.engine.resume_origin();
                let wipe_failed = o.wipe_failed.take() == Some(self.id);
                if wipe_failed && self.unmarked {
                    self.error = Some(
                        "deleted, but its COW store could be neither marked invalid nor wiped \
                         (I/O error): it still reads as a valid snapshot, with stale contents; \
                         remove or replace the COW device before the next boot",
                    );
                } else if wipe_failed {
                    self.error = Some(
                        "deleted, but wiping its COW store failed (I/O error): it will be listed \
                         as invalid at boot; delete it again then",
                    );
                }
                self.step = 3;
            }
            _ => {}
        }
    }

    fn report_ok(&self, out: &mut dyn Write) -> fmt::Result {
        writeln!(
            out,
            "deleted snapshot {} (its COW store is invalidated and wiped)",
            self.name
        )
    }
}

control_task!(DeleteTask, "deleting", 4, markers);

/// What `snapshot rename` / `snapshot set` change in a snapshot's binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rebind {
    /// A new name (checked by the caller).
    Rename(String),
    /// Writable or read-only.
    Writable(bool),
    /// The auto-extend policy (`None`: off).
    AutoExtend(Option<snapshot::format::AutoExtend>),
}

/// An auto-extend policy as the console shows it: `at 70% by 20%`, `at 80% by 64 MiB`, `off`.
pub struct AutoText(pub Option<snapshot::format::AutoExtend>);

impl fmt::Display for AutoText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("off"),
            Some(p) => match p.by {
                snapshot::format::ExtendBy::Percent(n) => {
                    write!(f, "at {}% by {n}%", p.threshold)
                }
                snapshot::format::ExtendBy::Sectors(n) => {
                    write!(f, "at {}% by {} KiB", p.threshold, n / 2)
                }
            },
        }
    }
}

/// `snapshot rename` and `snapshot set`: rewrite the binding in the store (one sector, so a
/// power cut leaves the old or the new one), then apply the change in memory.
pub struct RebindTask {
    name: String,
    origin: usize,
    id: SnapId,
    change: Rebind,
    /// 0 start, 1 wait for the write, 2 done.
    step: u8,
    error: Option<&'static str>,
}

impl RebindTask {
    /// Applies `change` to snapshot `id` (named `name`) of `origin`.
    pub fn new(name: String, origin: usize, id: SnapId, change: Rebind) -> RebindTask {
        RebindTask {
            name,
            origin,
            id,
            change,
            step: 0,
            error: None,
        }
    }
}

impl RebindTask {
    fn run(&mut self, st: &mut Volumes) {
        let Some(o) = st.origins.get_mut(self.origin) else {
            self.fail("the origin went away");
            return;
        };
        match self.step {
            0 => {
                let Some(mut b) = o.engine.binding(self.id) else {
                    self.fail("its store has no snapfw binding (attached with --no-write): nothing to rewrite");
                    return;
                };
                match &self.change {
                    Rebind::Rename(new) => match BoundedBytes::new(new.as_bytes()) {
                        Some(n) => b.name = n,
                        None => {
                            self.fail("the new name is too long");
                            return;
                        }
                    },
                    Rebind::Writable(true) => {
                        b.flags |= snapshot::format::BINDING_FLAG_WRITABLE;
                    }
                    Rebind::Writable(false) => {
                        b.flags &= !snapshot::format::BINDING_FLAG_WRITABLE;
                    }
                    Rebind::AutoExtend(_) => {}
                }
                o.rebound = None;
                let asked = match &self.change {
                    Rebind::AutoExtend(p) => o.engine.set_autoextend(self.id, *p),
                    _ => o.engine.rewrite_binding(self.id, &b),
                };
                match asked {
                    Ok(()) => self.step = 1,
                    Err(_) => self.fail("the snapshot is busy or no longer active"),
                }
            }
            1 => {
                let Some(ok) = take_rebound(o, self.id) else {
                    return;
                };
                if !ok {
                    return self.fail("writing the binding failed (I/O error); nothing changed");
                }
                self.step = 2;
                if let Rebind::Writable(w) = self.change {
                    let _ = o.engine.set_writable(self.id, w);
                }
                if let Some(s) = o.snaps.iter_mut().find(|s| s.id == self.id) {
                    match &self.change {
                        Rebind::Rename(new) => s.name = new.clone(),
                        Rebind::Writable(w) => s.writable = *w,
                        Rebind::AutoExtend(_) => s.auto_blocked = false,
                    }
                }
            }
            _ => {}
        }
    }

    fn report_ok(&self, out: &mut dyn Write) -> fmt::Result {
        match &self.change {
            Rebind::Rename(new) => {
                writeln!(out, "renamed snapshot {} to {new}", self.name)
            }
            Rebind::Writable(true) => {
                writeln!(out, "snapshot {} is writable", self.name)
            }
            Rebind::Writable(false) => {
                writeln!(out, "snapshot {} is read-only", self.name)
            }
            Rebind::AutoExtend(p) => {
                writeln!(out, "snapshot {}: auto-extend {}", self.name, AutoText(*p))
            }
        }
    }
}

control_task!(RebindTask, "writing the binding of", 2);

/// `snapshot extend NAME SIZE`: grows a store into the free space after its region (or a
/// whole-device store into the device's new capacity). Free-extent markers for the space
/// left are written and flushed first (a boot before the binding grows still walks the old
/// layout: the old marker covers the whole gap); then the engine zeroes what must be zeroed
/// and rewrites the binding; the new size is used once that is durable.
pub struct ExtendTask {
    name: String,
    origin: usize,
    id: SnapId,
    cow_disk: usize,
    start: u64,
    sectors: u64,
    /// 0 markers, 1 ask the engine, 2 wait for the binding, 3 done.
    step: u8,
    markers: Option<MarkerWriter>,
    error: Option<&'static str>,
    used_percent: Option<u64>,
}

impl ExtendTask {
    /// Grows snapshot `id` of `origin`, whose store is on `cow_disk` from `start`, to
    /// `sectors` (checked by the caller: free, whole chunks, larger).
    pub fn new(
        name: String,
        origin: usize,
        id: SnapId,
        cow_disk: usize,
        start: u64,
        sectors: u64,
    ) -> ExtendTask {
        ExtendTask {
            name,
            origin,
            id,
            cow_disk,
            start,
            sectors,
            step: 0,
            markers: None,
            error: None,
            used_percent: None,
        }
    }
}

impl ExtendTask {
    fn run(&mut self, st: &mut Volumes) {
        if self.step == 0 {
            let (disk, region) = (self.cow_disk, (self.start, self.sectors));
            let m = self
                .markers
                .get_or_insert_with(|| MarkerWriter::new(st, disk, Some(region)));
            m.step(st);
            if m.done() {
                if m.error {
                    self.fail(
                        "writing free-extent markers failed (I/O error); the store is as it was",
                    );
                } else {
                    self.step = 1;
                }
            }
            return;
        }
        let Some(o) = st.origins.get_mut(self.origin) else {
            self.fail("the origin went away");
            return;
        };
        match self.step {
            1 => {
                let Some(mut b) = o.engine.binding(self.id) else {
                    self.fail("its store has no snapfw binding (attached with --no-write): the new size could not be recorded");
                    return;
                };
                b.region_start = self.start;
                b.region_sectors = self.sectors;
                o.rebound = None;
                match o.engine.extend_snapshot(self.id, self.sectors, &b, None) {
                    Ok(()) => self.step = 2,
                    Err(_) => self.fail("the snapshot is busy, invalid or no longer active"),
                }
            }
            2 => {
                let Some(ok) = take_rebound(o, self.id) else {
                    return;
                };
                if !ok {
                    return self
                        .fail("writing the larger binding failed; the store keeps its size");
                }
                self.step = 3;
                if let Some(s) = o.snaps.iter_mut().find(|s| s.id == self.id) {
                    s.cow_sectors = self.sectors;
                }
                if let Some(snapshot::Status::Usage(u)) = o.engine.status(self.id) {
                    self.used_percent = Some(u.allocated_sectors * 100 / u.total_sectors.max(1));
                }
            }
            _ => {}
        }
    }

    fn report_ok(&self, out: &mut dyn Write) -> fmt::Result {
        {
            write!(
                out,
                "extended snapshot {} to {} MiB",
                self.name,
                self.sectors / 2048
            )?;
            match self.used_percent {
                Some(p) => writeln!(out, " ({p}% used)"),
                None => writeln!(out),
            }
        }
    }
}

control_task!(ExtendTask, "extending", 3, markers);

#[derive(Clone, Copy, PartialEq, Eq)]
enum MergeStep {
    Quiesce,
    WaitQuiesced,
    Running,
    Done,
}

/// `snapshot merge NAME`: roll the origin back to the snapshot.
pub struct MergeTask {
    name: String,
    origin: usize,
    origin_name: String,
    id: SnapId,
    step: MergeStep,
    error: Option<&'static str>,
    detached: bool,
    started: u64,
    total: u64,
    chunk_bytes: u64,
    progress: Option<crate::origin::MergeView>,
}

impl MergeTask {
    /// Merges snapshot `id` of `origin`; the caller checked that it is active.
    pub fn new(name: String, origin: usize, origin_name: String, id: SnapId, now: u64) -> Self {
        MergeTask {
            name,
            origin,
            origin_name,
            id,
            step: MergeStep::Quiesce,
            error: None,
            detached: false,
            started: now,
            total: 0,
            chunk_bytes: 0,
            progress: None,
        }
    }
}

fn merge_error_text(e: MergeError) -> &'static str {
    match e {
        MergeError::NoSuchSnapshot => "the engine does not know this snapshot (or it is busy)",
        MergeError::SnapshotInvalid => "the snapshot is invalid; its contents are not whole",
        MergeError::AlreadyMerging => "another snapshot of this origin is being merged",
        MergeError::NotQuiesced => "the origin did not quiesce",
        MergeError::Busy => "the snapshot has I/O in flight; try again",
    }
}

impl Task for MergeTask {
    fn step(&mut self, st: &mut Volumes, now: u64) {
        let Some(o) = st.origins.get_mut(self.origin) else {
            self.error = Some("the origin went away");
            self.step = MergeStep::Done;
            return;
        };
        match self.step {
            MergeStep::Quiesce => {
                o.engine.quiesce_origin();
                self.step = MergeStep::WaitQuiesced;
            }
            MergeStep::WaitQuiesced if o.engine.is_quiesced() => {
                match o.engine.start_merge(self.id) {
                    Ok(()) => {
                        if let Some(s) = o.snaps.iter_mut().find(|s| s.id == self.id) {
                            s.state = SnapState::Merging;
                        }
                        if let Some(p) = o.engine.merge_progress() {
                            self.total = p.chunks_left;
                            self.chunk_bytes = u64::from(p.chunk_sectors) * 512;
                        }
                        self.started = now;
                        self.step = MergeStep::Running;
                    }
                    Err(e) => {
                        self.error = Some(merge_error_text(e));
                        self.step = MergeStep::Done;
                    }
                }
                o.engine.resume_origin();
            }
            MergeStep::Running => {
                self.progress = o.merge_view(self.id, now);
                match self.progress {
                    Some(p) if p.failed => {
                        self.error = Some(
                            "Merge failed (I/O error): I/O continues through the store; the merge resumes at the next boot",
                        );
                        self.step = MergeStep::Done;
                    }
                    Some(_) => {}
                    // The engine freed the slot: done.
                    None => self.step = MergeStep::Done,
                }
            }
            _ => {}
        }
    }

    fn complete(&mut self, pool: &mut BufferPool, c: Completion, _now: u64) {
        if let Some(b) = c.buffer {
            let _ = pool.release(b);
        }
    }

    fn done(&self) -> bool {
        self.step == MergeStep::Done
    }

    fn cancel(&mut self) {
        // A merge cannot be taken back halfway; Ctrl-C only gives the prompt back.
        if self.step == MergeStep::Running {
            self.detached = true;
            self.step = MergeStep::Done;
        }
    }

    fn progress(&self, out: &mut dyn Write, _now: u64) -> fmt::Result {
        match self.progress {
            Some(p) => write!(out, "merging {} into {}: {p}", self.name, self.origin_name),
            None => write!(out, "starting the merge of {}", self.name),
        }
    }

    fn report(&mut self, out: &mut dyn Write, now: u64) -> fmt::Result {
        if let Some(e) = self.error {
            return writeln!(out, "error: snapshot {}: {e}", self.name);
        }
        if self.detached {
            return writeln!(
                out,
                "merge of {} goes on in the background (see 'snapshot status {}')",
                self.name, self.name
            );
        }
        let ms = (now.saturating_sub(self.started) / 1_000_000).max(1);
        let bytes = self.total * self.chunk_bytes;
        writeln!(
            out,
            "merged {} into {}: {} chunks ({} KiB) in {} ms, {} MB/s",
            self.name,
            self.origin_name,
            self.total,
            bytes / 1024,
            ms,
            bytes / 1000 / ms
        )
    }
}
