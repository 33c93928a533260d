//! The main loop's side of interrupts: [`Servicer`] turns fired MSI-X vectors (recorded by
//! [`VectorRegistry::dispatch`] in interrupt context) into budgeted
//! [`BlockDevice::poll_completions`] calls, and remembers devices whose budget ran out so they
//! are polled again on the next round even without a new interrupt.
//!
//! [`discover_virtio_blk`] probes every virtio-blk function in PCI order and builds the device
//! table the servicer works on.

use crate::block::{BlockDevice, Completion};
use crate::hal::{ConfigAccess, MmioMapper};
use crate::info::{disk_name, DeviceInfo};
use crate::msix::VectorRegistry;
use crate::pci::PciFunction;
use crate::virtio::ProbeContext;
use crate::virtio_blk::{self, VirtioBlkConfig};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// A block device as the kernel stores it.
pub type BoxedDevice = Box<dyn BlockDevice + Send>;

/// Most devices a [`Servicer`] tracks (device indices 0..256).
pub const MAX_DEVICES: usize = 256;

/// Lookup of devices by the index their interrupts carry ([`crate::msix::InterruptOwner`]).
pub trait DeviceTable {
    /// The device with `index`, if it exists and is usable.
    fn device(&mut self, index: u16) -> Option<&mut dyn BlockDevice>;
    /// One past the highest index.
    fn count(&self) -> usize;
}

impl DeviceTable for [BoxedDevice] {
    fn device(&mut self, index: u16) -> Option<&mut dyn BlockDevice> {
        match self.get_mut(usize::from(index)) {
            Some(d) => Some(d.as_mut()),
            None => None,
        }
    }

    fn count(&self) -> usize {
        self.len()
    }
}

impl DeviceTable for [Option<BoxedDevice>] {
    fn device(&mut self, index: u16) -> Option<&mut dyn BlockDevice> {
        match self.get_mut(usize::from(index)) {
            Some(Some(d)) => Some(d.as_mut()),
            _ => None,
        }
    }

    fn count(&self) -> usize {
        self.len()
    }
}

/// A set of device indices (fixed size, no allocation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DeviceSet([u64; MAX_DEVICES / 64]);

impl DeviceSet {
    fn insert(&mut self, index: u16) {
        if let Some(word) = self.0.get_mut(usize::from(index) / 64) {
            *word |= 1 << (index % 64);
        }
    }

    fn take(&mut self) -> Self {
        core::mem::take(self)
    }

    fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64u16)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w as u16 * 64 + b)
        })
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
}

/// Per-loop state: which devices still have completions after their budget ran out.
#[derive(Debug, Default)]
pub struct Servicer {
    again: DeviceSet,
}

impl Servicer {
    /// A servicer with nothing pending.
    pub const fn new() -> Self {
        Self {
            again: DeviceSet([0; MAX_DEVICES / 64]),
        }
    }

    /// One round: takes every fired vector from `registry`, tells its device
    /// ([`BlockDevice::interrupt`]), then polls each device that fired (or had completions
    /// left over from the previous round) with `budget` completions, passing them to
    /// `sink(device_index, completion)`.
    ///
    /// Returns `true` when work remains (some device ran out of budget, or a polled device
    /// still has requests in flight): run again before halting. Returns `false` when the loop
    /// may `sti; hlt`.
    pub fn run<D: DeviceTable + ?Sized>(
        &mut self,
        registry: &VectorRegistry,
        devices: &mut D,
        budget: usize,
        sink: &mut dyn FnMut(u16, Completion),
    ) -> bool {
        let mut due = self.again.take();
        registry.take_pending(|owner| {
            if let Some(device) = devices.device(owner.device) {
                device.interrupt(owner.queue);
                due.insert(owner.device);
            }
        });
        // Devices without interrupts are polled whenever they have requests in flight.
        for index in 0..devices.count().min(MAX_DEVICES) as u16 {
            if let Some(device) = devices.device(index) {
                if device.needs_polling() && device.in_flight() > 0 {
                    due.insert(index);
                }
            }
        }
        for index in due.iter() {
            let Some(device) = devices.device(index) else {
                continue;
            };
            let outcome = device.poll_completions(budget, &mut |c| sink(index, c));
            if outcome.more || (device.needs_polling() && device.in_flight() > 0) {
                self.again.insert(index);
            }
        }
        !self.again.is_empty()
    }
}

