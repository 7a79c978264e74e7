//! The agent's side of K3s's join check: before a node sends its credentials, it fetches the
//! server's CA bundle from `https://<server>/cacerts` without verifying the server, and
//! compares its hash with the one pinned in the token (`K10<hash>::<credentials>`).
//!
//! This follows K3s's `pkg/clientaccess/token.go` (`ParseAndValidateToken`, `getCACerts`,
//! `hashCA`, `validateCAHash`) so that basalt-init can refuse a join that `k3s agent` would
//! refuse, and report why, instead of starting an agent that crash-loops. See [`ca_hash`]
//! for the hash rule. One step is left out on purpose: K3s first tries `/cacerts` with the
//! host's CA bundle and skips the hash check when that succeeds (a server with a publicly
//! trusted certificate). We always compare, which is stricter, never laxer.
//!
//! The token's syntax lives in [`crate::config::Token`].

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::RootCertStore;

use crate::config::Token;

mod cahash;
mod https;
mod known;
mod warm_up;

pub use cahash::CertError;
pub use known::FRESH_FOR as PREFETCH_FRESH_FOR;
pub use warm_up::{warm_up, WarmUpError};

/// The largest `/cacerts` body accepted; a CA bundle is a few KiB.
pub const CACERTS_LIMIT: usize = 1024 * 1024;

