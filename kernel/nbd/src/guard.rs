//! The NBD server under abuse: deadlines that free the sessions of clients that connect and
//! do nothing, and a limiter that keeps a flood of refused connections from flooding the
//! serial console (each console line costs the main loop time).
//!
//! - [`expiry`]: a session that has not finished its handshake [`HANDSHAKE_NS`] after the
//!   connection is closed; with `nbd.idle=SECONDS`, a session with no request in flight that
//!   has received nothing for that long is closed too.
//! - [`Refusals`]: the first refusal of an address is logged in full; further refusals of
//!   it are counted and summarised (all of the window's) once per [`WINDOW_NS`] (`nbd: refused 412 connections
//!   from 10.9.9.9 in the last 10 s`), so a flood costs one line per address per window.
//!   Addresses beyond [`PEERS`] at once share one summary.
//!
//! Pure and fixed-size (no allocation); tested on the host.

/// How long a client has to finish the handshake.
pub const HANDSHAKE_NS: u64 = 10_000_000_000;
/// The summary window of refusal log lines.
pub const WINDOW_NS: u64 = 10_000_000_000;
/// Addresses followed one by one.
pub const PEERS: usize = 8;

/// Why a session is closed by the server's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No handshake within [`HANDSHAKE_NS`].
    Handshake,
    /// Nothing received and nothing in flight for `nbd.idle=`.
    Idle,
}

/// A session's clock: when its connection opened and when it last received bytes or had
/// requests in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// The connection was accepted (ns since boot).
    pub opened: u64,
    /// Bytes last arrived, or requests were last in flight.
    pub active: u64,
    /// The handshake is done (transmission phase).
    pub serving: bool,
}

/// When a session with `clock` expires (ns since boot), with `idle_ns` from `nbd.idle=`.
pub fn due(clock: &Clock, idle_ns: Option<u64>) -> Option<u64> {
    if !clock.serving {
        return Some(clock.opened.saturating_add(HANDSHAKE_NS));
    }
    idle_ns.map(|idle| clock.active.saturating_add(idle))
}

/// Whether a session with `clock` has expired at `now` (`busy`: requests in flight, never
/// idle).
pub fn expiry(clock: &Clock, busy: bool, idle_ns: Option<u64>, now: u64) -> Option<Expiry> {
    if clock.serving && busy {
        return None;
    }
    let at = due(clock, idle_ns)?;
    (now >= at).then_some(if clock.serving {
        Expiry::Idle
    } else {
        Expiry::Handshake
    })
}

#[derive(Clone, Copy, Debug)]
struct Peer {
    addr: [u8; 4],
    /// Start of the current window.
    since: u64,
    /// Refusals in the window.
    count: u64,
    /// Of those, logged in full (the first of a new address).
    shown: u64,
}

/// A summary line: `count` refusals from `addr` (`None`: from other addresses) in the last
/// `seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The address, or `None` for addresses that did not fit the table.
    pub addr: Option<[u8; 4]>,
    /// Refusals in the window (including one logged in full, if any).
    pub count: u64,
    /// Length of the window in seconds.
    pub seconds: u64,
}

impl core::fmt::Display for Summary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "nbd: refused {} connection", self.count)?;
        if self.count != 1 {
            f.write_str("s")?;
        }
        match self.addr {
            Some(a) => write!(f, " from {}.{}.{}.{}", a[0], a[1], a[2], a[3])?,
            None => f.write_str(" from other addresses")?,
        }
        write!(f, " in the last {} s", self.seconds)
    }
}

/// Refusals per address, for rate-limited log lines (see the module documentation).
#[derive(Debug, Default)]
pub struct Refusals {
    peers: [Option<Peer>; PEERS],
    /// Refusals of addresses that found the table full, and when they started.
    other: Option<(u64, u64)>,
    /// Every refusal since boot.
    total: u64,
}

impl Refusals {
    /// An empty table.
    pub const fn new() -> Refusals {
        Refusals {
            peers: [None; PEERS],
            other: None,
            total: 0,
        }
    }

    /// Refusals since boot.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Records a refusal of `addr` at `now`: true when it is to be logged in full (the first
    /// of its address in a window), false when it is counted for a summary.
    pub fn record(&mut self, addr: [u8; 4], now: u64) -> bool {
        self.total += 1;
        if let Some(p) = self.peers.iter_mut().flatten().find(|p| p.addr == addr) {
            p.count += 1;
            return false;
        }
        match self.peers.iter_mut().find(|p| p.is_none()) {
            Some(free) => {
                *free = Some(Peer {
                    addr,
                    since: now,
                    count: 1,
                    shown: 1,
                });
                true
            }
            None => {
                let (since, count) = self.other.unwrap_or((now, 0));
                self.other = Some((since, count + 1));
                false
            }
        }
    }

