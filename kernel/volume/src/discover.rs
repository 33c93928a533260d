//! Rediscovery at boot: every device is read for a dm-snapshot store (magic `SnAp` in its
//! first block). A store with snapfw's binding is loaded with the `snapshot` crate's loader
//! and attached to the engine of its origin, found by serial number and capacity; the
//! snapshot is back under its name with no command from the operator. Stores without a
//! binding (made by Linux) and stores whose origin is missing are listed and left untouched.
//! It runs as the first task of the main loop, through the ordinary interrupt-driven queues.

use core::fmt::{self, Write};

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use drivers::block::{BlockRequest, BufferPool, Completion};
use snapshot::format::{FreeExtent, SNAP_MAGIC};
use snapshot::OriginMarker;
use snapshot::{
    Binding, BindingError, LoadError, LoadParams, LoadRead, LoadedStore, Loader, SnapshotConfig,
};

use crate::identity::{self, escaped, DeviceId, NoMatch};
use crate::origin::{Snap, SnapState};
use crate::tasks::Task;
use crate::{Target, Volumes};
use drivers::info::DeviceInfo;

/// A store found at boot that is not served.
#[derive(Clone, Debug)]
pub struct Unserved {
    /// The device holding it.
    pub disk: usize,
    /// First sector of the store on the device (not 0 for a store in a region).
    pub start: u64,
    /// Why it is not served.
    pub why: String,
}

/// An origin found half-merged at boot (its first block holds snapfw's origin marker) whose
/// merging store is not attached: it is read-only, for NBD and the console, until the store
/// is attached (the merge then resumes and writes its first chunk back).
#[derive(Clone, Debug)]
pub struct HeldOrigin {
    /// The origin device.
    pub disk: usize,
    /// What the marker says.
    pub marker: OriginMarker,
}

impl HeldOrigin {
    /// Why the device is read-only, for the console.
    pub fn why(&self) -> String {
        let m = &self.marker;
        let name = escaped(m.name.as_bytes());
        let cow = escaped(m.cow.as_bytes());
        let region = if m.region_start == 0 {
            String::new()
        } else {
            alloc::format!(" at sector {}", m.region_start)
        };
        alloc::format!(
            "half-merged from snapshot '{name}', whose COW store ({cow}{region}) was not found; read-only until that store is attached, then the merge resumes (its first chunk is kept in the store, chunk {})",
            m.saved_chunk
        )
    }
}

// Only one scan exists, at boot: the size of the loading state does not matter.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// Read the first block of `disk`.
    Head,
    /// Waiting for the first block.
    WaitHead,
    /// `snapshot attach` without `--no-write`: chunk 0's first block with the new binding
    /// is written, then the device flushed, before the store is loaded.
    Bind {
        block: Vec<u8>,
        binding: Binding,
        origin: usize,
        stage: BindStage,
    },
    /// Loading: the loader, the binding, the origin, and the loader's reads in flight or
    /// waiting to be supplied, in its order (metadata areas are read ahead: they are not
    /// contiguous, and one read at a time would make a large store's load a chain of
    /// device round trips).
    Load {
        /// When loading started (uptime, ns), for the attach line.
        started: u64,
        loader: Loader,
        binding: Binding,
        origin: usize,
        window: VecDeque<AreaRead>,
        /// Sequence number of the next read (in its tag, so a completion finds its read).
        next_seq: u64,
        /// Device requests in flight.
        in_flight: usize,
        /// A read the loader needs failed: the load stops once nothing is in flight.
        failed: bool,
        /// Buffers of reads already supplied, for the next ones.
        spare: Vec<Vec<u8>>,
    },
}

/// One of the loader's reads ([`Loader::read_ahead`]), filled piece by piece (a chunk may be
/// larger than a device request; pieces may come back in any order).
struct AreaRead {
    /// Sectors from the store's start.
    read: LoadRead,
    data: Vec<u8>,
    /// Bytes asked of the device so far, and bytes back.
    issued: usize,
    back: usize,
    seq: u64,
    /// A piece of it failed: the load fails if the loader gets to it (a read ahead past the
    /// end of the table is never needed, and its failure does not matter).
    failed: bool,
}

