//! The volume path: origin writes copied into snapshots, snapshot reads and writes, large
//! I/O split into device requests, merged copy writes, refusals.

use std::vec::Vec;

use drivers::block::{BlockError, BlockRequest, Fault, OpKind};

use super::harness::*;
use crate::origin::SnapState;
use crate::Target;

const MIB: usize = 1024 * 1024;

/// An origin of 2 MiB with content `A`, and a COW disk of 2 MiB.
fn world() -> (Disk, Disk, Vec<u8>) {
    let a = Disk::new("vda", "ORIGIN-A", Shape::mib(2));
    let c = Disk::new("vdb", "COW-B", Shape::mib(2));
    let before = pattern(2 * MIB, 0x11);
    a.set(&before);
    (a, c, before)
}

fn overlay(base: &mut [u8], offset: usize, data: &[u8]) {
    base[offset..offset + data.len()].copy_from_slice(data);
}

#[test]
fn origin_writes_are_copied_into_the_snapshot_first() {
    let (a, c, before) = world();
    let mut v = volumes(&[&a, &c]);
    assert_eq!(v.resolve("vda"), Some(Target::Device(0)));
    let spec = spec(&mut v, "s1", 0, 1, 4);
    let report = create(&mut v, spec);
    assert!(
        report.starts_with("created snapshot s1 (4 KiB chunks)"),
        "{report}"
    );
    let origin = origin_target(&v, 0);
    assert!(matches!(origin, Target::Volume { .. }));
    let s1 = snap_target(&v, "s1");
    // Writes that cover whole chunks, parts of chunks, and cross chunk boundaries.
    let mut now = before.clone();
    for (offset, len, salt) in [
        (0, 4096, 1u8),
        (6144, 1024, 2),
        (65536 - 512, 8192, 3),
        (1_048_576, 131_072, 4),
    ] {
        let data = pattern(len, salt);
        write(&mut v, origin, offset as u64, &data).unwrap();
        overlay(&mut now, offset, &data);
    }
    assert_eq!(read(&mut v, origin, 0, 2 * MIB).unwrap(), now);
    assert_eq!(read(&mut v, s1, 0, 2 * MIB).unwrap(), before);
    // The origin device holds the new data, the store the old chunks.
    assert_eq!(a.contents(), now);
    assert_ne!(c.bytes(0, 4), [0; 4]);
    // A second write to a copied chunk is not copied again: the snapshot still reads the
    // first contents.
    write(&mut v, origin, 0, &pattern(4096, 9)).unwrap();
    overlay(&mut now, 0, &pattern(4096, 9));
    assert_eq!(read(&mut v, s1, 0, 8192).unwrap(), before[..8192]);
    assert_eq!(read(&mut v, origin, 0, 8192).unwrap(), now[..8192]);
    // The snapshot is read-only.
    assert!(v.geometry(s1).read_only);
    assert_eq!(
        write(&mut v, s1, 0, &pattern(4096, 5)),
        Err(BlockError::ReadOnly)
    );
    assert_eq!(v.task_ios, 0);
}

#[test]
fn origin_writes_are_copied_into_two_snapshots() {
    let (a, c, before) = world();
    let d = Disk::new("vdc", "COW-C", Shape::mib(2));
    let mut v = volumes(&[&a, &c, &d]);
    let s = spec(&mut v, "s1", 0, 1, 8);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    let mut mid = before.clone();
    let b = pattern(300_032, 0x22);
    write(&mut v, origin, 100_000 - 100_000 % 512, &b).unwrap();
    overlay(&mut mid, 100_000 - 100_000 % 512, &b);
    let s = spec(&mut v, "s2", 0, 2, 16);
    let report = create(&mut v, s);
    assert!(report.contains("16 KiB chunks"), "{report}");
    // One write over chunks s1 has copied and chunks neither has.
    let mut last = mid.clone();
    let cdata = pattern(600_000 - 600_000 % 512, 0x33);
    write(&mut v, origin, 0, &cdata).unwrap();
    overlay(&mut last, 0, &cdata);
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s1"), 0, 2 * MIB).unwrap(),
        before
    );
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s2"), 0, 2 * MIB).unwrap(),
        mid
    );
    assert_eq!(read(&mut v, origin, 0, 2 * MIB).unwrap(), last);
    // The volume's interrupts count each device behind it once.
    let ints: u64 = [&a, &c, &d]
        .iter()
        .map(|x| drivers::block::BlockDevice::stats(&x.0.lock().unwrap().ram).interrupts)
        .sum();
    assert_eq!(v.interrupts(origin), ints);
    assert_eq!(v.cow_user(1), Some("s1"));
    assert_eq!(v.cow_user(2), Some("s2"));
    assert!(v.holds_store(2) && !v.holds_store(0));
}

