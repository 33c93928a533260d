//! snapfw's copy-on-write snapshot engine.
//!
//! A `no_std` + `alloc`, sans-I/O crate: it takes volume requests and I/O completions and
//! returns the I/O it wants issued. The on-disk format is Linux dm-snapshot's persistent
//! exception store (see `shared/docs/dm-snapshot-format.md`).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod engine;
pub mod format;
pub mod sim;
pub mod store;
pub mod table;
pub mod types;

pub use engine::Engine;
pub use format::{Binding, BindingError, BoundedBytes, Header, Record};
pub use store::{LoadError, LoadParams, LoadRead, LoadedStore, Loader, Usage};
pub use types::*;
