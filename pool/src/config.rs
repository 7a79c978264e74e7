//! `pool.toml`: what `basalt pool run` keeps and for whom.
//!
//! ```toml
//! name = "eu-small"              # the pool; every server carries basalt.io/pool=<name>
//! standby = 2                    # booted nodes kept waiting (a cost knob: each is a server)
//! max = 10                       # every server of the pool together, whatever its state
//! ca_dir = "/etc/basalt/pool-ca" # the pool CA (ca.pem, ca.key)
//! standby_timeout = "10m"        # optional: create → standby deadline
//! tick = "10s"                   # optional: one reconcile pass (and lock heartbeat) this often
//! lock_ttl = "60s"               # optional: a lock not renewed for this long may be taken over
//!
//! [provider]
//! kind = "hetzner"
//! server_type = "cx22"
//! location = "fsn1"
//! image_selector = "basalt.io/image=k3s-node"
//! token_env = "HCLOUD_TOKEN"     # or token_file; the default is HCLOUD_TOKEN
//!
//! [[cluster]]
//! name = "customer-a"
//! server = "https://10.0.0.2:6443"
//! token_file = "/run/secrets/customer-a-token"   # or token_env
//! client_name = "autoscaler-customer-a"          # CN of its autoscaler's client certificate
//! labels = { "example.com/customer" = "a" }
//! taints = ["dedicated=a:NoSchedule"]
//! network = "customer-a-net"                     # optional Hetzner private network
//!
//! [listen]                       # what `basalt pool run` serves, both over mutual TLS
//! grpc = "0.0.0.0:8086"          # cluster-autoscaler's externalgrpc (the default)
//! api = "127.0.0.1:8087"         # basalt pool status|promote|delete, /metrics (the default)
//! cert = "controller.pem"        # the controller's certificate from the pool CA
//! key = "controller.key"
//! admins = ["operator"]          # client certificate CNs allowed status/promote/delete
//! ```
//!
//! Secrets (the join tokens, the Hetzner token) are read when the file is loaded and never
//! appear in `Debug` output or errors.

use basalt_api::config::{LabelKey, LabelValue, ServerUrl, Taint, Token};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole of `pool.toml`, validated, with secrets read.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub provider: ProviderConfig,
    pub standby: u32,
    pub max: u32,
    pub ca_dir: PathBuf,
    /// A server that does not reach standby within this is deleted and replaced.
    pub standby_timeout: Duration,
    /// How often the controller reconciles and renews its lock.
    pub tick: Duration,
    /// How long a lock that is not renewed keeps another controller out (at least 3 ticks).
    pub lock_ttl: Duration,
    pub clusters: Vec<ClusterConfig>,
    /// Where `basalt pool run` serves; needed only to run the controller.
    pub listen: Option<ListenConfig>,
}

/// `[listen]`: the controller's two mutual-TLS doors, both with the controller's own
/// certificate from the pool CA (its SANs must name what autoscalers and admins dial).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// cluster-autoscaler's externalgrpc cloud provider.
    #[serde(default = "default_grpc")]
    pub grpc: std::net::SocketAddr,
    /// The pool API (`basalt pool status|promote|delete`) and `/metrics`.
    #[serde(default = "default_api")]
    pub api: std::net::SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Common names of the client certificates allowed status, promote and delete.
    #[serde(default)]
    pub admins: Vec<String>,
}

fn default_grpc() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 8086))
}

fn default_api() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 8087))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderConfig {
    Hetzner(HetznerSettings),
    Qemu(QemuSettings),
}

#[derive(Clone, PartialEq, Eq)]
pub struct HetznerSettings {
    pub server_type: String,
    pub location: Option<String>,
    /// Snapshots servers are created from: the newest that matches.
    pub image_selector: String,
    /// `HCLOUD_ENDPOINT` when absent, else Hetzner's.
    pub endpoint: Option<String>,
    /// The API token (never printed).
    pub token: String,
}

impl std::fmt::Debug for HetznerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HetznerSettings")
            .field("server_type", &self.server_type)
            .field("location", &self.location)
            .field("image_selector", &self.image_selector)
            .field("endpoint", &self.endpoint)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Local QEMU VMs: the qemu provider's own settings.
pub use crate::qemu::QemuSettings;

