//! Which disk a store comes back on (issue 15, finding 3): with two same-size disks that the
//! old serial-and-size match could not tell apart, a reboot with the same QEMU arguments
//! attaches the store to its own origin when the origin can be identified (an NVMe namespace
//! by controller serial and namespace ID, or by EUI-64), and otherwise lists it as ambiguous
//! until `snapshot attach`, whose choice then lasts across reboots. Never the wrong disk.

use tests::{sha256_hex, xorshift_bytes, Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// The line that carries the result, after any progress lines.
fn result(out: &str) -> &str {
    out.rsplit("\x1b[K").next().unwrap_or(out).trim()
}

fn checksum(q: &mut Qemu, volume: &str) -> String {
    let out = q.command_timeout(&format!("checksum {volume}"), TIMEOUT * 2);
    result(&out).to_string()
}

/// Three same-size virtio disks without `serial=` (the hypervisor default).
fn anonymous(a: &Image, b: &Image, c: &Image) -> Qemu {
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&a.path, "")
        .virtio_disk(&b.path, "")
        .virtio_disk(&c.path, "")
        .start();
    q.wait_prompt();
    q
}

#[test]
fn anonymous_disks_wait_for_attach_and_the_choice_survives_reboots() {
    let (a, b, c) = (
        Image::new("id-anon-a", SIZE),
        Image::new("id-anon-b", SIZE),
        Image::new("id-anon-c", SIZE),
    );
    a.write(0, &vec![0xAA; SIZE as usize]);
    let origin = xorshift_bytes(SIZE as usize, 15);
    b.write(0, &origin);
    let want = sha256_hex(&origin);

    let mut q = anonymous(&a, &b, &c);
    let out = q.command("snapshot create t1 vdb vdc");
    assert!(out.contains("created snapshot t1"), "{out}");
    assert!(q
        .command("write vdb 0 64 --byte 0x55")
        .contains("wrote 64 blocks"));
    assert!(checksum(&mut q, "t1").starts_with(&want));
    q.poweroff();

    // Same QEMU arguments: vda and vdb are indistinguishable, so the store waits.
    let mut q = anonymous(&a, &b, &c);
    let boot = q.transcript();
    assert!(
        !boot.contains("store on vdc attached to"),
        "attached to a guess: {boot}"
    );
    let list = q.command("snapshot list");
    assert!(
        list.contains("store on vdc: snapshot 't1': its origin (serial '', 32768 sectors) is ambiguous: it could be vda, vdb"),
        "{list}"
    );
    assert!(q
        .command("checksum t1")
        .contains("error: no device or snapshot 't1'"));
    let json = q.command("snapshot list --json");
    assert!(
        json.contains("\"why\":\"snapshot 't1': its origin"),
        "{json}"
    );

    let out = q.command("snapshot attach t1 vdb vdc");
    assert!(
        out.contains("attached snapshot t1; its binding is written"),
        "{out}"
    );
    assert!(checksum(&mut q, "t1").starts_with(&want));
    q.poweroff();

    // The binding written by attach brings it back on vdb by itself, and copy-on-write works.
    let mut q = anonymous(&a, &b, &c);
    let boot = q.transcript();
    assert!(
        boot.contains("snapshot t1: store on vdc attached to vdb"),
        "{boot}"
    );
    assert!(checksum(&mut q, "t1").starts_with(&want));
    assert!(q
        .command("write vdb 100 64 --byte 0x66")
        .contains("wrote 64 blocks"));
    assert!(checksum(&mut q, "t1").starts_with(&want));
    q.poweroff();
    assert_eq!(
        a.read(0, SIZE as usize),
        vec![0xAA; SIZE as usize],
        "vda was written"
    );
}

/// An NVMe controller with two same-size namespaces and a virtio disk without a serial.
fn nvme_pair(cow: &Image, n1: &Image, n2: &Image) -> Qemu {
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&cow.path, "")
        .nvme("NV-IDENT", &[(&n1.path, "on"), (&n2.path, "on")])
        .start();
    q.wait_prompt();
    q
}

#[test]
fn nvme_namespaces_of_one_controller_come_back_on_their_own() {
    let (cow, n1, n2) = (
        Image::new("id-nvme-cow", SIZE),
        Image::new("id-nvme-n1", SIZE),
        Image::new("id-nvme-n2", SIZE),
    );
    n1.write(0, &vec![0x11; SIZE as usize]);
    let origin = xorshift_bytes(SIZE as usize, 16);
    n2.write(0, &origin);
    let want = sha256_hex(&origin);

    let mut q = nvme_pair(&cow, &n1, &n2);
    let out = q.command("snapshot create t1 nvme0n2 vda");
    assert!(out.contains("created snapshot t1"), "{out}");
    q.poweroff();

    // Same arguments: the namespaces share the controller's serial and size; the store
    // records namespace 2 and comes back on it.
    let mut q = nvme_pair(&cow, &n1, &n2);
    let boot = q.transcript();
    assert!(
        boot.contains("snapshot t1: store on vda attached to nvme0n2"),
        "{boot}"
    );
    assert!(q
        .command("write nvme0n2 0 128 --byte 0x77")
        .contains("wrote 128 blocks"));
    assert!(checksum(&mut q, "t1").starts_with(&want));
    let list = q.command("snapshot list --json");
    assert!(list.contains("\"origin\":\"nvme0n2\""), "{list}");
    q.poweroff();
    assert_eq!(
        n1.read(0, SIZE as usize),
        vec![0x11; SIZE as usize],
        "nvme0n1 was written"
    );
}
