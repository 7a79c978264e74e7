//! The DHCP client against a real server: dnsmasq in one network namespace, the client
//! in another, a veth pair between them. Nothing leaves the two namespaces.
//!
//! Needs root and dnsmasq (Debian: `dnsmasq-base`, `iproute2`). Without them the test is
//! ignored, with that reason (see `build.rs`), except under CI, where it runs and fails.
//!
//! dnsmasq will not lease for less than two minutes, so the test shortens T1/T2 with
//! options 58/59 to see a renewal within seconds, and waits out one full lease to see
//! the address removed: about 2 min 15 s in all.

use basalt_init::net::dhcp::{Backoff, Client, Event, Options};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// dnsmasq's floor.
const LEASE_SECS: u64 = 120;
const T1_SECS: u64 = 4;
const T2_SECS: u64 = 8;
/// Slack for scheduling and the exchange itself.
const MARGIN: Duration = Duration::from_secs(5);

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .expect("spawn command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(200));
    }
    cond()
}

/// A network namespace deleted on drop, with whatever veth end it holds.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        // A leftover of a crashed run with the same pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// dnsmasq serving one veth end; killed on drop, its log printed if the test failed.
struct Dnsmasq {
    child: Option<Child>,
    log: PathBuf,
}

impl Dnsmasq {
    fn start(netns: &str, iface: &str, subnet: u8, dir: &Path) -> Self {
        let log = dir.join("dnsmasq.log");
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("dnsmasq log");
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "dnsmasq", "--no-daemon"])
            .arg("--conf-file=/dev/null")
            .arg("--port=0")
            .arg("--user=root")
            .arg("--log-dhcp")
            .arg("--log-facility=-")
            .arg(format!("--interface={iface}"))
            .arg("--bind-interfaces")
            .arg(format!(
                "--dhcp-range=10.77.{subnet}.50,10.77.{subnet}.60,255.255.255.0,{LEASE_SECS}"
            ))
            .arg(format!("--dhcp-option=58,{T1_SECS}"))
            .arg(format!("--dhcp-option=59,{T2_SECS}"))
            .arg(format!("--dhcp-option=6,10.77.{subnet}.1"))
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn dnsmasq");
        Self {
            child: Some(child),
            log,
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- dnsmasq log ---\n{log}--- end ---");
        }
    }
}

/// The client, run by a thread that moved into the client namespace with setns(2);
/// its events (and errors, as text) come out of a channel.
struct ClientThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    events: Receiver<Result<Event, String>>,
    seen: Vec<String>,
}

impl ClientThread {
    fn spawn(netns: &str, iface: &str) -> Self {
        let (tx, events) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, iface, flag) = (netns.to_owned(), iface.to_owned(), stop.clone());
        let handle = thread::spawn(move || {
            let ns = File::open(format!("/run/netns/{netns}")).expect("open netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let options = Options {
                backoff: Backoff {
                    initial: Duration::from_secs(1),
                    cap: Duration::from_secs(4),
                },
                seed: Some(1),
                ..Options::default()
            };
            let mut client = match Client::new(&iface, options) {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(format!("{e}: {:?}", std::error::Error::source(&e))));
                    return;
                }
            };
            while !flag.load(Ordering::Relaxed) {
                let step = client.next_event(Instant::now() + Duration::from_millis(200));
                let sent = match step {
                    Ok(Some(event)) => tx.send(Ok(event)),
                    Ok(None) => Ok(()),
                    Err(e) => tx.send(Err(format!("{e}: {:?}", std::error::Error::source(&e)))),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Self {
            stop,
            handle: Some(handle),
            events,
            seen: Vec::new(),
        }
    }

    /// The first event matching `want` within `timeout`; errors and other events are
    /// recorded for the failure message.
    fn expect(&mut self, timeout: Duration, want: impl Fn(&Event) -> bool) -> Event {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(Ok(event)) if want(&event) => return event,
                Ok(other) => self.seen.push(format!("{other:?}")),
                Err(_) => break,
            }
        }
        panic!("no such event within {timeout:?}; saw {:#?}", self.seen);
    }
}

impl Drop for ClientThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The test's host prerequisites, as a clear failure: build.rs ignores this test where
/// they are missing, except under CI.
fn require_prerequisites() {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        .unwrap_or(false);
    let dnsmasq = Command::new("dnsmasq").arg("--version").output().is_ok();
    assert!(
        root && dnsmasq,
        "this test needs root and dnsmasq (root {root}, dnsmasq {dnsmasq}): run scripts/install-host-tools as root"
    );
}

fn addresses(netns: &str, iface: &str) -> String {
    run(&["ip", "-n", netns, "-4", "-o", "addr", "show", "dev", iface])
}