#[test]
fn a_writable_snapshot_takes_writes_the_origin_does_not_see() {
    let (a, c, before) = world();
    let mut v = volumes(&[&a, &c]);
    let mut s = spec(&mut v, "w", 0, 1, 4);
    s.writable = true;
    create(&mut v, s);
    let snapv = snap_target(&v, "w");
    assert!(!v.geometry(snapv).read_only);
    assert!(!v.geometry(snapv).discard);
    let mut snap_now = before.clone();
    let data = pattern(20_480, 0x44);
    write(&mut v, snapv, 4096 * 3, &data).unwrap();
    overlay(&mut snap_now, 4096 * 3, &data);
    // A partial-chunk write to the snapshot keeps the rest of the chunk.
    write(&mut v, snapv, 512 * 3, &pattern(512, 0x45)).unwrap();
    overlay(&mut snap_now, 512 * 3, &pattern(512, 0x45));
    assert_eq!(read(&mut v, snapv, 0, 2 * MIB).unwrap(), snap_now);
    assert_eq!(
        read_of(&mut v, |v| origin_target(v, 0), 0, 2 * MIB).unwrap(),
        before
    );
    assert_eq!(a.contents(), before);
    flush(&mut v, snapv).unwrap();
}

#[test]
fn large_chunks_are_split_into_device_requests() {
    // Devices that take 16 KiB per request, chunks of 256 KiB: every copy, zeroing and
    // area write goes down in pieces.
    let shape = Shape {
        max_transfer: 16 * 1024,
        ..Shape::mib(4)
    };
    let a = Disk::new("vda", "A", shape);
    let c = Disk::new("vdb", "B", shape);
    let before = pattern(4 * MIB, 0x55);
    a.set(&before);
    let mut v = volumes(&[&a, &c]);
    let s = spec(&mut v, "big", 0, 1, 256);
    let report = create(&mut v, s);
    assert!(report.contains("256 KiB chunks"), "{report}");
    let origin = origin_target(&v, 0);
    let mut now = before.clone();
    for (offset, len, salt) in [
        (0, 16_384, 1u8),
        (300_000 - 300_000 % 512, 16_384, 2),
        (3 * MIB, 8192, 3),
    ] {
        let data = pattern(len, salt);
        write(&mut v, origin, offset as u64, &data).unwrap();
        overlay(&mut now, offset, &data);
    }
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "big"), 0, 4 * MIB).unwrap(),
        before
    );
    assert_eq!(read(&mut v, origin, 0, 4 * MIB).unwrap(), now);
    let writes = drivers::block::BlockDevice::stats(&c.0.lock().unwrap().ram).writes;
    assert!(
        writes > 3 * 16,
        "the copies went down in 16 KiB pieces: {writes} writes"
    );
}

