//! The main loop's wake-up flag: interrupt handlers call [`wake`] after recording work; the
//! loop runs until nothing is pending, then halts until the next interrupt.

use core::sync::atomic::{AtomicBool, Ordering};

static PENDING: AtomicBool = AtomicBool::new(true);

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
        crate::arch::cpu::enable_interrupts_and_halt();
    }
}
