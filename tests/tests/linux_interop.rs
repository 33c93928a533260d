//! snapfw's COW stores are Linux dm-snapshot's persistent stores, checked with a real Linux
//! kernel and the real `dmsetup` (Debian's, in the guest `make deps` builds), both ways:
//! - the appliance makes snapshots (a whole disk, and regions of another disk read through a
//!   dm-linear mapping, as the README says), writes over the origin across several metadata
//!   areas, and powers off; Linux activates each store with the README's `dmsetup` line and
//!   must read what the appliance's `checksum` read, with the same `dmsetup status`;
//! - Linux makes persistent snapshots with `dmsetup` (writes through a `snapshot-origin`
//!   mapping, as LVM does), removes them cleanly; the appliance lists the stores as unbound,
//!   attaches them and must read what Linux read;
//! - Linux writes into a store the appliance made (through `snapshot-origin`); the appliance
//!   finds its snapshot again by its binding and reads what Linux read.

use std::time::Duration;
use tests::cow::CowImage;
use tests::{sha256_hex, Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;
/// Linux under TCG boots in 10-30 s; a loaded machine may need more.
const LINUX_BOOT: Duration = Duration::from_secs(180);

/// The `dmsetup status` line the appliance prints first for `snapshot status NAME`.
fn appliance_status(q: &mut Qemu, name: &str) -> String {
    let out = q.command(&format!("snapshot status {name}"));
    out.lines().next().unwrap_or("").trim().to_string()
}

/// Runs `line` in the Linux guest; fails with the output unless it exits 0.
fn linux(q: &mut Qemu, line: &str) -> String {
    let (out, code) = q.shell(line, TIMEOUT * 2);
    assert_eq!(code, 0, "Linux: `{line}` failed:\n{out}");
    out
}

/// Linux's `sha256sum DEV`: the hash alone.
fn linux_sha256(q: &mut Qemu, dev: &str) -> String {
    let out = linux(q, &format!("sha256sum {dev}"));
    let line = out
        .lines()
        .find(|l| l.trim_end().ends_with(dev))
        .unwrap_or_else(|| panic!("Linux: sha256sum {dev} printed:\n{out}"));
    line.split_whitespace().next().unwrap_or("").to_string()
}

/// Linux's `dmsetup status NAME` line.
fn linux_status(q: &mut Qemu, name: &str) -> String {
    let out = linux(q, &format!("dmsetup status {name}"));
    out.lines()
        .rfind(|l| l.contains(" snapshot "))
        .unwrap_or_else(|| panic!("Linux: dmsetup status {name} printed:\n{out}"))
        .trim()
        .to_string()
}

/// Boots the Linux guest on `disks` (in order: vda, vdb, …) and checks each disk is the one
/// meant, by serial.
fn boot_linux(disks: &[(&Image, &str)]) -> Qemu {
    let mut boot = Boot::linux_guest();
    for (image, serial) in disks {
        boot = boot.virtio_disk(&image.path, serial);
    }
    let mut q = boot.start();
    let ready = q.wait_linux(LINUX_BOOT);
    eprintln!("Linux guest: {ready} after {:?}", q.elapsed());
    for (n, (_, serial)) in disks.iter().enumerate() {
        let dev = format!("vd{}", (b'a' + n as u8) as char);
        let out = linux(&mut q, &format!("cat /sys/block/{dev}/serial"));
        assert!(out.contains(serial), "Linux's {dev} is not {serial}: {out}");
    }
    q
}

/// Powers the Linux guest off (ACPI soft-off ends QEMU with status 0).
fn linux_poweroff(mut q: Qemu) {
    q.send(b"sync; poweroff -f\n");
    let status = q.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "Linux power-off");
}

