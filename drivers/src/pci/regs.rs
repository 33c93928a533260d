//! PCI configuration space register layout (PCI Local Bus 3.0 §6.1, PCI-to-PCI Bridge 1.2 §3.2).

use bitflags::bitflags;

/// Vendor ID (16 bits); 0xFFFF means no function.
pub const VENDOR_ID: u16 = 0x00;
/// Device ID (16 bits).
pub const DEVICE_ID: u16 = 0x02;
/// Command register (16 bits).
pub const COMMAND: u16 = 0x04;
/// Status register (16 bits, write-1-to-clear error bits).
pub const STATUS: u16 = 0x06;
/// Revision ID (8 bits).
pub const REVISION_ID: u16 = 0x08;
/// Programming interface (8 bits).
pub const PROG_IF: u16 = 0x09;
/// Subclass code (8 bits).
pub const SUBCLASS: u16 = 0x0a;
/// Base class code (8 bits).
pub const CLASS: u16 = 0x0b;
/// Header type (8 bits; bit 7 = multi-function).
pub const HEADER_TYPE: u16 = 0x0e;
/// First base address register; BAR *n* is at `BAR0 + 4n`.
pub const BAR0: u16 = 0x10;
/// Subsystem vendor ID (type 0 header).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID (type 0 header).
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Capabilities pointer (8 bits), valid when [`Status::CAPABILITIES_LIST`] is set.
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Interrupt line (8 bits).
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin (8 bits).
pub const INTERRUPT_PIN: u16 = 0x3d;
/// Bridge (type 1 header): primary bus number.
pub const PRIMARY_BUS: u16 = 0x18;
/// Bridge (type 1 header): secondary bus number.
pub const SECONDARY_BUS: u16 = 0x19;
/// Bridge (type 1 header): subordinate bus number.
pub const SUBORDINATE_BUS: u16 = 0x1a;
/// First extended capability (PCIe, ECAM only).
pub const EXTENDED_CAPABILITIES: u16 = 0x100;

/// Header type of an ordinary function.
pub const HEADER_TYPE_ENDPOINT: u8 = 0x00;
/// Header type of a PCI-to-PCI bridge.
pub const HEADER_TYPE_BRIDGE: u8 = 0x01;
/// Header type of a CardBus bridge.
pub const HEADER_TYPE_CARDBUS: u8 = 0x02;
/// Multi-function bit of the header type.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

/// Class code of bridges.
pub const CLASS_BRIDGE: u8 = 0x06;
/// Subclass of PCI-to-PCI bridges.
pub const SUBCLASS_PCI_BRIDGE: u8 = 0x04;
/// Class code of mass storage controllers.
pub const CLASS_STORAGE: u8 = 0x01;

/// Capability ID: MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID: vendor specific (virtio uses it).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID: PCI Express.
pub const CAP_ID_PCIE: u8 = 0x10;
/// Capability ID: MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

bitflags! {
    /// `COMMAND`: the command register.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Command: u16 {
        /// Decode I/O space accesses.
        const IO_SPACE = 1 << 0;
        /// Decode memory space accesses.
        const MEMORY_SPACE = 1 << 1;
        /// Allow the function to master the bus (DMA, MSI writes).
        const BUS_MASTER = 1 << 2;
        /// Parity error response.
        const PARITY_ERROR_RESPONSE = 1 << 6;
        /// SERR# enable.
        const SERR_ENABLE = 1 << 8;
        /// Disable the legacy INTx pin.
        const INTX_DISABLE = 1 << 10;
    }

    /// `STATUS`: the status register.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Status: u16 {
        /// INTx is asserted.
        const INTERRUPT_STATUS = 1 << 3;
        /// The capabilities pointer is valid.
        const CAPABILITIES_LIST = 1 << 4;
    }
}
