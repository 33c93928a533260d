//! Boot discovery of good, corrupt and crafted disks, `snapshot attach`, half-merged
//! origins.

use std::string::String;
use std::vec::Vec;

use snapshot::format::{FreeExtent, Header, BINDING_MAGIC};
use snapshot::{Binding, BoundedBytes, OriginId, OriginMarker};

use super::harness::*;
use crate::discover::DiscoverTask;
use crate::origin::SnapState;
use crate::{Target, Volumes};

const MIB: usize = 1024 * 1024;

/// vda (origin, 1 MiB, content `before`) with snapshot `s` on vdb (1 MiB), origin changed
/// after it; shut down cleanly. Returns the disks and (snapshot, origin) contents.
fn one_snapshot(writable: bool) -> (Disk, Disk, Vec<u8>, Vec<u8>) {
    let a = Disk::new("vda", "ORIGIN", Shape::mib(1));
    let c = Disk::new("vdb", "COW", Shape::mib(1));
    let before = pattern(MIB, 0x61);
    a.set(&before);
    let mut v = volumes(&[&a, &c]);
    let mut s = spec(&mut v, "s", 0, 1, 4);
    s.writable = writable;
    create(&mut v, s);
    let o = origin_target(&v, 0);
    write(&mut v, o, 40_960, &pattern(65_536, 2)).unwrap();
    flush(&mut v, o).unwrap();
    let after = a.contents();
    (
        a.rebooted(a.contents()),
        c.rebooted(c.contents()),
        before,
        after,
    )
}

fn unserved_why(v: &crate::Volumes) -> String {
    v.unserved
        .iter()
        .map(|u| u.why.clone())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// `disks` booted (discovery), and why the store found is not served.
fn boot_unserved(disks: &[&Disk]) -> (Volumes, String) {
    let mut v = volumes(disks);
    discover(&mut v);
    let why = unserved_why(&v);
    (v, why)
}

/// The binding `snapshot attach NAME` writes for a 1 MiB origin named by `serial`.
fn attach_binding(name: &[u8], serial: &[u8]) -> Binding {
    Binding {
        name: BoundedBytes::new(name).unwrap(),
        origin_serial: BoundedBytes::new(serial).unwrap(),
        origin_sectors: 2048,
        chunk_sectors: 0,
        created_unix_seconds: 0,
        region_start: 0,
        region_sectors: 0,
        flags: 0,
        origin_id: OriginId::Serial,
    }
}

#[test]
fn a_good_store_comes_back_under_its_name() {
    let (a, c, before, after) = one_snapshot(true);
    let mut v = volumes(&[&a, &c]);
    let report = discover(&mut v);
    assert_eq!(
        report,
        "1 snapshot(s) back from their stores (see 'snapshot list')\n"
    );
    let (_, _, state) = snap(&v, "s").unwrap();
    assert_eq!(state, SnapState::Active);
    let s = &v.origins[0].snaps[0];
    assert!(s.writable && s.chunk_sectors == 8 && s.cow_disk == 1 && s.cow_start == 0);
    // The binding recorded when it was taken.
    let b = v.origins[0].engine.binding(s.id).unwrap();
    assert_eq!(b.created_unix_seconds, UNIX_NOW);
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, MIB).unwrap(),
        before
    );
    assert_eq!(
        read_of(&mut v, |v| origin_target(v, 0), 0, MIB).unwrap(),
        after
    );
    assert!(v.unserved.is_empty() && v.held.is_empty());
    // Origin writes after the boot are copied as before.
    let o = origin_target(&v, 0);
    write(&mut v, o, 0, &pattern(4096, 9)).unwrap();
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, 4096).unwrap(),
        before[..4096]
    );
    // Instances are new numbers at each find.
    assert!(v.origins[0].snaps[0].instance >= 1);
}

