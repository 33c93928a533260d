//! virtio-blk on the appliance: discovery, the disk tools checked byte for byte against the
//! image files on the host, the benchmark, the interrupt-driven path, the allocation guard,
//! and every bad-input case.

use tests::{json_u64, sha256_hex, Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;

fn boot_two_disks(a: &Image, b: &Image) -> Qemu {
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&a.path, "SNAPFW-A")
        .virtio_disk(&b.path, "SNAPFW-B")
        .start();
    q.wait_prompt();
    q
}

#[test]
fn devices_lists_both_disks() {
    let (a, b) = (
        Image::new("devices-a", 64 * MIB),
        Image::new("devices-b", 32 * MIB),
    );
    let mut q = boot_two_disks(&a, &b);
    let text = q.command("devices");
    let vda = text
        .lines()
        .find(|l| l.starts_with("vda"))
        .unwrap_or_else(|| panic!("{text}"));
    let vdb = text
        .lines()
        .find(|l| l.starts_with("vdb"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        vda.contains("SNAPFW-A") && vda.contains("64 MiB") && vda.contains("512"),
        "{vda}"
    );
    assert!(vdb.contains("SNAPFW-B") && vdb.contains("32 MiB"), "{vdb}");
    let json = q.command("devices --json");
    assert!(
        json.contains(r#""name":"vda","driver":"virtio-blk""#),
        "{json}"
    );
    assert!(
        json.contains(r#""serial":"SNAPFW-A""#) && json.contains(r#""capacity_bytes":67108864"#),
        "{json}"
    );
    assert!(json.contains(r#""capacity_bytes":33554432"#), "{json}");
    let vectors = json.split(r#""msix_vectors":["#).nth(1).unwrap_or("]");
    assert!(
        vectors.as_bytes()[0].is_ascii_digit(),
        "vda has MSI-X vectors: {json}"
    );
    q.poweroff();
}

#[test]
fn write_read_checksum_flush_match_the_host() {
    let (a, b) = (Image::new("io-a", 64 * MIB), Image::new("io-b", 32 * MIB));
    // A pattern the host puts on vdb before boot, for checksum.
    let host_data: Vec<u8> = (0..(3 * MIB) as usize)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    b.write(5 * MIB, &host_data);
    let mut q = boot_two_disks(&a, &b);

    // Seeded write of 1000 blocks at LBA 777 (unaligned, crosses many transfers).
    let out = q.command("write vda 777 1000 --seed 42");
    assert!(
        out.contains("wrote 1000 blocks (512000 bytes) to vda at LBA 777"),
        "{out}"
    );
    let mut expected = vec![0u8; 1000 * 512];
    kernel::util::pattern::fill_seeded(&mut expected, 42, 777 * 512);
    assert_eq!(
        a.read(777 * 512, expected.len()),
        expected,
        "vda image differs from the pattern"
    );
    // The blocks around it are untouched.
    assert!(a.read(776 * 512, 512).iter().all(|b| *b == 0));
    assert!(a.read(1777 * 512, 512).iter().all(|b| *b == 0));

    // Byte pattern, then read it back as a hexdump.
    let out = q.command("write vda 4 2 --byte 0x5a");
    assert!(out.contains("wrote 2 blocks"), "{out}");
    assert!(a.read(4 * 512, 1024).iter().all(|b| *b == 0x5a));
    let dump = q.command("read vda 4 2");
    assert!(dump.starts_with("00000800  5a 5a 5a 5a"), "{dump}");
    assert!(
        dump.contains("|ZZZZZZZZZZZZZZZZ|") && dump.contains("\n*\n") && dump.contains("00000c00"),
        "{dump}"
    );

    // checksum of what the host wrote equals the host's SHA-256.
    let lba = 5 * MIB / 512;
    let out = q.command(&format!("checksum vdb {lba} {}", host_data.len() / 512));
    assert!(
        out.starts_with(&sha256_hex(&host_data)),
        "{out} vs {}",
        sha256_hex(&host_data)
    );
    // Whole-device checksum.
    let whole = b.read(0, (32 * MIB) as usize);
    let out = q.command_timeout("checksum vdb", TIMEOUT * 2);
    // (Progress lines precede the result on a long checksum.)
    let result = out
        .rsplit('\x1b')
        .next()
        .unwrap_or(&out)
        .trim_start_matches("[K");
    assert!(result.starts_with(&sha256_hex(&whole)), "{out}");
    assert!(
        result.contains("vdb LBA 0 count 65536 (33554432 bytes)"),
        "{out}"
    );
    assert!(q.command("flush vda").contains("flushed vda"));
    q.poweroff();
}

#[test]
fn bench_is_interrupt_driven_and_allocation_free() {
    let (a, b) = (
        Image::new("bench-a", 64 * MIB),
        Image::new("bench-b", 32 * MIB),
    );
    let mut q = boot_two_disks(&a, &b);
    let before = q.command("mem --json");
    for (rw, bs) in [
        ("randread", "4k"),
        ("randwrite", "4k"),
        ("read", "128k"),
        ("write", "64k"),
    ] {
        let out = q.command(&format!("bench vda --rw {rw} --bs {bs} --qd 16 --ios 3000"));
        assert!(
            out.contains(&format!("rw={rw}")) && out.contains("3000 I/Os"),
            "{out}"
        );
        let iops: u64 = out
            .split("IOPS ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        assert!(iops > 0, "{out}");
        let interrupts: u64 = out
            .split("interrupts ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        assert!(interrupts > 0, "completions must come by interrupt: {out}");
        assert!(out.contains("latency avg") && out.contains("p99"), "{out}");
    }
    let after = q.command("mem --json");
    assert_eq!(
        json_u64(&after, "io_path_allocations"),
        0,
        "the I/O path allocated: {after}"
    );
    assert_eq!(
        json_u64(&after, "io_tasks"),
        json_u64(&before, "io_tasks") + 4
    );
    // Counters show the interrupts per device.
    let dev = q.command("devices --json");
    assert!(json_u64(&dev, "interrupts") > 0, "{dev}");
    q.poweroff();
}

#[test]
fn bench_fsync_flushes_after_every_n_writes() {
    let (a, b) = (
        Image::new("fsync-a", 64 * MIB),
        Image::new("fsync-b", 32 * MIB),
    );
    let mut q = boot_two_disks(&a, &b);
    let flushes = |q: &mut tests::Qemu| json_u64(&q.command("devices --json"), "flushes");
    let before = flushes(&mut q);
    let out = q.command("bench vda --rw randwrite --qd 8 --ios 1000 --fsync 100");
    assert!(out.contains("1000 I/Os"), "{out}");
    assert!(out.contains("flushes 10 (every 100 writes)"), "{out}");
    assert!(
        out.contains("latency avg") && !out.contains("error"),
        "{out}"
    );
    // Each flush reached vda (vda is listed first).
    assert_eq!(flushes(&mut q), before + 10);
    // 250 writes: flushes after the 100th and 200th; the last 50 end the run unflushed.
    let out = q.command("bench vda --rw write --bs 8k --qd 4 --ios 250 --fsync 100");
    assert!(out.contains("flushes 2 (every 100 writes)"), "{out}");
    assert_eq!(flushes(&mut q), before + 12);
    for (line, expected) in [
        (
            "bench vda --rw randread --fsync 4",
            "error: --fsync applies to write and randwrite only",
        ),
        (
            "bench vda --rw write --fsync 0",
            "error: --fsync must be at least 1",
        ),
    ] {
        let out = q.command(line);
        assert!(out.contains(expected), "{line:?} gave {out:?}");
    }
    q.poweroff();
}

#[test]
fn disk_commands_reject_bad_input() {
    let (a, b) = (Image::new("bad-a", 64 * MIB), Image::new("bad-b", 32 * MIB));
    let mut q = boot_two_disks(&a, &b);
    let cases = [
        ("read vdz 0", "error: no device or snapshot 'vdz'"),
        (
            "read vda 131072",
            "error: LBA 131072 is past the end of vda",
        ),
        (
            "read vda 131071 2",
            "error: range 131071+2 runs past the end",
        ),
        ("read vda 0 0", "error: COUNT must be at least 1"),
        ("read vda 0 9", "error: read shows at most 8 blocks"),
        ("read vda zero", "error: invalid number 'zero' for LBA"),
        ("write vda 0 1", "error: write takes exactly one of --byte"),
        ("write vda 0 1 --byte 0x1ff", "error:"),
        (
            "write vda 0 1 --byte 1 --seed 2",
            "error: write takes exactly one of",
        ),
        ("write vda 0 0 --byte 1", "error: COUNT must be at least 1"),
        ("checksum vda 5", "error: checksum takes both LBA and COUNT"),
        (
            "checksum vdb 0 65537",
            "error: range 0+65537 runs past the end",
        ),
        ("flush nvme0n1", "error: no device or snapshot 'nvme0n1'"),
        ("bench vda", "error: bench needs --rw"),
        ("bench vda --rw sideways", "error: invalid --rw 'sideways'"),
        (
            "bench vda --rw read --bs 1000",
            "error: --bs 1000 is not a multiple",
        ),
        (
            "bench vda --rw read --bs 1m",
            "error: --bs 1048576 is larger than the largest transfer",
        ),
        ("bench vda --rw read --qd 0", "error: --qd must be 1..="),
        (
            "bench vda --rw read --qd 100000",
            "error: --qd must be 1..=",
        ),
        (
            "bench vda --rw read --time 1s --ios 5",
            "error: give --time or --ios, not both",
        ),
        ("bench vda --rw read --time soon", "error: invalid duration"),
        (
            "bench vda --rw read --depth 4",
            "error: unknown option '--depth'",
        ),
        (
            "bench vda --rw read --size 4",
            "error: --size must be a multiple of 512 bytes",
        ),
    ];
    for (line, expected) in cases {
        let out = q.command(line);
        let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{line:?} gave {out:?}");
        assert!(
            errors[0].starts_with(expected),
            "{line:?} gave {:?}",
            errors[0]
        );
    }
    // The disks are untouched by all of that.
    assert!(a.read(0, 4096).iter().all(|b| *b == 0));
    q.poweroff();
}

#[test]
fn ctrl_c_cancels_a_long_task_and_typeahead_waits() {
    let (a, b) = (
        Image::new("cancel-a", 64 * MIB),
        Image::new("cancel-b", 32 * MIB),
    );
    let mut q = boot_two_disks(&a, &b);
    q.send(b"bench vda --rw randread --time 600s\r");
    q.expect("bench vda randread:", TIMEOUT); // the progress line
                                              // Typed while the task runs: kept (not edited, nothing allocated), run afterwards.
    q.send(b"uptime\r");
    std::thread::sleep(std::time::Duration::from_millis(300));
    q.send(b"\x03");
    // A 600 s bench that ignored Ctrl-C would miss this deadline.
    let out = q.expect("timer ticks", std::time::Duration::from_secs(20));
    assert!(out.contains("rw=randread") && out.contains("IOPS"), "{out}");
    q.expect(tests::PROMPT, TIMEOUT);
    let mem = q.command("mem --json");
    assert_eq!(json_u64(&mem, "io_path_allocations"), 0, "{mem}");
    assert!(q.command("version").contains("snapfw"));
    q.poweroff();
}

#[test]
fn a_device_that_fails_to_initialise_is_listed_and_boot_goes_on() {
    // vectors=0: no MSI-X, so the interrupt-driven driver refuses it with a reason.
    let (a, b) = (
        Image::new("fail-a", 16 * MIB),
        Image::new("fail-b", 16 * MIB),
    );
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .args([
            "-drive".to_string(),
            format!(
                "file={},if=none,format=raw,id=bad,cache=none",
                a.path.display()
            ),
            "-device".to_string(),
            "virtio-blk-pci,drive=bad,serial=NOVECTORS,vectors=0".to_string(),
        ])
        .virtio_disk(&b.path, "GOOD")
        .start();
    q.wait_prompt();
    let text = q.command("devices");
    let bad = text
        .lines()
        .find(|l| l.starts_with("vda"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        bad.contains("failed to initialise") && bad.contains("MSI-X"),
        "{bad}"
    );
    let good = text
        .lines()
        .find(|l| l.starts_with("vdb"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(good.contains("GOOD") && good.contains("16 MiB"), "{good}");
    let out = q.command("read vda 0");
    assert!(
        out.starts_with("error: device 'vda' failed to initialise"),
        "{out}"
    );
    assert!(q
        .command("write vdb 0 1 --byte 0x11")
        .contains("wrote 1 blocks"));
    let json = q.command("devices --json");
    assert!(
        json.contains(r#""state":"init-failed""#) && json.contains(r#""reason":""#),
        "{json}"
    );
    q.poweroff();
}
