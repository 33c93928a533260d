//! 16550 UART on COM1: interrupt-driven receive into a ring, buffered transmit drained by
//! the transmit-holding-register-empty interrupt. The console and the log share it.
//!
//! Register map (PC16550D datasheet): RBR/THR +0, IER +1, IIR/FCR +2, LCR +3, MCR +4,
//! LSR +5. OUT2 in MCR gates the interrupt line on PCs.

use core::fmt;

use alloc::collections::VecDeque;

use crate::arch::cpu::{self, inb, outb};
use crate::ring::ByteRing;

/// COM1.
pub const COM1: u16 = 0x3F8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u8 = 4;

/// The ISA IRQ of a PC serial port by its index (ttyS0..ttyS3): COM1/COM3 use IRQ 4,
/// COM2/COM4 IRQ 3.
pub fn isa_irq(port: u8) -> u8 {
    if port.is_multiple_of(2) {
        COM1_IRQ
    } else {
        3
    }
}

/// Most bytes typed during boot kept when the UART is programmed.
const TYPEAHEAD_AT_INIT: usize = 256;
/// LSR reads without a byte that end the wait for typed-ahead bytes when none came.
const QUIET_LSR_READS: u32 = 1000;
/// The same once one came: the sender hands over the next byte only after the last one is
/// read, and a loaded host may take milliseconds to.
const QUIET_LSR_READS_AFTER_INPUT: u32 = 200_000;

const IER_RX: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const LSR_DATA: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
/// Command output that does not fit the transmit ring waits in a spill queue on the heap,
/// sent as the ring empties, instead of holding the main loop at the line's speed. Past
/// this much, writing waits for the line again (output is never lost).
const SPILL_MAX: usize = 1 << 20;

struct Uart {
    base: u16,
    rx: ByteRing<4096>,
    tx: ByteRing<16384>,
    /// Bytes queued after the ring filled (see [`SPILL_MAX`]); they go out before anything
    /// written later.
    spill: VecDeque<u8>,
    rx_dropped: u64,
    interrupts: u64,
}

static UART: spin::Mutex<Uart> = spin::Mutex::new(Uart {
    base: COM1,
    rx: ByteRing::new(),
    tx: ByteRing::new(),
    spill: VecDeque::new(),
    rx_dropped: 0,
    interrupts: 0,
});

/// Programs the UART for `baud`, 8N1, FIFOs on, receive interrupt enabled.
pub fn init(base: u16, baud: u32) {
    let divisor = (115_200 / baud.clamp(50, 115_200)).max(1) as u16;
    cpu::without_interrupts(|| {
        let mut u = UART.lock();
        u.base = base;
        outb(base + 1, 0x00);
        outb(base + 3, 0x80); // DLAB
        outb(base, divisor as u8);
        outb(base + 1, (divisor >> 8) as u8);
        outb(base + 3, 0x03); // 8N1, DLAB cleared so that +0 reads RBR
                              // Keep what was typed while the machine booted: switching the FIFOs on below empties
                              // the receiver, so take those bytes first, right before it. With the FIFO off the
                              // receiver holds one byte and the sender (QEMU's backend, or the line) delivers the
                              // next one only after it is read, so wait for a quiet spell first: short when nothing
                              // was typed (LSR reads; each is a bus cycle or a VM exit), much longer once a byte
                              // came, as a busy host may take milliseconds to deliver the next one.
        let mut taken = 0;
        let mut quiet = 0;
        loop {
            let needed = if taken == 0 {
                QUIET_LSR_READS
            } else {
                QUIET_LSR_READS_AFTER_INPUT
            };
            if taken >= TYPEAHEAD_AT_INIT || quiet >= needed {
                break;
            }
            let lsr = inb(base + 5);
            if lsr == 0xFF {
                break; // no UART at this port: the bus reads all ones
            }
            if lsr & LSR_DATA == 0 {
                quiet += 1;
                continue;
            }
            let b = inb(base);
            if !u.rx.push(b) {
                u.rx_dropped += 1;
            }
            taken += 1;
            quiet = 0;
        }
        outb(base + 2, 0xC7); // FIFO on, clear, 14-byte trigger
        outb(base + 4, 0x0B); // DTR, RTS, OUT2
        outb(base + 1, IER_RX);
    });
}

impl Uart {
    /// Moves spilled bytes into the ring as far as it has room.
    fn refill(&mut self) {
        while self.tx.space() > 0 {
            let Some(b) = self.spill.pop_front() else {
                break;
            };
            self.tx.push(b);
        }
    }

