//! The `snapshot` decisions on RAM disks: each refusal names its reason and starts nothing;
//! an accepted request starts the task that does it (run here to its end, as the main loop
//! would, so later decisions see the snapshot it made).

use std::boxed::Box;
use std::string::String;
use std::vec::Vec;

use drivers::block::{BlockDevice, BufferPool, Completion, Geometry, RamDisk, RamDiskConfig};
use drivers::hal::fake::FakeDma;
use drivers::info::{DeviceInfo, FixedString};
use volume::origin::SnapState;
use volume::tasks::Task;
use volume::{Platform, Ports, Volumes};

use super::decide;
use crate::shell::commands::parse_line;

const MIB: u64 = 1 << 20;

fn now() -> u64 {
    1_000_000_000
}

/// Volumes over RAM disks `vda` (origin-sized), `vdb` and `vdc` (stores), 512-byte blocks.
fn volumes() -> Volumes {
    let mut v = Volumes::new(Platform::new::<FakeDma>(now, || Some(1_700_000_000)));
    for (i, (name, bytes)) in [("vda", 16 * MIB), ("vdb", 16 * MIB), ("vdc", MIB / 4)]
        .into_iter()
        .enumerate()
    {
        let geometry = Geometry {
            block_size: 512,
            capacity_blocks: bytes / 512,
            max_transfer_bytes: 128 * 1024,
            queue_count: 1,
            queue_depth: 32,
            volatile_write_cache: true,
            fua: true,
            discard: false,
            max_discard_blocks: 0,
            read_only: false,
        };
        let disk = RamDisk::new(name, RamDiskConfig { geometry });
        let pool = BufferPool::new::<FakeDma>(i as u16, 32, 128 * 1024).expect("pool");
        v.add_device(Box::new(disk), pool);
    }
    v
}

/// Decides `line` (a whole console line starting with `snapshot`).
fn run_line(
    v: &mut Volumes,
    failed: &[DeviceInfo],
    line: &str,
) -> Option<Result<Box<dyn Task>, String>> {
    let parsed = parse_line(line, false).expect("parses").expect("a command");
    let args = parsed.args().expect("arguments");
    let sub = args.arg("SUBCOMMAND").expect("subcommand");
    let mut out = String::new();
    decide(sub, v, failed, &args, &mut out, now())
}

fn refused(v: &mut Volumes, line: &str) -> String {
    match run_line(v, &[], line) {
        Some(Err(e)) => e,
        Some(Ok(_)) => panic!("'{line}' was accepted"),
        None => panic!("'{line}' was not decided"),
    }
}

/// Checks that each line is refused with its reason.
fn refusals(v: &mut Volumes, cases: &[(&str, &str)]) {
    for &(line, reason) in cases {
        let e = refused(v, line);
        assert!(e.contains(reason), "'{line}': {e}");
    }
}

fn progress(task: &dyn Task) -> String {
    let mut text = FixedString::<160>::new();
    task.progress(&mut text, now()).unwrap();
    String::from(text.as_str())
}

/// Runs `task` as the main loop does (step, issue, poll every device) until it is done and
/// its last request is back; returns its report.
fn finish(v: &mut Volumes, mut task: Box<dyn Task>) -> String {
    for _ in 0..100_000 {
        if task.done() && v.task_ios == 0 {
            let mut report = String::new();
            task.report(&mut report, now()).unwrap();
            return report;
        }
        let mut done: Vec<(u16, Completion)> = Vec::new();
        {
            let mut drain = |devices: &mut [Box<dyn BlockDevice + Send>],
                             route: &mut dyn FnMut(u16, Completion)|
             -> bool {
                let mut more = false;
                for (i, d) in devices.iter_mut().enumerate() {
                    more |= d.poll_completions(64, &mut |c| route(i as u16, c)).more;
                }
                more
            };
            let mut to_task = |pool: &mut BufferPool, c: Completion| done.push((pool.id(), c));
            let mut to_nbd = |_: &mut BufferPool, _: Completion| panic!("no NBD I/O here");
            let mut ports = Ports {
                task: &mut to_task,
                nbd: &mut to_nbd,
            };
            v.poll(now(), &mut drain, &mut ports);
        }
        for (pool, c) in done {
            task.complete(&mut v.pools[usize::from(pool)], c, now());
        }
        v.plug();
        task.step(v, now());
        v.issue_volumes();
        v.unplug();
    }
    panic!("the task did not finish: {}", progress(&*task));
}

