//! The NBD server: up to [`MAX_CONNECTIONS`] sessions ([`Session`]) on the connections of a
//! listening socket, over the volumes of a [`Backend`]. It knows neither the TCP stack nor
//! the storage layer: the kernel supplies both, a [`Sockets`] over smoltcp and a `Backend`
//! over its devices and snapshot engines, and the host tests fakes of each.
//!
//! What one round does, from the main loop:
//! - [`Server::poll_connections`]: connections that ended under us (reset, timed out) are
//!   forgotten; new ones are accepted ([`Server::accept`]: allow-list, free session) or
//!   refused (closed with a log line); refusal summaries are logged; a connection that has
//!   not finished its handshake within 10 s is reset, and with `nbd.idle=SECONDS` one idle
//!   that long is closed ([`crate::guard::expiry`]); a connection we closed whose client
//!   does not close its side within [`LINGER_NS`] is reset (what Linux's `tcp_fin_timeout`
//!   does), so a half-open client cannot hold a TCP slot.
//! - [`Server::poll_receive`]: on every open connection, the waiting bytes are handed to its
//!   session in place; only what the session takes is consumed, the rest stays in the
//!   socket and TCP flow control slows the client (back-pressure when request slots or
//!   buffers are all in use). Nothing is submitted here.
//! - [`Server::step`]: the one place device I/O is submitted: what the sessions received
//!   and what waited for a queue slot or buffers; sessions whose socket is gone are freed
//!   once their device I/O is back.
//! - [`Server::poll_send`]: replies go into each socket's send buffer, as much as it takes
//!   now; the client finished, an error, or the session is done: our FIN.
//!   ([`Server::poll_io`] is the three in a row, for a caller with nothing in between.)
//! - [`Server::complete`]: a device completion, by the [`RequestId`] the session gave the
//!   backend with the submission, goes to its session.
//!
//! Peers can also be screened before a TCP slot is spent on them ([`Server::screen`], at
//! their SYN). Sessions are allocated when a connection is accepted; receiving, sending,
//! completions and resubmission allocate nothing.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use super::allow::{self, AllowList};
use super::connection::ConnectionConfig;
use super::error::NbdError;
use super::guard::{self, Clock, Expiry, Refusals};
use super::proto::Errno;
use super::session::{Backend, IoBuffer, RequestId, Session, SessionStats};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// Connection slots of the listening socket: every session, plus two so that a client over
/// the limit is answered (closed with a log line) instead of left waiting in SYN.
pub const TCP_SLOTS: usize = MAX_CONNECTIONS + 2;
/// The largest READ/WRITE payload offered (each export also stays within
/// [`crate::session::MAX_CHUNKS`] of its pool's buffers and within the pool itself).
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// How long a connection we closed may wait for the client's FIN before it is reset.
pub const LINGER_NS: u64 = 5_000_000_000;

/// A client's IPv4 address and TCP port.
pub type Peer = ([u8; 4], u16);

/// An address in dotted-quad form, for log lines.
struct Dotted([u8; 4]);

impl fmt::Display for Dotted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Why a socket call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketError {
    /// The peer has closed its side and everything it sent was read.
    Finished,
    /// The connection is gone (reset, or a stale handle).
    Gone,
}

/// The connections of one listening TCP socket, as the server drives them. Level-triggered:
/// the server asks every round. The kernel implements it over smoltcp; handles of
/// connections that ended must be harmless (calls on them fail or do nothing).
pub trait Sockets {
    /// A connection.
    type Conn: Copy + Eq + fmt::Debug;
    /// The next new connection and its peer.
    fn accept(&mut self) -> Option<(Self::Conn, Peer)>;
    /// The next connection that ended (both sides closed, reset, timed out); its handle is
    /// stale from now on.
    fn take_closed(&mut self) -> Option<Self::Conn>;
    /// Hands the bytes waiting on `conn` to `take` in place (in one or more pieces) and
    /// consumes as many as it returns; stops when `take` leaves bytes, fails, or nothing is
    /// left. Returns the bytes consumed or the first error of `take` (bytes consumed before
    /// it stay consumed); `Err(Finished)` when the peer has closed and everything was read.
    fn recv(
        &mut self,
        conn: Self::Conn,
        take: &mut dyn FnMut(&[u8]) -> Result<usize, NbdError>,
    ) -> Result<Result<usize, NbdError>, SocketError>;
    /// Queues up to `data.len()` bytes for sending; returns how many fit (0 when full or
    /// when the connection cannot send).
    fn send(&mut self, conn: Self::Conn, data: &[u8]) -> usize;
    /// Closes our side once the queued bytes are out (FIN).
    fn close(&mut self, conn: Self::Conn);
    /// Resets the connection at once (RST).
    fn abort(&mut self, conn: Self::Conn);
    /// The appliance's own address and prefix, if configured (without `nbd.allow=` only
    /// peers on its subnet are let in).
    fn local_address(&self) -> Option<([u8; 4], u8)>;
}

