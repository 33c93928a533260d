//! The engine's public request, I/O and event types.
//!
//! A *volume request* is what a user of the appliance asks for (read/write/flush on the origin
//! or on a snapshot). An [`Io`] is what the engine asks the kernel to issue on a real device
//! (the origin or a snapshot's COW device). Both are plain values; see the crate docs for the
//! protocol.

use crate::format::Binding;

/// A snapshot slot of an [`Engine`](crate::Engine).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapId(pub u16);

/// A volume the appliance serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Volume {
    /// The origin device as users see it.
    Origin,
    /// A snapshot of the origin.
    Snapshot(SnapId),
}

/// What a volume request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeOp {
    /// Read `sectors` sectors into the caller's buffer.
    Read,
    /// Write `sectors` sectors from the caller's buffer; `fua` = durable on completion.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Make every write acknowledged before this request durable.
    Flush,
}

/// A request on a volume. The caller keeps the data buffer; the engine names it by `tag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeRequest {
    /// Caller's identifier; comes back in the [`VolumeCompletion`] and in [`IoBuffer::Caller`].
    pub tag: u64,
    /// Which volume.
    pub volume: Volume,
    /// Read, write or flush.
    pub op: VolumeOp,
    /// First sector (ignored for flush).
    pub sector: u64,
    /// Number of sectors (ignored for flush).
    pub sectors: u32,
}

/// Why a volume request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeError {
    /// A device reported an error.
    Io,
    /// The snapshot is invalid (overflowed, failed or deleted).
    SnapshotInvalid,
    /// The range is outside the volume, or empty.
    OutOfRange,
    /// Write to a read-only snapshot.
    ReadOnly,
    /// No such snapshot.
    NoSuchVolume,
    /// The snapshot is being merged into its origin: its own volume is gone (as with Linux's
    /// snapshot-merge target); read the origin instead, which shows the snapshot's contents.
    Merging,
}

/// A finished volume request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeCompletion {
    /// The request's tag.
    pub tag: u64,
    /// Outcome.
    pub result: Result<(), VolumeError>,
}

/// Why [`Engine::submit`](crate::Engine::submit) did not take a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every request slot is in use: keep the request and submit it again after a completion.
    Busy,
}

/// A device the engine issues I/O to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    /// The origin device.
    Origin,
    /// The COW device of a snapshot.
    Cow(SnapId),
}

/// Operation of an [`Io`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read into the buffer.
    Read,
    /// Write from the buffer; `fua`: durable when it completes.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Cache flush: every write completed before it was issued is durable when it completes.
    Flush,
}

/// Which metadata buffer of the engine an [`Io`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKind {
    /// The current metadata area (one chunk).
    Area,
    /// The header block (header + binding, one COW logical block).
    Header,
    /// The origin marker a merge writes over the origin's first block (one origin logical
    /// block; see [`OriginMarker`](crate::format::OriginMarker)).
    OriginMark,
    /// The free-extent marker an extension writes after the store's new end.
    ExtendMarker,
    /// Slot `N` of a merge's metadata area images, one chunk each: the area it takes runs
    /// from, or one below it, read ahead; a merge commit writes its area from its slot.
    MergeArea(u8),
}

/// Where the data of an [`Io`] lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBuffer {
    /// No data (flush).
    None,
    /// The caller's buffer of volume request `tag`, from `byte_offset`.
    Caller {
        /// Volume request tag.
        tag: u64,
        /// Offset into that request's buffer.
        byte_offset: u64,
    },
    /// Copy buffer `index` (owned by the caller, `copy_buffer_sectors * 512` bytes each).
    Copy {
        /// Buffer index, `0..EngineConfig::copy_buffers`.
        index: u32,
        /// Offset into the buffer.
        byte_offset: u64,
    },
    /// An engine-owned metadata buffer: get the bytes with
    /// [`Engine::meta_bytes`](crate::Engine::meta_bytes) when issuing a write. A *read* into
    /// it (only a merge reads an earlier metadata area back) must put the data into
    /// [`Engine::meta_bytes_mut`](crate::Engine::meta_bytes_mut) before
    /// [`Engine::complete_io`](crate::Engine::complete_io).
    Meta {
        /// Which snapshot's buffer.
        snap: SnapId,
        /// Area or header.
        kind: MetaKind,
    },
    /// Write zeroes (a zero page or the device's write-zeroes command).
    Zeroes,
}

