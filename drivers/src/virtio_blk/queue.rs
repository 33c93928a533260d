//! The request queue of one virtio-blk device: a virtio-drivers split virtqueue, the per-slot
//! DMA memory for request headers and status bytes, and the in-flight table keyed by
//! descriptor token.
//!
//! This module is the driver's only `unsafe`: `AnyQueue::add` and `pop_used` (virtio-drivers'
//! `VirtQueue::add` and `pop_used`) require that the
//! buffers of a descriptor chain stay valid and untouched from `add` until the matching
//! `pop_used`. That holds because every buffer is `'static` DMA memory (pool buffers and this
//! queue's own slot memory, leaked at init) owned by an in-flight entry, and nothing outside
//! this module can reach an in-flight entry before it is popped.
//!
//! Each request uses at most three descriptors (header, data, status), so a queue of `N`
//! descriptors carries `N / 3` requests; [`RequestQueue::depth`] reports that.

use super::regs::{
    encode_discard, encode_header, DISCARD_SEGMENT_LEN, HEADER_LEN, ID_LEN, STATUS_UNSET,
};
use crate::block::{DmaBuf, SlotTable};
use crate::hal::{Dma, DmaSlice, HalError, VirtioDma};
use crate::virtio::AnyQueue;
use alloc::vec::Vec;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

/// What a request slot is doing.
#[derive(Debug)]
pub enum Owner {
    /// A caller's request.
    User {
        /// Caller's tag.
        tag: u64,
        /// The operation.
        op: crate::block::Operation,
        /// First block.
        lba: u64,
        /// The caller's buffer.
        buffer: Option<DmaBuf>,
    },
    /// The driver's own `GET_ID` request; the serial lands in the slot's ID buffer.
    GetId,
}

/// The descriptor layout of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    /// Header → data (device writes) → status.
    Read,
    /// Header, data → status.
    Write,
    /// Header → status.
    Flush,
    /// Header, discard segment → status.
    Discard,
    /// Header → 20-byte ID (device writes) → status.
    GetId,
}

/// Device-visible memory of one request slot.
#[derive(Debug)]
struct SlotMemory {
    header: &'static mut [u8; HEADER_LEN],
    discard: &'static mut [u8; DISCARD_SEGMENT_LEN],
    status: &'static mut [u8; 1],
    id: &'static mut [u8; ID_LEN],
}

/// Bytes of slot memory per request (header 16 + discard 16 + ID 20 + status 1, rounded).
const SLOT_BYTES: usize = 64;

#[derive(Debug)]
struct InFlight {
    owner: Owner,
    chain: Chain,
    token: u16,
}

/// A finished request taken off the used ring.
#[derive(Debug)]
pub struct Popped {
    /// Whose request.
    pub owner: Owner,
    /// The status byte the device wrote.
    pub status: u8,
    /// For `GET_ID`: the ID bytes.
    pub id: [u8; ID_LEN],
}

/// Errors of the request queue.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueError {
    /// No free slot or not enough free descriptors: back-pressure.
    Full,
    /// The device returned a token we never gave it (or one not in flight).
    UnknownToken(u16),
    /// virtio-drivers refused the operation.
    Virtio(virtio_drivers::Error),
}

/// One virtqueue with its slots and in-flight table.
#[derive(Debug)]
pub struct RequestQueue<H: Hal> {
    queue: AnyQueue<H>,
    index: u16,
    memory: Vec<SlotMemory>,
    slots: SlotTable<InFlight>,
    /// Descriptor token → slot; `NONE` when not in flight.
    token_slot: Vec<u16>,
    /// Notifications are held back (see [`RequestQueue::plug`]).
    plugged: bool,
    /// A request was queued while plugged.
    kick_pending: bool,
}

const NONE: u16 = u16::MAX;

/// Splits `len` bytes off the front of `region` as a fixed-size array reference.
fn take<const N: usize>(region: &mut DmaSlice) -> Result<&'static mut [u8; N], HalError> {
    let piece = region.split_off_front(N).ok_or(HalError::ZeroLength)?;
    piece.data.try_into().map_err(|_| HalError::ZeroLength)
}

