//! `make bench`: boots the appliance with a 1 GiB raw virtio-blk disk and a 1 GiB NVMe
//! namespace (both `cache=none,aio=threads`) and prints the benchmark table for each: 4k
//! randread and randwrite at QD1 and QD32 (and QD128 on NVMe), 128k sequential read and
//! write; IOPS, MB/s, p99 latency, interrupts per I/O. A benchmark, not a test: it asserts
//! nothing about speed.
//!
//! The snapshot rows compare with raw rows on the origin, run before and after them; one of
//! those flushes after every 32 writes (`--fsync 32`), to show what flushes cost the host, and
//! the first-write rows are given against it too. Then the bound those raw rows allow for the
//! rows whose writes copy: each write's device operations (the copy's read and write, the
//! origin write, its share of the commits' flushes and area writes, counted by the engine)
//! priced from the raw rows of the run, and the row as a share of it, so a reader sees whether
//! the engine or the host is the limit.
//!
//! The snapshot rows end with a merge: 256 MiB of copied chunks merged back into the origin,
//! in MB/s against the raw sequential write MB/s of the same run.
//!
//! Then the NBD rows: fio's `nbd` engine against the appliance's NBD server and against
//! `nbdkit` on the host, in the same run, with the ratio; the NIC is on a tap in a network
//! namespace of QEMU's own (offloads as on a real link, fio and nbdkit in the namespace), or on
//! user networking where namespaces are not allowed (the header says which); under each, the appliance's NIC
//! frames and interrupts, main-loop polls and how much of the row its CPU was halted (from
//! `net`), which tells an appliance that waits from one that is busy.
//!
//! Then the store rows: COW stores of 100 k, 1 M and 10 M exceptions (random and sequential
//! fills), written on the host into a sparse 1 TiB image for a sparse 2 TiB origin; each is
//! loaded by the host's loader (time, table bytes per exception) and by the appliance at boot
//! (boot to the prompt, the discovery's own load time, heap used, table bytes per exception).
//!
//! Linux side by side (`bench/linux.rs`): after the snapshot rows, the interop tests' Linux
//! guest runs the same rows with in-guest fio through dm-snapshot on the same QEMU devices;
//! after the NBD rows (which end with two snapshot-path rows: first writes on an origin with
//! a fresh snapshot, reads of the snapshot), it serves the same disk and a dm-snapshot origin
//! and snapshot with `nbd-server` for the same fio jobs. Each prints the ratio of absolute IOPS
//! (snapfw / Linux). Without the guest (`make deps` makes it) those rows are skipped.
//!
//! `BENCH_TIME` (default `5s`) sets each row's duration; `BENCH_ONLY=nbd` runs the NBD rows
//! alone (the appliance's and Linux's), `BENCH_ONLY=snapshot` the snapshot rows (the
//! appliance's and Linux's), `BENCH_ONLY=stores` the store rows, `BENCH_ONLY=linux` Linux's
//! rows alone (no ratios), `BENCH_ONLY=merge` the merge row alone on each device, between
//! two raw 128k write rows of its origin (`BENCH_MERGES` times, default once), with a raw
//! 128k read row of the same region and the bounds those rates put on a merge (which reads
//! every byte it writes: read then write, or both at once);
//! `BENCH_ONLY=firstwrites` the first-write rows alone on both devices (the raw rows around
//! them, the flushing raw row, the bound and the engine's phase times; no Linux guest, no
//! other snapshot row, no merge: a few minutes instead of a quarter of an hour);
//! `BENCH_ONLY=fastpath` the overwrite and snapshot-read rows alone, each between raw rows of
//! its kind run just before and after it, `BENCH_REPEATS` times (default 3); `ACCEL` as for
//! the tests.

#[path = "bench/linux.rs"]
mod linux;

use std::time::Duration;

use tests::{Boot, Image};

struct Row {
    name: &'static str,
    args: &'static str,
    nvme_only: bool,
}

const fn row(name: &'static str, args: &'static str, nvme_only: bool) -> Row {
    Row {
        name,
        args,
        nvme_only,
    }
}

const ROWS: &[Row] = &[
    row("4k randread QD1", "--rw randread --bs 4k --qd 1", false),
    row("4k randread QD32", "--rw randread --bs 4k --qd 32", false),
    row("4k randread QD128", "--rw randread --bs 4k --qd 128", true),
    row("4k randwrite QD1", "--rw randwrite --bs 4k --qd 1", false),
    row("4k randwrite QD32", "--rw randwrite --bs 4k --qd 32", false),
    row(
        "4k randwrite QD128",
        "--rw randwrite --bs 4k --qd 128",
        true,
    ),
    row("128k read QD32", "--rw read --bs 128k --qd 32", false),
    row("128k write QD32", "--rw write --bs 128k --qd 32", false),
];

fn field<'a>(text: &'a str, after: &str) -> &'a str {
    text.split(after)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("?")
}

/// One bench run's figures, parsed from its report.
struct Figures {
    iops: String,
    mb_s: f64,
    p99_us: String,
    irq_per_io: String,
    /// `--fsync` runs: the mean flush latency in µs.
    flush_us: f64,
}

