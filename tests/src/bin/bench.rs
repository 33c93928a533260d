//! `make bench`: boots the appliance with a 1 GiB raw virtio-blk disk and a 1 GiB NVMe
//! namespace (both `cache=none,aio=threads`) and prints the benchmark table for each: 4k
//! randread and randwrite at QD1 and QD32 (and QD128 on NVMe), 128k sequential read and
//! write; IOPS, MB/s, p99 latency, interrupts per I/O. A benchmark, not a test: it asserts
//! nothing about speed.
//!
//! `BENCH_TIME` (default `5s`) sets each row's duration; `ACCEL` as for the tests.

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
}

fn run(q: &mut tests::Qemu, disk: &str, args: &str, time: &str) -> Figures {
    let out = q.command_timeout(
        &format!("bench {disk} {args} --time {time}"),
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
    }
}

fn main() {
    let time = std::env::var("BENCH_TIME").unwrap_or_else(|_| "5s".into());
    let virtio = Image::new("bench-virtio-1g", 1 << 30);
    let nvme = Image::new("bench-nvme-1g", 1 << 30);
    let mut q = Boot::kernel("q35", "loglevel=warn")
        .memory_size("2G")
        .virtio_disk(&virtio.path, "BENCH")
        .nvme("BENCH-NVME", &[(&nvme.path, "on")])
        .start();
    q.wait_prompt();
    let accel = std::env::var("ACCEL").unwrap_or_else(|_| "tcg".into());
    println!(
        "snapfw bench: 1 GiB raw images (cache=none,aio=threads), accel={accel}, {time} per row"
    );
    // Fill each disk once so reads hit allocated blocks of the host file.
    for disk in ["vda", "nvme0n1"] {
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
    for row in ROWS {
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
    q.send(b"poweroff\r");
    let _ = q.wait_exit(Duration::from_secs(30));
}