/// Identifies an issued [`Io`]; give it back to [`Engine::complete_io`](crate::Engine::complete_io).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoToken(pub u64);

/// An I/O the engine wants issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    /// Completion token.
    pub token: IoToken,
    /// Target device.
    pub device: Device,
    /// Operation.
    pub op: IoOp,
    /// First sector (512-byte units).
    pub sector: u64,
    /// Length in sectors (0 for flush).
    pub sectors: u32,
    /// Data.
    pub buffer: IoBuffer,
}

/// A device error reported for an [`Io`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError;

/// Why a snapshot was invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidReason {
    /// The COW device is full (`Overflow`).
    CowFull,
    /// The in-memory exception table is full (`Overflow`).
    TableFull,
    /// Reading the origin chunk or writing its copy failed.
    CopyError,
    /// Writing metadata failed.
    MetadataError,
    /// Deleted by the operator.
    Deleted,
    /// The exception table had to grow and the heap could not serve it (dm-snapshot's
    /// `-ENOMEM` invalidation).
    OutOfMemory,
}

/// Something the console should hear about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A snapshot's COW usage crossed a threshold (percent).
    UsageThreshold {
        /// Snapshot.
        snap: SnapId,
        /// Threshold crossed.
        percent: u8,
    },
    /// A snapshot was invalidated.
    Invalidated {
        /// Snapshot.
        snap: SnapId,
        /// Why.
        reason: InvalidReason,
    },
    /// Writing the header that marks an invalidated snapshot's store invalid failed: the
    /// store may still load as valid. Until a retry succeeds, origin writes to chunks the
    /// store has no copy of fail with [`VolumeError::Io`] (see
    /// [`Engine::invalidation_failed`](crate::Engine::invalidation_failed)). Raised once per
    /// episode; the caller keeps alerting while the state lasts.
    InvalidationFailed {
        /// Snapshot.
        snap: SnapId,
    },
    /// A retried header write succeeded: the store is marked invalid on disk, origin writes
    /// go on.
    InvalidationDurable {
        /// Snapshot.
        snap: SnapId,
    },
    /// A binding rewritten by [`Engine::rewrite_binding`](crate::Engine::rewrite_binding) is
    /// durable (`ok`), or its write failed (the store keeps the binding it had on disk, or
    /// may hold either one if the failure tore nothing: a binding is one sector).
    BindingWritten {
        /// Snapshot.
        snap: SnapId,
        /// The new binding is durable.
        ok: bool,
    },
    /// Origin writes are quiesced (after [`Engine::quiesce_origin`](crate::Engine::quiesce_origin)).
    OriginQuiesced,
    /// A snapshot store is initialised and active.
    SnapshotCreated {
        /// Snapshot.
        snap: SnapId,
    },
    /// Initialising a snapshot store failed; the slot is free again.
    SnapshotCreateFailed {
        /// Snapshot.
        snap: SnapId,
    },
    /// A snapshot is wiped and forgotten.
    SnapshotDeleted {
        /// Snapshot.
        snap: SnapId,
    },
    /// Comes right before [`Event::SnapshotDeleted`] when writing zeroes over the store's
    /// header failed: the engine forgot the snapshot, but its store (marked invalid) may
    /// still be found on the device.
    SnapshotWipeFailed {
        /// Snapshot.
        snap: SnapId,
    },
    /// A merge is under way: its marker is durable in the store (or it was found there at
    /// attach time, `resumed`).
    MergeStarted {
        /// Snapshot being merged.
        snap: SnapId,
        /// Resumed from a store that was already merging.
        resumed: bool,
    },
    /// The merge finished: the origin holds the snapshot's contents, the store is wiped and
    /// the snapshot slot is free.
    MergeDone {
        /// The snapshot that was merged (its slot is free now).
        snap: SnapId,
    },
    /// The merge stopped on an I/O or metadata error (`dmsetup status`: `Merge failed`). I/O
    /// goes on; the store still says "merging", so attaching it again resumes the merge.
    MergeFailed {
        /// Snapshot.
        snap: SnapId,
    },
}

