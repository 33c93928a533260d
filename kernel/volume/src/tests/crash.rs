//! Power cuts at device completions, as `snapshot::sim` enumerates them for the engine, but
//! through the whole volume layer: the cut images boot again through discovery.

use std::vec::Vec;

use drivers::hal::fake::with_dma_reclaimed;

use super::harness::*;
use crate::origin::SnapState;
use crate::tasks::{Pattern, RangeTask, Task, WriteSpec};

const SIZE: usize = 512 * 1024;

/// Crash modes per cut: nothing volatile kept, everything kept, two random subsets.
const MODES: [(u32, u64); 4] = [(0, 0), (1, 0), (2, 1), (2, 2)];

/// The origin `vda` of SIZE bytes and the COW device `vdb` of 1 MiB.
fn disks() -> (Disk, Disk) {
    let origin = Shape {
        blocks: (SIZE / 512) as u64,
        ..Shape::mib(1)
    };
    (
        Disk::new("vda", "ORIGIN", origin),
        Disk::new("vdb", "COW", Shape::mib(1)),
    )
}

/// An origin whose chunks 3..62 were overwritten in part after snapshot `s` was taken, shut down
/// cleanly: (origin, COW, the snapshot's contents, the origin's).
fn merged_world() -> (Disk, Disk, Vec<u8>, Vec<u8>) {
    let (a, c) = disks();
    let before = pattern(SIZE, 0x10);
    a.set(&before);
    let mut after = before.clone();
    let mut v = volumes(&[&a, &c]);
    let s = spec(&mut v, "s", 0, 1, 4);
    create(&mut v, s);
    let origin = origin_target(&v, 0);
    for i in (3..60).step_by(3) {
        let data = pattern(6144, i as u8);
        write(&mut v, origin, i * 4096, &data).unwrap();
        after[i as usize * 4096..i as usize * 4096 + 6144].copy_from_slice(&data);
    }
    flush(&mut v, origin).unwrap();
    assert_eq!(
        read_of(&mut v, |v| snap_target(v, "s"), 0, SIZE).unwrap(),
        before
    );
    let (a2, c2) = (a.rebooted(a.contents()), c.rebooted(c.contents()));
    (a2, c2, before, after)
}

/// Boots `a` and `c` (discovery resumes a merge it finds), lets a merge finish, and merges
/// `s` if it is still a snapshot: the origin must then read as the snapshot did.
/// Returns what the boot found: 0 the merge done, 1 the merge resumed, 2 the snapshot whole.
fn recover_and_check(a: &Disk, c: &Disk, expected: &[u8], what: &str) -> usize {
    let mut v = volumes(&[a, c]);
    let report = discover(&mut v);
    assert!(v.unserved.is_empty(), "{what}: {report} {:?}", v.unserved);
    let found = match snap(&v, "s") {
        None => 0,
        Some((_, _, SnapState::Merging)) => 1,
        Some(_) => 2,
    };
    settle(&mut v);
    if snap(&v, "s").is_some() {
        // The cut came before the merge began on disk: the snapshot is whole; merge it now.
        assert_eq!(
            read_of(&mut v, |v| snap_target(v, "s"), 0, SIZE).unwrap(),
            expected,
            "{what}"
        );
        let mut m = merge_task(&mut v, "s");
        let report = run(&mut v, &mut m);
        assert!(report.starts_with("merged s into vda"), "{what}: {report}");
        settle(&mut v);
    }
    assert!(v.held.is_empty(), "{what}: the origin is still held");
    assert!(snap(&v, "s").is_none(), "{what}");
    let origin = origin_target(&v, 0);
    assert_eq!(read(&mut v, origin, 0, SIZE).unwrap(), expected, "{what}");
    // Writable again.
    write(&mut v, origin, 0, &pattern(4096, 0xEE)).unwrap();
    found
}

