//! The node API over loopback TLS, with certificates made by rcgen, a main loop with a
//! real supervisor on a thread, and a K3s server whose CA never matches.

use super::*;
use crate::join::{CaChecker, Joiner, NodeHost, Retry};
use crate::net::NetworkUp;
use crate::node_api::Limits;
use crate::pid1::mailbox::{self, Command, Control, LineCounts};
use crate::pid1::supervise::{Exit, RestartPolicy, ServiceSpec, Supervisor};
use basalt_api::config::{MachineConfig, Token};
use basalt_api::k3s::{CaCheck, K3sError};
use basalt_api::node::{ApplyResponse, ErrorBody, Health, JoinState, Status};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;

const SERVER_HASH: &str = "3333333333333333333333333333333333333333333333333333333333333333";
const TOKEN_HASH: &str = "4444444444444444444444444444444444444444444444444444444444444444";

struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    other_ca_pem: String,
    /// Made by openssl with the admin role OID, serial 0x0a01.
    admin: Identity,
    /// Made by openssl with the read role OID, serial 0x0b02.
    reader: Identity,
    ca_der: CertificateDer<'static>,
    node_cert: String,
    node_key: String,
    /// rcgen, clientAuth only: a certificate from before roles.
    unmarked: Identity,
    other_ca_client: Identity,
    expired_client: Identity,
}

/// A client certificate made by openssl (an oracle independent of rcgen and of
/// basalt's own encoding of the role OIDs), signed by the CA in `ca_pem`/`ca_key`.
fn openssl_client(ca_pem: &str, ca_key: &str, cn: &str, eku: &str, serial: &str) -> Identity {
    let dir = tempfile::tempdir().expect("tmp");
    let p = |f: &str| dir.path().join(f);
    std::fs::write(p("ca.pem"), ca_pem).expect("write");
    std::fs::write(p("ca.key"), ca_key).expect("write");
    std::fs::write(
        p("ext.cnf"),
        format!("basicConstraints=CA:FALSE\nextendedKeyUsage={eku}\n"),
    )
    .expect("write");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl is installed (scripts/install-host-tools)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "c.key",
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        "c.key",
        "-subj",
        &format!("/CN={cn}"),
        "-out",
        "c.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "c.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        serial,
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "c.pem",
    ]);
    let cert = CertificateDer::from_pem_file(p("c.pem")).expect("cert");
    let key = PrivateKeyDer::from_pem_file(p("c.key")).expect("key");
    Identity { cert, key }
}

/// `openssl x509 -noout <what>` of a PEM certificate, its answer after the `=`.
fn openssl_field(pem: &str, what: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("c.pem"), pem).expect("write");
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", what, "-in", "c.pem"])
        .current_dir(dir.path())
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text.split_once('=')
        .map(|(_, v)| v.to_owned())
        .expect("field")
}

fn ca(cn: &str) -> (String, CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("key");
    let cert = p.self_signed(&key).expect("self-sign");
    (cert.pem(), cert.der().clone(), Issuer::new(p, key))
}

fn ca_key(issuer: &Issuer<'static, KeyPair>) -> String {
    issuer.key().serialize_pem()
}

fn leaf(
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    by: &Issuer<'static, KeyPair>,
    expired: bool,
) -> (rcgen::Certificate, KeyPair) {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.extended_key_usages = vec![usage];
    p.subject_alt_names = vec![SanType::DnsName(cn.try_into().expect("dns name"))];
    if expired {
        p.not_before = date_time_ymd(2000, 1, 1);
        p.not_after = date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, by).expect("sign");
    (cert, key)
}

