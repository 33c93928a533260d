//! Temporary console loop (replaced by the real shell).
use crate::{executor, serial};

pub fn print_above_prompt(line: &[u8]) {
    serial::write_bytes(line);
    serial::write_bytes(b"\r\n");
}

pub fn run() -> ! {
    serial::write_bytes(b"snapfw> ");
    loop {
        executor::take_pending();
        while let Some(b) = serial::read_byte() {
            serial::write_bytes(&[b]);
        }
        executor::idle();
    }
}
