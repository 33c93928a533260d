//! The NVMe driver's completion-queue handling with arbitrary entries: see
//! `drivers::fuzz::nvme_completions`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| drivers::fuzz::nvme_completions(data));
