//! The NBD server on TCP: a listener on `nbd.port=` (default 10809) whose connections are
//! joined to the server's sessions ([`super::server`]). It runs inside the network's poll
//! ([`crate::net`]), between ingress and egress, so replies leave in the same round:
//!
//! - a SYN from a peer not in the allow-list is reset at once by the TCP layer
//!   ([`server::screen`], `Net::tcp_screen`), before it can hold a connection slot; refusals
//!   are logged rate-limited ([`super::guard::Refusals`]);
//! - a new connection → [`Server::accept`](super::server::Server::accept) with the peer and
//!   the NIC's address (allow-list, free session); a refused one is closed with a log line;
//! - a connection that has not finished its handshake within 10 s is reset, and with
//!   `nbd.idle=SECONDS` one idle that long is closed ([`super::guard::expiry`]);
//! - bytes waiting → handed to the session in place ([`Net::tcp_recv_with`]); only what the
//!   session takes is consumed, the rest stays in the socket and TCP flow control slows the
//!   client (back-pressure when request slots or DMA buffers are all in use);
//! - replies → [`Server::transmit`](super::server::Server::transmit) into the socket's send
//!   buffer, as much as it takes now;
//! - the client finished, an error, or the session is done → our FIN, and
//!   [`Server::closed`](super::server::Server::closed) (the session is freed once its device
//!   I/O is back); a connection that ended by itself (reset, timeout) the same;
//! - a client that does not close its side within [`LINGER_NS`] of our FIN is reset, so a
//!   half-open client cannot hold a TCP slot (what Linux's `tcp_fin_timeout` does).
//!
//! Lock order: the network (held by the caller), then `storage`, then the NBD server.
//! Device completions of NBD I/O wake the network ([`crate::net::wake`]) so that replies and
//! resumed input are handled in the same loop iteration.
//!
//! Allocation: the sessions are allocated when a connection is accepted; everything after
//! that (receive, transmit, completions, resubmission) is counted by [`io_allocations`],
//! which `mem` reports with the I/O path's allocations and tests expect to stay 0.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::guard::{self, Clock, Expiry};
use super::server::{self, MAX_CONNECTIONS};
use crate::ipconfig::Dotted;
use crate::net::tcp::{ConnId, ListenError, ListenerId, Peer, TcpConfig, TcpError};
use crate::net::Net;
use crate::{memory, storage};

/// TCP connection slots: every session, plus two so that a client over the limit is
/// answered (closed with a log line) instead of left waiting in SYN.
pub const TCP_SLOTS: usize = MAX_CONNECTIONS + 2;
/// Socket buffers per connection: 256 KiB each way keeps a 1 MiB-request pipeline moving
/// over a LAN (the receive buffer is also the window).
const BUFFER: usize = 256 * 1024;
/// How long a connection we closed may wait for the client's FIN before it is reset.
pub const LINGER_NS: u64 = 5_000_000_000;

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

#[derive(Clone, Copy, Debug)]
struct Link {
    conn: ConnId,
    peer: Peer,
    /// The server's connection id (`None`: refused).
    id: Option<u8>,
    /// When we closed the socket (and told the server); waiting for TCP to report the end.
    closed_at: Option<u64>,
    /// Opened, last active, handshake done: for the handshake deadline and `nbd.idle=`.
    clock: Clock,
}

/// The NBD listener and its connections.
pub struct NbdService {
    listener: ListenerId,
    port: u16,
    links: Vec<Option<Link>>,
    accepted: u64,
    /// `nbd.idle=` in ns.
    idle_ns: Option<u64>,
}

impl NbdService {
    /// Listens on `port` (allocates the sockets and the link table now).
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
        net.tcp_screen(listener, server::screen);
        let idle_ns = server::with(|s| s.config().idle_ns).flatten();
        Ok(NbdService {
            listener,
            port,
            links: (0..TCP_SLOTS).map(|_| None).collect(),
            accepted: 0,
            idle_ns,
        })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted and refused since boot.
    pub fn counters(&self) -> (u64, u64) {
        let refused = server::with(|s| s.refused_total()).unwrap_or(0);
        (self.accepted, refused)
    }

    /// When the next timed step is due (ns since boot), if any: a lingering connection to
    /// reset, a handshake deadline, an idle timeout, a refusal summary.
    pub fn next_deadline(&self) -> Option<u64> {
        let links = self
            .links
            .iter()
            .flatten()
            .filter_map(|l| match l.closed_at {
                Some(t) => Some(t.saturating_add(LINGER_NS + 1)),
                None if l.id.is_some() => guard::due(&l.clock, self.idle_ns),
                None => None,
            });
        let summary = server::with(|s| s.next_refusal_summary()).flatten();
        links.chain(summary).min()
    }