#[test]
fn linux_reads_the_appliances_snapshots() {
    let (a, b, c) = (
        Image::new("lx1-origin", 16 * MIB),
        Image::new("lx1-cow", 8 * MIB),
        Image::new("lx1-regions", 20 * MIB),
    );
    let before: Vec<u8> = (0..16 * MIB as usize)
        .map(|i| (i / 4096 % 253) as u8 ^ (i % 11) as u8)
        .collect();
    a.write(0, &before);
    let origin_disks = [(&a, "ORIGIN-A"), (&b, "COW-B"), (&c, "REGIONS-C")];

    // The appliance: a whole-disk store with 4 KiB chunks, and two region stores on vdc (the
    // second with 8 KiB chunks and writable).
    let mut q = Boot::kernel("q35", "testing")
        .virtio_disk(&a.path, "ORIGIN-A")
        .virtio_disk(&b.path, "COW-B")
        .virtio_disk(&c.path, "REGIONS-C")
        .start();
    q.wait_prompt();
    for line in [
        "snapshot create s1 vda vdb",
        "snapshot create r1 vda vdc:2048+16384",
        "snapshot create r2 vda vdc:20480+16384 --chunk 8k --writable",
    ] {
        let out = q.command(line);
        assert!(out.contains("created snapshot"), "{line}: {out}");
    }
    // 1532 4 KiB chunks in one run, a partial chunk inside it, three chunks and the last
    // sector elsewhere: 1536 records, six full metadata areas of 256 in s1 and r1 (the table
    // goes on into the zeroed seventh); writes to the writable snapshot, on a chunk it
    // already copied and on one nobody copied yet.
    for line in [
        "write vda 0 12256 --seed 21",
        "write vda 12009 3 --byte 0x22",
        "write vda 20000 20 --byte 0x33",
        "write vda 32767 1 --byte 0x44",
        "write r2 100 8 --byte 0x7a",
        "write r2 30000 16 --seed 22",
    ] {
        let out = q.command_timeout(line, TIMEOUT * 2);
        assert!(out.contains("wrote"), "{line}: {out}");
    }
    let mut appliance = Vec::new();
    for name in ["s1", "r1", "r2"] {
        let sum = q.checksum(name);
        let status = appliance_status(&mut q, name);
        appliance.push((name, sum, status));
    }
    let expected = sha256_hex(&before);
    for (name, sum, _) in &appliance[..2] {
        assert_eq!(
            sum, &expected,
            "appliance: {name} does not read as the origin did"
        );
    }
    q.poweroff();
    let cow_before = (
        sha256_hex(&b.read(0, (8 * MIB) as usize)),
        sha256_hex(&c.read(0, (20 * MIB) as usize)),
    );

    // Linux, with the README's lines.
    let mut q = boot_linux(&origin_disks);
    let size = "$(blockdev --getsz /dev/vda)";
    for line in [
        format!("dmsetup create snap1 --table \"0 {size} snapshot /dev/vda /dev/vdb P 8\""),
        "dmsetup create cow1 --table \"0 16384 linear /dev/vdc 2048\"".to_string(),
        format!("dmsetup create snap2 --table \"0 {size} snapshot /dev/vda /dev/mapper/cow1 P 8\""),
        "dmsetup create cow2 --table \"0 16384 linear /dev/vdc 20480\"".to_string(),
        format!(
            "dmsetup create snap3 --table \"0 {size} snapshot /dev/vda /dev/mapper/cow2 P 16\""
        ),
    ] {
        linux(&mut q, &line);
    }
    let mut seen = Vec::new();
    for dev in ["snap1", "snap2", "snap3"] {
        let sum = linux_sha256(&mut q, &format!("/dev/mapper/{dev}"));
        let status = linux_status(&mut q, dev);
        seen.push((dev, sum, status));
    }
    linux(&mut q, "dmsetup remove snap3 && dmsetup remove cow2 && dmsetup remove snap2 && dmsetup remove cow1 && dmsetup remove snap1");
    linux_poweroff(q);

    let report: String = appliance
        .iter()
        .zip(&seen)
        .map(|((name, sum, status), (dev, lsum, lstatus))| {
            format!("  {name}: appliance {sum} [{status}]\n  {dev}: Linux     {lsum} [{lstatus}]\n")
        })
        .collect();
    eprintln!("{report}");
    for ((name, sum, status), (dev, lsum, lstatus)) in appliance.iter().zip(&seen) {
        assert_eq!(
            sum, lsum,
            "{name} reads differently on Linux ({dev}):\n{report}"
        );
        assert_eq!(
            status, lstatus,
            "{name}: dmsetup status differs ({dev}):\n{report}"
        );
    }
    // Activating and reading wrote nothing to the stores.
    assert_eq!(
        (
            sha256_hex(&b.read(0, (8 * MIB) as usize)),
            sha256_hex(&c.read(0, (20 * MIB) as usize))
        ),
        cow_before,
        "Linux changed a store while reading it"
    );
}

