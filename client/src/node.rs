//! The node API client (`basalt node`): HTTPS with mutual TLS against the pool CA.
//!
//! The client presents its certificate and checks the node's against the pool CA under
//! the node's *name* (`--name`, default the endpoint's host), not the address it dials:
//! the URL is `https://<name>:<port>` and the name is resolved to the endpoint's address,
//! so SNI and certificate checks use the name while the TCP connection goes wherever the
//! node is reachable (a forwarded port, a private address). The wire format is
//! [`basalt_api::node`].

pub mod cli;
pub mod render;

use basalt_api::node::{
    path, ApplyResponse, ErrorBody, Health, RollbackResponse, Status, UpgradeResponse,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// For every request but a followed log, which runs until interrupted.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid endpoint {0:?}: expected HOST:PORT")]
    Endpoint(String),
    #[error("resolve {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("resolve {0}: no address")]
    NoAddress(String),
    #[error(
        "--name {0}: an IP address other than the endpoint's host cannot be checked; \
         use the node's name (always a DNS name in its certificate)"
    )]
    IpName(String),
    #[error("read the {what} in {}", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: not a usable CA certificate", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("client certificate {} and key {}", cert.display(), key.display())]
    ClientAuth {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("set up the HTTPS client")]
    Client(#[source] reqwest::Error),
    #[error("{what}")]
    Tls {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot reach the node at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {path}")]
    Http {
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {path}: the node answered {status}: {message}")]
    Api {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{path}: unexpected response body")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("write the output")]
    Output(#[source] std::io::Error),
    #[error("read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read the bundle {}", path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid service name {0:?}: letters, digits, '.', '_' and '-' only")]
    ServiceName(String),
    /// A command line that cannot be run as given.
    #[error("{0}")]
    Usage(String),
    #[error("the node did not apply the config: {0}")]
    NotApplied(String),
    #[error("the node applied the config but could not join: {0}")]
    JoinFailed(String),
}

/// Where the node API listens: `HOST:PORT`, `[V6]:PORT`, or `HOST` for port 50000.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for Endpoint {
    type Err = NodeError;

    fn from_str(s: &str) -> Result<Endpoint, NodeError> {
        let bad = || NodeError::Endpoint(s.into());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, rest) = rest.split_once(']').ok_or_else(bad)?;
            match rest {
                "" => (host, None),
                _ => (host, Some(rest.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => (s, None), // a bare IPv6 address
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => basalt_api::node::DEFAULT_PORT,
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Endpoint {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// How to reach and authenticate to one node.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub endpoint: Endpoint,
    /// The pool CA (PEM) that must have signed the node's certificate.
    pub ca: PathBuf,
    /// Our client certificate (PEM, chain allowed) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The name the node's certificate must carry [default: the endpoint's host].
    pub name: Option<String>,
}

/// A decoded JSON response and the text it was decoded from (for `--json`).
#[derive(Debug, Clone)]
pub struct Reply<T> {
    pub raw: String,
    pub body: T,
}

pub struct NodeClient {
    http: reqwest::blocking::Client,
    base: String,
    addr: SocketAddr,
    ca: PathBuf,
    name: String,
}

impl NodeClient {
    pub fn new(opts: &ClientOptions) -> Result<NodeClient, NodeError> {
        let name = opts
            .name
            .as_deref()
            .unwrap_or(&opts.endpoint.host)
            .to_ascii_lowercase();
        let addr = resolve(&opts.endpoint)?;
        let name_ip = name.parse::<IpAddr>().ok();
        if name_ip.is_some_and(|ip| ip != addr.ip() || name != opts.endpoint.host) {
            // reqwest dials an IP URL directly, so the name could not be pointed elsewhere.
            return Err(NodeError::IpName(name));
        }
        let base = match name_ip {
            Some(IpAddr::V6(ip)) => format!("https://[{ip}]:{}", opts.endpoint.port),
            _ => format!("https://{name}:{}", opts.endpoint.port),
        };
        let tls = tls_config(opts)?;
        let mut builder = reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(None)
            .no_proxy()
            .user_agent(concat!("basalt/", env!("CARGO_PKG_VERSION")));
        if name_ip.is_none() {
            builder = builder.resolve(&name, addr);
        }
        Ok(NodeClient {
            http: builder.build().map_err(NodeError::Client)?,
            base,
            addr,
            ca: opts.ca.clone(),
            name,
        })
    }

    /// The name the node's certificate is checked against.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn health(&self) -> Result<Reply<Health>, NodeError> {
        self.json("GET", path::HEALTH, None)
    }

    pub fn status(&self) -> Result<Reply<Status>, NodeError> {
        self.json("GET", path::STATUS, None)
    }

    /// Sends a machine config (TOML) to the node, which validates, persists and applies it.
    pub fn apply(&self, config_toml: String) -> Result<Reply<ApplyResponse>, NodeError> {
        self.json("POST", path::CONFIG, Some(config_toml))
    }

    pub fn reboot(&self) -> Result<Reply<serde_json::Value>, NodeError> {
        self.json("POST", path::REBOOT, None)
    }

    pub fn shutdown(&self) -> Result<Reply<serde_json::Value>, NodeError> {
        self.json("POST", path::SHUTDOWN, None)
    }

    /// Streams the upgrade bundle at `bundle` to the node: its sha256 is computed first
    /// (one read of the file), then the file is sent as the body, never held whole.
    pub fn upgrade(
        &self,
        bundle: &Path,
        allow_downgrade: bool,
        reboot: bool,
    ) -> Result<Reply<UpgradeResponse>, NodeError> {
        let err = |source| NodeError::Bundle {
            path: bundle.into(),
            source,
        };
        let sha256 = sha256_file(bundle).map_err(err)?;
        let file = std::fs::File::open(bundle).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let mut p = format!("{}?sha256={sha256}", path::UPGRADE);
        if allow_downgrade {
            p.push_str("&allow_downgrade=1");
        }
        if reboot {
            p.push_str("&reboot=1");
        }
        let req = self
            .http
            .post(format!("{}{p}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(reqwest::blocking::Body::sized(file, len));
        let resp = req.send().map_err(|e| self.http_error("POST", &p, e))?;
        let resp = self.check("POST", &p, resp)?;
        self.decode("POST", &p, resp)
    }

    /// Has the node fetch the bundle at `url` itself (`http://` or `https://`) and
    /// check it against `sha256`, the whole bundle's. No timeout: the node answers once
    /// the bundle is written and verified, which takes as long as the download.
    pub fn upgrade_url(
        &self,
        url: &str,
        sha256: &str,
        allow_downgrade: bool,
        reboot: bool,
    ) -> Result<Reply<UpgradeResponse>, NodeError> {
        use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
        let mut p = format!(
            "{}?sha256={sha256}&url={}",
            path::UPGRADE,
            utf8_percent_encode(url, NON_ALPHANUMERIC)
        );
        if allow_downgrade {
            p.push_str("&allow_downgrade=1");
        }
        if reboot {
            p.push_str("&reboot=1");
        }
        let resp = self.send("POST", &p, None, None)?;
        self.decode("POST", &p, resp)
    }

    /// Makes the other slot the node's default again (it must hold a good image); on a
    /// trial boot, gives the trial up (the old slot, still the default, boots next).
    pub fn rollback(&self, reboot: bool) -> Result<Reply<RollbackResponse>, NodeError> {
        let p = if reboot {
            format!("{}?reboot=1", path::ROLLBACK)
        } else {
            path::ROLLBACK.to_owned()
        };
        self.json("POST", &p, None)
    }

    pub fn metrics(&self) -> Result<String, NodeError> {
        let resp = self.send("GET", path::METRICS, None, Some(REQUEST_TIMEOUT))?;
        resp.text()
            .map_err(|source| self.http_error("GET", path::METRICS, source))
    }

    /// Copies a service's log lines to `out`; with `follow`, until the node closes the stream.
    pub fn logs(&self, service: &str, follow: bool, out: &mut dyn Write) -> Result<(), NodeError> {
        // The name goes into the path as it is.
        let valid = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
        if service.is_empty() || !service.bytes().all(valid) {
            return Err(NodeError::ServiceName(service.into()));
        }
        let mut p = path::logs(service);
        if follow {
            p.push_str("?follow=1");
        }
        let timeout = (!follow).then_some(REQUEST_TIMEOUT);
        let resp = self.send("GET", &p, None, timeout)?;
        let mut reader = std::io::BufReader::new(resp);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| NodeError::Read {
                    path: PathBuf::from(&p),
                    source: e,
                })?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&line)
                .and_then(|()| out.flush())
                .map_err(NodeError::Output)?;
        }
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        p: &str,
        body: Option<String>,
    ) -> Result<Reply<T>, NodeError> {
        let resp = self.send(method, p, body, Some(REQUEST_TIMEOUT))?;
        self.decode(method, p, resp)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        p: &str,
        resp: reqwest::blocking::Response,
    ) -> Result<Reply<T>, NodeError> {
        let raw = resp
            .text()
            .map_err(|source| self.http_error(method, p, source))?;
        let body = serde_json::from_str(&raw).map_err(|source| NodeError::Decode {
            path: p.into(),
            source,
        })?;
        Ok(Reply { raw, body })
    }

    /// Sends a request; a non-2xx answer becomes [`NodeError::Api`] with the node's message.
    fn send(
        &self,
        method: &'static str,
        p: &str,
        body: Option<String>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::blocking::Response, NodeError> {
        let url = format!("{}{p}", self.base);
        let mut req = match method {
            "POST" => self.http.post(url),
            _ => self.http.get(url),
        };
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/toml")
                .body(b);
        }
        let resp = req.send().map_err(|e| self.http_error(method, p, e))?;
        self.check(method, p, resp)
    }

    /// A non-2xx answer becomes [`NodeError::Api`] with the node's message.
    fn check(
        &self,
        method: &'static str,
        p: &str,
        resp: reqwest::blocking::Response,
    ) -> Result<reqwest::blocking::Response, NodeError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().unwrap_or_default();
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => e.error,
            Err(_) if text.trim().is_empty() => "(no message)".into(),
            Err(_) => text.trim().to_string(),
        };
        Err(NodeError::Api {
            method,
            path: p.into(),
            status: status.as_u16(),
            message,
        })
    }

    fn http_error(&self, method: &'static str, p: &str, source: reqwest::Error) -> NodeError {
        if let Some(what) = explain_tls(&source, &self.name, &self.ca) {
            return NodeError::Tls { what, source };
        }
        if source.is_connect() {
            return NodeError::Connect {
                addr: self.addr,
                source,
            };
        }
        NodeError::Http {
            method,
            path: p.into(),
            source,
        }
    }
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn resolve(endpoint: &Endpoint) -> Result<SocketAddr, NodeError> {
    let text = endpoint.to_string();
    let mut addrs = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()
        .map_err(|e| NodeError::Resolve(text.clone(), e))?;
    addrs.next().ok_or(NodeError::NoAddress(text))
}

fn tls_config(opts: &ClientOptions) -> Result<rustls::ClientConfig, NodeError> {
    client_tls(&opts.ca, &opts.cert, &opts.key)
}

/// The mutual-TLS client configuration for a server certified by the pool CA (a node's
/// API, the pool controller's API): `ca` as the only root, `cert` and `key` as the client's
/// identity. Errors name the file.
pub fn client_tls(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig, NodeError> {
    let pem_err = |path: &Path, what| {
        let path = path.to_path_buf();
        move |source| NodeError::Pem { path, what, source }
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(pem_err(ca, "certificate"))? {
        let cert = cert.map_err(pem_err(ca, "certificate"))?;
        roots.add(cert).map_err(|source| NodeError::BadCa {
            path: ca.to_path_buf(),
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(NodeError::Pem {
            path: ca.to_path_buf(),
            what: "certificate",
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem_err(cert, "certificate"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(cert, "certificate"))?;
    if chain.is_empty() {
        return Err(NodeError::Pem {
            path: cert.to_path_buf(),
            what: "certificate",
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    let key_path = key;
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key, "private key"))?;
    let client_auth_err = |source| NodeError::ClientAuth {
        cert: cert.to_path_buf(),
        key: key_path.to_path_buf(),
        source,
    };
    // ring explicitly, whatever process-wide provider another crate may install.
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(client_auth_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(client_auth_err)
}

/// Says in words what went wrong when a request failed in the TLS handshake.
fn explain_tls(err: &reqwest::Error, name: &str, ca: &Path) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C};
    let ca = ca.display();
    let tls = find_rustls_error(err);
    Some(match tls {
        Some(rustls::Error::InvalidCertificate(e)) => match e {
            C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension => {
                format!("the node's certificate is not from the pool CA ({ca})")
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "the node's certificate is not issued for {name:?} (--name sets the name to check)"
            ),
            C::Expired | C::ExpiredContext { .. } => "the node's certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the node's certificate is not valid yet (is a clock wrong?)".into()
            }
            other => format!("the node's certificate was rejected ({other:?})"),
        },
        Some(rustls::Error::AlertReceived(alert)) => match alert {
            A::CertificateExpired => {
                "the node refused our client certificate: it has expired".into()
            }
            A::UnknownCA => {
                "the node refused our client certificate: it is not from the node's pool CA".into()
            }
            A::CertificateRequired => {
                "the node refused the connection: it needs a client certificate".into()
            }
            // Every pool CA has the same subject, so a certificate from another pool finds
            // an issuer by name and fails on its signature.
            A::DecryptError => "the node refused our client certificate: \
                 its signature does not verify against the node's pool CA"
                .into(),
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::AccessDenied => format!("the node refused our client certificate ({alert:?})"),
            other => format!("the TLS handshake with the node failed: it sent {other:?}"),
        },
        Some(other) => format!("the TLS handshake with the node failed: {other}"),
        None => return None,
    })
}

fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        // io::Error::source() skips the error it wraps (and the TLS stack nests io::Errors),
        // so look inside by hand.
        cur = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let ok = [
            ("node-1:50000", "node-1", 50000),
            ("Node-1.Example:8443", "node-1.example", 8443),
            ("127.0.0.1:1234", "127.0.0.1", 1234),
            ("[::1]:1234", "::1", 1234),
            ("[::1]", "::1", 50000),
            ("::1", "::1", 50000),
            ("node-1", "node-1", 50000),
        ];
        for (s, host, port) in ok {
            let e: Endpoint = s.parse().unwrap_or_else(|err| panic!("{s}: {err}"));
            assert_eq!((e.host.as_str(), e.port), (host, port), "{s}");
        }
        for bad in [
            "",
            ":50000",
            "node:",
            "node:x",
            "node:0",
            "node:70000",
            "[::1",
            "[::1]x",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?}");
        }
        let e: Endpoint = "[::1]:5".parse().expect("parse");
        assert_eq!(e.to_string(), "[::1]:5");
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let inner = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        // As hyper-util wraps what tokio-rustls returns.
        let io = std::io::Error::other(io);
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let outer = Outer(io);
        assert_eq!(
            find_rustls_error(&outer),
            Some(&rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))
        );
    }
}
