//! The virtio-blk driver's used-ring handling with arbitrary elements: see
//! `drivers::fuzz::virtio_used_ring`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| drivers::fuzz::virtio_used_ring(data));
