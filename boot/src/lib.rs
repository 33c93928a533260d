//! snapfw boot: Multiboot 1/2 headers, the 32-bit → long-mode trampoline (`entry`, bare metal
//! only) and the parsing of what the boot loader hands over (`multiboot`, pure logic, tested
//! on the host).
//!
//! The kernel links this crate, provides `extern "C" fn kernel_main(magic: u32, info: u32)`,
//! and calls [`multiboot::parse`] with a [`multiboot::PhysMem`] reader over identity-mapped
//! memory before it touches any memory the loader may have used.
#![cfg_attr(not(test), no_std)]

#[cfg(target_os = "none")]
mod entry;
pub mod multiboot;

#[cfg(target_os = "none")]
extern "C" {
    static boot_pml4: u8;
    static boot_stack_bottom: u8;
    static boot_stack_top: u8;
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// Physical address of the boot page-table root (PML4) that identity-maps the first 4 GiB.
#[cfg(target_os = "none")]
pub fn page_table_root() -> u64 {
    core::ptr::addr_of!(boot_pml4) as u64
}

/// The physical range `[start, end)` the loaded image occupies, `.bss` included.
#[cfg(target_os = "none")]
pub fn image_range() -> (u64, u64) {
    (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    )
}

/// The boot stack `[bottom, top)`, for reporting stack use.
#[cfg(target_os = "none")]
pub fn boot_stack() -> (u64, u64) {
    (
        core::ptr::addr_of!(boot_stack_bottom) as u64,
        core::ptr::addr_of!(boot_stack_top) as u64,
    )
}
