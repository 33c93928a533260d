//! IOAPIC (82093AA datasheet): routes legacy ISA interrupts (the UART) to a vector on the
//! boot CPU, honouring the MADT's interrupt source overrides (ACPI 6.5 §5.2.12.5).

use core::sync::atomic::{AtomicU64, Ordering};

static BASE: AtomicU64 = AtomicU64::new(0xFEC0_0000);
static GSI_BASE: AtomicU64 = AtomicU64::new(0);

fn write(reg: u32, value: u32) {
    let base = BASE.load(Ordering::Relaxed) as usize;
    // SAFETY: IOREGSEL (offset 0) and IOWIN (offset 0x10) of the IOAPIC named by the MADT;
    // its page is identity-mapped (first 4 GiB).
    unsafe {
        core::ptr::write_volatile(base as *mut u32, reg);
        core::ptr::write_volatile((base + 0x10) as *mut u32, value);
    }
}

fn read(reg: u32) -> u32 {
    let base = BASE.load(Ordering::Relaxed) as usize;
    // SAFETY: as for `write`.
    unsafe {
        core::ptr::write_volatile(base as *mut u32, reg);
        core::ptr::read_volatile((base + 0x10) as *const u32)
    }
}

/// Sets the IOAPIC to use and masks every input.
pub fn init(base: u64, gsi_base: u32) {
    BASE.store(base, Ordering::Relaxed);
    GSI_BASE.store(gsi_base as u64, Ordering::Relaxed);
    let inputs = ((read(1) >> 16) & 0xFF) + 1;
    for i in 0..inputs {
        write(0x10 + 2 * i, 1 << 16);
        write(0x11 + 2 * i, 0);
    }
}

/// Routes `gsi` to `vector` on the CPU with APIC ID `apic_id`.
pub fn route(gsi: u32, vector: u8, apic_id: u8, active_low: bool, level: bool) {
    let pin = gsi.saturating_sub(GSI_BASE.load(Ordering::Relaxed) as u32);
    let mut low = vector as u32;
    if active_low {
        low |= 1 << 13;
    }
    if level {
        low |= 1 << 15;
    }
    write(0x11 + 2 * pin, (apic_id as u32) << 24);
    write(0x10 + 2 * pin, low);
}