/// Server settings (from the kernel command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// TCP port to listen on.
    pub port: u16,
    /// Networks allowed to connect (`None`: the NIC's own subnet; see [`allow::allowed`]).
    pub allow: Option<AllowList>,
    /// `nbd.idle=` in ns: sessions idle this long are closed (`None`: never).
    pub idle_ns: Option<u64>,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// The peer is not in `nbd.allow=`.
    NotAllowed,
    /// [`MAX_CONNECTIONS`] are open.
    Full,
}

impl fmt::Display for AcceptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AcceptError::NotAllowed => "address not in nbd.allow",
            AcceptError::Full => "too many connections",
        })
    }
}

/// One connection as the console shows it.
#[derive(Clone, Copy, Debug)]
pub struct ClientInfo {
    /// The server's connection id.
    pub id: u8,
    /// The client's address and port.
    pub peer: Peer,
    /// The export's handle ([`crate::route::ExportId`]), once the handshake chose one.
    pub export: Option<u64>,
    /// Requests and bytes.
    pub stats: SessionStats,
    /// Requests taken and not yet answered.
    pub in_flight: usize,
    /// Device requests out.
    pub in_device: usize,
    /// Closing: the socket is gone or about to go; waiting for device I/O.
    pub closing: bool,
}

struct Entry<B: IoBuffer> {
    session: Box<Session<B>>,
    /// The client's address and port.
    peer: Peer,
    /// The socket is closed ([`Server::closed`]): the id may be reused once the device I/O
    /// is back.
    socket_closed: bool,
}

/// A TCP connection of the listening socket and the session it feeds.
#[derive(Clone, Copy, Debug)]
struct Link<C> {
    conn: C,
    peer: Peer,
    /// The session's id (`None`: refused).
    id: Option<u8>,
    /// When we closed the socket (and the session); waiting for the stack to report the end.
    closed_at: Option<u64>,
    /// Opened, last active, handshake done: for the handshake deadline and `nbd.idle=`.
    clock: Clock,
}

/// The NBD server (see the module documentation). `B` is the backend's buffer type, `C` the
/// sockets' connection handle.
pub struct Server<B: IoBuffer, C> {
    config: ServerConfig,
    sessions: Vec<Option<Entry<B>>>,
    links: Vec<Option<Link<C>>>,
    /// Refused connections, for rate-limited log lines.
    refusals: Refusals,
    /// Connections accepted since start.
    accepted: u64,
}

