//! A fake [`Backend`] for sessions on the host: a RAM disk behind a small buffer pool and a
//! device queue that can be full or fail, with completions in any order the caller picks.
//! It checks what the kernel's backend cannot: no device tag is in use twice at a time, no
//! buffer comes back twice, every request lies on the disk. Used by the session's tests and
//! by the `nbd_session` fuzz target ([`crate::fuzz::nbd_session`]).

use alloc::vec;
use alloc::vec::Vec;

use super::export::{ExportCatalog, ExportInfo, ExportName};
use super::proto::{Errno, IHAVEOPT, INFO_BLOCK_SIZE, OPT_GO, REQUEST_MAGIC};
use super::route;
use super::session::{untag, Backend, BackendOp, IoBuffer, Session, SubmitError, MAX_CHUNKS};

/// Bytes per pool buffer (one chunk of a request).
pub const CHUNK: usize = 4096;
/// Bytes of the fake disk (export `d`).
pub const DISK: usize = 256 * 1024;

/// A client's request header (NBD "simple request"): magic, flags, command, cookie, offset,
/// length, big-endian.
pub fn request(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&command.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

/// A client's side of the handshake for export `d`: fixed newstyle flags, then `NBD_OPT_GO`
/// asking for block sizes.
pub fn go_handshake() -> Vec<u8> {
    let mut m = 3u32.to_be_bytes().to_vec();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&9u32.to_be_bytes());
    m.extend_from_slice(&1u32.to_be_bytes());
    m.extend_from_slice(b"d");
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    m
}

/// A pool buffer (of [`CHUNK`] bytes in [`Fake`]'s pool).
#[derive(Debug)]
pub struct Buf {
    data: Vec<u8>,
    len: usize,
}

impl Buf {
    /// A zeroed buffer of `size` bytes.
    pub fn new(size: usize) -> Buf {
        Buf {
            data: vec![0; size],
            len: size,
        }
    }
}

impl IoBuffer for Buf {
    fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
    fn set_len(&mut self, len: usize) -> bool {
        let ok = len <= self.data.len();
        if ok {
            self.len = len;
        }
        ok
    }
}

/// A RAM disk behind a small pool and a queue that can be full or fail.
pub struct Fake {
    /// The disk's bytes.
    pub disk: Vec<u8>,
    /// Free pool buffers.
    pub free: Vec<Buf>,
    /// Pool buffers in all.
    pub total: usize,
    /// Device requests in flight: tag, operation, buffer.
    pub in_flight: Vec<(u64, BackendOp, Option<Buf>)>,
    /// Requests the queue takes at once.
    pub queue_depth: usize,
    /// Writes touching this byte fail.
    pub bad_byte: Option<u64>,
    /// Flushes completed.
    pub flushes: usize,
    /// Discards completed.
    pub discards: usize,
    /// The connection number every tag must carry.
    pub connection: u8,
    /// What the export's device is now (looked up by every submission, as the kernel does),
    /// and where each submission went.
    pub role: route::DeviceRole,
    /// Where each submission went.
    pub routes: Vec<route::Route>,
}

impl route::Roles for Fake {
    fn device_role(&self, disk: usize) -> route::DeviceRole {
        if disk == 0 {
            self.role
        } else {
            route::DeviceRole::Missing
        }
    }
    fn snapshot_role(&self, _: u32) -> Option<route::SnapRole> {
        None
    }
}

impl Fake {
    /// A disk with a pattern, `buffers` pool buffers, a queue `queue_depth` deep; tags of
    /// connection 7.
    pub fn new(buffers: usize, queue_depth: usize) -> Fake {
        Fake {
            disk: (0..DISK).map(|i| (i % 251) as u8).collect(),
            free: (0..buffers).map(|_| Buf::new(CHUNK)).collect(),
            total: buffers,
            in_flight: Vec::new(),
            queue_depth,
            bad_byte: None,
            flushes: 0,
            discards: 0,
            connection: 7,
            role: route::DeviceRole::Plain,
            routes: Vec::new(),
        }
    }

