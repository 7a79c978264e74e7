//! PID1 as a node lives on it, under QEMU: the network from QEMU's user network (DHCP)
//! and from a static config, and a supervised test service that restarts with backoff
//! and leaves an orphan that PID1 must reap.

mod common;

use basalt_api::layout::fw_cfg;
use basalt_qemu::VmBuilder;
use common::{assert_no_errors, expect_line, image};
use std::path::Path;
use std::time::Duration;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);

/// QEMU's user network, closed to the outside (`restrict=on`: the guest reaches only
/// QEMU's own DHCP server), a virtio NIC, and virtio-rng for the kernel's CRNG.
fn user_network() -> Vec<String> {
    basalt_qemu::node_devices(true, &[])
}

fn fw_cfg_file(dir: &Path, name: &str, text: &str) -> anyhow::Result<Vec<String>> {
    let file = dir.join(name.replace('/', "_"));
    std::fs::write(&file, text)?;
    Ok(vec!["-fw_cfg".into(), fw_cfg::qemu_arg(name, &file)])
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn dhcp_on_qemus_user_network_brings_the_node_to_network_up() -> anyhow::Result<()> {
    let img = image();
    let mut vm = VmBuilder::new(&img.qcow2)
        .extra_args(user_network())
        .spawn()?;
    let line = expect_line(&mut vm, "dhcp: eth0 bound ", BOOT)?;
    // QEMU's DHCP server hands out 10.0.2.15 first.
    assert!(line.contains("10.0.2.15/24"), "{line}");
    expect_line(&mut vm, "[basalt] network-up t=", BOOT)?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    let serial = vm.serial();
    assert!(
        serial.contains("entropy: kernel CRNG ready"),
        "virtio-rng should have fed the CRNG:\n{serial}"
    );
    assert_no_errors(&vm);
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn static_addresses_and_routes_from_the_config_bring_the_network_up() -> anyhow::Result<()> {
    let img = image();
    let dir = tempfile::tempdir()?;
    let config = r#"version = 1
[node]
hostname = "static-1"
[network]
dhcp4 = false
addresses = ["10.0.2.20/24", "fd00:b::20/64"]
routes = [{ to = "0.0.0.0/0", via = "10.0.2.2" }, { to = "fd00:c::/64", via = "fd00:b::1" }]
dns = ["10.0.2.3"]
[api]
ca = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
cert = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
key = "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"
"#;
    let mut args = user_network();
    args.extend(fw_cfg_file(dir.path(), fw_cfg::CONFIG, config)?);
    let mut vm = VmBuilder::new(&img.qcow2).extra_args(args).spawn()?;
    expect_line(
        &mut vm,
        "network: eth0: 2 static address(es), 2 route(s)",
        BOOT,
    )?;
    expect_line(&mut vm, "[basalt] network-up t=", BOOT)?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    let serial = vm.serial();
    assert!(!serial.contains("dhcp: "), "DHCP is off:\n{serial}");
    assert_no_errors(&vm);
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_supervised_service_restarts_with_backoff_and_its_orphans_are_reaped() -> anyhow::Result<()> {
    let img = image();
    let dir = tempfile::tempdir()?;
    let mut vm = VmBuilder::new(&img.qcow2)
        .extra_args(fw_cfg_file(dir.path(), fw_cfg::TEST_SERVICE, "orphan")?)
        .spawn()?;
    expect_line(
        &mut vm,
        "service testd (orphan) started under supervision",
        BOOT,
    )?;
    expect_line(&mut vm, "[testd] testd: started, pid ", BOOT)?;
    let orphan = expect_line(&mut vm, "[testd] testd: orphaned grandchild pid ", BOOT)?;
    let pid: u32 = orphan
        .trim_end()
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no pid in {orphan:?}"))?;
    // The grandchild exited a second after its parent left it to PID1; PID1 reaped it,
    // so /proc (read by the service from inside the guest) shows no zombie at all.
    let zombies = expect_line(&mut vm, "[testd] testd: zombies: ", BOOT)?;
    assert!(zombies.contains("zombies: 0 []"), "pid {pid}: {zombies}");
    expect_line(
        &mut vm,
        "service testd restarted (restart 1, last exit Some(Code(3)))",
        BOOT,
    )?;
    // The second run starts after the backoff and runs the same way.
    let timeout = vm.accel().scale(BOOT);
    let second = vm.wait_until(timeout, |serial| {
        (serial.matches("[testd] testd: started, pid ").count() >= 2).then_some(())
    });
    second.map_err(|e| common::dump(&vm, e))?;
    assert_no_errors(&vm);
    Ok(())
}

/// An SNTP server double on the host's loopback, port 123: answers every request with
/// the host's clock (mode 4, stratum 2, our origin timestamp echoed). QEMU's user network
/// maps the guest's 10.0.2.2 to the host's 127.0.0.1, so the guest reaches it and nothing
/// else. Returns how many requests it answered so far.
fn sntp_double() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicUsize>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let socket = std::net::UdpSocket::bind("127.0.0.1:123")
        .map_err(|e| anyhow::anyhow!("SNTP double: bind 127.0.0.1:123: {e}"))?;
    let answered = std::sync::Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n < 48 {
                continue;
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let mut ts = [0u8; 8];
            ts[..4].copy_from_slice(&((now.as_secs() + 2_208_988_800) as u32).to_be_bytes());
            ts[4..].copy_from_slice(
                &(((u64::from(now.subsec_nanos()) << 32) / 1_000_000_000) as u32).to_be_bytes(),
            );
            let mut reply = [0u8; 48];
            reply[0] = 0x24; // LI 0, version 4, mode 4 (server)
            reply[1] = 2; // stratum
            reply[12..16].copy_from_slice(b"TEST");
            reply[16..24].copy_from_slice(&ts);
            reply[24..32].copy_from_slice(&buf[40..48]); // origin = their transmit
            reply[32..40].copy_from_slice(&ts);
            reply[40..48].copy_from_slice(&ts);
            if socket.send_to(&reply, from).is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    Ok(answered)
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn sntp_against_the_configured_server_reaches_time_synced() -> anyhow::Result<()> {
    let answered = sntp_double()?;
    let img = image();
    let dir = tempfile::tempdir()?;
    let config = STATIC_API.replace("[api]", "[network]\nntp = [\"10.0.2.2\"]\n[api]");
    // restrict=off so that 10.0.2.2:123 reaches the host's loopback; the guest sends
    // nothing but DHCP (answered inside QEMU) and SNTP to that address.
    let mut args = basalt_qemu::node_devices(false, &[]);
    args.extend(fw_cfg_file(dir.path(), fw_cfg::CONFIG, &config)?);
    let mut vm = VmBuilder::new(&img.qcow2).extra_args(args).spawn()?;
    let line = expect_line(&mut vm, "[basalt] time: 10.0.2.2 ", BOOT)?;
    assert!(line.contains("clock stepped"), "{line}");
    expect_line(&mut vm, "[basalt] time-synced t=", BOOT)?;
    assert!(answered.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_no_errors(&vm);
    Ok(())
}

/// A config with only the (framing-checked) API material, to add sections to.
const STATIC_API: &str = r#"version = 1
[api]
ca = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
cert = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
key = "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"
"#;
