//! The NBD protocol code against real clients: a host TCP server drives the same session
//! logic the appliance uses (`kernel::nbd::session::Session`: handshake, chunking into pool
//! buffers, device requests, completions out of order) over in-memory disks, and `nbdinfo`
//! (libnbd), `nbdcopy`, `qemu-img` and `qemu-io` talk to it. This checks interoperability of
//! the handshake (GO with block sizes, LIST, structured replies refused)
//! and of the transmission phase, byte for byte. Needs qemu-utils and libnbd-bin on the host.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread;

use kernel::nbd::session::{self, Backend, BackendOp, IoBuffer, Session, SubmitError};
use kernel::nbd::{ConnectionConfig, ExportCatalog, ExportInfo, ExportName};

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

/// A test server: its port, and what its connections report.
struct Server {
    port: u16,
    state: Arc<ServerState>,
}

#[derive(Default)]
struct ServerState {
    active: std::sync::atomic::AtomicUsize,
    errors: Mutex<Vec<String>>,
}

impl Server {
    /// Waits for the server's connections to end and fails on any error they had (protocol
    /// error, leaked buffer).
    fn check(&self) {
        let start = std::time::Instant::now();
        while self.state.active.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            assert!(start.elapsed().as_secs() < 20, "connections did not end");
            thread::sleep(std::time::Duration::from_millis(5));
        }
        let errors = self.state.errors.lock().unwrap();
        assert!(errors.is_empty(), "server errors: {errors:?}");
    }
}

/// Serves connections until the listener is dropped with the test process.
fn serve(disks: Disks, max_payload: u32) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(ServerState::default());
    let shared = state.clone();
    thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            let disks = disks.clone();
            let state = shared.clone();
            state
                .active
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            thread::spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    connection(stream, disks, max_payload, n as u8)
                }));
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => state.errors.lock().unwrap().push(e),
                    Err(_) => state.errors.lock().unwrap().push("panicked".into()),
                }
                state
                    .active
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    Server { port, state }
}

/// A pool buffer of the host backend (the session tests' fake buffer, of `HOST_CHUNK` bytes).
type HostBuf = kernel::nbd::fake::Buf;

/// The glue's backend on the host: a pool of 32 KiB buffers (so large requests are cut
/// into chunks), a queue of depth 8 whose requests complete a loop turn later, the disks.
struct HostBackend {
    disks: Disks,
    free: Vec<HostBuf>,
    queue: Vec<(u64, BackendOp, Option<HostBuf>)>,
    max_payload: u32,
}

const HOST_CHUNK: usize = 32 * 1024;

impl ExportCatalog for HostBackend {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.disks.lookup(name).map(|mut e| {
            e.max_payload = self.max_payload;
            e
        })
    }
    fn name(&self, index: usize) -> Option<ExportName> {
        self.disks.name(index)
    }
    fn description(&self, export: &ExportInfo) -> Option<ExportName> {
        self.disks.description(export)
    }
}

impl Backend for HostBackend {
    type Buf = HostBuf;
    fn chunk_bytes(&self, _: u64) -> usize {
        HOST_CHUNK
    }
    fn max_discard_bytes(&mut self, _: u64) -> u64 {
        1 << 30
    }
    fn available(&mut self, _: u64) -> usize {
        self.free.len()
    }
    fn acquire(&mut self, _: u64) -> Option<HostBuf> {
        let mut b = self.free.pop()?;
        b.set_len(HOST_CHUNK);
        Some(b)
    }
    fn release(&mut self, _: u64, b: HostBuf) {
        self.free.push(b);
    }
    fn submit(
        &mut self,
        _: u64,
        tag: u64,
        op: BackendOp,
        buffer: Option<HostBuf>,
    ) -> Result<(), (SubmitError, Option<HostBuf>)> {
        if self.queue.len() >= 8 {
            return Err((SubmitError::Busy, buffer));
        }
        self.queue.push((tag, op, buffer));
        Ok(())
    }
}

impl HostBackend {
    /// Runs the queued device requests on the disk and completes them (last in, first out,
    /// to reorder them).
    fn run_queue(&mut self, session: &mut Session<HostBuf>) {
        while let Some((tag, op, mut buffer)) = self.queue.pop() {
            let handle = session.export().unwrap().handle as usize;
            let mut disks = self.disks.0.lock().unwrap();
            let disk = &mut disks[handle];
            match (op, buffer.as_mut()) {
                (BackendOp::Read { offset }, Some(b)) => {
                    let o = offset as usize;
                    let n = b.bytes().len();
                    b.bytes_mut().copy_from_slice(&disk.data[o..o + n]);
                }
                (BackendOp::Write { offset, .. }, Some(b)) => {
                    let o = offset as usize;
                    disk.data[o..o + b.bytes().len()].copy_from_slice(b.bytes());
                }
                (BackendOp::Flush, _) => disk.flushes += 1,
                _ => {}
            }
            drop(disks);
            let (_, slot, chunk) = session::untag(tag).unwrap();
            let free = &mut self.free;
            session.on_completion(slot, chunk, Ok(()), buffer, &mut |b| free.push(b));
        }
    }
}

