//! A/B upgrades under QEMU (issue 16): a joined node on v1 takes v2's bundle through
//! `POST /v1/upgrade`, reboots into slot B on trial, joins again, marks it good, and
//! keeps STATE and its saved config; bundles that are tampered with, truncated, carry a
//! flipped byte in their root, or are older, are refused before anything is switched;
//! and a v3 whose init fails its health check (a test image: `testd.trial=fail` on
//! its command line, honoured only by a basalt-init with the `testd` feature) rolls back
//! to v2 by itself, and status says why. v3 is fetched by the node itself (the URL form,
//! `?url=`) from a file server double on the host, reached as 10.0.2.2.
//!
//! The images are three real builds of `images/k3s-node.toml` that differ in `version`
//! (and v3 in its command line), each with the **K3s agent double** as its `k3s`; the
//! **K3s server double** listens on the host's loopback. QEMU keeps the guest's reboots
//! reboots ([`basalt_qemu::VmBuilder::reboots`]).

mod common;

use basalt_api::layout::fw_cfg;
use basalt_api::node::{JoinState, Status};
use basalt_client::node::{NodeClient, NodeError};
use basalt_client::pki::Role;
use basalt_qemu::{Vm, VmBuilder};
use common::expect_line;
use common::pki::{free_port, Pki};
use common::upgrade::{build_version, bundle, slot};
use k3s_doubles::K3sServerDouble;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(90);

/// Polls status until `done` holds (the node may be rebooting in between).
fn wait_status(
    vm: &Vm,
    client: &NodeClient,
    what: &str,
    done: impl Fn(&Status) -> bool,
) -> anyhow::Result<Status> {
    common::upgrade::wait_status(vm, client, what, vm.accel().scale(BOOT) * 2, done)
}

fn api_error(r: Result<impl std::fmt::Debug, NodeError>) -> (u16, String) {
    match r {
        Err(NodeError::Api {
            status, message, ..
        }) => (status, message),
        other => panic!("expected the node to refuse, got {other:?}"),
    }
}

