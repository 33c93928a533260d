//! The bench's Linux rows: the interop tests' Linux guest (Debian's kernel and an initramfs
//! with busybox, dmsetup, fio and nbd-server, made under `build/linux-guest` by `make deps`)
//! on the same QEMU devices as the appliance's rows, running the same workloads, printed next
//! to the appliance's figures with the ratio of absolute IOPS (snapfw / Linux).
//!
//! - [`snapshot_rows`] (issue 20): in-guest `fio --ioengine=libaio --direct=1` on the raw
//!   origin disk and through dm-snapshot (`snapshot-origin` and `snapshot` mappings, persistent
//!   stores on a second disk of the same kind), for virtio-blk and NVMe: raw randwrite, first
//!   writes with a fresh snapshot at 4 KiB chunks, overwrites, reads of the snapshot, 128k
//!   writes with 64 KiB chunks, two snapshots.
//! - [`nbd_rows`] (issue 19): the guest serves `/dev/vda`, a dm-snapshot origin and its
//!   snapshot with Debian's `nbd-server` over virtio-net on the same network as the
//!   appliance's NBD rows (a tap in QEMU's network namespace, the guest's address set from
//!   its shell, fio in the namespace; or user networking with `hostfwd`), and the same fio
//!   `nbd` jobs run against it.
//!
//! Without the guest (no `make deps` yet, or a cache from before fio and nbd-server joined
//! it) both say so and return no figures; the rest of the bench goes on.

use std::time::Duration;

use tests::{Boot, Image, Qemu};

/// Linux under TCG boots in 10-30 s; the bench's initramfs is larger than the tests' was.
const BOOT: Duration = Duration::from_secs(300);
/// One shell command in the guest (a fio row, a 256 MiB dd). A command that takes longer has
/// stalled: Linux's NVMe driver on this QEMU (7.2) sometimes loses a command after a fio row
/// and waits for it for minutes; the rest of that guest's rows are then not measured.
const COMMAND: Duration = Duration::from_secs(300);

/// The guest and whether a command stalled in it (then nothing more runs there).
struct Guest {
    q: Qemu,
    stalled: bool,
}

/// One row of a side-by-side table: its name and the IOPS measured (`None`: not measured).
pub type Figure = (&'static str, Option<f64>);

/// Why the guest cannot run the bench's rows, if it cannot.
fn unavailable() -> Option<String> {
    let dir = tests::build_dir().join("linux-guest");
    for f in ["vmlinuz", "initramfs.gz"] {
        if !dir.join(f).exists() {
            return Some(format!("{} is missing", dir.join(f).display()));
        }
    }
    let packages = std::fs::read_to_string(dir.join("packages.txt")).unwrap_or_default();
    for p in ["fio", "nbd-server", "dmsetup"] {
        if !packages.lines().any(|l| l.starts_with(&format!("{p} "))) {
            return Some(format!(
                "its guest has no {p} (made before the bench used it)"
            ));
        }
    }
    None
}

/// Whether the guest can run; if not, says why and that `what` is skipped.
fn available(what: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) => {
            println!("({what}: skipped, the Linux guest is not available: {why}; run `make deps`)");
            false
        }
    }
}

/// Runs `line` in the guest; `None` (with the output printed) unless it exits 0 in time.
fn sh(g: &mut Guest, line: &str) -> Option<String> {
    if g.stalled {
        return None;
    }
    assert!(!line.contains('\n'), "one line at a time: {line:?}");
    // As `Qemu::shell`, without failing the bench on a timeout.
    g.q.send(format!("{line}; printf '\\n@@%s %d@@\\n' END $?\n").as_bytes());
    let done =
        g.q.try_expect("@@END ", COMMAND)
            .and_then(|out| Ok((out, g.q.try_expect("@@", COMMAND)?)));
    let (out, status) = match done {
        Ok(done) => done,
        Err(why) => {
            println!(
                "  Linux: `{line}` did not finish ({why}); the rest of this guest's rows are \
                 not measured"
            );
            // The kernel's own words about it (loglevel 4: its warnings reach the console).
            let log = g.q.transcript();
            let kernel: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("nvme") || l.contains("I/O error") || l.contains("timeout"))
                .collect();
            for l in &kernel[kernel.len().saturating_sub(6)..] {
                println!("    {}", l.trim());
            }
            g.stalled = true;
            return None;
        }
    };
    let out = out.strip_suffix("@@END ").unwrap_or(&out).replace('\r', "");
    let out = out.trim_matches('\n').to_string();
    let code: i32 = status.trim_end_matches("@@").trim().parse().unwrap_or(-1);
    if code != 0 {
        println!("  Linux: `{line}` failed ({code}): {out}");
        return None;
    }
    Some(out)
}

