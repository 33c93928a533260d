//! The snapshot lifecycle an LVM operator expects (issue 18): a power cut (SIGKILL) right
//! after `snapshot rename` leaves the snapshot active under the old name or the new one,
//! never a mix, with its contents intact. (The host test `snapshot/tests/binding.rs` checks
//! every crash state of the binding rewrite; this one checks the real image end to end.)

use tests::{Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;

fn boot(o: &Image, c: &Image) -> Qemu {
    let mut q = Boot::kernel("q35", "testing")
        .virtio_disk(&o.path, "LIFE-O")
        .virtio_disk(&c.path, "LIFE-C")
        .start();
    q.wait_prompt();
    q
}

#[test]
fn a_power_cut_during_a_rename_leaves_the_old_or_the_new_name() {
    let (o, c) = (
        Image::new("life-rename-o", 16 * MIB),
        Image::new("life-rename-c", 16 * MIB),
    );
    o.write(0, &tests::xorshift_bytes(16 * MIB as usize, 5));
    let mut q = boot(&o, &c);
    assert!(q
        .command("snapshot create s1 vda vdb")
        .contains("created snapshot s1"));
    assert!(q.command("write vda 0 2048 --seed 3").contains("wrote"));
    let sum = q.checksum("s1");
    q.send(b"snapshot rename s1 renamed\r");
    q.expect("snapshot rename s1 renamed", TIMEOUT);
    q.kill();

    let mut q = boot(&o, &c);
    let list = q.command("snapshot list");
    let name = match (list.contains("s1 "), list.contains("renamed ")) {
        (true, false) => "s1",
        (false, true) => "renamed",
        _ => panic!("neither or both names: {list}"),
    };
    assert!(list.contains("active"), "{list}");
    assert_eq!(q.checksum(name), sum);
    eprintln!("after the cut the snapshot is '{name}'");
    q.poweroff();
}

/// `snapshot extend` (lvextend): a snapshot in an 8 MiB region of `vdb`, another store
/// after it at 20 MiB. Filled past 85 %, extended by 8 MiB, written past its old size: it
/// stays active and reads as taken; the space left before the next store keeps a
/// free-extent marker, so after a reboot both stores are found, the first with its larger
/// region. Bad sizes get one error line each.
#[test]
fn extend_grows_a_region_store_into_the_free_space_after_it() {
    let (o, c) = (
        Image::new("life-extend-o", 32 * MIB),
        Image::new("life-extend-c", 64 * MIB),
    );
    let before = tests::xorshift_bytes(32 * MIB as usize, 9);
    o.write(0, &before);
    let mut q = boot(&o, &c);
    let out = q.command("snapshot create s1 vda vdb:0+16384");
    assert!(out.contains("created snapshot s1"), "{out}");
    let out = q.command("snapshot create s2 vda vdb:40960+32768");
    assert!(out.contains("created snapshot s2"), "{out}");
    let s1 = tests::sha256_hex(&before);
    // 7 MiB of first writes: 88 % of the 8 MiB store.
    assert!(q
        .command_timeout("write vda 0 14336 --seed 21", TIMEOUT * 2)
        .contains("wrote"));
    let list = q.command("snapshot list --json");
    assert!(list.contains(r#""state":"active""#), "{list}");
    for (line, expected) in [
        (
            "snapshot extend s1",
            "error: usage: snapshot extend NAME +SIZE|SIZE",
        ),
        (
            "snapshot extend s1 +64M",
            "error: no room on vdb after the store of s1: 12 MiB free, 64 MiB more asked",
        ),
        (
            "snapshot extend s1 1M",
            "error: snapshot s1 has 8 MiB; a store cannot shrink",
        ),
        (
            "snapshot extend s1 +1k",
            "error: the new size must be a multiple of the chunk size (4 KiB)",
        ),
        ("snapshot extend s1 +1x", "error: "),
        ("snapshot extend nosuch +1M", "error: no snapshot 'nosuch'"),
    ] {
        let out = q.command(line);
        assert!(out.contains(expected), "{line}: {out}");
        assert_eq!(out.matches("error:").count(), 1, "{line}: {out}");
    }
    let out = q.command("snapshot extend s1 +8M");
    assert!(out.contains("extended snapshot s1 to 16 MiB ("), "{out}");
    // 6 MiB more first writes: 13 MiB in all, past the old 8 MiB.
    assert!(q
        .command_timeout("write vda 14336 12288 --seed 22", TIMEOUT * 2)
        .contains("wrote"));
    let list = q.command("snapshot list");
    assert!(
        list.contains("vdb:0+32768") && !list.contains("overflow") && !list.contains("invalid"),
        "{list}"
    );
    assert_eq!(q.checksum("s1"), s1);
    let s2 = q.checksum("s2");
    q.poweroff();

    let mut q = boot(&o, &c);
    let list = q.command("snapshot list");
    assert!(
        list.contains("vdb:0+32768"),
        "the larger region after reboot: {list}"
    );
    assert!(
        list.contains("vdb:40960+32768"),
        "the store after it: {list}"
    );
    assert_eq!(q.checksum("s1"), s1);
    assert_eq!(q.checksum("s2"), s2);
    q.poweroff();
}

/// A power cut right after `snapshot extend`: the store comes back with its old size or its
/// new one, active, its contents intact. (`snapshot/tests/binding.rs` enumerates the crash
/// states of an extension.)
#[test]
fn a_power_cut_during_an_extend_leaves_the_old_or_the_new_size() {
    let (o, c) = (
        Image::new("life-extcut-o", 16 * MIB),
        Image::new("life-extcut-c", 32 * MIB),
    );
    o.write(0, &tests::xorshift_bytes(16 * MIB as usize, 4));
    let mut q = boot(&o, &c);
    let out = q.command("snapshot create s1 vda vdb:0+16384");
    assert!(out.contains("created snapshot s1"), "{out}");
    assert!(q.command("write vda 0 8192 --seed 6").contains("wrote"));
    let sum = q.checksum("s1");
    q.send(b"snapshot extend s1 +8M\r");
    q.expect("snapshot extend s1 +8M", TIMEOUT);
    q.kill();

    let mut q = boot(&o, &c);
    let list = q.command("snapshot list");
    let size = match (list.contains("vdb:0+16384"), list.contains("vdb:0+32768")) {
        (true, false) => "old",
        (false, true) => "new",
        _ => panic!("neither or both sizes: {list}"),
    };
    assert!(list.contains("active"), "{list}");
    assert_eq!(q.checksum("s1"), sum);
    eprintln!("after the cut the store has its {size} size");
    // It can be extended (again) and written past the old size.
    if size == "old" {
        assert!(q
            .command("snapshot extend s1 +8M")
            .contains("extended snapshot s1"));
    }
    assert!(q.command("write vda 8192 8192 --seed 7").contains("wrote"));
    assert_eq!(q.checksum("s1"), sum);
    q.poweroff();
}

/// `snapshot autoextend` (LVM's `snapshot_autoextend_threshold`/`_percent`): s1 in an 8 MiB
/// region with 16 MiB free before the next store, auto-extend at 70 % by 50 %. 14 MiB of
/// first writes, which would overflow the original store, finish with s1 active; the
/// console reported each extension; the policy survives a reboot. Then writes past all the
/// free space: auto-extend says it cannot grow it, and the snapshot is invalidated
/// (overflow) as without auto-extend.
#[test]
fn autoextend_keeps_a_filling_snapshot_alive_while_there_is_room() {
    let (o, c) = (
        Image::new("life-auto-o", 32 * MIB),
        Image::new("life-auto-c", 64 * MIB),
    );
    let before = tests::xorshift_bytes(32 * MIB as usize, 12);
    o.write(0, &before);
    let mut q = boot(&o, &c);
    assert!(q
        .command("snapshot create s1 vda vdb:0+16384")
        .contains("created snapshot s1"));
    assert!(q
        .command("snapshot create s2 vda vdb:49152+65536")
        .contains("created snapshot s2"));
    for (line, expected) in [
        (
            "snapshot autoextend s1",
            "error: usage: snapshot autoextend NAME",
        ),
        (
            "snapshot autoextend s1 --threshold 70",
            "error: usage: snapshot autoextend NAME",
        ),
        (
            "snapshot autoextend s1 --threshold 0 --by 20%",
            "error: --threshold 0 must be 1 to 99",
        ),
        (
            "snapshot autoextend s1 --threshold 70 --by 0%",
            "error: --by 0% must be 1% to 1000%",
        ),
        ("snapshot autoextend s1 --threshold 70 --by 12x", "error: "),
        (
            "snapshot autoextend s1 --off --threshold 70",
            "error: usage: snapshot autoextend NAME",
        ),
    ] {
        let out = q.command(line);
        assert!(out.contains(expected), "{line}: {out}");
        assert_eq!(out.matches("error:").count(), 1, "{line}: {out}");
    }
    let out = q.command("snapshot autoextend s1 --threshold 70 --by 50%");
    assert!(
        out.contains("snapshot s1: auto-extend at 70% by 50%"),
        "{out}"
    );
    assert!(q
        .command_timeout("write vda 0 28672 --seed 31", TIMEOUT * 4)
        .contains("wrote"));
    let t = q.transcript();
    assert!(t.contains("snapshot s1: auto-extended to 12 MiB"), "{t}");
    assert!(t.contains("% used; auto-extending by"), "{t}");
    let list = q.command("snapshot list --json");
    assert!(
        !list.contains("overflow") && !list.contains("invalid"),
        "{list}"
    );
    assert_eq!(q.checksum("s1"), tests::sha256_hex(&before));
    q.poweroff();

    let mut q = boot(&o, &c);
    let status = q.command("snapshot status s1");
    assert!(status.contains("auto-extend at 70% by 50%"), "{status}");
    // 12 MiB more first writes: past the 24 MiB the free space allows.
    let _ = q.command_timeout("write vda 28672 24576 --seed 32", TIMEOUT * 4);
    let t = q.transcript();
    assert!(
        t.contains("auto-extend cannot grow it: no free space after its store on vdb"),
        "{t}"
    );
    let list = q.command("snapshot list");
    assert!(list.contains("overflow"), "{list}");
    assert!(
        list.contains("vdb:0+49152"),
        "grown to the next store: {list}"
    );
    q.poweroff();
}

/// QEMU `block_resize` on the whole-device COW disk of a filling snapshot: the appliance
/// takes the new capacity from the configuration interrupt, `snapshot extend` grows the
/// store into it, writes go on past the old size, and a reboot finds the larger store.
#[test]
fn block_resize_grows_a_whole_device_store() {
    let (o, c) = (
        Image::new("life-resize-o", 32 * MIB),
        Image::new("life-resize-c", 16 * MIB),
    );
    let before = tests::xorshift_bytes(32 * MIB as usize, 14);
    o.write(0, &before);
    let sock = std::env::temp_dir().join(format!("snapfw-qmp-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&o.path, "LIFE-O")
        .virtio_disk(&c.path, "LIFE-C")
        .qmp(&sock)
        .start();
    q.wait_prompt();
    assert!(q
        .command("snapshot create s1 vda vdb")
        .contains("created snapshot s1"));
    assert!(q
        .command_timeout("write vda 0 24576 --seed 41", TIMEOUT * 2)
        .contains("wrote"));
    let out = q.command("snapshot extend s1 +16M");
    assert!(
        out.contains("error: no room on vdb after the store of s1: 0 MiB free"),
        "{out}"
    );
    // vdb is the second -drive: id d4 (each disk adds four arguments before it).
    let answer = tests::qmp(
        &sock,
        r#"{"execute":"block_resize","arguments":{"device":"d4","size":33554432}}"#,
    );
    assert!(answer.contains("\"return\""), "{answer}");
    q.expect("vdb: capacity grew from 32768 to 65536 blocks", TIMEOUT);
    q.settle(std::time::Duration::from_millis(200));
    let out = q.command("snapshot extend s1 +16M");
    assert!(out.contains("extended snapshot s1 to 32 MiB"), "{out}");
    assert!(q
        .command_timeout("write vda 24576 28672 --seed 42", TIMEOUT * 2)
        .contains("wrote"));
    let list = q.command("snapshot list");
    assert!(
        !list.contains("overflow") && list.contains("active"),
        "{list}"
    );
    assert_eq!(q.checksum("s1"), tests::sha256_hex(&before));
    q.poweroff();
    let _ = std::fs::remove_file(&sock);

    let mut q = boot(&o, &c);
    let list = q.command("snapshot list --json");
    assert!(list.contains(r#""cow_sectors":65536"#), "{list}");
    assert_eq!(q.checksum("s1"), tests::sha256_hex(&before));
    q.poweroff();
}
