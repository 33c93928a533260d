//! Console tasks over plain devices and volumes: what they do to the disks, what they
//! report, and that they end with every buffer back and no request in flight.

use std::string::String;
use std::vec::Vec;

use drivers::block::{BlockError, Fault, OpKind};
use sha2::{Digest, Sha256};

use super::harness::*;
use crate::extents::MarkerWriter;
use crate::hexdump::write_hexdump;
use crate::origin::SnapState;
use crate::pattern::fill_seeded;
use crate::snaptask::CreateTask;
use crate::tasks::{
    BenchLimit, BenchMode, BenchSpec, BenchTask, FlushTask, Pattern, RangeTask, Task, WriteSpec,
};
use crate::Target;

const MIB: usize = 1024 * 1024;

fn seeded(len: usize, seed: u64, offset: u64) -> Vec<u8> {
    let mut v = std::vec![0; len];
    fill_seeded(&mut v, seed, offset);
    v
}

fn spec(seed: u64) -> WriteSpec {
    WriteSpec {
        pattern: Pattern::Seed(seed),
        transfer_bytes: None,
        fua: false,
        flush_every: 0,
    }
}

fn all_buffers_back(v: &crate::Volumes) {
    for p in &v.pools {
        assert_eq!(p.available(), p.total(), "pool {} lost buffers", p.id());
    }
    assert_eq!(v.task_ios, 0);
}

#[test]
fn write_then_checksum_and_read_a_device() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let mut v = volumes(&[&a]);
    let t = Target::Device(0);
    let mut w = RangeTask::write(&v, t, 8, 1000, spec(42), now());
    let report = run(&mut v, &mut w);
    assert!(
        report.starts_with("wrote 1000 blocks (512000 bytes) to vda at LBA 8 in "),
        "{report}"
    );
    assert!(
        report
            .trim_end()
            .ends_with("transfers of up to 131072 bytes), flushed"),
        "{report}"
    );
    let expected = seeded(512_000, 42, 8 * 512);
    assert_eq!(a.bytes(8 * 512, 512_000), expected);
    // The closing flush made it durable.
    assert_eq!(
        a.0.lock().unwrap().durable[8 * 512..8 * 512 + 512_000],
        expected[..]
    );
    let mut c = RangeTask::checksum(&v, t, 8, 1000, now());
    let report = run(&mut v, &mut c);
    let digest: String = Sha256::digest(&expected)
        .iter()
        .map(|b| std::format!("{b:02x}"))
        .collect();
    assert_eq!(
        report,
        std::format!("{digest}  vda LBA 8 count 1000 (512000 bytes)\n")
    );
    let mut r = RangeTask::read(&v, t, 9, 2, now());
    let report = run(&mut v, &mut r);
    let mut want = String::new();
    write_hexdump(&mut want, &expected[512..1536], 9 * 512).unwrap();
    assert_eq!(report, want);
    all_buffers_back(&v);
}

#[test]
fn a_write_with_fua_and_checkpoints_reports_what_is_durable() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let mut v = volumes(&[&a]);
    let spec = WriteSpec {
        pattern: Pattern::Byte(0xAB),
        transfer_bytes: Some(4096),
        fua: true,
        flush_every: 64,
    };
    let mut w = RangeTask::write(&v, Target::Device(0), 0, 200, spec, now());
    assert_eq!(w.transfer_bytes(), 4096);
    let mut notices = Vec::new();
    let mut inbox = Inbox::default();
    while !(w.done() && v.task_ios == 0) {
        turn(&mut v, Some(&mut w), &mut inbox, &mut None);
        let mut n = String::new();
        w.notice(&mut n).unwrap();
        if !n.is_empty() {
            notices.push(n);
        }
    }
    assert_eq!(
        notices,
        [
            "vda: durable through LBA 64",
            "vda: durable through LBA 128",
            "vda: durable through LBA 192",
            "vda: durable through LBA 200"
        ]
    );
    let mut report = String::new();
    w.report(&mut report, now()).unwrap();
    assert!(
        report.contains("transfers of up to 4096 bytes, FUA), flushed"),
        "{report}"
    );
    assert!(a.bytes(0, 200 * 512).iter().all(|&b| b == 0xAB));
    all_buffers_back(&v);
}

