//! snapfw's volume layer: the appliance's block devices as volumes. A device with snapshots
//! is an [`origin::Origin`] served through its own `snapshot::Engine`; its snapshots are
//! volumes too. Console work runs as [`tasks::Task`]s (read, write, checksum, flush, bench;
//! snapshot create, delete, merge in [`snaptask`]; boot discovery and `snapshot attach` in
//! [`discover`]), and [`Volumes::poll`] is the completion path of the main loop.
//!
//! The crate has no `unsafe` and no hardware: it is given the devices as
//! `drivers::block::BlockDevice` trait objects and a [`Platform`] (a DMA allocator for the
//! buffer pools it sets up at runtime, and a clock), so the whole path runs on the host over
//! `drivers::block::RamDisk` and drivers' `FakeDma` (`cargo test -p volume`). PCI
//! enumeration, device probing, the interrupt registry and the NBD server stay in the kernel,
//! which owns a [`Volumes`] and calls into it.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod discover;
pub mod extents;
pub mod hexdump;
pub mod identity;
pub mod origin;
pub mod pattern;
pub mod port;
pub mod snaptask;
pub mod tasks;

use alloc::vec::Vec;

use drivers::block::{BlockError, BlockRequest, BufferPool, Completion, DmaBuf};
use drivers::hal::{DmaAllocator, HalError};
use drivers::info::DeviceName;
use drivers::service::BoxedDevice;

use port::Port;

/// Largest transfer the console tools, pools and bounce buffers use for virtio-blk (the
/// kernel sets its virtio-blk devices up with it).
pub const MAX_TRANSFER: usize = 128 * 1024;

/// What the volume layer needs of the machine: DMA memory for the buffer pools it sets up
/// after boot (an origin's bounce buffers), a monotonic clock and the wall clock.
#[derive(Clone, Copy)]
pub struct Platform {
    /// `BufferPool::new` on the platform's DMA allocator: (pool id, buffers, bytes each).
    pub buffer_pool: fn(u16, usize, usize) -> Result<BufferPool, HalError>,
    /// Nanoseconds since boot (monotonic).
    pub now_ns: fn() -> u64,
    /// Unix seconds now, if the machine knows the date (a new store's binding records it).
    pub unix_seconds: fn() -> Option<u64>,
}

impl Platform {
    /// The platform whose DMA memory comes from `A`, with clocks `now_ns` and
    /// `unix_seconds`.
    pub const fn new<A: DmaAllocator>(
        now_ns: fn() -> u64,
        unix_seconds: fn() -> Option<u64>,
    ) -> Platform {
        Platform {
            buffer_pool: BufferPool::new::<A>,
            now_ns,
            unix_seconds,
        }
    }
}

/// The most runs a snapshot's exception table may grow to: one per chunk of its store. The
/// same at `snapshot create` and at boot; the table starts empty and grows as it fills
/// (`snapshot::table`), so this bounds memory, it does not reserve it.
pub fn table_limit(cow_sectors: u64, chunk_sectors: u32) -> usize {
    (cow_sectors / u64::from(chunk_sectors.max(1))).clamp(1, usize::MAX as u64) as usize
}

/// Every disk with its DMA buffers, the origins with their engines, and what discovery
/// found.
pub struct Volumes {
    /// Working devices, in PCI order; the index is the device number interrupts carry.
    pub devices: Vec<BoxedDevice>,
    /// One pool per device: up to `queue_depth` buffers of the device's largest transfer.
    pub pools: Vec<BufferPool>,
    /// Devices that are origins of snapshots, with their engines.
    pub origins: Vec<origin::Origin>,
    /// Stores found at boot that are not served (no binding, origin missing, corrupt).
    pub unserved: Vec<discover::Unserved>,
    /// Half-merged origins whose merging store is not attached: read-only until it is.
    pub held: Vec<discover::HeldOrigin>,
    /// Requests submitted by [`Volumes::submit_to`] whose completion has not reached the
    /// task port of [`Volumes::poll`] yet. A task is finished only when this is zero, so a
    /// late completion never reaches the next task.
    pub task_ios: usize,
    /// Per device: NBD requests sent straight to it (not through an engine) whose completion
    /// has not come back. `snapshot create` waits for its origin's to drain.
    pub direct_nbd: Vec<u32>,
    /// DMA memory and clock.
    pub platform: Platform,
    /// Snapshot instance numbers ([`Volumes::new_instance`]).
    pub instances: Instances,
}

