//! The kernel's side of the NBD server (the server itself is the `nbd` crate,
//! `kernel/nbd/`): what it is generic over, supplied by the appliance.
//!
//! - `backend` (appliance only): `volume::Volumes` as the server's volumes (export catalog, roles,
//!   buffer pools, submission); the device-tag bits that carry the server's request ids
//!   and the NBD port of the volumes' completion path.
//! - `tcp` (appliance only): the listener on `nbd.port=` and its connections as the server's
//!   sockets.
//! - `selftest` (appliance only): `nbd-selftest`, a scripted client on a loopback session.
//! - [`selftest_spec`]: what the self-test writes, shared with the host tests.
//!
//! The server is a value the main loop owns (`main_loop.rs`): it runs the server's round
//! between the network's receive and send, and lends it to the console's `nbd` command and
//! to `nbd-selftest`.

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

/// The NBD service the main loop owns: the server and, once discovery has found every
/// export and there is a network, its TCP listener.
#[cfg(target_os = "none")]
pub struct Nbd {
    /// The server (sessions, connections, refusals).
    pub server: Server,
    /// The listener on `nbd.port=`, when serving.
    pub listener: Option<tcp::NbdService>,
}
