//! Volumes served through the snapshot engine: a device that is the origin of snapshots, and
//! the snapshots themselves. One [`Origin`] per origin device owns an engine (`snapshot`
//! crate); volume requests go in, the engine's I/O goes to the origin and COW devices, and
//! device completions go back to the engine.
//!
//! Buffers: the engine names the caller's buffer, its copy buffers, its metadata or zeroes.
//! The caller's buffer and the copy buffers are DMA buffers: an I/O on the whole of a
//! caller's buffer, or on part of a copy buffer (windowed), lends that buffer to the device,
//! so a copy is read into its copy buffer and written from it with no CPU copy. Everything
//! else (metadata, zeroes, merged copy writes, part of a caller's buffer, a buffer another
//! staged I/O still needs) is carried by a DMA bounce buffer from the origin's own pool,
//! filled from (writes) or copied into (reads) what the engine named. Every DMA buffer is
//! owned by exactly one request at a time. All of it is allocated when the origin is set up;
//! the I/O path does not allocate (the one exception is the growth of a snapshot's exception
//! table, fallible and inside the engine: see `snapshot::table`).
//!
//! Large I/O: chunks go up to 512 KiB, so the engine's area writes, zeroing writes and copies
//! can be larger than a device takes in one request (virtio-blk: 128 KiB) or than a bounce
//! buffer. Such an I/O is split here into pieces of the device's transfer limit, issued in
//! order through bounce buffers, and completed to the engine once every piece has (with an
//! error if any piece failed). The engine keeps its one-I/O view, so its ordering rules hold.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use crate::Platform;
use drivers::block::{
    BlockError, BlockRequest, BufferPool, Completion, DmaBuf, Geometry, Operation,
};
use drivers::service::BoxedDevice;
use snapshot::{
    Device, Engine, EngineConfig, Event, InvalidReason, Io, IoBuffer, IoError, IoOp, IoToken,
    SnapId, Volume, VolumeError, VolumeOp, VolumeRequest,
};

/// The device tag of engine I/O `slot` of origin `index`: its completion comes back here.
fn engine_tag(index: usize, slot: u32) -> u64 {
    crate::port::Port::Engine {
        origin: index as u32,
        slot,
    }
    .tag()
}

/// Marks an engine-port slot that names a request slot whose own buffer the device has for
/// the request's direct I/O (`Origin::issue_direct`), not an I/O slot.
const DIRECT_SLOT: u32 = 1 << 31;

/// Engine I/Os in flight per origin (bounce buffers).
const BOUNCE_BUFFERS: usize = 64;
/// Copy buffers per origin, and their size in sectors: the largest sequential copy, and the
/// largest chunk size served (512 KiB, as dm-snapshot and LVM allow). 16 MiB of DMA memory
/// per origin. A copy holds its buffer from its read until its write is back, so this is how
/// many copies run at once: one per write of a QD32 client, whose first writes then copy in
/// one burst of reads and one (merged) copy write; with 16 they went in two rounds, each
/// waiting for the other's write.
const COPY_BUFFERS: u32 = 32;
pub const COPY_BUFFER_SECTORS: u32 = 1024;
/// Engine I/Os taken from the engine ahead of issuing, so that copy writes to consecutive
/// COW chunks go down as one device write (random origin chunks get consecutive COW
/// chunks, and their copy reads finish in batches).
const STAGED_IOS: usize = 64;
/// Most copy writes merged into one device write.
const MERGE_PARTS: usize = 32;
/// Largest copy write merged with others. Merging costs a CPU copy into a bounce buffer
/// (about 0.4 us per KiB under TCG) to save a device request (10-20 us): worth it for small
/// chunks, not for large ones, which go down in their own copy buffers. With 64 KiB chunks
/// on NVMe (512 KiB transfers) merging four copies a write spent 78 % of the CPU in memcpy
/// and ran 128 KiB writes at 4.5 k IOPS, against 7.0 k unmerged.
const MERGE_PART_MAX_SECTORS: u32 = 64;
/// No next part.
const NO_PART: u32 = u32::MAX;
/// The copy buffers' pool ID: the bounce pool's with this bit flipped.
const COPY_POOL_BIT: u16 = 0x4000;
/// After a snapshot's store could not be marked invalid, the least time between attempts at
/// its header write (engine ticks are microseconds): 1 s.
const INVALIDATION_RETRY_TICKS: u64 = 1_000_000;
/// The console alert for such a snapshot repeats after 10 s, then twice as long each time,
/// up to every 10 minutes, until it is deleted or a retry works.
const UNMARKED_ALERT_FIRST_NS: u64 = 10_000_000_000;
const UNMARKED_ALERT_MAX_NS: u64 = 600_000_000_000;

/// Where a snapshot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapState {
    /// The store is being initialised.
    Creating,
    /// Serving.
    Active,
    /// Invalidated (overflow, I/O error); the reason is in `invalid`.
    Invalid,
    /// Creation failed; the entry goes away.
    Failed,
    /// Being deleted.
    Deleting,
    /// Deleted; the entry goes away.
    Deleted,
    /// Being merged into its origin (its own volume is gone; the origin shows it).
    Merging,
    /// Its merge stopped on an error (`Merge failed`); origin I/O goes on through the store.
    MergeFailed,
}

/// A snapshot of an origin.
#[derive(Debug)]
pub struct Snap {
    /// Its volume name.
    pub name: String,
    /// The engine's slot.
    pub id: SnapId,
    /// Unique since boot and never reused (`Volumes::new_instance`): what an NBD export
    /// handle names, so a session on a deleted snapshot never reaches a later one that
    /// reuses its name or slot.
    pub instance: u32,
    /// The device holding its COW store.
    pub cow_disk: usize,
    /// First sector of the store on that device.
    pub cow_start: u64,
    /// Size of the store in sectors.
    pub cow_sectors: u64,
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
    /// Accepts writes.
    pub writable: bool,
    /// Life cycle.
    pub state: SnapState,
    /// Why it was invalidated.
    pub invalid: Option<InvalidReason>,
    /// Auto-extend found no room the last time it was due (said once until it finds some).
    pub auto_blocked: bool,
}

impl Snap {
    /// Whether its volume serves I/O (active, or invalid and answering with errors).
    pub fn serving(&self) -> bool {
        matches!(self.state, SnapState::Active | SnapState::Invalid)
    }
}

struct Held {
    task_tag: u64,
    op: Operation,
    lba: u64,
    /// The caller's data buffer (none for a flush, and none while it is lent).
    buffer: Option<DmaBuf>,
    /// `buffer` is lent to the device for an engine I/O that covers all of it.
    lent: bool,
    /// Engine I/Os in flight that copy from or into `buffer` through a bounce buffer.
    bounced: u16,
    /// The engine's token of this request's direct I/O while the device has `buffer` for it
    /// under the request's own slot (see `Origin::issue_direct`).
    direct: Option<IoToken>,
}

