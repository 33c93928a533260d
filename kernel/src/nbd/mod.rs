//! The kernel's side of the NBD server (the server itself is the `nbd` crate,
//! `kernel/nbd/`): what it is generic over, supplied by the appliance.
//!
//! - `backend` (appliance only): `volume::Volumes` as the server's volumes (export catalog, roles,
//!   buffer pools, submission); the device-tag bits that carry the server's request ids
//!   and the completion sink of `storage::poll`.
//! - `tcp` (appliance only): the listener on `nbd.port=` as the server's sockets, run
//!   inside the network's poll.
//! - `selftest` (appliance only): `nbd-selftest`, a scripted client on a loopback session.
//! - [`selftest_spec`]: what the self-test writes, shared with the host tests.
//!
//! The server is one value behind a lock (`with`), set up when the main loop starts.

#![deny(unsafe_code)]

#[cfg(target_os = "none")]
pub mod backend;
#[cfg(target_os = "none")]
pub mod selftest;
pub mod selftest_spec;
#[cfg(target_os = "none")]
pub mod tcp;

pub use nbd::ServerConfig;

/// Settings from the kernel command line: `nbd.port=` (default 10809), `nbd.allow=` and
/// `nbd.idle=`.
pub fn config_from_cmdline(cmdline: Option<&crate::cmdline::CmdLine>) -> ServerConfig {
    ServerConfig {
        port: cmdline
            .and_then(|c| c.nbd_port)
            .unwrap_or(nbd::DEFAULT_PORT),
        allow: cmdline.and_then(|c| c.nbd_allow),
        idle_ns: cmdline
            .and_then(|c| c.nbd_idle)
            .map(|s| u64::from(s) * 1_000_000_000),
    }
}

/// The server as the kernel instantiates it: DMA buffers, smoltcp connections.
#[cfg(target_os = "none")]
pub type Server = nbd::Server<backend::NbdBuf, crate::net::tcp::ConnId>;

#[cfg(target_os = "none")]
static SERVER: spin::Mutex<Option<Server>> = spin::Mutex::new(None);

/// Sets up the server (main loop start; allocates its tables).
#[cfg(target_os = "none")]
pub fn init(config: ServerConfig) {
    *SERVER.lock() = Some(Server::new(config));
}

/// Runs `f` on the server, if set up (main loop and console). Lock order: the network,
/// then `storage`, then the server; never the other way round.
#[cfg(target_os = "none")]
pub fn with<R>(f: impl FnOnce(&mut Server) -> R) -> Option<R> {
    SERVER.lock().as_mut().map(f)
}
