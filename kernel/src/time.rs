//! Time since boot from the TSC, calibrated at boot against the ACPI PM timer or the PIT
//! (`arch::refclock`).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu;
use crate::util::tickscale::TickScale;

static TSC_START: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// `TickScale::mult` of `TSC_HZ` (0 before calibration).
static TSC_SCALE: AtomicU64 = AtomicU64::new(0);

/// Records the boot TSC value; call first thing.
pub fn mark_boot() {
    TSC_START.store(cpu::rdtsc(), Ordering::Relaxed);
}

/// Sets the calibrated TSC frequency.
pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz, Ordering::Relaxed);
    let mult = TickScale::new(hz).map_or(0, TickScale::mult);
    TSC_SCALE.store(mult, Ordering::Relaxed);
}

/// The TSC frequency in Hz (0 before calibration).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since the image started (0 before calibration).
pub fn uptime_ns() -> u64 {
    let Some(scale) = TickScale::from_mult(TSC_SCALE.load(Ordering::Relaxed)) else {
        return 0;
    };
    scale.ns(cpu::rdtsc().wrapping_sub(TSC_START.load(Ordering::Relaxed)))
}