fn identity((cert, key): (rcgen::Certificate, KeyPair)) -> Identity {
    Identity {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

impl Pki {
    fn new() -> Pki {
        let (ca_pem, ca_der, issuer) = ca("basalt pool CA");
        let (other_ca_pem, _, other) = ca("another pool CA");
        let key = ca_key(&issuer);
        let admin_eku = format!("clientAuth,{}", basalt_api::node::access::ADMIN_OID);
        let read_eku = format!("clientAuth,{}", basalt_api::node::access::READ_OID);
        let (node, node_key) = leaf(
            "node-1",
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
            false,
        );
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        Pki {
            admin: openssl_client(&ca_pem, &key, "operator", &admin_eku, "0x0a01"),
            reader: openssl_client(&ca_pem, &key, "dashboard", &read_eku, "0x0b02"),
            other_ca_pem,
            ca_pem,
            ca_der,
            node_cert: node.pem(),
            node_key: node_key.serialize_pem(),
            unmarked: identity(leaf("old-operator", client.clone(), &issuer, false)),
            other_ca_client: identity(leaf("operator", client.clone(), &other, false)),
            expired_client: identity(leaf("operator", client, &issuer, true)),
            issuer,
        }
    }

    /// A machine config with this PKI's `[api]`, and `extra` after it.
    fn config(&self, extra: &str) -> String {
        format!(
            "version = 1\n[api]\nca = \"\"\"{}\"\"\"\ncert = \"\"\"{}\"\"\"\nkey = \"\"\"{}\"\"\"\n{extra}",
            self.ca_pem, self.node_cert, self.node_key
        )
    }
}

/// A K3s server whose CA is never the one the token pins.
struct Mismatch;

impl CaChecker for Mismatch {
    fn check(&self, server: &str, token: &Token) -> Result<CaCheck, K3sError> {
        Err(K3sError::CaMismatch {
            server: server.into(),
            expected: token.ca_hash().unwrap_or_default().into(),
            actual: SERVER_HASH.into(),
        })
    }
}

/// A K3s server whose CA is always the one the token pins.
struct Match;

impl CaChecker for Match {
    fn check(&self, _: &str, token: &Token) -> Result<CaCheck, K3sError> {
        Ok(CaCheck::Matched {
            hash: token.ca_hash().unwrap_or_default().into(),
        })
    }
}

/// A node whose agent always starts: what is persisted is recorded, nothing runs.
#[derive(Clone, Default)]
/// Persisted configs, what `agent_run` answers, and restarts asked for.
struct AgentStarts(
    Arc<Mutex<Vec<String>>>,
    Arc<Mutex<Option<crate::join::AgentRun>>>,
    Arc<Mutex<usize>>,
);

impl crate::join::Host for AgentStarts {
    fn stage_persist(
        &self,
        text: &str,
    ) -> Result<Box<dyn crate::join::Commit>, crate::join::JoinError> {
        let (saved, text) = (Arc::clone(&self.0), text.to_owned());
        Ok(Box::new(crate::join::CommitFn(move || {
            saved.lock().expect("lock").push(text);
            Ok(())
        })))
    }
    fn node_ip(&self, _: &MachineConfig) -> Option<std::net::IpAddr> {
        None
    }
    fn stage_k3s_config(
        &self,
        _: &str,
    ) -> Result<Box<dyn crate::join::Commit>, crate::join::JoinError> {
        Ok(Box::new(crate::join::CommitFn(|| Ok(()))))
    }
    fn close_metadata(&self) -> Result<(), crate::join::JoinError> {
        Ok(())
    }
    fn start_agent(&self) -> Result<(), crate::join::JoinError> {
        Ok(())
    }
    fn restart_agent(&self) -> Result<(), crate::join::JoinError> {
        *self.2.lock().expect("lock") += 1;
        Ok(())
    }
    fn agent_run(&self) -> Option<crate::join::AgentRun> {
        self.1.lock().expect("lock").clone()
    }
}

/// PID1's main loop in miniature: answers commands, polls and reaps its services, and
/// hands power requests to the test.
fn main_loop(rx: Receiver<Command>, powers: Sender<mailbox::Power>) {
    let counts = Rc::new(LineCounts::default());
    let c = counts.clone();
    let mut sup = Supervisor::new(Box::new(move |name, _| c.add(name)));
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(cmd) => {
                if let Some(p) = mailbox::handle(cmd, &mut sup, &counts) {
                    let _ = powers.send(p);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        sup.poll(Instant::now());
        for pid in sup.pids() {
            let flags = Some(nix::sys::wait::WaitPidFlag::WNOHANG);
            if let Ok(ws) = nix::sys::wait::waitpid(pid, flags) {
                if let Some((pid, exit)) = Exit::from_wait(ws) {
                    sup.reaped(pid, exit);
                }
            }
        }
    }
}

struct Node {
    addr: SocketAddr,
    pki: Pki,
    root: tempfile::TempDir,
    ctx: Arc<Context>,
    powers: Receiver<mailbox::Power>,
}

fn node() -> Node {
    node_with(Limits::default(), None)
}

/// A node with `limits`. With `joining`, a K3s server that always matches and an agent
/// that always starts (recorded, not run) instead of a mismatching server and the real
/// node host.
fn node_with(limits: Limits, joining: Option<Box<dyn crate::join::Host>>) -> Node {
    let pki = Pki::new();
    let root = tempfile::tempdir().expect("tempdir");
    let (control, rx) = Control::new(Arc::new(|| {}));
    let (ptx, powers) = mpsc::channel();
    std::thread::spawn(move || main_loop(rx, ptx));
    let joiner = Arc::new(match joining {
        Some(host) => Joiner::new(Box::new(Match), host, Retry::default()),
        None => {
            let host = NodeHost {
                root: root.path().into(),
                control: control.clone(),
            };
            Joiner::new(Box::new(Mismatch), Box::new(host), Retry::default())
        }
    });
    let config = MachineConfig::parse(&pki.config("")).expect("config");
    let ctx = Arc::new(
        Context::new(
            root.path().into(),
            control,
            joiner,
            NetworkUp::default(),
            None,
            &config.api,
        )
        .expect("context")
        .with_limits(limits),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let c = ctx.clone();
    std::thread::spawn(move || serve(c, listener));
    Node {
        addr,
        pki,
        root,
        ctx,
        powers,
    }
}

/// A client that trusts the pool CA, with `who`'s certificate or none.
fn client_config(
    ca: &CertificateDer<'static>,
    who: Option<&Identity>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    Arc::new(match who {
        Some(id) => builder
            .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    })
}

/// A TLS connection to the node over `tcp`, the handshake not done yet.
fn tls_over(
    config: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = ServerName::try_from("node-1").expect("name");
    let conn = rustls::ClientConnection::new(config, name).expect("client");
    rustls::StreamOwned::new(conn, tcp)
}

/// A raw exchange; the status and body, or the client's error.
fn exchange(n: &Node, who: Option<&Identity>, request: &[u8]) -> io::Result<(u16, String)> {
    let tcp = TcpStream::connect(n.addr)?;
    exchange_over(n, who, tcp, request)
}

/// [`exchange`] over a connection the caller made (from another source address, or with
/// a shorter read time-out).
fn exchange_over(
    n: &Node,
    who: Option<&Identity>,
    tcp: TcpStream,
    request: &[u8],
) -> io::Result<(u16, String)> {
    if tcp.read_timeout()?.is_none() {
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    }
    let mut tls = tls_over(client_config(&n.pki.ca_der, who), tcp);
    tls.write_all(request)?;
    tls.flush()?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

fn get(n: &Node, who: Option<&Identity>, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: node-1\r\n\r\n");
    exchange(n, who, req.as_bytes()).expect("exchange")
}

fn post(n: &Node, who: Option<&Identity>, path: &str, body: &str) -> (u16, String) {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: node-1\r\nContent-Type: application/toml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(n, who, req.as_bytes()).expect("exchange")
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not an ErrorBody ({e}): {body}"))
        .error
}

#[test]
fn health_answers_without_a_client_certificate_and_says_nothing_secret() {
    let n = node();
    let (status, body) = get(&n, None, "/v1/health");
    assert_eq!(status, 200, "{body}");
    let h: Health = serde_json::from_str(&body).expect("Health");
    assert_eq!(h.status, "ok");
    let fields = serde_json::from_str::<serde_json::Value>(&body).expect("json");
    assert_eq!(fields.as_object().map(|o| o.len()), Some(2), "{body}");
}

#[test]
fn every_other_endpoint_needs_a_client_certificate() {
    let n = node();
    for path in [
        "/v1/status",
        "/v1/metrics",
        "/v1/logs/k3s",
        "/v1/no-such-thing",
    ] {
        let (status, body) = get(&n, None, path);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(error_of(&body).contains("client certificate"), "{body}");
    }
    for path in ["/v1/config", "/v1/reboot", "/v1/shutdown"] {
        let (status, body) = post(&n, None, path, &n.pki.config(""));
        assert_eq!(status, 401, "{path}: {body}");
    }
    assert!(n.powers.try_recv().is_err());
    assert!(!n
        .root
        .path()
        .join(crate::config_source::STATE_CONFIG)
        .exists());
}

#[test]
fn status_with_a_pool_certificate_reports_the_node() {
    let n = node();
    let (status, body) = get(&n, Some(&n.pki.admin), "/v1/status");
    assert_eq!(status, 200, "{body}");
    let s: Status = serde_json::from_str(&body).expect("Status");
    assert_eq!(s.versions.basalt, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.join.state, JoinState::Standby);
    assert_eq!(s.config_source, None);
    assert_eq!(s.slot, "unknown");
    assert!(s.services.is_empty());
}

/// The rustls error inside what the client saw, if any.
fn alert(result: io::Result<(u16, String)>) -> Option<rustls::Error> {
    let err = result.err()?;
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned()
}

#[test]
fn certificates_from_another_ca_or_expired_fail_the_handshake_with_a_reason() {
    let n = node();
    let req = b"GET /v1/health HTTP/1.1\r\n\r\n";
    let got = alert(exchange(&n, Some(&n.pki.other_ca_client), req));
    assert_eq!(
        got,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA
        ))
    );
    let got = alert(exchange(&n, Some(&n.pki.expired_client), req));
    assert_eq!(
        got,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateExpired
        ))
    );
    // Counted by the server thread right after it sent the alert the client read.
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.ctx.metrics.handshake_failures.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "handshake failures not counted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(n.ctx.metrics.handshake_failures.load(Ordering::Relaxed), 2);
}

#[test]
fn oversized_malformed_and_misrouted_requests_get_json_errors() {
    let n = node();
    let me = Some(&n.pki.admin);
    let big = "x".repeat(http::BODY_LIMIT + 1);
    let (status, body) = post(&n, me, "/v1/config", &big);
    assert_eq!(status, 413, "{body}");
    assert!(error_of(&body).contains("larger than"), "{body}");
    let (status, body) = exchange(&n, me, b"GET /v1/status HTTP/1.0\r\n\r\n").expect("exchange");
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&n, me, "/v1/nope");
    assert_eq!((status, error_of(&body).contains("/v1/nope")), (404, true));
    let (status, _) = get(&n, me, "/v1/config");
    assert_eq!(status, 405);
    let (status, _) = get(&n, me, "/v1/logs/bad%20name");
    assert_eq!(status, 400);
    let (status, body) = get(&n, me, "/v1/logs/k3s?follow=%zz");
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body).contains("query parameter \"follow\""),
        "{body}"
    );
    let (status, _) = get(&n, me, "/v1/logs/k3s");
    assert_eq!(status, 404);
}

