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

/// A server that grants a lease of 0 s: the address must not be removed and re-added in a
/// loop. Today's code expired it at the instant it was bound.
#[test]
fn a_lease_of_zero_does_not_flap_the_address() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let zero = |req: &Message, kind| {
        let mut msg = reply(req, kind);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::AddressLeaseTime(0));
        opts.remove(OptionCode::Renewal);
        opts.remove(OptionCode::Rebinding);
        msg
    };
    let out = m.on_timeout(t0);
    let discover = sent(&out)[0].0.clone();
    let out = m.on_packet(t0, &zero(&discover, MessageType::Offer));
    let request = sent(&out)[0].0.clone();
    let out = m.on_packet(t0, &zero(&request, MessageType::Ack));
    assert!(matches!(events(&out)[..], [Event::Bound(_)]));
    let mut all = Vec::new();
    // Drive the timer as the run loop would, for the first 19 s, answering nothing.
    let mut now = t0;
    while now < t0 + SECS(19) {
        all.extend(m.on_timeout(now));
        now = m.deadline().max(now + Duration::from_millis(100));
    }
    assert!(
        !all.iter().any(|a| matches!(
            a,
            Action::Deconfigure(_) | Action::Event(Event::Expired { .. })
        )),
        "address dropped within the floor: {all:?}"
    );
    assert_eq!(m.lease().map(|l| l.addr), Some(ADDR));
    // Renewal starts at T1, half the floor, by unicast to the server.
    assert_eq!(
        sent(&all).first().map(|(_, to)| *to),
        Some(Destination::Server(SERVER)),
        "{all:?}"
    );
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
