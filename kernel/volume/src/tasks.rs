//! Console I/O as tasks of the main loop: `read`, `write`, `checksum`, `flush` and `bench`
//! keep their requests in flight through the real queues while the console stays live; the
//! loop shows progress on one refreshed line and Ctrl-C cancels (in-flight requests are
//! waited for, never abandoned).
//!
//! A task allocates what it needs when it is created (before its first request); from its
//! first submission to its report it does not touch the heap. The loop checks that with the
//! heap's allocation counter and reports it (`mem`: "allocations on the I/O path").

use core::fmt::{self, Write};

use alloc::boxed::Box;
use alloc::vec::Vec;
use drivers::block::{BlockError, BlockRequest, BufferPool, Completion, DmaBuf, Operation};
use sha2::{Digest, Sha256};

use crate::hexdump::write_hexdump;
use crate::pattern::{fill_seeded, Rng, Shuffle};
use crate::port::Port;
use crate::{Target, VolumeName, Volumes};
use snapshot::histogram::Histogram;

/// One unit of long console work.
pub trait Task {
    /// Issues what it can (called every loop iteration).
    fn step(&mut self, storage: &mut Volumes, now: u64);
    /// Takes a completion of one of its requests.
    fn complete(&mut self, pool: &mut BufferPool, completion: Completion, now: u64);
    /// Whether it has finished (nothing in flight, nothing left to do).
    fn done(&self) -> bool;
    /// Stops issuing new requests (Ctrl-C); in-flight ones are still waited for.
    fn cancel(&mut self);
    /// One line of progress (no newline).
    fn progress(&self, out: &mut dyn Write, now: u64) -> fmt::Result;
    /// The final report.
    fn report(&mut self, out: &mut dyn Write, now: u64) -> fmt::Result;
    /// A line worth keeping in the log of the console (not refreshed over), if any is due.
    fn notice(&mut self, _out: &mut dyn Write) -> fmt::Result {
        Ok(())
    }
    /// Whether this is I/O-path work, checked by the allocation guard (control operations
    /// such as creating a snapshot allocate its tables, by design).
    fn io_path(&self) -> bool {
        true
    }
}

/// Tag of a write task's closing flush (above its write tags, in the task's port).
const FLUSH_TAG: u64 = Port::Task(1 << 60).tag();
/// Tag of a write task's intermediate (`--flush-every`) flushes.
const CHECKPOINT_TAG: u64 = Port::Task((1 << 60) | 1).tag();

/// What `write` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSpec {
    /// The data.
    pub pattern: Pattern,
    /// Bytes per request (`None`: the largest the device and pool allow).
    pub transfer_bytes: Option<u64>,
    /// Force Unit Access on every write.
    pub fua: bool,
    /// Flush after every this many blocks and report what is durable (0: at the end only).
    pub flush_every: u64,
}

/// What a write fills its buffers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Every byte the same.
    Byte(u8),
    /// `util::pattern::fill_seeded` with this seed.
    Seed(u64),
}

fn give_back_to(st: &mut Volumes, target: Target, buffer: Option<DmaBuf>) {
    if let Some(pool) = st.pool(target) {
        give_back(pool, buffer);
    }
}

fn give_back(pool: &mut BufferPool, buffer: Option<DmaBuf>) {
    if let Some(b) = buffer {
        // A foreign buffer cannot come back here: every request was built from this pool.
        let _ = pool.release(b);
    }
}

fn rate(out: &mut dyn Write, bytes: u64, ns: u64) -> fmt::Result {
    let ns = ns.max(1);
    let kib_s = bytes as u128 * 1_000_000_000 / 1024 / ns as u128;
    write!(
        out,
        "{}.{:02} MiB/s",
        kib_s / 1024,
        (kib_s % 1024) * 100 / 1024
    )
}

fn ms(out: &mut dyn Write, ns: u64) -> fmt::Result {
    write!(out, "{}.{:03} ms", ns / 1_000_000, (ns / 1000) % 1000)
}

fn us(out: &mut dyn Write, ns: u64) -> fmt::Result {
    write!(out, "{}.{} us", ns / 1000, (ns / 100) % 10)
}

