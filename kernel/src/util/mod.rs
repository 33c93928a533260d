//! Small pure helpers for the console's disk tools, tested on the host: data patterns the
//! host can reproduce, hexdump, and a stack string. (The latency histogram is
//! `snapshot::histogram`, shared with the engine's hold times.)

pub mod hexdump;
pub mod logdrop;
pub mod pattern;
pub mod stackstr;
