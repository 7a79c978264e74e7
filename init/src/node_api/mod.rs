//! The node API: HTTPS with mutual TLS on `[api] listen` (port 50000 by default), JSON
//! bodies in the wire format of [`basalt_api::node`], served by PID1 itself.
//!
//! Shape: one acceptor thread, one thread per connection (at most [`OPEN_SLOTS`] +
//! [`AUTHENTICATED_SLOTS`], admitted by [`slots`]), one request per connection, each
//! phase of it under a deadline ([`Limits`]). TLS by rustls ([`tls`]), HTTP by httparse ([`http`]),
//! endpoints in [`routes`], what they report in [`status`]. The supervisor stays in
//! PID1's main loop; API threads reach it through its mailbox,
//! [`crate::pid1::mailbox`]. Joining the cluster is
//! [`crate::join`].
//!
//! No `[api]` in a machine config means no machine config at all (the key is required),
//! and then no server: stage 2 says so on the console.

pub mod guard;
pub mod http;
pub mod routes;
pub mod server;
pub mod slots;
pub mod status;
pub mod tls;
pub mod upgrade;

use crate::join::Joiner;
use crate::net::NetworkUp;
use crate::pid1::mailbox::Control;
use basalt_api::config::{ApiConfig, CertSerial};
use basalt_api::node::access::CertFacts;
use rustls::ServerConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use server::start;

/// The context of the API this PID1 started, for what runs beside it (the trial of a new
/// slot asks it about the join).
static CURRENT: std::sync::OnceLock<Arc<Context>> = std::sync::OnceLock::new();

/// The running API's context, once [`start`] was called.
pub fn current() -> Option<Arc<Context>> {
    CURRENT.get().cloned()
}

/// Connections served at once in the TLS handshake or without a verified client
/// certificate; a new one beyond them shuts the oldest of them down ([`slots`]).
pub const OPEN_SLOTS: usize = 16;
/// Connections served at once whose handshake verified a client certificate, on top of
/// [`OPEN_SLOTS`]: no anonymous client can take these.
pub const AUTHENTICATED_SLOTS: usize = 16;
/// A closed connection is drained of what the client still sends (so that closing does
/// not reset the connection under the answer) for this long at most.
pub const LINGER: Duration = Duration::from_secs(2);

/// What the server allows each connection: the contract's
/// [`basalt_api::node::limits`] and this server's slots. Tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// TCP accepted → handshake complete.
    pub handshake: Duration,
    /// Handshake complete → request head complete.
    pub head: Duration,
    /// A body's deadline is this...
    pub body_floor: Duration,
    /// ...plus its length at this many bytes per second.
    pub body_min_rate: u64,
    pub open_slots: usize,
    pub authenticated_slots: usize,
    /// Connections open at once from one source address.
    pub per_address: usize,
    /// How long a closed connection is drained at most.
    pub linger: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        use basalt_api::node::limits::*;
        Limits {
            handshake: HANDSHAKE_TIMEOUT,
            head: HEAD_TIMEOUT,
            body_floor: BODY_TIMEOUT_FLOOR,
            body_min_rate: BODY_MIN_BYTES_PER_SEC,
            open_slots: OPEN_SLOTS,
            authenticated_slots: AUTHENTICATED_SLOTS,
            per_address: MAX_CONNECTIONS_PER_ADDRESS,
            linger: LINGER,
        }
    }
}

impl Limits {
    /// How long a body of `length` bytes may take to arrive.
    pub fn body(&self, length: usize) -> Duration {
        let rate = self.body_min_rate.max(1);
        self.body_floor + Duration::from_millis((length as u64).saturating_mul(1000) / rate)
    }
}
/// Refused requests and handshakes are logged at most once per this period.
pub const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// What every API thread shares.
pub struct Context {
    /// `/` on a node; a folder in tests (for `proc/...`).
    pub root: PathBuf,
    pub control: Control,
    pub joiner: Arc<Joiner>,
    /// Set when the first DHCP lease (or static address) is in.
    pub network: NetworkUp,
    /// `state`, `fw_cfg`, `metadata`, `cmdline`, or `None`.
    config_source: Mutex<Option<String>>,
    /// What went wrong with the config sources at boot; cleared by an apply.
    config_report: Mutex<basalt_api::node::ConfigReport>,
    /// Replaced when an applied config brings other certificates; with the `[api]` it
    /// was built from ([`Context::server_config_for`]).
    tls: RwLock<(ApiConfig, Arc<ServerConfig>)>,
    /// What the routes check from `[api]`, replaced with [`Context::tls`].
    api: RwLock<ApiState>,
    pub metrics: Metrics,
    refusals: RefusalLog,
    limits: Limits,
    /// Connections being served now.
    slots: Arc<slots::Slots>,
}

impl Context {
    pub fn new(
        root: PathBuf,
        control: Control,
        joiner: Arc<Joiner>,
        network: NetworkUp,
        config_source: Option<String>,
        api: &ApiConfig,
    ) -> Result<Context, tls::TlsError> {
        Ok(Context {
            root,
            control,
            joiner,
            network,
            config_source: Mutex::new(config_source),
            config_report: Mutex::default(),
            tls: RwLock::new((api.clone(), tls::server_config(api)?)),
            api: RwLock::new(ApiState::of(api)),
            metrics: Metrics::default(),
            refusals: RefusalLog::default(),
            limits: Limits::default(),
            slots: slots::Slots::new(&Limits::default()),
        })
    }