/// The most loader reads in flight or waiting at once, and the most bytes they hold.
const LOAD_WINDOW: usize = 64;
const LOAD_WINDOW_BYTES: usize = 4 << 20;
/// A load read's tag: its sequence number above this shift, the piece's offset in sectors
/// below (inside the task's port: `crate::port`).
const LOAD_SEQ_SHIFT: u32 = 24;

/// Where writing a binding for `snapshot attach` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BindStage {
    Write,
    WaitWrite,
    Flush,
    WaitFlush,
    Done,
}

/// The boot-time scan, or the adoption of one store (`snapshot attach`).
pub struct DiscoverTask {
    disk: usize,
    /// Where on `disk` the walk is: the sector of the block being examined. A device is
    /// walked from sector 0, store by store and free extent by free extent (see
    /// `crate::extents`), until a block that is neither.
    probe: u64,
    /// Sectors of the store being loaded (its region), so the walk can go on after it.
    region: u64,
    phase: Phase,
    head: Vec<u8>,
    found: usize,
    done: bool,
    /// `snapshot attach`: only this disk, with this origin and name (the store's own binding,
    /// if any, is ignored).
    adopt: Option<(usize, Binding)>,
    /// `snapshot attach` writes its binding into the store (not with `--no-write`).
    write_binding: bool,
    /// Why adoption failed.
    error: Option<String>,
    /// Half-merged origins were settled once the scan ended.
    settled: bool,
}

impl DiscoverTask {
    /// A scan of every device.
    pub fn new() -> DiscoverTask {
        DiscoverTask {
            disk: 0,
            probe: 0,
            region: 0,
            phase: Phase::Head,
            head: Vec::new(),
            found: 0,
            done: false,
            adopt: None,
            write_binding: false,
            error: None,
            settled: false,
        }
    }

    /// Adopts the store on `cow` (one Linux made, or one whose origin is ambiguous) as
    /// snapshot `binding.name` of `origin`. With `write`, `binding` is written into the store
    /// first (keeping the region, flags and creation time of the binding it had), so the
    /// choice survives reboots; without, the store stays as it is on disk, read-only, and the
    /// attachment lasts until reboot.
    pub fn adopt(cow: usize, origin: usize, binding: Binding, write: bool) -> DiscoverTask {
        DiscoverTask {
            disk: cow,
            adopt: Some((origin, binding)),
            write_binding: write,
            ..DiscoverTask::new()
        }
    }

    fn next_disk(&mut self) {
        if self.adopt.is_some() {
            self.done = true;
            return;
        }
        self.disk += 1;
        self.probe = 0;
        self.phase = Phase::Head;
    }

    /// Goes on at sector `next` of this disk, or to the next disk when `next` is not ahead
    /// of the walk or lies past the end.
    fn walk_to(&mut self, st: &Volumes, next: u64) {
        let g = st.devices[self.disk].geometry();
        let sectors = g.capacity_blocks * u64::from(g.block_size / 512);
        let aligned = next.is_multiple_of(u64::from((g.block_size / 512).max(1)));
        if self.adopt.is_some() || next <= self.probe || next >= sectors || !aligned {
            return self.next_disk();
        }
        self.probe = next;
        self.phase = Phase::Head;
    }

    /// After a store: the walk goes on behind its region.
    fn after_store(&mut self, st: &Volumes) {
        let next = self.probe.saturating_add(self.region);
        self.walk_to(st, next);
    }

    /// Records a store found here that is not served, and goes on behind it.
    fn unserved(&mut self, st: &mut Volumes, why: String) {
        st.unserved.push(Unserved {
            disk: self.disk,
            start: self.probe,
            why,
        });
        self.after_store(st);
    }