/// What console I/O addresses: a plain device, or a volume served by a snapshot engine (an
/// origin with snapshots, or a snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A device with no snapshots.
    Device(usize),
    /// A volume of `origins[origin]`.
    Volume {
        /// Index into [`Volumes::origins`].
        origin: usize,
        /// The origin itself or one of its snapshots.
        volume: snapshot::Volume,
    },
}

/// A volume name for messages (snapshot names may be longer than device names).
pub type VolumeName = drivers::info::FixedString<64>;

/// Where [`Volumes::poll`] hands finished requests that are not the engines' own, by the
/// [`Port`] in their tag: the running console task's ([`Port::Task`]), or the NBD
/// server's ([`Port::Nbd`]).
pub struct Ports<'a> {
    /// The running console task (with the pool its buffer came from).
    pub task: &'a mut dyn FnMut(&mut BufferPool, Completion),
    /// The NBD server.
    pub nbd: &'a mut dyn FnMut(&mut BufferPool, Completion),
}

/// Snapshot instance numbers: what an NBD export handle of a snapshot names. Unique since
/// boot and never reused.
pub struct Instances(u32);

impl Instances {
    /// A new instance number.
    pub fn take(&mut self) -> u32 {
        let n = self.0;
        self.0 = n.wrapping_add(1).max(1);
        n
    }
}

/// How [`Volumes::poll`] gets the devices' completions: given the device table and the
/// router, it hands the router each completion with its device's index and says whether
/// work remains.
pub type Drain<'a> = dyn FnMut(&mut [BoxedDevice], &mut dyn FnMut(u16, Completion)) -> bool + 'a;

/// A request refused at submission: the reason, and its buffer back.
pub type Refused = (BlockError, Option<DmaBuf>);

impl Volumes {
    /// No devices yet (the kernel adds them with [`Volumes::add_device`] as it probes).
    pub const fn new(platform: Platform) -> Volumes {
        Volumes {
            devices: Vec::new(),
            pools: Vec::new(),
            origins: Vec::new(),
            unserved: Vec::new(),
            held: Vec::new(),
            task_ios: 0,
            direct_nbd: Vec::new(),
            platform,
            instances: Instances(1),
        }
    }

    /// Adds a working device with its buffer pool; its index is the next one.
    pub fn add_device(&mut self, device: BoxedDevice, pool: BufferPool) -> usize {
        self.devices.push(device);
        self.pools.push(pool);
        self.direct_nbd.push(0);
        self.devices.len() - 1
    }

    /// Nanoseconds since boot.
    pub fn now_ns(&self) -> u64 {
        (self.platform.now_ns)()
    }

    /// Resolves a volume name: a device (through its engine when it has snapshots) or a
    /// snapshot.
    pub fn resolve(&self, name: &str) -> Option<Target> {
        if let Some(disk) = self.find(name) {
            return Some(
                match self
                    .origins
                    .iter()
                    .position(|o| o.disk == disk && !o.snaps.is_empty())
                {
                    Some(origin) => Target::Volume {
                        origin,
                        volume: snapshot::Volume::Origin,
                    },
                    None => Target::Device(disk),
                },
            );
        }
        self.origins.iter().enumerate().find_map(|(origin, o)| {
            o.snap(name)
                .filter(|s| s.serving())
                .map(|s| Target::Volume {
                    origin,
                    volume: snapshot::Volume::Snapshot(s.id),
                })
        })
    }

