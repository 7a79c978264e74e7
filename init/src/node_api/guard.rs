//! Who is asking, and what an apply may not do to them: the client certificate's role
//! and serial, and the checks that keep a new `[api]` from locking out the client that
//! sends it or serving a certificate that is expired or for another name.

use basalt_api::config::ApiConfig;
use basalt_api::node::access::{Access, CertFacts};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The client of one connection, as its TLS handshake showed it.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// The certificate chain it presented (leaf first), already verified against the
    /// pool CA by the handshake; empty for an anonymous client.
    pub chain: Vec<CertificateDer<'static>>,
    /// What the leaf says; `None` for an anonymous client (or an unreadable leaf,
    /// which the handshake would have refused).
    pub facts: Option<CertFacts>,
}

impl Client {
    /// From `rustls`'s `peer_certificates()`.
    pub fn from_peer(certs: Option<&[CertificateDer<'_>]>) -> Client {
        let chain: Vec<CertificateDer<'static>> = certs
            .unwrap_or_default()
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        let facts = chain.first().and_then(|c| CertFacts::from_der(c).ok());
        Client { chain, facts }
    }

    pub fn is_authenticated(&self) -> bool {
        self.facts.is_some()
    }

    /// The role: the certificate's, or [`Access::of_unmarked`] for one without.
    pub fn access(&self) -> Option<Access> {
        self.facts
            .as_ref()
            .map(|f| f.access.unwrap_or(Access::of_unmarked()))
    }
}

/// Why an apply was refused before anything was saved. Each names its key.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("api.cert: not a readable certificate: {0}")]
    Cert(#[source] basalt_api::node::access::CertError),
    #[error("api.cert: expired on {0}")]
    Expired(String),
    #[error("api.cert: not valid yet (from {0} seconds after the epoch)")]
    NotYetValid(i64),
    #[error("api.cert: issued for {names:?}, not for the node's name {name:?}")]
    WrongName { name: String, names: Vec<String> },
    #[error(
        "api.ca: would not verify the client certificate applying this config ({0}); \
         the node would lock its operator out"
    )]
    LockOut(String),
    #[error(
        "api.revoked: lists serial {0}, the certificate applying this config; \
         the node would lock its operator out"
    )]
    RevokesSelf(String),
}

/// Checks a new `[api]` before it is saved: its certificate is valid now and issued for
/// `node_name` (if the node has one), and `client` would still be let in by its CA and
/// its revocation list.
pub fn check_apply(
    api: &ApiConfig,
    node_name: Option<&str>,
    client: &Client,
    now: SystemTime,
) -> Result<(), GuardError> {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let node = CertFacts::from_pem(api.cert.as_str()).map_err(GuardError::Cert)?;
    if secs > node.not_after {
        return Err(GuardError::Expired(node.not_after_text));
    }
    if secs < node.not_before {
        return Err(GuardError::NotYetValid(node.not_before));
    }
    if let Some(name) = node_name {
        if !node.is_for(name) {
            return Err(GuardError::WrongName {
                name: name.into(),
                names: node.dns_names,
            });
        }
    }
    let Some((leaf, intermediates)) = client.chain.split_first() else {
        return Ok(());
    };
    verifier(api)
        .map_err(GuardError::LockOut)?
        .verify_client_cert(leaf, intermediates, UnixTime::since_unix_epoch(since(now)))
        .map_err(|e| GuardError::LockOut(e.to_string()))?;
    if let Some(facts) = &client.facts {
        if api.revoked.iter().any(|s| s.as_str() == facts.serial) {
            return Err(GuardError::RevokesSelf(facts.serial.clone()));
        }
    }
    Ok(())
}

fn since(now: SystemTime) -> std::time::Duration {
    now.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The client verifier the new `[api] ca` would make, as [`super::tls`] builds it.
fn verifier(api: &ApiConfig) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(api.ca.as_str().as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())
}
