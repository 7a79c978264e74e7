//! The machine config: one versioned TOML document that says what a node is.
//!
//! ```toml
//! version = 1
//!
//! [node]
//! hostname = "worker-1"
//! labels = { "example.com/pool" = "warm" }
//! taints = ["dedicated=gpu:NoSchedule"]
//!
//! [network]                      # DHCPv4 unless told otherwise
//! addresses = ["10.0.0.5/24", "2a01:4f8::5/64"]
//! routes = [{ to = "0.0.0.0/0", via = "10.0.0.1" }]
//! dns = ["10.0.0.1"]
//! ntp = ["ntp1.hetzner.de"]
//!
//! [api]
//! listen = "0.0.0.0:50000"
//! ca = "-----BEGIN CERTIFICATE-----\n…\n-----END CERTIFICATE-----\n"
//! cert = "…"
//! key = "…"
//! revoked = ["5A3F…"]            # client certificate serials refused
//!
//! [cluster]                      # absent: the node stays in standby
//! server = "https://10.0.0.2:6443"
//! token = "K10<sha256 of the server CA>::server:<password>"
//! ```
//!
//! Parsing is strict: every table rejects unknown keys, every value is validated, and
//! every error names the key by its full dotted path (`network.routes[1].via: …`).
//! [`MachineConfig::to_toml`] writes a document that parses back to the same value, and
//! [`MachineConfig::k3s_config_json`] writes K3s's own `config.yaml` (JSON is valid YAML).

mod keyed;
mod token;
mod values;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use keyed::ValueDe;
pub use token::{Token, TokenError};
pub use values::{
    CertSerial, Cidr, Host, Hostname, LabelKey, LabelValue, Pem, ProviderId, SecretPem, ServerUrl,
    Taint, TaintEffect,
};

/// The config version this basalt reads and writes.
pub const CONFIG_VERSION: i64 = 1;

/// Default listen address of the node API.
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:50000";

/// The largest machine config basalt reads, from any source (fw_cfg, metadata user-data,
/// the node API's request body).
pub const MAX_BYTES: u64 = 256 * 1024;

/// Why a machine config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not TOML at all. Only the place and TOML's message are kept, never the
    /// offending line: it may be the `token =` or `key =` line, and this error reaches the
    /// console and the kernel log.
    #[error("machine config is not valid TOML: line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// `version` names a schema this basalt does not know.
    #[error("version: unsupported {0}, this basalt reads {CONFIG_VERSION}")]
    UnsupportedVersion(i64),
    /// A key is unknown, missing, of the wrong type or has a bad value.
    #[error("{key}: {message}")]
    Invalid {
        /// Full dotted path of the key, e.g. `network.routes[1].via` or
        /// `node.labels."bad key"`.
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The dotted path of the offending key, when the error is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Syntax { .. } => None,
            ConfigError::UnsupportedVersion(_) => Some("version"),
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

/// A TOML error reduced to its line, column (both from 1) and message, without the
/// snippet of the document `toml::de::Error`'s `Display` would quote.
fn syntax(text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |span| span.start.min(text.len()));
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .chars()
        .count()
        + 1;
    ConfigError::Syntax {
        line,
        column,
        message: e.message().trim().replace('\n', "; "),
    }
}

/// Why `to_toml` failed (only on a value no parser could have produced).
#[derive(Debug, thiserror::Error)]
#[error("cannot write machine config as TOML")]
pub struct ToTomlError(#[source] toml::ser::Error);

/// A whole machine config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Always [`CONFIG_VERSION`] once parsed.
    pub version: i64,
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    pub api: ApiConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    #[serde(default, skip_serializing_if = "StandbyConfig::is_empty")]
    pub standby: StandbyConfig,
}

/// `[node]`: identity and scheduling.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// When absent, the hostname comes from metadata (or stays the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Hostname>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<LabelKey, LabelValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// `[network]`: DHCPv4 by default, static addresses and routes on top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default = "default_true")]
    pub dhcp4: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "de_ips",
        serialize_with = "ser_ips"
    )]
    pub dns: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ntp: Vec<Host>,
    /// Configure IPv6 from the Hetzner metadata service's `network-config`.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub ipv6_from_metadata: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            dhcp4: true,
            addresses: Vec::new(),
            routes: Vec::new(),
            dns: Vec::new(),
            ntp: Vec::new(),
            ipv6_from_metadata: true,
        }
    }
}

/// One static route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub to: Cidr,
    #[serde(deserialize_with = "de_ip", serialize_with = "ser_ip")]
    pub via: IpAddr,
}

/// `[api]`: the node API's listen address and TLS material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(
        default = "default_listen",
        deserialize_with = "de_socket",
        serialize_with = "ser_socket"
    )]
    pub listen: SocketAddr,
    /// The pool CA that signs client certificates.
    pub ca: Pem,
    /// The node's own certificate (chain).
    pub cert: Pem,
    /// The node's private key.
    pub key: SecretPem,
    /// Serials of pool client certificates the node refuses (hex, as
    /// `openssl x509 -noout -serial` prints them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<CertSerial>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 50000))
}

/// `[cluster]`: what `k3s agent` joins. Absent means standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub server: ServerUrl,
    pub token: Token,
    /// Defaults to `node.hostname`, lowercased. A Kubernetes node name is a lowercase
    /// RFC 1123 subdomain, so capitals are rejected here (the hostname may keep them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<Hostname>,
    /// The kubelet's `--provider-id` (set by the warm pool so that autoscalers map the
    /// Node to its server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<ProviderId>,
}

