//! snapfw boot: Multiboot headers, the long-mode trampoline and boot-info parsing.
#![cfg_attr(not(test), no_std)]
