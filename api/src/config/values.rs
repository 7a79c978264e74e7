//! Validated string types of the machine config. Each parses with `FromStr` (the error is
//! the message, the key is added by the deserializer) and serializes as the string it was
//! parsed from.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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

    /// The same name in lowercase (still a valid hostname), e.g. for a Kubernetes node name.
    pub(super) fn to_lowercase(&self) -> Hostname {
        Hostname(self.0.to_ascii_lowercase())
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

/// A certificate serial number in hex, as `openssl x509 -serial` prints it: colons and
/// case do not matter, leading zeros neither. Kept normalized (lowercase, no colons, no
/// leading zeros), the form [`crate::node::access::serial_hex`] gives a certificate's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertSerial(String);

impl CertSerial {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CertSerial {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let hex: String = s.chars().filter(|&c| c != ':').collect();
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a certificate serial (hex digits, optionally with ':')"
            ));
        }
        // RFC 5280: at most 20 octets; DER may add a zero octet in front.
        if hex.len() > 42 {
            return Err(format!(
                "{s:?} is longer than a certificate serial (20 octets)"
            ));
        }
        let trimmed = hex.trim_start_matches('0').to_ascii_lowercase();
        Ok(CertSerial(if trimmed.is_empty() {
            "0".into()
        } else {
            trimmed
        }))
    }
}

impl fmt::Display for CertSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_type!(CertSerial);

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

/// A kubelet provider id, `<scheme>://<id>` (`hcloud://42`, `basalt-qemu://pool-g1-x`):
/// how an autoscaler maps the Node to its server. Printable ASCII, no whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProviderId(String);

impl ProviderId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ProviderId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ok = s.len() <= 253 && s.bytes().all(|b| b.is_ascii_graphic());
        match s.split_once("://") {
            Some((scheme, id)) if ok && !scheme.is_empty() && !id.is_empty() => {
                Ok(ProviderId(s.to_owned()))
            }
            _ => Err(format!(
                "{s:?} is not a provider id (`<scheme>://<id>`, printable, no spaces)"
            )),
        }
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_type!(ProviderId);

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