#[test]
fn the_appliance_reads_snapshots_linux_made() {
    let (a, b, c) = (
        Image::new("lx2-origin", 16 * MIB),
        Image::new("lx2-cow4k", 8 * MIB),
        Image::new("lx2-cow8k", 8 * MIB),
    );
    let before: Vec<u8> = (0..16 * MIB as usize)
        .map(|i| (i / 512 % 249) as u8 ^ (i % 13) as u8)
        .collect();
    a.write(0, &before);
    // Not zero, so that only Linux's zeroing of the first block makes them new stores.
    b.write(0, &[0x5a; 8192]);
    c.write(0, &[0x5a; 8192]);

    let mut q = boot_linux(&[(&a, "ORIGIN-A"), (&b, "COW-4K"), (&c, "COW-8K")]);
    let size = "$(blockdev --getsz /dev/vda)";
    for line in [
        "dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync".to_string(),
        "dd if=/dev/zero of=/dev/vdc bs=4096 count=1 conv=fsync".to_string(),
        format!("dmsetup create snap --table \"0 {size} snapshot /dev/vda /dev/vdb P 8\""),
        format!("dmsetup create snap8k --table \"0 {size} snapshot /dev/vda /dev/vdc P 16\""),
        format!("dmsetup create origin --table \"0 {size} snapshot-origin /dev/vda\""),
        // 1533 4 KiB chunks in one run, then a partial chunk, a single sector and the last
        // sector elsewhere: 1536 records, six full areas of 256 in the 4 KiB store.
        "dd if=/dev/urandom of=/dev/mapper/origin bs=4096 count=1533 conv=fsync".to_string(),
        "dd if=/dev/urandom of=/dev/mapper/origin bs=512 seek=20001 count=3 conv=fsync".to_string(),
        "dd if=/dev/urandom of=/dev/mapper/origin bs=512 seek=25000 count=1 conv=fsync".to_string(),
        "dd if=/dev/urandom of=/dev/mapper/origin bs=512 seek=32767 count=1 conv=fsync".to_string(),
        "sync".to_string(),
    ] {
        linux(&mut q, &line);
    }
    let mut seen = Vec::new();
    for dev in ["snap", "snap8k"] {
        let sum = linux_sha256(&mut q, &format!("/dev/mapper/{dev}"));
        let status = linux_status(&mut q, dev);
        seen.push((sum, status));
    }
    let origin_sum = linux_sha256(&mut q, "/dev/mapper/origin");
    linux(
        &mut q,
        "dmsetup remove origin && dmsetup remove snap && dmsetup remove snap8k",
    );
    linux_poweroff(q);
    // Linux's own view: its snapshots read as the origin did, and the origin changed.
    let expected = sha256_hex(&before);
    for (sum, status) in &seen {
        assert_eq!(
            sum, &expected,
            "Linux's snapshot [{status}] does not read as the origin did"
        );
    }
    let after = a.read(0, (16 * MIB) as usize);
    assert_eq!(
        sha256_hex(&after),
        origin_sum,
        "Linux's origin writes did not reach the image"
    );
    assert_ne!(
        origin_sum, expected,
        "Linux's writes did not change the origin"
    );

    // The appliance: the stores are unbound; attached, they read as Linux read them.
    let mut q = Boot::kernel("q35", "testing")
        .virtio_disk(&a.path, "ORIGIN-A")
        .virtio_disk(&b.path, "COW-4K")
        .virtio_disk(&c.path, "COW-8K")
        .start();
    q.wait_prompt();
    let list = q.command("snapshot list");
    for dev in ["vdb", "vdc"] {
        assert!(
            list.contains(&format!(
                "store on {dev}: a dm-snapshot store without a snapfw binding"
            )),
            "{list}"
        );
    }
    let mut appliance = Vec::new();
    for (name, cow) in [("lx", "vdb"), ("lx8k", "vdc")] {
        let out = q.command(&format!("snapshot attach {name} vda {cow}"));
        assert!(out.contains(&format!("attached snapshot {name}")), "{out}");
        let sum = q.checksum(name);
        let status = appliance_status(&mut q, name);
        appliance.push((sum, status));
    }
    let origin_appliance = q.checksum("vda");
    q.poweroff();

    let report = format!(
        "  Linux:     snap {:?}, snap8k {:?}, origin {origin_sum}\n  appliance: lx {:?}, lx8k {:?}, origin {origin_appliance}",
        seen[0], seen[1], appliance[0], appliance[1]
    );
    eprintln!("{report}");
    assert_eq!(origin_appliance, origin_sum, "origin:\n{report}");
    for (n, name) in ["lx (4 KiB chunks)", "lx8k (8 KiB chunks)"]
        .iter()
        .enumerate()
    {
        assert_eq!(
            appliance[n].0, seen[n].0,
            "{name} reads differently:\n{report}"
        );
        assert_eq!(
            appliance[n].1, seen[n].1,
            "{name}: dmsetup status differs:\n{report}"
        );
    }
    // The host-side loader agrees as well.
    for (cow, (sum, _)) in [(&b, &seen[0]), (&c, &seen[1])] {
        let view = CowImage {
            bytes: &cow.read(0, (8 * MIB) as usize),
        }
        .snapshot_view(&after)
        .expect("the host loads Linux's store");
        assert_eq!(&sha256_hex(&view), sum, "host view of a Linux store");
    }
}

