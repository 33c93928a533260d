//! What `nbd-selftest` writes, shared with the host tests that check the disk images.

/// Where the self-test writes (bytes).
pub const OFFSET: u64 = 1 << 20;
/// Bytes written and read back.
pub const LEN: u32 = 768 * 1024;
/// Seed of the data (`util::pattern::fill_seeded`, byte offset = the disk offset).
pub const SEED: u64 = 0x6e_6264;
