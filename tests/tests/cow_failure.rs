//! A COW device that fails (issue 15, finding 4): the store on `vdb` (or an NVMe namespace) is
//! created, then the device stops taking writes (reads and flushes still work, as an NVMe
//! drive gone read-only at end of life; QEMU's blkdebug driver fails every write after the
//! second flush the device sees). The first origin write needs a copy, the copy (or its
//! commit) fails, the snapshot is invalidated, and writing the header that marks the store
//! invalid fails too: the store on
//! the device still reads as a valid snapshot. The origin write must then fail (the NBD client
//! sees EIO) instead of silently changing that snapshot, the console must say why (at once,
//! and again later), `snapshot list`/`status` must show it, and `snapshot delete` gives it up.
//! Needs qemu-utils (qemu-io) on the host.

use std::time::{Duration, Instant};

use tests::cow::CowImage;
use tests::{free_port, qemu_io, Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;
const NBD_PORT: u16 = 10809;

/// Waits until `pattern` occurs `n` times in the transcript.
fn wait_count(q: &mut Qemu, pattern: &str, n: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let t = q.transcript();
        // The n-th line must have arrived whole (QEMU's output comes in pieces).
        let whole = t
            .match_indices(pattern)
            .nth(n.saturating_sub(1))
            .is_some_and(|(at, _)| t[at..].contains('\n'));
        if whole {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "'{pattern}' not seen {n} times:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// blkdebug rules: the COW device takes writes until its second flush (the end of `snapshot
/// create` on virtio-blk, which has no FUA: zero the first area, flush, header, flush); then
/// every write fails. Reads and flushes keep working.
const DIES_AFTER_CREATE: &str = "\
[set-state]\nstate = \"1\"\nevent = \"flush_to_disk\"\nnew_state = \"2\"\n
[set-state]\nstate = \"2\"\nevent = \"flush_to_disk\"\nnew_state = \"3\"\n
[inject-error]\nstate = \"3\"\nevent = \"pwritev\"\niotype = \"write\"\nerrno = \"5\"\nonce = \"off\"\n";

/// As [`DIES_AFTER_CREATE`], but only the next two writes fail (the first copy and the
/// header write that would invalidate the store); from then on the device works again. (An
/// error rule that never matches a write replaces the active ones in the last state.)
const FAILS_TWICE_AFTER_CREATE: &str = "\
[set-state]\nstate = \"1\"\nevent = \"flush_to_disk\"\nnew_state = \"2\"\n
[set-state]\nstate = \"2\"\nevent = \"flush_to_disk\"\nnew_state = \"3\"\n
[inject-error]\nstate = \"3\"\nevent = \"pwritev\"\niotype = \"write\"\nerrno = \"5\"\nonce = \"off\"\n
[set-state]\nstate = \"3\"\nevent = \"pwritev\"\nnew_state = \"4\"\n
[inject-error]\nstate = \"4\"\nevent = \"pwritev\"\niotype = \"write\"\nerrno = \"5\"\nonce = \"off\"\n
[set-state]\nstate = \"4\"\nevent = \"pwritev\"\nnew_state = \"5\"\n
[inject-error]\nstate = \"5\"\nevent = \"pwritev\"\niotype = \"discard\"\nerrno = \"5\"\nonce = \"off\"\n";

/// A 16 MiB origin `vda` with a pattern and an 8 MiB COW disk behind blkdebug with `rules`
/// (virtio-blk `vdb`, or with `nvme` an NVMe namespace `nvme0n1` with a volatile write cache),
/// NBD forwarded to the returned port, snapshot `s1` of `vda` on the COW disk created.
fn boot_with_dying_cow(tag: &str, rules: &str, nvme: bool) -> (Qemu, u16, Image, Image, Vec<u8>) {
    let (a, b) = (
        Image::new(&format!("{tag}-origin"), 16 * MIB),
        Image::new(&format!("{tag}-cow"), 8 * MIB),
    );
    let origin: Vec<u8> = (0..16 * MIB as usize)
        .map(|i| (i / 4096 % 251) as u8 ^ (i % 13) as u8)
        .collect();
    a.write(0, &origin);
    let conf = b.path.with_extension("blkdebug.conf");
    std::fs::write(&conf, rules).expect("write blkdebug config");
    let port = free_port();
    let drive = format!(
        "file=blkdebug:{}:{},if=none,format=raw,id=dying,cache=none,aio=threads",
        conf.display(),
        b.path.display()
    );
    let device = if nvme {
        vec![
            "-device".to_string(),
            "nvme,id=nvmec,serial=DYING".to_string(),
            "-drive".to_string(),
            drive,
            "-device".to_string(),
            "nvme-ns,drive=dying,bus=nvmec,nsid=1,write-cache=on".to_string(),
        ]
    } else {
        vec![
            "-drive".to_string(),
            drive,
            "-device".to_string(),
            "virtio-blk-pci,drive=dying,serial=DYING".to_string(),
        ]
    };
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&a.path, "ORIGIN")
        .args(device)
        .net(&[(port, NBD_PORT)], None)
        .start();
    q.wait_prompt();
    q.wait_nbd_serving();
    let cow = if nvme { "nvme0n1" } else { "vdb" };
    let out = q.command(&format!("snapshot create s1 vda {cow}"));
    assert!(out.contains("created snapshot s1"), "{out}");
    (q, port, a, b, origin)
}

#[test]
fn a_cow_device_that_stops_taking_writes_fails_origin_writes_not_the_snapshot() {
    dead_cow_after_create(false);
}

/// The same on an NVMe namespace (FUA header and area writes).
#[test]
fn an_nvme_cow_namespace_that_stops_taking_writes_fails_origin_writes_not_the_snapshot() {
    dead_cow_after_create(true);
}

fn dead_cow_after_create(nvme: bool) {
    let tag = if nvme { "cowfail-nvme" } else { "cowfail" };
    let (mut q, port, a, b, origin) = boot_with_dying_cow(tag, DIES_AFTER_CREATE, nvme);
    // virtio-blk: the copy write fails. NVMe: the copy is a cached write that succeeds, the
    // commit's flush too, and its FUA area write fails.
    let reason = if nvme {
        "writing metadata failed"
    } else {
        "copying a chunk failed"
    };

    // The write needs a copy into s1; the COW device refuses it and then the header write.
    let (_, wt) = qemu_io(port, "vda", &["write -P 0x55 0 64k", "flush"]);
    assert!(
        wt.contains("write failed: Input/output error"),
        "the origin write went through while the store still reads as valid: {wt}"
    );
    let t = wait_count(
        &mut q,
        "snapshot s1: INVALID, but its COW store could not be marked invalid",
        1,
        TIMEOUT,
    );
    assert!(
        t.contains(&format!("snapshot s1 invalidated: {reason}")),
        "{t}"
    );
    // The origin kept what the snapshot reads, and the store on the device, which still
    // loads as valid, reads exactly the snapshot.
    assert!(
        a.read(0, 65536) == origin[..65536],
        "the origin took the write"
    );
    let cow = b.read(0, 8 * MIB as usize);
    let store = CowImage { bytes: &cow }
        .load(16 * MIB)
        .expect("store loads");
    assert!(
        store.valid,
        "the header write failed: the store must still say valid"
    );
    let view = CowImage { bytes: &cow }
        .snapshot_view(&a.read(0, 16 * MIB as usize))
        .expect("view");
    assert!(
        view == origin,
        "the store on the device no longer reads its snapshot"
    );

    // Reads go on; a console write that needs a copy fails like the NBD one.
    let (_, r) = qemu_io(port, "vda", &["read 0 64k"]);
    assert!(r.contains("read 65536/65536 bytes"), "{r}");
    // (Log lines of the NBD connections redraw the prompt: let them pass first.)
    q.settle(Duration::from_millis(300));
    let out = q.command("write vda 100 1 --byte 0x11");
    assert!(out.contains("error"), "console write went through: {out}");
    assert!(a.read(100 * 512, 512) == origin[100 * 512..101 * 512]);

    let list = q.command("snapshot list");
    let row = list
        .lines()
        .find(|l| l.starts_with("s1 "))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains("invalid"), "{row}");
    assert!(
        list.contains("s1: INVALID, but its COW store could not be marked invalid"),
        "{list}"
    );
    let json = q.command("snapshot list --json");
    assert!(json.contains("\"store_marked_invalid\":false"), "{json}");
    assert!(
        json.contains(&format!("\"invalid_reason\":\"{reason}\"")),
        "{json}"
    );
    let status = q.command("snapshot status s1");
    assert!(status.contains("0 32768 snapshot Invalid"), "{status}");
    assert!(
        status.contains(&format!("invalidated: {reason}")),
        "{status}"
    );
    assert!(status.contains("could not be marked invalid"), "{status}");
    let refused: u64 = status
        .split("origin writes refused so far: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{status}"));
    assert!(refused >= 2, "{status}");

    // The alert repeats (after 10 s) with the count.
    let t = wait_count(
        &mut q,
        "ERROR snapshot s1: INVALID, but its COW store could not be marked invalid",
        2,
        Duration::from_secs(40),
    );
    let repeat = t
        .split("ERROR snapshot s1: INVALID")
        .nth(2)
        .and_then(|r| r.lines().next())
        .unwrap_or_default();
    assert!(repeat.contains("origin writes refused so far"), "{repeat}");

    q.settle(Duration::from_millis(300));
    // The operator gives the snapshot up: the wipe fails as well, and the delete says what
    // that means; origin writes go through again.
    let out = q.command_timeout("snapshot delete s1", TIMEOUT);
    assert!(
        out.contains("could be neither marked invalid nor wiped"),
        "{out}"
    );
    q.settle(Duration::from_millis(300));
    let (ok, w) = qemu_io(port, "vda", &["write -P 0x55 0 64k", "flush"]);
    assert!(ok && !w.contains("failed"), "{w}");
    assert!(a.read(0, 65536).iter().all(|&x| x == 0x55));
    let _ = std::fs::remove_file(b.path.with_extension("blkdebug.conf"));
    q.poweroff();
}

