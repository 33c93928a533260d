//! Fake PCI configuration spaces for host tests: one 4 KiB byte array per function, with BAR
//! sizing masks, read-only identification registers and write-1-to-clear status bits.

use super::regs::*;
use super::{ConfigAccess, PciAddress};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// A hand-built function.
#[derive(Clone, Debug)]
pub struct FakeFunction {
    /// The configuration space.
    pub bytes: Vec<u8>,
    /// Writable bits of each BAR dword (0 = BAR not implemented).
    pub bar_masks: [u32; 6],
    /// How often a BAR was sized while memory or I/O decoding was on (must stay 0).
    pub sized_while_decoding: u32,
    /// Offset of the last capability added, for chaining.
    last_capability: Option<u16>,
    /// Next free offset for capabilities.
    next_capability: u16,
}

impl FakeFunction {
    /// A type 0 function with the given IDs and class.
    pub fn endpoint(vendor: u16, device: u16, class: u8, subclass: u8) -> Self {
        let mut f = Self {
            bytes: vec![0; 4096],
            bar_masks: [0; 6],
            sized_while_decoding: 0,
            last_capability: None,
            next_capability: 0x40,
        };
        f.set16(VENDOR_ID, vendor);
        f.set16(DEVICE_ID, device);
        f.bytes[usize::from(CLASS)] = class;
        f.bytes[usize::from(SUBCLASS)] = subclass;
        f
    }

    /// A PCI-to-PCI bridge forwarding to `secondary..=subordinate`.
    pub fn bridge(secondary: u8, subordinate: u8) -> Self {
        let mut f = Self::endpoint(0x1b36, 0x0001, CLASS_BRIDGE, SUBCLASS_PCI_BRIDGE);
        f.bytes[usize::from(HEADER_TYPE)] = HEADER_TYPE_BRIDGE;
        f.bytes[usize::from(SECONDARY_BUS)] = secondary;
        f.bytes[usize::from(SUBORDINATE_BUS)] = subordinate;
        f
    }

    /// Sets the multi-function bit.
    pub fn multifunction(mut self) -> Self {
        self.bytes[usize::from(HEADER_TYPE)] |= HEADER_TYPE_MULTIFUNCTION;
        self
    }

    /// Stores a byte.
    pub fn set8(&mut self, offset: u16, value: u8) {
        self.bytes[usize::from(offset)] = value;
    }