#[test]
fn a_merge_cut_at_any_device_completion_finishes_after_reboot() {
    // How many completions an uncut merge takes.
    let mut total = 0;
    with_dma_reclaimed(|| {
        let (a, c, before, _) = merged_world();
        let mut v = volumes(&[&a, &c]);
        discover(&mut v);
        let mut m = merge_task(&mut v, "s");
        let mut inbox = Inbox::default();
        while !(m.done() && v.task_ios == 0) {
            total += turn(&mut v, Some(&mut m), &mut inbox, &mut None);
        }
        settle(&mut v);
        assert_eq!(
            read_of(&mut v, |v| origin_target(v, 0), 0, SIZE).unwrap(),
            before
        );
    });
    assert!(total > 10, "{total} completions");
    let mut states = 0;
    let mut found = [0; 3];
    let mut volatile = 0;
    for cut in 1..total {
        for (mode, seed) in MODES {
            with_dma_reclaimed(|| {
                let (a, c, before, _) = merged_world();
                let mut v = volumes(&[&a, &c]);
                discover(&mut v);
                let mut m = merge_task(&mut v, "s");
                let cut_first = run_until(&mut v, &mut m, cut);
                // A merge detached from its task goes on in the engine: cut it too.
                assert!(cut_first || cut >= total - 2, "cut {cut} of {total}");
                volatile += usize::from(a.volatile_writes() + c.volatile_writes() > 0);
                let (ia, ic) = (a.crash_image(mode, seed), c.crash_image(mode, seed));
                drop(v);
                let what =
                    std::format!("cut after {cut} of {total} completions, mode {mode}/{seed}");
                found[recover_and_check(&a.rebooted(ia), &c.rebooted(ic), &before, &what)] += 1;
            });
            states += 1;
        }
    }
    std::println!(
        "volume: {states} merge crash states checked (done, resumed, not begun: {found:?})"
    );
    // The cuts land before, inside and after the merge.
    assert!(found.iter().all(|&n| n > 0), "{found:?}");
    // And in many, writes a crash may or may not keep are pending: the modes differ.
    assert!(volatile > states / 4, "{volatile} of {states}");
}

#[test]
fn a_power_cut_during_origin_writes_never_changes_the_snapshot() {
    let mut total = 0;
    let setup = || {
        let (a, c) = disks();
        let before = pattern(SIZE, 0x20);
        a.set(&before);
        let mut v = volumes(&[&a, &c]);
        let s = spec(&mut v, "s", 0, 1, 4);
        create(&mut v, s);
        let spec = WriteSpec {
            pattern: Pattern::Seed(5),
            transfer_bytes: Some(12 * 1024),
            fua: false,
            flush_every: 32,
        };
        let task = RangeTask::write(&v, origin_target(&v, 0), 16, 200, spec, now());
        (a, c, before, v, task)
    };
    with_dma_reclaimed(|| {
        let (_, _, _, mut v, mut task) = setup();
        let mut inbox = Inbox::default();
        while !(task.done() && v.task_ios == 0) {
            total += turn(&mut v, Some(&mut task), &mut inbox, &mut None);
        }
    });
    for cut in (1..total).step_by(3) {
        for (mode, seed) in MODES {
            with_dma_reclaimed(|| {
                let (a, c, before, mut v, mut task) = setup();
                run_until(&mut v, &mut task, cut);
                let (ia, ic) = (a.crash_image(mode, seed), c.crash_image(mode, seed));
                drop(v);
                let mut v = volumes(&[&a.rebooted(ia), &c.rebooted(ic)]);
                discover(&mut v);
                let what = std::format!("cut after {cut} of {total}, mode {mode}/{seed}");
                assert!(snap(&v, "s").is_some(), "{what}: {:?}", v.unserved);
                let got = read_of(&mut v, |v| snap_target(v, "s"), 0, SIZE).unwrap();
                assert!(got == before, "{what}: the snapshot changed");
            });
        }
    }
}