impl<H: Hal> RequestQueue<H> {
    /// Wraps a set-up virtqueue; allocates slot memory for `depth` requests (at most
    /// `size / 3`).
    pub fn new(queue: AnyQueue<H>, index: u16, depth: u16) -> Result<Self, HalError> {
        let depth = depth.min(queue.size() / 3).max(1);
        let mut region = Dma::<VirtioDma<H>>::new(usize::from(depth) * SLOT_BYTES)?.leak();
        let mut memory = Vec::with_capacity(usize::from(depth));
        for _ in 0..depth {
            let mut slot = region
                .split_off_front(SLOT_BYTES)
                .ok_or(HalError::ZeroLength)?;
            memory.push(SlotMemory {
                header: take(&mut slot)?,
                discard: take(&mut slot)?,
                id: take(&mut slot)?,
                status: take(&mut slot)?,
            });
        }
        let mut token_slot = Vec::with_capacity(usize::from(queue.size()));
        token_slot.resize(usize::from(queue.size()), NONE);
        Ok(Self {
            queue,
            index,
            memory,
            slots: SlotTable::new(depth),
            token_slot,
            plugged: false,
            kick_pending: false,
        })
    }

    /// Holds back the device notification of requests submitted from now on, so that a
    /// burst costs one notification (one VM exit) at [`RequestQueue::unplug`].
    pub fn plug(&mut self) {
        self.plugged = true;
    }

    /// Notifies the device of the requests queued since [`RequestQueue::plug`], if it wants
    /// notifications (`should_notify` compares the whole range with its event index).
    pub fn unplug<T: Transport>(&mut self, transport: &mut T) {
        self.plugged = false;
        if core::mem::take(&mut self.kick_pending) && self.queue.should_notify() {
            transport.notify(self.index);
        }
    }

    /// Requests that can be in flight.
    pub fn depth(&self) -> u16 {
        self.memory.len() as u16
    }

    /// Descriptors in the virtqueue.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Whether the device has finished requests waiting to be popped.
    pub fn has_used(&self) -> bool {
        self.queue.peek_used().is_some()
    }

    /// Places a request on the ring and notifies the device if it wants notifications.
    /// `request_type` and `sector` go into the header; `discard` is `(sector, sectors)` for
    /// discards. On failure the owner comes back.
    pub fn submit<T: Transport>(
        &mut self,
        transport: &mut T,
        owner: Owner,
        chain: Chain,
        request_type: u32,
        sector: u64,
        discard: Option<(u64, u32)>,
    ) -> Result<(), (Owner, QueueError)> {
        let slot = match self.slots.insert(InFlight {
            owner,
            chain,
            token: 0,
        }) {
            Ok(slot) => slot,
            Err(entry) => return Err((entry.owner, QueueError::Full)),
        };
        let (Some(entry), Some(mem)) = (
            self.slots.get_mut(slot),
            self.memory.get_mut(usize::from(slot)),
        ) else {
            // Unreachable: slot IDs are below the table capacity, which equals `memory.len()`.
            let owner = self.slots.remove(slot).map_or(Owner::GetId, |e| e.owner);
            return Err((owner, QueueError::Full));
        };
        encode_header(mem.header, request_type, sector);
        if let Some((start, count)) = discard {
            encode_discard(mem.discard, start, count);
        }
        mem.status[0] = STATUS_UNSET;
        let result = with_chain(chain, mem, &mut entry.owner, |inputs, outputs| {
            // Buffers: slot memory, and the caller's `DmaBuf` moved into the in-flight entry;
            // untouched until `pop` has taken the token back with `pop_used` (module docs).
            // SAFETY: every buffer in the chain is `'static` DMA memory owned by this slot's
            // in-flight entry, and this module touches none of it while the device owns it.
            unsafe { self.queue.add(inputs, outputs) }
        });
        match result {
            Ok(Ok(token)) => {
                entry.token = token;
                if let Some(t) = self.token_slot.get_mut(usize::from(token)) {
                    *t = slot;
                }
                if self.plugged {
                    self.kick_pending = true;
                } else if self.queue.should_notify() {
                    transport.notify(self.index);
                }
                Ok(())
            }
            Ok(Err(e)) | Err(e) => {
                let owner = self.slots.remove(slot).map_or(Owner::GetId, |e| e.owner);
                let error = if e == virtio_drivers::Error::QueueFull {
                    QueueError::Full
                } else {
                    QueueError::Virtio(e)
                };
                Err((owner, error))
            }
        }
    }

