//! Booting like a server of today (issue 17): UEFI firmware (OVMF) from the hybrid ISO and by
//! network, and all of the memory, above 4 GiB too, for the exception tables of large stores.

use snapshot::format::{Binding, BoundedBytes};
use tests::cow::{fill_chunk, store_bytes, write_store, Fill};
use tests::{json_u64, Boot, Image, Qemu, Source, TIMEOUT};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Exceptions of the large store: their table (one run each, as for random writes) needs
/// more than the 128 MiB the heap was capped at before.
const LARGE_STORE_EXCEPTIONS: u64 = 8_000_000;
/// Its origin: 64 GiB of 4 KiB chunks (sparse).
const LARGE_ORIGIN_CHUNKS: u64 = 1 << 24;
/// Its chunks: 4 KiB.
const CHUNK: u64 = 4096;

struct LargeStore {
    origin: Image,
    cow: Image,
}

/// The origin chunk of the large store's exception `i`: scattered over the origin, so the
/// table holds one run per exception.
fn large_old(i: u64) -> u64 {
    fill_chunk(Fill::Random, i, LARGE_ORIGIN_CHUNKS)
}

/// The large store in images named after `test` (tests run in parallel in one process);
/// the copies of exceptions 0, n/2 and n-1 hold their index's low byte plus one, the
/// others are zeros (the image is sparse).
fn large_store(test: &str) -> LargeStore {
    let n = LARGE_STORE_EXCEPTIONS;
    let cow_bytes = store_bytes((CHUNK / 512) as u32, n);
    let origin = Image::new(&format!("{test}-large-origin"), LARGE_ORIGIN_CHUNKS * CHUNK);
    let cow = Image::new(&format!("{test}-large-cow"), cow_bytes);
    let binding = Binding {
        name: BoundedBytes::new(b"large").unwrap(),
        origin_serial: BoundedBytes::new(b"LARGE-ORIGIN").unwrap(),
        origin_sectors: LARGE_ORIGIN_CHUNKS * CHUNK / 512,
        chunk_sectors: (CHUNK / 512) as u32,
        created_unix_seconds: 0,
        region_start: 0,
        region_sectors: cow_bytes / 512,
        flags: 0,
        origin_id: snapshot::OriginId::Serial,
    };
    let filled: Vec<(u64, u8)> = [0, n / 2, n - 1]
        .iter()
        .map(|&i| (large_old(i), (i as u8).wrapping_add(1)))
        .collect();
    write_store(
        &cow.path,
        (CHUNK / 512) as u32,
        Some(&binding),
        n,
        large_old,
        |old, _| {
            filled
                .iter()
                .find(|f| f.0 == old)
                .map(|f| vec![f.1; CHUNK as usize])
        },
    );
    LargeStore { origin, cow }
}

/// With 8 GiB: `mem` reports about 8 GiB (most of it above 4 GiB) and the large store is
/// served, its table on a heap that grew past 128 MiB; a few of its chunks read as written.
fn check_all_memory_and_the_large_store(q: &mut Qemu, store: &LargeStore) {
    let mem = q.command("mem --json");
    let usable = json_u64(&mem, "usable");
    let above = json_u64(&mem, "above_4g");
    assert!(
        usable > 7 * GIB + 512 * MIB && usable <= 8 * GIB,
        "about 8 GiB: {mem}"
    );
    assert!(above > 5 * GIB, "most of it above 4 GiB: {mem}");
    let heap_used = json_u64(&mem, "used"); // the heap object comes first
    assert!(
        heap_used > 128 * MIB,
        "the store's table should need more than 128 MiB (raise LARGE_STORE_EXCEPTIONS if \
         tables got smaller): {mem}"
    );
    eprintln!("{}", q.command("mem"));
    let list = q.command("snapshot list");
    let line = list
        .lines()
        .find(|l| l.starts_with("large "))
        .unwrap_or_else(|| panic!("{list}\n{}", q.transcript()));
    assert!(line.contains("active"), "{list}");
    let n = LARGE_STORE_EXCEPTIONS;
    for i in [0, n / 2, n - 1, 1] {
        let lba = large_old(i) * CHUNK / 512;
        let out = q.command(&format!("read large {lba}"));
        let want = if i == 1 { 0 } else { (i as u8).wrapping_add(1) };
        let first = out.lines().next().unwrap_or("");
        assert!(
            first.contains(&format!(" {want:02x} {want:02x} {want:02x}")),
            "exception {i}: {out}"
        );
    }
    let _ = (&store.origin, &store.cow);
}

#[test]
fn iso_under_ovmf_with_8_gib_and_a_table_larger_than_128_mib() {
    // The hybrid ISO under UEFI firmware: GRUB's EFI menu on the serial line boots its
    // default entry, multiboot2; 8 GiB of memory, most of it above 4 GiB.
    let store = large_store("uefi-iso");
    let port = tests::free_port();
    let mut q = Boot {
        source: Source::Iso,
        ..Boot::default()
    }
    .uefi()
    .memory_size("8G")
    .virtio_disk(&store.origin.path, "LARGE-ORIGIN")
    .virtio_disk(&store.cow.path, "LARGE-COW")
    .net(&[(port, 10809)], None)
    .start();
    q.expect("snapfw (multiboot2)", TIMEOUT); // GRUB's menu, on the serial line
    q.expect(tests::PROMPT, TIMEOUT * 3);
    let log = q.transcript();
    eprintln!(
        "ISO under OVMF, 8 GiB, 8 M exceptions: prompt after {:?}; boot log:\n{}",
        q.elapsed(),
        boot_log(&log)
    );
    assert!(
        log.contains("(Multiboot2) on UEFI firmware"),
        "the default entry under UEFI: {log}"
    );
    q.check_deployed("(Multiboot2)", &["vda", "vdb"], &["vda", "large"], port);
    check_all_memory_and_the_large_store(&mut q, &store);
    q.kill();
}

