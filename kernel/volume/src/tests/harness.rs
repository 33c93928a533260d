//! The test world: disks with a volatile write cache and crash images, a clock, and a main
//! loop that runs tasks and volume requests the way the kernel's does.

use std::boxed::Box;
use std::cell::Cell;
use std::collections::VecDeque;
use std::string::String;
use std::sync::{Arc, Mutex};
use std::vec::Vec;

use drivers::block::{
    BlockDevice, BlockError, BlockRequest, BlockStats, BufferPool, Completion, Fault, Geometry,
    Operation, PollOutcome, RamDisk, RamDiskConfig, Rejected,
};
use drivers::hal::fake::FakeDma;
use drivers::info::{DeviceInfo, FixedString};
use snapshot::SnapId;

use crate::origin::SnapState;
use crate::snaptask::{CreateSpec, CreateTask, DeleteTask, MergeTask};
use crate::tasks::Task;
use crate::{Platform, Ports, Target, Volumes};

std::thread_local! {
    static NOW: Cell<u64> = const { Cell::new(1_000_000_000) };
}

/// The test clock (per thread: tests run in parallel).
pub fn now() -> u64 {
    NOW.with(|n| n.get())
}

fn tick() -> u64 {
    NOW.with(|n| {
        n.set(n.get() + 50_000);
        n.get()
    })
}

/// The wall clock's date in tests (2023-11-14).
pub const UNIX_NOW: u64 = 1_700_000_000;

/// DMA from the host allocator, the test clocks.
pub fn platform() -> Platform {
    Platform::new::<FakeDma>(now, || Some(UNIX_NOW))
}

/// The tag of an NBD client's request `id` (its completion comes back through the NBD port).
pub fn nbd_tag(id: u64) -> u64 {
    crate::port::Port::Nbd(id).tag()
}

struct Cached {
    seq: u64,
    offset: usize,
    data: Vec<u8>,
}

enum Pending {
    Write {
        offset: usize,
        data: Vec<u8>,
        fua: bool,
    },
    Flush {
        barrier: u64,
    },
    Other,
}

/// What a [`Disk`] holds, shared between the device in a `Volumes` and the test.
pub struct DiskState {
    /// The medium as reads see it.
    pub ram: RamDisk,
    serial: &'static str,
    /// What survives a crash for sure.
    pub durable: Vec<u8>,
    cache: Vec<Cached>,
    pending: VecDeque<Pending>,
    next_seq: u64,
    block: usize,
}

impl DiskState {
    /// A crash image: the durable bytes plus a subset of the writes a crash may keep (done
    /// but not flushed, then in flight), torn at sector granularity. `mode` 0 keeps none, 1
    /// keeps all in order, otherwise a random subset by `seed` (as `snapshot::sim`).
    pub fn crash_image(&self, mode: u32, seed: u64) -> Vec<u8> {
        let mut img = self.durable.clone();
        let mut rng = snapshot::sim::Rng::new(seed ^ 0x5EED);
        let inflight = self.pending.iter().filter_map(|p| match p {
            Pending::Write { offset, data, .. } => Some((*offset, data)),
            _ => None,
        });
        for (offset, data) in self
            .cache
            .iter()
            .map(|c| (c.offset, &c.data))
            .chain(inflight)
        {
            let (keep, tear) = match mode {
                0 => (false, false),
                1 => (true, false),
                _ => (rng.below(2) == 0, rng.below(3) == 0),
            };
            if !keep {
                continue;
            }
            for (i, sector) in data.chunks(512).enumerate() {
                if !tear || rng.below(2) == 0 {
                    let at = offset + i * 512;
                    img[at..at + sector.len()].copy_from_slice(sector);
                }
            }
        }
        img
    }

    /// Writes done but not durable, and writes in flight.
    pub fn volatile_writes(&self) -> usize {
        self.cache.len()
            + self
                .pending
                .iter()
                .filter(|p| matches!(p, Pending::Write { .. }))
                .count()
    }

