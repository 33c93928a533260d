//! Host tests of the server over fake sockets and the fake volumes ([`crate::fake`]): what
//! the kernel's TCP listener and storage do to it, driven round by round as the main loop
//! does, with the clock in the test's hand. Log lines are captured per test thread.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::string::{String, ToString};
use std::vec::Vec;

use crate::allow::AllowList;
use crate::fake::{go_handshake_for, request, Buf, Fake, DISK};
use crate::guard::{HANDSHAKE_NS, WINDOW_NS};
use crate::proto::*;
use crate::route::{DeviceRole, Route};
use crate::server::{Peer, Server, ServerConfig, SocketError, Sockets, LINGER_NS, MAX_CONNECTIONS};
use crate::{Errno, NbdError};

// --- captured log lines ---------------------------------------------------------------------

thread_local! {
    static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        LINES.with(|l| l.borrow_mut().push(record.args().to_string()));
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// This thread's log lines since the last call.
fn take_lines() -> Vec<String> {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = log::set_logger(&CAPTURE);
        log::set_max_level(log::LevelFilter::Trace);
    });
    LINES.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

fn count(lines: &[String], text: &str) -> usize {
    lines.iter().filter(|l| l.contains(text)).count()
}

// --- fake sockets ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct FakeConn {
    peer: Peer,
    /// Client → server bytes not taken yet.
    inbox: Vec<u8>,
    /// Server → client bytes.
    outbox: Vec<u8>,
    /// The client sent its FIN.
    client_fin: bool,
    /// We sent ours.
    fin: bool,
    /// We reset it.
    reset: bool,
    /// Ended and reported by `take_closed`: the handle is stale.
    stale: bool,
}

/// One listener's connections: the client side is driven by the test.
struct FakeSockets {
    conns: Vec<FakeConn>,
    new: VecDeque<usize>,
    ended: VecDeque<usize>,
    local: Option<([u8; 4], u8)>,
    /// Bytes the send buffer takes per call.
    window: usize,
}

impl FakeSockets {
    fn new() -> FakeSockets {
        FakeSockets {
            conns: Vec::new(),
            new: VecDeque::new(),
            ended: VecDeque::new(),
            local: Some(([10, 0, 2, 15], 24)),
            window: usize::MAX,
        }
    }

    fn connect(&mut self, peer: Peer) -> usize {
        self.conns.push(FakeConn {
            peer,
            ..FakeConn::default()
        });
        self.new.push_back(self.conns.len() - 1);
        self.conns.len() - 1
    }

    fn end(&mut self, c: usize) {
        if !self.ended.contains(&c) && !self.conns[c].stale {
            self.ended.push_back(c);
        }
    }

    /// The client closes its side.
    fn client_fin(&mut self, c: usize) {
        self.conns[c].client_fin = true;
        if self.conns[c].fin {
            self.end(c);
        }
    }

    /// The connection is reset under us (the client's RST, a timeout).
    fn lost(&mut self, c: usize) {
        self.end(c);
    }

    fn live(&self, c: usize) -> bool {
        let k = &self.conns[c];
        !k.stale && !k.reset && !self.ended.contains(&c)
    }
}

impl Sockets for FakeSockets {
    type Conn = usize;

    fn accept(&mut self) -> Option<(usize, Peer)> {
        let c = self.new.pop_front()?;
        Some((c, self.conns[c].peer))
    }

    fn take_closed(&mut self) -> Option<usize> {
        let c = self.ended.pop_front()?;
        self.conns[c].stale = true;
        Some(c)
    }

    fn recv(
        &mut self,
        c: usize,
        take: &mut dyn FnMut(&[u8]) -> Result<usize, NbdError>,
    ) -> Result<Result<usize, NbdError>, SocketError> {
        if !self.live(c) {
            return Err(SocketError::Gone);
        }
        let k = &mut self.conns[c];
        if k.inbox.is_empty() {
            return if k.client_fin {
                Err(SocketError::Finished)
            } else {
                Ok(Ok(0))
            };
        }
        Ok(take(&k.inbox).map(|n| {
            let n = n.min(k.inbox.len());
            k.inbox.drain(..n);
            n
        }))
    }

