//! Time since boot from the TSC, calibrated at boot against the ACPI PM timer or the PIT
//! (`arch::refclock`).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu;

static TSC_START: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Records the boot TSC value; call first thing.
pub fn mark_boot() {
    TSC_START.store(cpu::rdtsc(), Ordering::Relaxed);
}

/// Sets the calibrated TSC frequency.
pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
}

/// The TSC frequency in Hz (0 before calibration).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since the image started (0 before calibration).
pub fn uptime_ns() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let delta = cpu::rdtsc().wrapping_sub(TSC_START.load(Ordering::Relaxed));
    (delta as u128 * 1_000_000_000 / hz as u128) as u64
}
