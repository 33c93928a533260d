//! The appliance's disks: PCI discovery and driver bring-up at boot, the table of block
//! devices with their DMA buffer pools, and the completion path of the main loop.
//!
//! Interrupts: every device vector (0x30..=0xEF) runs [`on_device_interrupt`], which marks
//! the vector pending in the drivers' `VectorRegistry` and wakes the main loop; the loop
//! calls [`poll`], which acknowledges each pending queue to its driver and drains its
//! completions with a budget. Nothing on this path allocates.

pub mod tasks;

use alloc::boxed::Box;
use alloc::vec::Vec;

use drivers::block::{BlockDevice, BufferPool, Completion};
use drivers::hal::{ConfigMechanism, EcamConfigAccess, PortConfigAccess};
use drivers::info::{disk_name, DeviceInfo};
use drivers::msix::VectorRegistry;
use drivers::pci::{enumerate, ScanMode};
use drivers::virtio_blk::{self, VirtioBlkConfig};

use crate::arch::{apic, interrupts};
use crate::platform::{KernelHal, KernelPorts};
use crate::{executor, memory};

/// Largest transfer the console tools and pools use.
pub const MAX_TRANSFER: usize = 128 * 1024;
/// Completions drained per device per loop iteration.
const POLL_BUDGET: usize = 64;

/// Vector → (device, queue) table shared with the interrupt handler.
pub static REGISTRY: VectorRegistry = VectorRegistry::new();

/// One block device and its buffers.
pub struct Disk {
    /// The driver.
    pub device: Box<dyn BlockDevice + Send>,
    /// DMA buffers for requests to this device, `queue_depth` of `buffer_size` bytes.
    pub pool: BufferPool,
    /// Interrupts seen for this device (counted by the main loop).
    pub interrupts: u64,
}

impl Disk {
    /// The device's name.
    pub fn name(&self) -> drivers::info::DeviceName {
        self.device.info().name
    }
}

/// Every disk, and the devices that failed to initialise.
pub struct Storage {
    /// Working devices, in PCI order (index = the registry's device number).
    pub disks: Vec<Disk>,
    /// Devices that failed to initialise, with their reason.
    pub failed: Vec<DeviceInfo>,
    /// Disks (bit = index, first 64) whose last poll ran out of budget.
    repoll: u64,
}

impl Storage {
    /// Finds a disk by name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.disks.iter().position(|d| d.name().as_str() == name)
    }
}

static STORAGE: spin::Mutex<Storage> = spin::Mutex::new(Storage {
    disks: Vec::new(),
    failed: Vec::new(),
    repoll: 0,
});

/// Runs `f` on the storage table (main loop only; never from an interrupt handler).
pub fn with<R>(f: impl FnOnce(&mut Storage) -> R) -> R {
    f(&mut STORAGE.lock())
}

fn on_device_interrupt(vector: u8) {
    REGISTRY.dispatch(vector);
    executor::wake();
}