    /// The device whose geometry and buffers a target uses.
    pub fn disk_of(&self, target: Target) -> usize {
        match target {
            Target::Device(d) => d,
            Target::Volume { origin, .. } => {
                self.origins.get(origin).map_or(usize::MAX, |o| o.disk)
            }
        }
    }

    /// A target's name.
    pub fn target_name(&self, target: Target) -> VolumeName {
        match target {
            Target::Volume {
                origin,
                volume: snapshot::Volume::Snapshot(id),
            } => {
                let name = self
                    .origins
                    .get(origin)
                    .and_then(|o| o.snaps.iter().find(|s| s.id == id));
                VolumeName::from_str_truncated(name.map_or("?", |s| s.name.as_str()))
            }
            t => VolumeName::from_str_truncated(self.name(self.disk_of(t)).as_str()),
        }
    }

    /// The geometry I/O to a target sees (a snapshot: its origin's, read-only unless writable).
    pub fn geometry(&self, target: Target) -> drivers::block::Geometry {
        let mut g = self
            .devices
            .get(self.disk_of(target))
            .map(|d| d.geometry())
            .unwrap_or_default();
        if let Target::Volume {
            origin,
            volume: snapshot::Volume::Snapshot(id),
        } = target
        {
            let writable = self
                .origins
                .get(origin)
                .and_then(|o| o.snaps.iter().find(|s| s.id == id))
                .is_some_and(|s| s.writable);
            g.read_only |= !writable;
            g.discard = false;
        }
        // A half-merged origin waiting for its store, and the volumes on it.
        g.read_only |= self.held(self.disk_of(target)).is_some();
        // A device that grew after its engine was set up: its volumes keep the engine's size.
        if let Target::Volume { origin, .. } = target {
            if let Some(o) = self.origins.get(origin) {
                let block_sectors = u64::from((g.block_size / 512).max(1));
                g.capacity_blocks = g
                    .capacity_blocks
                    .min(o.engine.config().origin_sectors / block_sectors);
            }
        }
        g
    }

    /// The first store on `disk` that starts at or after sector `end`, if any.
    pub fn next_store_after(&self, disk: usize, end: u64) -> Option<u64> {
        self.origins
            .iter()
            .flat_map(|o| o.snaps.iter())
            .filter(|s| s.cow_disk == disk && s.cow_start >= end)
            .map(|s| s.cow_start)
            .chain(
                self.unserved
                    .iter()
                    .filter(|u| u.disk == disk && u.start >= end)
                    .map(|u| u.start),
            )
            .min()
    }

    /// Sectors free after `[start, start + len)` on `disk`: up to the next store on the
    /// device, or its end (its capacity now: a whole-device store grows with its device).
    pub fn free_after(&self, disk: usize, start: u64, len: u64) -> u64 {
        let g = self.geometry(Target::Device(disk));
        let capacity = g.capacity_blocks * u64::from(g.block_size / 512);
        let end = start + len;
        let next = self.next_store_after(disk, end).unwrap_or(capacity);
        next.min(capacity).saturating_sub(end)
    }

