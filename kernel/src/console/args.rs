//! Argument tokenizing and typed parsing for console commands.
