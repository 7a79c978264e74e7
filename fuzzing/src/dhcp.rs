//! The DHCP client: server replies (OFFER, ACK, NAK, anything) and timer expiries in
//! any order, through the client's state machine and its lease reader.

use basalt_init::net::dhcp::{Action, Backoff, Machine, Rng, State};
use dhcproto::v4::{Message, Opcode};
use dhcproto::Decodable;
use std::time::{Duration, Instant};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The input is a list of steps, each `op`, a 16-bit big-endian length, and that many
/// bytes. `op % 3`: 0 lets time pass (the bytes' first two as seconds) and fires the
/// timer if due; 1 is a packet from a server made to answer the client's current
/// exchange (xid, chaddr and BOOTREPLY set); 2 a packet as it is.
///
/// Properties, after every step: a client that is bound (or renewing, or rebinding)
/// holds a lease; an address it configures is a real one; and its next timer is in the
/// future once it has acted on an expiry, so that the event loop never spins.
pub fn client(data: &[u8]) {
    run(data);
}

/// [`client`], returning the client's state at the end (for the harness's own tests).
pub fn run(data: &[u8]) -> State {
    let mut now = Instant::now();
    let mut machine = Machine::new(MAC, None, Backoff::default(), Rng::new(7), now);
    let mut xid = sent_xid(&machine.on_timeout(now)).unwrap_or(0);
    let mut rest = data;
    while let [op, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        let actions = match op % 3 {
            0 => {
                let secs = bytes
                    .get(..2)
                    .map_or(1, |b| u16::from_be_bytes([b[0], b[1]]));
                now += Duration::from_secs(secs.into());
                if now < machine.deadline() {
                    continue;
                }
                let actions = machine.on_timeout(now);
                assert!(
                    machine.deadline() > now,
                    "after an expiry in {:?} the next timer is already due: the loop would spin",
                    machine.state()
                );
                actions
            }
            fix => {
                let Ok(mut msg) = Message::from_bytes(bytes) else {
                    continue;
                };
                if fix == 1 {
                    msg.set_opcode(Opcode::BootReply);
                    msg.set_xid(xid);
                    msg.set_chaddr(&MAC);
                }
                machine.on_packet(now, &msg)
            }
        };
        if let Some(x) = sent_xid(&actions) {
            xid = x;
        }
        for a in &actions {
            if let Action::Configure(lease) = a {
                assert!(!lease.addr.is_unspecified() && !lease.addr.is_broadcast());
            }
        }
        if matches!(
            machine.state(),
            State::Bound | State::Renewing | State::Rebinding
        ) {
            assert!(
                machine.lease().is_some(),
                "{:?} without a lease",
                machine.state()
            );
        }
    }
    machine.state()
}

fn sent_xid(actions: &[Action]) -> Option<u32> {
    actions.iter().rev().find_map(|a| match a {
        Action::Send(msg, _) => Some(msg.xid()),
        _ => None,
    })
}
