//! The agent double against the server double, on loopback.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k3s_doubles::userspace::{DATA_DIR_ENV, DATA_PREFIX};
use k3s_doubles::{K3sServerDouble, CLIENT_KUBELET_PATH, LINE_PREFIX};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

const AGENT: &str = env!("CARGO_BIN_EXE_k3s-agent-double");
const WAIT: Duration = Duration::from_secs(30);

/// The agent double running, its stdout lines arriving on a channel.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Agent {
    /// Runs the double on `config`, with `data-dir` set to `<dir>/data` unless given, so
    /// nothing is written outside `dir`.
    fn start(dir: &Path, config: &serde_json::Value) -> Agent {
        let path = dir.join("config.yaml");
        let mut config = config.clone();
        if config.get("data-dir").is_none() {
            config["data-dir"] = dir.join("data").to_string_lossy().into();
        }
        std::fs::write(&path, config.to_string()).expect("write the config");
        let mut child = Command::new(AGENT)
            .args(["agent", "--config"])
            .arg(&path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the agent double");
        let stdout: ChildStdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; panics with everything seen otherwise.
    fn expect_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no line starting with {prefix:?}; agent printed {:#?}",
            self.seen
        );
    }

    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait for the agent double") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the agent double did not exit; it printed {:#?}", self.seen);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The files K3s writes, checked by openssl (not by this crate's parser): the
/// certificate is for `system:node:<node>` in `system:nodes`, for client auth, chains to
/// the server's CA, and matches the key; both files are 0600.
fn check_kubelet_credentials(dir: &Path, server: &K3sServerDouble, node: &str) {
    use std::os::unix::fs::PermissionsExt;
    let cert = dir.join("data/agent/client-kubelet.crt");
    let key = dir.join("data/agent/client-kubelet.key");
    for f in [&cert, &key] {
        let mode = std::fs::metadata(f).expect("written").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", f.display());
    }
    let openssl = |args: &[&str]| -> String {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let cert_s = cert.to_str().expect("UTF-8 path");
    let subject = openssl(&["x509", "-noout", "-subject", "-in", cert_s]);
    let compact: String = subject.chars().filter(|c| *c != ' ').collect();
    assert!(
        compact.contains(&format!("CN=system:node:{node}")),
        "{subject}"
    );
    assert!(compact.contains("O=system:nodes"), "{subject}");
    let text = openssl(&["x509", "-noout", "-ext", "extendedKeyUsage", "-in", cert_s]);
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    let ca = dir.join("server-ca.pem");
    std::fs::write(&ca, server.ca_pem()).expect("write the CA");
    let verified = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().expect("UTF-8 path"),
        cert_s,
    ]);
    assert!(verified.trim().ends_with(": OK"), "{verified}");
    let from_cert = openssl(&["x509", "-noout", "-pubkey", "-in", cert_s]);
    let from_key = openssl(&["pkey", "-pubout", "-in", key.to_str().expect("UTF-8 path")]);
    assert_eq!(from_cert, from_key, "the key is the certificate's");
    // The chain K3s sends: the leaf, then the CA.
    let text = std::fs::read_to_string(&cert).expect("read the certificate");
    assert_eq!(text.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert!(text.ends_with(server.ca_pem()) || text.ends_with(&format!("{}\n", server.ca_pem())));
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[test]
fn a_good_token_passes_and_the_agent_runs_until_sigterm() {
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = server.token("s3cret");
    let mut agent = Agent::start(
        dir.path(),
        &serde_json::json!({
            "server": server.url(),
            "token": token,
            "node-name": "warm-1",
        }),
    );
    let config = agent.expect_line(&format!("{LINE_PREFIX} config "));
    assert!(
        config.contains(&format!(" token-sha256={}", sha(&token))),
        "{config}"
    );
    assert!(!config.contains("s3cret"), "{config}");
    assert_eq!(
        agent.expect_line(&format!("{LINE_PREFIX} ca-check")),
        format!("{LINE_PREFIX} ca-check passed")
    );
    let round_trip = agent.expect_line(&format!("{LINE_PREFIX} cacerts round trip "));
    let ms = round_trip
        .strip_prefix(&format!("{LINE_PREFIX} cacerts round trip "))
        .and_then(|r| r.strip_suffix(" ms"))
        .map(str::parse::<u64>);
    assert!(matches!(ms, Some(Ok(_))), "{round_trip}");
    assert_eq!(
        agent.expect_line(&format!("{LINE_PREFIX} registered")),
        format!(
            "{LINE_PREFIX} registered node-name=warm-1 cert={}",
            dir.path().join("data/agent/client-kubelet.crt").display()
        )
    );
    agent.expect_line(&format!("{LINE_PREFIX} running"));
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "it keeps running"
    );
    // The check's fetch (the server's certificate verified against the bundle it
    // served, on that connection), and one more for the bundle the double then trusts.
    assert_eq!(server.requests("/cacerts"), 2);
    assert_eq!(server.requests(CLIENT_KUBELET_PATH), 1);
    assert_eq!(server.registered_nodes(), vec!["warm-1".to_string()]);
    check_kubelet_credentials(dir.path(), &server, "warm-1");

    let pid = Pid::from_raw(i32::try_from(agent.child.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    agent.expect_line(&format!("{LINE_PREFIX} stopping"));
    assert_eq!(agent.exit_code(), Some(0));
}

#[test]
fn a_token_for_another_ca_fails_the_check() {
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let other = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(
        dir.path(),
        &serde_json::json!({ "server": server.url(), "token": other.token("pw") }),
    );
    let line = agent.expect_line(&format!("{LINE_PREFIX} ca-check"));
    assert!(
        line.starts_with(&format!("{LINE_PREFIX} ca-check failed: ")),
        "{line}"
    );
    assert!(line.contains("but the token pins"), "{line}");
    assert_eq!(agent.exit_code(), Some(1));
    assert_eq!(other.total_requests(), 0);
}

#[test]
fn an_unreachable_server_fails_the_check() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = format!("K10{}::server:pw", "0".repeat(64));
    let mut agent = Agent::start(
        dir.path(),
        &serde_json::json!({ "server": format!("https://{closed}"), "token": token }),
    );
    let line = agent.expect_line(&format!("{LINE_PREFIX} ca-check"));
    assert!(line.contains("ca-check failed: connect to"), "{line}");
    assert_eq!(agent.exit_code(), Some(1));
}

#[test]
fn labels_taints_and_node_ip_are_echoed() {
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(
        dir.path(),
        &serde_json::json!({
            "server": server.url(),
            "token": server.token("pw"),
            "node-name": "warm-2",
            "node-ip": "10.0.2.15",
            "node-label": ["basalt.dev/pool=warm", "zone=fsn1"],
            "node-taint": ["dedicated=ci:NoSchedule"],
        }),
    );
    let line = agent.expect_line(&format!("{LINE_PREFIX} config "));
    let want = format!(
        "{LINE_PREFIX} config server={} node-name=warm-2 node-ip=10.0.2.15 \
         labels=[\"basalt.dev/pool=warm\",\"zone=fsn1\"] taints=[\"dedicated=ci:NoSchedule\"] \
         token-sha256={}",
        server.url(),
        sha(&server.token("pw"))
    );
    assert_eq!(line, want);
    agent.expect_line(&format!("{LINE_PREFIX} ca-check passed"));
}

#[test]
fn a_short_token_is_not_pinned() {
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The server knows the password (a secure token with it was minted); the agent is
    // given it bare.
    server.token("just-a-password");
    let mut agent = Agent::start(
        dir.path(),
        &serde_json::json!({
            "server": server.url(), "token": "just-a-password", "node-name": "n1",
        }),
    );
    let line = agent.expect_line(&format!("{LINE_PREFIX} ca-check"));
    assert_eq!(
        line,
        format!("{LINE_PREFIX} ca-check skipped: the token pins no CA hash")
    );
    agent.expect_line(&format!("{LINE_PREFIX} registered node-name=n1 "));
    agent.expect_line(&format!("{LINE_PREFIX} running"));
}

#[test]
fn a_wrong_password_passes_the_ca_check_but_is_not_registered() {
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    server.token("right");
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(
        dir.path(),
        &serde_json::json!({
            "server": server.url(),
            "token": server.token_unknown_to_server("wrong"),
            "node-name": "warm-1",
        }),
    );
    agent.expect_line(&format!("{LINE_PREFIX} ca-check passed"));
    let line = agent.expect_line(&format!("{LINE_PREFIX} registration failed"));
    assert_eq!(
        line,
        format!(
            "{LINE_PREFIX} registration failed: {}{CLIENT_KUBELET_PATH}: 401 Unauthorized",
            server.url()
        )
    );
    assert_eq!(agent.exit_code(), Some(1));
    assert_eq!(server.requests(CLIENT_KUBELET_PATH), 1);
    assert!(server.registered_nodes().is_empty());
    assert!(!dir.path().join("data/agent/client-kubelet.crt").exists());
    assert!(!line.contains("wrong"), "no password in the output");
}

/// K3s's answers on the kubelet certificate route, request by request.
#[test]
fn the_kubelet_certificate_route_answers_as_k3s_does() {
    use base64::Engine as _;
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    server.token("pw");
    let basic = |user: &str, pw: &str| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    };
    let node =
        |name: &str, pw: &str| format!("K3s-Node-Name: {name}\r\nK3s-Node-Password: {pw}\r\n");
    let status = |extra: String| -> String {
        use std::io::{Read, Write};
        let mut tls = tls_client(&server);
        tls.write_all(
            format!(
                "GET {CLIENT_KUBELET_PATH} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer).into_owned();
        answer.lines().next().unwrap_or_default().to_owned()
    };
    for (extra, want) in [
        (node("a", "np"), "HTTP/1.1 403 Forbidden"),
        (
            basic("node", "nope") + &node("a", "np"),
            "HTTP/1.1 401 Unauthorized",
        ),
        (
            basic("nobody", "pw") + &node("a", "np"),
            "HTTP/1.1 401 Unauthorized",
        ),
        (
            basic("server", "pw") + &node("a", "np"),
            "HTTP/1.1 403 Forbidden",
        ),
        (basic("node", "pw"), "HTTP/1.1 400 Bad Request"),
        (basic("node", "pw") + &node("a", "np"), "HTTP/1.1 200 OK"),
        (basic("node", "pw") + &node("a", "np"), "HTTP/1.1 200 OK"),
        // Another node password for a node the server knows: refused.
        (
            basic("node", "pw") + &node("a", "other"),
            "HTTP/1.1 403 Forbidden",
        ),
        (basic("node", "pw") + &node("b", "other"), "HTTP/1.1 200 OK"),
    ] {
        assert_eq!(status(extra.clone()), want, "{extra}");
    }
    assert_eq!(server.registered_nodes(), vec!["a".to_string(), "b".into()]);
}

#[test]
fn other_invocations_exit_2() {
    for args in [
        &["server"][..],
        &["agent"],
        &["--version"],
        &["agent", "--token", "x"],
    ] {
        let out = Command::new(AGENT).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with(&format!("{LINE_PREFIX} unsupported arguments")),
            "{stdout}"
        );
        assert!(stdout.contains(args[0]), "{stdout}");
    }
}

#[test]
fn a_bad_config_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, "server: https://x\n").unwrap();
    let out = Command::new(AGENT)
        .args(["agent", "--config"])
        .arg(&path)
        // Its data-dir is in the config it cannot read: K3s's variable keeps it here.
        .env(DATA_DIR_ENV, dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // K3s extracts before it reads its config.
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with(DATA_PREFIX), "{stdout}");
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with(&format!("{LINE_PREFIX} failed: "))),
        "{stdout}"
    );
}

