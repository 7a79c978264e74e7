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

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The config version this basalt reads and writes.
pub const CONFIG_VERSION: i64 = 1;

/// Default listen address of the node API.
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:50000";

/// Why a machine config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not TOML at all; the source carries line and column.
    #[error("machine config is not valid TOML")]
    Syntax(#[source] toml::de::Error),
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
            ConfigError::Syntax(_) => None,
            ConfigError::UnsupportedVersion(_) => Some("version"),
            ConfigError::Invalid { key, .. } => Some(key),
        }
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
    /// Defaults to `node.hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<Hostname>,
}

impl MachineConfig {
    /// Parse and validate a TOML document.
    pub fn parse(text: &str) -> Result<MachineConfig, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(ConfigError::Syntax)?;
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

    /// Checks across keys, after each value was validated alone.
    fn validate(&self) -> Result<(), ConfigError> {
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

    /// The K3s node name: `cluster.node_name`, else `node.hostname`.
    pub fn k3s_node_name(&self) -> Option<&Hostname> {
        let cluster = self.cluster.as_ref()?;
        cluster.node_name.as_ref().or(self.node.hostname.as_ref())
    }

    /// K3s's `config.yaml` for `k3s agent`, as JSON (valid YAML); `None` in standby.
    ///
    /// Keys: `server`, `token`, `node-name` (when known), `node-label`, `node-taint`
    /// and `node-ip` (when given). The token is written in full.
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

// ---------------------------------------------------------------------------------------
// Validated string types. Each parses with `FromStr` (the error is the message, the key
// is added by the deserializer) and serializes as the string it was parsed from.

macro_rules! string_type {
    ($ty:ident) => {
        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.to_string()
            }
        }
    };
}

/// A hostname: dot-separated RFC 1123 labels, each 1–63 of `[a-z0-9-]` (any case), not
/// starting or ending with `-`; at most 253 characters in all.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hostname(String);

impl Hostname {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_hostname(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty hostname".into());
    }
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err(format!("{s:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("{s:?} has a label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "{s:?} is not a hostname (letters, digits, '-' and '.' only)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{s:?} has a label starting or ending with '-'"));
        }
    }
    Ok(())
}

impl FromStr for Hostname {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_hostname(s)?;
        Ok(Hostname(s.to_owned()))
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_type!(Hostname);

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters, the Kubernetes
/// "qualified name" part (empty allowed when `allow_empty`).
fn check_k8s_name(s: &str, what: &str, allow_empty: bool) -> Result<(), String> {
    if s.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(format!("empty {what}"))
        };
    }
    if s.len() > 63 {
        return Err(format!("{what} {s:?} is longer than 63 characters"));
    }
    let b = s.as_bytes();
    let ok_inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    if !b.iter().all(ok_inner)
        || !b[0].is_ascii_alphanumeric()
        || !b[b.len() - 1].is_ascii_alphanumeric()
    {
        return Err(format!(
            "{what} {s:?} must be alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ));
    }
    Ok(())
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LabelKey(String);

impl LabelKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_label_key(s: &str) -> Result<(), String> {
    let name = match s.split_once('/') {
        Some((prefix, name)) => {
            if prefix.len() > 253 {
                return Err(format!("prefix of {s:?} is longer than 253 characters"));
            }
            // A DNS subdomain: lowercase RFC 1123 labels.
            let lower = prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !lower || check_hostname(prefix).is_err() {
                return Err(format!(
                    "prefix of {s:?} is not a DNS subdomain (lowercase labels separated by '.')"
                ));
            }
            name
        }
        None => s,
    };
    check_k8s_name(name, "label name", false)
}

impl FromStr for LabelKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_label_key(s)?;
        Ok(LabelKey(s.to_owned()))
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_type!(LabelKey);

/// A Kubernetes label value: empty, or a name of at most 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LabelValue(String);

impl LabelValue {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for LabelValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_k8s_name(s, "label value", true)?;
        Ok(LabelValue(s.to_owned()))
    }
}

impl fmt::Display for LabelValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_type!(LabelValue);

/// What a taint does to pods that do not tolerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// A node taint, written `key[=value]:Effect`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Taint {
    pub key: LabelKey,
    pub value: Option<LabelValue>,
    pub effect: TaintEffect,
}

impl FromStr for Taint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((kv, effect)) = s.rsplit_once(':') else {
            return Err(format!("taint {s:?} is not `key[=value]:Effect`"));
        };
        let effect = match effect {
            "NoSchedule" => TaintEffect::NoSchedule,
            "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
            "NoExecute" => TaintEffect::NoExecute,
            other => {
                return Err(format!(
                    "taint {s:?}: effect {other:?} is not NoSchedule, PreferNoSchedule or NoExecute"
                ))
            }
        };
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (kv, None),
        };
        let key = key.parse().map_err(|e| format!("taint {s:?}: {e}"))?;
        let value = value
            .map(str::parse)
            .transpose()
            .map_err(|e| format!("taint {s:?}: {e}"))?;
        Ok(Taint { key, value, effect })
    }
}

impl fmt::Display for Taint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key)?;
        if let Some(v) = &self.value {
            write!(f, "={v}")?;
        }
        write!(f, ":{}", self.effect.as_str())
    }
}
string_type!(Taint);