/// The bundle with its tar entries rewritten by `edit` (name, bytes), the manifest's
/// part sums recomputed from the new bytes: a bundle whose every sha256 holds.
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&str, &mut Vec<u8>)) -> anyhow::Result<()> {
    use sha2::{Digest, Sha256};
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(src)?);
    for e in archive.entries()? {
        let mut e = e?;
        let name = e.path()?.display().to_string();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes)?;
        edit(&name, &mut bytes);
        entries.push((name, bytes));
    }
    let mut m = basalt_api::bundle::Manifest::parse(&entries[0].1)?;
    for p in &mut m.parts {
        let bytes = &entries.iter().find(|(n, _)| *n == p.name).expect("part").1;
        p.sha256 = hex::encode(Sha256::digest(bytes));
        p.size = bytes.len() as u64;
    }
    entries[0].1 = m.to_json();
    let mut b = tar::Builder::new(std::fs::File::create(dst)?);
    for (name, bytes) in &entries {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice())?;
    }
    b.into_inner()?;
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_joined_node_upgrades_keeps_its_state_refuses_bad_bundles_and_rolls_back_a_bad_slot(
) -> anyhow::Result<()> {
    let double = k3s_doubles::build_agent_double(&common::workspace())?;
    let v1 = build_version("1.0.0", &[], &double)?;
    let v2 = build_version("2.0.0", &[], &double)?;
    let v3 = build_version("3.0.0", &["testd.trial=fail"], &double)?;
    let server = K3sServerDouble::start("127.0.0.1:0")?;
    let pki = Pki::with_clients(
        "up-1",
        &[("ops", Role::Client), ("reader", Role::ReadClient)],
    )?;
    let port = free_port()?;
    let standby = pki.dir.path().join("standby.toml");
    std::fs::write(&standby, pki.config(""))?;
    let mut args = basalt_qemu::node_devices(false, &[(port, basalt_api::node::DEFAULT_PORT)]);
    args.extend([
        "-fw_cfg".into(),
        fw_cfg::qemu_arg(fw_cfg::CONFIG, &standby),
        // A hardware watchdog for the trial, where the kernel has its driver.
        "-device".into(),
        "i6300esb".into(),
    ]);
    let mut vm = VmBuilder::new(&v1.qcow2)
        .reboots(true)
        .extra_args(args)
        .spawn()?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    let ops = pki.client("ops", port)?;
    wait_status(&vm, &ops, "the node API", |_| true)?;

    // Joined, with the config saved on STATE.
    let token = server.token("secret");
    let cluster = format!(
        "[cluster]\nserver = \"{}\"\ntoken = \"{token}\"\n",
        server.url_for("10.0.2.2")
    );
    let applied = ops.apply(pki.config(&cluster))?;
    assert!(applied.body.applied, "{}", applied.raw);
    let s = wait_status(&vm, &ops, "registered on v1", |s| {
        s.join.state == JoinState::Registered
    })?;
    let u = s.upgrade.clone().expect("upgrade status");
    assert_eq!(
        (u.booted.as_str(), u.default_slot.as_deref()),
        ("a", Some("a"))
    );
    assert_eq!(slot(&s, "a").version.as_deref(), Some("1.0.0"));
    assert_eq!(slot(&s, "a").state, "active");
    assert_eq!(slot(&s, "b").state, "empty");

    // Refused before the switch, each leaving GRUB's env as it was.
    let work = tempfile::tempdir()?;
    let v2b = bundle(&v2);
    let unchanged = |why: &str| -> anyhow::Result<()> {
        let s = ops.status()?.body;
        let u = s.upgrade.expect("upgrade");
        assert_eq!(u.next_boot, None, "{why}: armed anyway");
        assert_eq!(u.default_slot.as_deref(), Some("a"), "{why}");
        assert_eq!(u.booted, "a", "{why}");
        Ok(())
    };
    // A reader may not upgrade or roll back (the refusal of a bundle's head is tested
    // over loopback in init; here a body-less request).
    let (code, _) = api_error(pki.client("reader", port)?.rollback(false));
    assert_eq!(code, 403);
    // Nothing to roll back to yet: slot B holds no good image.
    let (code, msg) = api_error(ops.rollback(false));
    assert_eq!(code, 400, "{msg}");
    // Tampered: one byte changed after the sha256 was taken. The client computes the
    // sha256 of what it sends, so the node is sent the original's through a raw request.
    let tampered = work.path().join("tampered.bundle");
    std::fs::copy(&v2b, &tampered)?;
    let len = std::fs::metadata(&tampered)?.len();
    common::flip_byte(&tampered, len - 20_000)?;
    let original_sha = basalt_client::node::sha256_file(&v2b)?;
    let (code, msg) = raw_upgrade(&pki, port, &tampered, &original_sha)?;
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("sha256"), "{msg}");
    unchanged("tampered")?;
    // Truncated: the first half, with its own sha256.
    let truncated = work.path().join("truncated.bundle");
    let bytes = std::fs::read(&v2b)?;
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let (code, msg) = api_error(ops.upgrade(&truncated, false, false));
    assert_eq!(code, 400, "{msg}");
    unchanged("truncated")?;
    // A flipped byte in root.img, every sha256 recomputed: only verity tells.
    let flipped = work.path().join("flipped.bundle");
    rewrite(&v2b, &flipped, |name, bytes| {
        if name == "root.img" {
            bytes[1 << 20] ^= 0x01;
        }
    })?;
    let (code, msg) = api_error(ops.upgrade(&flipped, false, false));
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("verity"), "{msg}");
    unchanged("flipped root byte")?;

    // v1 → v2: written, verified, rebooted into once, healthy (joined again), good.
    let r = ops.upgrade(&v2b, false, true)?;
    assert_eq!(
        (r.body.slot.as_str(), r.body.version.as_str()),
        ("b", "2.0.0")
    );
    expect_line(&mut vm, "upgrade: slot b is on trial", BOOT * 2)?;
    expect_line(
        &mut vm,
        "upgrade: slot b is healthy and marked good",
        BOOT * 2,
    )?;
    let s = wait_status(&vm, &ops, "v2 good and registered", |s| {
        s.join.state == JoinState::Registered
            && s.upgrade
                .as_ref()
                .is_some_and(|u| u.default_slot.as_deref() == Some("b"))
    })?;
    assert_eq!(s.slot, "b");
    assert_eq!(
        s.config_source.as_deref(),
        Some("state"),
        "the saved config"
    );
    assert_eq!(slot(&s, "b").version.as_deref(), Some("2.0.0"));
    assert_eq!(slot(&s, "b").state, "active");
    assert_eq!(slot(&s, "a").state, "good");
    assert_eq!(s.upgrade.as_ref().map(|u| u.upgrades), Some(1));
    let metrics = ops.metrics()?;
    assert!(metrics.contains("basalt_upgrades_total 1"), "{metrics}");

    // Older than the running v2: refused unless allowed.
    let (code, msg) = api_error(ops.upgrade(&bundle(&v1), false, false));
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("older"), "{msg}");

    // v3 fails its health check on trial: the node goes back to v2 by itself. The node
    // fetches v3 itself (the URL form) from a file server on the host's loopback, which
    // the guest reaches as 10.0.2.2 over QEMU's user network.
    let v3b = bundle(&v3);
    let files = serve_file(&v3b)?;
    let url = format!("http://10.0.2.2:{}/v3.bundle", files.port);
    // A URL that answers 404: refused, nothing switched.
    let (code, msg) = api_error(ops.upgrade_url(
        &format!("http://10.0.2.2:{}/missing.bundle", files.port),
        &basalt_client::node::sha256_file(&v3b)?,
        false,
        false,
    ));
    assert_eq!(code, 502, "{msg}");
    assert!(msg.contains("HTTP 404"), "{msg}");
    let u = ops.status()?.body.upgrade.expect("upgrade");
    assert_eq!(
        (u.next_boot, u.default_slot.as_deref(), u.booted.as_str()),
        (None, Some("b"), "b"),
        "a URL that answers 404 switches nothing"
    );
    let r = ops.upgrade_url(&url, &basalt_client::node::sha256_file(&v3b)?, false, true)?;
    assert_eq!(r.body.slot, "a");
    assert_eq!(
        files.served.lock().map(|s| s.clone()).unwrap_or_default(),
        ["GET /missing.bundle", "GET /v3.bundle"]
    );
    expect_line(&mut vm, "upgrade: slot a is on trial", BOOT * 2)?;
    expect_line(&mut vm, "upgrade: rolled back from slot a", BOOT * 3)?;
    let s = wait_status(&vm, &ops, "back on v2 after the rollback", |s| {
        s.upgrade
            .as_ref()
            .is_some_and(|u| u.booted == "b" && u.rollbacks == 1)
    })?;
    let u = s.upgrade.clone().expect("upgrade");
    assert_eq!(u.default_slot.as_deref(), Some("b"));
    let rb = u.last_rollback.expect("last rollback");
    assert_eq!(
        (rb.slot.as_str(), rb.version.as_deref()),
        ("a", Some("3.0.0"))
    );
    assert!(rb.reason.contains("testd.trial=fail"), "{}", rb.reason);
    assert_eq!(slot(&s, "a").state, "failed");
    assert_eq!(slot(&s, "b").version.as_deref(), Some("2.0.0"));
    wait_status(&vm, &ops, "registered again on v2", |s| {
        s.join.state == JoinState::Registered
    })?;
    let metrics = ops.metrics()?;
    assert!(metrics.contains("basalt_rollbacks_total 1"), "{metrics}");
    vm.kill();
    Ok(())
}

