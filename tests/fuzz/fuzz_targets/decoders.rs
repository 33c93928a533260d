//! Header, binding, merge-marker, free-extent and record decoders: see
//! `snapshot::fuzz::decoders`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| snapshot::fuzz::decoders(data));
