//! One virtio-net virtqueue (receive or transmit) with its packet buffers: a virtio-drivers
//! split virtqueue, a pool of [`BUFFER_SIZE`]-byte DMA buffers allocated at start-up, and the
//! token → buffer table.
//!
//! Each packet uses exactly one descriptor (header and frame in one buffer), so a queue of `N`
//! descriptors carries `N` packets. Receive buffers are device-writable and all posted at
//! start-up; the caller takes a filled one with [`PacketQueue::pop`], reads it, and posts it
//! again with [`PacketQueue::post_receive`]. Transmit buffers start free; the caller takes one
//! with [`PacketQueue::take_free`], fills it, and posts it with [`PacketQueue::post_transmit`];
//! [`PacketQueue::pop`] hands it back once the device has sent it.
//!
//! This module is the driver's only `unsafe`: `AnyQueue::add` and `pop_used` (virtio-drivers'
//! `VirtQueue::add` and `pop_used`) require that a
//! posted buffer stays valid and untouched until the matching `pop_used`. That holds because
//! buffers are `'static` DMA memory owned by this queue, and a posted buffer is reachable only
//! through the queue's own table until it is popped (the accessors refuse posted buffers).

use super::BUFFER_SIZE;
use crate::hal::{Dma, HalError, VirtioDma};
use crate::virtio::AnyQueue;
use alloc::vec::Vec;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

/// Which way a queue's buffers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Device → driver (queue 0, `receiveq1`).
    Receive,
    /// Driver → device (queue 1, `transmitq1`).
    Transmit,
}

/// Errors of a packet queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The device returned a token we never gave it (or one not in flight).
    UnknownToken(u16),
    /// The device claims to have written more than the buffer holds.
    BadLength(u32),
    /// The buffer index is out of range or the buffer is posted.
    NotOwned(u16),
    /// virtio-drivers refused the operation.
    Virtio(virtio_drivers::Error),
}

const NONE: u16 = u16::MAX;

/// One virtqueue with its packet buffers.
#[derive(Debug)]
pub struct PacketQueue<H: Hal> {
    queue: AnyQueue<H>,
    index: u16,
    direction: Direction,
    buffers: Vec<&'static mut [u8]>,
    /// Buffer → posted length (0 = not posted).
    posted: Vec<u32>,
    /// Descriptor token → buffer; `NONE` when not in flight.
    token_buffer: Vec<u16>,
    /// Free transmit buffers (a stack); unused for receive queues.
    free: Vec<u16>,
    /// Buffers added since the last notification.
    unnotified: bool,
}

impl<H: Hal> PacketQueue<H> {
    /// Sets up queue `index` with `size` descriptors (from
    /// [`crate::virtio::choose_queue_size`]) and `size`
    /// buffers of [`BUFFER_SIZE`] bytes. Receive buffers are not posted yet
    /// ([`PacketQueue::post_all_receive`] after the vector is assigned).
    pub fn new<T: Transport>(
        transport: &mut T,
        index: u16,
        size: u16,
        direction: Direction,
    ) -> Result<Self, QueueError> {
        Self::with_buffers(transport, index, size, direction, size, BUFFER_SIZE)
    }

    /// As [`PacketQueue::new`], with `count` buffers (at most `size`) of `buffer_size` bytes
    /// each (a multiple of 8): a transmit queue of large frames needs fewer, larger ones.
    pub fn with_buffers<T: Transport>(
        transport: &mut T,
        index: u16,
        size: u16,
        direction: Direction,
        count: u16,
        buffer_size: usize,
    ) -> Result<Self, QueueError> {
        let queue =
            AnyQueue::<H>::new(transport, index, size, false).map_err(QueueError::Virtio)?;
        let descriptors = usize::from(size);
        let count = usize::from(count.min(size));
        let mut region = Dma::<VirtioDma<H>>::new(count * buffer_size)
            .map_err(|e| match e {
                HalError::DmaExhausted { .. } => {
                    QueueError::Virtio(virtio_drivers::Error::DmaError)
                }
                _ => QueueError::Virtio(virtio_drivers::Error::InvalidParam),
            })?
            .leak();
        let mut buffers = Vec::with_capacity(count);
        for _ in 0..count {
            let piece = region
                .split_off_front(buffer_size)
                .ok_or(QueueError::Virtio(virtio_drivers::Error::InvalidParam))?;
            buffers.push(piece.data);
        }
        let free = match direction {
            Direction::Receive => Vec::new(),
            Direction::Transmit => (0..count as u16).rev().collect(),
        };
        Ok(Self {
            queue,
            index,
            direction,
            buffers,
            posted: alloc::vec![0; count],
            token_buffer: alloc::vec![NONE; descriptors],
            free,
            unnotified: false,
        })
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.token_buffer.len() as u16
    }

    /// Number of buffers (at most one per descriptor).
    pub fn buffers(&self) -> u16 {
        self.buffers.len() as u16
    }

    /// Buffers the device holds.
    pub fn posted(&self) -> usize {
        self.posted.iter().filter(|&&p| p != 0).count()
    }

    /// Free transmit buffers.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Whether the device has used buffers waiting to be popped.
    pub fn has_used(&self) -> bool {
        self.queue.peek_used().is_some()
    }

    /// Asks the device for (`true`) or against interrupts when it uses buffers.
    pub fn set_interrupts(&mut self, enable: bool) {
        self.queue.set_dev_notify(enable);
    }

