//! The NBD server's volumes: the volume layer (`volume::Volumes`) as an [`nbd::Backend`]. Every volume is an export:
//! devices by name (`vda`, `nvme0n1`; not a device holding a COW store an engine serves,
//! which only the engine may write; a device holding a store found at boot and not served
//! is exported read-only) and active snapshots by name.
//!
//! An export handle names a stable identity ([`ExportId`]: a device, or one snapshot
//! instance); the server routes every request by that identity's role at the moment it is
//! submitted (`nbd::route`, over the [`Roles`] of [`StorageBackend`] below), and this backend sends
//! it where the route says: a device, an origin's engine, or a snapshot of it.
//!
//! Device tags: the server's [`RequestId`] travels in the tag of each device request as the
//! payload of the NBD completion port (`volume::port::Port::Nbd`, [`tag`]); the volume
//! layer's completion path hands those completions to the main loop's NBD port, which calls
//! [`complete`], which gives the server its id back ([`untag`]). Which bits name the port
//! is `volume::port`'s alone. NBD I/O is submitted with `Volumes::submit_nbd`, which does not count in
//! `Volumes::task_ios` (console tasks and NBD clients run side by side) but counts writes
//! sent straight to a device, which `snapshot create` waits for.

use drivers::block::{BlockError, BlockRequest, BufferPool, Completion, DmaBuf};
use nbd::route::{DeviceRole, SnapRole};
use nbd::session::MAX_CHUNKS;
use nbd::{
    Backend, BackendOp, Errno, ExportCatalog, ExportId, ExportInfo, ExportName, IoBuffer,
    RequestId, Roles, Route, SubmitError,
};

use volume::origin::{Origin, Snap, SnapState};
use volume::port::{Port, PAYLOAD_BITS};
use volume::{Target, Volumes};

use super::Server;

const _: () = assert!(
    RequestId::BITS <= PAYLOAD_BITS,
    "a request id fits in the NBD port's payload"
);

/// The device tag of the server's request `id`.
pub fn tag(id: RequestId) -> u64 {
    Port::Nbd(id.to_bits()).tag()
}

/// The server's request id in an NBD tag; `None` for anybody else's tag.
pub fn untag(tag: u64) -> Option<RequestId> {
    match Port::of(tag) {
        Some(Port::Nbd(bits)) => RequestId::from_bits(bits),
        _ => None,
    }
}

/// A DMA buffer as the NBD sessions hold it.
pub struct NbdBuf(pub DmaBuf);

impl IoBuffer for NbdBuf {
    fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
    fn set_len(&mut self, len: usize) -> bool {
        self.0.set_len(len).is_ok()
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

/// The NBD port of the completion path: a completion of NBD I/O goes to `server` by its
/// request id.
pub fn complete(server: &mut Server, pool: &mut BufferPool, completion: Completion) {
    let result = completion.result.map_err(errno);
    let mut buffer = completion.buffer.map(NbdBuf);
    let mut release = |b: NbdBuf| {
        let _ = pool.release(b.0);
    };
    match untag(completion.tag) {
        Some(id) => server.complete(id, result, buffer.take(), &mut release),
        None => log::error!("nbd: completion for unknown tag {:#x}", completion.tag),
    }
    if let Some(b) = buffer {
        release(b);
    }
}

/// The volumes (`volume::Volumes`) as the server's volumes and export catalog.
pub struct StorageBackend<'a>(pub &'a mut Volumes);

/// Where a route goes in the volumes.
fn target(to: Route) -> Target {
    match to {
        Route::Device(d) => Target::Device(d),
        Route::Origin(origin) => Target::Volume {
            origin,
            volume: snapshot::Volume::Origin,
        },
        Route::Snapshot { origin, slot } => Target::Volume {
            origin,
            volume: snapshot::Volume::Snapshot(snapshot::SnapId(slot)),
        },
    }
}

/// The name of the volume an export handle names now, for the console: a device's name, a
/// snapshot's name, or `None` once the snapshot is gone.
pub fn volume_name(st: &Volumes, handle: u64) -> Option<ExportName> {
    match ExportId::from_handle(handle)? {
        ExportId::Device { disk } => {
            let disk = usize::from(disk);
            (disk < st.devices.len())
                .then(|| ExportName::from_str_truncated(st.name(disk).as_str()))
        }
        ExportId::Snapshot { instance, .. } => st
            .origins
            .iter()
            .flat_map(|o| o.snaps.iter())
            .find(|s| s.instance == instance)
            .map(|s| ExportName::from_str_truncated(&s.name)),
    }
}

impl StorageBackend<'_> {
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

