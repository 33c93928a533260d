//! Data patterns for `write --byte` and `write --seed`, reproducible on the host so tests
//! can check every byte of a disk image.
//!
//! `--seed S` fills each 512-byte sector at absolute byte offset `o` (a multiple of 512) of
//! the device with the little-endian u64 words of a xorshift64* stream seeded with
//! `S ^ (o / 512).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1`. The content of a sector depends
//! only on the seed and the sector's position, not on the block size or the order of writes.

/// Fills `buf` (a whole number of sectors) for a write starting at `byte_offset`.
pub fn fill_seeded(buf: &mut [u8], seed: u64, byte_offset: u64) {
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        let index = byte_offset / 512 + i as u64;
        let mut state = (seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        for word in sector.chunks_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let value = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            word.copy_from_slice(&value[..word.len()]);
        }
    }
}

/// A pseudo-random generator for benchmark offsets (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator; seed 0 is replaced by a fixed non-zero value.
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x853C_49E6_748F_EA9B
        } else {
            seed
        })
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n.max(1) as u128) >> 64) as u64
    }
}

/// A random order of `0..n` that visits every value once per pass, as fio's random map
/// does for `randread`/`randwrite`: no offset repeats until every offset has been used.
/// Each pass is a different order. No table: a keyed bijection of `0..2^k` (the smallest
/// power of two at least `n`), walked until it lands below `n` (cycle walking; under two
/// steps on average).
#[derive(Clone, Debug)]
pub struct Shuffle {
    n: u64,
    mask: u64,
    shift: u32,
    keys: [u64; 3],
    rng: Rng,
    next: u64,
}

impl Shuffle {
    /// An order of `0..n` (n > 0; 0 is treated as 1).
    pub fn new(n: u64, seed: u64) -> Shuffle {
        let n = n.max(1);
        let bits = 64 - (n - 1).leading_zeros();
        let mut s = Shuffle {
            n,
            mask: if bits >= 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            },
            shift: (bits / 2).max(1),
            keys: [0; 3],
            rng: Rng::new(seed),
            next: 0,
        };
        s.rekey();
        s
    }

    fn rekey(&mut self) {
        for k in &mut self.keys {
            *k = self.rng.next_u64();
        }
    }

    /// One bijective step on `0..=mask`: add a key, multiply by an odd number, xor-shift.
    fn mix(&self, mut x: u64) -> u64 {
        for k in self.keys {
            x = x.wrapping_add(k) & self.mask;
            x = x.wrapping_mul(k | 1) & self.mask;
            x ^= x >> self.shift;
        }
        x
    }

    /// The next value; after `n` calls every value of `0..n` has come once.
    pub fn next_index(&mut self) -> u64 {
        if self.next == self.n {
            self.next = 0;
            self.rekey();
        }
        let mut x = self.mix(self.next);
        while x >= self.n {
            x = self.mix(x);
        }
        self.next += 1;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_depend_only_on_position() {
        let mut whole = vec![0u8; 4096];
        fill_seeded(&mut whole, 7, 8192);
        let mut part = vec![0u8; 512];
        fill_seeded(&mut part, 7, 8192 + 3 * 512);
        assert_eq!(&whole[3 * 512..4 * 512], &part[..]);
        let mut other = vec![0u8; 512];
        fill_seeded(&mut other, 8, 8192 + 3 * 512);
        assert_ne!(part, other);
        assert!(whole.iter().any(|b| *b != 0));
    }

    #[test]
    fn shuffle_visits_every_value_once_per_pass() {
        for n in [1u64, 2, 3, 7, 8, 9, 1000, 4097, 65_536] {
            let mut s = Shuffle::new(n, 5);
            let mut passes = Vec::new();
            for _ in 0..2 {
                let mut seen = vec![false; n as usize];
                let order: Vec<u64> = (0..n).map(|_| s.next_index()).collect();
                for &x in &order {
                    assert!(x < n, "{x} out of 0..{n}");
                    assert!(!seen[x as usize], "{x} twice in one pass of {n}");
                    seen[x as usize] = true;
                }
                passes.push(order);
            }
            if n > 8 {
                assert_ne!(passes[0], passes[1], "two passes of {n} in the same order");
                let in_order = passes[0].windows(2).filter(|w| w[1] == w[0] + 1).count();
                assert!(
                    in_order < n as usize / 4,
                    "{in_order} sequential steps in {n}"
                );
            }
        }
    }

    #[test]
    fn rng_range() {
        let mut r = Rng::new(0);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
        }
    }
}
