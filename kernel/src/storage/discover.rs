//! Rediscovery at boot: every device is read for a dm-snapshot store (magic `SnAp` in its
//! first block). A store with snapfw's binding is loaded with the `snapshot` crate's loader
//! and attached to the engine of its origin, found by serial number and capacity; the
//! snapshot is back under its name with no command from the operator. Stores without a
//! binding (made by Linux) and stores whose origin is missing are listed and left untouched.
//! It runs as the first task of the main loop, through the ordinary interrupt-driven queues.

use core::fmt::{self, Write};

use alloc::string::String;
use alloc::vec::Vec;
use drivers::block::{BlockRequest, BufferPool, Completion};
use snapshot::format::{FreeExtent, SNAP_MAGIC};
use snapshot::{Binding, BindingError, LoadParams, LoadedStore, Loader, SnapshotConfig};

use super::tasks::Task;
use super::volume::{Snap, SnapState};
use super::{Storage, Target};

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

// Only one scan exists, at boot: the size of the loading state does not matter.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// Read the first block of `disk`.
    Head,
    /// Waiting for the first block.
    WaitHead,
    /// Loading: the loader, the binding, the origin, the bytes of the current read.
    Load {
        loader: Loader,
        binding: Binding,
        origin: usize,
        read: Vec<u8>,
        want: usize,
        sector: u64,
        waiting: bool,
    },
}