struct Issued {
    token: IoToken,
    /// For reads: where the data goes.
    read_into: Option<IoBuffer>,
    /// The request whose buffer this I/O uses (lent or through a bounce buffer).
    caller: Option<u64>,
    /// The device has the caller's own buffer: it goes back to the request on completion.
    lent: bool,
    /// The device has this copy buffer (windowed to the I/O): it goes home on completion.
    lent_copy: Option<u32>,
    /// The next engine I/O merged into the same device write (its slot), or `NO_PART`.
    next: u32,
    /// The engine I/O is larger than one device request: it goes down in pieces.
    split: Option<Split>,
}

/// An engine I/O issued in pieces of at most `piece` bytes.
#[derive(Clone, Copy)]
struct Split {
    io: Io,
    disk: usize,
    /// The device LBA of the I/O's first byte, and the device's block size.
    lba: u64,
    block: u64,
    piece: usize,
    /// Bytes issued so far; pieces in flight; whether one failed.
    issued: usize,
    inflight: u16,
    failed: bool,
}

/// An origin device with its engine and snapshots.
pub struct Origin {
    /// The origin device.
    pub disk: usize,
    /// The engine.
    pub engine: Engine,
    /// Its snapshots.
    pub snaps: Vec<Snap>,
    /// A `snapshot create` is under way: from its quiesce on, NBD requests to the device go
    /// through the engine (where they wait), not straight to the device.
    pub creating: bool,
    /// The engine's copy buffers, one DMA buffer each (`None` while lent to a device).
    copy: Vec<Option<DmaBuf>>,
    requests: Vec<Option<Held>>,
    free_requests: Vec<u32>,
    ios: Vec<Option<Issued>>,
    free_ios: Vec<u32>,
    bounce: BufferPool,
    /// Engine I/Os taken from the engine and not issued yet, in the engine's order.
    staged: VecDeque<Io>,
    /// The I/O slot of a split I/O whose pieces are not all issued yet: it goes first.
    splitting: Option<u32>,
    /// Copy writes that went down merged with others, and the device writes they made.
    pub merged_copy_writes: u64,
    /// Device writes made of merged copy writes.
    pub merged_device_writes: u64,
    /// Engine I/Os that went to the device in a copy buffer itself (no CPU copy).
    pub lent_copy_ios: u64,
    /// Requests the engine's fast path handed straight back to be issued at submission
    /// (`Engine::submit_direct`): no engine I/O slot, no pass through `staged`.
    pub direct_ios: u64,
    /// The last deleted snapshot whose store could not be wiped (the delete task reports it).
    pub wipe_failed: Option<SnapId>,
    /// The outcome of the last binding rewrite (`snapshot rename`, `snapshot set`), for the
    /// task that asked for it.
    pub rebound: Option<(SnapId, bool)>,
    /// An auto-extension under way: the snapshot and its new size.
    pub auto_extending: Option<(SnapId, u64)>,
    /// Origin-device sectors per logical block.
    block_sectors: u64,
    /// When the running merge started (uptime ns) and how many chunks it had left then: the
    /// rate and ETA the console shows.
    merge_clock: Option<(u64, u64)>,
    /// While a snapshot's store could not be marked invalid: when the next alert is due
    /// (uptime ns) and the gap after it.
    unmarked_alert: Option<(u64, u64)>,
}

/// A merge's progress as the console shows it.
#[derive(Clone, Copy, Debug)]
pub struct MergeView {
    /// Chunks not merged yet.
    pub chunks_left: u64,
    /// Chunks the store held when the merge started (or resumed).
    pub chunks_total: u64,
    /// Bytes per chunk.
    pub chunk_bytes: u64,
    /// Merge rate since it started, in kB/s (None before the first run is done).
    pub kb_per_s: Option<u64>,
    /// Seconds left at that rate.
    pub eta_s: Option<u64>,
    /// Stopped on an error.
    pub failed: bool,
}

impl core::fmt::Display for MergeView {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} of {} chunks left ({} MiB)",
            self.chunks_left,
            self.chunks_total,
            (self.chunks_left * self.chunk_bytes) >> 20
        )?;
        if self.failed {
            return f.write_str(", Merge failed");
        }
        match (self.kb_per_s, self.eta_s) {
            (Some(r), Some(eta)) => {
                write!(f, ", {}.{} MB/s, ETA {eta} s", r / 1000, r % 1000 / 100)
            }
            _ => f.write_str(", rate not known yet"),
        }
    }
}

/// Why an origin could not be set up.
pub type SetupError = &'static str;

impl Origin {
    /// Sets up the engine and buffers for `disk` (pool id `pool_id` for the bounce buffers,
    /// from `platform`'s DMA memory; `pool_bytes`: the size of the disk's own pool buffers,
    /// which bounce buffers need not exceed).
    pub fn new(
        disk: usize,
        device: &BoxedDevice,
        pool_id: u16,
        pool_bytes: usize,
        platform: &Platform,
    ) -> Result<Origin, SetupError> {
        let g = device.geometry();
        let block_sectors = u64::from((g.block_size / 512).max(1));
        let mut cfg = EngineConfig::new(g.capacity_blocks * block_sectors);
        cfg.origin_block_sectors = block_sectors as u32;
        cfg.copy_buffers = COPY_BUFFERS;
        cfg.copy_buffer_sectors = COPY_BUFFER_SECTORS;
        cfg.invalidation_retry_ticks = INVALIDATION_RETRY_TICKS;
        let request_slots = cfg.request_slots as usize;
        let io_slots = cfg.io_slots as usize;
        let engine =
            Engine::new(cfg).map_err(|_| "the snapshot engine refused its configuration")?;
        let copy_bytes = COPY_BUFFER_SECTORS as usize * 512;
        // Copy buffers are DMA buffers, lent to the devices: a copy is read into one and
        // written from it with no CPU copy (see `issue_one`). Their pool only hands them out
        // here; they stay with the origin.
        let mut copy_pool =
            (platform.buffer_pool)(pool_id ^ COPY_POOL_BIT, COPY_BUFFERS as usize, copy_bytes)
                .map_err(|_| "no DMA memory for the snapshot engine's copy buffers")?;
        let mut copy = Vec::with_capacity(COPY_BUFFERS as usize);
        while let Some(b) = copy_pool.acquire() {
            copy.push(Some(b));
        }
        // Bounce buffers carry one device request each: larger engine I/O is split. A device
        // whose limit is above its pool buffers' (virtio-blk) takes that much only from lent
        // copy buffers.
        let bounce_bytes = crate::MAX_TRANSFER.max(pool_bytes.min(g.max_transfer_bytes as usize));
        let bounce = (platform.buffer_pool)(pool_id, BOUNCE_BUFFERS, bounce_bytes)
            .map_err(|_| "no DMA memory for the snapshot engine's buffers")?;
        Ok(Origin {
            disk,
            engine,
            snaps: Vec::new(),
            creating: false,
            copy,
            requests: (0..request_slots).map(|_| None).collect(),
            free_requests: (0..request_slots as u32).rev().collect(),
            ios: (0..io_slots).map(|_| None).collect(),
            free_ios: (0..io_slots as u32).rev().collect(),
            bounce,
            // The engine's I/Os `issue` takes ahead (and one it puts back), and a direct I/O
            // per request slot that a full device queue sent here: it never grows.
            staged: VecDeque::with_capacity(STAGED_IOS + 1 + request_slots),
            splitting: None,
            merged_copy_writes: 0,
            merged_device_writes: 0,
            lent_copy_ios: 0,
            direct_ios: 0,
            wipe_failed: None,
            rebound: None,
            auto_extending: None,
            block_sectors,
            merge_clock: None,
            unmarked_alert: None,
        })
    }