#[test]
fn create_refuses_bad_requests_with_their_reason() {
    let mut v = volumes();
    refusals(
        &mut v,
        &[
            ("snapshot create s1 vda", "usage: snapshot create"),
            ("snapshot create bad/name vda vdb", "invalid snapshot name"),
            ("snapshot create vdb vda vdc", "already taken"),
            (
                "snapshot create s1 nope vdb",
                "no device 'nope' for the origin",
            ),
            (
                "snapshot create s1 vda vda",
                "another device than the origin",
            ),
            (
                "snapshot create s1 vda vdb --chunk 3k",
                "--chunk must be a power of two",
            ),
            (
                "snapshot create s1 vda vdb --chunk 1m",
                "--chunk must be a power of two",
            ),
            (
                "snapshot create s1 vda vdc --chunk 128k",
                "needs at least 3 chunks",
            ),
        ],
    );
    // Nothing was set up for a refused request.
    assert!(v.origins.iter().all(|o| o.snaps.is_empty()));
}

#[test]
fn a_failed_device_keeps_its_name() {
    let mut v = volumes();
    let failed = [DeviceInfo::init_failed(
        FixedString::from_str_truncated("nvme0n1"),
        "nvme",
        None,
        drivers::info::reason(format_args!("did not answer")),
    )];
    let Some(Err(e)) = run_line(&mut v, &failed, "snapshot create nvme0n1 vda vdb") else {
        panic!("accepted");
    };
    assert!(e.contains("already taken"), "{e}");
}

#[test]
fn create_then_the_decisions_that_depend_on_the_snapshot() {
    let mut v = volumes();
    let Some(Ok(task)) = run_line(&mut v, &[], "snapshot create s1 vda vdb") else {
        panic!("refused");
    };
    assert!(progress(&*task).contains("creating snapshot s1"));
    let report = finish(&mut v, task);
    assert!(!report.contains("error"), "{report}");
    let snap = v.origins[0].snap("s1").expect("s1 exists");
    assert_eq!(snap.state, SnapState::Active);

    refusals(
        &mut v,
        &[
            ("snapshot create s1 vda vdc", "already taken"),
            // vdb holds s1's store: not an origin, and its region is taken.
            (
                "snapshot create s2 vdb vdc",
                "holds the COW store of snapshot 's1'",
            ),
            (
                "snapshot create s2 vda vdb",
                "overlaps another snapshot's store",
            ),
            // vda is an origin now: it cannot hold a store.
            ("snapshot create s2 vdc vda", "is the origin of snapshots"),
            ("snapshot delete nope", "no snapshot 'nope'"),
            ("snapshot merge nope", "no snapshot 'nope'"),
            ("snapshot forget-merge vda", "is not a half-merged origin"),
        ],
    );

    // Which task each accepted request starts.
    let Some(Ok(rename)) = run_line(&mut v, &[], "snapshot rename s1 s9") else {
        panic!("rename refused");
    };
    assert!(progress(&*rename).contains("writing the binding of snapshot s1"));
    drop(rename);
    let Some(Ok(merge)) = run_line(&mut v, &[], "snapshot merge s1") else {
        panic!("merge refused");
    };
    assert!(progress(&*merge).contains("s1"), "{}", progress(&*merge));
    drop(merge);
    let Some(Ok(delete)) = run_line(&mut v, &[], "snapshot delete s1") else {
        panic!("delete refused");
    };
    assert!(progress(&*delete).contains("deleting snapshot s1"));
    let report = finish(&mut v, delete);
    assert!(!report.contains("error"), "{report}");
    assert!(v.origins.iter().all(|o| o.snap("s1").is_none()));
    assert!(refused(&mut v, "snapshot delete s1").contains("no snapshot 's1'"));
}

#[test]
fn list_status_and_unknown_subcommands_are_not_decided_here() {
    let mut v = volumes();
    for line in ["snapshot list", "snapshot status s1", "snapshot frobnicate"] {
        assert!(run_line(&mut v, &[], line).is_none(), "{line}");
    }
}
