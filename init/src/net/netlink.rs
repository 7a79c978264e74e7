//! rtnetlink over a blocking socket: links, addresses and routes (IPv4 and IPv6).
//!
//! `rtnetlink` needs a tokio runtime, which PID1 does not run; the packet crates and a
//! plain `netlink-sys` socket give the same messages synchronously. Every request asks
//! for an ACK and waits for it (bounded by a receive timeout), so the kernel's verdict
//! becomes a `Result` on the spot.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

/// How long one reply may take before the request counts as failed.
const REPLY_TIMEOUT_SECS: i64 = 5;
/// Messages read while waiting for one ACK; replies to a non-dump request are few.
const MAX_REPLIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening the rtnetlink socket")]
    Open(#[source] io::Error),
    #[error("sending {op}")]
    Send {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("receiving the reply to {op}")]
    Recv {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("decoding the reply to {op}: {reason}")]
    Decode { op: &'static str, reason: String },
    #[error("kernel refused {op}")]
    Kernel {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no answer to {op}")]
    NoReply { op: &'static str },
}

/// What PID1 needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
}

pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Open)?;
        socket.bind_auto().map_err(NetlinkError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Open)?;
        setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &TimeVal::new(REPLY_TIMEOUT_SECS, 0),
        )
        .map_err(|e| NetlinkError::Open(e.into()))?;
        Ok(Self { socket, seq: 0 })
    }

    pub fn link_by_name(&mut self, name: &str) -> Result<Link, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let replies = self.request("RTM_GETLINK", RouteNetlinkMessage::GetLink(msg), 0)?;
        replies
            .into_iter()
            .find_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(&link)),
                _ => None,
            })
            .ok_or(NetlinkError::NoReply { op: "RTM_GETLINK" })
    }

    pub fn set_link_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request("RTM_SETLINK", RouteNetlinkMessage::SetLink(msg), 0)
            .map(drop)
    }

    /// Adds (or refreshes) `addr/prefix_len` with its subnet broadcast.
    pub fn add_address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = address_message(index, addr, prefix_len);
        msg.attributes
            .push(AddressAttribute::Broadcast(broadcast_of(addr, prefix_len)));
        self.request(
            "RTM_NEWADDR",
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Removes `addr/prefix_len`; an address already gone is not an error.
    pub fn del_address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let msg = address_message(index, addr, prefix_len);
        tolerate(
            self.request("RTM_DELADDR", RouteNetlinkMessage::DelAddress(msg), 0),
            Errno::EADDRNOTAVAIL,
        )
    }

    pub fn add_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> Result<(), NetlinkError> {
        let msg = default_route(index, gateway);
        self.request(
            "RTM_NEWROUTE",
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Removes the default route; one already gone (the kernel drops it with the last
    /// address of its subnet) is not an error.
    pub fn del_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> Result<(), NetlinkError> {
        let msg = default_route(index, gateway);
        tolerate(
            self.request("RTM_DELROUTE", RouteNetlinkMessage::DelRoute(msg), 0),
            Errno::ESRCH,
        )
    }

    /// Adds (or refreshes) a static IPv4 or IPv6 address.
    pub fn add_ip(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        match addr {
            IpAddr::V4(v4) => self.add_address(index, v4, prefix_len),
            IpAddr::V6(_) => {
                let msg = ip_address_message(index, addr, prefix_len);
                self.request(
                    "RTM_NEWADDR",
                    RouteNetlinkMessage::NewAddress(msg),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
                .map(drop)
            }
        }
    }

    /// Adds (or replaces) a static route to `to/prefix_len` via `via` out of `index`.
    /// An IPv6 gateway may be link-local (Hetzner's is `fe80::1`): the output
    /// interface disambiguates it.
    pub fn add_route(
        &mut self,
        index: u32,
        to: IpAddr,
        prefix_len: u8,
        via: IpAddr,
    ) -> Result<(), NetlinkError> {
        let msg = static_route(index, to, prefix_len, via);
        self.request(
            "RTM_NEWROUTE",
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Adds (or replaces) a `prohibit` route to `to/prefix_len` in the main table: the
    /// kernel refuses local sends there with EACCES and answers forwarded packets with
    /// ICMP "administratively prohibited". No output interface, no gateway.
    pub fn add_prohibit_route(&mut self, to: Ipv4Addr, prefix_len: u8) -> Result<(), NetlinkError> {
        self.request(
            "RTM_NEWROUTE",
            RouteNetlinkMessage::NewRoute(prohibit_route(to, prefix_len)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Sends one request with NLM_F_ACK and collects what comes back until the ACK.
    fn request(
        &mut self,
        op: &'static str,
        payload: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|source| NetlinkError::Send { op, source })?;

        let mut replies = Vec::new();
        for _ in 0..MAX_REPLIES {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|source| NetlinkError::Recv { op, source })?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| NetlinkError::Decode {
                        op,
                        reason: e.to_string(),
                    })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len.next_multiple_of(4);
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            None => Ok(replies),
                            Some(_) => Err(NetlinkError::Kernel {
                                op,
                                source: err.to_io(),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    _ => {}
                }
            }
        }
        Err(NetlinkError::NoReply { op })
    }
}

fn tolerate(
    result: Result<Vec<RouteNetlinkMessage>, NetlinkError>,
    gone: Errno,
) -> Result<(), NetlinkError> {
    match result {
        Ok(_) => Ok(()),
        Err(NetlinkError::Kernel { source, .. }) if source.raw_os_error() == Some(gone as i32) => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn link_of(msg: &LinkMessage) -> Link {
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    });
    Link {
        index: msg.header.index,
        mac,
        up: msg.header.flags.contains(LinkFlags::Up),
    }
}

fn address_message(index: u32, addr: Ipv4Addr, prefix_len: u8) -> AddressMessage {
    ip_address_message(index, IpAddr::V4(addr), prefix_len)
}

fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn ip_address_message(index: u32, addr: IpAddr, prefix_len: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family_of(addr);
    msg.header.prefix_len = prefix_len;
    msg.header.scope = AddressScope::Universe;
    msg.header.index = index;
    // IFA_LOCAL is the IPv4 notion of "our end"; IPv6 takes IFA_ADDRESS alone.
    if addr.is_ipv4() {
        msg.attributes.push(AddressAttribute::Local(addr));
    }
    msg.attributes.push(AddressAttribute::Address(addr));
    msg
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

/// A route of the main table with global scope: what every route PID1 adds has in common.
fn main_route(family: AddressFamily, protocol: RouteProtocol, kind: RouteType) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = protocol;
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = kind;
    msg
}

fn static_route(index: u32, to: IpAddr, prefix_len: u8, via: IpAddr) -> RouteMessage {
    let mut msg = main_route(family_of(to), RouteProtocol::Static, RouteType::Unicast);
    msg.header.destination_prefix_length = prefix_len;
    if prefix_len > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(route_address(to)));
    }
    msg.attributes
        .push(RouteAttribute::Gateway(route_address(via)));
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

fn prohibit_route(to: Ipv4Addr, prefix_len: u8) -> RouteMessage {
    let mut msg = main_route(
        AddressFamily::Inet,
        RouteProtocol::Static,
        RouteType::Prohibit,
    );
    msg.header.destination_prefix_length = prefix_len;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(to)));
    msg
}

fn default_route(index: u32, gateway: Ipv4Addr) -> RouteMessage {
    let mut msg = main_route(AddressFamily::Inet, RouteProtocol::Dhcp, RouteType::Unicast);
    msg.attributes
        .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

fn broadcast_of(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let host_bits = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) | host_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_carry_no_ifa_local_and_the_inet6_family() {
        let v6: IpAddr = "2a01:4f8::5".parse().unwrap();
        let msg = ip_address_message(3, v6, 64);
        assert_eq!(msg.header.family, AddressFamily::Inet6);
        assert_eq!(msg.attributes, vec![AddressAttribute::Address(v6)]);
        let v4 = ip_address_message(3, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 24);
        assert_eq!(v4.attributes.len(), 2);
    }

    #[test]
    fn a_default_route_has_no_destination_and_a_prefix_route_has_one() {
        let gw: IpAddr = "fe80::1".parse().unwrap();
        let default = static_route(2, "::".parse().unwrap(), 0, gw);
        assert_eq!(default.header.address_family, AddressFamily::Inet6);
        assert!(!default
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        let net = static_route(
            2,
            "10.1.0.0".parse().unwrap(),
            16,
            "10.0.0.1".parse().unwrap(),
        );
        assert_eq!(net.header.destination_prefix_length, 16);
        assert!(net
            .attributes
            .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::new(10, 1, 0, 0)
            ))));
    }

    #[test]
    fn broadcast_fills_host_bits() {
        let a = Ipv4Addr::new(10, 77, 3, 55);
        assert_eq!(broadcast_of(a, 24), Ipv4Addr::new(10, 77, 3, 255));
        assert_eq!(broadcast_of(a, 32), a);
        assert_eq!(broadcast_of(a, 0), Ipv4Addr::BROADCAST);
    }
}
