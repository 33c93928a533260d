//! Booting the image the ways operators deploy it under the BIOS (SeaBIOS): by PXE (iPXE
//! script over QEMU's built-in DHCP/TFTP) and from the GRUB ISO (both `multiboot` and
//! `multiboot2` menu entries). Under UEFI: `uefi.rs`.

use tests::{Boot, Image, Source, TIMEOUT};

#[test]
fn pxe_boot_with_ipxe_script() {
    let disk = Image::new("deploy-pxe-disk", 16 << 20);
    let port = tests::free_port();
    let mut q = Boot {
        source: Source::Pxe,
        machine: "pc".into(),
        pxe_forwards: vec![(port, 10809)],
        ..Boot::default()
    }
    .virtio_disk(&disk.path, "PXE-DISK")
    .start();
    // (iPXE prints its own progress on the VGA console only.)
    q.wait_prompt();
    eprintln!("pxe: prompt after {:?}", q.elapsed());
    let cmdline = q.command("cmdline");
    assert!(
        cmdline.contains("snapfw.elf console=ttyS0,115200 loglevel=info"),
        "{cmdline}"
    );
    assert!(
        cmdline.contains("tftp://"),
        "iPXE passes the image URL first: {cmdline}"
    );
    assert!(
        q.transcript().contains("booted by iPXE"),
        "{}",
        q.transcript()
    );
    // The NIC iPXE booted from (transitional virtio-net on the pc machine) is reset and
    // driven by the appliance: it gets its own DHCP lease.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !q.transcript().contains("net: DHCP lease 10.0.2.15/24") {
        assert!(std::time::Instant::now() < deadline, "{}", q.transcript());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    q.settle(std::time::Duration::from_millis(300));
    let net = q.command("net");
    assert!(net.contains("address 10.0.2.15/24"), "{net}");
    // BIOS iPXE loads the image itself, by Multiboot 1.
    q.check_deployed("(Multiboot1)", &["vda"], &["vda"], port);
    q.poweroff();
}

#[test]
fn grub_iso_multiboot() {
    let mut q = Boot {
        source: Source::Iso,
        machine: "pc".into(),
        ..Boot::default()
    }
    .start();
    q.expect("snapfw (multiboot2)", TIMEOUT); // the menu is on the serial line
    q.wait_prompt();
    eprintln!("grub multiboot: prompt after {:?}", q.elapsed());
    assert!(q.transcript().contains("(Multiboot1)"));
    assert!(q
        .command("cmdline")
        .contains("console=ttyS0,115200 loglevel=info"));
    q.poweroff();
}

#[test]
fn grub_iso_multiboot2() {
    // The hybrid ISO under SeaBIOS: the second entry boots by multiboot2, which hands over
    // the ACPI RSDP; the appliance finds its disk and serves it.
    let disk = Image::new("deploy-iso-disk", 16 << 20);
    let port = tests::free_port();
    let mut q = Boot {
        source: Source::Iso,
        machine: "q35".into(),
        ..Boot::default()
    }
    .virtio_disk(&disk.path, "ISO-DISK")
    .net(&[(port, 10809)], None)
    .start();
    q.expect("snapfw (multiboot2)", TIMEOUT);
    q.send(b"\x1b[B"); // down to the second entry
    std::thread::sleep(std::time::Duration::from_millis(300));
    q.send(b"\r");
    q.wait_prompt();
    eprintln!("grub multiboot2 (SeaBIOS): prompt after {:?}", q.elapsed());
    let log = q.transcript();
    assert!(log.contains("(Multiboot2)"), "{log}");
    assert!(!log.contains("on UEFI firmware"), "{log}");
    assert!(
        log.contains("RSDP at") && log.contains("from the boot loader's ACPI"),
        "{log}"
    );
    q.check_deployed("(Multiboot2)", &["vda"], &["vda"], port);
    assert!(q
        .command("cmdline")
        .contains("console=ttyS0,115200 loglevel=info"));
    q.poweroff();
}
