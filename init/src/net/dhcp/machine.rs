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
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
    const SECS: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn blank_request_is_the_header_dhcproto_would_build() {
        use dhcproto::Encodable;
        let ours = blank_request(0x1234_5678, ADDR, &MAC);
        let theirs = Message::new_with_id(
            0x1234_5678,
            ADDR,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        assert_eq!(ours.to_vec().unwrap(), theirs.to_vec().unwrap());
        assert_eq!(ours.xid(), 0x1234_5678);
        assert_eq!(ours.chaddr()[..6], MAC);
        assert_eq!(ours.opcode(), Opcode::BootRequest);
    }

    fn machine(t0: Instant) -> Machine {
        Machine::new(MAC, None, Backoff::default(), Rng::new(42), t0)
    }

    fn sent(actions: &[Action]) -> Vec<(&Message, Destination)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m, d) => Some((m, *d)),
                _ => None,
            })
            .collect()
    }

    fn events(actions: &[Action]) -> Vec<Event> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    /// The server's reply to `req`, with lease 100 s, T1 40 s, T2 70 s.
    fn reply(req: &Message, kind: MessageType) -> Message {
        let mut msg = Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            ADDR,
            SERVER,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        msg.set_opcode(Opcode::BootReply);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(SERVER));
        opts.insert(DhcpOption::AddressLeaseTime(100));
        opts.insert(DhcpOption::Renewal(40));
        opts.insert(DhcpOption::Rebinding(70));
        opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        opts.insert(DhcpOption::Router(vec![SERVER]));
        msg
    }

    /// Drives a machine from INIT to BOUND at `t0`.
    fn bound(t0: Instant) -> Machine {
        let mut m = machine(t0);
        let out = m.on_timeout(t0);
        let discover = sent(&out)[0].0.clone();
        let out = m.on_packet(t0, &reply(&discover, MessageType::Offer));
        let request = sent(&out)[0].0.clone();
        let out = m.on_packet(t0, &reply(&request, MessageType::Ack));
        assert_eq!(m.state(), State::Bound);
        assert!(matches!(events(&out)[..], [Event::Bound(_)]));
        m
    }

    fn last_sent(m: &mut Machine, at: Instant) -> (Message, Destination, Vec<Action>) {
        let out = m.on_timeout(at);
        let (msg, to) = sent(&out)
            .last()
            .map(|(m, d)| ((*m).clone(), *d))
            .expect("a packet");
        (msg, to, out)
    }

    #[test]
    fn init_selecting_requesting_bound() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let out = m.on_timeout(t0);
        assert_eq!(m.state(), State::Selecting);
        let (discover, to) = sent(&out)[0];
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(discover.opts().msg_type(), Some(MessageType::Discover));
        assert!(discover.flags().broadcast());

        let out = m.on_packet(t0, &reply(discover, MessageType::Offer));
        assert_eq!(m.state(), State::Requesting);
        let (request, to) = sent(&out)[0];
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(
            request.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(ADDR))
        );
        assert_eq!(
            request.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );

        let out = m.on_packet(t0, &reply(request, MessageType::Ack));
        let lease = m.lease().cloned().expect("bound");
        assert_eq!(out[0], Action::Configure(lease.clone()));
        assert_eq!(events(&out), vec![Event::Bound(lease.clone())]);
        assert_eq!((lease.addr, lease.prefix_len), (ADDR, 24));
        assert_eq!(lease.router, Some(SERVER));
        assert_eq!(m.deadline(), t0 + SECS(40));
    }

    #[test]
    fn renews_at_t1_by_unicast() {
        let t0 = Instant::now();
        let mut m = bound(t0);
        assert!(m.on_timeout(t0 + SECS(39)).is_empty());
        let (req, to, _) = last_sent(&mut m, t0 + SECS(40));
        assert_eq!(m.state(), State::Renewing);
        assert_eq!(to, Destination::Server(SERVER));
        assert_eq!(req.ciaddr(), ADDR);
        assert!(req.opts().get(OptionCode::ServerIdentifier).is_none());

        let out = m.on_packet(t0 + SECS(41), &reply(&req, MessageType::Ack));
        assert!(matches!(events(&out)[..], [Event::Renewed(_)]));
        assert!(!out.iter().any(|a| matches!(a, Action::Configure(_))));
        assert_eq!(m.state(), State::Bound);
        // The new lease counts from the REQUEST, at 40 s.
        assert_eq!(m.deadline(), t0 + SECS(80));
    }

    #[test]
    fn rebinds_at_t2_by_broadcast_and_rebinds() {
        let t0 = Instant::now();
        let mut m = bound(t0);
        let (_, _, _) = last_sent(&mut m, t0 + SECS(40));
        // Renewal retries never overshoot T2.
        assert_eq!(m.deadline(), t0 + SECS(70));
        let (req, to, _) = last_sent(&mut m, t0 + SECS(70));
        assert_eq!(m.state(), State::Rebinding);
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(req.ciaddr(), ADDR);
        assert_eq!(m.deadline(), t0 + SECS(100));
        let out = m.on_packet(t0 + SECS(71), &reply(&req, MessageType::Ack));
        assert!(matches!(events(&out)[..], [Event::Rebound(_)]));
        assert_eq!(m.deadline(), t0 + SECS(110));
    }

    #[test]
    fn expiry_removes_the_address_and_starts_over() {
        let t0 = Instant::now();
        let mut m = bound(t0);
        let lease = m.lease().cloned().expect("bound");
        last_sent(&mut m, t0 + SECS(40));
        last_sent(&mut m, t0 + SECS(70));
        let (discover, _, out) = last_sent(&mut m, t0 + SECS(100));
        assert_eq!(out[0], Action::Deconfigure(lease));
        assert_eq!(events(&out), vec![Event::Expired { addr: ADDR }]);
        assert_eq!(m.state(), State::Selecting);
        assert!(m.lease().is_none());
        assert_eq!(discover.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(
            discover.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(ADDR))
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        m.on_timeout(t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..9 {
            now = m.deadline();
            for e in events(&m.on_timeout(now)) {
                if let Event::Retrying { after } = e {
                    delays.push(after);
                }
            }
        }
        let bases = [2, 4, 8, 16, 32, 60, 60, 60, 60];
        assert_eq!(delays.len(), bases.len());
        for (d, base) in delays.iter().zip(bases) {
            assert!(
                *d <= SECS(base) && *d > SECS(base).mul_f64(0.9),
                "{d:?} not within 10% under {base}s"
            );
        }
        assert!(delays.windows(2).any(|w| w[0] != w[1]), "jitter varies");
        assert_eq!(m.deadline(), now + delays[8]);
    }

    #[test]
    fn backoff_is_reproducible_from_the_seed() {
        let b = Backoff::default();
        let seq = |seed| -> Vec<Duration> {
            let mut rng = Rng::new(seed);
            (0..8).map(|i| b.delay(i, &mut rng)).collect()
        };
        assert_eq!(seq(1), seq(1));
        assert_ne!(seq(1), seq(2));
    }

    #[test]
    fn nak_while_requesting_goes_back_to_init() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let out = m.on_timeout(t0);
        let discover = sent(&out)[0].0.clone();
        let out = m.on_packet(t0, &reply(&discover, MessageType::Offer));
        let request = sent(&out)[0].0.clone();
        let out = m.on_packet(t0, &reply(&request, MessageType::Nak));
        assert_eq!(m.state(), State::Init);
        assert!(matches!(
            events(&out)[..],
            [Event::Nak, Event::Retrying { .. }]
        ));
        let at = m.deadline();
        let (again, _, _) = last_sent(&mut m, at);
        assert_eq!(again.opts().msg_type(), Some(MessageType::Discover));
    }

    #[test]
    fn nak_while_renewing_drops_the_address() {
        let t0 = Instant::now();
        let mut m = bound(t0);
        let lease = m.lease().cloned().expect("bound");
        let (req, _, _) = last_sent(&mut m, t0 + SECS(40));
        let out = m.on_packet(t0 + SECS(41), &reply(&req, MessageType::Nak));
        assert_eq!(out[0], Action::Deconfigure(lease));
        assert_eq!(m.state(), State::Init);
        assert!(m.lease().is_none());
    }

    #[test]
    fn requesting_gives_up_after_max_requests() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let out = m.on_timeout(t0);
        let discover = sent(&out)[0].0.clone();
        m.on_packet(t0, &reply(&discover, MessageType::Offer));
        let mut kinds = Vec::new();
        for _ in 0..MAX_REQUESTS {
            let at = m.deadline();
            let (msg, _, _) = last_sent(&mut m, at);
            kinds.push(msg.opts().msg_type());
        }
        let requests = usize::try_from(MAX_REQUESTS - 1).expect("small");
        assert!(kinds[..requests]
            .iter()
            .all(|k| *k == Some(MessageType::Request)));
        assert_eq!(kinds[requests], Some(MessageType::Discover));
        assert_eq!(m.state(), State::Selecting);
    }

    #[test]
    fn foreign_replies_are_ignored() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let out = m.on_timeout(t0);
        let discover = sent(&out)[0].0.clone();
        let mut other_xid = reply(&discover, MessageType::Offer);
        other_xid.set_xid(discover.xid().wrapping_add(1));
        assert!(m.on_packet(t0, &other_xid).is_empty());
        let mut other_mac = reply(&discover, MessageType::Offer);
        other_mac.set_chaddr(&[2, 0, 0, 0, 0, 8]);
        assert!(m.on_packet(t0, &other_mac).is_empty());
        let mut not_reply = reply(&discover, MessageType::Offer);
        not_reply.set_opcode(Opcode::BootRequest);
        assert!(m.on_packet(t0, &not_reply).is_empty());
        assert_eq!(m.state(), State::Selecting);
    }
}