/// fio's terse (version 3) line: IOPS of the read or write section.
fn terse_iops(out: &str, write: bool) -> Option<f64> {
    let line = out.lines().find(|l| l.starts_with("3;fio-"))?;
    let fields: Vec<&str> = line.split(';').collect();
    // Fields (1-based): 8 read IOPS, 49 write IOPS.
    fields.get(if write { 48 } else { 7 })?.parse().ok()
}

/// One in-guest fio run: `--ioengine=libaio --direct=1` on `dev`'s first 256 MiB, for `time`.
fn fio(g: &mut Guest, dev: &str, args: &str, time: &str) -> Option<f64> {
    fio_run(g, dev, args, time, "--time_based")
}

/// One pass of the 256 MiB region (at most `time`): the rows whose writes copy, so that every
/// write of the row copies, as the appliance's rows of the same name run.
fn fio_once(g: &mut Guest, dev: &str, args: &str, time: &str) -> Option<f64> {
    fio_run(g, dev, args, time, "")
}

fn fio_run(g: &mut Guest, dev: &str, args: &str, time: &str, mode: &str) -> Option<f64> {
    let write = args.contains("write");
    let out = sh(
        g,
        &format!(
            "fio --name=linux --filename={dev} --ioengine=libaio --direct=1 --size=256m {args} \
             {mode} --runtime={time} --output-format=terse --terse-version=3"
        ),
    )?;
    let iops = terse_iops(&out, write);
    if iops.is_none() {
        println!("  Linux: fio on {dev} printed no figures: {out}");
    }
    iops
}

fn boot(mut q: Boot) -> Guest {
    // Kernel warnings too (an NVMe command timing out is one), for a stall's report.
    q.append = q.append.replace("loglevel=4", "loglevel=5");
    let mut q = q.memory_size("2G").start();
    let ready = q.wait_linux(BOOT);
    println!(
        "Linux guest: {ready}, booted in {:.0} s",
        q.elapsed().as_secs_f64()
    );
    Guest { q, stalled: false }
}

/// Powers the guest off (kills it if a command stalled).
fn poweroff(mut g: Guest) {
    if g.stalled {
        g.q.kill();
        return;
    }
    g.q.send(b"poweroff -f\n");
    let _ = g.q.wait_exit(Duration::from_secs(60));
}

/// Zeroes a store's first chunk (a new store to dm-snapshot) and maps `sectors` of `dev` from
/// `start` as `/dev/mapper/NAME` (a region, as the appliance's `DISK:START+SECTORS`).
fn new_store(g: &mut Guest, name: &str, dev: &str, start: u64, sectors: u64) -> Option<()> {
    sh(
        g,
        &format!(
            "dd if=/dev/zero of={dev} bs=4096 count=1 seek={} oflag=direct 2>/dev/null && \
             dmsetup create {name} --table \"0 {sectors} linear {dev} {start}\"",
            start / 8
        ),
    )
    .map(|_| ())
}

/// Snapshots of `origin` on the stores named (`/dev/mapper/STORE`), `chunk` sectors a chunk,
/// then the `snapshot-origin` mapping `/dev/mapper/origin` that writes go through.
fn snapshots(g: &mut Guest, origin: &str, stores: &[(&str, &str)], chunk: u32) -> Option<()> {
    let size = format!("$(blockdev --getsz {origin})");
    for (snap, store) in stores {
        sh(
            g,
            &format!(
                "dmsetup create {snap} --table \"0 {size} snapshot {origin} /dev/mapper/{store} P {chunk}\""
            ),
        )?;
    }
    sh(
        g,
        &format!("dmsetup create origin --table \"0 {size} snapshot-origin {origin}\""),
    )
    .map(|_| ())
}

/// Removes every device-mapper device, the origin mapping first.
fn remove_all(g: &mut Guest) {
    let _ = sh(
        g,
        "dmsetup remove origin 2>/dev/null; for d in $(dmsetup ls | cut -f1); do \
         case $d in snap*) dmsetup remove $d ;; esac; done; \
         for d in $(dmsetup ls | cut -f1); do dmsetup remove $d; done; true",
    );
}