    /// Posts every receive buffer (start-up).
    pub fn post_all_receive(&mut self) -> Result<(), QueueError> {
        for buffer in 0..self.buffers() {
            self.post_receive(buffer)?;
        }
        Ok(())
    }

    /// Gives receive buffer `buffer` (not posted) to the device.
    pub fn post_receive(&mut self, buffer: u16) -> Result<(), QueueError> {
        debug_assert_eq!(self.direction, Direction::Receive);
        let b = usize::from(buffer);
        let Some(data) = self
            .buffers
            .get_mut(b)
            .filter(|_| self.posted.get(b) == Some(&0))
        else {
            return Err(QueueError::NotOwned(buffer));
        };
        let len = data.len();
        // `posted[b] != 0` until `pop` takes the token back: no accessor hands the buffer out.
        // SAFETY: `'static` DMA memory this queue owns and has not posted (see above).
        let token =
            unsafe { self.queue.add(&[], &mut [&mut data[..]]) }.map_err(QueueError::Virtio)?;
        self.record(buffer, token, len)
    }

    /// Takes a free transmit buffer.
    pub fn take_free(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Returns a transmit buffer taken by [`PacketQueue::take_free`] without sending it.
    pub fn give_back(&mut self, buffer: u16) {
        if usize::from(buffer) < self.buffers.len()
            && self.posted.get(usize::from(buffer)) == Some(&0)
            && !self.free.contains(&buffer)
        {
            self.free.push(buffer);
        }
    }

    /// Gives the first `len` bytes of transmit buffer `buffer` to the device.
    pub fn post_transmit(&mut self, buffer: u16, len: usize) -> Result<(), QueueError> {
        debug_assert_eq!(self.direction, Direction::Transmit);
        let b = usize::from(buffer);
        let Some(data) = self
            .buffers
            .get_mut(b)
            .filter(|_| self.posted.get(b) == Some(&0))
        else {
            return Err(QueueError::NotOwned(buffer));
        };
        let len = len.clamp(1, data.len());
        // SAFETY: as in `post_receive`: owned, unposted `'static` DMA memory until `pop`.
        let token =
            unsafe { self.queue.add(&[&data[..len]], &mut []) }.map_err(QueueError::Virtio)?;
        self.record(buffer, token, len)
    }

    fn record(&mut self, buffer: u16, token: u16, len: usize) -> Result<(), QueueError> {
        let slot = self
            .token_buffer
            .get_mut(usize::from(token))
            .ok_or(QueueError::UnknownToken(token))?;
        *slot = buffer;
        if let Some(p) = self.posted.get_mut(usize::from(buffer)) {
            *p = len as u32;
        }
        self.unnotified = true;
        Ok(())
    }

    /// Notifies the device if buffers were added since the last call and it wants to know.
    pub fn kick<T: Transport>(&mut self, transport: &mut T) {
        if core::mem::take(&mut self.unnotified) && self.queue.should_notify() {
            transport.notify(self.index);
        }
    }

    /// Takes the next used buffer back from the device: `(buffer, bytes written)` (the byte
    /// count is 0 for transmit buffers). A transmit buffer goes back on the free list.
    pub fn pop(&mut self) -> Result<Option<(u16, usize)>, QueueError> {
        let Some(token) = self.queue.peek_used() else {
            return Ok(None);
        };
        let buffer = self
            .token_buffer
            .get(usize::from(token))
            .copied()
            .unwrap_or(NONE);
        let b = usize::from(buffer);
        let (Some(data), Some(&len)) = (self.buffers.get_mut(b), self.posted.get(b)) else {
            return Err(QueueError::UnknownToken(token));
        };
        if len == 0 {
            return Err(QueueError::UnknownToken(token));
        }
        let len = len as usize;
        let written = match self.direction {
            Direction::Receive => {
                // SAFETY: exactly the buffer `post_receive` added under this token.
                unsafe { self.queue.pop_used(token, &[], &mut [&mut data[..len]]) }
            }
            Direction::Transmit => {
                // SAFETY: exactly the buffer (and length) `post_transmit` added under this token.
                unsafe { self.queue.pop_used(token, &[&data[..len]], &mut []) }
            }
        }
        .map_err(QueueError::Virtio)?;
        if let Some(t) = self.token_buffer.get_mut(usize::from(token)) {
            *t = NONE;
        }
        if let Some(p) = self.posted.get_mut(b) {
            *p = 0;
        }
        if self.direction == Direction::Transmit {
            self.free.push(buffer);
            return Ok(Some((buffer, 0)));
        }
        let written = written as usize;
        if written > len {
            // Keep the buffer out of the ring; the caller fails the device.
            return Err(QueueError::BadLength(written as u32));
        }
        Ok(Some((buffer, written)))
    }

    /// A buffer the driver owns (not posted), for the CPU.
    pub fn buffer(&self, buffer: u16) -> Option<&[u8]> {
        let b = usize::from(buffer);
        match self.posted.get(b) {
            Some(0) => self.buffers.get(b).map(|d| &d[..]),
            _ => None,
        }
    }

    /// A buffer the driver owns (not posted), for the CPU, mutably.
    pub fn buffer_mut(&mut self, buffer: u16) -> Option<&mut [u8]> {
        let b = usize::from(buffer);
        match self.posted.get(b) {
            Some(0) => self.buffers.get_mut(b).map(|d| &mut d[..]),
            _ => None,
        }
    }
}