/// `[standby]`: what a node waiting to be promoted may do ahead of its promotion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyConfig {
    /// K3s servers this node may be told to join. In standby, basalt-init fetches and
    /// checks each one's `/cacerts` ahead (as the join's check does: unverified TLS,
    /// nothing sent but the GET) and keeps the TLS session, so that a promotion's check
    /// against one of them takes one resumed round trip and no certificate work. Joining
    /// any other server works as well, only without that head start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerUrl>,
}

impl StandbyConfig {
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }
}

impl MachineConfig {
    /// Parse and validate a TOML document.
    pub fn parse(text: &str) -> Result<MachineConfig, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| syntax(text, &e))?;
        // The version first: a document from a newer basalt may have keys this one does not know.
        match table.get("version") {
            None => return Err(invalid("version", "missing; this basalt reads 1")),
            Some(toml::Value::Integer(CONFIG_VERSION)) => {}
            Some(toml::Value::Integer(n)) => return Err(ConfigError::UnsupportedVersion(*n)),
            Some(other) => {
                return Err(invalid(
                    "version",
                    format!("expected an integer, found {}", other.type_str()),
                ))
            }
        }
        if !table.contains_key("api") {
            return Err(invalid(
                "api",
                "missing; the node API needs `ca`, `cert` and `key`",
            ));
        }
        let root = toml::Value::Table(table);
        let config = MachineConfig::deserialize(ValueDe {
            value: &root,
            path: String::new(),
        })
        .map_err(|e| ConfigError::Invalid {
            key: e
                .path
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "(document)".into()),
            message: e.message,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks across keys, and those a key's type is too general for, after each value
    /// was validated alone.
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = self.cluster.as_ref().and_then(|c| c.node_name.as_ref()) {
            if name.as_str().bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(invalid(
                    "cluster.node_name",
                    format!("{name:?} is not a node name: Kubernetes node names are lowercase"),
                ));
            }
        }
        for (i, route) in self.network.routes.iter().enumerate() {
            if route.to.addr.is_ipv4() != route.via.is_ipv4() {
                return Err(invalid(
                    format!("network.routes[{i}].via"),
                    format!(
                        "{} is not of the same IP family as `to` ({})",
                        route.via, route.to
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Write the config as a TOML document that [`MachineConfig::parse`] reads back.
    pub fn to_toml(&self) -> Result<String, ToTomlError> {
        toml::to_string(self).map_err(ToTomlError)
    }

    /// No `[cluster]`: the node waits to be told to join.
    pub fn is_standby(&self) -> bool {
        self.cluster.is_none()
    }

    /// The servers whose CA a node in standby fetches ahead (`standby.servers`); none
    /// once it has a `[cluster]`.
    pub fn prefetch_servers(&self) -> Vec<String> {
        if !self.is_standby() {
            return Vec::new();
        }
        let servers = self.standby.servers.iter().map(|s| s.as_str().to_owned());
        servers.collect()
    }

    /// The K3s node name: `cluster.node_name`, else `node.hostname`, lowercased either way
    /// (Kubernetes node names are lowercase RFC 1123 subdomains).
    pub fn k3s_node_name(&self) -> Option<Hostname> {
        let cluster = self.cluster.as_ref()?;
        let name = cluster.node_name.as_ref().or(self.node.hostname.as_ref())?;
        Some(name.to_lowercase())
    }

    /// K3s's `config.yaml` for `k3s agent`, as JSON (valid YAML); `None` in standby.
    ///
    /// Keys: `server`, `token`, `node-name` (when known), `node-label`, `node-taint`,
    /// `node-ip` and `kubelet-arg` with `provider-id=` (when given). The token is written in full.
    pub fn k3s_config_json(&self, node_ip: Option<IpAddr>) -> Option<String> {
        let cluster = self.cluster.as_ref()?;
        let mut map = serde_json::Map::new();
        map.insert("server".into(), cluster.server.as_str().into());
        map.insert("token".into(), cluster.token.secret_string().into());
        if let Some(name) = self.k3s_node_name() {
            map.insert("node-name".into(), name.as_str().into());
        }
        let labels: Vec<serde_json::Value> = self
            .node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}").into())
            .collect();
        map.insert("node-label".into(), labels.into());
        let taints: Vec<serde_json::Value> = self
            .node
            .taints
            .iter()
            .map(|t| t.to_string().into())
            .collect();
        map.insert("node-taint".into(), taints.into());
        if let Some(ip) = node_ip {
            map.insert("node-ip".into(), ip.to_string().into());
        }
        if let Some(id) = &cluster.provider_id {
            map.insert(
                "kubelet-arg".into(),
                vec![serde_json::Value::from(format!("provider-id={id}"))].into(),
            );
        }
        let mut out = serde_json::Value::Object(map).to_string();
        out.push('\n');
        Some(out)
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// Std types with our own messages.

fn de_ip<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|_| de::Error::custom(format!("{s:?} is not an IP address")))
}

fn ser_ip<S: serde::Serializer>(ip: &IpAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(ip)
}

fn de_ips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    #[derive(Deserialize)]
    struct Ip(#[serde(deserialize_with = "de_ip")] IpAddr);
    let v = Vec::<Ip>::deserialize(d)?;
    Ok(v.into_iter().map(|Ip(ip)| ip).collect())
}

fn ser_ips<S: serde::Serializer>(ips: &[IpAddr], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ips.iter().map(ToString::to_string))
}

fn de_socket<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        de::Error::custom(format!(
            "{s:?} is not a socket address (`0.0.0.0:50000`, `[::]:50000`)"
        ))
    })
}

fn ser_socket<S: serde::Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(a)
}
