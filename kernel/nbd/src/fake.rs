//! A fake [`Backend`] for sessions and the server on the host: a RAM disk (export `d`, device
//! 0; more devices can be added as regions of the same RAM) and snapshots of device 0 (each
//! with its own RAM copy) behind a small buffer pool and a device queue that can be full or
//! fail, with completions in any order the caller picks.
//! The roles of the device and of each snapshot are set by the test and looked up by every
//! submission, as the kernel's are. It checks what the kernel's backend cannot: no
//! [`RequestId`] is in use twice at a time, no buffer comes back twice, every request lies
//! on its volume. Used by the session's and the server's tests, by the `nbd_session` fuzz
//! target ([`crate::fuzz::nbd_session`]) and, with several devices, by the interop test
//! against real clients (`tests/tests/nbd_interop.rs`).

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::export::{ExportCatalog, ExportInfo, ExportName};
use super::proto::{Errno, IHAVEOPT, INFO_BLOCK_SIZE, OPT_GO, REQUEST_MAGIC};
use super::route::{self, ExportId, Route};
use super::session::{Backend, BackendOp, IoBuffer, RequestId, Session, SubmitError, MAX_CHUNKS};

/// Bytes per pool buffer (one chunk of a request) of [`Fake::new`].
pub const CHUNK: usize = 4096;
/// Bytes of [`Fake::new`]'s disk (export `d`).
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
    go_handshake_for("d")
}

