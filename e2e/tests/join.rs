//! The node API and the join, under QEMU: a standby node serves its API over mutual TLS
//! (reached through a QEMU host forward), refuses strangers and bad input, and joins
//! when told: the image carries the **K3s agent double** as its `k3s`, and a **K3s
//! server double** on the host's loopback serves `/cacerts` (the guest reaches it as
//! 10.0.2.2), and issues the kubelet client certificate only for a token's password the
//! server knows. Neither double is K3s; see the README.

mod common;

use basalt_api::node::JoinState;
use basalt_client::node::{NodeClient, NodeError};
use basalt_client::pki::{Ca, Role, Validity};
use basalt_qemu::Vm;
use common::pki::{free_port, Pki};
use common::{boot_node, expect_line, reboot_from_state};
use k3s_doubles::K3sServerDouble;
use std::time::{Duration, Instant, SystemTime};

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);

/// The pool PKI with client certificates good and bad: `ops` from the pool CA, `expired`,
/// and `stranger` from another CA.
fn pki() -> anyhow::Result<Pki> {
    let pki = Pki::with_clients("warm-1", &[("ops", Role::Client)])?;
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    pki.issue(
        "expired",
        Role::Client,
        &pki.ca,
        Validity {
            not_before: now - 10 * day,
            not_after: now - day,
        },
    )?;
    pki.issue(
        "stranger",
        Role::Client,
        &Ca::generate()?,
        Validity::days_from_now(30)?,
    )?;
    Ok(pki)
}

fn sha(s: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()))
}

