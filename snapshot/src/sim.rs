//! A simulated world for driving the engine on the host: disks with a volatile write cache,
//! flush and FUA, crash images, chosen completion order, injected errors (a failed write may
//! land in part, a flush may be acknowledged and ignored), and a latency model.
//!
//! Used by the crate's tests and by the bench; it is `no_std` + `alloc` like the rest of the
//! crate but is not meant for the appliance.
//!
//! Sectors are not stored as bytes: each holds a `u64` *value*. 0 is a zero sector; a value
//! with [`DATA_BIT`] is a data stamp (which write put it there); a value with [`META_BIT`]
//! indexes an interned 512-byte metadata sector written by the engine. Copies move values
//! around unchanged, so a test can tell exactly which write a sector came from.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;

use crate::engine::Engine;
use crate::format::SECTOR_BYTES;
use crate::types::*;

/// Marks a data stamp.
pub const DATA_BIT: u64 = 1 << 63;

/// What test write number `write` puts in `sector`: [`DATA_BIT`], the write, the sector.
pub fn stamp(write: u64, sector: u64) -> u64 {
    DATA_BIT | (write << 24) | sector
}
/// Marks an interned metadata sector.
pub const META_BIT: u64 = 1 << 62;

/// Interned metadata sector contents.
#[derive(Clone, Default)]
pub struct Contents {
    sectors: Vec<[u8; SECTOR_BYTES]>,
    index: BTreeMap<[u8; SECTOR_BYTES], u64>,
}

impl Contents {
    /// The value for a 512-byte sector.
    pub fn intern(&mut self, bytes: &[u8]) -> u64 {
        let mut s = [0u8; SECTOR_BYTES];
        let n = bytes.len().min(SECTOR_BYTES);
        s[..n].copy_from_slice(&bytes[..n]);
        if s.iter().all(|&b| b == 0) {
            return 0;
        }
        if let Some(&v) = self.index.get(&s) {
            return v;
        }
        let v = META_BIT | self.sectors.len() as u64;
        self.sectors.push(s);
        self.index.insert(s, v);
        v
    }

    /// The bytes of a sector value (a data stamp is repeated as little-endian `u64`s, so a
    /// stamp read as a record is never a terminator).
    pub fn bytes(&self, v: u64, out: &mut [u8]) {
        out.fill(0);
        if v == 0 {
            return;
        }
        if v & META_BIT != 0 && v & DATA_BIT == 0 {
            if let Some(s) = self.sectors.get((v & !META_BIT) as usize) {
                let n = out.len().min(SECTOR_BYTES);
                out[..n].copy_from_slice(&s[..n]);
            }
            return;
        }
        for c in out.chunks_mut(8) {
            let b = v.to_le_bytes();
            let n = c.len();
            c.copy_from_slice(&b[..n]);
        }
    }

    /// Bytes of a run of sector values.
    pub fn image_bytes(&self, values: &[u64]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * SECTOR_BYTES];
        for (i, &v) in values.iter().enumerate() {
            self.bytes(v, &mut out[i * SECTOR_BYTES..(i + 1) * SECTOR_BYTES]);
        }
        out
    }
}

#[derive(Clone, Debug)]
struct CachedWrite {
    seq: u64,
    start: u64,
    values: Vec<Option<u64>>,
}

/// One simulated block device.
#[derive(Clone, Debug)]
pub struct SimDisk {
    /// What reads see.
    pub current: Vec<u64>,
    /// What survives a crash for sure.
    pub durable: Vec<u64>,
    cache: Vec<CachedWrite>,
    inflight: BTreeMap<u64, CachedWrite>,
    next_seq: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Writes completed.
    pub writes: u64,
}

impl SimDisk {
    /// A disk of `sectors` sectors filled with `fill(sector)`.
    pub fn new(sectors: u64, fill: impl Fn(u64) -> u64) -> Self {
        let v: Vec<u64> = (0..sectors).map(fill).collect();
        SimDisk {
            current: v.clone(),
            durable: v,
            cache: Vec::new(),
            inflight: BTreeMap::new(),
            next_seq: 0,
            flushes: 0,
            writes: 0,
        }
    }

    /// Sectors.
    pub fn sectors(&self) -> u64 {
        self.current.len() as u64
    }

