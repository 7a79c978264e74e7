//! Probes the host for what the tests against the fake Hetzner API need (root, sshd,
//! loop devices; see `basalt-build-support`): without them they are ignored with the
//! reason, except under CI, where they run and fail.

fn main() {
    basalt_build_support::probe(&[basalt_build_support::HCLOUD_FAKE]);
}
