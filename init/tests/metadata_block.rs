//! PID1's block of the metadata service (169.254.169.254), checked in network namespaces
//! of the test's own with iproute2 as the independent reader:
//!
//! ```text
//!   pod ns                    node ns                                sink ns
//!   veth-p 10.250.0.2 ─────── veth-n 10.250.0.1   (forwarding on)
//!   default via 10.250.0.1    veth-u 10.251.0.1 ──────────────────── veth-s 10.251.0.2
//!                             default via 10.251.0.2                 (no forwarding)
//! ```
//!
//! The node namespace's default route leads into the sink namespace, which forwards
//! nothing: without the block a packet to 169.254.169.254 would be dropped there, and
//! nothing ever leaves the three namespaces.
//!
//! Needs root and iproute2; ignored without them (outside CI) under the cfg the DHCP
//! namespace test uses (see `build.rs`).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use basalt_init::net::metadata_block::{block, METADATA_ADDR};

fn output(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .expect("spawn command")
}

fn run(cmd: &[&str]) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace deleted on drop, with whatever veth end it holds.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let _ = output(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = output(&["ip", "netns", "del", &self.0]);
    }
}

/// Runs `f` on a thread moved into `netns` with setns(2).
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    thread::spawn(move || {
        let ns = File::open(&path).expect("open netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

fn require_prerequisites() {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        .unwrap_or(false);
    let ip = Command::new("ip").arg("-V").output().is_ok();
    assert!(
        root && ip,
        "this test needs root and iproute2 (root {root}, ip {ip}): run scripts/install-host-tools as root"
    );
}

#[test]
#[cfg_attr(
    basalt_skip_netns,
    ignore = "needs root and iproute2: scripts/install-host-tools as root"
)]
fn the_metadata_address_is_refused_to_host_and_forwarded_traffic() {
    require_prerequisites();
    let pid = std::process::id();
    let node = Netns::new(format!("bm-node-{pid}"));
    let pod = Netns::new(format!("bm-pod-{pid}"));
    let sink = Netns::new(format!("bm-sink-{pid}"));
    let (n, p, s) = (node.0.as_str(), pod.0.as_str(), sink.0.as_str());
    let veth = |a: &str, b: &str, peer_ns: &str| {
        let cmd = format!("ip -n {n} link add {a} type veth peer name {b} netns {peer_ns}");
        run(&cmd.split(' ').collect::<Vec<_>>());
    };
    veth("veth-n", "veth-p", p);
    veth("veth-u", "veth-s", s);
    for (ns, cmd) in [
        (n, "addr add 10.250.0.1/24 dev veth-n"),
        (n, "link set veth-n up"),
        (n, "addr add 10.251.0.1/24 dev veth-u"),
        (n, "link set veth-u up"),
        (s, "addr add 10.251.0.2/24 dev veth-s"),
        (s, "link set veth-s up"),
        (n, "route add default via 10.251.0.2 dev veth-u"),
        (p, "addr add 10.250.0.2/24 dev veth-p"),
        (p, "link set veth-p up"),
        (p, "route add default via 10.250.0.1"),
    ] {
        let mut argv = vec!["ip", "-n", ns];
        argv.extend(cmd.split(' '));
        run(&argv);
    }
    let forward = ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"];
    run(&[&["ip", "netns", "exec", n][..], &forward].concat());
    let target = METADATA_ADDR.to_string();

    // Before: the address is routed like any other, towards the sink.
    let before = run(&["ip", "-n", n, "route", "get", &target]);
    assert!(before.contains("via 10.251.0.2 dev veth-u"), "{before}");

    // Twice: the second replaces the first.
    in_netns(n, || block().and_then(|()| block())).expect("block");

    let routes = run(&["ip", "-n", n, "-4", "route", "show", "table", "main"]);
    let lines: Vec<&str> = routes
        .lines()
        .filter(|l| l.contains(&target))
        .map(str::trim)
        .collect();
    assert_eq!(
        lines,
        [format!("prohibit {target} proto static")],
        "{routes}"
    );
    let get = output(&["ip", "-n", n, "route", "get", &target]);
    assert!(
        !get.status.success(),
        "route get after the block: {}",
        String::from_utf8_lossy(&get.stdout)
    );
    // Other link-local addresses are not caught by the /32.
    let other = run(&["ip", "-n", n, "route", "get", "169.254.169.253"]);
    assert!(other.contains("dev veth-u"), "{other}");

    // The node's own processes: refused by the kernel on the spot.
    let addr = SocketAddr::from((METADATA_ADDR, 80));
    let (tcp, udp) = in_netns(n, move || {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop);
        let udp = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"x", addr).map(drop));
        (tcp, udp)
    });
    for (what, r) in [("tcp connect", tcp), ("udp send", udp)] {
        let err = r.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{what}: {err}");
    }

    // A pod's traffic, forwarded by the node: answered with ICMP "administratively
    // prohibited" at once, not left to time out.
    let (pod_result, took) = in_netns(p, move || {
        let start = Instant::now();
        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map(drop);
        (r, start.elapsed())
    });
    let err: io::Error = pod_result.expect_err("pod reached the metadata address");
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "pod: {err}");
    assert!(
        took < Duration::from_secs(4),
        "pod refused only after {took:?}"
    );
}
