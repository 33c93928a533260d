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
