//! The DHCP test needs root, iproute2 and dnsmasq: without them it is ignored with a
//! reason, except in CI (see `basalt-build-support`).

fn main() {
    basalt_build_support::probe(&[basalt_build_support::NETNS_DNSMASQ]);
}