    fn send(&mut self, c: usize, data: &[u8]) -> usize {
        if !self.live(c) || self.conns[c].fin {
            return 0;
        }
        let n = data.len().min(self.window);
        self.conns[c].outbox.extend_from_slice(&data[..n]);
        n
    }

    fn close(&mut self, c: usize) {
        if !self.live(c) {
            return;
        }
        self.conns[c].fin = true;
        if self.conns[c].client_fin {
            self.end(c);
        }
    }

    fn abort(&mut self, c: usize) {
        if self.conns[c].stale {
            return;
        }
        self.conns[c].reset = true;
        self.end(c);
    }

    fn local_address(&self) -> Option<([u8; 4], u8)> {
        self.local
    }
}

// --- the rig --------------------------------------------------------------------------------

const CLIENT: Peer = ([10, 0, 2, 2], 40000);
const SECOND: u64 = 1_000_000_000;

struct Rig {
    server: Server<Buf, usize>,
    sockets: FakeSockets,
    fake: Fake,
    now: u64,
    /// The device completes what it holds at the start of each round.
    device_runs: bool,
}

impl Rig {
    fn new(config: ServerConfig, buffers: usize, depth: usize) -> Rig {
        take_lines();
        Rig {
            server: Server::new(config),
            sockets: FakeSockets::new(),
            fake: Fake::new(buffers, depth),
            now: 1_000 * SECOND,
            device_runs: true,
        }
    }

    fn default() -> Rig {
        Rig::new(config(None, None), 64, 8)
    }

    /// Completes in-flight device request `pick` (modulo) into the server.
    fn complete_one(&mut self, pick: usize) -> bool {
        let Some((id, result, buffer)) = self.fake.finish_one(pick) else {
            return false;
        };
        let free = &mut self.fake.free;
        self.server
            .complete(id, result, buffer, &mut |b| free.push(b));
        true
    }

    /// One turn of the main loop: completions, resubmission, the network's round.
    fn round(&mut self) {
        if self.device_runs {
            while self.complete_one(0) {}
        }
        self.server.step(&mut self.fake);
        self.server.poll_connections(&mut self.sockets, self.now);
        self.server
            .poll_io(&mut self.sockets, &mut self.fake, self.now);
    }

    fn rounds(&mut self, n: usize) {
        for _ in 0..n {
            self.round();
        }
    }

    fn connect(&mut self, peer: Peer) -> usize {
        let c = self.sockets.connect(peer);
        self.round();
        c
    }

    /// Connects and finishes the handshake for `name`: the connection, or the option error.
    fn open(&mut self, name: &str) -> Result<usize, u32> {
        let c = self.connect(CLIENT);
        self.sockets.conns[c]
            .inbox
            .extend_from_slice(&go_handshake_for(name));
        for _ in 0..100 {
            self.round();
            let out = &self.sockets.conns[c].outbox;
            let mut at = GREETING_LEN;
            while out.len() >= at + OPTION_REPLY_HEADER_LEN {
                let kind = be32(out, at + 12);
                let len = be32(out, at + 16) as usize;
                if out.len() < at + OPTION_REPLY_HEADER_LEN + len {
                    break;
                }
                at += OPTION_REPLY_HEADER_LEN + len;
                if kind == REP_ACK {
                    self.sockets.conns[c].outbox.drain(..at);
                    return Ok(c);
                }
                if kind & (1 << 31) != 0 {
                    return Err(kind);
                }
            }
        }
        panic!("no handshake reply");
    }

    /// Sends a request (with `payload` for a write) on `c` without waiting.
    fn send(&mut self, c: usize, command: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let inbox = &mut self.sockets.conns[c].inbox;
        inbox.extend(request(0, command, cookie, offset, len));
        inbox.extend_from_slice(payload);
    }

