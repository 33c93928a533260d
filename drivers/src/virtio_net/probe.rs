//! PCI glue for virtio-net: from an enumerated [`PciFunction`] to a running [`VirtioNet`],
//! through the bring-up shared with virtio-blk ([`crate::virtio::probe`]): the function is
//! claimed and checked, MSI-X entries routed for receive, transmit and configuration changes,
//! the device initialised, and the function unmasked; on failure the claim gives every vector
//! back and disables MSI-X again.
//!
//! Without an MSI-X capability the device comes up without interrupts
//! ([`VirtioNet::has_interrupts`] is false) and its owner polls it from the main loop.

use super::device::{NetVectors, VirtioNet};
use super::{VirtioNetConfig, VirtioNetError, QUEUE_RECEIVE, QUEUE_TRANSMIT};
use crate::hal::{ConfigAccess, MmioMapper};
use crate::msix::InterruptOwner;
use crate::pci::PciFunction;
use crate::virtio::{is_virtio_device, ProbeContext, VirtioPci};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::Hal;

/// Transitional virtio-net device ID.
pub const DEVICE_ID_TRANSITIONAL: u16 = 0x1000;
/// Modern virtio-net device ID (0x1040 + 1).
pub const DEVICE_ID_MODERN: u16 = 0x1041;

/// The driver type the kernel gets from [`probe`].
pub type VirtioNetPci<H> = VirtioNet<H, PciTransport>;

/// Whether `function` is a virtio network device.
pub fn is_virtio_net(function: &PciFunction) -> bool {
    is_virtio_device(function, DEVICE_ID_TRANSITIONAL, DEVICE_ID_MODERN)
}

/// Brings up the virtio-net device at `function` (init time only). `device_index` is what the
/// interrupts' [`InterruptOwner::device`] carries: queue 0 = receive, 1 = transmit,
/// [`InterruptOwner::CONFIG_QUEUE`] = configuration changes. `mac_seed` makes a MAC when the
/// device offers none.
pub fn probe<H: Hal, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    device_index: u16,
    config: VirtioNetConfig,
    mac_seed: u64,
) -> Result<VirtioNetPci<H>, VirtioNetError> {
    bring_up::<H, C, M>(ctx, function, device_index, config, mac_seed).inspect_err(|error| {
        log::error!("virtio-net at {} failed: {error}", function.addr);
    })
}

fn bring_up<H: Hal, C: ConfigAccess + ?Sized, M: MmioMapper + ?Sized>(
    ctx: &ProbeContext<'_, C, M>,
    function: &PciFunction,
    device_index: u16,
    config: VirtioNetConfig,
    mac_seed: u64,
) -> Result<VirtioNetPci<H>, VirtioNetError> {
    if !is_virtio_net(function) {
        return Err(VirtioNetError::NotNetworkDevice);
    }
    let addr = function.addr;
    let (mut pci, common) = VirtioPci::claim(ctx, function, &[QUEUE_RECEIVE, QUEUE_TRANSMIT])?;
    let vectors = match pci.msix_entries() {
        Some(entries) => route(&mut pci, device_index, entries)?,
        None => {
            log::warn!("virtio-net at {addr}: no MSI-X capability; polled");
            NetVectors::default()
        }
    };
    let transport = pci.transport::<H>()?;
    let device = VirtioNet::new(
        Some(addr),
        transport,
        Some(common),
        vectors,
        config,
        mac_seed,
    )?;
    pci.keep();
    Ok(device)
}

/// Routes the entries of [`msix_layout`] to CPU vectors owned by `device_index`.
fn route<C: ConfigAccess + ?Sized>(
    pci: &mut VirtioPci<'_, C>,
    device_index: u16,
    entries: u16,
) -> Result<NetVectors, VirtioNetError> {
    let routes = msix_layout(entries);
    let cpu_vectors = pci.route(device_index, routes)?;
    let entry = |i: usize| routes[i].map(|(entry, _)| entry);
    Ok(NetVectors {
        rx_entry: entry(0),
        tx_entry: entry(1).or(entry(0)),
        config_entry: entry(2),
        cpu_vectors,
    })
}

/// `(table entry, queue)` of receive, transmit and configuration changes for a table of
/// `entries`: 0 = receive, 1 = transmit, 2 = configuration changes; a smaller table leaves
/// the configuration interrupt out, then transmit (which then shares the receive entry).
fn msix_layout(entries: u16) -> [Option<(u16, u16)>; 3] {
    [
        Some((0, QUEUE_RECEIVE)),
        (entries >= 2).then_some((1, QUEUE_TRANSMIT)),
        (entries >= 3).then_some((2, InterruptOwner::CONFIG_QUEUE)),
    ]
}

#[cfg(test)]
mod tests {
    //! virtio-net's own part of the PCI path (its MSI-X layout, its failures) over
    //! `virtio::fake_pci`; the shared claim and checks are tested in `virtio::probe`. The
    //! fake's registers are plain memory, so every queue shares one `queue_enable` and
    //! virtio-drivers takes the transmit queue for one already in use: a whole bring-up runs
    //! only in QEMU (`tests/tests/net.rs`).

