//! SNTP client (RFC 4330): one request, one reply, the clock offset and the round-trip
//! delay; [`sync`] tries servers in turn and steps CLOCK_REALTIME to the first good answer
//! that the [`StepPolicy`] allows.
//!
//! Stepping rather than slewing is deliberate: it runs once at boot, before K3s and its
//! certificates care about the time, and a freshly booted VM can be off by far more than
//! a slew would fix in reasonable time.
//!
//! # What one answer may do
//!
//! SNTP is unauthenticated: whoever controls the server list (DHCP, DNS) or the path can
//! answer. Moving the clock back would make expired client certificates valid again at
//! the node API; moving it forward would expire the node's own. So an answer is used only
//! when:
//!
//! - it is a well-formed, synchronised server reply ([`validate`]): mode 4, version 1–4,
//!   stratum 1–15, leap indicator not 3, non-zero receive and transmit timestamps, the
//!   transmit not before the receive, a round trip of at most [`MAX_DELAY`] and a root
//!   distance (RFC 5905) of at most [`MAX_ROOT_DISTANCE`];
//! - the clock it asks for is not before the image's time floor
//!   ([`basalt_api::time_floor`]), which no genuine answer can be;
//! - it moves the clock by at most [`MAX_STEP`] (ntpd's "panic threshold", 1000 s). The
//!   hypervisor starts the VM's clock from the host's, which is itself synchronised, so
//!   a genuine offset is seconds; an attacker gains at most this much. Requiring two
//!   servers to agree instead would not help against the usual attacker, who supplies
//!   the whole server list by DHCP, and the node's config often names one server.
//!   The one exception: when our own clock is below the floor it is known to be wrong
//!   (a dead RTC), a bound around it means nothing, and any answer at or above the floor
//!   is taken.
//!
//! An answer refused by these rules is reported and the next server is asked.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

/// The NTP port.
pub const PORT: u16 = 123;
/// Addresses tried per server name; more would only stretch the overall bound.
const MAX_ADDRS_PER_NAME: usize = 4;
const PACKET_LEN: usize = 48;
/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_UNIX_OFFSET: i128 = 2_208_988_800;
const NANOS: i128 = 1_000_000_000;
/// The largest step taken: ntpd's panic threshold.
pub const MAX_STEP: Duration = Duration::from_secs(1000);
/// The longest round trip believed: past it, the half round trip that bounds the
/// offset's error is too large to step by, and the answer has likely been held back.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// RFC 5905's MAXDIST: a server whose root distance (half its root delay plus its root
/// dispersion, plus half our round trip) exceeds this is not a usable time source.
pub const MAX_ROOT_DISTANCE: Duration = Duration::from_millis(1500);

/// What a valid answer may do to the clock: see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPolicy {
    /// Unix seconds the clock is never set below: the image's time floor.
    pub floor_secs: u64,
    /// The largest step, when our clock is at or above the floor.
    pub max_step: Duration,
}

impl StepPolicy {
    /// [`MAX_STEP`] above the floor in `os_release` (the root's `/etc/os-release`), or
    /// above [`basalt_api::time_floor::SOURCE_FLOOR`] when it has none: never less.
    pub fn from_os_release(os_release: Option<&str>) -> Self {
        let written = os_release.and_then(basalt_api::time_floor::from_os_release);
        Self {
            floor_secs: written
                .unwrap_or(0)
                .max(basalt_api::time_floor::SOURCE_FLOOR),
            max_step: MAX_STEP,
        }
    }
}

/// How far the server's clock is ahead of ours (negative: behind), in nanoseconds.
/// Adding it to the local clock gives the server's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClockOffset(i64);

impl ClockOffset {
    pub fn from_nanos(nanos: i64) -> Self {
        Self(nanos)
    }
    pub fn as_nanos(self) -> i64 {
        self.0
    }
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }
}

impl fmt::Display for ClockOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:+.6}s", self.as_secs_f64())
    }
}

/// One validated answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub offset: ClockOffset,
    pub delay: Duration,
    pub stratum: u8,
}

