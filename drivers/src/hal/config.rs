//! PCI configuration space access: the [`ConfigAccess`] trait and its two mechanisms.
//!
//! - Configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2): write an address to port
//!   `0xCF8`, then read or write the dword at port `0xCFC`. Only the first 256 bytes of each
//!   function are reachable.
//! - ECAM (PCI Express Base 4.0 §7.2.2): a memory window described by the ACPI MCFG table, 4 KiB
//!   per function, reaching extended capabilities at offsets 0x100..0x1000.
//!
//! Configuration access happens during initialisation on the boot CPU only, so the two-step port
//! sequence needs no lock.

use super::MmioRegion;

/// The location of a PCI function: bus, device (0..32) and function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl PciAddress {
    /// Creates an address; device and function are masked to their field widths.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self {
            bus,
            device: device & 0x1f,
            function: function & 0x7,
        }
    }
}

impl core::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Access to PCI configuration space. Offsets are byte offsets of aligned dwords.
///
/// Reads of absent functions or unreachable offsets return all-ones, as the hardware does;
/// writes to them are ignored.
pub trait ConfigAccess {
    /// Reads the dword at `offset` (rounded down to a multiple of 4).
    fn read32(&self, addr: PciAddress, offset: u16) -> u32;

    /// Writes the dword at `offset` (rounded down to a multiple of 4).
    fn write32(&self, addr: PciAddress, offset: u16, value: u32);

    /// Whether offsets 0x100..0x1000 (PCIe extended configuration space) are reachable.
    fn extended(&self) -> bool {
        false
    }

    /// Reads the 16-bit word at `offset` (rounded down to a multiple of 2).
    fn read16(&self, addr: PciAddress, offset: u16) -> u16 {
        let shift = u32::from(offset & 2) * 8;
        (self.read32(addr, offset & !3) >> shift) as u16
    }

    /// Reads the byte at `offset`.
    fn read8(&self, addr: PciAddress, offset: u16) -> u8 {
        let shift = u32::from(offset & 3) * 8;
        (self.read32(addr, offset & !3) >> shift) as u8
    }

    /// Writes the 16-bit word at `offset` (rounded down to a multiple of 2) by read-modify-write
    /// of its dword.
    ///
    /// Careful with registers that have write-1-to-clear bits in the same dword (the status
    /// register next to the command register): use [`ConfigAccess::write32`] with those bits
    /// zero instead.
    fn write16(&self, addr: PciAddress, offset: u16, value: u16) {
        let shift = u32::from(offset & 2) * 8;
        let old = self.read32(addr, offset & !3);
        let new = (old & !(0xffff << shift)) | (u32::from(value) << shift);
        self.write32(addr, offset & !3, new);
    }
}

/// 32-bit port I/O, implemented by the kernel (`in`/`out` instructions).
pub trait PortIo {
    /// Reads a dword from `port`.
    fn read32(&self, port: u16) -> u32;
    /// Writes a dword to `port`.
    fn write32(&self, port: u16, value: u32);
}

/// Configuration mechanism #1 over ports `0xCF8` (address) and `0xCFC` (data).
#[derive(Debug)]
pub struct PortConfigAccess<P: PortIo> {
    ports: P,
}

/// `CONFIG_ADDRESS`: the address port of configuration mechanism #1.
const CONFIG_ADDRESS: u16 = 0xcf8;
/// `CONFIG_DATA`: the data port of configuration mechanism #1.
const CONFIG_DATA: u16 = 0xcfc;

impl<P: PortIo> PortConfigAccess<P> {
    /// Wraps the kernel's port I/O.
    pub const fn new(ports: P) -> Self {
        Self { ports }
    }

    /// The `CONFIG_ADDRESS` value for a register: enable bit, bus, device, function, dword.
    pub const fn address(addr: PciAddress, offset: u16) -> u32 {
        0x8000_0000
            | (addr.bus as u32) << 16
            | ((addr.device & 0x1f) as u32) << 11
            | ((addr.function & 0x7) as u32) << 8
            | (offset & 0xfc) as u32
    }
}