    /// The origin and the snapshot `key` (an instance number) names for the
    /// `snapfw:changed:` context of `export`, looked up now: a snapshot of the device an
    /// origin export names, or the snapshot export itself; active (an invalidated snapshot's
    /// table no longer follows the origin, a merging one's empties). `EIO` otherwise.
    fn changed_snap(&self, export: &ExportInfo, key: u32) -> Result<(&Origin, &Snap), Errno> {
        let st = &*self.0;
        let (o, s) = st
            .origins
            .iter()
            .find_map(|o| o.snaps.iter().find(|s| s.instance == key).map(|s| (o, s)))
            .ok_or(Errno::Io)?;
        let related = match ExportId::from_handle(export.handle) {
            Some(ExportId::Device { disk }) => o.disk == usize::from(disk),
            Some(ExportId::Snapshot { instance, .. }) => instance == key,
            None => false,
        };
        if !related || s.state != SnapState::Active {
            return Err(Errno::Io);
        }
        Ok((o, s))
    }

    /// The snapshots whose `snapfw:changed:` context `export` offers: an origin's active
    /// snapshots, or an active snapshot itself.
    fn changed_snaps<'s>(&'s self, export: &ExportInfo) -> impl Iterator<Item = &'s Snap> + 's {
        let st = &*self.0;
        let id = ExportId::from_handle(export.handle);
        st.origins
            .iter()
            .flat_map(move |o| o.snaps.iter().map(move |s| (o, s)))
            .filter(move |(o, s)| {
                s.state == SnapState::Active
                    && match id {
                        Some(ExportId::Device { disk }) => o.disk == usize::from(disk),
                        Some(ExportId::Snapshot { instance, .. }) => s.instance == instance,
                        None => false,
                    }
            })
            .map(|(_, s)| s)
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

/// The roles NBD requests are routed by, as they are now (looked up per request).
impl Roles for StorageBackend<'_> {
    fn device_role(&self, disk: usize) -> DeviceRole {
        let st = &*self.0;
        if disk >= st.devices.len() {
            return DeviceRole::Missing;
        }
        if st.holds_store(disk) {
            return DeviceRole::Store;
        }
        match st
            .origins
            .iter()
            .position(|o| o.disk == disk && (o.creating || !o.snaps.is_empty()))
        {
            Some(origin) => DeviceRole::Origin(origin),
            None => DeviceRole::Plain,
        }
    }

    fn snapshot_role(&self, instance: u32) -> Option<SnapRole> {
        self.0.origins.iter().enumerate().find_map(|(origin, o)| {
            o.snaps
                .iter()
                .find(|s| s.instance == instance)
                .map(|s| SnapRole {
                    origin,
                    disk: o.disk,
                    slot: s.id.0,
                    serving: s.serving(),
                })
        })
    }
}