    /// Stores a little-endian word.
    pub fn set16(&mut self, offset: u16, value: u16) {
        let o = usize::from(offset);
        self.bytes[o..o + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// Stores a little-endian dword.
    pub fn set32(&mut self, offset: u16, value: u32) {
        let o = usize::from(offset);
        self.bytes[o..o + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// Loads a little-endian dword.
    pub fn get32(&self, offset: u16) -> u32 {
        let o = usize::from(offset & !3);
        u32::from_le_bytes([
            self.bytes[o],
            self.bytes[o + 1],
            self.bytes[o + 2],
            self.bytes[o + 3],
        ])
    }

    /// An I/O BAR.
    pub fn bar_io(&mut self, index: u8, port: u32, size: u32) {
        self.bar_masks[usize::from(index)] = !(size - 1) & !0x3;
        self.set32(BAR0 + 4 * u16::from(index), port | 1);
    }

    /// A 32-bit memory BAR.
    pub fn bar_mem32(&mut self, index: u8, address: u32, size: u32, prefetchable: bool) {
        self.bar_masks[usize::from(index)] = !(size - 1) & !0xf;
        self.set32(
            BAR0 + 4 * u16::from(index),
            address | if prefetchable { 8 } else { 0 },
        );
    }

    /// A 64-bit memory BAR in slots `index` and `index + 1`.
    pub fn bar_mem64(&mut self, index: u8, address: u64, size: u64, prefetchable: bool) {
        let mask = !(size - 1);
        self.bar_masks[usize::from(index)] = (mask as u32) & !0xf;
        if let Some(m) = self.bar_masks.get_mut(usize::from(index) + 1) {
            *m = (mask >> 32) as u32;
            self.set32(BAR0 + 4 * u16::from(index) + 4, (address >> 32) as u32);
        }
        self.set32(
            BAR0 + 4 * u16::from(index),
            (address as u32) | 0x4 | if prefetchable { 8 } else { 0 },
        );
    }

    /// Appends a capability with `id` and the bytes after the 2-byte header; returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> u16 {
        let offset = self.next_capability;
        self.bytes[usize::from(offset)] = id;
        self.bytes[usize::from(offset) + 1] = 0;
        let o = usize::from(offset) + 2;
        self.bytes[o..o + body.len()].copy_from_slice(body);
        match self.last_capability {
            Some(last) => self.bytes[usize::from(last) + 1] = offset as u8,
            None => self.bytes[usize::from(CAPABILITIES_POINTER)] = offset as u8,
        }
        let status =
            u16::from_le_bytes([self.bytes[6], self.bytes[7]]) | Status::CAPABILITIES_LIST.bits();
        self.set16(STATUS, status);
        self.last_capability = Some(offset);
        self.next_capability = (offset + 2 + body.len() as u16 + 3) & !3;
        offset
    }

    fn write(&mut self, offset: u16, value: u32) {
        let offset = offset & !3;
        match offset {
            // Identification, class, header type, subsystem, capabilities pointer: read-only.
            0x00 | 0x08 | 0x0c | 0x2c | 0x34 => {}
            0x04 => {
                let old = self.get32(0x04);
                let status = (old >> 16) & !(value >> 16);
                self.set32(0x04, (status << 16) | (value & 0xffff));
            }
            0x10..=0x27 => {
                let index = usize::from((offset - 0x10) / 4);
                let bridge = self.bytes[usize::from(HEADER_TYPE)] & 0x7f == HEADER_TYPE_BRIDGE;
                if bridge && index >= 2 {
                    self.set32(offset, value);
                    return;
                }
                if value == u32::MAX && self.get32(0x04) & 0x3 != 0 {
                    self.sized_while_decoding += 1;
                }
                let mask = self.bar_masks[index];
                let old = self.get32(offset);
                self.set32(offset, (value & mask) | (old & !mask));
            }
            _ => self.set32(offset, value),
        }
    }
}

/// A fake bus: functions by address; absent functions read all-ones.
#[derive(Debug, Default)]
pub struct FakePci {
    functions: RefCell<BTreeMap<PciAddress, FakeFunction>>,
    /// Whether to claim extended configuration space (ECAM).
    pub extended: bool,
    /// Every configuration read, for tests that count accesses.
    pub reads: std::cell::Cell<usize>,
}

impl FakePci {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a function.
    pub fn insert(&self, addr: PciAddress, function: FakeFunction) {
        self.functions.borrow_mut().insert(addr, function);
    }

    /// Runs `f` on a function.
    pub fn with<R>(&self, addr: PciAddress, f: impl FnOnce(&mut FakeFunction) -> R) -> R {
        f(self
            .functions
            .borrow_mut()
            .get_mut(&addr)
            .expect("fake function"))
    }
}

impl ConfigAccess for FakePci {
    fn read32(&self, addr: PciAddress, offset: u16) -> u32 {
        self.reads.set(self.reads.get() + 1);
        if offset >= 0x100 && !self.extended {
            return u32::MAX;
        }
        match self.functions.borrow().get(&addr) {
            Some(f) if offset < 0x1000 => f.get32(offset),
            _ => u32::MAX,
        }
    }

    fn write32(&self, addr: PciAddress, offset: u16, value: u32) {
        if offset >= 0x100 && !self.extended {
            return;
        }
        if let Some(f) = self.functions.borrow_mut().get_mut(&addr) {
            if offset < 0x1000 {
                f.write(offset, value);
            }
        }
    }

    fn extended(&self) -> bool {
        self.extended
    }
}
