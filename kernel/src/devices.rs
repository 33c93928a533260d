//! The appliance's devices: PCI enumeration and every probe at boot (virtio-blk, NVMe, the
//! first virtio-net NIC), and the interrupt side of the disks' completion path. The volume
//! logic itself (origins, snapshots, tasks, discovery) is the `volume` crate; [`Storage`]
//! wraps its [`::volume::Volumes`] with what only the bare-metal kernel has (NVMe controllers,
//! the interrupt servicer, devices that failed to come up). [`init`] returns what it found
//! by value: the main loop owns the disks, `net` brings up the NIC.
//!
//! Interrupts: every device vector (0x30..=0xEF) runs [`on_device_interrupt`], which marks
//! the vector pending in the drivers' `VectorRegistry` and wakes the main loop; the loop
//! calls [`poll`], which acknowledges each pending queue to its driver and drains its
//! completions with a budget. Nothing on this path allocates.

pub use ::volume::{Target, Volumes, MAX_TRANSFER};

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ops::{Deref, DerefMut};

use ::volume::{Platform, Ports};
use drivers::block::{BlockDevice, BufferPool};
use drivers::hal::{ConfigAccess, ConfigMechanism, EcamConfigAccess, MmioMapper, PortConfigAccess};
use drivers::info::DeviceInfo;
use drivers::msix::VectorRegistry;
use drivers::nvme::{self, MmioRegisters, NvmeConfig, NvmeController};
use drivers::pci::{enumerate, ScanMode};
use drivers::service::{discover_virtio_blk, BoxedDevice, Servicer};
use drivers::virtio::ProbeContext;
use drivers::virtio_blk::VirtioBlkConfig;
use drivers::virtio_net::{self, VirtioNetConfig, VirtioNetPci};

use crate::arch::{apic, interrupts};
use crate::platform::{self, KernelHal, KernelPorts};
use crate::{executor, memory};

/// Largest transfer for NVMe namespaces (QEMU's MDTS; larger ones are split by the driver),
/// so a single request exercises PRP lists.
pub const NVME_MAX_TRANSFER: usize = 512 * 1024;
/// Largest request a virtio-blk device is set up to take (QEMU offers no `size_max`): one
/// descriptor of a lent DMA buffer, so a snapshot engine's 512 KiB copy goes down in one
/// request from its copy buffer. Its pool buffers (the console tools, NBD, bounce buffers)
/// stay at [`MAX_TRANSFER`].
pub const VIRTIO_MAX_TRANSFER: usize = 512 * 1024;
/// Requests in flight per NVMe namespace.
pub const NVME_DEPTH: u16 = 128;
/// Completions drained per device per loop iteration.
const POLL_BUDGET: usize = 64;

/// Vector → (device, queue) table shared with the interrupt handler.
pub static REGISTRY: VectorRegistry = VectorRegistry::new();

/// The volume layer with the kernel's own parts of the disks.
pub struct Storage {
    /// Devices, pools, origins and what discovery found (the `volume` crate).
    pub vol: Volumes,
    /// Devices that failed to initialise, with their reason.
    pub failed: Vec<DeviceInfo>,
    /// NVMe controllers (their namespaces are in `devices`).
    pub controllers: Vec<NvmeController<MmioRegisters>>,
    servicer: Servicer,
    next_housekeeping: u64,
}

impl Deref for Storage {
    type Target = Volumes;
    fn deref(&self) -> &Volumes {
        &self.vol
    }
}

impl DerefMut for Storage {
    fn deref_mut(&mut self) -> &mut Volumes {
        &mut self.vol
    }
}

/// The volume layer's DMA memory and clocks on this machine.
const PLATFORM: Platform = Platform::new::<KernelHal>(crate::time::uptime_ns, crate::rtc::now);

/// The clock NVMe bring-up deadlines and command timeouts use.
static CLOCK: fn() -> u64 = crate::time::uptime_ns;
/// How often NVMe command deadlines are checked.
const HOUSEKEEPING_NS: u64 = 100_000_000;

/// What [`init`] found.
pub struct Devices {
    /// The disks.
    pub storage: Storage,
    /// The first virtio-net NIC, probed (not when the network is off).
    pub nic: Option<VirtioNetPci<KernelHal>>,
}

fn on_device_interrupt(vector: u8) {
    REGISTRY.dispatch(vector);
    executor::wake();
}

