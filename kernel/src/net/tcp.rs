//! TCP listeners for services of the appliance (the NBD server, the test echo service): a
//! fixed set of smoltcp TCP sockets per listening port, with receive and transmit buffers
//! allocated once when the listener is made. A slot whose connection ended listens again, so
//! a listener serves up to `slots` clients at a time, forever, without allocating.
//!
//! A service drives its connections from the main loop, level-triggered:
//! ```ignore
//! let l = net.tcp_listen(10809, TcpConfig::default())?;           // start-up
//! // every loop iteration, after net::poll:
//! while let Some((conn, peer)) = net.tcp_accept(l) { /* new client */ }
//! while let Some(conn) = net.tcp_take_closed(l) { /* forget conn */ }
//! for i in 0..net.tcp_slots(l) {
//!     let Some(conn) = net.tcp_connection(l, i) else { continue };
//!     net.tcp_recv(conn, &mut buf)?;    // Ok(0): nothing yet; Err(Finished): peer is done
//!     net.tcp_send(conn, &reply)?;      // bytes queued, 0 when the send buffer is full
//! }
//! ```
//! Connection handles carry a generation: one used after its connection ended gets
//! [`TcpError::Stale`], never another client's data.

use alloc::vec::Vec;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::time::Duration;
use smoltcp::wire::IpAddress;

use super::Net;

/// Sizes of a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// Connections served at once.
    pub slots: usize,
    /// Receive buffer per connection (bytes; also the largest window advertised).
    pub rx_buffer: usize,
    /// Transmit buffer per connection (bytes).
    pub tx_buffer: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            slots: 8,
            rx_buffer: 256 * 1024,
            tx_buffer: 256 * 1024,
        }
    }
}

/// The screen of listeners marked by [`Net::tcp_screen`], given by the network's owner to
/// each [`Net::receive`]: whether `peer` may have a slot of `listener`, given the NIC's
/// address and prefix. Called once per connection, as soon as its SYN took a slot.
pub type Screen<'a> = dyn FnMut(ListenerId, Peer, Option<([u8; 4], u8)>) -> bool + 'a;

/// A listener, as returned by [`Net::tcp_listen`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerId(pub(super) u8);

/// One connection of a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    listener: u8,
    slot: u16,
    generation: u32,
}

/// The remote end of a connection: IPv4 address and port.
pub type Peer = ([u8; 4], u16);

/// Why a TCP call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpError {
    /// The connection ended (or the handle belongs to an earlier connection of its slot).
    Stale,
    /// The peer has sent everything (FIN received and all data read): nothing more comes.
    Finished,
    /// The connection cannot send any more (closed by us, or reset).
    NotSendable,
}

impl core::fmt::Display for TcpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Stale => "connection no longer exists",
            Self::Finished => "peer closed the connection",
            Self::NotSendable => "connection cannot send",
        })
    }
}

/// Why a listener could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenError {
    /// Port 0, or a port another listener has.
    PortInUse(u16),
    /// At most 255 listeners.
    TooMany,
    /// `slots` is 0 or a buffer is smaller than 1 KiB.
    BadConfig,
}

impl core::fmt::Display for ListenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::PortInUse(0) => write!(f, "port 0 cannot be listened on"),
            Self::PortInUse(p) => write!(f, "port {p} is already listened on"),
            Self::TooMany => write!(f, "too many listeners"),
            Self::BadConfig => write!(f, "bad listener sizes"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a client.
    Listening,
    /// Connected; not yet handed out by `tcp_accept`.
    New,
    /// Handed out.
    Open,
    /// Ended after being handed out; reported by `tcp_take_closed`, then listens again.
    Ended,
    /// Refused by the listener's screen at this time (ns since boot): reset, listens again
    /// once the reset is out (or after [`REFUSED_HOLD_NS`]).
    Refused(u64),
}

#[derive(Debug)]
struct Slot {
    handle: SocketHandle,
    generation: u32,
    phase: Phase,
    /// The listener's screen let this connection's peer in.
    screened: bool,
}

