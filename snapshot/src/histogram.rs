//! A fixed-size latency histogram for hold times: log-linear buckets (8 per power of two),
//! so a percentile read back is within 12.5 % of the true value. Recording never allocates;
//! the whole histogram is a plain array the engine keeps in its statistics.

const SUB_BITS: u32 = 3;
const SUB_BUCKETS: usize = 1 << SUB_BITS;
const POWERS: usize = 48;
const BUCKETS: usize = POWERS * SUB_BUCKETS;

/// Samples in engine ticks (the kernel's tick is one microsecond).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: [u32; BUCKETS],
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket(value: u64) -> usize {
    if value < SUB_BUCKETS as u64 {
        return value as usize;
    }
    let power = 63 - value.leading_zeros();
    let sub = ((value >> (power - SUB_BITS)) as usize) & (SUB_BUCKETS - 1);
    (((power - SUB_BITS + 1) as usize) * SUB_BUCKETS + sub).min(BUCKETS - 1)
}

/// The largest value that falls in bucket `index`.
fn bucket_top(index: usize) -> u64 {
    if index < SUB_BUCKETS {
        return index as u64;
    }
    let power = (index / SUB_BUCKETS) as u32 + SUB_BITS - 1;
    let sub = (index % SUB_BUCKETS) as u64;
    let low = (1u64 << power) + (sub << (power - SUB_BITS));
    low + (1u64 << (power - SUB_BITS)) - 1
}

impl Histogram {
    /// Adds one sample.
    pub fn record(&mut self, value: u64) {
        let b = bucket(value);
        self.counts[b] = self.counts[b].saturating_add(1);
        self.total += 1;
        self.max = self.max.max(value);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest sample.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at or below which `per_mille`/1000 of the samples lie (an upper bound
    /// within one bucket, never above the largest sample); 0 with no samples.
    pub fn percentile(&self, per_mille: u32) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let want = (self.total * u64::from(per_mille.min(1000)))
            .div_ceil(1000)
            .max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= want {
                return bucket_top(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= last, "bucket order at {v}");
            assert!(
                bucket_top(b) >= v || b == BUCKETS - 1,
                "top of bucket for {v}"
            );
            last = b;
        }
    }

    #[test]
    fn percentiles_are_within_a_bucket() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 10);
        }
        let p99 = h.percentile(990);
        assert!((9900..=9900 * 9 / 8).contains(&p99), "p99 {p99}");
        let p50 = h.percentile(500);
        assert!((5000..=5000 * 9 / 8).contains(&p50), "p50 {p50}");
        assert_eq!(h.percentile(1000), 10_000);
        assert_eq!(h.count(), 1000);
        assert_eq!(Histogram::default().percentile(990), 0);
    }

    #[test]
    fn one_slow_sample_in_a_hundred_is_the_p99() {
        let mut h = Histogram::default();
        for _ in 0..98 {
            h.record(100);
        }
        h.record(50_000);
        h.record(50_000);
        assert!(h.percentile(990) >= 50_000 * 7 / 8, "{}", h.percentile(990));
        assert!(h.percentile(900) <= 100 * 9 / 8);
    }
}
