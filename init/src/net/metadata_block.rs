//! Closes the Hetzner metadata service (169.254.169.254) to everything on the node before
//! K3s starts, so that no pod can read the user-data (the machine config, with the API
//! key and perhaps the join token).
//!
//! # Mechanism: a `prohibit` route, not a firewall rule
//!
//! PID1 adds `prohibit 169.254.169.254/32` to the main routing table over its own
//! rtnetlink socket ([`Netlink::add_prohibit_route`]). A /32 is the longest prefix there
//! is, so it wins over the default route and any link route, and it covers both paths a
//! workload could take:
//!
//! - host processes (and `hostNetwork` pods): connect(2) and sendto(2) fail with EACCES;
//! - pods behind the CNI bridge: their packets are forwarded, the forwarding lookup hits
//!   the route, and the pod gets ICMP "administratively prohibited" (EHOSTUNREACH) at
//!   once instead of a time-out.
//!
//! Why not nftables or iptables: the image carries neither `nft` nor `iptables` for PID1
//! to call (K3s brings its own for kube-proxy and flannel, which rewrite and flush their
//! chains as they please), nf_tables netlink messages would be a second hand-written
//! protocol next to rtnetlink, and a rule would depend on netfilter modules being loaded.
//! A route is one message with the netlink code PID1 already has, and neither kube-proxy
//! nor flannel removes routes they did not add.
//!
//! The cost: a route has no notion of "everything but PID1", so PID1 is shut out too. It
//! does not mind: it reads the metadata only while choosing its config at boot, and
//! [`block`] runs only when the agent is about to start, well after. Should PID1 ever
//! need the metadata later, it would have to delete the route for the duration (racing
//! the workloads) or move to a policy rule on a socket mark that only PID1 sets
//! (`ip rule add fwmark … lookup …`), which rtnetlink can also express.
//!
//! What it does not stop: a privileged pod (CAP_NET_ADMIN in the host's network
//! namespace) can delete the route; such a pod can also read the disk, so it is outside
//! what this guards against.

use super::netlink::{Netlink, NetlinkError};
use std::net::Ipv4Addr;

/// Hetzner's metadata service, as in [`super::metadata::BASE_URL`].
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Installs (or refreshes) the `prohibit` route for [`METADATA_ADDR`]/32 in the calling
/// thread's network namespace. Idempotent: the route is replaced, never duplicated.
pub fn block() -> Result<(), NetlinkError> {
    Netlink::open()?.add_prohibit_route(METADATA_ADDR, 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocked_address_is_the_one_the_metadata_client_uses() {
        let host = super::super::metadata::BASE_URL
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .expect("an http URL");
        assert_eq!(
            host.parse::<Ipv4Addr>().expect("an IPv4 host"),
            METADATA_ADDR
        );
    }
}