#[test]
fn a_device_without_a_store_is_left_alone() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    a.set(&pattern(MIB, 1));
    let mut v = volumes(&[&a]);
    assert_eq!(discover(&mut v), "");
    assert!(v.origins.is_empty() && v.unserved.is_empty());
}

#[test]
fn stores_in_regions_are_found_through_free_extent_markers() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let b = Disk::new("vdb", "B", Shape::mib(1));
    let c = Disk::new("vdc", "C", Shape::mib(4));
    a.set(&pattern(MIB, 1));
    b.set(&pattern(MIB, 2));
    let mut v = volumes(&[&a, &b, &c]);
    let mut s1 = spec(&mut v, "s1", 0, 2, 4);
    (s1.cow_start, s1.cow_sectors) = (2048, 1024);
    create(&mut v, s1);
    let mut s2 = spec(&mut v, "s2", 1, 2, 8);
    (s2.cow_start, s2.cow_sectors) = (6144, 2048);
    create(&mut v, s2);
    let boot = |c: &Disk| {
        let (a2, b2, c2) = (
            a.rebooted(a.contents()),
            b.rebooted(b.contents()),
            c.rebooted(c.contents()),
        );
        let mut v = volumes(&[&a2, &b2, &c2]);
        let report = discover(&mut v);
        (v, report)
    };
    let (v2, report) = boot(&c);
    assert!(
        report.starts_with("2 snapshot(s) back"),
        "{report} {}",
        unserved_why(&v2)
    );
    let s2 = &v2.origins.iter().find(|o| o.disk == 1).unwrap().snaps[0];
    assert_eq!(
        (
            s2.name.as_str(),
            s2.cow_start,
            s2.cow_sectors,
            s2.chunk_sectors
        ),
        ("s2", 6144, 2048, 16)
    );
    // Without the marker in the gap between the stores, the walk stops before the second.
    c.poke(3072 * 512, &[0; 512]);
    let (v3, report) = boot(&c);
    assert!(report.starts_with("1 snapshot(s) back"), "{report}");
    assert!(snap(&v3, "s1").is_some() && snap(&v3, "s2").is_none());
    // A marker that does not start where it is found ends the walk too.
    let mut block = [0u8; 512];
    FreeExtent {
        start: 3000,
        sectors: 3072,
    }
    .encode(&mut block);
    c.poke(3072 * 512, &block);
    let (v4, _) = boot(&c);
    assert!(snap(&v4, "s2").is_none());
}

#[test]
fn stores_with_chunks_too_large_are_refused_before_anything_is_read() {
    for (chunk_sectors, expected) in [
        (
            2048u32,
            "its chunk size (1024 KiB) is above the largest served (512 KiB)",
        ),
        (1 << 30, "BadChunkSize(1073741824)"),
        (3, "BadChunkSize(3)"),
    ] {
        let (a, c, _, _) = one_snapshot(false);
        // The header's chunk size (bytes 12..16).
        c.poke(12, &chunk_sectors.to_le_bytes());
        let (v, why) = boot_unserved(&[&a, &c]);
        assert!(
            why.starts_with("a snapshot store that does not load: "),
            "{why}"
        );
        assert!(why.contains(expected), "{why}");
        // The head block, then the chunk 0 the loader asks for first: nothing sized by the
        // bad chunk size was read.
        let reads = drivers::block::BlockDevice::stats(&c).reads;
        assert!(reads <= 2, "{reads} reads");
        assert!(v.origins.iter().all(|o| o.snaps.is_empty()));
        assert!(v.holds_store(1));
    }
}

