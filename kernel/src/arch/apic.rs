//! Local APIC (Intel SDM vol. 3A ch. 11) in xAPIC mode: enable, end-of-interrupt, and the
//! periodic timer that drives the kernel's tick (deadlines, hold-time bounds). The timer's
//! rate is calibrated at boot against a known clock ([`super::refclock`]: the ACPI PM timer,
//! else the PIT).

use core::sync::atomic::{AtomicU64, Ordering};

use super::{cpu, interrupts};

const IA32_APIC_BASE: u32 = 0x1B;
const REG_ID: usize = 0x20;
const REG_EOI: usize = 0xB0;
const REG_SVR: usize = 0xF0;
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INITIAL: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3E0;

/// Timer interrupts per second.
pub const TICK_HZ: u64 = 100;

static BASE: AtomicU64 = AtomicU64::new(0xFEE0_0000);
static TICKS: AtomicU64 = AtomicU64::new(0);
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);
/// Timer interrupts per kernel tick (more than one while `prof` samples) and the count
/// towards the next tick.
static PER_TICK: AtomicU64 = AtomicU64::new(1);
static SUBTICKS: AtomicU64 = AtomicU64::new(0);

fn read(reg: usize) -> u32 {
    let base = BASE.load(Ordering::Relaxed) as usize;
    // SAFETY: the APIC register page is identity-mapped (first 4 GiB) and `reg` is one of
    // the architectural 16-byte aligned register offsets.
    unsafe { core::ptr::read_volatile((base + reg) as *const u32) }
}

fn write(reg: usize, value: u32) {
    let base = BASE.load(Ordering::Relaxed) as usize;
    // SAFETY: as for `read`.
    unsafe { core::ptr::write_volatile((base + reg) as *mut u32, value) }
}

/// Enables the local APIC in xAPIC mode at the address in IA32_APIC_BASE.
pub fn init(madt_base: u64) {
    let mut msr = cpu::rdmsr(IA32_APIC_BASE);
    if msr & (1 << 10) != 0 {
        // Firmware left x2APIC on, where MMIO registers are ignored. x2APIC cannot go back to
        // xAPIC directly: disable the APIC, then enable it in xAPIC mode (SDM vol. 3A §11.12.5).
        cpu::wrmsr(IA32_APIC_BASE, msr & !((1 << 10) | (1 << 11)));
        msr &= !(1 << 10);
    }
    // The MSR is authoritative; the MADT's address only if the MSR gives none.
    let base = match msr & 0x000F_FFFF_FFFF_F000 {
        0 => madt_base,
        b => b,
    };
    BASE.store(base, Ordering::Relaxed);
    cpu::wrmsr(IA32_APIC_BASE, msr | (1 << 11));
    write(REG_SVR, 0x100 | interrupts::SPURIOUS_VECTOR as u32);
}

/// This CPU's APIC ID, for MSI and IOAPIC destinations.
pub fn id() -> u8 {
    (read(REG_ID) >> 24) as u8
}

/// Signals end of interrupt.
pub fn end_of_interrupt() {
    write(REG_EOI, 0);
}

fn on_tick(_vector: u8) {
    let per = PER_TICK.load(Ordering::Relaxed).max(1);
    if SUBTICKS.fetch_add(1, Ordering::Relaxed) + 1 >= per {
        SUBTICKS.store(0, Ordering::Relaxed);
        TICKS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the periodic timer at about `hz` interrupts a second (a multiple of [`TICK_HZ`], at
/// least that), keeping [`ticks`] at the kernel's tick rate: the profiler's sampling rate.
/// Returns the rate set, or `None` before the timer is calibrated.
pub fn set_timer_rate(hz: u64) -> Option<u64> {
    let per = (hz / TICK_HZ).max(1);
    let apic_hz = TIMER_HZ.load(Ordering::Relaxed);
    if apic_hz == 0 {
        return None;
    }
    PER_TICK.store(per, Ordering::Relaxed);
    SUBTICKS.store(0, Ordering::Relaxed);
    let initial = (apic_hz / (TICK_HZ * per)).clamp(1, u32::MAX as u64) as u32;
    write(REG_TIMER_INITIAL, initial);
    Some(TICK_HZ * per)
}

/// Calibrates the timer against `wait` (waits about 10 ms on a known clock and returns the
/// microseconds it measured) and starts it periodic at [`TICK_HZ`].
/// Returns the measured TSC frequency (Hz) from the same window.
pub fn start_timer(wait: impl FnOnce() -> u64) -> u64 {
    write(REG_TIMER_DIVIDE, 0x3); // divide by 16
    write(REG_LVT_TIMER, 1 << 16); // masked, one-shot
    write(REG_TIMER_INITIAL, u32::MAX);
    let tsc0 = cpu::rdtsc();
    let elapsed_us = wait();
    let tsc1 = cpu::rdtsc();
    let counted = u32::MAX - read(REG_TIMER_CURRENT);
    write(REG_TIMER_INITIAL, 0);
    let elapsed_us = elapsed_us.max(1);
    let apic_hz = counted as u64 * 1_000_000 / elapsed_us;
    let tsc_hz = (tsc1 - tsc0) * 1_000_000 / elapsed_us;
    TIMER_HZ.store(apic_hz, Ordering::Relaxed);
    interrupts::register(interrupts::TIMER_VECTOR, on_tick);
    let initial = (apic_hz / TICK_HZ).clamp(1, u32::MAX as u64) as u32;
    write(REG_LVT_TIMER, (1 << 17) | interrupts::TIMER_VECTOR as u32); // periodic
    write(REG_TIMER_INITIAL, initial);
    tsc_hz
}

/// Timer ticks since the timer started.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The timer's input clock after the divider, in Hz.
pub fn timer_hz() -> u64 {
    TIMER_HZ.load(Ordering::Relaxed)
}
