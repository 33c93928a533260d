//! [`NvmeNamespace`]: one [`BlockDevice`] per namespace, all sharing their controller through
//! `Arc<spin::Mutex<Controller>>`, and [`NvmeController`], the kernel's handle on the
//! controller itself.
//!
//! Everything runs on the main loop, so the lock is never contended; it is taken with
//! `try_lock` anyway, and a busy lock is back-pressure (`QueueFull` / "poll again"), never a
//! spin. Completions are handed to the caller's sink with the lock released, so a sink may
//! submit to a sibling namespace.

use super::controller::{Controller, ControllerInfo};
use super::regs::RegisterAccess;
use super::status::Status;
use crate::block::{
    BlockDevice, BlockError, BlockRequest, BlockStats, Completion, Geometry, PollOutcome, Rejected,
};
use crate::info::{reason, DeviceInfo, DeviceName};
use alloc::sync::Arc;
use alloc::vec::Vec;
use spin::Mutex;

/// A namespace as a block device (`nvme0n1`, …).
pub struct NvmeNamespace<R> {
    controller: Arc<Mutex<Controller<R>>>,
    index: usize,
    geometry: Geometry,
    name: DeviceName,
    /// This namespace holds a plug on the controller (see [`BlockDevice::plug`]).
    plugged: bool,
}

impl<R> core::fmt::Debug for NvmeNamespace<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NvmeNamespace")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish()
    }
}

/// The kernel's handle on a controller: console information, periodic deadline checks,
/// shutdown. Cloning it is cheap.
pub struct NvmeController<R> {
    controller: Arc<Mutex<Controller<R>>>,
}

impl<R> Clone for NvmeController<R> {
    fn clone(&self) -> Self {
        Self {
            controller: self.controller.clone(),
        }
    }
}

impl<R> core::fmt::Debug for NvmeController<R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NvmeController").finish_non_exhaustive()
    }
}

/// Splits a controller into its handle and one block device per usable namespace, in order.
pub fn split<R: RegisterAccess>(
    controller: Controller<R>,
) -> (NvmeController<R>, Vec<NvmeNamespace<R>>) {
    let count = controller.namespace_count();
    let infos: Vec<(Geometry, DeviceName)> = (0..count)
        .map(|i| {
            let geometry = controller.geometry(i).unwrap_or_default();
            let name = controller
                .namespace_info(i)
                .map(|info| info.name)
                .unwrap_or_default();
            (geometry, name)
        })
        .collect();
    let shared = Arc::new(Mutex::new(controller));
    let namespaces = infos
        .into_iter()
        .enumerate()
        .map(|(index, (geometry, name))| NvmeNamespace {
            controller: shared.clone(),
            index,
            geometry,
            name,
            plugged: false,
        })
        .collect();
    (NvmeController { controller: shared }, namespaces)
}

impl<R: RegisterAccess> NvmeController<R> {
    /// Model, serial, firmware, queue pairs, MDTS, write cache, state.
    pub fn controller_info(&self) -> Option<ControllerInfo> {
        self.controller.try_lock().map(|c| c.controller_info())
    }

    /// Looks for commands past their deadline and a fatal controller status. Call it from the
    /// main loop's timer work (every 100 ms or so; never from an interrupt handler): a
    /// controller that stops interrupting is only noticed here. Returns whether the
    /// controller has failed; when it has, the namespaces' wake vectors are marked pending so
    /// the next round delivers their aborted requests.
    pub fn check_timeouts(&self) -> bool {
        self.controller
            .try_lock()
            .is_some_and(|mut c| c.check_timeouts())
    }

    /// The last NVMe status a request of namespace `index` failed with.
    pub fn last_status(&self, index: usize) -> Option<Status> {
        self.controller
            .try_lock()
            .and_then(|c| c.last_status(index))
    }

    /// Orderly shutdown (no I/O in flight): deletes the I/O queues and sets `CC.SHN`.
    pub fn shutdown(&self) -> bool {
        self.controller.try_lock().is_some_and(|mut c| c.shutdown())
    }

    /// Runs `f` on the controller (tests and diagnostics).
    pub fn with<T>(&self, f: impl FnOnce(&mut Controller<R>) -> T) -> Option<T> {
        self.controller.try_lock().map(|mut c| f(&mut c))
    }
}

impl<R: RegisterAccess> NvmeNamespace<R> {
    /// The namespace's position among its controller's usable namespaces.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The controller handle.
    pub fn controller(&self) -> NvmeController<R> {
        NvmeController {
            controller: self.controller.clone(),
        }
    }
}

impl<R: RegisterAccess> BlockDevice for NvmeNamespace<R> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn plug(&mut self) {
        if !self.plugged {
            if let Some(mut c) = self.controller.try_lock() {
                c.plug();
                self.plugged = true;
            }
        }
    }

    fn unplug(&mut self) {
        if self.plugged {
            if let Some(mut c) = self.controller.try_lock() {
                c.unplug();
                self.plugged = false;
            }
        }
    }

    fn submit(&mut self, request: BlockRequest) -> Result<(), Rejected> {
        match self.controller.try_lock() {
            Some(mut c) => c.submit(self.index, request),
            None => Err(Rejected {
                error: BlockError::QueueFull,
                request,
            }),
        }
    }

    fn poll_completions(&mut self, budget: usize, sink: &mut dyn FnMut(Completion)) -> PollOutcome {
        let Some(woke_others) = self
            .controller
            .try_lock()
            .map(|mut c| c.service(self.index))
        else {
            return PollOutcome {
                completed: 0,
                more: true,
            };
        };
        let mut completed = 0;
        while completed < budget {
            // Lock per completion so the sink runs unlocked.
            let next = self
                .controller
                .try_lock()
                .and_then(|mut c| c.pop_ready(self.index));
            let Some(completion) = next else {
                break;
            };
            sink(completion);
            completed += 1;
        }
        let more = woke_others
            || self
                .controller
                .try_lock()
                .is_none_or(|c| c.has_ready(self.index) || c.aborting());
        PollOutcome { completed, more }
    }

    fn interrupt(&mut self, queue: u16) {
        if let Some(mut c) = self.controller.try_lock() {
            c.note_interrupt(self.index, queue);
        }
    }

    fn in_flight(&self) -> usize {
        self.controller
            .try_lock()
            .map_or(0, |c| c.in_flight(self.index))
    }

    fn stats(&self) -> BlockStats {
        self.controller
            .try_lock()
            .map(|c| c.stats(self.index))
            .unwrap_or_default()
    }

    fn info(&self) -> DeviceInfo {
        self.controller
            .try_lock()
            .and_then(|c| c.namespace_info(self.index))
            .unwrap_or_else(|| {
                let mut info = DeviceInfo::new(self.name, "nvme");
                info.geometry = Some(self.geometry);
                info.state = crate::info::DeviceState::Failed(reason(format_args!("busy")));
                info
            })
    }
}
