//! The kernel's side of the drivers' hardware abstraction layer: port I/O for PCI
//! configuration, MMIO mapping (identity map, extended above 4 GiB on demand), and DMA memory
//! from the frame allocator, for both our drivers and `virtio-drivers`.

use core::ptr::NonNull;

use drivers::hal::{DmaAllocator, HalError, MmioMapper, PortIo};
use virtio_drivers::{BufferDirection, PhysAddr};

use crate::arch::{cpu, paging};
use crate::frames::FRAME_SIZE;
use crate::memory;

/// Port I/O through `in`/`out`.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelPorts;

impl PortIo for KernelPorts {
    fn read32(&self, port: u16) -> u32 {
        cpu::inl(port)
    }
    fn write32(&self, port: u16, value: u32) {
        cpu::outl(port, value)
    }
}

/// The kernel's HAL: MMIO mapping and DMA memory (a zero-sized type, as `virtio-drivers`
/// requires).
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelHal;

impl MmioMapper for KernelHal {
    fn map_mmio(&self, phys: u64, len: usize) -> Result<NonNull<u8>, HalError> {
        let failed = HalError::MapFailed { phys, len };
        paging::map_identity(phys, len as u64, &mut || memory::allocate_frames(1, 1))
            .map_err(|_| failed)?;
        NonNull::new(phys as *mut u8).ok_or(failed)
    }
}

// SAFETY: `dma_alloc` returns zeroed, physically contiguous, identity-mapped frames owned by
// the caller until `dma_dealloc`; the physical address equals the virtual one.
unsafe impl DmaAllocator for KernelHal {
    fn dma_alloc(pages: usize) -> Option<(u64, NonNull<u8>)> {
        let phys = memory::allocate_frames(pages, 1)?;
        Some((phys, NonNull::new(phys as *mut u8)?))
    }

    unsafe fn dma_dealloc(phys: u64, _virt: NonNull<u8>, pages: usize) {
        memory::free_frames(phys, pages);
    }
}

// SAFETY: memory is identity-mapped, so physical addresses handed to devices are the
// buffers' own addresses; allocations are zeroed, contiguous and page-aligned; `share` neither
// copies nor allocates, so buffers stay valid exactly as long as their owners keep them.
unsafe impl virtio_drivers::Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match memory::allocate_frames(pages, 1) {
            // Frames are never at address 0 (the first MiB is reserved).
            Some(phys) => (
                phys,
                NonNull::new(phys as *mut u8).unwrap_or(NonNull::dangling()),
            ),
            None => {
                // virtio-drivers cannot take a failure here; it only allocates while a device
                // is being set up, which the kernel does only after checking free frames.
                log::error!("out of DMA memory ({pages} pages) while setting up a virtio device");
                crate::power::fail_stop()
            }
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        memory::free_frames(paddr, pages);
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        match paging::map_identity(paddr, size as u64, &mut || memory::allocate_frames(1, 1)) {
            Ok(()) => NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling()),
            Err(e) => {
                log::error!("cannot map virtio MMIO at {paddr:#x}+{size:#x}: {e:?}");
                crate::power::fail_stop()
            }
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Maps a PCI Express ECAM window (MCFG) for configuration access.
pub fn map_ecam(window: &crate::acpi::EcamWindow) -> Result<drivers::hal::MmioRegion, HalError> {
    let len = (usize::from(window.end_bus) + 1) << 20;
    // SAFETY: the MCFG window is PCI configuration space that this kernel alone drives; it is
    // not RAM.
    unsafe { drivers::hal::map_region(&KernelHal, window.base, len) }
}

/// Pages needed for `bytes`.
pub fn pages_for(bytes: usize) -> usize {
    bytes.div_ceil(FRAME_SIZE as usize)
}
