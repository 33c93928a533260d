//! Issue 19 against the real image: structured replies, WRITE_ZEROES, multi-conn (and, in
//! the same appliance set-ups, block status with `base:allocation` and the changed-chunks
//! contexts), with stock clients on the host (`nbdinfo`, `nbdcopy`, `qemu-io`, `qemu-img`)
//! over QEMU user networking. Needs qemu-utils and libnbd-bin.

use std::time::Duration;

use tests::{free_port, nbd_uri as uri, qemu_io, run, run_ok, sha256_hex, Boot, Image, Qemu};

const MIB: u64 = 1 << 20;
const NBD_PORT: u16 = 10809;

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

// --- block status ------------------------------------------------------------------------

const CHUNK: u64 = 4096;
type Chunks = std::collections::BTreeSet<u64>;

/// `nbdinfo --map=CONTEXT` of `export`: (offset, length, type) of each extent, checked to
/// cover the export from 0 to `size` without gaps.
fn nbdinfo_map(port: u16, export: &str, context: &str, size: u64) -> Vec<(u64, u64, u64)> {
    let text = run_ok(
        "nbdinfo",
        &[&format!("--map={context}"), &uri(port, export)],
    );
    let mut extents = Vec::new();
    let mut at = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<u64> = line
            .split_whitespace()
            .take(3)
            .map(|x| x.parse().unwrap_or_else(|_| panic!("{line} in {text}")))
            .collect();
        assert_eq!(f[0], at, "extents are contiguous: {text}");
        at += f[1];
        extents.push((f[0], f[1], f[2]));
    }
    assert_eq!(at, size, "extents cover the export: {text}");
    extents
}

/// The chunks of extents whose flag bit 0 (changed) is set.
fn changed(extents: &[(u64, u64, u64)]) -> Chunks {
    let mut set = Chunks::new();
    for &(offset, length, kind) in extents {
        assert_eq!(offset % CHUNK, 0, "chunk-aligned extents {extents:?}");
        if kind & 1 != 0 {
            set.extend(offset / CHUNK..(offset + length).div_ceil(CHUNK));
        }
    }
    set
}

/// `qemu-img map` through the context as a dirty bitmap (`x-dirty-bitmap=`): qemu reports
/// the extents with the flag as `"data": false`.
fn qemu_img_changed(port: u16, export: &str, context: &str) -> Chunks {
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export},x-dirty-bitmap={context}"
    );
    let json = run_ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let field = |entry: &str, key: &str| -> String {
        let at = entry
            .find(&format!("\"{key}\": "))
            .unwrap_or_else(|| panic!("{key} in {json}"));
        entry[at + key.len() + 4..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect()
    };
    let mut set = Chunks::new();
    for entry in json.split('{').skip(1) {
        let start: u64 = field(entry, "start").parse().unwrap();
        let length: u64 = field(entry, "length").parse().unwrap();
        if field(entry, "data") == "false" {
            assert_eq!(start % CHUNK, 0, "{json}");
            set.extend(start / CHUNK..(start + length).div_ceil(CHUNK));
        }
    }
    set
}

/// The origin chunks in the exception table of the store on `cow`, read on the host.
fn table(cow: &Image, origin_bytes: u64) -> Chunks {
    let bytes = std::fs::read(&cow.path).unwrap();
    let store = tests::cow::CowImage { bytes: &bytes }
        .load(origin_bytes)
        .expect("the store loads");
    (0..origin_bytes / CHUNK)
        .filter(|&c| store.table.lookup(c).is_some())
        .collect()
}

/// Writes 0x5a into each run of chunks (first, count) of `vda`, then flushes.
fn write_chunks(port: u16, runs: &[(u64, u64)]) -> Chunks {
    let commands: Vec<String> = runs
        .iter()
        .map(|&(c, n)| format!("write -P 0x5a {} {}", c * CHUNK, n * CHUNK))
        .chain(["flush".to_string()])
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (ok, out) = qemu_io(port, "vda", &commands);
    assert!(ok && !out.contains("failed"), "{out}");
    runs.iter().flat_map(|&(c, n)| c..c + n).collect()
}

fn contexts_of(port: u16, export: &str) -> String {
    run_ok("nbdinfo", &["--json", &uri(port, export)])
}

