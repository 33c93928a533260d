//! Free-extent markers on devices that hold COW stores in regions (`vdb:START+LEN`).
//!
//! Boot discovery walks a device from sector 0: a store's binding gives the end of its
//! region, a free-extent marker (`snapshot::format::FreeExtent`) the end of a gap, and the
//! walk stops at anything else. After a store is created in a region or deleted, every gap
//! before the device's last store gets a marker, so the walk reaches every store. Markers
//! live only in space no store uses; they are written and flushed before the store itself
//! is created, so a crash in between leaves at worst a marker pointing at nothing.

use alloc::vec::Vec;
use drivers::block::{BlockRequest, BufferPool, Completion};
use snapshot::format::FreeExtent;

use crate::{Target, Volumes};

/// Tag of marker writes and their flush (the completion comes back to the running task).
const MARKER_TAG: u64 = 0x4D41_524B;

/// Writes the markers of one device, one request at a time, then flushes it.
pub struct MarkerWriter {
    disk: usize,
    extents: Vec<FreeExtent>,
    next: usize,
    in_flight: bool,
    flushed: bool,
    /// Set when a write or the flush failed.
    pub error: bool,
}

impl MarkerWriter {
    /// The markers `disk` needs for its stores as they are in `st` (plus `extra`, a region
    /// about to be created).
    pub fn new(st: &Volumes, disk: usize, extra: Option<(u64, u64)>) -> MarkerWriter {
        let mut regions: Vec<(u64, u64)> = st
            .origins
            .iter()
            .flat_map(|o| o.snaps.iter())
            .filter(|s| s.cow_disk == disk && !matches!(s.state, crate::origin::SnapState::Deleted))
            .map(|s| (s.cow_start, s.cow_sectors))
            .collect();
        regions.extend(extra);
        let extents = snapshot::format::free_extents(&regions);
        MarkerWriter {
            disk,
            flushed: extents.is_empty(),
            extents,
            next: 0,
            in_flight: false,
            error: false,
        }
    }

    /// True when every marker is written and flushed (or writing failed).
    pub fn done(&self) -> bool {
        self.error || (self.flushed && !self.in_flight)
    }

    /// Issues the next write or the flush.
    pub fn step(&mut self, st: &mut Volumes) {
        if self.done() || self.in_flight {
            return;
        }
        let target = Target::Device(self.disk);
        let request = match self.extents.get(self.next) {
            Some(extent) => {
                let block = st.geometry(target).block_size.max(512);
                let Some(mut buf) = st.pool(target).and_then(|p| p.acquire()) else {
                    return;
                };
                if buf.set_len(block as usize).is_err() {
                    let _ = st.pool(target).map(|p| p.release(buf));
                    self.error = true;
                    return;
                }
                buf.as_mut_slice().fill(0);
                extent.encode(buf.as_mut_slice());
                BlockRequest::write(
                    MARKER_TAG,
                    extent.start * 512 / u64::from(block),
                    buf,
                    false,
                )
            }
            None => BlockRequest::flush(MARKER_TAG),
        };
        match st.submit_to(target, request) {
            Ok(()) => self.in_flight = true,
            Err((drivers::block::BlockError::QueueFull, b)) => {
                if let (Some(b), Some(p)) = (b, st.pool(target)) {
                    let _ = p.release(b);
                }
            }
            Err((_, b)) => {
                if let (Some(b), Some(p)) = (b, st.pool(target)) {
                    let _ = p.release(b);
                }
                self.error = true;
            }
        }
    }

    /// Routes a task's completion: to `markers` while they are being written, otherwise the
    /// buffer goes back to the pool (the task's other I/O is the engine's, not its own).
    pub fn complete_or_release(
        markers: Option<&mut MarkerWriter>,
        pool: &mut BufferPool,
        c: Completion,
    ) {
        match markers {
            Some(m) if !m.done() => m.complete(pool, c),
            _ => {
                if let Some(b) = c.buffer {
                    let _ = pool.release(b);
                }
            }
        }
    }

    /// A completion of a marker request.
    pub fn complete(&mut self, pool: &mut BufferPool, c: Completion) {
        self.in_flight = false;
        if c.result.is_err() {
            self.error = true;
        } else if self.next < self.extents.len() {
            self.next += 1;
        } else {
            self.flushed = true;
        }
        if let Some(b) = c.buffer {
            let _ = pool.release(b);
        }
    }
}