    /// The snapshot called `name`.
    pub fn snap(&self, name: &str) -> Option<&Snap> {
        self.snaps.iter().find(|s| s.name == name)
    }

    /// Progress of the merge of `id`, if it is being merged.
    pub fn merge_view(&self, id: SnapId, now_ns: u64) -> Option<MergeView> {
        let p = self.engine.merge_progress().filter(|p| p.snap == id)?;
        let chunk_bytes = u64::from(p.chunk_sectors) * 512;
        let (kb_per_s, eta_s) = match self.merge_clock {
            Some((start, left_then)) if left_then > p.chunks_left && now_ns > start => {
                let done = (left_then - p.chunks_left) * chunk_bytes;
                let elapsed = now_ns - start;
                let kbs = (u128::from(done) * 1_000_000 / u128::from(elapsed)) as u64;
                let eta = u128::from(p.chunks_left * chunk_bytes) * u128::from(elapsed)
                    / u128::from(done)
                    / 1_000_000_000;
                (Some(kbs), Some(eta as u64))
            }
            _ => (None, None),
        };
        Some(MergeView {
            chunks_left: p.chunks_left,
            chunks_total: p.chunks_total,
            chunk_bytes,
            kb_per_s,
            eta_s,
            failed: p.failed,
        })
    }

    fn snap_by_id(&mut self, id: SnapId) -> Option<&mut Snap> {
        self.snaps.iter_mut().find(|s| s.id == id)
    }

    /// Takes a volume request (this is origin `index` of `devices`); on refusal the request
    /// comes back with the reason. A request the engine's fast path issues at once (an
    /// overwrite of copied chunks, an origin or snapshot read) goes to its device here, with
    /// no pass through the engine's outbox or `staged`.
    pub fn submit(
        &mut self,
        index: usize,
        devices: &mut [BoxedDevice],
        volume: Volume,
        request: BlockRequest,
    ) -> Result<(), (BlockError, Option<DmaBuf>)> {
        let Some(slot) = self.free_requests.pop() else {
            return Err((BlockError::QueueFull, request.buffer));
        };
        let (op, sectors) = match request.op {
            Operation::Read => (
                VolumeOp::Read,
                request.buffer.as_ref().map_or(0, |b| b.len() / 512),
            ),
            Operation::Write { fua } => (
                VolumeOp::Write { fua },
                request.buffer.as_ref().map_or(0, |b| b.len() / 512),
            ),
            Operation::Flush => (VolumeOp::Flush, 0),
            Operation::Discard { .. } => {
                self.free_requests.push(slot);
                return Err((BlockError::Unsupported, request.buffer));
            }
        };
        if request.buffer.is_none() && op != VolumeOp::Flush {
            self.free_requests.push(slot);
            return Err((BlockError::MissingBuffer, None));
        }
        let vr = VolumeRequest {
            tag: u64::from(slot),
            volume,
            op,
            sector: request.lba * self.block_sectors,
            sectors: sectors as u32,
        };
        match self.engine.submit_direct(vr) {
            Ok(direct) => {
                self.requests[slot as usize] = Some(Held {
                    task_tag: request.tag,
                    op: request.op,
                    lba: request.lba,
                    buffer: request.buffer,
                    lent: false,
                    bounced: 0,
                    direct: None,
                });
                if let Some(io) = direct {
                    self.direct_ios += 1;
                    if let Err(io) = self.issue_direct(index, devices, io) {
                        // Must wait (no slot, queue full): `issue` sends it later.
                        // Within its capacity: one direct I/O per request slot at most.
                        debug_assert!(self.staged.len() < self.staged.capacity());
                        self.staged.push_back(io);
                    }
                }
                Ok(())
            }
            Err(_) => {
                self.free_requests.push(slot);
                Err((BlockError::QueueFull, request.buffer))
            }
        }
    }

    /// Issues the engine's I/O to the devices, as far as buffers and queues allow.
    pub fn issue(&mut self, index: usize, devices: &mut [BoxedDevice]) {
        loop {
            // A split I/O's remaining pieces go before anything after it.
            if let Some(slot) = self.splitting {
                if !self.issue_pieces(index, devices, slot) {
                    return;
                }
            }
            while self.staged.len() < STAGED_IOS {
                match self.engine.poll_io() {
                    Some(io) => self.staged.push_back(io),
                    None => break,
                }
            }
            let Some(io) = self.staged.pop_front() else {
                return;
            };
            if !self.buffer_home(&io) {
                // Its copy buffer is with the device for another I/O: wait for it, in order.
                self.staged.push_front(io);
                return;
            }
            let mut parts = [0usize; MERGE_PARTS];
            let n = self.mergeable(&io, devices, &mut parts);
            let issued = if n == 0 {
                self.issue_one(index, devices, io)
            } else {
                self.issue_merged(index, devices, io, &mut parts[..n])
            };
            if let Err(io) = issued {
                // Must wait (no buffer, no slot, queue full): keep the engine's order.
                self.staged.push_front(io);
                return;
            }
        }
    }