#[test]
fn a_failing_write_stops_at_its_lba_and_gives_every_buffer_back() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    a.inject(Fault {
        op: Some(OpKind::Write),
        lba: Some(256..300),
        remaining: 1,
        error: BlockError::Io,
    });
    let mut v = volumes(&[&a]);
    let spec = WriteSpec {
        transfer_bytes: Some(8192),
        ..spec(1)
    };
    let mut w = RangeTask::write(&v, Target::Device(0), 0, 1024, spec, now());
    let report = run(&mut v, &mut w);
    assert!(
        report.starts_with("error: vda: I/O failed at LBA 256: "),
        "{report}"
    );
    all_buffers_back(&v);
    // A checksum that hits an error reports it too, with its parked buffers released.
    a.inject(Fault {
        op: Some(OpKind::Read),
        lba: Some(100..101),
        remaining: 1,
        error: BlockError::Io,
    });
    let mut c = RangeTask::checksum(&v, Target::Device(0), 0, 1024, now());
    let report = run(&mut v, &mut c);
    assert!(
        report.starts_with("error: vda: I/O failed at LBA "),
        "{report}"
    );
    all_buffers_back(&v);
}

#[test]
fn a_cancelled_task_waits_for_its_requests() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let mut v = volumes(&[&a]);
    let mut w = RangeTask::write(&v, Target::Device(0), 0, 2048, spec(3), now());
    let mut inbox = Inbox::default();
    turn(&mut v, Some(&mut w), &mut inbox, &mut None);
    assert!(v.task_ios > 0);
    w.cancel();
    assert!(!w.done(), "requests are in flight");
    let report = run(&mut v, &mut w);
    assert!(report.starts_with("error: cancelled after "), "{report}");
    all_buffers_back(&v);
}

#[test]
fn flush_reports_success_and_failure() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let mut v = volumes(&[&a]);
    let mut f = FlushTask::new(&v, Target::Device(0), now());
    assert!(run(&mut v, &mut f).starts_with("flushed vda in "));
    a.inject(Fault {
        op: Some(OpKind::Flush),
        lba: None,
        remaining: 1,
        error: BlockError::Io,
    });
    let mut f = FlushTask::new(&v, Target::Device(0), now());
    let report = run(&mut v, &mut f);
    assert!(report.starts_with("error: vda: flush failed: "), "{report}");
}

fn bench(
    v: &crate::Volumes,
    t: Target,
    mode: BenchMode,
    ios: u64,
    fsync: Option<u64>,
) -> BenchTask {
    let spec = BenchSpec {
        mode,
        bs: 4096,
        qd: 8,
        limit: BenchLimit::Ios(ios),
        blocks: 2048,
        seed: 7,
        random_map: true,
        fsync,
    };
    BenchTask::new(v, t, spec, now())
}

#[test]
fn bench_runs_its_ios_on_a_device_and_through_a_snapshot_origin() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(2));
    let mut v = volumes(&[&a, &c]);
    let mut b = bench(&v, Target::Device(0), BenchMode::RandRead, 300, None);
    assert_eq!(b.depth(), 8);
    let report = run(&mut v, &mut b);
    assert!(
        report.starts_with("bench vda rw=randread bs=4096 qd=8: 300 I/Os in "),
        "{report}"
    );
    assert!(!report.contains("error"), "{report}");
    let s = super::harness::spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    let mut b = bench(&v, origin, BenchMode::RandWrite, 256, Some(50));
    let report = run(&mut v, &mut b);
    assert!(
        report.starts_with("bench vda rw=randwrite bs=4096 qd=8: 256 I/Os in "),
        "{report}"
    );
    // 256 writes with a flush after each 50 (fio's fsync=50: none for the last 6).
    assert!(report.contains("flushes 5 (every 50 writes)"), "{report}");
    // The random map visits each 4 KiB block once: every chunk copied, the snapshot whole.
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, MIB).unwrap(),
        std::vec![0; MIB]
    );
    all_buffers_back(&v);
}

