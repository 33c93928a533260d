//! One split virtqueue of any supported size: virtio-drivers' `VirtQueue` takes its size as a
//! const generic, so [`AnyQueue`] has one variant per power of two from [`MIN_QUEUE_SIZE`] to
//! [`MAX_QUEUE_SIZE`] and forwards to whichever the device's maximum allowed.
//!
//! `unsafe` here only forwards `VirtQueue::add` and `pop_used`, whose buffer contract the
//! caller takes over (each driver's queue module documents how it keeps it).

use alloc::boxed::Box;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

/// Largest queue we set up.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Smallest queue we accept (two virtio-blk requests of three descriptors).
pub const MIN_QUEUE_SIZE: u16 = 8;

/// A split virtqueue of any supported size.
#[derive(Debug)]
pub enum AnyQueue<H: Hal> {
    /// 256 descriptors.
    S256(Box<VirtQueue<H, 256>>),
    /// 128 descriptors.
    S128(Box<VirtQueue<H, 128>>),
    /// 64 descriptors.
    S64(Box<VirtQueue<H, 64>>),
    /// 32 descriptors.
    S32(Box<VirtQueue<H, 32>>),
    /// 16 descriptors.
    S16(Box<VirtQueue<H, 16>>),
    /// 8 descriptors.
    S8(Box<VirtQueue<H, 8>>),
}

macro_rules! each_queue {
    ($queue:expr, $q:ident => $body:expr) => {
        match $queue {
            AnyQueue::S256($q) => $body,
            AnyQueue::S128($q) => $body,
            AnyQueue::S64($q) => $body,
            AnyQueue::S32($q) => $body,
            AnyQueue::S16($q) => $body,
            AnyQueue::S8($q) => $body,
        }
    };
}

/// The queue size to use: the largest power of two within the device's maximum and ours.
pub fn choose_queue_size(device_max: u32, limit: u16) -> Option<u16> {
    let cap = device_max.min(u32::from(limit.min(MAX_QUEUE_SIZE)));
    if cap < u32::from(MIN_QUEUE_SIZE) {
        return None;
    }
    // Largest power of two <= cap.
    Some(1u16 << (31 - cap.leading_zeros()))
}

impl<H: Hal> AnyQueue<H> {
    /// Sets up queue `index` with `size` descriptors (from [`choose_queue_size`]), with
    /// `VIRTIO_F_RING_EVENT_IDX` notification suppression when `event_idx` was negotiated.
    pub fn new<T: Transport>(
        transport: &mut T,
        index: u16,
        size: u16,
        event_idx: bool,
    ) -> Result<Self, virtio_drivers::Error> {
        fn boxed<H: Hal, T: Transport, const N: usize>(
            transport: &mut T,
            index: u16,
            event_idx: bool,
        ) -> Result<Box<VirtQueue<H, N>>, virtio_drivers::Error> {
            VirtQueue::new(transport, index, false, event_idx).map(Box::new)
        }
        Ok(match size {
            256 => Self::S256(boxed(transport, index, event_idx)?),
            128 => Self::S128(boxed(transport, index, event_idx)?),
            64 => Self::S64(boxed(transport, index, event_idx)?),
            32 => Self::S32(boxed(transport, index, event_idx)?),
            16 => Self::S16(boxed(transport, index, event_idx)?),
            8 => Self::S8(boxed(transport, index, event_idx)?),
            _ => return Err(virtio_drivers::Error::InvalidParam),
        })
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        match self {
            Self::S256(_) => 256,
            Self::S128(_) => 128,
            Self::S64(_) => 64,
            Self::S32(_) => 32,
            Self::S16(_) => 16,
            Self::S8(_) => 8,
        }
    }

    /// Whether the device wants a notification for what was added since the last one.
    pub fn should_notify(&self) -> bool {
        each_queue!(self, q => q.should_notify())
    }

    /// The token of the next used chain, if the device has returned one.
    pub fn peek_used(&self) -> Option<u16> {
        each_queue!(self, q => q.peek_used())
    }

    /// Asks the device for (`true`) or against interrupts when it uses buffers.
    pub fn set_dev_notify(&mut self, enable: bool) {
        each_queue!(self, q => q.set_dev_notify(enable));
    }

