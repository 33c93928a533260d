//! snapfw kernel. Pure logic (console parsing, line editing, command line, ACPI tables,
//! frame bitmap) builds and is tested on the host; the hardware modules build only for
//! `x86_64-unknown-none`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod cmdline;
pub mod console;
pub mod frames;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub use volume::identity;
pub mod ipconfig;
pub mod json;
pub mod nbd;
pub mod ring;
pub mod rtc;
pub mod shell;
pub mod util;

#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod build_info;
#[cfg(target_os = "none")]
pub mod devices;
#[cfg(target_os = "none")]
pub mod executor;
#[cfg(target_os = "none")]
pub mod logger;
#[cfg(target_os = "none")]
pub mod main_loop;
#[cfg(target_os = "none")]
pub mod memory;
#[cfg(target_os = "none")]
pub mod net;
#[cfg(target_os = "none")]
pub mod platform;
#[cfg(target_os = "none")]
pub mod power;
#[cfg(target_os = "none")]
pub mod serial;
#[cfg(target_os = "none")]
pub mod start;
#[cfg(target_os = "none")]
pub mod time;