/// What a sequential range task does with each piece.
enum RangeKind {
    Read {
        data: Vec<u8>,
    },
    Write {
        pattern: Pattern,
        fua: bool,
        flush_tag_sent: bool,
        flushed: bool,
        /// Flush after every this many blocks (0: only at the end).
        flush_every: u64,
        /// Where the next intermediate flush happens.
        checkpoint: u64,
        /// An intermediate flush is in flight.
        checkpoint_flushing: bool,
        /// Every block before this LBA is durable.
        durable_through: u64,
        /// `durable_through` as last reported.
        reported: u64,
    },
    Checksum {
        hasher: Box<Sha256>,
        ready: Vec<Option<DmaBuf>>,
        next_hash: u64,
    },
}

/// `read`, `write` and `checksum`: a range of blocks in order, `depth` requests at a time.
pub struct RangeTask {
    target: Target,
    name: VolumeName,
    block_size: u64,
    start: u64,
    end: u64,
    next: u64,
    chunk_blocks: u64,
    depth: usize,
    in_flight: usize,
    bytes_done: u64,
    error: Option<(u64, BlockError)>,
    cancelled: bool,
    started: u64,
    kind: RangeKind,
}

impl RangeTask {
    fn new(
        st: &Volumes,
        target: Target,
        start: u64,
        count: u64,
        kind: RangeKind,
        depth: usize,
        now: u64,
    ) -> Self {
        let g = st.geometry(target);
        let pool = &st.pools[st.disk_of(target)];
        let block_size = u64::from(g.block_size.max(1));
        let max = (pool.buffer_size() as u64).min(u64::from(g.max_transfer_bytes).max(block_size));
        let depth = depth.clamp(1, pool.total().min(usize::from(g.queue_depth.max(1))));
        RangeTask {
            target,
            name: st.target_name(target),
            block_size,
            start,
            end: start + count,
            next: start,
            chunk_blocks: (max / block_size).max(1),
            depth,
            in_flight: 0,
            bytes_done: 0,
            error: None,
            cancelled: false,
            started: now,
            kind,
        }
    }

    /// `read DEV LBA COUNT`: one request, then a hexdump.
    pub fn read(st: &Volumes, target: Target, lba: u64, count: u64, now: u64) -> Self {
        let bytes = (count * u64::from(st.geometry(target).block_size)) as usize;
        Self::new(
            st,
            target,
            lba,
            count,
            RangeKind::Read {
                data: Vec::with_capacity(bytes),
            },
            1,
            now,
        )
    }

    /// `write DEV LBA COUNT --byte/--seed`, followed by a flush.
    pub fn write(
        st: &Volumes,
        target: Target,
        lba: u64,
        count: u64,
        spec: WriteSpec,
        now: u64,
    ) -> Self {
        let kind = RangeKind::Write {
            pattern: spec.pattern,
            fua: spec.fua,
            flush_tag_sent: false,
            flushed: false,
            flush_every: spec.flush_every,
            checkpoint: lba.saturating_add(if spec.flush_every == 0 {
                u64::MAX
            } else {
                spec.flush_every
            }),
            checkpoint_flushing: false,
            durable_through: lba,
            reported: lba,
        };
        let mut task = Self::new(st, target, lba, count, kind, 32, now);
        if let Some(bytes) = spec.transfer_bytes {
            task.chunk_blocks = (bytes / task.block_size).clamp(1, task.chunk_blocks);
        }
        task
    }

    /// Bytes per request.
    pub fn transfer_bytes(&self) -> u64 {
        self.chunk_blocks * self.block_size
    }

    /// `checksum DEV [LBA COUNT]`: SHA-256 of the range, hashed in order.
    pub fn checksum(st: &Volumes, target: Target, lba: u64, count: u64, now: u64) -> Self {
        let depth = 16;
        let ready = (0..depth).map(|_| None).collect();
        let kind = RangeKind::Checksum {
            hasher: Box::new(Sha256::new()),
            ready,
            next_hash: 0,
        };
        Self::new(st, target, lba, count, kind, depth, now)
    }

    /// After an error no piece will be hashed: buffers parked for reordering go back.
    fn release_parked(&mut self, pool: &mut BufferPool) {
        if let RangeKind::Checksum { ready, .. } = &mut self.kind {
            for slot in ready.iter_mut() {
                give_back(pool, slot.take());
            }
        }
    }

    fn seq(&self, lba: u64) -> u64 {
        (lba - self.start) / self.chunk_blocks
    }
}

