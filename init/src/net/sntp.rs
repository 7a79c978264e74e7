//! SNTP client (RFC 4330): one request, one reply, the clock offset and the round-trip
//! delay; [`sync`] tries servers in turn and steps CLOCK_REALTIME to the first good answer.
//!
//! Stepping rather than slewing is deliberate: it runs once at boot, before K3s and its
//! certificates care about the time, and a freshly booted VM can be off by far more than
//! a slew would fix in reasonable time.

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
fn validate(server: SocketAddr, reply: &[u8], t1: i128, t4: i128) -> Result<Sample, SntpError> {
    let bogus = |why| Err(SntpError::Bogus { server, why });
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
    if transmit == 0 {
        return bogus("reply has no transmit timestamp");
    }
    let (offset, delay) = offset_and_delay(t1, from_ntp(receive), from_ntp(transmit), t4);
    Ok(Sample {
        offset,
        delay,
        stratum,
    })
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

/// Asks each server in turn (each of its addresses, up to four) until one answers, and
/// steps the clock by its offset when `set_clock`. All queries together take at most
/// `per_server_timeout` × the number of servers, name resolution aside.
pub fn sync(
    servers: &[String],
    per_server_timeout: Duration,
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
            match query(addr, timeout) {
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
            Answer::Silent => vec![],
        }
    }

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
        let synced = sync(&servers, Duration::from_millis(300), false).expect("sync");
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
        let err = sync(&servers, Duration::from_millis(200), false).expect_err("synced");
        let text = err.to_string();
        assert!(
            matches!(&err, SntpError::AllFailed(e) if e.len() == 2)
                && text.contains(&servers[0])
                && text.contains(&servers[1])
                && text.contains("RSTR"),
            "{text}"
        );
        assert!(matches!(
            sync(&[], Duration::from_millis(200), false),
            Err(SntpError::NoServers)
        ));
    }

    #[test]
    fn sync_resolves_a_name_with_a_port() {
        let good = SntpServerDouble::start(Answer::Offset(1_000_000_000));
        let name = format!("localhost:{}", good.addr.port());
        // localhost may come first as ::1, where nothing listens: the next address is tried.
        let synced = sync(
            std::slice::from_ref(&name),
            Duration::from_millis(500),
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