/// When group commits start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitPolicy {
    /// snapfw: with fewer than `commits_in_flight` commits running, when the origin is quiet
    /// (no copy in flight, no released origin write still on the device, every finished
    /// request taken with [`Engine::poll_completion`](crate::Engine::poll_completion), no
    /// waiting request unseen since it arrived or since a copy buffer came free), when
    /// the area is full, or when the oldest uncommitted exception has waited
    /// `hold_bound_ticks` since it was allocated or since the snapshot's last commit ended,
    /// whichever is later. Under a closed loop (each submitter writes again when its write
    /// completes) a commit then takes the whole queue.
    Grouped,
    /// Linux: only when no copy is in flight or the area is full.
    LinuxIdle,
}

/// Engine-wide sizing and policy, fixed at creation.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Origin capacity in sectors.
    pub origin_sectors: u64,
    /// Origin logical block size in sectors.
    pub origin_block_sectors: u32,
    /// Snapshot slots.
    pub max_snapshots: u16,
    /// Volume requests in the engine at once.
    pub request_slots: u32,
    /// I/Os outstanding (queued or issued) at once.
    pub io_slots: u32,
    /// Pending exceptions (allocated, not yet committed) across all snapshots.
    pub pending_exceptions: u32,
    /// Copy buffers (owned by the caller).
    pub copy_buffers: u32,
    /// Size of one copy buffer = the largest sequential copy, in sectors (a power of two, at
    /// least the largest chunk size).
    pub copy_buffer_sectors: u32,
    /// Group commit bound: start a commit once the oldest uncommitted exception has waited
    /// this long (counted from the end of the snapshot's last commit at the earliest).
    pub hold_bound_ticks: u64,
    /// Commits of one snapshot in flight at once (`Grouped` only; at least 1). One is best
    /// where flushes are serialised (QEMU, most SATA): a second commit costs two more flushes
    /// and splits the batch. Devices that run flushes in parallel may gain from more.
    pub commits_in_flight: u32,
    /// Commit policy.
    pub commit_policy: CommitPolicy,
    /// Usage percentages that raise an event.
    pub usage_thresholds: [u8; 2],
    /// When a snapshot's invalidating header write failed, the least time between attempts
    /// at it (an origin write that needs the store invalid on disk retries it when this much
    /// has passed since the last attempt, and fails at once otherwise). At least 1.
    pub invalidation_retry_ticks: u64,
    /// Test-only negative control: release held origin writes once the copy is written but
    /// before its record is durable. Breaks crash safety on purpose.
    #[doc(hidden)]
    pub unsafe_release_before_commit: bool,
    /// Test-only negative control: commit records without flushing the copied data first.
    /// Breaks crash safety on purpose.
    #[doc(hidden)]
    pub unsafe_skip_commit_flush: bool,
    /// Test-only negative control: a commit skips its flush when a commit flush *sent before*
    /// its last copy completed has completed (that flush need not cover the copy). Breaks
    /// crash safety on purpose.
    #[doc(hidden)]
    pub unsafe_flush_covers_earlier_copies: bool,
    /// Test-only negative control: zero merged records without flushing the origin first.
    /// Breaks crash safety on purpose.
    #[doc(hidden)]
    pub unsafe_merge_skip_origin_flush: bool,
    /// Test-only negative control: give a merged run's chunks back to the origin (I/O goes
    /// there) once the origin copy is durable but before the records are zeroed on disk.
    /// Breaks crash safety on purpose.
    #[doc(hidden)]
    pub unsafe_merge_release_early: bool,
    /// Test-only negative control: merge without marking the origin (a boot without the
    /// store would serve the half-merged origin).
    #[doc(hidden)]
    pub unsafe_merge_unmarked: bool,
    /// Test-only negative control: a merge batch that used up newer areas zeroes them
    /// before the origin flush (their records are gone before the copies are durable).
    /// Breaks crash safety on purpose.
    #[doc(hidden)]
    pub unsafe_merge_zero_areas_early: bool,
    /// Test-only negative control: a merge batch flushes the origin once its last copy
    /// write is issued rather than once every copy write is back (the flush need not cover
    /// the writes still in flight). Breaks crash safety on purpose.
    #[doc(hidden)]
    pub unsafe_merge_flush_early: bool,
    /// Test-only negative control: start a merge's next commit while the previous one's
    /// area write (FUA) is in flight, and release each commit's runs when its own area
    /// write is back, so a later commit's area write can land before an earlier one's.
    /// Breaks crash safety on purpose.
    #[doc(hidden)]
    pub unsafe_merge_commits_unordered: bool,
}

