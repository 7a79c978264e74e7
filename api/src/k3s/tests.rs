use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use super::*;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

struct Ca {
    cert: Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn pem(&self) -> String {
        self.cert.pem()
    }
    fn der(&self) -> &[u8] {
        self.cert.der()
    }
}

fn params(cn: &str, ca: bool, aki: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.use_authority_key_identifier_extension = aki;
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
    } else {
        p.is_ca = IsCa::ExplicitNoCa;
    }
    p
}

fn issue(p: CertificateParams, by: Option<&Ca>) -> Ca {
    let key = KeyPair::generate().unwrap();
    let cert = match by {
        Some(parent) => p.signed_by(&key, &parent.issuer).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    Ca {
        cert,
        issuer: Issuer::new(p, key),
    }
}

fn root(cn: &str) -> Ca {
    issue(params(cn, true, false), None)
}

#[test]
fn a_single_certificate_hashes_the_bytes_as_served() {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    assert_eq!(ca_hash(pem.as_bytes()).unwrap(), sha(pem.as_bytes()));
    // The bytes, not the certificate: another newline is another hash.
    let more = format!("{pem}\n");
    assert_eq!(ca_hash(more.as_bytes()).unwrap(), sha(more.as_bytes()));
    assert_ne!(sha(more.as_bytes()), sha(pem.as_bytes()));
    assert_ne!(ca_hash(pem.as_bytes()).unwrap(), sha(ca.der()));
}

#[test]
fn a_bundle_hashes_the_der_of_its_root() {
    let root = root("root-ca");
    let intermediate = issue(params("intermediate-ca", true, true), Some(&root));
    let server_ca = issue(params("server-ca", true, true), Some(&intermediate));
    let want = sha(root.der());
    let two = format!("{}{}", intermediate.pem(), root.pem());
    assert_eq!(ca_hash(two.as_bytes()).unwrap(), want);
    // Text between blocks and other PEM blocks do not change the root.
    let noisy = format!(
        "# bundle\n{}\n-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{}\n\n",
        intermediate.pem(),
        root.pem()
    );
    assert_eq!(ca_hash(noisy.as_bytes()).unwrap(), want);
    let three = format!("{}{}{}", server_ca.pem(), intermediate.pem(), root.pem());
    assert_eq!(ca_hash(three.as_bytes()).unwrap(), want);
    // Pool order does not matter, only the first certificate's place.
    let shuffled = format!("{}{}{}", server_ca.pem(), root.pem(), intermediate.pem());
    assert_eq!(ca_hash(shuffled.as_bytes()).unwrap(), want);
    // A leaf first, as some bundles have it: still the root.
    let mut leaf = params("k3s", false, true);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = issue(leaf, Some(&intermediate));
    let with_leaf = format!("{}{}{}", leaf.pem(), intermediate.pem(), root.pem());
    assert_eq!(ca_hash(with_leaf.as_bytes()).unwrap(), want);
}

#[test]
fn a_self_signed_root_with_its_own_key_id_is_a_root() {
    // AKI == SKI: K3s files it with the roots.
    let root = issue(params("root-ca", true, true), None);
    let intermediate = issue(params("intermediate-ca", true, true), Some(&root));
    let bundle = format!("{}{}", intermediate.pem(), root.pem());
    assert_eq!(ca_hash(bundle.as_bytes()).unwrap(), sha(root.der()));
}

/// Bundles where Go's `Verify` finds no chain: K3s hashes the bytes as served.
#[test]
fn a_bundle_without_a_chain_hashes_the_bytes() {
    let root_ca = root("root-ca");
    let intermediate = issue(params("intermediate-ca", true, true), Some(&root_ca));

    let mut expired = params("old-root", true, false);
    expired.not_before = date_time_ymd(2000, 1, 1);
    expired.not_after = date_time_ymd(2001, 1, 1);
    let expired = issue(expired, None);
    let under_expired = issue(params("under-old-root", true, true), Some(&expired));

    let not_a_ca = issue(params("not-a-ca", false, true), Some(&root_ca));
    let under_not_a_ca = issue(params("below-not-a-ca", true, true), Some(&not_a_ca));

    let mut constrained = params("constrained-root", true, false);
    constrained.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let constrained = issue(constrained, None);
    let mid = issue(params("mid", true, true), Some(&constrained));
    let below_mid = issue(params("below-mid", true, true), Some(&mid));

    let mut client_only = params("client-only-ca", true, true);
    client_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_only = issue(client_only, Some(&root_ca));

    let cases = [
        (
            "root first",
            format!("{}{}", root_ca.pem(), intermediate.pem()),
        ),
        (
            "unrelated",
            format!("{}{}", intermediate.pem(), root("other").pem()),
        ),
        // Same name as the real root, another key: the signature does not verify.
        (
            "impostor",
            format!("{}{}", intermediate.pem(), root("root-ca").pem()),
        ),
        (
            "expired root",
            format!("{}{}", under_expired.pem(), expired.pem()),
        ),
        (
            "intermediate not a CA",
            format!(
                "{}{}{}",
                under_not_a_ca.pem(),
                not_a_ca.pem(),
                root_ca.pem()
            ),
        ),
        (
            "path length",
            format!("{}{}{}", below_mid.pem(), mid.pem(), constrained.pem()),
        ),
        (
            "client auth only",
            format!("{}{}", client_only.pem(), root_ca.pem()),
        ),
    ];
    for (what, bundle) in cases {
        assert_eq!(
            ca_hash(bundle.as_bytes()).unwrap(),
            sha(bundle.as_bytes()),
            "{what}"
        );
    }
    // The same shapes with a valid chain do hash the root: the cases above fail for the
    // reason they name.
    let ok = format!("{}{}", mid.pem(), constrained.pem());
    assert_eq!(ca_hash(ok.as_bytes()).unwrap(), sha(constrained.der()));
}

/// Golden vectors made by openssl and sha256sum alone (`api/testdata/cahash/make.sh`), so
/// that a wrong hash rule cannot pass by agreeing with itself.
#[test]
fn golden_vectors_made_by_openssl_and_sha256sum() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cahash");
    for name in ["single", "bundle", "unrelated"] {
        let pem = std::fs::read(dir.join(format!("{name}.pem"))).expect("golden pem");
        let want = std::fs::read_to_string(dir.join(format!("{name}.sha256"))).expect("golden");
        assert_eq!(ca_hash(&pem).expect(name), want.trim(), "{name}.pem");
    }
    // The vectors differ where the rules differ: a bundle with a chain is not the file's hash.
    let bundle = std::fs::read(dir.join("bundle.pem")).expect("bundle");
    assert_ne!(ca_hash(&bundle).expect("bundle"), sha(&bundle));
}

