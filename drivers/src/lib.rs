//! snapfw's device drivers: PCI, MSI-X, the block-device interface, virtio-blk, virtio-net, NVMe.
//!
//! The crate never depends on the kernel. The kernel implements a few HAL traits and drives
//! everything from its boot code, its interrupt stubs and its main loop; host tests run the
//! same code against fakes (`cargo test -p drivers`).
//!
//! # Modules
//! - [`hal`]: what the kernel supplies — [`hal::PortIo`], [`hal::MmioMapper`],
//!   [`hal::DmaAllocator`] — plus PCI configuration mechanisms ([`hal::PortConfigAccess`],
//!   [`hal::EcamConfigAccess`], [`hal::ConfigMechanism`]), [`hal::MmioRegion`] and [`hal::Dma`].
//! - [`pci`]: enumeration, BAR sizing, capability lists, and the [`pci::Claim`] a driver holds
//!   on the function it brings up (enabled, MSI-X vectors owned, rolled back on failure).
//! - [`msix`]: MSI-X capability/table/PBA programming and the [`msix::VectorRegistry`]
//!   (CPU vector → device queue, pending flags set from interrupt context).
//! - [`block`]: the [`block::BlockDevice`] trait, requests/completions, [`block::BufferPool`]
//!   of DMA buffers, [`block::SlotTable`], and the [`block::RamDisk`] for tests above us.
//! - [`virtio`]: what virtio-blk and virtio-net share: the virtio-pci bring-up under a
//!   [`pci::Claim`] (capability checks, common configuration, MSI-X routing, rollback), and
//!   the virtqueue of any supported size.
//! - [`virtio_blk`]: virtio-blk on virtio-drivers' `PciTransport` and `VirtQueue`.
//! - [`virtio_net`]: virtio-net on the same transport and virtqueues: one queue pair, packet
//!   buffers allocated at start-up, MSI-X vectors for receive, transmit and link changes.
//! - [`service`]: the main loop's interrupt servicing and virtio-blk discovery.
//! - [`info`]: [`info::DeviceInfo`] for the console's `devices` command; `vda`… naming.
//!
//! # Integration API (for the kernel)
//!
//! ## 1. Implement the HAL (one zero-sized type is enough)
//! - [`hal::PortIo`] (`in`/`out` of 32 bits) — used for PCI configuration mechanism #1.
//! - [`hal::MmioMapper::map_mmio`]: identity-map `phys..phys+len` uncached (BARs may be above
//!   4 GiB) and return the virtual address.
//! - [`hal::DmaAllocator`] (`unsafe trait`): zeroed, page-aligned, physically contiguous pages.
//! - `virtio_drivers::Hal` (`unsafe trait`) on the same type: `dma_alloc` as above (a zero
//!   physical address means failure), `mmio_phys_to_virt` = map + identity, `share` returns the
//!   buffer's physical address **without copying or allocating**, `unshare` does nothing.
//!   Buffers handed to devices are pool memory from `DmaAllocator`, so `share` never sees
//!   stack or heap memory.
//!
//! ## 2. Enumerate and initialise (boot CPU, interrupts off, allocation allowed)
//! ```ignore
//! static VECTORS: drivers::msix::VectorRegistry = drivers::msix::VectorRegistry::new();
//!
//! // Ports, or ECAM from the ACPI MCFG entry (base + start_bus << 20, (end-start+1) << 20 bytes):
//! let cfg = ConfigMechanism::Ports(PortConfigAccess::new(KernelPorts));
//! //  or: ConfigMechanism::Ecam(EcamConfigAccess::new(
//! //          unsafe { hal::map_region(&KernelHal, window_phys, window_len)? }, start, end))
//! let functions = pci::enumerate(&cfg, pci::ScanMode::FollowBridges);
//! let ctx = virtio::ProbeContext {
//!     cfg: &cfg, mapper: &KernelHal, registry: &VECTORS, apic_id: boot_cpu_apic_id,
//! };
//! let found = service::discover_virtio_blk::<KernelHal, _, _>(
//!     &ctx, &functions, /* first device index */ 0, virtio_blk::VirtioBlkConfig::default());
//! // found.devices: Vec<Box<dyn BlockDevice + Send>> named vda, vdb, … in PCI order; the
//! //   position in this Vec (+ first index) is the device index interrupts carry.
//! // found.failed: DeviceInfo of devices that failed to initialise (state InitFailed + reason).
//! let mut buffers = block::BufferPool::new::<KernelHal>(0, count, buffer_bytes)?;
//! ```
//! `VirtioBlkConfig::max_transfer_bytes` should equal the pool's buffer size (default
//! 128 KiB); each device reports its own limit in [`block::Geometry::max_transfer_bytes`].
//!
//! ## 3. Wire MSI-X vectors to the IDT
//! Devices get CPU vectors [`msix::FIRST_DEVICE_VECTOR`]`..=`[`msix::LAST_DEVICE_VECTOR`]
//! (0x30..=0xEF); the kernel keeps the rest (exceptions, APIC timer, spurious). Give each of
//! those vectors a stub that does only:
//! ```ignore
//! VECTORS.dispatch(vector); // lock-free: sets a pending flag, counts; never touches a device
//! local_apic.eoi();
//! ```
//! Messages target the boot CPU's APIC ID given in `ProbeContext::apic_id` (fixed delivery,
//! edge-triggered). Devices are only ever touched by the main loop, so no lock is shared with
//! interrupt context.
//!
//! ## 4. Main loop: drain completions with a budget
//! ```ignore
//! let mut servicer = service::Servicer::new();
//! loop {
//!     interrupts::disable();
//!     let more = servicer.run(&VECTORS, found.devices.as_mut_slice(), BUDGET,
//!         &mut |device_index, completion| engine.on_completion(device_index, completion));
//!     // … run the snapshot engine (it submits new requests), the console, timers …
//!     if !more && nothing_else_to_do { interrupts::enable_and_hlt(); } // `sti; hlt`
//!     else { interrupts::enable(); }
//! }
//! ```
//! `Servicer::run` polls only devices whose vectors fired, devices whose budget ran out last
//! round, and devices without MSI-X (polled mode: opt in with
//! `VirtioBlkConfig::polled_fallback`, see `BlockDevice::needs_polling`) while they have
//! requests in flight; it returns `true` while any of that work remains. A kernel loop of its
//! own must do the same for `needs_polling()` devices before enabling the fallback. Submission is `BlockDevice::submit(BlockRequest)`: it never completes inline;
//! on failure the request (and its buffer) comes back in [`block::Rejected`] —
//! [`block::BlockError::QueueFull`] is back-pressure (retry after a completion), not an error.
//! Every completion hands the request's [`block::DmaBuf`] back; return it to its pool with
//! [`block::BufferPool::release`] or reuse it.
//!
//! ## 5. Console
//! `device.info()` (and the `failed` list) give [`info::DeviceInfo`]: name, driver, PCI address,
//! serial, geometry (capacity, block size, queue count × depth, write cache, FUA, discard,
//! read-only), MSI-X vectors, counters and state; its `Display` is a one-line summary.
//!
//! # `unsafe`
//! The crate root denies `unsafe_code`; it is allowed only in `hal` (MMIO, DMA), `msix::table`
//! (mapping the table), the drivers' queue modules (`virtio::queue`, `virtio_blk::queue`,
//! `virtio_net::queue`, `nvme::queue`: virtqueue and ring buffers), `virtio::common_regs`
//! (mapping the common configuration) and the NVMe register modules;
//! `scripts/unsafe-allowlist.sh` checks the file names. Every block has a `// SAFETY:`
//! comment.
#![cfg_attr(not(any(test, feature = "fuzz")), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod block;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
#[allow(unsafe_code)]
pub mod hal;
pub mod info;
pub mod msix;
pub mod nvme;
pub mod pci;
pub mod service;
pub mod virtio;
pub mod virtio_blk;
pub mod virtio_net;