    fn submit_write(&mut self, id: u64, start: u64, values: &[u64]) {
        self.inflight.insert(
            id,
            CachedWrite {
                seq: 0,
                start,
                values: values.iter().map(|&v| Some(v)).collect(),
            },
        );
    }

    /// Completes write `id`. A failed write (`ok` false) leaves its first `landed` sectors
    /// behind, in the cache like any write (a crash may or may not keep them; FUA gives no
    /// guarantee for a write that failed); the rest never reaches the medium.
    fn complete_write(&mut self, id: u64, fua: bool, ok: bool, landed: usize) {
        let Some(mut w) = self.inflight.remove(&id) else {
            return;
        };
        if !ok {
            let n = landed.min(w.values.len());
            if n == 0 {
                return;
            }
            w.values.truncate(n);
            for (i, v) in w.values.iter().enumerate() {
                if let Some(v) = v {
                    self.current[w.start as usize + i] = *v;
                }
            }
            w.seq = self.next_seq;
            self.next_seq += 1;
            self.cache.push(w);
            return;
        }
        self.writes += 1;
        for (i, v) in w.values.iter().enumerate() {
            if let Some(v) = v {
                self.current[w.start as usize + i] = *v;
            }
        }
        if fua {
            let (a, b) = (w.start, w.start + w.values.len() as u64);
            for c in &mut self.cache {
                for (i, v) in c.values.iter_mut().enumerate() {
                    let s = c.start + i as u64;
                    if s >= a && s < b {
                        *v = None;
                    }
                }
            }
            for (i, v) in w.values.iter().enumerate() {
                if let Some(v) = v {
                    self.durable[w.start as usize + i] = *v;
                }
            }
        } else {
            w.seq = self.next_seq;
            self.next_seq += 1;
            self.cache.push(w);
        }
    }

    /// Barrier for a flush submitted now: writes completed so far.
    fn flush_barrier(&self) -> u64 {
        self.next_seq
    }

    fn complete_flush(&mut self, barrier: u64, ok: bool) {
        if !ok {
            return;
        }
        self.flushes += 1;
        let mut keep = Vec::new();
        for w in core::mem::take(&mut self.cache) {
            if w.seq < barrier {
                for (i, v) in w.values.iter().enumerate() {
                    if let Some(v) = v {
                        self.durable[w.start as usize + i] = *v;
                    }
                }
            } else {
                keep.push(w);
            }
        }
        self.cache = keep;
    }

    /// Writes that a crash may or may not keep (completed-but-cached, then in flight).
    pub fn volatile_writes(&self) -> usize {
        self.cache.len() + self.inflight.len()
    }

    /// A crash image: the durable state plus a subset of the volatile writes, each torn at
    /// sector granularity. `mode` 0 keeps none, 1 keeps all (in order), otherwise a random
    /// subset by `seed`.
    pub fn crash_image(&self, mode: u32, seed: u64) -> Vec<u64> {
        let mut img = self.durable.clone();
        let mut rng = Rng::new(seed ^ 0x5EED);
        let all = self.cache.iter().chain(self.inflight.values());
        for w in all {
            let (keep_write, tear) = match mode {
                0 => (false, false),
                1 => (true, false),
                _ => (rng.below(2) == 0, rng.below(3) == 0),
            };
            if !keep_write {
                continue;
            }
            for (i, v) in w.values.iter().enumerate() {
                if let Some(v) = v {
                    if !tear || rng.below(2) == 0 {
                        img[w.start as usize + i] = *v;
                    }
                }
            }
        }
        img
    }
}

/// A small deterministic PRNG (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Order in which the world completes in-flight I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Oldest first.
    InOrder,
    /// Newest first.
    Reversed,
    /// Random, from the world's seed.
    Random,
    /// Earliest simulated completion time first (see [`Latency`]).
    Timed,
}

/// Latency model, in ticks (the bench uses microseconds). Each device serves one I/O at a time.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    /// Per read.
    pub read: u64,
    /// Per write.
    pub write: u64,
    /// Per flush.
    pub flush: u64,
    /// I/Os a device works on in parallel.
    pub parallel: u32,
}

#[derive(Clone, Debug)]
struct InFlight {
    io: Io,
    id: u64,
    barrier: u64,
    done_at: u64,
}