/// The result of [`discover_virtio_blk`].
#[derive(Default)]
pub struct Discovered {
    /// Working devices; a device's position here is the device index its interrupts carry
    /// (offset by the `first_index` given to discovery).
    pub devices: Vec<BoxedDevice>,
    /// Devices that failed to initialise, for the `devices` command.
    pub failed: Vec<DeviceInfo>,
}

impl core::fmt::Debug for Discovered {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Discovered")
            .field("devices", &self.devices.len())
            .field("failed", &self.failed)
            .finish()
    }
}

/// Probes every virtio-blk function in `functions` (enumeration order = PCI order). Disks are
/// named `vda`, `vdb`, … by their position among virtio-blk functions, so a failed disk keeps
/// its name and does not rename the others. Working device *i* gets device index
/// `first_index + i`.
pub fn discover_virtio_blk<H, C, M>(
    ctx: &ProbeContext<'_, C, M>,
    functions: &[PciFunction],
    first_index: u16,
    config: VirtioBlkConfig,
) -> Discovered
where
    H: virtio_drivers::Hal + 'static,
    C: ConfigAccess + ?Sized,
    M: MmioMapper + ?Sized,
{
    let mut found = Discovered::default();
    for (n, function) in functions
        .iter()
        .filter(|f| virtio_blk::is_virtio_blk(f))
        .enumerate()
    {
        let name = disk_name("vd", n as u32);
        let index = first_index.saturating_add(found.devices.len() as u16);
        match virtio_blk::probe::<H, C, M>(ctx, function, index, name, config) {
            Ok(device) => found.devices.push(Box::new(device)),
            Err(failure) => found.failed.push(failure.info),
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockRequest, RamDisk, RamDiskConfig};
    use crate::msix::InterruptOwner;

    fn disks() -> Vec<BoxedDevice> {
        (0..3)
            .map(|i| {
                Box::new(RamDisk::new(&format!("ram{i}"), RamDiskConfig::default())) as BoxedDevice
            })
            .collect()
    }

    #[test]
    fn services_only_devices_that_fired_and_carries_leftovers() {
        let registry = VectorRegistry::new();
        let mut devices = disks();
        let v1 = registry
            .allocate(InterruptOwner {
                device: 1,
                queue: 0,
            })
            .unwrap();
        let _v2 = registry
            .allocate(InterruptOwner {
                device: 2,
                queue: 0,
            })
            .unwrap();
        for tag in 0..5 {
            devices[1].submit(BlockRequest::flush(tag)).unwrap();
            devices[2].submit(BlockRequest::flush(100 + tag)).unwrap();
        }
        let mut servicer = Servicer::new();
        let mut seen = Vec::new();
        assert!(
            !servicer.run(&registry, devices.as_mut_slice(), 2, &mut |d, c| seen
                .push((d, c.tag)))
        );
        assert!(seen.is_empty(), "no interrupt, no polling");

        registry.dispatch(v1);
        assert!(
            servicer.run(&registry, devices.as_mut_slice(), 2, &mut |d, c| seen
                .push((d, c.tag)))
        );
        assert_eq!(seen, vec![(1, 0), (1, 1)]);
        // No new interrupt: the leftovers of device 1 are polled anyway.
        assert!(
            servicer.run(&registry, devices.as_mut_slice(), 2, &mut |d, c| seen
                .push((d, c.tag)))
        );
        assert!(
            !servicer.run(&registry, devices.as_mut_slice(), 2, &mut |d, c| seen
                .push((d, c.tag)))
        );
        assert_eq!(seen.iter().filter(|(d, _)| *d == 1).count(), 5);
        assert!(seen.iter().all(|(d, _)| *d == 1), "device 2 never fired");
        assert_eq!(devices[1].stats().interrupts, 1);
        assert_eq!(devices[2].in_flight(), 5);
    }

    #[test]
    fn interrupts_for_missing_devices_are_ignored() {
        let registry = VectorRegistry::new();
        let v = registry
            .allocate(InterruptOwner {
                device: 9,
                queue: 0,
            })
            .unwrap();
        registry.dispatch(v);
        let mut table: Vec<Option<BoxedDevice>> = vec![
            None,
            Some(Box::new(RamDisk::new("r", RamDiskConfig::default()))),
        ];
        let mut servicer = Servicer::new();
        assert!(
            !servicer.run(&registry, table.as_mut_slice(), 4, &mut |_, _| panic!(
                "no completions"
            ))
        );
    }

    #[test]
    fn discovery_names_in_pci_order_and_keeps_failures() {
        use crate::hal::fake::FakeVirtioHal;
        use crate::hal::PciAddress;
        use crate::pci::fake::FakePci;
        use crate::pci::{enumerate, ScanMode};
        use crate::virtio::fake_pci::{ctx, virtio_function, Bar, Msix};

        let (mut bar_a, mut bar_b, mut bar_c) = (Bar::new(), Bar::new(), Bar::new());
        let pci = FakePci::new();
        for (device, bar, msix) in [
            (3, &mut bar_a, Msix::Entries(4)),
            (4, &mut bar_b, Msix::OutsideBar), // broken MSI-X
            (5, &mut bar_c, Msix::Entries(4)),
        ] {
            pci.insert(
                PciAddress::new(0, device, 0),
                virtio_function(bar, 0x1042, msix),
            );
        }
        let registry = VectorRegistry::new();
        let ctx = ctx(&pci, &registry, 0);
        let functions = enumerate(&pci, ScanMode::FollowBridges);
        let found = discover_virtio_blk::<FakeVirtioHal, _, _>(
            &ctx,
            &functions,
            0,
            VirtioBlkConfig::default(),
        );
        let names: Vec<String> = found
            .devices
            .iter()
            .map(|d| d.info().name.to_string())
            .collect();
        assert_eq!(names, ["vda", "vdc"]);
        assert_eq!(found.failed.len(), 1);
        assert_eq!(found.failed[0].name.as_str(), "vdb");
        // Device indices follow positions in `devices`: vdc is device 1.
        let vdc_vectors = found.devices[1].info().vectors;
        assert_eq!(registry.owner(vdc_vectors[0]).map(|o| o.device), Some(1));
    }

    /// A RAM disk that raises no interrupts.
    struct Polled(RamDisk);

    impl BlockDevice for Polled {
        fn geometry(&self) -> crate::block::Geometry {
            self.0.geometry()
        }
        fn submit(&mut self, request: BlockRequest) -> Result<(), crate::block::Rejected> {
            self.0.submit(request)
        }
        fn poll_completions(
            &mut self,
            budget: usize,
            sink: &mut dyn FnMut(Completion),
        ) -> crate::block::PollOutcome {
            self.0.poll_completions(budget, sink)
        }
        fn interrupt(&mut self, queue: u16) {
            self.0.interrupt(queue)
        }
        fn in_flight(&self) -> usize {
            self.0.in_flight()
        }
        fn needs_polling(&self) -> bool {
            true
        }
        fn stats(&self) -> crate::block::BlockStats {
            self.0.stats()
        }
        fn info(&self) -> DeviceInfo {
            self.0.info()
        }
    }

    #[test]
    fn polled_devices_are_serviced_without_interrupts() {
        let registry = VectorRegistry::new();
        let mut devices: Vec<BoxedDevice> = vec![
            Box::new(RamDisk::new("irq", RamDiskConfig::default())),
            Box::new(Polled(RamDisk::new("poll", RamDiskConfig::default()))),
        ];
        let mut servicer = Servicer::new();
        let mut seen = Vec::new();
        assert!(
            !servicer.run(&registry, devices.as_mut_slice(), 4, &mut |d, c| seen
                .push((d, c.tag)))
        );
        for tag in 0..3 {
            devices[0].submit(BlockRequest::flush(tag)).unwrap();
            devices[1].submit(BlockRequest::flush(10 + tag)).unwrap();
        }
        assert!(
            servicer.run(&registry, devices.as_mut_slice(), 2, &mut |d, c| seen
                .push((d, c.tag)))
        );
        assert!(
            !servicer.run(&registry, devices.as_mut_slice(), 2, &mut |d, c| seen
                .push((d, c.tag)))
        );
        assert_eq!(
            seen,
            vec![(1, 10), (1, 11), (1, 12)],
            "only the polled device progresses"
        );
    }

    #[test]
    fn device_set_iterates_members() {
        let mut set = DeviceSet::default();
        for i in [0u16, 63, 64, 255, 300] {
            set.insert(i);
        }
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 63, 64, 255]);
    }
}
