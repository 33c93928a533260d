//! The NBD protocol code (`kernel::nbd::Connection`) against real clients: a host TCP server
//! drives the same state machine the appliance uses, over in-memory disks, and `nbdinfo`
//! (libnbd), `nbdcopy`, `qemu-img` and `qemu-io` talk to it. This checks interoperability of
//! the handshake (GO with block sizes, EXPORT_NAME fallback, LIST, structured replies refused)
//! and of the transmission phase, byte for byte. Needs qemu-utils and libnbd-bin on the host.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread;

use kernel::nbd::{
    Connection, ConnectionConfig, Event, ExportCatalog, ExportInfo, ExportName, Received, Transmit,
};

const MIB: usize = 1 << 20;

struct Disk {
    name: &'static str,
    info: ExportInfo,
    data: Vec<u8>,
    flushes: usize,
}

#[derive(Clone)]
struct Disks(Arc<Mutex<Vec<Disk>>>);

impl ExportCatalog for Disks {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let disks = self.0.lock().unwrap();
        disks.iter().find(|d| d.name == name).map(|d| d.info)
    }
    fn name(&self, index: usize) -> Option<ExportName> {
        let disks = self.0.lock().unwrap();
        disks
            .get(index)
            .map(|d| ExportName::from_str_truncated(d.name))
    }
    fn description(&self, export: &ExportInfo) -> Option<ExportName> {
        Some(ExportName::from_str_truncated(&format!(
            "test disk {}",
            export.handle
        )))
    }
}

fn disks() -> Disks {
    let pattern = |n: usize| (0..n).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>();
    let info = |handle, size: usize, block_size, read_only| ExportInfo {
        handle,
        size: size as u64,
        block_size,
        read_only,
        flush: true,
        fua: true,
        trim: !read_only,
        max_payload: 0,
    };
    Disks(Arc::new(Mutex::new(vec![
        Disk {
            name: "vda",
            info: info(0, 8 * MIB, 512, false),
            data: pattern(8 * MIB),
            flushes: 0,
        },
        Disk {
            name: "nvme0n1",
            info: info(1, 4 * MIB, 4096, false),
            data: pattern(4 * MIB),
            flushes: 0,
        },
        Disk {
            name: "snap1",
            info: info(2, 2 * MIB, 512, true),
            data: vec![0x5a; 2 * MIB],
            flushes: 0,
        },
    ])))
}

/// Serves connections until the listener is dropped with the test process.
fn serve(disks: Disks, max_payload: u32) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let disks = disks.clone();
            thread::spawn(move || {
                if let Err(e) = connection(stream, &disks, max_payload) {
                    eprintln!("nbd test server: {e}");
                }
            });
        }
    });
    port
}

/// One connection: the glue's job with synchronous "I/O" on the in-memory disks.
fn connection(mut stream: TcpStream, disks: &Disks, max_payload: u32) -> Result<(), String> {
    let mut conn = Box::new(Connection::new(ConnectionConfig { max_payload }));
    let mut reads: HashMap<u16, (u64, u32)> = HashMap::new();
    let mut writes: HashMap<u16, u64> = HashMap::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut have = 0;
    loop {
        // Send everything there is to send.
        loop {
            match conn.poll_transmit(disks) {
                Transmit::Bytes(b) => {
                    stream.write_all(b).map_err(|e| e.to_string())?;
                    let n = b.len();
                    conn.transmitted(n);
                }
                Transmit::ReadData { slot, at, len } => {
                    let (offset, _) = reads[&slot];
                    let handle = conn.export().unwrap().handle as usize;
                    let d = disks.0.lock().unwrap();
                    let start = offset as usize + at as usize;
                    stream
                        .write_all(&d[handle].data[start..start + len as usize])
                        .map_err(|e| e.to_string())?;
                    drop(d);
                    if conn.transmitted(len as usize).is_some() {
                        reads.remove(&slot);
                    }
                }
                Transmit::Idle => break,
            }
        }
        if conn.is_finished() {
            return Ok(());
        }
        // A full buffer means the connection pushed back: replies went out above, so it
        // takes more now.
        if have < buf.len() {
            let n = stream.read(&mut buf[have..]).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            have += n;
        }
        let mut pos = 0;
        loop {
            let Received { consumed, event } = conn
                .receive(&buf[pos..have], disks)
                .map_err(|e| format!("closed: {e}"))?;
            pos += consumed;
            let Some(event) = event else { break };
            let handle = conn.export().map_or(0, |e| e.handle as usize);
            let mut d = disks.0.lock().unwrap();
            match event {
                Event::Export(_) | Event::Disconnect => {}
                Event::Read { slot, offset, len } => {
                    reads.insert(slot, (offset, len));
                    drop(d);
                    conn.complete(slot, Ok(())).unwrap();
                }
                Event::Write { slot, offset, .. } => {
                    writes.insert(slot, offset);
                }
                Event::WriteData {
                    slot,
                    at,
                    data,
                    last,
                } => {
                    let start = writes[&slot] as usize + at as usize;
                    d[handle].data[start..start + data.len()].copy_from_slice(data);
                    drop(d);
                    if last {
                        conn.complete(slot, Ok(())).unwrap();
                    }
                }
                Event::Flush { slot } => {
                    d[handle].flushes += 1;
                    drop(d);
                    conn.complete(slot, Ok(())).unwrap();
                }
                Event::Trim { slot, .. } => {
                    drop(d);
                    conn.complete(slot, Ok(())).unwrap();
                }
            }
        }
        buf.copy_within(pos..have, 0);
        have -= pos;
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} not runnable ({e}): install qemu-utils and libnbd-bin")
        })
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

