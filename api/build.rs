//! The shared GPT reader's tests read tables written by `sfdisk`: without it they are
//! ignored with a reason, except in CI (see `basalt-build-support`).

fn main() {
    basalt_build_support::probe(&[basalt_build_support::SFDISK]);
}