    /// The medium's bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.ram.contents().to_vec()
    }

    fn on_complete(&mut self, c: &Completion) {
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        match (p, c.result) {
            (Pending::Write { offset, data, fua }, Ok(())) => {
                if fua {
                    let end = offset + data.len();
                    // An older cached write over the same bytes must not win in a crash.
                    for w in &mut self.cache {
                        let (a, b) = (w.offset, w.offset + w.data.len());
                        if a < end && offset < b {
                            let lo = a.max(offset);
                            let hi = b.min(end);
                            w.data[lo - a..hi - a].copy_from_slice(&data[lo - offset..hi - offset]);
                        }
                    }
                    self.durable[offset..end].copy_from_slice(&data);
                } else {
                    self.cache.push(Cached {
                        seq: self.next_seq,
                        offset,
                        data,
                    });
                    self.next_seq += 1;
                }
            }
            (Pending::Flush { barrier }, Ok(())) => {
                let mut keep = Vec::new();
                for w in core::mem::take(&mut self.cache) {
                    if w.seq < barrier {
                        self.durable[w.offset..w.offset + w.data.len()].copy_from_slice(&w.data);
                    } else {
                        keep.push(w);
                    }
                }
                self.cache = keep;
            }
            _ => {}
        }
    }
}

/// A RAM disk with a serial number and a volatile write cache: completed writes are durable
/// only after a flush that was sent after them completes (or with FUA).
#[derive(Clone)]
pub struct Disk(pub Arc<Mutex<DiskState>>);

/// The shape of a test disk.
#[derive(Clone, Copy)]
pub struct Shape {
    pub blocks: u64,
    pub block_size: u32,
    pub max_transfer: u32,
    pub depth: u16,
    pub fua: bool,
}

impl Shape {
    /// `mib` MiB of 512-byte blocks, 128 KiB transfers, depth 32.
    pub fn mib(mib: u64) -> Shape {
        Shape {
            blocks: mib * 2048,
            block_size: 512,
            max_transfer: 128 * 1024,
            depth: 32,
            fua: true,
        }
    }
}

impl Disk {
    /// A zeroed disk.
    pub fn new(name: &str, serial: &'static str, shape: Shape) -> Disk {
        let geometry = Geometry {
            block_size: shape.block_size,
            capacity_blocks: shape.blocks,
            max_transfer_bytes: shape.max_transfer,
            queue_count: 1,
            queue_depth: shape.depth,
            volatile_write_cache: true,
            fua: shape.fua,
            discard: true,
            max_discard_blocks: 2048,
            read_only: false,
        };
        let ram = RamDisk::new(name, RamDiskConfig { geometry });
        let bytes = ram.contents().len();
        Disk(Arc::new(Mutex::new(DiskState {
            ram,
            serial,
            durable: std::vec![0; bytes],
            cache: Vec::new(),
            pending: VecDeque::new(),
            next_seq: 0,
            block: shape.block_size as usize,
        })))
    }

    /// The same disk (name, serial, shape) after a power cut: `image` on the medium.
    pub fn rebooted(&self, image: Vec<u8>) -> Disk {
        let s = self.0.lock().unwrap();
        let g = s.ram.geometry();
        let shape = Shape {
            blocks: g.capacity_blocks,
            block_size: g.block_size,
            max_transfer: g.max_transfer_bytes,
            depth: g.queue_depth,
            fua: g.fua,
        };
        let name = s.ram.info().name;
        let d = Disk::new(name.as_str(), s.serial, shape);
        d.set(&image);
        d
    }

    /// Puts `bytes` on the medium (durable), as if written before boot.
    pub fn set(&self, bytes: &[u8]) {
        let mut s = self.0.lock().unwrap();
        s.ram.contents_mut()[..bytes.len()].copy_from_slice(bytes);
        s.durable[..bytes.len()].copy_from_slice(bytes);
    }

    /// Writes `bytes` at byte `offset` on the medium (durable), before boot.
    pub fn poke(&self, offset: usize, bytes: &[u8]) {
        let mut s = self.0.lock().unwrap();
        s.ram.contents_mut()[offset..offset + bytes.len()].copy_from_slice(bytes);
        s.durable[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// The medium's bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap().contents()
    }

    /// Bytes `range` of the medium.
    pub fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.0.lock().unwrap().ram.contents()[offset..offset + len].to_vec()
    }

