//! Hetzner Cloud's metadata service: who this server is, its public addresses, and the
//! user-data that carries our machine config.
//!
//! The service answers plain HTTP on a link-local address, under `/hetzner/v1/`:
//! `metadata/hostname`, `metadata/instance-id`, `metadata/public-ipv4` (plain text),
//! `metadata/network-config` (YAML, cloud-init network config v1, the only place the
//! server's IPv6 network appears) and `userdata` (raw, possibly empty). These are the
//! paths cloud-init's Hetzner datasource, hcloud-go and Talos read.
//!
//! Every body is read with a size limit, every request with a timeout, and a request that
//! did not get an answer is retried a bounded number of times with backoff, since the link
//! may have come up a moment ago. Errors name the URL.

use serde::Deserialize;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

/// Where the service answers on a Hetzner Cloud server.
pub const BASE_URL: &str = "http://169.254.169.254/hetzner/v1";
/// The IPv6 default gateway of every Hetzner Cloud server (on the public interface).
pub const IPV6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// DMI vendor string of Hetzner Cloud servers, relative to the root.
pub const DMI_SYS_VENDOR: &str = "sys/class/dmi/id/sys_vendor";

const HOSTNAME: &str = "metadata/hostname";
const INSTANCE_ID: &str = "metadata/instance-id";
const PUBLIC_IPV4: &str = "metadata/public-ipv4";
const NETWORK_CONFIG: &str = "metadata/network-config";
const USERDATA: &str = "userdata";

/// Largest plain-text value (hostname, id, address).
const PLAIN_LIMIT: u64 = 4 * 1024;
const NETWORK_CONFIG_LIMIT: u64 = 64 * 1024;
/// User-data is our machine config: the contract's bound for every config source.
pub const USERDATA_LIMIT: u64 = basalt_api::config::MAX_BYTES;

/// True on a Hetzner Cloud server, told by its DMI vendor string.
pub fn on_hetzner(root: &Path) -> bool {
    std::fs::read_to_string(root.join(DMI_SYS_VENDOR)).is_ok_and(|v| v.trim() == "Hetzner")
}

/// What the metadata service said about this server. Each item is asked on its own: one
/// that cannot be had (a bad network-config, a 403 on the hostname) is left out and named
/// in [`Metadata::failed`], and the others are used all the same.
#[derive(Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Empty when the service did not give one.
    pub hostname: String,
    /// None when the service did not give one.
    pub instance_id: Option<u64>,
    /// None for a server without a public IPv4 address.
    pub public_ipv4: Option<Ipv4Addr>,
    /// The server's address in its public /64 and the prefix length; the gateway is
    /// [`IPV6_GATEWAY`].
    pub ipv6: Option<(Ipv6Addr, u8)>,
    /// Raw user-data; None when the service had none or only whitespace, or when it
    /// could not be had (then [`Metadata::failed`] says why).
    pub userdata: Option<String>,
    /// The items that could not be had, each with why (the error, naming the URL).
    pub failed: Vec<(Item, String)>,
}

impl Metadata {
    /// Why `item` could not be had; None when it was had (or the service said it has none).
    pub fn failure(&self, item: Item) -> Option<&str> {
        self.failed
            .iter()
            .find(|(i, _)| *i == item)
            .map(|(_, why)| why.as_str())
    }
}

/// The items the service is asked for, in the order asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Hostname,
    InstanceId,
    PublicIpv4,
    NetworkConfig,
    Userdata,
}

impl Item {
    /// The item's path under the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Item::Hostname => HOSTNAME,
            Item::InstanceId => INSTANCE_ID,
            Item::PublicIpv4 => PUBLIC_IPV4,
            Item::NetworkConfig => NETWORK_CONFIG,
            Item::Userdata => USERDATA,
        }
    }
}

// By hand: user-data holds the join token and the API's private key, which must not end
// up in a log line through `{:?}`.
impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("hostname", &self.hostname)
            .field("instance_id", &self.instance_id)
            .field("public_ipv4", &self.public_ipv4)
            .field("ipv6", &self.ipv6)
            .field(
                "userdata",
                &self
                    .userdata
                    .as_ref()
                    .map(|u| format!("<{} bytes>", u.len())),
            )
            .field("failed", &self.failed)
            .finish()
    }
}