impl<P: PortIo> ConfigAccess for PortConfigAccess<P> {
    fn read32(&self, addr: PciAddress, offset: u16) -> u32 {
        if offset >= 0x100 {
            return u32::MAX;
        }
        self.ports
            .write32(CONFIG_ADDRESS, Self::address(addr, offset));
        self.ports.read32(CONFIG_DATA)
    }

    fn write32(&self, addr: PciAddress, offset: u16, value: u32) {
        if offset >= 0x100 {
            return;
        }
        self.ports
            .write32(CONFIG_ADDRESS, Self::address(addr, offset));
        self.ports.write32(CONFIG_DATA, value);
    }
}

/// PCIe Enhanced Configuration Access Mechanism over a mapped MCFG window.
#[derive(Debug)]
pub struct EcamConfigAccess {
    window: MmioRegion,
    start_bus: u8,
    end_bus: u8,
}

impl EcamConfigAccess {
    /// Bytes of ECAM window per bus (32 devices × 8 functions × 4 KiB).
    pub const BYTES_PER_BUS: usize = 1 << 20;

    /// Wraps a mapped ECAM window covering buses `start_bus..=end_bus` (from one MCFG entry;
    /// the window's physical base is the MCFG base address plus `start_bus << 20`).
    /// Buses outside the range, or beyond the window's length, read as absent.
    pub fn new(window: MmioRegion, start_bus: u8, end_bus: u8) -> Self {
        Self {
            window,
            start_bus,
            end_bus,
        }
    }

    fn offset(&self, addr: PciAddress, offset: u16) -> Option<usize> {
        if addr.bus < self.start_bus || addr.bus > self.end_bus || offset >= 0x1000 {
            return None;
        }
        Some(
            usize::from(addr.bus - self.start_bus) << 20
                | usize::from(addr.device & 0x1f) << 15
                | usize::from(addr.function & 0x7) << 12
                | usize::from(offset & 0xffc),
        )
    }
}

impl ConfigAccess for EcamConfigAccess {
    fn read32(&self, addr: PciAddress, offset: u16) -> u32 {
        self.offset(addr, offset)
            .and_then(|at| self.window.read32(at).ok())
            .unwrap_or(u32::MAX)
    }

    fn write32(&self, addr: PciAddress, offset: u16, value: u32) {
        if let Some(at) = self.offset(addr, offset) {
            // An out-of-window write is dropped, as the hardware would drop it.
            let _ = self.window.write32(at, value);
        }
    }

    fn extended(&self) -> bool {
        true
    }
}

/// Either configuration mechanism: ECAM when ACPI provides an MCFG table, ports otherwise.
#[derive(Debug)]
pub enum ConfigMechanism<P: PortIo> {
    /// Legacy configuration mechanism #1.
    Ports(PortConfigAccess<P>),
    /// PCIe ECAM.
    Ecam(EcamConfigAccess),
}

impl<P: PortIo> ConfigAccess for ConfigMechanism<P> {
    fn read32(&self, addr: PciAddress, offset: u16) -> u32 {
        match self {
            Self::Ports(p) => p.read32(addr, offset),
            Self::Ecam(e) => e.read32(addr, offset),
        }
    }

    fn write32(&self, addr: PciAddress, offset: u16, value: u32) {
        match self {
            Self::Ports(p) => p.write32(addr, offset, value),
            Self::Ecam(e) => e.write32(addr, offset, value),
        }
    }

    fn extended(&self) -> bool {
        matches!(self, Self::Ecam(_))
    }
}

/// virtio-drivers' `ConfigurationAccess` over ours, so its `PciTransport` reads capabilities
/// and sizes BARs through the kernel's configuration mechanism.
#[derive(Debug)]
pub struct VirtioConfigAccess<'a, C: ConfigAccess + ?Sized>(pub &'a C);

