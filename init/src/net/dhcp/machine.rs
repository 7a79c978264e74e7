//! The client state machine of RFC 2131 §4.4 without any I/O: it is fed the time and
//! the packets received, and answers with packets to send, addresses to (de)configure
//! and events. It never reads a clock, so tests drive it with a fake one.

use super::lease::Lease;
use super::{Backoff, Event};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::Decodable;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// REQUESTs sent in REQUESTING before starting over with a DISCOVER.
const MAX_REQUESTS: u32 = 4;
/// RFC 2131 §4.4.5: in RENEWING/REBINDING wait half the time left, but at least this.
const RENEW_RETRY_FLOOR: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Init,
    Selecting,
    Requesting,
    Bound,
    Renewing,
    Rebinding,
}

/// Where a packet goes: 255.255.255.255:67 or the leasing server's port 67.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Broadcast,
    Server(Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(Message, Destination),
    Configure(Lease),
    Deconfigure(Lease),
    Event(Event),
}

/// An empty BOOTREQUEST with our xid, ciaddr and chaddr.
///
/// Not `Message::new_with_id`: dhcproto fills its other fields from `Message::default()`,
/// which draws an xid from `rand::random()`, and that blocks in getrandom(2) until the
/// kernel's CRNG is ready. Early in a VM without RDRAND or virtio-rng that is minutes
/// away, and the network must not wait for it. Decoding a fixed header takes no
/// randomness.
pub fn blank_request(xid: u32, ciaddr: Ipv4Addr, chaddr: &[u8; 6]) -> Message {
    // op=BOOTREQUEST, htype=Ethernet, hlen=6, then zeros; the magic cookie at 236 and the
    // End option after it.
    let mut bytes = [0u8; 241];
    bytes[..3].copy_from_slice(&[1, 1, 6]);
    bytes[236..240].copy_from_slice(&[99, 130, 83, 99]);
    bytes[240] = 255;
    let mut msg = match Message::from_bytes(&bytes) {
        Ok(m) => m,
        // The template is a constant that the tests decode; this arm is unreachable.
        Err(_) => Message::new_with_id(xid, ciaddr, ciaddr, ciaddr, ciaddr, chaddr),
    };
    msg.set_xid(xid).set_ciaddr(ciaddr).set_chaddr(chaddr);
    msg
}

/// splitmix64: small, seedable, good enough for xids and jitter (not for secrets).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Backoff {
    /// Delay before retry `attempt` (0-based): `initial` doubling up to `cap`, less up to
    /// 10% of jitter so that clients booted together do not retry in lockstep.
    pub fn delay(&self, attempt: u32, rng: &mut Rng) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        let base = self.initial.saturating_mul(factor).min(self.cap);
        base.saturating_sub(base.mul_f64(rng.unit() * 0.1))
    }
}

pub struct Machine {
    chaddr: [u8; 6],
    hostname: Option<String>,
    backoff: Backoff,
    rng: Rng,
    state: State,
    xid: u32,
    /// Retries in the current exchange.
    attempt: u32,
    deadline: Instant,
    /// When the current REQUEST was first sent: the lease times count from there.
    requested_at: Instant,
    offer: Option<Lease>,
    lease: Option<Lease>,
    bound_at: Instant,
    /// Last address held, asked for again in DISCOVER (option 50).
    previous: Option<Ipv4Addr>,
}

