//! Small pure helpers tested on the host: the log-line gate, the profiler's report. The console tools' data
//! patterns and hexdump moved to the volume crate with the tasks that use them (re-exported
//! here). (The latency histogram is `snapshot::histogram`, shared with the engine's hold
//! times; console lines built without the heap go into `drivers::info::FixedString`.)

pub mod logdrop;
pub mod profile;
pub mod tickscale;

pub use volume::{hexdump, pattern};