#[test]
fn linux_adds_to_a_store_the_appliance_made_and_it_comes_back() {
    // The appliance makes the store and copies some chunks; Linux activates it with an origin
    // mapping and writes more (appending records after the appliance's, across areas); the
    // appliance then finds its snapshot again by the binding Linux left alone.
    let (a, b) = (
        Image::new("lx3-origin", 16 * MIB),
        Image::new("lx3-cow", 8 * MIB),
    );
    let before: Vec<u8> = (0..16 * MIB as usize)
        .map(|i| (i / 1024 % 247) as u8 ^ (i % 5) as u8)
        .collect();
    a.write(0, &before);
    let expected = sha256_hex(&before);
    let appliance = |a: &Image, b: &Image| {
        let mut q = Boot::kernel("q35", "testing")
            .virtio_disk(&a.path, "ORIGIN-A")
            .virtio_disk(&b.path, "COW-B")
            .start();
        q.wait_prompt();
        q
    };
    let mut q = appliance(&a, &b);
    assert!(q
        .command("snapshot create s1 vda vdb")
        .contains("created snapshot s1"));
    for line in ["write vda 0 1000 --seed 31", "write vda 5000 8 --byte 0x55"] {
        let out = q.command(line);
        assert!(out.contains("wrote"), "{line}: {out}");
    }
    assert_eq!(q.checksum("s1"), expected, "appliance: s1");
    q.poweroff();

    let mut q = boot_linux(&[(&a, "ORIGIN-A"), (&b, "COW-B")]);
    let size = "$(blockdev --getsz /dev/vda)";
    for line in [
        format!("dmsetup create snap --table \"0 {size} snapshot /dev/vda /dev/vdb P 8\""),
        format!("dmsetup create origin --table \"0 {size} snapshot-origin /dev/vda\""),
        // Chunks 100..699: the first 25 the appliance copied already, 575 new ones.
        "dd if=/dev/urandom of=/dev/mapper/origin bs=4096 seek=100 count=600 conv=fsync"
            .to_string(),
        "sync".to_string(),
    ] {
        linux(&mut q, &line);
    }
    let linux_sum = linux_sha256(&mut q, "/dev/mapper/snap");
    let linux_st = linux_status(&mut q, "snap");
    linux(&mut q, "dmsetup remove origin && dmsetup remove snap");
    linux_poweroff(q);
    assert_eq!(
        linux_sum, expected,
        "Linux reads the appliance's store [{linux_st}] differently"
    );

    let mut q = appliance(&a, &b);
    let boot_log = q.transcript();
    assert!(
        boot_log.contains("snapshot s1: store on vdb attached to vda"),
        "the binding did not survive Linux's writes:\n{boot_log}"
    );
    let sum = q.checksum("s1");
    let status = appliance_status(&mut q, "s1");
    eprintln!("  Linux:     {linux_sum} [{linux_st}]\n  appliance: {sum} [{status}]");
    assert_eq!(
        sum, linux_sum,
        "s1 after Linux's writes [{status}] vs [{linux_st}]"
    );
    assert_eq!(status, linux_st, "dmsetup status after Linux's writes");
    // The appliance goes on appending after Linux's records.
    let out = q.command("write vda 8000 64 --seed 33");
    assert!(out.contains("wrote"), "{out}");
    assert_eq!(q.checksum("s1"), expected, "s1 after more writes");
    q.poweroff();
    let view = CowImage {
        bytes: &b.read(0, (8 * MIB) as usize),
    }
    .snapshot_view(&a.read(0, (16 * MIB) as usize))
    .expect("the host loads the store");
    assert_eq!(sha256_hex(&view), expected, "host view");
}

