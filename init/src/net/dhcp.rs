//! DHCPv4 client: the state machine of [`machine`] driven over a UDP socket, with the
//! lease applied through netlink.
//!
//! The driver is synchronous: [`Client::next_event`] waits for a packet or the next
//! timer, whichever comes first, never past the caller's deadline. Errors leave the
//! client consistent (the machine's timers still run), so PID1 logs them and steps on.

mod lease;
mod machine;
mod socket;

pub use lease::{Lease, LeaseError};
pub use machine::{Action, Destination, Machine, Rng, State};
pub use socket::UdpTransport;

use crate::net::netlink::{Netlink, NetlinkError};
use dhcproto::v4::Message;
use dhcproto::{Decodable, Encodable};
use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Retry delays while no server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Sent as option 12.
    pub hostname: Option<String>,
    pub backoff: Backoff,
    /// Seed of xids and jitter; `None` takes one from the clock and the MAC.
    pub seed: Option<u64>,
}

/// What happened, for PID1's timeline and for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A lease was obtained (from INIT, or with a new address) and applied.
    Bound(Lease),
    /// The leasing server extended the lease at T1.
    Renewed(Lease),
    /// Another (or the same) server extended the lease at T2.
    Rebound(Lease),
    /// Nobody extended the lease: the address was removed.
    Expired { addr: Ipv4Addr },
    /// A server refused; the address, if any, was removed.
    Nak,
    /// No server answered; the next attempt is `after` from now.
    Retrying { after: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("{iface}: opening the netlink socket")]
    Netlink {
        iface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{iface}: no such interface")]
    NoInterface {
        iface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{iface}: no Ethernet address")]
    NoMac { iface: String },
    #[error("{iface}: bringing the link up")]
    LinkUp {
        iface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{iface}: opening the DHCP socket")]
    Socket {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: encoding a DHCP message")]
    Encode {
        iface: String,
        #[source]
        source: dhcproto::error::EncodeError,
    },
    #[error("{iface}: sending to {to:?}")]
    Send {
        iface: String,
        to: Destination,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: receiving")]
    Recv {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: applying lease of {addr}")]
    Configure {
        iface: String,
        addr: Ipv4Addr,
        #[source]
        source: NetlinkError,
    },
    #[error("{iface}: removing lease of {addr}")]
    Deconfigure {
        iface: String,
        addr: Ipv4Addr,
        #[source]
        source: NetlinkError,
    },
}

/// Sends and receives DHCP packets; [`UdpTransport`] on a real interface.
pub trait Transport {
    fn send(&mut self, packet: &[u8], to: Destination) -> io::Result<()>;
    /// A packet, or `None` when `timeout` passes without one.
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>>;
}

/// Applies leases to the interface; [`Netlink`] on a real one.
pub trait Configurator {
    fn configure(&mut self, lease: &Lease) -> Result<(), NetlinkError>;
    fn deconfigure(&mut self, lease: &Lease) -> Result<(), NetlinkError>;
}

pub trait Clock {
    fn now(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The real configurator: one interface, through netlink.
pub struct LinkConfig {
    netlink: Netlink,
    index: u32,
}

impl Configurator for LinkConfig {
    fn configure(&mut self, lease: &Lease) -> Result<(), NetlinkError> {
        self.netlink
            .add_address(self.index, lease.addr, lease.prefix_len)?;
        if let Some(gw) = lease.router {
            self.netlink.add_default_route(self.index, gw)?;
        }
        Ok(())
    }

    fn deconfigure(&mut self, lease: &Lease) -> Result<(), NetlinkError> {
        if let Some(gw) = lease.router {
            self.netlink.del_default_route(self.index, gw)?;
        }
        self.netlink
            .del_address(self.index, lease.addr, lease.prefix_len)
    }
}

pub struct Client<T = UdpTransport, N = LinkConfig, C = SystemClock> {
    iface: String,
    machine: Machine,
    transport: T,
    config: N,
    clock: C,
    pending: VecDeque<Event>,
}

impl Client {
    /// A client on `iface`: brings the link up and opens port 68 on it. Nothing is sent
    /// until the first [`Client::next_event`].
    pub fn new(iface: &str, options: Options) -> Result<Self, DhcpError> {
        let mut netlink = Netlink::open().map_err(|source| DhcpError::Netlink {
            iface: iface.to_owned(),
            source,
        })?;
        let link = netlink
            .link_by_name(iface)
            .map_err(|source| DhcpError::NoInterface {
                iface: iface.to_owned(),
                source,
            })?;
        let mac = link.mac.ok_or_else(|| DhcpError::NoMac {
            iface: iface.to_owned(),
        })?;
        netlink
            .set_link_up(link.index)
            .map_err(|source| DhcpError::LinkUp {
                iface: iface.to_owned(),
                source,
            })?;
        let transport = UdpTransport::bind(iface).map_err(|source| DhcpError::Socket {
            iface: iface.to_owned(),
            source,
        })?;
        let config = LinkConfig {
            netlink,
            index: link.index,
        };
        Ok(Self::with_parts(
            iface,
            mac,
            options,
            transport,
            config,
            SystemClock,
        ))
    }
}

impl<T: Transport, N: Configurator, C: Clock> Client<T, N, C> {
    /// A client over any transport, configurator and clock (tests use fakes).
    pub fn with_parts(
        iface: &str,
        mac: [u8; 6],
        options: Options,
        transport: T,
        config: N,
        clock: C,
    ) -> Self {
        let seed = options.seed.unwrap_or_else(|| default_seed(mac));
        let machine = Machine::new(
            mac,
            options.hostname,
            options.backoff,
            Rng::new(seed),
            clock.now(),
        );
        Self {
            iface: iface.to_owned(),
            machine,
            transport,
            config,
            clock,
            pending: VecDeque::new(),
        }
    }

    pub fn state(&self) -> State {
        self.machine.state()
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.machine.lease()
    }

    /// Runs the client until it has an event to report, or `deadline` passes (`None`).
    pub fn next_event(&mut self, deadline: Instant) -> Result<Option<Event>, DhcpError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            if self.clock.now() >= deadline {
                return Ok(None);
            }
            self.step(deadline)?;
        }
    }

    /// One turn: fire the timer if due, else wait for a packet until the timer or
    /// `deadline`, whichever is first. Events are queued for [`Self::next_event`].
    pub fn step(&mut self, deadline: Instant) -> Result<(), DhcpError> {
        let now = self.clock.now();
        let actions = if now >= self.machine.deadline() {
            self.machine.on_timeout(now)
        } else {
            let wait = self
                .machine
                .deadline()
                .min(deadline)
                .saturating_duration_since(now);
            let packet = self
                .transport
                .recv(wait)
                .map_err(|source| DhcpError::Recv {
                    iface: self.iface.clone(),
                    source,
                })?;
            match packet.and_then(|p| Message::from_bytes(&p).ok()) {
                Some(msg) => self.machine.on_packet(self.clock.now(), &msg),
                None => Vec::new(),
            }
        };
        self.perform(actions)
    }

    /// Carries out every action even when one fails, so that a failed send does not
    /// swallow the event of the same turn; the first error is returned.
    fn perform(&mut self, actions: Vec<Action>) -> Result<(), DhcpError> {
        let mut first = Ok(());
        for action in actions {
            let result = self.perform_one(action);
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    fn perform_one(&mut self, action: Action) -> Result<(), DhcpError> {
        let iface = || self.iface.clone();
        match action {
            Action::Send(msg, to) => {
                let bytes = msg.to_vec().map_err(|source| DhcpError::Encode {
                    iface: iface(),
                    source,
                })?;
                self.transport
                    .send(&bytes, to)
                    .map_err(|source| DhcpError::Send {
                        iface: iface(),
                        to,
                        source,
                    })
            }
            Action::Configure(lease) => {
                self.config
                    .configure(&lease)
                    .map_err(|source| DhcpError::Configure {
                        iface: iface(),
                        addr: lease.addr,
                        source,
                    })
            }
            Action::Deconfigure(lease) => {
                self.config
                    .deconfigure(&lease)
                    .map_err(|source| DhcpError::Deconfigure {
                        iface: iface(),
                        addr: lease.addr,
                        source,
                    })
            }
            Action::Event(event) => {
                self.pending.push_back(event);
                Ok(())
            }
        }
    }
}

/// Distinct per boot and per NIC; only spreads xids and jitter, no secret rides on it.
fn default_seed(mac: [u8; 6]) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut mac64 = [0u8; 8];
    mac64[..6].copy_from_slice(&mac);
    nanos ^ u64::from_le_bytes(mac64) ^ u64::from(std::process::id()).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, MessageType, Opcode};
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    #[derive(Clone)]
    struct FakeClock(Rc<Cell<Instant>>);

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.0.get()
        }
    }

    /// A server in the wire: answers DISCOVER and REQUEST while `up`; waiting for a
    /// packet that never comes moves the fake clock on by the whole timeout.
    struct FakeNet {
        clock: FakeClock,
        up: Rc<Cell<bool>>,
        queue: VecDeque<Vec<u8>>,
        fail_sends: bool,
    }

    impl Transport for FakeNet {
        fn send(&mut self, packet: &[u8], _to: Destination) -> io::Result<()> {
            let req = Message::from_bytes(packet).map_err(io::Error::other)?;
            let kind = req.opts().msg_type().ok_or(io::ErrorKind::InvalidData)?;
            if self.fail_sends {
                return Err(io::ErrorKind::NetworkUnreachable.into());
            }
            if self.up.get() {
                let answer = match kind {
                    MessageType::Discover => MessageType::Offer,
                    _ => MessageType::Ack,
                };
                let mut reply = Message::new_with_id(
                    req.xid(),
                    Ipv4Addr::UNSPECIFIED,
                    Ipv4Addr::new(10, 0, 0, 50),
                    SERVER,
                    Ipv4Addr::UNSPECIFIED,
                    req.chaddr(),
                );
                reply.set_opcode(Opcode::BootReply);
                let opts = reply.opts_mut();
                opts.insert(DhcpOption::MessageType(answer));
                opts.insert(DhcpOption::ServerIdentifier(SERVER));
                opts.insert(DhcpOption::AddressLeaseTime(20));
                self.queue
                    .push_back(reply.to_vec().map_err(io::Error::other)?);
            }
            Ok(())
        }

        fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
            let packet = self.queue.pop_front();
            if packet.is_none() {
                self.clock.0.set(self.clock.0.get() + timeout);
            }
            Ok(packet)
        }
    }

    #[derive(Default, Clone)]
    struct Recorder(Rc<RefCell<Vec<(bool, Ipv4Addr)>>>);

    impl Configurator for Recorder {
        fn configure(&mut self, lease: &Lease) -> Result<(), NetlinkError> {
            self.0.borrow_mut().push((true, lease.addr));
            Ok(())
        }
        fn deconfigure(&mut self, lease: &Lease) -> Result<(), NetlinkError> {
            self.0.borrow_mut().push((false, lease.addr));
            Ok(())
        }
    }

    struct Rig {
        client: Client<FakeNet, Recorder, FakeClock>,
        clock: FakeClock,
        up: Rc<Cell<bool>>,
        applied: Recorder,
    }

    fn rig(fail_sends: bool) -> Rig {
        let clock = FakeClock(Rc::new(Cell::new(Instant::now())));
        let up = Rc::new(Cell::new(true));
        let net = FakeNet {
            clock: clock.clone(),
            up: up.clone(),
            queue: VecDeque::new(),
            fail_sends,
        };
        let applied = Recorder::default();
        let options = Options {
            seed: Some(3),
            ..Options::default()
        };
        let client = Client::with_parts(
            "eth0",
            [2, 0, 0, 0, 0, 1],
            options,
            net,
            applied.clone(),
            clock.clone(),
        );
        Rig {
            client,
            clock,
            up,
            applied,
        }
    }

    fn next(rig: &mut Rig, within: u64) -> Option<Event> {
        let deadline = rig.clock.now() + Duration::from_secs(within);
        rig.client.next_event(deadline).expect("no I/O error")
    }

    #[test]
    fn drives_a_lease_through_its_life() {
        let mut rig = rig(false);
        let addr = Ipv4Addr::new(10, 0, 0, 50);
        assert!(matches!(next(&mut rig, 1), Some(Event::Bound(l)) if l.addr == addr));
        assert_eq!(*rig.applied.0.borrow(), vec![(true, addr)]);
        let t_bound = rig.clock.now();
        // Nothing until T1 (10 s of a 20 s lease).
        assert_eq!(next(&mut rig, 9), None);
        assert!(matches!(next(&mut rig, 2), Some(Event::Renewed(_))));
        assert_eq!(rig.clock.now() - t_bound, Duration::from_secs(10));

        rig.up.set(false);
        let event = next(&mut rig, 30);
        assert_eq!(event, Some(Event::Expired { addr }));
        assert_eq!(rig.clock.now() - t_bound, Duration::from_secs(30));
        assert_eq!(*rig.applied.0.borrow(), vec![(true, addr), (false, addr)]);
        assert_eq!(rig.client.state(), State::Selecting);
        assert!(matches!(next(&mut rig, 5), Some(Event::Retrying { .. })));

        rig.up.set(true);
        let mut regained = next(&mut rig, 5);
        for _ in 0..5 {
            if !matches!(regained, Some(Event::Retrying { .. })) {
                break;
            }
            regained = next(&mut rig, 5);
        }
        assert!(matches!(regained, Some(Event::Bound(l)) if l.addr == addr));
    }

    #[test]
    fn send_errors_name_the_interface_and_keep_the_client_going() {
        let mut rig = rig(true);
        let deadline = rig.clock.now() + Duration::from_secs(1);
        let err = rig.client.next_event(deadline).expect_err("send fails");
        assert!(matches!(
            &err,
            DhcpError::Send { iface, to: Destination::Broadcast, .. } if iface == "eth0"
        ));
        assert_eq!(rig.client.state(), State::Selecting);
        // The retry timer still runs: the next turn retransmits.
        let err = rig
            .client
            .next_event(rig.clock.now() + Duration::from_secs(5))
            .expect_err("send fails again");
        assert!(matches!(err, DhcpError::Send { .. }));
        // The Retrying of that turn was not lost to the error.
        assert!(matches!(
            rig.client.next_event(rig.clock.now()),
            Ok(Some(Event::Retrying { .. }))
        ));
    }
}