#[test]
fn stores_without_or_with_a_broken_binding_are_listed_not_served() {
    // A store Linux made: a header and nothing of ours.
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdb", "B", Shape::mib(1));
    let mut block = [0u8; 512];
    Header::new(8).encode(&mut block);
    c.poke(0, &block);
    let mut v = volumes(&[&a, &c]);
    discover(&mut v);
    assert_eq!(
        unserved_why(&v),
        "a dm-snapshot store without a snapfw binding (made by Linux?); not served"
    );
    assert!(v.holds_store(1) && !v.holds_store(0));
    // Our store with its binding record damaged.
    let (a, c, _, _) = one_snapshot(false);
    let chunk0 = c.bytes(0, 4096);
    let at = chunk0
        .windows(8)
        .position(|w| w == BINDING_MAGIC)
        .expect("binding");
    c.poke(at + 12, &[0xFF; 40]);
    let (_, why) = boot_unserved(&[&a, &c]);
    assert!(
        why.starts_with("a dm-snapshot store whose binding record is unreadable"),
        "{why}"
    );
}

#[test]
fn a_store_whose_metadata_does_not_load_is_left_untouched() {
    let (a, c, _, _) = one_snapshot(false);
    // The first metadata area (chunk 1): exceptions pointing far outside the store.
    c.poke(4096, &[0xEE; 64]);
    let image = c.contents();
    let (_, why) = boot_unserved(&[&a, &c]);
    assert!(
        why.starts_with("a snapshot store that does not load: "),
        "{why}"
    );
    assert!(why.ends_with("; left untouched"), "{why}");
    assert_eq!(c.contents(), image, "nothing written");
}

#[test]
fn a_missing_or_resized_origin_leaves_the_store_untouched() {
    let (_, c, _, _) = one_snapshot(false);
    let other = Disk::new("vda", "SOMEONE-ELSE", Shape::mib(1));
    let (_, why) = boot_unserved(&[&other, &c]);
    assert!(
        why.starts_with("snapshot 's': its origin (")
            && why.ends_with("is missing; store left untouched"),
        "{why}"
    );
    let resized = Disk::new("vda", "ORIGIN", Shape::mib(2));
    let (_, why) = boot_unserved(&[&resized, &c]);
    assert!(why.contains("(serial 'ORIGIN', 2048 sectors) is vda but that has 4096 sectors; store left untouched"), "{why}");
}

#[test]
fn an_ambiguous_origin_waits_for_attach() {
    let (a, c, before, _) = one_snapshot(false);
    let twin = Disk::new("vdc", "ORIGIN", Shape::mib(1));
    let (mut v, why) = boot_unserved(&[&a, &c, &twin]);
    assert!(
        why.contains(
            "is ambiguous: it could be vda, vdc; waiting for 'snapshot attach s ORIGIN COW'"
        ),
        "{why}"
    );
    assert!(snap(&v, "s").is_none());
    // `snapshot attach s vda vdb --no-write`: read-only, until reboot; the disk unchanged.
    let image = c.contents();
    let binding = attach_binding(b"mine", b"ORIGIN");
    v.unserved.retain(|u| u.disk != 1);
    let mut t = DiscoverTask::adopt(1, 0, binding.clone(), false);
    let report = run(&mut v, &mut t);
    assert_eq!(
        report,
        "attached snapshot mine (the store on disk is unchanged; until reboot)\n"
    );
    assert_eq!(c.contents(), image);
    let st = snap_target(&v, "mine");
    assert!(v.geometry(st).read_only);
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "mine"), 0, MIB).unwrap(),
        before
    );
    // With the binding written, it comes back by itself once the twin is gone.
    let (a2, c2) = (a.rebooted(a.contents()), c.rebooted(c.contents()));
    let mut v = volumes(&[&a2, &c2, &twin]);
    discover(&mut v);
    v.unserved.retain(|u| u.disk != 1);
    let mut t = DiscoverTask::adopt(1, 0, binding, true);
    let report = run(&mut v, &mut t);
    assert!(
        report.starts_with("attached snapshot mine; its binding is written"),
        "{report}"
    );
    let mut v = volumes(&[&a2.rebooted(a2.contents()), &c2.rebooted(c2.contents())]);
    let report = discover(&mut v);
    assert!(report.starts_with("1 snapshot(s) back"), "{report}");
    assert!(snap(&v, "mine").is_some());
}