#[test]
fn bench_stops_at_the_first_error() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    a.inject(Fault {
        op: Some(OpKind::Read),
        lba: None,
        remaining: 1,
        error: BlockError::Io,
    });
    let mut v = volumes(&[&a]);
    let mut b = bench(&v, Target::Device(0), BenchMode::Read, 1000, None);
    let report = run(&mut v, &mut b);
    assert!(report.contains("error: 1 I/O errors, first: "), "{report}");
    assert!(!report.contains(": 1000 I/Os"), "{report}");
    all_buffers_back(&v);
}

#[test]
fn create_in_a_region_writes_free_extent_markers_before_the_store() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let b = Disk::new("vdb", "B", Shape::mib(1));
    let c = Disk::new("vdc", "C", Shape::mib(4));
    let mut v = volumes(&[&a, &b, &c]);
    let mut s1 = super::harness::spec(&mut v, "s1", 0, 2, 4);
    (s1.cow_start, s1.cow_sectors) = (2048, 1024);
    create(&mut v, s1);
    // The gap before the region got a marker naming it.
    let m = snapshot::format::FreeExtent::decode(&c.bytes(0, 512)).expect("marker at 0");
    assert_eq!((m.start, m.sectors), (0, 2048));
    let mut s2 = super::harness::spec(&mut v, "s2", 1, 2, 4);
    (s2.cow_start, s2.cow_sectors) = (6144, 1024);
    let report = create(&mut v, s2);
    assert!(report.starts_with("created snapshot s2"), "{report}");
    let m = snapshot::format::FreeExtent::decode(&c.bytes(3072 * 512, 512)).expect("marker");
    assert_eq!((m.start, m.sectors), (3072, 3072));
    // Deleting s1 leaves a gap at 0 that still leads to s2.
    let report = delete(&mut v, "s1");
    assert!(report.starts_with("deleted snapshot s1"), "{report}");
    let m = snapshot::format::FreeExtent::decode(&c.bytes(0, 512)).expect("marker at 0");
    assert_eq!((m.start, m.sectors), (0, 6144));
    // A marker writer with nothing to write is done at once.
    let mut v2 = volumes(&[&a]);
    let mw = MarkerWriter::new(&v2, 0, None);
    assert!(mw.done());
    let _ = &mut v2;
}

#[test]
fn create_refused_by_the_engine_resumes_the_origin() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let mut v = volumes(&[&a, &c]);
    let mut s = super::harness::spec(&mut v, "bad", 0, 1, 4);
    s.chunk_sectors = 3; // not a power of two
    let report = create(&mut v, s);
    assert_eq!(
        report,
        "error: snapshot bad: the engine refused the store (chunk size or COW size)\n"
    );
    assert!(v.origins[0].snaps.is_empty() && !v.origins[0].creating);
    assert!(!v.origins[0].engine.is_quiesced());
    write(&mut v, Target::Device(0), 0, &pattern(4096, 1)).unwrap();
}

#[test]
fn create_fails_cleanly_when_the_store_cannot_be_written() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    c.inject(Fault {
        op: Some(OpKind::Write),
        lba: None,
        remaining: 1,
        error: BlockError::Io,
    });
    let mut v = volumes(&[&a, &c]);
    let s = super::harness::spec(&mut v, "s", 0, 1, 4);
    let report = create(&mut v, s);
    assert_eq!(
        report,
        "error: snapshot s: initialising the COW store failed (I/O error)\n"
    );
    assert!(v.resolve("s").is_none());
    let mut inbox = Inbox::default();
    turn(&mut v, None, &mut inbox, &mut None);
    assert!(v.origins[0].snaps.is_empty(), "the failed entry is swept");
}

