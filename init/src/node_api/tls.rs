//! The node API's TLS: the node's certificate from `[api] cert`/`key`, and client
//! certificates verified against the pool CA in `[api] ca`. A client without a
//! certificate completes the handshake (for `GET /v1/health`, which says nothing
//! secret) and is refused by every other endpoint; a certificate from another CA, an
//! expired one or a bad signature fails the handshake itself.

use basalt_api::config::ApiConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::sync::Arc;

/// Why the `[api]` material cannot serve TLS. Each names its key, as config errors do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("api.ca: not PEM certificates")]
    CaPem(#[source] rustls::pki_types::pem::Error),
    #[error("api.ca: no certificate")]
    NoCa,
    #[error("api.ca: not a usable CA certificate")]
    BadCa(#[source] rustls::Error),
    #[error("api.ca: cannot verify client certificates")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("api.cert: not PEM certificates")]
    CertPem(#[source] rustls::pki_types::pem::Error),
    #[error("api.cert: no certificate")]
    NoCert,
    #[error("api.key: not a PEM private key")]
    KeyPem(#[source] rustls::pki_types::pem::Error),
    #[error("api.cert, api.key: not a usable certificate and key")]
    CertKey(#[source] rustls::Error),
}

/// The server side of the node API's TLS, with the ring provider (as every TLS user in
/// this workspace), TLS 1.2 and 1.3, HTTP/1.1 by ALPN.
pub fn server_config(api: &ApiConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(api.ca.as_str().as_bytes()) {
        roots
            .add(cert.map_err(TlsError::CaPem)?)
            .map_err(TlsError::BadCa)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCa);
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(TlsError::Verifier)?;
    let chain = CertificateDer::pem_slice_iter(api.cert.as_str().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsError::CertPem)?;
    if chain.is_empty() {
        return Err(TlsError::NoCert);
    }
    let key =
        PrivateKeyDer::from_pem_slice(api.key.expose().as_bytes()).map_err(TlsError::KeyPem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::CertKey)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::CertKey)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What to say about a failed handshake in the refusal log (never secret material).
pub fn describe(err: &std::io::Error) -> String {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(c)) => format!("client certificate: {c:?}"),
        Some(e) => e.to_string(),
        None => err.to_string(),
    }
}