/// An address with a prefix length, `10.0.0.5/24` or `2a01:4f8::1/64`. Host bits may
/// be set (it is an interface address as much as a network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((addr, prefix)) = s.split_once('/') else {
            return Err(format!("{s:?} is not address/prefix (CIDR)"));
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max && !prefix.starts_with('+'))
            .ok_or_else(|| format!("{s:?}: prefix length {prefix:?} is not 0..={max}"))?;
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
string_type!(Cidr);

/// An NTP server: an IP address or a host name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Host {
    Ip(IpAddr),
    Name(Hostname),
}

impl FromStr for Host {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse() {
            return Ok(Host::Ip(ip));
        }
        check_hostname(s).map_err(|_| format!("{s:?} is neither an IP address nor a host name"))?;
        Ok(Host::Name(Hostname(s.to_owned())))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => write!(f, "{n}"),
        }
    }
}
string_type!(Host);

/// Check PEM framing: at least one `-----BEGIN X-----` … `-----END X-----` block with
/// matching labels, nothing but whitespace outside blocks. No decoding, no crypto.
fn check_pem(s: &str) -> Result<(), String> {
    let mut blocks = 0;
    let mut open: Option<&str> = None;
    for line in s.lines().map(str::trim) {
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            if open.is_some() {
                return Err("PEM: BEGIN inside an unterminated block".into());
            }
            open = Some(label);
        } else if let Some(label) = line
            .strip_prefix("-----END ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            match open.take() {
                Some(begun) if begun == label => blocks += 1,
                Some(begun) => {
                    return Err(format!(
                        "PEM: block BEGIN {begun:?} ends with END {label:?}"
                    ))
                }
                None => return Err(format!("PEM: END {label:?} without BEGIN")),
            }
        } else if open.is_none() && !line.is_empty() {
            return Err("not PEM: text outside a BEGIN/END block".into());
        }
    }
    if let Some(label) = open {
        return Err(format!("PEM: block {label:?} has no END line"));
    }
    if blocks == 0 {
        return Err("not PEM: no -----BEGIN …----- line".into());
    }
    Ok(())
}

/// PEM text (certificates), framing checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pem(String);

impl Pem {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Pem {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_pem(s)?;
        Ok(Pem(s.to_owned()))
    }
}

impl fmt::Display for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_type!(Pem);

/// PEM text of a private key: framing checked; `Debug` does not print it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretPem(String);

impl SecretPem {
    /// The key itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for SecretPem {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_pem(s)?;
        Ok(SecretPem(s.to_owned()))
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

impl TryFrom<String> for SecretPem {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<SecretPem> for String {
    fn from(v: SecretPem) -> String {
        v.0
    }
}

/// The K3s server URL: `https://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerUrl(String);

impl ServerUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("https://") else {
            return Err(format!("{s:?} is not an https:// URL"));
        };
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{s:?} contains whitespace"));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(format!("{s:?}: credentials do not belong in the URL"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((ip, after)) = v6.split_once(']') else {
                return Err(format!("{s:?}: unterminated [IPv6] host"));
            };
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{s:?}: [{ip}] is not an IPv6 address"));
            }
            match after {
                "" => (ip, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (ip, Some(p)),
                    None => return Err(format!("{s:?}: junk after [IPv6] host")),
                },
            }
        } else {
            let (h, p) = match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            if h.parse::<std::net::Ipv4Addr>().is_err() && check_hostname(h).is_err() {
                return Err(format!("{s:?}: {h:?} is not a host name or IPv4 address"));
            }
            (h, p)
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        if let Some(p) = port {
            if p.parse::<u16>().ok().filter(|p| *p != 0).is_none() || p.starts_with('+') {
                return Err(format!("{s:?}: port {p:?} is not 1..=65535"));
            }
        }
        Ok(ServerUrl(s.to_owned()))
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_type!(ServerUrl);

/// A K3s join token.
///
/// `Display` and `Debug` never print the password or the shared secret; use
/// [`Token::secret_string`] to write it where K3s reads it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Token {
    /// `K10<ca_hash>::<user>:<password>`: `ca_hash` is the sha256 of the server's CA
    /// bundle, 64 lowercase hex digits, checked against the server's `/cacerts`.
    Secure {
        ca_hash: String,
        user: String,
        password: String,
    },
    /// A shared secret without CA pinning.
    Plain(String),
}

/// Why a token was rejected. The messages never contain the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token contains whitespace or control characters")]
    BadCharacter,
    #[error("secure token (K10…) lacks `::` between the CA hash and the credentials")]
    NoSeparator,
    #[error("secure token's CA hash is not 64 lowercase hex digits (sha256)")]
    BadCaHash,
    #[error("secure token's credentials are not `<user>:<password>`")]
    NoCredentials,
    #[error("secure token has an empty user name")]
    EmptyUser,
    #[error("secure token has an empty password")]
    EmptyPassword,
}