    /// Decides what the first block holds.
    fn examine(&mut self, st: &mut Volumes) {
        let head = core::mem::take(&mut self.head);
        let magic = head
            .get(..4)
            .map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        let g = st.devices[self.disk].geometry();
        let capacity = g.capacity_blocks * u64::from(g.block_size / 512);
        // Until a binding says otherwise, a store runs to the end of the device.
        self.region = capacity - self.probe;
        if magic != Some(SNAP_MAGIC) {
            if self.adopt.is_some() {
                self.error = Some(String::from(
                    "there is no dm-snapshot store on that device (no SnAp header)",
                ));
                return self.next_disk();
            }
            if self.probe == 0 {
                if let Some(marker) = OriginMarker::decode(&head) {
                    // An origin a merge left half-done. Held read-only until the scan ends;
                    // released then if its store was found and the merge resumes.
                    st.held.retain(|h| h.disk != self.disk);
                    st.held.push(HeldOrigin {
                        disk: self.disk,
                        marker,
                    });
                    return self.next_disk();
                }
            }
            match FreeExtent::decode(&head) {
                Some(free) if free.start == self.probe && free.sectors > 0 => {
                    let next = self.probe.saturating_add(free.sectors);
                    self.walk_to(st, next);
                }
                _ => self.next_disk(),
            }
            return;
        }
        if let Some((origin, mut binding)) = self.adopt.clone() {
            if !self.write_binding {
                self.start_load(st, binding, origin);
                return;
            }
            if let Ok(own) = Binding::decode(&head) {
                if own.region_start != 0 || own.region_sectors > capacity {
                    self.error = Some(alloc::format!(
                        "the store's binding places it at sector {} (+{}); only whole-device stores can be attached",
                        own.region_start,
                        own.region_sectors
                    ));
                    return self.next_disk();
                }
                binding.region_sectors = own.region_sectors;
                binding.flags = own.flags;
                binding.created_unix_seconds = own.created_unix_seconds;
                if own.region_sectors > 0 {
                    self.region = own.region_sectors;
                }
            }
            binding.chunk_sectors = snapshot::Header::decode(&head).map_or(0, |h| h.chunk_sectors);
            let mut block = head;
            binding.encode(&mut block);
            self.phase = Phase::Bind {
                block,
                binding,
                origin,
                stage: BindStage::Write,
            };
            return;
        }
        let name = st.name(self.disk);
        match Binding::decode(&head) {
            Ok(binding)
                if binding.region_start != self.probe
                    || binding.region_sectors > capacity - self.probe
                    || (binding.region_sectors == 0 && self.probe != 0) =>
            {
                let why = alloc::format!(
                    "snapshot '{}': a store whose binding places it at sector {} (+{}), found at sector {}; left untouched",
                    escaped(binding.name.as_bytes()),
                    binding.region_start,
                    binding.region_sectors,
                    self.probe
                );
                log::warn!("{name}: {why}");
                st.unserved.push(Unserved {
                    disk: self.disk,
                    start: self.probe,
                    why,
                });
                self.next_disk();
            }
            Ok(binding) => {
                if binding.region_sectors > 0 {
                    self.region = binding.region_sectors;
                }
                let infos: Vec<DeviceInfo> = st.devices.iter().map(|d| d.info()).collect();
                let ids: Vec<DeviceId> = infos.iter().map(DeviceId::of).collect();
                let origin = match identity::match_origin(&binding, &ids, self.disk) {
                    Ok(origin) => origin,
                    Err(no) => {
                        let why = unmatched(&binding, &no, &infos);
                        log::warn!("{name}: {why}");
                        return self.unserved(st, why);
                    }
                };
                self.start_load(st, binding, origin);
            }
            Err(BindingError::Absent) => {
                let why = String::from(
                    "a dm-snapshot store without a snapfw binding (made by Linux?); not served",
                );
                log::info!("{name}: {why}");
                self.unserved(st, why);
            }
            Err(e) => {
                let why = alloc::format!(
                    "a dm-snapshot store whose binding record is unreadable ({e:?}); not served"
                );
                log::warn!("{name}: {why}");
                self.unserved(st, why);
            }
        }
    }

    fn start_load(&mut self, st: &Volumes, binding: Binding, origin: usize) {
        let cg = st.devices[self.disk].geometry();
        let og = st.devices[origin].geometry();
        let cow_sectors = self.region;
        let params = LoadParams {
            cow_sectors,
            cow_block_sectors: (cg.block_size / 512).max(1),
            origin_sectors: og.capacity_blocks * u64::from(og.block_size / 512),
            origin_block_sectors: (og.block_size / 512).max(1),
            // The loader caps the table at the store's chunk count once it has read the
            // header, and the table grows only with the records it finds.
            table_runs: usize::MAX,
        };
        self.phase = Phase::Load {
            started: st.now_ns(),
            // Chunks larger than the copy buffers are refused before anything is read or
            // allocated for them.
            loader: Loader::new(params).max_chunk_sectors(crate::origin::COPY_BUFFER_SECTORS),
            binding,
            origin,
            window: VecDeque::new(),
            next_seq: 0,
            in_flight: 0,
            failed: false,
            spare: Vec::new(),
        };
    }

