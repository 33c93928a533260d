//! The NBD server on TCP: a listener on `nbd.port=` (default 10809) whose connections are
//! the server's [`nbd::Sockets`]. The main loop runs the server over them between the
//! network's receive and send, so replies leave in the same round:
//!
//! - a SYN from a peer not in the allow-list is reset at once by the TCP layer, before it
//!   can hold a connection slot: the listener is screened (`Net::tcp_screen`) and the main
//!   loop gives `Net::receive` the server's [`nbd::Server::screen`];
//! - then the server's round ([`nbd::Server::poll_connections`], then receive, submission
//!   and send; see the `nbd` crate's `server`).
//!
//! Allocation: the sessions are allocated when a connection is accepted; everything after
//! that (receive, transmit, completions, resubmission) is counted by the main loop, which
//! `mem` reports with the I/O path's allocations and tests expect to stay 0.

use nbd::server::TCP_SLOTS;
use nbd::{NbdError, Peer, SocketError, Sockets};

use crate::net::tcp::{ConnId, ListenError, ListenerId, TcpConfig, TcpError};
use crate::net::Net;

/// Socket buffers per connection: 256 KiB each way keeps a 1 MiB-request pipeline moving
/// over a LAN (the receive buffer is also the window).
const BUFFER: usize = 256 * 1024;

/// One listener's connections as the server's sockets.
pub struct NetSockets<'a> {
    /// The network.
    pub net: &'a mut Net,
    /// The NBD listener.
    pub listener: ListenerId,
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
#[derive(Clone, Copy, Debug)]
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
        net.tcp_screen(listener);
        Ok(NbdService { listener, port })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The listener.
    pub fn listener(&self) -> ListenerId {
        self.listener
    }

    /// The listener's connections on `net` as the server's sockets.
    pub fn sockets<'a>(&self, net: &'a mut Net) -> NetSockets<'a> {
        NetSockets {
            net,
            listener: self.listener,
        }
    }
}
