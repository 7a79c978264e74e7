//! The join check run once against a throwaway server on the loopback, so that a node's
//! first real check runs warm.
//!
//! Measured under QEMU's TCG (BENCHMARKS.md, issue 15 item 2): the first
//! [`super::check_server_ca`] of a process took several times as long as a second one
//! against the same server. The first run executes the TLS client, the key exchange, the
//! signature checks, the X.509 parsing and the hash for the first time: TCG translates
//! every block of that code on its first execution, and its pages are faulted in from
//! the compressed root. Reading the binary into the page cache ahead did not help; running
//! the code does. [`warm_up`] runs the very same check, end to end (connect, handshake,
//! GET, verification against the bundle, hash pinned in a token), against a TLS server
//! it starts on `127.0.0.1` for one connection, and returns how long it took.
//!
//! The server's certificate and key (`warm_up/`) are fixed, public, and trusted by
//! nothing: they are the bundle of this check only, whose token pins their own hash.
//! They authenticate nothing. P-256 like K3s's own certificates (so the same signature
//! code runs), a CA and a serving certificate it signed for `127.0.0.1`, valid from 1970
//! to 9999 so that a node's clock cannot make the warm-up fail; made once with Python's
//! `cryptography`.
//!
//! The check's client configuration is made here once for the process, and reused by
//! every check after (`https::any_certificate_config`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};
use sha2::{Digest, Sha256};

use super::{check_server_ca_timed, https, CaCheck, CheckTimes, K3sError};
use crate::config::Token;

/// The throwaway CA: the warm-up server's `/cacerts`.
const CA_PEM: &str = include_str!("warm_up/ca.pem");
/// The warm-up server's certificate, signed by [`CA_PEM`], for `127.0.0.1`.
const SERVER_PEM: &str = include_str!("warm_up/server.pem");
/// Its key. Public on purpose: see the module docs.
const SERVER_KEY: &str = include_str!("warm_up/server.key");
/// How long the server waits for its one connection, and for each read and write.
const SERVER_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    #[error("the warm-up's built-in certificate or key does not load")]
    Material(#[source] rustls::pki_types::pem::Error),
    #[error("set up the warm-up's TLS server")]
    ServerConfig(#[source] rustls::Error),
    #[error("listen on 127.0.0.1 for the warm-up")]
    Listen(#[source] std::io::Error),
    #[error("start the warm-up's server thread")]
    Spawn(#[source] std::io::Error),
    #[error("the check against the warm-up server failed")]
    Check(#[source] K3sError),
    #[error("the check against the warm-up server did not match the pinned hash")]
    NotMatched,
    #[error("the token pinning the warm-up CA does not parse")]
    Token(#[source] crate::config::TokenError),
}

/// Runs the join check once against a TLS server of its own on `127.0.0.1` (see the
/// module docs); returns when each of its steps ended. Also makes the check's client
/// configuration, kept for the process.
pub fn warm_up(timeout: Duration) -> Result<CheckTimes, WarmUpError> {
    https::any_certificate_config().map_err(WarmUpError::Check)?;
    let config = server_config()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(WarmUpError::Listen)?;
    let addr = listener.local_addr().map_err(WarmUpError::Listen)?;
    // Non-blocking, so the server gives up after SERVER_WAIT if no connection comes.
    listener
        .set_nonblocking(true)
        .map_err(WarmUpError::Listen)?;
    let server = std::thread::Builder::new()
        .name("check-warm-up".into())
        .spawn(move || serve_once(&listener, config))
        .map_err(WarmUpError::Spawn)?;
    let pin = hex::encode(Sha256::digest(CA_PEM.as_bytes()));
    let token = Token::parse(&format!("K10{pin}::server:warm-up")).map_err(WarmUpError::Token)?;
    let (checked, times) = check_server_ca_timed(&url(addr), &token, timeout);
    // Its outcome is the client's to tell; the thread ends within SERVER_WAIT.
    let _ = server.join();
    match checked {
        Ok(CaCheck::Matched { .. }) => Ok(times),
        Ok(CaCheck::NotPinned) => Err(WarmUpError::NotMatched),
        Err(e) => Err(WarmUpError::Check(e)),
    }
}

fn url(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

fn server_config() -> Result<Arc<ServerConfig>, WarmUpError> {
    let cert =
        CertificateDer::from_pem_slice(SERVER_PEM.as_bytes()).map_err(WarmUpError::Material)?;
    let key =
        PrivateKeyDer::from_pem_slice(SERVER_KEY.as_bytes()).map_err(WarmUpError::Material)?;
    let config = ServerConfig::builder_with_provider(https::provider())
        .with_safe_default_protocol_versions()
        .map_err(WarmUpError::ServerConfig)?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(WarmUpError::ServerConfig)?;
    Ok(Arc::new(config))
}

/// Accepts one connection within [`SERVER_WAIT`] and answers its request with the CA.
/// Failures are the client's to see (its check fails), so they are dropped here.
fn serve_once(listener: &TcpListener, config: Arc<ServerConfig>) {
    let deadline = Instant::now() + SERVER_WAIT;
    let sock = loop {
        match listener.accept() {
            Ok((sock, _)) => break sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(_) => return,
        }
    };
    let _ = answer(sock, config);
}

fn answer(sock: TcpStream, config: Arc<ServerConfig>) -> std::io::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(SERVER_WAIT))?;
    sock.set_write_timeout(Some(SERVER_WAIT))?;
    let _ = sock.set_nodelay(true);
    let conn = ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{CA_PEM}",
        CA_PEM.len()
    );
    tls.write_all(response.as_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_up_runs_the_whole_check_and_it_matches() {
        let times = warm_up(Duration::from_secs(10)).expect("warm-up");
        let steps = [
            times.connected,
            times.handshake,
            times.response,
            times.verified,
            times.hashed,
        ];
        assert!(steps.iter().all(Option::is_some), "{times:?}");
        // In order: each step ends after the one before it.
        let ends: Vec<Duration> = steps.iter().flatten().copied().collect();
        assert!(ends.windows(2).all(|w| w[0] <= w[1]), "{ends:?}");
    }

    #[test]
    fn the_warm_up_server_is_refused_by_another_pin() {
        // The same server, pinned to another CA: the check it warms up still refuses.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let config = server_config().expect("config");
        let server = std::thread::spawn(move || serve_once(&listener, config));
        let token =
            Token::parse(&format!("K10{}::server:warm-up", "ab".repeat(32))).expect("token");
        let (checked, times) = check_server_ca_timed(&url(addr), &token, Duration::from_secs(10));
        server.join().expect("server");
        assert!(
            matches!(checked, Err(K3sError::CaMismatch { .. })),
            "{checked:?}"
        );
        assert!(
            times.verified.is_some() && times.hashed.is_some(),
            "{times:?}"
        );
    }

    #[test]
    fn the_material_is_a_ca_and_a_server_certificate_it_signed() {
        // The check's own verifier accepts the server's certificate for 127.0.0.1
        // against the CA alone: the warm-up exercises a real chain, not a self-signed leaf.
        let verifier =
            super::super::bundle_verifier(CA_PEM.as_bytes(), "warm-up").expect("verifier");
        let leaf = CertificateDer::from_pem_slice(SERVER_PEM.as_bytes()).expect("leaf");
        let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("the server certificate verifies against the CA");
        assert_ne!(CA_PEM, SERVER_PEM);
    }
}