#[test]
fn copy_writes_to_consecutive_cow_chunks_go_down_merged() {
    let (a, c, before) = world();
    let mut v = volumes(&[&a, &c]);
    let s = spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    // Many chunks written at once (one request each, in flight together).
    let disk = 0;
    let mut tags = Vec::new();
    let mut now = before.clone();
    for i in 0..24u64 {
        let offset = (i * 7 % 24) * 8192;
        let mut buf = v.pools[disk].acquire().unwrap();
        buf.set_len(4096).unwrap();
        let data = pattern(4096, i as u8);
        buf.as_mut_slice().copy_from_slice(&data);
        overlay(&mut now, offset as usize, &data);
        v.submit_to(
            origin,
            BlockRequest::write(100 + i, offset / 512, buf, false),
        )
        .unwrap();
        tags.push(100 + i);
    }
    let mut inbox = Inbox::default();
    while inbox.task.len() < tags.len() {
        turn(&mut v, None, &mut inbox, &mut None);
    }
    for c in inbox.task.drain(..) {
        assert_eq!(c.result, Ok(()));
        v.pools[disk].release(c.buffer.unwrap()).unwrap();
    }
    assert!(v.origins[0].merged_device_writes > 0);
    assert!(v.origins[0].merged_copy_writes > v.origins[0].merged_device_writes);
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, 2 * MIB).unwrap(),
        before
    );
    assert_eq!(read(&mut v, origin, 0, 2 * MIB).unwrap(), now);
}

/// Issue 20: copies of large chunks are not merged through a bounce buffer (a CPU copy of
/// every byte) but go down in their own copy buffers, even where the device takes a merged
/// write (here 512 KiB transfers).
#[test]
fn copy_writes_of_large_chunks_go_down_in_their_own_buffers() {
    let a = Disk::new("vda", "ORIGIN-A", Shape::mib(2));
    let c = Disk::new(
        "vdb",
        "COW-B",
        Shape {
            max_transfer: 512 * 1024,
            ..Shape::mib(2)
        },
    );
    let before = pattern(2 * MIB, 0x11);
    a.set(&before);
    let mut v = volumes(&[&a, &c]);
    let s = spec(&mut v, "s", 0, 1, 64);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    let lent_before = v.origins[0].lent_copy_ios;
    // Eight 64 KiB writes to consecutive chunks, in flight together: their copies go to
    // consecutive COW chunks.
    let mut now = before.clone();
    let mut tags = Vec::new();
    for i in 0..8u64 {
        let mut buf = v.pools[0].acquire().unwrap();
        buf.set_len(64 * 1024).unwrap();
        let data = pattern(64 * 1024, 0x40 + i as u8);
        buf.as_mut_slice().copy_from_slice(&data);
        overlay(&mut now, (i * 65_536) as usize, &data);
        v.submit_to(origin, BlockRequest::write(200 + i, i * 128, buf, false))
            .unwrap();
        tags.push(200 + i);
    }
    let mut inbox = Inbox::default();
    while inbox.task.len() < tags.len() {
        turn(&mut v, None, &mut inbox, &mut None);
    }
    for c in inbox.task.drain(..) {
        assert_eq!(c.result, Ok(()));
        v.pools[0].release(c.buffer.unwrap()).unwrap();
    }
    assert_eq!(v.origins[0].merged_device_writes, 0, "no merged copy write");
    assert!(
        v.origins[0].lent_copy_ios - lent_before >= 16,
        "each copy read and written in its copy buffer"
    );
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, 2 * MIB).unwrap(),
        before
    );
    assert_eq!(read(&mut v, origin, 0, 2 * MIB).unwrap(), now);
}

#[test]
fn a_full_store_invalidates_the_snapshot_and_the_origin_goes_on() {
    let (a, _, before) = world();
    let small = Disk::new("vdb", "COW-B", Shape::mib(1) /* 256 chunks of 4 KiB */);
    let mut v = volumes(&[&a, &small]);
    let mut s = spec(&mut v, "s", 0, 1, 4);
    s.cow_sectors = 64 * 8; // header, one area, 62 data chunks
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    let data = pattern(MIB, 0x66);
    write(&mut v, origin, 0, &data).unwrap();
    let mut now = before.clone();
    overlay(&mut now, 0, &data);
    assert_eq!(read(&mut v, origin, 0, 2 * MIB).unwrap(), now);
    assert_eq!(snap(&v, "s").unwrap().2, SnapState::Invalid);
    assert_eq!(
        v.origins[0].snap("s").unwrap().invalid,
        Some(snapshot::InvalidReason::CowFull)
    );
    // An invalid snapshot still resolves, and answers with an error.
    let st = snap_target(&v, "s");
    assert!(read(&mut v, st, 0, 4096).is_err());
}