    fn attach(
        &mut self,
        st: &mut Volumes,
        loaded: LoadedStore,
        binding: Binding,
        origin: usize,
        started: u64,
    ) {
        // A name read from a disk may hold anything: control characters are escaped.
        let name = escaped(binding.name.as_bytes());
        let cow = st.name(self.disk);
        let origin_index = match st.origin_for(origin) {
            Ok(i) => i,
            Err(e) => {
                log::error!("snapshot {name} on {cow}: {e}");
                self.error = Some(String::from(e));
                self.refused(st, alloc::format!("snapshot '{name}': {e}; not served"));
                return;
            }
        };
        let cg = st.devices[self.disk].geometry();
        let valid = loaded.valid;
        let merging = loaded.merging;
        // Stores adopted without a binding written are read-only: their maker's view of them
        // is not ours to change.
        let bound = self.adopt.is_none() || self.write_binding;
        let writable = bound && binding.flags & snapshot::format::BINDING_FLAG_WRITABLE != 0;
        let chunk_sectors = loaded.state.chunk_sectors() as u32;
        let cow_sectors = loaded.state.cow_sectors;
        let cfg = SnapshotConfig {
            chunk_sectors,
            cow_sectors,
            cow_block_sectors: (cg.block_size / 512).max(1),
            cow_fua: cg.fua,
            writable,
            table_runs: crate::table_limit(cow_sectors, chunk_sectors),
            // A store adopted with `--no-write` stays exactly as its maker wrote it: no
            // binding is added.
            binding: if bound { Some(binding) } else { None },
        };
        let instance = st.new_instance();
        let exceptions = loaded.table.len();
        let table_kib = loaded.table.reserved_bytes().div_ceil(1024);
        let load_ms = st.now_ns().saturating_sub(started) / 1_000_000;
        let o = &mut st.origins[origin_index];
        match o.engine.attach_snapshot(loaded, &cfg) {
            Ok(id) => {
                o.snaps.push(Snap {
                    name: name.clone(),
                    id,
                    instance,
                    cow_disk: self.disk,
                    cow_start: self.probe,
                    cow_sectors,
                    chunk_sectors,
                    writable,
                    state: if merging {
                        SnapState::Merging
                    } else if valid {
                        SnapState::Active
                    } else {
                        SnapState::Invalid
                    },
                    invalid: None,
                    auto_blocked: false,
                });
                self.found += 1;
                st.label_merge(origin_index, id);
                log::info!(
                    "snapshot {name}: store on {cow} attached to {} ({exceptions} exceptions, table {table_kib} KiB, loaded in {load_ms} ms){}",
                    st.name(origin),
                    if merging {
                        " (merging: resumes once every store is attached)"
                    } else if valid {
                        ""
                    } else {
                        " (invalid)"
                    }
                );
            }
            Err(e) => {
                log::error!("snapshot {name} on {cow}: the engine refused the store ({e:?})");
                self.error = Some(alloc::format!("the engine refused the store ({e:?})"));
                self.refused(
                    st,
                    alloc::format!(
                        "snapshot '{name}': the engine refused the store ({e:?}); not served"
                    ),
                );
            }
        }
    }

    /// Lists a store the scan found but could not attach (at boot; `snapshot attach`
    /// reports its own error).
    fn refused(&self, st: &mut Volumes, why: String) {
        if self.adopt.is_none() {
            st.unserved.push(Unserved {
                disk: self.disk,
                start: self.probe,
                why,
            });
        }
    }
}

