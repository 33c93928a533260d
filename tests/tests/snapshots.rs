//! Snapshots on real disks (first part of the snapshot issue): create a snapshot of `vda` on
//! `vdb`, write over the origin, and check that the snapshot still reads as the origin did,
//! on the appliance (`checksum`) and on the host (the COW image read with the `snapshot`
//! crate's loader). Also the console's refusals and `list`/`status`/`delete`.

use tests::cow::CowImage;
use tests::{result_line, sha256_hex, Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;

fn boot(a: &Image, b: &Image) -> Qemu {
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&a.path, "ORIGIN-A")
        .virtio_disk(&b.path, "COW-B")
        .start();
    q.wait_prompt();
    q
}

#[test]
fn snapshot_keeps_the_origin_as_it_was() {
    let (a, b) = (
        Image::new("snap-origin", 16 * MIB),
        Image::new("snap-cow", 8 * MIB),
    );
    let before: Vec<u8> = (0..16 * MIB as usize)
        .map(|i| (i / 4096 % 251) as u8 ^ (i % 7) as u8)
        .collect();
    a.write(0, &before);
    let mut q = boot(&a, &b);
    let out = q.command("snapshot create s1 vda vdb");
    assert!(out.contains("created snapshot s1 (4 KiB chunks)"), "{out}");
    let sum = q.command_timeout("checksum s1", TIMEOUT * 2);
    assert!(result_line(&sum).starts_with(&sha256_hex(&before)), "{sum}");

    // Single blocks, partial chunks, ranges across chunks, and enough chunks to fill more
    // than one metadata area (4 KiB chunks: 256 records per area).
    for line in [
        "write vda 0 1 --byte 0x11",
        "write vda 9 3 --byte 0x22",
        "write vda 15 10 --seed 5",
        "write vda 4096 4000 --seed 6",
        "write vda 20000 20 --byte 0x33",
    ] {
        let out = q.command(line);
        assert!(out.contains("wrote"), "{line}: {out}");
    }
    let sum = q.command_timeout("checksum s1", TIMEOUT * 2);
    assert!(
        result_line(&sum).starts_with(&sha256_hex(&before)),
        "snapshot changed: {sum}"
    );
    let list = q.command("snapshot list");
    let row = list
        .lines()
        .find(|l| l.starts_with("s1"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        row.contains("vda") && row.contains("vdb") && row.contains("active"),
        "{row}"
    );
    let status = q.command("snapshot status s1");
    assert!(status.starts_with("0 32768 snapshot "), "{status}");
    // Every write above copied a chunk first: all were held, and the hold time is reported.
    let held = status
        .split("held writes ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{status}"));
    assert!(held >= 5, "{status}");
    assert!(status.contains("hold time p99 "), "{status}");
    // The origin image holds the new data.
    assert!(a.read(0, 512).iter().all(|x| *x == 0x11));
    let mut seeded = vec![0u8; 4000 * 512];
    kernel::util::pattern::fill_seeded(&mut seeded, 6, 4096 * 512);
    assert_eq!(a.read(4096 * 512, seeded.len()), seeded);

    // The host reads the COW image like Linux would and sees the same snapshot.
    let view = CowImage {
        bytes: &b.read(0, (8 * MIB) as usize),
    }
    .snapshot_view(&a.read(0, (16 * MIB) as usize))
    .expect("the COW store loads on the host");
    assert_eq!(
        sha256_hex(&view),
        sha256_hex(&before),
        "host-side reconstruction differs"
    );

    // bench through the engine: origin writes that copy, and snapshot reads. The random map
    // touches every chunk of the region, so the region (1,024 chunks, half of them copied
    // above) must fit the 8 MiB store with what is already in it.
    let out = q.command("bench vda --rw randwrite --qd 32 --ios 3000 --size 4m");
    assert!(out.contains("3000 I/Os"), "{out}");
    let out = q.command("bench s1 --rw randread --qd 32 --ios 3000");
    assert!(out.contains("3000 I/Os"), "{out}");
    let json = q.command("snapshot list --json");
    assert!(
        json.contains(r#""name":"s1","origin":"vda","cow":"vdb""#),
        "{json}"
    );
    let mem = q.command("mem --json");
    assert!(mem.contains(r#""io_path_allocations":0"#), "{mem}");
    q.poweroff();
}

#[test]
fn snapshot_commands_refuse_bad_requests() {
    let (a, b) = (
        Image::new("snapbad-a", 16 * MIB),
        Image::new("snapbad-b", 8 * MIB),
    );
    let mut q = boot(&a, &b);
    for (line, expected) in [
        ("snapshot", "error: missing argument <SUBCOMMAND>"),
        ("snapshot frob", "error: unknown snapshot subcommand 'frob'"),
        ("snapshot create s1 vda", "error: usage: snapshot create"),
        (
            "snapshot create s1 vda vda",
            "error: the COW store must be on another device",
        ),
        (
            "snapshot create s1 vdx vdb",
            "error: no device 'vdx' for the origin",
        ),
        (
            "snapshot create s1 vda vdq",
            "error: no device 'vdq' for the COW store",
        ),
        (
            "snapshot create s1 vda vdb --chunk 3k",
            "error: --chunk must be a power of two",
        ),
        (
            "snapshot create s1 vda vdb --chunk 1m",
            "error: --chunk must be a power of two",
        ),
        (
            "snapshot create s1 vda vdb:0+8",
            "error: the COW store needs at least 3 chunks",
        ),
        (
            "snapshot create s1 vda vdb:16000+1000",
            "error: region 16000+1000 is not inside vdb",
        ),
        (
            "snapshot create bad/name vda vdb",
            "error: invalid snapshot name",
        ),
        (
            "snapshot create vdb vda vdb",
            "error: the name 'vdb' is already taken",
        ),
        ("snapshot status nope", "error: no snapshot 'nope'"),
        ("snapshot delete nope", "error: no snapshot 'nope'"),
    ] {
        let out = q.command(line);
        assert!(out.trim_start().starts_with(expected), "{line}: {out}");
    }
    assert!(q.command("snapshot list").contains("no snapshots"));
    // Two snapshots in regions of one disk, then the refusals that need them.
    assert!(q
        .command("snapshot create s1 vda vdb:0+8192")
        .contains("created snapshot s1"));
    assert!(q
        .command("snapshot create s2 vda vdb:8192+8192 --chunk 8k")
        .contains("created snapshot s2"));
    for (line, expected) in [
        (
            "snapshot create s1 vda vdb:0+8192",
            "error: the name 's1' is already taken",
        ),
        (
            "snapshot create s3 vda vdb:4000+8192",
            "error: that COW region overlaps",
        ),
        (
            "snapshot create s3 vdb vda",
            "error: vdb holds the COW store of snapshot",
        ),
        (
            "write vdb 0 1 --byte 1",
            "error: vdb holds the COW store of snapshot",
        ),
        ("write s1 0 1 --byte 1", "error: s1 is read-only"),
    ] {
        let out = q.command(line);
        assert!(out.trim_start().starts_with(expected), "{line}: {out}");
    }
    assert!(q
        .command("write vda 100 50 --seed 1")
        .contains("wrote 50 blocks"));
    let out = q.command("snapshot delete s1");
    assert!(out.contains("deleted snapshot s1"), "{out}");
    let list = q.command("snapshot list");
    assert!(!list.contains("s1 ") && list.contains("s2"), "{list}");
    assert!(q
        .command("read s1 0")
        .trim_start()
        .starts_with("error: no device or snapshot 's1'"));
    q.poweroff();
}

#[test]
fn snapshots_come_back_after_reboot_and_a_fresh_start() {
    let (a, b) = (
        Image::new("snappers-a", 16 * MIB),
        Image::new("snappers-b", 8 * MIB),
    );
    let before: Vec<u8> = (0..16 * MIB as usize).map(|i| (i % 241) as u8).collect();
    a.write(0, &before);
    let boot_args = |q: Boot| {
        q.virtio_disk(&a.path, "ORIGIN-A")
            .virtio_disk(&b.path, "COW-B")
    };
    let mut q = boot_args(Boot {
        no_reboot: false,
        ..Boot::kernel("q35", "testing")
    })
    .start();
    q.wait_prompt();
    assert!(q
        .command("snapshot create keep vda vdb --chunk 16k")
        .contains("created snapshot keep"));
    assert!(q
        .command("write vda 64 2000 --seed 9")
        .contains("wrote 2000 blocks"));
    let expected = sha256_hex(&before);
    // Reboot: the store is found again with no command.
    q.send(b"reboot\r");
    q.expect("rebooting", TIMEOUT);
    q.expect("snapshot keep: store on vdb attached to vda", TIMEOUT);
    q.wait_prompt();
    let list = q.command("snapshot list");
    assert!(
        list.contains("keep") && list.contains("active") && list.contains("16Ki"),
        "{list}"
    );
    let sum = q.command_timeout("checksum keep", TIMEOUT * 2);
    assert!(
        result_line(&sum).starts_with(&expected),
        "after reboot: {sum}"
    );
    q.poweroff();
    // A fresh QEMU on the same images.
    let mut q = boot_args(Boot::kernel("q35", "testing")).start();
    q.expect("1 snapshot(s) back from their stores", TIMEOUT);
    q.wait_prompt();
    let sum = q.command_timeout("checksum keep", TIMEOUT * 2);
    assert!(
        result_line(&sum).starts_with(&expected),
        "after a fresh start: {sum}"
    );
    // Writes keep copying after the reload.
    assert!(q
        .command("write vda 0 300 --byte 0x5e")
        .contains("wrote 300 blocks"));
    let sum = q.command_timeout("checksum keep", TIMEOUT * 2);
    assert!(
        result_line(&sum).starts_with(&expected),
        "after more writes: {sum}"
    );
    q.poweroff();
    let view = CowImage {
        bytes: &b.read(0, (8 * MIB) as usize),
    }
    .snapshot_view(&a.read(0, (16 * MIB) as usize))
    .expect("the COW store loads on the host");
    assert_eq!(sha256_hex(&view), expected);
}

#[test]
fn a_store_whose_origin_is_missing_is_listed_and_left_alone() {
    let (a, b) = (
        Image::new("orphan-a", 16 * MIB),
        Image::new("orphan-b", 8 * MIB),
    );
    let mut q = boot(&a, &b);
    assert!(q
        .command("snapshot create lost vda vdb")
        .contains("created snapshot lost"));
    q.poweroff();
    let cow_before = b.read(0, (8 * MIB) as usize);
    // Boot with the COW disk only.
    let mut q = Boot::kernel("q35", "testing")
        .virtio_disk(&b.path, "COW-B")
        .start();
    q.wait_prompt();
    let list = q.command("snapshot list");
    assert!(
        list.contains("store on vda: snapshot 'lost': its origin (serial 'ORIGIN-A'"),
        "{list}"
    );
    assert!(q
        .command("read lost 0")
        .trim_start()
        .starts_with("error: no device or snapshot 'lost'"));
    q.poweroff();
    assert!(
        b.read(0, (8 * MIB) as usize) == cow_before,
        "the store was modified"
    );
}

#[test]
fn writable_snapshot_and_two_snapshots_one_on_nvme() {
    let (a, b) = (
        Image::new("snap2-a", 16 * MIB),
        Image::new("snap2-b", 8 * MIB),
    );
    let n = Image::new("snap2-nvme", 8 * MIB);
    let before: Vec<u8> = (0..16 * MIB as usize)
        .map(|i| (i / 512 % 253) as u8)
        .collect();
    a.write(0, &before);
    let mut q = Boot::kernel("q35", "testing")
        .virtio_disk(&a.path, "ORIGIN-A")
        .virtio_disk(&b.path, "COW-B")
        .nvme("COW-NVME", &[(&n.path, "on")])
        .start();
    q.wait_prompt();
    assert!(q
        .command("snapshot create early vda vdb --chunk 4k")
        .contains("created snapshot early"));
    assert!(q
        .command("write vda 0 64 --byte 0x77")
        .contains("wrote 64 blocks"));
    let mut middle = before.clone();
    middle[..64 * 512].fill(0x77);
    assert!(q
        .command("snapshot create late vda nvme0n1 --chunk 64k --writable")
        .contains("created snapshot late"));
    assert!(q
        .command("write vda 1000 500 --seed 3")
        .contains("wrote 500 blocks"));
    // Each keeps its own instant.
    let s1 = q.command_timeout("checksum early", TIMEOUT * 2);
    assert!(result_line(&s1).starts_with(&sha256_hex(&before)), "{s1}");
    let s2 = q.command_timeout("checksum late", TIMEOUT * 2);
    assert!(result_line(&s2).starts_with(&sha256_hex(&middle)), "{s2}");
    // The writable one takes writes; the origin does not see them.
    assert!(q
        .command("write late 2048 16 --byte 0xab")
        .contains("wrote 16 blocks"));
    let dump = q.command("read late 2048 1");
    assert!(dump.starts_with("00100000  ab ab ab ab"), "{dump}");
    let origin = q.command("read vda 2048 1");
    assert!(!origin.contains(" ab ab ab ab"), "{origin}");
    assert!(q
        .command("write early 0 1 --byte 1")
        .trim_start()
        .starts_with("error: early is read-only"));
    q.poweroff();
}

#[test]
fn an_overflowing_store_is_invalidated_and_the_origin_keeps_every_write() {
    // 64 KiB chunks on a 1 MiB store: header, one area, 14 data chunks.
    let (a, b) = (Image::new("ovf-a", 16 * MIB), Image::new("ovf-b", MIB));
    let mut q = boot(&a, &b);
    assert!(q
        .command("snapshot create small vda vdb --chunk 64k")
        .contains("created snapshot small"));
    let out = q.command("write vda 0 8192 --seed 11");
    assert!(out.contains("wrote 8192 blocks"), "{out}");
    assert!(
        q.transcript()
            .contains("snapshot small invalidated: COW store full (Overflow)"),
        "{}",
        q.transcript()
    );
    let list = q.command("snapshot list");
    assert!(
        list.contains("overflow") && list.contains("Overflow"),
        "{list}"
    );
    let mut expected = vec![0u8; 8192 * 512];
    kernel::util::pattern::fill_seeded(&mut expected, 11, 0);
    assert_eq!(
        a.read(0, expected.len()),
        expected,
        "the origin lost writes"
    );
    let out = q.command("read small 0");
    assert!(
        out.contains("error:"),
        "reads of an invalid snapshot fail: {out}"
    );
    let out = q.command("snapshot delete small");
    assert!(
        out.contains("deleted snapshot small") && !out.contains("error"),
        "{out}"
    );
    q.poweroff();
    // A fresh start finds no store on vdb: the delete wiped it. (It used to write the zeroes
    // with FUA, which virtio-blk with a write-back cache refuses, and the store came back as
    // invalid.)
    let mut q = boot(&a, &b);
    let list = q.command("snapshot list");
    assert!(!list.contains("small"), "{list}");
    q.poweroff();
}

#[test]
fn power_cuts_during_origin_writes() {
    for round in 0..3u64 {
        let (a, b) = (
            Image::new(&format!("cut-a-{round}"), 16 * MIB),
            Image::new(&format!("cut-b-{round}"), 24 * MIB),
        );
        let before: Vec<u8> = (0..16 * MIB as usize)
            .map(|i| (i / 4096 % 239) as u8 ^ round as u8)
            .collect();
        a.write(0, &before);
        let mut q = boot(&a, &b);
        assert!(q
            .command("snapshot create cut vda vdb")
            .contains("created snapshot cut"));
        let seed = 100 + round;
        q.send(format!("write vda 0 32768 --seed {seed} --flush-every 256\r").as_bytes());
        q.expect("durable through", TIMEOUT);
        // Pull the plug at a different moment each round.
        std::thread::sleep(std::time::Duration::from_millis(150 + 200 * round));
        q.kill();
        let transcript = q.transcript();
        let durable: u64 = transcript
            .rsplit("vda: durable through LBA ")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(durable > 0, "{transcript}");
        eprintln!("power cut round {round}: durable through LBA {durable} of 32768");
        // Every write reported durable is on the origin.
        let mut expected = vec![0u8; (durable * 512) as usize];
        kernel::util::pattern::fill_seeded(&mut expected, seed, 0);
        assert_eq!(
            a.read(0, expected.len()),
            expected,
            "round {round}: lost durable writes below LBA {durable}"
        );
        // The store loads and the snapshot is intact.
        let mut q = boot(&a, &b);
        let list = q.command("snapshot list");
        assert!(
            list.contains("cut") && list.contains("active"),
            "round {round}: {list}"
        );
        let sum = q.command_timeout("checksum cut", TIMEOUT * 2);
        assert!(
            result_line(&sum).starts_with(&sha256_hex(&before)),
            "round {round}: snapshot changed: {sum}"
        );
        q.poweroff();
        let view = CowImage {
            bytes: &b.read(0, (24 * MIB) as usize),
        }
        .snapshot_view(&a.read(0, (16 * MIB) as usize))
        .expect("the store loads on the host after a power cut");
        assert_eq!(
            sha256_hex(&view),
            sha256_hex(&before),
            "round {round}: host view"
        );
    }
}

#[test]
fn a_store_made_by_linux_is_listed_and_can_be_attached() {
    // A store as Linux writes it: 4 KiB chunks, header, area 0 with three records, no binding.
    let (a, b) = (
        Image::new("linux-a", 16 * MIB),
        Image::new("linux-b", 4 * MIB),
    );
    let origin: Vec<u8> = (0..16 * MIB as usize)
        .map(|i| (i / 4096 % 200) as u8)
        .collect();
    a.write(0, &origin);
    let mut cow = vec![0u8; (4 * MIB) as usize];
    cow[0..4].copy_from_slice(&0x7041_6E53u32.to_le_bytes());
    cow[4..8].copy_from_slice(&1u32.to_le_bytes());
    cow[8..12].copy_from_slice(&1u32.to_le_bytes());
    cow[12..16].copy_from_slice(&8u32.to_le_bytes());
    for (i, (old, new)) in [(5u64, 2u64), (6, 3), (100, 4)].into_iter().enumerate() {
        let at = 4096 + i * 16;
        cow[at..at + 8].copy_from_slice(&old.to_le_bytes());
        cow[at + 8..at + 16].copy_from_slice(&new.to_le_bytes());
        cow[new as usize * 4096..(new as usize + 1) * 4096].fill(0xE0 + i as u8);
    }
    b.write(0, &cow);
    let expected = CowImage { bytes: &cow }
        .snapshot_view(&origin)
        .expect("host loads it");
    let mut q = boot(&a, &b);
    let list = q.command("snapshot list");
    assert!(
        list.contains("store on vdb: a dm-snapshot store without a snapfw binding"),
        "{list}"
    );
    let out = q.command("snapshot create over vda vdb");
    assert!(
        out.trim_start()
            .starts_with("error: vdb already holds a store"),
        "create must not overwrite a store found at boot: {out}"
    );
    let out = q.command("snapshot attach lx vda vdb --no-write");
    assert!(out.contains("attached snapshot lx"), "{out}");
    let sum = q.command_timeout("checksum lx", TIMEOUT * 2);
    assert!(
        result_line(&sum).starts_with(&sha256_hex(&expected)),
        "{sum}"
    );
    assert!(
        q.command("snapshot status lx")
            .starts_with("0 32768 snapshot 40/8192 16"),
        "dmsetup status"
    );
    // Origin writes now copy into the adopted store, and the snapshot keeps its view.
    assert!(q
        .command("write vda 0 2048 --byte 0x99")
        .contains("wrote 2048 blocks"));
    let sum = q.command_timeout("checksum lx", TIMEOUT * 2);
    assert!(
        result_line(&sum).starts_with(&sha256_hex(&expected)),
        "after origin writes: {sum}"
    );
    assert!(q
        .command("snapshot attach lx2 vda vdb")
        .contains("error: vdb already holds"));
    q.poweroff();
    // Still readable by the host (as Linux would): no binding was added.
    let after = b.read(0, (4 * MIB) as usize);
    assert!(
        after[16..48].iter().all(|x| *x == 0),
        "bytes after the header stay as Linux wrote them"
    );
    let view = CowImage { bytes: &after }
        .snapshot_view(&a.read(0, (16 * MIB) as usize))
        .expect("loads");
    assert_eq!(sha256_hex(&view), sha256_hex(&expected));

    // Attached without --no-write, the binding goes into the store (where Linux does not
    // look) and the snapshot comes back by itself at the next boot.
    let mut q = boot(&a, &b);
    let out = q.command("snapshot attach lx vda vdb");
    assert!(out.contains("its binding is written to the store"), "{out}");
    q.poweroff();
    let after = b.read(0, (4 * MIB) as usize);
    assert_eq!(&after[16..24], b"snapfwB3");
    let view = CowImage { bytes: &after }
        .snapshot_view(&a.read(0, (16 * MIB) as usize))
        .expect("Linux's format still loads");
    assert_eq!(sha256_hex(&view), sha256_hex(&expected));
    let mut q = boot(&a, &b);
    let sum = q.command_timeout("checksum lx", TIMEOUT * 2);
    assert!(
        result_line(&sum).starts_with(&sha256_hex(&expected)),
        "{sum}"
    );
    q.poweroff();
}

#[test]
fn region_stores_come_back_after_a_fresh_start_and_a_delete() {
    // Two stores in regions of one disk, with a gap before each; the second is writable.
    let (a, b) = (
        Image::new("regions-a", 16 * MIB),
        Image::new("regions-b", 16 * MIB),
    );
    let before: Vec<u8> = (0..16 * MIB as usize).map(|i| (i % 239) as u8).collect();
    a.write(0, &before);
    let expected = sha256_hex(&before);
    let mut q = boot(&a, &b);
    for line in [
        "snapshot create low vda vdb:4096+8192",
        "snapshot create high vda vdb:20000+8192 --writable --chunk 8k",
    ] {
        assert!(q.command(line).contains("created snapshot"), "{line}");
    }
    assert!(q
        .command("write vda 0 3000 --seed 4")
        .contains("wrote 3000 blocks"));
    assert!(q
        .command("write high 100 8 --byte 0x7a")
        .contains("wrote 8 blocks"));
    let high_sum = result_line(&q.command_timeout("checksum high", TIMEOUT * 2)).to_string();
    q.poweroff();
    // The gap before the first store holds a free-extent marker (not a store).
    let marker = b.read(0, 28);
    assert_eq!(&marker[..8], b"snapfwF1");
    assert_eq!(u64::from_le_bytes(marker[16..24].try_into().unwrap()), 4096);

    let mut q = boot(&a, &b);
    let list = q.command("snapshot list");
    for (name, cow) in [("low", "vdb:4096+8192"), ("high", "vdb:20000+8192")] {
        let row = list
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing after a fresh start: {list}"));
        assert!(row.contains(cow) && row.contains("active"), "{row}");
    }
    let sum = q.command_timeout("checksum low", TIMEOUT * 2);
    assert!(result_line(&sum).starts_with(&expected), "low: {sum}");
    assert_eq!(
        result_line(&q.command_timeout("checksum high", TIMEOUT * 2)),
        high_sum,
        "high changed across the restart"
    );
    // Still writable after the restart.
    assert!(q
        .command("write high 200 8 --byte 0x7b")
        .contains("wrote 8 blocks"));
    // Deleting the first store leaves a marker over its region: the second is still found.
    assert!(q
        .command("snapshot delete low")
        .contains("deleted snapshot low"));
    q.poweroff();
    let mut q = boot(&a, &b);
    let list = q.command("snapshot list");
    assert!(!list.contains("low "), "{list}");
    assert!(list.contains("high"), "{list}");
    let data = q.command("read high 200 1");
    assert!(data.contains("7b 7b 7b 7b"), "{data}");
    q.poweroff();
}