    /// Auto-extend (`snapshot autoextend`): every snapshot whose policy's threshold its usage
    /// has reached, and that is not being extended, grows by the policy's amount, as far as
    /// free space after its store allows (a free-extent marker keeps the rest reachable when
    /// another store follows). When there is no room, the console says so once, and the
    /// 80/90 % warnings and, when it fills, the invalidation go on as without it.
    pub fn autoextend(&mut self) {
        for oi in 0..self.origins.len() {
            for si in 0..self.origins[oi].snaps.len() {
                let o = &self.origins[oi];
                let s = &o.snaps[si];
                if s.state != origin::SnapState::Active || o.auto_extending.is_some() {
                    continue;
                }
                let Some(policy) = o.engine.autoextend(s.id) else {
                    continue;
                };
                if o.engine.extending(s.id) {
                    continue;
                }
                let Some(snapshot::Status::Usage(u)) = o.engine.status(s.id) else {
                    continue;
                };
                let used = u.allocated_sectors * 100 / u.total_sectors.max(1);
                if used < u64::from(policy.threshold) {
                    self.origins[oi].snaps[si].auto_blocked = false;
                    continue;
                }
                let chunk = u64::from(s.chunk_sectors.max(1));
                // The amount comes from the disk (any u64 passes the record's checks).
                let want = match policy.by {
                    snapshot::format::ExtendBy::Percent(p) => {
                        s.cow_sectors.saturating_mul(u64::from(p)) / 100
                    }
                    snapshot::format::ExtendBy::Sectors(n) => n,
                }
                .div_ceil(chunk)
                .saturating_mul(chunk);
                let free = self.free_after(s.cow_disk, s.cow_start, s.cow_sectors) / chunk * chunk;
                let grow = want.min(free);
                let (id, disk, start, len) = (s.id, s.cow_disk, s.cow_start, s.cow_sectors);
                if grow == 0 {
                    if !s.auto_blocked {
                        log::warn!(
                            "snapshot {}: {used}% used; auto-extend cannot grow it: no free space after its store on {}",
                            s.name,
                            self.name(disk)
                        );
                        self.origins[oi].snaps[si].auto_blocked = true;
                    }
                    continue;
                }
                let new = len + grow;
                let marker = self.next_store_after(disk, start + len).and_then(|next| {
                    (next > start + new).then_some(snapshot::format::FreeExtent {
                        start: start + new,
                        sectors: next - (start + new),
                    })
                });
                let o = &mut self.origins[oi];
                let Some(mut b) = o.engine.binding(id) else {
                    continue;
                };
                b.region_start = start;
                b.region_sectors = new;
                if o.engine.extend_snapshot(id, new, &b, marker).is_ok() {
                    o.auto_extending = Some((id, new));
                    log::info!(
                        "snapshot {}: {used}% used; auto-extending by {} MiB to {} MiB",
                        o.snaps[si].name,
                        grow / 2048,
                        new / 2048
                    );
                }
            }
        }
    }

    /// The half-merged origin on `disk` waiting for its merging store, if it is one.
    pub fn held(&self, disk: usize) -> Option<&discover::HeldOrigin> {
        self.held.iter().find(|h| h.disk == disk)
    }

    /// Names snapshot `id` of `origin` in the origin marker a merge of it writes (its name,
    /// its COW device and region), so a boot that finds the origin without the store can say
    /// which store to bring back.
    pub fn label_merge(&mut self, origin: usize, id: snapshot::SnapId) {
        let Some(o) = self.origins.get(origin) else {
            return;
        };
        let Some(s) = o.snaps.iter().find(|s| s.id == id) else {
            return;
        };
        let Some(cow) = self.devices.get(s.cow_disk).map(|d| d.info()) else {
            return;
        };
        let desc = alloc::format!("{}", identity::DescribeDevice(&cow));
        let (name, start) = (s.name.clone(), s.cow_start);
        self.origins[origin]
            .engine
            .set_merge_label(id, name.as_bytes(), desc.as_bytes(), start);
    }

    /// After discovery or `snapshot attach`: half-merged origins whose merge now runs are
    /// released; the others stay read-only, with a warning when `warn` (at boot).
    pub fn settle_held(&mut self, warn: bool) {
        let origins = &self.origins;
        self.held.retain(|h| {
            !origins
                .iter()
                .any(|o| o.disk == h.disk && o.engine.merge_progress().is_some())
        });
        if warn {
            for h in &self.held {
                log::warn!("{}: {}", self.name(h.disk), h.why());
            }
        }
    }

    /// The buffer pool for I/O to a target.
    pub fn pool(&mut self, target: Target) -> Option<&mut BufferPool> {
        let disk = self.disk_of(target);
        self.pools.get_mut(disk)
    }

