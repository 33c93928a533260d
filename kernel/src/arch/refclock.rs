//! The known clock the APIC timer and the TSC are calibrated on at boot: the ACPI PM timer
//! when the FADT names one that ticks (UEFI machines may have no legacy PIT, or one gated
//! off), else the PIT.

use super::{cpu, pit};
use crate::acpi::PmTimer;

/// Port reads before a clock that does not advance is given up.
const SPIN_LIMIT: u64 = 20_000_000;

/// A reference clock.
#[derive(Clone, Copy, Debug)]
pub enum RefClock {
    /// The ACPI PM timer.
    PmTimer(PmTimer),
    /// The 8254 PIT, channel 2.
    Pit,
}

impl RefClock {
    /// The PM timer if `timer` is one that advances, else the PIT.
    pub fn choose(timer: Option<PmTimer>) -> RefClock {
        if let Some(t) = timer {
            let start = cpu::inl(t.port);
            for _ in 0..100_000 {
                if t.elapsed(start, cpu::inl(t.port)) != 0 {
                    return RefClock::PmTimer(t);
                }
            }
            log::warn!(
                "ACPI PM timer at port {:#x} does not advance; using the PIT",
                t.port
            );
        }
        RefClock::Pit
    }

    /// Waits about `ms` milliseconds (1..=50); returns the microseconds measured.
    pub fn wait_ms(&self, ms: u64) -> u64 {
        let ms = ms.clamp(1, 50);
        match *self {
            RefClock::PmTimer(t) => {
                let target = (PmTimer::HZ * ms / 1000) as u32;
                let start = cpu::inl(t.port);
                let mut spins = 0;
                loop {
                    let ticks = t.elapsed(start, cpu::inl(t.port));
                    spins += 1;
                    if ticks >= target || spins >= SPIN_LIMIT {
                        return PmTimer::micros(ticks);
                    }
                }
            }
            RefClock::Pit => pit::wait_ms(ms),
        }
    }

    /// For the boot log.
    pub fn describe(&self) -> &'static str {
        match self {
            RefClock::PmTimer(_) => "the ACPI PM timer",
            RefClock::Pit => "the PIT",
        }
    }
}