#[test]
fn the_server_double_serves_cacerts_and_ping_and_counts() {
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let t = Duration::from_secs(10);
    let cacerts = basalt_api::k3s::fetch_cacerts(&server.url(), t).unwrap();
    assert_eq!(cacerts, server.ca_pem().as_bytes());
    assert!(server.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    let hash = basalt_api::k3s::ca_hash(&cacerts).unwrap();
    assert_eq!(server.token("pw"), format!("K10{hash}::server:pw"));
    assert_eq!(
        server.url_for("10.0.2.2"),
        format!("https://10.0.2.2:{}", server.addr().port())
    );

    let mut tls = tls_client(&server);
    use std::io::{Read, Write};
    tls.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\npong"), "{answer}");

    let err = basalt_api::k3s::fetch_cacerts(&format!("{}/", server.url()), t);
    assert!(err.is_ok(), "{err:?}");
    assert_eq!(server.requests("/cacerts"), 2);
    assert_eq!(server.requests("/ping"), 1);
    assert_eq!(server.total_requests(), 3);

    // Dropping it frees the port.
    let addr = server.addr();
    drop(server);
    TcpListener::bind(addr).unwrap();
}

#[test]
fn the_server_double_keeps_a_connection_open_until_the_client_asks_to_close() {
    use std::io::{Read, Write};
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let mut tls = tls_client(&server);
    // Two requests in one write (pipelined), then a third that asks to close.
    tls.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\nGET /cacerts HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    tls.flush().unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let pem = server.ca_pem().as_bytes();
    while !seen.ends_with(pem) {
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{text}");
    assert!(!text.contains("Connection: close"), "{text}");
    tls.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("Connection: close\r\n"), "{rest}");
    assert!(rest.ends_with("\r\n\r\npong"), "{rest}");
    assert_eq!(server.total_requests(), 3);
    assert_eq!(server.connections(), 1);
    // A request other than GET (whose body the double does not read) ends its connection.
    let mut tls = tls_client(&server);
    tls.write_all(b"POST /cacerts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let mut refused = Vec::new();
    let _ = tls.read_to_end(&mut refused);
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 405 "), "{refused}");
    assert!(refused.contains("Connection: close\r\n"), "{refused}");
    assert_eq!(server.connections(), 2);
}

/// A TLS client that trusts the double's CA, for requests `basalt_api` does not make.
fn tls_client(
    server: &K3sServerDouble,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls::pki_types::CertificateDer::pem_slice_iter(server.ca_pem().as_bytes()) {
        roots.add(der.expect("CA PEM")).expect("CA certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
    let sock = std::net::TcpStream::connect(server.addr()).expect("connect to the double");
    rustls::StreamOwned::new(conn, sock)
}

/// `k3s ctr --version` in `data`, as basalt-init runs it in standby: (exit code, lines).
fn ctr_version(data: &Path) -> (Option<i32>, Vec<String>) {
    let out = Command::new(AGENT)
        .args(["ctr", "--version"])
        .env(DATA_DIR_ENV, data)
        .output()
        .expect("run the agent double's ctr");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    (out.status.code(), lines)
}

#[test]
fn ctr_version_extracts_once_and_the_agent_then_finds_the_userspace_and_uses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let asset = k3s_doubles::userspace::asset_dir(&data);

    let (code, lines) = ctr_version(&data);
    assert_eq!(code, Some(0), "{lines:?}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        lines[0],
        format!("{DATA_PREFIX} preparing data dir {}", asset.display())
    );
    assert!(
        lines[1].starts_with(&format!("{DATA_PREFIX} extracted {}: ", asset.display())),
        "{lines:?}"
    );
    assert!(lines[2].starts_with("k3s-double-ctr: ctr "), "{lines:?}");
    assert_eq!(
        std::fs::metadata(asset.join("bin/k3s")).unwrap().len(),
        5 << 20
    );
    let (code, lines) = ctr_version(&data);
    assert_eq!(code, Some(0));
    assert_eq!(
        lines[0],
        format!(
            "{DATA_PREFIX} found {}: nothing to extract",
            asset.display()
        )
    );

    // The airgap images, with K3s's cache turned on as basalt-init does in standby.
    let images = data.join("agent/images");
    std::fs::create_dir_all(&images).unwrap();
    let bundle = images.join("k3s-airgap-images-0123456789abcdef.tar.zst");
    std::fs::write(&bundle, vec![7u8; 4096]).unwrap();
    std::fs::write(images.join(".cache.json"), b"").unwrap();

    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let config = serde_json::json!({
        "server": server.url(),
        "token": server.token("pw"),
        "node-name": "warm-1",
    });
    for (run, want) in [
        (
            1,
            format!(
                "{LINE_PREFIX} images: imported {} (4096 bytes read in ",
                bundle.display()
            ),
        ),
        (
            2,
            format!(
                "{LINE_PREFIX} images: skipped {}: unchanged since its import (.cache.json)",
                bundle.display()
            ),
        ),
    ] {
        let mut agent = Agent::start(dir.path(), &config);
        assert_eq!(
            agent.expect_line(DATA_PREFIX),
            format!(
                "{DATA_PREFIX} found {}: nothing to extract",
                asset.display()
            ),
            "run {run}"
        );
        agent.expect_line(&format!("{LINE_PREFIX} registered"));
        let line = agent.expect_line(&format!("{LINE_PREFIX} images: "));
        assert!(line.starts_with(&want), "run {run}: {line}");
        let summary = agent.expect_line(&format!("{LINE_PREFIX} images: cache "));
        assert_eq!(
            summary,
            format!(
                "{LINE_PREFIX} images: cache on, {} imported, {} skipped",
                2 - run,
                run - 1
            )
        );
        agent.expect_line(&format!("{LINE_PREFIX} running"));
        let pid = Pid::from_raw(i32::try_from(agent.child.id()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        assert_eq!(agent.exit_code(), Some(0));
    }
    let cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(images.join(".cache.json")).unwrap()).unwrap();
    assert_eq!(cache[bundle.to_string_lossy().as_ref()]["size"], 4096);
}

#[test]
fn the_agent_extracts_at_its_first_start_when_nothing_did_before() {
    let server = K3sServerDouble::start("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(
        dir.path(),
        &serde_json::json!({ "server": server.url(), "token": server.token("pw") }),
    );
    let asset = k3s_doubles::userspace::asset_dir(&dir.path().join("data"));
    assert_eq!(
        agent.expect_line(DATA_PREFIX),
        format!("{DATA_PREFIX} preparing data dir {}", asset.display())
    );
    let line = agent.expect_line(DATA_PREFIX);
    assert!(
        line.starts_with(&format!("{DATA_PREFIX} extracted ")),
        "{line}"
    );
    // Extraction comes before the config is even read.
    agent.expect_line(&format!("{LINE_PREFIX} config "));
    agent.expect_line(&format!(
        "{LINE_PREFIX} images: cache off, 0 imported, 0 skipped"
    ));
    let pid = Pid::from_raw(i32::try_from(agent.child.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    assert_eq!(agent.exit_code(), Some(0));
}
