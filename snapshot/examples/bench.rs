//! Deterministic host benchmark of the snapshot engine over simulated devices.
//!
//! 4 KiB random origin writes at QD32 into a fresh snapshot with 4 KiB chunks, on devices with
//! a latency model (read 20 µs, write 30 µs, flush 1 ms, 32 I/Os in parallel per device).
//! Reports simulated IOPS, records per commit, flushes per 1000 origin writes, p50/p99 hold
//! time (admission → origin write issued) and the engine's own CPU time per origin write, for
//! snapfw's group commit and for Linux's rule (commit only when idle or the area is full).
//! Then memory per exception of the exception table for sequential and random fills.
//!
//! Run: `cargo run --release -p snapshot --example bench [writes]`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use snapshot::sim::Rng;
use snapshot::table::ExceptionTable;
use snapshot::*;

const READ_US: u64 = 20;
const WRITE_US: u64 = 30;
const FLUSH_US: u64 = 1000;
const LANES: usize = 32;
const QD: usize = 32;
const CHUNK: u32 = 8; // 4 KiB
const ORIGIN_SECTORS: u64 = 1 << 21; // 1 GiB
const COW_SECTORS: u64 = 1 << 20; // 512 MiB

struct Lanes(Vec<u64>);

impl Lanes {
    fn schedule(&mut self, now: u64, lat: u64) -> u64 {
        let mut best = 0;
        for (i, &t) in self.0.iter().enumerate() {
            if t < self.0[best] {
                best = i;
            }
        }
        let start = self.0[best].max(now);
        self.0[best] = start + lat;
        start + lat
    }
}

struct Report {
    policy: &'static str,
    iops: f64,
    records_per_commit: f64,
    flushes_per_1000: f64,
    hold_p50: u64,
    hold_p99: u64,
    cpu_ns_per_write: f64,
    sim_ms: f64,
}