    /// Completes in-flight request number `pick` (modulo), as a device would.
    pub fn complete_one(&mut self, session: &mut Session<Buf>, pick: usize) -> bool {
        if self.in_flight.is_empty() {
            return false;
        }
        let (tag, op, mut buf) = self.in_flight.remove(pick % self.in_flight.len());
        let mut result = Ok(());
        match (op, buf.as_mut()) {
            (BackendOp::Read { offset }, Some(b)) => {
                let o = offset as usize;
                let n = b.len;
                b.data[..n].copy_from_slice(&self.disk[o..o + n]);
            }
            (BackendOp::Write { offset, .. }, Some(b)) => {
                let o = offset as usize;
                if self
                    .bad_byte
                    .is_some_and(|x| (o as u64..(o + b.len) as u64).contains(&x))
                {
                    result = Err(Errno::Io);
                } else {
                    self.disk[o..o + b.len].copy_from_slice(&b.data[..b.len]);
                }
            }
            (BackendOp::Flush, None) => self.flushes += 1,
            (BackendOp::Discard { .. }, None) => self.discards += 1,
            other => panic!("bad request {other:?}"),
        }
        let (conn, slot, chunk) = untag(tag).expect("an NBD tag");
        assert_eq!(conn, self.connection);
        let free = &mut self.free;
        session.on_completion(slot, chunk, result, buf, &mut |b| free.push(b));
        true
    }
}

impl Backend for Fake {
    type Buf = Buf;
    fn chunk_bytes(&self, _: u64) -> usize {
        CHUNK
    }
    fn max_discard_bytes(&mut self, _: u64) -> u64 {
        64 * 1024
    }
    fn available(&mut self, _: u64) -> usize {
        self.free.len()
    }
    fn acquire(&mut self, _: u64) -> Option<Buf> {
        let mut b = self.free.pop()?;
        b.len = CHUNK;
        Some(b)
    }
    fn release(&mut self, _: u64, b: Buf) {
        assert!(self.free.len() < self.total, "a buffer released twice");
        self.free.push(b);
    }
    fn submit(
        &mut self,
        export: u64,
        tag: u64,
        op: BackendOp,
        buffer: Option<Buf>,
    ) -> Result<(), (SubmitError, Option<Buf>)> {
        let id = route::ExportId::from_handle(export).expect("a handle from lookup");
        let writes = matches!(op, BackendOp::Write { .. } | BackendOp::Discard { .. });
        let went = match route::route(id, writes, &*self) {
            Ok(r) => r,
            Err(e) => return Err((SubmitError::Failed(e), buffer)),
        };
        if self.in_flight.len() >= self.queue_depth {
            return Err((SubmitError::Busy, buffer));
        }
        self.routes.push(went);
        assert!(
            self.in_flight.iter().all(|(t, ..)| *t != tag),
            "tag {tag:#x} in use twice"
        );
        let len = match (op, &buffer) {
            (BackendOp::Read { offset } | BackendOp::Write { offset, .. }, Some(b)) => {
                Some((offset, b.len as u64))
            }
            (BackendOp::Discard { offset, len }, None) => Some((offset, len)),
            (BackendOp::Flush, None) => None,
            other => panic!("bad request {other:?}"),
        };
        if let Some((offset, len)) = len {
            assert!(
                offset
                    .checked_add(len)
                    .is_some_and(|end| end <= DISK as u64),
                "{op:?} of {len} bytes past the end of the disk"
            );
        }
        self.in_flight.push((tag, op, buffer));
        Ok(())
    }
}

impl ExportCatalog for Fake {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "d").then_some(ExportInfo {
            handle: route::ExportId::Device { disk: 0 }.handle(),
            size: DISK as u64,
            block_size: 512,
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            max_payload: (MAX_CHUNKS * CHUNK) as u32,
        })
    }
    fn name(&self, index: usize) -> Option<ExportName> {
        (index == 0).then(|| ExportName::from_str_truncated("d"))
    }
}
