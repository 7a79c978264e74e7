//! The shared GPT reader's tests read tables written by `sfdisk`, the GRUB environment
//! block's are checked against `grub-editenv`: without them they are
//! ignored with a reason, except in CI (see `basalt-build-support`).

fn main() {
    basalt_build_support::probe(&[
        basalt_build_support::SFDISK,
        basalt_build_support::GRUB_EDITENV,
    ]);
}
