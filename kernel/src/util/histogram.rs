//! A latency histogram with fixed memory: log-linear buckets (16 per power of two) from
//! 1 ns to about 2^40 ns, so percentiles are within about 6 % of the true value. Recording
//! never allocates.

const SUB_BUCKETS: usize = 16;
const POWERS: usize = 41;
const BUCKETS: usize = POWERS * SUB_BUCKETS;

/// Latency samples in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: [u32; BUCKETS],
    total: u64,
    sum: u128,
    max: u64,
    min: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket(ns: u64) -> usize {
    let ns = ns.max(1);
    let power = 63 - ns.leading_zeros() as usize;
    if power < 4 {
        return ns as usize; // exact below 16 ns
    }
    let sub = ((ns >> (power - 4)) & 0xF) as usize;
    ((power - 3) * SUB_BUCKETS + sub).min(BUCKETS - 1)
}

fn bucket_value(index: usize) -> u64 {
    if index < SUB_BUCKETS {
        return index as u64;
    }
    let power = index / SUB_BUCKETS + 3;
    let sub = (index % SUB_BUCKETS) as u64;
    // The middle of the bucket.
    ((16 + sub) << (power - 4)) + (1u64 << (power - 4)) / 2
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Histogram {
        Histogram {
            counts: [0; BUCKETS],
            total: 0,
            sum: 0,
            max: 0,
            min: u64::MAX,
        }
    }

    /// Adds one sample.
    pub fn record(&mut self, ns: u64) {
        let b = bucket(ns);
        self.counts[b] = self.counts[b].saturating_add(1);
        self.total += 1;
        self.sum += ns as u128;
        self.max = self.max.max(ns);
        self.min = self.min.min(ns);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Mean (0 when empty).
    pub fn mean(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            (self.sum / self.total as u128) as u64
        }
    }

    /// Largest sample.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Smallest sample (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// The value at percentile `p` (0..=100), clamped to the observed range.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).clamp(1.0, self.total as f64) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += *c as u64;
            if seen >= rank {
                return bucket_value(i).clamp(self.min(), self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_close() {
        let mut h = Box::new(Histogram::new());
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.max(), 10_000_000);
        assert_eq!(h.min(), 1000);
        let p50 = h.percentile(50.0) as f64;
        let p99 = h.percentile(99.0) as f64;
        assert!((p50 - 5_000_000.0).abs() / 5_000_000.0 < 0.07, "{p50}");
        assert!((p99 - 9_900_000.0).abs() / 9_900_000.0 < 0.07, "{p99}");
        assert_eq!(h.mean(), 5_000_500);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for ns in (0..1_000_000u64).step_by(97) {
            let b = bucket(ns);
            assert!(b >= last);
            last = b;
        }
        assert!(bucket(u64::MAX) < BUCKETS);
        let h = Histogram::new();
        assert_eq!(h.percentile(99.0), 0);
    }
}
