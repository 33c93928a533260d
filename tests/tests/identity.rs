//! Which disk a store comes back on (issue 15, finding 3): with two same-size disks that the
//! old serial-and-size match could not tell apart, a reboot with the same QEMU arguments
//! attaches the store to its own origin when the origin can be identified (an NVMe namespace
//! by controller serial and namespace ID, or by EUI-64), and otherwise lists it as ambiguous
//! until `snapshot attach`, whose choice then lasts across reboots. Never the wrong disk.

use tests::{sha256_hex, xorshift_bytes, Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

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
    assert!(
        out.contains("note: vdb cannot be told apart from the other disks"),
        "{out}"
    );
    assert!(q
        .command("write vdb 0 64 --byte 0x55")
        .contains("wrote 64 blocks"));
    assert!(q.checksum("t1").starts_with(&want));
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
    assert!(q.checksum("t1").starts_with(&want));
    q.poweroff();

    // The binding written by attach brings it back on vdb by itself, and copy-on-write works.
    let mut q = anonymous(&a, &b, &c);
    let boot = q.transcript();
    assert!(
        boot.contains("snapshot t1: store on vdc attached to vdb"),
        "{boot}"
    );
    assert!(q.checksum("t1").starts_with(&want));
    assert!(q
        .command("write vdb 100 64 --byte 0x66")
        .contains("wrote 64 blocks"));
    assert!(q.checksum("t1").starts_with(&want));
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
    assert!(!out.contains("note:"), "{out}");
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
    assert!(q.checksum("t1").starts_with(&want));
    let list = q.command("snapshot list --json");
    assert!(list.contains("\"origin\":\"nvme0n2\""), "{list}");
    q.poweroff();
    assert_eq!(
        n1.read(0, SIZE as usize),
        vec![0x11; SIZE as usize],
        "nvme0n1 was written"
    );
}

/// A store as an older snapfw left it in the middle of a merge: 4 KiB chunks, origin chunks
/// 0, 1, 2 and 100 preserved (filled with 0xE0 + i), a version-2 binding for an origin
/// without a serial number (`serial=` unset) named `name`, and the merge marker.
fn foreign_merging_store(name: &[u8], origin_sectors: u64) -> Vec<u8> {
    use snapshot::format::{self, Header, Record, BINDING_MAGIC_V2, BINDING_V2_BYTES};
    let mut cow = vec![0u8; SIZE as usize];
    Header::new(8).encode(&mut cow[..16]);
    for (i, old) in [0u64, 1, 2, 100].into_iter().enumerate() {
        let new = 2 + i as u64;
        Record {
            old_chunk: old,
            new_chunk: new,
        }
        .encode(&mut cow[4096..8192], i);
        cow[new as usize * 4096..(new as usize + 1) * 4096].fill(0xE0 + i as u8);
    }
    let binding = snapshot::Binding {
        name: snapshot::BoundedBytes::new(name).unwrap(),
        origin_serial: snapshot::BoundedBytes::new(b"").unwrap(),
        origin_sectors,
        chunk_sectors: 8,
        created_unix_seconds: 0,
        region_start: 0,
        region_sectors: 0,
        flags: 0,
        origin_id: snapshot::OriginId::Legacy,
    };
    // Encoded as version 2, what snapfw wrote before origin identities.
    binding.encode(&mut cow[..512]);
    let end = 16 + BINDING_V2_BYTES - 4;
    cow[16..24].copy_from_slice(&BINDING_MAGIC_V2);
    cow[end..512].fill(0);
    let sum = format::crc32c(&cow[16..end]);
    cow[end..end + 4].copy_from_slice(&sum.to_le_bytes());
    format::encode_merge_marker(&mut cow[..4096], None);
    assert!(snapshot::Binding::decode(&cow[..512]).is_ok());
    cow
}