    /// Interrupts taken by the devices behind a target (for a volume: its origin and the
    /// COW devices of its snapshots).
    pub fn interrupts(&self, target: Target) -> u64 {
        let of = |disk: usize| self.devices.get(disk).map_or(0, |d| d.stats().interrupts);
        let Target::Volume { origin, .. } = target else {
            return of(self.disk_of(target));
        };
        let Some(o) = self.origins.get(origin) else {
            return 0;
        };
        // A volume's I/O goes to the origin and to its snapshots' COW devices: count each
        // device once.
        let mut total = of(o.disk);
        for (i, s) in o.snaps.iter().enumerate() {
            let seen =
                s.cow_disk == o.disk || o.snaps[..i].iter().any(|t| t.cow_disk == s.cow_disk);
            if !seen {
                total += of(s.cow_disk);
            }
        }
        total
    }

    /// Sends a console task's request to a target (counted in `task_ios`); on refusal the
    /// buffer comes back with the reason.
    pub fn submit_to(&mut self, target: Target, request: BlockRequest) -> Result<(), Refused> {
        let submitted = self.submit_any(target, request);
        if submitted.is_ok() {
            self.task_ios += 1;
        }
        submitted
    }

    /// Sends an NBD request (its tag a [`Port::Nbd`]) to a target. Not counted
    /// in `task_ios`: its completion goes to the NBD port of [`Volumes::poll`], and console
    /// tasks do not wait for it.
    pub fn submit_nbd(&mut self, target: Target, request: BlockRequest) -> Result<(), Refused> {
        self.submit_any(target, request)?;
        if let Target::Device(d) = target {
            if let Some(n) = self.direct_nbd.get_mut(d) {
                *n += 1;
            }
        }
        Ok(())
    }

    /// A new snapshot instance number: unique since boot, never reused (one per snapshot
    /// created or found; 2^32 of them would take far longer than any uptime).
    pub fn new_instance(&mut self) -> u32 {
        self.instances.take()
    }

    /// NBD requests sent straight to device `disk` and not back yet.
    pub fn direct_nbd_in_flight(&self, disk: usize) -> u32 {
        self.direct_nbd.get(disk).copied().unwrap_or(0)
    }

    /// Whether device `disk` holds a COW store (one an engine serves, or one found at boot
    /// and not served) or is a half-merged origin waiting for its store. Only the engine (or
    /// nobody) writes it.
    pub fn holds_store(&self, disk: usize) -> bool {
        self.cow_user(disk).is_some()
            || self.unserved.iter().any(|u| u.disk == disk)
            || self.held(disk).is_some()
    }

    fn submit_any(&mut self, target: Target, request: BlockRequest) -> Result<(), Refused> {
        match target {
            Target::Device(d) => match self.devices.get_mut(d) {
                Some(device) => device
                    .submit(request)
                    .map_err(|r| (r.error, r.request.buffer)),
                None => Err((BlockError::DeviceFailed, request.buffer)),
            },
            Target::Volume { origin, volume } => match self.origins.get_mut(origin) {
                Some(o) => o.submit(origin, &mut self.devices, volume, request),
                None => Err((BlockError::DeviceFailed, request.buffer)),
            },
        }
    }

    /// The engine of origin device `disk`, set up on first use; its index in `origins`.
    pub fn origin_for(&mut self, disk: usize) -> Result<usize, origin::SetupError> {
        if let Some(i) = self.origins.iter().position(|o| o.disk == disk) {
            return Ok(i);
        }
        let device = self.devices.get(disk).ok_or("no such device")?;
        let pool_bytes = self
            .pools
            .get(disk)
            .map_or(MAX_TRANSFER, BufferPool::buffer_size);
        let pool_id = 0x8000 + self.origins.len() as u16;
        self.origins.push(origin::Origin::new(
            disk,
            device,
            pool_id,
            pool_bytes,
            &self.platform,
        )?);
        Ok(self.origins.len() - 1)
    }

    /// The snapshot whose COW store lives on `disk`, if any.
    pub fn cow_user(&self, disk: usize) -> Option<&str> {
        self.origins
            .iter()
            .flat_map(|o| o.snaps.iter())
            .find(|s| s.cow_disk == disk)
            .map(|s| s.name.as_str())
    }

