//! `make bench`: boots the appliance with a 1 GiB raw virtio-blk disk
//! (`cache=none,aio=threads`) and prints the benchmark table: 4k randread and randwrite at
//! QD1 and QD32, 128k sequential read and write; IOPS, MB/s, p99 latency, interrupts per I/O.
//! A benchmark, not a test: it asserts nothing about speed.
//!
//! `BENCH_TIME` (default `5s`) sets each row's duration; `ACCEL` as for the tests.

use std::time::Duration;

use tests::{Boot, Image};

struct Row {
    name: &'static str,
    args: &'static str,
}

const ROWS: &[Row] = &[
    Row {
        name: "4k randread QD1",
        args: "--rw randread --bs 4k --qd 1",
    },
    Row {
        name: "4k randread QD32",
        args: "--rw randread --bs 4k --qd 32",
    },
    Row {
        name: "4k randwrite QD1",
        args: "--rw randwrite --bs 4k --qd 1",
    },
    Row {
        name: "4k randwrite QD32",
        args: "--rw randwrite --bs 4k --qd 32",
    },
    Row {
        name: "128k read QD32",
        args: "--rw read --bs 128k --qd 32",
    },
    Row {
        name: "128k write QD32",
        args: "--rw write --bs 128k --qd 32",
    },
];

fn field<'a>(text: &'a str, after: &str) -> &'a str {
    text.split(after)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("?")
}

fn main() {
    let time = std::env::var("BENCH_TIME").unwrap_or_else(|_| "5s".into());
    let disk = Image::new("bench-1g", 1 << 30);
    let mut q = Boot::kernel("q35", "loglevel=warn")
        .memory_size("1G")
        .virtio_disk(&disk.path, "BENCH")
        .start();
    q.wait_prompt();
    let accel = std::env::var("ACCEL").unwrap_or_else(|_| "tcg".into());
    println!("snapfw bench: virtio-blk, 1 GiB raw image, cache=none,aio=threads, accel={accel}, {time} per row");
    // Fill the disk once so reads hit allocated blocks of the host file.
    q.command_timeout(
        "bench vda --rw write --bs 128k --qd 32 --ios 8192",
        Duration::from_secs(600),
    );
    println!(
        "{:<20} {:>10} {:>10} {:>12} {:>14}",
        "workload", "IOPS", "MB/s", "p99 (us)", "irq per I/O"
    );
    for row in ROWS {
        let out = q.command_timeout(
            &format!("bench vda {} --time {time}", row.args),
            Duration::from_secs(600),
        );
        // The report follows the progress lines.
        let report = out.rsplit("bench vda rw=").next().unwrap_or(&out);
        let iops = field(report, "IOPS ");
        let mib: f64 = report
            .split("MiB/s")
            .next()
            .and_then(|s| s.split_whitespace().last())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        let p99 = field(report, "p99 ");
        let irq = report
            .split("interrupts ")
            .nth(1)
            .and_then(|s| s.split('(').nth(1))
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("?");
        println!(
            "{:<20} {:>10} {:>10.1} {:>12} {:>14}",
            row.name,
            iops,
            mib * 1.048576,
            p99,
            irq
        );
    }
    q.send(b"poweroff\r");
    let _ = q.wait_exit(Duration::from_secs(30));
}