/// A listening port and its connection slots.
#[derive(Debug)]
pub struct Listener {
    port: u16,
    slots: Vec<Slot>,
    accepted: u64,
    /// Peers are screened (see [`Net::tcp_screen`]).
    screen: bool,
    refused: u64,
}

impl Listener {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// One connection for the console.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionInfo {
    /// Local port.
    pub port: u16,
    /// Remote end.
    pub peer: Option<Peer>,
    /// smoltcp state name.
    pub state: &'static str,
    /// Bytes waiting to be read.
    pub recv_queue: usize,
    /// Bytes waiting to be sent or acknowledged.
    pub send_queue: usize,
}

fn state_name(s: tcp::State) -> &'static str {
    match s {
        tcp::State::Closed => "CLOSED",
        tcp::State::Listen => "LISTEN",
        tcp::State::SynSent => "SYN-SENT",
        tcp::State::SynReceived => "SYN-RECEIVED",
        tcp::State::Established => "ESTABLISHED",
        tcp::State::FinWait1 => "FIN-WAIT-1",
        tcp::State::FinWait2 => "FIN-WAIT-2",
        tcp::State::CloseWait => "CLOSE-WAIT",
        tcp::State::Closing => "CLOSING",
        tcp::State::LastAck => "LAST-ACK",
        tcp::State::TimeWait => "TIME-WAIT",
    }
}

fn peer_of(socket: &tcp::Socket) -> Option<Peer> {
    socket.remote_endpoint().map(|e| match e.addr {
        IpAddress::Ipv4(a) => (a.octets(), e.port),
    })
}

/// How long a refused connection's slot waits for its reset to go out (the peer's address
/// may still need resolving) before it listens again regardless.
const REFUSED_HOLD_NS: u64 = 3_000_000_000;

/// Idle connections are probed this often, and dropped when the peer stays silent this long.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(120);

impl Net {
    /// Listens on `port` with `config.slots` connections of the given buffer sizes (allocated
    /// now: call at start-up or from a console command, not on the I/O path).
    pub fn tcp_listen(&mut self, port: u16, config: TcpConfig) -> Result<ListenerId, ListenError> {
        if port == 0 || self.listeners.iter().any(|l| l.port == port) {
            return Err(ListenError::PortInUse(port));
        }
        if self.listeners.len() >= 255 {
            return Err(ListenError::TooMany);
        }
        if config.slots == 0 || config.rx_buffer < 1024 || config.tx_buffer < 1024 {
            return Err(ListenError::BadConfig);
        }
        let mut slots = Vec::with_capacity(config.slots);
        for _ in 0..config.slots {
            let rx = tcp::SocketBuffer::new(alloc::vec![0u8; config.rx_buffer]);
            let tx = tcp::SocketBuffer::new(alloc::vec![0u8; config.tx_buffer]);
            let mut socket = tcp::Socket::new(rx, tx);
            socket.set_nagle_enabled(false);
            socket.set_keep_alive(Some(KEEP_ALIVE));
            socket.set_timeout(Some(TIMEOUT));
            if socket.listen(port).is_err() {
                return Err(ListenError::PortInUse(port));
            }
            let handle = self.sockets.add(socket);
            slots.push(Slot {
                handle,
                generation: 0,
                phase: Phase::Listening,
                screened: false,
            });
        }
        self.listeners.push(Listener {
            port,
            slots,
            accepted: 0,
            screen: false,
            refused: 0,
        });
        Ok(ListenerId((self.listeners.len() - 1) as u8))
    }

    /// Screens the peers of `listener` (with the screen the owner gives [`Net::receive`]) as
    /// soon as their SYN takes a slot: a
    /// refused one is reset at once and its slot listens again in the next round, before
    /// the service ever sees it, so refused peers cannot hold the slots allowed ones need.
    /// Until the screen has let a peer in, its SYN is not answered (smoltcp's paused
    /// SYN-ACK): a refused peer gets only a reset that acknowledges its SYN, which a client
    /// takes as "connection refused" at once instead of retrying.
    pub fn tcp_screen(&mut self, listener: ListenerId) {
        if let Some(l) = self.listeners.get_mut(usize::from(listener.0)) {
            l.screen = true;
            for slot in &l.slots {
                let socket = self.sockets.get_mut::<tcp::Socket>(slot.handle);
                socket.pause_synack(true);
            }
        }
    }