/// A cluster the pool serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: String,
    pub server: ServerUrl,
    /// The join token; `Token`'s `Debug` does not print the secret.
    pub token: Token,
    /// The common name of this cluster's autoscaler client certificate.
    pub client_name: String,
    pub labels: BTreeMap<LabelKey, LabelValue>,
    pub taints: Vec<Taint>,
    /// A Hetzner private network the server is attached to at promotion.
    pub network: Option<String>,
}

// What serde reads, before secrets are resolved and values checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    provider: RawProvider,
    standby: u32,
    max: u32,
    ca_dir: PathBuf,
    #[serde(default)]
    standby_timeout: Option<String>,
    #[serde(default)]
    tick: Option<String>,
    #[serde(default)]
    lock_ttl: Option<String>,
    #[serde(default, rename = "cluster")]
    clusters: Vec<RawCluster>,
    #[serde(default)]
    listen: Option<ListenConfig>,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum RawProvider {
    Hetzner(RawHetzner),
    Qemu(QemuSettings),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHetzner {
    server_type: String,
    #[serde(default)]
    location: Option<String>,
    image_selector: String,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    token_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    server: ServerUrl,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    token_env: Option<String>,
    client_name: String,
    #[serde(default)]
    labels: BTreeMap<LabelKey, LabelValue>,
    #[serde(default)]
    taints: Vec<Taint>,
    #[serde(default)]
    network: Option<String>,
}

/// Default time between reconcile passes (and lock renewals).
pub const DEFAULT_TICK: Duration = Duration::from_secs(10);
/// Default time after which a lock that was not renewed may be taken over.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(60);

/// Default create → standby deadline (a cold boot from a snapshot, with room).
pub const DEFAULT_STANDBY_TIMEOUT: Duration = Duration::from_secs(600);

impl PoolConfig {
    /// Reads and validates `path`; tokens are read from their files and variables.
    pub fn load(path: &Path) -> Result<PoolConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text, &|k| std::env::var(k).ok())
    }

    /// Parses `text` as if read from `path` (relative token files are relative to its
    /// folder); `env` looks up environment variables.
    pub fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PoolConfig, ConfigError> {
        let raw: RawPool = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let cx = Cx { path, env };
        let provider = match raw.provider {
            RawProvider::Hetzner(h) => ProviderConfig::Hetzner(cx.hetzner(h)?),
            RawProvider::Qemu(q) => ProviderConfig::Qemu(cx.qemu(q)?),
        };
        let clusters = raw
            .clusters
            .into_iter()
            .enumerate()
            .map(|(i, c)| cx.cluster(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let duration = |key: &str, value: Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(t) => {
                humantime::parse_duration(&t).map_err(|e| cx.invalid(key, format!("{t:?}: {e}")))
            }
        };
        let standby_timeout = duration(
            "standby_timeout",
            raw.standby_timeout,
            DEFAULT_STANDBY_TIMEOUT,
        )?;
        let tick = duration("tick", raw.tick, DEFAULT_TICK)?;
        let lock_ttl = duration("lock_ttl", raw.lock_ttl, DEFAULT_LOCK_TTL)?;
        if tick.is_zero() || lock_ttl < tick * 3 {
            return Err(cx.invalid(
                "lock_ttl",
                format!(
                    "{} must be at least 3 ticks ({} each): a live controller renews its lock every tick",
                    humantime::format_duration(lock_ttl),
                    humantime::format_duration(tick)
                ),
            ));
        }
        let config = PoolConfig {
            name: raw.name,
            provider,
            standby: raw.standby,
            max: raw.max,
            ca_dir: cx.relative(&raw.ca_dir),
            standby_timeout,
            tick,
            lock_ttl,
            clusters,
            listen: raw.listen.map(|mut l| {
                l.cert = cx.relative(&l.cert);
                l.key = cx.relative(&l.key);
                l
            }),
        };
        cx.validate(&config)?;
        Ok(config)
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The cluster whose autoscaler presents a client certificate named `client_name`.
    pub fn cluster_for_client(&self, client_name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.client_name == client_name)
    }
}