/// Finds and starts every supported disk. Failures are recorded, never fatal.
pub fn init(ecam: Option<&crate::acpi::EcamWindow>) {
    for vector in interrupts::DEVICE_VECTORS {
        interrupts::register(vector, on_device_interrupt);
    }
    let hal = KernelHal;
    let ports = PortConfigAccess::new(KernelPorts);
    let cfg = match ecam.filter(|w| w.segment == 0 && w.start_bus == 0) {
        Some(w) => {
            let len = (usize::from(w.end_bus) + 1) << 20;
            // SAFETY: the MCFG window is PCI configuration space that this kernel alone
            // drives; it is not RAM.
            match unsafe { drivers::hal::map_region(&hal, w.base, len) } {
                Ok(region) => {
                    ConfigMechanism::Ecam(EcamConfigAccess::new(region, w.start_bus, w.end_bus))
                }
                Err(e) => {
                    log::warn!(
                        "PCI ECAM window at {:#x} unusable ({e}); using ports",
                        w.base
                    );
                    ConfigMechanism::Ports(ports)
                }
            }
        }
        None => ConfigMechanism::Ports(ports),
    };
    let functions = enumerate(&cfg, ScanMode::FollowBridges);
    log::info!("PCI: {} functions", functions.len());
    let ctx = virtio_blk::probe::ProbeContext {
        cfg: &cfg,
        mapper: &hal,
        registry: &REGISTRY,
        apic_id: apic::id(),
    };
    let mut storage = STORAGE.lock();
    for (vd, function) in functions
        .iter()
        .filter(|f| virtio_blk::is_virtio_blk(f))
        .enumerate()
    {
        let name = disk_name("vd", vd as u32);
        let index = storage.disks.len() as u16;
        let config = VirtioBlkConfig {
            max_transfer_bytes: MAX_TRANSFER as u32,
            ..VirtioBlkConfig::default()
        };
        match virtio_blk::probe::<KernelHal, _, _>(&ctx, function, index, name, config) {
            Ok(device) => {
                let geometry = device.geometry();
                let depth = usize::from(geometry.queue_depth).max(1);
                match BufferPool::new::<KernelHal>(index, depth, MAX_TRANSFER) {
                    Ok(pool) => {
                        log::info!(
                            "{name}: virtio-blk {} MiB, {}-byte blocks, queue depth {depth}",
                            (geometry.capacity_blocks * u64::from(geometry.block_size)) >> 20,
                            geometry.block_size
                        );
                        storage.disks.push(Disk {
                            device: Box::new(device),
                            pool,
                            interrupts: 0,
                        });
                    }
                    Err(e) => {
                        log::error!("{name}: no memory for its buffer pool: {e}");
                        storage.failed.push(DeviceInfo::init_failed(
                            name,
                            "virtio-blk",
                            Some(function.addr),
                            drivers::info::reason(format_args!("no DMA memory for buffers: {e}")),
                        ));
                    }
                }
            }
            Err(failure) => storage.failed.push(failure.info),
        }
    }
    let m = memory::stats();
    log::debug!(
        "storage up: {} disks, {} frames free",
        storage.disks.len(),
        m.frames_free
    );
}

/// Drains completions of devices that interrupted, handing each to `sink(disk, completion)`.
/// Returns true when a device has more completions than the budget allowed.
pub fn poll(storage: &mut Storage, sink: &mut dyn FnMut(&mut Disk, usize, Completion)) -> bool {
    let mut pending: u64 = core::mem::take(&mut storage.repoll); // disks to poll (first 64)
    REGISTRY.take_pending(|owner| {
        let d = usize::from(owner.device);
        if let Some(disk) = storage.disks.get_mut(d) {
            disk.device.interrupt(owner.queue);
            disk.interrupts += 1;
            if d < 64 {
                pending |= 1 << d;
            }
        }
    });
    let mut more = false;
    let mut storage_repoll = 0u64;
    for (d, disk) in storage.disks.iter_mut().enumerate() {
        // Devices that interrupted or still had completions; all devices beyond the 64th.
        if d < 64 && pending & (1 << d) == 0 {
            continue;
        }
        let mut batch = CompletionBatch::new();
        let outcome = disk
            .device
            .poll_completions(POLL_BUDGET, &mut |c| batch.push(c));
        for c in batch.drain() {
            sink(disk, d, c);
        }
        if outcome.more && d < 64 {
            more = true;
            storage_repoll |= 1 << d;
        }
    }
    storage.repoll = storage_repoll;
    more
}

/// Completions of one poll, held on the stack so the sink can use the disk afterwards.
struct CompletionBatch {
    items: [Option<Completion>; POLL_BUDGET],
    len: usize,
}

impl CompletionBatch {
    fn new() -> Self {
        CompletionBatch {
            items: [const { None }; POLL_BUDGET],
            len: 0,
        }
    }
    fn push(&mut self, c: Completion) {
        if self.len < POLL_BUDGET {
            self.items[self.len] = Some(c);
            self.len += 1;
        }
    }
    fn drain(&mut self) -> impl Iterator<Item = Completion> + '_ {
        let n = self.len;
        self.len = 0;
        self.items[..n].iter_mut().filter_map(Option::take)
    }
}
