//! The serial console: line editor, argument parsing, commands.
pub mod args;
pub mod editor;