#[test]
fn a_bundle_without_certificates_is_an_error() {
    assert!(matches!(ca_hash(b""), Err(K3sError::NoCertificates)));
    assert!(matches!(ca_hash(b"hello"), Err(K3sError::NoCertificates)));
    let key_only = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert!(matches!(ca_hash(key_only), Err(K3sError::NoCertificates)));
    let bad_der = b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        ca_hash(bad_der),
        Err(K3sError::BadCertificate { index: 0, .. })
    ));
    let good = root("ca").pem();
    let second_bad = [good.as_bytes(), bad_der].concat();
    assert!(matches!(
        ca_hash(&second_bad),
        Err(K3sError::BadCertificate { index: 1, .. })
    ));
}

/// A loopback TLS server for these tests: answers every request with `response`.
fn serve(signer: &Ca, response: Vec<u8>) -> SocketAddr {
    let sans = vec![
        rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
        rcgen::SanType::DnsName("localhost".try_into().unwrap()),
    ];
    serve_counting(signer, response, sans).0
}

/// [`serve`] with a server certificate for `sans`, and the number of connections
/// accepted so far.
fn serve_counting(
    signer: &Ca,
    response: Vec<u8>,
    sans: Vec<rcgen::SanType>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, accepted, _) = serve_changing(signer, response, sans);
    (addr, accepted)
}

/// [`serve_counting`], with the response a test may change between connections.
fn serve_changing(
    signer: &Ca,
    response: Vec<u8>,
    sans: Vec<rcgen::SanType>,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<u8>>>) {
    let server = serve_with(signer, response, sans, Conn::Close);
    (server.addr, server.accepted, server.response)
}

