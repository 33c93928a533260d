//! Serial-console bytes through the line editor, the command parser and the argument
//! parsers: see `kernel::fuzz::console`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kernel::fuzz::console(data));
