//! Harness for booting snapfw in QEMU; the test cases live in `tests/tests/`.