impl Machine {
    pub fn new(
        chaddr: [u8; 6],
        hostname: Option<String>,
        backoff: Backoff,
        rng: Rng,
        now: Instant,
    ) -> Self {
        Self {
            chaddr,
            hostname,
            backoff,
            rng,
            state: State::Init,
            xid: 0,
            attempt: 0,
            deadline: now,
            requested_at: now,
            offer: None,
            lease: None,
            bound_at: now,
            previous: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// The timer fired (or `now` is past [`Self::deadline`]).
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        if now < self.deadline {
            return Vec::new();
        }
        match self.state {
            State::Init => self.discover(now, false),
            State::Selecting => self.discover(now, true),
            State::Requesting if self.attempt + 1 >= MAX_REQUESTS => self.discover(now, true),
            State::Requesting => {
                self.attempt += 1;
                self.deadline = now + self.backoff.delay(self.attempt, &mut self.rng);
                self.request_selected()
            }
            State::Bound => self.renew(now),
            State::Renewing if now >= self.t2() => self.rebind(now),
            State::Renewing => {
                self.deadline = retry_before(now, self.t2());
                self.request_lease(Destination::Server(self.server()))
            }
            State::Rebinding if now >= self.expiry() => self.expire(now),
            State::Rebinding => {
                self.deadline = retry_before(now, self.expiry());
                self.request_lease(Destination::Broadcast)
            }
        }
    }

    /// A packet arrived on port 68; anything not a reply to our current exchange is
    /// dropped.
    pub fn on_packet(&mut self, now: Instant, msg: &Message) -> Vec<Action> {
        if msg.opcode() != Opcode::BootReply
            || msg.xid() != self.xid
            || msg.chaddr().get(..6) != Some(&self.chaddr[..])
        {
            return Vec::new();
        }
        let kind = msg.opts().msg_type();
        match (self.state, kind) {
            (State::Selecting, Some(MessageType::Offer)) => self.select(now, msg),
            (State::Requesting, Some(MessageType::Ack)) => self.bind(now, msg),
            (State::Renewing | State::Rebinding, Some(MessageType::Ack)) => self.bind(now, msg),
            (State::Requesting, Some(MessageType::Nak)) => {
                let mut out = vec![Action::Event(Event::Nak)];
                out.extend(self.restart(now));
                out
            }
            (State::Renewing | State::Rebinding, Some(MessageType::Nak)) => {
                let mut out = Vec::new();
                if let Some(old) = self.lease.take() {
                    out.push(Action::Deconfigure(old));
                }
                out.push(Action::Event(Event::Nak));
                out.extend(self.restart(now));
                out
            }
            _ => Vec::new(),
        }
    }

    fn discover(&mut self, now: Instant, retry: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if retry {
            self.attempt = self.attempt.saturating_add(1);
        } else {
            self.attempt = 0;
        }
        let delay = self.backoff.delay(self.attempt, &mut self.rng);
        if retry {
            out.push(Action::Event(Event::Retrying { after: delay }));
        }
        self.state = State::Selecting;
        self.offer = None;
        self.xid = self.rng.next_u64() as u32;
        self.deadline = now + delay;
        let mut msg = self.message(MessageType::Discover, Ipv4Addr::UNSPECIFIED, true);
        if let Some(prev) = self.previous {
            msg.opts_mut().insert(DhcpOption::RequestedIpAddress(prev));
        }
        out.push(Action::Send(msg, Destination::Broadcast));
        out
    }

    /// Starts over after a NAK, waiting the first backoff step so that a server that
    /// NAKs everything does not get a packet storm.
    fn restart(&mut self, now: Instant) -> Vec<Action> {
        self.state = State::Init;
        self.offer = None;
        self.previous = None;
        let after = self.backoff.delay(0, &mut self.rng);
        self.deadline = now + after;
        vec![Action::Event(Event::Retrying { after })]
    }

    fn select(&mut self, now: Instant, msg: &Message) -> Vec<Action> {
        let Ok(offer) = Lease::from_reply(msg) else {
            return Vec::new();
        };
        self.offer = Some(offer);
        self.state = State::Requesting;
        self.attempt = 0;
        self.requested_at = now;
        self.deadline = now + self.backoff.delay(0, &mut self.rng);
        self.request_selected()
    }

    /// REQUEST in REQUESTING: broadcast, naming the chosen server and address.
    fn request_selected(&mut self) -> Vec<Action> {
        let Some(offer) = &self.offer else {
            return Vec::new();
        };
        let (addr, server) = (offer.addr, offer.server);
        let mut msg = self.message(MessageType::Request, Ipv4Addr::UNSPECIFIED, true);
        msg.opts_mut().insert(DhcpOption::RequestedIpAddress(addr));
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        vec![Action::Send(msg, Destination::Broadcast)]
    }

    /// REQUEST in RENEWING/REBINDING: `ciaddr` set, no server id (RFC 2131 §4.3.2).
    fn request_lease(&mut self, to: Destination) -> Vec<Action> {
        let Some(lease) = &self.lease else {
            return Vec::new();
        };
        let msg = self.message(MessageType::Request, lease.addr, false);
        vec![Action::Send(msg, to)]
    }

    fn bind(&mut self, now: Instant, msg: &Message) -> Vec<Action> {
        let Ok(new) = Lease::from_reply(msg) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let event = match (self.state, self.lease.take()) {
            (State::Renewing, Some(old)) if old.addr == new.addr => Event::Renewed(new.clone()),
            (State::Rebinding, Some(old)) if old.addr == new.addr => Event::Rebound(new.clone()),
            (_, old) => {
                if let Some(old) = old {
                    out.push(Action::Deconfigure(old));
                }
                out.push(Action::Configure(new.clone()));
                Event::Bound(new.clone())
            }
        };
        out.push(Action::Event(event));
        self.state = State::Bound;
        self.bound_at = self.requested_at;
        self.previous = Some(new.addr);
        self.deadline = self.bound_at + new.t1;
        self.lease = Some(new);
        self.offer = None;
        self.attempt = 0;
        // A T1 already past (a reply slower than T1) renews at once, not never.
        self.deadline = self.deadline.max(now);
        out
    }

    fn renew(&mut self, now: Instant) -> Vec<Action> {
        self.state = State::Renewing;
        self.xid = self.rng.next_u64() as u32;
        self.requested_at = now;
        if now >= self.t2() {
            return self.rebind(now);
        }
        self.deadline = retry_before(now, self.t2());
        self.request_lease(Destination::Server(self.server()))
    }

    fn rebind(&mut self, now: Instant) -> Vec<Action> {
        self.state = State::Rebinding;
        self.xid = self.rng.next_u64() as u32;
        self.requested_at = now;
        if now >= self.expiry() {
            return self.expire(now);
        }
        self.deadline = retry_before(now, self.expiry());
        self.request_lease(Destination::Broadcast)
    }

    fn expire(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(old) = self.lease.take() {
            out.push(Action::Deconfigure(old.clone()));
            out.push(Action::Event(Event::Expired { addr: old.addr }));
        }
        out.extend(self.discover(now, false));
        out
    }

    fn message(&self, kind: MessageType, ciaddr: Ipv4Addr, broadcast: bool) -> Message {
        let mut msg = blank_request(self.xid, ciaddr, &self.chaddr);
        // Without an address the kernel would drop a unicast reply to the offered
        // address, so ask the server to broadcast until we are bound.
        if broadcast {
            msg.set_flags(Flags::default().set_broadcast());
        }
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        let mut client_id = vec![1u8];
        client_id.extend_from_slice(&self.chaddr);
        opts.insert(DhcpOption::ClientIdentifier(client_id));
        opts.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::AddressLeaseTime,
            OptionCode::Renewal,
            OptionCode::Rebinding,
        ]));
        if let Some(name) = &self.hostname {
            opts.insert(DhcpOption::Hostname(name.clone()));
        }
        msg
    }

    fn server(&self) -> Ipv4Addr {
        self.lease
            .as_ref()
            .map_or(Ipv4Addr::BROADCAST, |l| l.server)
    }

    fn t2(&self) -> Instant {
        self.bound_at + self.lease.as_ref().map_or(Duration::ZERO, |l| l.t2)
    }

    fn expiry(&self) -> Instant {
        self.bound_at + self.lease.as_ref().map_or(Duration::ZERO, |l| l.lease_time)
    }
}

/// Next retransmission in RENEWING/REBINDING: half the time left to `limit`, at least
/// [`RENEW_RETRY_FLOOR`], never past `limit`.
fn retry_before(now: Instant, limit: Instant) -> Instant {
    let left = limit.saturating_duration_since(now);
    now + (left / 2).max(RENEW_RETRY_FLOOR).min(left)
}

#[cfg(test)]
mod tests;
