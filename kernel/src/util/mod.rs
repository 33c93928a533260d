//! Small pure helpers for the console's disk tools, tested on the host: data patterns the
//! host can reproduce, hexdump, and the log-line gate. (The latency histogram is
//! `snapshot::histogram`, shared with the engine's hold times; console lines built without
//! the heap go into `drivers::info::FixedString`.)

pub mod hexdump;
pub mod logdrop;
pub mod pattern;
