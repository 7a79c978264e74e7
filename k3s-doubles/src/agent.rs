//! The agent double's logic: its command line, the config it reads, and the lines it
//! prints. The binary (`k3s-agent-double`) only wires these to stdout and signals.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use sha2::{Digest, Sha256};

use crate::LINE_PREFIX;

/// The config file path from `k3s agent --config FILE` (or `-c FILE`, `--config=FILE`),
/// the only invocation the double accepts. `args` excludes the program name.
pub fn config_path(args: &[String]) -> Option<PathBuf> {
    match args {
        [agent, flag, path] if agent == "agent" && (flag == "--config" || flag == "-c") => {
            Some(path.into())
        }
        [agent, flag] if agent == "agent" => flag.strip_prefix("--config=").map(PathBuf::from),
        _ => None,
    }
}

/// Why the config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "the config is not JSON (this double reads the JSON subset of YAML basalt-init writes)"
    )]
    Syntax(#[source] serde_json::Error),
    #[error("the config is not a mapping")]
    NotAMapping,
    #[error("the config lacks `{0}`")]
    Missing(&'static str),
    #[error("`{0}` must be a string or a list of strings")]
    BadType(String),
}

/// What `k3s agent` would take from its `config.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub server: String,
    pub token: String,
    pub node_name: Option<String>,
    pub node_ip: Vec<String>,
    pub node_label: Vec<String>,
    pub node_taint: Vec<String>,
    /// K3s's `data-dir`; `None` for its default, [`DEFAULT_DATA_DIR`].
    pub data_dir: Option<PathBuf>,
    /// Keys the double does not read, reported so a test sees them.
    pub other_keys: Vec<String>,
}

impl AgentConfig {
    /// K3s's config keys are its flag names. List-valued flags take a list or one string,
    /// and `node-ip` a comma-separated string, as in K3s.
    pub fn from_json(text: &str) -> Result<AgentConfig, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(ConfigError::Syntax)?;
        let map = value.as_object().ok_or(ConfigError::NotAMapping)?;
        let list = |key: &str| -> Result<Vec<String>, ConfigError> {
            let bad = || ConfigError::BadType(key.to_owned());
            match map.get(key) {
                None => Ok(Vec::new()),
                Some(serde_json::Value::String(s)) => Ok(vec![s.clone()]),
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
                    .collect(),
                Some(_) => Err(bad()),
            }
        };
        let string = |key: &'static str| -> Result<Option<String>, ConfigError> {
            Ok(list(key)?.into_iter().next())
        };
        let known = [
            "server",
            "token",
            "node-name",
            "node-ip",
            "node-label",
            "node-taint",
            "data-dir",
        ];
        Ok(AgentConfig {
            server: string("server")?.ok_or(ConfigError::Missing("server"))?,
            token: string("token")?.ok_or(ConfigError::Missing("token"))?,
            node_name: string("node-name")?,
            node_ip: list("node-ip")?
                .iter()
                .flat_map(|s| s.split(','))
                .map(str::to_owned)
                .collect(),
            node_label: list("node-label")?,
            node_taint: list("node-taint")?,
            data_dir: string("data-dir")?.map(PathBuf::from),
            other_keys: map
                .keys()
                .filter(|k| !known.contains(&k.as_str()))
                .cloned()
                .collect(),
        })
    }

    /// `k3s-agent-double: config server=… node-name=… node-ip=… labels=[…] taints=[…]
    /// token-sha256=…`: lists as JSON arrays; `-` for an absent value; the token only as
    /// its sha256, never itself.
    pub fn report(&self) -> String {
        let json = |v: &[String]| serde_json::Value::from(v.to_vec()).to_string();
        let mut line = format!(
            "{LINE_PREFIX} config server={} node-name={} node-ip={} labels={} taints={} token-sha256={}",
            self.server,
            self.node_name.as_deref().unwrap_or("-"),
            if self.node_ip.is_empty() { "-".to_owned() } else { self.node_ip.join(",") },
            json(&self.node_label),
            json(&self.node_taint),
            hex::encode(Sha256::digest(self.token.as_bytes())),
        );
        if !self.other_keys.is_empty() {
            let _ = write!(line, " other-keys={}", json(&self.other_keys));
        }
        line
    }
}

/// The line for a CA check outcome, and whether the agent may go on.
pub fn ca_check_report(result: &Result<basalt_api::k3s::CaCheck, String>) -> (String, bool) {
    use basalt_api::k3s::CaCheck;
    match result {
        Ok(CaCheck::Matched { .. }) => (format!("{LINE_PREFIX} ca-check passed"), true),
        Ok(CaCheck::NotPinned) => (
            format!("{LINE_PREFIX} ca-check skipped: the token pins no CA hash"),
            true,
        ),
        Err(why) => (format!("{LINE_PREFIX} ca-check failed: {why}"), false),
    }
}

