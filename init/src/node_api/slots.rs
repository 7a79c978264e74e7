//! Admission: which connections the node API serves at once, so that no client without a
//! certificate can keep a client with one out.
//!
//! - Each source address has at most [`Limits::per_address`] connections (an IPv6 /64
//!   counts as one address); one more is closed at once.
//! - A new connection takes one of [`Limits::open_slots`] *open* slots for its handshake,
//!   and keeps it while it has no verified client certificate (health and 401s). When
//!   they are all taken, the oldest open connection is shut down to make room: a slow
//!   client only ever holds a slot until that many newer connections came, and a client
//!   with a certificate needs one only for its handshake (milliseconds).
//! - Once the handshake verified a client certificate, the connection moves to one of
//!   [`Limits::authenticated_slots`], which nothing else can take and nothing closes
//!   early. When those are full it stays in its open slot.
//!
//! Every phase also has a deadline (the connection's, in [`super::server`]), so a slot is
//! never held for long by a client that is merely slow.

use super::Limits;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::{Arc, Mutex};

/// Why a connection was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0} connections already open from this address")]
    PerAddress(usize),
    #[error("no connection slots")]
    NoSlots,
    #[error("keep a handle on the connection")]
    Handle(#[source] std::io::Error),
}

/// The slot table of one server.
pub struct Slots {
    open: usize,
    authenticated: usize,
    per_address: usize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// Connections without a verified certificate, oldest first, with a handle to shut
    /// them down.
    open: VecDeque<(u64, TcpStream)>,
    authenticated: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// What a served connection holds; gives its slot back when dropped.
pub struct Admission {
    slots: Arc<Slots>,
    id: u64,
    source: IpAddr,
    authenticated: bool,
}

/// What counts as one source: an IPv4 address, or an IPv6 /64 (one host's share of a
/// network).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & (!0u128 << 64)).into()),
        },
    }
}

