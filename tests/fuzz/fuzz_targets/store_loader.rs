//! The store loader on arbitrary device bytes: see `snapshot::fuzz::store_loader`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| snapshot::fuzz::store_loader(data));
