//! basalt's end-to-end tests live under `tests/`; this crate has no code of its own.