/// The boot-time scan, or the adoption of one store (`snapshot attach`).
pub struct DiscoverTask {
    disk: usize,
    /// Where on `disk` the walk is: the sector of the block being examined. A device is
    /// walked from sector 0, store by store and free extent by free extent (see
    /// `storage::extents`), until a block that is neither.
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
    /// Why adoption failed.
    error: Option<String>,
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
            error: None,
        }
    }

    /// Adopts the store on `cow` (e.g. one Linux made) as snapshot `binding.name` of `origin`.
    /// The store is not written: it stays as it is on disk, and the name lasts until reboot.
    pub fn adopt(cow: usize, origin: usize, binding: Binding) -> DiscoverTask {
        DiscoverTask {
            disk: cow,
            adopt: Some((origin, binding)),
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
    fn walk_to(&mut self, st: &Storage, next: u64) {
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
    fn after_store(&mut self, st: &Storage) {
        let next = self.probe.saturating_add(self.region);
        self.walk_to(st, next);
    }

    /// Records a store found here that is not served, and goes on behind it.
    fn unserved(&mut self, st: &mut Storage, why: String) {
        st.unserved.push(Unserved {
            disk: self.disk,
            start: self.probe,
            why,
        });
        self.after_store(st);
    }

    /// Decides what the first block holds.
    fn examine(&mut self, st: &mut Storage) {
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
            match FreeExtent::decode(&head) {
                Some(free) if free.start == self.probe && free.sectors > 0 => {
                    let next = self.probe.saturating_add(free.sectors);
                    self.walk_to(st, next);
                }
                _ => self.next_disk(),
            }
            return;
        }
        if let Some((origin, binding)) = self.adopt.clone() {
            self.start_load(st, binding, origin);
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
                    "a store whose binding places it at sector {} (+{}), found at sector {}; left untouched",
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
                let serial = binding.origin_serial.as_bytes();
                let origin = (0..st.devices.len()).find(|&d| {
                    let g = st.devices[d].geometry();
                    let sectors = g.capacity_blocks * u64::from(g.block_size / 512);
                    d != self.disk
                        && st.devices[d].info().serial.as_str().as_bytes() == serial
                        && sectors == binding.origin_sectors
                });
                let Some(origin) = origin else {
                    let why = alloc::format!(
                        "snapshot '{}': its origin (serial '{}', {} sectors) is missing; store left untouched",
                        String::from_utf8_lossy(binding.name.as_bytes()),
                        String::from_utf8_lossy(serial),
                        binding.origin_sectors
                    );
                    log::warn!("{name}: {why}");
                    return self.unserved(st, why);
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

    fn start_load(&mut self, st: &Storage, binding: Binding, origin: usize) {
        let cg = st.devices[self.disk].geometry();
        let og = st.devices[origin].geometry();
        let cow_sectors = self.region;
        let params = LoadParams {
            cow_sectors,
            cow_block_sectors: (cg.block_size / 512).max(1),
            origin_sectors: og.capacity_blocks * u64::from(og.block_size / 512),
            origin_block_sectors: (og.block_size / 512).max(1),
            // Up to one run per COW chunk of the smallest chunk size.
            table_runs: (cow_sectors / 8).clamp(1, 1 << 22) as usize,
        };
        self.phase = Phase::Load {
            loader: Loader::new(params),
            binding,
            origin,
            read: Vec::new(),
            want: 0,
            sector: 0,
            waiting: false,
        };
    }

    fn attach(&mut self, st: &mut Storage, loaded: LoadedStore, binding: Binding, origin: usize) {
        let name = String::from_utf8_lossy(binding.name.as_bytes()).into_owned();
        let cow = st.name(self.disk);
        let origin_index = match st.origin_for(origin) {
            Ok(i) => i,
            Err(e) => {
                log::error!("snapshot {name} on {cow}: {e}");
                self.error = Some(String::from(e));
                return;
            }
        };
        let cg = st.devices[self.disk].geometry();
        let valid = loaded.valid;
        let merging = loaded.merging;
        // Adopted stores are read-only: their maker's view of them is not ours to change.
        let writable =
            self.adopt.is_none() && binding.flags & snapshot::format::BINDING_FLAG_WRITABLE != 0;
        let chunk_sectors = loaded.state.chunk_sectors() as u32;
        let cow_sectors = loaded.state.cow_sectors;
        let cfg = SnapshotConfig {
            chunk_sectors,
            cow_sectors,
            cow_block_sectors: (cg.block_size / 512).max(1),
            cow_fua: cg.fua,
            writable,
            table_runs: (cow_sectors / u64::from(chunk_sectors.max(1))).clamp(1, 1 << 22) as usize,
            // An adopted store stays exactly as its maker wrote it: no binding is added.
            binding: if self.adopt.is_some() {
                None
            } else {
                Some(binding)
            },
        };
        let instance = Storage::new_instance();
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
                });
                self.found += 1;
                log::info!(
                    "snapshot {name}: store on {cow} attached to {}{}",
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
            }
        }
    }
}

impl Default for DiscoverTask {
    fn default() -> Self {
        Self::new()
    }
}

impl Task for DiscoverTask {
    fn step(&mut self, st: &mut Storage, _now: u64) {
        loop {
            if self.done {
                // Every store is attached: merges found in them may run now (they must
                // first copy into every other snapshot what they overwrite).
                for o in st.origins.iter_mut() {
                    o.engine.resume_merge();
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
                Phase::Load {
                    loader,
                    read,
                    want,
                    sector,
                    waiting,
                    origin,
                    ..
                } => {
                    if *waiting {
                        return;
                    }
                    if *want == 0 {
                        match loader.next_read() {
                            Some(r) => {
                                *want = r.sectors as usize * 512;
                                *sector = r.sector;
                                read.clear();
                            }
                            // `snapshot attach` on an origin NBD clients write: their
                            // writes already sent straight to the device come back first
                            // (from the attach on, its requests go through the engine).
                            None if st.direct_nbd_in_flight(*origin) > 0 => return,
                            None => {
                                let Phase::Load {
                                    loader,
                                    binding,
                                    origin,
                                    ..
                                } = core::mem::replace(&mut self.phase, Phase::Head)
                                else {
                                    return;
                                };
                                match loader.finish() {
                                    Ok(loaded) => {
                                        self.attach(st, loaded, binding, origin);
                                        self.after_store(st);
                                    }
                                    Err(e) => {
                                        self.error =
                                            Some(alloc::format!("the store does not load: {e:?}"));
                                        let why = alloc::format!("a snapshot store that does not load: {e:?}; left untouched");
                                        log::error!("{}: {why}", st.name(self.disk));
                                        self.unserved(st, why);
                                    }
                                }
                                continue;
                            }
                        }
                    }
                    if read.len() >= *want {
                        let data = core::mem::take(read);
                        *want = 0;
                        if loader.supply(&data).is_err() {
                            // The loader records the error; `finish` reports it.
                        }
                        continue;
                    }
                    // Read the next piece of the loader's read.
                    let Some(mut buf) = st.pool(target).and_then(|p| p.acquire()) else {
                        return;
                    };
                    let piece = (*want - read.len()).min(buf.capacity());
                    let _ = buf.set_len(piece);
                    let lba = ((self.probe + *sector) * 512 + read.len() as u64) / block as u64;
                    match st.submit_to(target, BlockRequest::read(1, lba, buf)) {
                        Ok(()) => {
                            *waiting = true;
                            return;
                        }
                        Err((_, b)) => {
                            if let (Some(b), Some(p)) = (b, st.pool(target)) {
                                let _ = p.release(b);
                            }
                            log::error!(
                                "{}: reading its snapshot store failed",
                                st.name(self.disk)
                            );
                            self.next_disk();
                        }
                    }
                }
            }
        }
    }

    fn complete(&mut self, pool: &mut BufferPool, c: Completion, _now: u64) {
        let ok = c.result.is_ok();
        if let Some(b) = &c.buffer {
            match &mut self.phase {
                Phase::WaitHead => {
                    self.head = if ok {
                        b.as_slice().to_vec()
                    } else {
                        alloc::vec![0; 4]
                    };
                }
                Phase::Load {
                    read,
                    waiting,
                    want,
                    ..
                } => {
                    *waiting = false;
                    if ok {
                        read.extend_from_slice(b.as_slice());
                    } else {
                        // Feed zeroes: the loader then fails with a clear error.
                        read.resize(*want, 0);
                    }
                }
                Phase::Head => {}
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
            let name = String::from_utf8_lossy(binding.name.as_bytes());
            return match (&self.error, self.found) {
                (Some(e), _) => writeln!(out, "error: snapshot {name}: {e}"),
                (None, 0) => writeln!(
                    out,
                    "error: snapshot {name}: the store could not be attached"
                ),
                (None, _) => writeln!(
                    out,
                    "attached snapshot {name} (the store on disk is unchanged)"
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