    /// The next simple reply on `c` (`read_len` bytes of data with a successful read):
    /// (error, cookie, data), after up to 200 rounds.
    fn reply(&mut self, c: usize, read_len: usize) -> (u32, u64, Vec<u8>) {
        for _ in 0..200 {
            let out = &self.sockets.conns[c].outbox;
            if out.len() >= SIMPLE_REPLY_LEN {
                assert_eq!(be32(out, 0), SIMPLE_REPLY_MAGIC);
                let error = be32(out, 4);
                let want = if error == 0 { read_len } else { 0 };
                if out.len() >= SIMPLE_REPLY_LEN + want {
                    let cookie = be64(out, 8);
                    let data = out[SIMPLE_REPLY_LEN..SIMPLE_REPLY_LEN + want].to_vec();
                    self.sockets.conns[c]
                        .outbox
                        .drain(..SIMPLE_REPLY_LEN + want);
                    return (error, cookie, data);
                }
            }
            self.round();
        }
        panic!("no reply on connection {c}");
    }

    /// One request and its reply: (error, data).
    fn one(
        &mut self,
        c: usize,
        command: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        self.send(c, command, 77, offset, len, payload);
        let read_len = if command == CMD_READ { len as usize } else { 0 };
        let (error, cookie, data) = self.reply(c, read_len);
        assert_eq!(cookie, 77);
        (error, data)
    }

    /// The server holds no device request and every buffer is back in the pool.
    fn idle_checks(&mut self) {
        while self.complete_one(0) {}
        self.round();
        assert!(self.fake.in_flight.is_empty());
        let mut in_device = 0;
        self.server.clients(|c| in_device += c.in_device);
        assert_eq!(in_device, 0);
    }
}