impl Token {
    /// Parse a K3s token: `K10…` is a secure token (and must be well formed); anything
    /// else is a plain shared secret.
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenError::BadCharacter);
        }
        let Some(rest) = s.strip_prefix("K10") else {
            return Ok(Token::Plain(s.to_owned()));
        };
        let (hash, creds) = rest.split_once("::").ok_or(TokenError::NoSeparator)?;
        if hash.len() != 64
            || !hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(TokenError::BadCaHash);
        }
        let (user, password) = creds.split_once(':').ok_or(TokenError::NoCredentials)?;
        if user.is_empty() {
            return Err(TokenError::EmptyUser);
        }
        if password.is_empty() {
            return Err(TokenError::EmptyPassword);
        }
        Ok(Token::Secure {
            ca_hash: hash.to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// The CA hash to check against the server's `/cacerts`, for a secure token.
    pub fn ca_hash(&self) -> Option<&str> {
        match self {
            Token::Secure { ca_hash, .. } => Some(ca_hash),
            Token::Plain(_) => None,
        }
    }

    /// The token in full, as K3s reads it.
    pub fn secret_string(&self) -> String {
        match self {
            Token::Secure {
                ca_hash,
                user,
                password,
            } => format!("K10{ca_hash}::{user}:{password}"),
            Token::Plain(s) => s.clone(),
        }
    }
}

impl FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        Token::parse(s)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Secure { ca_hash, user, .. } => write!(f, "K10{ca_hash}::{user}:<redacted>"),
            Token::Plain(_) => f.write_str("<redacted>"),
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Secure { ca_hash, user, .. } => f
                .debug_struct("Secure")
                .field("ca_hash", ca_hash)
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            Token::Plain(_) => f.write_str("Plain(<redacted>)"),
        }
    }
}

impl TryFrom<String> for Token {
    type Error = TokenError;
    fn try_from(s: String) -> Result<Self, TokenError> {
        Token::parse(&s)
    }
}

impl From<Token> for String {
    fn from(t: Token) -> String {
        t.secret_string()
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

// ---------------------------------------------------------------------------------------
// A deserializer over a parsed `toml::Value` that knows where it is, so that every error,
// serde's own (unknown field, missing field, wrong type) or ours, carries the dotted path.

#[derive(Debug)]
struct PathError {
    /// Set by the innermost deserializer that saw the error.
    path: Option<String>,
    message: String,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PathError {}

impl de::Error for PathError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        PathError {
            path: None,
            message: msg.to_string(),
        }
    }
}

fn at(path: &str) -> impl FnOnce(PathError) -> PathError + '_ {
    move |mut e| {
        if e.path.is_none() {
            e.path = Some(path.to_owned());
        }
        e
    }
}

/// `parent.key`, quoting the key unless it is a TOML bare key.
fn child_key(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let key = if bare {
        key.to_owned()
    } else {
        // TOML basic-string escaping, which matches Rust's for what matters here.
        let mut q = String::from("\"");
        for c in key.chars() {
            match c {
                '"' => q.push_str("\\\""),
                '\\' => q.push_str("\\\\"),
                c if c.is_control() => q.push_str(&format!("\\u{:04X}", c as u32)),
                c => q.push(c),
            }
        }
        q.push('"');
        q
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

struct ValueDe<'a> {
    value: &'a toml::Value,
    path: String,
}

impl<'de> Deserializer<'de> for ValueDe<'_> {
    type Error = PathError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        let path = &self.path;
        match self.value {
            toml::Value::String(s) => visitor.visit_str(s),
            toml::Value::Integer(i) => visitor.visit_i64(*i),
            toml::Value::Float(x) => visitor.visit_f64(*x),
            toml::Value::Boolean(b) => visitor.visit_bool(*b),
            toml::Value::Datetime(d) => visitor.visit_string(d.to_string()),
            toml::Value::Array(a) => visitor.visit_seq(SeqDe {
                iter: a.iter().enumerate(),
                path,
            }),
            toml::Value::Table(t) => visitor.visit_map(MapDe {
                iter: t.iter(),
                pending: None,
                path,
            }),
        }
        .map_err(at(path))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        let path = self.path.clone();
        visitor.visit_some(self).map_err(at(&path))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, PathError> {
        let path = self.path.clone();
        visitor.visit_newtype_struct(self).map_err(at(&path))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct SeqDe<'a, I> {
    iter: I,
    path: &'a str,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'a toml::Value)>> SeqAccess<'de> for SeqDe<'a, I> {
    type Error = PathError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, PathError> {
        let Some((i, value)) = self.iter.next() else {
            return Ok(None);
        };
        let path = format!("{}[{i}]", self.path);
        // `at` here too: `try_from` types fail after the value deserializer returned.
        seed.deserialize(ValueDe {
            value,
            path: path.clone(),
        })
        .map(Some)
        .map_err(at(&path))
    }
}

struct MapDe<'a, I> {
    iter: I,
    pending: Option<(&'a toml::Value, String)>,
    path: &'a str,
}

impl<'de, 'a, I: Iterator<Item = (&'a String, &'a toml::Value)>> MapAccess<'de> for MapDe<'a, I> {
    type Error = PathError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, PathError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        let path = child_key(self.path, key);
        let k = seed.deserialize(KeyDe { key }).map_err(at(&path))?;
        self.pending = Some((value, path));
        Ok(Some(k))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, PathError> {
        let (value, path) = self
            .pending
            .take()
            .ok_or_else(|| de::Error::custom("value asked before key"))?;
        seed.deserialize(ValueDe {
            value,
            path: path.clone(),
        })
        .map_err(at(&path))
    }
}

struct KeyDe<'a> {
    key: &'a str,
}