/// The value of `"key": N` in nbdinfo's JSON.
fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\": ");
    let at = json.find(&pat).unwrap_or_else(|| panic!("{key} in {json}")) + pat.len();
    json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn nbdinfo_sees_sizes_flags_and_block_sizes() {
    let port = serve(disks(), 1 << 20);
    let json = ok(
        "nbdinfo",
        &["--json", &format!("nbd://127.0.0.1:{port}/nvme0n1")],
    );
    assert_eq!(json_u64(&json, "export-size"), 4 * MIB as u64, "{json}");
    assert_eq!(json_u64(&json, "block_size_minimum"), 4096, "{json}");
    assert_eq!(json_u64(&json, "block_size_preferred"), 4096, "{json}");
    assert_eq!(json_u64(&json, "block_size_maximum"), 1 << 20, "{json}");
    assert!(json.contains("\"is_read_only\": false"), "{json}");
    assert!(json.contains("\"can_flush\": true"), "{json}");
    assert!(json.contains("\"can_fua\": true"), "{json}");
    assert!(json.contains("\"can_trim\": true"), "{json}");
    // libnbd asks for structured replies first; we refuse and it carries on.
    assert!(json.contains("\"protocol\": \"newstyle-fixed\""), "{json}");
    assert!(json.contains("\"description\": \"test disk 1\""), "{json}");
    let json = ok(
        "nbdinfo",
        &["--json", &format!("nbd://127.0.0.1:{port}/snap1")],
    );
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert!(json.contains("\"can_trim\": false"), "{json}");
}

#[test]
fn nbdinfo_lists_exports_and_refuses_unknown_ones() {
    let port = serve(disks(), 1 << 25);
    let text = ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
    for name in ["vda", "nvme0n1", "snap1"] {
        assert!(text.contains(&format!("export=\"{name}\"")), "{text}");
    }
    let out = run("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/nope")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("opt_go") && err.contains("nope"), "{err}");
}

#[test]
fn qemu_io_writes_reads_and_flushes() {
    let d = disks();
    let port = serve(d.clone(), 1 << 20);
    let url = format!("nbd://127.0.0.1:{port}/vda");
    let text = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4096 64k",
            "-c",
            "write -f -P 0xcd 1m 1536k",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 4096 64k",
            "-c",
            "read -P 0xcd 1m 1536k",
            &url,
        ],
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let disks = d.0.lock().unwrap();
    let vda = &disks[0];
    assert!(vda.data[4096..4096 + 65536].iter().all(|&b| b == 0xab));
    assert!(vda.data[MIB..MIB + 1536 * 1024].iter().all(|&b| b == 0xcd));
    assert_eq!(
        vda.data[4095],
        (4095 * 31 % 251) as u8,
        "bytes around untouched"
    );
    assert!(vda.flushes >= 1);
}

#[test]
fn qemu_io_on_a_read_only_export() {
    let port = serve(disks(), 1 << 25);
    let url = format!("nbd://127.0.0.1:{port}/snap1");
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &url]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(!out.status.success());
    assert!(text.contains("Permission denied"), "{text}");
    ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 2m", &url],
    );
}

#[test]
fn nbdcopy_and_qemu_img_read_whole_exports() {
    let d = disks();
    let port = serve(d.clone(), 1 << 20);
    let dir = std::env::temp_dir().join(format!("snapfw-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("vda.raw");
    ok(
        "nbdcopy",
        &[
            &format!("nbd://127.0.0.1:{port}/vda"),
            copy.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&copy).unwrap() == d.0.lock().unwrap()[0].data);
    let converted = dir.join("nvme.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("nbd://127.0.0.1:{port}/nvme0n1"),
            converted.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&converted).unwrap() == d.0.lock().unwrap()[1].data);
    // And the other way: a host file written onto an export.
    let source = dir.join("src.raw");
    let bytes: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&source, &bytes).unwrap();
    ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            source.to_str().unwrap(),
            &format!("nbd://127.0.0.1:{port}/nvme0n1"),
        ],
    );
    assert!(d.0.lock().unwrap()[1].data == bytes);
    std::fs::remove_dir_all(&dir).ok();
}