    /// Makes matching requests fail.
    pub fn inject(&self, fault: Fault) {
        let _ = self.0.lock().unwrap().ram.inject(fault);
    }

    /// What a power cut now leaves (see [`DiskState::crash_image`]).
    pub fn crash_image(&self, mode: u32, seed: u64) -> Vec<u8> {
        self.0.lock().unwrap().crash_image(mode, seed)
    }

    /// Writes a crash may or may not keep.
    pub fn volatile_writes(&self) -> usize {
        self.0.lock().unwrap().volatile_writes()
    }

    /// The device `Volumes` holds.
    pub fn device(&self) -> Box<dyn BlockDevice + Send> {
        Box::new(self.clone())
    }
}

impl BlockDevice for Disk {
    fn geometry(&self) -> Geometry {
        self.0.lock().unwrap().ram.geometry()
    }

    fn submit(&mut self, request: BlockRequest) -> Result<(), Rejected> {
        let mut s = self.0.lock().unwrap();
        let record = match request.op {
            Operation::Write { fua } => Pending::Write {
                offset: request.lba as usize * s.block,
                data: request
                    .buffer
                    .as_ref()
                    .map_or(Vec::new(), |b| b.as_slice().to_vec()),
                fua,
            },
            Operation::Flush => Pending::Flush {
                barrier: s.next_seq,
            },
            _ => Pending::Other,
        };
        s.ram.submit(request)?;
        s.pending.push_back(record);
        Ok(())
    }

    fn poll_completions(&mut self, budget: usize, sink: &mut dyn FnMut(Completion)) -> PollOutcome {
        let mut s = self.0.lock().unwrap();
        let mut done = Vec::new();
        let outcome = s.ram.poll_completions(budget, &mut |c| done.push(c));
        for c in &done {
            s.on_complete(c);
        }
        drop(s);
        for c in done {
            sink(c);
        }
        outcome
    }

    fn interrupt(&mut self, queue: u16) {
        self.0.lock().unwrap().ram.interrupt(queue)
    }

    fn in_flight(&self) -> usize {
        self.0.lock().unwrap().ram.in_flight()
    }

    fn needs_polling(&self) -> bool {
        true
    }

    fn stats(&self) -> BlockStats {
        self.0.lock().unwrap().ram.stats()
    }

    fn info(&self) -> DeviceInfo {
        let s = self.0.lock().unwrap();
        let mut info = s.ram.info();
        info.serial = FixedString::from_str_truncated(s.serial);
        info
    }
}

/// A `Volumes` over `disks` (device `i` is `disks[i]`), each with a pool of its depth.
pub fn volumes(disks: &[&Disk]) -> Volumes {
    let mut v = Volumes::new(platform());
    for (i, d) in disks.iter().enumerate() {
        let g = d.geometry();
        let pool = BufferPool::new::<FakeDma>(i as u16, usize::from(g.queue_depth), 128 * 1024)
            .expect("pool");
        v.add_device(d.device(), pool);
    }
    v
}

/// Completions seen by [`World::step`] for requests the test itself sent.
#[derive(Default)]
pub struct Inbox {
    pub task: Vec<Completion>,
    pub nbd: Vec<Completion>,
}