    /// `VirtQueue::add`: places a chain of device-readable `inputs` and device-writable
    /// `outputs` on the available ring and returns its token.
    ///
    /// # Safety
    /// As `VirtQueue::add`: every buffer must stay valid, and untouched by the CPU, until the
    /// chain is taken back with [`AnyQueue::pop_used`] under the returned token.
    pub unsafe fn add<'a, 'b>(
        &mut self,
        inputs: &'a [&'b [u8]],
        outputs: &'a mut [&'b mut [u8]],
    ) -> Result<u16, virtio_drivers::Error> {
        // SAFETY: the caller keeps `VirtQueue::add`'s contract (see above).
        each_queue!(self, q => unsafe { q.add(inputs, outputs) })
    }

    /// `VirtQueue::pop_used`: takes the used chain `token` back and returns how many bytes the
    /// device wrote.
    ///
    /// # Safety
    /// As `VirtQueue::pop_used`: `inputs` and `outputs` must be exactly the buffers added
    /// under `token`.
    pub unsafe fn pop_used<'a>(
        &mut self,
        token: u16,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> Result<u32, virtio_drivers::Error> {
        // SAFETY: the caller keeps `VirtQueue::pop_used`'s contract (see above).
        each_queue!(self, q => unsafe { q.pop_used(token, inputs, outputs) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::fake::FakeVirtioHal;
    use crate::virtio_blk::fake_queue::{FakeBlk, FakeTransport};

    #[test]
    fn queue_size_choice() {
        assert_eq!(choose_queue_size(1024, 256), Some(256));
        assert_eq!(choose_queue_size(256, 1024), Some(256));
        assert_eq!(choose_queue_size(256, 64), Some(64));
        assert_eq!(choose_queue_size(100, 256), Some(64));
        assert_eq!(choose_queue_size(8, 256), Some(8));
        assert_eq!(choose_queue_size(7, 256), None);
        assert_eq!(choose_queue_size(0, 256), None);
        assert_eq!(choose_queue_size(u32::MAX, u16::MAX), Some(256));
    }

    #[test]
    fn every_supported_size_reaches_the_device() {
        for size in [8u16, 16, 32, 64, 128, 256] {
            let fake = FakeBlk::new(8, 0);
            let mut transport = FakeTransport(fake.clone());
            let queue = AnyQueue::<FakeVirtioHal>::new(&mut transport, 0, size, false).unwrap();
            assert_eq!(queue.size(), size);
            assert_eq!(fake.borrow().queue.map(|q| q.0), Some(u32::from(size)));
            assert_eq!(queue.peek_used(), None);
        }
        let mut transport = FakeTransport(FakeBlk::new(8, 0));
        for size in [0u16, 4, 100, 512] {
            assert_eq!(
                AnyQueue::<FakeVirtioHal>::new(&mut transport, 0, size, false).unwrap_err(),
                virtio_drivers::Error::InvalidParam
            );
        }
    }

    #[test]
    fn a_chain_goes_round_the_rings() {
        let fake = FakeBlk::new(8, 0);
        let mut transport = FakeTransport(fake.clone());
        let mut queue = AnyQueue::<FakeVirtioHal>::new(&mut transport, 0, 8, false).unwrap();
        // Buffers that outlive the chain, as the drivers' DMA memory does.
        let header: &'static mut [u8] = Box::leak(Box::new([0u8; 16]));
        let status: &'static mut [u8] = Box::leak(Box::new([0xffu8; 1]));
        header[0] = 4; // VIRTIO_BLK_T_FLUSH: the fake answers with status 0
                       // SAFETY: both buffers are leaked, so they stay valid, and are not touched until popped.
        let token = unsafe { queue.add(&[&header[..]], &mut [&mut status[..]]) }.unwrap();
        assert!(queue.should_notify());
        assert_eq!(queue.peek_used(), None);
        fake.borrow_mut().complete_all(false);
        assert_eq!(queue.peek_used(), Some(token));
        // SAFETY: exactly the buffers added under `token`.
        let written = unsafe { queue.pop_used(token, &[&header[..]], &mut [&mut status[..]]) };
        assert_eq!(written, Ok(1));
        assert_eq!(status[0], 0);
        assert_eq!(queue.peek_used(), None);
    }
}