#[test]
fn an_invalid_config_is_refused_with_the_key_it_trips_on() {
    let n = node();
    let me = Some(&n.pki.admin);
    let cases = [
        (n.pki.config("[node]\nsurprise = 1\n"), "node.surprise"),
        ("{\"version\": 1}".to_owned(), "TOML"),
        (
            n.pki
                .config("[cluster]\nserver = \"https://s:6443\"\ntoken = \"K10abc::x:y\"\n"),
            "cluster.token",
        ),
        (
            n.pki.config("").replace(
                &n.pki.node_key,
                "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
            ),
            "api.key",
        ),
    ];
    for (config, key) in cases {
        let (status, body) = post(&n, me, "/v1/config", &config);
        assert_eq!(status, 400, "{body}");
        assert!(error_of(&body).contains(key), "{key}: {body}");
    }
    assert!(!n
        .root
        .path()
        .join(crate::config_source::STATE_CONFIG)
        .exists());
}

#[test]
fn a_join_whose_ca_does_not_match_is_not_applied_and_status_says_why() {
    let n = node();
    let me = Some(&n.pki.admin);
    let cluster = format!(
        "[cluster]\nserver = \"https://10.0.2.2:6443\"\ntoken = \"K10{TOKEN_HASH}::server:pw\"\n"
    );
    let (status, body) = post(&n, me, "/v1/config", &n.pki.config(&cluster));
    assert_eq!(status, 200, "{body}");
    let a: ApplyResponse = serde_json::from_str(&body).expect("ApplyResponse");
    assert!(!a.applied, "{body}");
    assert_eq!(a.join.state, JoinState::Failed);
    assert!(
        a.message.contains(SERVER_HASH) && a.message.contains(TOKEN_HASH),
        "{body}"
    );
    assert!(!n
        .root
        .path()
        .join(crate::config_source::STATE_CONFIG)
        .exists());
    let (_, body) = get(&n, me, "/v1/status");
    let s: Status = serde_json::from_str(&body).expect("Status");
    assert_eq!(s.join.state, JoinState::Failed);
    assert!(s.join.last_error.is_some_and(|e| e.contains(SERVER_HASH)));
    assert!(s.services.is_empty(), "nothing may run: {:?}", s.services);
}

