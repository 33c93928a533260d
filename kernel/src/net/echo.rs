//! A TCP echo service (RFC 862) on the listener API, for tests and link checks: every byte a
//! client sends comes back. It reads only as much as it can send at once, so nothing is held
//! back or dropped when the client reads slowly (TCP flow control pushes back instead).

use alloc::boxed::Box;

use super::tcp::ListenerId;
use super::Net;

const CHUNK: usize = 16 * 1024;

/// The echo service's state.
pub struct Echo {
    listener: ListenerId,
    port: u16,
    buffer: Box<[u8]>,
    bytes: u64,
    connections: u64,
}

impl Echo {
    /// An echo service on an existing listener.
    pub fn new(listener: ListenerId, port: u16) -> Self {
        Self {
            listener,
            port,
            buffer: alloc::vec![0u8; CHUNK].into_boxed_slice(),
            bytes: 0,
            connections: 0,
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Bytes echoed and connections accepted.
    pub fn counters(&self) -> (u64, u64) {
        (self.bytes, self.connections)
    }

    /// Serves every connection once (called by the network's poll).
    pub fn run(&mut self, net: &mut Net) {
        while let Some((_conn, peer)) = net.tcp_accept(self.listener) {
            self.connections += 1;
            log::debug!(
                "echo: connection from {}:{}",
                crate::ipconfig::Dotted(peer.0),
                peer.1
            );
        }
        while net.tcp_take_closed(self.listener).is_some() {}
        for index in 0..net.tcp_slots(self.listener) {
            let Some(conn) = net.tcp_connection(self.listener, index) else {
                continue;
            };
            while let Ok(space) = net.tcp_send_space(conn) {
                let space = space.min(self.buffer.len());
                if space == 0 {
                    break;
                }
                match net.tcp_recv(conn, &mut self.buffer[..space]) {
                    Ok(0) => break,
                    Ok(n) => {
                        // `space` bytes fit, so all `n` are queued.
                        let _ = net.tcp_send(conn, &self.buffer[..n]);
                        self.bytes += n as u64;
                    }
                    Err(_) => {
                        net.tcp_close(conn);
                        break;
                    }
                }
            }
            // Peer finished while our buffer was full: close once everything is read.
            if net.tcp_recv(conn, &mut []).is_err() {
                net.tcp_close(conn);
            }
        }
    }
}