#[test]
fn attach_refuses_a_device_without_a_store() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let b = Disk::new("vdb", "B", Shape::mib(1));
    let mut v = volumes(&[&a, &b]);
    let binding = attach_binding(b"x", b"A");
    let mut t = DiscoverTask::adopt(1, 0, binding, true);
    let report = run(&mut v, &mut t);
    assert_eq!(
        report,
        "error: snapshot x: there is no dm-snapshot store on that device (no SnAp header)\n"
    );
    assert!(v.origins.iter().all(|o| o.snaps.is_empty()));
}

#[test]
fn a_store_found_away_from_where_its_binding_places_it_is_left_alone() {
    let a = Disk::new("vda", "A", Shape::mib(1));
    let c = Disk::new("vdc", "C", Shape::mib(2));
    let mut v = volumes(&[&a, &c]);
    let mut s = spec(&mut v, "s", 0, 1, 4);
    (s.cow_start, s.cow_sectors) = (1024, 1024);
    create(&mut v, s);
    // Move the store's first chunk to sector 0 (as a copy of the region would).
    let chunk0 = c.bytes(1024 * 512, 4096);
    let c2 = c.rebooted(c.contents());
    c2.poke(0, &chunk0);
    let (_, why) = boot_unserved(&[&a.rebooted(a.contents()), &c2]);
    assert!(why.contains("a store whose binding places it at sector 1024 (+1024), found at sector 0; left untouched"), "{why}");
}

/// vda half-merged from snapshot `s` on vdb: the merge ran until the origin marker was
/// durable, then the power was cut (nothing volatile kept).
fn half_merged() -> (Disk, Disk, Vec<u8>) {
    let (a, c, before, _) = one_snapshot(false);
    let mut v = volumes(&[&a, &c]);
    discover(&mut v);
    let mut m = merge_task(&mut v, "s");
    let mut inbox = Inbox::default();
    for _ in 0..10_000 {
        if OriginMarker::decode(&a.0.lock().unwrap().durable[..512]).is_some() {
            break;
        }
        turn(&mut v, Some(&mut m), &mut inbox, &mut Some(1));
    }
    assert!(OriginMarker::decode(&a.0.lock().unwrap().durable[..512]).is_some());
    (
        a.rebooted(a.crash_image(0, 0)),
        c.rebooted(c.crash_image(0, 0)),
        before,
    )
}

#[test]
fn a_half_merged_origin_without_its_store_is_read_only() {
    let (a, _, _) = half_merged();
    let empty = Disk::new("vdb", "COW", Shape::mib(1));
    let mut v = volumes(&[&a, &empty]);
    discover(&mut v);
    let h = v.held(0).expect("held");
    let why = h.why();
    assert!(
        why.starts_with("half-merged from snapshot 's', whose COW store (vdb, ramdisk"),
        "{why}"
    );
    assert!(
        why.contains("read-only until that store is attached"),
        "{why}"
    );
    assert!(v.geometry(Target::Device(0)).read_only);
    assert!(v.holds_store(0));
    assert!(v.origins.is_empty());
}

#[test]
fn a_half_merged_origin_with_its_store_resumes_and_is_released() {
    let (a, c, before) = half_merged();
    let mut v = volumes(&[&a, &c]);
    discover(&mut v);
    assert!(v.held.is_empty(), "released once the merge resumed");
    assert!(!v.geometry(Target::Device(0)).read_only);
    assert_eq!(snap(&v, "s").unwrap().2, SnapState::Merging);
    assert!(v.resolve("s").is_none());
    settle(&mut v);
    assert!(snap(&v, "s").is_none());
    assert_eq!(
        read_of(&mut v, |v| origin_target(v, 0), 0, MIB).unwrap(),
        before
    );
    assert!(
        OriginMarker::decode(&a.bytes(0, 512)).is_none(),
        "chunk 0 written back"
    );
}