/// A client's side of the handshake for export `name`: fixed newstyle flags, then
/// `NBD_OPT_GO` asking for block sizes.
pub fn go_handshake_for(name: &str) -> Vec<u8> {
    let mut m = 3u32.to_be_bytes().to_vec();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(4 + name.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(&(name.len() as u32).to_be_bytes());
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    m
}

/// A pool buffer (of [`Fake::chunk`] bytes in [`Fake`]'s pool).
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

/// A snapshot of the fake disk: its own RAM copy, found by name at the handshake and by
/// instance number per request.
#[derive(Debug)]
pub struct Snap {
    /// The export name.
    pub name: String,
    /// Unique, never reused (as the kernel's).
    pub instance: u32,
    /// Its slot in the origin's engine (a later snapshot may reuse it).
    pub slot: u16,
    /// Active (not being created, merged or deleted).
    pub serving: bool,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// One device request in flight.
#[derive(Debug)]
pub struct InFlight {
    /// The server's id, handed back with the completion.
    pub id: RequestId,
    /// What it does.
    pub op: BackendOp,
    /// Where it went.
    pub to: Route,
    /// Its buffer.
    pub buffer: Option<Buf>,
}

/// A device: a region of [`Fake::disk`], exported under its name.
#[derive(Clone, Debug)]
pub struct Device {
    /// The export name.
    pub name: String,
    /// Where its bytes start in [`Fake::disk`].
    pub start: usize,
    /// What the catalog answers (the handle is this device's).
    pub info: ExportInfo,
    /// What the catalog describes it as, if anything.
    pub description: Option<String>,
}

/// A RAM disk and its snapshots behind a small pool and a queue that can be full or fail.
pub struct Fake {
    /// The bytes of every device, one after the other (device 0 first).
    pub disk: Vec<u8>,
    /// The devices, device `i` being `devices[i]`.
    pub devices: Vec<Device>,
    /// Bytes per pool buffer.
    pub chunk: usize,
    /// The largest discard one request to a device takes.
    pub max_discard: u64,
    /// Snapshots (deleted ones are removed; their instance numbers are never reused).
    pub snaps: Vec<Snap>,
    /// The last instance number given.
    pub instances: u32,
    /// Free pool buffers.
    pub free: Vec<Buf>,
    /// Pool buffers in all.
    pub total: usize,
    /// Device requests in flight.
    pub in_flight: Vec<InFlight>,
    /// Requests the queue takes at once.
    pub queue_depth: usize,
    /// Reads and writes touching this byte fail.
    pub bad_byte: Option<u64>,
    /// Flushes completed.
    pub flushes: usize,
    /// Discards completed.
    pub discards: usize,
    /// The connection number every id must carry ([`Fake::complete_one`]).
    pub connection: u8,
    /// What device 0 is now (looked up by every submission, as the kernel does); the other
    /// devices are plain.
    pub role: route::DeviceRole,
    /// Where each submission went.
    pub routes: Vec<Route>,
}

impl route::Roles for Fake {
    fn device_role(&self, disk: usize) -> route::DeviceRole {
        match disk {
            0 => self.role,
            d if d < self.devices.len() => route::DeviceRole::Plain,
            _ => route::DeviceRole::Missing,
        }
    }
    fn snapshot_role(&self, instance: u32) -> Option<route::SnapRole> {
        self.snaps
            .iter()
            .find(|s| s.instance == instance)
            .map(|s| route::SnapRole {
                origin: 0,
                disk: 0,
                slot: s.slot,
                serving: s.serving,
            })
    }
}

impl Fake {
    /// Device `d`, a 256 KiB disk with a pattern and 512-byte blocks; `buffers` pool buffers
    /// of 4 KiB, a queue `queue_depth` deep, 64 KiB discards; ids of connection 7.
    pub fn new(buffers: usize, queue_depth: usize) -> Fake {
        let mut fake = Fake::without_devices(buffers, queue_depth, CHUNK);
        let pattern: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
        fake.add_device("d", &pattern, 512, false);
        fake.max_discard = 64 * 1024;
        fake
    }

    /// No devices yet ([`Fake::add_device`]): `buffers` pool buffers of `chunk` bytes, a
    /// queue `queue_depth` deep, discards of up to 1 GiB; ids of connection 7.
    pub fn without_devices(buffers: usize, queue_depth: usize, chunk: usize) -> Fake {
        Fake {
            disk: Vec::new(),
            devices: Vec::new(),
            chunk,
            max_discard: 1 << 30,
            snaps: Vec::new(),
            instances: 0,
            free: (0..buffers).map(|_| Buf::new(chunk)).collect(),
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

    /// Adds the next device, exported as `name` and holding `bytes`, with flush and FUA, and
    /// trim unless `read_only`; its maximum payload is what [`MAX_CHUNKS`] buffers hold.
    pub fn add_device(
        &mut self,
        name: &str,
        bytes: &[u8],
        block_size: u32,
        read_only: bool,
    ) -> &mut Device {
        let disk = u16::try_from(self.devices.len()).expect("a device index");
        let start = self.disk.len();
        self.disk.extend_from_slice(bytes);
        self.devices.push(Device {
            name: String::from(name),
            start,
            info: ExportInfo {
                handle: ExportId::Device { disk }.handle(),
                size: bytes.len() as u64,
                block_size,
                read_only,
                flush: true,
                fua: true,
                trim: !read_only,
                multi_conn: true,
                max_payload: (MAX_CHUNKS * self.chunk) as u32,
            },
            description: None,
        });
        self.devices.last_mut().expect("just added")
    }

    /// The bytes of device `name`.
    pub fn device_bytes(&self, name: &str) -> &[u8] {
        let d = self
            .devices
            .iter()
            .find(|d| d.name == name)
            .expect("a device of this name");
        &self.disk[d.start..d.start + d.info.size as usize]
    }

    /// Device 0's region of [`Fake::disk`].
    fn first_device(&self) -> core::ops::Range<usize> {
        let d = &self.devices[0];
        d.start..d.start + d.info.size as usize
    }

    /// `snapshot create`: a snapshot `name` of device 0 as it is now, in engine slot `slot`,
    /// with a new instance number (the device becomes an origin).
    pub fn create_snapshot(&mut self, name: &str, slot: u16) -> u32 {
        self.instances += 1;
        let instance = self.instances;
        self.snaps.push(Snap {
            name: String::from(name),
            instance,
            slot,
            serving: true,
            data: self.disk[self.first_device()].to_vec(),
        });
        self.role = route::DeviceRole::Origin(0);
        instance
    }

    /// `snapshot delete`: the snapshot called `name` is gone (the disk is plain again when
    /// it was the last).
    pub fn delete_snapshot(&mut self, name: &str) {
        self.snaps.retain(|s| s.name != name);
        if self.snaps.is_empty() && matches!(self.role, route::DeviceRole::Origin(_)) {
            self.role = route::DeviceRole::Plain;
        }
    }

    /// The bytes of the volume a request went to.
    fn volume(&mut self, to: Route) -> &mut [u8] {
        match to {
            Route::Device(d) => {
                let d = &self.devices[d];
                &mut self.disk[d.start..d.start + d.info.size as usize]
            }
            Route::Origin(_) => {
                let first = self.first_device();
                &mut self.disk[first]
            }
            Route::Snapshot { slot, .. } => {
                let snap = self
                    .snaps
                    .iter_mut()
                    .find(|s| s.slot == slot && s.serving)
                    .expect("a request routed to a snapshot that is not served");
                &mut snap.data
            }
        }
    }

    /// Runs in-flight request number `pick` (modulo) as a device would and returns its
    /// completion: the id it was submitted with, the result and the buffer.
    pub fn finish_one(
        &mut self,
        pick: usize,
    ) -> Option<(RequestId, Result<(), Errno>, Option<Buf>)> {
        if self.in_flight.is_empty() {
            return None;
        }
        let InFlight {
            id,
            op,
            to,
            mut buffer,
        } = self.in_flight.remove(pick % self.in_flight.len());
        let mut result = Ok(());
        let bad_byte = self.bad_byte;
        match (op, buffer.as_mut()) {
            (BackendOp::Read { offset }, Some(b)) => {
                let o = offset as usize;
                let n = b.len;
                if bad_byte.is_some_and(|x| (o as u64..(o + n) as u64).contains(&x)) {
                    result = Err(Errno::Io);
                } else {
                    b.data[..n].copy_from_slice(&self.volume(to)[o..o + n]);
                }
            }
            (BackendOp::Write { offset, .. }, Some(b)) => {
                let o = offset as usize;
                if bad_byte.is_some_and(|x| (o as u64..(o + b.len) as u64).contains(&x)) {
                    result = Err(Errno::Io);
                } else {
                    self.volume(to)[o..o + b.len].copy_from_slice(&b.data[..b.len]);
                }
            }
            (BackendOp::Flush, None) => self.flushes += 1,
            (BackendOp::Discard { .. }, None) => self.discards += 1,
            other => panic!("bad request {other:?}"),
        }
        Some((id, result, buffer))
    }

    /// Runs the request sent last of those in flight (see [`Fake::finish_one`]).
    pub fn finish_newest(&mut self) -> Option<(RequestId, Result<(), Errno>, Option<Buf>)> {
        self.finish_one(self.in_flight.len().checked_sub(1)?)
    }

    /// Completes in-flight request number `pick` (modulo) into `session`, as a device would.
    pub fn complete_one(&mut self, session: &mut Session<Buf>, pick: usize) -> bool {
        let Some((id, result, buffer)) = self.finish_one(pick) else {
            return false;
        };
        assert_eq!(id.connection, self.connection);
        let free = &mut self.free;
        session.on_completion(id.slot, id.chunk, result, buffer, &mut |b| free.push(b));
        true
    }
}

impl Backend for Fake {
    type Buf = Buf;
    fn chunk_bytes(&self, _: u64) -> usize {
        self.chunk
    }
    fn max_discard_bytes(&mut self, _: u64, to: Route) -> u64 {
        match to {
            Route::Device(_) => self.max_discard,
            _ => 0,
        }
    }
    fn available(&mut self, _: u64) -> usize {
        self.free.len()
    }
    fn acquire(&mut self, _: u64) -> Option<Buf> {
        let mut b = self.free.pop()?;
        b.len = self.chunk;
        Some(b)
    }
    fn release(&mut self, _: u64, b: Buf) {
        assert!(self.free.len() < self.total, "a buffer released twice");
        self.free.push(b);
    }
    fn submit(
        &mut self,
        export: u64,
        to: Route,
        id: RequestId,
        op: BackendOp,
        buffer: Option<Buf>,
    ) -> Result<(), (SubmitError, Option<Buf>)> {
        let writes = matches!(op, BackendOp::Write { .. } | BackendOp::Discard { .. });
        let export = ExportId::from_handle(export).expect("a handle from lookup");
        assert_eq!(
            route::route(export, writes, &*self),
            Ok(to),
            "submitted where the export's role does not lead now"
        );
        if self.in_flight.len() >= self.queue_depth {
            return Err((SubmitError::Busy, buffer));
        }
        self.routes.push(to);
        assert!(
            self.in_flight.iter().all(|r| r.id != id),
            "request id {id:?} in use twice"
        );
        let len = match (op, &buffer) {
            (BackendOp::Read { offset } | BackendOp::Write { offset, .. }, Some(b)) => {
                Some((offset, b.len as u64))
            }
            (BackendOp::Discard { offset, len }, None) => Some((offset, len)),
            (BackendOp::Flush, None) => None,
            other => panic!("bad request {other:?}"),
        };
        let size = match to {
            Route::Device(d) => self.devices[d].info.size,
            Route::Origin(_) | Route::Snapshot { .. } => self.devices[0].info.size,
        };
        if let Some((offset, len)) = len {
            assert!(
                offset.checked_add(len).is_some_and(|end| end <= size),
                "{op:?} of {len} bytes past the end of the volume"
            );
        }
        self.in_flight.push(InFlight { id, op, to, buffer });
        Ok(())
    }
    fn volume_name(&self, export: u64) -> Option<ExportName> {
        match ExportId::from_handle(export)? {
            ExportId::Device { disk } => self
                .devices
                .get(usize::from(disk))
                .map(|d| ExportName::from_str_truncated(&d.name)),
            ExportId::Snapshot { instance, .. } => self
                .snaps
                .iter()
                .find(|s| s.instance == instance)
                .map(|s| ExportName::from_str_truncated(&s.name)),
        }
    }
}

impl ExportCatalog for Fake {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if let Some(d) = self.devices.iter().find(|d| d.name == name) {
            return Some(d.info);
        }
        let s = self.snaps.iter().find(|s| s.name == name && s.serving)?;
        Some(ExportInfo {
            handle: ExportId::Snapshot {
                disk: 0,
                instance: s.instance,
            }
            .handle(),
            ..self.devices[0].info
        })
    }
    fn name(&self, index: usize) -> Option<ExportName> {
        let name = match self.devices.get(index) {
            Some(d) => &d.name,
            None => {
                &self
                    .snaps
                    .iter()
                    .filter(|s| s.serving)
                    .nth(index - self.devices.len())?
                    .name
            }
        };
        Some(ExportName::from_str_truncated(name))
    }
    fn description(&self, export: &ExportInfo) -> Option<ExportName> {
        let d = self
            .devices
            .iter()
            .find(|d| d.info.handle == export.handle)?;
        Some(ExportName::from_str_truncated(d.description.as_deref()?))
    }
}