/// The server that answered, as given and as reached, and what was learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub server: String,
    pub addr: SocketAddr,
    pub offset: ClockOffset,
    pub delay: Duration,
    /// True when CLOCK_REALTIME was stepped by `offset`.
    pub clock_set: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SntpError {
    #[error("NTP server {server}: open a socket")]
    Socket {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("NTP server {server}: exchange")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("NTP server {server}: no answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("NTP server {server}: {why}")]
    Bogus {
        server: SocketAddr,
        why: &'static str,
    },
    #[error(
        "NTP server {server}: offset {offset} would set the clock before the image's time \
         floor ({floor_secs} s after 1970); not used"
    )]
    BelowFloor {
        server: SocketAddr,
        offset: ClockOffset,
        floor_secs: u64,
    },
    #[error(
        "NTP server {server}: offset {offset} is larger than the {max:?} a step may be; not used"
    )]
    StepTooLarge {
        server: SocketAddr,
        offset: ClockOffset,
        max: Duration,
    },
    #[error("NTP server {server}: kiss-o'-death {code:?}")]
    Kiss { server: SocketAddr, code: String },
    #[error("NTP server {name}: resolve")]
    Resolve {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("NTP server {name}: no address")]
    NoAddress { name: String },
    #[error("no NTP server given")]
    NoServers,
    #[error("no NTP server answered: {}", list(.0))]
    AllFailed(Vec<SntpError>),
    #[error("step CLOCK_REALTIME by {offset}")]
    SetClock {
        offset: ClockOffset,
        #[source]
        source: nix::errno::Errno,
    },
}

fn list(errors: &[SntpError]) -> String {
    errors
        .iter()
        .map(|e| crate::pid1::console::chain(e))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Asks `server` once, waiting at most `timeout` for a valid reply. Replies that do not
/// echo our transmit timestamp are stale or forged and ignored while waiting.
pub fn query(server: SocketAddr, timeout: Duration) -> Result<Sample, SntpError> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (IpAddr::from([0u8; 4]), 0).into(),
        SocketAddr::V6(_) => (IpAddr::from([0u16; 8]), 0).into(),
    };
    let io_err = |source| SntpError::Io { server, source };
    let socket = UdpSocket::bind(local).map_err(|source| SntpError::Socket { server, source })?;
    // Connected: the kernel drops datagrams from any other address.
    socket.connect(server).map_err(io_err)?;

    let t1_wall = unix_nanos(SystemTime::now());
    let t1_mono = Instant::now();
    let sent = to_ntp(t1_wall);
    let mut request = [0u8; PACKET_LEN];
    request[0] = 4 << 3 | 3; // LI 0, version 4, mode 3 (client)
    request[40..48].copy_from_slice(&sent.to_be_bytes());
    socket.send(&request).map_err(io_err)?;

    let mut saw_forgery = false;
    let mut buf = [0u8; 512];
    loop {
        let left = timeout.saturating_sub(t1_mono.elapsed());
        if left.is_zero() {
            return Err(match saw_forgery {
                true => SntpError::Bogus {
                    server,
                    why: "reply does not echo our transmit timestamp",
                },
                false => SntpError::Timeout { server, timeout },
            });
        }
        socket.set_read_timeout(Some(left)).map_err(io_err)?;
        let len = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        // Our clock at arrival, carried by the monotonic clock so a step in between
        // cannot distort it.
        let t4 = t1_wall + t1_mono.elapsed().as_nanos() as i128;
        let reply = &buf[..len];
        if len < PACKET_LEN {
            saw_forgery = true;
            continue;
        }
        if read_u64(reply, 24) != sent {
            saw_forgery = true;
            continue;
        }
        return validate(server, reply, t1_wall, t4);
    }
}

/// Checks a reply to our request (its origin already matched) and computes the sample.
/// `t1` and `t4` are our clock at sending and at arrival, in Unix nanoseconds.
pub fn validate(server: SocketAddr, reply: &[u8], t1: i128, t4: i128) -> Result<Sample, SntpError> {
    let bogus = |why| Err(SntpError::Bogus { server, why });
    if reply.len() < PACKET_LEN {
        return bogus("reply is shorter than an NTP header");
    }
    let (leap, version, mode) = (reply[0] >> 6, reply[0] >> 3 & 7, reply[0] & 7);
    let stratum = reply[1];
    if mode != 4 {
        return bogus("reply is not in server mode");
    }
    if !(1..=4).contains(&version) {
        return bogus("reply has an unknown NTP version");
    }
    if stratum == 0 {
        let code = String::from_utf8_lossy(&reply[12..16]).into_owned();
        return Err(SntpError::Kiss { server, code });
    }
    if stratum > 15 {
        return bogus("server is unsynchronized (stratum above 15)");
    }
    if leap == 3 {
        return bogus("server is unsynchronized (leap indicator 3)");
    }
    let (receive, transmit) = (read_u64(reply, 32), read_u64(reply, 40));
    if receive == 0 {
        return bogus("reply has no receive timestamp");
    }
    if transmit == 0 {
        return bogus("reply has no transmit timestamp");
    }
    let (t2, t3) = (from_ntp(receive), from_ntp(transmit));
    if t3 < t2 {
        return bogus("reply was transmitted before our request was received");
    }
    let (offset, delay) = offset_and_delay(t1, t2, t3, t4);
    if delay > MAX_DELAY {
        return bogus("round-trip delay is implausibly long");
    }
    // NTP short format, 16.16 seconds; the root delay is signed, a negative one bogus.
    let root_delay = read_u32(reply, 4);
    let root_dispersion = read_u32(reply, 8);
    if root_delay & 0x8000_0000 != 0 {
        return bogus("root delay is negative");
    }
    let distance =
        short_nanos(root_delay) / 2 + short_nanos(root_dispersion) + delay.as_nanos() / 2;
    if distance > MAX_ROOT_DISTANCE.as_nanos() {
        return bogus("root distance (root delay and dispersion) is implausibly large");
    }
    Ok(Sample {
        offset,
        delay,
        stratum,
    })
}

