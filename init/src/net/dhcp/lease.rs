//! What a DHCP server granted, read out of an OFFER or ACK.

use dhcproto::v4::{DhcpOption, Message, OptionCode};
use std::net::Ipv4Addr;
use std::time::Duration;

/// RFC 2131 §4.4.5 defaults when the server sends no T1 (option 58) or T2 (option 59).
const T1_FRACTION: f64 = 0.5;
const T2_FRACTION: f64 = 0.875;
/// The shortest lease acted on. A server's shorter lease (0 included) is held for this
/// long, its T1/T2 taken against it: with a lease of 0 the address would expire the
/// moment it was bound, be removed, asked for again, bound again, and so on, flapping
/// the node's address and everything bound to it. RFC 2131 sets no minimum; dhcpcd
/// clamps to the same 20 s (its `DHCP_MIN_LEASE`), long enough for a renewal at T1
/// (10 s) and a rebinding before expiry. Refusing such offers instead would leave a node
/// behind a misconfigured server with no address at all.
pub const MIN_LEASE_SECS: u32 = 20;

/// A lease as granted; times are relative to the moment the REQUEST was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub addr: Ipv4Addr,
    /// From the subnet mask (option 1).
    pub prefix_len: u8,
    /// First router of option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Server identifier (option 54): where RENEWING unicasts to.
    pub server: Ipv4Addr,
    /// Option 51, at least [`MIN_LEASE_SECS`].
    pub lease_time: Duration,
    /// Option 58, or half the lease.
    pub t1: Duration,
    /// Option 59, or 7/8 of the lease.
    pub t2: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("no address offered (yiaddr is 0.0.0.0)")]
    NoAddress,
    #[error("address {0} offered, which is not a host address (broadcast, multicast, loopback or reserved)")]
    NotAHostAddress(Ipv4Addr),
    #[error("no server identifier (option 54)")]
    NoServerId,
    #[error("no lease time (option 51)")]
    NoLeaseTime,
    #[error("subnet mask {0} is not contiguous")]
    BadMask(Ipv4Addr),
}

impl Lease {
    /// Reads a lease from an OFFER or an ACK.
    pub fn from_reply(msg: &Message) -> Result<Self, LeaseError> {
        let addr = msg.yiaddr();
        if addr.is_unspecified() {
            return Err(LeaseError::NoAddress);
        }
        if !is_host_address(addr) {
            return Err(LeaseError::NotAHostAddress(addr));
        }
        let opts = msg.opts();
        let server = match opts.get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => *ip,
            _ => return Err(LeaseError::NoServerId),
        };
        let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
            Some(DhcpOption::AddressLeaseTime(s)) => (*s).max(MIN_LEASE_SECS),
            _ => return Err(LeaseError::NoLeaseTime),
        };
        let prefix_len = match opts.get(OptionCode::SubnetMask) {
            Some(DhcpOption::SubnetMask(mask)) => prefix_of(*mask)?,
            // RFC 2131 leaves the mask optional; a classless /24 is what every server
            // in practice would have sent.
            _ => 24,
        };
        let router = match opts.get(OptionCode::Router) {
            Some(DhcpOption::Router(list)) => list.first().copied(),
            _ => None,
        };
        let dns = match opts.get(OptionCode::DomainNameServer) {
            Some(DhcpOption::DomainNameServer(list)) => list.clone(),
            _ => Vec::new(),
        };
        let t1 = match opts.get(OptionCode::Renewal) {
            Some(DhcpOption::Renewal(s)) => Some(*s),
            _ => None,
        };
        let t2 = match opts.get(OptionCode::Rebinding) {
            Some(DhcpOption::Rebinding(s)) => Some(*s),
            _ => None,
        };
        let (t1, t2) = timers(lease_secs, t1, t2);
        Ok(Self {
            addr,
            prefix_len,
            router,
            dns,
            server,
            lease_time: Duration::from_secs(lease_secs.into()),
            t1,
            t2,
        })
    }
}

/// T1 and T2, falling back to the RFC defaults when the server's values are missing or
/// out of order (T1 < T2 < lease must hold, or the client would skip a state).
fn timers(lease: u32, t1: Option<u32>, t2: Option<u32>) -> (Duration, Duration) {
    let lease_d = Duration::from_secs(lease.into());
    let default_t2 = lease_d.mul_f64(T2_FRACTION);
    let t2 = match t2 {
        Some(s) if s <= lease => Duration::from_secs(s.into()),
        _ => default_t2,
    };
    let t1 = match t1 {
        Some(s) if Duration::from_secs(s.into()) <= t2 => Duration::from_secs(s.into()),
        _ => lease_d.mul_f64(T1_FRACTION).min(t2),
    };
    (t1, t2)
}

fn prefix_of(mask: Ipv4Addr) -> Result<u8, LeaseError> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    if bits.count_ones() != ones {
        return Err(LeaseError::BadMask(mask));
    }
    // At most 32, so the cast cannot truncate.
    Ok(ones as u8)
}