/// The device fails the first copy and the invalidating header write, then works again: the
/// origin write in between fails, the next one (a second later) retries the header write,
/// which lands; the store now loads as invalid and origin writes go on.
#[test]
fn a_cow_device_that_comes_back_gets_the_store_invalidated_and_writes_go_on() {
    let (mut q, port, a, b, origin) =
        boot_with_dying_cow("cowback", FAILS_TWICE_AFTER_CREATE, false);
    let (_, w) = qemu_io(port, "vda", &["write -P 0x55 0 64k", "flush"]);
    assert!(w.contains("write failed: Input/output error"), "{}", w);
    wait_count(
        &mut q,
        "snapshot s1: INVALID, but its COW store could not be marked invalid",
        1,
        TIMEOUT,
    );
    assert!(
        a.read(0, 65536) == origin[..65536],
        "the origin took the write"
    );
    assert!(
        CowImage {
            bytes: &b.read(0, 8 * MIB as usize)
        }
        .load(16 * MIB)
        .expect("store loads")
        .valid
    );
    // Retries are at most once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, w) = qemu_io(port, "vda", &["write -P 0x66 0 64k", "flush"]);
    assert!(ok && !w.contains("failed"), "{w}");
    wait_count(
        &mut q,
        "snapshot s1: its COW store is marked invalid now; origin writes go on",
        1,
        TIMEOUT,
    );
    assert!(a.read(0, 65536).iter().all(|&x| x == 0x66));
    let store = CowImage {
        bytes: &b.read(0, 8 * MIB as usize),
    }
    .load(16 * MIB)
    .expect("store loads");
    assert!(!store.valid, "the store still says valid after the retry");
    q.settle(Duration::from_millis(300));
    let list = q.command("snapshot list");
    assert!(
        list.lines()
            .any(|l| l.starts_with("s1 ") && l.contains("invalid")),
        "{list}"
    );
    assert!(!list.contains("could not be marked invalid"), "{list}");
    let json = q.command("snapshot list --json");
    assert!(json.contains("\"store_marked_invalid\":true"), "{json}");
    // No further alerts once the store is marked invalid.
    std::thread::sleep(Duration::from_secs(11));
    let t = q.transcript();
    assert_eq!(
        t.matches("ERROR snapshot s1: INVALID").count(),
        1,
        "alert repeated after recovery:\n{t}"
    );
    let _ = std::fs::remove_file(b.path.with_extension("blkdebug.conf"));
    q.poweroff();
}
