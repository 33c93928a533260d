//! Chunk sizes, table sizes and what a disk may claim (issue 15, findings 2 and 7): every
//! chunk size from 4 KiB to 512 KiB on virtio-blk and on NVMe, exception tables that cost what
//! they hold, and stores whose headers ask for more than the appliance serves, crafted on the
//! host with the `snapshot` crate.

use tests::cow::{bound_store, CowImage};
use tests::{sha256_hex, xorshift_bytes, Boot, Image, Qemu, TIMEOUT};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CHUNKS_KIB: [u64; 8] = [4, 8, 16, 32, 64, 128, 256, 512];

/// The value of `"key":N` in the `"heap"` object of `mem --json`.
fn heap_used(mem: &str) -> u64 {
    let heap = mem
        .split(r#""heap":"#)
        .nth(1)
        .unwrap_or_else(|| panic!("{mem}"));
    tests::json_u64(heap, "used")
}

/// The origin's contents before any snapshot, and the writes made through it afterwards.
fn origin_pattern(bytes: u64) -> Vec<u8> {
    xorshift_bytes(bytes as usize, 0x5eed)
}

fn write_through_origin(q: &mut Qemu, origin: &str) {
    // Aligned and unaligned, from one block to several 512 KiB chunks.
    for (lba, count, seed) in [(0, 4096, 7), (9001, 700, 8), (15000, 1, 9)] {
        let out = q.command_timeout(
            &format!("write {origin} {lba} {count} --seed {seed}"),
            TIMEOUT * 2,
        );
        assert!(out.contains(&format!("wrote {count} blocks")), "{out}");
    }
}

/// Creates one snapshot per chunk size of `origin` on `cows`, writes through the origin,
/// checks every snapshot against `before`, reboots with `boot`, and checks again (on the
/// appliance and, from the images, on the host).
fn every_chunk_size(
    boot: &dyn Fn() -> Qemu,
    origin: &str,
    cows: &[String],
    origin_img: &Image,
    cow_imgs: &[Image],
    before: &[u8],
) {
    let want = sha256_hex(before);
    let mut q = boot();
    for (kib, cow) in CHUNKS_KIB.iter().zip(cows) {
        let out = q.command(&format!(
            "snapshot create c{kib}k {origin} {cow} --chunk {kib}k"
        ));
        assert!(
            out.contains(&format!("created snapshot c{kib}k ({kib} KiB chunks)")),
            "{kib} KiB chunks: {out}"
        );
    }
    write_through_origin(&mut q, origin);
    let list = q.command("snapshot list");
    for kib in CHUNKS_KIB {
        assert_eq!(q.checksum(&format!("c{kib}k")), want, "c{kib}k: {list}");
    }
    assert!(
        !list.contains("invalid") && !list.contains("overflow"),
        "{list}"
    );
    let after = sha256_hex(&origin_img.read(0, before.len()));
    assert_ne!(after, want, "the writes reached the origin");
    q.poweroff();

    let mut q = boot();
    let list = q.command("snapshot list");
    for kib in CHUNKS_KIB {
        assert_eq!(
            q.checksum(&format!("c{kib}k")),
            want,
            "c{kib}k after reboot: {list}"
        );
    }
    assert_eq!(q.checksum(origin), after);
    q.poweroff();
    // The stores are dm-snapshot stores: the host's loader reads the same snapshots.
    let origin_now = origin_img.read(0, before.len());
    for (kib, img) in CHUNKS_KIB.iter().zip(cow_imgs) {
        let cow = img.read(0, std::fs::metadata(&img.path).unwrap().len() as usize);
        let view = CowImage { bytes: &cow }
            .snapshot_view(&origin_now)
            .unwrap_or_else(|e| panic!("c{kib}k does not load on the host: {e:?}"));
        assert_eq!(sha256_hex(&view), want, "c{kib}k read on the host");
    }
}

#[test]
fn every_chunk_size_from_4k_to_512k_on_virtio_blk() {
    let origin = Image::new("sizes-vblk-origin", 8 * MIB);
    let before = origin_pattern(8 * MIB);
    origin.write(0, &before);
    let cows: Vec<Image> = CHUNKS_KIB
        .iter()
        .map(|k| Image::new(&format!("sizes-vblk-cow{k}"), 12 * MIB))
        .collect();
    let boot = || {
        let mut b =
            Boot::kernel("q35", "testing loglevel=info").virtio_disk(&origin.path, "ORIGIN");
        for (k, c) in CHUNKS_KIB.iter().zip(&cows) {
            b = b.virtio_disk(&c.path, &format!("COW-{k}K"));
        }
        let mut q = b.start();
        q.wait_prompt();
        q
    };
    // vda is the origin; vdb.. the COW disks in PCI order.
    let names: Vec<String> = (0..CHUNKS_KIB.len())
        .map(|i| format!("vd{}", (b'b' + i as u8) as char))
        .collect();
    every_chunk_size(&boot, "vda", &names, &origin, &cows, &before);
}

#[test]
fn every_chunk_size_from_4k_to_512k_on_nvme() {
    let origin = Image::new("sizes-nvme-origin", 8 * MIB);
    let before = origin_pattern(8 * MIB);
    origin.write(0, &before);
    let cows: Vec<Image> = CHUNKS_KIB
        .iter()
        .map(|k| Image::new(&format!("sizes-nvme-cow{k}"), 12 * MIB))
        .collect();
    let boot = || {
        let mut namespaces = vec![(origin.path.as_path(), "on")];
        namespaces.extend(cows.iter().map(|c| (c.path.as_path(), "on")));
        let mut q = Boot::kernel("q35", "testing loglevel=info")
            .nvme("SIZES-NVME", &namespaces)
            .start();
        q.wait_prompt();
        q
    };
    let names: Vec<String> = (0..CHUNKS_KIB.len())
        .map(|i| format!("nvme0n{}", i + 2))
        .collect();
    every_chunk_size(&boot, "nvme0n1", &names, &origin, &cows, &before);
}

#[test]
fn two_4k_chunk_snapshots_on_16_gib_cow_disks_fit_the_heap() {
    let origin = Image::new("sizes-two-origin", 16 * MIB);
    let before = origin_pattern(16 * MIB);
    origin.write(0, &before);
    let (b, c) = (
        Image::new("sizes-two-cow-b", 16 * GIB),
        Image::new("sizes-two-cow-c", 16 * GIB),
    );
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&origin.path, "ORIGIN")
        .virtio_disk(&b.path, "COW-B")
        .virtio_disk(&c.path, "COW-C")
        .start();
    q.wait_prompt();
    let idle = heap_used(&q.command("mem --json"));
    for (name, cow) in [("first", "vdb"), ("second", "vdc")] {
        let out = q.command(&format!("snapshot create {name} vda {cow} --chunk 4k"));
        assert!(
            out.contains(&format!("created snapshot {name} (4 KiB chunks)")),
            "{out}\n{}",
            q.transcript()
        );
    }
    let mem = q.command("mem --json");
    let used = heap_used(&mem);
    eprintln!(
        "heap used: {} KiB idle, {} KiB with two 4 KiB-chunk snapshots on 16 GiB disks",
        idle >> 10,
        used >> 10
    );
    // The origin's engine and copy buffers (8 MiB) and two tables with room for 1024 runs,
    // not two tables for 4 Mi runs (96 MiB each).
    assert!(used - idle < 16 * MIB, "{mem}");
    write_through_origin(&mut q, "vda");
    // Random 4 KiB writes over the whole origin: more than 1024 runs per table, so both
    // tables grow on the I/O path, which `mem` counts apart from the I/O path's allocations.
    let out = q.command_timeout("bench vda --rw randwrite --qd 32 --ios 3000", TIMEOUT * 3);
    assert!(out.contains("3000 I/Os"), "{out}");
    let want = sha256_hex(&before);
    assert_eq!(q.checksum("first"), want);
    assert_eq!(q.checksum("second"), want);
    let list = q.command("snapshot list");
    assert!(
        !list.contains("invalid") && !list.contains("overflow"),
        "{list}"
    );
    let mem = q.command("mem --json");
    assert!(mem.contains(r#""io_path_allocations":0"#), "{mem}");
    let grown = tests::json_u64(&mem, "table_growth_allocations");
    assert!(grown >= 4, "the tables grew: {mem}");
    eprintln!("after the bench: {mem}");
    q.poweroff();
}

#[test]
fn stores_that_claim_too_much_do_not_stop_the_boot() {
    // Two ordinary 16 GiB stores with 128 KiB chunks, each with a few copied chunks, and a
    // third whose header claims 2^21-sector (1 GiB) chunks; all three origins are present.
    let oa = Image::new("sizes-claim-oa", 16 * MIB);
    let ob = Image::new("sizes-claim-ob", 16 * MIB);
    let oc = Image::new("sizes-claim-oc", 16 * MIB);
    let (ca, cb, cc) = (
        Image::new("sizes-claim-ca", 16 * GIB),
        Image::new("sizes-claim-cb", 16 * GIB),
        Image::new("sizes-claim-cc", 16 * GIB),
    );
    let chunk = 128 * 1024u64;
    let mut views = Vec::new();
    for (o, c, name, serial, seed) in [
        (&oa, &ca, "sa", "ORIGIN-A", 1u64),
        (&ob, &cb, "sb", "ORIGIN-B", 2),
    ] {
        let data = xorshift_bytes((16 * MIB) as usize, seed);
        o.write(0, &data);
        let copies = [(0u64, 0x11u8), (1, 0x22), (7, 0x33), (100, 0x44)];
        bound_store(c, name, 256, serial, 16 * MIB, &copies);
        let mut view = data.clone();
        for &(old, fill) in &copies {
            let at = (old * chunk) as usize;
            view[at..at + chunk as usize].fill(fill);
        }
        views.push(sha256_hex(&view));
    }
    oc.write(0, &xorshift_bytes((16 * MIB) as usize, 3));
    bound_store(&cc, "huge", 1 << 21, "ORIGIN-C", 16 * MIB, &[]);

    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&oa.path, "ORIGIN-A")
        .virtio_disk(&ca.path, "COW-A")
        .virtio_disk(&ob.path, "ORIGIN-B")
        .virtio_disk(&cb.path, "COW-B")
        .virtio_disk(&oc.path, "ORIGIN-C")
        .virtio_disk(&cc.path, "COW-C")
        .start();
    let boot = q.try_expect(tests::PROMPT, TIMEOUT);
    let transcript = q.transcript();
    assert!(boot.is_ok(), "no prompt:\n{transcript}");
    assert!(!transcript.contains("PANIC"), "{transcript}");
    let boot_time = q.elapsed();
    let list = q.command("snapshot list");
    let mem = q.command("mem");
    eprintln!("boot to prompt with two 16 GiB stores and a refused one: {boot_time:?}\n{mem}");
    for (name, origin, cow) in [("sa", "vda", "vdb"), ("sb", "vdc", "vdd")] {
        let line = list
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing: {list}"));
        assert!(
            line.contains(origin) && line.contains(cow) && line.contains("active"),
            "{line}"
        );
    }
    assert!(
        list.contains("store on vdf: a snapshot store that does not load: its chunk size (1048576 KiB) is above the largest served (512 KiB)"),
        "{list}"
    );
    assert_eq!(q.checksum("sa"), views[0]);
    assert_eq!(q.checksum("sb"), views[1]);
    // The stores are served: writes through their origins copy.
    let out = q.command("write vda 0 512 --byte 0x99");
    assert!(out.contains("wrote 512 blocks"), "{out}");
    assert_eq!(q.checksum("sa"), views[0]);
    let heap = heap_used(&q.command("mem --json"));
    assert!(heap < 48 * MIB, "heap used {heap}");
    q.poweroff();
}
