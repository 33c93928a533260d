//! The NBD server against real clients: the appliance's server (`nbd::Server`: accept and
//! allow-list, handshake, chunking into pool buffers, device requests, completions out of
//! order, back-pressure, closing) runs on the host over std's TCP sockets (its `Sockets`)
//! and the server tests' fake volumes (`nbd::fake`, with three devices, as its `Backend`),
//! and `nbdinfo` (libnbd), `nbdcopy`, `qemu-img` and `qemu-io` talk to it. This checks interoperability of the handshake (GO with block sizes,
//! LIST, structured replies) and of the transmission phase, byte for byte. Needs
//! qemu-utils and libnbd-bin on the host.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use nbd::fake::{Buf, Fake};
use nbd::{NbdError, Peer, Server, ServerConfig, SocketError, Sockets};
use tests::json_u64;

const MIB: usize = 1 << 20;

/// The volumes' pool: 48 buffers of 32 KiB (so large requests are cut into chunks).
const BUFFERS: usize = 48;
const CHUNK: usize = 32 * 1024;
/// Device requests in flight at once; they complete a loop turn later.
const QUEUE_DEPTH: usize = 8;

/// The server's volumes, shared with the test that reads what the clients did to them.
#[derive(Clone)]
struct Disks(Arc<Mutex<Fake>>);

impl Disks {
    fn lock(&self) -> MutexGuard<'_, Fake> {
        // A panic in the server's thread is reported by `TestServer::check`.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `vda` (8 MiB, 512-byte blocks) and `nvme0n1` (4 MiB, 4096-byte blocks) with a pattern,
/// and `snap1` (2 MiB of 0x5a, read-only); each described as `test disk N`.
fn disks() -> Disks {
    let pattern = |n: usize| (0..n).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>();
    let mut fake = Fake::without_devices(BUFFERS, QUEUE_DEPTH, CHUNK);
    for (i, (name, bytes, block_size, read_only)) in [
        ("vda", pattern(8 * MIB), 512, false),
        ("nvme0n1", pattern(4 * MIB), 4096, false),
        ("snap1", vec![0x5a; 2 * MIB], 512, true),
    ]
    .into_iter()
    .enumerate()
    {
        fake.add_device(name, &bytes, block_size, read_only)
            .description = Some(format!("test disk {i}"));
    }
    Disks(Arc::new(Mutex::new(fake)))
}

/// A test server: its port, and what it reports.
struct TestServer {
    port: u16,
    state: Arc<ServerState>,
}

#[derive(Default)]
struct ServerState {
    /// Sessions open (updated every turn of the server's loop).
    sessions: AtomicUsize,
    /// Connections accepted.
    accepted: AtomicUsize,
    /// Bytes received from clients.
    received: AtomicUsize,
    /// What went wrong: a warning or error the server logged, buffers not back.
    errors: Mutex<Vec<String>>,
}

impl TestServer {
    /// Waits for the server's sessions to end and fails on any error they had (protocol
    /// error, leaked buffer).
    fn check(&self) {
        let start = std::time::Instant::now();
        while self.state.sessions.load(Ordering::SeqCst) > 0 {
            assert!(start.elapsed().as_secs() < 20, "connections did not end");
            thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(self.state.accepted.load(Ordering::SeqCst) > 0);
        let errors = self.state.errors.lock().unwrap();
        assert!(errors.is_empty(), "server errors: {errors:?}");
    }
}

/// Warnings and errors the server logs (its refusals, protocol errors, closes on error):
/// none are expected from these clients. Shared by every server of the test process.
static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            LOGGED.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// One TCP connection of the listener.
struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet taken by the server (its "socket receive buffer").
    rx: Vec<u8>,
    eof: bool,
    /// We shut our side down (FIN).
    fin: bool,
    /// Gone: reset, failed, or both sides closed; reported by `take_closed`.
    ended: bool,
}

/// std's TCP sockets (non-blocking) as the server's `Sockets`; a connection's handle is its
/// index, never reused.
struct StdSockets {
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    /// Bytes read from every connection.
    received: usize,
}

const RX_BUFFER: usize = 256 * 1024;

impl StdSockets {
    /// Reads what arrived on every open connection (as a TCP stack fills its buffers);
    /// true if anything did.
    fn fill(&mut self) -> bool {
        let mut any = false;
        for c in self.conns.iter_mut().flatten() {
            if c.ended || c.eof {
                continue;
            }
            let have = c.rx.len();
            if have >= RX_BUFFER {
                continue;
            }
            c.rx.resize(RX_BUFFER, 0);
            match c.stream.read(&mut c.rx[have..]) {
                Ok(0) => {
                    c.eof = true;
                    c.rx.truncate(have);
                }
                Ok(n) => {
                    c.rx.truncate(have + n);
                    self.received += n;
                    any = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => c.rx.truncate(have),
                Err(_) => {
                    c.rx.truncate(have);
                    c.ended = true;
                }
            }
            if c.fin && c.eof {
                // Both sides closed.
                c.ended = true;
            }
        }
        any
    }

    fn conn(&mut self, id: usize) -> Option<&mut Conn> {
        self.conns
            .get_mut(id)
            .and_then(Option::as_mut)
            .filter(|c| !c.ended)
    }
}

impl Sockets for StdSockets {
    type Conn = usize;

