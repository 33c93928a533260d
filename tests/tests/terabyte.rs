//! Terabyte disks (issue 17): a 2 TiB origin and a 1 TiB COW store, as sparse raw images,
//! end to end: `snapshot create`, writes at both ends and across the 2^31-sector line,
//! checksums of ranges against what the host computes from the images, a reboot that finds
//! the store again, and a merge of a store crafted on the host with a known set of chunks
//! spread over the whole origin (NVMe with 4 KiB blocks). Only what matters is written, so
//! each test takes seconds.

use std::os::unix::fs::FileExt;

use snapshot::format::{Binding, BoundedBytes};
use tests::cow::{fill_chunk, load_file, write_store, Fill};
use tests::{result_line, sha256_hex, xorshift_bytes, Boot, Image, Qemu, TIMEOUT};

const TIB: u64 = 1 << 40;
const ORIGIN_BYTES: u64 = 2 * TIB;
const COW_BYTES: u64 = TIB;
const SECTORS: u64 = ORIGIN_BYTES / 512;

/// Ranges of the origin (512-byte sectors) the end-to-end test fills, writes and checks: the
/// first MiB, a MiB across sector 2^31 (1 TiB) and the last MiB (up to sector 2^32).
const RANGES: [(u64, u64); 3] = [(0, 2048), ((1 << 31) - 1024, 2048), (SECTORS - 2048, 2048)];

/// Writes through the origin inside those ranges: unaligned, across chunk boundaries, across
/// sector 2^31, and the very last blocks of the device.
const WRITES: [(u64, u64, u64); 4] = [
    (8, 100, 1),
    ((1 << 31) - 7, 20, 2),
    (SECTORS - 9, 9, 3),
    (SECTORS - 1500, 64, 4),
];

fn sha_of(img: &Image, sector: u64, count: u64) -> String {
    sha256_hex(&img.read(sector * 512, (count * 512) as usize))
}