impl Task for RangeTask {
    fn step(&mut self, st: &mut Volumes, _now: u64) {
        while !self.cancelled
            && self.error.is_none()
            && self.next < self.end
            && self.in_flight < self.depth
        {
            if let RangeKind::Checksum { next_hash, .. } = &self.kind {
                // Keep the reorder window: at most `depth` pieces beyond the next to hash.
                if self.seq(self.next) >= *next_hash + self.depth as u64 {
                    break;
                }
            }
            if let RangeKind::Write { checkpoint, .. } = &self.kind {
                // Writes up to the checkpoint drain and are flushed before any after it.
                if self.next >= *checkpoint {
                    break;
                }
            }
            let Some(mut buf) = st.pool(self.target).and_then(|p| p.acquire()) else {
                break;
            };
            let mut blocks = self.chunk_blocks.min(self.end - self.next);
            if let RangeKind::Write { checkpoint, .. } = &self.kind {
                blocks = blocks.min(checkpoint.saturating_sub(self.next)).max(1);
            }
            let bytes = (blocks * self.block_size) as usize;
            if buf.set_len(bytes).is_err() {
                give_back_to(st, self.target, Some(buf));
                self.error = Some((self.next, BlockError::TooLarge { bytes, max: 0 }));
                break;
            }
            let request = match &self.kind {
                RangeKind::Write { pattern, fua, .. } => {
                    match pattern {
                        Pattern::Byte(b) => buf.as_mut_slice().fill(*b),
                        Pattern::Seed(seed) => {
                            fill_seeded(buf.as_mut_slice(), *seed, self.next * self.block_size)
                        }
                    }
                    BlockRequest::write(self.next, self.next, buf, *fua)
                }
                _ => BlockRequest::read(self.next, self.next, buf),
            };
            match st.submit_to(self.target, request) {
                Ok(()) => {
                    self.in_flight += 1;
                    self.next += blocks;
                }
                Err((BlockError::QueueFull, b)) => {
                    give_back_to(st, self.target, b);
                    break;
                }
                Err((e, b)) => {
                    give_back_to(st, self.target, b);
                    self.error = Some((self.next, e));
                }
            }
        }
        // An intermediate flush once every write before the checkpoint completed.
        let drained = self.in_flight == 0 && self.error.is_none() && !self.cancelled;
        if let RangeKind::Write {
            checkpoint,
            checkpoint_flushing,
            ..
        } = &mut self.kind
        {
            if drained && self.next >= *checkpoint && self.next < self.end && !*checkpoint_flushing
            {
                match st.submit_to(self.target, BlockRequest::flush(CHECKPOINT_TAG)) {
                    Ok(()) => {
                        *checkpoint_flushing = true;
                        self.in_flight += 1;
                    }
                    Err((BlockError::QueueFull, _)) => {}
                    Err((e, _)) => self.error = Some((self.next, e)),
                }
            }
        }
        // A write ends with a flush once every write completed.
        let writes_done =
            self.next >= self.end && self.in_flight == 0 && self.error.is_none() && !self.cancelled;
        if let RangeKind::Write { flush_tag_sent, .. } = &mut self.kind {
            if writes_done && !*flush_tag_sent {
                match st.submit_to(self.target, BlockRequest::flush(FLUSH_TAG)) {
                    Ok(()) => {
                        *flush_tag_sent = true;
                        self.in_flight += 1;
                    }
                    Err((BlockError::QueueFull, _)) => {}
                    Err((e, _)) => self.error = Some((self.end, e)),
                }
            }
        }
    }