#[test]
fn a_standby_config_is_saved_privately_and_becomes_the_source() {
    let n = node();
    let me = Some(&n.pki.admin);
    let config = n.pki.config("[node]\nhostname = \"node-1\"\n");
    let (status, body) = post(&n, me, "/v1/config", &config);
    assert_eq!(status, 200, "{body}");
    let a: ApplyResponse = serde_json::from_str(&body).expect("ApplyResponse");
    assert!(a.applied, "{body}");
    assert_eq!(
        (a.source.as_str(), a.join.state),
        ("state", JoinState::Standby)
    );
    let saved = n.root.path().join(crate::config_source::STATE_CONFIG);
    assert_eq!(std::fs::read_to_string(&saved).expect("saved"), config);
    assert_eq!(
        std::fs::metadata(&saved).expect("meta").mode() & 0o777,
        0o600
    );
    let (_, body) = get(&n, me, "/v1/status");
    let s: Status = serde_json::from_str(&body).expect("Status");
    assert_eq!(s.config_source.as_deref(), Some("state"));
}

#[test]
fn status_says_which_config_sources_were_passed_over_until_a_config_is_applied() {
    use basalt_api::node::{ConfigReport, RejectedSource};
    let n = node();
    let me = Some(&n.pki.admin);
    let report = ConfigReport {
        rejected: vec![RejectedSource {
            source: "fw_cfg".into(),
            reason: "machine config from fw_cfg opt/basalt/config: node.surprise: unknown key"
                .into(),
        }],
        warnings: vec!["machine config from kernel command line basalt.config is used, but not kept for the next boot".into()],
    };
    n.ctx.set_config_report(report.clone());
    let (status, body) = get(&n, me, "/v1/status");
    assert_eq!(status, 200, "{body}");
    let s: Status = serde_json::from_str(&body).expect("Status");
    assert_eq!(s.config_report, report);
    // An applied config replaces the boot's, and what was wrong with its sources.
    let (status, body) = post(&n, me, "/v1/config", &n.pki.config(""));
    assert_eq!(status, 200, "{body}");
    let (_, body) = get(&n, me, "/v1/status");
    let s: Status = serde_json::from_str(&body).expect("Status");
    assert_eq!(s.config_report, ConfigReport::default());
}

#[test]
fn logs_of_a_service_and_following_them() {
    let n = node();
    let me = Some(&n.pki.admin);
    let spec = ServiceSpec {
        name: "chatty".into(),
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo one; sleep 0.5; echo two; sleep 30".into(),
        ],
        env: vec![],
        restart: RestartPolicy::default(),
        stop_timeout: Duration::from_millis(100),
    };
    n.ctx.control.start(spec).expect("started");
    // Followed: the chunked stream brings the second line as it comes.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(n.pki.ca_der.clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![n.pki.admin.cert.clone()], n.pki.admin.key.clone_key())
    .expect("client");
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from("node-1").expect("name"),
    )
    .expect("conn");
    let tcp = TcpStream::connect(n.addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /v1/logs/chatty?follow=1 HTTP/1.1\r\n\r\n")
        .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("two\n") {
        let k = tls.read(&mut buf).expect("read");
        assert!(k > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..k]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("Transfer-Encoding: chunked"), "{text}");
    assert!(text.find("one\n") < text.find("two\n"), "{text}");
    drop(tls);
    // Not followed: what is kept, at once.
    let (status, body) = get(&n, me, "/v1/logs/chatty");
    assert_eq!((status, body.as_str()), (200, "one\ntwo\n"));
    let (_, body) = get(&n, me, "/v1/metrics");
    assert!(
        body.contains("basalt_service_up{service=\"chatty\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("basalt_api_requests_total{code=\"200\"}"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE basalt_milestone_seconds gauge"),
        "{body}"
    );
    assert!(
        body.contains("basalt_join_state{state=\"standby\"} 1"),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "basalt_console_dropped_lines_total {}",
            crate::pid1::console::dropped()
        )),
        "{body}"
    );
}

#[test]
fn reboot_and_shutdown_answer_first_then_reach_the_main_loop() {
    let n = node();
    let me = Some(&n.pki.admin);
    let (status, body) = post(&n, me, "/v1/reboot", "");
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("rebooting"), "{body}");
    let got = n.powers.recv_timeout(Duration::from_secs(10));
    assert_eq!(got, Ok(mailbox::Power::Reboot));
    let (status, _) = post(&n, me, "/v1/shutdown", "");
    assert_eq!(status, 202);
    let got = n.powers.recv_timeout(Duration::from_secs(10));
    assert_eq!(got, Ok(mailbox::Power::PowerOff));
}

/// A connection to the node from `from`: every address of 127/8 is loopback's, so the
/// tests can be many clients.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("the test node listens on IPv4 loopback")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(from, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(to))?;
    Ok(TcpStream::from(fd))
}

/// How a slow client holds its connection.
#[derive(Debug, Clone, Copy)]
enum Slow {
    /// A TLS record header, then the record one byte at a time: the handshake never ends.
    Handshake,
    /// A handshake without a certificate, then a request head one byte at a time.
    Head,
}

/// A slow client from `from`: keeps a connection open by sending a byte every `every`,
/// and opens a new one each time the node closes it, until `stop`. `opened` counts the
/// connections that got as far as `how` needs.
struct SlowClient {
    ca: CertificateDer<'static>,
    node: SocketAddr,
    from: Ipv4Addr,
    how: Slow,
    every: Duration,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
}

impl SlowClient {
    fn spawn(self) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while !self.stop.load(Ordering::SeqCst) {
                let _ = self.hold();
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    }