/// One connection: what the kernel's glue does, with the socket in non-blocking mode.
fn connection(mut stream: TcpStream, disks: Disks, max_payload: u32, id: u8) -> Result<(), String> {
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut backend = HostBackend {
        disks,
        free: (0..48).map(|_| HostBuf::new(HOST_CHUNK)).collect(),
        queue: Vec::new(),
        max_payload,
    };
    let mut session: Box<Session<HostBuf>> =
        Box::new(Session::new(id, ConnectionConfig::default()));
    let mut buf = vec![0u8; 256 * 1024];
    let mut have = 0;
    let mut eof = false;
    loop {
        let mut progressed = false;
        if !eof && have < buf.len() {
            match stream.read(&mut buf[have..]) {
                Ok(0) => eof = true,
                Ok(n) => {
                    have += n;
                    progressed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let taken = session
            .on_receive(&mut backend, &buf[..have])
            .map_err(|e| format!("closed: {e}"))?;
        buf.copy_within(taken..have, 0);
        have -= taken;
        progressed |= taken > 0 || !backend.queue.is_empty();
        backend.run_queue(&mut session);
        session.step(&mut backend);
        let mut write_error = None;
        session
            .on_transmit(&mut backend, &mut |bytes| match stream.write(bytes) {
                Ok(n) => {
                    progressed |= n > 0;
                    n
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    write_error = Some(e.to_string());
                    0
                }
            })
            .map_err(|e| format!("transmit: {e}"))?;
        if let Some(e) = write_error {
            return Err(e);
        }
        if session.should_close() || (eof && have == 0 && session.in_device() == 0) {
            session.kill();
            session.release_all(&mut backend);
            assert_eq!(backend.free.len(), 48, "every buffer back");
            return Ok(());
        }
        if !progressed {
            thread::sleep(std::time::Duration::from_micros(200));
        }
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
    let server = serve(disks(), 1 << 20);
    let port = server.port;
    let json = ok(
        "nbdinfo",
        &["--json", &format!("nbd://127.0.0.1:{port}/nvme0n1")],
    );
    assert_eq!(json_u64(&json, "export-size"), 4 * MIB as u64, "{json}");
    assert_eq!(json_u64(&json, "block_size_minimum"), 4096, "{json}");
    assert_eq!(json_u64(&json, "block_size_preferred"), 4096, "{json}");
    // The server's 1 MiB cap held to 16 of the backend's 32 KiB buffers.
    assert_eq!(
        json_u64(&json, "block_size_maximum"),
        16 * 32 * 1024,
        "{json}"
    );
    assert!(json.contains("\"is_read_only\": false"), "{json}");
    assert!(json.contains("\"can_flush\": true"), "{json}");
    assert!(json.contains("\"can_fua\": true"), "{json}");
    assert!(json.contains("\"can_trim\": true"), "{json}");
    // libnbd asks for structured replies first; we refuse and it carries on.
    assert!(json.contains("\"protocol\": \"newstyle-fixed\""), "{json}");
    assert!(json.contains("\"structured\": false"), "{json}");
    assert!(json.contains("\"description\": \"test disk 1\""), "{json}");
    let json = ok(
        "nbdinfo",
        &["--json", &format!("nbd://127.0.0.1:{port}/snap1")],
    );
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert!(json.contains("\"can_trim\": false"), "{json}");
    server.check();
}

#[test]
fn nbdinfo_lists_exports_and_refuses_unknown_ones() {
    let server = serve(disks(), 1 << 25);
    let port = server.port;
    let text = ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
    for name in ["vda", "nvme0n1", "snap1"] {
        assert!(text.contains(&format!("export=\"{name}\"")), "{text}");
    }
    let out = run("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/nope")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("opt_go") && err.contains("nope"), "{err}");
    server.check();
}

#[test]
fn qemu_io_writes_reads_and_flushes() {
    let d = disks();
    let server = serve(d.clone(), 1 << 20);
    let port = server.port;
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
    drop(disks);
    server.check();
}

#[test]
fn qemu_io_on_a_read_only_export() {
    let server = serve(disks(), 1 << 25);
    let port = server.port;
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
    server.check();
}

#[test]
fn nbdcopy_and_qemu_img_read_whole_exports() {
    let d = disks();
    let server = serve(d.clone(), 1 << 20);
    let port = server.port;
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
    server.check();
}
