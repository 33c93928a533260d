//! A sampling profiler for the `prof` command: while it runs, the local APIC timer fires at
//! a higher rate and each tick records the instruction address it interrupted (or counts a
//! tick that found the CPU halted in the main loop's idle). The sample buffer is allocated by
//! `prof start`, never on the I/O path; the timer goes back to the kernel's tick rate at
//! `prof stop`. Symbols come from the ELF with debug information, on the host
//! (`scripts/prof-symbols`).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Samples kept per run (8 B each); later ones are counted as dropped.
pub const CAPACITY: usize = 1 << 17;
/// The highest sampling rate `prof start` takes.
pub const MAX_HZ: u64 = 20_000;

static BUFFER: spin::Once<Box<[AtomicU64]>> = spin::Once::new();
static RUNNING: AtomicBool = AtomicBool::new(false);
static NEXT: AtomicUsize = AtomicUsize::new(0);
static HALTED: AtomicU64 = AtomicU64::new(0);
static IDLE: AtomicBool = AtomicBool::new(false);
static HZ: AtomicU64 = AtomicU64::new(0);
static STARTED_NS: AtomicU64 = AtomicU64::new(0);
static STOPPED_NS: AtomicU64 = AtomicU64::new(0);

/// What a run has collected.
pub struct Status {
    pub running: bool,
    pub hz: u64,
    /// Ticks that found the CPU working (kept, up to [`CAPACITY`]) or halted.
    pub busy: u64,
    pub halted: u64,
    pub dropped: u64,
    /// Nanoseconds the run has lasted (so far, or until `prof stop`).
    pub ns: u64,
}

/// Called by the timer interrupt with the interrupted instruction's address.
pub fn sample(rip: u64) {
    if !RUNNING.load(Ordering::Relaxed) {
        return;
    }
    if IDLE.load(Ordering::Relaxed) {
        HALTED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    if let Some(slot) = BUFFER.get().and_then(|b| b.get(i)) {
        slot.store(rip, Ordering::Relaxed);
    }
}

/// The main loop's idle marks the time it is halted (ticks then count as halted).
pub fn set_idle(idle: bool) {
    IDLE.store(idle, Ordering::Relaxed);
}

/// Starts a run at about `hz` samples a second (clears the last one's samples); returns the
/// rate the timer runs at. The first run allocates the sample buffer, and refuses to start
/// if the heap cannot give it.
pub fn start(hz: u64, now_ns: u64) -> Result<u64, &'static str> {
    BUFFER.try_call_once(|| {
        let mut v = Vec::new();
        v.try_reserve_exact(CAPACITY)
            .map_err(|_| "no heap for the sample buffer (1 MiB)")?;
        v.extend((0..CAPACITY).map(|_| AtomicU64::new(0)));
        Ok::<_, &'static str>(v.into_boxed_slice())
    })?;
    RUNNING.store(false, Ordering::Relaxed);
    let rate = super::apic::set_timer_rate(hz).ok_or("the timer is not running")?;
    NEXT.store(0, Ordering::Relaxed);
    HALTED.store(0, Ordering::Relaxed);
    HZ.store(rate, Ordering::Relaxed);
    STARTED_NS.store(now_ns, Ordering::Relaxed);
    RUNNING.store(true, Ordering::Relaxed);
    Ok(rate)
}

/// Ends the run; the timer goes back to the kernel's tick rate.
pub fn stop(now_ns: u64) {
    if RUNNING.swap(false, Ordering::Relaxed) {
        STOPPED_NS.store(now_ns, Ordering::Relaxed);
        super::apic::set_timer_rate(super::apic::TICK_HZ);
    }
}

/// The current or last run's counts.
pub fn status(now_ns: u64) -> Status {
    let running = RUNNING.load(Ordering::Relaxed);
    let taken = NEXT.load(Ordering::Relaxed) as u64;
    let end = if running {
        now_ns
    } else {
        STOPPED_NS.load(Ordering::Relaxed)
    };
    Status {
        running,
        hz: HZ.load(Ordering::Relaxed),
        busy: taken,
        halted: HALTED.load(Ordering::Relaxed),
        dropped: taken.saturating_sub(CAPACITY as u64),
        ns: end.saturating_sub(STARTED_NS.load(Ordering::Relaxed)),
    }
}

/// A copy of the samples kept (call after `stop`, or they may still be changing); `None`
/// when the heap cannot hold the copy.
pub fn samples() -> Option<Vec<u64>> {
    let n = NEXT.load(Ordering::Relaxed).min(CAPACITY);
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    if let Some(b) = BUFFER.get() {
        v.extend(b[..n].iter().map(|s| s.load(Ordering::Relaxed)));
    }
    Some(v)
}
