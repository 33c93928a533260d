//! The NBD server on TCP: a listener on `nbd.port=` (default 10809) whose connections are
//! the server's [`nbd::Sockets`]. It runs inside the network's poll ([`crate::net`]),
//! between ingress and egress, so replies leave in the same round:
//!
//! - a SYN from a peer not in the allow-list is reset at once by the TCP layer
//!   ([`screen`], `Net::tcp_screen`), before it can hold a connection slot;
//! - then the server's round ([`nbd::Server::poll_connections`], [`nbd::Server::poll_io`]):
//!   accept or refuse, deadlines, linger, bytes both ways (see the `nbd` crate's `server`).
//!
//! Lock order: the network (held by the caller), then `storage`, then the NBD server.
//! Device completions of NBD I/O wake the network ([`crate::net::wake`]) so that replies and
//! resumed input are handled in the same loop iteration.
//!
//! Allocation: the sessions are allocated when a connection is accepted; everything after
//! that (receive, transmit, completions, resubmission) is counted by [`io_allocations`],
//! which `mem` reports with the I/O path's allocations and tests expect to stay 0.

use core::sync::atomic::{AtomicU64, Ordering};

use nbd::server::TCP_SLOTS;
use nbd::{NbdError, Peer, SocketError, Sockets};

use super::backend::StorageBackend;
use crate::net::tcp::{ConnId, ListenError, ListenerId, TcpConfig, TcpError};
use crate::net::Net;
use crate::{memory, storage};

/// Socket buffers per connection: 256 KiB each way keeps a 1 MiB-request pipeline moving
/// over a LAN (the receive buffer is also the window).
const BUFFER: usize = 256 * 1024;

static IO_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Heap allocations made by NBD request handling once connections were accepted (should
/// stay 0).
pub fn io_allocations() -> u64 {
    IO_ALLOCATIONS.load(Ordering::Relaxed)
}

/// Adds the allocations made since `count_before` (a [`memory::allocation_count`]) to
/// [`io_allocations`]: for the main loop's NBD steps.
pub fn count_allocations(count_before: u64) {
    let made = memory::allocation_count().saturating_sub(count_before);
    if made > 0 {
        IO_ALLOCATIONS.fetch_add(made, Ordering::Relaxed);
    }
}

/// The listener's screen (`net::tcp::Screen`): whether `peer` may connect, checked as soon
/// as its SYN arrives, before it takes a connection slot; a refusal is logged (rate-limited).
pub fn screen(peer: Peer, local: Option<([u8; 4], u8)>) -> bool {
    let now = crate::time::uptime_ns();
    super::with(|s| s.screen(peer, local, now)).unwrap_or(false)
}

/// One listener's connections as the server's sockets.
struct NetSockets<'a> {
    net: &'a mut Net,
    listener: ListenerId,
}

impl Sockets for NetSockets<'_> {
    type Conn = ConnId;

    fn accept(&mut self) -> Option<(ConnId, Peer)> {
        self.net.tcp_accept(self.listener)
    }

    fn take_closed(&mut self) -> Option<ConnId> {
        self.net.tcp_take_closed(self.listener)
    }

    fn recv(
        &mut self,
        conn: ConnId,
        take: &mut dyn FnMut(&[u8]) -> Result<usize, NbdError>,
    ) -> Result<Result<usize, NbdError>, SocketError> {
        self.net.tcp_recv_with(conn, take).map_err(|e| match e {
            TcpError::Finished => SocketError::Finished,
            _ => SocketError::Gone,
        })
    }

    fn send(&mut self, conn: ConnId, data: &[u8]) -> usize {
        self.net.tcp_send(conn, data).unwrap_or(0)
    }

    fn close(&mut self, conn: ConnId) {
        self.net.tcp_close(conn);
    }

    fn abort(&mut self, conn: ConnId) {
        self.net.tcp_abort(conn);
    }

    fn local_address(&self) -> Option<([u8; 4], u8)> {
        self.net.address()
    }
}

/// The NBD listener.
pub struct NbdService {
    listener: ListenerId,
    port: u16,
}

impl NbdService {
    /// Listens on `port` (allocates the sockets now).
    pub fn listen(net: &mut Net, port: u16) -> Result<NbdService, ListenError> {
        let listener = net.tcp_listen(
            port,
            TcpConfig {
                slots: TCP_SLOTS,
                rx_buffer: BUFFER,
                tx_buffer: BUFFER,
            },
        )?;
        // Peers outside the allow-list are reset at their SYN, before they hold a slot.
        net.tcp_screen(listener, screen);
        Ok(NbdService { listener, port })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// When the server's next timed step is due (ns since boot), if any.
    pub fn next_deadline(&self) -> Option<u64> {
        super::with(|s| s.next_deadline()).flatten()
    }

    /// One round at `now` (from the network's poll): the server's connection half, then
    /// bytes both ways on every connection.
    pub fn run(&mut self, net: &mut Net, now: u64) {
        let mut sockets = NetSockets {
            net,
            listener: self.listener,
        };
        storage::with(|st| {
            super::with(|srv| {
                srv.poll_connections(&mut sockets, now);
                let before = memory::allocation_count();
                srv.poll_io(&mut sockets, &mut StorageBackend(st), now);
                count_allocations(before);
            })
        });
    }
}
