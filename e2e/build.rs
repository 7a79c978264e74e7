//! The end-to-end tests build images and boot them: without the host tools they are
//! ignored with a reason, except in CI (see `basalt-build-support`).

fn main() {
    basalt_build_support::probe(&[
        basalt_build_support::QEMU,
        basalt_build_support::HCLOUD_FAKE,
    ]);
}