    /// Issues a request's direct I/O (from `Engine::submit_direct`). On the whole of the
    /// request's buffer, within one device request, the buffer goes to the device under the
    /// request's own slot (`DIRECT_SLOT`), with no I/O slot; anything else (a piece of a
    /// snapshot read, a transfer over the device's limit) goes the general way. Gives `io`
    /// back when it must wait (a split under way, a full queue).
    fn issue_direct(
        &mut self,
        index: usize,
        devices: &mut [BoxedDevice],
        io: Io,
    ) -> Result<(), Io> {
        if self.splitting.is_some() {
            // Its pieces go first (see `issue`).
            return Err(io);
        }
        let (
            IoBuffer::Caller {
                tag,
                byte_offset: 0,
            },
            IoOp::Read | IoOp::Write { .. },
        ) = (io.buffer, io.op)
        else {
            return self.issue_one(index, devices, io);
        };
        let Some((disk, offset)) = self.placement(io.device) else {
            return self.issue_one(index, devices, io);
        };
        let Some(device) = devices.get_mut(disk) else {
            return self.issue_one(index, devices, io);
        };
        let len = io.sectors as usize * 512;
        let geometry = device.geometry();
        let Some(held) = self.requests.get_mut(tag as usize).and_then(Option::as_mut) else {
            return self.issue_one(index, devices, io);
        };
        let whole = held.buffer.as_ref().is_some_and(|b| b.len() == len);
        if !whole || held.lent || held.bounced > 0 || len > geometry.max_transfer_bytes as usize {
            return self.issue_one(index, devices, io);
        }
        let Some(buffer) = held.buffer.take() else {
            return self.issue_one(index, devices, io);
        };
        let device_tag = engine_tag(index, DIRECT_SLOT | tag as u32);
        let lba = geometry_lba(&geometry, io.sector + offset);
        let request = match io.op {
            IoOp::Write { fua } => BlockRequest::write(device_tag, lba, buffer, fua),
            _ => BlockRequest::read(device_tag, lba, buffer),
        };
        match device.submit(request) {
            Ok(()) => {
                held.lent = true;
                held.direct = Some(io.token);
                Ok(())
            }
            Err(rejected) => {
                held.buffer = rejected.request.buffer;
                if rejected.error == BlockError::QueueFull {
                    Err(io)
                } else {
                    let _ = self.engine.complete_io(io.token, Err(IoError));
                    Ok(())
                }
            }
        }
    }

    /// A direct I/O is back (see `issue_direct`): the buffer (with a read's data) goes
    /// back to request `slot`, the result to the engine.
    fn complete_direct(&mut self, slot: u32, completion: Completion) {
        let Some(held) = self
            .requests
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        else {
            // Unreachable: a request completes only after its I/O did.
            log::error!("snapshot engine: completion for request slot {slot}, which is free");
            return;
        };
        let Some(token) = held.direct.take() else {
            log::error!(
                "snapshot engine: completion for request slot {slot}, which has no direct I/O"
            );
            return;
        };
        match completion.buffer {
            Some(b) => held.buffer = Some(b),
            None => log::error!("snapshot engine: request slot {slot}'s buffer did not come back"),
        }
        held.lent = false;
        let _ = self
            .engine
            .complete_io(token, completion.result.map_err(|_| IoError));
    }

    /// The disk an engine device lives on, and its offset there in sectors (None: the
    /// snapshot is gone).
    fn placement(&self, device: Device) -> Option<(usize, u64)> {
        match device {
            Device::Origin => Some((self.disk, 0)),
            Device::Cow(id) => self
                .snaps
                .iter()
                .find(|s| s.id == id)
                .map(|s| (s.cow_disk, s.cow_start)),
        }
    }

    /// Finds staged copy writes that continue `io` on its COW device (each starting where
    /// the run so far ends), up to one bounce buffer and the device's largest transfer.
    /// Their positions in `staged` go into `parts`; returns how many.
    fn mergeable(&self, io: &Io, devices: &[BoxedDevice], parts: &mut [usize]) -> usize {
        let is_copy_write = |io: &Io| {
            matches!(io.device, Device::Cow(_))
                && io.op == IoOp::Write { fua: false }
                && matches!(io.buffer, IoBuffer::Copy { .. })
        };
        if !is_copy_write(io) || io.sectors > MERGE_PART_MAX_SECTORS {
            return 0;
        }
        let Some(device) = self
            .placement(io.device)
            .and_then(|(disk, _)| devices.get(disk))
        else {
            return 0;
        };
        let limit =
            (device.geometry().max_transfer_bytes as usize).min(self.bounce.buffer_size()) / 512;
        let mut end = io.sector + u64::from(io.sectors);
        let mut sectors = io.sectors as usize;
        let mut n = 0;
        while n < parts.len() {
            let next = self.staged.iter().position(|s| {
                is_copy_write(s)
                    && s.device == io.device
                    && s.sector == end
                    && s.sectors <= MERGE_PART_MAX_SECTORS
                    && self.buffer_home(s)
            });
            let Some(at) = next else { break };
            let more = self.staged[at].sectors as usize;
            if sectors + more > limit {
                break;
            }
            parts[n] = at;
            n += 1;
            sectors += more;
            end += more as u64;
        }
        n
    }

    /// Issues `head` and the staged copy writes at `parts` (which continue it) as one device
    /// write through a bounce buffer. Gives `head` back when it must wait.
    fn issue_merged(
        &mut self,
        index: usize,
        devices: &mut [BoxedDevice],
        head: Io,
        parts: &mut [usize],
    ) -> Result<(), Io> {
        let Some((disk, offset)) = self.placement(head.device) else {
            return self.issue_one(index, devices, head);
        };
        let Some(device) = devices.get_mut(disk) else {
            return self.issue_one(index, devices, head);
        };
        if self.free_ios.len() < parts.len() + 1 {
            return Err(head);
        }
        let Some(first) = self.free_ios.pop() else {
            return Err(head);
        };
        let Some(mut buf) = self.bounce.acquire() else {
            self.free_ios.push(first);
            return Err(head);
        };
        let total: usize = head.sectors as usize * 512
            + parts
                .iter()
                .map(|&at| self.staged[at].sectors as usize * 512)
                .sum::<usize>();
        if buf.set_len(total).is_err() {
            let _ = self.bounce.release(buf);
            self.free_ios.push(first);
            return self.issue_one(index, devices, head);
        }
        let mut at = 0;
        for io in core::iter::once(&head).chain(parts.iter().map(|&p| &self.staged[p])) {
            let len = io.sectors as usize * 512;
            self.fill(&io.buffer, 0, &mut buf.as_mut_slice()[at..at + len]);
            at += len;
        }
        let tag = engine_tag(index, first);
        let lba = device_lba(device, head.sector + offset);
        if let Err(rejected) = device.submit(BlockRequest::write(tag, lba, buf, false)) {
            if let Some(b) = rejected.request.buffer {
                let _ = self.bounce.release(b);
            }
            self.free_ios.push(first);
            if rejected.error == BlockError::QueueFull {
                return Err(head);
            }
            // The device refused the write: every part fails.
            let _ = self.engine.complete_io(head.token, Err(IoError));
            parts.sort_unstable();
            for &p in parts.iter().rev() {
                if let Some(io) = self.staged.remove(p) {
                    let _ = self.engine.complete_io(io.token, Err(IoError));
                }
            }
            return Ok(());
        }
        // Link the parts behind the head, in sector order, each in its own I/O slot.
        let mut prev = first;
        self.ios[first as usize] = Some(Issued {
            token: head.token,
            read_into: None,
            caller: None,
            lent: false,
            lent_copy: None,
            next: NO_PART,
            split: None,
        });
        for &at in parts.iter() {
            let token = self.staged[at].token;
            // Checked above: enough free slots for every part.
            let Some(slot) = self.free_ios.pop() else {
                break;
            };
            self.ios[slot as usize] = Some(Issued {
                token,
                read_into: None,
                caller: None,
                lent: false,
                lent_copy: None,
                next: NO_PART,
                split: None,
            });
            if let Some(Some(p)) = self.ios.get_mut(prev as usize) {
                p.next = slot;
            }
            prev = slot;
        }
        self.merged_copy_writes += parts.len() as u64 + 1;
        self.merged_device_writes += 1;
        parts.sort_unstable();
        for &p in parts.iter().rev() {
            let _ = self.staged.remove(p);
        }
        Ok(())
    }