/// Error injection: return true to fail the I/O.
pub type FailFn = Box<dyn FnMut(&Io) -> bool>;
/// For a write that [`World::fail`] failed: how many of its leading sectors reach the device
/// before the error (a failed write that partly lands). Values of `sectors` or more count as
/// `sectors - 1`: a failed write never lands whole, so a failed one-sector write lands nothing
/// (sector writes are atomic).
pub type LandFn = Box<dyn FnMut(&Io) -> u32>;
/// Observer of issued I/O: the I/O and the simulated time.
pub type IssueFn = Box<dyn FnMut(&Io, u64)>;

/// Engine + disks + buffers, driven step by step.
pub struct World {
    /// The engine under test.
    pub engine: Engine,
    /// The origin device.
    pub origin: SimDisk,
    /// COW devices by snapshot slot.
    pub cows: Vec<Option<SimDisk>>,
    /// Interned metadata sectors.
    pub contents: Contents,
    /// Caller buffers by tag.
    pub buffers: BTreeMap<u64, Vec<u64>>,
    copy_buffers: Vec<Vec<u64>>,
    inflight: Vec<InFlight>,
    /// I/Os `Engine::submit_direct` handed back, issued first by the next [`World::pump`].
    direct: VecDeque<Io>,
    /// Completion order.
    pub order: Order,
    /// Latency model for [`Order::Timed`].
    pub latency: Latency,
    rng: Rng,
    /// Error injection: return true to fail this I/O.
    pub fail: Option<FailFn>,
    /// Failed writes that partly land: how many leading sectors (none when unset).
    pub partial_fail: Option<LandFn>,
    /// A device that ignores flushes: return true to acknowledge this flush as done without
    /// making any earlier write durable (a cache that lies). Failure injection comes first: a
    /// flush that [`World::fail`] fails is reported failed.
    pub ignore_flush: Option<FailFn>,
    /// Completed volume requests not yet taken by the test.
    pub completed: Vec<VolumeCompletion>,
    /// Events not yet taken.
    pub events: Vec<Event>,
    /// Simulated time.
    pub now: u64,
    next_id: u64,
    busy_until: BTreeMap<(u8, u16), Vec<u64>>,
    /// I/O completions so far.
    pub completions: u64,
    /// Called on every I/O when it is submitted to a device (bench statistics).
    pub on_issue: Option<IssueFn>,
}

impl World {
    /// A world around `engine` with an origin disk.
    pub fn new(engine: Engine, origin: SimDisk, order: Order, seed: u64) -> Self {
        let cfg = *engine.config();
        let copy_buffers = (0..cfg.copy_buffers)
            .map(|_| vec![0u64; cfg.copy_buffer_sectors as usize])
            .collect();
        let slots = cfg.max_snapshots as usize;
        World {
            engine,
            origin,
            cows: (0..slots).map(|_| None).collect(),
            contents: Contents::default(),
            buffers: BTreeMap::new(),
            copy_buffers,
            inflight: Vec::new(),
            direct: VecDeque::new(),
            order,
            latency: Latency {
                read: 20,
                write: 30,
                flush: 1000,
                parallel: 1,
            },
            rng: Rng::new(seed),
            fail: None,
            partial_fail: None,
            ignore_flush: None,
            completed: Vec::new(),
            events: Vec::new(),
            now: 0,
            next_id: 1,
            busy_until: BTreeMap::new(),
            completions: 0,
            on_issue: None,
        }
    }

    /// Submits a volume request with its buffer (data for writes; zeros for reads).
    pub fn submit(&mut self, req: VolumeRequest, buffer: Vec<u64>) -> Result<(), SubmitError> {
        // As the appliance does: a request the fast path issues at once comes back as its
        // I/O, issued by the caller (here: the next pump) without the engine's outbox.
        if let Some(io) = self.engine.submit_direct(req)? {
            self.direct.push_back(io);
        }
        self.buffers.insert(req.tag, buffer);
        Ok(())
    }

    /// Submits origin write `tag` (not FUA) of `sectors` sectors at `sector`, each holding
    /// [`stamp`]`(tag, its sector)`.
    pub fn write_origin(&mut self, tag: u64, sector: u64, sectors: u32) -> Result<(), SubmitError> {
        let req = VolumeRequest {
            tag,
            volume: Volume::Origin,
            op: VolumeOp::Write { fua: false },
            sector,
            sectors,
        };
        let data = (sector..sector + u64::from(sectors))
            .map(|s| stamp(tag, s))
            .collect();
        self.submit(req, data)
    }