impl<'de> Deserializer<'de> for KeyDe<'_> {
    type Error = PathError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        visitor.visit_str(self.key)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, PathError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PEM_CERT: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n";
    const PEM_KEY: &str =
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIsecretkeymaterial\n-----END PRIVATE KEY-----\n";
    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn api_section() -> String {
        format!(
            "[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n{PEM_CERT}'''\nkey = '''\n{PEM_KEY}'''\n"
        )
    }

    /// `version = 1`, then `body`, then a valid `[api]`.
    fn doc(body: &str) -> String {
        format!("version = 1\n{body}\n{}", api_section())
    }

    fn full() -> String {
        doc(&format!(
            r#"
[node]
hostname = "worker-1.example.com"
labels = {{ "example.com/pool" = "warm", app = "", "node.kubernetes.io/x_y" = "a.b-c_d" }}
taints = ["dedicated=gpu:NoSchedule", "example.com/flaky:PreferNoSchedule", "k=:NoExecute"]

[network]
dhcp4 = false
addresses = ["10.0.0.5/24", "2a01:4f8::5/64"]
dns = ["10.0.0.1", "2a01:4ff:ff00::add:1"]
ntp = ["ntp1.hetzner.de", "192.0.2.123"]
ipv6_from_metadata = false

[[network.routes]]
to = "0.0.0.0/0"
via = "10.0.0.1"

[[network.routes]]
to = "::/0"
via = "fe80::1"

[cluster]
server = "https://10.0.0.2:6443"
token = "K10{HASH}::server:s3cr3t-pa55"
node_name = "w1"
"#
        ))
    }

    #[test]
    fn full_config_parses_into_typed_values() {
        let c = MachineConfig::parse(&full()).unwrap();
        assert_eq!(c.version, 1);
        assert_eq!(
            c.node.hostname.as_ref().map(Hostname::as_str),
            Some("worker-1.example.com")
        );
        assert_eq!(c.node.labels.len(), 3);
        assert_eq!(
            c.node.taints[0],
            Taint {
                key: "dedicated".parse().unwrap(),
                value: Some("gpu".parse().unwrap()),
                effect: TaintEffect::NoSchedule,
            }
        );
        assert_eq!(c.node.taints[1].value, None);
        assert_eq!(c.node.taints[2].value, Some("".parse().unwrap()));
        assert!(!c.network.dhcp4);
        assert!(!c.network.ipv6_from_metadata);
        assert_eq!(
            c.network.addresses[0],
            Cidr {
                addr: "10.0.0.5".parse().unwrap(),
                prefix: 24
            }
        );
        assert_eq!(c.network.addresses[1].prefix, 64);
        assert_eq!(
            c.network.routes[1].via,
            "fe80::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(c.network.dns.len(), 2);
        assert!(matches!(c.network.ntp[0], Host::Name(_)));
        assert!(matches!(c.network.ntp[1], Host::Ip(_)));
        assert_eq!(c.api.listen, DEFAULT_API_LISTEN.parse().unwrap());
        assert_eq!(c.api.ca.as_str(), PEM_CERT);
        assert_eq!(c.api.key.expose(), PEM_KEY);
        assert!(!c.is_standby());
        let cluster = c.cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_str(), "https://10.0.0.2:6443");
        assert_eq!(cluster.token.ca_hash(), Some(HASH));
        assert_eq!(c.k3s_node_name().map(Hostname::as_str), Some("w1"));
    }

    #[test]
    fn minimal_config_is_standby_with_defaults() {
        let c = MachineConfig::parse(&doc("")).unwrap();
        assert!(c.is_standby());
        assert_eq!(c.node, NodeConfig::default());
        assert!(c.network.dhcp4);
        assert!(c.network.ipv6_from_metadata);
        assert_eq!(c.api.listen.to_string(), DEFAULT_API_LISTEN);
        assert_eq!(c.k3s_config_json(None), None);
        assert_eq!(c.k3s_node_name(), None);
    }

    #[test]
    fn other_good_configs() {
        let good = [
            "[node]\nhostname = \"a\"",
            "[node]\nhostname = \"UPPER-case.Example\"",
            "node.hostname = \"dotted\"\nnetwork.dhcp4 = true",
            "[network]\nroutes = [{ to = \"10.0.0.0/8\", via = \"10.0.0.1\" }]",
            "[network]\naddresses = [\"192.0.2.1/32\", \"::1/128\", \"0.0.0.0/0\"]",
            "[cluster]\nserver = \"https://k3s.example.com\"\ntoken = \"plain-secret\"",
            "[cluster]\nserver = \"https://[2a01:4f8::2]:6443/\"\ntoken = \"abcdef.0123456789abcdef\"",
        ];
        for body in good {
            let text = doc(body);
            if let Err(e) = MachineConfig::parse(&text) {
                panic!("{body:?} rejected: {e}");
            }
        }
        let listen = "version = 1\n[api]\nlisten = \"[::]:443\"\n".to_owned()
            + &api_section().replace("[api]\n", "");
        let c = MachineConfig::parse(&listen).unwrap();
        assert_eq!(c.api.listen.port(), 443);
    }

    /// (document, key the error must name, fragment of the message)
    fn bad_cases() -> Vec<(String, String, &'static str)> {
        let long_label = "a".repeat(64);
        let long_name = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63)
        );
        let cases: Vec<(String, &'static str, &'static str)> = vec![
            (doc("bogus = 1"), "bogus", "unknown field `bogus`"),
            (doc("[node]\nfoo = 1"), "node.foo", "unknown field `foo`"),
            (doc("[node]\nhostname = \"-bad\""), "node.hostname", "'-'"),
            (doc("[node]\nhostname = \"a..b\""), "node.hostname", "empty label"),
            (doc("[node]\nhostname = \"under_score\""), "node.hostname", "not a hostname"),
            (doc(&format!("[node]\nhostname = \"{long_label}\"")), "node.hostname", "63"),
            (doc(&format!("[node]\nhostname = \"{long_name}\"")), "node.hostname", "253"),
            (doc("[node]\nhostname = 3"), "node.hostname", "invalid type: integer"),
            (doc("[node]\nlabels = { \"bad key\" = \"v\" }"), "node.labels.\"bad key\"", "label name"),
            (doc("[node.labels]\n\"Example.com/x\" = \"v\""), "node.labels.\"Example.com/x\"", "prefix"),
            (doc("[node.labels]\n\"/x\" = \"v\""), "node.labels.\"/x\"", "prefix"),
            (doc("[node.labels]\n\"a/\" = \"v\""), "node.labels.\"a/\"", "empty label name"),
            (doc(&format!("[node.labels]\napp = \"{long_label}\"")), "node.labels.app", "longer than 63"),
            (doc("[node.labels]\napp = \"-x\""), "node.labels.app", "label value"),
            (doc("[node.labels]\napp = 1"), "node.labels.app", "invalid type"),
            (doc("[node]\ntaints = [\"a=b:Sometimes\"]"), "node.taints[0]", "effect \"Sometimes\""),
            (doc("[node]\ntaints = [\"ok:NoSchedule\", \"key=value\"]"), "node.taints[1]", "key[=value]:Effect"),
            (doc("[node]\ntaints = [\"bad key:NoSchedule\"]"), "node.taints[0]", "label name"),
            (doc("[node]\ntaints = \"k:NoSchedule\""), "node.taints", "invalid type"),
            (
                doc("[network]\nroutes = [{ to = \"10.0.0.0/8\", via = \"10.0.0.1\" }, { to = \"10.0.0.0/8\", via = \"10.0.0.x\" }]"),
                "network.routes[1].via",
                "\"10.0.0.x\" is not an IP address",
            ),
            (doc("[[network.routes]]\nto = \"10.0.0.0/8\"\ngw = \"10.0.0.1\""), "network.routes[0].gw", "unknown field `gw`"),
            (doc("[[network.routes]]\nto = \"10.0.0.0/8\""), "network.routes[0]", "missing field `via`"),
            (doc("[[network.routes]]\nto = \"10.0.0.0/8\"\nvia = \"fe80::1\""), "network.routes[0].via", "family"),
            (doc("[[network.routes]]\nto = \"10.0.0.0\"\nvia = \"10.0.0.1\""), "network.routes[0].to", "CIDR"),
            (doc("[network]\naddresses = [\"10.0.0.5/33\"]"), "network.addresses[0]", "prefix length"),
            (doc("[network]\naddresses = [\"::1/129\"]"), "network.addresses[0]", "prefix length"),
            (doc("[network]\naddresses = [\"10.0.0.5\"]"), "network.addresses[0]", "CIDR"),
            (doc("[network]\naddresses = [\"10.0.0.256/8\"]"), "network.addresses[0]", "not an IP address"),
            (doc("[network]\ndns = [\"1.1.1.1\", \"1.1.1\"]"), "network.dns[1]", "\"1.1.1\" is not an IP address"),
            (doc("[network]\nntp = [\"bad host!\"]"), "network.ntp[0]", "neither an IP address nor a host name"),
            (doc("[network]\ndhcp4 = \"yes\""), "network.dhcp4", "invalid type: string"),
            (doc("[network]\nipv6_from_metadata = 1"), "network.ipv6_from_metadata", "invalid type: integer"),
            (doc("[network]\ndhcp6 = true"), "network.dhcp6", "unknown field"),
            (doc("[cluster]\nserver = \"http://10.0.0.2:6443\"\ntoken = \"t\""), "cluster.server", "https://"),
            (doc("[cluster]\nserver = \"https://:6443\"\ntoken = \"t\""), "cluster.server", "host"),
            (doc("[cluster]\nserver = \"https://a:99999\"\ntoken = \"t\""), "cluster.server", "port"),
            (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"K10abc::u:p\""), "cluster.token", "CA hash"),
            (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"\""), "cluster.token", "empty"),
            (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"t\"\nnode_name = \"a_b\""), "cluster.node_name", "not a hostname"),
            (doc("[cluster]\nserver = \"https://a:6443\""), "cluster", "missing field `token`"),
            (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"t\"\nname = \"x\""), "cluster.name", "unknown field `name`"),
            ("version = 2\n[whatever]\nx = 1\n".into(), "version", "unsupported 2, this basalt reads 1"),
            ("[node]\nhostname = \"a\"\n".into(), "version", "missing"),
            ("version = \"1\"\n".into(), "version", "expected an integer, found string"),
            ("version = 1\n".into(), "api", "missing; the node API needs"),
            (
                "version = 1\n[api]\nlisten = \"0.0.0.0\"\n".to_owned() + &api_section().replace("[api]\n", ""),
                "api.listen",
                "not a socket address",
            ),
            ("version = 1\n[api]\nca = \"x\"\n".into(), "api.ca", "not PEM"),
            (
                format!("version = 1\n[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n{PEM_CERT}'''\n"),
                "api",
                "missing field `key`",
            ),
            (
                format!("version = 1\n[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n{PEM_CERT}'''\nkey = '''\n-----BEGIN PRIVATE KEY-----\nAA\n-----END CERTIFICATE-----\n'''\n"),
                "api.key",
                "ends with END",
            ),
            (
                format!("version = 1\n[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n-----BEGIN CERTIFICATE-----\nAA\n'''\nkey = '''\n{PEM_KEY}'''\n"),
                "api.cert",
                "no END line",
            ),
            (
                format!("version = 1\n[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n{PEM_CERT}'''\nkey = '''\n{PEM_KEY}'''\nextra = 1\n"),
                "api.extra",
                "unknown field",
            ),
        ];
        let mut cases: Vec<(String, String, &'static str)> = cases
            .into_iter()
            .map(|(t, k, m)| (t, k.to_owned(), m))
            .collect();
        cases.push((
            doc(&format!("[node.labels]\n{long_label} = \"v\"")),
            format!("node.labels.{long_label}"),
            "longer than 63",
        ));
        cases
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = bad_cases();
        assert!(cases.len() > 40);
        for (text, key, fragment) in cases {
            let err = match MachineConfig::parse(&text) {
                Ok(_) => panic!("accepted, expected an error at {key}:\n{text}"),
                Err(e) => e,
            };
            let msg = err.to_string();
            assert_eq!(err.key(), Some(&*key), "wrong key in {msg:?} for\n{text}");
            assert!(
                msg.starts_with(&format!("{key}: ")),
                "{msg:?} does not start with the key {key}"
            );
            assert!(msg.contains(fragment), "{msg:?} lacks {fragment:?}");
        }
    }

    #[test]
    fn syntax_errors_keep_toml_location() {
        let err = MachineConfig::parse("version = 1\n[node\n").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err:?}");
        assert_eq!(err.key(), None);
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("line 2"), "{source}");
        // A key given twice is TOML's business too.
        let err =
            MachineConfig::parse(&doc("[node]\nhostname = \"a\"\nhostname = \"b\"")).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn round_trips_through_to_toml() {
        for text in [
            full(),
            doc(""),
            doc("[node]\nhostname = \"x\"\n[cluster]\nserver = \"https://a\"\ntoken = \"p\""),
        ] {
            let c = MachineConfig::parse(&text).unwrap();
            let written = c.to_toml().unwrap();
            let again = MachineConfig::parse(&written).unwrap_or_else(|e| panic!("{e}\n{written}"));
            assert_eq!(again, c, "{written}");
            assert_eq!(again.to_toml().unwrap(), written);
        }
    }

    #[test]
    fn secrets_stay_out_of_display_and_debug() {
        let c = MachineConfig::parse(&full()).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cr3t-pa55"), "{debug}");
        assert!(!debug.contains("secretkeymaterial"), "{debug}");
        let token = &c.cluster.as_ref().unwrap().token;
        assert_eq!(token.to_string(), format!("K10{HASH}::server:<redacted>"));
        let plain = Token::parse("hunter2").unwrap();
        assert_eq!(plain.to_string(), "<redacted>");
        assert_eq!(format!("{plain:?}"), "Plain(<redacted>)");
        // But the secret is written where K3s and the next boot read it.
        assert!(c.to_toml().unwrap().contains("s3cr3t-pa55"));
        assert!(c.to_toml().unwrap().contains("secretkeymaterial"));
    }

    #[test]
    fn token_parser() {
        let secure = |h: &str, u: &str, p: &str| Token::Secure {
            ca_hash: h.into(),
            user: u.into(),
            password: p.into(),
        };
        let cases: Vec<(String, Result<Token, TokenError>)> = vec![
            (
                format!("K10{HASH}::server:pw"),
                Ok(secure(HASH, "server", "pw")),
            ),
            (
                format!("K10{HASH}::node:a:b"),
                Ok(secure(HASH, "node", "a:b")),
            ),
            (
                "just-a-secret".into(),
                Ok(Token::Plain("just-a-secret".into())),
            ),
            (
                "abcdef.0123456789abcdef".into(),
                Ok(Token::Plain("abcdef.0123456789abcdef".into())),
            ),
            (
                "k10lowercase-is-plain".into(),
                Ok(Token::Plain("k10lowercase-is-plain".into())),
            ),
            ("".into(), Err(TokenError::Empty)),
            ("has space".into(), Err(TokenError::BadCharacter)),
            ("tab\there".into(), Err(TokenError::BadCharacter)),
            (format!("K10{HASH}:server:pw"), Err(TokenError::NoSeparator)),
            ("K10".into(), Err(TokenError::NoSeparator)),
            ("K10::server:pw".into(), Err(TokenError::BadCaHash)),
            (
                format!("K10{}::server:pw", &HASH[1..]),
                Err(TokenError::BadCaHash),
            ),
            (format!("K10{HASH}0::server:pw"), Err(TokenError::BadCaHash)),
            (
                format!("K10{}::server:pw", HASH.to_uppercase()),
                Err(TokenError::BadCaHash),
            ),
            (
                format!("K10{}g::server:pw", &HASH[1..]),
                Err(TokenError::BadCaHash),
            ),
            (
                format!("K10{HASH}::serverpw"),
                Err(TokenError::NoCredentials),
            ),
            (format!("K10{HASH}::"), Err(TokenError::NoCredentials)),
            (format!("K10{HASH}:::pw"), Err(TokenError::EmptyUser)),
            (
                format!("K10{HASH}::server:"),
                Err(TokenError::EmptyPassword),
            ),
        ];
        for (text, want) in cases {
            let got = Token::parse(&text);
            assert_eq!(got, want, "{text:?}");
            if let Ok(t) = got {
                assert_eq!(t.secret_string(), text);
            }
        }
        // Errors never carry the secret.
        let err = Token::parse(&format!("K10{HASH}::server:")).unwrap_err();
        assert!(!err.to_string().contains(HASH));
    }

    #[test]
    fn k3s_config_json() {
        let c = MachineConfig::parse(&full()).unwrap();
        let json = c
            .k3s_config_json(Some("10.0.0.5".parse().unwrap()))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["server"], "https://10.0.0.2:6443");
        assert_eq!(v["token"], format!("K10{HASH}::server:s3cr3t-pa55"));
        assert_eq!(v["node-name"], "w1");
        assert_eq!(v["node-ip"], "10.0.0.5");
        assert_eq!(
            v["node-label"],
            serde_json::json!([
                "app=",
                "example.com/pool=warm",
                "node.kubernetes.io/x_y=a.b-c_d"
            ])
        );
        assert_eq!(
            v["node-taint"],
            serde_json::json!([
                "dedicated=gpu:NoSchedule",
                "example.com/flaky:PreferNoSchedule",
                "k=:NoExecute"
            ])
        );
        assert_eq!(v.as_object().unwrap().len(), 6);

        // node-name falls back to the hostname; node-ip is optional; escaping is JSON's.
        let c = MachineConfig::parse(&doc(
            "[node]\nhostname = \"h1\"\n[cluster]\nserver = \"https://a\"\ntoken = 'q\"uo\\te'",
        ))
        .unwrap();
        let json = c.k3s_config_json(None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["node-name"], "h1");
        assert_eq!(v["token"], "q\"uo\\te");
        assert!(v.get("node-ip").is_none());
        assert_eq!(v["node-label"], serde_json::json!([]));
    }

    #[test]
    fn label_and_hostname_limits() {
        assert!("a".repeat(63).parse::<Hostname>().is_ok());
        let name253 = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(name253.len(), 253);
        assert!(name253.parse::<Hostname>().is_ok());
        assert!(format!("{name253}e").parse::<Hostname>().is_err());
        assert!(format!("example.com/{}", "n".repeat(63))
            .parse::<LabelKey>()
            .is_ok());
        assert!(format!("example.com/{}", "n".repeat(64))
            .parse::<LabelKey>()
            .is_err());
        assert!("a/b/c".parse::<LabelKey>().is_err());
        assert!("".parse::<LabelValue>().is_ok());
        assert!("x.".parse::<LabelValue>().is_err());
    }

    // --- property tests -----------------------------------------------------------

    fn hostname() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]{1,6}){0,2}"
    }

    fn label_key() -> impl Strategy<Value = String> {
        "([a-z0-9]{1,5}\\.[a-z]{2,3}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,8}[A-Za-z0-9])?"
    }

    fn label_value() -> impl Strategy<Value = String> {
        "([A-Za-z0-9]([-A-Za-z0-9_.]{0,8}[A-Za-z0-9])?)?"
    }

    fn taint() -> impl Strategy<Value = String> {
        (
            label_key(),
            proptest::option::of(label_value()),
            prop_oneof![
                Just("NoSchedule"),
                Just("PreferNoSchedule"),
                Just("NoExecute")
            ],
        )
            .prop_map(|(k, v, e)| match v {
                Some(v) => format!("{k}={v}:{e}"),
                None => format!("{k}:{e}"),
            })
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<std::net::Ipv4Addr>().prop_map(IpAddr::V4),
            any::<std::net::Ipv6Addr>().prop_map(IpAddr::V6),
        ]
    }

    fn cidr() -> impl Strategy<Value = Cidr> {
        ip().prop_flat_map(|addr| {
            let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
            (0..=max).prop_map(move |prefix| Cidr { addr, prefix })
        })
    }

    fn route() -> impl Strategy<Value = Route> {
        cidr().prop_flat_map(|to| {
            let via = if to.addr.is_ipv4() {
                any::<std::net::Ipv4Addr>().prop_map(IpAddr::V4).boxed()
            } else {
                any::<std::net::Ipv6Addr>().prop_map(IpAddr::V6).boxed()
            };
            via.prop_map(move |via| Route { to, via })
        })
    }

    fn token() -> impl Strategy<Value = Token> {
        prop_oneof![
            ("[0-9a-f]{64}", "[a-z]{1,8}", "[!-~]{1,20}").prop_map(|(h, u, p)| Token::Secure {
                ca_hash: h,
                user: u,
                password: p
            }),
            "[!-~]{1,30}".prop_filter_map("K10 prefix", |s| Token::parse(&s).ok()),
        ]
    }

    fn config() -> impl Strategy<Value = MachineConfig> {
        let node = (
            proptest::option::of(hostname()),
            proptest::collection::btree_map(label_key(), label_value(), 0..4),
            proptest::collection::vec(taint(), 0..3),
        )
            .prop_map(|(h, labels, taints)| NodeConfig {
                hostname: h.map(|h| h.parse().unwrap()),
                labels: labels
                    .into_iter()
                    .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
                    .collect(),
                taints: taints.into_iter().map(|t| t.parse().unwrap()).collect(),
            });
        let network = (
            any::<bool>(),
            proptest::collection::vec(cidr(), 0..3),
            proptest::collection::vec(route(), 0..3),
            proptest::collection::vec(ip(), 0..3),
            proptest::collection::vec(
                prop_oneof![
                    ip().prop_map(Host::Ip),
                    hostname().prop_map(|h| Host::Name(h.parse().unwrap()))
                ],
                0..3,
            ),
            any::<bool>(),
        )
            .prop_map(|(dhcp4, addresses, routes, dns, ntp, v6)| NetworkConfig {
                dhcp4,
                addresses,
                routes,
                dns,
                ntp,
                ipv6_from_metadata: v6,
            });
        let api = (ip(), any::<u16>()).prop_map(|(ip, port)| ApiConfig {
            listen: SocketAddr::new(ip, port),
            ca: PEM_CERT.parse().unwrap(),
            cert: format!("{PEM_CERT}{PEM_CERT}").parse().unwrap(),
            key: PEM_KEY.parse().unwrap(),
        });
        let cluster = proptest::option::of(
            (hostname(), token(), proptest::option::of(hostname())).prop_map(
                |(host, token, name)| ClusterConfig {
                    server: format!("https://{host}:6443").parse().unwrap(),
                    token,
                    node_name: name.map(|n| n.parse().unwrap()),
                },
            ),
        );
        (node, network, api, cluster).prop_map(|(node, network, api, cluster)| MachineConfig {
            version: CONFIG_VERSION,
            node,
            network,
            api,
            cluster,
        })
    }

    /// An error must name a key or be TOML's own.
    fn check_error(e: &ConfigError) {
        match e {
            ConfigError::Syntax(_) | ConfigError::UnsupportedVersion(_) => {}
            ConfigError::Invalid { key, message } => {
                assert!(!key.is_empty() && !message.is_empty(), "{e:?}");
                assert!(e.to_string().starts_with(&format!("{key}: ")));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn parse_never_panics_on_arbitrary_text(text in any::<String>()) {
            if let Err(e) = MachineConfig::parse(&text) {
                check_error(&e);
            }
        }

        #[test]
        fn parse_never_panics_on_tomlish_text(text in "(version = 1\n)?(\\[[a-z.]{1,12}\\]\n)?([a-z_]{1,8} = (\"[ -~]{0,12}\"|[0-9]{1,3}|true|\\[\\])\n){0,6}") {
            if let Err(e) = MachineConfig::parse(&text) {
                check_error(&e);
            }
        }

        #[test]
        fn mutated_valid_documents_fail_cleanly_or_round_trip(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0..3u8, any::<char>()), 1..4)
        ) {
            let mut text: Vec<char> = full().chars().collect();
            for (at, op, c) in edits {
                let i = at.index(text.len());
                match op {
                    0 => { text.remove(i); }
                    1 => text.insert(i, c),
                    _ => text[i] = c,
                }
            }
            let text: String = text.into_iter().collect();
            match MachineConfig::parse(&text) {
                Err(e) => check_error(&e),
                Ok(c) => {
                    let written = c.to_toml().unwrap();
                    prop_assert_eq!(MachineConfig::parse(&written).unwrap(), c);
                }
            }
        }

        #[test]
        fn token_parser_never_panics_and_never_shows_the_secret(
            text in prop_oneof![
                any::<String>(),
                "K10[0-9a-fA-F]{60,68}(::?)[a-z]{0,4}:?[!-~]{0,12}",
            ]
        ) {
            if let Ok(token) = Token::parse(&text) {
                prop_assert_eq!(token.secret_string(), text.clone());
                let (secret, public) = match &token {
                    Token::Secure { ca_hash, user, password } => {
                        (password.clone(), format!("K10{ca_hash}::{user}:"))
                    }
                    Token::Plain(s) => (s.clone(), String::new()),
                };
                // The secret may occur by chance in the hash or the user name.
                if !public.contains(&secret) && !"<redacted>Plain()".contains(&secret) {
                    prop_assert!(!token.to_string().contains(&secret));
                    let debug = format!("{:?}", token);
                    prop_assert!(!debug.contains(&secret));
                }
            }
        }

        #[test]
        fn generated_configs_round_trip(c in config()) {
            let written = c.to_toml().unwrap();
            let parsed = MachineConfig::parse(&written);
            prop_assert!(parsed.is_ok(), "{:?}\n{}", parsed.err(), written);
            prop_assert_eq!(parsed.unwrap(), c);
        }
    }
}
