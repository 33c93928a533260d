//! A fake virtio-blk device for host tests: a `Transport` whose virtqueue is served by code
//! that reads the rings and descriptors in host memory (physical == virtual with the fake HAL)
//! and a RAM disk behind them. Tests choose when and in which order requests complete.

use super::regs;
use crate::virtio::regs::NO_VECTOR;
use crate::virtio::{SetupError, VectorConfig};
use std::cell::RefCell;
use std::rc::Rc;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The device's state, shared between the transport, the vector programming and the test.
#[derive(Debug)]
pub struct FakeBlk {
    pub device_features: u64,
    pub driver_features: u64,
    pub status: DeviceStatus,
    pub refuse_features: bool,
    pub max_queue_size: u32,
    /// size, descriptor table, driver area, device area.
    pub queue: Option<(u32, u64, u64, u64)>,
    pub notifications: usize,
    pub config: Vec<u8>,
    pub disk: Vec<u8>,
    pub serial: [u8; 20],
    /// Heads taken from the available ring and not yet completed.
    pub pending: Vec<u16>,
    pub last_avail: u16,
    pub config_vector: u16,
    pub queue_vector: u16,
    pub refuse_queue_vector: bool,
    /// Status byte to answer instead of OK for the next completions.
    pub fail_status: Vec<u8>,
    pub flushes: usize,
    pub resets: usize,
}

pub type Shared = Rc<RefCell<FakeBlk>>;

impl FakeBlk {
    /// A device of `sectors` 512-byte sectors offering `features`.
    pub fn new(sectors: u64, features: u64) -> Shared {
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        Rc::new(RefCell::new(Self {
            device_features: features,
            driver_features: 0,
            status: DeviceStatus::empty(),
            refuse_features: false,
            max_queue_size: 256,
            queue: None,
            notifications: 0,
            config,
            disk: vec![0; (sectors * 512) as usize],
            serial: *b"FAKE-SERIAL-0001\0\0\0\0",
            pending: Vec::new(),
            last_avail: 0,
            config_vector: NO_VECTOR,
            queue_vector: NO_VECTOR,
            refuse_queue_vector: false,
            fail_status: Vec::new(),
            flushes: 0,
            resets: 0,
        }))
    }

