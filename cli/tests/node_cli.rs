//! `basalt pki` and `basalt node`, run as the binary, against a loopback node API double.
//!
//! `NodeApiDouble` is a test double of basalt-init's node API: a rustls server on
//! 127.0.0.1 that requires a client certificate from its pool CA (webpki, as the real
//! server) and answers each `METHOD /path` with a canned response, recording what it was
//! sent. Certificates come from `basalt pki` itself.

use basalt_client::pki::{self, CertRequest, Role, Validity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const STATUS_JSON: &str = r#"{"milestones":[{"name":"init-start","t":0.512},{"name":"standby","t":1.904}],"slot":"a","versions":{"basalt":"0.1.0","kernel":"6.1.0-28-cloud-amd64"},"addresses":["10.0.2.15/24"],"hostname":"node-1","config_source":"state","services":[{"name":"k3s","state":"backoff","restarts":3,"last_exit":"exit 1"}],"join":{"state":"failed","server":"https://10.0.2.2:6443","last_error":"CA hash mismatch: server has sha256:aa, token wants sha256:bb"},"rss_kib":2048,"api_cert":{"not_after":1827078299,"not_after_text":"Nov 23 15:44:59 2027 +00:00","serial":"5a3f"}}"#;

fn basalt(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(args)
        .output()
        .expect("run basalt");
    eprintln!(
        "basalt {args:?}: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A pool made with the CLI: CA, a client certificate, a node certificate for `node-1`
/// (DNS node-1, IP 127.0.0.1).
struct Pool {
    _tmp: tempfile::TempDir,
    ca_dir: PathBuf,
    certs: PathBuf,
}

impl Pool {
    fn new() -> Pool {
        let tmp = tempfile::tempdir().expect("tmp");
        let ca_dir = tmp.path().join("ca");
        let certs = tmp.path().join("certs");
        let (ca, c) = (
            ca_dir.to_str().expect("utf8"),
            certs.to_str().expect("utf8"),
        );
        assert!(basalt(&["pki", "init", ca]).status.success());
        let client = ["pki", "issue", "client", "ops", "--ca", ca, "--out", c];
        assert!(basalt(&client).status.success());
        let node = [
            "pki",
            "issue",
            "node",
            "node-1",
            "--ca",
            ca,
            "--out",
            c,
            "--ip",
            "127.0.0.1",
        ];
        assert!(basalt(&node).status.success());
        Pool {
            _tmp: tmp,
            ca_dir,
            certs,
        }
    }

    fn ca_pem(&self) -> PathBuf {
        self.ca_dir.join("ca.pem")
    }

    fn cert(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.certs.join(format!("{name}.pem")),
            self.certs.join(format!("{name}.key")),
        )
    }

    /// Issues a client certificate through the library, e.g. one already expired.
    fn issue_client(&self, name: &str, validity: Validity) -> (PathBuf, PathBuf) {
        let req = CertRequest {
            name: name.into(),
            role: Role::Client,
            validity,
        };
        pki::issue(&self.ca_dir, &self.certs, &req, false).expect("issue")
    }
}

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

struct Canned {
    status: u16,
    content_type: &'static str,
    body: String,
}

struct NodeApiDouble {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl NodeApiDouble {
    /// Serves `routes` ("METHOD /path" → response) with `server_cert` and trusts client
    /// certificates from `client_ca`.
    fn start(
        client_ca: &Path,
        (cert, key): (&Path, &Path),
        routes: HashMap<&'static str, Canned>,
    ) -> NodeApiDouble {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(client_ca).expect("ca") {
            roots.add(c.expect("ca")).expect("root");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let chain = CertificateDer::pem_file_iter(cert)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = PrivateKeyDer::from_pem_file(key).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (routes, recorded) = (Arc::new(routes), requests.clone());
        std::thread::spawn(move || {
            // Ends with the test process; every connection is short.
            for sock in listener.incoming().flatten() {
                let (config, routes, recorded) = (config.clone(), routes.clone(), recorded.clone());
                std::thread::spawn(move || serve(sock, config, &routes, &recorded));
            }
        });
        NodeApiDouble { addr, requests }
    }

    fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }
}

fn serve(
    sock: TcpStream,
    config: Arc<rustls::ServerConfig>,
    routes: &HashMap<&'static str, Canned>,
    recorded: &Mutex<Vec<Recorded>>,
) {
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let conn = rustls::ServerConnection::new(config).expect("conn");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    match handle(&mut tls, routes) {
        Ok(req) => recorded.lock().expect("lock").push(req),
        Err(_) => {
            // rustls has sent its alert; close gently so the client reads it rather than
            // a reset.
            let _ = tls.sock.shutdown(Shutdown::Write);
            let _ = std::io::copy(&mut tls.sock, &mut std::io::sink());
        }
    }
}

fn handle(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    routes: &HashMap<&'static str, Canned>,
) -> std::io::Result<Recorded> {
    let mut reader = BufReader::new(&mut *tls);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let (mut length, mut content_type) = (0usize, None);
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "content-type" => content_type = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let key = format!("{method} {path}");
    let (status, ctype, text) = match routes.get(key.as_str()) {
        Some(c) => (c.status, c.content_type, c.body.clone()),
        None => (
            404,
            "application/json",
            r#"{"error":"no such endpoint"}"#.into(),
        ),
    };
    write!(
        tls,
        "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    )?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(Recorded {
        method,
        path,
        content_type,
        body,
    })
}

fn json(status: u16, body: &str) -> Canned {
    Canned {
        status,
        content_type: "application/json",
        body: body.into(),
    }
}

fn routes() -> HashMap<&'static str, Canned> {
    HashMap::from([
        ("GET /v1/status", json(200, STATUS_JSON)),
        (
            "GET /v1/health",
            json(200, r#"{"status":"ok","milestone":"standby"}"#),
        ),
        (
            "POST /v1/config",
            json(
                200,
                r#"{"applied":true,"source":"state","join":{"state":"joining","server":"https://10.0.2.2:6443","last_error":null},"message":"joining https://10.0.2.2:6443","warnings":["cluster.token has no CA pin"]}"#,
            ),
        ),
        (
            "POST /v1/reboot",
            json(409, r#"{"error":"a reboot is already under way"}"#),
        ),
        (
            "GET /v1/logs/k3s",
            Canned {
                status: 200,
                content_type: "text/plain",
                body: "line one\nline two\n".into(),
            },
        ),
    ])
}

/// `basalt node` with the pool's `ops` client certificate (or `client`) against `server`.
fn node(pool: &Pool, server: &NodeApiDouble, client: (&Path, &Path), rest: &[&str]) -> Output {
    let ca = pool.ca_pem();
    let endpoint = server.endpoint();
    let mut args = vec![
        "node",
        "--endpoint",
        &endpoint,
        "--ca",
        ca.to_str().expect("utf8"),
        "--cert",
        client.0.to_str().expect("utf8"),
        "--key",
        client.1.to_str().expect("utf8"),
    ];
    args.extend_from_slice(rest);
    basalt(&args)
}

fn start(pool: &Pool) -> NodeApiDouble {
    let (cert, key) = pool.cert("node-1");
    NodeApiDouble::start(&pool.ca_pem(), (&cert, &key), routes())
}

#[test]
fn status_prints_a_summary() {
    let pool = Pool::new();
    let server = start(&pool);
    let (c, k) = pool.cert("ops");
    let out = node(&pool, &server, (&c, &k), &["--name", "node-1", "status"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.starts_with("node-1  slot a  basalt 0.1.0  kernel 6.1.0-28-cloud-amd64\n"));
    assert!(text.contains("join:      failed  server https://10.0.2.2:6443\n"));
    assert!(text.contains("  last error: CA hash mismatch: server has sha256:aa"));
    assert!(text.contains("  standby        1.904 s\n"), "{text}");
    assert!(text.contains("  k3s  backoff  restarts 3  last exit: exit 1\n"));
    assert!(
        text.contains("api cert:  expires Nov 23 15:44:59 2027 +00:00  serial 5a3f\n"),
        "{text}"
    );
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("GET", "/v1/status")
    );
}

#[test]
fn status_json_is_the_raw_answer() {
    let pool = Pool::new();
    let server = start(&pool);
    let (c, k) = pool.cert("ops");
    // No --name: the endpoint's host, 127.0.0.1, is an IP SAN of the node certificate.
    let out = node(&pool, &server, (&c, &k), &["status", "--json"]);
    assert!(out.status.success());
    let got: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let want: serde_json::Value = serde_json::from_str(STATUS_JSON).expect("json");
    assert_eq!(got, want);
}

#[test]
fn apply_sends_the_file() {
    let pool = Pool::new();
    let server = start(&pool);
    let (c, k) = pool.cert("ops");
    let config = "version = 1\n\n[cluster]\nserver = \"https://10.0.2.2:6443\"\n";
    let file = pool.certs.join("join.toml");
    std::fs::write(&file, config).expect("write");
    let out = node(
        &pool,
        &server,
        (&c, &k),
        &["--name", "node-1", "apply", file.to_str().expect("utf8")],
    );
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("applied (state): joining https://10.0.2.2:6443\n"));
    assert!(stdout(&out).contains("warning:   cluster.token has no CA pin\n"));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("POST", "/v1/config")
    );
    assert_eq!(reqs[0].content_type.as_deref(), Some("application/toml"));
    assert_eq!(reqs[0].body, config.as_bytes());
}

#[test]
fn apply_that_fails_to_join_exits_non_zero() {
    let pool = Pool::new();
    let mut routes = routes();
    routes.insert(
        "POST /v1/config",
        json(
            200,
            r#"{"applied":true,"source":"state","join":{"state":"failed","server":"https://s:6443","last_error":"CA hash mismatch"},"message":"not joined"}"#,
        ),
    );
    let (cert, key) = pool.cert("node-1");
    let server = NodeApiDouble::start(&pool.ca_pem(), (&cert, &key), routes);
    let (c, k) = pool.cert("ops");
    let file = pool.certs.join("join.toml");
    std::fs::write(&file, "version = 1\n").expect("write");
    let out = node(
        &pool,
        &server,
        (&c, &k),
        &["apply", file.to_str().expect("utf8")],
    );
    assert!(!out.status.success());
    assert!(stdout(&out).contains("last error: CA hash mismatch"));
    assert!(
        stderr(&out).contains("could not join: CA hash mismatch"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_error_body_surfaces_with_a_non_zero_exit() {
    let pool = Pool::new();
    let server = start(&pool);
    let (c, k) = pool.cert("ops");
    let out = node(&pool, &server, (&c, &k), &["reboot"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("POST /v1/reboot: the node answered 409: a reboot is already under way"),
        "{err}"
    );
    let out = node(&pool, &server, (&c, &k), &["shutdown"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("answered 404: no such endpoint"));
}

#[test]
fn logs_print_the_lines() {
    let pool = Pool::new();
    let server = start(&pool);
    let (c, k) = pool.cert("ops");
    let out = node(&pool, &server, (&c, &k), &["logs", "k3s"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "line one\nline two\n");
    let out = node(&pool, &server, (&c, &k), &["logs", "../status"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid service name"));
    let out = node(&pool, &server, (&c, &k), &["logs", "k3s", "--follow"]);
    // The double has no route with the query; what matters is what was asked for.
    assert!(!out.status.success());
    let paths: Vec<_> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v1/logs/k3s", "/v1/logs/k3s?follow=1"]);
}

#[test]
fn a_node_certificate_from_another_ca_is_refused() {
    let pool = Pool::new();
    let other = Pool::new();
    let (cert, key) = other.cert("node-1");
    // The impostor trusts our clients, so only our check of its certificate can stop us.
    let server = NodeApiDouble::start(&pool.ca_pem(), (&cert, &key), routes());
    let (c, k) = pool.cert("ops");
    let out = node(&pool, &server, (&c, &k), &["--name", "node-1", "status"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the node's certificate is not from the pool CA"),
        "{err}"
    );
    assert!(server.requests().is_empty());
}

#[test]
fn a_node_certificate_for_another_name_is_refused() {
    let pool = Pool::new();
    let server = start(&pool);
    let (c, k) = pool.cert("ops");
    let out = node(&pool, &server, (&c, &k), &["--name", "node-2", "status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not issued for \"node-2\""),
        "{}",
        stderr(&out)
    );
    assert!(server.requests().is_empty());
}

#[test]
fn the_node_refusing_our_certificate_is_explained() {
    let pool = Pool::new();
    let server = start(&pool);
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let (c, k) = pool.issue_client(
        "expired",
        Validity {
            not_before: now - day * 10,
            not_after: now - day,
        },
    );
    let out = node(&pool, &server, (&c, &k), &["status"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the node refused our client certificate: it has expired"),
        "{err}"
    );

    let other = Pool::new();
    let (c, k) = other.cert("ops");
    let out = node(&pool, &server, (&c, &k), &["status"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the node refused our client certificate: its signature does not verify"),
        "{err}"
    );
    assert!(server.requests().is_empty());
}

#[test]
fn pki_refuses_to_overwrite() {
    let pool = Pool::new();
    let ca = pool.ca_dir.to_str().expect("utf8");
    let before = std::fs::read(pool.ca_dir.join("ca.key")).expect("read");
    let out = basalt(&["pki", "init", ca]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists; pass --force"));
    assert_eq!(
        std::fs::read(pool.ca_dir.join("ca.key")).expect("read"),
        before
    );
    let c = pool.certs.to_str().expect("utf8");
    let out = basalt(&["pki", "issue", "client", "ops", "--ca", ca, "--out", c]);
    assert!(!out.status.success());
    let out = basalt(&[
        "pki", "issue", "client", "ops", "--ca", ca, "--out", c, "--force",
    ]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        format!("{c}/ops.pem\n{c}/ops.key\n"),
        "prints the files written"
    );
}

#[test]
fn unreachable_nodes_and_missing_files_are_named() {
    let pool = Pool::new();
    let (c, k) = pool.cert("ops");
    // A port nothing listens on: bind one, then let it go.
    let free = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let ca = pool.ca_pem();
    let (ca, c, k) = (
        ca.to_str().expect("utf8"),
        c.to_str().expect("utf8"),
        k.to_str().expect("utf8"),
    );
    let endpoint = free.to_string();
    let args = [
        "node",
        "--endpoint",
        &endpoint,
        "--ca",
        ca,
        "--cert",
        c,
        "--key",
        k,
        "status",
    ];
    let out = basalt(&args);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("cannot reach the node at {free}")));

    let missing = pool.certs.join("missing.pem");
    let missing = missing.to_str().expect("utf8");
    let args = [
        "node",
        "--endpoint",
        &endpoint,
        "--ca",
        missing,
        "--cert",
        c,
        "--key",
        k,
        "status",
    ];
    let out = basalt(&args);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("read the certificate in {missing}")));

    let args = [
        "node",
        "--endpoint",
        "node-1:",
        "--ca",
        ca,
        "--cert",
        c,
        "--key",
        k,
        "status",
    ];
    let out = basalt(&args);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(stderr(&out).contains("expected HOST:PORT"));
}

/// `openssl x509 -text` of a certificate file: the independent reading of what
/// `basalt pki issue client` wrote.
fn openssl_text(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(pem)
        .output()
        .expect("openssl is installed (scripts/install-host-tools)");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// The line after `X509v3 Extended Key Usage:`.
fn eku_line(text: &str) -> String {
    let mut lines = text.lines();
    lines
        .find(|l| l.contains("X509v3 Extended Key Usage"))
        .and_then(|_| lines.next())
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| panic!("no extended key usage in\n{text}"))
}

#[test]
fn pki_issue_client_sets_the_role_openssl_sees() {
    use basalt_api::node::access::{ADMIN_OID, READ_OID};
    let pool = Pool::new();
    let ca = pool.ca_dir.to_str().expect("utf8");
    let c = pool.certs.to_str().expect("utf8");
    for (name, role, oid) in [
        ("ro", Some("read"), READ_OID),
        ("rw", Some("admin"), ADMIN_OID),
        ("default", None, ADMIN_OID),
    ] {
        let mut args = vec!["pki", "issue", "client", name, "--ca", ca, "--out", c];
        if let Some(role) = role {
            args.extend(["--role", role]);
        }
        let out = basalt(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let eku = eku_line(&openssl_text(&pool.certs.join(format!("{name}.pem"))));
        assert_eq!(
            eku,
            format!("TLS Web Client Authentication, {oid}"),
            "{name}"
        );
    }
    let out = basalt(&[
        "pki", "issue", "client", "x", "--role", "root", "--ca", ca, "--out", c,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("admin, read"), "{}", stderr(&out));
}