/// How [`serve_with`]'s server treats a connection.
#[derive(Clone, Copy)]
enum Conn {
    /// One answer, then close_notify: a server without keep-alive.
    Close,
    /// Answers every request on it (HTTP/1.1 keep-alive, as K3s's Go server does).
    Keep,
    /// Answers so many requests, then reads on and never answers: a connection
    /// something on the way forgot.
    Silent(usize),
}

struct TestServer {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Requests read so far, answered or not.
    requests: Arc<AtomicUsize>,
    /// What it answers `GET /cacerts` with from now on.
    response: Arc<Mutex<Vec<u8>>>,
}

/// A loopback TLS server with a certificate for `sans` signed by `signer`, answering
/// `GET /cacerts` with `response`, each connection in a thread of its own.
fn serve_with(signer: &Ca, response: Vec<u8>, sans: Vec<rcgen::SanType>, mode: Conn) -> TestServer {
    let key = KeyPair::generate().unwrap();
    let mut p = params("test-server", false, true);
    p.subject_alt_names = sans;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &signer.issuer).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(https::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = TestServer {
        addr: listener.local_addr().unwrap(),
        accepted: Arc::new(AtomicUsize::new(0)),
        requests: Arc::new(AtomicUsize::new(0)),
        response: Arc::new(Mutex::new(response)),
    };
    let (accepted, requests, answer) = (
        Arc::clone(&server.accepted),
        Arc::clone(&server.requests),
        Arc::clone(&server.response),
    );
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            accepted.fetch_add(1, Ordering::SeqCst);
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let (requests, answer) = (Arc::clone(&requests), Arc::clone(&answer));
            std::thread::spawn(move || {
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut answered = 0;
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            // The client went away.
                            _ => return,
                        }
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let answers = match mode {
                        Conn::Close => 1,
                        Conn::Keep => usize::MAX,
                        Conn::Silent(n) => n,
                    };
                    if answered == answers {
                        // Silent: read on, answer nothing.
                        continue;
                    }
                    if head.starts_with(b"GET /cacerts HTTP/1.1\r\n") {
                        let response = answer.lock().unwrap().clone();
                        let _ = tls.write_all(&response);
                    }
                    answered += 1;
                    if let Conn::Close = mode {
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                        return;
                    }
                    let _ = tls.flush();
                }
            });
        }
    });
    server
}

fn ok_response(body: &[u8]) -> Vec<u8> {
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
    [head.as_bytes(), body].concat()
}

const T: Duration = Duration::from_secs(10);

#[test]
fn fetch_reads_cacerts_without_verifying_the_server() {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    let addr = serve(&ca, ok_response(pem.as_bytes()));
    let got = fetch_cacerts(&format!("https://{addr}"), T).unwrap();
    assert_eq!(got, pem.as_bytes());
    // Any path in the server URL is replaced, as K3s does.
    let got = fetch_cacerts(&format!("https://{addr}/v1/"), T).unwrap();
    assert_eq!(got, pem.as_bytes());
}

#[test]
fn the_server_check_matches_a_pinned_token() {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    let addr = serve(&ca, ok_response(pem.as_bytes()));
    let server = format!("https://{addr}");
    let token = Token::parse(&format!("K10{}::server:secret", sha(pem.as_bytes()))).unwrap();
    assert_eq!(
        check_server_ca(&server, &token, T).unwrap(),
        CaCheck::Matched {
            hash: sha(pem.as_bytes())
        }
    );
    let short = Token::parse("secret").unwrap();
    assert_eq!(
        check_server_ca(&server, &short, T).unwrap(),
        CaCheck::NotPinned
    );
}

