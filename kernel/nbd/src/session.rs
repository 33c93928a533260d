//! One NBD connection joined to the volumes: a [`Connection`] plus, per request slot, the
//! device I/O that carries it. Generic over a [`Backend`] (export catalog, roles, buffer
//! pool, submission) so the logic is tested on the host with a fake; the kernel implements
//! the backend over its `Storage`.
//!
//! How a request becomes device I/O:
//! - Requests are cut into *chunks* of one pool buffer each ([`Backend::chunk_bytes`]); the
//!   export advertises a maximum payload of at most [`MAX_CHUNKS`] chunks.
//! - READ: all its buffers are taken at once, or none (so that reads waiting to be sent can
//!   never hold the pool hostage half-filled); chunks are submitted in order; the data stays
//!   in the buffers until the connection has sent it, then the buffers go back to the pool.
//! - WRITE: the payload is copied into a buffer as it arrives from TCP; each full chunk is
//!   submitted by the next [`Session::step`]. When no buffer is free the session takes no more input (TCP
//!   back-pressure). A failed chunk makes the rest of the payload be dropped; the reply goes
//!   out when every submitted chunk is back.
//! - WRITE_ZEROES is a write of zeroes: pool buffers are zeroed and written chunk after
//!   chunk through the same route as a write (so an origin's goes through its engine's
//!   copy-on-write), at most [`ZERO_DEPTH`] of them in a device at once, each buffer back to
//!   the pool when its chunk completes; its length is not bounded by the maximum payload.
//! - FLUSH and TRIM are one device request each (a trim larger than the device takes in one
//!   request, or one through a snapshot engine, is answered without discarding anything:
//!   trim is a hint).
//! - Every device request is routed by what its export's identity is *now*
//!   ([`route::route`] over the backend's [`Roles`]): a device that became an origin goes
//!   through its engine from the next request on, a device that became a COW store refuses
//!   writes and trims (`EPERM`), a snapshot that is gone answers `EIO`. The first such
//!   refusal of a session is logged once.
//! - [`Session::step`] is the one place device requests are submitted: what
//!   [`Session::on_receive`] took in, and what found the queue full or waited for buffers.
//! - A request's reply is released only when none of its chunks is in a device any more, so
//!   a slot (and its [`RequestId`]s) is never reused while the device still holds I/O for it.
//!
//! Completions come back by the [`RequestId`] the session gave the backend with the
//! submission; how a backend carries it through its devices (the kernel puts it in device
//! tags) is the backend's business.

use alloc::boxed::Box;

use super::connection::{Connection, ConnectionConfig, Event, Received, Transmit, MAX_IN_FLIGHT};
use super::error::NbdError;
use super::export::{ExportCatalog, ExportInfo, ExportName};
use super::proto::Errno;
use super::route::{self, ExportId, Roles, Route};

/// Chunks per request at most (the maximum payload is this many pool buffers or less).
pub const MAX_CHUNKS: usize = 16;
/// Zero-filled chunks of one WRITE_ZEROES in a device at once.
pub const ZERO_DEPTH: u16 = 4;

/// The server's own id of one device request: chunk `chunk` of request slot `slot` of
/// connection `connection`. The backend gets it with [`Backend::submit`] and hands it back
/// with the completion ([`crate::Server::complete`]); it fits in [`RequestId::BITS`] bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// The server's connection id.
    pub connection: u8,
    /// The request slot of that connection.
    pub slot: u16,
    /// The chunk of that request.
    pub chunk: u16,
}

impl RequestId {
    /// Bits [`RequestId::to_bits`] uses (the rest of a 64-bit device tag is the backend's).
    pub const BITS: u32 = 40;

    /// The id as a number below `1 << BITS`.
    pub fn to_bits(self) -> u64 {
        (u64::from(self.connection) << 32) | (u64::from(self.slot) << 16) | u64::from(self.chunk)
    }

    /// The id [`RequestId::to_bits`] gave `bits`; `None` if bits above [`RequestId::BITS`]
    /// are set.
    pub fn from_bits(bits: u64) -> Option<RequestId> {
        if bits >> Self::BITS != 0 {
            return None;
        }
        Some(RequestId {
            connection: (bits >> 32) as u8,
            slot: (bits >> 16) as u16,
            chunk: bits as u16,
        })
    }
}

/// A pool buffer as the session uses it.
pub trait IoBuffer {
    /// The bytes in use.
    fn bytes(&self) -> &[u8];
    /// The bytes in use, mutably.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Sets the bytes in use (at most the capacity); false if too large.
    fn set_len(&mut self, len: usize) -> bool;
}

/// A device request for chunk I/O; offsets and lengths in bytes of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendOp {
    /// Read `buffer.len()` bytes at `offset` into the buffer.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// Write the buffer at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Force Unit Access.
        fua: bool,
    },
    /// Flush the volatile write cache.
    Flush,
    /// Discard `len` bytes at `offset`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
    },
}

/// Why a submission did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: try again later.
    Busy,
    /// The request failed (becomes the reply's error).
    Failed(Errno),
}

/// The volumes as a session needs them: the export catalog of the handshake, the roles
/// every request is routed by, a buffer pool per export and submission. `export` is the
/// handle from [`ExportInfo`] (an [`ExportId`]).
pub trait Backend: ExportCatalog + Roles {
    /// The buffer type (the kernel's DMA buffers).
    type Buf: IoBuffer;
    /// Bytes per chunk: the size of the export's pool buffers (a multiple of its block size).
    /// The session advertises at most [`MAX_CHUNKS`] chunks as the maximum payload.
    fn chunk_bytes(&self, export: u64) -> usize;
    /// The largest discard one device request to `to` takes, in bytes (0: none; a trim is
    /// then answered without discarding).
    fn max_discard_bytes(&mut self, export: u64, to: Route) -> u64;
    /// Free buffers in the export's pool.
    fn available(&mut self, export: u64) -> usize;
    /// Takes a buffer from the export's pool (length set to the full buffer).
    fn acquire(&mut self, export: u64) -> Option<Self::Buf>;
    /// Gives a buffer back to the export's pool.
    fn release(&mut self, export: u64, buffer: Self::Buf);
    /// Submits chunk I/O of `export` to where [`route::route`] sends it now; its completion
    /// comes back with `id` ([`crate::Server::complete`]). On refusal the buffer comes back.
    fn submit(
        &mut self,
        export: u64,
        to: Route,
        id: RequestId,
        op: BackendOp,
        buffer: Option<Self::Buf>,
    ) -> Result<(), (SubmitError, Option<Self::Buf>)>;
    /// The name of the volume `export` names now (a device's name, a snapshot's name), for
    /// the console and log lines; `None` once a snapshot is gone.
    fn volume_name(&self, export: u64) -> Option<ExportName>;
}