fn run(q: &mut tests::Qemu, disk: &str, args: &str, time: &str) -> Figures {
    // A row that names its own `--ios` (one pass of a region) has no time limit.
    let limit = if args.contains("--ios") {
        String::new()
    } else {
        format!(" --time {time}")
    };
    let out = q.command_timeout(
        &format!("bench {disk} {args}{limit}"),
        Duration::from_secs(600),
    );
    // The report follows the progress lines.
    let report = out
        .rsplit(&format!("bench {disk} rw="))
        .next()
        .unwrap_or(&out);
    let mib: f64 = report
        .split("MiB/s")
        .next()
        .and_then(|s| s.split_whitespace().last())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    Figures {
        iops: field(report, "IOPS ").to_string(),
        mb_s: mib * 1.048576,
        p99_us: field(report, "p99 ").to_string(),
        irq_per_io: report
            .split("interrupts ")
            .nth(1)
            .and_then(|s| s.split('(').nth(1))
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("?")
            .to_string(),
        // "flushes N (every K writes), latency avg X us"
        flush_us: report
            .split(" writes), latency avg ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
    }
}

fn main() {
    let time = std::env::var("BENCH_TIME").unwrap_or_else(|_| "5s".into());
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "nbd") {
        let net = Network::choose();
        linux::nbd_rows(&time, NBD_ROWS, &nbd_rows(&time, &net), &net);
        return;
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "linux") {
        linux::snapshot_rows(&time, &[], &[]);
        linux::nbd_rows(&time, NBD_ROWS, &[], &Network::choose());
        return;
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "stores") {
        store_rows();
        return;
    }
    let virtio = Image::new("bench-virtio-1g", 1 << 30);
    let origin = Image::new("bench-origin-1g", 1 << 30);
    let cow = Image::new("bench-cow-1g", 1 << 30);
    let nvme = Image::new("bench-nvme-1g", 1 << 30);
    let nvme_cow = Image::new("bench-nvme-cow-1g", 1 << 30);
    // Write the COW images once, so a copy does not pay for the host file system allocating
    // blocks (a real disk has none to allocate); the origins are filled by the raw rows.
    for image in [&cow, &nvme_cow] {
        let zeros = vec![0u8; 64 << 20];
        for i in 0..16u64 {
            image.write(i * (64 << 20), &zeros);
        }
    }
    let mut q = Boot::kernel("q35", "loglevel=warn")
        .memory_size("2G")
        .virtio_disk(&virtio.path, "BENCH")
        .virtio_disk(&origin.path, "BENCH-ORIGIN")
        .virtio_disk(&cow.path, "BENCH-COW")
        .nvme("BENCH-NVME", &[(&nvme.path, "on"), (&nvme_cow.path, "on")])
        .start();
    q.wait_prompt();
    let accel = std::env::var("ACCEL").unwrap_or_else(|_| "tcg".into());
    println!(
        "snapfw bench: 1 GiB raw images (cache=none,aio=threads), accel={accel}, {time} per row"
    );
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "merge") {
        for (kind, origin, cow) in [("virtio-blk", "vdb", "vdc"), ("NVMe", "nvme0n1", "nvme0n2")] {
            merge_rows(&mut q, kind, origin, cow, &time);
        }
        q.send(b"poweroff\r");
        let _ = q.wait_exit(Duration::from_secs(30));
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only == "fastpath" {
        for (kind, origin, cow) in [("virtio-blk", "vdb", "vdc"), ("NVMe", "nvme0n1", "nvme0n2")] {
            fast_path_rows(&mut q, kind, origin, cow, &time);
        }
        q.send(b"poweroff\r");
        let _ = q.wait_exit(Duration::from_secs(30));
        return;
    }
    let first_writes = only == "firstwrites";
    let only_snapshots = only == "snapshot" || first_writes;
    // Fill each disk once so reads hit allocated blocks of the host file.
    for disk in ["vda", "nvme0n1"].iter().filter(|_| !only_snapshots) {
        q.command_timeout(
            &format!("bench {disk} --rw write --bs 128k --qd 32 --ios 8192"),
            Duration::from_secs(600),
        );
    }
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>8} | {:>10} {:>10} {:>10} {:>8}",
        "workload",
        "virtio IOPS",
        "MB/s",
        "p99 us",
        "irq/IO",
        "NVMe IOPS",
        "MB/s",
        "p99 us",
        "irq/IO"
    );
    for row in ROWS.iter().filter(|_| !only_snapshots) {
        let v = if row.nvme_only {
            None
        } else {
            Some(run(&mut q, "vda", row.args, &time))
        };
        let n = run(&mut q, "nvme0n1", row.args, &time);
        let (vi, vm, vp, vq) = match &v {
            Some(f) => (
                f.iops.as_str(),
                format!("{:.1}", f.mb_s),
                f.p99_us.as_str(),
                f.irq_per_io.as_str(),
            ),
            None => ("-", "-".to_string(), "-", "-"),
        };
        println!(
            "{:<20} {:>11} {:>10} {:>10} {:>8} | {:>10} {:>10.1} {:>10} {:>8}",
            row.name, vi, vm, vp, vq, n.iops, n.mb_s, n.p99_us, n.irq_per_io
        );
    }
    let virtio_snap = snapshot_rows(&mut q, "virtio-blk", "vdb", "vdc", &time, first_writes);
    let nvme_snap = snapshot_rows(&mut q, "NVMe", "nvme0n1", "nvme0n2", &time, first_writes);
    q.send(b"poweroff\r");
    let _ = q.wait_exit(Duration::from_secs(30));
    if first_writes {
        return;
    }
    linux::snapshot_rows(&time, &virtio_snap, &nvme_snap);
    if !only_snapshots {
        let net = Network::choose();
        linux::nbd_rows(&time, NBD_ROWS, &nbd_rows(&time, &net), &net);
        store_rows();
    }
}

fn cmd(q: &mut tests::Qemu, line: &str) -> String {
    let out = q.command_timeout(line, Duration::from_secs(900));
    assert!(!out.contains("error:"), "{line}: {out}");
    out
}

/// The origin engine's counters from `snapshot status` (they count from the engine's start,
/// across rows and snapshots).
#[derive(Clone, Copy, Default)]
struct Counters {
    writes: f64,
    copy_jobs: f64,
    commits: f64,
    records: f64,
    commit_flushes: f64,
    /// Copy writes issued by the engine, those the origin merged with others, and the device
    /// writes the merged ones made.
    copy_writes: f64,
    merged_copy_writes: f64,
    merged_device_writes: f64,
    /// The engine's mean copy-write and commit times in µs (since the engine started).
    copy_write_us: f64,
    commit_us: f64,
}

