//! The `log` backend: `[    1.234567] INFO  message` lines on the console, printed above
//! the prompt (which the console redraws) so they never mangle what the operator types.

use core::fmt::Write;

use log::{LevelFilter, Log, Metadata, Record};

use crate::util::logdrop::{Admit, LogGate};

struct ConsoleLogger;

/// Log lines are dropped, not waited for, when the serial line is behind (see
/// [`crate::util::logdrop`]).
static GATE: spin::Mutex<LogGate> = spin::Mutex::new(LogGate::new());

static LOGGER: ConsoleLogger = ConsoleLogger;

impl Log for ConsoleLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = crate::time::uptime_ns();
        let mut line = LogLine::new();
        let _ = write!(
            line,
            "[{:5}.{:06}] {:5} {}",
            ns / 1_000_000_000,
            (ns / 1000) % 1_000_000,
            record.level(),
            record.args()
        );
        let room = crate::serial::tx_room();
        // A logger re-entered (from an interrupt while a line is decided) prints as before.
        let admit = crate::arch::cpu::without_interrupts(|| {
            GATE.try_lock().map(|mut g| g.admit(line.len, room))
        })
        .unwrap_or(Admit::Print);
        match admit {
            Admit::Drop => return,
            Admit::PrintAfterSummary(n) => {
                let mut summary = LogLine::new();
                let _ = write!(
                    summary,
                    "[{:5}.{:06}] WARN  log: {n} lines dropped: the serial console is slower than the log",
                    ns / 1_000_000_000,
                    (ns / 1000) % 1_000_000,
                );
                crate::console::output::print_above_prompt(summary.as_bytes());
            }
            Admit::Print => {}
        }
        crate::console::output::print_above_prompt(line.as_bytes());
    }

    fn flush(&self) {}
}

/// A log line assembled on the stack (no heap use when logging); long lines are cut.
struct LogLine {
    buf: [u8; 512],
    len: usize,
}

impl LogLine {
    fn new() -> Self {
        LogLine {
            buf: [0; 512],
            len: 0,
        }
    }
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for LogLine {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                break;
            }
            if b == b'\n' {
                // keep one log record on one console line
                self.buf[self.len] = b' ';
            } else {
                self.buf[self.len] = b;
            }
            self.len += 1;
        }
        Ok(())
    }
}

/// Log lines dropped since boot because the serial line was behind.
pub fn dropped_lines() -> u64 {
    crate::arch::cpu::without_interrupts(|| GATE.lock().total_dropped())
}

/// Installs the logger at `level`.
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