fn checksum_range(q: &mut Qemu, volume: &str, lba: u64, count: u64) -> String {
    let out = q.command_timeout(&format!("checksum {volume} {lba} {count}"), TIMEOUT);
    let line = result_line(&out);
    assert!(
        line.contains(&format!("{volume} LBA {lba} count {count}")),
        "checksum {volume} {lba} {count}: {out}"
    );
    line.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_2_tib_origin_with_a_1_tib_store_from_create_to_reboot() {
    let origin = Image::new("tera-e2e-origin", ORIGIN_BYTES);
    let cow = Image::new("tera-e2e-cow", COW_BYTES);
    let mut before = Vec::new();
    for (k, &(sector, count)) in RANGES.iter().enumerate() {
        let data = xorshift_bytes((count * 512) as usize, 100 + k as u64);
        origin.write(sector * 512, &data);
        before.push(sha256_hex(&data));
    }
    let boot = || {
        let mut q = Boot::kernel("q35", "testing loglevel=info")
            .virtio_disk(&origin.path, "TERA-ORIGIN")
            .nvme("TERA-COW", &[(cow.path.as_path(), "on")])
            .start();
        q.wait_prompt();
        q
    };
    let mut q = boot();
    let devices = q.command("devices");
    assert!(
        devices.contains("2097152 MiB") && devices.contains("1048576 MiB"),
        "{devices}"
    );
    let out = q.command("snapshot create big vda nvme0n1");
    assert!(out.contains("created snapshot big (4 KiB chunks)"), "{out}");
    for (lba, count, seed) in WRITES {
        let out = q.command(&format!("write vda {lba} {count} --seed {seed}"));
        assert!(out.contains(&format!("wrote {count} blocks")), "{out}");
    }
    // The snapshot reads as the origin did; the origin as the host sees its image now.
    let mut after = Vec::new();
    for (k, &(sector, count)) in RANGES.iter().enumerate() {
        assert_eq!(
            checksum_range(&mut q, "big", sector, count),
            before[k],
            "range {k}"
        );
        let now = sha_of(&origin, sector, count);
        assert_ne!(now, before[k], "range {k}: the writes reached the origin");
        assert_eq!(
            checksum_range(&mut q, "vda", sector, count),
            now,
            "range {k}"
        );
        after.push(now);
    }
    // Each write copied the 4 KiB chunks it touched (they are disjoint); usage counts them
    // after the header and the first area, as dmsetup status does.
    let copied: u64 = WRITES
        .iter()
        .map(|&(lba, count, _)| (lba + count - 1) / 8 - lba / 8 + 1)
        .sum();
    let status = q.command("snapshot status big");
    assert!(
        status.contains(&format!(" {copied} exceptions,")),
        "{copied}: {status}"
    );
    assert!(
        status.contains(&format!(
            "0 4294967296 snapshot {}/2147483648 16",
            (2 + copied) * 8
        )),
        "{status}"
    );
    q.poweroff();

    // The host reads the store as Linux would: the same snapshot.
    let store = load_file(&cow.path, ORIGIN_BYTES).expect("the store loads on the host");
    assert_eq!(store.table.len(), copied);
    let f = std::fs::File::open(&cow.path).unwrap();
    for (k, &(sector, count)) in RANGES.iter().enumerate() {
        let mut view = origin.read(sector * 512, (count * 512) as usize);
        for (i, block) in view.chunks_mut(4096).enumerate() {
            let chunk = sector / 8 + i as u64;
            if let Some(new) = store.table.lookup(chunk) {
                f.read_exact_at(block, new * 4096).unwrap();
            }
        }
        assert_eq!(sha256_hex(&view), before[k], "range {k} read on the host");
    }

    let mut q = boot();
    let log = q.transcript();
    assert!(
        log.contains(&format!(
            "snapshot big: store on nvme0n1 attached to vda ({copied} exceptions"
        )),
        "{log}"
    );
    for (k, &(sector, count)) in RANGES.iter().enumerate() {
        assert_eq!(
            checksum_range(&mut q, "big", sector, count),
            before[k],
            "range {k}"
        );
        assert_eq!(
            checksum_range(&mut q, "vda", sector, count),
            after[k],
            "range {k}"
        );
    }
    // Copy-on-write goes on after the reboot, at the far end of the origin.
    let out = q.command(&format!("write vda {} 8 --byte 0x5a", SECTORS - 2048));
    assert!(out.contains("wrote 8 blocks"), "{out}");
    assert_eq!(
        checksum_range(&mut q, "big", RANGES[2].0, RANGES[2].1),
        before[2]
    );
    q.poweroff();
}

/// A 2 TiB NVMe namespace of 4 KiB blocks.
fn nvme_4k(boot: Boot, serial: &str, image: &Image) -> Boot {
    boot.args([
        "-device".to_string(),
        format!("nvme,id=tn,serial={serial}"),
        "-drive".to_string(),
        format!(
            "file={},if=none,format=raw,id=tnns,cache=none,aio=threads",
            image.path.display()
        ),
        "-device".to_string(),
        "nvme-ns,drive=tnns,bus=tn,nsid=1,logical_block_size=4096,physical_block_size=4096"
            .to_string(),
    ])
}

#[test]
fn a_merge_of_known_chunks_spread_over_2_tib() {
    // 3000 exceptions spread over every part of the origin's 2^29 chunks (the first and the
    // last among them), each COW chunk holding its own pattern; the origin holds another.
    const EXCEPTIONS: u64 = 3000;
    let origin_chunks = ORIGIN_BYTES / 4096;
    let origin = Image::new("tera-merge-origin", ORIGIN_BYTES);
    let cow = Image::new("tera-merge-cow", COW_BYTES);
    let old_of = |i: u64| match i {
        0 => 0,
        1 => origin_chunks - 1,
        i => fill_chunk(Fill::Random, i, origin_chunks),
    };
    let chunks: Vec<u64> = (0..EXCEPTIONS).map(old_of).collect();
    let snap_data = |old: u64| xorshift_bytes(4096, 0xC0FFEE ^ old);
    for &old in &chunks {
        origin.write(old * 4096, &xorshift_bytes(4096, old));
    }
    // Untouched neighbours, checked after the merge.
    let neighbours: Vec<u64> = chunks
        .iter()
        .take(50)
        .map(|&c| c ^ 1)
        .filter(|c| !chunks.contains(c))
        .collect();
    for &c in &neighbours {
        origin.write(c * 4096, &xorshift_bytes(4096, c));
    }
    let binding = Binding {
        name: BoundedBytes::new(b"spread").unwrap(),
        origin_serial: BoundedBytes::new(b"TERA-NVME-4K").unwrap(),
        origin_sectors: ORIGIN_BYTES / 512,
        chunk_sectors: 8,
        created_unix_seconds: 0,
        region_start: 0,
        region_sectors: COW_BYTES / 512,
        flags: 0,
        // An NVMe namespace by its controller's serial and namespace ID.
        origin_id: snapshot::OriginId::NvmeNamespace(1),
    };
    write_store(
        &cow.path,
        8,
        Some(&binding),
        EXCEPTIONS,
        old_of,
        |old, _| Some(snap_data(old)),
    );
    let boot = || {
        let mut q = nvme_4k(
            Boot::kernel("q35", "testing loglevel=info"),
            "TERA-NVME-4K",
            &origin,
        )
        .virtio_disk(&cow.path, "TERA-COW")
        .start();
        q.wait_prompt();
        q
    };
    let mut q = boot();
    let log = q.transcript();
    assert!(
        log.contains("snapshot spread: store on vda attached to nvme0n1 (3000 exceptions"),
        "{log}"
    );
    // The snapshot reads the store's copies; a chunk near the end of the origin, in blocks.
    let last = origin_chunks - 1;
    assert_eq!(
        checksum_range(&mut q, "spread", last, 1),
        sha256_hex(&snap_data(last))
    );
    let out = q.command_timeout("snapshot merge spread", TIMEOUT * 5);
    assert!(
        out.contains("merge of spread finished; snapshot removed"),
        "{out}\n{}",
        q.transcript()
    );
    assert_eq!(
        checksum_range(&mut q, "nvme0n1", last, 1),
        sha256_hex(&snap_data(last))
    );
    q.poweroff();
    // Every merged chunk holds the snapshot's data; the neighbours are untouched; the store
    // is gone and the origin is not marked half-merged.
    for &old in &chunks {
        assert_eq!(
            origin.read(old * 4096, 4096),
            snap_data(old),
            "origin chunk {old}"
        );
    }
    for &c in &neighbours {
        assert_eq!(
            origin.read(c * 4096, 4096),
            xorshift_bytes(4096, c),
            "chunk {c}"
        );
    }
    assert!(
        load_file(&cow.path, ORIGIN_BYTES).is_err(),
        "the store was wiped"
    );
    let q = boot();
    let log = q.transcript();
    assert!(
        !log.contains("half-merged") && !log.contains("attached to"),
        "{log}"
    );
    q.poweroff();
}

/// A disk behind QEMU's blkdebug whose reads of `sector` fail with EIO (the config file is
/// written next to the image).
fn failing_reads(image: &Image, sector: u64, id: &str, serial: &str) -> Vec<String> {
    let conf = image.path.with_extension("blkdebug.conf");
    std::fs::write(
        &conf,
        format!(
            "[inject-error]\nevent = \"read_aio\"\niotype = \"read\"\nsector = \"{sector}\"\nerrno = \"5\"\nonce = \"off\"\n"
        ),
    )
    .unwrap();
    vec![
        "-drive".to_string(),
        format!(
            "file=blkdebug:{}:{},if=none,format=raw,id={id},cache=none,aio=threads",
            conf.display(),
            image.path.display()
        ),
        "-device".to_string(),
        format!("virtio-blk-pci,drive={id},serial={serial}"),
    ]
}

/// A store with four metadata areas whose third cannot be read is not served (and says why)
/// rather than served without the exceptions of its last two areas, which would read the
/// origin's new data where the snapshot copied the old. A store whose table ends before an
/// unreadable area (which discovery reads ahead) is served whole.
#[test]
fn a_store_whose_metadata_cannot_be_read_is_not_served_short() {
    const MIB: u64 = 1 << 20;
    let store = |tag: &str, name: &str, serial: &str, records: u64| {
        let origin = Image::new(&format!("tera-unreadable-{tag}-origin"), 64 * MIB);
        let cow = Image::new(&format!("tera-unreadable-{tag}-cow"), 64 * MIB);
        let binding = Binding {
            name: BoundedBytes::new(name.as_bytes()).unwrap(),
            origin_serial: BoundedBytes::new(serial.as_bytes()).unwrap(),
            origin_sectors: 64 * MIB / 512,
            chunk_sectors: 8,
            created_unix_seconds: 0,
            region_start: 0,
            region_sectors: 64 * MIB / 512,
            flags: 0,
            origin_id: snapshot::OriginId::Serial,
        };
        write_store(&cow.path, 8, Some(&binding), records, |i| i, |_, _| None);
        (origin, cow)
    };
    // Area k is chunk 1 + k * 257 (4 KiB chunks).
    let area = |k: u64| (1 + k * 257) * 8;
    let (short_origin, short_cow) = store("short", "short", "SHORT-ORIGIN", 3 * 256 + 10);
    let (fine_origin, fine_cow) = store("fine", "fine", "FINE-ORIGIN", 2 * 256 + 10);
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&short_origin.path, "SHORT-ORIGIN")
        .args(failing_reads(&short_cow, area(2), "bad", "SHORT-COW"))
        .virtio_disk(&fine_origin.path, "FINE-ORIGIN")
        .args(failing_reads(&fine_cow, area(3), "ahead", "FINE-COW"))
        .start();
    q.wait_prompt();
    let list = q.command("snapshot list");
    for cow in [&short_cow, &fine_cow] {
        let _ = std::fs::remove_file(cow.path.with_extension("blkdebug.conf"));
    }
    let log = q.transcript();
    assert!(
        list.contains(
            "store on vdb: a snapshot store that does not load: reading it failed (device error); left untouched"
        ),
        "{list}\n{log}"
    );
    assert!(q
        .command("checksum short 0 8")
        .contains("error: no device or snapshot 'short'"));
    assert!(
        log.contains("snapshot fine: store on vdd attached to vdc (522 exceptions"),
        "{list}\n{log}"
    );
    q.poweroff();
}

