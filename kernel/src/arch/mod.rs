//! x86_64 CPU primitives for the boot CPU: descriptor tables, interrupt entry and dispatch,
//! the local APIC and IOAPIC, the legacy PIC and PIT, and small instruction wrappers.
//! Everything here is bare-metal only; the `unsafe` of the kernel lives in these files.

pub mod apic;
pub mod cpu;
pub mod gdt;
pub mod interrupts;
pub mod ioapic;
pub mod paging;
pub mod pic;
pub mod pit;
pub mod prof;
pub mod refclock;