/// `POST /v1/upgrade` with a sha256 of our choosing (the client computes the real one).
fn raw_upgrade(pki: &Pki, port: u16, bundle: &Path, sha256: &str) -> anyhow::Result<(u16, String)> {
    let resp = pki
        .raw_client("ops", port)?
        .post(format!("https://up-1:{port}/v1/upgrade?sha256={sha256}"))
        .body(std::fs::read(bundle)?)
        .send()?;
    Ok((resp.status().as_u16(), resp.text()?))
}

/// A test double of a static file server on the host's loopback: `GET /v3.bundle`
/// answers `file` with its Content-Length, anything else 404. Records each request line.
struct FileServer {
    port: u16,
    served: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn serve_file(file: &Path) -> anyhow::Result<FileServer> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&served);
    let file = file.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let Ok(clone) = conn.try_clone() else {
                continue;
            };
            let mut reader = BufReader::new(clone);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if !matches!(reader.read_line(&mut h), Ok(n) if n > 0) || h == "\r\n" {
                    break;
                }
            }
            let path = line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            if let Ok(mut l) = log.lock() {
                l.push(format!("GET {path}"));
            }
            let _ = match (path.as_str(), std::fs::File::open(&file)) {
                ("/v3.bundle", Ok(mut f)) => {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    conn.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| std::io::copy(&mut f, &mut conn).map(|_| ()))
                }
                _ => conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    Ok(FileServer { port, served })
}