/// Whether `addr` can be an interface's own address: not broadcast, multicast,
/// loopback, "this network" (0.0.0.0/8) or reserved (240.0.0.0/4). A server offering one
/// of those would have the node configure it (the `dhcp` fuzz target found
/// 255.255.255.255 accepted).
fn is_host_address(addr: Ipv4Addr) -> bool {
    let first = addr.octets()[0];
    !(addr.is_broadcast()
        || addr.is_multicast()
        || addr.is_loopback()
        || first == 0
        || first >= 240)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::MessageType;

    #[test]
    fn an_address_that_is_no_host_address_is_refused() {
        for bad in [
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::new(240, 0, 0, 1),
        ] {
            let mut msg = ack(&[SERVER, DhcpOption::AddressLeaseTime(3600)]);
            msg.set_yiaddr(bad);
            assert_eq!(
                Lease::from_reply(&msg),
                Err(LeaseError::NotAHostAddress(bad))
            );
        }
        let mut msg = ack(&[SERVER, DhcpOption::AddressLeaseTime(3600)]);
        msg.set_yiaddr(Ipv4Addr::new(10, 0, 0, 50));
        assert!(Lease::from_reply(&msg).is_ok());
    }

    fn ack(opts: &[DhcpOption]) -> Message {
        let mut msg = Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 0, 0, 50),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[2, 0, 0, 0, 0, 1],
        );
        msg.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Ack));
        for o in opts {
            msg.opts_mut().insert(o.clone());
        }
        msg
    }

    const SERVER: DhcpOption = DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn reads_all_recorded_options() {
        let msg = ack(&[
            SERVER,
            DhcpOption::AddressLeaseTime(3600),
            DhcpOption::Renewal(100),
            DhcpOption::Rebinding(200),
            DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 240, 0)),
            DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]),
            DhcpOption::DomainNameServer(vec![Ipv4Addr::new(1, 1, 1, 1)]),
        ]);
        let lease = Lease::from_reply(&msg).expect("valid ack");
        assert_eq!(
            lease,
            Lease {
                addr: Ipv4Addr::new(10, 0, 0, 50),
                prefix_len: 20,
                router: Some(Ipv4Addr::new(10, 0, 0, 1)),
                dns: vec![Ipv4Addr::new(1, 1, 1, 1)],
                server: Ipv4Addr::new(10, 0, 0, 1),
                lease_time: Duration::from_secs(3600),
                t1: Duration::from_secs(100),
                t2: Duration::from_secs(200),
            }
        );
    }

    #[test]
    fn timers_default_and_reject_disorder() {
        /// lease, option 58, option 59, expected T1, expected T2
        type Case = (u32, Option<u32>, Option<u32>, u64, u64);
        let cases: &[Case] = &[
            (1000, None, None, 500, 875),
            (1000, Some(10), None, 10, 875),
            (1000, None, Some(600), 500, 600),
            (1000, None, Some(400), 400, 400),
            (1000, Some(900), Some(800), 500, 800),
            (1000, Some(10), Some(5000), 10, 875),
        ];
        for &(lease, t1, t2, want1, want2) in cases {
            let (g1, g2) = timers(lease, t1, t2);
            assert_eq!(
                (g1.as_secs(), g2.as_secs()),
                (want1, want2),
                "lease {lease} t1 {t1:?} t2 {t2:?}"
            );
        }
    }

    #[test]
    fn a_lease_shorter_than_the_floor_is_held_for_the_floor() {
        for (granted, t1, t2) in [(0, None, None), (1, Some(0), Some(1)), (19, None, None)] {
            let mut opts = vec![SERVER, DhcpOption::AddressLeaseTime(granted)];
            opts.extend(t1.map(DhcpOption::Renewal));
            opts.extend(t2.map(DhcpOption::Rebinding));
            let lease = Lease::from_reply(&ack(&opts)).expect("valid ack");
            assert_eq!(lease.lease_time, Duration::from_secs(20), "lease {granted}");
            assert!(
                lease.t1 <= lease.t2 && lease.t2 <= lease.lease_time,
                "lease {granted}: {lease:?}"
            );
            // The server's own T1/T2 below the floor are kept; missing ones default
            // against the floor.
            let want_t1 = t1.map_or(10, u64::from);
            assert_eq!(lease.t1, Duration::from_secs(want_t1), "lease {granted}");
        }
        let long = Lease::from_reply(&ack(&[SERVER, DhcpOption::AddressLeaseTime(21)]));
        assert_eq!(long.expect("valid").lease_time, Duration::from_secs(21));
    }

    #[test]
    fn missing_pieces_are_named() {
        let no_server = ack(&[DhcpOption::AddressLeaseTime(60)]);
        assert_eq!(Lease::from_reply(&no_server), Err(LeaseError::NoServerId));
        let no_time = ack(&[SERVER]);
        assert_eq!(Lease::from_reply(&no_time), Err(LeaseError::NoLeaseTime));
        let bad_mask = Ipv4Addr::new(255, 0, 255, 0);
        let holey = ack(&[
            SERVER,
            DhcpOption::AddressLeaseTime(60),
            DhcpOption::SubnetMask(bad_mask),
        ]);
        assert_eq!(
            Lease::from_reply(&holey),
            Err(LeaseError::BadMask(bad_mask))
        );
    }
}