    pub fn set_config32(&mut self, offset: usize, value: u32) {
        self.config[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn queue(&self) -> (u32, u64, u64, u64) {
        self.queue.expect("queue set up")
    }

    /// Takes every new available chain into `pending`.
    pub fn fetch(&mut self) {
        let (size, _, avail, _) = self.queue();
        // SAFETY: the driver area is live DMA memory of the queue under test (phys == virt).
        let idx = unsafe { ((avail + 2) as *const u16).read_volatile() };
        while self.last_avail != idx {
            let slot = u64::from(self.last_avail % size as u16);
            // SAFETY: as above; the ring has `size` entries.
            let head = unsafe { ((avail + 4 + 2 * slot) as *const u16).read_volatile() };
            self.pending.push(head);
            self.last_avail = self.last_avail.wrapping_add(1);
        }
    }

    /// Completes pending chains: all of them, in the given order of positions.
    pub fn complete_all(&mut self, reverse: bool) -> usize {
        self.fetch();
        let mut heads = std::mem::take(&mut self.pending);
        if reverse {
            heads.reverse();
        }
        let n = heads.len();
        for head in heads {
            self.complete(head);
        }
        n
    }

    /// Puts an element on the used ring.
    pub fn push_used(&mut self, id: u32, len: u32) {
        let (size, _, _, used) = self.queue();
        // SAFETY: the device area is live DMA memory of the queue under test.
        unsafe {
            let idx_ptr = (used + 2) as *mut u16;
            let idx = idx_ptr.read_volatile();
            let elem = (used + 4 + 8 * u64::from(idx % size as u16)) as *mut u32;
            elem.write_volatile(id);
            elem.add(1).write_volatile(len);
            idx_ptr.write_volatile(idx.wrapping_add(1));
        }
    }

    /// Moves the used ring's index on by `n` without writing elements (a device that
    /// claims completions it never wrote).
    pub fn bump_used_idx(&mut self, n: u16) {
        let (_, _, _, used) = self.queue();
        // SAFETY: the device area is live DMA memory of the queue under test.
        unsafe {
            let idx_ptr = (used + 2) as *mut u16;
            idx_ptr.write_volatile(idx_ptr.read_volatile().wrapping_add(n));
        }
    }

    fn descriptor(&self, index: u16) -> (u64, u32, u16, u16) {
        let (_, desc, _, _) = self.queue();
        let p = desc + 16 * u64::from(index);
        // SAFETY: the descriptor table is live DMA memory of the queue under test.
        unsafe {
            (
                (p as *const u64).read_volatile(),
                ((p + 8) as *const u32).read_volatile(),
                ((p + 12) as *const u16).read_volatile(),
                ((p + 14) as *const u16).read_volatile(),
            )
        }
    }

    /// Serves the chain starting at `head`. A chain that is no longer there (the driver took
    /// it back after the used ring lied to it: descriptors without a buffer, a loop, no
    /// request header) is dropped; a request outside the disk fails with `S_IOERR` and one of
    /// a type the fake does not know with `S_UNSUPP`, as a device would answer them.
    pub fn complete(&mut self, head: u16) {
        let (size, _, _, _) = self.queue();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut index = head;
        for hop in 0.. {
            let (addr, len, flags, next) = self.descriptor(index % size as u16);
            if addr == 0 || hop >= size {
                return;
            }
            if flags & 2 != 0 {
                writable.push((addr, len as usize));
            } else {
                // SAFETY: device-readable buffer posted by the driver under test.
                readable.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(addr as *const u8, len as usize)
                });
            }
            if flags & 1 == 0 {
                break;
            }
            index = next;
        }
        if readable.len() < 16 || writable.is_empty() {
            return;
        }
        let request_type = u32::from_le_bytes(readable[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(readable[8..16].try_into().unwrap()) as usize;
        let mut out: Vec<u8> = Vec::new();
        let data_len: usize = writable
            .iter()
            .map(|w| w.1)
            .sum::<usize>()
            .saturating_sub(1);
        let on_disk = |start: usize, len: usize| {
            start
                .checked_mul(512)
                .and_then(|s| s.checked_add(len))
                .is_some_and(|end| end <= self.disk.len())
        };
        let (mut failed, mut unsupported) = (false, false);
        match request_type {
            regs::T_IN if on_disk(sector, data_len) => {
                out.extend_from_slice(&self.disk[sector * 512..sector * 512 + data_len])
            }
            regs::T_OUT if on_disk(sector, readable.len() - 16) => {
                let data = &readable[16..];
                self.disk[sector * 512..sector * 512 + data.len()].copy_from_slice(data);
            }
            regs::T_IN | regs::T_OUT => failed = true,
            regs::T_FLUSH => self.flushes += 1,
            regs::T_GET_ID => out.extend_from_slice(&self.serial),
            regs::T_DISCARD if readable.len() >= 28 => {
                let start = u64::from_le_bytes(readable[16..24].try_into().unwrap()) as usize;
                let count = u32::from_le_bytes(readable[24..28].try_into().unwrap()) as usize;
                if on_disk(start, count * 512) {
                    self.disk[start * 512..(start + count) * 512].fill(0);
                } else {
                    failed = true;
                }
            }
            _ => unsupported = true,
        }
        let status = if unsupported {
            regs::S_UNSUPP
        } else if failed {
            regs::S_IOERR
        } else if self.fail_status.is_empty() {
            regs::S_OK
        } else {
            self.fail_status.remove(0)
        };
        out.resize(data_len, 0);
        out.push(status);
        let mut at = 0;
        for (addr, len) in writable {
            // SAFETY: device-writable buffer posted by the driver under test.
            unsafe {
                std::ptr::copy_nonoverlapping(out[at..at + len].as_ptr(), addr as *mut u8, len)
            };
            at += len;
        }
        self.push_used(u32::from(head), out.len() as u32);
    }
}

/// The transport side of the fake.
#[derive(Debug)]
pub struct FakeTransport(pub Shared);

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn read_device_features(&mut self) -> u64 {
        self.0.borrow().device_features
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.borrow_mut().driver_features = driver_features;
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.0.borrow().max_queue_size
    }

    fn notify(&mut self, _queue: u16) {
        self.0.borrow_mut().notifications += 1;
    }

    fn get_status(&self) -> DeviceStatus {
        self.0.borrow().status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        let mut s = self.0.borrow_mut();
        if status.is_empty() {
            s.resets += 1;
            s.queue = None;
            s.pending.clear();
            s.last_avail = 0;
        }
        s.status = if s.refuse_features {
            status - DeviceStatus::FEATURES_OK
        } else {
            status
        };
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        _queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.0.borrow_mut().queue = Some((size, descriptors, driver_area, device_area));
    }

    fn queue_unset(&mut self, _queue: u16) {
        self.0.borrow_mut().queue = None;
    }

    fn queue_used(&mut self, _queue: u16) -> bool {
        self.0.borrow().queue.is_some()
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let s = self.0.borrow();
        let end = offset + size_of::<T>();
        if end > s.config.len() {
            return Err(Error::ConfigSpaceTooSmall);
        }
        T::read_from_bytes(&s.config[offset..end]).map_err(|_| Error::IoError)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), Error> {
        let mut s = self.0.borrow_mut();
        let bytes = value.as_bytes();
        let end = offset + bytes.len();
        if end > s.config.len() {
            return Err(Error::ConfigSpaceTooSmall);
        }
        s.config[offset..end].copy_from_slice(bytes);
        Ok(())
    }
}

/// The common-configuration side of the fake.
#[derive(Debug)]
pub struct FakeVectors(pub Shared);

impl VectorConfig for FakeVectors {
    fn set_config_vector(&mut self, entry: u16) -> Result<u16, SetupError> {
        let mut s = self.0.borrow_mut();
        s.config_vector = entry;
        Ok(s.config_vector)
    }

    fn set_queue_vector(&mut self, _queue: u16, entry: u16) -> Result<u16, SetupError> {
        let mut s = self.0.borrow_mut();
        s.queue_vector = if s.refuse_queue_vector {
            NO_VECTOR
        } else {
            entry
        };
        Ok(s.queue_vector)
    }
}