    fn complete(&mut self, pool: &mut BufferPool, c: Completion, _now: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Err(e) = c.result {
            if self.error.is_none() {
                self.error = Some((c.lba, e));
            }
            give_back(pool, c.buffer);
            self.release_parked(pool);
            return;
        }
        if matches!(c.op, Operation::Flush) {
            let next = self.next;
            let end = self.end;
            if let RangeKind::Write {
                flushed,
                checkpoint,
                checkpoint_flushing,
                flush_every,
                durable_through,
                ..
            } = &mut self.kind
            {
                if c.tag == CHECKPOINT_TAG {
                    *checkpoint_flushing = false;
                    *durable_through = next;
                    *checkpoint = next.saturating_add(*flush_every).min(end);
                } else {
                    *flushed = true;
                    *durable_through = end;
                }
            }
            return;
        }
        let len = c.buffer.as_ref().map_or(0, |b| b.len() as u64);
        self.bytes_done += len;
        let seq = self.seq(c.lba);
        match &mut self.kind {
            RangeKind::Read { data } => {
                if let Some(b) = &c.buffer {
                    data.extend_from_slice(b.as_slice());
                }
                give_back(pool, c.buffer);
            }
            RangeKind::Write { .. } => give_back(pool, c.buffer),
            RangeKind::Checksum { .. } if self.error.is_some() => give_back(pool, c.buffer),
            RangeKind::Checksum {
                hasher,
                ready,
                next_hash,
            } => {
                let depth = ready.len() as u64;
                ready[(seq % depth) as usize] = c.buffer;
                while let Some(b) = ready[(*next_hash % depth) as usize].take() {
                    hasher.update(b.as_slice());
                    give_back(pool, Some(b));
                    *next_hash += 1;
                }
            }
        }
    }

    fn notice(&mut self, out: &mut dyn Write) -> fmt::Result {
        if let RangeKind::Write {
            durable_through,
            reported,
            flush_every,
            ..
        } = &mut self.kind
        {
            if *flush_every > 0 && *durable_through > *reported {
                *reported = *durable_through;
                write!(
                    out,
                    "{}: durable through LBA {}",
                    self.name, durable_through
                )?;
            }
        }
        Ok(())
    }

    fn done(&self) -> bool {
        if self.in_flight > 0 {
            return false;
        }
        if self.cancelled || self.error.is_some() {
            return true;
        }
        match &self.kind {
            RangeKind::Write { flushed, .. } => *flushed,
            _ => self.next >= self.end,
        }
    }

    fn cancel(&mut self) {
        self.cancelled = true;
    }

    fn progress(&self, out: &mut dyn Write, now: u64) -> fmt::Result {
        let total = (self.end - self.start) * self.block_size;
        let what = match self.kind {
            RangeKind::Read { .. } => "read",
            RangeKind::Write { .. } => "write",
            RangeKind::Checksum { .. } => "checksum",
        };
        write!(
            out,
            "{what} {}: {}% ",
            self.name,
            self.bytes_done * 100 / total.max(1)
        )?;
        write!(out, "({} of {} MiB, ", self.bytes_done >> 20, total >> 20)?;
        rate(out, self.bytes_done, now - self.started)?;
        write!(out, ") Ctrl-C cancels")
    }

    fn report(&mut self, out: &mut dyn Write, now: u64) -> fmt::Result {
        if let Some((lba, e)) = self.error {
            return writeln!(out, "error: {}: I/O failed at LBA {lba}: {e}", self.name);
        }
        let blocks = self.bytes_done / self.block_size;
        if self.cancelled {
            return writeln!(out, "error: cancelled after {blocks} blocks");
        }
        match &mut self.kind {
            RangeKind::Read { data } => write_hexdump(out, data, self.start * self.block_size),
            RangeKind::Write { .. } => {
                write!(
                    out,
                    "wrote {blocks} blocks ({} bytes) to {} at LBA {} in ",
                    self.bytes_done, self.name, self.start
                )?;
                ms(out, now - self.started)?;
                write!(out, " (")?;
                rate(out, self.bytes_done, now - self.started)?;
                let fua = matches!(self.kind, RangeKind::Write { fua: true, .. });
                writeln!(
                    out,
                    ", transfers of up to {} bytes{}), flushed",
                    self.chunk_blocks * self.block_size,
                    if fua { ", FUA" } else { "" }
                )
            }
            RangeKind::Checksum { hasher, .. } => {
                let digest = core::mem::take(hasher.as_mut()).finalize();
                for b in digest.iter() {
                    write!(out, "{b:02x}")?;
                }
                writeln!(
                    out,
                    "  {} LBA {} count {} ({} bytes)",
                    self.name, self.start, blocks, self.bytes_done
                )
            }
        }
    }
}

/// `flush DEV`.
pub struct FlushTask {
    target: Target,
    name: VolumeName,
    state: u8, // 0 to send, 1 in flight, 2 done
    result: Result<(), BlockError>,
    cancelled: bool,
    started: u64,
}