/// Whether `policy` lets `sample` move a clock that reads `now` (Unix nanoseconds).
pub fn check_step(
    server: SocketAddr,
    sample: &Sample,
    now: i128,
    policy: &StepPolicy,
) -> Result<(), SntpError> {
    let floor = i128::from(policy.floor_secs) * NANOS;
    let offset = sample.offset;
    if now + i128::from(offset.as_nanos()) < floor {
        return Err(SntpError::BelowFloor {
            server,
            offset,
            floor_secs: policy.floor_secs,
        });
    }
    let step = u128::from(offset.as_nanos().unsigned_abs());
    if now >= floor && step > policy.max_step.as_nanos() {
        return Err(SntpError::StepTooLarge {
            server,
            offset,
            max: policy.max_step,
        });
    }
    Ok(())
}

/// NTP short format (16.16 seconds) in nanoseconds.
fn short_nanos(v: u32) -> u128 {
    (u128::from(v) * NANOS as u128) >> 16
}

/// RFC 4330 §5: offset = ((T2 - T1) + (T3 - T4)) / 2, delay = (T4 - T1) - (T3 - T2), all
/// in Unix nanoseconds. A negative delay (server timestamps wider than our round trip) is
/// clock granularity, taken as zero.
fn offset_and_delay(t1: i128, t2: i128, t3: i128, t4: i128) -> (ClockOffset, Duration) {
    let offset = ((t2 - t1) + (t3 - t4)) / 2;
    let offset = i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX });
    let delay = u64::try_from((t4 - t1) - (t3 - t2)).unwrap_or(0);
    (ClockOffset(offset), Duration::from_nanos(delay))
}

fn read_u32(packet: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&packet[at..at + 4]);
    u32::from_be_bytes(b)
}

fn read_u64(packet: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&packet[at..at + 8]);
    u64::from_be_bytes(b)
}

fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// 32.32 fixed point since 1900, the seconds wrapping every 2^32 s (era).
fn to_ntp(unix_nanos: i128) -> u64 {
    let total = unix_nanos + NTP_UNIX_OFFSET * NANOS;
    let secs = total.div_euclid(NANOS) as u64 & 0xffff_ffff;
    let frac = ((total.rem_euclid(NANOS) << 32) / NANOS) as u64;
    secs << 32 | frac
}

/// RFC 4330 §3: seconds with the top bit set are 1968–2036 (era 0), without it
/// 2036–2104 (era 1). This does not depend on our own clock, which may be anywhere.
fn from_ntp(ts: u64) -> i128 {
    let mut secs = (ts >> 32) as i128;
    if secs & 0x8000_0000 == 0 {
        secs += 1 << 32;
    }
    let frac = (ts & 0xffff_ffff) as i128;
    (secs - NTP_UNIX_OFFSET) * NANOS + ((frac * NANOS) >> 32)
}

/// The addresses of one server entry: an IP (`192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`),
/// an IP and port, or a name with an optional port.
///
/// IP literals never reach the resolver. Names go through std's `ToSocketAddrs`, that is
/// glibc's getaddrinfo: in this static binary glibc still loads its NSS modules
/// (`libnss_dns`, `libnss_files`) at run time and needs them in the root, of the same
/// glibc version; without them a name fails to resolve here and only IPs work. Its time
/// is bounded by resolv.conf's `timeout`/`attempts`, not by this module.
fn resolve(server: &str) -> Result<Vec<SocketAddr>, SntpError> {
    if let Ok(addr) = server.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let bare = server.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, PORT)]);
    }
    let (host, port) = match server.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse::<u16>() {
            Ok(port) => (h, port),
            Err(_) => (server, PORT),
        },
        _ => (server, PORT),
    };
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|source| SntpError::Resolve {
            name: server.to_owned(),
            source,
        })?
        .take(MAX_ADDRS_PER_NAME)
        .collect();
    if addrs.is_empty() {
        return Err(SntpError::NoAddress {
            name: server.to_owned(),
        });
    }
    Ok(addrs)
}