impl EngineConfig {
    /// Reasonable sizes for an origin of `origin_sectors` sectors.
    pub fn new(origin_sectors: u64) -> Self {
        EngineConfig {
            origin_sectors,
            origin_block_sectors: 1,
            max_snapshots: 8,
            request_slots: 128,
            io_slots: 512,
            pending_exceptions: 512,
            copy_buffers: 64,
            copy_buffer_sectors: 256,
            hold_bound_ticks: 4000,
            commits_in_flight: 1,
            commit_policy: CommitPolicy::Grouped,
            usage_thresholds: [80, 90],
            invalidation_retry_ticks: 1000,
            unsafe_release_before_commit: false,
            unsafe_skip_commit_flush: false,
            unsafe_flush_covers_earlier_copies: false,
            unsafe_merge_skip_origin_flush: false,
            unsafe_merge_release_early: false,
            unsafe_merge_unmarked: false,
            unsafe_merge_zero_areas_early: false,
            unsafe_merge_flush_early: false,
            unsafe_merge_commits_unordered: false,
        }
    }
}

/// Per-snapshot parameters.
#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    /// Chunk size in sectors (a power of two).
    pub chunk_sectors: u32,
    /// COW device capacity in sectors.
    pub cow_sectors: u64,
    /// COW device logical block size in sectors.
    pub cow_block_sectors: u32,
    /// COW device honours FUA (else the engine writes, then flushes).
    pub cow_fua: bool,
    /// Accept writes to the snapshot.
    pub writable: bool,
    /// The most runs the exception table may grow to (it starts empty and grows as it fills;
    /// at most one run per data chunk of the store is ever needed).
    pub table_runs: usize,
    /// Binding record to write into chunk 0 (None: unbound, as Linux writes it).
    pub binding: Option<Binding>,
}

/// Why an engine control call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineError {
    /// The configuration is inconsistent (zero pools, chunk size not a power of two, etc.).
    BadConfig,
    /// No free snapshot slot.
    NoSnapshotSlot,
    /// The origin must be quiesced first.
    NotQuiesced,
    /// No such snapshot.
    NoSuchSnapshot,
    /// Unknown or stale I/O token.
    UnknownToken,
    /// The loaded store does not match the configuration (chunk size, COW size).
    StoreMismatch,
    /// A merge runs on this origin: no store can be attached (the origin already holds merged
    /// chunks it never copied), nor a snapshot created; or the loaded store is merging too.
    MergeRunning,
    /// The snapshot's binding is being rewritten already; try again when it is durable.
    Busy,
    /// A new store size that does not grow it by whole chunks.
    BadSize,
}

/// Why [`Engine::start_merge`](crate::Engine::start_merge) refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeError {
    /// No such snapshot (or it is being created, deleted or merged).
    NoSuchSnapshot,
    /// The snapshot is invalid or overflowed: its contents are not whole.
    SnapshotInvalid,
    /// A merge already runs on this origin (one at a time, as with Linux).
    AlreadyMerging,
    /// The origin must be quiesced first (no origin write in flight).
    NotQuiesced,
    /// The snapshot still has I/O, uncommitted exceptions or metadata writes in flight; try
    /// again once they are done.
    Busy,
}

/// How far a merge is, for the console (`merging`, chunks left; rate and ETA are the
/// caller's arithmetic over time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeProgress {
    /// The snapshot being merged.
    pub snap: SnapId,
    /// Chunks the store held when this merge started (or resumed).
    pub chunks_total: u64,
    /// Chunks not merged yet.
    pub chunks_left: u64,
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
    /// The merge stopped on an error (`Merge failed`).
    pub failed: bool,
    /// The origin carries the origin marker while the merge runs (its chunk 0 is kept in
    /// the store), so a boot without the store keeps it read-only. False only when the store
    /// had no free chunk to keep chunk 0 in.
    pub origin_marked: bool,
}