    /// Issues one engine I/O; gives it back when it must wait (no buffer, queue full).
    /// A device refused `io` (its buffer already given back): the slot is free again; a full
    /// queue hands the I/O back to be issued later, any other error fails it in the engine.
    fn rejected(&mut self, slot: u32, io: Io, error: BlockError) -> Result<(), Io> {
        self.free_ios.push(slot);
        if error == BlockError::QueueFull {
            Err(io)
        } else {
            let _ = self.engine.complete_io(io.token, Err(IoError));
            Ok(())
        }
    }

    fn issue_one(&mut self, index: usize, devices: &mut [BoxedDevice], io: Io) -> Result<(), Io> {
        let Some((disk, offset)) = self.placement(io.device) else {
            let _ = self.engine.complete_io(io.token, Err(IoError));
            return Ok(());
        };
        let Some(device) = devices.get_mut(disk) else {
            let _ = self.engine.complete_io(io.token, Err(IoError));
            return Ok(());
        };
        let len = io.sectors as usize * 512;
        // A copy buffer lent to the device goes down whole up to the device's own limit
        // (virtio-blk's is above its bounce buffers': a 512 KiB copy is one request).
        let lends_copy = self.lends_copy(&io);
        let limit = if lends_copy {
            device.geometry().max_transfer_bytes as usize
        } else {
            self.piece_bytes(device)
        };
        if matches!(io.op, IoOp::Read | IoOp::Write { .. }) && len > limit {
            return self.start_split(index, devices, disk, offset, io);
        }
        let Some(slot) = self.free_ios.pop() else {
            return Err(io);
        };
        let tag = engine_tag(index, slot);
        let lba = device_lba(device, io.sector + offset);
        // An I/O on the whole of a request's buffer (most origin writes and snapshot reads)
        // lends that buffer to the device instead of copying through a bounce buffer. While
        // it is lent, other I/O on it waits; while bounce copies of it are in flight, it is
        // not lent.
        let mut caller = None;
        let mut lent = None;
        if let (IoBuffer::Caller { tag, byte_offset }, IoOp::Read | IoOp::Write { .. }) =
            (io.buffer, io.op)
        {
            if let Some(held) = self.requests.get_mut(tag as usize).and_then(Option::as_mut) {
                if held.lent {
                    self.free_ios.push(slot);
                    return Err(io);
                }
                caller = Some(tag);
                let whole =
                    byte_offset == 0 && held.buffer.as_ref().is_some_and(|b| b.len() == len);
                if whole && held.bounced == 0 {
                    lent = held.buffer.take();
                    held.lent = lent.is_some();
                }
            }
        }
        // A copy buffer goes to the device itself (windowed to the I/O): a copy is read into
        // it and written from it with no CPU copy. A write whose buffer another staged I/O
        // still needs goes through a bounce buffer instead, so that one need not wait.
        if let (IoBuffer::Copy { index, byte_offset }, true) = (io.buffer, lends_copy) {
            {
                let Some(mut buf) = self.copy.get_mut(index as usize).and_then(Option::take) else {
                    self.free_ios.push(slot);
                    return Err(io);
                };
                if buf.set_window(byte_offset as usize, len).is_err() {
                    self.copy_home(index, buf);
                    self.free_ios.push(slot);
                    let _ = self.engine.complete_io(io.token, Err(IoError));
                    return Ok(());
                }
                let request = match io.op {
                    IoOp::Read => BlockRequest::read(tag, lba, buf),
                    _ => BlockRequest::write(
                        tag,
                        lba,
                        buf,
                        matches!(io.op, IoOp::Write { fua: true }),
                    ),
                };
                return match device.submit(request) {
                    Ok(()) => {
                        self.lent_copy_ios += 1;
                        self.ios[slot as usize] = Some(Issued {
                            token: io.token,
                            read_into: None,
                            caller: None,
                            lent: false,
                            lent_copy: Some(index),
                            next: NO_PART,
                            split: None,
                        });
                        Ok(())
                    }
                    Err(rejected) => {
                        if let Some(b) = rejected.request.buffer {
                            self.copy_home(index, b);
                        }
                        self.rejected(slot, io, rejected.error)
                    }
                };
            }
        }
        let is_lent = lent.is_some();
        let request = match (io.op, lent) {
            (IoOp::Flush, _) => BlockRequest::flush(tag),
            (IoOp::Write { fua }, Some(buf)) => BlockRequest::write(tag, lba, buf, fua),
            (IoOp::Read, Some(buf)) => BlockRequest::read(tag, lba, buf),
            (IoOp::Read | IoOp::Write { .. }, None) => {
                let Some(mut buf) = self.bounce.acquire() else {
                    self.free_ios.push(slot);
                    return Err(io);
                };
                if buf.set_len(len).is_err() {
                    let _ = self.bounce.release(buf);
                    self.free_ios.push(slot);
                    let _ = self.engine.complete_io(io.token, Err(IoError));
                    return Ok(());
                }
                match io.op {
                    IoOp::Write { fua } => {
                        self.fill(&io.buffer, 0, buf.as_mut_slice());
                        BlockRequest::write(tag, lba, buf, fua)
                    }
                    _ => BlockRequest::read(tag, lba, buf),
                }
            }
        };
        match device.submit(request) {
            Ok(()) => {
                let read_into = matches!(io.op, IoOp::Read).then_some(io.buffer);
                if let (Some(t), false) = (caller, is_lent) {
                    if let Some(held) = self.requests.get_mut(t as usize).and_then(Option::as_mut) {
                        held.bounced += 1;
                    }
                }
                self.ios[slot as usize] = Some(Issued {
                    token: io.token,
                    read_into,
                    caller,
                    lent: is_lent,
                    lent_copy: None,
                    next: NO_PART,
                    split: None,
                });
                Ok(())
            }
            Err(rejected) => {
                if let Some(b) = rejected.request.buffer {
                    if is_lent {
                        self.give_back(caller, b);
                    } else {
                        let _ = self.bounce.release(b);
                    }
                }
                self.rejected(slot, io, rejected.error)
            }
        }
    }

    /// Whether `io` is carried by its copy buffer itself, lent to the device: a read or write
    /// of a copy buffer, unless it is a write whose buffer another staged I/O still needs
    /// (that one goes through a bounce buffer, so the other need not wait).
    fn lends_copy(&self, io: &Io) -> bool {
        let IoBuffer::Copy { index, .. } = io.buffer else {
            return false;
        };
        match io.op {
            IoOp::Read => true,
            IoOp::Write { .. } => !self
                .staged
                .iter()
                .any(|s| matches!(s.buffer, IoBuffer::Copy { index: i, .. } if i == index)),
            IoOp::Flush => false,
        }
    }

