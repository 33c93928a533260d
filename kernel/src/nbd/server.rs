//! The NBD server in the kernel: sessions ([`super::session::Session`]) joined to `Storage`.
//! Every volume is an export: devices by name (`vda`, `nvme0n1`; not a device holding a COW
//! store an engine serves, which only the engine may write; a device holding a store found
//! at boot and not served is exported read-only) and active snapshots by name.
//!
//! An export handle names a stable identity ([`super::route::ExportId`]: a device, or one
//! snapshot instance); every request is routed by that identity's role at the moment it is
//! submitted ([`super::route::route`]): a device that became an origin goes through its
//! engine from the next request on, a device that became a COW store refuses writes with
//! `EPERM`, a snapshot that was deleted or is being merged answers `EIO`.
//!
//! The TCP side ([`super::tcp`]) calls a narrow interface from the network's poll:
//! - a connection arrives from `peer`: [`Server::accept`] (allow-list, free slot) → id;
//! - bytes arrived: [`Server::receive`] with the socket's receive window → bytes taken;
//! - room to send: [`Server::transmit`] with a `send(&[u8]) -> usize` into the socket;
//! - [`Server::should_close`] → close the socket; the socket closed: [`Server::closed`].
//!
//! Device completions whose tag carries [`NBD_TAG`] reach [`Server::complete`] through the
//! second sink of `storage::poll`; NBD I/O is submitted with `Storage::submit_nbd`, which
//! does not count in `Storage::task_ios`, so console tasks and NBD clients run side by side.
//! [`Server::step`] (every loop iteration) resubmits what waited for a queue slot or buffers
//! and frees sessions whose connection is gone once their device I/O is back.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU16, Ordering};

use drivers::block::{BlockError, BlockRequest, BufferPool, Completion, DmaBuf};

use super::allow::{self, AllowList};
use super::connection::ConnectionConfig;
use super::error::NbdError;
use super::export::{ExportCatalog, ExportInfo, ExportName};
use super::guard::Refusals;
use super::proto::Errno;
use super::route::{self, DeviceRole, ExportId, Route};
use super::session::{
    self, Backend, BackendOp, IoBuffer, Session, SessionStats, SubmitError, MAX_CHUNKS,
};
use crate::storage::{volume::SnapState, Storage, Target};

pub use super::session::NBD_TAG;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// The largest READ/WRITE payload offered (each export also stays within [`MAX_CHUNKS`] of
/// its pool's buffers and within the pool itself).
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// Server settings from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// TCP port to listen on.
    pub port: u16,
    /// Networks allowed to connect (`None`: the NIC's own subnet; see [`super::allow::allowed`]).
    pub allow: Option<AllowList>,
    /// `nbd.idle=` in ns: sessions idle this long are closed (`None`: never).
    pub idle_ns: Option<u64>,
}

impl ServerConfig {
    /// `nbd.port=` (default 10809), `nbd.allow=` and `nbd.idle=`.
    pub fn from_cmdline(cmdline: Option<&crate::cmdline::CmdLine>) -> ServerConfig {
        ServerConfig {
            port: cmdline
                .and_then(|c| c.nbd_port)
                .unwrap_or(super::DEFAULT_PORT),
            allow: cmdline.and_then(|c| c.nbd_allow),
            idle_ns: cmdline
                .and_then(|c| c.nbd_idle)
                .map(|s| u64::from(s) * 1_000_000_000),
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// The peer is not in `nbd.allow=`.
    NotAllowed,
    /// [`MAX_CONNECTIONS`] are open.
    Full,
}

impl core::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            AcceptError::NotAllowed => "address not in nbd.allow",
            AcceptError::Full => "too many connections",
        })
    }
}

impl IoBuffer for DmaBuf {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
    fn set_len(&mut self, len: usize) -> bool {
        DmaBuf::set_len(self, len).is_ok()
    }
}

/// The name of the volume an export handle names now, for the console: a device's name, a
/// snapshot's name, or `None` once the snapshot is gone.
pub fn export_name(st: &Storage, handle: u64) -> Option<crate::storage::VolumeName> {
    match ExportId::from_handle(handle)? {
        ExportId::Device { disk } => {
            let disk = usize::from(disk);
            (disk < st.devices.len())
                .then(|| crate::storage::VolumeName::from_str_truncated(st.name(disk).as_str()))
        }
        ExportId::Snapshot { instance, .. } => st
            .origins
            .iter()
            .flat_map(|o| o.snaps.iter())
            .find(|s| s.instance == instance)
            .map(|s| crate::storage::VolumeName::from_str_truncated(&s.name)),
    }
}