    fn disk(&mut self, d: Device) -> Option<&mut SimDisk> {
        match d {
            Device::Origin => Some(&mut self.origin),
            Device::Cow(s) => self.cows.get_mut(s.0 as usize)?.as_mut(),
        }
    }

    fn buffer_values(&mut self, io: &Io) -> Vec<u64> {
        let n = io.sectors as usize;
        match io.buffer {
            IoBuffer::None => Vec::new(),
            IoBuffer::Zeroes => vec![0; n],
            IoBuffer::Caller { tag, byte_offset } => {
                let off = (byte_offset / SECTOR_BYTES as u64) as usize;
                self.buffers
                    .get(&tag)
                    .and_then(|b| b.get(off..off + n))
                    .map(|s| s.to_vec())
                    .unwrap_or_else(|| vec![0; n])
            }
            IoBuffer::Copy { index, byte_offset } => {
                let off = (byte_offset / SECTOR_BYTES as u64) as usize;
                self.copy_buffers
                    .get(index as usize)
                    .and_then(|b| b.get(off..off + n))
                    .map(|s| s.to_vec())
                    .unwrap_or_else(|| vec![0; n])
            }
            IoBuffer::Meta { .. } => {
                let bytes = self
                    .engine
                    .meta_bytes(&io.buffer)
                    .map(|b| b.to_vec())
                    .unwrap_or_default();
                (0..n)
                    .map(|i| {
                        let a = i * SECTOR_BYTES;
                        let b = (a + SECTOR_BYTES).min(bytes.len());
                        if a >= bytes.len() {
                            0
                        } else {
                            self.contents.intern(&bytes[a..b])
                        }
                    })
                    .collect()
            }
        }
    }

    /// Moves every I/O the engine wants issued into the simulated devices.
    pub fn pump(&mut self) {
        self.engine.tick(self.now);
        while let Some(io) = self.direct.pop_front().or_else(|| self.engine.poll_io()) {
            let id = self.next_id;
            self.next_id += 1;
            let mut barrier = 0;
            match io.op {
                IoOp::Write { .. } => {
                    let values = self.buffer_values(&io);
                    if let Some(d) = self.disk(io.device) {
                        d.submit_write(id, io.sector, &values);
                    }
                }
                IoOp::Flush => {
                    if let Some(d) = self.disk(io.device) {
                        barrier = d.flush_barrier();
                    }
                }
                IoOp::Read => {}
            }
            let done_at = self.schedule(&io);
            if let Some(f) = self.on_issue.as_mut() {
                f(&io, self.now);
            }
            self.inflight.push(InFlight {
                io,
                id,
                barrier,
                done_at,
            });
        }
        self.drain();
    }

    fn schedule(&mut self, io: &Io) -> u64 {
        let lat = match io.op {
            IoOp::Read => self.latency.read,
            IoOp::Write { .. } => self.latency.write,
            IoOp::Flush => self.latency.flush,
        };
        let key = match io.device {
            Device::Origin => (0, 0),
            Device::Cow(s) => (1, s.0),
        };
        let par = self.latency.parallel.max(1) as usize;
        let now = self.now;
        let lanes = self.busy_until.entry(key).or_insert_with(|| vec![0; par]);
        // Earliest free lane.
        let mut best = 0;
        for (i, &t) in lanes.iter().enumerate() {
            if t < lanes[best] {
                best = i;
            }
        }
        let start = lanes[best].max(now);
        lanes[best] = start + lat;
        start + lat
    }

    fn drain(&mut self) {
        while let Some(c) = self.engine.poll_completion() {
            self.completed.push(c);
        }
        while let Some(e) = self.engine.poll_event() {
            self.events.push(e);
        }
    }

    /// In-flight I/Os.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Completes one in-flight I/O (chosen by the order policy). False if none.
    pub fn complete_one(&mut self) -> bool {
        self.pump();
        if !self.finish_one() {
            return false;
        }
        self.pump();
        true
    }