impl Counters {
    fn read(q: &mut tests::Qemu, snap: &str) -> Counters {
        let out = cmd(q, &format!("snapshot status {snap}"));
        // "origin vda: W writes, J copy jobs, C copy writes, N commits, R records per commit,
        // F commit flushes (S commits relied on an earlier commit's flush)"
        let count = |label: &str| -> f64 {
            out.split(label)
                .next()
                .and_then(|s| s.split_whitespace().last())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let commits = count(" commits,");
        // "  M copy writes went down merged as D device writes (consecutive COW chunks)"
        let merged = |i: usize| -> f64 {
            out.split(" device writes (consecutive COW chunks)")
                .next()
                .filter(|s| s.contains(" copy writes went down merged as "))
                .and_then(|s| s.split_whitespace().rev().nth(i))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        // "stages, mean us: copy C (read R, write W), batch wait B, commit M (flush F, ..."
        let stage = |label: &str| -> f64 {
            out.split("stages, mean us:")
                .nth(1)
                .and_then(|s| s.split(label).nth(1))
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        Counters {
            copy_write_us: stage(", write "),
            commit_us: stage("commit "),
            writes: count(" writes,"),
            copy_jobs: count(" copy jobs"),
            commits,
            records: commits * count(" records per commit"),
            commit_flushes: count(" commit flushes"),
            copy_writes: count(" copy writes,"),
            merged_copy_writes: merged(7),
            merged_device_writes: merged(0),
        }
    }

    /// "R records/commit, P% of writes copied" for the row between `self` and `after`.
    fn note(self, after: Counters) -> String {
        let commits = after.commits - self.commits;
        let writes = after.writes - self.writes;
        if commits <= 0.0 || writes <= 0.0 {
            return "no commits".into();
        }
        format!(
            "{:.1} records/commit, {:.0}% of writes copied",
            (after.records - self.records) / commits,
            100.0 * (after.copy_jobs - self.copy_jobs) / writes
        )
    }

    /// Commit flushes per record for the row between `self` and `after`.
    fn flushes_per_record(self, after: Counters) -> f64 {
        let records = after.records - self.records;
        if records <= 0.0 {
            return 0.0;
        }
        (after.commit_flushes - self.commit_flushes) / records
    }

    /// What one origin write of the row between `self` and `after` cost the devices, in
    /// device operations per write: copy reads, copy writes (as the device got them: those
    /// merged with others count as the device writes they made), commit flushes and area
    /// writes (commits).
    fn per_write(self, after: Counters) -> Option<PerWrite> {
        let writes = after.writes - self.writes;
        if writes <= 0.0 {
            return None;
        }
        let d = |a: f64, b: f64| a - b;
        let device_copy_writes = d(after.copy_writes, self.copy_writes)
            - d(after.merged_copy_writes, self.merged_copy_writes)
            + d(after.merged_device_writes, self.merged_device_writes);
        Some(PerWrite {
            reads: (after.copy_jobs - self.copy_jobs) / writes,
            copy_writes: device_copy_writes / writes,
            flushes: (after.commit_flushes - self.commit_flushes) / writes,
            area_writes: (after.commits - self.commits) / writes,
        })
    }
}

/// Device operations per origin write in a first-write row (see [`Counters::per_write`]).
#[derive(Clone, Copy)]
struct PerWrite {
    reads: f64,
    copy_writes: f64,
    flushes: f64,
    area_writes: f64,
}

/// What this run's raw rows say one device operation costs at QD32, in µs of device time:
/// a 4 KiB random read and write (one over the raw row's IOPS), and a flush (the time the
/// flushing raw row takes over the plain one, per flush: its drain of the queue included).
/// A merged copy write carries several chunks but is priced as one 4 KiB write: the bound
/// errs on the generous side.
struct Prices {
    read_us: f64,
    write_us: f64,
    flush_us: f64,
}

impl Prices {
    fn new(raw_read_iops: f64, raw_write_iops: f64, raw_fsync_iops: f64, every: f64) -> Prices {
        let us = |iops: f64| if iops > 0.0 { 1e6 / iops } else { 0.0 };
        Prices {
            read_us: us(raw_read_iops),
            write_us: us(raw_write_iops),
            flush_us: (every * (us(raw_fsync_iops) - us(raw_write_iops))).max(0.0),
        }
    }

    /// The IOPS a first-write row could reach if the engine cost nothing: the origin write,
    /// and its share of copy reads, copy writes, commit flushes and area writes, each at its
    /// raw price.
    fn bound(&self, w: PerWrite) -> f64 {
        let us = self.write_us * (1.0 + w.copy_writes + w.area_writes)
            + self.read_us * w.reads
            + self.flush_us * w.flushes;
        if us > 0.0 {
            1e6 / us
        } else {
            0.0
        }
    }
}

/// One snapshot row: its figures, the raw row it compares with, a note, and for rows where
/// every write copies, the commit flushes per write.
struct SnapRow {
    name: &'static str,
    snap: Figures,
    raw: Raw,
    note: String,
    flushes_per_write: Option<f64>,
    /// For rows whose writes copy: the device operations one write cost.
    per_write: Option<PerWrite>,
    /// For the first row of a fresh engine: the mean copy write and commit, in µs.
    chain: Option<(f64, f64)>,
}

impl SnapRow {
    fn new(name: &'static str, snap: Figures, raw: Raw, note: String) -> Self {
        SnapRow {
            name,
            snap,
            raw,
            note,
            flushes_per_write: None,
            per_write: None,
            chain: None,
        }
    }

    fn copying(mut self, before: Counters, after: Counters) -> Self {
        if before.writes == 0.0 && after.commit_us > 0.0 {
            self.chain = Some((after.copy_write_us, after.commit_us));
        }
        self.note = before.note(after);
        self.flushes_per_write = Some(before.flushes_per_record(after));
        self.per_write = before.per_write(after);
        self
    }

    /// A row where writes copy into more than one snapshot: only its cost per write.
    fn costed(mut self, before: Counters, after: Counters) -> Self {
        self.per_write = before.per_write(after);
        self
    }
}

/// The raw rows of a snapshot section, each measured before and after its snapshot rows.
#[derive(Clone, Copy)]
enum Raw {
    RandWrite,
    RandRead,
    SeqWrite,
    /// Random writes with a flush after every 32 (as often as a full commit at QD32).
    RandWriteFsync,
}

const RAW_ROWS: [(Raw, &str); 4] = [
    (Raw::RandWrite, "--rw randwrite --bs 4k --qd 32"),
    (Raw::RandRead, "--rw randread --bs 4k --qd 32"),
    (Raw::SeqWrite, "--rw write --bs 128k --qd 32"),
    (
        Raw::RandWriteFsync,
        "--rw randwrite --bs 4k --qd 32 --fsync 32",
    ),
];

fn iops(f: &Figures) -> f64 {
    f.iops.parse().unwrap_or(0.0)
}

/// Issue 6's rows: the snapshot path against the raw device, in the same run, on a 256 MiB
/// region of a 1 GiB origin with the COW stores on a second disk of the same kind. The raw
/// rows run before and again after the snapshot rows (the host's speed drifts by tens of
/// per cent within a run); each ratio is to the mean of the two. The rows whose writes copy
/// (first writes, 64 KiB chunks, two snapshots) run one pass of the region (`--ios`), so with
/// `bench`'s random map (every block once per pass, as fio) every write copies, however fast
/// the row runs; the row's note says how many writes copied. Returns the rows' IOPS by name (the raw randwrite row's the mean of its two
/// runs) for Linux's side by side.
fn snapshot_rows(
    q: &mut tests::Qemu,
    kind: &str,
    origin: &str,
    cow: &str,
    time: &str,
    first_only: bool,
) -> Vec<linux::Figure> {
    const REGION: &str = "--size 256m";
    const REGION_BLOCKS: u64 = 256 * 2048;
    println!();
    println!("snapshots ({kind} origin {origin}, COW on {cow}, 256 MiB region, {time} per row)");
    // Allocate the region in the host's image first, so raw and snapshot rows see the same disk.
    cmd(
        q,
        &format!("bench {origin} --rw write --bs 128k --qd 32 {REGION} --ios 2048"),
    );
    let raw_rows = |q: &mut tests::Qemu| -> Vec<Figures> {
        RAW_ROWS
            .iter()
            .map(|(_, args)| run(q, origin, &format!("{args} {REGION}"), time))
            .collect()
    };
    let before = raw_rows(q);
    let mut rows = Vec::new();
    let randwrite = format!("--rw randwrite --bs 4k --qd 32 {REGION}");
    cmd(q, &format!("snapshot create b1 {origin} {cow}:0+1048576"));
    let start = Counters::read(q, "b1");
    // One pass of the region: 65,536 chunks of 4 KiB.
    let one_pass = format!("{randwrite} --ios {}", REGION_BLOCKS / 8);
    let first = run(q, origin, &one_pass, time);
    rows.push(
        SnapRow::new(
            "4k randwrite QD32, first writes",
            first,
            Raw::RandWrite,
            String::new(),
        )
        .copying(start, Counters::read(q, "b1")),
    );
    if !first_only {
        other_snapshot_rows(q, origin, cow, time, &mut rows);
    } else {
        // The engine's phase times and counters for the row.
        let status = cmd(q, "snapshot status b1");
        for line in status.lines().filter(|l| !l.contains("snapshot status")) {
            println!("  {}", line.trim_end());
        }
        cmd(q, "snapshot delete b1");
    }
    // Issue 20: the snapshot rows allocate nothing on the I/O path.
    let mem = cmd(q, "mem");
    if let Some(line) = mem
        .lines()
        .find(|l| l.contains("heap allocations on the I/O path"))
    {
        println!("after the snapshot rows: {}", line.trim());
    }
    let after = raw_rows(q);
    snapshot_table(q, origin, cow, &rows, &before, &after, first_only)
}

/// The snapshot rows after the first writes (snapshot `b1` still there): overwrites, reads
/// of the snapshot, 64 KiB chunks, two snapshots.
fn other_snapshot_rows(
    q: &mut tests::Qemu,
    origin: &str,
    cow: &str,
    time: &str,
    rows: &mut Vec<SnapRow>,
) {
    const REGION: &str = "--size 256m";
    const REGION_BLOCKS: u64 = 256 * 2048;
    let randwrite = format!("--rw randwrite --bs 4k --qd 32 {REGION}");
    let one_pass = format!("{randwrite} --ios {}", REGION_BLOCKS / 8);
    // Copy every chunk of the region, then overwrite.
    cmd(q, &format!("write {origin} 0 {REGION_BLOCKS} --byte 0x42"));
    rows.push(SnapRow::new(
        "4k randwrite QD32, overwrites",
        run(q, origin, &randwrite, time),
        Raw::RandWrite,
        String::new(),
    ));
    rows.push(SnapRow::new(
        "4k randread QD32 on the snapshot",
        run(
            q,
            "b1",
            &format!("--rw randread --bs 4k --qd 32 {REGION}"),
            time,
        ),
        Raw::RandRead,
        String::new(),
    ));
    cmd(q, "snapshot delete b1");
    cmd(
        q,
        &format!("snapshot create b2 {origin} {cow}:0+1048576 --chunk 64k"),
    );
    rows.push(SnapRow::new(
        "128k write QD32, 64 KiB chunks",
        run(
            q,
            origin,
            &format!(
                "--rw write --bs 128k --qd 32 {REGION} --ios {}",
                REGION_BLOCKS / 256
            ),
            time,
        ),
        Raw::SeqWrite,
        String::new(),
    ));
    cmd(q, "snapshot delete b2");
    cmd(q, &format!("snapshot create b3 {origin} {cow}:0+1048576"));
    cmd(
        q,
        &format!("snapshot create b4 {origin} {cow}:1048576+1048576"),
    );
    let start = Counters::read(q, "b3");
    let two = run(q, origin, &one_pass, time);
    let end = Counters::read(q, "b3");
    rows.push(
        SnapRow::new(
            "4k randwrite QD32, two snapshots",
            two,
            Raw::RandWrite,
            start.note(end),
        )
        .costed(start, end),
    );
    cmd(q, "snapshot delete b3");
    cmd(q, "snapshot delete b4");
}

/// Prints the snapshot rows against the raw rows run `before` and `after` them, the flushing
/// raw row, the first-write bound, and (unless `first_only`) the merge row.
fn snapshot_table(
    q: &mut tests::Qemu,
    origin: &str,
    cow: &str,
    rows: &[SnapRow],
    before: &[Figures],
    after: &[Figures],
    first_only: bool,
) -> Vec<linux::Figure> {
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "workload", "snap IOPS", "raw IOPS", "ratio", "p99 us"
    );
    for r in rows {
        let i = r.raw as usize;
        let raw = (iops(&before[i]) + iops(&after[i])) / 2.0;
        println!(
            "{:<34} {:>10} {:>10.0} {:>9.1}% {:>10} {}",
            r.name,
            r.snap.iops,
            raw,
            if raw > 0.0 {
                100.0 * iops(&r.snap) / raw
            } else {
                0.0
            },
            r.snap.p99_us,
            r.note
        );
    }
    println!(
        "raw rows before / after: 4k randwrite {} / {}, 4k randread {} / {}, 128k write {} / {} IOPS",
        before[0].iops, after[0].iops, before[1].iops, after[1].iops, before[2].iops, after[2].iops
    );
    // What flushing costs this host: the raw device with a flush after every 32 writes (a
    // first-write commit at QD32 flushes twice per 32 writes on virtio-blk, once on NVMe,
    // whose area write uses FUA instead of the second flush).
    let fsync = Raw::RandWriteFsync as usize;
    let raw_w = (iops(&before[0]) + iops(&after[0])) / 2.0;
    let raw_f = (iops(&before[fsync]) + iops(&after[fsync])) / 2.0;
    println!(
        "raw 4k randwrite QD32 with a flush every 32 writes: {} / {} IOPS ({:.1}% of raw randwrite), flush avg {:.0} / {:.0} us",
        before[fsync].iops,
        after[fsync].iops,
        100.0 * raw_f / raw_w.max(1.0),
        before[fsync].flush_us,
        after[fsync].flush_us
    );
    for r in rows.iter().filter(|r| r.flushes_per_write.is_some()) {
        println!(
            "  {}: {:.1}% of that flushing raw row ({:.3} commit flushes per write)",
            r.name,
            100.0 * iops(&r.snap) / raw_f.max(1.0),
            r.flushes_per_write.unwrap_or(0.0)
        );
    }
    // The bound this run's own raw costs allow for first writes: the engine's device
    // operations per write, each priced from the raw rows above.
    let raw_r = (iops(&before[1]) + iops(&after[1])) / 2.0;
    let prices = Prices::new(raw_r, raw_w, raw_f, 32.0);
    println!(
        "raw prices at QD32: 4k read {:.1} us, 4k write {:.1} us, flush {:.0} us (device time per operation)",
        prices.read_us, prices.write_us, prices.flush_us
    );
    for r in rows {
        let Some(w) = r.per_write else { continue };
        let bound = prices.bound(w);
        println!(
            "  {}: bound {:.0} IOPS ({:.2} reads + {:.2} device copy writes + 1 write + {:.3} flushes + {:.3} area writes per write), {:.1}% of raw; the row is {:.1}% of its bound",
            r.name,
            bound,
            w.reads,
            w.copy_writes,
            w.flushes,
            w.area_writes,
            100.0 * bound / raw_w.max(1.0),
            100.0 * iops(&r.snap) / bound.max(1.0)
        );
        // What the bound cannot see: a commit's copy write, flushes and area write go one
        // after another, one I/O in flight, while every write of the queue waits for them.
        if let Some((copy_write, commit)) = r.chain {
            let cycle = 32.0 * 1e6 / iops(&r.snap).max(1.0);
            println!(
                "  {}: each commit's chain, one I/O at a time (copy write {:.0} us, then commit {:.0} us), is {:.0}% of the {:.0} us a QD32 round takes (32 / IOPS)",
                r.name,
                copy_write,
                commit,
                100.0 * (copy_write + commit) / cycle,
                cycle
            );
        }
    }
    let raw_sw_mb_s = (before[2].mb_s + after[2].mb_s) / 2.0;
    if !first_only {
        merge_row(q, origin, cow, raw_sw_mb_s);
    }
    std::iter::once((linux::RAW_RANDWRITE, Some(raw_w)))
        .chain(rows.iter().map(|r| (r.name, Some(iops(&r.snap)))))
        .collect()
}

/// `BENCH_ONLY=fastpath`: the rows whose writes and reads every snapshot already covers
/// (overwrites of copied chunks, reads of the snapshot), each between raw rows of the same
/// kind run just before and just after it, `BENCH_REPEATS` times (default 3): the engine's
/// fast path against the raw device with as little of the host's drift between them as a
/// run allows.
fn fast_path_rows(q: &mut tests::Qemu, kind: &str, origin: &str, cow: &str, time: &str) {
    const REGION: &str = "--size 256m";
    const REGION_BLOCKS: u64 = 256 * 2048;
    println!();
    println!("fast path ({kind} origin {origin}, COW on {cow}, 256 MiB region, {time} per row)");
    cmd(
        q,
        &format!("bench {origin} --rw write --bs 128k --qd 32 {REGION} --ios 2048"),
    );
    let times: usize = std::env::var("BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let write = format!("--rw randwrite --bs 4k --qd 32 {REGION}");
    let read = format!("--rw randread --bs 4k --qd 32 {REGION}");
    println!(
        "{:<34} {:>10} {:>16} {:>8}",
        "workload", "snap IOPS", "raw before/after", "ratio"
    );
    let show = |name: &str, snap: &Figures, before: &Figures, after: &Figures| {
        let raw = (iops(before) + iops(after)) / 2.0;
        println!(
            "{:<34} {:>10} {:>16} {:>7.1}%",
            name,
            snap.iops,
            format!("{}/{}", before.iops, after.iops),
            100.0 * iops(snap) / raw.max(1.0)
        );
    };
    for _ in 0..times {
        let w0 = run(q, origin, &write, time);
        let r0 = run(q, origin, &read, time);
        cmd(q, &format!("snapshot create f1 {origin} {cow}:0+1048576"));
        // Copy every chunk of the region, so every write below is an overwrite.
        cmd(q, &format!("write {origin} 0 {REGION_BLOCKS} --byte 0x42"));
        let over = run(q, origin, &write, time);
        let snap_read = run(q, "f1", &read, time);
        cmd(q, "snapshot delete f1");
        let r1 = run(q, origin, &read, time);
        let w1 = run(q, origin, &write, time);
        show("4k randwrite QD32, overwrites", &over, &w0, &w1);
        show("4k randread QD32 on the snapshot", &snap_read, &r0, &r1);
    }
}

/// `BENCH_ONLY=merge`: the merge row alone on one origin, between two raw 128k write rows
/// of the same region (the raw figure is their mean), `BENCH_MERGES` times (default 1).
fn merge_rows(q: &mut tests::Qemu, kind: &str, origin: &str, cow: &str, time: &str) {
    const REGION: &str = "--size 256m";
    println!();
    println!("merge ({kind} origin {origin}, COW on {cow}, 256 MiB region, {time} per raw row)");
    cmd(
        q,
        &format!("bench {origin} --rw write --bs 128k --qd 32 {REGION} --ios 2048"),
    );
    let times: usize = std::env::var("BENCH_MERGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let raw = format!("--rw write --bs 128k --qd 32 {REGION}");
    let raw_read = format!("--rw read --bs 128k --qd 32 {REGION}");
    for _ in 0..times {
        let before = run(q, origin, &raw, time);
        // Reads of the region the write row just wrote (allocated in the host file).
        let read = run(q, origin, &raw_read, time);
        let mb_s = merge_row(q, origin, cow, before.mb_s);
        let after = run(q, origin, &raw, time);
        let raw_mb_s = (before.mb_s + after.mb_s) / 2.0;
        println!(
            "  raw 128k write before / after: {:.1} / {:.1} MB/s; merge {:.1} MB/s = {:.1}% of their mean",
            before.mb_s,
            after.mb_s,
            mb_s,
            100.0 * mb_s / raw_mb_s.max(1.0)
        );
        // A merge reads every byte it writes. Priced at this run's raw rates, reading it all
        // and writing it all one after the other bounds a host that does not overlap its
        // reads with its writes; doing both at once, the slower of the two.
        let serial = 1.0 / (1.0 / read.mb_s.max(1.0) + 1.0 / raw_mb_s.max(1.0));
        let overlapped = read.mb_s.min(raw_mb_s);
        println!(
            "  raw 128k read {:.1} MB/s; merge bound, read then write: {:.1} MB/s ({:.1}% of the write; the merge is {:.1}% of it), both at once: {:.1} MB/s",
            read.mb_s,
            serial,
            100.0 * serial / raw_mb_s.max(1.0),
            100.0 * mb_s / serial.max(1.0),
            overlapped
        );
    }
    // The merges allocate nothing on the I/O path.
    let mem = cmd(q, "mem");
    if let Some(line) = mem
        .lines()
        .find(|l| l.contains("heap allocations on the I/O path"))
    {
        println!("after the merges on {origin}: {}", line.trim());
    }
}

/// Merge: every chunk of the 256 MiB region copied (4 KiB chunks), then `snapshot merge`
/// copies them back; its MB/s against the raw device's sequential write MB/s of this run.
fn merge_row(q: &mut tests::Qemu, origin: &str, cow: &str, raw_sw_mb_s: f64) -> f64 {
    cmd(q, &format!("snapshot create m1 {origin} {cow}:0+1048576"));
    cmd(q, &format!("write {origin} 0 524288 --byte 0x24"));
    let out = cmd(q, "snapshot merge m1");
    // "merged m1 into ORIGIN: N chunks (K KiB) in T ms, X MB/s"
    let kib: f64 = field(&out, "chunks (").parse().unwrap_or(0.0);
    let ms: f64 = out
        .split(" KiB) in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let mb_s = if ms > 0.0 {
        kib * 1024.0 / 1e6 / (ms / 1000.0)
    } else {
        0.0
    };
    println!(
        "{:<34} {:>8.1} MB/s vs raw 128k write {:.1} MB/s ({:.1}%)",
        format!("merge {:.0} MiB of copied chunks", kib / 1024.0),
        mb_s,
        raw_sw_mb_s,
        if raw_sw_mb_s > 0.0 {
            100.0 * mb_s / raw_sw_mb_s
        } else {
            0.0
        }
    );
    mb_s
}

/// fio's figures for one run: IOPS, MB/s, p99 completion latency in µs.
struct FioFigures {
    iops: f64,
    mb_s: f64,
    p99_us: f64,
}

/// The number after `"key" :` following `from` in fio's JSON output.
fn fio_number(text: &str, from: usize, key: &str) -> f64 {
    text[from..]
        .split(&format!("\"{key}\" : "))
        .nth(1)
        .and_then(|r| r.split(|c: char| c == ',' || c.is_whitespace()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

/// The network the NBD sections run on, the same for the appliance and the Linux guest.
#[derive(Clone, Debug)]
pub enum Network {
    /// A tap device in a network namespace of QEMU's own (`Boot::tap_net`): the guest is
    /// [`tests::TAP_GUEST`], and fio and nbdkit run in the namespace (`Qemu::in_netns`).
    Tap,
    /// QEMU user networking (slirp) with `hostfwd` from `127.0.0.1:PORT`, the clients on the
    /// host; the reason the tap could not be used.
    User(String),
}

impl Network {
    /// The tap when this host allows unprivileged user and network namespaces and a tap
    /// device in them (the same commands `Boot::tap_net` runs), else user networking.
    pub fn choose() -> Network {
        let probe = std::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "--", "sh", "-c"])
            .arg("ip link set lo up && ip tuntap add dev tap0 mode tap && ip link set tap0 up")
            .output();
        match probe {
            Ok(o) if o.status.success() => Network::Tap,
            Ok(o) => Network::User(format!(
                "no tap in a network namespace: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Network::User(format!("no unshare: {e}")),
        }
    }

    /// Adds the NIC on this network; `port`: the host port forwarded to NBD on user networking.
    pub fn nic(&self, boot: Boot, port: u16) -> Boot {
        match self {
            Network::Tap => boot.tap_net(),
            Network::User(_) => boot.net(&[(port, 10809)], None),
        }
    }

    /// The NBD URI of `export` on the guest, as the clients reach it.
    pub fn uri(&self, port: u16, export: &str) -> String {
        match self {
            Network::Tap => format!("nbd://{}:10809/{export}", tests::TAP_GUEST),
            Network::User(_) => format!("nbd://127.0.0.1:{port}/{export}"),
        }
    }

    /// A client command: in QEMU's namespace on the tap, on the host otherwise.
    pub fn client(&self, q: &tests::Qemu, program: &str) -> std::process::Command {
        match self {
            Network::Tap => q.in_netns(program, &[]),
            Network::User(_) => std::process::Command::new(program),
        }
    }

    /// A `fio` client command (see [`Network::client`]) that is killed, with its job
    /// processes, if it runs [`FIO_GRACE`] past `time`: a guest whose network stops answering
    /// mid-row would otherwise leave fio waiting for its replies for ever.
    pub fn fio(&self, q: &tests::Qemu, time: &str) -> std::process::Command {
        let limit = fio_seconds(time) + FIO_GRACE.as_secs();
        let mut cmd = self.client(q, "timeout");
        cmd.args(["-s", "KILL", &limit.to_string(), "fio"]);
        cmd
    }

    /// What a section header says about the network.
    pub fn describe(&self) -> String {
        match self {
            Network::Tap => format!(
                "virtio-net on a tap (vnet_hdr: checksum and segmentation offload) in a network \
                 namespace, guest {}, clients in the namespace",
                tests::TAP_GUEST
            ),
            Network::User(why) => format!(
                "virtio-net on QEMU user networking (slirp, hostfwd; no offload, 64 KiB window: \
                 large transfers measure slirp) because {why}"
            ),
        }
    }
}

/// How long past its runtime a fio row may take before it is killed (see [`Network::fio`]).
const FIO_GRACE: Duration = Duration::from_secs(120);

/// A fio duration (`5s`, `500ms`, `2m`, `1h`, or seconds) in whole seconds, rounded up.
fn fio_seconds(time: &str) -> u64 {
    let digits: String = time.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = digits.parse().unwrap_or(0);
    match &time[digits.len()..] {
        "ms" => n.div_ceil(1000),
        "m" => n * 60,
        "h" => n * 3600,
        _ => n,
    }
}

/// Runs fio's `nbd` engine against `uri` for `time` with `args`; `None` if fio fails or is
/// killed. `client`: the `fio` command to run (see [`Network::fio`]).
fn fio(
    mut client: std::process::Command,
    uri: &str,
    args: &[&str],
    write: bool,
    time: &str,
) -> Option<FioFigures> {
    let out = client
        .args([
            "--name=nbd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--size=256m",
            "--time_based",
            &format!("--runtime={time}"),
            "--output-format=json",
        ])
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // `timeout -s KILL`: 137 once the limit has passed.
        if out.status.code() == Some(137) {
            println!(
                "  fio {uri} {args:?}: did not finish within {} s of its {time}; killed",
                FIO_GRACE.as_secs()
            );
        } else {
            eprintln!(
                "fio {uri} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        return None;
    }
    let section = text.find(if write {
        "\"write\" : {"
    } else {
        "\"read\" : {"
    })?;
    let clat = section + text[section..].find("\"clat_ns\"")?;
    Some(FioFigures {
        iops: fio_number(&text, section, "iops"),
        mb_s: fio_number(&text, section, "bw") * 1024.0 / 1e6,
        p99_us: fio_number(&text, clat, "99.000000") / 1000.0,
    })
}

/// The NBD rows' fio jobs: name, fio arguments, whether the job writes.
const NBD_ROWS: &[(&str, &[&str], bool)] = &[
    (
        "4k randread QD32",
        &["--rw=randread", "--bs=4k", "--iodepth=32"],
        false,
    ),
    (
        "4k randwrite QD32",
        &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
        true,
    ),
    (
        "128k read QD32",
        &["--rw=read", "--bs=128k", "--iodepth=32"],
        false,
    ),
    (
        "128k write QD32",
        &["--rw=write", "--bs=128k", "--iodepth=32"],
        true,
    ),
];

/// Issue 8's rows: fio's `nbd` engine against the appliance's NBD server (a 1 GiB raw
/// virtio-blk disk, `cache=none`, on `net`: a tap with fio in QEMU's network namespace, or
/// user networking with `hostfwd`) next to the same fio run against `nbdkit` serving a 256 MiB
/// file on the host (through the host's page cache, no VM; on the tap it listens in the
/// namespace), in the same run; both on a 256 MiB region written once before. Then the
/// snapshot path over NBD (issue 19): 4k random first writes on `vda` with a fresh snapshot
/// (store on a second disk, 4 KiB chunks), and 4k random reads of the snapshot once every
/// chunk of the region is copied. Returns the appliance's IOPS by row name.
fn nbd_rows(time: &str, net: &Network) -> Vec<linux::Figure> {
    const ROWS: &[(&str, &[&str], bool)] = NBD_ROWS;
    // fio takes the same suffixes as BENCH_TIME (5s, 500ms, 1m).
    let runtime = time;
    println!();
    let disk = Image::new("bench-nbd-1g", 1 << 30);
    let cow = Image::new("bench-nbd-cow-1g", 1 << 30);
    cow.write(0, &vec![0u8; 64 << 20]);
    let file = Image::new("bench-nbdkit-256m", 256 << 20);
    file.write(0, &vec![0u8; 256 << 20]);
    let port = tests::free_port();
    let append = match net {
        Network::Tap => format!("loglevel=warn ip={}/24", tests::TAP_GUEST),
        Network::User(_) => "loglevel=warn".to_string(),
    };
    let boot = Boot::kernel("q35", &append)
        .memory_size("2G")
        .virtio_disk(&disk.path, "BENCH-NBD")
        .virtio_disk(&cow.path, "BENCH-NBD-COW");
    let mut q = net.nic(boot, port).start();
    q.wait_prompt();
    // Allocate the region in the host's image first (as the snapshot rows do).
    cmd(
        &mut q,
        "bench vda --rw write --bs 128k --qd 32 --size 256m --ios 2048",
    );
    let kit_port = tests::free_port();
    // On the tap nbdkit listens in QEMU's namespace, where fio runs.
    let nbdkit = net
        .client(&q, "nbdkit")
        .args(["-f", "-i", "127.0.0.1", "-p", &kit_port.to_string(), "file"])
        .arg(&file.path)
        .spawn();
    let mut nbdkit = match nbdkit {
        Ok(child) => Some(child),
        Err(e) => {
            println!("(nbdkit not found: {e}; run `make deps`)");
            None
        }
    };
    let appliance = net.uri(port, "vda");
    let host = format!("nbd://127.0.0.1:{kit_port}/");
    // Wait for the address (a DHCP lease on user networking; the NBD listener is up once the
    // prompt shows) and nbdkit.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline
        && !net
            .client(&q, "nbdinfo")
            .arg(&appliance)
            .output()
            .is_ok_and(|o| o.status.success())
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    let accel = std::env::var("ACCEL").unwrap_or_else(|_| "tcg".into());
    println!(
        "NBD (fio --ioengine=nbd, 256 MiB region, {time} per row): appliance = QEMU accel={accel} \
         virtio-blk cache=none; nbdkit = file plugin on the host\nnetwork: {}",
        net.describe()
    );
    println!(
        "{:<20} {:>12} {:>9} {:>9} | {:>12} {:>9} {:>9} | {:>8}",
        "workload", "snapfw IOPS", "MB/s", "p99 us", "nbdkit IOPS", "MB/s", "p99 us", "ratio"
    );
    let mut figures = Vec::new();
    for (name, args, write) in ROWS {
        let before = nic_figures(&mut q);
        let a = fio(net.fio(&q, runtime), &appliance, args, *write, runtime);
        let after = nic_figures(&mut q);
        figures.push((*name, a.as_ref().map(|f| f.iops)));
        let k = if nbdkit.is_some() {
            fio(net.fio(&q, runtime), &host, args, *write, runtime)
        } else {
            None
        };
        let show = |f: &Option<FioFigures>| match f {
            Some(f) => format!("{:>12.0} {:>9.1} {:>9.0}", f.iops, f.mb_s, f.p99_us),
            None => format!("{:>12} {:>9} {:>9}", "-", "-", "-"),
        };
        let ratio = match (&a, &k) {
            (Some(a), Some(k)) if k.iops > 0.0 => format!("{:.1}%", 100.0 * a.iops / k.iops),
            _ => "-".to_string(),
        };
        println!("{:<20} {} | {} | {:>8}", name, show(&a), show(&k), ratio);
        let d = |i: usize| after[i].saturating_sub(before[i]);
        println!(
            "{:<20} snapfw: {} frames in, {} out, {} NIC interrupts, {} polls, CPU halted {:.0}%",
            "",
            d(0),
            d(1),
            d(2),
            d(3),
            100.0 * d(4) as f64 / d(5).max(1) as f64
        );
    }
    if let Some(child) = nbdkit.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    // The snapshot path (nbdkit has none).
    cmd(&mut q, "snapshot create n1 vda vdb:0+1048576");
    let first = fio(
        net.fio(&q, runtime),
        &appliance,
        &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
        true,
        runtime,
    );
    // How the engine grouped the row's commits, for comparison with the local row.
    let status = cmd(&mut q, "snapshot status n1");
    let engine_lines: Vec<&str> = status
        .lines()
        .filter(|l| l.contains("records per commit") || l.contains("stages, mean"))
        .collect();
    cmd(&mut q, "write vda 0 524288 --byte 0x42");
    let reads = fio(
        net.fio(&q, runtime),
        &net.uri(port, "n1"),
        &["--rw=randread", "--bs=4k", "--iodepth=32"],
        false,
        runtime,
    );
    for (name, f) in [(linux::NBD_FIRST, &first), (linux::NBD_SNAP_READS, &reads)] {
        match f {
            Some(f) => println!(
                "{name:<42} {:>12.0} {:>9.1} {:>9.0}",
                f.iops, f.mb_s, f.p99_us
            ),
            None => println!("{name:<42} {:>12}", "-"),
        }
        figures.push((name, f.as_ref().map(|f| f.iops)));
        if name == linux::NBD_FIRST {
            for line in &engine_lines {
                println!("  {}", line.trim());
            }
        }
    }
    q.send(b"poweroff\r");
    let _ = q.wait_exit(Duration::from_secs(30));
    figures
}

/// The NIC's counters from `net`: frames in, frames out, queue interrupts, polls, ms halted,
/// ms of uptime.
fn nic_figures(q: &mut tests::Qemu) -> [u64; 6] {
    let out = q.command_timeout("net", Duration::from_secs(60));
    let after = |key: &str| number_after(&out, key).unwrap_or(0);
    let polls = out
        .split(" polls")
        .next()
        .and_then(|s| s.split_whitespace().last())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    [
        after("rx: "),
        after("tx: "),
        after("interrupts: "),
        polls,
        after("halted "),
        number_after(&out, " ms of ").unwrap_or(0),
    ]
}

/// The value after `key` up to the next non-digit, in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

/// Stores of 100 k, 1 M and 10 M exceptions on a 1 TiB COW image for a 2 TiB origin: load
/// time and memory per exception, on the host and at the appliance's boot.
fn store_rows() {
    use snapshot::format::{Binding, BoundedBytes};
    use tests::cow::{fill_chunk, load_file, write_store, Fill};
    const TIB: u64 = 1 << 40;
    const CHUNK_SECTORS: u32 = 8;
    let origin_bytes = 2 * TIB;
    let origin_chunks = origin_bytes / 4096;
    let memory = std::env::var("BENCH_STORE_MEMORY").unwrap_or_else(|_| "4G".into());
    println!();
    println!(
        "COW stores at boot: 2 TiB origin, 1 TiB COW store, 4 KiB chunks (sparse images), -m {memory}"
    );
    println!(
        "{:<12} {:<10} | {:>9} {:>9} {:>8} | {:>9} {:>9} {:>9} {:>10} {:>8} {:>7}",
        "exceptions",
        "fill",
        "host s",
        "M exc/s",
        "B/exc",
        "prompt s",
        "load s",
        "M exc/s",
        "heap MiB",
        "B/exc",
        "CPU s"
    );
    // The CPU time of QEMU's busiest thread (the vCPU) from its start to the prompt: what the
    // boot and the load cost the emulator, which the guest's clock (wall time) does not tell
    // apart from the time a shared host did not run it.
    fn vcpu_seconds(q: &tests::Qemu) -> f64 {
        let tick = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(100.0);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", q.pid())) else {
            return f64::NAN;
        };
        let busiest = tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            .map(|stat| {
                // utime and stime: fields 14 and 15, the 12th and 13th after the name.
                let f: Vec<u64> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .map(|v| v.parse().unwrap_or(0))
                    .collect();
                f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)
            })
            .max()
            .unwrap_or(0);
        busiest as f64 / tick
    }
    let boot = |origin: &Image, cow: &Image| {
        Boot::kernel("q35", "loglevel=info")
            .memory_size(&memory)
            .virtio_disk(&origin.path, "STORE-ORIGIN")
            .virtio_disk(&cow.path, "STORE-COW")
            .start()
    };
    // The same boot without a store: what the prompt costs anyway.
    let origin = Image::new("bench-store-origin", origin_bytes);
    let empty = Image::new("bench-store-empty", TIB);
    let mut q = boot(&origin, &empty);
    q.wait_prompt();
    let baseline = q.elapsed();
    let baseline_cpu = vcpu_seconds(&q);
    q.send(b"poweroff\r");
    let _ = q.wait_exit(Duration::from_secs(30));
    drop(empty);
    println!(
        "{:<12} {:<10} | {:>9} {:>9} {:>8} | {:>9.2} {:>9} {:>9} {:>10} {:>8} {:>7.2}",
        0,
        "-",
        "-",
        "-",
        "-",
        baseline.as_secs_f64(),
        "-",
        "-",
        "-",
        "-",
        baseline_cpu
    );
    for n in [100_000u64, 1_000_000, 10_000_000] {
        for fill in [Fill::Sequential, Fill::Random] {
            let cow = Image::new("bench-store-cow", TIB);
            let binding = Binding {
                name: BoundedBytes::new(b"big").unwrap(),
                origin_serial: BoundedBytes::new(b"STORE-ORIGIN").unwrap(),
                origin_sectors: origin_bytes / 512,
                chunk_sectors: CHUNK_SECTORS,
                created_unix_seconds: 0,
                region_start: 0,
                region_sectors: TIB / 512,
                flags: 0,
                origin_id: snapshot::OriginId::Serial,
            };
            write_store(
                &cow.path,
                CHUNK_SECTORS,
                Some(&binding),
                n,
                |i| fill_chunk(fill, i, origin_chunks),
                |_, _| None,
            );
            let started = std::time::Instant::now();
            let host = load_file(&cow.path, origin_bytes).expect("the store loads on the host");
            let host_s = started.elapsed().as_secs_f64();
            assert_eq!(host.table.len(), n);
            let host_per = host.table.reserved_bytes() as f64 / n as f64;
            drop(host);
            let mut q = boot(&origin, &cow);
            let prompt = q.try_expect(tests::PROMPT, Duration::from_secs(900));
            let prompt_s = q.elapsed().as_secs_f64();
            let cpu_s = vcpu_seconds(&q);
            let log = q.transcript();
            let loaded_ms = log
                .split("snapshot big: store on vdb attached to vda (")
                .nth(1)
                .and_then(|l| number_after(l, "loaded in "));
            let (heap, per, load) = if prompt.is_ok() && loaded_ms.is_some() {
                let mem = q.command("mem --json");
                let heap = number_after(&mem, r#""used":"#).unwrap_or(0);
                let status = q.command("snapshot status big");
                let kib = number_after(&status, " exceptions, ").unwrap_or(0);
                (
                    format!("{:.1}", heap as f64 / (1 << 20) as f64),
                    format!("{:.2}", kib as f64 * 1024.0 / n as f64),
                    loaded_ms.unwrap_or(0) as f64 / 1000.0,
                )
            } else {
                let why = log
                    .lines()
                    .find(|l| l.contains("vdb:") && (l.contains("ERROR") || l.contains("WARN")))
                    .unwrap_or("no prompt")
                    .to_string();
                println!("  {n} {fill:?}: not loaded at boot: {why}");
                ("-".into(), "-".into(), f64::NAN)
            };
            println!(
                "{:<12} {:<10} | {:>9.2} {:>9.2} {:>8.2} | {:>9.2} {:>9.2} {:>9.2} {:>10} {:>8} {:>7.2}",
                n,
                format!("{fill:?}").to_lowercase(),
                host_s,
                n as f64 / host_s / 1e6,
                host_per,
                prompt_s,
                load,
                n as f64 / load / 1e6,
                heap,
                per,
                cpu_s
            );
            q.send(b"poweroff\r");
            let _ = q.wait_exit(Duration::from_secs(30));
        }
    }
}