/// K3s's default `data-dir` for a root agent.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/rancher/k3s";
/// Where a root K3s agent keeps its node password.
pub const NODE_PASSWORD_FILE: &str = "/etc/rancher/node/password";

impl AgentConfig {
    /// `<data-dir>/agent/client-kubelet.crt`, where K3s writes the kubelet client
    /// certificate the server issued (the key goes next to it, `.key`).
    pub fn client_kubelet_cert(&self) -> PathBuf {
        self.data_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_DATA_DIR))
            .join("agent/client-kubelet.crt")
    }

    /// K3s's node password file: `/etc/rancher/node/password`, or with a `data-dir`
    /// given, under it (`<data-dir>/agent/etc/rancher/node/password`, where a rootless
    /// K3s keeps it), so a test on the host never writes to `/etc`.
    pub fn node_password_file(&self) -> PathBuf {
        match &self.data_dir {
            Some(d) => d.join("agent/etc/rancher/node/password"),
            None => PathBuf::from(NODE_PASSWORD_FILE),
        }
    }

    /// The node's name: `node-name`, else the host name in lower case, as K3s takes it.
    pub fn node_name(&self) -> Result<String, RegisterError> {
        match &self.node_name {
            Some(n) => Ok(n.clone()),
            None => nix::unistd::gethostname()
                .map_err(|e| RegisterError::Hostname(e.into()))
                .map(|h| h.to_string_lossy().to_lowercase()),
        }
    }
}

