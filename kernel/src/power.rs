//! Leaving the machine: ACPI soft-off (S5), reset, and QEMU's `isa-debug-exit` for tests.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::acpi::AcpiInfo;
use crate::arch::cpu::{self, inb, inw, outb, outl, outw};

/// `isa-debug-exit` port (QEMU `-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
const DEBUG_EXIT_PORT: u16 = 0xF4;
/// Written on success: QEMU exits with (0x10 << 1) | 1 = 33.
pub const EXIT_SUCCESS: u32 = 0x10;
/// Written on a panic or exception: QEMU exits with (0x11 << 1) | 1 = 35.
pub const EXIT_FAILURE: u32 = 0x11;

static TESTING: AtomicBool = AtomicBool::new(false);
static ACPI: spin::Once<AcpiInfo> = spin::Once::new();

/// Records the ACPI information used by poweroff and reboot.
pub fn set_acpi(info: AcpiInfo) {
    ACPI.call_once(|| info);
}

/// The ACPI information found at boot, if any.
pub fn acpi() -> Option<&'static AcpiInfo> {
    ACPI.get()
}

/// Test builds of the command line (`testing`) leave QEMU through `isa-debug-exit`.
pub fn set_testing(on: bool) {
    TESTING.store(on, Ordering::Relaxed);
}

/// Whether test-only behaviour is on.
pub fn testing() -> bool {
    TESTING.load(Ordering::Relaxed)
}

/// Leaves QEMU through `isa-debug-exit` with `code` (when testing), else halts.
pub fn exit_qemu(code: u32) -> ! {
    if testing() {
        outl(DEBUG_EXIT_PORT, code);
    }
    cpu::halt_forever()
}

/// After a panic or exception: the failure exit in tests, a halt otherwise.
pub fn fail_stop() -> ! {
    exit_qemu(EXIT_FAILURE)
}

/// ACPI soft-off (ACPI 6.5 §7.4.2: SLP_TYPx | SLP_EN into PM1x_CNT), with QEMU's and
/// Bochs' fixed ports as a fallback. Returns only if nothing powered the machine off.
pub fn poweroff() {
    cpu::disable_interrupts();
    if let Some(info) = acpi() {
        // Without \_S5 the sleep type is unknown: guessing could pick another sleep state.
        if let (true, Some((a, b))) = (info.pm1a_control != 0, info.s5_sleep_type) {
            enable_acpi_mode(info);
            outw(info.pm1a_control as u16, ((a as u16 & 7) << 10) | (1 << 13));
            if info.pm1b_control != 0 {
                outw(info.pm1b_control as u16, ((b as u16 & 7) << 10) | (1 << 13));
            }
            spin_us(100_000);
        }
    }
    outw(0x604, 0x2000); // QEMU (PIIX4/ICH9 PM at 0x600)
    outw(0xB004, 0x2000); // Bochs, old QEMU
    spin_us(100_000);
}

/// Switches the chipset to ACPI mode (SCI_EN) if the firmware left it in legacy mode.
fn enable_acpi_mode(info: &AcpiInfo) {
    let pm1 = info.pm1a_control as u16;
    if inw(pm1) & 1 != 0 || info.smi_command == 0 || info.acpi_enable == 0 {
        return;
    }
    outb(info.smi_command as u16, info.acpi_enable);
    for _ in 0..300 {
        if inw(pm1) & 1 != 0 {
            return;
        }
        spin_us(1000);
    }
}

/// Resets the machine: the ACPI reset register, then the keyboard controller, then a
/// triple fault. Never returns.
pub fn reboot() -> ! {
    cpu::disable_interrupts();
    if let Some(reset) = acpi().and_then(|a| a.reset) {
        if reset.space == 1 && reset.address <= 0xFFFF {
            outb(reset.address as u16, reset.value);
            spin_us(50_000);
        }
    }
    for _ in 0..1000 {
        if inb(0x64) & 0x02 == 0 {
            break;
        }
    }
    outb(0x64, 0xFE);
    spin_us(50_000);
    // Triple fault: load an empty IDT and raise an exception.
    let empty = x86_64::structures::DescriptorTablePointer {
        limit: 0,
        base: x86_64::VirtAddr::new(0),
    };
    // SAFETY: deliberately invalid IDT, immediately followed by an exception, to reset the
    // CPU; nothing runs afterwards.
    unsafe {
        x86_64::instructions::tables::lidt(&empty);
        core::arch::asm!("int3");
    }
    cpu::halt_forever()
}

/// Waits about `us` microseconds by the TSC (only used on the way out of the machine).
fn spin_us(us: u64) {
    let hz = crate::time::tsc_hz().max(1_000_000);
    let start = cpu::rdtsc();
    let cycles = hz / 1_000_000 * us;
    while cpu::rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}