    /// Finds a disk by name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.info().name.as_str() == name)
    }

    /// A disk's name.
    pub fn name(&self, disk: usize) -> DeviceName {
        self.devices
            .get(disk)
            .map(|d| d.info().name)
            .unwrap_or_default()
    }

    /// Sends the device I/O for volume requests submitted since the last [`Volumes::poll`]
    /// (console tasks and NBD sessions submit after it ran; without this their I/O would wait
    /// for the next interrupt, which under interrupt coalescing can be a whole batch of
    /// completions later). Returns true when an engine has finished requests to deliver (run
    /// [`Volumes::poll`] again before halting).
    pub fn issue_volumes(&mut self) -> bool {
        let mut more = false;
        for (index, o) in self.origins.iter_mut().enumerate() {
            o.issue(index, self.devices.as_mut_slice());
            more |= o.engine.has_completions();
        }
        more
    }

    /// Holds back device notifications (see `BlockDevice::plug`) until
    /// [`Volumes::unplug`]: what the main loop submits in one round then costs one
    /// notification per device.
    pub fn plug(&mut self) {
        self.devices.iter_mut().for_each(|d| d.plug());
    }

    /// Sends the notifications held back since [`Volumes::plug`].
    pub fn unplug(&mut self) {
        self.devices.iter_mut().for_each(|d| d.unplug());
    }

    /// One round of the completion path: `drain` takes the completions the devices have
    /// (the kernel's interrupt servicer; host tests poll every device) and hands each to the
    /// router with its device's index; each goes back by the [`Port`] in its tag: engine
    /// I/O to its engine, NBD I/O to `ports.nbd`, the task's (and a tag no port makes) to
    /// `ports.task`, each with the device's buffer pool. Then every
    /// engine issues I/O and delivers finished volume requests the same way. Returns true
    /// when work remains (`drain` said so, or an engine has more: run again before halting).
    pub fn poll(&mut self, now: u64, drain: &mut Drain<'_>, ports: &mut Ports<'_>) -> bool {
        let Volumes {
            devices,
            pools,
            origins,
            task_ios,
            direct_nbd,
            ..
        } = self;
        // Completions below are stamped with this round's time.
        for o in origins.iter_mut() {
            o.engine.tick(now / 1000);
        }
        let more = drain(devices.as_mut_slice(), &mut |index, c| {
            match Port::of(c.tag) {
                Some(Port::Engine { origin, slot }) => {
                    if let Some(o) = origins.get_mut(origin as usize) {
                        o.complete(slot, c);
                    }
                }
                Some(Port::Nbd(_)) => {
                    // NBD I/O sent straight to this device (engine-routed NBD I/O comes
                    // back through `deliver` below).
                    if let Some(n) = direct_nbd.get_mut(usize::from(index)) {
                        *n = n.saturating_sub(1);
                    }
                    if let Some(pool) = pools.get_mut(usize::from(index)) {
                        (ports.nbd)(pool, c);
                    }
                }
                Some(Port::Task(_)) | None => {
                    *task_ios = task_ios.saturating_sub(1);
                    if let Some(pool) = pools.get_mut(usize::from(index)) {
                        (ports.task)(pool, c);
                    }
                }
            }
        });
        // The engines' I/O of this round goes out with one notification per device.
        let plugged = !origins.is_empty();
        if plugged {
            devices.iter_mut().for_each(|d| d.plug());
        }
        for (index, o) in origins.iter_mut().enumerate() {
            o.issue(index, devices);
            if let Some(pool) = pools.get_mut(o.disk) {
                o.deliver(now, &mut |c| match Port::of(c.tag) {
                    Some(Port::Nbd(_)) => (ports.nbd)(pool, c),
                    _ => {
                        *task_ios = task_ios.saturating_sub(1);
                        (ports.task)(pool, c)
                    }
                });
            }
            o.issue(index, devices);
            o.sweep();
            o.alert_unmarked(now);
        }
        if plugged {
            devices.iter_mut().for_each(|d| d.unplug());
        }
        more
    }
}

#[cfg(test)]
mod tests;