/// Polls `health` until the node API answers (it starts at standby).
fn wait_for_api(vm: &Vm, client: &NodeClient) -> anyhow::Result<()> {
    let deadline = Instant::now() + vm.accel().scale(BOOT);
    loop {
        match client.health() {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(common::dump(
                    vm,
                    basalt_qemu::HarnessError::Timeout {
                        what: format!("node API health: {e}"),
                        timeout: vm.accel().scale(BOOT),
                    },
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Polls status until the join is in `want`; fails if it ever shows one of `never`.
fn wait_for_join(
    vm: &Vm,
    client: &NodeClient,
    want: JoinState,
    never: &[JoinState],
) -> anyhow::Result<basalt_api::node::Status> {
    let budget = vm.accel().scale(BOOT);
    let deadline = Instant::now() + budget;
    loop {
        let status = client.status()?.body;
        if status.join.state == want {
            return Ok(status);
        }
        anyhow::ensure!(
            !never.contains(&status.join.state),
            "join state {} while waiting for {want}: {:?}",
            status.join.state,
            status.join
        );
        if Instant::now() > deadline {
            return Err(common::dump(
                vm,
                basalt_qemu::HarnessError::Timeout {
                    what: format!("join state {want}; last {:?}", status.join),
                    timeout: budget,
                },
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn chain(e: &NodeError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_standby_node_refuses_strangers_and_bad_input_then_joins_and_stays_joined() -> anyhow::Result<()>
{
    let server = K3sServerDouble::start("127.0.0.1:0")?;
    let img = common::join_image();
    let pki = pki()?;
    let port = free_port()?;
    let mut vm = boot_node(&img.qcow2, port, Some(&pki.config("")), pki.dir.path())?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    let ops = pki.client("ops", port)?;
    wait_for_api(&vm, &ops)?;

    // status with a client certificate from the pool CA.
    let status = ops.status()?.body;
    assert_eq!(status.join.state, JoinState::Standby, "{status:?}");
    // The whole timeline, stage 1's milestones included (read back from the kernel log).
    for name in ["init-start", "root-verified", "ready", "standby"] {
        assert!(
            status.milestones.iter().any(|m| m.name == name),
            "{name} missing: {status:?}"
        );
    }

    // Refusals: a client certificate from another CA, an expired one, none at all.
    for who in ["stranger", "expired"] {
        let e = pki.client(who, port)?.status().expect_err(who);
        assert!(matches!(e, NodeError::Tls { .. }), "{who}: {}", chain(&e));
    }
    let anonymous = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(
            pki.ca.cert_pem().as_bytes(),
        )?)
        .resolve("warm-1", ([127, 0, 0, 1], port).into())
        .build()?;
    let url = |p: &str| format!("https://warm-1:{port}{p}");
    let health = anonymous.get(url("/v1/health")).send()?;
    assert!(health.status().is_success(), "health answers strangers");
    let refused = anonymous.get(url("/v1/status")).send()?;
    assert_eq!(refused.status().as_u16(), 401);
    let body: serde_json::Value = serde_json::from_str(&refused.text()?)?;
    assert!(body["error"].is_string(), "{body}");
    let refused = anonymous
        .post(url("/v1/config"))
        .body(pki.config(""))
        .send()?;
    assert_eq!(refused.status().as_u16(), 401);

    // Bad input: too large, not TOML, an unknown key.
    let expect_status = |body: String, code: u16, needle: &str| -> anyhow::Result<()> {
        match ops.apply(body) {
            Err(NodeError::Api {
                status, message, ..
            }) => {
                assert_eq!(status, code, "{message}");
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
                Ok(())
            }
            other => anyhow::bail!("expected {code}, got {other:?}"),
        }
    };
    expect_status("#".repeat(2 << 20), 413, "")?;
    expect_status("version = 1\n[node\n".into(), 400, "")?;
    expect_status(pki.config("surprise = 1"), 400, "node.surprise")?;

    // A token whose CA hash is not the server's: reported, nothing started.
    let wrong = format!("K10{}::server:secret", "0".repeat(64));
    let cluster = |token: &str| {
        format!(
            "labels = {{ \"example.com/pool\" = \"warm\" }}\ntaints = [\"dedicated=test:NoSchedule\"]\n[cluster]\nserver = \"{}\"\ntoken = \"{token}\"\n",
            server.url_for("10.0.2.2")
        )
    };
    // [cluster] must follow [node]'s keys and precede [api]: the helper puts `extra`
    // right after the hostname.
    let mismatch = pki.config(&cluster(&wrong));
    match ops.apply(mismatch) {
        Ok(r) => {
            assert!(!r.body.applied, "{}", r.raw);
            assert_eq!(r.body.join.state, JoinState::Failed, "{}", r.raw);
        }
        Err(e) => {
            let text = chain(&e);
            assert!(
                text.to_lowercase().contains("hash") || text.contains("CA"),
                "{text}"
            );
        }
    }
    let status = ops.status()?.body;
    assert_eq!(status.join.state, JoinState::Failed, "{status:?}");
    assert!(status.join.last_error.is_some(), "{status:?}");
    assert!(
        !vm.serial().contains("k3s-agent-double:"),
        "nothing started"
    );
    assert!(!vm.serial().contains("[basalt] joined t="));
    // The agent was prepared beside the check, and nothing of it was kept.
    assert!(
        vm.serial().contains("[basalt] join: CA check "),
        "PID1 reports its check's timing"
    );

    // The right CA, a password the server does not know: the CA check passes and the
    // agent starts, but K3s issues no kubelet credentials. The agent double exits 1 and
    // the supervisor restarts it: crash-looping, never registered.
    let wrong_password = server.token_unknown_to_server("wrong-pw");
    let applied = ops.apply(pki.config(&cluster(&wrong_password)))?;
    assert!(applied.body.applied, "{}", applied.raw);
    assert_eq!(
        applied.body.join.state,
        JoinState::AgentStarted,
        "{}",
        applied.raw
    );
    expect_line(&mut vm, "[basalt] joined t=", BOOT)?;
    let refused = expect_line(&mut vm, "k3s-agent-double: registration failed: ", BOOT)?;
    assert!(
        refused.contains("/v1-k3s/client-kubelet.crt: 401 Unauthorized"),
        "{refused}"
    );
    let status = wait_for_join(&vm, &ops, JoinState::CrashLooping, &[JoinState::Registered])?;
    let why = status.join.last_error.clone().unwrap_or_default();
    assert!(why.contains("401 Unauthorized"), "{status:?}");
    assert!(why.contains("exit 1"), "{status:?}");
    assert!(server.registered_nodes().is_empty(), "nothing registered");
    let agent = status.services.iter().find(|s| s.name == "k3s");
    assert!(
        agent.is_some_and(|a| a.restarts >= 3),
        "{:?}",
        status.services
    );

    // The corrected [cluster] replaces the crash-looping one (no 409), and the agent
    // starts again with it and registers.
    let token = server.token("secret");
    let applied = ops.apply(pki.config(&cluster(&token)))?;
    assert!(applied.body.applied, "{}", applied.raw);
    assert!(
        applied.body.message.contains("starts again"),
        "{}",
        applied.raw
    );
    let line = expect_line(&mut vm, &format!("token-sha256={}", sha(&token)), BOOT)?;
    let url = server.url_for("10.0.2.2");
    for want in [
        format!("server={url}"),
        "node-name=warm-1".to_string(),
        r#"labels=["example.com/pool=warm"]"#.to_string(),
        r#"taints=["dedicated=test:NoSchedule"]"#.to_string(),
    ] {
        assert!(line.contains(&want), "{line:?} lacks {want:?}");
    }
    expect_line(
        &mut vm,
        "k3s-agent-double: registered node-name=warm-1 ",
        BOOT,
    )?;
    let status = wait_for_join(&vm, &ops, JoinState::Registered, &[])?;
    assert_eq!(status.join.last_error, None, "{status:?}");
    assert_eq!(server.registered_nodes(), ["warm-1"]);
    assert!(
        server.requests("/cacerts") >= 2,
        "PID1 and the agent both checked"
    );
    // Registered: another [cluster] is refused now.
    match ops.apply(pki.config(&cluster(&wrong_password))) {
        Err(NodeError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 409, "{message}");
            assert!(message.contains("registered"), "{message}");
        }
        other => anyhow::bail!("expected 409, got {other:?}"),
    }

    // Reboot through the API (-no-reboot turns it into QEMU's exit), then boot the same
    // disk without fw_cfg: the node joins again from STATE without being told.
    let (mut again, port2) = reboot_from_state(&mut vm, &ops, pki.dir.path(), BOOT)?;
    expect_line(&mut again, "[basalt] joined t=", BOOT)?;
    expect_line(&mut again, "k3s-agent-double: ca-check passed", BOOT)?;
    let ops2 = pki.client("ops", port2)?;
    wait_for_api(&again, &ops2)?;
    // The certificate of the first boot is older than this run of the agent: only the
    // one it fetches again makes the node registered.
    expect_line(
        &mut again,
        "k3s-agent-double: registered node-name=warm-1 ",
        BOOT,
    )?;
    wait_for_join(
        &again,
        &ops2,
        JoinState::Registered,
        &[JoinState::CrashLooping],
    )?;

    // The token's password reaches K3s and nothing else: not the console of either boot.
    for console in [vm.serial(), again.serial()] {
        assert!(!console.contains(&token), "the token is on the console");
        assert!(
            !console.contains(&wrong_password),
            "a token is on the console"
        );
        for password in [":secret", "wrong-pw"] {
            assert!(
                !console.contains(password),
                "a token's password is on the console"
            );
        }
    }
    Ok(())
}

/// A standby node told which server it may join (`standby.servers`, as the warm pool
/// writes it) checks that server's CA ahead; the promotion's check still fetches
/// `/cacerts` and compares it with the token, on the connection the prefetch left open,
/// and finds the certificate work done. A token pinning another CA is refused all the same.
#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_standby_node_checks_its_servers_ca_ahead_and_its_promotion_uses_it() -> anyhow::Result<()> {
    let server = K3sServerDouble::start("127.0.0.1:0")?;
    let url = server.url_for("10.0.2.2");
    let img = common::join_image();
    let pki = Pki::with_clients("warm-2", &[("ops", Role::Client)])?;
    let port = free_port()?;
    let standby = format!("[standby]\nservers = [\"{url}\"]\n");
    let mut vm = boot_node(
        &img.qcow2,
        port,
        Some(&pki.config(&standby)),
        pki.dir.path(),
    )?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;
    // The loopback is up: the check's warm-up served itself on 127.0.0.1 (as K3s's agent
    // will reach its load balancer there).
    expect_line(
        &mut vm,
        "[basalt] check-warm: the CA check ran against a loopback server",
        BOOT,
    )?;
    // Then the promotion's preparation, rehearsed on tmpfs (`init/src/join/node.rs`).
    expect_line(
        &mut vm,
        "[basalt] prepare-warm: K3s's config rendered and written aside (",
        BOOT,
    )?;
    // The hash K3s pins for the double's one self-signed CA: the bytes as served (the
    // independent oracle is sha2 over the double's PEM, not basalt's hash code).
    let ca_hash = sha(server.ca_pem());
    let line = expect_line(&mut vm, &format!("[basalt] prefetch: {url}: "), BOOT)?;
    assert!(
        line.contains(&format!("CA {ca_hash} checked ahead")),
        "{line}"
    );
    let fetched = server.requests("/cacerts");
    assert!(fetched >= 1, "the prefetch fetched /cacerts");
    let ops = pki.client("ops", port)?;
    wait_for_api(&vm, &ops)?;

    let cluster = |token: &str| format!("[cluster]\nserver = \"{url}\"\ntoken = \"{token}\"\n");
    // A prefetch spares work, never the comparison with the token.
    let wrong = format!("K10{}::server:secret", "0".repeat(64));
    let refused = ops.apply(pki.config(&cluster(&wrong)));
    assert!(
        refused.as_ref().map_or(true, |r| !r.body.applied),
        "{refused:?}"
    );
    let status = ops.status()?.body;
    assert_eq!(status.join.state, JoinState::Failed, "{status:?}");
    let why = status.join.last_error.unwrap_or_default();
    assert!(
        why.contains(&ca_hash),
        "the refusal names the CA's hash: {why}"
    );

    let token = server.token("secret");
    let applied = ops.apply(pki.config(&cluster(&token)))?;
    assert!(applied.body.applied, "{}", applied.raw);
    expect_line(&mut vm, "[basalt] joined t=", BOOT)?;
    let how = expect_line(&mut vm, "[basalt] join: CA check ", BOOT)?;
    // Each check fetched the bundle again, over the network.
    assert!(server.requests("/cacerts") >= fetched + 2);
    let serial = vm.serial();
    let notes: Vec<&str> = serial
        .lines()
        .filter(|l| l.starts_with("[basalt] join: CA check "))
        .collect();
    assert!(
        notes.iter().any(|l| l.contains("prefetched")),
        "{how}: {notes:?}"
    );
    // The requests went over the connection the prefetch left open (the double keeps
    // it, as K3s's server does): more requests than connections.
    assert!(notes.iter().any(|l| l.contains("kept")), "{how}: {notes:?}");
    assert!(
        server.total_requests() > server.connections(),
        "{} requests over {} connections",
        server.total_requests(),
        server.connections()
    );
    expect_line(&mut vm, "k3s-agent-double: ca-check passed", BOOT)?;
    wait_for_join(&vm, &ops, JoinState::Registered, &[])?;
    Ok(())
}