/// Snapshot status as `dmsetup status` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `allocated/total metadata`, all in sectors.
    Usage(crate::store::Usage),
    /// `Invalid`.
    Invalid,
    /// `Overflow`.
    Overflow,
    /// `Merge failed`.
    MergeFailed,
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Status::Usage(u) => write!(
                f,
                "{}/{} {}",
                u.allocated_sectors, u.total_sectors, u.metadata_sectors
            ),
            Status::Invalid => f.write_str("Invalid"),
            Status::Overflow => f.write_str("Overflow"),
            Status::MergeFailed => f.write_str("Merge failed"),
        }
    }
}

/// Counters for benches and the console.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Origin writes admitted.
    pub origin_writes: u64,
    /// Origin writes that had to wait for a copy (and its commit) before going down.
    pub held_writes: u64,
    /// How long held writes waited, in engine ticks, from first held to issued.
    pub hold_ticks: crate::histogram::Histogram,
    /// Commits completed.
    pub commits: u64,
    /// Records made durable by commits.
    pub records_committed: u64,
    /// Flushes issued to COW devices by commits.
    pub commit_flushes: u64,
    /// Commits that sent no flush before their area write: a commit flush sent after all
    /// their copies had completed (the previous commit's, after its area write) had made
    /// them durable already.
    pub commit_flushes_saved: u64,
    /// Copy jobs (one origin read each).
    pub copy_jobs: u64,
    /// Copy writes (one per snapshot and run).
    pub copy_writes: u64,
    /// Origin writes failed because a snapshot's store could not be marked invalid (see
    /// [`Engine::invalidation_failed`](crate::Engine::invalidation_failed)).
    pub origin_writes_refused: u64,
    /// Where the time of a first write goes, in engine ticks (see [`PhaseTimes`]).
    pub phases: PhaseTimes,
    /// Requests issued when they were submitted, without a pass over the waiting ones: origin
    /// writes to chunks every snapshot has copied, origin and snapshot reads.
    pub fast_requests: u64,
    /// Times a waiting request was looked at again by a pass (what the fast path saves).
    pub requests_examined: u64,
    /// Merge batches (each: one origin flush, one COW flush, one area write).
    pub merge_batches: u64,
    /// Metadata areas a merge batch used up and zeroed before writing the area below it.
    pub merge_areas_zeroed: u64,
    /// Metadata areas a merge read ahead (while the batches above them were merged).
    pub merge_areas_read_ahead: u64,
}

/// A count of events and their summed duration in engine ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseTime {
    /// Events timed.
    pub count: u64,
    /// Their total duration, in ticks.
    pub ticks: u64,
}

impl PhaseTime {
    /// Adds one event that took `ticks`.
    pub fn add(&mut self, ticks: u64) {
        self.count += 1;
        self.ticks = self.ticks.saturating_add(ticks);
    }

    /// Mean duration in ticks (0 when nothing was timed).
    pub fn mean(&self) -> u64 {
        self.ticks / self.count.max(1)
    }
}

/// The stages a held origin write goes through, each timed on its own, so that a slow
/// snapshot path can be traced to the device (I/O latencies) or to the commit policy
/// (batch wait). I/O latencies run from the engine emitting the I/O to its completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseTimes {
    /// Copy reads from the origin.
    pub copy_read: PhaseTime,
    /// Copy writes to a COW device.
    pub copy_write: PhaseTime,
    /// Flushes issued by commits.
    pub commit_flush: PhaseTime,
    /// Metadata area writes issued by commits.
    pub area_write: PhaseTime,
    /// Origin writes sent to the device.
    pub origin_write: PhaseTime,
    /// Pending exception: allocated until its copy is on the COW device.
    pub copy: PhaseTime,
    /// Pending exception: copied until a commit takes it.
    pub batch_wait: PhaseTime,
    /// Commit: started until its records are durable (one event per commit).
    pub commit: PhaseTime,
}
