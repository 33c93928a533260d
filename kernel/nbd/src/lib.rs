//! snapfw's NBD server: every volume (devices such as `vda` or `nvme0n1`, and snapshots by
//! name) exported over TCP with the Network Block Device protocol (NetworkBlockDevice/nbd
//! `doc/proto.md`: fixed newstyle handshake, simple and structured replies).
//!
//! `no_std`, no `unsafe`, no hardware: the server is generic over the two things the kernel
//! supplies, so all of it runs in host tests over fakes.
//! - [`Backend`] (the volumes): the export catalog of the handshake ([`ExportCatalog`]),
//!   the roles every request is routed by ([`route::Roles`]), a buffer pool per export, and
//!   submission of read/write/flush/trim chunk I/O with the server's own [`RequestId`], and
//!   (in the catalog) the `snapfw:changed:` contexts of block status;
//!   completions come back by that id ([`Server::complete`]).
//! - [`Sockets`] (one listening TCP socket's connections): accept, ended connections,
//!   receive in place, send, close, reset, the NIC's address.
//!
//! Modules:
//! - [`proto`]: wire constants and error values.
//! - [`export`]: the [`ExportCatalog`] and what one export is.
//! - [`connection`]: one connection as a sans-I/O state machine: bytes in, requests and
//!   replies out, completions in; fixed buffers, no allocation per request.
//! - [`error`]: why a connection was closed, one line each.
//! - [`allow`]: the `nbd.allow=` client address allow-list.
//! - [`guard`]: the handshake deadline, `nbd.idle=`, and rate-limited refusal log lines.
//! - [`route`]: export handles as stable identities (a device, one snapshot instance) and
//!   where each request on one goes now (looked up per request, not at the handshake).
//! - [`session`]: a connection joined to the volumes through a [`Backend`]: requests cut
//!   into pool-buffer chunks, routed per submission, completions, read data sent from the
//!   buffers.
//! - [`server`]: the table of sessions and connections over [`Sockets`]: allow-list and
//!   refusals, deadlines, linger, the round the main loop runs.
//! - `fake` (tests and the `fuzz` feature): a RAM-disk backend with snapshots and roles.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod allow;
pub mod connection;
pub mod error;
pub mod export;
#[cfg(any(test, feature = "fuzz"))]
pub mod fake;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod guard;
pub mod proto;
pub mod route;
pub mod server;
pub mod session;

#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod tests;

pub use allow::{AllowList, Cidr};
pub use connection::{Connection, ConnectionConfig, Event, Received, Transmit, MAX_IN_FLIGHT};
pub use error::NbdError;
pub use export::{BlockSizes, ExportCatalog, ExportInfo, ExportName};
pub use proto::Errno;
pub use route::{DeviceRole, ExportId, Roles, Route, SnapRole};
pub use server::{
    AcceptError, ClientInfo, Peer, Server, ServerConfig, SocketError, Sockets, MAX_CONNECTIONS,
};
pub use session::{Backend, BackendOp, IoBuffer, RequestId, SessionStats, SubmitError};

/// The IANA port of NBD, used when `nbd.port=` is not given.
pub const DEFAULT_PORT: u16 = 10809;