/// Why the join check failed. Messages name the URL or the server; causes are in `source`.
#[derive(Debug, thiserror::Error)]
pub enum K3sError {
    #[error("server URL {server:?} is not usable: {reason}")]
    BadUrl {
        server: String,
        reason: &'static str,
    },
    #[error("resolve the host of {url}")]
    Resolve {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {url}")]
    Handshake {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("send the request to {url}")]
    Send {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("read the response from {url}")]
    Receive {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{url} sent a malformed HTTP response: {reason}")]
    BadResponse { url: String, reason: String },
    #[error("{url} answered HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url} sent more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("set up TLS")]
    TlsConfig(#[source] rustls::Error),
    #[error("the CA bundle is not valid PEM")]
    Pem(#[source] rustls::pki_types::pem::Error),
    #[error("the CA bundle holds no certificate")]
    NoCertificates,
    #[error("certificate {index} of the CA bundle is not valid X.509")]
    BadCertificate {
        index: usize,
        #[source]
        source: cahash::CertError,
    },
    #[error("the CA bundle from {url} cannot verify servers")]
    UnusableBundle {
        url: String,
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    /// K3s's "CA cert validation failed": the server's certificate does not verify against
    /// the bundle it serves.
    #[error("{url} does not verify against its own CA bundle")]
    CaValidation {
        url: String,
        #[source]
        source: Box<K3sError>,
    },
    #[error("the CA of {server} hashes to {actual}, but the token pins {expected}")]
    CaMismatch {
        server: String,
        expected: String,
        actual: String,
    },
}

/// What [`check_server_ca`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaCheck {
    /// The server's CA hash is the one the token pins.
    Matched { hash: String },
    /// The token is a short one, without a CA hash: K3s trusts whatever CA the server
    /// serves (and warns).
    NotPinned,
}

/// The hash K3s pins in a secure token for this `/cacerts` body: lowercase hex sha256.
///
/// K3s's `hashCA`: for a single certificate, the bytes exactly as served (K3s's own
/// self-signed CA file); for a bundle, the DER of the root ending the chain Go's
/// `Verify` builds from the first certificate, or the bytes as served when no chain is
/// found. Details in `cahash.rs`.
pub fn ca_hash(cacerts_pem: &[u8]) -> Result<String, K3sError> {
    cahash::hash_ca(cacerts_pem, unix_now())
}

/// GET `<server>/cacerts` over TLS without verifying the server, as K3s's agent does
/// before the hash check. `server` is the URL from the machine config; any path in it is
/// replaced by `/cacerts`, as K3s does. The body is at most [`CACERTS_LIMIT`] bytes.
pub fn fetch_cacerts(server: &str, timeout: Duration) -> Result<Vec<u8>, K3sError> {
    let server = https::Server::parse(server)?;
    let config = https::any_certificate_config()?;
    https::get(&server, "/cacerts", config, timeout, CACERTS_LIMIT)
}

/// When each step of a [`check_server_ca_timed`] ended, counted from its `start`; `None`
/// for a step it did not reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckTimes {
    pub start: Instant,
    /// The TCP connection is up.
    pub connected: Option<Duration>,
    /// The TLS handshake is done (the server's signature over it checked).
    pub handshake: Option<Duration>,
    /// The whole `/cacerts` body is in: one TLS round trip, cold or warm.
    pub response: Option<Duration>,
    /// The server's certificates are verified against the bundle.
    pub verified: Option<Duration>,
    /// The bundle's hash is compared with the token's: the check's end.
    pub hashed: Option<Duration>,
    /// The bundle and the server's certificates were the ones a recent prefetch verified
    /// and hashed ([`prefetch_server_ca`]), so neither was done again.
    pub known: bool,
    /// The TLS handshake resumed an earlier session with the server.
    pub resumed: bool,
    /// The request went over the connection a prefetch left open: no connect, no
    /// handshake.
    pub kept: bool,
}

impl Default for CheckTimes {
    fn default() -> Self {
        CheckTimes {
            start: Instant::now(),
            connected: None,
            handshake: None,
            response: None,
            verified: None,
            hashed: None,
            known: false,
            resumed: false,
            kept: false,
        }
    }
}

impl CheckTimes {
    /// `connected 2, handshake 60, response 64, verified 70, hashed 71` (ms), the steps
    /// reached.
    pub fn describe(&self) -> String {
        [
            ("connected", self.connected),
            ("handshake", self.handshake),
            ("response", self.response),
            ("verified", self.verified),
            ("hashed", self.hashed),
        ]
        .iter()
        .filter_map(|(name, at)| at.map(|d| format!("{name} {}", d.as_millis())))
        .chain(self.reused().into_iter().map(str::to_owned))
        .collect::<Vec<_>>()
        .join(", ")
    }

    /// What the check took from earlier work: `kept` (the prefetch's open connection),
    /// `resumed` (the TLS session), `prefetched` (the verification and hash).
    pub fn reused(&self) -> Vec<&'static str> {
        [
            (self.kept, "kept"),
            (self.resumed, "resumed"),
            (self.known, "prefetched"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// K3s's join check against `server` for `token`: fetch `/cacerts` unverified, verify the
/// server against that bundle (K3s's `getCACerts`), then compare the bundle's hash with
/// the token's. `timeout` bounds the request.
///
/// K3s verifies by fetching `/cacerts` a second time over a new connection whose roots
/// are the bundle. Here the certificates the server showed in the first handshake, whose
/// signature over that handshake was checked ([`https::AcceptAnyCertificate`] checks it,
/// as Go's `InsecureSkipVerify` does), are verified against the bundle instead: the same
/// verifier, the same server name and time, the same outcome, and one TLS round trip
/// instead of two. A server that shows another certificate to the second connection is
/// not something the second fetch could have told apart from a good one either.
pub fn check_server_ca(
    server: &str,
    token: &Token,
    timeout: Duration,
) -> Result<CaCheck, K3sError> {
    check_server_ca_timed(server, token, timeout).0
}

/// [`check_server_ca`], and when each of its steps ended.
pub fn check_server_ca_timed(
    server: &str,
    token: &Token,
    timeout: Duration,
) -> (Result<CaCheck, K3sError>, CheckTimes) {
    let mut times = CheckTimes::default();
    let result = check(server, token, timeout, &mut times);
    (result, times)
}

fn check(
    server: &str,
    token: &Token,
    timeout: Duration,
    times: &mut CheckTimes,
) -> Result<CaCheck, K3sError> {
    let mut fetched = fetch_cacerts_with_peer(server, timeout, times, true)?;
    let mut known = known::recall(&fetched.url, &fetched.cacerts, &fetched.peer);
    if known.is_none() && times.kept {
        // Not what the prefetch verified: the server may have changed its certificate
        // since that connection was made. Ask again, as a new connection would see it.
        fetched = fetch_cacerts_with_peer(server, timeout, times, false)?;
        known = known::recall(&fetched.url, &fetched.cacerts, &fetched.peer);
    }
    known::give_back(&fetched.url, fetched.kept.take());
    times.known = known.is_some();
    if !times.known {
        fetched.verify()?;
    }
    let cacerts = fetched.cacerts;
    times.verified = Some(times.start.elapsed());
    let Some(expected) = token.ca_hash() else {
        times.hashed = times.verified;
        return Ok(CaCheck::NotPinned);
    };
    // K3s ignores a bundle it cannot hash and compares with an empty hash; the outcome,
    // a refused join, is the same, and the error says why.
    let actual = match known {
        Some(hash) => hash,
        None => ca_hash(&cacerts)?,
    };
    times.hashed = Some(times.start.elapsed());
    if actual == expected {
        Ok(CaCheck::Matched { hash: actual })
    } else {
        Err(K3sError::CaMismatch {
            server: server.to_owned(),
            expected: expected.to_owned(),
            actual,
        })
    }
}

/// The join check's work that needs no token, done ahead for a server a node in standby
/// may be promoted into (`standby.servers`): `/cacerts` fetched as [`check_server_ca`]
/// fetches it, the server verified against the bundle, the bundle hashed. The verdict is
/// kept for the process ([`known`]), with the connection if the server leaves it open and
/// the TLS session (in the check's client configuration), so that a check against the
/// same server soon after takes one round trip on that connection (or a resumed
/// handshake) and finds its work done. Each prefetch makes a new connection. Returns the
/// bundle's hash, and when each step ended.
pub fn prefetch_server_ca(
    server: &str,
    timeout: Duration,
) -> (Result<String, K3sError>, CheckTimes) {
    let mut times = CheckTimes::default();
    let mut prefetch = || {
        let fetched = fetch_cacerts_with_peer(server, timeout, &mut times, false)?;
        fetched.verify()?;
        times.verified = Some(times.start.elapsed());
        let hash = ca_hash(&fetched.cacerts)?;
        times.hashed = Some(times.start.elapsed());
        let FetchedCa {
            url,
            cacerts,
            peer,
            kept,
            ..
        } = fetched;
        known::remember(&url, cacerts, peer, hash.clone(), kept);
        Ok(hash)
    };
    let result = prefetch();
    (result, times)
}

/// Forgets the prefetch of `server` (as the machine config writes it) and closes the
/// connection it left open: for a server a node in standby is no longer told about, or
/// once it joined.
pub fn forget_prefetch(server: &str) {
    if let Ok(parsed) = https::Server::parse(server) {
        known::forget(&parsed.url("/cacerts"));
    }
}

/// `/cacerts` as the check and the prefetch fetch it: unverified, with the certificates
/// the server showed in the handshake.
struct FetchedCa {
    server: https::Server,
    url: String,
    cacerts: Vec<u8>,
    /// End entity first.
    peer: Vec<CertificateDer<'static>>,
    /// The connection, if the server left it open.
    kept: Option<https::Kept>,
}

/// `reuse`: first try the connection a prefetch of this server left open.
fn fetch_cacerts_with_peer(
    server: &str,
    timeout: Duration,
    times: &mut CheckTimes,
    reuse: bool,
) -> Result<FetchedCa, K3sError> {
    let parsed = https::Server::parse(server)?;
    let url = parsed.url("/cacerts");
    let config = https::any_certificate_config()?;
    let kept = if reuse {
        known::take_connection(&url)
    } else {
        None
    };
    let fetched = https::get_keeping(
        &parsed,
        "/cacerts",
        config,
        timeout,
        CACERTS_LIMIT,
        times,
        kept,
    )?;
    Ok(FetchedCa {
        url,
        server: parsed,
        cacerts: fetched.body,
        peer: fetched.peer,
        kept: fetched.kept,
    })
}

impl FetchedCa {
    /// K3s's "CA cert validation": the certificates the server showed must verify against
    /// the bundle it served.
    fn verify(&self) -> Result<(), K3sError> {
        let url = &self.url;
        let verifier = bundle_verifier(&self.cacerts, url)?;
        let invalid = |e: rustls::Error| K3sError::CaValidation {
            url: url.clone(),
            source: Box::new(K3sError::Handshake {
                url: url.clone(),
                // What the second connection's handshake would have failed with.
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
        };
        let (end_entity, intermediates) = self
            .peer
            .split_first()
            .ok_or_else(|| invalid(rustls::Error::NoCertificatesPresented))?;
        verifier
            .verify_server_cert(
                end_entity,
                intermediates,
                &self.server.server_name()?,
                &[],
                UnixTime::now(),
            )
            .map_err(invalid)?;
        Ok(())
    }
}

/// Every certificate of the bundle is trusted, as Go's `AppendCertsFromPEM` pool is.
fn bundle_verifier(
    cacerts: &[u8],
    url: &str,
) -> Result<Arc<dyn rustls::client::danger::ServerCertVerifier>, K3sError> {
    let mut roots = RootCertStore::empty();
    // Blocks that are not certificates or do not parse are skipped, as Go's pool does;
    // an empty pool is refused by the builder below.
    let ders = CertificateDer::pem_slice_iter(cacerts).filter_map(Result::ok);
    roots.add_parsable_certificates(ders);
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), https::provider())
        .build()
        .map_err(|source| K3sError::UnusableBundle {
            url: url.to_owned(),
            source,
        })?;
    Ok(verifier)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