    /// Takes the next finished request off the used ring, if any.
    pub fn pop(&mut self) -> Result<Option<Popped>, QueueError> {
        let Some(token) = self.queue.peek_used() else {
            return Ok(None);
        };
        let slot = self
            .token_slot
            .get(usize::from(token))
            .copied()
            .unwrap_or(NONE);
        let (Some(entry), Some(mem)) = (
            self.slots.get_mut(slot),
            self.memory.get_mut(usize::from(slot)),
        ) else {
            return Err(QueueError::UnknownToken(token));
        };
        if entry.token != token {
            return Err(QueueError::UnknownToken(token));
        }
        let chain = entry.chain;
        let result = with_chain(chain, mem, &mut entry.owner, |inputs, outputs| {
            // SAFETY: these are exactly the buffers `submit` added under this token (same slot
            // memory, same owner buffer, same chain layout), still valid and untouched.
            unsafe { self.queue.pop_used(token, inputs, outputs) }
        });
        match result {
            Ok(Ok(_written)) => {}
            Ok(Err(e)) | Err(e) => return Err(QueueError::Virtio(e)),
        }
        if let Some(t) = self.token_slot.get_mut(usize::from(token)) {
            *t = NONE;
        }
        let status = mem.status[0];
        let id = *mem.id;
        let entry = self
            .slots
            .remove(slot)
            .ok_or(QueueError::UnknownToken(token))?;
        Ok(Some(Popped {
            owner: entry.owner,
            status,
            id,
        }))
    }

    /// After the device has been reset: takes every in-flight owner back without touching the
    /// ring (the device no longer accesses the buffers).
    pub fn abandon(&mut self, mut f: impl FnMut(Owner)) {
        while let Some(slot) = self.slots.first_id() {
            if let Some(entry) = self.slots.remove(slot) {
                f(entry.owner);
            }
        }
        self.token_slot.fill(NONE);
    }
}

/// Lays out a request's buffers as virtio-drivers wants them and calls `f(inputs, outputs)`.
fn with_chain<R>(
    chain: Chain,
    mem: &mut SlotMemory,
    owner: &mut Owner,
    f: impl for<'a> FnOnce(&'a [&'a [u8]], &'a mut [&'a mut [u8]]) -> R,
) -> Result<R, virtio_drivers::Error> {
    let SlotMemory {
        header,
        discard,
        status,
        id,
    } = mem;
    let header: &[u8] = &header[..];
    let data = match owner {
        Owner::User {
            buffer: Some(buffer),
            ..
        } => Some(buffer.as_mut_slice()),
        _ => None,
    };
    Ok(match (chain, data) {
        (Chain::Read, Some(data)) if !data.is_empty() => f(&[header], &mut [data, &mut status[..]]),
        (Chain::Write, Some(data)) if !data.is_empty() => {
            f(&[header, data], &mut [&mut status[..]])
        }
        (Chain::Flush, _) => f(&[header], &mut [&mut status[..]]),
        (Chain::Discard, _) => f(&[header, &discard[..]], &mut [&mut status[..]]),
        (Chain::GetId, _) => f(&[header], &mut [&mut id[..], &mut status[..]]),
        _ => return Err(virtio_drivers::Error::InvalidParam),
    })
}