fn errno(e: BlockError) -> Errno {
    match e {
        BlockError::ReadOnly => Errno::Perm,
        BlockError::OutOfRange { .. } | BlockError::Misaligned { .. } => Errno::Inval,
        BlockError::Unsupported | BlockError::DeviceUnsupported => Errno::NotSup,
        _ => Errno::Io,
    }
}

/// Connections told on the console that their volume changed role (bit per connection id,
/// cleared when the id is given to a new connection): one line per session, not one per
/// refused request.
static ROLE_LOGGED: AtomicU16 = AtomicU16::new(0);
const _: () = assert!(MAX_CONNECTIONS <= 16, "one ROLE_LOGGED bit per connection");

/// Logs, once per session, that requests on `export` fail because its volume changed role
/// since the handshake (a disk that became a COW store, a snapshot deleted or merged).
fn role_changed(st: &Storage, export: u64, tag: u64, why: Errno) {
    let Some((conn, _, _)) = session::untag(tag) else {
        return;
    };
    let bit = 1u16 << (conn % 16);
    if ROLE_LOGGED.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
        return;
    }
    match (ExportId::from_handle(export), why) {
        (Some(ExportId::Device { disk }), Errno::Perm) => log::warn!(
            "nbd: connection {conn}: {} now holds a COW store; its writes are refused",
            st.name(usize::from(disk))
        ),
        (Some(ExportId::Snapshot { .. }), _) => log::warn!(
            "nbd: connection {conn}: its snapshot was deleted or is being merged; its requests fail"
        ),
        (_, e) => log::warn!("nbd: connection {conn}: its volume is gone ({e:?})"),
    }
}

/// `Storage` as the sessions' backend and export catalog.
pub struct StorageBackend<'a>(pub &'a mut Storage);

impl StorageBackend<'_> {
    /// Where a request on `export` goes now (see [`super::route`]): looked up for every
    /// request, so a session follows its volume's role as it changes.
    fn target(&self, export: u64, writes: bool) -> Result<Target, Errno> {
        let id = ExportId::from_handle(export).ok_or(Errno::Io)?;
        Ok(match route::route(id, writes, &*self.0)? {
            Route::Device(d) => Target::Device(d),
            Route::Origin(origin) => Target::Volume {
                origin,
                volume: snapshot::Volume::Origin,
            },
            Route::Snapshot { origin, slot } => Target::Volume {
                origin,
                volume: snapshot::Volume::Snapshot(snapshot::SnapId(slot)),
            },
        })
    }

    /// The device whose buffers and block size an export uses (fixed for its life).
    fn disk(&self, export: u64) -> usize {
        ExportId::from_handle(export).map_or(usize::MAX, ExportId::disk)
    }

    fn block_size(&self, export: u64) -> u64 {
        u64::from(
            self.0
                .devices
                .get(self.disk(export))
                .map_or(512, |d| d.geometry().block_size.max(512)),
        )
    }

    /// Names of the exports in a fixed order: devices, then snapshots.
    fn export_names(&self) -> impl Iterator<Item = ExportName> + '_ {
        let st = &*self.0;
        let devices = (0..st.devices.len())
            .filter(move |&d| st.cow_user(d).is_none())
            .map(move |d| ExportName::from_str_truncated(st.name(d).as_str()));
        let snaps = st
            .origins
            .iter()
            .flat_map(|o| o.snaps.iter())
            .filter(|s| matches!(s.state, SnapState::Active | SnapState::Invalid))
            .map(|s| ExportName::from_str_truncated(&s.name));
        devices.chain(snaps)
    }
}