/// Why the store bound by `binding` is not attached at boot, for the console and the
/// unserved list.
fn unmatched(binding: &Binding, no: &NoMatch, infos: &[DeviceInfo]) -> String {
    let snap = escaped(binding.name.as_bytes());
    let origin = identity::Describe(binding);
    let names = |list: &[usize]| {
        list.iter()
            .filter_map(|&d| infos.get(d).map(|i| i.name.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match no {
        NoMatch::Missing => alloc::format!(
            "snapshot '{snap}': its origin ({origin}) is missing; store left untouched"
        ),
        NoMatch::Ambiguous(list) => alloc::format!(
            "snapshot '{snap}': its origin ({origin}) is ambiguous: it could be {}; waiting for 'snapshot attach {snap} ORIGIN COW'",
            names(list)
        ),
        NoMatch::SizeDiffers { device, sectors } => alloc::format!(
            "snapshot '{snap}': its origin ({origin}) is {} but that has {sectors} sectors; store left untouched",
            names(&[*device])
        ),
        NoMatch::Moved => alloc::format!(
            "snapshot '{snap}': attached by PCI location ({origin}), but the store is no longer in the slot it was attached from; waiting for 'snapshot attach {snap} ORIGIN COW'"
        ),
    }
}

impl Default for DiscoverTask {
    fn default() -> Self {
        Self::new()
    }
}

impl Task for DiscoverTask {
    fn step(&mut self, st: &mut Volumes, _now: u64) {
        loop {
            if self.done {
                // Every store is attached: merges found in them may run now (they must
                // first copy into every other snapshot what they overwrite).
                for o in st.origins.iter_mut() {
                    o.engine.resume_merge();
                }
                if !self.settled {
                    // Half-merged origins whose merge runs again are writable again.
                    self.settled = true;
                    st.settle_held(self.adopt.is_none());
                }
                return;
            }
            if self.disk >= st.devices.len() {
                self.done = true;
                continue;
            }
            let target = Target::Device(self.disk);
            let block = st.devices[self.disk].geometry().block_size.max(512) as usize;
            match &mut self.phase {
                Phase::Head => {
                    let Some(mut buf) = st.pool(target).and_then(|p| p.acquire()) else {
                        return;
                    };
                    if buf.set_len(block).is_err() {
                        let _ = st.pool(target).map(|p| p.release(buf));
                        self.next_disk();
                        continue;
                    }
                    let lba = self.probe * 512 / block as u64;
                    match st.submit_to(target, BlockRequest::read(0, lba, buf)) {
                        Ok(()) => {
                            self.phase = Phase::WaitHead;
                            return;
                        }
                        Err((_, b)) => {
                            if let (Some(b), Some(p)) = (b, st.pool(target)) {
                                let _ = p.release(b);
                            }
                            self.next_disk();
                        }
                    }
                }
                Phase::WaitHead => {
                    if self.head.is_empty() {
                        return;
                    }
                    self.examine(st);
                }
                Phase::Bind { block, stage, .. } => match *stage {
                    BindStage::WaitWrite | BindStage::WaitFlush => return,
                    BindStage::Write => {
                        let Some(mut buf) = st.pool(target).and_then(|p| p.acquire()) else {
                            return;
                        };
                        if buf.set_len(block.len()).is_err() {
                            let _ = st.pool(target).map(|p| p.release(buf));
                            self.error = Some(String::from("writing the binding failed"));
                            self.next_disk();
                            continue;
                        }
                        buf.as_mut_slice().copy_from_slice(block);
                        match st.submit_to(target, BlockRequest::write(2, 0, buf, false)) {
                            Ok(()) => *stage = BindStage::WaitWrite,
                            Err((e, b)) => {
                                if let (Some(b), Some(p)) = (b, st.pool(target)) {
                                    let _ = p.release(b);
                                }
                                self.error =
                                    Some(alloc::format!("writing the binding failed ({e:?})"));
                                self.next_disk();
                            }
                        }
                    }
                    BindStage::Flush => match st.submit_to(target, BlockRequest::flush(3)) {
                        Ok(()) => *stage = BindStage::WaitFlush,
                        Err((e, b)) => {
                            if let (Some(b), Some(p)) = (b, st.pool(target)) {
                                let _ = p.release(b);
                            }
                            self.error =
                                Some(alloc::format!("flushing the binding failed ({e:?})"));
                            self.next_disk();
                        }
                    },
                    BindStage::Done => {
                        let Phase::Bind {
                            binding, origin, ..
                        } = core::mem::replace(&mut self.phase, Phase::Head)
                        else {
                            return;
                        };
                        log::info!(
                            "snapshot {}: binding written to the store on {} (origin {})",
                            escaped(binding.name.as_bytes()),
                            st.name(self.disk),
                            st.name(origin)
                        );
                        self.start_load(st, binding, origin);
                    }
                },
                Phase::Load {
                    loader,
                    origin,
                    window,
                    next_seq,
                    in_flight,
                    failed,
                    spare,
                    ..
                } => {
                    // Supply what came back, in the loader's order.
                    while !*failed
                        && loader.next_read().is_some()
                        && window.front().is_some_and(|a| a.back >= a.data.len())
                    {
                        let Some(a) = window.pop_front() else { break };
                        if a.failed {
                            // Zeroes would read as the end of the table, and the snapshot
                            // would come back without its later exceptions: fail the load.
                            *failed = true;
                            break;
                        }
                        // The loader records an error; `finish` reports it.
                        let _ = loader.supply(&a.data);
                        spare.push(a.data);
                    }
                    if *failed || loader.next_read().is_none() {
                        // Reads ahead past the end of the table are dropped when back.
                        if *in_flight > 0 {
                            return;
                        }
                        // `snapshot attach` on an origin NBD clients write: their writes
                        // already sent straight to the device come back first (from the
                        // attach on, its requests go through the engine).
                        if !*failed && st.direct_nbd_in_flight(*origin) > 0 {
                            return;
                        }
                        let Phase::Load {
                            loader,
                            binding,
                            origin,
                            started,
                            failed,
                            ..
                        } = core::mem::replace(&mut self.phase, Phase::Head)
                        else {
                            return;
                        };
                        let loaded = if failed {
                            Err(String::from("reading it failed (device error)"))
                        } else {
                            loader.finish().map_err(load_error_text)
                        };
                        match loaded {
                            Ok(loaded) => {
                                self.attach(st, loaded, binding, origin, started);
                                self.after_store(st);
                            }
                            Err(e) => {
                                self.error = Some(alloc::format!("the store does not load: {e}"));
                                let why = alloc::format!(
                                    "a snapshot store that does not load: {e}; left untouched"
                                );
                                log::error!("{}: {why}", st.name(self.disk));
                                self.unserved(st, why);
                            }
                        }
                        continue;
                    }
                    // Queue the loader's next reads, as far as the window goes.
                    let chunk = loader.next_read().map_or(1, |r| r.sectors as usize * 512);
                    let depth = (LOAD_WINDOW_BYTES / chunk).clamp(1, LOAD_WINDOW);
                    while window.len() < depth {
                        let Some(r) = loader.read_ahead(window.len() as u64) else {
                            break;
                        };
                        let want = r.sectors as usize * 512;
                        let mut data = spare.pop().unwrap_or_default();
                        data.clear();
                        // The loader bounds reads to a chunk (512 KiB at most); a heap that
                        // cannot hold one refuses this store, not the boot.
                        if data.try_reserve_exact(want).is_err() {
                            if window.is_empty() {
                                self.phase = Phase::Head;
                                let why = String::from(
                                    "not enough memory to read its metadata; left untouched",
                                );
                                log::error!("{}: {why}", st.name(self.disk));
                                self.unserved(st, why);
                                break;
                            }
                            break;
                        }
                        data.resize(want, 0);
                        window.push_back(AreaRead {
                            read: r,
                            data,
                            issued: 0,
                            back: 0,
                            seq: *next_seq,
                            failed: false,
                        });
                        *next_seq += 1;
                    }
                    if !matches!(self.phase, Phase::Load { .. }) {
                        continue;
                    }
                    let Phase::Load {
                        window,
                        in_flight,
                        failed,
                        ..
                    } = &mut self.phase
                    else {
                        continue;
                    };
                    // Issue their pieces, in order, as far as buffers go.
                    for a in window.iter_mut() {
                        while a.issued < a.data.len() {
                            let Some(mut buf) = st.pool(target).and_then(|p| p.acquire()) else {
                                return;
                            };
                            let piece = (a.data.len() - a.issued).min(buf.capacity());
                            let _ = buf.set_len(piece);
                            let lba = ((self.probe + a.read.sector) * 512 + a.issued as u64)
                                / block as u64;
                            let tag = (a.seq << LOAD_SEQ_SHIFT) | (a.issued as u64 / 512);
                            match st.submit_to(target, BlockRequest::read(tag, lba, buf)) {
                                Ok(()) => {
                                    a.issued += piece;
                                    *in_flight += 1;
                                }
                                Err((_, b)) => {
                                    if let (Some(b), Some(p)) = (b, st.pool(target)) {
                                        let _ = p.release(b);
                                    }
                                    // Refused with reads in flight: try again when they are
                                    // back; with none, the device refuses reads.
                                    if *in_flight == 0 {
                                        *failed = true;
                                    }
                                    return;
                                }
                            }
                        }
                    }
                    return;
                }
            }
        }
    }

    fn complete(&mut self, pool: &mut BufferPool, c: Completion, _now: u64) {
        let ok = c.result.is_ok();
        if let Phase::Bind { stage, .. } = &mut self.phase {
            *stage = match (*stage, ok) {
                (BindStage::WaitWrite, true) => BindStage::Flush,
                (BindStage::WaitFlush, true) => BindStage::Done,
                (s, true) => s,
                (_, false) => {
                    self.error = Some(String::from(
                        "writing the binding failed (device error); the store is unchanged or holds the new binding",
                    ));
                    self.done = true;
                    BindStage::Done
                }
            };
            if let Some(b) = c.buffer {
                let _ = pool.release(b);
            }
            return;
        }
        if let Phase::Load {
            window, in_flight, ..
        } = &mut self.phase
        {
            *in_flight = in_flight.saturating_sub(1);
            let seq = c.tag >> LOAD_SEQ_SHIFT;
            let at = (c.tag & ((1 << LOAD_SEQ_SHIFT) - 1)) as usize * 512;
            if let Some(a) = window.iter_mut().find(|a| a.seq == seq) {
                match c.buffer.as_ref().filter(|_| ok) {
                    Some(b) => {
                        let piece = b.as_slice();
                        let n = piece.len().min(a.data.len().saturating_sub(at));
                        a.data[at..at + n].copy_from_slice(&piece[..n]);
                        a.back += n;
                    }
                    // Failed (or came back without its buffer): the read is done, and
                    // fails the load if the loader needs it.
                    None => {
                        a.failed = true;
                        a.back = a.data.len();
                    }
                }
            }
        }
        if let Some(b) = &c.buffer {
            match &mut self.phase {
                Phase::WaitHead => {
                    self.head = if ok {
                        b.as_slice().to_vec()
                    } else {
                        alloc::vec![0; 4]
                    };
                }
                Phase::Head | Phase::Load { .. } | Phase::Bind { .. } => {}
            }
        }
        if let Some(b) = c.buffer {
            let _ = pool.release(b);
        }
    }

    fn done(&self) -> bool {
        self.done
    }

    fn cancel(&mut self) {}

    fn io_path(&self) -> bool {
        false
    }

    fn progress(&self, out: &mut dyn Write, _now: u64) -> fmt::Result {
        write!(out, "looking for snapshot stores")
    }

    fn report(&mut self, out: &mut dyn Write, _now: u64) -> fmt::Result {
        if let Some((_, binding)) = &self.adopt {
            let name = escaped(binding.name.as_bytes());
            return match (&self.error, self.found) {
                (Some(e), _) => writeln!(out, "error: snapshot {name}: {e}"),
                (None, 0) => writeln!(
                    out,
                    "error: snapshot {name}: the store could not be attached"
                ),
                (None, _) if self.write_binding => writeln!(
                    out,
                    "attached snapshot {name}; its binding is written to the store, so it comes back after a reboot"
                ),
                (None, _) => writeln!(
                    out,
                    "attached snapshot {name} (the store on disk is unchanged; until reboot)"
                ),
            };
        }
        if self.found > 0 {
            writeln!(
                out,
                "{} snapshot(s) back from their stores (see 'snapshot list')",
                self.found
            )?;
        }
        Ok(())
    }
}

/// Operator's words for a store that does not load (the loader's error names the rest).
fn load_error_text(e: LoadError) -> String {
    match e {
        LoadError::ChunkTooLarge {
            chunk_sectors,
            max_sectors,
        } => alloc::format!(
            "its chunk size ({} KiB) is above the largest served ({} KiB)",
            u64::from(chunk_sectors) / 2,
            max_sectors / 2
        ),
        LoadError::OutOfMemory => {
            String::from("not enough memory for its exception table (the other stores keep theirs)")
        }
        e => alloc::format!("{e:?}"),
    }
}
