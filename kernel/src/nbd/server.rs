//! The NBD server in the kernel: sessions ([`super::session::Session`]) joined to `Storage`.
//! Every volume is an export: devices by name (`vda`, `nvme0n1`; not a device holding a COW
//! store, which only the engine may write) and active snapshots by name.
//!
//! The TCP side is left narrow for the network stack to call from the main loop:
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

use drivers::block::{BlockError, BlockRequest, BufferPool, Completion, DmaBuf};

use super::allow::AllowList;
use super::connection::ConnectionConfig;
use super::error::NbdError;
use super::export::{ExportCatalog, ExportInfo, ExportName};
use super::proto::Errno;
use super::session::{self, Backend, BackendOp, IoBuffer, Session, SubmitError, MAX_CHUNKS};
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
    /// Networks allowed to connect (`None`: everyone).
    pub allow: Option<AllowList>,
}

impl ServerConfig {
    /// `nbd.port=` (default 10809) and `nbd.allow=`.
    pub fn from_cmdline(cmdline: Option<&crate::cmdline::CmdLine>) -> ServerConfig {
        ServerConfig {
            port: cmdline
                .and_then(|c| c.nbd_port)
                .unwrap_or(super::DEFAULT_PORT),
            allow: cmdline.and_then(|c| c.nbd_allow),
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

/// The export handle of a target: kind in bits 48.., origin or device in bits 16..48,
/// snapshot id in bits 0..16.
pub fn handle_of(target: Target) -> u64 {
    match target {
        Target::Device(d) => (d as u64) << 16,
        Target::Volume {
            origin,
            volume: snapshot::Volume::Origin,
        } => (1 << 48) | ((origin as u64) << 16),
        Target::Volume {
            origin,
            volume: snapshot::Volume::Snapshot(id),
        } => (2 << 48) | ((origin as u64) << 16) | u64::from(id.0),
    }
}

/// The target of an export handle.
pub fn target_of(handle: u64) -> Option<Target> {
    let index = ((handle >> 16) & 0xffff_ffff) as usize;
    match handle >> 48 {
        0 => Some(Target::Device(index)),
        1 => Some(Target::Volume {
            origin: index,
            volume: snapshot::Volume::Origin,
        }),
        2 => Some(Target::Volume {
            origin: index,
            volume: snapshot::Volume::Snapshot(snapshot::SnapId(handle as u16)),
        }),
        _ => None,
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

/// `Storage` as the sessions' backend and export catalog.
pub struct StorageBackend<'a>(pub &'a mut Storage);

impl StorageBackend<'_> {
    fn target(&self, export: u64) -> Target {
        target_of(export).unwrap_or(Target::Device(usize::MAX))
    }

    fn block_size(&self, target: Target) -> u64 {
        u64::from(self.0.geometry(target).block_size.max(512))
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
        let target = st.resolve(name)?;
        if let Target::Device(d) = target {
            if st.cow_user(d).is_some() {
                return None;
            }
        }
        let g = st.geometry(target);
        let pool = st.pools.get(st.disk_of(target))?;
        let block = g.block_size.max(512);
        let chunk = pool.buffer_size() as u64 / u64::from(block) * u64::from(block);
        let chunks = (MAX_CHUNKS as u64).min(pool.total() as u64);
        let max_payload = (chunk * chunks).min(u64::from(MAX_PAYLOAD)) as u32;
        Some(ExportInfo {
            handle: handle_of(target),
            size: g.capacity_blocks * u64::from(block),
            block_size: block,
            read_only: g.read_only,
            flush: true,
            fua: g.fua,
            trim: g.discard && !g.read_only && matches!(target, Target::Device(_)),
            max_payload,
        })
    }

    fn name(&self, index: usize) -> Option<ExportName> {
        self.export_names().nth(index)
    }

    fn description(&self, export: &ExportInfo) -> Option<ExportName> {
        let target = target_of(export.handle)?;
        let st = &*self.0;
        let text = match target {
            Target::Device(d) => st.devices.get(d).map(|dev| dev.info().driver)?,
            Target::Volume {
                volume: snapshot::Volume::Origin,
                ..
            } => "origin of snapshots",
            Target::Volume { .. } => "snapshot",
        };
        Some(ExportName::from_str_truncated(text))
    }
}

impl Backend for StorageBackend<'_> {
    type Buf = DmaBuf;

    fn chunk_bytes(&self, export: u64) -> usize {
        let target = self.target(export);
        let block = self.block_size(target) as usize;
        self.0
            .pools
            .get(self.0.disk_of(target))
            .map_or(block, |p| p.buffer_size() / block * block)
    }

    fn max_discard_bytes(&mut self, export: u64) -> u64 {
        let target = self.target(export);
        let g = self.0.geometry(target);
        if g.discard {
            u64::from(g.max_discard_blocks) * self.block_size(target)
        } else {
            0
        }
    }

    fn available(&mut self, export: u64) -> usize {
        let target = self.target(export);
        self.0.pool(target).map_or(0, |p| p.available())
    }

    fn acquire(&mut self, export: u64) -> Option<DmaBuf> {
        let target = self.target(export);
        self.0.pool(target)?.acquire()
    }

    fn release(&mut self, export: u64, buffer: DmaBuf) {
        let target = self.target(export);
        if let Some(pool) = self.0.pool(target) {
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
        let target = self.target(export);
        let block = self.block_size(target);
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

/// The NBD server: up to [`MAX_CONNECTIONS`] sessions.
pub struct Server {
    config: ServerConfig,
    sessions: Vec<Option<Entry>>,
}

struct Entry {
    session: Box<Session<DmaBuf>>,
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
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Open connections (including ones waiting for their device I/O).
    pub fn connections(&self) -> usize {
        self.sessions.iter().flatten().count()
    }

    /// A new TCP connection from `peer`: its id, or why it is refused (close the socket).
    /// Allocates the session (about 8 KiB plus its slot table).
    pub fn accept(&mut self, peer: [u8; 4]) -> Result<u8, AcceptError> {
        if let Some(allow) = &self.config.allow {
            if !allow.allows(peer) {
                return Err(AcceptError::NotAllowed);
            }
        }
        let id = self
            .sessions
            .iter()
            .position(Option::is_none)
            .ok_or(AcceptError::Full)?;
        let config = ConnectionConfig {
            max_payload: MAX_PAYLOAD,
        };
        self.sessions[id] = Some(Entry {
            session: Box::new(Session::new(id as u8, config)),
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
