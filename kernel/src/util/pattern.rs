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
    fn rng_range() {
        let mut r = Rng::new(0);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
        }
    }
}