    /// One round of the appliance's loop: every I/O in flight completes (as after one
    /// interrupt), and only then does the engine run and hand over its finished requests.
    /// Returns how many I/Os completed.
    pub fn complete_round(&mut self) -> usize {
        self.pump();
        let mut n = 0;
        while self.finish_one() {
            n += 1;
        }
        self.pump();
        n
    }

    /// Completes one in-flight I/O without letting the engine run afterwards.
    fn finish_one(&mut self) -> bool {
        if self.inflight.is_empty() {
            return false;
        }
        let i = match self.order {
            Order::InOrder => 0,
            Order::Reversed => self.inflight.len() - 1,
            Order::Random => self.rng.below(self.inflight.len() as u64) as usize,
            Order::Timed => {
                let mut best = 0;
                for (k, f) in self.inflight.iter().enumerate() {
                    if f.done_at < self.inflight[best].done_at {
                        best = k;
                    }
                }
                best
            }
        };
        let f = self.inflight.remove(i);
        if self.order == Order::Timed {
            self.now = self.now.max(f.done_at);
        } else {
            // One tick per completion, so hold bounds matter in every order.
            self.now += 1;
        }
        let fail = match self.fail.as_mut() {
            Some(g) => g(&f.io),
            None => false,
        };
        let ok = !fail;
        match f.io.op {
            IoOp::Read => {
                if ok {
                    let (a, n) = (f.io.sector as usize, f.io.sectors as usize);
                    let data: Vec<u64> = match self.disk(f.io.device) {
                        Some(d) => d
                            .current
                            .get(a..a + n)
                            .map(|s| s.to_vec())
                            .unwrap_or_default(),
                        None => Vec::new(),
                    };
                    self.store_read(&f.io, &data);
                }
            }
            IoOp::Write { fua } => {
                let landed = match self.partial_fail.as_mut() {
                    Some(g) if !ok => g(&f.io).min(f.io.sectors.saturating_sub(1)) as usize,
                    _ => 0,
                };
                if let Some(d) = self.disk(f.io.device) {
                    d.complete_write(f.id, fua, ok, landed);
                }
            }
            IoOp::Flush => {
                let ignored = ok
                    && match self.ignore_flush.as_mut() {
                        Some(g) => g(&f.io),
                        None => false,
                    };
                if let Some(d) = self.disk(f.io.device) {
                    if ignored {
                        d.flushes += 1;
                    } else {
                        d.complete_flush(f.barrier, ok);
                    }
                }
            }
        }
        let result = if ok { Ok(()) } else { Err(IoError) };
        self.completions += 1;
        self.engine.tick(self.now);
        let _ = self.engine.complete_io(f.io.token, result);
        true
    }

    fn store_read(&mut self, io: &Io, data: &[u64]) {
        if let IoBuffer::Meta { .. } = io.buffer {
            // A merge reads a metadata area back into the engine's buffer.
            let bytes = self.contents.image_bytes(data);
            if let Some(dst) = self.engine.meta_bytes_mut(&io.buffer) {
                let n = dst.len().min(bytes.len());
                dst[..n].copy_from_slice(&bytes[..n]);
            }
            return;
        }
        let dst: Option<&mut [u64]> = match io.buffer {
            IoBuffer::Caller { tag, byte_offset } => {
                let off = (byte_offset / SECTOR_BYTES as u64) as usize;
                self.buffers
                    .get_mut(&tag)
                    .and_then(|b| b.get_mut(off..off + data.len()))
            }
            IoBuffer::Copy { index, byte_offset } => {
                let off = (byte_offset / SECTOR_BYTES as u64) as usize;
                self.copy_buffers
                    .get_mut(index as usize)
                    .and_then(|b| b.get_mut(off..off + data.len()))
            }
            _ => None,
        };
        if let Some(d) = dst {
            d.copy_from_slice(data);
        }
    }

    /// Runs until nothing is in flight (or `limit` completions).
    pub fn settle(&mut self, limit: u64) {
        let mut n = 0;
        while n < limit && self.complete_one() {
            n += 1;
        }
    }

    /// Takes the completion for `tag` if it has arrived.
    pub fn take_completion(&mut self, tag: u64) -> Option<VolumeCompletion> {
        let i = self.completed.iter().position(|c| c.tag == tag)?;
        Some(self.completed.remove(i))
    }
}
