//! DMA memory: [`Dma`], an owned, physically contiguous region that frees itself.
//!
//! All DMA memory is allocated during initialisation. Pools that live as long as the appliance
//! [`Dma::leak`] their regions into [`DmaSlice`]s, whose `&'static mut [u8]` can be split into
//! per-request buffers with safe code and moved between the caller and the device.

use super::{HalError, PAGE_SIZE};
use core::{marker::PhantomData, ptr::NonNull};

/// Allocator of DMA memory, implemented by the kernel on a zero-sized type.
///
/// # Safety
///
/// `dma_alloc` must return memory that is zeroed, aligned to [`PAGE_SIZE`], physically
/// contiguous, reachable by devices at the returned physical address, valid for reads and writes
/// of `pages * PAGE_SIZE` bytes at the returned virtual address, and not otherwise in use until
/// it is passed to `dma_dealloc`.
pub unsafe trait DmaAllocator {
    /// Allocates `pages` pages; returns `(physical address, virtual address)`, or `None` when
    /// out of memory.
    fn dma_alloc(pages: usize) -> Option<(u64, NonNull<u8>)>;

    /// Frees memory returned by `dma_alloc`.
    ///
    /// # Safety
    ///
    /// `phys`, `virt` and `pages` must be exactly those of one earlier `dma_alloc`, freed once,
    /// and the memory must not be used afterwards (by the CPU or by a device).
    unsafe fn dma_dealloc(phys: u64, virt: NonNull<u8>, pages: usize);
}

/// An owned region of DMA memory.
#[derive(Debug)]
pub struct Dma<A: DmaAllocator> {
    phys: u64,
    virt: NonNull<u8>,
    pages: usize,
    _allocator: PhantomData<A>,
}

// SAFETY: the region is exclusively owned memory, usable from any CPU.
unsafe impl<A: DmaAllocator> Send for Dma<A> {}

impl<A: DmaAllocator> Dma<A> {
    /// Allocates at least `bytes` bytes (rounded up to whole pages), zeroed.
    pub fn new(bytes: usize) -> Result<Self, HalError> {
        if bytes == 0 {
            return Err(HalError::ZeroLength);
        }
        let pages = bytes.div_ceil(PAGE_SIZE);
        let (phys, virt) = A::dma_alloc(pages).ok_or(HalError::DmaExhausted { pages })?;
        Ok(Self {
            phys,
            virt,
            pages,
            _allocator: PhantomData,
        })
    }

    /// Physical address of the first byte, as devices see it.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// Always false: regions have at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memory, for the CPU.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocator contract makes `virt` valid for `len()` bytes owned by us; the
        // shared borrow of `self` prevents writes through `as_mut_slice` meanwhile.
        unsafe { core::slice::from_raw_parts(self.virt.as_ptr(), self.len()) }
    }

    /// The memory, for the CPU, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the exclusive borrow of `self` makes this the only access.
        unsafe { core::slice::from_raw_parts_mut(self.virt.as_ptr(), self.len()) }
    }

    /// Gives up ownership for the life of the appliance: the memory is never freed.
    pub fn leak(self) -> DmaSlice {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: the region is valid for `len()` bytes and exclusively ours; `ManuallyDrop`
        // guarantees `dma_dealloc` is never called, so the memory stays valid forever.
        let data = unsafe { core::slice::from_raw_parts_mut(this.virt.as_ptr(), this.len()) };
        DmaSlice {
            data,
            phys: this.phys,
        }
    }
}

impl<A: DmaAllocator> Drop for Dma<A> {
    fn drop(&mut self) {
        // SAFETY: the values are those returned by `dma_alloc` in `new`; `Drop` runs once, and
        // the borrow checker guarantees no slice of the memory outlives `self`.
        unsafe { A::dma_dealloc(self.phys, self.virt, self.pages) };
    }
}

/// DMA memory that is never freed, with the physical address of its first byte.
#[derive(Debug)]
pub struct DmaSlice {
    /// The memory, for the CPU.
    pub data: &'static mut [u8],
    /// Physical address of `data[0]`.
    pub phys: u64,
}

impl DmaSlice {
    /// Splits off the first `len` bytes; `None` if the slice is shorter.
    pub fn split_off_front(&mut self, len: usize) -> Option<DmaSlice> {
        if len > self.data.len() {
            return None;
        }
        let data = core::mem::take(&mut self.data);
        let (front, back) = data.split_at_mut(len);
        self.data = back;
        let phys = self.phys;
        self.phys += len as u64;
        Some(DmaSlice { data: front, phys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeDma;

    #[test]
    fn allocate_use_free_and_leak() {
        let mut dma = Dma::<FakeDma>::new(5000).unwrap();
        assert_eq!(dma.len(), 2 * PAGE_SIZE);
        assert!(dma.as_slice().iter().all(|&b| b == 0));
        dma.as_mut_slice()[4999] = 7;
        assert_eq!(dma.phys() % PAGE_SIZE as u64, 0);
        drop(dma);
        assert!(matches!(Dma::<FakeDma>::new(0), Err(HalError::ZeroLength)));

        let mut slice = Dma::<FakeDma>::new(100).unwrap().leak();
        let base = slice.phys;
        let front = slice.split_off_front(64).unwrap();
        assert_eq!(front.phys, base);
        assert_eq!(front.data.len(), 64);
        assert_eq!(slice.phys, base + 64);
        assert_eq!(slice.data.len(), PAGE_SIZE - 64);
        assert!(slice.split_off_front(PAGE_SIZE).is_none());
    }
}

/// Uses a `virtio_drivers::Hal`'s DMA allocation as a [`DmaAllocator`], so the virtio-blk
/// driver needs only the one HAL type.
#[derive(Debug)]
pub struct VirtioDma<H>(PhantomData<H>);

// SAFETY: `virtio_drivers::Hal::dma_alloc` promises zeroed, page-aligned, valid, unaliased,
// physically contiguous memory until `dma_dealloc` — the same contract as ours; a zero physical
// address is its failure value.
unsafe impl<H: virtio_drivers::Hal> DmaAllocator for VirtioDma<H> {
    fn dma_alloc(pages: usize) -> Option<(u64, NonNull<u8>)> {
        let (phys, virt) = H::dma_alloc(pages, virtio_drivers::BufferDirection::Both);
        (phys != 0).then_some((phys, virt))
    }

    unsafe fn dma_dealloc(phys: u64, virt: NonNull<u8>, pages: usize) {
        // SAFETY: forwarded from our caller, who passes back what `dma_alloc` returned.
        let _ = unsafe { H::dma_dealloc(phys, virt, pages) };
    }
}
