//! The main loop's wake-up flag: interrupt handlers call [`wake`] after recording work; the
//! loop runs until nothing is pending, then halts until the next interrupt.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static PENDING: AtomicBool = AtomicBool::new(true);
/// Time spent halted (ns since boot).
static HALTED_NS: AtomicU64 = AtomicU64::new(0);

/// Time the loop spent halted waiting for an interrupt since boot (ns): with the uptime, how
/// busy the CPU was (`net` shows it; `make bench` takes its difference over each NBD row).
pub fn halted_ns() -> u64 {
    HALTED_NS.load(Ordering::Relaxed)
}

/// Marks work pending (called from interrupt handlers).
pub fn wake() {
    PENDING.store(true, Ordering::Release);
}

/// Takes the pending flag.
pub fn take_pending() -> bool {
    PENDING.swap(false, Ordering::AcqRel)
}

/// Halts until an interrupt unless work is already pending. Interrupts are disabled while
/// checking so a wake-up between the check and `hlt` is not lost (`sti; hlt` is atomic).
pub fn idle() {
    crate::arch::cpu::disable_interrupts();
    if PENDING.load(Ordering::Acquire) {
        crate::arch::cpu::enable_interrupts();
    } else {
        let before = crate::time::uptime_ns();
        crate::arch::prof::set_idle(true);
        crate::arch::cpu::enable_interrupts_and_halt();
        crate::arch::prof::set_idle(false);
        let halted = crate::time::uptime_ns().saturating_sub(before);
        HALTED_NS.fetch_add(halted, Ordering::Relaxed);
    }
}