impl ExportCatalog for StorageBackend<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return None;
        }
        let st = &*self.0;
        // The handle names what stays the same (the device, or this one snapshot); where
        // its requests go is decided per request (`StorageBackend::target`).
        let (id, target) = match st.find(name) {
            // A COW store an engine serves is the engine's alone: not an export.
            Some(d) if st.cow_user(d).is_some() => return None,
            Some(d) => (
                ExportId::Device { disk: d as u16 },
                st.resolve(name).unwrap_or(Target::Device(d)),
            ),
            None => st.origins.iter().enumerate().find_map(|(origin, o)| {
                let s = o
                    .snap(name)
                    .filter(|s| matches!(s.state, SnapState::Active | SnapState::Invalid))?;
                Some((
                    ExportId::Snapshot {
                        disk: o.disk as u16,
                        instance: s.instance,
                    },
                    Target::Volume {
                        origin,
                        volume: snapshot::Volume::Snapshot(s.id),
                    },
                ))
            })?,
        };
        let g = st.geometry(target);
        let pool = st.pools.get(id.disk())?;
        let block = g.block_size.max(512);
        let chunk = pool.buffer_size() as u64 / u64::from(block) * u64::from(block);
        let chunks = (MAX_CHUNKS as u64).min(pool.total() as u64);
        let max_payload = (chunk * chunks).min(u64::from(MAX_PAYLOAD)) as u32;
        // A device holding a store found at boot and not served (made by Linux, origin
        // missing) is exported read-only: nothing may write over a store.
        let read_only = g.read_only || st.holds_store(id.disk());
        Some(ExportInfo {
            handle: id.handle(),
            size: g.capacity_blocks * u64::from(block),
            block_size: block,
            read_only,
            flush: true,
            fua: g.fua,
            trim: g.discard && !read_only && matches!(target, Target::Device(_)),
            max_payload,
        })
    }

    fn name(&self, index: usize) -> Option<ExportName> {
        self.export_names().nth(index)
    }

    fn description(&self, export: &ExportInfo) -> Option<ExportName> {
        let st = &*self.0;
        let text = match ExportId::from_handle(export.handle)? {
            ExportId::Snapshot { .. } => "snapshot",
            ExportId::Device { disk } => match route::Roles::device_role(st, usize::from(disk)) {
                DeviceRole::Origin(_) => "origin of snapshots",
                DeviceRole::Store => "holds a COW store (read-only)",
                _ => st.devices.get(usize::from(disk)).map(|d| d.info().driver)?,
            },
        };
        Some(ExportName::from_str_truncated(text))
    }
}

impl Backend for StorageBackend<'_> {
    type Buf = DmaBuf;

    fn chunk_bytes(&self, export: u64) -> usize {
        let block = self.block_size(export) as usize;
        self.0
            .pools
            .get(self.disk(export))
            .map_or(block, |p| p.buffer_size() / block * block)
    }

    fn max_discard_bytes(&mut self, export: u64) -> u64 {
        // Only a device of its own discards; through an engine (or on a store) a trim is a
        // hint the session answers without discarding.
        let Ok(target @ Target::Device(_)) = self.target(export, true) else {
            return 0;
        };
        let g = self.0.geometry(target);
        if g.discard {
            u64::from(g.max_discard_blocks) * self.block_size(export)
        } else {
            0
        }
    }

    fn available(&mut self, export: u64) -> usize {
        let disk = self.disk(export);
        self.0.pools.get(disk).map_or(0, |p| p.available())
    }

    fn acquire(&mut self, export: u64) -> Option<DmaBuf> {
        let disk = self.disk(export);
        self.0.pools.get_mut(disk)?.acquire()
    }

    fn release(&mut self, export: u64, buffer: DmaBuf) {
        let disk = self.disk(export);
        if let Some(pool) = self.0.pools.get_mut(disk) {
            // Every buffer came from this pool.
            let _ = pool.release(buffer);
        }
    }

    fn submit(
        &mut self,
        export: u64,
        tag: u64,
        op: BackendOp,
        buffer: Option<DmaBuf>,
    ) -> Result<(), (SubmitError, Option<DmaBuf>)> {
        let writes = matches!(op, BackendOp::Write { .. } | BackendOp::Discard { .. });
        let target = match self.target(export, writes) {
            Ok(t) => t,
            Err(e) => {
                role_changed(self.0, export, tag, e);
                return Err((SubmitError::Failed(e), buffer));
            }
        };
        let block = self.block_size(export);
        let request = match (op, buffer) {
            (BackendOp::Read { offset }, Some(b)) => BlockRequest::read(tag, offset / block, b),
            (BackendOp::Write { offset, fua }, Some(b)) => {
                BlockRequest::write(tag, offset / block, b, fua)
            }
            (BackendOp::Flush, b) => {
                if let Some(b) = b {
                    self.release(export, b);
                }
                BlockRequest::flush(tag)
            }
            (BackendOp::Discard { offset, len }, b) => {
                if let Some(b) = b {
                    self.release(export, b);
                }
                let blocks = u32::try_from(len / block).unwrap_or(u32::MAX);
                BlockRequest::discard(tag, offset / block, blocks)
            }
            (_, None) => return Err((SubmitError::Failed(Errno::Io), None)),
        };
        self.0.submit_nbd(target, request).map_err(|(e, b)| {
            let why = match e {
                BlockError::QueueFull => SubmitError::Busy,
                e => SubmitError::Failed(errno(e)),
            };
            (why, b)
        })
    }
}