#[test]
fn a_failing_cow_device_invalidates_the_snapshot_not_the_origin() {
    let (a, c, before) = world();
    let mut v = volumes(&[&a, &c]);
    let s = spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    c.inject(Fault {
        op: Some(OpKind::Write),
        lba: None,
        remaining: 1,
        error: BlockError::Io,
    });
    let origin = origin_target(&v, 0);
    let data = pattern(8192, 0x77);
    write(&mut v, origin, 0, &data).unwrap();
    let mut now = before.clone();
    overlay(&mut now, 0, &data);
    assert_eq!(read(&mut v, origin, 0, 8192).unwrap(), now[..8192]);
    assert_eq!(snap(&v, "s").unwrap().2, SnapState::Invalid);
    assert_eq!(
        v.origins[0].snap("s").unwrap().invalid,
        Some(snapshot::InvalidReason::CopyError)
    );
}

#[test]
fn requests_the_engine_cannot_serve_are_refused_with_their_buffer() {
    let (a, c, _) = world();
    let mut v = volumes(&[&a, &c]);
    let s = spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    let free = v.pools[0].available();
    let r = v.submit_to(origin, BlockRequest::discard(1, 0, 8));
    assert!(matches!(r, Err((BlockError::Unsupported, None))));
    let req = BlockRequest {
        tag: 1,
        op: drivers::block::Operation::Write { fua: false },
        lba: 0,
        buffer: None,
    };
    assert!(matches!(
        v.submit_to(origin, req),
        Err((BlockError::MissingBuffer, None))
    ));
    // Out of range: the engine answers with an error and the buffer comes back.
    let mut buf = v.pools[0].acquire().unwrap();
    buf.set_len(4096).unwrap();
    let c = request(&mut v, origin, BlockRequest::read(1, 4096, buf), false);
    assert!(c.result.is_err());
    v.pools[0].release(c.buffer.unwrap()).unwrap();
    assert_eq!(v.pools[0].available(), free);
    assert_eq!(v.task_ios, 0);
    // A name that is neither device nor snapshot.
    assert_eq!(v.resolve("nope"), None);
    assert_eq!(v.target_name(snap_target(&v, "s")).as_str(), "s");
    assert_eq!(v.target_name(origin).as_str(), "vda");
}

#[test]
fn nbd_writes_straight_to_a_device_are_counted_until_they_come_back() {
    let (a, c, _) = world();
    let mut v = volumes(&[&a, &c]);
    let mut buf = v.pools[0].acquire().unwrap();
    buf.set_len(4096).unwrap();
    v.submit_nbd(
        Target::Device(0),
        BlockRequest::write(nbd_tag(1), 0, buf, false),
    )
    .unwrap();
    assert_eq!(v.direct_nbd_in_flight(0), 1);
    assert_eq!(v.task_ios, 0);
    let mut inbox = Inbox::default();
    while inbox.nbd.is_empty() {
        turn(&mut v, None, &mut inbox, &mut None);
    }
    assert_eq!(v.direct_nbd_in_flight(0), 0);
    assert!(inbox.task.is_empty());
}

/// Issue 16/20: a copy is read into a copy buffer that is itself a DMA buffer lent to the
/// device, and written from it, with no bounce buffer in between; a second snapshot's write
/// of the same buffer, staged beside the first, goes through a bounce buffer and gets the
/// same bytes.
#[test]
fn copies_go_to_the_devices_in_the_copy_buffers_themselves() {
    let (a, c, before) = world();
    let d = Disk::new("vdc", "COW-C", Shape::mib(2));
    let mut v = volumes(&[&a, &c, &d]);
    let s = spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    let lent = |v: &crate::Volumes| v.origins[0].lent_copy_ios;
    let data = pattern(4096, 0x5a);
    let mut now = before.clone();
    let at = lent(&v);
    write(&mut v, origin, 40_960, &data).unwrap();
    overlay(&mut now, 40_960, &data);
    assert_eq!(
        lent(&v) - at,
        2,
        "the copy's read and write used the copy buffer"
    );
    let t = spec(&mut v, "t", 0, 2, 4);
    create(&mut v, t);
    let at_t = now.clone();
    let at = lent(&v);
    let data = pattern(4096, 0xa5);
    write(&mut v, origin, 81_920, &data).unwrap();
    overlay(&mut now, 81_920, &data);
    assert_eq!(
        lent(&v) - at,
        2,
        "the read and one of the two writes were lent"
    );
    for (name, want) in [("s", &before), ("t", &at_t)] {
        let got = read_of(&mut v, |v| snap_target(v, name), 0, 2 * MIB).unwrap();
        assert!(got == *want, "snapshot {name} reads what its origin held");
    }
    assert!(read(&mut v, origin, 0, 2 * MIB).unwrap() == now);
}