/// Expiry (Unix seconds) of `addr`'s lease in dnsmasq's lease file.
fn lease_expiry(dir: &Path, addr: &str) -> Option<u64> {
    let leases = std::fs::read_to_string(dir.join("leases")).ok()?;
    leases.lines().find_map(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        (fields.get(2) == Some(&addr))
            .then(|| fields.first()?.parse().ok())
            .flatten()
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[test]
#[cfg_attr(
    basalt_skip_netns,
    ignore = "needs root, iproute2 and dnsmasq: scripts/install-host-tools as root"
)]
fn lease_renew_expire_regain_against_dnsmasq() {
    require_prerequisites();
    let pid = std::process::id();
    let subnet = u8::try_from(pid % 200 + 20).expect("below 256");
    let (server_if, client_if) = (
        format!("bds{}", pid % 100_000),
        format!("bdc{}", pid % 100_000),
    );
    let dir = tempfile::tempdir().expect("tempdir");

    let server_ns = Netns::new(format!("basalt-dhcp-{pid}"));
    let client_ns = Netns::new(format!("basalt-dhcpc-{pid}"));
    run(&[
        "ip",
        "-n",
        &server_ns.0,
        "link",
        "add",
        &server_if,
        "type",
        "veth",
        "peer",
        "name",
        &client_if,
        "netns",
        &client_ns.0,
    ]);
    let server_addr = format!("10.77.{subnet}.1/24");
    run(&[
        "ip",
        "-n",
        &server_ns.0,
        "addr",
        "add",
        &server_addr,
        "dev",
        &server_if,
    ]);
    run(&["ip", "-n", &server_ns.0, "link", "set", &server_if, "up"]);

    let mut dnsmasq = Dnsmasq::start(&server_ns.0, &server_if, subnet, dir.path());
    let mut client = ClientThread::spawn(&client_ns.0, &client_if);

    // Bound: address, prefix, router, DNS and the shortened timers as dnsmasq sent them.
    let bound = client.expect(Duration::from_secs(30), |e| matches!(e, Event::Bound(_)));
    let Event::Bound(lease) = bound else {
        unreachable!("matched above")
    };
    let bound_at = Instant::now();
    let addr = lease.addr.to_string();
    assert!(addr.starts_with(&format!("10.77.{subnet}.")), "{lease:?}");
    assert_eq!(lease.prefix_len, 24);
    assert_eq!(
        lease.router,
        Some(format!("10.77.{subnet}.1").parse().expect("ip"))
    );
    assert_eq!(lease.dns, vec![lease.router.expect("router")]);
    assert_eq!(lease.t1, Duration::from_secs(T1_SECS), "{lease:?}");
    assert_eq!(lease.lease_time, Duration::from_secs(LEASE_SECS));
    assert!(addresses(&client_ns.0, &client_if).contains(&format!("{addr}/24")));
    let routes = run(&["ip", "-n", &client_ns.0, "route", "show", "default"]);
    assert!(
        routes.contains(&format!("via 10.77.{subnet}.1")),
        "{routes}"
    );

    // Renewed at T1, and dnsmasq's record moved forward with it.
    let mut before = None;
    assert!(
        wait_until(MARGIN, || {
            before = lease_expiry(dir.path(), &addr);
            before.is_some()
        }),
        "dnsmasq has no lease for {addr}"
    );
    client.expect(
        Duration::from_secs(T1_SECS) + MARGIN,
        |e| matches!(e, Event::Renewed(l) if l.addr == lease.addr),
    );
    assert!(bound_at.elapsed() < Duration::from_secs(T1_SECS) + MARGIN);
    assert!(
        wait_until(MARGIN, || lease_expiry(dir.path(), &addr) > before),
        "dnsmasq's lease not extended"
    );
    assert!(lease_expiry(dir.path(), &addr) > Some(unix_now() + LEASE_SECS / 2));

    // Server gone: the address is removed once the lease runs out, not before.
    dnsmasq.stop();
    let renewed_at = Instant::now();
    client.expect(
        Duration::from_secs(LEASE_SECS) + MARGIN * 2,
        |e| matches!(e, Event::Expired { addr } if *addr == lease.addr),
    );
    assert!(renewed_at.elapsed() > Duration::from_secs(LEASE_SECS) - MARGIN);
    assert!(
        wait_until(MARGIN, || !addresses(&client_ns.0, &client_if)
            .contains(&addr)),
        "address still on {client_if} after expiry"
    );
    client.expect(Duration::from_secs(10), |e| {
        matches!(e, Event::Retrying { .. })
    });

    // Server back: the lease (the same address, from dnsmasq's lease file) is regained.
    let mut dnsmasq = Dnsmasq::start(&server_ns.0, &server_if, subnet, dir.path());
    let regained = client.expect(Duration::from_secs(30), |e| matches!(e, Event::Bound(_)));
    assert!(matches!(regained, Event::Bound(l) if l.addr == lease.addr));
    assert!(addresses(&client_ns.0, &client_if).contains(&addr));
    dnsmasq.stop();
}