/// Linux's dm-snapshot reads the 1 TiB store of a 2 TiB origin as the appliance does: the
/// README's `dmsetup` line, the same `dmsetup status`, and the same SHA-256 of each range.
#[test]
fn linux_reads_the_1_tib_store_as_the_appliance_does() {
    let origin = Image::new("tera-linux-origin", ORIGIN_BYTES);
    let cow = Image::new("tera-linux-cow", COW_BYTES);
    for (k, &(sector, count)) in RANGES.iter().enumerate() {
        origin.write(
            sector * 512,
            &xorshift_bytes((count * 512) as usize, 200 + k as u64),
        );
    }
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&origin.path, "TERA-ORIGIN")
        .virtio_disk(&cow.path, "TERA-COW")
        .start();
    q.wait_prompt();
    let out = q.command("snapshot create big vda vdb");
    assert!(out.contains("created snapshot big"), "{out}");
    for (lba, count, seed) in WRITES {
        let out = q.command(&format!("write vda {lba} {count} --seed {seed}"));
        assert!(out.contains(&format!("wrote {count} blocks")), "{out}");
    }
    let appliance: Vec<String> = RANGES
        .iter()
        .map(|&(sector, count)| checksum_range(&mut q, "big", sector, count))
        .collect();
    let status = q.command("snapshot status big");
    let status = status.lines().next().unwrap_or("").trim().to_string();
    q.poweroff();

    let mut q = Boot::linux_guest()
        .virtio_disk(&origin.path, "TERA-ORIGIN")
        .virtio_disk(&cow.path, "TERA-COW")
        .start();
    q.wait_linux(std::time::Duration::from_secs(180));
    let (out, code) = q.shell(
        "dmsetup create big --table \"0 $(blockdev --getsz /dev/vda) snapshot /dev/vda /dev/vdb P 8\"",
        TIMEOUT * 2,
    );
    assert_eq!(code, 0, "{out}");
    let (linux_status, code) = q.shell("dmsetup status big", TIMEOUT);
    assert_eq!(code, 0, "{linux_status}");
    let linux_status = linux_status
        .lines()
        .rfind(|l| l.contains(" snapshot "))
        .unwrap_or("")
        .trim()
        .to_string();
    for (k, &(sector, count)) in RANGES.iter().enumerate() {
        let (out, code) = q.shell(
            &format!(
                "dd if=/dev/mapper/big bs=512 skip={sector} count={count} 2>/dev/null | sha256sum"
            ),
            TIMEOUT * 2,
        );
        assert_eq!(code, 0, "{out}");
        let sum = out
            .lines()
            .rev()
            .find_map(|l| l.split_whitespace().next().filter(|h| h.len() == 64))
            .unwrap_or_else(|| panic!("range {k}: {out}"));
        assert_eq!(sum, appliance[k], "range {k} reads differently on Linux");
    }
    let (out, code) = q.shell("dmsetup remove big", TIMEOUT);
    assert_eq!(code, 0, "{out}");
    q.send(b"sync; poweroff -f\n");
    let exit = q.wait_exit(TIMEOUT);
    assert_eq!(exit.code(), Some(0), "Linux power-off");
    assert_eq!(linux_status, status, "dmsetup status differs");
}