/// Asks each server in turn (each of its addresses, up to four) until one gives an answer
/// that `policy` allows, and steps the clock by its offset when `set_clock`. All queries
/// together take at most `per_server_timeout` × the number of servers, name resolution
/// aside.
pub fn sync(
    servers: &[String],
    per_server_timeout: Duration,
    policy: StepPolicy,
    set_clock: bool,
) -> Result<Synced, SntpError> {
    if servers.is_empty() {
        return Err(SntpError::NoServers);
    }
    let budget =
        per_server_timeout.saturating_mul(u32::try_from(servers.len()).unwrap_or(u32::MAX));
    let start = Instant::now();
    let mut errors = Vec::new();
    for server in servers {
        let addrs = match resolve(server) {
            Ok(a) => a,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for addr in addrs {
            let timeout = per_server_timeout.min(budget.saturating_sub(start.elapsed()));
            if timeout.is_zero() {
                return Err(SntpError::AllFailed(errors));
            }
            let allowed = query(addr, timeout).and_then(|sample| {
                let now = unix_nanos(SystemTime::now());
                check_step(addr, &sample, now, &policy).map(|()| sample)
            });
            match allowed {
                Ok(sample) => {
                    if set_clock {
                        step_clock(sample.offset)?;
                    }
                    return Ok(Synced {
                        server: server.clone(),
                        addr,
                        offset: sample.offset,
                        delay: sample.delay,
                        clock_set: set_clock,
                    });
                }
                Err(e) => errors.push(e),
            }
        }
    }
    Err(SntpError::AllFailed(errors))
}

/// Steps CLOCK_REALTIME by `offset`, read and written back-to-back.
fn step_clock(offset: ClockOffset) -> Result<(), SntpError> {
    use nix::time::{clock_gettime, clock_settime, ClockId};
    let fail = |source| SntpError::SetClock { offset, source };
    let now = clock_gettime(ClockId::CLOCK_REALTIME).map_err(fail)?;
    let target = now.tv_sec() as i128 * NANOS + now.tv_nsec() as i128 + offset.as_nanos() as i128;
    let spec =
        nix::sys::time::TimeSpec::new(target.div_euclid(NANOS) as _, target.rem_euclid(NANOS) as _);
    clock_settime(ClockId::CLOCK_REALTIME, spec).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// How the double answers each request.
    #[derive(Clone, Copy)]
    enum Answer {
        /// A good reply from a clock `offset` nanoseconds ahead of ours.
        Offset(i64),
        /// A reply whose origin timestamp is not our transmit timestamp.
        WrongOrigin,
        /// A forged reply first, then a good one with this offset.
        ForgedThen(i64),
        /// Stratum 0 with this kiss code.
        Kiss(&'static [u8; 4]),
        LeapAlarm,
        ClientMode,
        ZeroTransmit,
        ZeroReceive,
        /// A root dispersion of 3 s: a server that does not know the time.
        Dispersed,
        Silent,
    }

    /// Test double of an NTP server: a UDP socket on 127.0.0.1 answering every request
    /// as `answer` says.
    struct SntpServerDouble {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl SntpServerDouble {
        fn start(answer: Answer) -> Self {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_millis(10)))
                .expect("timeout");
            let addr = socket.local_addr().expect("addr");
            let stop = Arc::new(AtomicBool::new(false));
            let s = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !s.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if n < PACKET_LEN {
                        continue;
                    }
                    for reply in replies(answer, read_u64(&buf, 40)) {
                        let _ = socket.send_to(&reply, from);
                    }
                }
            });
            Self {
                addr,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for SntpServerDouble {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn replies(answer: Answer, origin: u64) -> Vec<[u8; PACKET_LEN]> {
        let now = unix_nanos(SystemTime::now());
        let packet = |first: u8, stratum: u8, refid: &[u8; 4], offset: i64, origin: u64| {
            let mut p = [0u8; PACKET_LEN];
            p[0] = first;
            p[1] = stratum;
            p[12..16].copy_from_slice(refid);
            let t = to_ntp(now + offset as i128);
            p[24..32].copy_from_slice(&origin.to_be_bytes());
            p[32..40].copy_from_slice(&t.to_be_bytes());
            p[40..48].copy_from_slice(&t.to_be_bytes());
            p
        };
        let server = 4 << 3 | 4;
        match answer {
            Answer::Offset(o) => vec![packet(server, 2, b"GPS\0", o, origin)],
            Answer::WrongOrigin => vec![packet(server, 2, b"GPS\0", 0, origin ^ 1)],
            Answer::ForgedThen(o) => vec![
                packet(server, 2, b"GPS\0", 0, origin.wrapping_add(7)),
                packet(server, 2, b"GPS\0", o, origin),
            ],
            Answer::Kiss(code) => vec![packet(server, 0, code, 0, origin)],
            Answer::LeapAlarm => vec![packet(3 << 6 | server, 2, b"GPS\0", 0, origin)],
            Answer::ClientMode => vec![packet(4 << 3 | 3, 2, b"GPS\0", 0, origin)],
            Answer::ZeroTransmit => {
                let mut p = packet(server, 2, b"GPS\0", 0, origin);
                p[40..48].fill(0);
                vec![p]
            }
            Answer::ZeroReceive => {
                let mut p = packet(server, 2, b"GPS\0", 0, origin);
                p[32..40].fill(0);
                vec![p]
            }
            Answer::Dispersed => {
                let mut p = packet(server, 2, b"GPS\0", 0, origin);
                p[8..12].copy_from_slice(&(3u32 << 16).to_be_bytes());
                vec![p]
            }
            Answer::Silent => vec![],
        }
    }

    /// No floor to speak of, the usual bound.
    const OPEN: StepPolicy = StepPolicy {
        floor_secs: 0,
        max_step: MAX_STEP,
    };

    // Wide enough for a loaded CI machine, far below the offsets tested (seconds).
    const TOLERANCE_NS: i64 = 500_000_000;

    fn assert_near(offset: ClockOffset, want_ns: i64) {
        assert!(
            (offset.as_nanos() - want_ns).abs() < TOLERANCE_NS,
            "offset {offset}, want {:+.3}s",
            want_ns as f64 / 1e9
        );
    }

    #[test]
    fn offset_of_a_clock_ahead_and_of_one_behind() {
        for want in [3_500_000_000i64, -250_000_000_000] {
            let double = SntpServerDouble::start(Answer::Offset(want));
            let sample = query(double.addr, Duration::from_secs(2)).expect("query");
            // SNTP's offset is exact up to half the round trip; a loaded machine
            // stretches the round trip, not the bound.
            let bound = i64::try_from(sample.delay.as_nanos() / 2).unwrap_or(i64::MAX);
            assert!(
                (sample.offset.as_nanos() - want).abs() <= bound + 5_000_000,
                "{sample:?}, want {want} ns"
            );
            assert_eq!(sample.stratum, 2);
        }
    }

    #[test]
    fn bad_replies_are_rejected() {
        type Check = fn(&SntpError) -> bool;
        let cases: &[(Answer, Check)] = &[
            (
                Answer::WrongOrigin,
                |e| matches!(e, SntpError::Bogus { why, .. } if why.contains("echo")),
            ),
            (
                Answer::Kiss(b"RATE"),
                |e| matches!(e, SntpError::Kiss { code, .. } if code == "RATE"),
            ),
            (
                Answer::LeapAlarm,
                |e| matches!(e, SntpError::Bogus { why, .. } if why.contains("leap")),
            ),
            (
                Answer::ClientMode,
                |e| matches!(e, SntpError::Bogus { why, .. } if why.contains("mode")),
            ),
            (
                Answer::ZeroTransmit,
                |e| matches!(e, SntpError::Bogus { why, .. } if why.contains("transmit")),
            ),
            (
                Answer::ZeroReceive,
                |e| matches!(e, SntpError::Bogus { why, .. } if why.contains("receive")),
            ),
            (
                Answer::Dispersed,
                |e| matches!(e, SntpError::Bogus { why, .. } if why.contains("root distance")),
            ),
        ];
        for (i, (answer, expected)) in cases.iter().enumerate() {
            let double = SntpServerDouble::start(*answer);
            let err = query(double.addr, Duration::from_millis(300)).expect_err("accepted");
            assert!(expected(&err), "case {i}: {err:?}");
            assert!(
                err.to_string().contains(&double.addr.to_string()),
                "case {i}: {err}"
            );
        }
    }

    #[test]
    fn a_forged_reply_is_ignored_while_the_real_one_is_awaited() {
        let double = SntpServerDouble::start(Answer::ForgedThen(-7_000_000_000));
        let sample = query(double.addr, Duration::from_secs(2)).expect("query");
        assert_near(sample.offset, -7_000_000_000);
    }

    #[test]
    fn a_silent_server_times_out_naming_itself() {
        let double = SntpServerDouble::start(Answer::Silent);
        let start = Instant::now();
        let err = query(double.addr, Duration::from_millis(200)).expect_err("answered");
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(matches!(err, SntpError::Timeout { server, .. } if server == double.addr));
        assert!(err.to_string().contains(&double.addr.to_string()), "{err}");
    }

    #[test]
    fn sync_falls_over_to_the_next_server() {
        let silent = SntpServerDouble::start(Answer::Silent);
        let kiss = SntpServerDouble::start(Answer::Kiss(b"DENY"));
        let good = SntpServerDouble::start(Answer::Offset(42_000_000_000));
        let servers = [silent.addr, kiss.addr, good.addr].map(|a| a.to_string());
        let start = Instant::now();
        let synced = sync(&servers, Duration::from_millis(300), OPEN, false).expect("sync");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(
            (synced.server.as_str(), synced.addr),
            (servers[2].as_str(), good.addr)
        );
        assert!(!synced.clock_set);
        assert_near(synced.offset, 42_000_000_000);
    }

    #[test]
    fn sync_reports_every_server_when_none_answers() {
        let silent = SntpServerDouble::start(Answer::Silent);
        let kiss = SntpServerDouble::start(Answer::Kiss(b"RSTR"));
        let servers = vec![silent.addr.to_string(), kiss.addr.to_string()];
        let err = sync(&servers, Duration::from_millis(200), OPEN, false).expect_err("synced");
        let text = err.to_string();
        assert!(
            matches!(&err, SntpError::AllFailed(e) if e.len() == 2)
                && text.contains(&servers[0])
                && text.contains(&servers[1])
                && text.contains("RSTR"),
            "{text}"
        );
        assert!(matches!(
            sync(&[], Duration::from_millis(200), OPEN, false),
            Err(SntpError::NoServers)
        ));
    }

    #[test]
    fn sync_refuses_a_step_below_the_floor_or_beyond_the_bound_and_asks_the_next() {
        let now_secs = u64::try_from(unix_nanos(SystemTime::now()) / NANOS).expect("after 1970");
        // The floor is 100 s ago: a server 200 s behind would take the clock below it.
        let policy = StepPolicy {
            floor_secs: now_secs - 100,
            max_step: MAX_STEP,
        };
        let behind = SntpServerDouble::start(Answer::Offset(-200_000_000_000));
        let far = SntpServerDouble::start(Answer::Offset(5_000_000_000_000));
        let good = SntpServerDouble::start(Answer::Offset(-50_000_000_000));
        let servers = [behind.addr, far.addr, good.addr].map(|a| a.to_string());
        let synced = sync(&servers, Duration::from_millis(500), policy, false).expect("sync");
        assert_eq!(synced.addr, good.addr);
        assert_near(synced.offset, -50_000_000_000);

        let err = sync(&servers[..2], Duration::from_millis(500), policy, false)
            .expect_err("a refused answer was used");
        let SntpError::AllFailed(errors) = &err else {
            panic!("{err:?}")
        };
        assert!(
            matches!(errors[..], [
                SntpError::BelowFloor { server: a, floor_secs, .. },
                SntpError::StepTooLarge { server: b, .. },
            ] if a == behind.addr && b == far.addr && floor_secs == now_secs - 100),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("time floor") && text.contains("larger than"),
            "{text}"
        );
    }

    #[test]
    fn a_clock_below_the_floor_takes_any_answer_at_or_above_it() {
        let server: SocketAddr = "192.0.2.1:123".parse().expect("addr");
        let floor_secs = 1_800_000_000u64;
        let now = i128::from(floor_secs - 400_000_000) * NANOS; // a dead RTC, years behind
        let sample = |secs: i64| Sample {
            offset: ClockOffset::from_nanos(secs * NANOS as i64),
            delay: Duration::ZERO,
            stratum: 2,
        };
        let policy = StepPolicy {
            floor_secs,
            max_step: MAX_STEP,
        };
        assert!(check_step(server, &sample(400_000_000 + 3600), now, &policy).is_ok());
        assert!(matches!(
            check_step(server, &sample(400_000_000 - 1), now, &policy),
            Err(SntpError::BelowFloor { .. })
        ));
    }

    #[test]
    fn the_policy_floor_comes_from_os_release_and_never_below_the_source() {
        use basalt_api::time_floor::{os_release_line, SOURCE_FLOOR};
        let later = SOURCE_FLOOR + 86_400;
        let text = format!("NAME=basalt\n{}", os_release_line(later));
        assert_eq!(StepPolicy::from_os_release(Some(&text)).floor_secs, later);
        let earlier = os_release_line(SOURCE_FLOOR - 1);
        assert_eq!(
            StepPolicy::from_os_release(Some(&earlier)).floor_secs,
            SOURCE_FLOOR
        );
        assert_eq!(StepPolicy::from_os_release(None).floor_secs, SOURCE_FLOOR);
        assert_eq!(StepPolicy::from_os_release(None).max_step, MAX_STEP);
    }

    #[test]
    fn sync_resolves_a_name_with_a_port() {
        let good = SntpServerDouble::start(Answer::Offset(1_000_000_000));
        let name = format!("localhost:{}", good.addr.port());
        // localhost may come first as ::1, where nothing listens: the next address is tried.
        let synced = sync(
            std::slice::from_ref(&name),
            Duration::from_millis(500),
            OPEN,
            false,
        )
        .expect("sync");
        assert_eq!((synced.server, synced.addr), (name, good.addr));
    }

    #[test]
    fn server_entries_resolve_without_dns_when_they_are_ips() {
        let v4 = |s: &str| resolve(s).expect(s);
        assert_eq!(
            v4("192.0.2.1"),
            vec!["192.0.2.1:123".parse().expect("addr")]
        );
        assert_eq!(
            v4("192.0.2.1:1123"),
            vec!["192.0.2.1:1123".parse().expect("addr")]
        );
        assert_eq!(
            v4("2001:db8::1"),
            vec!["[2001:db8::1]:123".parse().expect("addr")]
        );
        assert_eq!(
            v4("[2001:db8::1]"),
            vec!["[2001:db8::1]:123".parse().expect("addr")]
        );
        assert_eq!(
            v4("[2001:db8::1]:9"),
            vec!["[2001:db8::1]:9".parse().expect("addr")]
        );
    }

    #[test]
    fn ntp_timestamps_convert_both_ways_across_eras() {
        // The Unix epoch is 2208988800 s after the NTP epoch.
        assert_eq!(to_ntp(0), 0x83AA_7E80_0000_0000);
        assert_eq!(from_ntp(0x83AA_7E80_0000_0000), 0);
        // Half a second is half of 2^32.
        assert_eq!(to_ntp(NANOS / 2) & 0xffff_ffff, 0x8000_0000);
        // Seconds 0 of era 1 is 2036-02-07T06:28:16Z.
        assert_eq!(from_ntp(0), 2_085_978_496 * NANOS);
        for unix in [
            0,
            1_700_000_000 * NANOS + 123_456_789,
            2_100_000_000 * NANOS,
        ] {
            assert!((from_ntp(to_ntp(unix)) - unix).abs() <= 1, "{unix}");
        }
    }

    #[test]
    fn offset_and_delay_follow_rfc_4330() {
        // Server 10 s ahead; 40 ms each way; 20 ms inside the server.
        let s = NANOS;
        let ms = NANOS / 1000;
        let (offset, delay) = offset_and_delay(
            100 * s,
            110 * s + 40 * ms,
            110 * s + 60 * ms,
            100 * s + 100 * ms,
        );
        assert_eq!(offset, ClockOffset::from_nanos(10 * NANOS as i64));
        assert_eq!(delay, Duration::from_millis(80));
        // Server timestamps wider than the round trip: delay clamps to zero.
        let (_, delay) = offset_and_delay(0, 0, 10 * ms, 5 * ms);
        assert_eq!(delay, Duration::ZERO);
        assert_eq!(
            ClockOffset::from_nanos(-1_500_000).to_string(),
            "-0.001500s"
        );
    }
}

/// Property tests of the validation: [`validate`] accepts a reply exactly when every rule
/// of the module documentation holds (checked against an oracle written from the rules,
/// in floating point), and [`check_step`] never lets the clock go below the floor or
/// further than the bound.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SERVER: SocketAddr =
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)), PORT);
    const MS: i128 = NANOS / 1000;

    #[derive(Debug, Clone)]
    struct Reply {
        leap: u8,
        version: u8,
        mode: u8,
        stratum: u8,
        root_delay: u32,
        root_dispersion: u32,
        zero_receive: bool,
        zero_transmit: bool,
        /// Our clock at sending, Unix ns.
        t1: i128,
        /// The server's clock minus ours, ns.
        offset: i128,
        /// Time on the way there, in the server, and back, ms.
        up_ms: i128,
        inside_ms: i128,
        down_ms: i128,
        /// The server stamps its transmit before its receive.
        reversed: bool,
    }

    impl Reply {
        fn times(&self) -> (i128, i128, i128, i128) {
            let t2 = self.t1 + self.offset + self.up_ms * MS;
            let t3 = match self.reversed {
                true => t2 - self.inside_ms * MS,
                false => t2 + self.inside_ms * MS,
            };
            let t4 = self.t1 + (self.up_ms + self.inside_ms + self.down_ms) * MS;
            (self.t1, t2, t3, t4)
        }

        fn packet(&self) -> [u8; PACKET_LEN] {
            let (_, t2, t3, _) = self.times();
            let mut p = [0u8; PACKET_LEN];
            p[0] = self.leap << 6 | self.version << 3 | self.mode;
            p[1] = self.stratum;
            p[4..8].copy_from_slice(&self.root_delay.to_be_bytes());
            p[8..12].copy_from_slice(&self.root_dispersion.to_be_bytes());
            p[12..16].copy_from_slice(b"RATE");
            if !self.zero_receive {
                p[32..40].copy_from_slice(&to_ntp(t2).to_be_bytes());
            }
            if !self.zero_transmit {
                p[40..48].copy_from_slice(&to_ntp(t3).to_be_bytes());
            }
            p
        }

        /// The rules, as written in the module documentation, in seconds as f64.
        fn acceptable(&self) -> bool {
            let delay_s = ((self.up_ms + self.down_ms) as f64 / 1000.0).max(0.0);
            let delay_s = match self.reversed {
                // The server's interval counts negative: the round trip grows by it.
                true => delay_s + 2.0 * self.inside_ms as f64 / 1000.0,
                false => delay_s,
            };
            let root_delay_s = self.root_delay as f64 / 65536.0;
            let distance =
                root_delay_s / 2.0 + self.root_dispersion as f64 / 65536.0 + delay_s / 2.0;
            self.mode == 4
                && (1..=4).contains(&self.version)
                && (1..=15).contains(&self.stratum)
                && self.leap != 3
                && !self.zero_receive
                && !self.zero_transmit
                && !(self.reversed && self.inside_ms > 0)
                && delay_s <= 1.0
                && self.root_delay < 0x8000_0000
                && distance <= 1.5
        }
    }

    fn reply() -> impl Strategy<Value = Reply> {
        (
            (
                0u8..4,
                0u8..8,
                prop_oneof![Just(4u8), 0u8..8],
                prop_oneof![1u8..16, any::<u8>()],
            ),
            (
                prop_oneof![0u32..0x1_8000, any::<u32>()],
                prop_oneof![0u32..0x1_8000, any::<u32>()],
            ),
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.05),
            // 2020 to 2035, both eras' edges well inside.
            (1_577_836_800i128 * NANOS..2_050_000_000 * NANOS),
            (-1_000_000i128 * NANOS..1_000_000 * NANOS),
            (0i128..800, 0i128..300, 0i128..800),
            prop::bool::weighted(0.1),
        )
            .prop_map(
                |(
                    (leap, version, mode, stratum),
                    (root_delay, root_dispersion),
                    zero_receive,
                    zero_transmit,
                    t1,
                    offset,
                    (up_ms, inside_ms, down_ms),
                    reversed,
                )| Reply {
                    leap,
                    version,
                    mode,
                    stratum,
                    root_delay,
                    root_dispersion,
                    zero_receive,
                    zero_transmit,
                    t1,
                    offset,
                    up_ms,
                    inside_ms,
                    down_ms,
                    reversed,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn a_reply_is_accepted_exactly_when_the_rules_hold(r in reply()) {
            let (t1, _, _, t4) = r.times();
            let result = validate(SERVER, &r.packet(), t1, t4);
            prop_assert_eq!(result.is_ok(), r.acceptable(), "{:?} -> {:?}", r, result);
            match result {
                Ok(sample) => {
                    // Symmetric paths are exact up to the NTP timestamps' resolution;
                    // otherwise the error is at most half the round trip.
                    let half = sample.delay.as_nanos() as i128 / 2;
                    let err = (i128::from(sample.offset.as_nanos()) - r.offset).abs();
                    prop_assert!(err <= half + 2, "{:?}: {:?}", r, sample);
                    prop_assert!(sample.delay <= MAX_DELAY);
                    prop_assert_eq!(sample.stratum, r.stratum);
                }
                Err(SntpError::Kiss { code, .. }) => {
                    prop_assert_eq!(r.stratum, 0);
                    prop_assert_eq!(code, "RATE");
                }
                Err(e) => prop_assert!(e.to_string().contains("192.0.2.1:123"), "{}", e),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_pass_unsynchronised(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
            t1 in any::<i64>(),
            rtt in 0i64..2_000_000_000,
        ) {
            let (t1, t4) = (i128::from(t1), i128::from(t1) + i128::from(rtt));
            if let Ok(sample) = validate(SERVER, &bytes, t1, t4) {
                prop_assert_eq!(bytes[0] & 7, 4);
                prop_assert!(bytes[0] >> 6 != 3);
                prop_assert!((1..=15).contains(&bytes[1]));
                prop_assert!(read_u64(&bytes, 32) != 0 && read_u64(&bytes, 40) != 0);
                prop_assert!(sample.delay <= MAX_DELAY);
            }
        }

        #[test]
        fn a_step_never_lands_below_the_floor_nor_goes_beyond_the_bound(
            now_s in 0i64..4_000_000_000,
            now_ns in 0i64..1_000_000_000,
            offset in prop_oneof![any::<i64>(), -2_000_000_000_000i64..2_000_000_000_000],
            floor_secs in 0u64..4_000_000_000,
            max_step_s in 0u64..5000,
        ) {
            let now = i128::from(now_s) * NANOS + i128::from(now_ns);
            let policy = StepPolicy { floor_secs, max_step: Duration::from_secs(max_step_s) };
            let sample = Sample { offset: ClockOffset::from_nanos(offset), delay: Duration::ZERO, stratum: 1 };
            let floor = i128::from(floor_secs) * NANOS;
            let target = now + i128::from(offset);
            let within = i128::from(offset).abs() <= i128::from(max_step_s) * NANOS;
            let result = check_step(SERVER, &sample, now, &policy);
            // Safety: never below the floor; never past the bound from a sane clock.
            if result.is_ok() {
                prop_assert!(target >= floor);
                prop_assert!(now < floor || within);
            }
            // And nothing else is refused.
            prop_assert_eq!(result.is_ok(), target >= floor && (now < floor || within));
        }
    }
}
