//! Instruction wrappers: port I/O, MSRs, the time-stamp counter, interrupt flag, halt.

use x86_64::instructions::port::Port;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the kernel owns all legacy I/O ports it touches (UART, PIC, PIT, ACPI PM,
    // debug-exit); callers pass port numbers of devices this kernel drives.
    unsafe { Port::new(port).write(value) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`: reads of ports of devices this kernel drives.
    unsafe { Port::new(port).read() }
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe { Port::new(port).write(value) }
}

/// Reads a 16-bit word from an I/O port.
pub fn inw(port: u16) -> u16 {
    // SAFETY: as for `inb`.
    unsafe { Port::new(port).read() }
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { Port::new(port).write(value) }
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    // SAFETY: as for `inb`.
    unsafe { Port::new(port).read() }
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    // SAFETY: callers only name architectural MSRs present on every x86_64 CPU
    // (IA32_APIC_BASE); reading them has no side effects.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).read() }
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: callers only write architectural MSRs with values they computed from the
    // current value (IA32_APIC_BASE enable bit).
    unsafe { x86_64::registers::model_specific::Msr::new(msr).write(value) }
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is available on every x86_64 CPU and only reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Page-fault linear address.
pub fn cr2() -> u64 {
    x86_64::registers::control::Cr2::read_raw()
}

/// Enables interrupts and halts until the next one, atomically (no lost wake-up).
pub fn enable_interrupts_and_halt() {
    x86_64::instructions::interrupts::enable_and_hlt();
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Runs `f` with interrupts disabled, restoring the previous state.
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    x86_64::instructions::interrupts::without_interrupts(f)
}

/// Enables interrupts.
pub fn enable_interrupts() {
    x86_64::instructions::interrupts::enable();
}

/// Disables interrupts.
pub fn disable_interrupts() {
    x86_64::instructions::interrupts::disable();
}

/// Reads a u64 from an address outside the identity map: a deliberate page fault for the
/// `crash fault` test command. Returns only if the address was mapped after all.
pub fn read_unmapped(address: u64) -> u64 {
    // SAFETY: a read has no side effects on RAM; an unmapped address raises #PF, whose
    // handler reports and stops the machine. Only the test-only `crash` command calls this.
    unsafe { core::ptr::read_volatile(address as *const u64) }
}
