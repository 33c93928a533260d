//! Interrupt entry: 256 assembly stubs (stable Rust has no `x86-interrupt` ABI), one IDT,
//! and a dispatcher. Exceptions print the CPU state and stop the machine; every other
//! vector runs the handler registered for it, which acknowledges its device and marks work
//! pending for the main loop (CONVENTIONS: handlers never do the real work).
//!
//! Intel SDM vol. 3A §6.14: in 64-bit mode the CPU pushes SS, RSP, RFLAGS, CS, RIP and, for
//! some vectors, an error code, on a 16-byte aligned stack. Each stub pushes a dummy error
//! code where the CPU does not, then the vector, then jumps to the common entry that saves
//! the general registers and calls `interrupt_dispatch` with a pointer to the frame.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::{apic, gdt};

/// Vectors 0x20..0x2F: the (masked) legacy PIC. Vectors 0x30..=0xEF belong to PCI devices
/// (MSI-X), handed out by the drivers' `VectorRegistry`.
pub const DEVICE_VECTORS: core::ops::RangeInclusive<u8> = 0x30..=0xEF;
/// Local APIC timer.
pub const TIMER_VECTOR: u8 = 0xF0;
/// The console UART (through the IOAPIC).
pub const UART_VECTOR: u8 = 0xF1;
/// Local APIC spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

core::arch::global_asm!(
    r#"
    .section .text.isr_stubs, "ax"
    .balign 16
    .global isr_stubs
isr_stubs:
    .set vector, 0
    .rept 256
    .balign 16
    .if (vector == 8) || (vector == 10) || (vector == 11) || (vector == 12) || (vector == 13) || (vector == 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp isr_common
    .set vector, vector + 1
    .endr

isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call interrupt_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq
"#,
    options(att_syntax)
);

extern "C" {
    static isr_stubs: u8;
}

/// The stack as the common entry leaves it.
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C, packed)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

#[repr(C, align(16))]
struct Idt([IdtEntry; 256]);

static mut IDT: Idt = Idt([IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 256]);

/// A device interrupt handler: acknowledge, mark pending, return. Runs with interrupts off.
pub type Handler = fn(vector: u8);

static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// What the exception reporter does after printing (set from the command line).
static EXCEPTION_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Fills and loads the IDT. Called once on the boot CPU after the GDT.
pub fn init() {
    let stubs = core::ptr::addr_of!(isr_stubs) as u64;
    let selector = gdt::code_selector();
    for vector in 0..256usize {
        let handler = stubs + vector as u64 * 16;
        let ist = match vector {
            2 => gdt::IST_NMI,
            8 => gdt::IST_DOUBLE_FAULT,
            18 => gdt::IST_MACHINE_CHECK,
            _ => 0,
        };
        let entry = IdtEntry {
            offset_low: handler as u16,
            selector,
            ist,
            type_attr: 0x8E, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
        // SAFETY: init runs once on the only CPU with interrupts off, before `lidt`; no
        // other reference to the IDT exists.
        unsafe { (*core::ptr::addr_of_mut!(IDT)).0[vector] = entry };
    }
    let pointer = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: x86_64::VirtAddr::new(core::ptr::addr_of!(IDT) as u64),
    };
    // SAFETY: the IDT is a static, fully initialised above, and every gate points at a stub
    // of `isr_stubs` that ends in `iretq`.
    unsafe { x86_64::instructions::tables::lidt(&pointer) };
}

/// Installs `handler` for `vector`.
pub fn register(vector: u8, handler: Handler) {
    HANDLERS[vector as usize].store(handler as usize, Ordering::Release);
}

/// How many times `vector` fired.
pub fn count(vector: u8) -> u64 {
    COUNTS[vector as usize].load(Ordering::Relaxed)
}

/// Installs where an exception report is written (`out`, e.g. the serial console's
/// emergency writer) and the function that ends the machine after it (`stop`).
pub fn set_exception_hook(out: fn(&str), stop: fn() -> !) {
    EXCEPTION_OUT.call_once(|| out);
    EXCEPTION_HOOK.store(stop as usize, Ordering::Release);
}

/// Where exception reports go (set once at boot; nothing before that).
static EXCEPTION_OUT: spin::Once<fn(&str)> = spin::Once::new();

/// The exception report's writer: [`EXCEPTION_OUT`].
struct ReportOut;

impl core::fmt::Write for ReportOut {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        if let Some(out) = EXCEPTION_OUT.get() {
            out(s);
        }
        Ok(())
    }
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "non-maskable interrupt",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection fault",
    "page fault",
    "reserved",
    "x87 floating-point error",
    "alignment check",
    "machine check",
    "SIMD floating-point error",
    "virtualization exception",
    "control protection exception",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection exception",
    "VMM communication exception",
    "security exception",
    "reserved",
];

#[no_mangle]
extern "C" fn interrupt_dispatch(frame: &mut InterruptFrame) {
    let vector = frame.vector as u8;
    COUNTS[vector as usize].fetch_add(1, Ordering::Relaxed);
    if vector == TIMER_VECTOR {
        super::prof::sample(frame.rip);
    }
    if vector < 32 {
        report_exception(frame);
    }
    if vector == SPURIOUS_VECTOR {
        return; // no EOI for the spurious vector (SDM vol. 3A §11.9)
    }
    let handler = HANDLERS[vector as usize].load(Ordering::Acquire);
    if handler != 0 {
        // SAFETY: only `register` stores into HANDLERS, and it stores `Handler` values.
        let handler: Handler = unsafe { core::mem::transmute::<usize, Handler>(handler) };
        handler(vector);
    }
    if vector >= 0x30 {
        apic::end_of_interrupt();
    }
}

fn report_exception(frame: &InterruptFrame) -> ! {
    use core::fmt::Write;
    let mut out = ReportOut;
    let vector = frame.vector as usize;
    let _ = write!(
        out,
        "\r\n*** CPU EXCEPTION {} ({}) error code {:#x}\r\n    RIP {:#018x} CS {:#x} RFLAGS {:#x}\r\n    RSP {:#018x} SS {:#x}",
        vector, EXCEPTION_NAMES[vector & 31], frame.error_code, frame.rip, frame.cs,
        frame.rflags, frame.rsp, frame.ss
    );
    if vector == 14 {
        let _ = write!(out, " CR2 {:#018x}", super::cpu::cr2());
    }
    let _ = write!(
        out,
        "\r\n    RAX {:#018x} RBX {:#018x} RCX {:#018x} RDX {:#018x}\r\n    RSI {:#018x} RDI {:#018x} RBP {:#018x}\r\n*** system halted\r\n",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    );
    let hook = EXCEPTION_HOOK.load(Ordering::Acquire);
    if hook != 0 {
        // SAFETY: only `set_exception_hook` stores here, and it stores `fn() -> !` values.
        let hook: fn() -> ! = unsafe { core::mem::transmute::<usize, fn() -> !>(hook) };
        hook();
    }
    super::cpu::halt_forever()
}
