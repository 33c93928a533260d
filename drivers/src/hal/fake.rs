//! Fake HAL for host tests: std-allocated DMA memory with physical address == virtual address,
//! an MMIO "mapper" that treats physical addresses as host pointers, and a `virtio_drivers::Hal`
//! that shares buffers by identity (no bounce copies, like the kernel's identity map).

use super::{DmaAllocator, HalError, MmioMapper, PAGE_SIZE};
use core::ptr::NonNull;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Number of pages currently allocated by [`FakeDma`] / [`FakeVirtioHal`] (all tests).
pub static FAKE_PAGES_LIVE: AtomicUsize = AtomicUsize::new(0);

std::thread_local! {
    /// Inside [`with_dma_reclaimed`]: the allocations of this thread not freed yet.
    static RECLAIM: RefCell<Option<Vec<(usize, usize)>>> = const { RefCell::new(None) };
}

/// Runs `f`, then frees the DMA memory it allocated with [`FakeDma`] on this thread and did
/// not free itself: the queues and rings a driver leaks by design (the appliance never
/// detaches a device). For the fuzz targets, which attach a device per input. `f` must leave
/// nothing behind that still points at that memory (drop the device inside it).
pub fn with_dma_reclaimed(f: impl FnOnce()) {
    RECLAIM.with(|r| *r.borrow_mut() = Some(Vec::new()));
    f();
    let live = RECLAIM.with(|r| r.borrow_mut().take()).unwrap_or_default();
    for (ptr, pages) in live {
        // SAFETY: allocated by `FakeDma::dma_alloc` with this layout and not freed since;
        // whatever used it (the device `f` attached) is gone with `f`.
        unsafe { dealloc(ptr as *mut u8, layout(pages)) };
        FAKE_PAGES_LIVE.fetch_sub(pages, Ordering::Relaxed);
    }
}

/// DMA allocator backed by the std allocator.
#[derive(Debug)]
pub struct FakeDma;

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("test layout")
}

// SAFETY: `alloc_zeroed` with a page-aligned layout returns zeroed, page-aligned, exclusively
// owned memory; "physical" addresses are host addresses in tests.
unsafe impl DmaAllocator for FakeDma {
    fn dma_alloc(pages: usize) -> Option<(u64, NonNull<u8>)> {
        // SAFETY: the layout has a non-zero size (callers never ask for zero pages).
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout(pages)) })?;
        FAKE_PAGES_LIVE.fetch_add(pages, Ordering::Relaxed);
        RECLAIM.with(|r| {
            if let Some(live) = r.borrow_mut().as_mut() {
                live.push((ptr.as_ptr() as usize, pages));
            }
        });
        Some((ptr.as_ptr() as u64, ptr))
    }

    unsafe fn dma_dealloc(_phys: u64, virt: NonNull<u8>, pages: usize) {
        FAKE_PAGES_LIVE.fetch_sub(pages, Ordering::Relaxed);
        RECLAIM.with(|r| {
            if let Some(live) = r.borrow_mut().as_mut() {
                live.retain(|&(p, _)| p != virt.as_ptr() as usize);
            }
        });
        // SAFETY: the caller passes back what `dma_alloc` returned, with the same layout.
        unsafe { dealloc(virt.as_ptr(), layout(pages)) };
    }
}

/// Treats physical addresses as host pointers.
#[derive(Debug, Default)]
pub struct FakeMapper;

impl MmioMapper for FakeMapper {
    fn map_mmio(&self, phys: u64, len: usize) -> Result<NonNull<u8>, HalError> {
        NonNull::new(phys as *mut u8).ok_or(HalError::MapFailed { phys, len })
    }
}

/// `virtio_drivers::Hal` for host tests.
#[derive(Debug)]
pub struct FakeVirtioHal;

// SAFETY: DMA memory comes from `FakeDma` (zeroed, aligned, exclusive); sharing is the identity
// because the fake device reads and writes host memory directly.
unsafe impl virtio_drivers::Hal for FakeVirtioHal {
    fn dma_alloc(
        pages: usize,
        _direction: virtio_drivers::BufferDirection,
    ) -> (virtio_drivers::PhysAddr, NonNull<u8>) {
        match FakeDma::dma_alloc(pages) {
            Some(pair) => pair,
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(
        paddr: virtio_drivers::PhysAddr,
        vaddr: NonNull<u8>,
        pages: usize,
    ) -> i32 {
        // SAFETY: forwarded contract.
        unsafe { FakeDma::dma_dealloc(paddr, vaddr, pages) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: virtio_drivers::PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(
        buffer: NonNull<[u8]>,
        _direction: virtio_drivers::BufferDirection,
    ) -> virtio_drivers::PhysAddr {
        buffer.cast::<u8>().as_ptr() as u64
    }

    unsafe fn unshare(
        _paddr: virtio_drivers::PhysAddr,
        _buffer: NonNull<[u8]>,
        _direction: virtio_drivers::BufferDirection,
    ) {
    }
}
