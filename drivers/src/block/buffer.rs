//! DMA buffers for requests: [`BufferPool`] carves fixed-size buffers out of DMA memory at
//! init; [`DmaBuf`] is the owned handle a request carries. Taking from an empty pool returns
//! `None` (back-pressure); the pool never allocates after init.

use super::BlockError;
use crate::hal::{Dma, DmaAllocator, DmaSlice, HalError, PAGE_SIZE};
use alloc::vec::Vec;

/// One DMA buffer, exclusively owned by whoever holds the handle (the caller, or the device
/// while a request is in flight).
#[derive(Debug)]
pub struct DmaBuf {
    data: &'static mut [u8],
    phys: u64,
    /// The first byte a request uses (see [`DmaBuf::set_window`]); 0 unless a window is set.
    start: usize,
    len: usize,
    pool: u16,
    index: u32,
}

impl DmaBuf {
    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Bytes in use: the transfer length of a request.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the transfer length (from the window's start, within the capacity).
    pub fn set_len(&mut self, len: usize) -> Result<(), BlockError> {
        self.set_window(self.start, len)
    }

    /// Makes bytes `start..start + len` of the buffer what a request transfers: its slices
    /// and physical address begin at `start` (a large buffer lent to a device for part of
    /// it, with no copy). [`DmaBuf::set_window`]`(0, capacity)` gives the whole buffer back.
    pub fn set_window(&mut self, start: usize, len: usize) -> Result<(), BlockError> {
        match start.checked_add(len) {
            Some(end) if end <= self.data.len() => {
                self.start = start;
                self.len = len;
                Ok(())
            }
            _ => Err(BlockError::TooLarge {
                bytes: start.saturating_add(len),
                max: self.data.len() as u32,
            }),
        }
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }

    /// The bytes in use, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.start + self.len]
    }

    /// Physical address of the first byte in use, for devices.
    pub fn phys(&self) -> u64 {
        self.phys + self.start as u64
    }

    /// The pool this buffer belongs to.
    pub fn pool_id(&self) -> u16 {
        self.pool
    }

    /// Index of the buffer within its pool.
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// A fixed set of equal-sized DMA buffers.
#[derive(Debug)]
pub struct BufferPool {
    id: u16,
    free: Vec<DmaBuf>,
    total: usize,
    buffer_size: usize,
}

impl BufferPool {
    /// Allocates `count` buffers of `buffer_size` bytes. Buffers of at most a page share pages;
    /// larger ones get their own physically contiguous allocation. The memory is never freed
    /// (pools live as long as the appliance). `id` tags buffers so a foreign buffer is caught
    /// on release.
    pub fn new<A: DmaAllocator>(
        id: u16,
        count: usize,
        buffer_size: usize,
    ) -> Result<Self, HalError> {
        if count == 0 || buffer_size == 0 {
            return Err(HalError::ZeroLength);
        }
        let per_allocation = (PAGE_SIZE / buffer_size).max(1);
        let mut free = Vec::with_capacity(count);
        while free.len() < count {
            let n = per_allocation.min(count - free.len());
            let mut region: DmaSlice = Dma::<A>::new(n * buffer_size)?.leak();
            for _ in 0..n {
                let Some(piece) = region.split_off_front(buffer_size) else {
                    break;
                };
                free.push(DmaBuf {
                    data: piece.data,
                    phys: piece.phys,
                    start: 0,
                    len: buffer_size,
                    pool: id,
                    index: free.len() as u32,
                });
            }
        }
        Ok(Self {
            id,
            free,
            total: count,
            buffer_size,
        })
    }

    /// Takes a buffer (length set to the full buffer size), or `None` when all are in use.
    pub fn acquire(&mut self) -> Option<DmaBuf> {
        let mut buf = self.free.pop()?;
        buf.start = 0;
        buf.len = buf.data.len();
        Some(buf)
    }

    /// Returns a buffer; a buffer of another pool is handed back.
    pub fn release(&mut self, buf: DmaBuf) -> Result<(), DmaBuf> {
        if buf.pool != self.id || self.free.len() >= self.total {
            return Err(buf);
        }
        // Never reallocates: capacity is `total` and at most `total` buffers exist.
        self.free.push(buf);
        Ok(())
    }

    /// Buffers available now.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Buffers in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Size of each buffer.
    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// The pool's ID.
    pub fn id(&self) -> u16 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeDma;

    #[test]
    fn acquire_until_empty_then_back_pressure() {
        let mut pool = BufferPool::new::<FakeDma>(1, 5, 1024).unwrap();
        assert_eq!(
            (pool.total(), pool.available(), pool.buffer_size()),
            (5, 5, 1024)
        );
        let mut held: Vec<DmaBuf> = std::iter::from_fn(|| pool.acquire()).collect();
        assert_eq!(held.len(), 5);
        assert!(
            pool.acquire().is_none(),
            "empty pool is back-pressure, not allocation"
        );

        // Buffers are disjoint and know their physical addresses.
        let mut phys: Vec<u64> = held.iter().map(|b| b.phys()).collect();
        phys.sort();
        assert!(phys.windows(2).all(|w| w[1] - w[0] >= 1024));
        for (i, b) in held.iter_mut().enumerate() {
            b.as_mut_slice().fill(i as u8);
        }
        for (i, b) in held.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8));
            assert_eq!(
                b.phys(),
                b.as_slice().as_ptr() as u64,
                "fake DMA is identity-mapped"
            );
        }

        let mut b = held.pop().unwrap();
        b.set_len(512).unwrap();
        assert_eq!(b.as_slice().len(), 512);
        assert!(b.set_len(1025).is_err());
        pool.release(b).unwrap();
        let b = pool.acquire().unwrap();
        assert_eq!(b.len(), 1024, "length is reset on acquire");
        held.push(b);
        for b in held {
            pool.release(b).unwrap();
        }
        assert_eq!(pool.available(), 5);
    }

    #[test]
    fn a_window_lends_part_of_a_buffer() {
        let mut pool = BufferPool::new::<FakeDma>(1, 1, 8192).unwrap();
        let mut b = pool.acquire().unwrap();
        b.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i / 512) as u8);
        let base = b.phys();
        b.set_window(1024, 2048).unwrap();
        assert_eq!((b.len(), b.phys()), (2048, base + 1024));
        assert_eq!(b.as_slice()[0], 2);
        assert_eq!(b.as_slice().as_ptr() as u64, b.phys());
        // set_len keeps the start.
        b.set_len(512).unwrap();
        assert_eq!((b.len(), b.phys()), (512, base + 1024));
        assert!(b.set_len(8192 - 1024 + 1).is_err());
        assert!(b.set_window(8192, 1).is_err());
        assert!(b.set_window(usize::MAX, 2).is_err());
        pool.release(b).unwrap();
        let b = pool.acquire().unwrap();
        assert_eq!(
            (b.len(), b.phys()),
            (8192, base),
            "acquire gives the whole buffer"
        );
    }

    #[test]
    fn foreign_buffers_are_refused() {
        let mut a = BufferPool::new::<FakeDma>(1, 1, 8192).unwrap();
        let mut b = BufferPool::new::<FakeDma>(2, 1, 8192).unwrap();
        let buf = a.acquire().unwrap();
        assert_eq!(buf.capacity(), 8192);
        let buf = b.release(buf).unwrap_err();
        a.release(buf).unwrap();
        assert!(BufferPool::new::<FakeDma>(3, 0, 512).is_err());
    }
}
