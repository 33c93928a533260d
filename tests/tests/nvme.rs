//! NVMe on the appliance: one controller with two namespaces of different sizes; the disk
//! tools on both, checked byte for byte against the image files on the host, transfers of
//! 4 KiB, 64 KiB and 512 KiB (PRP lists), FUA, flush, bench, device statuses by name, and
//! the volatile write cache on and off.

use tests::{sha256_hex, Boot, Image, Qemu};

const MIB: u64 = 1 << 20;

fn boot(ns1: &Image, ns2: &Image, cache: &str) -> Qemu {
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .nvme("SNAPFW-NVME", &[(&ns1.path, cache), (&ns2.path, cache)])
        .start();
    q.wait_prompt();
    q
}

#[test]
fn devices_show_the_controller_and_both_namespaces() {
    let (a, b) = (
        Image::new("nvme-dev-1", 64 * MIB),
        Image::new("nvme-dev-2", 32 * MIB),
    );
    let mut q = boot(&a, &b, "on");
    let text = q.command("devices");
    let n1 = text
        .lines()
        .find(|l| l.starts_with("nvme0n1"))
        .unwrap_or_else(|| panic!("{text}"));
    let n2 = text
        .lines()
        .find(|l| l.starts_with("nvme0n2"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        n1.contains("64 MiB") && n1.contains("SNAPFW-NVME") && n1.contains("write-back"),
        "{n1}"
    );
    assert!(n2.contains("32 MiB"), "{n2}");
    let ctrl = text
        .lines()
        .find(|l| l.starts_with("nvme0 "))
        .unwrap_or_else(|| panic!("{text}"));
    for field in [
        "model=\"QEMU NVMe Ctrl\"",
        "serial=\"SNAPFW-NVME\"",
        "fw=",
        "queues=",
        "mdts=512KiB",
        "vwc=write-back",
        "online",
    ] {
        assert!(ctrl.contains(field), "{field} missing: {ctrl}");
    }
    let json = q.command("devices --json");
    assert!(
        json.contains(r#""controllers":[{"name":"nvme0""#)
            && json.contains(r#""mdts_bytes":524288"#),
        "{json}"
    );
    q.poweroff();
}

#[test]
fn transfers_of_every_size_match_the_host() {
    let (a, b) = (
        Image::new("nvme-io-1", 64 * MIB),
        Image::new("nvme-io-2", 32 * MIB),
    );
    let mut q = boot(&a, &b, "on");
    for (disk, image, seed) in [("nvme0n1", &a, 11u64), ("nvme0n2", &b, 12)] {
        let mut lba = 9u64; // not page aligned in the image
        for bs in [4096u64, 65536, 524288] {
            let count = 3 * bs / 512 + 1; // several requests, the last one short
            let out = q.command(&format!(
                "write {disk} {lba} {count} --seed {seed} --bs {bs}"
            ));
            assert!(
                out.contains(&format!("wrote {count} blocks"))
                    && out.contains(&format!("transfers of up to {bs} bytes")),
                "{out}"
            );
            let mut expected = vec![0u8; (count * 512) as usize];
            kernel::util::pattern::fill_seeded(&mut expected, seed, lba * 512);
            assert_eq!(
                image.read(lba * 512, expected.len()),
                expected,
                "{disk} bs {bs}"
            );
            let sum = q.command(&format!("checksum {disk} {lba} {count}"));
            assert!(sum.contains(&sha256_hex(&expected)), "{sum}");
            lba += count + 100;
        }
        let out = q.command(&format!("write {disk} 0 8 --byte 0xc3 --fua"));
        assert!(out.contains("FUA"), "{out}");
        assert!(image.read(0, 4096).iter().all(|b| *b == 0xc3));
        assert!(q
            .command(&format!("flush {disk}"))
            .contains(&format!("flushed {disk}")));
    }
    // Data the host put there is what the appliance reads.
    let host: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    b.write(20 * MIB, &host);
    let sum = q.command(&format!(
        "checksum nvme0n2 {} {}",
        20 * MIB / 512,
        MIB / 512
    ));
    assert!(sum.contains(&sha256_hex(&host)), "{sum}");
    q.poweroff();
}

#[test]
fn bench_both_namespaces_at_depth() {
    let (a, b) = (
        Image::new("nvme-bench-1", 64 * MIB),
        Image::new("nvme-bench-2", 32 * MIB),
    );
    let mut q = boot(&a, &b, "on");
    for disk in ["nvme0n1", "nvme0n2"] {
        for (rw, qd) in [("randread", 32), ("randwrite", 32), ("read", 8)] {
            let out = q.command(&format!("bench {disk} --rw {rw} --qd {qd} --ios 2000"));
            let report = out.rsplit("rw=").next().unwrap_or(&out);
            assert!(report.contains("2000 I/Os"), "{out}");
            let interrupts: u64 = report
                .split("interrupts ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            assert!(
                interrupts > 0,
                "NVMe completions must come by interrupt: {out}"
            );
        }
    }
    let mem = q.command("mem --json");
    assert!(mem.contains(r#""io_path_allocations":0"#), "{mem}");
    q.poweroff();
}

#[test]
fn device_errors_by_name_and_bad_input() {
    let (a, b) = (
        Image::new("nvme-err-1", 64 * MIB),
        Image::new("nvme-err-2", 32 * MIB),
    );
    let mut q = boot(&a, &b, "on");
    // Past the end, sent to the controller on purpose: it answers by name.
    let out = q.command("read nvme0n2 65536 --unchecked");
    assert!(
        out.contains("error: nvme0n2: I/O failed at LBA 65536: device reported LBA Out of Range"),
        "{out}"
    );
    // The console's own checks.
    for (line, expected) in [
        (
            "read nvme0n2 65536",
            "error: LBA 65536 is past the end of nvme0n2",
        ),
        (
            "write nvme0n1 0 1 --byte 1 --bs 1m",
            "error: --bs 1048576 must be a multiple of 512 bytes up to 524288",
        ),
        (
            "write nvme0n1 0 1 --byte 1 --bs 100",
            "error: --bs 100 must be a multiple",
        ),
        (
            "bench nvme0n1 --rw randread --qd 1000",
            "error: --qd must be 1..=",
        ),
        ("read nvme0n3 0", "error: no device or snapshot 'nvme0n3'"),
    ] {
        let out = q.command(line);
        assert!(out.trim_start().starts_with(expected), "{line}: {out}");
    }
    // The namespace still works afterwards.
    assert!(q
        .command("write nvme0n2 0 1 --byte 0x01")
        .contains("wrote 1 blocks"));
    q.poweroff();
}

#[test]
fn write_cache_off_is_reported_and_writes_still_land() {
    let (a, b) = (
        Image::new("nvme-wt-1", 16 * MIB),
        Image::new("nvme-wt-2", 16 * MIB),
    );
    let mut q = boot(&a, &b, "off");
    let text = q.command("devices");
    let n1 = text
        .lines()
        .find(|l| l.starts_with("nvme0n1"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(n1.contains("write-through"), "{n1}");
    let ctrl = text
        .lines()
        .find(|l| l.starts_with("nvme0 "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        ctrl.contains("vwc=disabled") || ctrl.contains("vwc=none"),
        "{ctrl}"
    );
    let out = q.command("write nvme0n1 100 64 --seed 3 --fua");
    assert!(out.contains("wrote 64 blocks"), "{out}");
    let mut expected = vec![0u8; 64 * 512];
    kernel::util::pattern::fill_seeded(&mut expected, 3, 100 * 512);
    assert_eq!(a.read(100 * 512, expected.len()), expected);
    q.poweroff();
}