    /// Bytes one device request of this origin's engine I/O may carry on `device`: its
    /// transfer limit, at most one bounce buffer, whole blocks.
    fn piece_bytes(&self, device: &BoxedDevice) -> usize {
        let block = (device.geometry().block_size as usize).max(512);
        let max = (device.geometry().max_transfer_bytes as usize).min(self.bounce.buffer_size());
        (max - max % block).max(block)
    }

    /// Starts issuing `io`, larger than one device request, in pieces.
    fn start_split(
        &mut self,
        index: usize,
        devices: &mut [BoxedDevice],
        disk: usize,
        offset: u64,
        io: Io,
    ) -> Result<(), Io> {
        let Some(device) = devices.get(disk) else {
            return Err(io);
        };
        let piece = self.piece_bytes(device);
        let lba = device_lba(device, io.sector + offset);
        let block = u64::from(device.geometry().block_size.max(512));
        let caller = match io.buffer {
            IoBuffer::Caller { tag, .. } => Some(tag),
            _ => None,
        };
        if let Some(held) = caller.and_then(|t| self.requests.get_mut(t as usize)) {
            if held.as_ref().is_some_and(|h| h.lent) {
                return Err(io);
            }
        }
        let Some(slot) = self.free_ios.pop() else {
            return Err(io);
        };
        if let Some(held) = caller
            .and_then(|t| self.requests.get_mut(t as usize))
            .and_then(Option::as_mut)
        {
            // Not lent while pieces use it through bounce buffers.
            held.bounced += 1;
        }
        self.ios[slot as usize] = Some(Issued {
            token: io.token,
            read_into: matches!(io.op, IoOp::Read).then_some(io.buffer),
            caller,
            lent: false,
            lent_copy: None,
            next: NO_PART,
            split: Some(Split {
                io,
                disk,
                lba,
                block,
                piece,
                issued: 0,
                inflight: 0,
                failed: false,
            }),
        });
        self.splitting = Some(slot);
        self.issue_pieces(index, devices, slot);
        Ok(())
    }

    /// Issues the next pieces of the split I/O in `slot`; true when all are issued.
    fn issue_pieces(&mut self, index: usize, devices: &mut [BoxedDevice], slot: u32) -> bool {
        loop {
            let Some(mut sp) = self
                .ios
                .get(slot as usize)
                .and_then(Option::as_ref)
                .and_then(|i| i.split)
            else {
                self.splitting = None;
                return true;
            };
            let total = sp.io.sectors as usize * 512;
            if sp.issued >= total {
                self.splitting = None;
                return true;
            }
            let len = (total - sp.issued).min(sp.piece);
            let Some(device) = devices.get_mut(sp.disk) else {
                sp.failed = true;
                sp.issued = total;
                self.update_split(slot, sp);
                continue;
            };
            let Some(mut buf) = self.bounce.acquire() else {
                return false;
            };
            if buf.set_len(len).is_err() {
                let _ = self.bounce.release(buf);
                sp.failed = true;
                sp.issued = total;
                self.update_split(slot, sp);
                continue;
            }
            let tag = engine_tag(index, slot);
            let lba = sp.lba + sp.issued as u64 / sp.block;
            let request = match sp.io.op {
                IoOp::Write { fua } => {
                    self.fill(&sp.io.buffer, sp.issued, buf.as_mut_slice());
                    BlockRequest::write(tag, lba, buf, fua)
                }
                _ => BlockRequest::read(tag, lba, buf),
            };
            match device.submit(request) {
                Ok(()) => {
                    sp.issued += len;
                    sp.inflight += 1;
                    self.update_split(slot, sp);
                }
                Err(rejected) => {
                    if let Some(b) = rejected.request.buffer {
                        let _ = self.bounce.release(b);
                    }
                    if rejected.error == BlockError::QueueFull {
                        return false;
                    }
                    // The device refused a piece: the I/O fails once the others are back.
                    sp.failed = true;
                    sp.issued = total;
                    self.update_split(slot, sp);
                }
            }
        }
    }

    /// Stores `sp` back in `slot`, and completes the I/O when every piece is issued and back.
    fn update_split(&mut self, slot: u32, sp: Split) {
        let total = sp.io.sectors as usize * 512;
        let done = sp.issued >= total && sp.inflight == 0;
        if !done {
            if let Some(Some(i)) = self.ios.get_mut(slot as usize) {
                i.split = Some(sp);
            }
            return;
        }
        if self.splitting == Some(slot) {
            self.splitting = None;
        }
        let Some(issued) = self.ios.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.free_ios.push(slot);
        if let Some(held) = issued
            .caller
            .and_then(|t| self.requests.get_mut(t as usize))
            .and_then(Option::as_mut)
        {
            held.bounced = held.bounced.saturating_sub(1);
        }
        let result = if sp.failed { Err(IoError) } else { Ok(()) };
        let _ = self.engine.complete_io(issued.token, result);
    }

    /// A device completion of one piece of the split I/O in `slot`.
    fn complete_piece(&mut self, slot: u32, mut sp: Split, completion: Completion) {
        let at = (completion.lba.saturating_sub(sp.lba) * sp.block) as usize;
        if let (Ok(()), Some(buf)) = (completion.result, &completion.buffer) {
            if sp.io.op == IoOp::Read {
                let data = buf.as_slice();
                match sp.io.buffer {
                    IoBuffer::Caller { tag, byte_offset } => {
                        let held = self.requests.get_mut(tag as usize).and_then(Option::as_mut);
                        if let Some(b) = held.and_then(|h| h.buffer.as_mut()) {
                            copy_into(b.as_mut_slice(), byte_offset + at as u64, data);
                        }
                    }
                    IoBuffer::Copy { index, byte_offset } => match self.copy_mut(index) {
                        Some(dst) => copy_into(dst, byte_offset + at as u64, data),
                        // Unreachable: a copy buffer is lent only while nothing else uses it.
                        None => sp.failed = true,
                    },
                    IoBuffer::Meta { .. } => {
                        if let Some(dst) = self.engine.meta_bytes_mut(&sp.io.buffer) {
                            copy_into(dst, at as u64, data);
                        }
                    }
                    _ => {}
                }
            }
        }
        if completion.result.is_err() {
            sp.failed = true;
        }
        if let Some(b) = completion.buffer {
            let _ = self.bounce.release(b);
        }
        sp.inflight = sp.inflight.saturating_sub(1);
        self.update_split(slot, sp);
    }

    /// Copy buffer `index`, whole, while it is home.
    fn copy_ref(&self, index: u32) -> Option<&[u8]> {
        self.copy
            .get(index as usize)?
            .as_ref()
            .map(DmaBuf::as_slice)
    }

