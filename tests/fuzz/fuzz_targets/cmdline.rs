//! The kernel command line: see `kernel::fuzz::cmdline`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kernel::fuzz::cmdline(data));
