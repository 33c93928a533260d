//! snapfw's copy-on-write snapshot engine.
//!
//! A `no_std` + `alloc`, sans-I/O crate: it takes volume requests and I/O completions and
//! returns the I/O it wants issued. The on-disk format is Linux dm-snapshot's persistent
//! exception store (see `shared/docs/dm-snapshot-format.md`), so a COW device written here can
//! be activated on Linux with `dmsetup ... snapshot <origin> <cow> P <chunk>`, and stores Linux
//! wrote load here.
//!
//! # Modules
//! - [`format`]: header, records, area geometry, snapfw's binding record (pure encode/decode).
//! - [`store`]: the sans-I/O [`Loader`] (validates a store and rebuilds its table) and the
//!   per-store state the engine appends to.
//! - [`table`]: the run-compressed exception table, growing as it fills up to a limit.
//! - [`engine`]: the [`Engine`] state machine.
//! - [`types`]: requests, I/Os, events, configuration.
//! - [`sim`]: simulated disks and a driver loop, for tests and the bench (not for the kernel).
//!
//! # Driving the engine (for the kernel integrator)
//!
//! One [`Engine`] per origin. Everything is deterministic: the same calls in the same order give
//! the same I/O. All memory is allocated in [`Engine::new`] (request slots, I/O slots, pending
//! exceptions, copy jobs, queues) and when a snapshot is created or attached (one area buffer,
//! one header block, and its exception table with room for 1024 more runs). The one
//! allocation on the I/O path is the exception table's growth: one fallible 16 KiB segment
//! per 1024 runs past that, asked for before a COW chunk is taken; when the heap cannot serve
//! it the snapshot is invalidated ([`InvalidReason::OutOfMemory`], dm-snapshot's `-ENOMEM`),
//! never a panic. When a pool is empty, work waits inside the engine; only
//! [`Engine::submit`] can say [`SubmitError::Busy`] (all request slots in use) — keep the
//! request and submit it again after a completion.
//!
//! ```text
//! loop {
//!     engine.tick(now);                        // ticks: any monotonic unit (µs suggested)
//!     engine.submit(VolumeRequest { tag, volume, op, sector, sectors })?;  // Busy => retry later
//!     while let Some(io) = engine.poll_io() {  // the I/O to issue, in order
//!         issue(io);                           // see "Buffers" below
//!     }
//!     // ... device completion for `io.token`:
//!     engine.complete_io(io.token, Ok(()) /* or Err(IoError) */)?;
//!     while let Some(c) = engine.poll_completion() { finish_volume_request(c.tag, c.result) }
//!     while let Some(e) = engine.poll_event() { console(e) } // usage 80/90 %, invalidation...
//! }
//! ```
//!
//! - **Volume requests** ([`VolumeRequest`]): `Volume::Origin` or `Volume::Snapshot(id)`;
//!   `Read`, `Write { fua }`, `Flush`; a sector range in 512-byte sectors; a caller `tag`. The
//!   caller keeps the data buffer until the request completes: I/Os name it as
//!   [`IoBuffer::Caller`]`{ tag, byte_offset }`. Poll completions regularly: the completion
//!   queue is sized to the request slots.
//! - **I/O** ([`Io`]): a device ([`Device::Origin`] or [`Device::Cow`]`(id)`), an op
//!   (`Read`, `Write { fua }`, `Flush`), a range in 512-byte sectors, a buffer and a token.
//!   Report every completion with [`Engine::complete_io`]; for reads the data must be in the
//!   buffer by then. Flush means: every write *completed* before the flush was issued is
//!   durable when it completes. FUA means the write is durable when it completes. A device
//!   without FUA: set `cow_fua: false` and the engine adds flushes itself.
//! - **Buffers**: [`IoBuffer::Caller`] (the volume request's buffer), [`IoBuffer::Copy`]
//!   (copy buffer `index` at `byte_offset`: the *caller* owns `copy_buffers` buffers of
//!   `copy_buffer_sectors * 512` bytes each, e.g. DMA memory; the engine only names them),
//!   [`IoBuffer::Meta`] (engine-owned bytes: header or metadata area; get them with
//!   [`Engine::meta_bytes`] when issuing the write; they do not change until it completes),
//!   [`IoBuffer::Zeroes`] (write zeroes), [`IoBuffer::None`] (flush).
//! - **Ticks**: [`Engine::tick`] sets the time. A group commit starts, while fewer than
//!   `commits_in_flight` commits run, when the origin is quiet (no copy in flight, no
//!   released origin write on the device, every finished request taken by the caller, who
//!   may write again at once, and no waiting request unseen since it arrived or since a
//!   copy buffer came free), when the area would fill, or when the oldest uncommitted
//!   exception has waited `hold_bound_ticks` (counted from the last commit's end at the
//!   earliest). With more than one commit in flight, newer commits flush while the oldest
//!   writes its area (area writes go down one at a time, in order).
//!   [`CommitPolicy::LinuxIdle`] reproduces Linux's rule. [`EngineStats::phases`] times each
//!   stage of a held write.
//! - **Creating a snapshot** on a fresh COW device: [`Engine::quiesce_origin`], wait for
//!   [`Event::OriginQuiesced`] (or [`Engine::is_quiesced`]), [`Engine::create_snapshot`]
//!   (flushes the origin, zeroes chunk 0 and area 0, flushes, then writes the header with FUA),
//!   wait for [`Event::SnapshotCreated`], then [`Engine::resume_origin`]. The snapshot holds
//!   the origin as of the quiesce.
//! - **Loading an existing store**: run a [`Loader`] (it asks for reads with
//!   [`Loader::next_read`], takes the bytes with [`Loader::supply`], then
//!   [`Loader::finish`] gives a [`LoadedStore`] or a [`LoadError`] naming the problem). The
//!   binding record is in [`LoadedStore::binding`] (`Err(BindingError::Absent)`: unbound, e.g.
//!   made by Linux). Attach it with [`Engine::attach_snapshot`] before origin writes flow.
//! - **Deleting**: quiesce, [`Engine::delete_snapshot`] (invalidates, wipes chunk 0),
//!   [`Event::SnapshotDeleted`], resume.
//! - **Status**: [`Engine::status`] gives a [`Status`] whose `Display` is what
//!   `dmsetup status` prints: `allocated/total metadata` (sectors), `Invalid`, `Overflow` or
//!   `Merge failed`.
//! - **Merging** (roll the origin back to a snapshot): quiesce, [`Engine::start_merge`]
//!   (typed refusals: [`MergeError`]), resume. See "Merging" below.
//! - **Failure policy** (as dm-snapshot): COW full, table full, a copy error or a metadata
//!   write error, or a table growth the heap cannot serve, invalidates that snapshot (header rewritten with `valid = 0`, made durable
//!   before any origin write waiting on it proceeds), fails its snapshot I/O and lets origin
//!   writes proceed. Origin I/O errors fail only the volume request. See "When the store
//!   cannot be invalidated" for where snapfw departs from dm-snapshot.
//!
//! # When the store cannot be invalidated
//! Invalidation is only safe once the header saying `valid = 0` is durable: until then a
//! crash (or a reboot) finds a store that loads as valid and reads the origin for every chunk
//! it has no copy of. If that header write (or its flush) fails, as on a COW device that went
//! read-only, dm-snapshot logs `write header failed` and releases the origin writes anyway
//! (`persistent_drop_snapshot()`, then `pending_complete()` in dm-snap.c), which leaves a
//! valid-looking store that reads the new origin data. snapfw does not release them:
//! - the snapshot is invalid in memory ([`Status::Invalid`], its own I/O fails) and
//!   [`Engine::invalidation_failed`] is true; [`Event::InvalidationFailed`] says so once;
//! - an origin write to a chunk the store has no copy of (one that would change what the store
//!   reads) fails with [`VolumeError::Io`]; writes to chunks the store has a copy of, reads,
//!   flushes, and every other snapshot go on. A merge of another snapshot waits before
//!   copying over such chunks;
//! - such a write first retries the header write when the last attempt ended at least
//!   [`EngineConfig::invalidation_retry_ticks`] ago (at most one attempt in flight; writes
//!   that arrive meanwhile wait for it). When an attempt succeeds (the device recovered),
//!   [`Event::InvalidationDurable`], the state ends and origin writes proceed as after any
//!   invalidation;
//! - deleting the snapshot ends it too (the operator gives the snapshot up; the wipe of chunk
//!   0 is tried, and if it fails too, [`Event::SnapshotWipeFailed`] says the store may still be
//!   found, with stale contents, on the device).
//!
//! Failing writes rather than holding them keeps clients from hanging on a device that may
//! never come back; failing only the writes that would make the store wrong keeps the origin
//! usable for everything else. The crash tests enumerate COW devices whose writes all fail
//! from some point (with and without their flushes, for good or for a while), failed writes
//! that land in part, and failing flushes. A device that acknowledges a flush without making
//! earlier writes durable is out of scope: the write ordering rests on flushes, and no engine
//! can tell such a flush from a real one (a test shows the enumeration catching it).
//!
//! # Merging
//! [`Engine::start_merge`] copies a snapshot's COW chunks back to the origin the way Linux's
//! `snapshot-merge` target does (module `merge.rs` under [`engine`] has the protocol): newest
//! records first, a run of chunks consecutive on both devices per copy (at most one copy
//! buffer; up to 8 runs from the top of an area copied in parallel as one batch), origin
//! flushed, then the batch's records zeroed and the area written with flush + FUA. Meanwhile the origin volume stays online and shows the snapshot's contents
//! plus new writes: chunks not merged yet are read and written on their COW chunk, the run
//! being merged waits, other chunks go to the origin and still copy into every *other*
//! snapshot first. The merging snapshot's own volume is refused ([`VolumeError::Merging`]).
//! Progress: [`Engine::merge_progress`] (chunks left of total). Events:
//! [`Event::MergeStarted`], [`Event::MergeDone`] (store empty and wiped, slot free),
//! [`Event::MergeFailed`] (an I/O error stopped it; I/O continues; status `Merge failed`).
//!
//! **Where "merging" is recorded.** Linux keeps it outside the store (LVM metadata selects the
//! `snapshot-merge` target). snapfw writes a 24-byte *merge marker* into chunk 0 at byte 256
//! (`"snapfwM2"`, flags, the saved chunk, CRC-32C; [`format::encode_merge_marker`]; the
//! 16-byte `"snapfwM1"` of earlier versions still reads): after the binding record,
//! in the first sector, in bytes Linux leaves zero and never reads, and independent of the
//! binding so an unbound store can merge too. The 16-byte header and the areas keep their
//! Linux meaning, so Linux's loader reads the store at every step of a merge (the snapshot it
//! sees is still the right snapshot). [`LoadedStore::merging`] reports the marker, and
//! [`Engine::attach_snapshot`] on such a store takes the merge up again: the origin is
//! served through it at once, and the merge runs after [`Engine::resume_merge`], which the
//! caller issues once every store of the origin is attached (boot: after discovery). The marker
//! goes away with the wipe of chunk 0 when the merge is done.
//!
//! **Marking the origin.** A half-merged origin is only right through its store. So that a
//! boot which finds the origin but not the store does not serve the mixture, the merge first
//! keeps origin chunk 0 in the store (its exception, or a free chunk it copies it into: the
//! *saved chunk*, named by the merge marker), then writes an [`OriginMarker`] over the
//! origin's first block; I/O to chunk 0 goes to the saved chunk while the merge runs, and
//! the merge writes it back last (the rest of the chunk, a flush, then the first block).
//! Linux does not know the saved chunk: a store moved to Linux in the middle of a merge
//! finishes there, but origin chunk 0 must then be copied back from the saved chunk by hand
//! (the origin marker names it; README shows the `dd` line).
//!
//! **Reading areas back.** A merge walks the areas backwards and reads each earlier area into
//! the snapshot's area buffer: an [`Io`] with `IoOp::Read` and [`IoBuffer::Meta`]; the caller
//! copies the data into [`Engine::meta_bytes_mut`] before completing it.
//!
//! # Memory
//! Per engine: `request_slots`, `io_slots`, `pending_exceptions`, `copy_buffers` small
//! descriptors (tens of bytes each) plus the queues. Per snapshot: one chunk for the area
//! image, one COW block for the header, and the exception table: 16 bytes per run it holds
//! (allocated by segments of 1024 runs as it fills, up to `table_runs`, at most one run per
//! chunk of the store) plus a power-of-two bucket array of `u32`, one per two allocated
//! runs. A run maps up to 8 consecutive origin chunks to 8 consecutive COW chunks, so a
//! sequential fill needs about `exceptions / 8` runs (under 3 bytes per exception) and a
//! random fill one run per exception (18 to 20 bytes). (Runs stay inside aligned groups of 8
//! origin chunks and are chained under their group, so a lookup or an insert walks one
//! chain.) When the table reaches
//! `table_runs` the snapshot overflows like a full COW device; nothing is reserved for the
//! worst case, so `table_runs` can be the store's chunk count.
//!
//! # Origin writes and chunk sizes
//! An origin write is checked against every chunk of every snapshot it covers (so in effect
//! it is split at the smallest chunk size); it is issued as one I/O once every one of those
//! chunks is safe.
//!
//! # Write ordering (the invariant the crash tests enumerate)
//! Origin write to a chunk some snapshot has not copied: hold it; allocate the next COW chunk
//! per snapshot; read the origin range once, write it to every snapshot (one write per run of
//! consecutive chunks); when the copies have completed, flush the COW device, then write the
//! area with FUA (zeroing the next area first when this one fills); only then issue the held
//! origin write. A commit whose copies had all completed before an earlier commit flush of
//! its snapshot was sent (on a device without FUA: the previous commit's flush after its area
//! write), and that flush has completed, relies on it and sends no flush of its own. Snapshot reads of a chunk whose copy is not complete go to the origin, and an
//! origin write waits for such reads to finish. Records are committed in allocation order.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod engine;
pub mod format;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod histogram;
pub mod sim;
pub mod store;
pub mod table;
pub mod types;

pub use engine::Engine;
pub use format::{
    Binding, BindingError, BoundedBytes, Header, MergeMarker, OriginId, OriginMarker, Record,
};
pub use store::{LoadError, LoadParams, LoadRead, LoadedStore, Loader, Usage};
pub use types::*;