/// One turn of the main loop: device completions (at most `budget` of them, `None`: all
/// there are) go to the engines, to `task` or to the inbox; then `task` steps and the
/// engines issue. Returns the completions delivered.
pub fn turn(
    v: &mut Volumes,
    mut task: Option<&mut dyn Task>,
    inbox: &mut Inbox,
    budget: &mut Option<usize>,
) -> usize {
    let now = tick();
    let mut delivered = 0;
    {
        let budget_cell = &mut *budget;
        let mut drain = |devices: &mut [Box<dyn BlockDevice + Send>],
                         route: &mut dyn FnMut(u16, Completion)|
         -> bool {
            let mut more = false;
            for (i, d) in devices.iter_mut().enumerate() {
                let room = budget_cell.unwrap_or(usize::MAX);
                if room == 0 {
                    return true;
                }
                let out = d.poll_completions(room.min(64), &mut |c| {
                    delivered += 1;
                    route(i as u16, c)
                });
                if let Some(b) = budget_cell.as_mut() {
                    *b -= out.completed;
                }
                more |= out.more;
            }
            more
        };
        let (mut to_task, mut to_nbd) = (Vec::new(), Vec::new());
        let mut task_port = |pool: &mut BufferPool, c: Completion| to_task.push((pool.id(), c));
        let mut nbd_port = |pool: &mut BufferPool, c: Completion| to_nbd.push((pool.id(), c));
        let mut ports = Ports {
            task: &mut task_port,
            nbd: &mut nbd_port,
        };
        v.poll(now, &mut drain, &mut ports);
        for (pool, c) in to_task {
            match task.as_deref_mut() {
                Some(t) => t.complete(&mut v.pools[usize::from(pool)], c, now),
                None => inbox.task.push(c),
            }
        }
        inbox.nbd.extend(to_nbd.into_iter().map(|(_, c)| c));
    }
    v.plug();
    // The kernel's housekeeping, every turn.
    v.autoextend();
    if let Some(t) = task {
        t.step(v, now);
    }
    v.issue_volumes();
    v.unplug();
    delivered
}

/// Runs `task` to its end as the kernel's loop does (done, and its last request back);
/// returns its report.
pub fn run(v: &mut Volumes, task: &mut dyn Task) -> String {
    let mut inbox = Inbox::default();
    for _ in 0..2_000_000 {
        turn(v, Some(&mut *task), &mut inbox, &mut None);
        if task.done() && v.task_ios == 0 {
            let mut out = String::new();
            task.report(&mut out, now()).unwrap();
            return out;
        }
    }
    panic!("task did not finish");
}

/// Runs `task` until `cut` device completions were delivered; true when the cut came
/// first (the task had not finished).
pub fn run_until(v: &mut Volumes, task: &mut dyn Task, cut: usize) -> bool {
    let mut inbox = Inbox::default();
    let mut budget = Some(cut);
    for _ in 0..2_000_000 {
        if task.done() && v.task_ios == 0 {
            return false;
        }
        if budget == Some(0) {
            return true;
        }
        turn(v, Some(&mut *task), &mut inbox, &mut budget);
    }
    panic!("task did not finish");
}

/// Runs the loop with no task until the engines are idle (a background merge finishes).
pub fn settle(v: &mut Volumes) {
    let mut inbox = Inbox::default();
    for _ in 0..2_000_000 {
        let busy = v
            .origins
            .iter()
            .any(|o| o.engine.merge_progress().is_some())
            || v.devices.iter().any(|d| d.in_flight() > 0);
        if !busy {
            turn(v, None, &mut inbox, &mut None);
            return;
        }
        turn(v, None, &mut inbox, &mut None);
    }
    panic!("engines did not settle");
}

/// Sends one request the way a client does (as a task's if `nbd` is false) and waits for
/// its completion.
pub fn request(v: &mut Volumes, target: Target, req: BlockRequest, nbd: bool) -> Completion {
    let submitted = if nbd {
        v.submit_nbd(target, req)
    } else {
        v.submit_to(target, req)
    };
    if let Err((e, b)) = submitted {
        return Completion {
            tag: 0,
            op: Operation::Flush,
            lba: 0,
            result: Err(e),
            buffer: b,
        };
    }
    let mut inbox = Inbox::default();
    for _ in 0..1_000_000 {
        turn(v, None, &mut inbox, &mut None);
        if let Some(c) = inbox.task.pop().or_else(|| inbox.nbd.pop()) {
            return c;
        }
    }
    panic!("request did not complete");
}