    /// Connections of `listener` its screen refused.
    pub fn tcp_refused(&self, listener: ListenerId) -> u64 {
        self.listeners
            .get(usize::from(listener.0))
            .map_or(0, |l| l.refused)
    }

    /// Follows every slot's socket after a poll: new connections (screened), ended ones,
    /// relistening.
    pub(super) fn tcp_maintain(&mut self, now: u64, screen: &mut Screen<'_>) {
        let local = self.address;
        let Net {
            listeners, sockets, ..
        } = self;
        for (index, listener) in listeners.iter_mut().enumerate() {
            for slot in &mut listener.slots {
                let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
                let state = socket.state();
                let gone = matches!(state, tcp::State::Closed | tcp::State::TimeWait);
                let screened = listener.screen;
                if let (true, Phase::Listening, false) = (screened, slot.phase, slot.screened) {
                    if !gone && state != tcp::State::Listen {
                        let id = ListenerId(index as u8);
                        let allowed = peer_of(socket).is_some_and(|peer| screen(id, peer, local));
                        if !allowed {
                            // The reset goes out with this round's egress.
                            socket.abort();
                            slot.phase = Phase::Refused(now);
                            listener.refused += 1;
                            continue;
                        }
                        // Its SYN-ACK goes out with this round's egress.
                        slot.screened = true;
                        socket.pause_synack(false);
                    }
                }
                let paused = screened;
                match slot.phase {
                    Phase::Refused(at)
                        if peer_of(socket).is_none()
                            || now.saturating_sub(at) > REFUSED_HOLD_NS =>
                    {
                        relisten(socket, slot, listener.port, paused)
                    }
                    Phase::Listening
                        if !gone
                            && !matches!(state, tcp::State::Listen | tcp::State::SynReceived) =>
                    {
                        slot.phase = Phase::New;
                    }
                    Phase::Listening if state == tcp::State::Closed => {
                        // A connection that ended before it was established (reset, timed
                        // out): its next peer is screened again.
                        relisten(socket, slot, listener.port, paused);
                    }
                    Phase::New if gone => {
                        // Ended before anyone saw it: listen again quietly.
                        relisten(socket, slot, listener.port, paused);
                    }
                    Phase::Open if gone => slot.phase = Phase::Ended,
                    _ => {}
                }
            }
        }
    }

    /// After the round's egress: the slots of refused peers whose reset went out (smoltcp
    /// forgets the peer once it is sent) listen again at once, so a flood of refused peers
    /// never leaves an allowed one without a listening slot. One whose reset waits for the
    /// peer's address to resolve keeps it until the reset is out (see [`REFUSED_HOLD_NS`]).
    pub(super) fn tcp_relisten_refused(&mut self) {
        let Net {
            listeners, sockets, ..
        } = self;
        for listener in listeners.iter_mut() {
            for slot in &mut listener.slots {
                let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
                if matches!(slot.phase, Phase::Refused(_)) && peer_of(socket).is_none() {
                    relisten(socket, slot, listener.port, listener.screen);
                }
            }
        }
    }

    /// When a refused connection's slot is due to listen again regardless of its reset.
    pub(super) fn tcp_next_deadline(&self) -> Option<u64> {
        self.listeners
            .iter()
            .flat_map(|l| l.slots.iter())
            .filter_map(|s| match s.phase {
                Phase::Refused(at) => Some(at.saturating_add(REFUSED_HOLD_NS + 1)),
                _ => None,
            })
            .min()
    }