fn config(allow: Option<&str>, idle_s: Option<u64>) -> ServerConfig {
    ServerConfig {
        port: 10809,
        allow: allow.map(|a| AllowList::parse(a).expect("a valid allow-list")),
        idle_ns: idle_s.map(|s| s * SECOND),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

// --- tests ----------------------------------------------------------------------------------

#[test]
fn handshake_reads_writes_flush_trim_and_goodbye_over_sockets() {
    let mut r = Rig::default();
    let c = r.open("d").expect("export d");
    assert!(take_lines()
        .iter()
        .any(|l| l == "nbd: connection 0 from 10.0.2.2:40000"));
    assert_eq!(r.server.connections(), 1);
    assert!(r.server.serving(0));
    let data = pattern(40 * 1024, 3);
    assert_eq!(r.one(c, CMD_WRITE, 8192, data.len() as u32, &data).0, 0);
    assert_eq!(&r.fake.disk[8192..8192 + data.len()], &data[..]);
    let (error, read) = r.one(c, CMD_READ, 8192, data.len() as u32, &[]);
    assert_eq!((error, read == data), (0, true));
    assert_eq!(r.one(c, CMD_FLUSH, 0, 0, &[]).0, 0);
    assert_eq!(r.fake.flushes, 1);
    assert_eq!(r.one(c, CMD_TRIM, 0, 4096, &[]).0, 0);
    assert_eq!(r.fake.discards, 1);
    assert!(r.fake.routes.iter().all(|t| *t == Route::Device(0)));
    let mut stats = None;
    r.server.clients(|c| stats = Some(c.stats));
    let stats = stats.unwrap();
    assert_eq!(
        (stats.requests, stats.read_bytes, stats.errors),
        (4, data.len() as u64, 0)
    );
    // Goodbye: our FIN; once the client closes too the connection ends and the slot frees.
    r.send(c, CMD_DISC, 9, 0, 0, &[]);
    r.rounds(2);
    assert!(r.sockets.conns[c].fin);
    assert!(take_lines().iter().any(|l| l == "nbd: connection 0 closed"));
    r.sockets.client_fin(c);
    r.rounds(2);
    assert!(r.sockets.conns[c].stale);
    assert_eq!(r.server.connections(), 0);
    assert_eq!(r.fake.free.len(), r.fake.total, "every buffer back");
    assert_eq!(r.server.counters(), (1, 0));
}

#[test]
fn sends_as_much_as_the_socket_takes_and_finishes_later() {
    let mut r = Rig::default();
    r.sockets.window = 1000;
    let c = r.open("d").unwrap();
    let (error, data) = r.one(c, CMD_READ, 0, 64 * 1024, &[]);
    assert_eq!((error, &data[..]), (0, &r.fake.disk[..64 * 1024]));
    r.idle_checks();
    assert_eq!(r.fake.free.len(), r.fake.total);
}

#[test]
fn full_buffers_hold_input_back_and_a_full_queue_is_resubmitted() {
    // 4 buffers of 4 KiB, a queue one request deep, a device that waits.
    let mut r = Rig::new(config(None, None), 4, 1);
    let c = r.open("d").unwrap();
    r.device_runs = false;
    let payload = pattern(64 * 1024, 9);
    for cookie in 1..=3u64 {
        r.send(
            c,
            CMD_WRITE,
            cookie,
            cookie * 65536,
            payload.len() as u32,
            &payload,
        );
    }
    r.rounds(5);
    // One chunk in the device, the rest of the pool filled and waiting for the queue; the
    // input beyond what the buffers hold stays in the socket (TCP back-pressure).
    assert_eq!(r.fake.in_flight.len(), 1);
    assert!(r.fake.free.is_empty());
    let waiting = r.sockets.conns[c].inbox.len();
    assert!(waiting > 2 * payload.len(), "{waiting} bytes held back");
    assert!(r.server.busy(0));
    // The device catches up, one completion per round: everything is resubmitted and
    // answered, in order of completion.
    r.device_runs = true;
    let mut cookies: Vec<u64> = (0..3)
        .map(|_| r.reply(c, 0))
        .map(|(e, k, _)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, [1, 2, 3]);
    for cookie in 1..=3usize {
        assert_eq!(
            &r.fake.disk[cookie * 65536..cookie * 65536 + payload.len()],
            &payload[..]
        );
    }
    assert!(r.sockets.conns[c].inbox.is_empty());
    r.idle_checks();
    assert_eq!(r.fake.free.len(), r.fake.total);
}

#[test]
fn a_silent_client_is_reset_at_the_handshake_deadline() {
    let mut r = Rig::default();
    let c = r.connect(CLIENT);
    assert_eq!(r.server.next_deadline(), Some(r.now + HANDSHAKE_NS));
    r.now += HANDSHAKE_NS - 1;
    r.round();
    assert!(!r.sockets.conns[c].reset);
    r.now += 1;
    r.round();
    assert!(r.sockets.conns[c].reset, "reset, not a FIN");
    let lines = take_lines();
    assert_eq!(
        count(
            &lines,
            "nbd: connection 0 from 10.0.2.2:40000: no handshake within 10 s; reset"
        ),
        1
    );
    r.round();
    assert_eq!(r.server.connections(), 0, "the slot is free again");
    // A client that finished its handshake is not held to the deadline.
    let c = r.open("d").unwrap();
    r.now += 3 * HANDSHAKE_NS;
    r.round();
    assert!(r.sockets.live(c) && !r.sockets.conns[c].fin);
    assert_eq!(r.server.next_deadline(), None, "no nbd.idle=: no deadline");
}

#[test]
fn idle_sessions_are_closed_but_busy_ones_are_not() {
    let mut r = Rig::new(config(None, Some(3)), 64, 8);
    let c = r.open("d").unwrap();
    assert_eq!(r.server.next_deadline(), Some(r.now + 3 * SECOND));
    // A request in the device for longer than nbd.idle= is not idleness.
    r.device_runs = false;
    r.send(c, CMD_READ, 1, 0, 4096, &[]);
    r.round();
    assert!(r.server.busy(0));
    r.now += 10 * SECOND;
    r.round();
    assert!(!r.sockets.conns[c].fin);
    r.device_runs = true;
    assert_eq!(r.reply(c, 4096).0, 0);
    // Activity moves the deadline; then 3 s of nothing closes it with a FIN.
    r.now += 2 * SECOND;
    r.round();
    assert!(!r.sockets.conns[c].fin);
    r.now += 2 * SECOND;
    r.round();
    assert!(r.sockets.conns[c].fin && !r.sockets.conns[c].reset);
    assert_eq!(
        count(
            &take_lines(),
            "nbd: connection 0 from 10.0.2.2:40000: idle for 3 s (nbd.idle); closing"
        ),
        1
    );
    r.sockets.client_fin(c);
    r.round();
    assert_eq!(r.server.connections(), 0);
}

#[test]
fn refusals_are_logged_once_per_address_then_summarised() {
    let mut r = Rig::new(config(Some("10.0.0.0/8"), None), 64, 8);
    let local = r.sockets.local;
    let stranger = ([192, 168, 7, 9], 5000);
    assert!(r.server.screen(CLIENT, local, r.now));
    for i in 0..5 {
        assert!(!r
            .server
            .screen((stranger.0, 5000 + i), local, r.now + u64::from(i)));
    }
    let lines = take_lines();
    assert_eq!(
        lines,
        ["nbd: refused 192.168.7.9:5000: address not in nbd.allow"]
    );
    assert_eq!(r.server.counters(), (0, 5));
    let due = r.server.next_deadline().expect("a summary is due");
    assert_eq!(due, r.now + WINDOW_NS);
    r.now = due;
    r.round();
    let lines = take_lines();
    assert_eq!(
        lines,
        ["nbd: refused 5 connections from 192.168.7.9 in the last 10 s"]
    );
    // A quiet window: nothing more to say, the address is forgotten.
    r.now = r.server.next_deadline().expect("the next window");
    r.round();
    assert!(take_lines().is_empty());
    assert_eq!(r.server.next_deadline(), None);
    // A peer that reaches accept unscreened is refused there too: closed, with the line.
    let c = r.connect(stranger);
    assert!(r.sockets.conns[c].fin);
    assert_eq!(r.server.connections(), 0);
    assert_eq!(count(&take_lines(), "nbd: refused 192.168.7.9:5000"), 1);
    assert_eq!(r.server.counters(), (0, 6));
}

#[test]
fn without_an_allow_list_only_the_local_subnet_connects() {
    let mut r = Rig::default();
    let c = r.connect(([10, 0, 3, 1], 1));
    assert!(r.sockets.conns[c].fin, "another subnet");
    r.sockets.local = None;
    let c = r.connect(CLIENT);
    assert!(r.sockets.conns[c].fin, "no address yet: nobody");
    assert_eq!(r.server.connections(), 0);
}

#[test]
fn session_slots_are_limited_reused_and_held_until_device_io_is_back() {
    let mut r = Rig::default();
    let conns: Vec<usize> = (0..MAX_CONNECTIONS).map(|_| r.open("d").unwrap()).collect();
    assert_eq!(r.server.connections(), MAX_CONNECTIONS);
    // One more: refused with a line, closed; reset if it does not close its side.
    let extra = r.connect(([10, 0, 2, 3], 1234));
    assert!(r.sockets.conns[extra].fin);
    assert_eq!(
        count(
            &take_lines(),
            "nbd: refused 10.0.2.3:1234: too many connections"
        ),
        1
    );
    r.now += LINGER_NS + 1;
    r.round();
    assert!(r.sockets.conns[extra].reset, "a lingering client is reset");
    r.round();
    assert!(r.sockets.conns[extra].stale);
    // Connection 3's client resets while a read of it is in the device: the session keeps
    // its id until the read is back, then frees it and its buffers.
    r.device_runs = false;
    r.send(conns[3], CMD_READ, 1, 0, 8192, &[]);
    r.round();
    assert_eq!(r.fake.in_flight.len(), 2);
    r.sockets.lost(conns[3]);
    r.round();
    assert!(count(&take_lines(), "nbd: connection 3 from 10.0.2.2:40000 lost") == 1);
    assert_eq!(r.server.connections(), MAX_CONNECTIONS);
    let refused = r.connect(([10, 0, 2, 4], 1));
    assert!(r.sockets.conns[refused].fin, "still full");
    r.device_runs = true;
    r.round();
    assert_eq!(r.server.connections(), MAX_CONNECTIONS - 1);
    assert_eq!(
        r.fake.free.len(),
        r.fake.total,
        "the read's buffers are back"
    );
    // The id is given to the next client.
    let again = r.open("d").unwrap();
    let mut ids = Vec::new();
    r.server.clients(|c| ids.push(c.id));
    assert_eq!(ids, (0..MAX_CONNECTIONS as u8).collect::<Vec<_>>());
    assert_eq!(r.one(again, CMD_READ, 0, 512, &[]).0, 0);
    assert_eq!(r.server.counters().0, MAX_CONNECTIONS as u64 + 1);
}

#[test]
fn a_completion_nobody_waits_for_gives_its_buffer_back() {
    let mut r = Rig::default();
    let id = crate::RequestId {
        connection: 5,
        slot: 0,
        chunk: 0,
    };
    let before = r.fake.free.len();
    let free = &mut r.fake.free;
    r.server
        .complete(id, Ok(()), Some(Buf::new(4096)), &mut |b| free.push(b));
    assert_eq!(r.fake.free.len(), before + 1);
    assert_eq!(
        count(&take_lines(), "nbd: completion for an unknown request"),
        1
    );
}

// --- role changes (issue 15): what a handle names is looked up per request --------------------

#[test]
fn a_device_that_becomes_an_origin_goes_through_the_engine_from_the_next_request() {
    let mut r = Rig::default();
    let c = r.open("d").unwrap();
    let before = pattern(4096, 1);
    assert_eq!(r.one(c, CMD_WRITE, 0, 4096, &before).0, 0);
    assert_eq!(r.fake.routes, [Route::Device(0)]);
    // `snapshot create s1 d ...` while the session is open.
    r.fake.create_snapshot("s1", 0);
    r.fake.routes.clear();
    let after = pattern(4096, 2);
    assert_eq!(r.one(c, CMD_WRITE, 0, 4096, &after).0, 0);
    assert_eq!(r.one(c, CMD_FLUSH, 0, 0, &[]).0, 0);
    assert_eq!(r.one(c, CMD_READ, 0, 4096, &[]), (0, after.clone()));
    assert_eq!(r.fake.routes, [Route::Origin(0); 3]);
    // A trim through the engine is a hint: answered, nothing discarded.
    assert_eq!(r.one(c, CMD_TRIM, 0, 4096, &[]).0, 0);
    assert_eq!(r.fake.discards, 0);
    // The snapshot holds what the disk held when it was taken.
    let s = r.open("s1").unwrap();
    assert_eq!(r.one(s, CMD_READ, 0, 4096, &[]), (0, before));
    assert_eq!(
        r.fake.routes.last(),
        Some(&Route::Snapshot { origin: 0, slot: 0 })
    );
    assert!(take_lines()
        .iter()
        .all(|l| !l.contains("holds a COW store")));
    r.idle_checks();
}

#[test]
fn a_device_that_becomes_a_cow_store_refuses_writes_and_says_so_once() {
    let mut r = Rig::default();
    let c = r.open("d").unwrap();
    take_lines();
    // `snapshot create s1 vda d`: the device now holds a store.
    r.fake.role = DeviceRole::Store;
    let data = pattern(8192, 4);
    assert_eq!(r.one(c, CMD_WRITE, 0, 8192, &data).0, Errno::Perm as u32);
    assert_eq!(
        r.one(c, CMD_WRITE, 4096, 4096, &data[..4096]).0,
        Errno::Perm as u32
    );
    assert_eq!(r.one(c, CMD_TRIM, 0, 4096, &[]).0, Errno::Perm as u32);
    assert_eq!(r.fake.discards, 0);
    assert_ne!(
        &r.fake.disk[..8192],
        &data[..],
        "nothing written over the store"
    );
    // Reads and flushes go on.
    let (error, read) = r.one(c, CMD_READ, 0, 4096, &[]);
    assert_eq!((error, &read[..]), (0, &r.fake.disk[..4096]));
    assert_eq!(r.one(c, CMD_FLUSH, 0, 0, &[]).0, 0);
    let lines = take_lines();
    assert_eq!(
        count(
            &lines,
            "nbd: connection 0: d now holds a COW store; its writes are refused"
        ),
        1,
        "{lines:?}"
    );
    let mut errors = 0;
    r.server.clients(|c| errors = c.stats.errors);
    assert_eq!(errors, 3);
    r.idle_checks();
    assert_eq!(r.fake.free.len(), r.fake.total);
}

#[test]
fn a_deleted_snapshot_answers_errors_and_never_reaches_a_later_one_of_its_name() {
    let mut r = Rig::default();
    r.fake.create_snapshot("s1", 0);
    let old = r.open("s1").unwrap();
    let first = r.fake.snaps[0].data[..4096].to_vec();
    assert_eq!(r.one(old, CMD_READ, 0, 4096, &[]), (0, first.clone()));
    take_lines();
    // `snapshot delete s1`, then a new `s1` in the same engine slot, of other data.
    r.fake.delete_snapshot("s1");
    let other = pattern(4096, 7);
    r.fake.disk[..4096].copy_from_slice(&other);
    r.fake.create_snapshot("s1", 0);
    r.fake.routes.clear();
    assert_eq!(r.one(old, CMD_READ, 0, 4096, &[]).0, Errno::Io as u32);
    let write = pattern(4096, 8);
    assert_eq!(r.one(old, CMD_WRITE, 0, 4096, &write).0, Errno::Io as u32);
    assert_eq!(r.one(old, CMD_FLUSH, 0, 0, &[]).0, Errno::Io as u32);
    assert!(
        r.fake.routes.is_empty(),
        "nothing reached the new s1: {:?}",
        r.fake.routes
    );
    assert_eq!(&r.fake.snaps[0].data[..4096], &other[..]);
    assert_eq!(
        count(
            &take_lines(),
            "nbd: connection 0: its snapshot was deleted or is being merged; its requests fail"
        ),
        1
    );
    // A new session on the name reaches the new snapshot.
    let new = r.open("s1").unwrap();
    assert_eq!(r.one(new, CMD_READ, 0, 4096, &[]), (0, other));
    let mut exports = Vec::new();
    r.server.clients(|c| exports.push(c.export));
    assert_ne!(exports[0], exports[1], "two handles: two instances");
    r.idle_checks();
}

#[test]
fn a_merge_fails_the_snapshots_sessions_and_the_origin_goes_on() {
    let mut r = Rig::default();
    r.fake.create_snapshot("s1", 0);
    let snap = r.open("s1").unwrap();
    let origin = r.open("d").unwrap();
    // `snapshot merge s1` starts: the snapshot is no longer served; the origin still goes
    // through its engine.
    r.fake.snaps[0].serving = false;
    r.fake.routes.clear();
    assert_eq!(r.one(snap, CMD_READ, 0, 4096, &[]).0, Errno::Io as u32);
    let data = pattern(4096, 5);
    assert_eq!(r.one(origin, CMD_WRITE, 0, 4096, &data).0, 0);
    assert_eq!(r.fake.routes, [Route::Origin(0)]);
    // The merge ends: the snapshot is gone and the device is plain again.
    r.fake.delete_snapshot("s1");
    assert_eq!(r.fake.role, DeviceRole::Plain);
    r.fake.routes.clear();
    assert_eq!(r.one(origin, CMD_READ, 0, 4096, &[]), (0, data));
    assert_eq!(r.fake.routes, [Route::Device(0)]);
    assert_eq!(r.one(snap, CMD_READ, 0, 4096, &[]).0, Errno::Io as u32);
    // Nor can a new session find it.
    assert_eq!(r.open("s1"), Err(REP_ERR_UNKNOWN));
    r.idle_checks();
}

#[test]
fn every_export_is_read_back_whole_through_the_server() {
    // The fake's size checks hold at the disk's end.
    let mut r = Rig::default();
    let c = r.open("d").unwrap();
    let (error, data) = r.one(c, CMD_READ, DISK as u64 - 4096, 4096, &[]);
    assert_eq!((error, &data[..]), (0, &r.fake.disk[DISK - 4096..]));
    assert_ne!(r.one(c, CMD_READ, DISK as u64, 4096, &[]).0, 0);
    r.idle_checks();
}