#[test]
fn create_waits_for_nbd_writes_sent_straight_to_the_origin() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let before = pattern(MIB, 0x30);
    a.set(&before);
    let mut v = volumes(&[&a, &c]);
    let s = super::harness::spec(&mut v, "s", 0, 1, 4);
    let mut task = CreateTask::new(s, now());
    // An NBD write went straight to the device before the snapshot: its completion is
    // held back (not polled) while the task runs.
    let mut buf = v.pools[0].acquire().unwrap();
    buf.set_len(4096).unwrap();
    buf.as_mut_slice().fill(0x99);
    v.submit_nbd(
        Target::Device(0),
        drivers::block::BlockRequest::write(nbd_tag(1), 0, buf, false),
    )
    .unwrap();
    task.step(&mut v, now());
    task.step(&mut v, now());
    let mut line = String::new();
    task.progress(&mut line, now()).unwrap();
    assert_eq!(line, "creating snapshot s: waiting for 1 NBD write(s) sent to the origin before it (Ctrl-C gives up)");
    assert!(
        v.origins[0].snaps.is_empty(),
        "no snapshot before the write is back"
    );
    run(&mut v, &mut task);
    assert_eq!(snap(&v, "s").unwrap().2, SnapState::Active);
    // The snapshot has the NBD write: it landed before the snapshot was taken.
    let got = read_of(&mut v, |v| snap_target(v, "s"), 0, 4096).unwrap();
    assert_eq!(got, std::vec![0x99; 4096]);
}

#[test]
fn create_gives_up_on_ctrl_c_while_the_origin_drains() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let mut v = volumes(&[&a, &c]);
    let s = super::harness::spec(&mut v, "s", 0, 1, 4);
    let mut task = CreateTask::new(s, now());
    v.direct_nbd[0] = 1; // an NBD write that never comes back
    for _ in 0..3 {
        task.step(&mut v, now());
    }
    task.cancel();
    let report = run(&mut v, &mut task);
    assert_eq!(
        report,
        "error: snapshot s: cancelled while waiting for the origin's I/O in flight\n"
    );
    assert!(v.origins[0].snaps.is_empty() && !v.origins[0].creating);
}

#[test]
fn delete_wipes_the_store_and_the_origin_is_plain_again() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let mut v = volumes(&[&a, &c]);
    let s = super::harness::spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    {
        let o = origin_target(&v, 0);
        write(&mut v, o, 0, &pattern(8192, 1)).unwrap();
    }
    assert_eq!(&c.bytes(0, 4), &snapshot::format::SNAP_MAGIC.to_le_bytes());
    let report = delete(&mut v, "s");
    assert_eq!(
        report,
        "deleted snapshot s (its COW store is invalidated and wiped)\n"
    );
    assert!(v.resolve("s").is_none());
    assert_eq!(v.resolve("vda"), Some(Target::Device(0)));
    assert!(!v.holds_store(1));
    assert_ne!(&c.bytes(0, 4), &snapshot::format::SNAP_MAGIC.to_le_bytes());
}

#[test]
fn delete_reports_a_store_it_could_not_wipe() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let mut v = volumes(&[&a, &c]);
    let s = super::harness::spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    c.inject(Fault {
        op: Some(OpKind::Write),
        lba: Some(0..1),
        remaining: 10,
        error: BlockError::Io,
    });
    let report = delete(&mut v, "s");
    assert!(
        report.starts_with("error: snapshot s: deleted, but "),
        "{report}"
    );
    assert!(v.resolve("s").is_none());
}

#[test]
fn merge_rolls_the_origin_back_and_keeps_the_other_snapshot() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let d = Disk::new("vdc", "C", Shape::mib(1));
    let before = pattern(MIB, 0x40);
    a.set(&before);
    let mut v = volumes(&[&a, &c, &d]);
    let s = super::harness::spec(&mut v, "old", 0, 1, 4);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    let mut mid = before.clone();
    let data = pattern(200 * 1024, 1);
    write(&mut v, origin, 64 * 1024, &data).unwrap();
    mid[64 * 1024..264 * 1024].copy_from_slice(&data);
    let s = super::harness::spec(&mut v, "new", 0, 2, 4);
    create(&mut v, s);
    write(&mut v, origin, 128 * 1024, &pattern(300 * 1024, 2)).unwrap();
    let mut m = merge_task(&mut v, "old");
    let mut inbox = Inbox::default();
    let mut progress = String::new();
    for _ in 0..4 {
        turn(&mut v, Some(&mut m), &mut inbox, &mut None);
    }
    m.progress(&mut progress, now()).unwrap();
    assert!(
        progress.starts_with("merging old into vda")
            || progress.starts_with("starting the merge of old"),
        "{progress}"
    );
    // The merging snapshot's own volume is gone while it merges.
    assert!(v.resolve("old").is_none());
    let report = run(&mut v, &mut m);
    assert!(report.starts_with("merged old into vda: "), "{report}");
    settle(&mut v);
    assert!(snap(&v, "old").is_none());
    assert_eq!(
        read_of(&mut v, |v| origin_target(v, 0), 0, MIB).unwrap(),
        before
    );
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "new"), 0, MIB).unwrap(),
        mid
    );
    all_buffers_back(&v);
}