/// `interval`: None = closed loop at QD32; Some(us) = open loop, one write every `us`.
fn run(policy: CommitPolicy, writes: u64, bound: u64, interval: Option<u64>) -> Report {
    let mut ec = EngineConfig::new(ORIGIN_SECTORS);
    ec.request_slots = if interval.is_some() { 4096 } else { 64 };
    ec.io_slots = 8192;
    ec.pending_exceptions = if interval.is_some() { 4096 } else { 256 };
    ec.copy_buffers = 64;
    ec.copy_buffer_sectors = 256;
    ec.commit_policy = policy;
    ec.hold_bound_ticks = bound;
    let mut engine = Engine::new(ec).expect("config");
    let mut cpu = Duration::ZERO;
    let mut now = 0u64;
    let mut devices: BTreeMap<Device, Lanes> = BTreeMap::new();
    let mut queue: BinaryHeap<Reverse<(u64, u64, IoToken)>> = BinaryHeap::new();
    let mut seq = 0u64;

    // Create the snapshot on a quiet origin.
    engine.quiesce_origin();
    let t = Instant::now();
    let _ = engine.poll_io();
    let sc = SnapshotConfig {
        chunk_sectors: CHUNK,
        cow_sectors: COW_SECTORS,
        cow_block_sectors: 1,
        cow_fua: true,
        writable: false,
        table_runs: (COW_SECTORS / u64::from(CHUNK)) as usize,
        binding: None,
    };
    let snap = engine.create_snapshot(&sc).expect("create");
    cpu += t.elapsed();
    let mut submitted_at: BTreeMap<u64, u64> = BTreeMap::new();
    let mut holds: Vec<u64> = Vec::with_capacity(writes as usize);
    let mut rng = Rng::new(42);
    let mut next_tag = 1u64;
    let mut outstanding = 0usize;
    let mut done = 0u64;
    let mut started = false;
    let mut pending_submit: Option<VolumeRequest> = None;
    let mut next_arrival = 0u64;
    let mut first_arrival = None;
    loop {
        // Keep QD32 origin writes in flight once the snapshot exists.
        while started
            && next_tag <= writes
            && match interval {
                None => outstanding < QD,
                Some(_) => next_arrival <= now,
            }
        {
            let req = pending_submit.take().unwrap_or_else(|| {
                let chunk = rng.below(ORIGIN_SECTORS / u64::from(CHUNK));
                VolumeRequest {
                    tag: next_tag,
                    volume: Volume::Origin,
                    op: VolumeOp::Write { fua: false },
                    sector: chunk * u64::from(CHUNK),
                    sectors: CHUNK,
                }
            });
            let t = Instant::now();
            let r = engine.submit(req);
            cpu += t.elapsed();
            if r.is_err() {
                pending_submit = Some(req);
                break;
            }
            submitted_at.insert(req.tag, now);
            next_arrival += interval.unwrap_or(0);
            next_tag += 1;
            outstanding += 1;
        }
        let t = Instant::now();
        engine.tick(now);
        let mut issued = Vec::new();
        while let Some(io) = engine.poll_io() {
            issued.push(io);
        }
        while let Some(c) = engine.poll_completion() {
            if c.tag != 0 {
                outstanding -= 1;
                done += 1;
            }
        }
        while let Some(e) = engine.poll_event() {
            if let Event::SnapshotCreated { .. } = e {
                engine.resume_origin();
                started = true;
            }
        }
        cpu += t.elapsed();
        for io in issued {
            if let (Device::Origin, IoOp::Write { .. }, IoBuffer::Caller { tag, .. }) =
                (io.device, io.op, io.buffer)
            {
                if let Some(t0) = submitted_at.remove(&tag) {
                    holds.push(now - t0);
                }
            }
            let lat = match io.op {
                IoOp::Read => READ_US,
                IoOp::Write { .. } => WRITE_US,
                IoOp::Flush => FLUSH_US,
            };
            let lanes = devices
                .entry(io.device)
                .or_insert_with(|| Lanes(vec![0; LANES]));
            let at = lanes.schedule(now, lat);
            seq += 1;
            queue.push(Reverse((at, seq, io.token)));
        }
        if started && done >= writes && outstanding == 0 {
            break;
        }
        if !started && queue.is_empty() {
            // Quiesce event pending: process it.
            let t = Instant::now();
            let _ = engine.poll_io();
            cpu += t.elapsed();
        }
        if started && first_arrival.is_none() {
            first_arrival = Some(now);
            next_arrival = now;
        }
        // Open loop: the next arrival may come before the next completion.
        if interval.is_some() && started && next_tag <= writes && pending_submit.is_none() {
            let next_done = queue
                .peek()
                .map(|Reverse((at, _, _))| *at)
                .unwrap_or(u64::MAX);
            if next_arrival < next_done {
                now = now.max(next_arrival);
                continue;
            }
        }
        let Some(Reverse((at, _, token))) = queue.pop() else {
            if started && next_tag > writes {
                break;
            }
            continue;
        };
        now = now.max(at);
        let t = Instant::now();
        engine.tick(now);
        let _ = engine.complete_io(token, Ok(()));
        cpu += t.elapsed();
    }
    let st = engine.stats();
    holds.sort_unstable();
    let pct = |p: f64| {
        holds
            .get(((holds.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let _ = engine.status(snap);
    Report {
        policy: match (policy, interval) {
            (CommitPolicy::Grouped, None) => "QD32: snapfw group commit",
            (CommitPolicy::LinuxIdle, None) => "QD32: Linux rule",
            (CommitPolicy::Grouped, Some(_)) => "open: snapfw group commit",
            (CommitPolicy::LinuxIdle, Some(_)) => "open: Linux rule",
        },
        iops: done as f64 / ((now - first_arrival.unwrap_or(0)) as f64 / 1e6),
        records_per_commit: st.records_committed as f64 / st.commits.max(1) as f64,
        flushes_per_1000: st.commit_flushes as f64 * 1000.0 / st.origin_writes.max(1) as f64,
        hold_p50: pct(0.50),
        hold_p99: pct(0.99),
        cpu_ns_per_write: cpu.as_nanos() as f64 / writes as f64,
        sim_ms: now as f64 / 1000.0,
    }
}

fn memory_per_exception() {
    let n = 1u64 << 16;
    let mut seq = ExceptionTable::with_capacity(n as usize);
    let g = snapshot::format::Geometry::new(CHUNK).expect("geometry");
    let mut next = 2;
    for old in 0..n {
        seq.insert(old, next).expect("room");
        next = g.next_data_chunk(next);
    }
    let mut rnd = ExceptionTable::with_capacity(n as usize);
    let mut rng = Rng::new(7);
    let mut olds: Vec<u64> = (0..n * 16).collect();
    for i in (1..olds.len()).rev() {
        olds.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next = 2;
    for &old in olds.iter().take(n as usize) {
        rnd.insert(old, next).expect("room");
        next = g.next_data_chunk(next);
    }
    println!();
    println!("exception table, {n} exceptions (4 KiB chunks):");
    println!(
        "  sequential fill: {:>6} runs, {:>5.2} bytes/exception in use",
        seq.runs(),
        seq.used_bytes() as f64 / n as f64
    );
    println!(
        "  random fill:     {:>6} runs, {:>5.2} bytes/exception in use",
        rnd.runs(),
        rnd.used_bytes() as f64 / n as f64
    );
    println!(
        "  (as allocated, with growth headroom: {:.2} bytes per exception; {} per run entry + 4 per bucket, one bucket per two runs)",
        rnd.reserved_bytes() as f64 / n as f64,
        snapshot::table::ExceptionTable::NODE_BYTES
    );
}

fn main() {
    let writes: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50_000);
    println!(
        "{writes} random 4 KiB origin writes, QD{QD}, fresh snapshot, 4 KiB chunks; device model: read {READ_US} us, write {WRITE_US} us, flush {FLUSH_US} us, {LANES} I/Os in parallel per device"
    );
    println!();
    println!(
        "{:<28} {:>10} {:>12} {:>14} {:>12} {:>12} {:>14} {:>10}",
        "policy",
        "IOPS",
        "rec/commit",
        "flush/1000 wr",
        "hold p50 us",
        "hold p99 us",
        "CPU ns/write",
        "sim ms"
    );
    let bound: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let open = Some(50); // 20,000 writes/s offered
    for (policy, bound, interval) in [
        (CommitPolicy::Grouped, bound, None),
        (CommitPolicy::LinuxIdle, 0, None),
        (CommitPolicy::Grouped, bound, open),
        (CommitPolicy::LinuxIdle, 0, open),
    ] {
        let r = run(policy, writes, bound, interval);
        println!(
            "{:<28} {:>10.0} {:>12.1} {:>14.1} {:>12} {:>12} {:>14.0} {:>10.1}",
            r.policy,
            r.iops,
            r.records_per_commit,
            r.flushes_per_1000,
            r.hold_p50,
            r.hold_p99,
            r.cpu_ns_per_write,
            r.sim_ms
        );
    }
    memory_per_exception();
}
