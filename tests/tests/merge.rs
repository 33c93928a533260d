//! Snapshot merge on real disks: `snapshot merge NAME` rolls the origin back to the snapshot
//! while a second snapshot of the same origin keeps its own contents; the merged store is
//! wiped and the snapshot removed. A power cut (SIGKILL) in the middle of a merge: the next
//! boot resumes it and finishes the job. A cut merge whose COW disk is missing at the next
//! boot: the half-merged origin is read-only (console and NBD) until the store is back, or
//! until the operator gives the store up (`snapshot forget-merge`).

use tests::{free_port, qemu_io, qemu_io_read_only, sha256_hex, Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;

fn boot(a: &Image, b: &Image, c: &Image) -> Qemu {
    boot_with(
        Boot::kernel("q35", "testing loglevel=info").virtio_disk(&a.path, "MERGE-ORIGIN"),
        b,
        c,
    )
}

/// As [`boot`], the origin throttled by QEMU to 8 MiB/s, so that a merge of 32 MiB runs for
/// seconds and a power cut lands in the middle of it however fast the engine merges (at
/// 1 GB/s a merge of 32 MiB ends within the milliseconds a kill takes).
fn boot_throttled(a: &Image, b: &Image, c: &Image) -> Qemu {
    let origin = Boot::kernel("q35", "testing loglevel=info").args([
        "-drive".to_string(),
        format!(
            "file={},if=none,format=raw,id=d0,cache=none,aio=threads,throttling.bps-total={}",
            a.path.display(),
            8 * MIB
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0,serial=MERGE-ORIGIN".to_string(),
    ]);
    boot_with(origin, b, c)
}

fn boot_with(origin: Boot, b: &Image, c: &Image) -> Qemu {
    let mut q = origin
        .virtio_disk(&b.path, "MERGE-COW-1")
        .virtio_disk(&c.path, "MERGE-COW-2")
        .start();
    q.wait_prompt();
    // Log lines after the first prompt (a resumed merge) redraw it: start after them.
    q.settle(std::time::Duration::from_millis(300));
    q
}

/// The merged store is gone: no `SnAp` header (a free-extent marker, as after a deletion)
/// and area 0 all zero.
fn assert_wiped(cow: &Image) {
    let head = cow.read(0, 8192);
    assert_ne!(&head[..4], b"SnAp", "store not wiped");
    assert!(
        snapshot::format::FreeExtent::decode(&head[..512]).is_some(),
        "no free-extent marker where the store was"
    );
    assert!(head[4096..].iter().all(|&x| x == 0), "area 0 not zero");
}

/// Waits until the whole transcript contains one of `patterns` (log lines may come before
/// the prompt); returns which.
fn wait_for_any(q: &Qemu, patterns: &[&str], timeout: std::time::Duration) -> usize {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let t = q.transcript();
        if let Some(i) = patterns.iter().position(|p| t.contains(p)) {
            return i;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "none of {patterns:?} within {timeout:?}\n{t}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn pattern(len: u64, salt: u8) -> Vec<u8> {
    (0..len as usize)
        .map(|i| (i / 4096 % 251) as u8 ^ (i % 13) as u8 ^ salt)
        .collect()
}

/// Snapshot s1, scribble over the origin, snapshot s2, more scribbling, merge s1.
fn prepare(q: &mut Qemu, before: &[u8]) -> (String, String) {
    let out = q.command("snapshot create s1 vda vdb");
    assert!(out.contains("created snapshot s1"), "{out}");
    assert_eq!(q.checksum("s1"), sha256_hex(before));
    for line in [
        "write vda 0 8192 --seed 7",
        "write vda 9000 3 --byte 0x22",
        "write vda 20000 100 --seed 8",
    ] {
        assert!(q.command(line).contains("wrote"), "{line}");
    }
    let out = q.command("snapshot create s2 vda vdc");
    assert!(out.contains("created snapshot s2"), "{out}");
    let s2_sum = q.checksum("s2");
    for line in ["write vda 4 8 --byte 0x33", "write vda 30000 16 --seed 9"] {
        assert!(q.command(line).contains("wrote"), "{line}");
    }
    let origin_sum = q.checksum("vda");
    assert_ne!(origin_sum, sha256_hex(before));
    (s2_sum, origin_sum)
}

#[test]
fn merge_rolls_the_origin_back_and_keeps_the_other_snapshot() {
    let (a, b, c) = (
        Image::new("merge-origin", 16 * MIB),
        Image::new("merge-cow1", 16 * MIB),
        Image::new("merge-cow2", 16 * MIB),
    );
    let before = pattern(16 * MIB, 0);
    a.write(0, &before);
    let mut q = boot(&a, &b, &c);
    let (s2_sum, _) = prepare(&mut q, &before);

    // Refusals first.
    for (line, expected) in [
        ("snapshot merge", "error: which snapshot?"),
        ("snapshot merge nosuch", "error: no snapshot 'nosuch'"),
    ] {
        let out = q.command(line);
        assert!(out.contains(expected), "{line}: {out}");
    }

    let out = q.command_timeout("snapshot merge s1", TIMEOUT * 3);
    assert!(out.contains("merged s1 into vda:"), "{out}");
    let transcript = q.transcript();
    assert!(
        transcript.contains("merge of s1 finished; snapshot removed"),
        "{transcript}"
    );
    // The origin is the snapshot again; the other snapshot did not move.
    assert_eq!(q.checksum("vda"), sha256_hex(&before));
    assert_eq!(q.checksum("s2"), s2_sum);
    let list = q.command("snapshot list");
    assert!(!list.contains("s1 "), "{list}");
    assert!(list.contains("s2") && list.contains("active"), "{list}");
    let out = q.command("snapshot merge s1");
    assert!(out.contains("error: no snapshot 's1'"), "{out}");
    let mem = q.command("mem --json");
    assert!(mem.contains(r#""io_path_allocations":0"#), "{mem}");
    q.poweroff();

    // On the host: the origin holds the snapshot's contents, the merged store is wiped.
    assert_eq!(
        sha256_hex(&a.read(0, (16 * MIB) as usize)),
        sha256_hex(&before)
    );
    assert_wiped(&b);

    // After a reboot only s2 comes back, still frozen.
    let mut q = boot(&a, &b, &c);
    let list = q.command("snapshot list");
    assert!(!list.contains("s1 ") && list.contains("s2"), "{list}");
    assert_eq!(q.checksum("s2"), s2_sum);
    q.poweroff();
}

#[test]
fn a_merge_cut_by_a_power_loss_finishes_after_reboot() {
    // Both stores in regions of vdb (s1 first), so the merged region must stay walkable for
    // boot discovery to find s2 after it; vdc is not used.
    let (a, b, c) = (
        Image::new("mergecut-origin", 64 * MIB),
        Image::new("mergecut-cow", 128 * MIB),
        Image::new("mergecut-spare", MIB),
    );
    let before = pattern(64 * MIB, 5);
    a.write(0, &before);
    let mut q = boot(&a, &b, &c);
    let out = q.command("snapshot create s1 vda vdb:0+131072");
    assert!(out.contains("created snapshot s1"), "{out}");
    // 32 MiB of copied chunks to merge.
    assert!(q
        .command_timeout("write vda 0 65536 --seed 11", TIMEOUT * 2)
        .contains("wrote"));
    // s2 must take a copy of every chunk the merge rewrites (32 MiB).
    let out = q.command("snapshot create s2 vda vdb:131072+98304");
    assert!(out.contains("created snapshot s2"), "{out}");
    let s2_sum = q.checksum("s2");
    q.send(b"snapshot merge s1\r");
    // Pull the plug as soon as the merge marker is durable.
    wait_for_any(&q, &["merge of s1 started"], TIMEOUT);
    q.kill();
    let cut = q.transcript();
    assert!(
        !cut.contains("merged s1 into vda"),
        "the merge finished before the cut: {cut}"
    );

    // Boot: the store says "merging"; the merge resumes by itself and finishes.
    let mut q = boot(&a, &b, &c);
    {
        let list = q.command("snapshot list");
        if !q.transcript().contains("merge of s1 finished") {
            // Still under way: the console shows it with its progress.
            assert!(
                list.contains("merging") && list.contains("merging s1 into vda: "),
                "{list}"
            );
            assert!(list.contains("chunks left"), "{list}");
            let status = q.command("snapshot status s1");
            assert!(
                status.contains(" snapshot-merge ") && status.contains("chunks left"),
                "{status}"
            );
            eprintln!("during the resumed merge:\n{list}{status}");
            let json = q.command("snapshot list --json");
            assert!(json.contains(r#""merge_chunks_left":"#), "{json}");
        }
        // The origin reads as the snapshot while the merge goes on.
        let sum = q.checksum("vda");
        assert_eq!(sum, sha256_hex(&before), "{}", q.transcript());
        wait_for_any(&q, &["merge of s1 finished; snapshot removed"], TIMEOUT * 3);
        assert!(q.transcript().contains("merge of s1 resumed: "));
        q.settle(std::time::Duration::from_millis(300));
    }
    let list = q.command("snapshot list");
    assert!(!list.contains("s1 ") && list.contains("s2"), "{list}");
    assert_eq!(q.checksum("vda"), sha256_hex(&before));
    let sum = q.checksum("s2");
    assert_eq!(sum, s2_sum, "{}", q.transcript());
    q.poweroff();
    assert_wiped(&b);
    // Another boot walks past the merged region (its free-extent marker) and finds s2.
    let mut q = boot(&a, &b, &c);
    let list = q.command("snapshot list");
    assert!(list.contains("s2") && list.contains("active"), "{list}");
    assert_eq!(q.checksum("s2"), s2_sum);
    q.poweroff();
}

#[test]
fn a_merge_with_writes_and_bench_on_the_origin_and_refusals() {
    // 256 MiB origin, all of it copied into s1, so the merge lasts long enough (about a
    // second under TCG; 64 MiB took 0.2 s once merges got faster, and the second merge below
    // was no longer refused) to overlap; s2 on vdc; a tiny store on vdd that overflows (an
    // invalid snapshot).
    let (a, b, c, d) = (
        Image::new("mergeio-origin", 256 * MIB),
        Image::new("mergeio-cow1", 280 * MIB),
        Image::new("mergeio-cow2", 280 * MIB),
        Image::new("mergeio-small", MIB),
    );
    let before = pattern(256 * MIB, 9);
    a.write(0, &before);
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&a.path, "MERGEIO-ORIGIN")
        .virtio_disk(&b.path, "MERGEIO-COW-1")
        .virtio_disk(&c.path, "MERGEIO-COW-2")
        .virtio_disk(&d.path, "MERGEIO-SMALL")
        .start();
    q.wait_prompt();
    for line in ["snapshot create s1 vda vdb", "snapshot create tiny vda vdd"] {
        assert!(q.command(line).contains("created snapshot"), "{line}");
    }
    assert!(q
        .command_timeout("write vda 0 524288 --seed 21", TIMEOUT * 6)
        .contains("wrote"));
    let list = q.command("snapshot list");
    assert!(
        list.lines()
            .any(|l| l.starts_with("tiny") && l.contains("overflow")),
        "{list}"
    );
    let out = q.command("snapshot merge tiny");
    assert!(
        out.contains("error: snapshot tiny is invalid (overflow)")
            && out.contains("cannot be merged"),
        "{out}"
    );
    assert!(q
        .command("snapshot delete tiny")
        .contains("deleted snapshot tiny"));
    assert!(q
        .command("snapshot create s2 vda vdc")
        .contains("created snapshot s2"));
    let s2_sum = q.checksum("s2");

    // Start the merge, take the prompt back (Ctrl-C leaves it running), and write meanwhile.
    q.send(b"snapshot merge s1\r");
    wait_for_any(&q, &["merge of s1 started"], TIMEOUT);
    q.send(b"\x03");
    q.settle(std::time::Duration::from_millis(200));
    let out = q.command("snapshot merge s2");
    assert!(
        out.contains("error:") && out.contains("one merge at a time"),
        "a second merge on the origin: {out}"
    );
    let out = q.command_timeout("write vda 100000 4000 --seed 22", TIMEOUT * 2);
    assert!(out.contains("wrote 4000 blocks"), "{out}");
    let out = q.command_timeout(
        "bench vda --rw randwrite --qd 32 --ios 3000 --size 8m",
        TIMEOUT * 3,
    );
    assert!(out.contains("3000 I/Os"), "{out}");
    let during = q.transcript();
    eprintln!(
        "merge finished before the bench ended: {}",
        during.contains("merge of s1 finished")
    );
    wait_for_any(&q, &["merge of s1 finished; snapshot removed"], TIMEOUT * 4);
    q.settle(std::time::Duration::from_millis(300));
    // s2 kept its frozen contents through the merge and the writes.
    assert_eq!(q.checksum("s2"), s2_sum);
    let mem = q.command("mem --json");
    assert!(mem.contains(r#""io_path_allocations":0"#), "{mem}");
    q.poweroff();

    // The origin is the snapshot, except where it was written during the merge: the bench's
    // first 8 MiB (random data) and the seeded range, which holds exactly what was written.
    let origin = a.read(0, (256 * MIB) as usize);
    let bench_end = (8 * MIB) as usize;
    assert!(
        origin[bench_end..100_000 * 512] == before[bench_end..100_000 * 512]
            && origin[104_000 * 512..] == before[104_000 * 512..],
        "the origin outside the written ranges is not the snapshot's contents\n{during}"
    );
    let mut seeded = vec![0u8; 4000 * 512];
    kernel::util::pattern::fill_seeded(&mut seeded, 22, 100_000 * 512);
    assert!(
        origin[100_000 * 512..104_000 * 512] == seeded[..],
        "the write made during the merge is not on the origin"
    );
    assert_wiped(&b);
}

const NBD_PORT: u16 = 10809;

/// Creates s1 of vda on vdb, rewrites 32 MiB of vda (sequential, so the merge copies long
/// runs) and cuts the power once `snapshot merge s1` has marked the origin. Returns what
/// the origin held before, i.e. what it must hold when the merge is done.
fn cut_a_merge(a: &Image, b: &Image, c: &Image) -> Vec<u8> {
    let before = pattern(64 * MIB, 3);
    a.write(0, &before);
    let mut q = boot_throttled(a, b, c);
    let out = q.command("snapshot create s1 vda vdb");
    assert!(out.contains("created snapshot s1"), "{out}");
    assert!(q
        .command_timeout("write vda 0 65536 --seed 12", TIMEOUT * 2)
        .contains("wrote"));
    q.send(b"snapshot merge s1\r");
    wait_for_any(&q, &["merge of s1 started"], TIMEOUT);
    q.kill();
    let cut = q.transcript();
    assert!(
        !cut.contains("merged s1 into vda"),
        "the merge finished before the cut: {cut}"
    );
    // On the host: the origin's first block carries the marker, naming the store.
    let marker = snapshot::OriginMarker::decode(&a.read(0, 512))
        .unwrap_or_else(|| panic!("no origin marker on the half-merged origin\n{cut}"));
    assert_eq!(marker.name.as_bytes(), b"s1");
    assert!(
        std::str::from_utf8(marker.cow.as_bytes())
            .unwrap()
            .contains("MERGE-COW-1"),
        "{marker:?}"
    );
    before
}

/// Boots with the origin and the spare disk only (the COW disk is missing), NBD served.
fn boot_without_store(a: &Image, c: &Image, port: u16) -> Qemu {
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&a.path, "MERGE-ORIGIN")
        .virtio_disk(&c.path, "MERGE-COW-2")
        .net(&[(port, NBD_PORT)], None)
        .start();
    q.wait_prompt();
    q.wait_nbd_serving();
    q
}

/// The checks on a half-merged origin whose store is missing: read-only for the console
/// and for NBD (EPERM), reads go on, no snapshot builds on it, the console says why.
fn assert_held(q: &mut Qemu, port: u16, a: &Image) {
    let t = q.transcript();
    assert!(
        t.contains("vda: half-merged from snapshot 's1', whose COW store (vdb, virtio-blk serial 'MERGE-COW-1') was not found; read-only until that store is attached"),
        "no warning at boot:\n{t}"
    );
    let head = a.read(0, 1 << 20);
    let out = q.command("write vda 100 1 --byte 0x44");
    assert!(
        out.contains("error: vda is half-merged from snapshot 's1'"),
        "{out}"
    );
    let out = q.command("snapshot create t vda vdb");
    assert!(out.contains("error: vda is half-merged"), "{out}");
    let out = q.command("snapshot create t vdb vda");
    assert!(out.contains("error: vda is half-merged"), "{out}");
    let list = q.command("snapshot list");
    assert!(
        list.contains("origin vda: half-merged from snapshot 's1'"),
        "{list}"
    );
    let json = q.command("snapshot list --json");
    assert!(
        json.contains(r#""half_merged_origins":[{"device":"vda","snapshot":"s1""#),
        "{json}"
    );
    // A read-only export: qemu-io will not open it for writing.
    let (ok, w) = qemu_io(port, "vda", &["write -P 0x55 1M 64k", "flush"]);
    assert!(
        !ok && w.contains("Permission denied"),
        "an NBD write to the half-merged origin was not refused: {w}"
    );
    let (ok, r) = qemu_io_read_only(port, "vda", &["read 1M 64k"]);
    assert!(ok && r.contains("read 65536/65536 bytes"), "{r}");
    assert!(a.read(0, 1 << 20) == head, "the half-merged origin changed");
}

#[test]
fn a_half_merged_origin_without_its_store_stays_read_only_until_it_returns() {
    let (a, b, c) = (
        Image::new("halfmerge-origin", 64 * MIB),
        Image::new("halfmerge-cow", 64 * MIB),
        Image::new("halfmerge-spare", MIB),
    );
    let before = cut_a_merge(&a, &b, &c);
    let port = free_port();
    let mut q = boot_without_store(&a, &c, port);
    assert_held(&mut q, port, &a);
    q.poweroff();

    // The store is back: the merge resumes, finishes and writes chunk 0 back; the origin is
    // the snapshot and writable again.
    let mut q = boot(&a, &b, &c);
    wait_for_any(&q, &["merge of s1 finished; snapshot removed"], TIMEOUT * 3);
    q.settle(std::time::Duration::from_millis(300));
    assert!(q.transcript().contains("merge of s1 resumed: "));
    assert!(
        !q.transcript().contains("half-merged"),
        "{}",
        q.transcript()
    );
    assert_eq!(q.checksum("vda"), sha256_hex(&before));
    assert!(q.command("write vda 100 1 --byte 0x44").contains("wrote"));
    q.poweroff();
    assert!(snapshot::OriginMarker::decode(&a.read(0, 512)).is_none());
    assert!(
        a.read(0, 4096) == before[..4096],
        "origin chunk 0 not written back"
    );
    assert_wiped(&b);
}

#[test]
fn forget_merge_gives_up_a_lost_store_and_makes_the_origin_writable() {
    let (a, b, c) = (
        Image::new("forgetmerge-origin", 64 * MIB),
        Image::new("forgetmerge-cow", 64 * MIB),
        Image::new("forgetmerge-spare", MIB),
    );
    cut_a_merge(&a, &b, &c);
    let port = free_port();
    let mut q = boot_without_store(&a, &c, port);
    let out = q.command("snapshot forget-merge vdb");
    assert!(
        out.contains("error: vdb is not a half-merged origin waiting for its store"),
        "{out}"
    );
    let out = q.command("snapshot forget-merge vda");
    assert!(
        out.contains("giving up the merge from snapshot 's1'"),
        "{out}"
    );
    assert!(out.contains("wrote"), "{out}");
    assert!(!q.command("snapshot list").contains("half-merged"));
    let (ok, w) = qemu_io(port, "vda", &["write -P 0x55 1M 64k", "flush"]);
    assert!(ok && !w.contains("failed"), "{w}");
    q.poweroff();
    assert!(a.read(0, 512).iter().all(|&x| x == 0), "marker not zeroed");
    assert!(a.read(MIB, 65536).iter().all(|&x| x == 0x55));
    // The next boot finds no marker: the origin stays writable.
    let mut q = boot_without_store(&a, &c, port);
    assert!(!q.transcript().contains("half-merged"));
    assert!(q.command("write vda 100 1 --byte 0x44").contains("wrote"));
    q.poweroff();
}