const REGION: u64 = 256 << 20;
/// The appliance's COW regions: `COW:0+1048576` and `COW:1048576+1048576` (512 MiB each).
const STORE_SECTORS: u64 = 1_048_576;
const RANDWRITE: &str = "--rw=randwrite --bs=4k --iodepth=32";

/// The names of the appliance's snapshot rows (`snapshot_rows` in bench.rs) that Linux runs
/// too, with the raw randwrite row first.
pub const RAW_RANDWRITE: &str = "4k randwrite QD32, raw";
const FIRST: &str = "4k randwrite QD32, first writes";
const OVERWRITES: &str = "4k randwrite QD32, overwrites";
const SNAP_READS: &str = "4k randread QD32 on the snapshot";
const CHUNK64: &str = "128k write QD32, 64 KiB chunks";
const TWO: &str = "4k randwrite QD32, two snapshots";
const SNAPSHOT_ROWS: [&str; 6] = [RAW_RANDWRITE, FIRST, OVERWRITES, SNAP_READS, CHUNK64, TWO];

/// Linux's snapshot rows on `origin` with stores on `cow`, in the order of the appliance's
/// section: the raw randwrite row before and after (its figure is the mean, as the appliance's).
fn snapshot_section(g: &mut Guest, origin: &str, cow: &str, time: &str) -> Vec<Figure> {
    let mut rows: Vec<Figure> = Vec::new();
    // Allocate the region in the host's image first, as the appliance's section does.
    sh(
        g,
        &format!(
            "dd if=/dev/zero of={origin} bs=1M count={} oflag=direct",
            REGION >> 20
        ),
    );
    let raw_before = fio(g, origin, RANDWRITE, time);
    remove_all(g);
    let ok = new_store(g, "cow1", cow, 0, STORE_SECTORS)
        .and_then(|_| snapshots(g, origin, &[("snap1", "cow1")], 8));
    let first = ok.and_then(|_| fio_once(g, "/dev/mapper/origin", RANDWRITE, time));
    rows.push((FIRST, first));
    // Copy every chunk of the region, then overwrite.
    let copied = ok.and_then(|_| {
        sh(
            g,
            &format!(
                "dd if=/dev/zero of=/dev/mapper/origin bs=1M count={} oflag=direct",
                REGION >> 20
            ),
        )
    });
    rows.push((
        OVERWRITES,
        copied
            .as_ref()
            .and_then(|_| fio(g, "/dev/mapper/origin", RANDWRITE, time)),
    ));
    rows.push((
        SNAP_READS,
        copied.and_then(|_| {
            fio(
                g,
                "/dev/mapper/snap1",
                "--rw=randread --bs=4k --iodepth=32",
                time,
            )
        }),
    ));
    remove_all(g);
    let chunk64 = new_store(g, "cow1", cow, 0, STORE_SECTORS)
        .and_then(|_| snapshots(g, origin, &[("snap1", "cow1")], 128))
        .and_then(|_| {
            fio_once(
                g,
                "/dev/mapper/origin",
                "--rw=write --bs=128k --iodepth=32",
                time,
            )
        });
    rows.push((CHUNK64, chunk64));
    remove_all(g);
    let two = new_store(g, "cow1", cow, 0, STORE_SECTORS)
        .and_then(|_| new_store(g, "cow2", cow, STORE_SECTORS, STORE_SECTORS))
        .and_then(|_| snapshots(g, origin, &[("snap1", "cow1"), ("snap2", "cow2")], 8))
        .and_then(|_| fio_once(g, "/dev/mapper/origin", RANDWRITE, time));
    rows.push((TWO, two));
    remove_all(g);
    let raw_after = fio(g, origin, RANDWRITE, time);
    let raw = match (raw_before, raw_after) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        (a, b) => a.or(b),
    };
    rows.insert(0, (RAW_RANDWRITE, raw));
    rows
}

/// Prints `name | snapfw | Linux | ratio` cells for one device; no ratio from a guest that
/// stalled (its figures before the stall may be slowed by what led to it).
fn cells(snapfw: Option<f64>, linux: Option<f64>, stalled: bool) -> String {
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let ratio = match (snapfw, linux) {
        (Some(_), Some(_)) if stalled => "stalled".to_string(),
        (Some(s), Some(l)) if l > 0.0 => format!("{:.2}x", s / l),
        _ => "-".to_string(),
    };
    format!("{:>10} {:>10} {:>9}", show(snapfw), show(linux), ratio)
}