impl<B: IoBuffer, C: Copy + Eq + fmt::Debug> Server<B, C> {
    /// A server with no connections (allocates its tables now).
    pub fn new(config: ServerConfig) -> Self {
        Server {
            config,
            sessions: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            links: (0..TCP_SLOTS).map(|_| None).collect(),
            refusals: Refusals::new(),
            accepted: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Connections accepted and refused since start.
    pub fn counters(&self) -> (u64, u64) {
        (self.accepted, self.refusals.total())
    }

    /// Whether `peer` may connect to an appliance whose NIC has the address and prefix
    /// `local`, checked as soon as its SYN arrives, before it takes a connection slot; a
    /// refusal is recorded and logged (rate-limited).
    pub fn screen(&mut self, peer: Peer, local: Option<([u8; 4], u8)>, now: u64) -> bool {
        let allowed = allow::allowed(self.config.allow.as_ref(), local, peer.0);
        if !allowed {
            self.refused(peer, AcceptError::NotAllowed, now);
        }
        allowed
    }

    /// Records a refused connection: logged in full if it is its address's first in a
    /// window, else counted for a summary.
    pub fn refused(&mut self, peer: Peer, why: AcceptError, now: u64) {
        if self.refusals.record(peer.0, now) {
            log::warn!("nbd: refused {}:{}: {why}", Dotted(peer.0), peer.1);
        }
    }

    /// Connection `id` has finished its handshake.
    pub fn serving(&self, id: u8) -> bool {
        self.entry(id).is_some_and(|e| e.session.export().is_some())
    }

    /// Connection `id` has requests in flight.
    pub fn busy(&self, id: u8) -> bool {
        self.entry(id)
            .is_some_and(|e| e.session.in_flight() > 0 || e.session.in_device() > 0)
    }

    fn entry(&self, id: u8) -> Option<&Entry<B>> {
        self.sessions.get(usize::from(id)).and_then(Option::as_ref)
    }

    /// Open sessions (including ones waiting for their device I/O).
    pub fn connections(&self) -> usize {
        self.sessions.iter().flatten().count()
    }

    /// A new connection from `peer` to an appliance whose NIC has the address and prefix
    /// `local`: its session id, or why it is refused. Without `nbd.allow=` only peers on
    /// `local`'s subnet are let in. Allocates the session.
    pub fn accept(&mut self, peer: Peer, local: Option<([u8; 4], u8)>) -> Result<u8, AcceptError> {
        if !allow::allowed(self.config.allow.as_ref(), local, peer.0) {
            return Err(AcceptError::NotAllowed);
        }
        self.open(peer)
    }

    /// A connection from inside the appliance (`nbd-selftest`), driven with
    /// [`Server::receive`] and [`Server::transmit`]: the allow-list does not apply.
    pub fn accept_loopback(&mut self) -> Result<u8, AcceptError> {
        self.open(([127, 0, 0, 1], 0))
    }

    fn open(&mut self, peer: Peer) -> Result<u8, AcceptError> {
        let id = self
            .sessions
            .iter()
            .position(Option::is_none)
            .ok_or(AcceptError::Full)?;
        let config = ConnectionConfig {
            max_payload: MAX_PAYLOAD,
        };
        self.sessions[id] = Some(Entry {
            session: Box::new(Session::new(id as u8, config)),
            peer,
            socket_closed: false,
        });
        Ok(id as u8)
    }

    /// Bytes received on connection `id`: how many were taken. After an error the
    /// connection is to be closed.
    pub fn receive<V: Backend<Buf = B>>(
        &mut self,
        volumes: &mut V,
        id: u8,
        input: &[u8],
    ) -> Result<usize, NbdError> {
        self.session(id)?.on_receive(volumes, input)
    }

    /// Sends what connection `id` has to send through `send` (returns bytes it took).
    pub fn transmit<V: Backend<Buf = B>>(
        &mut self,
        volumes: &mut V,
        id: u8,
        send: &mut dyn FnMut(&[u8]) -> usize,
    ) -> Result<(), NbdError> {
        self.session(id)?.on_transmit(volumes, send)
    }

    /// Every open session (including ones whose socket is closed and whose device I/O is
    /// still out), for the console.
    pub fn clients(&self, mut f: impl FnMut(ClientInfo)) {
        for (id, e) in self.sessions.iter().enumerate() {
            let Some(e) = e else { continue };
            f(ClientInfo {
                id: id as u8,
                peer: e.peer,
                export: e.session.export().map(|x| x.handle),
                stats: e.session.stats(),
                in_flight: e.session.in_flight(),
                in_device: e.session.in_device(),
                closing: e.socket_closed || e.session.should_close(),
            });
        }
    }

    /// Connection `id` is done (client goodbye, or an error): close its socket.
    pub fn should_close(&self, id: u8) -> bool {
        self.entry(id).is_none_or(|e| e.session.should_close())
    }

    /// The socket of connection `id` is closed (always call this, also after an error or
    /// [`Server::should_close`]): the session and its id are freed once its device I/O is
    /// back.
    pub fn closed(&mut self, id: u8) {
        if let Some(Some(e)) = self.sessions.get_mut(usize::from(id)) {
            e.session.kill();
            e.socket_closed = true;
        }
    }

    /// A device completion of the request the server submitted as `id`: read data stays in
    /// its buffer until sent; other buffers go back through `release` (as does the buffer of
    /// a completion no session is waiting for).
    pub fn complete(
        &mut self,
        id: RequestId,
        result: Result<(), Errno>,
        buffer: Option<B>,
        release: &mut dyn FnMut(B),
    ) {
        let entry = self
            .sessions
            .get_mut(usize::from(id.connection))
            .and_then(Option::as_mut);
        match entry {
            Some(e) => e
                .session
                .on_completion(id.slot, id.chunk, result, buffer, release),
            None => {
                log::error!("nbd: completion for an unknown request {id:?}");
                if let Some(b) = buffer {
                    release(b);
                }
            }
        }
    }

    /// Resubmits waiting I/O and frees finished sessions (every loop iteration).
    pub fn step<V: Backend<Buf = B>>(&mut self, volumes: &mut V) {
        for entry in self.sessions.iter_mut() {
            let Some(e) = entry else { continue };
            e.session.step(volumes);
            if e.socket_closed && e.session.can_free() {
                e.session.release_all(volumes);
                *entry = None;
            }
        }
    }

    fn session(&mut self, id: u8) -> Result<&mut Session<B>, NbdError> {
        self.sessions
            .get_mut(usize::from(id))
            .and_then(Option::as_mut)
            .filter(|e| !e.socket_closed)
            .map(|e| &mut *e.session)
            .ok_or(NbdError::Closed)
    }

    /// When the next timed step is due (ns), if any: a lingering connection to reset, a
    /// handshake deadline, an idle timeout, a refusal summary.
    pub fn next_deadline(&self) -> Option<u64> {
        let idle_ns = self.config.idle_ns;
        let links = self
            .links
            .iter()
            .flatten()
            .filter_map(move |l| match l.closed_at {
                Some(t) => Some(t.saturating_add(LINGER_NS + 1)),
                None if l.id.is_some() => guard::due(&l.clock, idle_ns),
                None => None,
            });
        links.chain(self.refusals.next_due()).min()
    }

    /// The connection half of a round at `now`: ended connections, new ones, refusal
    /// summaries, expired clocks, resets of closed connections that linger. Accepting
    /// allocates a session; nothing else does.
    pub fn poll_connections<S: Sockets<Conn = C>>(&mut self, sockets: &mut S, now: u64) {
        while let Some(conn) = sockets.take_closed() {
            let Some(entry) = self
                .links
                .iter_mut()
                .find(|l| l.is_some_and(|l| l.conn == conn))
            else {
                continue;
            };
            if let Some(Link {
                id: Some(id),
                closed_at: None,
                peer,
                ..
            }) = entry.take()
            {
                // Reset or timed out under us.
                log::info!(
                    "nbd: connection {id} from {}:{} lost",
                    Dotted(peer.0),
                    peer.1
                );
                self.closed(id);
            }
        }
        while let Some((conn, peer)) = sockets.accept() {
            self.accept_link(sockets, conn, peer, now);
        }
        self.refusals.due(now, |summary| log::warn!("{summary}"));
        self.expire(sockets, now);
        for link in self.links.iter().flatten() {
            if link
                .closed_at
                .is_some_and(|t| now.saturating_sub(t) > LINGER_NS)
            {
                // Reported by `take_closed` in a later round.
                sockets.abort(link.conn);
            }
        }
    }

    /// The I/O half of a round at `now`: [`Server::poll_receive`], [`Server::step`],
    /// [`Server::poll_send`]. Allocates nothing.
    pub fn poll_io<S: Sockets<Conn = C>, V: Backend<Buf = B>>(
        &mut self,
        sockets: &mut S,
        volumes: &mut V,
        now: u64,
    ) {
        self.poll_receive(sockets, volumes, now);
        self.step(volumes);
        self.poll_send(sockets, volumes, now);
    }

    /// The receive half of the I/O at `now`: bytes received on every open connection go to
    /// its session (requests and write payloads, submitted by the next [`Server::step`]);
    /// a connection that failed or finished is closed. Allocates nothing.
    pub fn poll_receive<S: Sockets<Conn = C>, V: Backend<Buf = B>>(
        &mut self,
        sockets: &mut S,
        volumes: &mut V,
        now: u64,
    ) {
        self.each_open_link(now, |server, link, id| {
            server.pump_in(sockets, volumes, link.conn, id, link.peer)
        });
    }

    /// The send half of the I/O at `now`: replies due on every open connection go out; a
    /// connection that is done is closed. Allocates nothing.
    pub fn poll_send<S: Sockets<Conn = C>, V: Backend<Buf = B>>(
        &mut self,
        sockets: &mut S,
        volumes: &mut V,
        now: u64,
    ) {
        self.each_open_link(now, |server, link, id| {
            let finished = server.pump_out(sockets, volumes, link.conn, id, link.peer);
            (finished, server.busy(id))
        });
    }

    /// Runs `io` on every open connection (with its session `id`); `io` says whether the
    /// connection closed and whether it was active. Their clocks follow at `now`.
    fn each_open_link(
        &mut self,
        now: u64,
        mut io: impl FnMut(&mut Self, Link<C>, u8) -> (bool, bool),
    ) {
        for index in 0..self.links.len() {
            let Some(link) = self.links[index] else {
                continue;
            };
            let (Some(id), None) = (link.id, link.closed_at) else {
                continue;
            };
            let (finished, active) = io(self, link, id);
            let serving = self.serving(id);
            if let Some(l) = self.links[index].as_mut() {
                if active {
                    l.clock.active = now;
                }
                l.clock.serving = serving;
                if finished {
                    l.closed_at = Some(now);
                }
            }
        }
    }

    /// Closes the sessions whose clock ran out: no handshake within 10 s (reset at once,
    /// so a silent client frees its slot), or idle for `nbd.idle=` (closed with a FIN).
    fn expire<S: Sockets<Conn = C>>(&mut self, sockets: &mut S, now: u64) {
        let idle_ns = self.config.idle_ns;
        for index in 0..self.links.len() {
            let Some(link) = self.links[index] else {
                continue;
            };
            let (Some(id), None) = (link.id, link.closed_at) else {
                continue;
            };
            let Some(why) = guard::expiry(&link.clock, self.busy(id), idle_ns, now) else {
                continue;
            };
            let (addr, port) = link.peer;
            match why {
                Expiry::Handshake => {
                    log::warn!(
                        "nbd: connection {id} from {}:{port}: no handshake within {} s; reset",
                        Dotted(addr),
                        guard::HANDSHAKE_NS / 1_000_000_000
                    );
                    sockets.abort(link.conn);
                }
                Expiry::Idle => {
                    log::info!(
                        "nbd: connection {id} from {}:{port}: idle for {} s (nbd.idle); closing",
                        Dotted(addr),
                        idle_ns.unwrap_or(0) / 1_000_000_000
                    );
                    sockets.close(link.conn);
                }
            }
            self.closed(id);
            if let Some(l) = self.links[index].as_mut() {
                l.closed_at = Some(now);
            }
        }
    }

    fn accept_link<S: Sockets<Conn = C>>(
        &mut self,
        sockets: &mut S,
        conn: C,
        peer: Peer,
        now: u64,
    ) {
        let local = sockets.local_address();
        let result = self.accept(peer, local);
        // As many links as TCP slots: there is always one free.
        let free = self.links.iter().position(Option::is_none);
        let clock = Clock {
            opened: now,
            active: now,
            serving: false,
        };
        match (result, free) {
            (Ok(id), Some(free)) => {
                self.accepted += 1;
                self.links[free] = Some(Link {
                    conn,
                    peer,
                    id: Some(id),
                    closed_at: None,
                    clock,
                });
                log::info!("nbd: connection {id} from {}:{}", Dotted(peer.0), peer.1);
            }
            (result, free) => {
                let why = match result {
                    Err(e) => e,
                    // No link free (cannot happen): give the session back.
                    Ok(id) => {
                        self.closed(id);
                        AcceptError::Full
                    }
                };
                self.refused(peer, why, now);
                sockets.close(conn);
                match free {
                    Some(free) => {
                        self.links[free] = Some(Link {
                            conn,
                            peer,
                            id: None,
                            closed_at: Some(now),
                            clock,
                        })
                    }
                    None => sockets.abort(conn),
                }
            }
        }
    }

    /// Hands the bytes received on connection `id` to its session; closes it when that
    /// failed or the peer finished. Returns (closed, bytes were received).
    fn pump_in<S: Sockets<Conn = C>, V: Backend<Buf = B>>(
        &mut self,
        sockets: &mut S,
        volumes: &mut V,
        conn: C,
        id: u8,
        peer: Peer,
    ) -> (bool, bool) {
        let mut finished = false;
        let mut received = false;
        let Ok(session) = self.session(id) else {
            return (true, false);
        };
        match sockets.recv(conn, &mut |bytes| session.on_receive(volumes, bytes)) {
            Ok(Ok(n)) => received = n > 0,
            Ok(Err(e)) => {
                log::warn!("nbd: connection {id} from {}: {e}; closing", Dotted(peer.0));
                finished = true;
            }
            Err(_) => finished = true,
        }
        if finished {
            self.close(sockets, conn, id);
        }
        (finished, received)
    }

    /// Sends what connection `id` has due; closes it when that failed or the session is
    /// done. Returns whether it closed.
    fn pump_out<S: Sockets<Conn = C>, V: Backend<Buf = B>>(
        &mut self,
        sockets: &mut S,
        volumes: &mut V,
        conn: C,
        id: u8,
        peer: Peer,
    ) -> bool {
        let Ok(session) = self.session(id) else {
            return true;
        };
        let sent = session.on_transmit(volumes, &mut |bytes| sockets.send(conn, bytes));
        let failed = match sent {
            Ok(()) => false,
            Err(e) => {
                log::warn!("nbd: connection {id} from {}: {e}; closing", Dotted(peer.0));
                true
            }
        };
        if failed || session.should_close() {
            self.close(sockets, conn, id);
            return true;
        }
        false
    }

    /// Our FIN on connection `id`; its session is freed once its device I/O is back.
    fn close<S: Sockets<Conn = C>>(&mut self, sockets: &mut S, conn: C, id: u8) {
        log::info!("nbd: connection {id} closed");
        sockets.close(conn);
        self.closed(id);
    }
}