impl FlushTask {
    /// A flush of `disk`.
    pub fn new(st: &Volumes, target: Target, now: u64) -> Self {
        FlushTask {
            target,
            name: st.target_name(target),
            state: 0,
            result: Ok(()),
            cancelled: false,
            started: now,
        }
    }
}

impl Task for FlushTask {
    fn step(&mut self, st: &mut Volumes, _now: u64) {
        if self.state != 0 {
            return;
        }
        match st.submit_to(self.target, BlockRequest::flush(0)) {
            Ok(()) => self.state = 1,
            Err((BlockError::QueueFull, _)) => {}
            Err((e, _)) => {
                self.result = Err(e);
                self.state = 2;
            }
        }
    }
    fn complete(&mut self, _pool: &mut BufferPool, c: Completion, _now: u64) {
        self.result = c.result;
        self.state = 2;
    }
    fn done(&self) -> bool {
        self.state == 2
    }
    fn cancel(&mut self) {
        if self.state == 0 {
            self.cancelled = true;
            self.state = 2;
        }
    }
    fn progress(&self, out: &mut dyn Write, _now: u64) -> fmt::Result {
        write!(out, "flushing {}", self.name)
    }
    fn report(&mut self, out: &mut dyn Write, now: u64) -> fmt::Result {
        if self.cancelled {
            return writeln!(out, "error: cancelled before the flush was sent");
        }
        match self.result {
            Ok(()) => {
                write!(out, "flushed {} in ", self.name)?;
                ms(out, now - self.started)?;
                writeln!(out)
            }
            Err(e) => writeln!(out, "error: {}: flush failed: {e}", self.name),
        }
    }
}

/// The access pattern of `bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
}

impl BenchMode {
    /// The `--rw` name.
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Read => "read",
            BenchMode::Write => "write",
            BenchMode::RandRead => "randread",
            BenchMode::RandWrite => "randwrite",
        }
    }
    /// Whether the mode writes.
    pub fn writes(self) -> bool {
        matches!(self, BenchMode::Write | BenchMode::RandWrite)
    }
    fn random(self) -> bool {
        matches!(self, BenchMode::RandRead | BenchMode::RandWrite)
    }
}

/// When `bench` stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchLimit {
    /// After this many nanoseconds.
    Time(u64),
    /// After this many I/Os.
    Ios(u64),
}

/// What `bench` runs.
#[derive(Clone, Copy, Debug)]
pub struct BenchSpec {
    /// Access pattern.
    pub mode: BenchMode,
    /// Block size in bytes (checked by the caller).
    pub bs: u64,
    /// Requests in flight.
    pub qd: usize,
    /// When to stop.
    pub limit: BenchLimit,
    /// Blocks from LBA 0 the I/O stays within.
    pub blocks: u64,
    /// Seed for random offsets.
    pub seed: u64,
    /// Random modes visit every offset once before any repeats (fio's default random map);
    /// false draws each offset independently (fio's `norandommap`).
    pub random_map: bool,
    /// Write modes: after every this many writes, wait for those in flight and flush the
    /// device (fio's `fsync`).
    pub fsync: Option<u64>,
}

/// The tag of `bench --fsync`'s flush (write slots are `0..qd`).
const BENCH_FLUSH_TAG: u64 = u32::MAX as u64;

/// `bench --fsync`: when the next flush goes down, and what the flushes cost.
struct BenchFsync {
    every: u64,
    /// Writes issued since the last flush was sent.
    since: u64,
    in_flight: bool,
    sent_at: u64,
    latency: Box<Histogram>,
}

/// `bench`: fio-like load with `qd` requests in flight.
pub struct BenchTask {
    target: Target,
    name: VolumeName,
    mode: BenchMode,
    bs_blocks: u64,
    block_size: u64,
    capacity: u64,
    qd: usize,
    limit: BenchLimit,
    rng: Rng,
    shuffle: Option<Shuffle>,
    next_seq: u64,
    issued: u64,
    completed: u64,
    errors: u64,
    first_error: Option<BlockError>,
    in_flight: usize,
    starts: Vec<u64>,
    free_slots: Vec<u16>,
    latency: Box<Histogram>,
    started: u64,
    ended: u64,
    stop: bool,
    interrupts_at_start: u64,
    interrupts: u64,
    fsync: Option<BenchFsync>,
}