/// The backend's catalog with each export's maximum payload held to what [`MAX_CHUNKS`]
/// buffers carry, so that no request the client may send needs more.
struct Clamped<'a, K>(&'a K);

impl<K: Backend + ExportCatalog> ExportCatalog for Clamped<'_, K> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let mut export = self.0.lookup(name)?;
        let most = (MAX_CHUNKS * self.0.chunk_bytes(export.handle)).min(u32::MAX as usize) as u32;
        export.max_payload = match export.max_payload {
            0 => most,
            own => own.min(most),
        };
        Some(export)
    }
    fn name(&self, index: usize) -> Option<ExportName> {
        self.0.name(index)
    }
    fn description(&self, export: &ExportInfo) -> Option<ExportName> {
        self.0.description(export)
    }
    fn changed_snapshot(&self, export: &ExportInfo, index: usize) -> Option<ExportName> {
        self.0.changed_snapshot(export, index)
    }
    fn changed_key(&self, export: &ExportInfo, name: &str) -> Option<u32> {
        self.0.changed_key(export, name)
    }
    fn changed_chunk_bytes(&self, export: &ExportInfo, key: u32) -> Result<u64, Errno> {
        self.0.changed_chunk_bytes(export, key)
    }
    fn changed_chunks(
        &self,
        export: &ExportInfo,
        key: u32,
        first: u64,
        count: u64,
        each: &mut dyn FnMut(bool) -> bool,
    ) -> Result<(), Errno> {
        self.0.changed_chunks(export, key, first, count, each)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Idle,
    Read,
    Write { fua: bool },
    Flush,
    Trim,
    Zero { fua: bool },
}

/// The device side of one request slot.
struct SlotIo<B> {
    op: Op,
    offset: u64,
    len: u32,
    /// Chunks in total (1 for flush and trim; a WRITE_ZEROES may have more than
    /// [`MAX_CHUNKS`], each with a buffer of its own only while it is in a device).
    chunks: u32,
    /// Buffers per chunk: acquired and not yet submitted, or back from a read.
    buffers: [Option<B>; MAX_CHUNKS],
    /// The next chunk to submit.
    next: u32,
    /// Chunks in a device now.
    in_device: u16,
    /// Read buffers have been taken from the pool.
    acquired: bool,
    /// Write payload bytes received.
    received: u32,
    /// The write chunk being filled, with its fill level.
    filling: Option<B>,
    /// First error; no more chunks are submitted after it.
    error: Option<Errno>,
    /// Where a read first failed (the failed chunk's offset).
    error_offset: Option<u64>,
    /// The connection has been told the result.
    completed: bool,
}

impl<B> SlotIo<B> {
    fn idle() -> Self {
        SlotIo {
            op: Op::Idle,
            offset: 0,
            len: 0,
            chunks: 0,
            buffers: [const { None }; MAX_CHUNKS],
            next: 0,
            in_device: 0,
            acquired: false,
            received: 0,
            filling: None,
            error: None,
            error_offset: None,
            completed: false,
        }
    }
}

/// What a session has done, for the console (`nbd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Requests taken (READ, WRITE, FLUSH, TRIM; not DISC, not requests refused while
    /// parsing).
    pub requests: u64,
    /// Bytes requested by READs.
    pub read_bytes: u64,
    /// WRITE payload bytes received.
    pub written_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// One NBD connection with its device I/O (see the module documentation). Allocate it when
/// the connection is accepted; it does not allocate afterwards.
pub struct Session<B: IoBuffer> {
    id: u8,
    conn: Connection,
    stats: SessionStats,
    export: Option<ExportInfo>,
    chunk_bytes: usize,
    /// `MAX_IN_FLIGHT` entries, on the heap (about 20 KiB with `DmaBuf`s: too much for a
    /// temporary on the kernel stack).
    slots: Box<[SlotIo<B>]>,
    /// The connection is dead (protocol error, TCP gone): no input, no output, only device
    /// I/O still in flight to wait for.
    dead: bool,
    /// The session was told (in the log) that its volume changed role.
    role_logged: bool,
}

impl<B: IoBuffer> Session<B> {
    /// A session for connection number `id` (carried in its [`RequestId`]s). Allocates its
    /// slot table (call it when the connection is accepted).
    pub fn new(id: u8, config: ConnectionConfig) -> Self {
        Session {
            id,
            conn: Connection::new(config),
            stats: SessionStats::default(),
            export: None,
            chunk_bytes: 0,
            slots: (0..MAX_IN_FLIGHT).map(|_| SlotIo::idle()).collect(),
            dead: false,
            role_logged: false,
        }
    }

    /// The connection number.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The export being served, once chosen.
    pub fn export(&self) -> Option<&ExportInfo> {
        self.export.as_ref()
    }

    /// The session's counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Requests taken from the client and not yet fully answered.
    pub fn in_flight(&self) -> usize {
        self.conn.in_flight()
    }

    /// Device requests of this session in flight.
    pub fn in_device(&self) -> usize {
        self.slots.iter().map(|s| usize::from(s.in_device)).sum()
    }

    /// The TCP connection can be closed: the client said goodbye and everything is answered,
    /// or the session died.
    pub fn should_close(&self) -> bool {
        self.dead || self.conn.is_finished()
    }

    /// The session can be freed: it should close and no device I/O is outstanding. Call
    /// [`Session::release_all`] first.
    pub fn can_free(&self) -> bool {
        self.should_close() && self.in_device() == 0
    }

    /// Marks the session dead (the TCP connection is gone); device I/O is still collected.
    pub fn kill(&mut self) {
        self.dead = true;
    }

