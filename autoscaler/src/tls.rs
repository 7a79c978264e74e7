//! The server's mutual-TLS configuration: its certificate and key, and the CA that client
//! certificates must chain to (the pool CA). rustls with the ring provider, as the rest of
//! the workspace; TLS 1.2 and 1.3; ALPN `h2`, which gRPC clients (grpc-go among them)
//! require.

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A TLS setup that cannot be used. Key material never appears in these messages.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {why}", path.display())]
    Parse {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{what}: {why}")]
    Pem { what: &'static str, why: String },
    #[error("{what}: no certificate in it")]
    NoCertificate { what: &'static str },
    #[error("client CA: {0}")]
    ClientCa(String),
    #[error("server certificate and key: {0}")]
    ServerCert(#[source] rustls::Error),
}

/// Where the server's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The server certificate (PEM), optionally followed by intermediates. Its SANs must
    /// name the host in the autoscaler's `address`.
    pub cert: PathBuf,
    /// The server's private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The CA (PEM, one or more certificates) that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// The server's TLS material in memory (PEM text).
pub struct TlsPem {
    pub cert: String,
    pub key: String,
    pub client_ca: String,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .field("client_ca", &self.client_ca)
            .finish()
    }
}

impl TlsPaths {
    /// Reads the three files, naming the one that cannot be read.
    pub fn read(&self) -> Result<TlsPem, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        Ok(TlsPem {
            cert: read("server certificate", &self.cert)?,
            key: read("server key", &self.key)?,
            client_ca: read("client CA", &self.client_ca)?,
        })
    }

    /// Reads the files and builds the server configuration; errors name the file.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let pem = self.read()?;
        let chain = certs(&pem.cert, "server certificate")
            .map_err(in_file("server certificate", &self.cert))?;
        let key = key(&pem.key).map_err(in_file("server key", &self.key))?;
        let roots = roots(&pem.client_ca).map_err(in_file("client CA", &self.client_ca))?;
        build(chain, key, roots)
    }
}

impl TlsPem {
    /// Builds the server configuration from PEM text.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        build(
            certs(&self.cert, "server certificate")?,
            key(&self.key)?,
            roots(&self.client_ca)?,
        )
    }
}

/// Names the file in an error about its content.
fn in_file<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(TlsError) -> TlsError + 'a {
    move |e| match e {
        TlsError::Pem { why, .. } | TlsError::ClientCa(why) => TlsError::Parse {
            what,
            path: path.to_owned(),
            why,
        },
        TlsError::NoCertificate { .. } => TlsError::Parse {
            what,
            path: path.to_owned(),
            why: "no certificate in it".into(),
        },
        other => other,
    }
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The parse error of a key file says what is wrong with its structure, not its content.
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "server key",
        why: format!("no usable private key ({e})"),
    })
}

fn roots(pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(pem, "client CA")? {
        roots
            .add(cert)
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    }
    Ok(roots)
}

fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: RootCertStore,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Client certificates are required: a client without one is refused in the handshake.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ServerCert)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::ServerCert)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The subject common name of a (verified) client certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| "the client certificate has no subject common name".to_owned())?;
    cn.as_str()
        .map(str::to_owned)
        .map_err(|e| format!("the client certificate's common name is not a string: {e}"))
}