fn lookup(rows: &[Figure], name: &str) -> Option<f64> {
    rows.iter().find(|(n, _)| *n == name).and_then(|(_, v)| *v)
}

/// Issue 20's side-by-side: Linux's dm-snapshot rows on the same QEMU devices as the
/// appliance's snapshot rows (a 1 GiB raw origin and a 1 GiB store disk, virtio-blk and NVMe,
/// `cache=none,aio=threads`), next to the appliance's figures of this run (`virtio`, `nvme`:
/// the appliance's rows by name; empty when it did not run them).
pub fn snapshot_rows(time: &str, virtio: &[Figure], nvme: &[Figure]) {
    println!();
    if !available("Linux dm-snapshot rows") {
        return;
    }
    let disks = [
        Image::new("bench-linux-raw-1g", 1 << 30),
        Image::new("bench-linux-origin-1g", 1 << 30),
        Image::new("bench-linux-cow-1g", 1 << 30),
        Image::new("bench-linux-nvme-1g", 1 << 30),
        Image::new("bench-linux-nvme-cow-1g", 1 << 30),
    ];
    // As the appliance's stores: written once, so a copy does not pay for the host's file
    // system allocating blocks.
    for image in [&disks[2], &disks[4]] {
        let zeros = vec![0u8; 64 << 20];
        for i in 0..16u64 {
            image.write(i * (64 << 20), &zeros);
        }
    }
    // The appliance's machine: every disk attached. One boot per device kind, so that a stall
    // on one (see `COMMAND`) leaves the other's rows measured.
    let machine = || {
        boot(
            Boot::linux_guest()
                .virtio_disk(&disks[0].path, "BENCH")
                .virtio_disk(&disks[1].path, "BENCH-ORIGIN")
                .virtio_disk(&disks[2].path, "BENCH-COW")
                .nvme(
                    "BENCH-NVME",
                    &[(&disks[3].path, "on"), (&disks[4].path, "on")],
                ),
        )
    };
    let mut g = machine();
    let lv = snapshot_section(&mut g, "/dev/vdb", "/dev/vdc", time);
    let v_stalled = g.stalled;
    poweroff(g);
    let mut g = machine();
    let ln = snapshot_section(&mut g, "/dev/nvme0n1", "/dev/nvme0n2", time);
    let n_stalled = g.stalled;
    poweroff(g);
    println!(
        "Linux dm-snapshot side by side: in-guest fio --ioengine=libaio --direct=1 on the same \
         QEMU devices, 256 MiB region, {time} per row; IOPS, snapfw / Linux"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>9} | {:>10} {:>10} {:>9}",
        "workload", "virtio", "Linux", "ratio", "NVMe", "Linux", "ratio"
    );
    for name in SNAPSHOT_ROWS {
        println!(
            "{:<34} {} | {}",
            name,
            cells(lookup(virtio, name), lookup(&lv, name), v_stalled),
            cells(lookup(nvme, name), lookup(&ln, name), n_stalled)
        );
    }
}

/// The NBD jobs: the bench's four rows on the raw disk, then the snapshot path.
pub const NBD_FIRST: &str = "4k randwrite QD32, origin, fresh snapshot";
pub const NBD_SNAP_READS: &str = "4k randread QD32, the snapshot";