/// Why the agent double got no kubelet credentials.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the token is a bootstrap token; the double authenticates with a password only")]
    NoPassword,
    #[error("server URL {0:?} is not https://host[:port]")]
    BadUrl(String),
    #[error("read the host name")]
    Hostname(#[source] io::Error),
    #[error("read or create the node password {0}")]
    NodePassword(PathBuf, #[source] io::Error),
    #[error("the CA bundle from the server holds no usable certificate")]
    Bundle,
    #[error("set up TLS")]
    Tls(#[source] rustls::Error),
    #[error("{url}")]
    Io {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{url}: malformed HTTP response")]
    BadResponse { url: String },
    /// K3s's wording for a refused node password.
    #[error("Node password rejected, duplicate hostname or contents of '{file}' may not match server node-passwd entry")]
    NodePasswordRejected { file: String },
    /// K3s's wording: `<url>: <status line>`, e.g. `…: 401 Unauthorized`.
    #[error("{url}: {status}")]
    Status { url: String, status: String },
    #[error("the server's answer holds no certificate or no private key")]
    NoCertificate,
    #[error("write {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// What [`register`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub node_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The registration step of `k3s agent`, after its CA check: `GET
/// /v1-k3s/client-kubelet.crt` from `server`, verified against `cacerts` (the bundle the
/// CA check accepted), with HTTP basic auth as `node` and the token's password and the
/// `K3s-Node-Name`, `K3s-Node-Password` and `K3s-Node-IP` headers (K3s's
/// `getNodeNamedCrt`); then the answer split into `client-kubelet.crt` and
/// `client-kubelet.key` under `<data-dir>/agent/`, mode 0600, as K3s does. A 403 is
/// K3s's "Node password rejected"; any other status other than 200 is
/// `<url>: <status>`, as K3s reports it.
pub fn register(
    config: &AgentConfig,
    password: &str,
    cacerts: &[u8],
    timeout: Duration,
) -> Result<Registered, RegisterError> {
    let node_name = config.node_name()?;
    let password_file = config.node_password_file();
    let node_password = ensure_node_password(&password_file)
        .map_err(|e| RegisterError::NodePassword(password_file.clone(), e))?;
    let path = crate::CLIENT_KUBELET_PATH;
    let authority = config
        .server
        .strip_prefix("https://")
        .map(|rest| rest.split('/').next().unwrap_or_default())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| RegisterError::BadUrl(config.server.clone()))?;
    let url = format!("https://{authority}{path}");
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{password}", crate::AGENT_USER))
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: k3s-agent-double\r\n\
         Authorization: Basic {basic}\r\nK3s-Node-Name: {node_name}\r\n\
         K3s-Node-Password: {node_password}\r\nK3s-Node-IP: {}\r\nConnection: close\r\n\r\n",
        config.node_ip.join(",")
    );
    let answer =
        https_get(authority, cacerts, request.as_bytes(), timeout).map_err(|e| match e {
            HttpsError::Tls(e) => RegisterError::Tls(e),
            HttpsError::Bundle => RegisterError::Bundle,
            HttpsError::Url => RegisterError::BadUrl(config.server.clone()),
            HttpsError::Io(source) => RegisterError::Io {
                url: url.clone(),
                source,
            },
        })?;
    let (code, status, body) =
        parse_response(&answer).ok_or_else(|| RegisterError::BadResponse { url: url.clone() })?;
    match code {
        200 => {}
        403 => {
            return Err(RegisterError::NodePasswordRejected {
                file: password_file.display().to_string(),
            })
        }
        _ => return Err(RegisterError::Status { url, status }),
    }
    let (certs, key) = split_cert_key(body);
    if certs.is_empty() || key.is_empty() {
        return Err(RegisterError::NoCertificate);
    }
    let cert = config.client_kubelet_cert();
    let key_path = cert.with_extension("key");
    // The key first: a certificate on disk means the pair is complete.
    write_0600(&key_path, key.as_bytes())?;
    write_0600(&cert, certs.as_bytes())?;
    Ok(Registered {
        node_name,
        cert,
        key: key_path,
    })
}

/// K3s's `ensureNodePassword`: the file's trimmed content, or 16 random bytes as hex
/// written there (0600) first.
fn ensure_node_password(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => return Ok(s.trim().to_owned()),
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let password = hex::encode(raw);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(format!("{password}\n").as_bytes())?;
    Ok(password)
}

fn write_0600(path: &Path, bytes: &[u8]) -> Result<(), RegisterError> {
    let err = |e| RegisterError::Write(path.to_owned(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(err)
}

/// K3s's `splitCertKeyPEM`: PEM blocks whose label contains `PRIVATE KEY` go to the
/// key, the others to the certificates, in order.
pub fn split_cert_key(pem: &str) -> (String, String) {
    let (mut certs, mut key) = (String::new(), String::new());
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let label_end = block[11..].find("-----").map_or(block.len(), |i| i + 11);
        let label = &block[11..label_end];
        let end_marker = format!("-----END {label}-----");
        let Some(end) = block.find(&end_marker) else {
            break;
        };
        let end = end + end_marker.len();
        let out = if label.contains("PRIVATE KEY") {
            &mut key
        } else {
            &mut certs
        };
        out.push_str(&block[..end]);
        out.push('\n');
        rest = &block[end..];
    }
    (certs, key)
}

enum HttpsError {
    Tls(rustls::Error),
    Bundle,
    Url,
    Io(io::Error),
}

/// Sends `request` to `authority` over TLS, the server verified against `cacerts`;
/// everything the server sent until it closed.
fn https_get(
    authority: &str,
    cacerts: &[u8],
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, HttpsError> {
    let mut roots = rustls::RootCertStore::empty();
    let ders = CertificateDer::pem_slice_iter(cacerts).filter_map(Result::ok);
    let (added, _) = roots.add_parsable_certificates(ders);
    if added == 0 {
        return Err(HttpsError::Bundle);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(HttpsError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or(HttpsError::Url)?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => 443,
        Some(p) => p.parse::<u16>().map_err(|_| HttpsError::Url)?,
    };
    let name = ServerName::try_from(host.to_owned()).map_err(|_| HttpsError::Url)?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(HttpsError::Tls)?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(HttpsError::Io)?
        .next()
        .ok_or(HttpsError::Url)?;
    let sock = TcpStream::connect_timeout(&addr, timeout).map_err(HttpsError::Io)?;
    sock.set_read_timeout(Some(timeout))
        .map_err(HttpsError::Io)?;
    sock.set_write_timeout(Some(timeout))
        .map_err(HttpsError::Io)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(request).map_err(HttpsError::Io)?;
    tls.flush().map_err(HttpsError::Io)?;
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) => Ok(answer),
        // A server that closes without close_notify after a complete answer.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !answer.is_empty() => Ok(answer),
        Err(e) => Err(HttpsError::Io(e)),
    }
}

/// The status code, the status as Go prints it (`401 Unauthorized`), and the body (up to
/// Content-Length when given).
fn parse_response(answer: &[u8]) -> Option<(u16, String, &str)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(at) = resp.parse(answer).ok()? else {
        return None;
    };
    let code = resp.code?;
    let status = format!("{code} {}", resp.reason.unwrap_or_default());
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let body = &answer[at..];
    let body = &body[..len.map_or(body.len(), |l| l.min(body.len()))];
    Some((code, status, std::str::from_utf8(body).ok()?))
}

/// An error and its causes on one line, as the double prints them.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_agent_with_a_config_is_accepted() {
        let want = Some(PathBuf::from("/etc/rancher/k3s/config.yaml"));
        for ok in [
            &["agent", "--config", "/etc/rancher/k3s/config.yaml"][..],
            &["agent", "-c", "/etc/rancher/k3s/config.yaml"],
            &["agent", "--config=/etc/rancher/k3s/config.yaml"],
        ] {
            assert_eq!(config_path(&args(ok)), want, "{ok:?}");
        }
        for bad in [
            &[][..],
            &["server", "--config", "x"],
            &["agent"],
            &["agent", "--config"],
            &["agent", "--token", "x"],
            &["agent", "--config", "x", "--debug"],
        ] {
            assert_eq!(config_path(&args(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn the_config_basalt_init_writes_is_read() {
        let text = r#"{"node-ip":"10.0.2.15","node-label":["pool=warm","zone=a"],"node-name":"warm-1","node-taint":["dedicated=ci:NoSchedule"],"server":"https://10.0.2.2:6443","token":"K10abc::server:pw"}"#;
        let c = AgentConfig::from_json(text).unwrap();
        assert_eq!(
            c,
            AgentConfig {
                server: "https://10.0.2.2:6443".into(),
                token: "K10abc::server:pw".into(),
                node_name: Some("warm-1".into()),
                node_ip: vec!["10.0.2.15".into()],
                node_label: vec!["pool=warm".into(), "zone=a".into()],
                node_taint: vec!["dedicated=ci:NoSchedule".into()],
                data_dir: None,
                other_keys: vec![],
            }
        );
        let line = c.report();
        assert_eq!(
            line,
            format!(
                "k3s-agent-double: config server=https://10.0.2.2:6443 node-name=warm-1 node-ip=10.0.2.15 labels=[\"pool=warm\",\"zone=a\"] taints=[\"dedicated=ci:NoSchedule\"] token-sha256={}",
                hex::encode(Sha256::digest(b"K10abc::server:pw"))
            )
        );
        assert!(!line.contains("server:pw"));
    }

    #[test]
    fn the_answer_is_split_into_certificates_and_key_in_order() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n\
                   -----BEGIN EC PRIVATE KEY-----\nKKK\n-----END EC PRIVATE KEY-----\n";
        let (certs, key) = split_cert_key(pem);
        assert_eq!(
            certs,
            "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
             -----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n"
        );
        assert_eq!(
            key,
            "-----BEGIN EC PRIVATE KEY-----\nKKK\n-----END EC PRIVATE KEY-----\n"
        );
        assert_eq!(split_cert_key("no pem"), (String::new(), String::new()));
    }

    #[test]
    fn paths_follow_data_dir() {
        let mut c = AgentConfig::from_json(r#"{"server":"https://s","token":"t"}"#).unwrap();
        assert_eq!(
            c.client_kubelet_cert(),
            PathBuf::from("/var/lib/rancher/k3s/agent/client-kubelet.crt")
        );
        assert_eq!(
            c.node_password_file(),
            PathBuf::from("/etc/rancher/node/password")
        );
        c.data_dir = Some("/tmp/x".into());
        assert_eq!(
            c.client_kubelet_cert(),
            PathBuf::from("/tmp/x/agent/client-kubelet.crt")
        );
        assert!(c.other_keys.is_empty());
    }

    #[test]
    fn sparse_and_odd_configs() {
        let c = AgentConfig::from_json(
            r#"{"server":"https://s","token":"t","node-label":"a=b","node-ip":"10.0.0.1,fd00::1","debug":true}"#,
        )
        .unwrap();
        assert_eq!(c.node_label, vec!["a=b"]);
        assert_eq!(c.node_ip, vec!["10.0.0.1", "fd00::1"]);
        assert_eq!(c.other_keys, vec!["debug"]);
        let line = c.report();
        assert!(line.contains(" node-name=- "), "{line}");
        assert!(line.contains(" taints=[] "), "{line}");
        assert!(line.ends_with(" other-keys=[\"debug\"]"), "{line}");

        for (text, want) in [
            ("server: x", "not JSON"),
            ("[]", "not a mapping"),
            (r#"{"token":"t"}"#, "lacks `server`"),
            (r#"{"server":"s"}"#, "lacks `token`"),
            (
                r#"{"server":"s","token":"t","node-label":[1]}"#,
                "`node-label`",
            ),
            (r#"{"server":"s","token":{}}"#, "`token`"),
        ] {
            let err = AgentConfig::from_json(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