impl BenchTask {
    /// A benchmark of `disk`.
    pub fn new(st: &Volumes, target: Target, spec: BenchSpec, now: u64) -> Self {
        let BenchSpec {
            mode,
            bs,
            qd,
            limit,
            seed,
            blocks,
            random_map,
            fsync,
        } = spec;
        let g = st.geometry(target);
        let block_size = u64::from(g.block_size.max(1));
        let qd = qd.clamp(
            1,
            st.pools[st.disk_of(target)]
                .total()
                .min(usize::from(g.queue_depth.max(1))),
        );
        BenchTask {
            target,
            name: st.target_name(target),
            mode,
            bs_blocks: (bs / block_size).max(1),
            block_size,
            capacity: blocks.min(g.capacity_blocks),
            qd,
            limit,
            rng: Rng::new(seed),
            shuffle: (random_map && mode.random()).then(|| {
                let slots = (blocks.min(g.capacity_blocks) / (bs / block_size).max(1)).max(1);
                Shuffle::new(slots, seed)
            }),
            next_seq: 0,
            issued: 0,
            completed: 0,
            errors: 0,
            first_error: None,
            in_flight: 0,
            starts: alloc::vec![0; qd],
            free_slots: (0..qd as u16).rev().collect(),
            latency: Box::new(Histogram::new()),
            started: now,
            ended: now,
            stop: false,
            interrupts_at_start: st.interrupts(target),
            interrupts: 0,
            fsync: fsync.filter(|_| mode.writes()).map(|every| BenchFsync {
                every,
                since: 0,
                in_flight: false,
                sent_at: 0,
                latency: Box::new(Histogram::new()),
            }),
        }
    }

    /// `--fsync`: whether writes wait for a flush, and sends it once the writes before it
    /// have completed.
    fn flush_due(&mut self, st: &mut Volumes) -> bool {
        let Some(f) = self.fsync.as_mut() else {
            return false;
        };
        if f.in_flight {
            return true;
        }
        if f.since < f.every {
            return false;
        }
        if self.in_flight > 0 {
            return true;
        }
        match st.submit_to(self.target, BlockRequest::flush(BENCH_FLUSH_TAG)) {
            Ok(()) => {
                f.in_flight = true;
                f.sent_at = st.now_ns();
            }
            Err((BlockError::QueueFull, _)) => {}
            Err((e, _)) => {
                self.first_error.get_or_insert(e);
                self.errors += 1;
                self.stop = true;
            }
        }
        true
    }

    /// Requests in flight at most (after clamping to the device).
    pub fn depth(&self) -> usize {
        self.qd
    }

    fn next_lba(&mut self) -> u64 {
        let slots = (self.capacity / self.bs_blocks).max(1);
        let index = if let Some(shuffle) = &mut self.shuffle {
            shuffle.next_index()
        } else if self.mode.random() {
            self.rng.below(slots)
        } else {
            let i = self.next_seq % slots;
            self.next_seq += 1;
            i
        };
        index * self.bs_blocks
    }
}

impl Task for BenchTask {
    fn step(&mut self, st: &mut Volumes, now: u64) {
        match self.limit {
            BenchLimit::Time(ns) if now - self.started >= ns => self.stop = true,
            BenchLimit::Ios(n) if self.issued >= n => self.stop = true,
            _ => {}
        }
        while !self.stop && self.in_flight < self.qd && !self.flush_due(st) {
            let Some(slot) = self.free_slots.pop() else {
                break;
            };
            let Some(mut buf) = st.pool(self.target).and_then(|p| p.acquire()) else {
                self.free_slots.push(slot);
                break;
            };
            let bytes = (self.bs_blocks * self.block_size) as usize;
            if buf.set_len(bytes).is_err() {
                give_back_to(st, self.target, Some(buf));
                self.free_slots.push(slot);
                self.stop = true;
                break;
            }
            let lba = self.next_lba();
            let request = if self.mode.writes() {
                BlockRequest::write(u64::from(slot), lba, buf, false)
            } else {
                BlockRequest::read(u64::from(slot), lba, buf)
            };
            self.starts[usize::from(slot)] = st.now_ns();
            match st.submit_to(self.target, request) {
                Ok(()) => {
                    self.in_flight += 1;
                    self.issued += 1;
                    if let Some(f) = self.fsync.as_mut() {
                        f.since += 1;
                    }
                    if let BenchLimit::Ios(n) = self.limit {
                        if self.issued >= n {
                            self.stop = true;
                        }
                    }
                }
                Err((BlockError::QueueFull, b)) => {
                    give_back_to(st, self.target, b);
                    self.free_slots.push(slot);
                    break;
                }
                Err((e, b)) => {
                    give_back_to(st, self.target, b);
                    self.free_slots.push(slot);
                    self.first_error.get_or_insert(e);
                    self.errors += 1;
                    self.stop = true;
                }
            }
        }
        if self.stop && self.errors == 0 {
            // The flush owed for the last `--fsync` writes.
            self.flush_due(st);
        }
        self.interrupts = st.interrupts(self.target) - self.interrupts_at_start;
    }

