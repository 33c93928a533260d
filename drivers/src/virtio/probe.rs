//! The PCI side of bringing up a virtio device, the same for every device type.
//!
//! Order (as Linux's virtio_pci_modern): size BARs, enable memory decoding and bus mastering
//! (INTx off), map the common configuration and check every structure's location, map the
//! MSI-X table, allocate CPU vectors and program table entries, enable MSI-X with the
//! function masked, build the virtio-drivers transport; then the driver initialises the
//! device (which writes `config_msix_vector` / `queue_msix_vector` through the
//! [`CommonCfgVectors`] handed to it) and [`VirtioPci::keep`] unmasks the function. A
//! [`VirtioPci`] dropped before that rolls everything back ([`Claim`]): every vector is
//! released, MSI-X is disabled and the function is disabled again.
//!
//! The driver decides what is its own: which functions it takes, what a function without
//! MSI-X means (virtio-blk refuses it unless polling is allowed, virtio-net polls), and which
//! table entry serves which queue.

use super::common_regs::{check_capabilities, CommonCfgVectors};
use super::SetupError;
use crate::hal::{ConfigAccess, MmioMapper, VirtioConfigAccess};
use crate::msix::{InterruptOwner, VectorRegistry};
use crate::pci::{Claim, PciFunction};
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::Hal;

/// What the kernel lends a virtio probe.
#[derive(Debug)]
pub struct ProbeContext<'a, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized> {
    /// PCI configuration access.
    pub cfg: &'a C,
    /// MMIO mapper for BARs.
    pub mapper: &'a M,
    /// Where interrupt vectors are allocated.
    pub registry: &'a VectorRegistry,
    /// Local APIC ID of the CPU that takes the interrupts (the boot CPU).
    pub apic_id: u8,
}

/// A virtio function claimed by its driver, its structures checked; rolled back on drop
/// unless [`VirtioPci::keep`] is called.
#[derive(Debug)]
pub struct VirtioPci<'a, C: ConfigAccess + ?Sized> {
    cfg: &'a C,
    claim: Claim<'a, C>,
}

impl<'a, C: ConfigAccess + ?Sized> VirtioPci<'a, C> {
    /// Claims `function` (BARs, decoding, bus mastering), maps its common configuration,
    /// checks the locations virtio-drivers will trust (each structure inside its BAR, the
    /// notification address of each of `queues` inside the notification structure), and maps
    /// its MSI-X table if it has one. The common configuration comes back for the driver's
    /// device initialisation.
    pub fn claim<M: MmioMapper + ?Sized>(
        ctx: &ProbeContext<'a, C, M>,
        function: &PciFunction,
        queues: &[u16],
    ) -> Result<(Self, CommonCfgVectors), SetupError> {
        let addr = function.addr;
        let mut claim = Claim::new(ctx.cfg, ctx.registry, ctx.apic_id, addr)?;
        let common = CommonCfgVectors::locate(ctx.cfg, addr, claim.bars(), ctx.mapper)?;
        for &queue in queues {
            check_capabilities(ctx.cfg, addr, claim.bars(), &common, queue)?;
        }
        claim.map_msix(ctx.mapper)?;
        let pci = Self {
            cfg: ctx.cfg,
            claim,
        };
        Ok((pci, common))
    }

    /// Entries in the MSI-X table; `None` when the function has no MSI-X capability.
    pub fn msix_entries(&self) -> Option<u16> {
        self.claim.msix_entries()
    }

    /// Routes each `(table entry, queue)` of `routes` to a CPU vector of its own, owned by
    /// `(device, queue)` (queue [`InterruptOwner::CONFIG_QUEUE`] for configuration changes),
    /// in order; then enables MSI-X with the function masked. Returns the CPU vectors, in the
    /// order of `routes`.
    pub fn route<const N: usize>(
        &mut self,
        device: u16,
        routes: [Option<(u16, u16)>; N],
    ) -> Result<[Option<u8>; N], SetupError> {
        let mut vectors = [None; N];
        for (vector, route) in vectors.iter_mut().zip(routes) {
            if let Some((entry, queue)) = route {
                *vector = Some(self.claim.route(entry, InterruptOwner { device, queue })?);
            }
        }
        self.claim.enable_msix();
        Ok(vectors)
    }

    /// virtio-drivers' transport over the claimed function.
    pub fn transport<H: Hal>(&self) -> Result<PciTransport, SetupError> {
        let addr = self.claim.addr();
        let mut root = PciRoot::new(VirtioConfigAccess(self.cfg));
        let df = DeviceFunction {
            bus: addr.bus,
            device: addr.device,
            function: addr.function,
        };
        Ok(PciTransport::new::<H, _>(&mut root, df)?)
    }