/// Finds and starts every supported disk, and the first NIC when `want_nic` (the network is
/// not `ip=off`). Failures are recorded, never fatal.
pub fn init(ecam: Option<&crate::acpi::EcamWindow>, want_nic: bool) -> Devices {
    for vector in interrupts::DEVICE_VECTORS {
        interrupts::register(vector, on_device_interrupt);
    }
    let hal = KernelHal;
    let ports = PortConfigAccess::new(KernelPorts);
    let window = ecam.filter(|w| w.segment == 0 && w.start_bus == 0);
    let cfg = match window.map(|w| (w, platform::map_ecam(w))) {
        Some((w, Ok(region))) => {
            ConfigMechanism::Ecam(EcamConfigAccess::new(region, w.start_bus, w.end_bus))
        }
        Some((w, Err(e))) => {
            log::warn!(
                "PCI ECAM window at {:#x} unusable ({e}); using ports",
                w.base
            );
            ConfigMechanism::Ports(ports)
        }
        None => ConfigMechanism::Ports(ports),
    };
    let functions = enumerate(&cfg, ScanMode::FollowBridges);
    log::info!("PCI: {} functions", functions.len());
    let ctx = ProbeContext {
        cfg: &cfg,
        mapper: &hal,
        registry: &REGISTRY,
        apic_id: apic::id(),
    };
    let config = VirtioBlkConfig {
        max_transfer_bytes: VIRTIO_MAX_TRANSFER as u32,
        ..VirtioBlkConfig::default()
    };
    let found = discover_virtio_blk::<KernelHal, _, _>(&ctx, &functions, 0, config);
    let mut storage = Storage {
        vol: Volumes::new(PLATFORM),
        failed: found.failed,
        controllers: Vec::new(),
        servicer: Servicer::new(),
        next_housekeeping: 0,
    };
    let mut full = false;
    for device in found.devices {
        // After a device found no memory at all, later ones cannot keep their index.
        if full {
            storage.skip(device.info());
        } else if !storage.add(device, MAX_TRANSFER) {
            full = true;
        }
    }
    let nvme_ctx = nvme::ProbeContext {
        cfg: &cfg,
        mapper: &hal,
        registry: &REGISTRY,
        apic_id: apic::id(),
        clock: &CLOCK,
    };
    for (n, function) in functions.iter().filter(|f| nvme::is_nvme(f)).enumerate() {
        let first = storage.devices.len() as u16;
        let config = NvmeConfig {
            max_depth: NVME_DEPTH,
            max_transfer_bytes: NVME_MAX_TRANSFER as u32,
            ..NvmeConfig::default()
        };
        match nvme::probe::<KernelHal, _, _>(&nvme_ctx, function, n as u32, first, config) {
            Ok(attached) => {
                if let Some(info) = attached.controller.controller_info() {
                    log::info!("{info}");
                }
                for namespace in attached.namespaces {
                    if full {
                        storage.skip(namespace.info());
                    } else if !storage.add(Box::new(namespace), NVME_MAX_TRANSFER) {
                        full = true;
                    }
                }
                storage.failed.extend(attached.failed);
                storage.controllers.push(attached.controller);
            }
            Err(failure) => storage.failed.push(failure.info),
        }
    }
    let nic = probe_nic(&ctx, &functions, want_nic);
    let m = memory::stats();
    log::debug!(
        "storage up: {} disks, {} frames free",
        storage.devices.len(),
        m.frames_free
    );
    Devices { storage, nic }
}

/// Probes the first virtio-net function (later ones are listed and left alone).
fn probe_nic<C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    functions: &[drivers::pci::PciFunction],
    want: bool,
) -> Option<VirtioNetPci<KernelHal>> {
    let mut nics = functions.iter().filter(|f| virtio_net::is_virtio_net(f));
    let function = nics.next()?;
    for other in nics {
        log::info!("net: second NIC at {} left unused", other.addr);
    }
    if !want {
        log::info!("net: ip=off, NIC at {} left down", function.addr);
        return None;
    }
    let seed = crate::arch::cpu::rdtsc();
    virtio_net::probe::<KernelHal, _, _>(
        ctx,
        function,
        crate::net::NET_DEVICE_INDEX,
        VirtioNetConfig::default(),
        seed,
    )
    .map_err(|e| log::error!("net: NIC at {} unusable: {e}", function.addr))
    .ok()
}