#[test]
fn merge_ctrl_c_leaves_it_running_in_the_background() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let before = pattern(MIB, 0x50);
    a.set(&before);
    let mut v = volumes(&[&a, &c]);
    let s = super::harness::spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    {
        let o = origin_target(&v, 0);
        write(&mut v, o, 0, &pattern(MIB / 2, 3)).unwrap();
    }
    let mut m = merge_task(&mut v, "s");
    let mut inbox = Inbox::default();
    for _ in 0..3 {
        turn(&mut v, Some(&mut m), &mut inbox, &mut None);
    }
    m.cancel();
    let report = run(&mut v, &mut m);
    assert_eq!(
        report,
        "merge of s goes on in the background (see 'snapshot status s')\n"
    );
    assert!(v.origins[0]
        .merge_view(snap(&v, "s").unwrap().1, now())
        .is_some());
    settle(&mut v);
    assert_eq!(
        read_of(&mut v, |v| origin_target(v, 0), 0, MIB).unwrap(),
        before
    );
}

#[test]
fn merge_of_a_snapshot_with_io_in_flight_or_invalid_is_refused() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let mut v = volumes(&[&a, &c]);
    let mut s = super::harness::spec(&mut v, "s", 0, 1, 4);
    s.cow_sectors = 4 * 8;
    create(&mut v, s);
    // Fill the tiny store: the snapshot goes invalid.
    {
        let o = origin_target(&v, 0);
        write(&mut v, o, 0, &pattern(64 * 1024, 1)).unwrap();
    }
    assert_eq!(snap(&v, "s").unwrap().2, SnapState::Invalid);
    let mut m = merge_task(&mut v, "s");
    let report = run(&mut v, &mut m);
    assert_eq!(
        report,
        "error: snapshot s: the snapshot is invalid; its contents are not whole\n"
    );
}

#[test]
fn rename_and_set_writable_rewrite_the_binding_and_survive_a_reboot() {
    use crate::snaptask::{Rebind, RebindTask};
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let before = pattern(MIB, 0x70);
    a.set(&before);
    let mut v = volumes(&[&a, &c]);
    let s = super::harness::spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    let (origin, id, _) = snap(&v, "s").unwrap();
    let mut t = RebindTask::new("s".into(), origin, id, Rebind::Rename("t".into()));
    assert_eq!(run(&mut v, &mut t), "renamed snapshot s to t\n");
    assert!(v.resolve("s").is_none());
    let mut t = RebindTask::new("t".into(), origin, id, Rebind::Writable(true));
    assert_eq!(run(&mut v, &mut t), "snapshot t is writable\n");
    let tv = snap_target(&v, "t");
    assert!(!v.geometry(tv).read_only);
    write(&mut v, tv, 0, &pattern(4096, 1)).unwrap();
    // A binding write that fails changes nothing.
    c.inject(Fault {
        op: Some(OpKind::Write),
        lba: Some(0..1),
        remaining: 1,
        error: BlockError::Io,
    });
    let mut t = RebindTask::new("t".into(), origin, id, Rebind::Rename("u".into()));
    assert_eq!(
        run(&mut v, &mut t),
        "error: snapshot t: writing the binding failed (I/O error); nothing changed\n"
    );
    assert!(v.resolve("t").is_some() && v.resolve("u").is_none());
    flush(&mut v, tv).unwrap();
    let mut v = volumes(&[&a.rebooted(a.contents()), &c.rebooted(c.contents())]);
    discover(&mut v);
    let s = v.origins[0].snap("t").expect("found under its new name");
    assert!(s.writable);
    let mut expected = before.clone();
    expected[..4096].copy_from_slice(&pattern(4096, 1));
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "t"), 0, MIB).unwrap(),
        expected
    );
}

