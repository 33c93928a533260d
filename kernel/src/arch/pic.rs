//! The legacy 8259 PIC pair: remapped away from the exception vectors (to 0x20..0x2F) and
//! then fully masked; the IOAPIC and MSI-X deliver every interrupt we use.

use super::cpu::outb;

/// Remaps and masks both PICs.
pub fn disable() {
    outb(0x20, 0x11); // ICW1: init, expect ICW4
    outb(0xA0, 0x11);
    outb(0x21, 0x20); // ICW2: vector offsets
    outb(0xA1, 0x28);
    outb(0x21, 0x04); // ICW3: slave on IRQ2
    outb(0xA1, 0x02);
    outb(0x21, 0x01); // ICW4: 8086 mode
    outb(0xA1, 0x01);
    outb(0x21, 0xFF); // mask everything
    outb(0xA1, 0xFF);
}
