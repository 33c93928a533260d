//! Log lines never wait for the serial line: [`LogGate`] decides, from the room left in the
//! UART's transmit ring, whether a log line is printed or dropped, and when to say how many
//! were dropped. At 115200 baud the line carries about 11.5 kB/s; a burst of log lines (a
//! connection flood, a failing device) larger than the ring would otherwise make every
//! further line busy-wait on the UART inside the main loop, and disk and network I/O would
//! wait with it. Command output the operator asked for is not gated.

/// Room kept free beyond the line itself: the console redraws the prompt and the line being
/// edited after a log line, and the drop summary must fit too.
pub const REDRAW_ROOM: usize = 640;

/// What to do with one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Print it.
    Print,
    /// Print `log: N lines dropped ...` first, then the line.
    PrintAfterSummary(u64),
    /// No room: drop it (counted).
    Drop,
}

/// Counts the log lines dropped since the last summary.
#[derive(Debug, Default)]
pub struct LogGate {
    dropped: u64,
    total_dropped: u64,
}

impl LogGate {
    /// A gate that has dropped nothing.
    pub const fn new() -> LogGate {
        LogGate {
            dropped: 0,
            total_dropped: 0,
        }
    }

    /// A line of `len` bytes, with `room` bytes free in the transmit ring.
    pub fn admit(&mut self, len: usize, room: usize) -> Admit {
        if room < len + REDRAW_ROOM {
            self.dropped += 1;
            self.total_dropped += 1;
            return Admit::Drop;
        }
        match core::mem::take(&mut self.dropped) {
            0 => Admit::Print,
            n => Admit::PrintAfterSummary(n),
        }
    }

    /// Lines dropped since boot.
    pub fn total_dropped(&self) -> u64 {
        self.total_dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_that_fits_is_printed() {
        let mut g = LogGate::new();
        assert_eq!(g.admit(80, 16384), Admit::Print);
        assert_eq!(g.admit(80, 80 + REDRAW_ROOM), Admit::Print);
        assert_eq!(g.total_dropped(), 0);
    }

    #[test]
    fn a_full_ring_drops_and_the_next_line_that_fits_says_how_many() {
        let mut g = LogGate::new();
        assert_eq!(g.admit(80, 80 + REDRAW_ROOM - 1), Admit::Drop);
        assert_eq!(g.admit(80, 100), Admit::Drop);
        assert_eq!(g.admit(500, 600), Admit::Drop);
        assert_eq!(g.admit(80, 4000), Admit::PrintAfterSummary(3));
        // Said once: the next line is plain.
        assert_eq!(g.admit(80, 4000), Admit::Print);
        assert_eq!(g.admit(80, 10), Admit::Drop);
        assert_eq!(g.admit(80, 4000), Admit::PrintAfterSummary(1));
        assert_eq!(g.total_dropped(), 4);
    }
}