impl ExportCatalog for StorageBackend<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return None;
        }
        let st = &*self.0;
        // The handle names what stays the same (the device, or this one snapshot); where
        // its requests go is decided per request (`nbd::route`).
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
        let max_payload = (chunk * chunks).min(u64::from(nbd::server::MAX_PAYLOAD)) as u32;
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
            // Every connection to an export is routed alike, request by request, and a
            // flush is volume-wide: on a device it flushes the device's cache; through an
            // engine an origin's flush flushes the origin device (its writes complete only
            // after their copies are committed to every store) and a snapshot's flushes its
            // COW device (a write to a new chunk completes only after its exception is
            // committed). So a flush covers the writes completed on every connection.
            multi_conn: true,
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
            ExportId::Device { disk } => match self.device_role(usize::from(disk)) {
                DeviceRole::Origin(_) => "origin of snapshots",
                DeviceRole::Store => "holds a COW store (read-only)",
                _ => st.devices.get(usize::from(disk)).map(|d| d.info().driver)?,
            },
        };
        Some(ExportName::from_str_truncated(text))
    }

    fn changed_snapshot(&self, export: &ExportInfo, index: usize) -> Option<ExportName> {
        self.changed_snaps(export)
            .nth(index)
            .map(|s| ExportName::from_str_truncated(&s.name))
    }

    fn changed_key(&self, export: &ExportInfo, name: &str) -> Option<u32> {
        self.changed_snaps(export)
            .find(|s| s.name == name)
            .map(|s| s.instance)
    }

    fn changed_chunk_bytes(&self, export: &ExportInfo, key: u32) -> Result<u64, Errno> {
        let (_, s) = self.changed_snap(export, key)?;
        Ok(u64::from(s.chunk_sectors) * snapshot::format::SECTOR_BYTES as u64)
    }

    fn changed_chunks(
        &self,
        export: &ExportInfo,
        key: u32,
        first: u64,
        count: u64,
        each: &mut dyn FnMut(bool) -> bool,
    ) -> Result<(), Errno> {
        let (o, s) = self.changed_snap(export, key)?;
        for chunk in first..first.saturating_add(count) {
            let changed = o.engine.has_exception(s.id, chunk).ok_or(Errno::Io)?;
            if !each(changed) {
                break;
            }
        }
        Ok(())
    }
}

impl Backend for StorageBackend<'_> {
    type Buf = NbdBuf;

    fn chunk_bytes(&self, export: u64) -> usize {
        let block = self.block_size(export) as usize;
        self.0
            .pools
            .get(self.disk(export))
            .map_or(block, |p| p.buffer_size() / block * block)
    }

    fn max_discard_bytes(&mut self, export: u64, to: Route) -> u64 {
        // Only a device of its own discards; through an engine a trim is a hint the
        // session answers without discarding.
        let Route::Device(_) = to else {
            return 0;
        };
        let g = self.0.geometry(target(to));
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

    fn acquire(&mut self, export: u64) -> Option<NbdBuf> {
        let disk = self.disk(export);
        self.0.pools.get_mut(disk)?.acquire().map(NbdBuf)
    }

    fn release(&mut self, export: u64, buffer: NbdBuf) {
        let disk = self.disk(export);
        if let Some(pool) = self.0.pools.get_mut(disk) {
            // Every buffer came from this pool.
            let _ = pool.release(buffer.0);
        }
    }

    fn submit(
        &mut self,
        export: u64,
        to: Route,
        id: RequestId,
        op: BackendOp,
        buffer: Option<NbdBuf>,
    ) -> Result<(), (SubmitError, Option<NbdBuf>)> {
        let block = self.block_size(export);
        let tag = tag(id);
        let request = match (op, buffer) {
            (BackendOp::Read { offset }, Some(b)) => BlockRequest::read(tag, offset / block, b.0),
            (BackendOp::Write { offset, fua }, Some(b)) => {
                BlockRequest::write(tag, offset / block, b.0, fua)
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
        self.0.submit_nbd(target(to), request).map_err(|(e, b)| {
            let why = match e {
                BlockError::QueueFull => SubmitError::Busy,
                e => SubmitError::Failed(errno(e)),
            };
            (why, b.map(NbdBuf))
        })
    }

    fn volume_name(&self, export: u64) -> Option<ExportName> {
        volume_name(self.0, export)
    }
}