/// Issue 18: a store extended on the appliance (`snapshot extend`) is read by Linux over
/// its new region (the README's dm-linear line with the larger length), with the
/// appliance's checksum and `dmsetup status`.
#[test]
fn linux_reads_a_store_the_appliance_extended() {
    let (a, c) = (
        Image::new("lx4-origin", 16 * MIB),
        Image::new("lx4-regions", 24 * MIB),
    );
    let before = tests::xorshift_bytes(16 * MIB as usize, 44);
    a.write(0, &before);
    let mut q = Boot::kernel("q35", "testing")
        .virtio_disk(&a.path, "ORIGIN-X")
        .virtio_disk(&c.path, "REGIONS-X")
        .start();
    q.wait_prompt();
    let out = q.command("snapshot create e1 vda vdb:2048+16384");
    assert!(out.contains("created snapshot e1"), "{out}");
    assert!(q
        .command_timeout("write vda 0 12288 --seed 45", TIMEOUT * 2)
        .contains("wrote"));
    let out = q.command("snapshot extend e1 +8M");
    assert!(out.contains("extended snapshot e1 to 16 MiB"), "{out}");
    assert!(q
        .command_timeout("write vda 12288 10240 --seed 46", TIMEOUT * 2)
        .contains("wrote"));
    let sum = q.checksum("e1");
    assert_eq!(sum, sha256_hex(&before));
    let status = appliance_status(&mut q, "e1");
    q.poweroff();

    let mut q = boot_linux(&[(&a, "ORIGIN-X"), (&c, "REGIONS-X")]);
    let size = "$(blockdev --getsz /dev/vda)";
    linux(
        &mut q,
        "dmsetup create cowx --table \"0 32768 linear /dev/vdb 2048\"",
    );
    linux(
        &mut q,
        &format!(
            "dmsetup create snapx --table \"0 {size} snapshot /dev/vda /dev/mapper/cowx P 8\""
        ),
    );
    let lsum = linux_sha256(&mut q, "/dev/mapper/snapx");
    let lstatus = linux_status(&mut q, "snapx");
    linux(&mut q, "dmsetup remove snapx && dmsetup remove cowx");
    linux_poweroff(q);
    assert_eq!(lsum, sum, "Linux reads the extended store differently");
    assert_eq!(lstatus, status, "dmsetup status differs");
}