#[test]
fn a_foreign_store_mid_merge_merges_nowhere_until_attached() {
    let (a, b, c) = (
        Image::new("id-merge-a", SIZE),
        Image::new("id-merge-b", SIZE),
        Image::new("id-merge-c", SIZE),
    );
    let a_bytes = vec![0xAA; SIZE as usize];
    let b_bytes = xorshift_bytes(SIZE as usize, 17);
    a.write(0, &a_bytes);
    b.write(0, &b_bytes);
    let cow = foreign_merging_store(b"mid\x1b[2Jmerge", SIZE / 512);
    c.write(0, &cow);
    let mut want = b_bytes.clone();
    for (i, old) in [0usize, 1, 2, 100].into_iter().enumerate() {
        want[old * 4096..(old + 1) * 4096].fill(0xE0 + i as u8);
    }

    let mut q = anonymous(&a, &b, &c);
    let list = q.command("snapshot list");
    // The name read from the disk is shown escaped: the console gets no escape sequence.
    assert!(
        list.contains("store on vdc: snapshot 'mid\\x1b[2Jmerge': its origin (serial '', 32768 sectors) is ambiguous: it could be vda, vdb"),
        "{list}"
    );
    assert!(!q.transcript().contains("mid\x1b[2J"), "raw escape printed");
    let json = q.command("snapshot list --json");
    assert!(json.contains("mid\\\\x1b[2Jmerge"), "{json}");
    q.poweroff();
    assert!(a.read(0, SIZE as usize) == a_bytes, "vda was merged over");
    assert!(b.read(0, SIZE as usize) == b_bytes, "vdb was merged over");
    assert!(c.read(0, SIZE as usize) == cow, "the store was written");

    // The operator names the origin: the merge resumes there, and only there.
    let mut q = anonymous(&a, &b, &c);
    let out = q.command("snapshot attach m1 vdb vdc");
    assert!(out.contains("attached snapshot m1"), "{out}");
    q.expect("merge of m1 finished; snapshot removed", TIMEOUT);
    q.poweroff();
    assert!(a.read(0, SIZE as usize) == a_bytes, "vda was merged over");
    assert!(b.read(0, SIZE as usize) == want, "vdb is not the snapshot");
}

/// A virtio disk without a serial, and an NVMe controller whose namespaces are given as
/// (image, EUI-64 or 0 for none), NSID 1, 2, ….
fn nvme_eui(cow: &Image, namespaces: &[(&Image, u64)]) -> Qemu {
    let mut args = vec![
        "-device".to_string(),
        "nvme,id=nvmeu,serial=NV-EUI".to_string(),
    ];
    for (n, (image, eui)) in namespaces.iter().enumerate() {
        args.push("-drive".into());
        args.push(format!(
            "file={},if=none,format=raw,id=eu{n},cache=none,aio=threads",
            image.path.display()
        ));
        args.push("-device".into());
        let eui = if *eui == 0 {
            String::new()
        } else {
            format!(",eui64={eui:#x}")
        };
        args.push(format!("nvme-ns,drive=eu{n},bus=nvmeu,nsid={}{eui}", n + 1));
    }
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&cow.path, "")
        .args(args)
        .start();
    q.wait_prompt();
    q
}

#[test]
fn an_nvme_namespace_with_an_eui64_is_found_by_it_wherever_it_moves() {
    let (cow, p, o, r) = (
        Image::new("id-eui-cow", SIZE),
        Image::new("id-eui-p", SIZE),
        Image::new("id-eui-o", SIZE),
        Image::new("id-eui-r", SIZE),
    );
    p.write(0, &vec![0x22; SIZE as usize]);
    r.write(0, &vec![0x33; SIZE as usize]);
    let origin = xorshift_bytes(SIZE as usize, 18);
    o.write(0, &origin);
    let want = sha256_hex(&origin);
    const EUI_P: u64 = 0x5254_0000_0000_0001;
    const EUI_O: u64 = 0x5254_0000_0000_0002;

    let mut q = nvme_eui(&cow, &[(&p, EUI_P), (&o, EUI_O)]);
    let devices = q.command("devices --json");
    assert!(
        devices.contains(
            "\"serial\":\"NV-EUI\",\"nsid\":2,\"nguid\":null,\"eui64\":\"5254000000000002\""
        ),
        "QEMU reports the EUI-64 in Identify Namespace: {devices}"
    );
    let out = q.command("snapshot create t1 nvme0n2 vda");
    assert!(out.contains("created snapshot t1"), "{out}");
    q.poweroff();

    // The namespace is now NSID 3, and NSID 2 is another disk of the same size and serial.
    let mut q = nvme_eui(&cow, &[(&p, EUI_P), (&r, 0), (&o, EUI_O)]);
    let list = q.command("snapshot list --json");
    assert!(list.contains("\"origin\":\"nvme0n3\""), "{list}");
    assert!(q
        .command("write nvme0n3 0 128 --byte 0x77")
        .contains("wrote 128 blocks"));
    assert!(q.checksum("t1").starts_with(&want));
    q.poweroff();
    assert!(p.read(0, SIZE as usize) == vec![0x22; SIZE as usize]);
    assert!(r.read(0, SIZE as usize) == vec![0x33; SIZE as usize]);
}
