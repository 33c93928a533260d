//! The snapfw image's binary entry. The boot stub in `boot/` jumps to `kernel_main`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}