    /// Moves queued bytes into the transmit FIFO (16 bytes when THR is empty).
    fn pump(&mut self) {
        self.refill();
        if inb(self.base + 5) & LSR_THRE != 0 {
            for _ in 0..16 {
                match self.tx.pop() {
                    Some(b) => outb(self.base, b),
                    None => break,
                }
            }
        }
        let ier = if self.tx.is_empty() {
            IER_RX
        } else {
            IER_RX | IER_THRE
        };
        outb(self.base + 1, ier);
    }

    /// Sends everything queued by polling (panic and exception reports).
    fn drain_polled(&mut self) {
        self.send_polled(usize::MAX);
    }

    /// Sends up to `n` queued bytes by polling.
    fn send_polled(&mut self, n: usize) {
        for _ in 0..n {
            self.refill();
            let Some(b) = self.tx.pop() else { break };
            let mut spins = 0u32;
            while inb(self.base + 5) & LSR_THRE == 0 && spins < 1_000_000 {
                spins += 1;
            }
            outb(self.base, b);
        }
    }
}

/// The UART interrupt: take received bytes, refill the transmit FIFO, until IIR says nothing
/// is pending (bounded), so the line drops and the next edge reaches the IOAPIC.
pub fn on_interrupt(_vector: u8) {
    let mut u = UART.lock();
    u.interrupts += 1;
    let base = u.base;
    for _ in 0..64 {
        while inb(base + 5) & LSR_DATA != 0 {
            let b = inb(base);
            if !u.rx.push(b) {
                u.rx_dropped += 1;
            }
        }
        u.pump();
        if inb(base + 2) & 0x01 != 0 {
            break; // IIR bit 0: no interrupt pending
        }
    }
    crate::executor::wake();
}

/// Queues bytes for transmission, in order. What does not fit the ring spills into a heap
/// queue that the transmit interrupt drains (a command's long output on a slow line does
/// not hold the main loop); only past [`SPILL_MAX`] queued, or when the heap cannot take
/// more, is one FIFO's worth of the oldest bytes sent by polling to make room. Output is
/// never lost or reordered, and interrupts are off only for one chunk at a time.
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(64) {
        cpu::without_interrupts(|| {
            let mut u = UART.lock();
            for &b in chunk {
                if u.spill.is_empty() && u.tx.push(b) {
                    continue;
                }
                if u.spill.len() < SPILL_MAX && u.spill.try_reserve(1).is_ok() {
                    u.spill.push_back(b);
                    continue;
                }
                u.send_polled(16);
                u.refill();
                if !u.tx.push(b) {
                    u.spill.push_back(b);
                }
            }
            u.pump();
        });
    }
}

/// Free bytes in the transmit ring: what can be written now without waiting for the line
/// (none while spilled output waits).
pub fn tx_room() -> usize {
    cpu::without_interrupts(|| {
        let u = UART.lock();
        if u.spill.is_empty() {
            u.tx.space()
        } else {
            0
        }
    })
}

/// Takes one received byte.
pub fn read_byte() -> Option<u8> {
    cpu::without_interrupts(|| UART.lock().rx.pop())
}

/// Bytes dropped because the receive ring was full, and UART interrupts taken.
pub fn counters() -> (u64, u64) {
    cpu::without_interrupts(|| {
        let u = UART.lock();
        (u.rx_dropped, u.interrupts)
    })
}

/// A writer for the console and log.
pub struct SerialWriter;

impl fmt::Write for SerialWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes `text` with an [`EmergencyWriter`] (the exception report's output).
pub fn emergency_write(text: &str) {
    let _ = fmt::Write::write_str(&mut EmergencyWriter::new(), text);
}

/// A writer for exception and panic reports: flushes the ring, then polls the UART
/// directly, and works even if the UART lock is held by the interrupted code.
pub struct EmergencyWriter {
    base: u16,
}

impl EmergencyWriter {
    /// Takes over the UART.
    pub fn new() -> Self {
        cpu::disable_interrupts();
        let base = match UART.try_lock() {
            Some(mut u) => {
                u.drain_polled();
                u.base
            }
            None => COM1,
        };
        EmergencyWriter { base }
    }
}

impl Default for EmergencyWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for EmergencyWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            let mut spins = 0u32;
            while inb(self.base + 5) & LSR_THRE == 0 && spins < 1_000_000 {
                spins += 1;
            }
            outb(self.base, b);
        }
        Ok(())
    }
}