/// Reads `len` bytes at byte `offset` of a target.
pub fn read(
    v: &mut Volumes,
    target: Target,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, BlockError> {
    let block = u64::from(v.geometry(target).block_size);
    let disk = v.disk_of(target);
    let mut out = Vec::new();
    let mut at = offset;
    while out.len() < len {
        let n = (len - out.len()).min(64 * 1024);
        let mut buf = v.pools[disk].acquire().expect("buffer");
        buf.set_len(n).unwrap();
        let c = request(v, target, BlockRequest::read(7, at / block, buf), false);
        let b = c.buffer.expect("buffer back");
        out.extend_from_slice(b.as_slice());
        v.pools[disk].release(b).unwrap();
        c.result?;
        at += n as u64;
    }
    Ok(out)
}

/// Writes `data` at byte `offset` of a target (`nbd`: as an NBD client).
pub fn write_as(
    v: &mut Volumes,
    target: Target,
    offset: u64,
    data: &[u8],
    nbd: bool,
) -> Result<(), BlockError> {
    let block = u64::from(v.geometry(target).block_size);
    let disk = v.disk_of(target);
    for (i, piece) in data.chunks(64 * 1024).enumerate() {
        let mut buf = v.pools[disk].acquire().expect("buffer");
        buf.set_len(piece.len()).unwrap();
        buf.as_mut_slice().copy_from_slice(piece);
        let lba = (offset + (i * 64 * 1024) as u64) / block;
        let tag = if nbd { nbd_tag(9) } else { 9 };
        let c = request(v, target, BlockRequest::write(tag, lba, buf, false), nbd);
        if let Some(b) = c.buffer {
            v.pools[disk].release(b).unwrap();
        }
        c.result?;
    }
    Ok(())
}

/// Writes `data` at byte `offset` of a target, as a console task would.
pub fn write(v: &mut Volumes, target: Target, offset: u64, data: &[u8]) -> Result<(), BlockError> {
    write_as(v, target, offset, data, false)
}

/// Flushes a target.
pub fn flush(v: &mut Volumes, target: Target) -> Result<(), BlockError> {
    request(v, target, BlockRequest::flush(11), false).result
}

/// Bytes that differ per position and per `salt`.
pub fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ salt ^ (i / 4096) as u8)
        .collect()
}

/// The origin volume of device `disk` (its engine's origin when it has one with snapshots).
pub fn origin_target(v: &Volumes, disk: usize) -> Target {
    v.resolve(v.name(disk).as_str()).expect("origin")
}

/// The volume of snapshot `name`.
pub fn snap_target(v: &Volumes, name: &str) -> Target {
    v.resolve(name).expect("snapshot")
}

/// A whole-device or region store for snapshot `name` of device `origin` on `cow`.
pub fn spec(v: &mut Volumes, name: &str, origin: usize, cow: usize, chunk_kib: u32) -> CreateSpec {
    let g = v.devices[cow].geometry();
    let sectors = g.capacity_blocks * u64::from(g.block_size / 512);
    CreateSpec {
        name: name.into(),
        origin: v.origin_for(origin).expect("origin"),
        cow_disk: cow,
        cow_start: 0,
        cow_sectors: sectors,
        chunk_sectors: chunk_kib * 2,
        writable: false,
        note: None,
    }
}

/// Creates a snapshot; returns the task's report.
pub fn create(v: &mut Volumes, spec: CreateSpec) -> String {
    let mut task = CreateTask::new(spec, now());
    run(v, &mut task)
}

/// The snapshot called `name`: (origin index, slot, state).
pub fn snap(v: &Volumes, name: &str) -> Option<(usize, SnapId, SnapState)> {
    v.origins
        .iter()
        .enumerate()
        .find_map(|(i, o)| o.snap(name).map(|s| (i, s.id, s.state)))
}

/// Deletes snapshot `name`; returns the report.
pub fn delete(v: &mut Volumes, name: &str) -> String {
    let (origin, id, _) = snap(v, name).expect("snapshot");
    let mut task = DeleteTask::new(name.into(), origin, id);
    run(v, &mut task)
}

/// A merge task for snapshot `name`.
pub fn merge_task(v: &mut Volumes, name: &str) -> MergeTask {
    let (origin, id, _) = snap(v, name).expect("snapshot");
    v.label_merge(origin, id);
    let origin_name = v.name(v.origins[origin].disk).as_str().into();
    MergeTask::new(name.into(), origin, origin_name, id, now())
}

/// Boot discovery over `v`; returns its report.
pub fn discover(v: &mut Volumes) -> String {
    let mut task = crate::discover::DiscoverTask::new();
    run(v, &mut task)
}

/// [`read`] of the target `which` picks.
pub fn read_of(
    v: &mut Volumes,
    which: impl Fn(&Volumes) -> Target,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, BlockError> {
    let t = which(v);
    read(v, t, offset, len)
}