/// Issue 20: requests the engine's fast path takes (overwrites of copied chunks, reads of
/// the snapshot and of the origin) go to their device at submission, on the request's own
/// buffer; those a full device queue refuses wait and go later (more of them than the
/// origin stages of the engine's own I/O, without growing its queue: debug builds assert
/// it); each completes once, with the right data.
#[test]
fn fast_path_requests_go_to_the_device_at_submission() {
    let a = Disk::new(
        "vda",
        "ORIGIN-A",
        Shape {
            depth: 4,
            ..Shape::mib(2)
        },
    );
    let c = Disk::new("vdb", "COW-B", Shape::mib(2));
    // Only lends its buffer pool (128 buffers: the origin's holds four).
    let spare = Disk::new(
        "vdc",
        "BUFFERS",
        Shape {
            depth: 128,
            ..Shape::mib(1)
        },
    );
    let before = pattern(2 * MIB, 0x11);
    a.set(&before);
    let mut v = volumes(&[&a, &c, &spare]);
    let s = spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    let mut now = before.clone();
    // Copy the first 512 KiB (128 chunks) into the snapshot.
    let first = pattern(512 * 1024, 0x22);
    write(&mut v, origin, 0, &first).unwrap();
    overlay(&mut now, 0, &first);
    let direct = |v: &crate::Volumes| v.origins[0].direct_ios;
    let at = direct(&v);
    // A hundred 4 KiB overwrites of those chunks at once, on a queue four deep.
    let mut sent = Vec::new();
    for i in 0..100u64 {
        let data = pattern(4096, i as u8);
        let mut buf = v.pools[2].acquire().unwrap();
        buf.set_len(4096).unwrap();
        buf.as_mut_slice().copy_from_slice(&data);
        let lba = (i * 37 % 128) * 8;
        v.submit_to(origin, BlockRequest::write(100 + i, lba, buf, false))
            .unwrap();
        overlay(&mut now, lba as usize * 512, &data);
        sent.push(100 + i);
    }
    assert_eq!(direct(&v) - at, 100, "every overwrite went direct");
    let mut inbox = Inbox::default();
    for _ in 0..10_000 {
        turn(&mut v, None, &mut inbox, &mut None);
        if inbox.task.len() == sent.len() {
            break;
        }
    }
    let mut done: Vec<u64> = inbox.task.iter().map(|c| c.tag).collect();
    done.sort_unstable();
    assert_eq!(done, sent, "each completes once");
    assert!(inbox.task.iter().all(|c| c.result.is_ok()));
    v.task_ios = 0;
    assert!(
        v.devices[0].stats().queue_full > 0,
        "some waited for the queue"
    );
    // Reads of the snapshot's copied chunks and of the origin go direct too.
    let at = direct(&v);
    let snapshot = snap_target(&v, "s");
    let got = read(&mut v, snapshot, 8192, 4096).unwrap();
    assert!(got[..] == before[8192..8192 + 4096]);
    assert!(read(&mut v, origin, 0, 64 * 1024).unwrap() == now[..64 * 1024]);
    assert!(direct(&v) - at >= 2);
    let got = read_of(&mut v, |v| snap_target(v, "s"), 0, 2 * MIB).unwrap();
    assert!(got == before, "the snapshot keeps what the origin held");
    assert!(read(&mut v, origin, 0, 2 * MIB).unwrap() == now);
}