/// How often and how patiently each URL is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Requests per URL, the first included; at least one is made.
    pub attempts: u32,
    /// Pause after the first failed attempt, doubled after each further one.
    pub initial: Duration,
    pub cap: Duration,
}

impl Default for Retry {
    /// About 8 s of pauses: enough for a link that has just come up, bounded when the
    /// service is not there at all.
    fn default() -> Self {
        Self {
            attempts: 7,
            initial: Duration::from_millis(250),
            cap: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("GET {url}: no answer after {attempts} attempts")]
    Unreachable {
        url: String,
        attempts: u32,
        #[source]
        source: ureq::Error,
    },
    #[error("GET {url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: body larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("GET {url}: body is not UTF-8")]
    NotUtf8 { url: String },
    #[error("GET {url}: empty")]
    Empty { url: String },
    #[error("GET {url}: {value:?} is not a server id")]
    BadInstanceId { url: String, value: String },
    #[error("GET {url}: {value:?} is not an IPv4 address")]
    BadIpv4 { url: String, value: String },
    #[error("GET {url}: not a cloud-init network config")]
    BadNetworkConfig {
        url: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
}

/// Reads everything the node needs from the service at `base` (normally [`BASE_URL`]),
/// each request bounded by `timeout`, with the default [`Retry`].
pub fn fetch(base: &str, timeout: Duration) -> Result<Metadata, MetadataError> {
    fetch_with(base, timeout, Retry::default())
}

/// [`fetch`] with a chosen retry policy. The hostname is asked first: when the service
/// does not answer it at all, that is the only URL that costs the retries, and the
/// error is the whole answer. Past that, each item is asked on its own, and one that
/// fails is left out and named in [`Metadata::failed`].
pub fn fetch_with(base: &str, timeout: Duration, retry: Retry) -> Result<Metadata, MetadataError> {
    let client = Client::new(base, timeout, retry);
    let mut failed = Vec::new();
    let mut note = |item: Item, e: MetadataError| {
        failed.push((item, crate::pid1::console::chain(&e)));
    };

    let hostname = match client
        .get(HOSTNAME, PLAIN_LIMIT)
        .and_then(|(url, v)| required(url, v))
    {
        Ok(h) => h,
        Err(e @ MetadataError::Unreachable { .. }) => return Err(e),
        Err(e) => {
            note(Item::Hostname, e);
            String::new()
        }
    };

    let instance_id = match client.get(INSTANCE_ID, PLAIN_LIMIT).and_then(|(url, v)| {
        let id = required(url.clone(), v)?;
        id.parse::<u64>()
            .map_err(|_| MetadataError::BadInstanceId { url, value: id })
    }) {
        Ok(id) => Some(id),
        Err(e) => {
            note(Item::InstanceId, e);
            None
        }
    };

    let public_ipv4 = client
        .get(PUBLIC_IPV4, PLAIN_LIMIT)
        .and_then(|(url, v)| match trimmed(v) {
            None => Ok(None),
            Some(v) => v
                .parse::<Ipv4Addr>()
                .map(Some)
                .map_err(|_| MetadataError::BadIpv4 { url, value: v }),
        })
        .unwrap_or_else(|e| {
            note(Item::PublicIpv4, e);
            None
        });

    let ipv6 = client
        .get(NETWORK_CONFIG, NETWORK_CONFIG_LIMIT)
        .and_then(|(url, net)| match net {
            None => Ok(None),
            Some(text) => {
                parse_ipv6(&text).map_err(|source| MetadataError::BadNetworkConfig { url, source })
            }
        })
        .unwrap_or_else(|e| {
            note(Item::NetworkConfig, e);
            None
        });

    let userdata = client
        .get(USERDATA, USERDATA_LIMIT)
        .map(|(_, u)| u.filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|e| {
            note(Item::Userdata, e);
            None
        });

    Ok(Metadata {
        hostname,
        instance_id,
        public_ipv4,
        ipv6,
        userdata,
        failed,
    })
}

fn trimmed(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

fn required(url: String, value: Option<String>) -> Result<String, MetadataError> {
    trimmed(value).ok_or(MetadataError::Empty { url })
}

/// The parts of cloud-init's network config v1 that carry the IPv6 address; everything
/// else in the document is ignored, so Hetzner may add keys freely.
#[derive(Deserialize)]
struct NetworkConfig {
    #[serde(default)]
    config: Vec<Interface>,
}

#[derive(Deserialize)]
struct Interface {
    #[serde(default)]
    subnets: Vec<Subnet>,
}

#[derive(Deserialize)]
struct Subnet {
    #[serde(default)]
    address: Option<String>,
}

/// The first `address: <IPv6>/<prefix>` of any interface; None when there is none.
pub fn parse_ipv6(yaml: &str) -> Result<Option<(Ipv6Addr, u8)>, serde_yaml_ng::Error> {
    let doc: NetworkConfig = serde_yaml_ng::from_str(yaml)?;
    let found = doc
        .config
        .iter()
        .flat_map(|i| &i.subnets)
        .filter_map(|s| s.address.as_deref())
        .find_map(|a| {
            let (addr, prefix) = a.split_once('/')?;
            let addr = addr.parse::<Ipv6Addr>().ok()?;
            let prefix = prefix.parse::<u8>().ok().filter(|p| *p <= 128)?;
            Some((addr, prefix))
        });
    Ok(found)
}

/// One agent for all requests: no proxy from the environment (the service is link-local
/// and a proxy would only leak the user-data), no redirects, statuses handled here.
struct Client {
    agent: ureq::Agent,
    base: String,
    retry: Retry,
}

impl Client {
    fn new(base: &str, timeout: Duration, retry: Retry) -> Self {
        let agent = ureq::Agent::config_builder()
            .proxy(None)
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_global(Some(timeout))
            .max_response_header_size(16 * 1024)
            .user_agent("basalt-init")
            .build()
            .new_agent();
        Self {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            retry,
        }
    }

    /// The URL asked and its body; None for a 404 (the service's "not set").
    /// Retried: no connection, timeouts, broken bodies and 5xx. Not retried: other
    /// statuses, a body over `limit`, a body that is not UTF-8.
    fn get(&self, path: &str, limit: u64) -> Result<(String, Option<String>), MetadataError> {
        let url = format!("{}/{path}", self.base);
        let attempts = self.retry.attempts.max(1);
        let mut pause = self.retry.initial;
        let mut attempt = 1;
        loop {
            let last = match self.once(&url, limit) {
                Ok(Outcome::Body(text)) => return Ok((url, Some(text))),
                Ok(Outcome::NotFound) => return Ok((url, None)),
                Ok(Outcome::Retry(e)) => e,
                Err(e) => return Err(e),
            };
            if attempt >= attempts {
                return Err(match last {
                    Failure::Transport(source) => MetadataError::Unreachable {
                        url,
                        attempts,
                        source,
                    },
                    Failure::Status(status) => MetadataError::Status { url, status },
                });
            }
            std::thread::sleep(pause);
            pause = pause.saturating_mul(2).min(self.retry.cap);
            attempt += 1;
        }
    }

    fn once(&self, url: &str, limit: u64) -> Result<Outcome, MetadataError> {
        let mut response = match self.agent.get(url).call() {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Retry(Failure::Transport(e))),
        };
        let status = response.status().as_u16();
        match status {
            200 => {}
            404 => return Ok(Outcome::NotFound),
            500..=599 => return Ok(Outcome::Retry(Failure::Status(status))),
            _ => {
                return Err(MetadataError::Status {
                    url: url.to_owned(),
                    status,
                })
            }
        }
        let bytes = match response.body_mut().with_config().limit(limit).read_to_vec() {
            Ok(b) => b,
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                return Err(MetadataError::TooLarge {
                    url: url.to_owned(),
                    limit,
                })
            }
            Err(e) => return Ok(Outcome::Retry(Failure::Transport(e))),
        };
        String::from_utf8(bytes)
            .map(Outcome::Body)
            .map_err(|_| MetadataError::NotUtf8 {
                url: url.to_owned(),
            })
    }
}

enum Outcome {
    Body(String),
    NotFound,
    Retry(Failure),
}

enum Failure {
    Transport(ureq::Error),
    Status(u16),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// How the double answers one path.
    #[derive(Clone)]
    enum Reply {
        Ok(String),
        Status(u16),
        /// Announces `claimed` bytes, sends `body`, closes.
        Truncated {
            claimed: usize,
            body: String,
        },
        /// Sends the headers, then waits before the body.
        Slow(Duration, String),
        /// A 503 for the first `n` requests, then the body.
        FailFirst(usize, String),
    }

