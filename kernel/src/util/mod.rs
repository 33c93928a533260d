//! Small pure helpers for the console's disk tools, tested on the host: data patterns the
//! host can reproduce, a fixed-size latency histogram, hexdump, and a stack string.

pub mod hexdump;
pub mod histogram;
pub mod logdrop;
pub mod pattern;
pub mod stackstr;