    /// The device is up: unmasks the function and keeps it, and its vectors, for good.
    pub fn keep(self) {
        self.claim.keep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeVirtioHal;
    use crate::hal::PciAddress;
    use crate::msix::{MsixCapability, MsixError, FIRST_DEVICE_VECTOR};
    use crate::pci::regs::COMMAND;
    use crate::virtio::fake_pci::{ctx, fake_pci};
    use crate::virtio::fake_pci::{virtio_function, Bar, Msix, MSIX_TABLE};
    use virtio_drivers::transport::{DeviceType, Transport};

    const ADDR: PciAddress = PciAddress::new(0, 4, 0);

    #[test]
    fn kept_function_routes_its_entries_and_unmasks() {
        let mut bar = Bar::new();
        let pci = fake_pci(ADDR, virtio_function(&mut bar, 0x1042, Msix::Entries(4)));
        let registry = VectorRegistry::new();
        let function = PciFunction::read(&pci, ADDR).unwrap();
        let (mut virtio, _common) =
            VirtioPci::claim(&ctx(&pci, &registry, 5), &function, &[0, 1]).unwrap();
        assert_eq!(virtio.msix_entries(), Some(4));
        let vectors = virtio
            .route(
                9,
                [Some((3, 0)), None, Some((1, InterruptOwner::CONFIG_QUEUE))],
            )
            .unwrap();
        let (queue, config) = (FIRST_DEVICE_VECTOR, FIRST_DEVICE_VECTOR + 1);
        assert_eq!(vectors, [Some(queue), None, Some(config)]);
        assert_eq!(
            registry.owner(config),
            Some(InterruptOwner {
                device: 9,
                queue: InterruptOwner::CONFIG_QUEUE
            })
        );
        assert_eq!(bar.u32_at(MSIX_TABLE + 3 * 16), 0xfee0_5000, "to APIC 5");
        assert_eq!(bar.u32_at(MSIX_TABLE + 3 * 16 + 8), u32::from(queue));
        assert_eq!(bar.u32_at(MSIX_TABLE + 16 + 8), u32::from(config));
        let cap = MsixCapability::read(&pci, ADDR).unwrap();
        assert!(!cap.is_active(&pci), "masked until kept");
        let transport = virtio.transport::<FakeVirtioHal>().unwrap();
        assert_eq!(transport.device_type(), DeviceType::Block);
        virtio.keep();
        assert!(cap.is_active(&pci));
        assert_eq!(pci.read16(ADDR, COMMAND) & 0x0406, 0x0406);
        assert_eq!(registry.owner(queue).map(|o| o.queue), Some(0));
    }

    #[test]
    fn dropped_function_gives_everything_back() {
        let mut bar = Bar::new();
        let pci = fake_pci(ADDR, virtio_function(&mut bar, 0x1041, Msix::Entries(2)));
        let registry = VectorRegistry::new();
        let function = PciFunction::read(&pci, ADDR).unwrap();
        {
            let (mut virtio, _common) =
                VirtioPci::claim(&ctx(&pci, &registry, 0), &function, &[0, 1]).unwrap();
            // A third source does not fit a table of two: the first two stay routed until
            // the claim goes.
            let error = virtio
                .route(1, [Some((0, 0)), Some((1, 1)), Some((2, 2))])
                .unwrap_err();
            assert!(matches!(
                error,
                SetupError::Msix(MsixError::EntryOutOfRange { entry: 2, .. })
            ));
            assert!(registry.owner(FIRST_DEVICE_VECTOR + 1).is_some());
        }
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR), None);
        assert_eq!(registry.owner(FIRST_DEVICE_VECTOR + 1), None);
        assert_eq!(bar.u32_at(MSIX_TABLE + 12), 1, "entry 0 masked again");
        assert_eq!(pci.read16(ADDR, COMMAND), 0, "function disabled again");
    }

    #[test]
    fn bad_locations_are_refused_before_the_transport() {
        let registry = VectorRegistry::new();
        // The notification structure too short for queue 1's notify offset (plain memory: every
        // queue reads queue_notify_off 0, so shrink the structure to nothing useful instead).
        let mut bar = Bar::new();
        let pci = fake_pci(ADDR, virtio_function(&mut bar, 0x1041, Msix::Missing));
        bar.set_notify_off(200);
        let function = PciFunction::read(&pci, ADDR).unwrap();
        let error = VirtioPci::claim(&ctx(&pci, &registry, 0), &function, &[0])
            .err()
            .unwrap();
        assert_eq!(error, SetupError::NotifyOutOfRange { queue: 0 });
        assert_eq!(pci.read16(ADDR, COMMAND), 0, "rolled back");

        // No MSI-X capability: claimed, with nothing to route.
        let mut bar = Bar::new();
        let pci = fake_pci(ADDR, virtio_function(&mut bar, 0x1041, Msix::Missing));
        let (virtio, _) = VirtioPci::claim(&ctx(&pci, &registry, 0), &function, &[0, 1]).unwrap();
        assert_eq!(virtio.msix_entries(), None);

        // A table outside its BAR.
        let mut bar = Bar::new();
        let pci = fake_pci(ADDR, virtio_function(&mut bar, 0x1041, Msix::OutsideBar));
        let error = VirtioPci::claim(&ctx(&pci, &registry, 0), &function, &[0])
            .err()
            .unwrap();
        assert!(matches!(error, SetupError::Msix(MsixError::Pci(_))));
        assert_eq!(
            error.to_string(),
            "MSI-X: structure 0x4000+0x40 outside BAR4"
        );
    }
}