    /// Test double of Hetzner's metadata service: a loopback HTTP/1.1 server answering
    /// canned replies per path, one request per connection, counting requests.
    struct HetznerMetadataDouble {
        base: String,
        hits: Arc<Mutex<HashMap<String, usize>>>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl HetznerMetadataDouble {
        fn start(replies: &[(&str, Reply)]) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let port = listener.local_addr().expect("addr").port();
            let replies: Arc<HashMap<String, Reply>> = Arc::new(
                replies
                    .iter()
                    .map(|(p, r)| (format!("/hetzner/v1/{p}"), r.clone()))
                    .collect(),
            );
            let hits = Arc::new(Mutex::new(HashMap::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (h, s) = (hits.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (replies, hits) = (replies.clone(), h.clone());
                            std::thread::spawn(move || serve(conn, &replies, &hits));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
            Self {
                base: format!("http://127.0.0.1:{port}/hetzner/v1"),
                hits,
                stop,
                thread: Some(thread),
            }
        }

        fn hits(&self, path: &str) -> usize {
            let hits = self.hits.lock().expect("lock");
            hits.get(&format!("/hetzner/v1/{path}"))
                .copied()
                .unwrap_or(0)
        }
    }

    impl Drop for HetznerMetadataDouble {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(
        mut conn: TcpStream,
        replies: &HashMap<String, Reply>,
        hits: &Mutex<HashMap<String, usize>>,
    ) {
        conn.set_nonblocking(false).expect("blocking");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            match conn.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head);
        let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
        let n = {
            let mut hits = hits.lock().expect("lock");
            let n = hits.entry(path.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let send = |conn: &mut TcpStream, status: u16, len: usize, body: &str| {
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}"
            );
        };
        match replies.get(&path).cloned().unwrap_or(Reply::Status(404)) {
            Reply::Ok(body) => send(&mut conn, 200, body.len(), &body),
            Reply::Status(s) => send(&mut conn, s, 0, ""),
            Reply::Truncated { claimed, body } => send(&mut conn, 200, claimed, &body),
            Reply::Slow(wait, body) => {
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                std::thread::sleep(wait);
                let _ = conn.write_all(body.as_bytes());
            }
            Reply::FailFirst(k, body) if n > k => send(&mut conn, 200, body.len(), &body),
            Reply::FailFirst(..) => send(&mut conn, 503, 0, ""),
        }
    }

    const NETWORK: &str = "config:\n- mac_address: 96:00:00:72:a3:19\n  name: eth0\n  subnets:\n  - dns_nameservers:\n    - 185.12.64.1\n    - 185.12.64.2\n    ipv4: true\n    type: dhcp\n  - address: 2a01:4f8:1:2::1/64\n    dns_nameservers:\n    - 2a01:4ff:ff00::add:2\n    gateway: fe80::1\n    ipv6: true\n    type: static\n  type: physical\nversion: 1\n";

    fn full(userdata: Reply) -> Vec<(&'static str, Reply)> {
        vec![
            (HOSTNAME, Reply::Ok("w1\n".into())),
            (INSTANCE_ID, Reply::Ok("4242\n".into())),
            (PUBLIC_IPV4, Reply::Ok("203.0.113.7".into())),
            (NETWORK_CONFIG, Reply::Ok(NETWORK.into())),
            (USERDATA, userdata),
        ]
    }

    fn quick() -> Retry {
        Retry {
            attempts: 3,
            initial: Duration::from_millis(5),
            cap: Duration::from_millis(10),
        }
    }

    fn set(replies: &mut [(&'static str, Reply)], path: &str, reply: Reply) {
        for (p, r) in replies.iter_mut() {
            if *p == path {
                *r = reply.clone();
            }
        }
    }

    #[test]
    fn reads_every_field_from_the_service() {
        let double = HetznerMetadataDouble::start(&full(Reply::Ok("version = 1\n".into())));
        let m = fetch_with(&double.base, Duration::from_secs(2), quick()).expect("fetch");
        assert_eq!(
            m,
            Metadata {
                hostname: "w1".into(),
                instance_id: Some(4242),
                public_ipv4: Some(Ipv4Addr::new(203, 0, 113, 7)),
                ipv6: Some(("2a01:4f8:1:2::1".parse().expect("v6"), 64)),
                userdata: Some("version = 1\n".into()),
                failed: vec![],
            }
        );
        assert!(!format!("{m:?}").contains("version = 1"), "{m:?}");
    }

    #[test]
    fn missing_userdata_ipv4_and_network_config_are_none() {
        let mut replies = full(Reply::Status(404));
        set(&mut replies, PUBLIC_IPV4, Reply::Status(404));
        set(&mut replies, NETWORK_CONFIG, Reply::Status(404));
        let double = HetznerMetadataDouble::start(&replies);
        let m = fetch_with(&double.base, Duration::from_secs(2), quick()).expect("fetch");
        assert_eq!((m.userdata, m.public_ipv4, m.ipv6), (None, None, None));
        // 404 is an answer, not a failure: asked once.
        assert_eq!(double.hits(USERDATA), 1);
    }

    #[test]
    fn whitespace_userdata_is_none() {
        let double = HetznerMetadataDouble::start(&full(Reply::Ok(" \n".into())));
        let m = fetch_with(&double.base, Duration::from_secs(2), quick()).expect("fetch");
        assert_eq!(m.userdata, None);
    }

    #[test]
    fn a_service_that_fails_at_first_is_retried() {
        let mut replies = full(Reply::Ok("x".into()));
        set(&mut replies, HOSTNAME, Reply::FailFirst(2, "w1".into()));
        let double = HetznerMetadataDouble::start(&replies);
        let m = fetch_with(&double.base, Duration::from_secs(2), quick()).expect("fetch");
        assert_eq!(m.hostname, "w1");
        assert_eq!(double.hits(HOSTNAME), 3);
    }

    #[test]
    fn a_truncated_body_is_retried_then_reported_with_the_url() {
        let reply = Reply::Truncated {
            claimed: 100,
            body: "version".into(),
        };
        let double = HetznerMetadataDouble::start(&full(reply));
        let m = fetch_with(&double.base, Duration::from_secs(2), quick()).expect("fetch");
        assert_eq!(m.userdata, None);
        let why = m.failure(Item::Userdata).expect("userdata failed");
        assert!(
            why.contains("/hetzner/v1/userdata") && why.contains("3 attempts"),
            "{why}"
        );
        assert_eq!(double.hits(USERDATA), 3);
        // The rest was had all the same.
        assert_eq!((m.hostname.as_str(), m.instance_id), ("w1", Some(4242)));
        assert_eq!(m.failed.len(), 1, "{m:?}");
    }

    #[test]
    fn a_huge_body_is_refused_without_retry() {
        let huge = "#".repeat(USERDATA_LIMIT as usize + 1);
        let double = HetznerMetadataDouble::start(&full(Reply::Ok(huge)));
        let m = fetch_with(&double.base, Duration::from_secs(2), quick()).expect("fetch");
        let why = m.failure(Item::Userdata).expect("userdata failed");
        assert!(
            why.contains("/hetzner/v1/userdata")
                && why.contains(&format!("larger than {USERDATA_LIMIT} bytes")),
            "{why}"
        );
        assert_eq!(m.userdata, None);
        assert_eq!(double.hits(USERDATA), 1);
    }

    #[test]
    fn a_body_at_the_limit_is_accepted() {
        let exact = "#".repeat(USERDATA_LIMIT as usize);
        let double = HetznerMetadataDouble::start(&full(Reply::Ok(exact)));
        let m = fetch_with(&double.base, Duration::from_secs(2), quick()).expect("fetch");
        assert_eq!(m.userdata.map(|u| u.len()), Some(USERDATA_LIMIT as usize));
    }

    #[test]
    fn a_slow_service_times_out_within_the_bound() {
        let mut replies = full(Reply::Status(404));
        set(
            &mut replies,
            HOSTNAME,
            Reply::Slow(Duration::from_secs(3), "w1".into()),
        );
        let double = HetznerMetadataDouble::start(&replies);
        let start = Instant::now();
        let retry = Retry {
            attempts: 2,
            ..quick()
        };
        let err = fetch_with(&double.base, Duration::from_millis(300), retry).expect_err("fetch");
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );
        assert!(
            matches!(&err, MetadataError::Unreachable { url, source: ureq::Error::Timeout(_), .. } if url.ends_with("metadata/hostname")),
            "{err:?}"
        );
    }

    #[test]
    fn no_service_at_all_is_unreachable_naming_the_url() {
        // A port that was just free: connections are refused.
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let base = format!("http://127.0.0.1:{port}/hetzner/v1");
        let err = fetch_with(&base, Duration::from_millis(300), quick()).expect_err("fetch");
        let text = crate::pid1::console::chain(&err);
        assert!(
            text.contains(&format!("{base}/metadata/hostname")) && text.contains("3 attempts"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_item_is_left_out_naming_the_url_and_the_others_are_kept() {
        let userdata = Reply::Ok("version = 1\n".into());
        let cases: &[(Item, Reply, &str)] = &[
            (Item::Hostname, Reply::Ok("\n".into()), "empty"),
            (Item::Hostname, Reply::Status(403), "HTTP status 403"),
            (
                Item::InstanceId,
                Reply::Ok("<html>".into()),
                "not a server id",
            ),
            (
                Item::PublicIpv4,
                Reply::Ok("1.2.3".into()),
                "not an IPv4 address",
            ),
            (
                Item::NetworkConfig,
                Reply::Ok("config: 7\n".into()),
                "not a cloud-init network config",
            ),
            (Item::NetworkConfig, Reply::Status(403), "HTTP status 403"),
        ];
        for (item, reply, message) in cases {
            let mut replies = full(userdata.clone());
            set(&mut replies, item.path(), reply.clone());
            let double = HetznerMetadataDouble::start(&replies);
            let m = fetch_with(&double.base, Duration::from_secs(2), quick())
                .unwrap_or_else(|e| panic!("{item:?}: {e}"));
            assert_eq!(m.failed.len(), 1, "{item:?}: {m:?}");
            let why = m
                .failure(*item)
                .unwrap_or_else(|| panic!("{item:?}: {m:?}"));
            assert!(
                why.contains(item.path()) && why.contains(message),
                "{item:?}: {why}"
            );
            // Above all, the user-data (the machine config) is not lost with it.
            assert_eq!(m.userdata.as_deref(), Some("version = 1\n"), "{item:?}");
            if *item != Item::NetworkConfig {
                assert!(m.ipv6.is_some(), "{item:?}");
            }
            if *item != Item::InstanceId {
                assert_eq!(m.instance_id, Some(4242), "{item:?}");
            }
        }
    }

    #[test]
    fn ipv6_is_the_first_address_with_a_prefix() {
        assert_eq!(
            parse_ipv6(NETWORK).expect("parse"),
            Some(("2a01:4f8:1:2::1".parse().expect("v6"), 64))
        );
        assert_eq!(
            parse_ipv6("config:\n- type: physical\n  subnets:\n  - type: dhcp\nversion: 1\n")
                .expect("parse"),
            None
        );
        assert_eq!(
            parse_ipv6("config:\n- subnets:\n  - address: 2a01::1/129\n").expect("parse"),
            None
        );
    }

    #[test]
    fn hetzner_is_told_by_the_dmi_vendor() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(!on_hetzner(d.path()));
        let p = d.path().join(DMI_SYS_VENDOR);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, "QEMU\n").expect("write");
        assert!(!on_hetzner(d.path()));
        std::fs::write(&p, "Hetzner\n").expect("write");
        assert!(on_hetzner(d.path()));
    }
}