/// `snapfw:changed:NAME` against the exception tables read from the COW images on the host:
/// an origin with one snapshot, then two, and a snapshot export, with `nbdinfo --map` and
/// `qemu-img map`; the contexts are listed; `base:allocation` is all data; the same after a
/// reboot.
#[test]
fn changed_chunks_match_the_exception_tables() {
    let (mut q, port, _origin, images) = appliance("map");
    let size = 16 * MIB;
    console(&mut q, "snapshot create s1 vda vdb", "created snapshot s1");
    // Nothing written yet: nothing changed.
    assert_eq!(
        nbdinfo_map(port, "vda", "snapfw:changed:s1", size),
        vec![(0, size, 0)]
    );
    let a = write_chunks(port, &[(3, 2), (100, 1), (1000, 4), (4095, 1)]);
    let json = contexts_of(port, "vda");
    assert!(json.contains("\"base:allocation\""), "{json}");
    assert!(json.contains("\"snapfw:changed:s1\""), "{json}");
    let json = contexts_of(port, "s1");
    assert!(json.contains("\"snapfw:changed:s1\""), "{json}");
    q.settle(Duration::from_millis(300));
    assert_eq!(
        table(&images[1], size),
        a,
        "the store holds what was written"
    );
    assert_eq!(
        changed(&nbdinfo_map(port, "vda", "snapfw:changed:s1", size)),
        a
    );
    assert_eq!(
        changed(&nbdinfo_map(port, "s1", "snapfw:changed:s1", size)),
        a
    );
    assert_eq!(qemu_img_changed(port, "vda", "snapfw:changed:s1"), a);
    assert_eq!(
        nbdinfo_map(port, "vda", "base:allocation", size),
        vec![(0, size, 0)],
        "all data"
    );

    // A second snapshot on vdc: s1 keeps growing, s2 starts from nothing.
    console(&mut q, "snapshot create s2 vda vdc", "created snapshot s2");
    let b = write_chunks(port, &[(3, 1), (50, 1), (2000, 2)]);
    let s1: Chunks = a.union(&b).copied().collect();
    q.settle(Duration::from_millis(300));
    assert_eq!(table(&images[1], size), s1);
    assert_eq!(table(&images[2], size), b);
    let json = contexts_of(port, "vda");
    assert!(json.contains("\"snapfw:changed:s2\""), "{json}");
    let check = |port: u16| {
        assert_eq!(
            changed(&nbdinfo_map(port, "vda", "snapfw:changed:s1", size)),
            s1
        );
        assert_eq!(
            changed(&nbdinfo_map(port, "vda", "snapfw:changed:s2", size)),
            b
        );
        assert_eq!(
            changed(&nbdinfo_map(port, "s2", "snapfw:changed:s2", size)),
            b
        );
        assert_eq!(
            changed(&nbdinfo_map(port, "s1", "snapfw:changed:s1", size)),
            s1
        );
        assert_eq!(qemu_img_changed(port, "vda", "snapfw:changed:s2"), b);
        assert_eq!(qemu_img_changed(port, "s1", "snapfw:changed:s1"), s1);
    };
    check(port);
    // A snapshot export offers its own context only.
    let out = run("nbdinfo", &["--map=snapfw:changed:s1", &uri(port, "s2")]);
    assert!(!out.status.success(), "s2 does not offer s1's context");
    q.poweroff();

    // After a reboot the stores are found and the contexts say the same.
    let mut q = boot(port, &images);
    console(&mut q, "snapshot list", "s2");
    check(port);
    q.poweroff();
}

/// An incremental backup with stock tools only: a full copy of s1 (`nbdcopy`), writes,
/// snapshot s2, then the chunks `snapfw:changed:s1` lists on the origin (`nbdinfo --map
/// --json`) copied from s2 onto the copy (`qemu-img convert` with offset/size), s1 deleted:
/// the copy is s2, byte for byte.
#[test]
fn an_incremental_backup_with_stock_tools_reproduces_the_snapshot() {
    let (mut q, port, origin, _images) = appliance("backup");
    let size = 16 * MIB;
    console(&mut q, "snapshot create s1 vda vdb", "created snapshot s1");
    let base = temp("base.img");
    run_ok("nbdcopy", &[&uri(port, "s1"), base.to_str().unwrap()]);
    assert!(std::fs::read(&base).unwrap() == origin);
    write_chunks(port, &[(7, 3), (512, 16), (4000, 1)]);
    let (ok, out) = qemu_io(port, "vda", &["write -P 0x33 8m 512", "flush"]);
    assert!(ok, "{out}");
    console(&mut q, "snapshot create s2 vda vdc", "created snapshot s2");
    // Written after s2: also listed for s1 (copied again, harmless), not part of s2.
    write_chunks(port, &[(9, 1), (3000, 2)]);

    let json = run_ok(
        "nbdinfo",
        &["--map=snapfw:changed:s1", "--json", &uri(port, "vda")],
    );
    let mut copied = 0;
    for entry in json.split('{').skip(1) {
        let field = |key: &str| -> u64 {
            let at = entry
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{json}"));
            entry[at + key.len() + 3..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap()
        };
        if field("type") & 1 == 0 {
            continue;
        }
        let (offset, length) = (field("offset"), field("length"));
        copied += length;
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-n",
                "--image-opts",
                &format!(
                    "driver=raw,offset={offset},size={length},file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port={port},file.export=s2"
                ),
                "--target-image-opts",
                &format!(
                    "driver=raw,offset={offset},size={length},file.driver=file,file.filename={}",
                    base.display()
                ),
            ],
        );
    }
    // Chunks 7-9, 512-527, 4000, 2048 (8m), then 9 again and 3000-3001.
    assert_eq!(copied, (3 + 16 + 1 + 1 + 2) * CHUNK, "{json}");
    console(&mut q, "snapshot delete s1", "s1");
    let backup = std::fs::read(&base).unwrap();
    let _ = std::fs::remove_file(&base);
    assert_eq!(backup.len() as u64, size);
    assert_eq!(q.checksum("s2"), sha256_hex(&backup), "the backup is s2");
    assert!(backup != origin, "the backup moved on from s1");
    q.poweroff();
}