    fn slot(&mut self, conn: ConnId) -> Result<&mut tcp::Socket<'static>, TcpError> {
        let slot = self
            .listeners
            .get(usize::from(conn.listener))
            .and_then(|l| l.slots.get(usize::from(conn.slot)))
            .filter(|s| s.generation == conn.generation && s.phase == Phase::Open)
            .ok_or(TcpError::Stale)?;
        Ok(self.sockets.get_mut::<tcp::Socket>(slot.handle))
    }

    /// The next new connection of `listener` and its peer.
    pub fn tcp_accept(&mut self, listener: ListenerId) -> Option<(ConnId, Peer)> {
        let l = self.listeners.get_mut(usize::from(listener.0))?;
        let (index, slot) = l
            .slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.phase == Phase::New)?;
        slot.phase = Phase::Open;
        l.accepted += 1;
        let peer = peer_of(self.sockets.get::<tcp::Socket>(slot.handle)).unwrap_or(([0; 4], 0));
        Some((
            ConnId {
                listener: listener.0,
                slot: index as u16,
                generation: slot.generation,
            },
            peer,
        ))
    }

    /// The next connection of `listener` that ended (peer closed and we closed, reset, or
    /// timed out); its handle is stale from now on and the slot listens again.
    pub fn tcp_take_closed(&mut self, listener: ListenerId) -> Option<ConnId> {
        let l = self.listeners.get_mut(usize::from(listener.0))?;
        let port = l.port;
        let paused = l.screen;
        let (index, slot) = l
            .slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.phase == Phase::Ended)?;
        let conn = ConnId {
            listener: listener.0,
            slot: index as u16,
            generation: slot.generation,
        };
        relisten(
            self.sockets.get_mut::<tcp::Socket>(slot.handle),
            slot,
            port,
            paused,
        );
        super::wake();
        Some(conn)
    }

    /// Number of slots of `listener` (for [`Net::tcp_connection`]).
    pub fn tcp_slots(&self, listener: ListenerId) -> usize {
        self.listeners
            .get(usize::from(listener.0))
            .map_or(0, |l| l.slots.len())
    }

    /// The open (accepted) connection in slot `index` of `listener`, if any.
    pub fn tcp_connection(&self, listener: ListenerId, index: usize) -> Option<ConnId> {
        let slot = self
            .listeners
            .get(usize::from(listener.0))?
            .slots
            .get(index)
            .filter(|s| s.phase == Phase::Open)?;
        Some(ConnId {
            listener: listener.0,
            slot: index as u16,
            generation: slot.generation,
        })
    }

    /// Reads up to `buf.len()` bytes: `Ok(0)` when nothing is waiting,
    /// `Err(TcpError::Finished)` when the peer has closed and everything was read.
    pub fn tcp_recv(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, TcpError> {
        let socket = self.slot(conn)?;
        let result = match socket.recv_slice(buf) {
            Ok(n) => Ok(n),
            Err(tcp::RecvError::Finished) => Err(TcpError::Finished),
            Err(tcp::RecvError::InvalidState) => Err(TcpError::Finished),
        };
        if matches!(result, Ok(n) if n > 0) {
            // The window opened: let the stack tell the peer.
            super::wake();
        }
        result
    }

    /// Hands the waiting bytes to `take` in place (one contiguous piece of the receive ring
    /// per call, so twice when the data wraps) and consumes as many as it returns; stops when
    /// `take` leaves bytes, fails, or nothing is left. Returns the bytes consumed, or the
    /// first error of `take` (bytes consumed before it stay consumed). `Err(Finished)` as
    /// for [`Net::tcp_recv`]. No copy: the service reads straight from the socket buffer
    /// and takes only what it can use now (back-pressure).
    pub fn tcp_recv_with<E>(
        &mut self,
        conn: ConnId,
        mut take: impl FnMut(&[u8]) -> Result<usize, E>,
    ) -> Result<Result<usize, E>, TcpError> {
        let socket = self.slot(conn)?;
        let mut total = 0usize;
        let mut outcome = Ok(());
        for _ in 0..2 {
            if socket.recv_queue() == 0 {
                break;
            }
            let step = socket.recv(|bytes| {
                let offered = bytes.len();
                match take(bytes) {
                    Ok(n) => {
                        let n = n.min(offered);
                        (n, Ok((n, n == offered)))
                    }
                    Err(e) => (0, Err(e)),
                }
            });
            match step {
                Ok(Ok((n, all))) => {
                    total += n;
                    if !all || n == 0 {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    outcome = Err(e);
                    break;
                }
                Err(tcp::RecvError::Finished) | Err(tcp::RecvError::InvalidState) => {
                    if total == 0 {
                        return Err(TcpError::Finished);
                    }
                    break;
                }
            }
        }
        if total > 0 {
            // The window opened: let the stack tell the peer.
            super::wake();
        }
        if socket.recv_queue() == 0 && total == 0 && outcome.is_ok() && !socket.may_recv() {
            return Err(TcpError::Finished);
        }
        Ok(outcome.map(|()| total))
    }

    /// Copies up to `buf.len()` waiting bytes without consuming them.
    pub fn tcp_peek(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, TcpError> {
        match self.slot(conn)?.peek_slice(buf) {
            Ok(n) => Ok(n),
            Err(_) => Err(TcpError::Finished),
        }
    }

    /// Bytes waiting to be read.
    pub fn tcp_recv_queue(&mut self, conn: ConnId) -> Result<usize, TcpError> {
        Ok(self.slot(conn)?.recv_queue())
    }

    /// Queues up to `data.len()` bytes; returns how many fit (0 when the buffer is full).
    pub fn tcp_send(&mut self, conn: ConnId, data: &[u8]) -> Result<usize, TcpError> {
        let socket = self.slot(conn)?;
        let n = socket.send_slice(data).map_err(|_| TcpError::NotSendable)?;
        if n > 0 {
            super::wake();
        }
        Ok(n)
    }

    /// Free space in the send buffer (0 when the connection cannot send).
    pub fn tcp_send_space(&mut self, conn: ConnId) -> Result<usize, TcpError> {
        let socket = self.slot(conn)?;
        Ok(if socket.may_send() {
            socket.send_capacity() - socket.send_queue()
        } else {
            0
        })
    }

    /// Bytes queued for sending and not yet acknowledged.
    pub fn tcp_send_queue(&mut self, conn: ConnId) -> Result<usize, TcpError> {
        Ok(self.slot(conn)?.send_queue())
    }

    /// The peer of a connection.
    pub fn tcp_peer(&mut self, conn: ConnId) -> Result<Peer, TcpError> {
        peer_of(self.slot(conn)?).ok_or(TcpError::Stale)
    }

    /// Closes our side after the queued data (FIN); the connection is reported by
    /// [`Net::tcp_take_closed`] once it has ended.
    pub fn tcp_close(&mut self, conn: ConnId) {
        if let Ok(socket) = self.slot(conn) {
            socket.close();
            super::wake();
        }
    }

    /// Resets the connection at once (RST).
    pub fn tcp_abort(&mut self, conn: ConnId) {
        if let Ok(socket) = self.slot(conn) {
            socket.abort();
            super::wake();
        }
    }

    /// Every listener's port, slots and connections accepted (for the console).
    pub fn tcp_listeners(&self) -> impl Iterator<Item = (u16, usize, u64)> + '_ {
        self.listeners
            .iter()
            .map(|l| (l.port, l.slots.len(), l.accepted))
    }

    /// Every connection that is not just listening (for the console).
    pub fn tcp_connections_info(&self, mut f: impl FnMut(ConnectionInfo)) {
        for l in &self.listeners {
            for slot in &l.slots {
                let socket = self.sockets.get::<tcp::Socket>(slot.handle);
                if socket.state() == tcp::State::Listen {
                    continue;
                }
                f(ConnectionInfo {
                    port: l.port,
                    peer: peer_of(socket),
                    state: state_name(socket.state()),
                    recv_queue: socket.recv_queue(),
                    send_queue: socket.send_queue(),
                });
            }
        }
    }
}

/// Makes a slot listen again (`paused`: its next SYN waits for the listener's screen).
fn relisten(socket: &mut tcp::Socket, slot: &mut Slot, port: u16, paused: bool) {
    if socket.state() != tcp::State::Closed {
        // TIME-WAIT or a connection the service gave up on: free the slot now.
        socket.abort();
    }
    slot.generation = slot.generation.wrapping_add(1);
    slot.phase = Phase::Listening;
    slot.screened = false;
    socket.pause_synack(paused);
    if socket.listen(port).is_err() {
        log::warn!("tcp: port {port}: a slot could not listen again");
    }
}