static SERVER: spin::Mutex<Option<Server>> = spin::Mutex::new(None);

/// Sets up the server (main loop start; allocates the connection table).
pub fn init(config: ServerConfig) {
    *SERVER.lock() = Some(Server::new(config));
}

/// Runs `f` on the server, if set up (main loop only). Lock order: inside `storage::with`
/// when both are needed, never the other way round.
pub fn with<R>(f: impl FnOnce(&mut Server) -> R) -> Option<R> {
    SERVER.lock().as_mut().map(f)
}

/// The NBD sink of `storage::poll`: a completion of NBD I/O goes to its session (its buffer
/// back to `pool` if there is no server).
pub fn complete(pool: &mut BufferPool, completion: Completion) {
    // A reply may be ready, or buffers free for input held back: the network polls.
    crate::net::wake();
    let mut lock = SERVER.lock();
    match lock.as_mut() {
        Some(server) => server.complete(pool, completion),
        None => {
            if let Some(b) = completion.buffer {
                let _ = pool.release(b);
            }
        }
    }
}

/// One connection as the console shows it.
#[derive(Clone, Copy, Debug)]
pub struct ClientInfo {
    /// The server's connection id.
    pub id: u8,
    /// The client's address and port.
    pub peer: ([u8; 4], u16),
    /// The export's handle ([`ExportId`]), once the handshake chose one.
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

/// The listener's screen (`net::tcp::Screen`): whether `peer` may connect, checked as soon
/// as its SYN arrives, before it takes a connection slot; a refusal is logged (rate-limited).
pub fn screen(peer: ([u8; 4], u16), local: Option<([u8; 4], u8)>) -> bool {
    let now = crate::time::uptime_ns();
    with(|s| s.screen(peer, local, now)).unwrap_or(false)
}

/// The NBD server: up to [`MAX_CONNECTIONS`] sessions.
pub struct Server {
    config: ServerConfig,
    sessions: Vec<Option<Entry>>,
    /// Refused connections, for rate-limited log lines.
    refusals: Refusals,
}

struct Entry {
    session: Box<Session<DmaBuf>>,
    /// The client's address and port.
    peer: ([u8; 4], u16),
    /// The network side has closed the socket ([`Server::closed`]): the id may be reused
    /// once the device I/O is back.
    socket_closed: bool,
}

impl Server {
    /// A server with no connections (allocates its table now).
    pub fn new(config: ServerConfig) -> Server {
        Server {
            config,
            sessions: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            refusals: Refusals::new(),
        }
    }

    /// Whether `peer` may connect (see [`screen`]); a refusal is recorded and logged.
    pub fn screen(&mut self, peer: ([u8; 4], u16), local: Option<([u8; 4], u8)>, now: u64) -> bool {
        let allowed = allow::allowed(self.config.allow.as_ref(), local, peer.0);
        if !allowed {
            self.refused(peer, AcceptError::NotAllowed, now);
        }
        allowed
    }

    /// Records a refused connection: logged in full if it is its address's first in a
    /// window, else counted for a summary ([`Server::log_refusals`]).
    pub fn refused(&mut self, peer: ([u8; 4], u16), why: AcceptError, now: u64) {
        if self.refusals.record(peer.0, now) {
            log::warn!(
                "nbd: refused {}:{}: {why}",
                crate::ipconfig::Dotted(peer.0),
                peer.1
            );
        }
    }

    /// Logs the refusal summaries due at `now`.
    pub fn log_refusals(&mut self, now: u64) {
        self.refusals.due(now, |summary| log::warn!("{summary}"));
    }

    /// When [`Server::log_refusals`] has a summary to log next.
    pub fn next_refusal_summary(&self) -> Option<u64> {
        self.refusals.next_due()
    }

