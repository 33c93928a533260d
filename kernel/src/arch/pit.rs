//! The 8254 PIT, used only at boot as a known clock to calibrate the APIC timer and TSC.
//! Channel 2 counts down with its gate on port 0x61; bit 5 of port 0x61 rises at zero.

use super::cpu::{inb, outb};

const PIT_HZ: u64 = 1_193_182;

/// Waits about `ms` milliseconds (1..=50) on PIT channel 2; returns the exact time waited
/// in microseconds. Boot-time only: it polls the PIT, with an iteration cap (a few seconds
/// of port reads at worst) so a missing or gated PIT cannot hang the boot.
pub fn wait_ms(ms: u64) -> u64 {
    let ms = ms.clamp(1, 50);
    let count = PIT_HZ * ms / 1000;
    let gate = inb(0x61);
    outb(0x61, (gate & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let g = inb(0x61) & !0x01;
    outb(0x61, g);
    outb(0x61, g | 0x01); // restart the count
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 && spins < 5_000_000 {
        spins += 1;
    }
    count * 1_000_000 / PIT_HZ
}
