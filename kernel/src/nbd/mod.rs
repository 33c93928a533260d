//! The NBD server: every volume (devices such as `vda` or `nvme0n1`, and snapshots by name)
//! exported over TCP with the Network Block Device protocol (NetworkBlockDevice/nbd
//! `doc/proto.md`: fixed newstyle handshake, simple replies).
//!
//! - [`proto`]: wire constants and error values.
//! - [`export`]: the [`ExportCatalog`] the kernel implements over its volumes.
//! - [`connection`]: one connection as a sans-I/O state machine: bytes in, requests and
//!   replies out, completions in; fixed buffers, no allocation per request.
//! - [`error`]: why a connection was closed, one line each.
//! - [`allow`]: the `nbd.allow=` client address allow-list.
//! - [`guard`]: the handshake deadline, `nbd.idle=`, and rate-limited refusal log lines.
//! - [`route`]: export handles as stable identities (a device, one snapshot instance) and
//!   where each request on one goes now (looked up per request, not at the handshake).
//! - [`session`]: a connection joined to the block layer through a [`session::Backend`]
//!   (buffer pool + submission): requests cut into pool-buffer chunks, device tags
//!   ([`session::NBD_TAG`]), completions, read data sent from the buffers.
//! - `server` (appliance only): sessions over `Storage`, the table of connections, the
//!   narrow interface the TCP side calls.
//! - `tcp` (appliance only): the listener on `nbd.port=` that joins TCP connections to the
//!   server's sessions inside the network's poll.
//!
//! Everything but `server` is pure and tested on the host (`cargo test -p kernel nbd`).

#![deny(unsafe_code)]

pub mod allow;
pub mod connection;
pub mod error;
pub mod export;
#[cfg(any(test, feature = "fuzz"))]
pub mod fake;
pub mod guard;
pub mod proto;
pub mod route;
#[cfg(target_os = "none")]
pub mod selftest;
pub mod selftest_spec;
#[cfg(target_os = "none")]
pub mod server;
pub mod session;
#[cfg(target_os = "none")]
pub mod tcp;

#[cfg(test)]
mod tests;

pub use allow::{AllowList, Cidr};
pub use connection::{Connection, ConnectionConfig, Event, Received, Transmit, MAX_IN_FLIGHT};
pub use error::NbdError;
pub use export::{BlockSizes, ExportCatalog, ExportInfo, ExportName};
pub use proto::Errno;
pub use session::SessionStats;

/// The IANA port of NBD, used when `nbd.port=` is not given.
pub const DEFAULT_PORT: u16 = 10809;
