//! An NBD client's byte stream into a session over the fake backend: see
//! `kernel::fuzz::nbd_session`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kernel::fuzz::nbd_session(data));