    /// One connection, until the node closes it.
    fn hold(&self) -> io::Result<()> {
        let tcp = connect_from(self.from, self.node)?;
        tcp.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut sink: Box<dyn Write> = match self.how {
            Slow::Handshake => {
                let mut tcp = tcp;
                // A handshake record of 512 bytes, announced.
                tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])?;
                Box::new(tcp)
            }
            Slow::Head => {
                let mut tls = tls_over(client_config(&self.ca, None), tcp);
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock)?;
                }
                tls.write_all(b"G")?;
                tls.flush()?;
                Box::new(tls)
            }
        };
        self.opened.fetch_add(1, Ordering::SeqCst);
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(self.every);
            sink.write_all(b"E")?;
            sink.flush()?;
        }
        Ok(())
    }
}

#[test]
fn slow_clients_holding_every_open_slot_do_not_lock_out_a_pool_certificate() {
    let n = node();
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    // As many as the node has slots for connections without a certificate, each from an
    // address of its own (so no per-address cap stops them), half of them in the
    // handshake, half in the request head, a byte every half second: well inside any
    // per-read time-out.
    let slow = u8::try_from(crate::node_api::OPEN_SLOTS).expect("a few");
    let clients: Vec<_> = (0..slow)
        .map(|i| {
            SlowClient {
                ca: n.pki.ca_der.clone(),
                node: n.addr,
                from: Ipv4Addr::new(127, 0, 0, 2 + i),
                how: if i % 2 == 0 {
                    Slow::Handshake
                } else {
                    Slow::Head
                },
                every: Duration::from_millis(500),
                stop: stop.clone(),
                opened: opened.clone(),
            }
            .spawn()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while opened.load(Ordering::SeqCst) < usize::from(slow) {
        assert!(
            Instant::now() < deadline,
            "the slow clients did not connect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for("every open slot taken", || {
        n.ctx.connections().0 == crate::node_api::OPEN_SLOTS
    });

    let me = Some(&n.pki.admin);
    let t = Instant::now();
    let (status, body) = get(&n, me, "/v1/status");
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&n, me, "/v1/config", &n.pki.config(""));
    assert_eq!(status, 200, "{body}");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "status and apply took {took:?} under the slow load"
    );
    assert!(
        n.ctx.metrics.over_capacity.load(Ordering::Relaxed) > 0,
        "slow clients were shut down to make room"
    );
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("slow client");
    }
}