    /// One round at `now` (from the network's poll): ended connections, new ones, data
    /// both ways on every connection, and resets of closed ones that linger.
    pub fn run(&mut self, net: &mut Net, now: u64) {
        while let Some(conn) = net.tcp_take_closed(self.listener) {
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
                server::with(|s| s.closed(id));
            }
        }
        while let Some((conn, peer)) = net.tcp_accept(self.listener) {
            self.accept(net, conn, peer, now);
        }
        server::with(|s| s.log_refusals(now));
        self.expire(net, now);
        for link in self.links.iter_mut().flatten() {
            if link
                .closed_at
                .is_some_and(|t| now.saturating_sub(t) > LINGER_NS)
            {
                // Reported by `tcp_take_closed` in a later round.
                net.tcp_abort(link.conn);
            }
        }
        if self.links.iter().flatten().all(|l| l.closed_at.is_some()) {
            return;
        }
        let before = memory::allocation_count();
        let links = &mut self.links;
        storage::with(|st| {
            server::with(|srv| {
                for link in links.iter_mut().flatten() {
                    if let (Some(id), None) = (link.id, link.closed_at) {
                        let (finished, active) = pump(net, st, srv, link.conn, id, link.peer);
                        if active || srv.busy(id) {
                            link.clock.active = now;
                        }
                        link.clock.serving = srv.serving(id);
                        if finished {
                            link.closed_at = Some(now);
                        }
                    }
                }
            })
        });
        count_allocations(before);
    }

    /// Closes the sessions whose clock ran out: no handshake within 10 s (reset at once,
    /// so a silent client frees its slot), or idle for `nbd.idle=` (closed with a FIN).
    fn expire(&mut self, net: &mut Net, now: u64) {
        let idle_ns = self.idle_ns;
        for link in self.links.iter_mut().flatten() {
            let (Some(id), None) = (link.id, link.closed_at) else {
                continue;
            };
            let busy = server::with(|s| s.busy(id)).unwrap_or(false);
            let Some(why) = guard::expiry(&link.clock, busy, idle_ns, now) else {
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
                    net.tcp_abort(link.conn);
                }
                Expiry::Idle => {
                    log::info!(
                        "nbd: connection {id} from {}:{port}: idle for {} s (nbd.idle); closing",
                        Dotted(addr),
                        idle_ns.unwrap_or(0) / 1_000_000_000
                    );
                    net.tcp_close(link.conn);
                }
            }
            server::with(|s| s.closed(id));
            link.closed_at = Some(now);
        }
    }

    fn accept(&mut self, net: &mut Net, conn: ConnId, peer: Peer, now: u64) {
        let local = net.address();
        let result = server::with(|s| s.accept(peer, local));
        // As many links as TCP slots: there is always one free.
        let free = self.links.iter().position(Option::is_none);
        match (result, free) {
            (Some(Ok(id)), Some(free)) => {
                self.accepted += 1;
                self.links[free] = Some(Link {
                    conn,
                    peer,
                    id: Some(id),
                    closed_at: None,
                    clock: Clock {
                        opened: now,
                        active: now,
                        serving: false,
                    },
                });
                log::info!("nbd: connection {id} from {}:{}", Dotted(peer.0), peer.1);
            }
            (result, _) => {
                let why = match result {
                    Some(Err(e)) => e,
                    // No link free (cannot happen) or no server: give the session back
                    // if there was one.
                    Some(Ok(id)) => {
                        server::with(|s| s.closed(id));
                        server::AcceptError::Full
                    }
                    None => server::AcceptError::Full,
                };
                server::with(|s| s.refused(peer, why, now));
                net.tcp_close(conn);
                match free {
                    Some(free) => {
                        self.links[free] = Some(Link {
                            conn,
                            peer,
                            id: None,
                            closed_at: Some(now),
                            clock: Clock {
                                opened: now,
                                active: now,
                                serving: false,
                            },
                        })
                    }
                    None => net.tcp_abort(conn),
                }
            }
        }
    }
}

/// Moves bytes both ways on connection `id`; closes it when it is done. Returns (closed,
/// bytes were received).
fn pump(
    net: &mut Net,
    st: &mut storage::Storage,
    srv: &mut server::Server,
    conn: ConnId,
    id: u8,
    peer: Peer,
) -> (bool, bool) {
    let mut finished = false;
    let mut received = false;
    match net.tcp_recv_with(conn, |bytes| srv.receive(st, id, bytes)) {
        Ok(Ok(n)) => received = n > 0,
        Ok(Err(e)) => {
            log::warn!("nbd: connection {id} from {}: {e}; closing", Dotted(peer.0));
            finished = true;
        }
        Err(TcpError::Finished) => finished = true,
        Err(_) => finished = true,
    }
    if !finished {
        let sent = srv.transmit(st, id, &mut |bytes| net.tcp_send(conn, bytes).unwrap_or(0));
        if let Err(e) = sent {
            log::warn!("nbd: connection {id} from {}: {e}; closing", Dotted(peer.0));
            finished = true;
        }
    }
    if finished || srv.should_close(id) {
        log::info!("nbd: connection {id} closed");
        net.tcp_close(conn);
        srv.closed(id);
        return (true, received);
    }
    (false, received)
}
