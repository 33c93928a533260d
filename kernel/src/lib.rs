//! snapfw kernel. Pure logic (console parsing, line editing, command line) builds and is
//! tested on the host; the hardware modules build only for `x86_64-unknown-none`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod cmdline;
pub mod console;
pub mod json;