#[test]
fn a_client_without_a_certificate_is_refused_on_the_head_before_any_body() {
    let n = node();
    for expect in ["", "Expect: 100-continue\r\n"] {
        let tcp = TcpStream::connect(n.addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let head = format!(
            "POST /v1/config HTTP/1.1\r\nHost: node-1\r\n{expect}Content-Length: {}\r\n\r\n",
            http::BODY_LIMIT
        );
        let t = Instant::now();
        let (status, body) =
            exchange_over(&n, None, tcp, head.as_bytes()).expect("an answer without the body");
        assert_eq!(status, 401, "{body}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}

#[test]
fn a_followed_log_ends_when_the_client_keeps_sending() {
    let n = node();
    let spec = ServiceSpec {
        name: "quiet".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), "echo one; sleep 30".into()],
        env: vec![],
        restart: RestartPolicy::default(),
        stop_timeout: Duration::from_millis(100),
    };
    n.ctx.control.start(spec).expect("started");
    let tcp = TcpStream::connect(n.addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    tcp.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut tls = tls_over(client_config(&n.pki.ca_der, Some(&n.pki.admin)), tcp);
    tls.write_all(b"GET /v1/logs/quiet?follow=1 HTTP/1.1\r\n\r\n")
        .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("one\n") {
        let k = tls.read(&mut buf).expect("read");
        assert!(k > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..k]);
    }
    // A client that keeps talking to a followed log: the node stops following (and
    // drains what is left, so the end reaches us) instead of spinning on it.
    let t = Instant::now();
    for _ in 0..32 {
        if tls.write_all(&[b'x'; 8192]).is_err() {
            break;
        }
    }
    let _ = tls.flush();
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => seen.extend_from_slice(&buf[..k]),
            Err(e) => panic!(
                "the follow did not end ({e}): {}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    assert!(
        String::from_utf8_lossy(&seen).ends_with("0\r\n\r\n"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// Waits (5 s at most) until `done`.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the other side closed `r` (end of stream, or the connection reset) rather
/// than the read timing out.
fn closed(got: io::Result<usize>) -> bool {
    match got {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn one_address_gets_its_cap_of_connections_and_no_more() {
    let n = node_with(
        Limits {
            per_address: 2,
            ..Limits::default()
        },
        None,
    );
    let a = Ipv4Addr::new(127, 0, 0, 3);
    let first = connect_from(a, n.addr).expect("first");
    let _second = connect_from(a, n.addr).expect("second");
    wait_for("two connections admitted", || n.ctx.connections().0 == 2);
    let mut third = connect_from(a, n.addr).expect("third");
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let t = Instant::now();
    assert!(closed(third.read(&mut [0u8; 64])), "a third is closed");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(n.ctx.metrics.over_capacity.load(Ordering::Relaxed), 1);
    // Another address is served meanwhile.
    let health = b"GET /v1/health HTTP/1.1\r\n\r\n";
    let other = connect_from(Ipv4Addr::new(127, 0, 0, 4), n.addr).expect("other");
    let (status, body) = exchange_over(&n, None, other, health).expect("other address");
    assert_eq!(status, 200, "{body}");
    // A closed connection gives its place back.
    drop(first);
    wait_for("the first given back", || n.ctx.connections().0 == 1);
    let again = connect_from(a, n.addr).expect("again");
    let (status, body) = exchange_over(&n, None, again, health).expect("again");
    assert_eq!(status, 200, "{body}");
}

/// How a client trickles one phase of a connection.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Handshake,
    Head,
    Body,
}

#[test]
fn each_phase_has_a_deadline_however_the_client_trickles() {
    let short = Duration::from_millis(400);
    let n = node_with(
        Limits {
            handshake: short,
            head: short,
            body_floor: short,
            body_min_rate: 1 << 30,
            ..Limits::default()
        },
        None,
    );
    for phase in [Phase::Handshake, Phase::Head, Phase::Body] {
        let tcp = TcpStream::connect(n.addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let t = Instant::now();
        // A byte every 100 ms, well inside any per-read time-out, until the node closes.
        let mut conn: Box<dyn ReadWrite> = match phase {
            Phase::Handshake => {
                let mut tcp = tcp;
                tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
                    .expect("send");
                Box::new(tcp)
            }
            Phase::Head | Phase::Body => {
                let mut tls = tls_over(client_config(&n.pki.ca_der, Some(&n.pki.admin)), tcp);
                let start: &[u8] = match phase {
                    Phase::Head => b"GET /v1/status HTTP/1.1\r\nX: ",
                    _ => b"POST /v1/config HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
                };
                tls.write_all(start).expect("send");
                Box::new(tls)
            }
        };
        let ended = loop {
            let mut buf = [0u8; 1024];
            let got = conn.read(&mut buf);
            if closed(got) {
                break t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(8),
                "{phase:?}: still open after 8 s"
            );
            if conn.write_all(b"a").and_then(|()| conn.flush()).is_err() {
                break t.elapsed();
            }
        };
        assert!(
            ended >= short / 2 && ended < short + Duration::from_secs(3),
            "{phase:?}: closed after {ended:?}"
        );
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[test]
fn routes_need_read_or_admin_from_the_head_alone() {
    use basalt_api::node::access::Access;
    assert_eq!(routes::needs("GET", "/v1/health"), None);
    for (m, p) in [
        ("GET", "/v1/status"),
        ("GET", "/v1/metrics"),
        ("GET", "/v1/logs/k3s"),
        ("GET", "/v1/nope"),
    ] {
        assert_eq!(routes::needs(m, p), Some(Access::Read), "{m} {p}");
    }
    for p in ["/v1/config", "/v1/reboot", "/v1/shutdown"] {
        assert_eq!(routes::needs("POST", p), Some(Access::Admin), "{p}");
        // A wrong method still needs admin before it learns it is wrong.
        assert_eq!(routes::needs("GET", p), Some(Access::Admin), "{p}");
    }
}

#[test]
fn read_and_unmarked_certificates_see_the_node_but_cannot_change_it() {
    let n = node();
    for (who, unmarked) in [(&n.pki.reader, false), (&n.pki.unmarked, true)] {
        let me = Some(who);
        let (status, body) = get(&n, me, "/v1/status");
        assert_eq!(status, 200, "{body}");
        let (status, _) = get(&n, me, "/v1/metrics");
        assert_eq!(status, 200);
        let (status, body) = get(&n, me, "/v1/logs/k3s");
        assert_eq!(status, 404, "a read route, no such service: {body}");
        for path in ["/v1/config", "/v1/reboot", "/v1/shutdown"] {
            let (status, body) = post(&n, me, path, &n.pki.config(""));
            assert_eq!(status, 403, "{path}: {body}");
            let error = error_of(&body);
            assert!(error.contains("needs the admin role"), "{error}");
            assert_eq!(error.contains("--role admin"), unmarked, "{error}");
        }
    }
    assert!(n.powers.try_recv().is_err(), "nothing powered off");
    assert!(!n
        .root
        .path()
        .join(crate::config_source::STATE_CONFIG)
        .exists());
    // The admin certificate (openssl's encoding of the admin OID) may.
    let (status, body) = post(&n, Some(&n.pki.admin), "/v1/reboot", "");
    assert_eq!(status, 202, "{body}");
}

#[test]
fn a_revoked_serial_is_refused_on_the_next_connection() {
    let n = node();
    let (status, _) = get(&n, Some(&n.pki.reader), "/v1/status");
    assert_eq!(status, 200);
    // openssl prints the serial it set as 0B02; the config takes it in that form.
    assert_eq!(
        openssl_field(&pem_of(&n.pki.reader.cert), "-serial"),
        "0B02"
    );
    let config = n
        .pki
        .config("")
        .replace("key = \"\"\"", "revoked = [\"0B:02\"]\nkey = \"\"\"");
    let (status, body) = post(&n, Some(&n.pki.admin), "/v1/config", &config);
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&n, Some(&n.pki.reader), "/v1/status");
    assert_eq!(status, 401, "{body}");
    assert!(error_of(&body).contains("serial b02 is revoked"), "{body}");
    let (status, _) = get(&n, Some(&n.pki.admin), "/v1/status");
    assert_eq!(status, 200, "others still get in");
}

/// A DER certificate as PEM, for openssl.
fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[test]
fn an_apply_that_would_lock_out_its_client_or_serve_a_bad_cert_is_refused() {
    let n = node();
    let me = Some(&n.pki.admin);
    // A node certificate for another name, and an expired one, from the same CA.
    let (_, _, pool) = ca("pool CA 2");
    let (wrong, wrong_key) = leaf("node-2", ExtendedKeyUsagePurpose::ServerAuth, &pool, false);
    let (old, old_key) = leaf("node-1", ExtendedKeyUsagePurpose::ServerAuth, &pool, true);
    let with_cert = |cert: &str, key: &str| {
        format!(
            "version = 1\n[node]\nhostname = \"node-1\"\n[api]\nca = \"\"\"{}\"\"\"\ncert = \"\"\"{cert}\"\"\"\nkey = \"\"\"{key}\"\"\"\n",
            n.pki.ca_pem
        )
    };
    let cases = [
        (
            n.pki.config("").replace(&n.pki.ca_pem, &n.pki.other_ca_pem),
            "api.ca: would not verify the client certificate",
        ),
        (
            n.pki
                .config("")
                .replace("key = \"\"\"", "revoked = [\"a01\"]\nkey = \"\"\""),
            "api.revoked: lists serial a01",
        ),
        (
            with_cert(&old.pem(), &old_key.serialize_pem()),
            "api.cert: expired on",
        ),
        (
            with_cert(&wrong.pem(), &wrong_key.serialize_pem()),
            "api.cert: issued for [\"node-2\"], not for the node's name \"node-1\"",
        ),
    ];
    for (config, want) in cases {
        let (status, body) = post(&n, me, "/v1/config", &config);
        assert_eq!(status, 400, "{want}: {body}");
        assert!(error_of(&body).contains(want), "{want}: {body}");
    }
    assert!(!n
        .root
        .path()
        .join(crate::config_source::STATE_CONFIG)
        .exists());
    // The node's name, when the config has none, is the running hostname.
    std::fs::create_dir_all(n.root.path().join("proc/sys/kernel")).expect("mkdir");
    std::fs::write(n.root.path().join("proc/sys/kernel/hostname"), "node-9\n").expect("write");
    let (status, body) = post(&n, me, "/v1/config", &n.pki.config(""));
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).contains("\"node-9\""), "{body}");
    std::fs::write(n.root.path().join("proc/sys/kernel/hostname"), "node-1\n").expect("write");
    let (status, body) = post(&n, me, "/v1/config", &n.pki.config(""));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn status_and_metrics_show_when_the_node_certificate_expires() {
    let n = node();
    let me = Some(&n.pki.reader);
    let (_, body) = get(&n, me, "/v1/status");
    let s: Status = serde_json::from_str(&body).expect("Status");
    let cert = s.api_cert.expect("api_cert in status");
    // openssl's reading of the same certificate, and date(1)'s of openssl's date.
    let end = openssl_field(&n.pki.node_cert, "-enddate");
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &end, "+%s"])
        .output()
        .expect("date");
    let epoch: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("seconds");
    assert_eq!(cert.not_after, epoch);
    let serial = openssl_field(&n.pki.node_cert, "-serial").to_ascii_lowercase();
    assert_eq!(cert.serial, serial.trim_start_matches('0'));
    let (_, body) = get(&n, me, "/v1/metrics");
    assert!(
        body.contains(&format!("basalt_api_cert_not_after_seconds {epoch}\n")),
        "{body}"
    );
    assert!(body.contains("# TYPE basalt_api_cert_not_after_seconds gauge"));
}

#[test]
fn a_token_without_a_ca_pin_is_named_in_the_answer() {
    let n = node();
    let me = Some(&n.pki.admin);
    let plain = "[cluster]\nserver = \"https://10.0.2.2:6443\"\ntoken = \"just-a-password\"\n";
    let (status, body) = post(&n, me, "/v1/config", &n.pki.config(plain));
    assert_eq!(status, 200, "{body}");
    let a: ApplyResponse = serde_json::from_str(&body).expect("ApplyResponse");
    assert_eq!(a.warnings.len(), 1, "{body}");
    assert!(
        a.warnings[0].contains("cluster.token has no CA pin"),
        "{body}"
    );
    assert!(
        !body.contains("just-a-password"),
        "the secret is not echoed"
    );
    let pinned = format!(
        "[cluster]\nserver = \"https://10.0.2.2:6443\"\ntoken = \"K10{TOKEN_HASH}::server:pw\"\n"
    );
    let (_, body) = post(&n, me, "/v1/config", &n.pki.config(&pinned));
    let a: ApplyResponse = serde_json::from_str(&body).expect("ApplyResponse");
    assert!(a.warnings.is_empty(), "{body}");
}

/// The certificate the node serves to a new connection.
fn served_cert(n: &Node) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(n.pki.ca_der.clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("node-1").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut tcp = TcpStream::connect(n.addr).expect("connect");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("handshake");
    }
    conn.peer_certificates().expect("certs")[0]
        .clone()
        .into_owned()
}

#[test]
fn a_joined_node_rotates_its_api_certificate_but_keeps_its_cluster() {
    let host = AgentStarts::default();
    let n = node_with(Limits::default(), Some(Box::new(host.clone())));
    let me = Some(&n.pki.admin);
    let cluster = format!(
        "[node]\nhostname = \"node-1\"\n[cluster]\nserver = \"https://10.0.2.2:6443\"\ntoken = \"K10{TOKEN_HASH}::server:pw\"\n"
    );
    let joined = n.pki.config(&cluster);
    let (status, body) = post(&n, me, "/v1/config", &joined);
    assert_eq!(status, 200, "{body}");
    let a: ApplyResponse = serde_json::from_str(&body).expect("ApplyResponse");
    assert_eq!(a.join.state, JoinState::AgentStarted, "{body}");
    // K3s issued the kubelet credentials.
    *host.1.lock().expect("lock") = Some(crate::join::AgentRun {
        running_for: Some(Duration::from_secs(10)),
        credentials_age: Some(Duration::from_secs(5)),
        ..Default::default()
    });
    let old = served_cert(&n);
    // The same [cluster], a new certificate for the node from the same CA.
    let (fresh, fresh_key) = leaf(
        "node-1",
        ExtendedKeyUsagePurpose::ServerAuth,
        &n.pki.issuer,
        false,
    );
    let rotated = joined
        .replace(&n.pki.node_cert, &fresh.pem())
        .replace(&n.pki.node_key, &fresh_key.serialize_pem());
    assert_ne!(rotated, joined);
    let (status, body) = post(&n, me, "/v1/config", &rotated);
    assert_eq!(status, 200, "{body}");
    let a: ApplyResponse = serde_json::from_str(&body).expect("ApplyResponse");
    assert!(a.applied, "{body}");
    assert_eq!(a.join.state, JoinState::Registered, "{body}");
    assert!(a.message.contains("keeps running"), "{body}");
    assert_eq!(host.0.lock().expect("lock").last(), Some(&rotated));
    let served = served_cert(&n);
    assert_ne!(served, old);
    assert_eq!(served, fresh.der().clone());
    // Another [cluster] while the agent runs registered: 409, and nothing saved.
    let other = rotated.replace("server:pw", "server:other");
    let (status, body) = post(&n, me, "/v1/config", &other);
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("no other [cluster]"), "{body}");
    assert_eq!(host.0.lock().expect("lock").len(), 2);
    assert_eq!(*host.2.lock().expect("lock"), 0);
}

#[test]
fn a_new_cluster_replaces_the_old_one_while_the_agent_is_down() {
    let host = AgentStarts::default();
    let n = node_with(Limits::default(), Some(Box::new(host.clone())));
    let me = Some(&n.pki.admin);
    let cluster = format!(
        "[node]\nhostname = \"node-1\"\n[cluster]\nserver = \"https://10.0.2.2:6443\"\ntoken = \"K10{TOKEN_HASH}::server:wrong\"\n"
    );
    let wrong = n.pki.config(&cluster);
    let (status, body) = post(&n, me, "/v1/config", &wrong);
    assert_eq!(status, 200, "{body}");
    // The server refuses the password: the agent exits, and exits again.
    std::thread::sleep(Duration::from_millis(50));
    *host.1.lock().expect("lock") = Some(crate::join::AgentRun {
        running_for: None,
        restart_ages: vec![
            Duration::from_millis(30),
            Duration::from_millis(20),
            Duration::from_millis(10),
        ],
        last_exit: Some("exit 1".into()),
        last_line: Some("registration failed: …: 401 Unauthorized".into()),
        credentials_age: None,
    });
    let (status, body) = get(&n, me, "/v1/status");
    assert_eq!(status, 200, "{body}");
    let s: Status = serde_json::from_str(&body).expect("Status");
    assert_eq!(s.join.state, JoinState::CrashLooping, "{body}");
    assert!(body.contains("\"crash-looping\""), "{body}");
    assert!(
        s.join.last_error.is_some_and(|e| e.contains("401")),
        "{body}"
    );
    let (_, metrics) = get(&n, me, "/v1/metrics");
    assert!(
        metrics.contains("basalt_join_state{state=\"crash-looping\"} 1"),
        "{metrics}"
    );
    // The corrected [cluster]: accepted, saved, the agent started again with it.
    let right = wrong.replace("server:wrong", "server:right");
    let (status, body) = post(&n, me, "/v1/config", &right);
    assert_eq!(status, 200, "{body}");
    let a: ApplyResponse = serde_json::from_str(&body).expect("ApplyResponse");
    assert!(a.applied, "{body}");
    assert!(a.message.contains("starts again"), "{body}");
    assert_eq!(host.0.lock().expect("lock").last(), Some(&right));
    assert_eq!(*host.2.lock().expect("lock"), 1);
}

#[test]
fn an_upgrade_body_larger_than_a_config_is_streamed_and_answered_after_it_is_read() {
    let n = node();
    let body = vec![b'x'; http::BODY_LIMIT * 3];
    let request = |path: &str| {
        let mut r = format!(
            "POST {path} HTTP/1.1\r\nHost: node-1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(&body);
        r
    };
    // The read role: refused on the head.
    let (status, _) =
        exchange(&n, Some(&n.pki.reader), &request("/v1/upgrade?sha256=ab")).expect("exchange");
    assert_eq!(status, 403);
    let (status, _) = post(&n, Some(&n.pki.reader), "/v1/rollback", "");
    assert_eq!(status, 403);
    // No expected sha256: refused, but only after the body (no 413, no reset).
    let (status, text) =
        exchange(&n, Some(&n.pki.admin), &request("/v1/upgrade")).expect("exchange");
    assert_eq!(status, 400, "{text}");
    assert!(error_of(&text).contains("sha256="), "{text}");
    // With one: this test node has no disks to find, and says so.
    let sha = "ab".repeat(32);
    let (status, text) = exchange(
        &n,
        Some(&n.pki.admin),
        &request(&format!("/v1/upgrade?sha256={sha}")),
    )
    .expect("exchange");
    assert_eq!(status, 500, "{text}");
    assert!(error_of(&text).contains("find the disks"), "{text}");
    let (status, _) = get(&n, Some(&n.pki.admin), "/v1/upgrade");
    assert_eq!(status, 405);
    // Status carries the upgrade part even off a basalt boot, with what it could not read.
    let (status, text) = get(&n, Some(&n.pki.reader), "/v1/status");
    assert_eq!(status, 200);
    let s: Status = serde_json::from_str(&text).expect("status");
    assert!(s.upgrade.and_then(|u| u.error).is_some(), "{text}");
}

#[test]
fn an_apply_with_the_api_material_in_force_reuses_its_tls_config_and_other_material_is_built_anew()
{
    let n = node();
    let same =
        MachineConfig::parse(&n.pki.config("[node]\nhostname = \"node-1\"\n")).expect("parse");
    let in_force = n.ctx.tls();
    let reused = n.ctx.server_config_for(&same.api).expect("same material");
    assert!(
        Arc::ptr_eq(&in_force, &reused),
        "the same [api] material is not built again"
    );

    // Another node certificate (and key) from the same CA: built and checked anew.
    let (cert, key) = leaf(
        "node-1",
        ExtendedKeyUsagePurpose::ServerAuth,
        &n.pki.issuer,
        false,
    );
    let other = n
        .pki
        .config("")
        .replace(&n.pki.node_cert, &cert.pem())
        .replace(&n.pki.node_key, &key.serialize_pem());
    let other = MachineConfig::parse(&other).expect("parse");
    let built = n.ctx.server_config_for(&other.api).expect("other material");
    assert!(!Arc::ptr_eq(&in_force, &built));

    // The certificate in force with a key that is not its own: refused, not reused.
    let mismatched = n
        .pki
        .config("")
        .replace(&n.pki.node_key, &key.serialize_pem());
    let mismatched = MachineConfig::parse(&mismatched).expect("parse");
    let err = n
        .ctx
        .server_config_for(&mismatched.api)
        .expect_err("a key that does not match the certificate");
    assert!(err.to_string().contains("key"), "{err}");
}