    /// The summaries due at `now` (windows that have ended with refusals counted); an address
    /// whose window ended quiet is forgotten (its next refusal is logged in full again).
    pub fn due(&mut self, now: u64, mut emit: impl FnMut(Summary)) {
        for slot in self.peers.iter_mut() {
            let Some(p) = slot else { continue };
            if now < p.since.saturating_add(WINDOW_NS) {
                continue;
            }
            if p.count <= p.shown {
                // Nothing beyond what was logged: forgotten.
                *slot = None;
                continue;
            }
            emit(Summary {
                addr: Some(p.addr),
                count: p.count,
                seconds: WINDOW_NS / 1_000_000_000,
            });
            // Still flooding: the next window is summarised too, with no full line.
            p.since = now;
            p.count = 0;
            p.shown = 0;
        }
        if let Some((since, count)) = self.other {
            if now >= since.saturating_add(WINDOW_NS) {
                emit(Summary {
                    addr: None,
                    count,
                    seconds: WINDOW_NS / 1_000_000_000,
                });
                self.other = None;
            }
        }
    }

    /// When [`Refusals::due`] has something to do next (ns since boot).
    pub fn next_due(&self) -> Option<u64> {
        let peers = self.peers.iter().flatten().map(|p| p.since);
        peers
            .chain(self.other.map(|(since, _)| since))
            .min()
            .map(|t| t.saturating_add(WINDOW_NS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_session_must_finish_its_handshake_in_10_s() {
        let c = Clock {
            opened: 5 * S,
            active: 5 * S,
            serving: false,
        };
        assert_eq!(due(&c, None), Some(15 * S));
        assert_eq!(expiry(&c, false, None, 15 * S - 1), None);
        assert_eq!(expiry(&c, false, None, 15 * S), Some(Expiry::Handshake));
        // Requests cannot be in flight before the handshake; bytes do not extend it.
        let c = Clock {
            active: 14 * S,
            ..c
        };
        assert_eq!(expiry(&c, true, Some(S), 15 * S), Some(Expiry::Handshake));
    }

    #[test]
    fn idle_sessions_close_only_with_nbd_idle_and_nothing_in_flight() {
        let c = Clock {
            opened: 0,
            active: 100 * S,
            serving: true,
        };
        assert_eq!(due(&c, None), None);
        assert_eq!(expiry(&c, false, None, u64::MAX), None);
        let idle = Some(60 * S);
        assert_eq!(due(&c, idle), Some(160 * S));
        assert_eq!(expiry(&c, false, idle, 160 * S - 1), None);
        assert_eq!(expiry(&c, false, idle, 160 * S), Some(Expiry::Idle));
        // A slow request in flight is not idleness.
        assert_eq!(expiry(&c, true, idle, 1000 * S), None);
    }

    #[test]
    fn a_flood_of_refusals_is_one_line_per_address_per_window() {
        let mut r = Refusals::new();
        let a = [10, 9, 9, 9];
        let mut full = 0;
        for i in 0..412u64 {
            if r.record(a, i * 1_000_000) {
                full += 1;
            }
        }
        assert_eq!(full, 1, "only the first refusal is logged in full");
        let mut lines = Vec::new();
        r.due(9 * S, |s| lines.push(s));
        assert!(lines.is_empty(), "nothing before the window ends");
        assert_eq!(r.next_due(), Some(10 * S));
        r.due(10 * S, |s| lines.push(s));
        assert_eq!(
            lines,
            vec![Summary {
                addr: Some(a),
                count: 412,
                seconds: 10
            }]
        );
        assert_eq!(
            lines[0].to_string(),
            "nbd: refused 412 connections from 10.9.9.9 in the last 10 s"
        );
        // Still flooding: counted, summarised at the end of the next window, no full line.
        assert!(!r.record(a, 11 * S));
        lines.clear();
        r.due(20 * S, |s| lines.push(s));
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].count, 1);
        assert_eq!(
            lines[0].to_string(),
            "nbd: refused 1 connection from 10.9.9.9 in the last 10 s"
        );
        // A quiet window: forgotten, the next refusal is logged in full again.
        lines.clear();
        r.due(30 * S, |s| lines.push(s));
        assert!(lines.is_empty());
        assert_eq!(r.next_due(), None);
        assert!(r.record(a, 31 * S));
        assert_eq!(r.total(), 414);
    }

    #[test]
    fn many_addresses_share_one_summary_past_the_table() {
        let mut r = Refusals::new();
        for i in 0..PEERS as u8 {
            assert!(r.record([10, 0, 0, i], 0));
        }
        for i in 0..100u8 {
            assert!(!r.record([10, 1, 0, i], S));
        }
        let mut lines = Vec::new();
        r.due(10 * S, |s| lines.push(s));
        // The first eight were quiet after their first line: forgotten, no summary.
        assert!(lines.is_empty());
        r.due(11 * S, |s| lines.push(s));
        assert_eq!(
            lines,
            vec![Summary {
                addr: None,
                count: 100,
                seconds: 10
            }]
        );
        assert_eq!(
            lines[0].to_string(),
            "nbd: refused 100 connections from other addresses in the last 10 s"
        );
        assert_eq!(r.next_due(), None);
    }
}