    /// Bytes from TCP: returns how many were taken (the rest stays in the socket: back-pressure
    /// when the slot table or the buffer pool is full). An error kills the session: log it,
    /// close the TCP connection.
    pub fn on_receive<K: Backend<Buf = B> + ExportCatalog>(
        &mut self,
        backend: &mut K,
        input: &[u8],
    ) -> Result<usize, NbdError> {
        if self.dead {
            return Err(NbdError::Closed);
        }
        let mut pos: usize = 0;
        loop {
            let mut end = input.len();
            if let Some((slot, _, _)) = self.conn.payload_pending() {
                let room = self.write_room(backend, slot);
                if room == 0 {
                    break;
                }
                end = end.min(pos.saturating_add(room));
            }
            let Received { consumed, event } =
                match self.conn.receive(&input[pos..end], &Clamped(&*backend)) {
                    Ok(r) => r,
                    Err(e) => {
                        self.dead = true;
                        return Err(e);
                    }
                };
            pos += consumed;
            match event {
                Some(event) => self.on_event(backend, event),
                None => break,
            }
        }
        Ok(pos)
    }

    /// Sends what is due through `send` (which returns how many bytes the socket took).
    /// An error kills the session.
    pub fn on_transmit<K: Backend<Buf = B> + ExportCatalog>(
        &mut self,
        backend: &mut K,
        send: &mut dyn FnMut(&[u8]) -> usize,
    ) -> Result<(), NbdError> {
        if self.dead {
            return Err(NbdError::Closed);
        }
        loop {
            match self.conn.poll_transmit(&Clamped(&*backend)) {
                Transmit::Idle => return Ok(()),
                Transmit::Bytes(bytes) => {
                    let want = bytes.len();
                    let n = send(bytes).min(want);
                    self.conn.transmitted(n);
                    if n < want {
                        return Ok(());
                    }
                }
                Transmit::ReadData { slot, at, len } => {
                    let chunk_bytes = self.chunk_bytes.max(1);
                    let s = &self.slots[usize::from(slot)];
                    let index = at as usize / chunk_bytes;
                    let within = at as usize % chunk_bytes;
                    let Some(data) = s.buffers.get(index).and_then(Option::as_ref) else {
                        // The reply header is out: only a hard disconnect is left.
                        self.dead = true;
                        return Err(NbdError::Closed);
                    };
                    let data = data.bytes();
                    let piece = &data[within.min(data.len())..];
                    let piece = &piece[..piece.len().min(len as usize)];
                    if piece.is_empty() {
                        self.dead = true;
                        return Err(NbdError::Closed);
                    }
                    let piece_len = piece.len();
                    let n = send(piece).min(piece_len);
                    if self.conn.transmitted(n) == Some(slot) {
                        self.release_slot(backend, slot);
                    }
                    if n < piece_len {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// A device completion for chunk `chunk` of `slot`: read data stays in the buffer until
    /// sent; other buffers go back through `release`.
    pub fn on_completion(
        &mut self,
        slot: u16,
        chunk: u16,
        result: Result<(), Errno>,
        buffer: Option<B>,
        release: &mut dyn FnMut(B),
    ) {
        let chunk_bytes = self.chunk_bytes as u64;
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            if let Some(b) = buffer {
                release(b);
            }
            return;
        };
        s.in_device = s.in_device.saturating_sub(1);
        if let Err(e) = result {
            if s.error.is_none() && s.op == Op::Read {
                s.error_offset = Some(s.offset + u64::from(chunk) * chunk_bytes);
            }
            s.error.get_or_insert(e);
        }
        match (s.op, buffer) {
            (Op::Read, Some(b)) if result.is_ok() && usize::from(chunk) < MAX_CHUNKS => {
                s.buffers[usize::from(chunk)] = Some(b);
            }
            (_, Some(b)) => release(b),
            (_, None) => {}
        }
        self.finish(slot, release);
    }

    /// Submits what was received and what waits for a queue slot or buffers (call after
    /// [`Session::on_receive`], every loop iteration): the only place requests are submitted.
    pub fn step<K: Backend<Buf = B>>(&mut self, backend: &mut K) {
        let Some(export) = self.export else { return };
        for slot in 0..MAX_IN_FLIGHT as u16 {
            self.submit_slot(backend, export.handle, slot);
        }
    }

    /// Gives every buffer the session holds back to the pool (before freeing it).
    pub fn release_all<K: Backend<Buf = B>>(&mut self, backend: &mut K) {
        let Some(export) = self.export else { return };
        for s in self.slots.iter_mut() {
            for b in s.buffers.iter_mut().filter_map(Option::take) {
                backend.release(export.handle, b);
            }
            if let Some(b) = s.filling.take() {
                backend.release(export.handle, b);
            }
        }
    }

    fn on_event<K: Backend<Buf = B>>(&mut self, backend: &mut K, event: Event<'_>) {
        match &event {
            Event::Read { len, .. } => {
                self.stats.requests += 1;
                self.stats.read_bytes += u64::from(*len);
            }
            Event::Write { .. }
            | Event::Flush { .. }
            | Event::Trim { .. }
            | Event::WriteZeroes { .. } => {
                self.stats.requests += 1;
            }
            Event::WriteData { data, .. } => self.stats.written_bytes += data.len() as u64,
            Event::Export(_) | Event::Disconnect => {}
        }
        match event {
            Event::Export(export) => {
                // Never zero: it divides offsets.
                self.chunk_bytes = backend.chunk_bytes(export.handle).max(1);
                self.export = Some(export);
            }
            Event::Read { slot, offset, len } => self.start(slot, Op::Read, offset, len),
            Event::Write {
                slot,
                offset,
                len,
                fua,
            } => self.start(slot, Op::Write { fua }, offset, len),
            Event::Flush { slot } => self.start(slot, Op::Flush, 0, 0),
            Event::Trim {
                slot, offset, len, ..
            } => self.start(slot, Op::Trim, offset, len),
            Event::WriteZeroes {
                slot,
                offset,
                len,
                fua,
            } => self.start(slot, Op::Zero { fua }, offset, len),
            Event::WriteData {
                slot, data, last, ..
            } => self.write_data(backend, slot, data, last),
            Event::Disconnect => {}
        }
    }

    fn start(&mut self, slot: u16, op: Op, offset: u64, len: u32) {
        let chunk_bytes = self.chunk_bytes.max(1) as u64;
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        *s = SlotIo::idle();
        s.op = op;
        s.offset = offset;
        s.len = len;
        s.chunks = match op {
            Op::Read | Op::Write { .. } | Op::Zero { .. } => {
                u64::from(len).div_ceil(chunk_bytes) as u32
            }
            _ => 1,
        };
        if !matches!(op, Op::Zero { .. }) && s.chunks as usize > MAX_CHUNKS {
            // The advertised maximum keeps this from happening.
            s.error = Some(Errno::Inval);
            s.chunks = 0;
        }
    }

    /// How many payload bytes of write `slot` can be taken now.
    fn write_room<K: Backend<Buf = B>>(&mut self, backend: &mut K, slot: u16) -> usize {
        let chunk_bytes = self.chunk_bytes;
        let Some(export) = self.export else { return 0 };
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return 0;
        };
        if s.error.is_some() {
            return usize::MAX; // dropped anyway
        }
        if s.filling.is_none() {
            s.filling = backend.acquire(export.handle);
        }
        match &s.filling {
            None => 0,
            Some(_) => chunk_bytes - (s.received as usize % chunk_bytes),
        }
    }

    fn write_data<K: Backend<Buf = B>>(
        &mut self,
        backend: &mut K,
        slot: u16,
        data: &[u8],
        last: bool,
    ) {
        let chunk_bytes = self.chunk_bytes;
        let Some(export) = self.export else { return };
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        let at = s.received as usize % chunk_bytes;
        s.received += data.len() as u32;
        if s.error.is_none() {
            match s.filling.as_mut() {
                Some(b) if at + data.len() <= b.bytes().len() => {
                    b.bytes_mut()[at..at + data.len()].copy_from_slice(data)
                }
                _ => {
                    s.error = Some(Errno::Io);
                }
            }
        }
        let chunk_done = last || (s.received as usize).is_multiple_of(chunk_bytes);
        if chunk_done {
            if let Some(mut b) = s.filling.take() {
                if s.error.is_some() {
                    backend.release(export.handle, b);
                } else {
                    b.set_len(at + data.len());
                    let index = (s.received as usize - 1) / chunk_bytes;
                    if let Some(place) = s.buffers.get_mut(index) {
                        *place = Some(b);
                    }
                }
            }
        }
    }

    /// Submits the chunks of `slot` that can go now, each to where its export's identity
    /// is routed at this moment.
    fn submit_slot<K: Backend<Buf = B>>(&mut self, backend: &mut K, export: u64, slot: u16) {
        let chunk_bytes = self.chunk_bytes;
        let connection = self.id;
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        if s.op == Op::Idle || s.completed {
            return;
        }
        if s.op == Op::Read && !s.acquired && s.error.is_none() {
            if backend.available(export) < s.chunks as usize {
                return;
            }
            for i in 0..s.chunks as usize {
                let Some(mut b) = backend.acquire(export) else {
                    s.error = Some(Errno::NoMem);
                    break;
                };
                let len = (s.len as usize - i * chunk_bytes).min(chunk_bytes);
                b.set_len(len);
                s.buffers[i] = Some(b);
            }
            s.acquired = true;
            if s.error.is_some() {
                for b in s.buffers.iter_mut().filter_map(Option::take) {
                    backend.release(export, b);
                }
            }
        }
        let writes = matches!(s.op, Op::Write { .. } | Op::Trim | Op::Zero { .. });
        let zeroes = matches!(s.op, Op::Zero { .. });
        let mut refused = None;
        while s.error.is_none() && s.next < s.chunks {
            let index = s.next as usize;
            let chunk_offset = s.offset + index as u64 * chunk_bytes as u64;
            if matches!(s.op, Op::Write { .. }) && s.buffers[index].is_none() {
                // Not filled yet.
                break;
            }
            if zeroes && (s.in_device >= ZERO_DEPTH || backend.available(export) == 0) {
                // The rest goes as chunks come back (`step`).
                break;
            }
            // Where this piece goes now: the export's identity may have changed role since
            // the handshake, or since the previous chunk.
            let routed = ExportId::from_handle(export)
                .ok_or(Errno::Io)
                .and_then(|id| route::route(id, writes, &*backend));
            let to = match routed {
                Ok(to) => to,
                Err(e) => {
                    s.error = Some(e);
                    refused = Some(e);
                    break;
                }
            };
            let (op, buffer) = match s.op {
                Op::Read => (
                    BackendOp::Read {
                        offset: chunk_offset,
                    },
                    s.buffers[index].take(),
                ),
                Op::Write { fua } => (
                    BackendOp::Write {
                        offset: chunk_offset,
                        fua,
                    },
                    s.buffers[index].take(),
                ),
                Op::Flush => (BackendOp::Flush, None),
                Op::Trim if u64::from(s.len) > backend.max_discard_bytes(export, to) => {
                    // Too large for one device request, or not a device of its own: a hint
                    // we may ignore.
                    s.next = s.chunks;
                    break;
                }
                Op::Trim => (
                    BackendOp::Discard {
                        offset: s.offset,
                        len: u64::from(s.len),
                    },
                    None,
                ),
                Op::Zero { fua } => {
                    let Some(mut b) = backend.acquire(export) else {
                        break;
                    };
                    let len = (s.len as usize - index * chunk_bytes).min(chunk_bytes);
                    b.set_len(len);
                    b.bytes_mut().fill(0);
                    (
                        BackendOp::Write {
                            offset: chunk_offset,
                            fua,
                        },
                        Some(b),
                    )
                }
                Op::Idle => return,
            };
            let id = RequestId {
                connection,
                slot,
                // Distinct among the chunks in a device at once (at most MAX_CHUNKS, or
                // ZERO_DEPTH of a WRITE_ZEROES).
                chunk: s.next as u16,
            };
            match backend.submit(export, to, id, op, buffer) {
                Ok(()) => {
                    s.next += 1;
                    s.in_device += 1;
                }
                Err((why, buffer)) => {
                    match buffer {
                        Some(b) if zeroes => backend.release(export, b),
                        Some(b) => s.buffers[index] = Some(b),
                        None => {}
                    }
                    match why {
                        SubmitError::Busy => break,
                        SubmitError::Failed(e) => s.error = Some(e),
                    }
                }
            }
        }
        if s.error.is_some() || s.next == s.chunks {
            self.finish(slot, &mut |b| backend.release(export, b));
        }
        if let Some(why) = refused {
            self.role_changed(&*backend, export, why);
        }
    }

    /// Logs, once per session, that requests on `export` fail because its volume changed
    /// role since the handshake (a disk that became a COW store, a snapshot deleted or
    /// merged).
    fn role_changed<K: Backend<Buf = B>>(&mut self, backend: &K, export: u64, why: Errno) {
        if core::mem::replace(&mut self.role_logged, true) {
            return;
        }
        let conn = self.id;
        match (ExportId::from_handle(export), why) {
            (Some(ExportId::Device { .. }), Errno::Perm) => log::warn!(
                "nbd: connection {conn}: {} now holds a COW store; its writes are refused",
                backend.volume_name(export).unwrap_or_default()
            ),
            (Some(ExportId::Snapshot { .. }), _) => log::warn!(
                "nbd: connection {conn}: its snapshot was deleted or is being merged; its requests fail"
            ),
            (_, e) => log::warn!("nbd: connection {conn}: its volume is gone ({e:?})"),
        }
    }

    /// Tells the connection the result of `slot` once nothing of it is in a device and
    /// nothing more will be submitted.
    fn finish(&mut self, slot: u16, release: &mut dyn FnMut(B)) {
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        if s.op == Op::Idle || s.completed || s.in_device > 0 {
            return;
        }
        let payload_done = match s.op {
            Op::Write { .. } => s.received == s.len,
            _ => true,
        };
        let all_submitted = s.next == s.chunks;
        if !payload_done || (s.error.is_none() && !all_submitted) {
            return;
        }
        s.completed = true;
        let result = match s.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        let error_offset = s.error_offset;
        if result.is_err() {
            self.stats.errors += 1;
        }
        if result.is_err() || s.op != Op::Read {
            for b in s.buffers.iter_mut().filter_map(Option::take) {
                release(b);
            }
            if let Some(b) = s.filling.take() {
                release(b);
            }
        }
        let keep_buffers = result.is_ok() && s.op == Op::Read;
        if !keep_buffers {
            *s = SlotIo::idle();
        }
        if self.dead {
            return;
        }
        if self.conn.complete_at(slot, result, error_offset).is_err() {
            // The connection disagrees about the slot: a bug here; end the session.
            self.dead = true;
        }
    }

    fn release_slot<K: Backend<Buf = B>>(&mut self, backend: &mut K, slot: u16) {
        let Some(export) = self.export else { return };
        if let Some(s) = self.slots.get_mut(usize::from(slot)) {
            for b in s.buffers.iter_mut().filter_map(Option::take) {
                backend.release(export.handle, b);
            }
            *s = SlotIo::idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{Buf, Fake, CHUNK, DISK};
    use super::super::proto::*;
    use super::super::route;
    use super::*;
    use proptest::prelude::*;

    fn request(command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        super::super::fake::request(0, command, cookie, offset, len)
    }

    use super::super::fake::go_handshake as handshake;

    /// Drives a session: feeds `input` in pieces of `chop`, completes device I/O in the order
    /// `picks` gives, sends with a socket taking `window` bytes a call; until `done(out)`.
    struct Driver {
        session: Box<Session<Buf>>,
        fake: Fake,
        out: Vec<u8>,
        chop: usize,
        window: usize,
        picks: Vec<usize>,
        turn: usize,
    }

    impl Driver {
        fn new(
            buffers: usize,
            depth: usize,
            chop: usize,
            window: usize,
            picks: Vec<usize>,
        ) -> Driver {
            let mut d = Driver {
                session: Box::new(Session::new(7, ConnectionConfig::default())),
                fake: Fake::new(buffers, depth),
                out: Vec::new(),
                chop: chop.max(1),
                window: window.max(1),
                picks: if picks.is_empty() { vec![0] } else { picks },
                turn: 0,
            };
            // Greeting, INFO_EXPORT, INFO_BLOCK_SIZE, ACK.
            d.run(&handshake(), |out| out.len() >= 18 + 32 + 34 + 20);
            assert_eq!(d.out.len(), 18 + 32 + 34 + 20);
            d.out.clear();
            d
        }

        fn run(&mut self, mut input: &[u8], done: impl Fn(&[u8]) -> bool) {
            // Enough turns for the input fed a byte at a time (chop 1), and then some.
            for _ in 0..1_000_000 + 2 * input.len() {
                if input.is_empty() && done(&self.out) {
                    return;
                }
                let piece = &input[..input.len().min(self.chop)];
                let taken = self
                    .session
                    .on_receive(&mut self.fake, piece)
                    .expect("protocol error");
                input = &input[taken..];
                self.session.step(&mut self.fake);
                let pick = self.picks[self.turn % self.picks.len()];
                self.turn += 1;
                // Now and then the device is slow; it always catches up.
                if !pick.is_multiple_of(3) || self.turn.is_multiple_of(4) {
                    self.fake.complete_one(&mut self.session, pick);
                }
                let window = self.window;
                let out = &mut self.out;
                self.session
                    .on_transmit(&mut self.fake, &mut |b| {
                        let n = b.len().min(window);
                        out.extend_from_slice(&b[..n]);
                        n
                    })
                    .expect("transmit");
            }
            panic!(
                "no progress: {} bytes left, out {:?}",
                input.len(),
                self.out.len()
            );
        }

        /// Runs one request and returns (error, data).
        fn one(&mut self, msg: &[u8], read_len: usize) -> (u32, Vec<u8>) {
            self.out.clear();
            self.run(msg, |out| {
                out.len() >= 16 && (be32(out, 4) != 0 || out.len() >= 16 + read_len)
            });
            let error = be32(&self.out, 4);
            assert_eq!(be32(&self.out, 0), SIMPLE_REPLY_MAGIC);
            (error, self.out[16..].to_vec())
        }

        fn idle_checks(&mut self) {
            while self.fake.complete_one(&mut self.session, 0) {}
            assert_eq!(self.session.in_device(), 0);
            assert_eq!(self.fake.free.len(), self.fake.total, "every buffer back");
        }
    }

    #[test]
    fn request_ids_round_trip_in_forty_bits() {
        for id in [
            RequestId {
                connection: 200,
                slot: 31,
                chunk: 15,
            },
            RequestId {
                connection: 0,
                slot: 0,
                chunk: 0,
            },
            RequestId {
                connection: 255,
                slot: u16::MAX,
                chunk: u16::MAX,
            },
        ] {
            assert!(id.to_bits() < 1 << RequestId::BITS);
            assert_eq!(RequestId::from_bits(id.to_bits()), Some(id));
        }
        assert_eq!(RequestId::from_bits(1 << 40), None);
        assert_eq!(RequestId::from_bits(1 << 63 | 5), None);
    }

    /// A session opened on a plain device whose device becomes the origin of a snapshot,
    /// then a COW store, then plain again: every request goes where the role says at the
    /// moment it is submitted, not where it went at the handshake.
    #[test]
    fn every_request_is_routed_by_the_role_at_submission() {
        let mut d = Driver::new(16, 8, 1000, 700, vec![0]);
        let payload = vec![0x55u8; 8192];
        let mut write = request(CMD_WRITE, 1, 0, payload.len() as u32);
        write.extend_from_slice(&payload);
        assert_eq!(d.one(&write, 0).0, 0);
        assert!(d.fake.routes.iter().all(|r| *r == route::Route::Device(0)));
        // `snapshot create s1 vda vdb`: the same session now writes through the engine.
        d.fake.role = route::DeviceRole::Origin(3);
        d.fake.routes.clear();
        assert_eq!(d.one(&write, 0).0, 0);
        assert_eq!(d.one(&request(CMD_FLUSH, 2, 0, 0), 0).0, 0);
        assert_eq!(d.one(&request(CMD_READ, 3, 0, 4096), 4096).0, 0);
        assert!(!d.fake.routes.is_empty());
        assert!(d.fake.routes.iter().all(|r| *r == route::Route::Origin(3)));
        // The device now holds a COW store: writes get EPERM, reads go on.
        d.fake.role = route::DeviceRole::Store;
        d.fake.routes.clear();
        assert_eq!(d.one(&write, 0).0, Errno::Perm as u32);
        assert_eq!(d.one(&request(CMD_READ, 4, 0, 4096), 4096).0, 0);
        assert_eq!(d.fake.routes, vec![route::Route::Device(0)]);
        // Gone: every request fails.
        d.fake.role = route::DeviceRole::Missing;
        assert_eq!(d.one(&request(CMD_READ, 5, 0, 4096), 0).0, Errno::Io as u32);
        assert_eq!(d.one(&request(CMD_FLUSH, 6, 0, 0), 0).0, Errno::Io as u32);
        d.idle_checks();
    }

    #[test]
    fn reads_and_writes_across_chunks() {
        let mut d = Driver::new(16, 8, 1000, 700, vec![1, 2, 4, 5]);
        let payload: Vec<u8> = (0..40 * 1024).map(|i| (i * 7 % 256) as u8).collect();
        let mut msg = request(CMD_WRITE, 1, 8192, payload.len() as u32);
        msg.extend_from_slice(&payload);
        assert_eq!(d.one(&msg, 0).0, 0);
        assert_eq!(&d.fake.disk[8192..8192 + payload.len()], &payload[..]);
        let (error, data) = d.one(&request(CMD_READ, 2, 4096, 48 * 1024), 48 * 1024);
        assert_eq!(error, 0);
        assert_eq!(data, d.fake.disk[4096..4096 + 48 * 1024]);
        assert_eq!(d.one(&request(CMD_FLUSH, 3, 0, 0), 0).0, 0);
        assert_eq!(d.fake.flushes, 1);
        assert_eq!(d.one(&request(CMD_TRIM, 4, 0, 4096), 0).0, 0);
        assert_eq!(d.fake.discards, 1);
        // Larger than one device discard: answered without discarding.
        assert_eq!(d.one(&request(CMD_TRIM, 5, 0, 128 * 1024), 0).0, 0);
        assert_eq!(d.fake.discards, 1);
        // Past the end: refused by the parser, not counted as a request.
        assert_ne!(d.one(&request(CMD_READ, 6, DISK as u64, 4096), 0).0, 0);
        d.idle_checks();
        assert_eq!(
            d.session.stats(),
            SessionStats {
                requests: 5,
                read_bytes: 48 * 1024,
                written_bytes: payload.len() as u64,
                errors: 0,
            }
        );
        assert_eq!(d.session.in_flight(), 0);
    }

    /// WRITE_ZEROES: zero-filled chunks through the route of a write (the engine on an
    /// origin), more chunks than a request has buffers, never more than ZERO_DEPTH at once,
    /// every buffer back.
    #[test]
    fn write_zeroes_writes_zero_chunks_where_a_write_goes() {
        let mut d = Driver::new(6, 16, 100_000, 100_000, vec![0]);
        d.fake.create_snapshot("s1", 2);
        d.fake.routes.clear();
        let len = 100 * 1024 + 512;
        let before = d.fake.disk.clone();
        let msg = request(CMD_WRITE_ZEROES, 1, 4096, len);
        d.session.on_receive(&mut d.fake, &msg).unwrap();
        assert!(d.fake.in_flight.is_empty(), "nothing submitted on receive");
        d.session.step(&mut d.fake);
        assert_eq!(d.fake.in_flight.len(), usize::from(ZERO_DEPTH));
        assert_eq!(d.one(&[], 0).0, 0);
        let chunks = (len as usize).div_ceil(CHUNK);
        assert_eq!(d.fake.routes, vec![route::Route::Origin(0); chunks]);
        assert!(d.fake.disk[4096..4096 + len as usize]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(d.fake.disk[..4096], before[..4096]);
        let end = 4096 + len as usize;
        assert_eq!(d.fake.disk[end..], before[end..]);
        d.idle_checks();
        // A failed chunk fails the request; the rest is not written.
        d.fake.bad_byte = Some(200_000);
        d.fake.disk.fill(7);
        let msg = request(CMD_WRITE_ZEROES, 2, 0, DISK as u32);
        assert_eq!(d.one(&msg, 0).0, Errno::Io as u32);
        d.idle_checks();
        assert!(d.fake.disk[DISK - 4096..].iter().all(|&b| b == 7));
        // A snapshot that is gone: EIO, nothing submitted.
        d.fake.bad_byte = None;
        let mut s = Driver::new(6, 16, 100_000, 100_000, vec![0]);
        s.fake.create_snapshot("s1", 2);
        s.out.clear();
        *s.session = Session::new(7, ConnectionConfig::default());
        s.run(&super::super::fake::go_handshake_for("s1"), |out| {
            out.len() >= 18 + 32 + 34 + 20
        });
        s.out.clear();
        s.fake.delete_snapshot("s1");
        s.fake.routes.clear();
        assert_eq!(
            s.one(&request(CMD_WRITE_ZEROES, 3, 0, 8192), 0).0,
            Errno::Io as u32
        );
        assert!(s.fake.routes.is_empty());
        s.idle_checks();
    }

    /// With structured replies, a read whose third chunk fails is answered with
    /// `NBD_REPLY_TYPE_ERROR_OFFSET` naming that chunk's offset.
    #[test]
    fn a_failed_read_chunk_is_reported_with_its_offset() {
        let mut d = Driver::new(16, 16, 100_000, 100_000, vec![0]);
        *d.session = Session::new(7, ConnectionConfig::default());
        let mut hs = super::super::fake::go_handshake();
        let mut sr = IHAVEOPT.to_be_bytes().to_vec();
        sr.extend(OPT_STRUCTURED_REPLY.to_be_bytes());
        sr.extend(0u32.to_be_bytes());
        hs.splice(4..4, sr);
        d.out.clear();
        d.run(&hs, |out| out.len() >= 18 + 20 + 32 + 34 + 20);
        d.out.clear();
        d.fake.bad_byte = Some(8192 + 2 * CHUNK as u64 + 100);
        d.run(&request(CMD_READ, 9, 8192, 8 * CHUNK as u32), |out| {
            out.len() >= 20
        });
        let message = b"I/O error";
        let mut want = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        want.extend(REPLY_FLAG_DONE.to_be_bytes());
        want.extend(REPLY_TYPE_ERROR_OFFSET.to_be_bytes());
        want.extend(9u64.to_be_bytes());
        want.extend((6 + message.len() as u32 + 8).to_be_bytes());
        want.extend((Errno::Io as u32).to_be_bytes());
        want.extend((message.len() as u16).to_be_bytes());
        want.extend(message);
        want.extend((8192 + 2 * CHUNK as u64).to_be_bytes());
        d.run(&[], |out| out.len() >= want.len());
        assert_eq!(d.out, want);
        d.idle_checks();
    }

    #[test]
    fn a_read_waits_for_all_its_buffers() {
        // 16 chunks needed, 15 buffers: the read never starts (the export advertises at most
        // what the pool can hold; this checks it does not start half-way).
        let mut d = Driver::new(15, 8, 4096, 4096, vec![1]);
        let msg = request(CMD_READ, 1, 0, 64 * 1024);
        let taken = d.session.on_receive(&mut d.fake, &msg).unwrap();
        assert_eq!(taken, msg.len());
        d.session.step(&mut d.fake);
        assert!(d.fake.in_flight.is_empty());
        assert_eq!(d.fake.free.len(), 15);
        // A smaller one goes.
        let (error, data) = d.one(&request(CMD_READ, 2, 0, 60 * 1024), 60 * 1024);
        assert_eq!((error, data.len()), (0, 60 * 1024));
    }

    #[test]
    fn a_failed_write_chunk_fails_the_request_and_returns_every_buffer() {
        let mut d = Driver::new(4, 2, 3000, 5000, vec![1, 4, 2]);
        d.fake.bad_byte = Some(20_000);
        let mut msg = request(CMD_WRITE, 1, 0, 64 * 1024);
        msg.extend(vec![0xee; 64 * 1024]);
        assert_eq!(d.one(&msg, 0).0, Errno::Io as u32);
        d.idle_checks();
        d.fake.bad_byte = None;
        let mut msg = request(CMD_WRITE, 2, 0, 8192);
        msg.extend(vec![0x11; 8192]);
        assert_eq!(d.one(&msg, 0).0, 0);
        assert!(d.fake.disk[..8192].iter().all(|&b| b == 0x11));
        d.idle_checks();
    }

    #[test]
    fn a_dead_session_still_collects_its_io() {
        let mut d = Driver::new(16, 16, 100_000, 100_000, vec![0]);
        let mut msg = request(CMD_READ, 1, 0, 32 * 1024);
        msg.extend(request(CMD_WRITE, 2, 0, 4096));
        msg.extend(vec![1; 4096]);
        d.session.on_receive(&mut d.fake, &msg).unwrap();
        d.session.step(&mut d.fake);
        assert!(d.session.in_device() > 0);
        d.session.kill();
        assert!(d.session.should_close() && !d.session.can_free());
        while d.fake.complete_one(&mut d.session, 0) {}
        assert!(d.session.can_free());
        d.session.release_all(&mut d.fake);
        assert_eq!(d.fake.free.len(), d.fake.total);
    }

    #[test]
    fn many_requests_in_flight_at_once() {
        let mut d = Driver::new(40, 6, 5000, 3000, vec![5, 1, 7, 2, 8, 4]);
        let before = d.fake.disk.clone();
        let mut msg = Vec::new();
        let mut expected = std::collections::HashMap::new();
        for i in 0..12u64 {
            // Even cookies write 12 KiB at i * 16 KiB; odd ones read 20 KiB from 192 KiB on.
            if i % 2 == 0 {
                msg.extend(request(CMD_WRITE, i, i * 16384, 12288));
                msg.extend(vec![i as u8; 12288]);
                expected.insert(i, 0usize);
            } else {
                let at = 196608 + i * 4096;
                msg.extend(request(CMD_READ, i, at, 20480));
                expected.insert(i, 20480);
            }
        }
        let total: usize = expected.values().map(|n| 16 + n).sum();
        d.out.clear();
        d.run(&msg, |out| out.len() >= total);
        assert_eq!(d.out.len(), total);
        let mut rest = &d.out[..];
        let mut seen = Vec::new();
        while !rest.is_empty() {
            assert_eq!(be32(rest, 0), SIMPLE_REPLY_MAGIC);
            assert_eq!(be32(rest, 4), 0);
            let cookie = be64(rest, 8);
            let n = expected[&cookie];
            if n > 0 {
                let at = (196608 + cookie * 4096) as usize;
                assert!(rest[16..16 + n] == before[at..at + n], "read {cookie}");
            }
            seen.push(cookie);
            rest = &rest[16 + n..];
        }
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
        for i in (0..12u64).step_by(2) {
            let at = (i * 16384) as usize;
            assert!(d.fake.disk[at..at + 12288].iter().all(|&b| b == i as u8));
        }
        d.idle_checks();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Pipelined requests, valid and not, with write payloads, all sent at once over a
        /// small pool and a shallow queue: every request gets exactly one reply, no request id
        /// is used twice at a time (the fake checks), and at the end nothing is in a device
        /// and every buffer is back.
        #[test]
        fn pipelined_requests_all_answered_nothing_leaks(
            ops in proptest::collection::vec(
                (0u16..7, prop_oneof![0u64..600, Just(u64::MAX / 512)], prop_oneof![1u32..=64, Just(0u32), Just(4097)], any::<bool>()),
                1..40,
            ),
            buffers in 16usize..40,
            depth in 1usize..10,
            chop in 1usize..20_000,
            window in 1usize..20_000,
            picks in proptest::collection::vec(0usize..100, 1..10),
        ) {
            let mut d = Driver::new(buffers, depth, chop, window, picks);
            let mut msg = Vec::new();
            let mut read_lengths = std::collections::HashMap::new();
            for (i, (command, block, blocks, fua)) in ops.iter().enumerate() {
                let (offset, len) = (block.wrapping_mul(512), blocks.wrapping_mul(512));
                let flags = if *fua { CMD_FLAG_FUA } else { 0 };
                let cookie = i as u64;
                // 5: WRITE_ZEROES, 6: BLOCK_STATUS (unknown here)
                let command = match *command { 5 => CMD_WRITE_ZEROES, 6 => 7, c => c };
                if command == CMD_DISC {
                    continue;
                }
                msg.extend(request(command, cookie, offset, len));
                let at = msg.len() - 24;
                msg[at..at + 2].copy_from_slice(&flags.to_be_bytes());
                if command == CMD_WRITE && len <= 1 << 25 {
                    msg.extend((0..len).map(|x| x as u8));
                }
                let valid_read = command == CMD_READ
                    && len > 0
                    && len <= (MAX_CHUNKS * CHUNK) as u32
                    && offset.checked_add(u64::from(len)).is_some_and(|e| e <= DISK as u64);
                read_lengths.insert(cookie, if valid_read { len as usize } else { 0 });
            }
            let expected = read_lengths.len();
            msg.extend(request(CMD_DISC, 999, 0, 0));
            d.out.clear();
            let lengths = read_lengths.clone();
            d.run(&msg, move |out| {
                // Done when every reply is in.
                let mut rest = out;
                let mut n = 0;
                while rest.len() >= 16 {
                    let error = be32(rest, 4);
                    let len = if error == 0 { lengths.get(&be64(rest, 8)).copied().unwrap_or(0) } else { 0 };
                    if rest.len() < 16 + len {
                        break;
                    }
                    rest = &rest[16 + len..];
                    n += 1;
                }
                n == expected
            });
            // Drain, then the session is finished and clean.
            for _ in 0..1000 {
                if d.session.should_close() {
                    break;
                }
                d.run(&[], |_| true);
                d.fake.complete_one(&mut d.session, 0);
                d.session.step(&mut d.fake);
            }
            prop_assert!(d.session.should_close());
            prop_assert_eq!(d.session.in_device(), 0);
            d.session.kill();
            d.session.release_all(&mut d.fake);
            prop_assert_eq!(d.fake.free.len(), d.fake.total);
            let mut seen: Vec<u64> = Vec::new();
            let mut rest = &d.out[..];
            while !rest.is_empty() {
                prop_assert_eq!(be32(rest, 0), SIMPLE_REPLY_MAGIC);
                let error = be32(rest, 4);
                let cookie = be64(rest, 8);
                let len = if error == 0 { read_lengths[&cookie] } else { 0 };
                seen.push(cookie);
                rest = &rest[16 + len..];
            }
            seen.sort();
            let mut want: Vec<u64> = read_lengths.keys().copied().collect();
            want.sort();
            prop_assert_eq!(seen, want);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Serial requests with random sizes over a small pool, a shallow queue, arbitrary
        /// completion order, input chopping and socket windows: every reply is right, the
        /// disk matches a model, every buffer comes back.
        #[test]
        fn session_matches_a_model(
            ops in proptest::collection::vec((0u8..5, 0u64..400, 1u32..=32), 1..12),
            buffers in 16usize..24,
            depth in 1usize..6,
            chop in 1usize..9000,
            window in 1usize..9000,
            picks in proptest::collection::vec(0usize..100, 1..10),
        ) {
            let mut d = Driver::new(buffers, depth, chop, window, picks);
            let mut model = d.fake.disk.clone();
            for (i, (kind, block, blocks)) in ops.into_iter().enumerate() {
                let offset = (block * 512).min(DISK as u64 - u64::from(blocks) * 512);
                let len = blocks * 512 * 4; // up to 64 KiB: 16 chunks
                let len = len.min((DISK as u64 - offset) as u32);
                let cookie = i as u64;
                match kind {
                    0 => {
                        let (error, data) = d.one(&request(CMD_READ, cookie, offset, len), len as usize);
                        prop_assert_eq!(error, 0);
                        prop_assert!(data == model[offset as usize..offset as usize + len as usize]);
                    }
                    1 => {
                        let payload: Vec<u8> = (0..len).map(|x| (x as u8) ^ (i as u8)).collect();
                        let mut msg = request(CMD_WRITE, cookie, offset, len);
                        msg.extend_from_slice(&payload);
                        prop_assert_eq!(d.one(&msg, 0).0, 0);
                        model[offset as usize..offset as usize + len as usize].copy_from_slice(&payload);
                    }
                    2 => prop_assert_eq!(d.one(&request(CMD_FLUSH, cookie, 0, 0), 0).0, 0),
                    3 => {
                        // Up to 128 KiB: more chunks than one request's buffers.
                        let len = (len * 2).min((DISK as u64 - offset) as u32);
                        prop_assert_eq!(d.one(&request(CMD_WRITE_ZEROES, cookie, offset, len), 0).0, 0);
                        model[offset as usize..offset as usize + len as usize].fill(0);
                    }
                    _ => prop_assert_eq!(d.one(&request(CMD_TRIM, cookie, offset, len), 0).0, 0),
                }
            }
            d.idle_checks();
            prop_assert!(d.fake.disk == model);
        }
    }
}