/// Parsing context: the file (for errors and relative paths) and the environment.
struct Cx<'a> {
    path: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Cx<'_> {
    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn relative(&self, p: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// A secret from `file` or the variable `env` (exactly one), or `default_env`.
    fn secret(
        &self,
        key: &str,
        file: Option<&Path>,
        env: Option<&str>,
        default_env: Option<&str>,
    ) -> Result<String, ConfigError> {
        let (file_key, env_key) = (format!("{key}token_file"), format!("{key}token_env"));
        let value = match (file, env.or(default_env)) {
            (Some(_), Some(_)) if env.is_some() => {
                return Err(
                    self.invalid(&file_key, format!("give {file_key} or {env_key}, not both"))
                )
            }
            (Some(f), _) => {
                let f = self.relative(f);
                std::fs::read_to_string(&f)
                    .map_err(|e| self.invalid(&file_key, format!("read {}: {e}", f.display())))?
            }
            (None, Some(var)) => (self.env)(var).ok_or_else(|| {
                self.invalid(
                    &env_key,
                    format!("the environment variable {var} is not set"),
                )
            })?,
            (None, None) => {
                return Err(
                    self.invalid(&file_key, format!("missing: give {file_key} or {env_key}"))
                )
            }
        };
        let value = value.trim().to_owned();
        if value.is_empty() {
            return Err(self.invalid(&file_key, "the token is empty"));
        }
        Ok(value)
    }

    fn hetzner(&self, h: RawHetzner) -> Result<HetznerSettings, ConfigError> {
        let token = self.secret(
            "provider.",
            h.token_file.as_deref(),
            h.token_env.as_deref(),
            Some("HCLOUD_TOKEN"),
        )?;
        for (key, v) in [
            ("provider.server_type", &h.server_type),
            ("provider.image_selector", &h.image_selector),
        ] {
            if v.trim().is_empty() {
                return Err(self.invalid(key, "empty"));
            }
        }
        Ok(HetznerSettings {
            server_type: h.server_type,
            location: h.location,
            image_selector: h.image_selector,
            endpoint: h.endpoint,
            token,
        })
    }

    fn qemu(&self, mut q: QemuSettings) -> Result<QemuSettings, ConfigError> {
        if q.images.is_empty() {
            return Err(self.invalid("provider.images", "at least one image file"));
        }
        if q.memory_mib < 256 {
            return Err(self.invalid("provider.memory_mib", "at least 256"));
        }
        if q.cpus == 0 {
            return Err(self.invalid("provider.cpus", "at least 1"));
        }
        q.images = q.images.iter().map(|p| self.relative(p)).collect();
        q.state_dir = self.relative(&q.state_dir);
        Ok(q)
    }

    fn cluster(&self, i: usize, c: RawCluster) -> Result<ClusterConfig, ConfigError> {
        let key = format!("cluster[{i}].");
        let text = self.secret(&key, c.token_file.as_deref(), c.token_env.as_deref(), None)?;
        let token = Token::parse(&text)
            .map_err(|e| self.invalid(format!("{key}token_file"), e.to_string()))?;
        if !valid_name(&c.name) {
            return Err(self.invalid(
                format!("{key}name"),
                format!(
                    "{:?}: 1-63 of [a-z0-9-], not starting or ending with '-'",
                    c.name
                ),
            ));
        }
        if c.client_name.trim().is_empty() {
            return Err(self.invalid(format!("{key}client_name"), "empty"));
        }
        Ok(ClusterConfig {
            name: c.name,
            server: c.server,
            token,
            client_name: c.client_name,
            labels: c.labels,
            taints: c.taints,
            network: c.network,
        })
    }

    fn validate(&self, c: &PoolConfig) -> Result<(), ConfigError> {
        if !valid_name(&c.name) {
            return Err(self.invalid(
                "name",
                format!("{:?}: 1-63 of [a-z0-9-], not starting or ending with '-' (it is a label value and a server-name prefix)", c.name),
            ));
        }
        if c.max == 0 {
            return Err(self.invalid("max", "must be at least 1"));
        }
        if c.standby > c.max {
            return Err(self.invalid(
                "standby",
                format!("{} standbys do not fit under max = {}", c.standby, c.max),
            ));
        }
        let mut names = BTreeSet::new();
        let mut clients = BTreeSet::new();
        for (i, cl) in c.clusters.iter().enumerate() {
            if !names.insert(&cl.name) {
                return Err(self.invalid(
                    format!("cluster[{i}].name"),
                    format!("{:?} is used by another cluster", cl.name),
                ));
            }
            if !clients.insert(&cl.client_name) {
                return Err(self.invalid(
                    format!("cluster[{i}].client_name"),
                    format!("{:?} is used by another cluster: each autoscaler must be told apart by its certificate", cl.client_name),
                ));
            }
            if cl.network.is_some() && matches!(c.provider, ProviderConfig::Qemu(_)) {
                return Err(self.invalid(
                    format!("cluster[{i}].network"),
                    "the qemu provider has no private networks",
                ));
            }
        }
        Ok(())
    }
}