#[test]
fn extend_grows_a_store_so_it_does_not_overflow_and_the_size_survives_a_reboot() {
    use crate::snaptask::ExtendTask;
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdc", "C", Shape::mib(4));
    let before = pattern(MIB, 0x71);
    a.set(&before);
    let mut v = volumes(&[&a, &c]);
    let mut s = super::harness::spec(&mut v, "s", 0, 1, 4);
    s.cow_sectors = 64 * 8; // 62 data chunks: 248 KiB of copies
    create(&mut v, s);
    let (origin, id, _) = snap(&v, "s").unwrap();
    let o = origin_target(&v, 0);
    write(&mut v, o, 0, &pattern(128 * 1024, 1)).unwrap();
    let mut t = ExtendTask::new("s".into(), origin, id, 1, 0, 4096);
    let report = run(&mut v, &mut t);
    assert!(
        report.starts_with("extended snapshot s to 2 MiB ("),
        "{report}"
    );
    assert_eq!(v.origins[0].snap("s").unwrap().cow_sectors, 4096);
    // 640 KiB more: far past the old end, within the new one.
    write(&mut v, o, 128 * 1024, &pattern(640 * 1024, 2)).unwrap();
    assert_eq!(snap(&v, "s").unwrap().2, SnapState::Active);
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, MIB).unwrap(),
        before
    );
    flush(&mut v, o).unwrap();
    let mut v = volumes(&[&a.rebooted(a.contents()), &c.rebooted(c.contents())]);
    discover(&mut v);
    assert_eq!(v.origins[0].snap("s").unwrap().cow_sectors, 4096);
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, MIB).unwrap(),
        before
    );
}

#[test]
fn autoextend_grows_a_filling_store_while_there_is_room_then_says_so() {
    use crate::snaptask::{Rebind, RebindTask};
    use snapshot::format::{AutoExtend, ExtendBy};
    let a = Disk::new("vda", "A", Shape::mib(2));
    let c = Disk::new("vdc", "C", Shape::mib(1));
    let before = pattern(2 * MIB, 0x72);
    a.set(&before);
    let mut v = volumes(&[&a, &c]);
    let mut s = super::harness::spec(&mut v, "s", 0, 1, 4);
    s.cow_sectors = 64 * 8;
    create(&mut v, s);
    let (origin, id, _) = snap(&v, "s").unwrap();
    let policy = AutoExtend {
        threshold: 50,
        by: ExtendBy::Percent(100),
    };
    let mut t = RebindTask::new("s".into(), origin, id, Rebind::AutoExtend(Some(policy)));
    assert_eq!(
        run(&mut v, &mut t),
        "snapshot s: auto-extend at 50% by 100%\n"
    );
    let o = origin_target(&v, 0);
    // 64 KiB at a time: the store doubles each time it passes half full.
    for i in 0..10u64 {
        write(&mut v, o, i * 65536, &pattern(65536, i as u8)).unwrap();
    }
    let s = v.origins[0].snap("s").unwrap();
    assert_eq!(s.state, SnapState::Active);
    // 64 → 128 → 256 chunks: the whole device; past half full again, with no room left.
    assert_eq!(s.cow_sectors, 2048);
    assert!(s.auto_blocked);
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, 640 * 1024).unwrap(),
        before[..640 * 1024]
    );
    // The device is 1 MiB: once the store reaches its end, auto-extend has no room.
    for i in 10..32u64 {
        let _ = write(&mut v, o, i * 65536, &pattern(65536, i as u8));
    }
    let s = v.origins[0].snap("s").unwrap();
    assert_eq!(s.cow_sectors, 2048);
    assert!(s.auto_blocked || s.state == SnapState::Invalid);
    assert_eq!(
        s.state,
        SnapState::Invalid,
        "full: invalidated as without auto-extend"
    );
}