    fn complete(&mut self, pool: &mut BufferPool, c: Completion, now: u64) {
        if let (BENCH_FLUSH_TAG, Some(f)) = (c.tag, self.fsync.as_mut()) {
            f.in_flight = false;
            f.since = 0;
            f.latency.record(now.saturating_sub(f.sent_at));
            if let Err(e) = c.result {
                self.errors += 1;
                self.first_error.get_or_insert(e);
                self.stop = true;
            }
            give_back(pool, c.buffer);
            self.ended = now;
            return;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        let slot = c.tag as usize;
        if let Some(start) = self.starts.get(slot) {
            self.latency.record(now.saturating_sub(*start));
            self.free_slots.push(slot as u16);
        }
        match c.result {
            Ok(()) => self.completed += 1,
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
                self.stop = true;
            }
        }
        give_back(pool, c.buffer);
        self.ended = now;
    }

    fn done(&self) -> bool {
        self.stop
            && self.in_flight == 0
            && !self
                .fsync
                .as_ref()
                .is_some_and(|f| f.in_flight || (f.since >= f.every && self.errors == 0))
    }

    fn cancel(&mut self) {
        self.stop = true;
    }

    fn progress(&self, out: &mut dyn Write, now: u64) -> fmt::Result {
        let elapsed = (now - self.started).max(1);
        write!(
            out,
            "bench {} {}: {} IOPS, ",
            self.name,
            self.mode.name(),
            self.completed as u128 * 1_000_000_000 / elapsed as u128
        )?;
        rate(
            out,
            self.completed * self.bs_blocks * self.block_size,
            elapsed,
        )?;
        write!(out, ", {} s, Ctrl-C stops", elapsed / 1_000_000_000)
    }

    fn report(&mut self, out: &mut dyn Write, _now: u64) -> fmt::Result {
        let elapsed = (self.ended - self.started).max(1);
        let bytes = self.completed * self.bs_blocks * self.block_size;
        writeln!(
            out,
            "bench {} rw={} bs={} qd={}: {} I/Os in {}.{:03} s",
            self.name,
            self.mode.name(),
            self.bs_blocks * self.block_size,
            self.qd,
            self.completed,
            elapsed / 1_000_000_000,
            (elapsed / 1_000_000) % 1000
        )?;
        write!(
            out,
            "  IOPS {}  ",
            self.completed as u128 * 1_000_000_000 / elapsed as u128
        )?;
        rate(out, bytes, elapsed)?;
        writeln!(out)?;
        let h = &self.latency;
        write!(out, "  latency avg ")?;
        us(out, h.mean())?;
        write!(out, "  p50 ")?;
        us(out, h.percentile(500))?;
        write!(out, "  p99 ")?;
        us(out, h.percentile(990))?;
        write!(out, "  max ")?;
        us(out, h.max())?;
        writeln!(out)?;
        let per = self.interrupts as u128 * 100 / self.completed.max(1) as u128;
        writeln!(
            out,
            "  interrupts {} ({}.{:02} per completion)",
            self.interrupts,
            per / 100,
            per % 100
        )?;
        if let Some(f) = &self.fsync {
            write!(
                out,
                "  flushes {} (every {} writes), latency avg ",
                f.latency.count(),
                f.every
            )?;
            us(out, f.latency.mean())?;
            write!(out, "  p99 ")?;
            us(out, f.latency.percentile(990))?;
            writeln!(out)?;
        }
        if let Some(e) = self.first_error {
            writeln!(out, "error: {} I/O errors, first: {e}", self.errors)?;
        }
        Ok(())
    }
}