#[test]
fn the_server_check_refuses_another_ca() {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    let addr = serve(&ca, ok_response(pem.as_bytes()));
    let server = format!("https://{addr}");
    let other = sha(root("other-ca").pem().as_bytes());
    let token = Token::parse(&format!("K10{other}::server:secret")).unwrap();
    match check_server_ca(&server, &token, T) {
        Err(K3sError::CaMismatch {
            server: s,
            expected,
            actual,
        }) => {
            assert_eq!(s, server);
            assert_eq!(expected, other);
            assert_eq!(actual, sha(pem.as_bytes()));
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[test]
fn the_server_check_refuses_a_server_its_bundle_does_not_sign() {
    let signer = root("real-ca");
    let served = root("served-ca").pem();
    let addr = serve(&signer, ok_response(served.as_bytes()));
    let token = Token::parse(&format!("K10{}::server:secret", sha(served.as_bytes()))).unwrap();
    let err = check_server_ca(&format!("https://{addr}"), &token, T).unwrap_err();
    assert!(matches!(err, K3sError::CaValidation { .. }), "{err:?}");
}

#[test]
fn a_prefetched_server_is_checked_without_redoing_its_work() {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    let sans = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
    let (addr, accepted) = serve_counting(&ca, ok_response(pem.as_bytes()), sans);
    let server = format!("https://{addr}");
    let (hash, times) = prefetch_server_ca(&server, T);
    assert_eq!(hash.unwrap(), sha(pem.as_bytes()));
    assert!(!times.known);
    let token = Token::parse(&format!("K10{}::server:secret", sha(pem.as_bytes()))).unwrap();
    let (checked, times) = check_server_ca_timed(&server, &token, T);
    assert_eq!(
        checked.unwrap(),
        CaCheck::Matched {
            hash: sha(pem.as_bytes())
        }
    );
    assert!(times.known, "{}", times.describe());
    assert!(
        times.describe().ends_with("prefetched"),
        "{}",
        times.describe()
    );
    // The check still fetched the bundle: a prefetch spares work, not the request.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // And still compares with the token: a prefetch never makes a check pass.
    let other = sha(root("other-ca").pem().as_bytes());
    let wrong = Token::parse(&format!("K10{other}::server:secret")).unwrap();
    let (checked, times) = check_server_ca_timed(&server, &wrong, T);
    assert!(times.known);
    assert!(
        matches!(checked, Err(K3sError::CaMismatch { .. })),
        "{checked:?}"
    );
}

fn localhost() -> Vec<rcgen::SanType> {
    vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())]
}

fn pinning(pem: &str) -> Token {
    Token::parse(&format!("K10{}::server:secret", sha(pem.as_bytes()))).unwrap()
}

/// A server in `mode` with a CA of its own serving that CA's PEM, its URL, and its CA
/// prefetched: where a promotion's check starts from on a standby told its server.
fn prefetched(mode: Conn) -> (String, TestServer, String) {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    let server = serve_with(&ca, ok_response(pem.as_bytes()), localhost(), mode);
    let url = format!("https://{}", server.addr);
    prefetch_server_ca(&url, T).0.unwrap();
    (pem, server, url)
}

#[test]
fn a_promotion_checks_on_the_connection_its_prefetch_left_open() {
    let (pem, server, url) = prefetched(Conn::Keep);
    let (checked, times) = check_server_ca_timed(&url, &pinning(&pem), T);
    assert_eq!(
        checked.unwrap(),
        CaCheck::Matched {
            hash: sha(pem.as_bytes())
        }
    );
    assert!(times.kept && times.known, "{}", times.describe());
    // No connect, no handshake: one request on the open connection.
    assert_eq!((times.connected, times.handshake), (None, None));
    assert!(
        times.describe().ends_with("kept, prefetched"),
        "{}",
        times.describe()
    );
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    // The connection stays for the next check, which still compares with its token.
    let wrong = pinning(&root("other-ca").pem());
    let (checked, times) = check_server_ca_timed(&url, &wrong, T);
    assert!(times.kept);
    assert!(
        matches!(checked, Err(K3sError::CaMismatch { .. })),
        "{checked:?}"
    );
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(server.requests.load(Ordering::SeqCst), 3);
    // Forgotten, the prefetch's connection and work are no longer used.
    forget_prefetch(&url);
    let (checked, times) = check_server_ca_timed(&url, &pinning(&pem), T);
    assert!(checked.is_ok(), "{checked:?}");
    assert!(!times.kept && !times.known, "{}", times.describe());
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn a_kept_connection_that_went_silent_is_given_up_for_a_new_one() {
    let (pem, server, url) = prefetched(Conn::Silent(1));
    let start = Instant::now();
    let (checked, times) = check_server_ca_timed(&url, &pinning(&pem), T);
    assert!(checked.is_ok(), "{checked:?}");
    // The request was sent on the kept connection, waited for, then made anew.
    assert!(
        start.elapsed() >= https::KEPT_PATIENCE,
        "{:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < T);
    assert!(!times.kept && times.known, "{}", times.describe());
    assert!(times.connected.is_some());
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(server.requests.load(Ordering::SeqCst), 3);
}

#[test]
fn a_kept_connection_that_serves_another_bundle_is_checked_on_a_new_one() {
    let (_, server, url) = prefetched(Conn::Keep);
    // The bundle no longer signs the server's certificate: what the open connection
    // shows is not taken for what a new one would; the check asks again and refuses.
    let served = root("served-ca").pem();
    *server.response.lock().unwrap() = ok_response(served.as_bytes());
    let (checked, times) = check_server_ca_timed(&url, &pinning(&served), T);
    assert!(
        matches!(checked, Err(K3sError::CaValidation { .. })),
        "{checked:?}"
    );
    assert!(!times.kept && !times.known, "{}", times.describe());
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(server.requests.load(Ordering::SeqCst), 3);
}

#[test]
fn a_bundle_changed_since_the_prefetch_is_checked_anew() {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    let sans = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
    let (addr, _, response) = serve_changing(&ca, ok_response(pem.as_bytes()), sans);
    let server = format!("https://{addr}");
    prefetch_server_ca(&server, T).0.unwrap();
    // The same server now serves a bundle that does not sign its certificate.
    let served = root("served-ca").pem();
    *response.lock().unwrap() = ok_response(served.as_bytes());
    let token = Token::parse(&format!("K10{}::server:secret", sha(served.as_bytes()))).unwrap();
    let (checked, times) = check_server_ca_timed(&server, &token, T);
    assert!(!times.known);
    assert!(
        matches!(checked, Err(K3sError::CaValidation { .. })),
        "{checked:?}"
    );
}

#[test]
fn a_prefetch_refuses_what_the_check_refuses() {
    let signer = root("real-ca");
    let served = root("served-ca").pem();
    let addr = serve(&signer, ok_response(served.as_bytes()));
    let (hash, _) = prefetch_server_ca(&format!("https://{addr}"), T);
    assert!(
        matches!(hash, Err(K3sError::CaValidation { .. })),
        "{hash:?}"
    );
}

#[test]
fn the_server_check_takes_one_connection() {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    let sans = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
    let (addr, accepted) = serve_counting(&ca, ok_response(pem.as_bytes()), sans);
    let token = Token::parse(&format!("K10{}::server:secret", sha(pem.as_bytes()))).unwrap();
    check_server_ca(&format!("https://{addr}"), &token, T).unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn the_server_check_refuses_a_certificate_for_another_name() {
    let ca = root("k3s-server-ca");
    let pem = ca.pem();
    let sans = vec![rcgen::SanType::DnsName(
        "elsewhere.example".try_into().unwrap(),
    )];
    let (addr, _) = serve_counting(&ca, ok_response(pem.as_bytes()), sans);
    let token = Token::parse(&format!("K10{}::server:secret", sha(pem.as_bytes()))).unwrap();
    let err = check_server_ca(&format!("https://{addr}"), &token, T).unwrap_err();
    let K3sError::CaValidation { source, .. } = &err else {
        panic!("expected a validation failure, got {err:?}");
    };
    let text = format!("{:?}", source);
    assert!(text.contains("NotValidForName"), "{text}");
}

#[test]
fn fetch_errors_name_the_url() {
    let ca = root("k3s-server-ca");
    let not_found = serve(
        &ca,
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
    );
    let url = format!("https://{not_found}");
    let err = fetch_cacerts(&url, T).unwrap_err();
    assert!(
        matches!(err, K3sError::Status { status: 404, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("{url}/cacerts")), "{err}");

    let huge = serve(&ca, ok_response(&vec![b'x'; CACERTS_LIMIT + 1]));
    let err = fetch_cacerts(&format!("https://{huge}"), T).unwrap_err();
    assert!(matches!(err, K3sError::TooLarge { .. }), "{err:?}");

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("https://{closed}");
    let err = fetch_cacerts(&url, T).unwrap_err();
    assert!(matches!(err, K3sError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
}

#[test]
fn a_silent_server_times_out() {
    // Accepts (the kernel does, from the backlog) and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let start = Instant::now();
    let err = fetch_cacerts(&url, Duration::from_millis(500)).unwrap_err();
    assert!(matches!(err, K3sError::Handshake { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(listener);
}