/// The appliance's log lines of a transcript (what the firmware and GRUB print aside).
fn boot_log(transcript: &str) -> String {
    transcript
        .lines()
        .filter(|l| l.starts_with("[ ") && l.contains("  "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_clock_runs_true_without_a_pit() {
    // A machine without the legacy PIT, as UEFI-only platforms may be: the timer and the TSC
    // are calibrated on the ACPI PM timer, and uptime follows the host's clock.
    let mut q = Boot::kernel("q35,pit=off", "testing loglevel=info").start();
    q.wait_prompt();
    let log = q.transcript();
    assert!(
        log.contains("timer: calibrated on the ACPI PM timer"),
        "{log}"
    );
    let seconds = |out: &str| -> f64 {
        out.split('(')
            .nth(1)
            .and_then(|s| s.split(" s").next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no seconds in {out}"))
    };
    let host = std::time::Instant::now();
    let first = seconds(&q.command("uptime"));
    std::thread::sleep(std::time::Duration::from_secs(4));
    let second = seconds(&q.command("uptime"));
    let (guest, host) = (second - first, host.elapsed().as_secs_f64());
    // Generous: TCG on a loaded machine; a calibration on a missing PIT is off by 100 times.
    assert!(
        guest > host / 2.0 && guest < host * 2.0,
        "uptime advanced {guest:.2} s while the host's clock advanced {host:.2} s"
    );
    q.poweroff();
}

#[test]
fn pxe_under_ovmf_chains_grubs_efi_netboot_image() {
    // The same DHCP boot file as under the BIOS, boot.ipxe: iPXE on UEFI cannot load a
    // Multiboot image, so the script chains GRUB's EFI netboot image, which loads it by
    // multiboot2 over TFTP.
    let disk = Image::new("uefi-pxe-disk", 16 * MIB);
    let port = tests::free_port();
    let mut q = Boot {
        source: Source::Pxe,
        pxe_forwards: vec![(port, 10809)],
        ..Boot::default()
    }
    .uefi()
    .virtio_disk(&disk.path, "PXE-DISK")
    .start();
    q.expect("snapfw: loading boot.ipxe on efi", TIMEOUT * 2); // iPXE's line on the serial console
    q.expect("snapfw (multiboot2, network)", TIMEOUT); // GRUB's menu
    q.expect(tests::PROMPT, TIMEOUT * 2);
    let log = q.transcript();
    eprintln!(
        "PXE under OVMF: prompt after {:?}; boot log:\n{}",
        q.elapsed(),
        boot_log(&log)
    );
    assert!(log.contains("booted by GRUB"), "{log}");
    assert!(log.contains("(Multiboot2) on UEFI firmware"), "{log}");
    q.check_deployed("(Multiboot2)", &["vda"], &["vda"], port);
    let cmdline = q.command("cmdline");
    assert!(
        cmdline.contains("console=ttyS0,115200 loglevel=info"),
        "{cmdline}"
    );
    q.poweroff();
}

#[test]
fn pxe_by_the_uefi_firmware_alone_boots_grubs_efi_netboot_image() {
    // A UEFI NIC without iPXE: the firmware's own PXE fetches the boot file DHCP names for
    // UEFI clients, GRUB's EFI netboot image, whose menu loads the image by multiboot2.
    let port = tests::free_port();
    let mut q = Boot {
        source: Source::Pxe,
        pxe_forwards: vec![(port, 10809)],
        pxe_without_ipxe: true,
        ..Boot::default()
    }
    .uefi()
    .start();
    q.expect("snapfw (multiboot2, network)", TIMEOUT * 2);
    q.expect(tests::PROMPT, TIMEOUT * 2);
    eprintln!("PXE by OVMF alone: prompt after {:?}", q.elapsed());
    let log = q.transcript();
    assert!(
        !log.contains("snapfw: loading boot.ipxe"),
        "iPXE ran: {log}"
    );
    q.check_deployed("(Multiboot2) on UEFI firmware", &[], &[], port);
    q.poweroff();
}

#[test]
fn a_store_too_large_for_the_memory_is_refused_and_the_boot_goes_on() {
    // The same store with 128 MiB of memory: its table (about 150 MiB at 18.5 bytes per
    // exception) cannot fit even after the heap grew to all but the DMA reserve, so the store
    // is refused (no panic) and the disks are served.
    let store = large_store("uefi-short");
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .memory_size("128M")
        .virtio_disk(&store.origin.path, "LARGE-ORIGIN")
        .virtio_disk(&store.cow.path, "LARGE-COW")
        .start();
    q.expect(tests::PROMPT, TIMEOUT * 3);
    eprintln!("128 MiB, 8 M exceptions: prompt after {:?}", q.elapsed());
    let log = q.transcript();
    assert!(!log.contains("PANIC"), "{log}");
    let list = q.command("snapshot list");
    eprintln!("{list}\n{}", q.command("mem"));
    assert!(!list.lines().any(|l| l.starts_with("large ")), "{list}");
    assert!(
        list.contains("store on vdb") && list.contains("memory"),
        "{list}"
    );
    let mem = q.command("mem --json");
    assert!(json_u64(&mem, "failed_allocations") > 0, "{mem}");
    // The appliance goes on: the origin reads and writes.
    let out = q.command("write vda 0 8 --byte 0x5a");
    assert!(out.contains("wrote 8 blocks"), "{out}");
    q.poweroff();
}