impl<C: ConfigAccess + ?Sized> virtio_drivers::transport::pci::bus::ConfigurationAccess
    for VirtioConfigAccess<'_, C>
{
    fn read_word(
        &self,
        df: virtio_drivers::transport::pci::bus::DeviceFunction,
        register_offset: u8,
    ) -> u32 {
        self.0.read32(
            PciAddress::new(df.bus, df.device, df.function),
            u16::from(register_offset),
        )
    }

    fn write_word(
        &mut self,
        df: virtio_drivers::transport::pci::bus::DeviceFunction,
        register_offset: u8,
        data: u32,
    ) {
        self.0.write32(
            PciAddress::new(df.bus, df.device, df.function),
            u16::from(register_offset),
            data,
        )
    }

    // `unsafe` by the trait's signature only: cloning a shared reference is harmless, and
    // every access goes through our safe `ConfigAccess`.
    unsafe fn unsafe_clone(&self) -> Self {
        Self(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;

    /// Records port writes and answers reads of 0xCFC from a function of the address.
    struct RecordingPorts {
        last_address: RefCell<u32>,
        writes: RefCell<Vec<(u16, u32)>>,
    }

    impl PortIo for RecordingPorts {
        fn read32(&self, port: u16) -> u32 {
            assert_eq!(port, CONFIG_DATA);
            *self.last_address.borrow() ^ 0x5555_5555
        }
        fn write32(&self, port: u16, value: u32) {
            if port == CONFIG_ADDRESS {
                *self.last_address.borrow_mut() = value;
            }
            self.writes.borrow_mut().push((port, value));
        }
    }

    #[test]
    fn port_mechanism_encodes_address() {
        let addr = PciAddress::new(0x12, 0x1f, 7);
        assert_eq!(
            PortConfigAccess::<RecordingPorts>::address(addr, 0x3e),
            0x8012_ff3c
        );
        let ports = RecordingPorts {
            last_address: RefCell::new(0),
            writes: RefCell::new(Vec::new()),
        };
        let access = PortConfigAccess::new(ports);
        assert_eq!(access.read32(addr, 0x3c), 0x8012_ff3c ^ 0x5555_5555);
        access.write32(addr, 0x10, 0xdead_beef);
        assert_eq!(
            access.ports.writes.borrow().last(),
            Some(&(CONFIG_DATA, 0xdead_beef))
        );
        // Extended offsets are unreachable through the ports.
        assert_eq!(access.read32(addr, 0x100), u32::MAX);
    }

    #[test]
    fn ecam_offsets_and_bounds() {
        let mut memory = vec![0u32; (2 << 20) / 4];
        // SAFETY: `memory` is plain memory that outlives `window` and is only accessed through it.
        let window = unsafe {
            MmioRegion::new(
                core::ptr::NonNull::new(memory.as_mut_ptr().cast()).unwrap(),
                2 << 20,
            )
        };
        let ecam = EcamConfigAccess::new(window, 4, 5);
        let addr = PciAddress::new(5, 2, 1);
        ecam.write32(addr, 0x104, 0x1234_5678);
        assert_eq!(ecam.read32(addr, 0x104), 0x1234_5678);
        assert_eq!(ecam.read16(addr, 0x106), 0x1234);
        assert_eq!(ecam.read8(addr, 0x105), 0x56);
        let index = ((1 << 20) | (2 << 15) | (1 << 12) | 0x104) / 4;
        assert_eq!(memory[index], 0x1234_5678);
        let window = unsafe_window(&mut memory);
        let ecam = EcamConfigAccess::new(window, 4, 5);
        assert_eq!(ecam.read32(PciAddress::new(6, 0, 0), 0), u32::MAX);
        assert_eq!(ecam.read32(PciAddress::new(3, 0, 0), 0), u32::MAX);
    }

    fn unsafe_window(memory: &mut [u32]) -> MmioRegion {
        // SAFETY: the caller's memory outlives the returned window in this test.
        unsafe {
            MmioRegion::new(
                core::ptr::NonNull::new(memory.as_mut_ptr().cast()).unwrap(),
                memory.len() * 4,
            )
        }
    }
}