    /// Copy buffer `index`, whole and writable, while it is home.
    fn copy_mut(&mut self, index: u32) -> Option<&mut [u8]> {
        self.copy
            .get_mut(index as usize)?
            .as_mut()
            .map(DmaBuf::as_mut_slice)
    }

    /// Whether what `io` names can be used now: not a copy buffer lent to a device.
    fn buffer_home(&self, io: &Io) -> bool {
        match io.buffer {
            IoBuffer::Copy { index, .. } => {
                self.copy.get(index as usize).is_some_and(Option::is_some)
            }
            _ => true,
        }
    }

    /// A lent copy buffer comes home, whole again.
    fn copy_home(&mut self, index: u32, mut buffer: DmaBuf) {
        let whole = buffer.capacity();
        let _ = buffer.set_window(0, whole);
        match self.copy.get_mut(index as usize) {
            Some(slot) if slot.is_none() => *slot = Some(buffer),
            _ => log::error!("snapshot engine: copy buffer {index} came back twice"),
        }
    }

    /// Returns a lent buffer to its request.
    fn give_back(&mut self, caller: Option<u64>, buffer: DmaBuf) {
        match caller
            .and_then(|t| self.requests.get_mut(t as usize))
            .and_then(Option::as_mut)
        {
            Some(held) => {
                held.buffer = Some(buffer);
                held.lent = false;
            }
            // Unreachable: a request completes only after all its I/Os did.
            None => log::error!("snapshot engine: a lent buffer outlived its request"),
        }
    }

    /// Copies what an engine write names, from byte `skip` of it on, into `out`.
    fn fill(&self, source: &IoBuffer, skip: usize, out: &mut [u8]) {
        let skip = skip as u64;
        match *source {
            IoBuffer::Caller { tag, byte_offset } => {
                let from = self.requests.get(tag as usize).and_then(|h| h.as_ref());
                let from = from.and_then(|h| h.buffer.as_ref()).map(DmaBuf::as_slice);
                copy_from(from, byte_offset + skip, out);
            }
            IoBuffer::Copy { index, byte_offset } => {
                copy_from(self.copy_ref(index), byte_offset + skip, out);
            }
            IoBuffer::Meta { .. } => copy_from(self.engine.meta_bytes(source), skip, out),
            IoBuffer::Zeroes | IoBuffer::None => out.fill(0),
        }
    }

    /// A device completion of engine I/O `slot`.
    pub fn complete(&mut self, slot: u32, completion: Completion) {
        if slot & DIRECT_SLOT != 0 {
            return self.complete_direct(slot & !DIRECT_SLOT, completion);
        }
        if let Some(sp) = self
            .ios
            .get(slot as usize)
            .and_then(Option::as_ref)
            .and_then(|i| i.split)
        {
            return self.complete_piece(slot, sp, completion);
        }
        let Some(issued) = self.ios.get_mut(slot as usize).and_then(Option::take) else {
            log::error!("snapshot engine: completion for unknown I/O slot {slot}");
            if let Some(b) = completion.buffer {
                let _ = self.bounce.release(b);
            }
            return;
        };
        self.free_ios.push(slot);
        if let Some(index) = issued.lent_copy {
            // The data (read) is already in the copy buffer.
            match completion.buffer {
                Some(b) => self.copy_home(index, b),
                None => log::error!("snapshot engine: copy buffer {index} did not come back"),
            }
            let _ = self
                .engine
                .complete_io(issued.token, completion.result.map_err(|_| IoError));
            return;
        }
        if issued.lent {
            // The data (read) is already in the request's own buffer.
            if let Some(b) = completion.buffer {
                self.give_back(issued.caller, b);
            }
            let _ = self
                .engine
                .complete_io(issued.token, completion.result.map_err(|_| IoError));
            return;
        }
        if let Some(held) = issued
            .caller
            .and_then(|t| self.requests.get_mut(t as usize))
            .and_then(Option::as_mut)
        {
            held.bounced = held.bounced.saturating_sub(1);
        }
        if let (Ok(()), Some(target), Some(buf)) =
            (completion.result, issued.read_into, &completion.buffer)
        {
            let data = buf.as_slice();
            match target {
                IoBuffer::Caller { tag, byte_offset } => {
                    let held = self.requests.get_mut(tag as usize).and_then(Option::as_mut);
                    if let Some(b) = held.and_then(|h| h.buffer.as_mut()) {
                        copy_into(b.as_mut_slice(), byte_offset, data);
                    }
                }
                IoBuffer::Copy { index, byte_offset } => {
                    if let Some(dst) = self.copy_mut(index) {
                        copy_into(dst, byte_offset, data);
                    }
                }
                // A merge reads an earlier metadata area back into the engine.
                IoBuffer::Meta { .. } => {
                    if let Some(dst) = self.engine.meta_bytes_mut(&target) {
                        copy_into(dst, 0, data);
                    }
                }
                _ => {}
            }
        }
        if let Some(b) = completion.buffer {
            let _ = self.bounce.release(b);
        }
        let result = completion.result.map_err(|_| IoError);
        let _ = self.engine.complete_io(issued.token, result);
        // Copy writes merged into this device write complete with it.
        let mut next = issued.next;
        while let Some(part) = self.ios.get_mut(next as usize).and_then(Option::take) {
            self.free_ios.push(next);
            let _ = self.engine.complete_io(part.token, result);
            next = part.next;
        }
    }

    /// Hands finished volume requests to `sink` and handles engine events.
    /// `now` (uptime ns) dates what the events start (a merge's rate, alerts).
    pub fn deliver(&mut self, now: u64, sink: &mut dyn FnMut(Completion)) {
        while let Some(vc) = self.engine.poll_completion() {
            let Some(held) = self
                .requests
                .get_mut(vc.tag as usize)
                .and_then(Option::take)
            else {
                continue;
            };
            self.free_requests.push(vc.tag as u32);
            sink(Completion {
                tag: held.task_tag,
                op: held.op,
                lba: held.lba,
                result: vc.result.map_err(block_error),
                buffer: held.buffer,
            });
        }
        while let Some(event) = self.engine.poll_event() {
            self.on_event(event, now);
        }
    }