    use super::*;
    use crate::hal::fake::FakeVirtioHal;
    use crate::hal::PciAddress;
    use crate::msix::{MsixCapability, VectorRegistry, FIRST_DEVICE_VECTOR};
    use crate::virtio::fake_pci::{ctx, fake_pci, virtio_function, Bar, Msix, COMMON, MSIX_TABLE};

    const ADDR: PciAddress = PciAddress::new(0, 3, 0);

    /// Claims a fake virtio-net function with `msix` and routes its vectors.
    fn routed(bar: &mut Bar, msix: Msix, registry: &VectorRegistry) -> Option<NetVectors> {
        let pci = fake_pci(ADDR, virtio_function(bar, DEVICE_ID_MODERN, msix));
        let function = PciFunction::read(&pci, ADDR).unwrap();
        assert!(is_virtio_net(&function));
        let ctx = ctx(&pci, registry, 1);
        let (mut pci, _common) =
            VirtioPci::claim(&ctx, &function, &[QUEUE_RECEIVE, QUEUE_TRANSMIT]).unwrap();
        let entries = pci.msix_entries()?;
        let vectors = route(&mut pci, 0x4000, entries).unwrap();
        pci.keep();
        Some(vectors)
    }

    #[test]
    fn receive_transmit_and_link_changes_get_an_entry_each() {
        let mut bar = Bar::new();
        let registry = VectorRegistry::new();
        let vectors = routed(&mut bar, Msix::Entries(4), &registry).unwrap();
        let v = FIRST_DEVICE_VECTOR;
        assert_eq!(
            vectors,
            NetVectors {
                rx_entry: Some(0),
                tx_entry: Some(1),
                config_entry: Some(2),
                cpu_vectors: [Some(v), Some(v + 1), Some(v + 2)],
            }
        );
        for (vector, queue) in [(v, 0), (v + 1, 1), (v + 2, InterruptOwner::CONFIG_QUEUE)] {
            assert_eq!(
                registry.owner(vector),
                Some(InterruptOwner {
                    device: 0x4000,
                    queue
                })
            );
        }
        for entry in 0..3 {
            assert_eq!(bar.u32_at(MSIX_TABLE + 16 * entry), 0xfee0_1000);
            assert_eq!(
                bar.u32_at(MSIX_TABLE + 16 * entry + 8),
                u32::from(v) + entry as u32
            );
            assert_eq!(bar.u32_at(MSIX_TABLE + 16 * entry + 12), 0, "unmasked");
        }
        assert_eq!(bar.u32_at(MSIX_TABLE + 3 * 16 + 12), 1, "entry 3 unused");
    }

    #[test]
    fn small_tables_drop_link_changes_then_share_one_entry() {
        let mut bar = Bar::new();
        let registry = VectorRegistry::new();
        let v = FIRST_DEVICE_VECTOR;
        assert_eq!(
            routed(&mut bar, Msix::Entries(2), &registry),
            Some(NetVectors {
                rx_entry: Some(0),
                tx_entry: Some(1),
                config_entry: None,
                cpu_vectors: [Some(v), Some(v + 1), None],
            })
        );
        let mut bar = Bar::new();
        let registry = VectorRegistry::new();
        assert_eq!(
            routed(&mut bar, Msix::Entries(1), &registry),
            Some(NetVectors {
                rx_entry: Some(0),
                tx_entry: Some(0),
                config_entry: None,
                cpu_vectors: [Some(v), None, None],
            })
        );
        assert_eq!(registry.owner(v + 1), None);
        let mut bar = Bar::new();
        assert_eq!(routed(&mut bar, Msix::Missing, &registry), None);
    }

    #[test]
    fn failures_give_the_vectors_back() {
        let registry = VectorRegistry::new();
        // Queues too small for the driver: the failure comes after the vectors were routed.
        let mut bar = Bar::new();
        let pci = fake_pci(
            ADDR,
            virtio_function(&mut bar, DEVICE_ID_MODERN, Msix::Entries(4)),
        );
        bar.bytes()[COMMON + 0x18..COMMON + 0x1a].copy_from_slice(&4u16.to_le_bytes());
        let mut function = PciFunction::read(&pci, ADDR).unwrap();
        let ctx = ctx(&pci, &registry, 0);
        let config = VirtioNetConfig::default();
        let error = probe::<FakeVirtioHal, _, _>(&ctx, &function, 0, config, 0).unwrap_err();
        assert_eq!(error, VirtioNetError::QueueTooSmall { queue: 0, max: 4 });
        assert_eq!(error.to_string(), "queue 0 too small (4 descriptors)");
        for v in FIRST_DEVICE_VECTOR..FIRST_DEVICE_VECTOR + 3 {
            assert_eq!(registry.owner(v), None);
        }
        assert!(!MsixCapability::read(&pci, ADDR).unwrap().is_active(&pci));
        assert_eq!(pci.read16(ADDR, 0x04), 0, "function disabled again");

        function.device_id = 0x1042;
        let error = probe::<FakeVirtioHal, _, _>(&ctx, &function, 0, config, 0).unwrap_err();
        assert_eq!(error, VirtioNetError::NotNetworkDevice);
    }
}
