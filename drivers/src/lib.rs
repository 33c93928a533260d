//! snapfw's device drivers. The kernel supplies port I/O, MMIO mapping and DMA memory
//! through the HAL traits declared here; the drivers never depend on the kernel.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod block;
#[allow(unsafe_code)]
pub mod hal;
pub mod info;
pub mod msix;
pub mod pci;
pub mod service;
pub mod virtio_blk;
