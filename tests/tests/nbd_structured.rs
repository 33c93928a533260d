//! Issue 19 against the real image: structured replies, WRITE_ZEROES, multi-conn (and, in
//! the same appliance set-ups, block status with `base:allocation` and the changed-chunks
//! contexts), with stock clients on the host (`nbdinfo`, `nbdcopy`, `qemu-io`, `qemu-img`)
//! over QEMU user networking. Needs qemu-utils and libnbd-bin.

use std::process::{Command, Output};
use std::time::Duration;

use tests::{free_port, qemu_io, sha256_hex, Boot, Image, Qemu};

const MIB: u64 = 1 << 20;
const NBD_PORT: u16 = 10809;

fn uri(port: u16, export: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{export}")
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (make deps): {e}"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("snapfw-nbdsr-{}-{name}", std::process::id()))
}

/// An appliance with an origin (`vda`, 16 MiB of random bytes), a disk for COW stores
/// (`vdb`) and a plain disk (`vdc`), NBD on a forwarded port: (QEMU, port, origin bytes,
/// images).
fn appliance(tag: &str) -> (Qemu, u16, Vec<u8>, [Image; 3]) {
    let port = free_port();
    let images = [
        Image::new(&format!("nbdsr-{tag}-origin"), 16 * MIB),
        Image::new(&format!("nbdsr-{tag}-cow"), 16 * MIB),
        Image::new(&format!("nbdsr-{tag}-plain"), 16 * MIB),
    ];
    let origin = tests::xorshift_bytes(16 * MIB as usize, 19);
    images[0].write(0, &origin);
    let q = boot(port, &images);
    (q, port, origin, images)
}

fn boot(port: u16, images: &[Image; 3]) -> Qemu {
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .virtio_disk(&images[0].path, "ORIGIN")
        .virtio_disk(&images[1].path, "COW")
        .virtio_disk(&images[2].path, "PLAIN")
        .net(&[(port, NBD_PORT)], None)
        .start();
    q.wait_prompt();
    q.wait_nbd_serving();
    q
}

fn console(q: &mut Qemu, line: &str, expect: &str) -> String {
    q.settle(Duration::from_millis(300));
    let out = q.command(line);
    assert!(
        out.contains(expect),
        "{line}: {out}\n--- console ---\n{}",
        q.transcript()
    );
    out
}

/// nbdinfo reports structured replies, write-zeroes, cache and multi-conn; `qemu-io
/// 'write -z'` zeroes a range of an origin through copy-on-write (the snapshot keeps its
/// data); `nbdcopy --connections=4` copies to and from a plain disk with data checked.
#[test]
fn structured_replies_write_zeroes_and_multi_conn() {
    let (mut q, port, origin, images) = appliance("basic");
    console(&mut q, "snapshot create s1 vda vdb", "created snapshot s1");
    for export in ["vda", "s1", "vdc"] {
        let json = run_ok("nbdinfo", &["--json", &uri(port, export)]);
        assert!(json.contains("\"structured\": true"), "{export}: {json}");
        assert!(
            json.contains("\"can_multi_conn\": true"),
            "{export}: {json}"
        );
        assert!(json.contains("\"can_cache\": true"), "{export}: {json}");
        let zero = if export == "s1" { "false" } else { "true" };
        assert!(
            json.contains(&format!("\"can_zero\": {zero}")),
            "{export}: {json}"
        );
    }

    let (ok, out) = qemu_io(
        port,
        "vda",
        &[
            "write -z 1M 2M",
            "write -z -f 5M 4k",
            "flush",
            "read -P 0 1M 2M",
        ],
    );
    assert!(ok && !out.contains("failed"), "{out}");
    q.settle(Duration::from_millis(300));
    let mut want = origin.clone();
    want[MIB as usize..3 * MIB as usize].fill(0);
    want[5 * MIB as usize..5 * MIB as usize + 4096].fill(0);
    assert_eq!(q.checksum("vda"), sha256_hex(&want), "vda after write -z");
    assert_eq!(
        q.checksum("s1"),
        sha256_hex(&origin),
        "the snapshot changed under write -z"
    );
    assert!(images[0].read(MIB, 4096).iter().all(|&b| b == 0));

    let data = tests::xorshift_bytes(16 * MIB as usize, 23);
    let (src, back) = (temp("src.img"), temp("back.img"));
    std::fs::write(&src, &data).unwrap();
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            "--flush",
            src.to_str().unwrap(),
            &uri(port, "vdc"),
        ],
    );
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            &uri(port, "vdc"),
            back.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&back).unwrap();
    let _ = (std::fs::remove_file(&src), std::fs::remove_file(&back));
    assert!(got == data, "nbdcopy round trip differs");
    assert!(images[2].read(0, data.len()) == data, "plain disk image");
    let nbd = q.command("nbd");
    assert!(!nbd.contains("error"), "{nbd}");
    q.poweroff();
}