    /// Connections refused since boot.
    pub fn refused_total(&self) -> u64 {
        self.refusals.total()
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

    fn entry(&self, id: u8) -> Option<&Entry> {
        self.sessions.get(usize::from(id)).and_then(Option::as_ref)
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Open connections (including ones waiting for their device I/O).
    pub fn connections(&self) -> usize {
        self.sessions.iter().flatten().count()
    }

    /// A new TCP connection from `peer` (address, port) to an appliance whose NIC has the
    /// address and prefix `local`: its id, or why it is refused (close the socket). Without
    /// `nbd.allow=` only peers on `local`'s subnet are let in. Allocates the session (about
    /// 8 KiB plus its slot table).
    pub fn accept(
        &mut self,
        peer: ([u8; 4], u16),
        local: Option<([u8; 4], u8)>,
    ) -> Result<u8, AcceptError> {
        if !allow::allowed(self.config.allow.as_ref(), local, peer.0) {
            return Err(AcceptError::NotAllowed);
        }
        self.open(peer)
    }

    /// A connection from inside the appliance (`nbd-selftest`): the allow-list does not
    /// apply.
    pub fn accept_loopback(&mut self) -> Result<u8, AcceptError> {
        self.open(([127, 0, 0, 1], 0))
    }

    fn open(&mut self, peer: ([u8; 4], u16)) -> Result<u8, AcceptError> {
        let id = self
            .sessions
            .iter()
            .position(Option::is_none)
            .ok_or(AcceptError::Full)?;
        let config = ConnectionConfig {
            max_payload: MAX_PAYLOAD,
        };
        ROLE_LOGGED.fetch_and(!(1u16 << (id % 16)), Ordering::Relaxed);
        self.sessions[id] = Some(Entry {
            session: Box::new(Session::new(id as u8, config)),
            peer,
            socket_closed: false,
        });
        Ok(id as u8)
    }

    /// Bytes received on connection `id`: how many were taken. On error, log it and close.
    pub fn receive(&mut self, st: &mut Storage, id: u8, input: &[u8]) -> Result<usize, NbdError> {
        let session = self.session(id)?;
        session.on_receive(&mut StorageBackend(st), input)
    }

    /// Sends what connection `id` has to send through `send` (returns bytes the socket took).
    pub fn transmit(
        &mut self,
        st: &mut Storage,
        id: u8,
        send: &mut dyn FnMut(&[u8]) -> usize,
    ) -> Result<(), NbdError> {
        let session = self.session(id)?;
        session.on_transmit(&mut StorageBackend(st), send)
    }

    /// Every open connection (including ones whose socket is closed and whose device I/O is
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
        self.sessions
            .get(usize::from(id))
            .and_then(Option::as_ref)
            .is_none_or(|e| e.session.should_close())
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

    /// A device completion with [`NBD_TAG`] (from `storage::poll`), with the pool its buffer
    /// belongs to.
    pub fn complete(&mut self, pool: &mut BufferPool, completion: Completion) {
        let session = session::untag(completion.tag).and_then(|(conn, slot, chunk)| {
            self.sessions
                .get_mut(usize::from(conn))
                .and_then(Option::as_mut)
                .map(|e| (&mut e.session, slot, chunk))
        });
        let Some((session, slot, chunk)) = session else {
            log::error!("nbd: completion for unknown tag {:#x}", completion.tag);
            if let Some(b) = completion.buffer {
                let _ = pool.release(b);
            }
            return;
        };
        let result = completion.result.map_err(errno);
        session.on_completion(slot, chunk, result, completion.buffer, &mut |b| {
            let _ = pool.release(b);
        });
    }

    /// Resubmits waiting I/O and frees finished sessions (every loop iteration).
    pub fn step(&mut self, st: &mut Storage) {
        let mut backend = StorageBackend(st);
        for entry in self.sessions.iter_mut() {
            let Some(e) = entry else { continue };
            e.session.step(&mut backend);
            if e.socket_closed && e.session.can_free() {
                e.session.release_all(&mut backend);
                *entry = None;
            }
        }
    }

    fn session(&mut self, id: u8) -> Result<&mut Session<DmaBuf>, NbdError> {
        self.sessions
            .get_mut(usize::from(id))
            .and_then(Option::as_mut)
            .filter(|e| !e.socket_closed)
            .map(|e| &mut *e.session)
            .ok_or(NbdError::Closed)
    }
}
