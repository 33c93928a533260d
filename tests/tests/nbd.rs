//! The NBD server glue on the appliance, before the network stack: `nbd-selftest` runs a
//! scripted client through the real server sessions, real device queues and the snapshot
//! engine; the host then checks the bytes on the disk images.

use kernel::nbd::selftest_spec::{LEN, OFFSET, SEED};
use kernel::util::pattern::fill_seeded;
use tests::{Boot, Image, TIMEOUT};

const MIB: u64 = 1 << 20;

fn expected() -> Vec<u8> {
    let mut data = vec![0u8; LEN as usize];
    fill_seeded(&mut data, SEED, OFFSET);
    data
}

fn assert_ok(out: &str) {
    for line in [
        "go: block sizes",
        "go: ok",
        "write: error 0 cookie 1: ok",
        "flush: error 0 cookie 2: ok",
        "read: error 0 cookie 3: ok, data matches",
        "bad read: error 22 cookie 4: ok",
        "nbd self-test: ok",
    ] {
        assert!(out.contains(line), "missing '{line}' in:\n{out}");
    }
}

#[test]
fn selftest_on_virtio_and_nvme_writes_the_disks() {
    let (a, n) = (
        Image::new("nbd-vda", 16 * MIB),
        Image::new("nbd-nvme", 16 * MIB),
    );
    let mut q = Boot::kernel("q35", "testing loglevel=info nbd.port=10810")
        .virtio_disk(&a.path, "NBD-A")
        .nvme("NBD-N", &[(&n.path, "on")])
        .start();
    q.wait_prompt();
    let out = q.command_timeout("nbd-selftest vda", TIMEOUT * 2);
    assert_ok(&out);
    assert!(out.contains("go: block sizes 512..1048576"), "{out}");
    assert!(out.contains("read-only false"), "{out}");
    let out = q.command_timeout("nbd-selftest nvme0n1", TIMEOUT * 2);
    assert_ok(&out);
    assert!(out.contains("go: fua true, read-only false"), "{out}");
    // The NBD path does not allocate once the connection is accepted.
    let mem = q.command("mem --json");
    assert!(mem.contains("\"io_path_allocations\":0"), "{mem}");
    assert!(
        !mem.contains("\"io_tasks\":0,"),
        "the self-tests count as I/O tasks: {mem}"
    );
    // Console tasks still finish (NBD I/O is not counted as theirs).
    let out = q.command("flush vda");
    assert!(out.contains("flushed vda"), "{out}");
    let out = q.command("nbd-selftest nope");
    assert!(out.contains("go: error 0x80000006"), "{out}");
    assert!(out.contains("nbd self-test failed"), "{out}");
    q.poweroff();
    assert!(
        a.read(OFFSET, LEN as usize) == expected(),
        "vda image differs"
    );
    assert!(
        n.read(OFFSET, LEN as usize) == expected(),
        "nvme image differs"
    );
    assert!(
        a.read(0, 4096).iter().all(|&b| b == 0),
        "bytes before untouched"
    );
}

#[test]
fn selftest_through_the_snapshot_engine() {
    let (a, b) = (
        Image::new("nbd-origin", 16 * MIB),
        Image::new("nbd-cow", 8 * MIB),
    );
    let before: Vec<u8> = (0..16 * MIB as usize).map(|i| (i % 253) as u8).collect();
    a.write(0, &before);
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&a.path, "ORIGIN-A")
        .virtio_disk(&b.path, "COW-B")
        .start();
    q.wait_prompt();
    let out = q.command("snapshot create s1 vda vdb");
    assert!(out.contains("created snapshot s1"), "{out}");
    // The origin through the engine: writes copy to the store first.
    let out = q.command_timeout("nbd-selftest vda", TIMEOUT * 2);
    assert_ok(&out);
    // The snapshot is read-only: the write is refused with EPERM, the rest goes on.
    let out = q.command_timeout("nbd-selftest s1", TIMEOUT * 2);
    assert!(out.contains("read-only true"), "{out}");
    assert!(out.contains("write: error 1 cookie 1"), "{out}");
    assert!(out.contains("flush: error 0 cookie 2: ok"), "{out}");
    assert!(
        out.contains("read: error 0 cookie 3: data differs"),
        "{out}"
    );
    // The COW device is not exported.
    let out = q.command("nbd-selftest vdb");
    assert!(out.contains("go: error 0x80000006"), "{out}");
    q.poweroff();
    assert!(
        a.read(OFFSET, LEN as usize) == expected(),
        "origin image differs"
    );
}