/// Issue 19's side-by-side: the guest serves its `/dev/vda` (a 1 GiB raw virtio-blk disk,
/// `cache=none,aio=threads`), a dm-snapshot origin of it and the snapshot (store on a second
/// such disk, 4 KiB chunks) with `nbd-server` over virtio-net and QEMU user networking; the
/// host runs `rows` (the bench's fio `nbd` jobs: name, fio arguments, whether it writes) on
/// `/dev/vda`, then the snapshot path: 4k random first writes on the origin with a fresh
/// snapshot, and 4k random reads of the snapshot once every chunk of the region is copied.
/// `snapfw`: the appliance's figures of this run by row name. Each row starts with the guest's
/// page cache dropped (nbd-server reads and writes through it: writes are acknowledged from
/// it, as Debian's nbd-server does by default).
pub fn nbd_rows(
    time: &str,
    rows: &[(&'static str, &[&str], bool)],
    snapfw: &[Figure],
    net: &super::Network,
) {
    println!();
    if !available("Linux nbd-server rows") {
        return;
    }
    let disk = Image::new("bench-linux-nbd-1g", 1 << 30);
    let cow = Image::new("bench-linux-nbd-cow-1g", 1 << 30);
    cow.write(0, &vec![0u8; 64 << 20]);
    let port = tests::free_port();
    let mut g = boot(
        net.nic(
            Boot::linux_guest()
                .virtio_disk(&disk.path, "BENCH-NBD")
                .virtio_disk(&cow.path, "BENCH-NBD-COW"),
            port,
        ),
    );
    // The guest's /init gives eth0 user networking's address; the tap's is another.
    let addressed = match net {
        super::Network::Tap => sh(
            &mut g,
            &format!(
                "ip addr flush dev eth0 && ip addr add {}/24 dev eth0 && ip link set eth0 up",
                tests::TAP_GUEST
            ),
        )
        .is_some(),
        super::Network::User(_) => true,
    };
    let conf = "[generic]\\n[vda]\\nexportname = /dev/vda\\n[origin]\\nexportname = \
                /dev/mapper/origin\\n[snap]\\nexportname = /dev/mapper/snap1\\n";
    let served = sh(
        &mut g,
        &format!(
            "dd if=/dev/zero of=/dev/vda bs=1M count={} oflag=direct 2>/dev/null && \
             printf '{conf}' >/etc/nbd.conf && nbd-server -C /etc/nbd.conf",
            REGION >> 20
        ),
    )
    .is_some()
        && addressed;
    let uri = |export: &str| net.uri(port, export);
    let mut linux: Vec<Figure> = Vec::new();
    if served {
        // The listener is up once nbd-server returns; wait for the forward to reach it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline
            && !net
                .client(&g.q, "nbdinfo")
                .arg(uri("vda"))
                .output()
                .is_ok_and(|o| o.status.success())
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        let drop_caches = |g: &mut Guest| sh(g, "sync && echo 3 >/proc/sys/vm/drop_caches");
        for (name, args, write) in rows {
            drop_caches(&mut g);
            linux.push((
                name,
                super::fio(net.fio(&g.q, time), &uri("vda"), args, *write, time).map(|f| f.iops),
            ));
        }
        let ok = new_store(&mut g, "cow1", "/dev/vdb", 0, STORE_SECTORS)
            .and_then(|_| snapshots(&mut g, "/dev/vda", &[("snap1", "cow1")], 8))
            .and_then(|_| drop_caches(&mut g));
        let fio_row = |g: &Guest, uri: String, args: &[&str], write: bool| {
            super::fio(net.fio(&g.q, time), &uri, args, write, time).map(|f| f.iops)
        };
        let first = ok.as_ref().and_then(|_| {
            fio_row(
                &g,
                uri("origin"),
                &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
                true,
            )
        });
        linux.push((NBD_FIRST, first));
        let copied = ok.and_then(|_| {
            sh(
                &mut g,
                &format!(
                    "dd if=/dev/zero of=/dev/mapper/origin bs=1M count={} oflag=direct && \
                     sync && echo 3 >/proc/sys/vm/drop_caches",
                    REGION >> 20
                ),
            )
        });
        linux.push((
            NBD_SNAP_READS,
            copied.and_then(|_| {
                fio_row(
                    &g,
                    uri("snap"),
                    &["--rw=randread", "--bs=4k", "--iodepth=32"],
                    false,
                )
            }),
        ));
    }
    if linux.iter().any(|(_, f)| f.is_none()) && !g.stalled {
        // A row without figures: the kernel's own words about its NIC, if it said any.
        let log = g.q.transcript();
        let nic: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("eth0") || l.contains("virtio_net") || l.contains("NETDEV"))
            .collect();
        for l in &nic[nic.len().saturating_sub(6)..] {
            println!("    {}", l.trim());
        }
    }
    let g_stalled = g.stalled;
    poweroff(g);
    println!(
        "NBD side by side: fio --ioengine=nbd, 256 MiB region, {time} per row; Linux = \
         nbd-server in the guest on the same QEMU disk and network options; IOPS, snapfw / \
         Linux\nnetwork: {}",
        net.describe()
    );
    println!(
        "{:<42} {:>10} {:>10} {:>9}",
        "workload", "snapfw", "Linux", "ratio"
    );
    let names = rows.iter().map(|r| r.0).chain([NBD_FIRST, NBD_SNAP_READS]);
    for name in names {
        println!(
            "{:<42} {}",
            name,
            cells(lookup(snapfw, name), lookup(&linux, name), g_stalled)
        );
    }
}