    fn on_event(&mut self, event: Event, now: u64) {
        match event {
            Event::UsageThreshold { snap, percent } => {
                if let Some(s) = self.snap_by_id(snap) {
                    log::warn!("snapshot {}: COW store {percent}% full", s.name);
                }
            }
            Event::Invalidated { snap, reason } => {
                if let Some(s) = self.snap_by_id(snap) {
                    if reason != InvalidReason::Deleted {
                        log::error!("snapshot {} invalidated: {}", s.name, reason_text(reason));
                        s.state = SnapState::Invalid;
                    }
                    s.invalid = Some(reason);
                }
            }
            Event::InvalidationFailed { snap } => {
                if let Some(s) = self.snap_by_id(snap) {
                    log::error!("snapshot {}: {UNMARKED_ALERT}", s.name);
                }
                self.unmarked_alert = Some((
                    now.saturating_add(UNMARKED_ALERT_FIRST_NS),
                    UNMARKED_ALERT_FIRST_NS,
                ));
            }
            Event::InvalidationDurable { snap } => {
                if let Some(s) = self.snap_by_id(snap) {
                    log::warn!(
                        "snapshot {}: its COW store is marked invalid now; origin writes go on",
                        s.name
                    );
                }
            }
            Event::OriginQuiesced => {}
            Event::SnapshotCreated { snap } => {
                if let Some(s) = self.snap_by_id(snap) {
                    s.state = SnapState::Active;
                }
            }
            Event::SnapshotCreateFailed { snap } => {
                if let Some(s) = self.snap_by_id(snap) {
                    s.state = SnapState::Failed;
                }
            }
            Event::SnapshotWipeFailed { snap } => {
                if let Some(s) = self.snap_by_id(snap) {
                    log::error!(
                        "snapshot {}: writing zeroes over its COW store's header failed",
                        s.name
                    );
                }
                self.wipe_failed = Some(snap);
            }
            Event::SnapshotDeleted { snap } => {
                if let Some(s) = self.snap_by_id(snap) {
                    s.state = SnapState::Deleted;
                }
            }
            Event::BindingWritten { snap, ok } => match self.auto_extending {
                Some((id, sectors)) if id == snap => {
                    self.auto_extending = None;
                    let used = match self.engine.status(snap) {
                        Some(snapshot::Status::Usage(u)) => {
                            u.allocated_sectors * 100 / u.total_sectors.max(1)
                        }
                        _ => 0,
                    };
                    if let Some(s) = self.snap_by_id(snap) {
                        if ok {
                            s.cow_sectors = sectors;
                            log::info!(
                                "snapshot {}: auto-extended to {} MiB ({used}% used)",
                                s.name,
                                sectors / 2048
                            );
                        } else {
                            log::warn!(
                                    "snapshot {}: auto-extend failed (writing its binding); it keeps its size",
                                    s.name
                                );
                        }
                    }
                }
                _ => self.rebound = Some((snap, ok)),
            },
            Event::MergeStarted { snap, resumed } => {
                let left = self.engine.merge_progress().map_or(0, |p| p.chunks_left);
                self.merge_clock = Some((now, left));
                if let Some(s) = self.snap_by_id(snap) {
                    s.state = SnapState::Merging;
                    let how = if resumed { "resumed" } else { "started" };
                    log::info!("merge of {} {how}: {left} chunks to go", s.name);
                }
                let marked = self.engine.merge_progress().is_none_or(|p| p.origin_marked);
                if !marked {
                    if let Some(s) = self.snap_by_id(snap) {
                        log::warn!(
                            "merge of {}: its store has no free chunk to keep origin chunk 0 in, so the origin is not marked as half-merged; if the COW device is missing at a boot before the merge ends, the origin is served as it is",
                            s.name
                        );
                    }
                }
            }
            Event::MergeDone { snap } => {
                self.merge_clock = None;
                if let Some(s) = self.snap_by_id(snap) {
                    log::info!("merge of {} finished; snapshot removed", s.name);
                    s.state = SnapState::Deleted;
                }
            }
            Event::MergeFailed { snap } => {
                if let Some(s) = self.snap_by_id(snap) {
                    log::error!(
                        "merge of {} failed (Merge failed); I/O continues, the merge resumes at the next boot",
                        s.name
                    );
                    s.state = SnapState::MergeFailed;
                }
            }
        }
    }

    /// Repeats the alert for snapshots whose store could not be marked invalid (see
    /// [`UNMARKED_ALERT`]) while any is left: after 10 s, then at doubling gaps up to 10 min.
    pub fn alert_unmarked(&mut self, now: u64) {
        let Some((due, gap)) = self.unmarked_alert else {
            return;
        };
        if now < due {
            return;
        }
        let refused = self.engine.stats().origin_writes_refused;
        let mut any = false;
        for s in &self.snaps {
            if self.engine.invalidation_failed(s.id) {
                any = true;
                log::error!(
                    "snapshot {}: {UNMARKED_ALERT}; {refused} origin writes refused so far",
                    s.name
                );
            }
        }
        let next = gap.saturating_mul(2).min(UNMARKED_ALERT_MAX_NS);
        self.unmarked_alert = any.then(|| (now.saturating_add(next), next));
    }

    /// Forgets snapshots whose creation failed or that were deleted.
    pub fn sweep(&mut self) {
        self.snaps
            .retain(|s| !matches!(s.state, SnapState::Failed | SnapState::Deleted));
    }
}

/// What the console says about a snapshot that is invalid but whose store could not be marked
/// invalid on its COW device (the engine's `invalidation_failed`).
pub const UNMARKED_ALERT: &str = "INVALID, but its COW store could not be marked invalid \
     (I/O error) and may still read as a valid snapshot: origin writes that would change it \
     fail with an I/O error until it is deleted ('snapshot delete') or the device takes the write";

/// Operator's words for an invalidation.
pub fn reason_text(reason: InvalidReason) -> &'static str {
    match reason {
        InvalidReason::CowFull => "COW store full (Overflow)",
        InvalidReason::TableFull => "exception table full (Overflow)",
        InvalidReason::CopyError => "copying a chunk failed",
        InvalidReason::MetadataError => "writing metadata failed",
        InvalidReason::Deleted => "deleted",
        InvalidReason::OutOfMemory => "its exception table could not grow (out of memory)",
    }
}

fn block_error(e: VolumeError) -> BlockError {
    match e {
        VolumeError::Io => BlockError::Io,
        VolumeError::SnapshotInvalid => BlockError::DeviceStatus("snapshot is invalid"),
        VolumeError::OutOfRange => BlockError::DeviceStatus("range outside the volume"),
        VolumeError::ReadOnly => BlockError::ReadOnly,
        VolumeError::NoSuchVolume => BlockError::DeviceFailed,
        VolumeError::Merging => {
            BlockError::DeviceStatus("snapshot is being merged into its origin")
        }
    }
}

/// The device block holding 512-byte sector `sector`.
fn device_lba(device: &BoxedDevice, sector: u64) -> u64 {
    geometry_lba(&device.geometry(), sector)
}

/// The block of a device with `geometry` that 512-byte `sector` falls in.
fn geometry_lba(geometry: &Geometry, sector: u64) -> u64 {
    sector * 512 / u64::from(geometry.block_size.max(512))
}

fn copy_from(source: Option<&[u8]>, offset: u64, out: &mut [u8]) {
    let at = offset as usize;
    match source.and_then(|s| s.get(at..at + out.len())) {
        Some(src) => out.copy_from_slice(src),
        None => out.fill(0),
    }
}

fn copy_into(dst: &mut [u8], offset: u64, data: &[u8]) {
    let at = offset as usize;
    let n = data.len().min(dst.len().saturating_sub(at));
    if let Some(d) = dst.get_mut(at..at + n) {
        d.copy_from_slice(&data[..n]);
    }
}