impl Storage {
    /// Adds a working device with a buffer pool of `queue_depth` buffers of its largest
    /// transfer, at most `largest` bytes each (virtio-blk: [`MAX_TRANSFER`], its larger limit
    /// is for the engine's lent copy buffers; NVMe: its transfer limit). Returns false (and records the device as failed) when there is no memory for
    /// the pool: devices after it would carry the wrong index, so discovery stops there.
    fn add(&mut self, device: BoxedDevice, largest: usize) -> bool {
        let geometry = device.geometry();
        let info = device.info();
        let depth = usize::from(geometry.queue_depth).max(1);
        let index = self.devices.len() as u16;
        let size = (geometry.max_transfer_bytes as usize).clamp(4096, largest);
        // One buffer per queue slot, but no device's pool takes more than an eighth of the
        // free frames (at least 8 buffers): a small appliance still brings up every disk.
        let budget = (memory::stats().frames_free * crate::frames::FRAME_SIZE / 8) as usize;
        let wanted = depth.min((budget / size).max(8));
        // Memory short: a smaller pool (less depth) beats a missing disk.
        let pool = [wanted, 8.min(wanted), 1]
            .into_iter()
            .find_map(|n| {
                BufferPool::new::<KernelHal>(index, n, size)
                    .ok()
                    .map(|p| (n, p))
            })
            .ok_or(drivers::hal::HalError::DmaExhausted {
                pages: size.div_ceil(4096),
            });
        match pool {
            Ok((count, pool)) => {
                log::info!(
                    "{}: {geometry}, {count} DMA buffers of {} KiB",
                    info.name,
                    size / 1024
                );
                self.vol.add_device(device, pool);
                true
            }
            Err(e) => {
                log::error!("{}: no memory for its buffer pool: {e}", info.name);
                self.fail(info, format_args!("no DMA memory for buffers: {e}"));
                false
            }
        }
    }
}

impl Storage {
    /// Records a device left out because memory ran out before it.
    fn skip(&mut self, info: DeviceInfo) {
        log::error!("{}: left out: no DMA memory for its buffers", info.name);
        self.fail(
            info,
            format_args!("left out: no DMA memory for its buffers"),
        );
    }

    /// Records device `info` as failed, for `why`.
    fn fail(&mut self, info: DeviceInfo, why: core::fmt::Arguments<'_>) {
        let why = drivers::info::reason(why);
        self.failed.push(DeviceInfo::init_failed(
            info.name,
            info.driver,
            info.pci,
            why,
        ));
    }
}

/// Sends the device I/O for volume requests submitted since the last [`poll`]
/// (`Volumes::issue_volumes`). Returns true when an engine has finished requests to deliver.
pub fn issue_volumes(storage: &mut Storage) -> bool {
    storage.vol.issue_volumes()
}

/// Holds back device notifications until [`unplug`] (`Volumes::plug`).
pub fn plug(storage: &mut Storage) {
    storage.vol.plug();
}

/// Sends the notifications held back since [`plug`].
pub fn unplug(storage: &mut Storage) {
    storage.vol.unplug();
}

/// Timer work of the storage layer (called every loop iteration): auto-extend; every
/// 100 ms, NVMe command deadlines and virtio-blk devices that stopped answering. Returns
/// true when a device has work to finish.
pub fn housekeeping(storage: &mut Storage, now: u64) -> bool {
    // Every iteration: an extension must start before a burst of writes fills the store.
    storage.vol.autoextend();
    if now < storage.next_housekeeping {
        return false;
    }
    storage.next_housekeeping = now + HOUSEKEEPING_NS;
    // Every controller is checked (no short circuit).
    let mut more = false;
    for controller in &storage.controllers {
        more |= controller.check_timeouts();
    }
    // Devices without deadlines of their own (virtio-blk): one that stopped answering.
    for device in storage.devices.iter_mut() {
        more |= device.check_timeouts(now);
    }
    more
}

/// One round of the completion path (`Volumes::poll`): the `Servicer` takes fired vectors
/// and drains those devices with a budget; each completion goes back to the client that
/// issued it through `ports`. Returns true when work remains (run again before halting).
pub fn poll(storage: &mut Storage, now: u64, ports: &mut Ports<'_>) -> bool {
    let Storage { vol, servicer, .. } = storage;
    vol.poll(
        now,
        &mut |devices, route| servicer.run(&REGISTRY, devices, POLL_BUDGET, route),
        ports,
    )
}
