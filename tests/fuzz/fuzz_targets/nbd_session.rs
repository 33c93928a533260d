//! An NBD client's byte stream into a session over the fake backend: see
//! `nbd::fuzz::nbd_session`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nbd::fuzz::nbd_session(data));