/// A label value and server-name part: RFC 1123 label, lowercase.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str =
        "K101111111111111111111111111111111111111111111111111111111111111111::server:s3cr3t-pw";

    fn env(k: &str) -> Option<String> {
        match k {
            "HCLOUD_TOKEN" => Some("hc-secret-token".into()),
            "A_TOKEN" => Some(TOKEN.into()),
            "B_TOKEN" => Some("plain-shared-s3cr3t".into()),
            _ => None,
        }
    }

    const GOOD: &str = r#"
name = "eu-small"
standby = 2
max = 5
ca_dir = "ca"
standby_timeout = "90s"

[provider]
kind = "hetzner"
server_type = "cx22"
location = "fsn1"
image_selector = "basalt.io/image=k3s-node"

[[cluster]]
name = "customer-a"
server = "https://10.0.0.2:6443"
token_env = "A_TOKEN"
client_name = "autoscaler-a"
labels = { "example.com/customer" = "a" }
taints = ["dedicated=a:NoSchedule"]
network = "net-a"

[[cluster]]
name = "customer-b"
server = "https://10.1.0.2:6443"
token_env = "B_TOKEN"
client_name = "autoscaler-b"
"#;

    fn parse(text: &str) -> Result<PoolConfig, ConfigError> {
        PoolConfig::parse(Path::new("/etc/basalt/pool.toml"), text, &env)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn tick_and_lock_ttl_default_and_are_checked_together() {
        let c = parse(GOOD).expect("valid");
        assert_eq!((c.tick, c.lock_ttl), (DEFAULT_TICK, DEFAULT_LOCK_TTL));
        let fast = GOOD.replace(
            "standby_timeout = \"90s\"",
            "tick = \"1s\"\nlock_ttl = \"4s\"",
        );
        let c = parse(&fast).expect("valid");
        assert_eq!(
            (c.tick, c.lock_ttl),
            (Duration::from_secs(1), Duration::from_secs(4))
        );
        // A lock that expires between two renewals would let a second controller in.
        let e = err(&GOOD.replace(
            "standby_timeout = \"90s\"",
            "tick = \"30s\"\nlock_ttl = \"60s\"",
        ));
        assert!(e.contains("lock_ttl") && e.contains("3 ticks"), "{e}");
        let e = err(&GOOD.replace("standby_timeout = \"90s\"", "tick = \"soon\""));
        assert!(e.contains("tick"), "{e}");
    }

    #[test]
    fn a_full_config_reads_back() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.name, "eu-small");
        assert_eq!((c.standby, c.max), (2, 5));
        assert_eq!(c.ca_dir, Path::new("/etc/basalt/ca"));
        assert_eq!(c.standby_timeout, Duration::from_secs(90));
        let ProviderConfig::Hetzner(h) = &c.provider else {
            panic!("hetzner expected")
        };
        assert_eq!(h.token, "hc-secret-token");
        assert_eq!(h.location.as_deref(), Some("fsn1"));
        let a = c.cluster("customer-a").expect("a");
        assert_eq!(a.token.secret_string(), TOKEN);
        assert_eq!(a.taints[0].to_string(), "dedicated=a:NoSchedule");
        assert_eq!(a.network.as_deref(), Some("net-a"));
        assert_eq!(
            c.cluster_for_client("autoscaler-b")
                .map(|c| c.name.as_str()),
            Some("customer-b")
        );
        assert!(c.cluster_for_client("autoscaler-c").is_none());
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let c = parse(GOOD).expect("valid");
        let dbg = format!("{c:?}");
        for secret in ["hc-secret-token", "s3cr3t-pw", "plain-shared-s3cr3t"] {
            assert!(!dbg.contains(secret), "{secret} in {dbg}");
        }
        assert!(dbg.contains("customer-a"), "{dbg}");
    }

    #[test]
    fn token_files_are_read_relative_to_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.token"), format!("{TOKEN}\n")).expect("write");
        let text = GOOD.replace("token_env = \"A_TOKEN\"", "token_file = \"a.token\"");
        let c = PoolConfig::parse(&dir.path().join("pool.toml"), &text, &env).expect("valid");
        assert_eq!(
            c.cluster("customer-a").expect("a").token.secret_string(),
            TOKEN
        );
        let e = PoolConfig::parse(
            &dir.path().join("pool.toml"),
            &text.replace("a.token", "gone.token"),
            &env,
        )
        .expect_err("missing file")
        .to_string();
        assert!(
            e.contains("cluster[0].token_file") && e.contains("gone.token"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = err(&GOOD.replace("standby = 2", "standby = 6"));
        assert!(
            e.contains("/etc/basalt/pool.toml") && e.contains("standby:") && e.contains("max = 5"),
            "{e}"
        );
        let e = err(&GOOD.replace("name = \"customer-b\"", "name = \"customer-a\""));
        assert!(e.contains("cluster[1].name"), "{e}");
        let e = err(&GOOD.replace(
            "client_name = \"autoscaler-b\"",
            "client_name = \"autoscaler-a\"",
        ));
        assert!(e.contains("cluster[1].client_name"), "{e}");
        let e = err(&GOOD.replace("B_TOKEN", "NOPE_TOKEN"));
        assert!(
            e.contains("cluster[1].token_env") && e.contains("NOPE_TOKEN"),
            "{e}"
        );
        let e = err(&GOOD.replace("eu-small", "EU_small"));
        assert!(e.contains(": name:"), "{e}");
        let e = err(&GOOD.replace("\"90s\"", "\"soon\""));
        assert!(e.contains("standby_timeout"), "{e}");
        let e = err(&GOOD.replace("max = 5", "max = 0"));
        assert!(e.contains("max:"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let e = err(&GOOD.replace(
            "server_type = \"cx22\"",
            "server_type = \"cx22\"\nflavor = 1",
        ));
        assert!(e.contains("flavor") && e.contains("pool.toml"), "{e}");
        let e = err(&GOOD.replace("dedicated=a:NoSchedule", "dedicated=a:Sometimes"));
        assert!(e.contains("Sometimes"), "{e}");
        let e = err(&GOOD.replace("https://10.1.0.2:6443", "http://10.1.0.2:6443"));
        assert!(e.contains("https://"), "{e}");
        let e = err(&GOOD.replace("kind = \"hetzner\"", "kind = \"aws\""));
        assert!(e.contains("aws"), "{e}");
    }

    #[test]
    fn a_malformed_secure_token_is_refused_without_printing_it() {
        let bad = "K10abc::server:hunter2";
        let e = PoolConfig::parse(Path::new("p.toml"), GOOD, &|k| {
            if k == "A_TOKEN" {
                Some(bad.into())
            } else {
                env(k)
            }
        })
        .expect_err("bad token")
        .to_string();
        assert!(e.contains("cluster[0]") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn the_qemu_provider_reads_its_settings() {
        let text = r#"
name = "laptop"
standby = 2
max = 3
ca_dir = "/ca"
[provider]
kind = "qemu"
images = ["img/k3s-node.qcow2"]
state_dir = "/var/lib/basalt-pool"
memory_mib = 2048
"#;
        let c = parse(text).expect("valid");
        let ProviderConfig::Qemu(q) = &c.provider else {
            panic!("qemu expected")
        };
        assert_eq!(
            q.images,
            vec![PathBuf::from("/etc/basalt/img/k3s-node.qcow2")]
        );
        assert_eq!(
            (q.memory_mib, q.cpus),
            (2048, 2),
            "the provider's default CPUs"
        );
        assert!(c.clusters.is_empty());
        let e = err(&text.replace("images = [\"img/k3s-node.qcow2\"]", "images = []"));
        assert!(e.contains("provider.images"), "{e}");
        let e = err(&format!(
            "{text}\n[[cluster]]\nname = \"a\"\nserver = \"https://h:6443\"\ntoken_env = \"B_TOKEN\"\nclient_name = \"c\"\nnetwork = \"n\"\n"
        ));
        assert!(e.contains("cluster[0].network"), "{e}");
    }
}
