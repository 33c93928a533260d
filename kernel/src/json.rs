//! A tiny JSON writer for `--json` output.