    /// With other limits than the contract's (tests).
    pub fn with_limits(mut self, limits: Limits) -> Context {
        self.slots = slots::Slots::new(&limits);
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connections in open and in authenticated slots now.
    pub fn connections(&self) -> (usize, usize) {
        self.slots.counts()
    }

    pub fn config_source(&self) -> Option<String> {
        self.config_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_config_source(&self, source: &str) {
        *self.config_source.lock().unwrap_or_else(|e| e.into_inner()) = Some(source.into());
        // The boot's config is replaced, and what was wrong with its sources with it.
        self.set_config_report(basalt_api::node::ConfigReport::default());
    }

    /// What went wrong with the config sources at boot, for status.
    pub fn config_report(&self) -> basalt_api::node::ConfigReport {
        self.config_report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_config_report(&self, report: basalt_api::node::ConfigReport) {
        *self.config_report.lock().unwrap_or_else(|e| e.into_inner()) = report;
    }

    fn tls(&self) -> Arc<ServerConfig> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// [`tls::server_config`] of `api`: the one in force when `api` has the CA,
    /// certificate and key it was built from, as a promotion's config has (the pool
    /// keeps the standby's `[api]`). The same bytes pass the same checks; building it
    /// again cost milliseconds of the promotion under TCG (BENCHMARKS.md, issue 15
    /// item 2).
    fn server_config_for(&self, api: &ApiConfig) -> Result<Arc<ServerConfig>, tls::TlsError> {
        {
            let (built_from, config) = &*self.tls.read().unwrap_or_else(|e| e.into_inner());
            if built_from.ca == api.ca && built_from.cert == api.cert && built_from.key == api.key {
                return Ok(config.clone());
            }
        }
        tls::server_config(api)
    }

    /// The TLS config and `[api]` state of an applied `[api]`, for new connections.
    fn set_api(&self, config: Arc<ServerConfig>, api: &ApiConfig) {
        *self.api.write().unwrap_or_else(|e| e.into_inner()) = ApiState::of(api);
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = (api.clone(), config);
    }

    pub fn api_state(&self) -> ApiState {
        self.api.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Logs a refused request or connection, rate-limited.
    pub fn refused(&self, what: &str) {
        if let Some(line) = self.refusals.note(Instant::now(), what) {
            crate::pid1::console::warn(&line);
        }
    }
}

/// What the routes and status use of the `[api]` in force.
#[derive(Debug, Clone, Default)]
pub struct ApiState {
    /// `[api] revoked`: client certificates refused.
    pub revoked: Vec<CertSerial>,
    /// The served certificate's facts (`None` if it cannot be read, which
    /// [`tls::server_config`] would already have refused).
    pub cert: Option<CertFacts>,
}

impl ApiState {
    fn of(api: &ApiConfig) -> ApiState {
        ApiState {
            revoked: api.revoked.clone(),
            cert: CertFacts::from_pem(api.cert.as_str()).ok(),
        }
    }
}

/// Counters for `/v1/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// Answered requests by HTTP status.
    pub requests: Mutex<BTreeMap<u16, u64>>,
    /// Connections whose TLS handshake failed (no, wrong or expired certificate, ...).
    pub handshake_failures: AtomicU64,
    /// Connections closed for capacity: one over its address's cap, or the oldest open
    /// one shut down to make room ([`slots`]).
    pub over_capacity: AtomicU64,
    /// Upgrade bundles refused (or failed) since boot.
    pub upgrades_refused: AtomicU64,
}

impl Metrics {
    pub fn count(&self, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status)
            .or_default() += 1;
    }
}

/// At most one line per [`REFUSAL_LOG_PERIOD`], with the count of those left out: a
/// client that hammers the API cannot flood the console.
#[derive(Default)]
struct RefusalLog(Mutex<(Option<Instant>, u64)>);

impl RefusalLog {
    /// The line to print for a refusal at `now`, if one is due.
    fn note(&self, now: Instant, what: &str) -> Option<String> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (last, suppressed) = &mut *guard;
        if last.is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_PERIOD) {
            *suppressed += 1;
            return None;
        }
        let more = match *suppressed {
            0 => String::new(),
            n => format!(" ({n} more refused since the last report)"),
        };
        *last = Some(now);
        *suppressed = 0;
        Some(format!("api: refused {what}{more}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_has_the_floor_plus_its_length_at_the_minimum_rate() {
        let l = Limits::default();
        assert_eq!(l.body(0), Duration::from_secs(10));
        assert_eq!(l.body(4 * 1024), Duration::from_secs(11));
        assert_eq!(l.body(http::BODY_LIMIT), Duration::from_secs(74));
    }

    #[test]
    fn refusals_are_logged_once_per_period_with_a_count() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(t0, "a").as_deref(), Some("api: refused a"),);
        for i in 1..=5 {
            assert_eq!(log.note(t0 + Duration::from_secs(i), "b"), None);
        }
        assert_eq!(
            log.note(t0 + REFUSAL_LOG_PERIOD, "c").as_deref(),
            Some("api: refused c (5 more refused since the last report)")
        );
        assert_eq!(log.note(t0 + REFUSAL_LOG_PERIOD, "d"), None);
    }
}