    fn accept(&mut self) -> Option<(usize, Peer)> {
        let (stream, addr) = self.listener.accept().ok()?;
        stream.set_nonblocking(true).unwrap();
        stream.set_nodelay(true).unwrap();
        let std::net::SocketAddr::V4(v4) = addr else {
            return None;
        };
        let peer = (v4.ip().octets(), v4.port());
        self.conns.push(Some(Conn {
            stream,
            rx: Vec::with_capacity(RX_BUFFER),
            eof: false,
            fin: false,
            ended: false,
        }));
        Some((self.conns.len() - 1, peer))
    }

    fn take_closed(&mut self) -> Option<usize> {
        let id = self
            .conns
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.ended))?;
        self.conns[id] = None;
        Some(id)
    }

    fn recv(
        &mut self,
        id: usize,
        take: &mut dyn FnMut(&[u8]) -> Result<usize, NbdError>,
    ) -> Result<Result<usize, NbdError>, SocketError> {
        let c = self.conn(id).ok_or(SocketError::Gone)?;
        if c.rx.is_empty() {
            return if c.eof {
                Err(SocketError::Finished)
            } else {
                Ok(Ok(0))
            };
        }
        Ok(take(&c.rx).map(|n| {
            let n = n.min(c.rx.len());
            c.rx.drain(..n);
            n
        }))
    }

    fn send(&mut self, id: usize, data: &[u8]) -> usize {
        let Some(c) = self.conn(id) else { return 0 };
        if c.fin {
            return 0;
        }
        match c.stream.write(data) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                c.ended = true;
                0
            }
        }
    }

    fn close(&mut self, id: usize) {
        if let Some(c) = self.conn(id) {
            let _ = c.stream.shutdown(Shutdown::Write);
            c.fin = true;
            c.ended |= c.eof;
        }
    }

    fn abort(&mut self, id: usize) {
        if let Some(c) = self.conn(id) {
            let _ = c.stream.shutdown(Shutdown::Both);
            c.ended = true;
        }
    }

    fn local_address(&self) -> Option<([u8; 4], u8)> {
        Some(([127, 0, 0, 1], 8))
    }
}

