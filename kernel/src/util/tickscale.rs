//! TSC ticks to nanoseconds with one multiply and a shift: `uptime_ns` runs several times per
//! I/O (the main loop's round, the bench's latencies, the idle accounting around `hlt`), and a
//! 128-bit division per call (`__udivti3`) showed in `prof` at 1-2 % of the busy samples.

/// Fixed-point nanoseconds per tick, 32 fractional bits: `ns = ticks * mult >> 32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickScale {
    mult: u64,
}

impl TickScale {
    /// The scale of a clock of `hz` ticks a second (None for 0). Rounded down: a result is
    /// at most `ticks / 2^32 + 1` ns short of the exact one (15 us a day at 3 GHz, far below
    /// the calibration's own error), and the conversion stays monotonic.
    pub const fn new(hz: u64) -> Option<TickScale> {
        if hz == 0 {
            return None;
        }
        // 1e9 << 32 is below 2^62, so the quotient fits for any hz >= 1.
        Some(TickScale {
            mult: ((1_000_000_000u128 << 32) / hz as u128) as u64,
        })
    }

    /// The raw multiplier (kept in an atomic by the kernel's clock).
    pub const fn mult(self) -> u64 {
        self.mult
    }

    /// A scale from its multiplier (0: none).
    pub const fn from_mult(mult: u64) -> Option<TickScale> {
        if mult == 0 {
            None
        } else {
            Some(TickScale { mult })
        }
    }

    /// Nanoseconds in `ticks`.
    pub fn ns(self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.mult)) >> 32) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(ticks: u64, hz: u64) -> Option<u64> {
        u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(hz)).ok()
    }

    #[test]
    fn ticks_convert_within_the_stated_error() {
        for hz in [
            1,
            1_000,
            1_193_182,
            3_579_545,
            1_000_000_000,
            2_099_998_765,
            3_000_000_000,
            5_400_000_000,
        ] {
            let scale = TickScale::new(hz).unwrap();
            for ticks in [0, 1, 999, hz, hz * 60, hz * 86_400, u64::MAX / 1_000] {
                // Past 2^64 ns (585 years) the clock has no answer to check.
                let Some(want) = exact(ticks, hz) else {
                    continue;
                };
                let got = scale.ns(ticks);
                assert!(got <= want, "hz {hz} ticks {ticks}: {got} > {want}");
                assert!(
                    want - got <= ticks / (1 << 32) + 1,
                    "hz {hz} ticks {ticks}: {got} vs {want}"
                );
            }
        }
        assert_eq!(
            TickScale::new(3_000_000_000).unwrap().ns(3_000_000_000),
            999_999_999
        );
    }

    #[test]
    fn the_conversion_never_goes_back() {
        let scale = TickScale::new(2_099_998_765).unwrap();
        let mut last = 0;
        for ticks in (0..10_000_000u64).step_by(7) {
            let ns = scale.ns(ticks);
            assert!(ns >= last);
            last = ns;
        }
    }

    #[test]
    fn no_clock_has_no_scale() {
        assert_eq!(TickScale::new(0), None);
        assert_eq!(TickScale::from_mult(0), None);
        let s = TickScale::new(1_000_000).unwrap();
        assert_eq!(TickScale::from_mult(s.mult()), Some(s));
        assert_eq!(s.ns(1), 1_000);
    }
}