impl Slots {
    pub fn new(limits: &Limits) -> Arc<Slots> {
        Arc::new(Slots {
            open: limits.open_slots,
            authenticated: limits.authenticated_slots,
            per_address: limits.per_address,
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `tcp` from `peer` into an open slot. The second value says whether an
    /// older open connection was shut down to make room.
    pub fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        tcp: &TcpStream,
    ) -> Result<(Admission, bool), Refused> {
        let source = source(peer);
        let handle = tcp.try_clone().map_err(Refused::Handle)?;
        let mut t = self.table();
        let from_source = t.per_address.get(&source).copied().unwrap_or(0);
        if from_source >= self.per_address {
            return Err(Refused::PerAddress(from_source));
        }
        let evicted = if t.open.len() >= self.open {
            match t.open.pop_front() {
                Some((_, oldest)) => Some(oldest),
                None => return Err(Refused::NoSlots),
            }
        } else {
            None
        };
        let id = t.next;
        t.next += 1;
        t.open.push_back((id, handle));
        *t.per_address.entry(source).or_default() += 1;
        drop(t);
        let made_room = evicted.is_some();
        if let Some(oldest) = evicted {
            // Its thread sees the end of its connection and gives its address back.
            let _ = oldest.shutdown(Shutdown::Both);
        }
        let admission = Admission {
            slots: Arc::clone(self),
            id,
            source,
            authenticated: false,
        };
        Ok((admission, made_room))
    }

    /// Connections in open and in authenticated slots now.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.table();
        (t.open.len(), t.authenticated)
    }
}

impl Admission {
    /// For a connection whose handshake verified a client certificate: moves it to an
    /// authenticated slot if one is free (then it is never shut down to make room).
    /// Whether it moved.
    pub fn authenticate(&mut self) -> bool {
        if self.authenticated {
            return true;
        }
        let mut t = self.slots.table();
        if t.authenticated >= self.slots.authenticated {
            return false;
        }
        let Some(at) = t.open.iter().position(|(id, _)| *id == self.id) else {
            // Shut down to make room a moment ago: it is ending anyway.
            return false;
        };
        t.open.remove(at);
        t.authenticated += 1;
        self.authenticated = true;
        true
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut t = self.slots.table();
        if self.authenticated {
            t.authenticated -= 1;
        } else if let Some(at) = t.open.iter().position(|(id, _)| *id == self.id) {
            t.open.remove(at);
        }
        if let Some(n) = t.per_address.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                t.per_address.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
    use std::time::Duration;

    /// Connected loopback pairs: (the server's end, the client's end).
    struct Loop(TcpListener);

    impl Loop {
        fn pair(&self) -> (TcpStream, TcpStream) {
            let client = TcpStream::connect(self.0.local_addr().expect("addr")).expect("connect");
            let (server, _) = self.0.accept().expect("accept");
            client
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            (server, client)
        }
    }

    /// Whether the server side shut the client's connection down.
    fn was_shut(client: &mut TcpStream) -> bool {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        !matches!(client.read(&mut [0u8; 8]), Err(e) if matches!(e.kind(), WouldBlock | TimedOut))
    }

    fn limits(open: usize, authenticated: usize, per_address: usize) -> Limits {
        Limits {
            open_slots: open,
            authenticated_slots: authenticated,
            per_address,
            ..Limits::default()
        }
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn the_oldest_open_connection_makes_room_and_authenticated_ones_are_kept() {
        let l = Loop(TcpListener::bind("127.0.0.1:0").expect("bind"));
        let slots = Slots::new(&limits(2, 1, 8));
        let (s1, mut c1) = l.pair();
        let (s2, mut c2) = l.pair();
        let (s3, mut c3) = l.pair();
        let (mut a1, made_room) = slots.admit(A, &s1).expect("first");
        assert!(!made_room);
        assert!(a1.authenticate());
        let (_a2, made_room) = slots.admit(A, &s2).expect("second");
        assert!(!made_room);
        let (mut a3, made_room) = slots.admit(B, &s3).expect("third");
        assert!(!made_room, "one open slot was free: the first moved out");
        assert_eq!(slots.counts(), (2, 1));
        // The authenticated slot is taken: a second certificate stays open.
        assert!(!a3.authenticate());
        let (s4, _c4) = l.pair();
        let (_a4, made_room) = slots.admit(B, &s4).expect("fourth");
        assert!(made_room);
        assert!(was_shut(&mut c2), "the oldest open connection is shut");
        assert!(!was_shut(&mut c1), "the authenticated one is kept");
        assert!(!was_shut(&mut c3));
        drop(a1);
        assert_eq!(slots.counts(), (2, 0));
        assert!(a3.authenticate());
        assert_eq!(slots.counts(), (1, 1));
    }

    #[test]
    fn each_source_has_its_cap_and_gets_it_back() {
        let l = Loop(TcpListener::bind("127.0.0.1:0").expect("bind"));
        let slots = Slots::new(&limits(16, 16, 2));
        let (s, _c) = l.pair();
        let first = slots.admit(A, &s).expect("first");
        let mut second = slots.admit(A, &s).expect("second");
        assert!(second.0.authenticate(), "authenticated ones count too");
        assert!(matches!(slots.admit(A, &s), Err(Refused::PerAddress(2))));
        let _other = slots.admit(B, &s).expect("another address");
        drop(first);
        let _again = slots.admit(A, &s).expect("a slot given back");
        // IPv6: one /64 is one source; v4-mapped is the IPv4 address.
        let slots = Slots::new(&limits(16, 16, 1));
        let host = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
        let _h1 = slots.admit(host(1), &s).expect("v6");
        assert!(slots.admit(host(2), &s).is_err());
        let _net2 = slots
            .admit(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1)),
                &s,
            )
            .expect("another /64");
        let _v4 = slots.admit(A, &s).expect("v4");
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(slots.admit(mapped, &s).is_err());
    }

    #[test]
    fn no_open_slots_refuses_all() {
        let l = Loop(TcpListener::bind("127.0.0.1:0").expect("bind"));
        let slots = Slots::new(&limits(0, 4, 8));
        let (s, _c) = l.pair();
        assert!(matches!(slots.admit(A, &s), Err(Refused::NoSlots)));
        assert_eq!(slots.counts(), (0, 0));
    }
}
