//! basalt's fuzz targets: each takes arbitrary bytes, feeds them to one parser of
//! untrusted input, and checks the properties that must hold for any input (no panic,
//! and each target's own). The coverage-guided runs are `cargo fuzz` in `fuzz/` (see
//! `fuzzing/README.md`); the corpora they grew are checked in under `fuzz/corpus/<name>/`
//! and replayed through these same functions by `tests/replay.rs` in every test run.

pub mod api;
pub mod config;
pub mod dhcp;
pub mod gpt;
pub mod growth;
pub mod node;

/// A target: its corpus folder's name and the function it runs.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name of its corpus folder and of its `cargo fuzz` target.
pub const TARGETS: &[Target] = &[
    ("machine_config", config::machine_config),
    ("boot_params", config::boot_params),
    ("token", config::token),
    ("ca_hash", config::ca_hash),
    ("gpt", gpt::table),
    ("growth", growth::growth),
    ("dhcp", dhcp::client),
    ("api_request", api::request),
    ("sntp", node::sntp),
    ("network_config", node::network_config),
    ("cmdline", node::cmdline),
];

/// The target named `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