/// Serves connections until the test process ends; every export's payload held to
/// `max_payload` bytes.
fn serve(disks: Disks, max_payload: u32) -> TestServer {
    for d in &mut disks.lock().devices {
        d.info.max_payload = max_payload;
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Warn);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(ServerState::default());
    let shared = state.clone();
    thread::spawn(move || {
        let mut sockets = StdSockets {
            listener,
            conns: Vec::new(),
            received: 0,
        };
        let mut server: Server<Buf, usize> = Server::new(ServerConfig {
            port,
            allow: None,
            idle_ns: None,
        });
        let start = std::time::Instant::now();
        loop {
            let now = start.elapsed().as_nanos() as u64;
            // One turn of the appliance's loop: completions (the newest first, to reorder
            // them), resubmission, the network.
            let mut fake = disks.lock();
            let mut progressed = !fake.in_flight.is_empty();
            while let Some((id, result, buffer)) = fake.finish_newest() {
                let free = &mut fake.free;
                server.complete(id, result, buffer, &mut |b| free.push(b));
            }
            server.step(&mut *fake);
            progressed |= sockets.fill();
            server.poll_connections(&mut sockets, now);
            server.poll_io(&mut sockets, &mut *fake, now);
            let sessions = server.connections();
            if sessions == 0 && fake.in_flight.is_empty() && fake.free.len() != fake.total {
                shared
                    .errors
                    .lock()
                    .unwrap()
                    .push(format!("{} buffers not back", fake.total - fake.free.len()));
            }
            drop(fake);
            shared
                .errors
                .lock()
                .unwrap()
                .extend(LOGGED.lock().unwrap().drain(..));
            shared
                .accepted
                .store(server.counters().0 as usize, Ordering::SeqCst);
            shared.sessions.store(sessions, Ordering::SeqCst);
            shared.received.store(sockets.received, Ordering::SeqCst);
            if !progressed {
                thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    });
    TestServer { port, state }
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
    // libnbd asks for structured replies first; they are negotiated.
    assert!(json.contains("\"protocol\": \"newstyle-fixed\""), "{json}");
    assert!(json.contains("\"structured\": true"), "{json}");
    assert!(json.contains("\"can_df\": true"), "{json}");
    assert!(json.contains("\"can_zero\": true"), "{json}");
    assert!(json.contains("\"can_cache\": true"), "{json}");
    assert!(json.contains("\"can_multi_conn\": true"), "{json}");
    assert!(json.contains("\"description\": \"test disk 1\""), "{json}");
    let json = ok(
        "nbdinfo",
        &["--json", &format!("nbd://127.0.0.1:{port}/snap1")],
    );
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert!(json.contains("\"can_trim\": false"), "{json}");
    assert!(json.contains("\"can_zero\": false"), "{json}");
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
    server.check();
    let fake = d.lock();
    let vda = fake.device_bytes("vda");
    assert!(vda[4096..4096 + 65536].iter().all(|&b| b == 0xab));
    assert!(vda[MIB..MIB + 1536 * 1024].iter().all(|&b| b == 0xcd));
    assert_eq!(vda[4095], (4095 * 31 % 251) as u8, "bytes around untouched");
    assert!(fake.flushes >= 1);
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
    assert!(std::fs::read(&copy).unwrap() == d.lock().device_bytes("vda"));
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
    assert!(std::fs::read(&converted).unwrap() == d.lock().device_bytes("nvme0n1"));
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
    assert!(d.lock().device_bytes("nvme0n1") == bytes);
    std::fs::remove_dir_all(&dir).ok();
    server.check();
}

#[test]
fn qemu_io_write_zeroes_and_structured_reads() {
    let d = disks();
    let server = serve(d.clone(), 1 << 20);
    let port = server.port;
    let url = format!("nbd://127.0.0.1:{port}/vda");
    // `write -z` is NBD_CMD_WRITE_ZEROES (3 MiB: longer than the maximum payload); reads
    // come back as structured OFFSET_DATA chunks.
    let text = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -z 1m 3m",
            "-c",
            "write -z -f 6144 1k",
            "-c",
            "read -P 0 1m 3m",
            "-c",
            "read -P 0 6144 1k",
            &url,
        ],
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    // The zeroes were not sent: qemu used WRITE_ZEROES, not its fallback of writes.
    let received = server.state.received.load(Ordering::SeqCst);
    assert!(received < 64 * 1024, "{received} bytes received");
    server.check();
    let fake = d.lock();
    let vda = fake.device_bytes("vda");
    assert!(vda[MIB..4 * MIB].iter().all(|&b| b == 0));
    assert!(vda[6144..7168].iter().all(|&b| b == 0));
    let pattern = |i: usize| (i * 31 % 251) as u8;
    for i in [MIB - 1, 4 * MIB, 6143, 7168] {
        assert_eq!(vda[i], pattern(i), "byte {i} untouched");
    }
}

#[test]
fn nbdcopy_with_four_connections_both_ways() {
    let d = disks();
    let server = serve(d.clone(), 1 << 20);
    let port = server.port;
    let dir = std::env::temp_dir().join(format!("snapfw-nbd4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("src.raw");
    let bytes: Vec<u8> = (0..8 * MIB).map(|i| (i * 13 % 241) as u8).collect();
    std::fs::write(&source, &bytes).unwrap();
    let url = format!("nbd://127.0.0.1:{port}/vda");
    ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            "--flush",
            source.to_str().unwrap(),
            &url,
        ],
    );
    assert!(d.lock().device_bytes("vda") == &bytes[..]);
    assert!(d.lock().flushes >= 1);
    // nbdcopy opened 4 connections because the export offers multi-conn.
    let accepted = server.state.accepted.load(Ordering::SeqCst);
    assert!(accepted >= 4, "{accepted} connections");
    let back = dir.join("back.raw");
    ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            &url,
            back.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&back).unwrap() == bytes);
    std::fs::remove_dir_all(&dir).ok();
    server.check();
}

#[test]
fn nbdinfo_maps_base_allocation_as_all_data() {
    let server = serve(disks(), 1 << 20);
    let port = server.port;
    let url = format!("nbd://127.0.0.1:{port}/vda");
    let json = ok("nbdinfo", &["--json", &url]);
    assert!(json.contains("\"base:allocation\""), "{json}");
    let map = ok("nbdinfo", &["--map", &url]);
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields, ["0", &(8 * MIB).to_string(), "0", "data"], "{map}");
    // A context the export does not offer: nbdinfo reports it is not there.
    let out = run("nbdinfo", &["--map=snapfw:changed:nope", &url]);
    assert!(!out.status.success());
    server.check();
}
