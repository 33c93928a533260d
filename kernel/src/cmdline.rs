//! Kernel command-line parsing.
