//! Networking of PID1: netlink for links, addresses and routes, and the DHCPv4 client.
//! All synchronous and std-only: PID1 runs no async runtime.

pub mod dhcp;
pub mod netlink;
pub mod sntp;
