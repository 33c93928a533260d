//! A latency histogram with fixed memory: log-linear buckets, exact below 16 and then 16 per
//! power of two up to 2^44 (about 4.9 hours in nanoseconds, 203 days in microseconds), so a
//! percentile read back is within about 3 % of the samples in its bucket. Recording never
//! allocates; the whole histogram is a plain array. The engine keeps one for hold times (in
//! engine ticks) in its statistics, the kernel's `bench` one per run (in nanoseconds).

const SUB_BITS: u32 = 4;
const SUB_BUCKETS: usize = 1 << SUB_BITS;
const POWERS: usize = 41;
const BUCKETS: usize = POWERS * SUB_BUCKETS;

/// Samples in any one unit (engine ticks, nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

fn bucket(value: u64) -> usize {
    if value < SUB_BUCKETS as u64 {
        return value as usize;
    }
    let power = 63 - value.leading_zeros();
    let sub = ((value >> (power - SUB_BITS)) as usize) & (SUB_BUCKETS - 1);
    (((power - SUB_BITS + 1) as usize) * SUB_BUCKETS + sub).min(BUCKETS - 1)
}

/// The smallest value that falls in bucket `index`, and the bucket's width.
fn bucket_range(index: usize) -> (u64, u64) {
    if index < SUB_BUCKETS {
        return (index as u64, 1);
    }
    let power = (index / SUB_BUCKETS) as u32 + SUB_BITS - 1;
    let sub = (index % SUB_BUCKETS) as u64;
    let width = 1u64 << (power - SUB_BITS);
    ((1u64 << power) + sub * width, width)
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
    pub fn record(&mut self, value: u64) {
        let b = bucket(value);
        self.counts[b] = self.counts[b].saturating_add(1);
        self.total += 1;
        self.sum += u128::from(value);
        self.max = self.max.max(value);
        self.min = self.min.min(value);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The mean, rounded down (0 with no samples).
    pub fn mean(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            (self.sum / u128::from(self.total)) as u64
        }
    }

    /// The largest sample (0 with no samples).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The smallest sample (0 with no samples).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// The value at or below which `per_mille`/1000 of the samples lie (the nearest rank, as
    /// fio counts it): the middle of that sample's bucket, kept within the smallest and
    /// largest samples; exact below 16; 0 with no samples.
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
                if i == BUCKETS - 1 {
                    // The last bucket is open-ended: all that is known is the largest.
                    return self.max;
                }
                let (low, width) = bucket_range(i);
                return (low + width / 2).clamp(self.min(), self.max);
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
        for v in (0..100_000u64).chain((0..1_000_000u64).step_by(97)).chain([
            1 << 43,
            (1 << 44) - 1,
            1 << 44,
            u64::MAX / 3,
            u64::MAX,
        ]) {
            let b = bucket(v);
            assert!(b < BUCKETS, "bucket of {v}");
            if v < 1 << 44 {
                let (low, width) = bucket_range(b);
                assert!((low..low + width).contains(&v), "bucket {b} of {v}");
                // Within 1/16 of the value: the middle is within 1/32.
                assert!(v < 16 || width * 16 <= v, "width {width} at {v}");
            } else {
                assert_eq!(b, BUCKETS - 1, "{v} past the last power");
            }
        }
        let mut previous = 0;
        for v in 0..200_000u64 {
            let b = bucket(v);
            assert!(b >= previous, "bucket order at {v}");
            previous = b;
        }
    }

    #[test]
    fn percentiles_are_within_a_bucket() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.max(), 10_000_000);
        assert_eq!(h.min(), 1000);
        assert_eq!(h.mean(), 5_000_500);
        for (per_mille, exact) in [(500, 5_000_000u64), (990, 9_900_000), (1, 10_000)] {
            let p = h.percentile(per_mille);
            assert!(
                p.abs_diff(exact) * 32 <= exact,
                "p{per_mille}‰ {p} for {exact}"
            );
        }
        assert_eq!(h.percentile(1000), 10_000_000);
        assert!(h.percentile(0).abs_diff(1000) * 32 <= 1000);
    }

    #[test]
    fn small_values_are_exact_and_empty_is_zero() {
        let h = Histogram::default();
        assert_eq!(
            (h.percentile(990), h.mean(), h.min(), h.max(), h.count()),
            (0, 0, 0, 0, 0)
        );
        let mut h = Histogram::new();
        for v in [0, 3, 3, 15] {
            h.record(v);
        }
        assert_eq!(h.percentile(250), 0);
        assert_eq!(h.percentile(500), 3);
        assert_eq!(h.percentile(1000), 15);
        assert_eq!(h.min(), 0);
    }

    #[test]
    fn one_slow_sample_in_a_hundred_is_the_p99() {
        let mut h = Histogram::new();
        for _ in 0..98 {
            h.record(100);
        }
        h.record(50_000);
        h.record(50_000);
        assert!(
            h.percentile(990) >= 50_000 * 31 / 32,
            "{}",
            h.percentile(990)
        );
        assert!(h.percentile(900) <= 100 * 33 / 32);
        // The nearest rank: the 99th of 100 samples is a slow one, the 98th is not.
        assert!(h.percentile(980) <= 100 * 33 / 32);
    }

    #[test]
    fn samples_past_the_last_bucket_read_back_as_the_largest() {
        let mut h = Histogram::new();
        h.record(1 << 50);
        h.record(u64::MAX);
        assert_eq!(h.percentile(500), u64::MAX);
        assert_eq!(
            u128::from(h.mean()),
            ((1u128 << 50) + u128::from(u64::MAX)) / 2
        );
    }
}
