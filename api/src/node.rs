//! The node API's wire format: the paths basalt-init serves and the JSON bodies it sends,
//! shared with the `basalt node` client so both sides agree field for field.
//!
//! Every response is JSON except metrics (Prometheus text) and logs (text lines). Errors
//! are an [`ErrorBody`] with a 4xx or 5xx status. Optional fields are sent as `null` and
//! read back as `None` when missing, and readers ignore fields they do not know, so a newer
//! node can add fields without breaking an older client.

pub mod access;

use serde::{Deserialize, Serialize};

/// The port the node API listens on unless `[api] listen` says otherwise.
pub const DEFAULT_PORT: u16 = 50000;

/// What a node API client must keep to; a node closes a connection that does not. A
/// client on any working link never meets these: they are there so that slow or idle
/// connections cannot hold the node's few connection slots.
///
/// The node also serves a bounded number of connections at once: a few for clients still
/// in the TLS handshake or without a client certificate (the oldest of those is closed
/// to make room for a new connection), and as many again kept for clients whose
/// certificate the handshake verified, so that a flood of anonymous connections cannot
/// lock a pool certificate out.
pub mod limits {
    use std::time::Duration;

    /// The TLS handshake must be complete this long after the TCP connection was
    /// accepted: a few round trips and one signature, seconds even over a bad link.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// The request head (request line and headers, at most 16 KiB) must be complete this
    /// long after the handshake.
    pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
    /// A request body must arrive at this rate at least (32 kbit/s, slower than any link
    /// a pool controller uses)...
    pub const BODY_MIN_BYTES_PER_SEC: u64 = 4 * 1024;
    /// ...with this much time on top, whatever its length (the body's deadline is this plus
    /// `Content-Length` / [`BODY_MIN_BYTES_PER_SEC`] seconds): a machine config of a few KiB
    /// has 11 s, the largest one ([`crate::config::MAX_BYTES`]) 74 s.
    pub const BODY_TIMEOUT_FLOOR: Duration = Duration::from_secs(10);
    /// Connections open at once from one source address (an IPv6 /64 counts as one
    /// address); more are closed at once. A pool controller needs one or two per node.
    pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 8;
}

/// Paths of the endpoints, version 1.
pub mod path {
    /// `GET`: [`super::Health`]; answered without a client certificate.
    pub const HEALTH: &str = "/v1/health";
    /// `GET`: [`super::Status`].
    pub const STATUS: &str = "/v1/status";
    /// `POST` a machine config (TOML): [`super::ApplyResponse`].
    pub const CONFIG: &str = "/v1/config";
    /// `GET /v1/logs/<service>`, `?follow=1` to stream: text lines.
    pub const LOGS: &str = "/v1/logs";
    /// `POST`: reboot the node.
    pub const REBOOT: &str = "/v1/reboot";
    /// `POST`: power the node off.
    pub const SHUTDOWN: &str = "/v1/shutdown";
    /// `GET`: Prometheus text.
    pub const METRICS: &str = "/v1/metrics";
    /// `POST` an upgrade bundle (a tar, streamed, `Content-Length` required) with
    /// `?sha256=<hex of the whole bundle>` and optionally `&allow_downgrade=1`,
    /// `&reboot=1`: [`super::UpgradeResponse`]. Admin role.
    pub const UPGRADE: &str = "/v1/upgrade";
    /// `POST` (optionally `?reboot=1`): make the other slot the default again, if it holds
    /// a good image: [`super::RollbackResponse`]. Admin role.
    pub const ROLLBACK: &str = "/v1/rollback";

    /// The logs path of one service.
    pub fn logs(service: &str) -> String {
        format!("{LOGS}/{service}")
    }
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Always `"ok"`: a node that answers at all is up.
    pub status: String,
    /// The last boot milestone reached (e.g. `standby`, `joined`).
    pub milestone: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The boot timeline so far, in the order reached.
    pub milestones: Vec<MilestoneTime>,
    /// The steps the milestones are made of (stage 2's), each with its own duration, in
    /// the order they finished; background steps may finish after `standby`. Empty from
    /// an older node.
    #[serde(default)]
    pub steps: Vec<StepTime>,
    /// The active root slot (`a` or `b`).
    pub slot: String,
    pub versions: Versions,
    /// The node's addresses, as `address/prefix`.
    pub addresses: Vec<String>,
    pub hostname: String,
    /// Where the machine config came from (`state`, `fw_cfg`, `metadata`, `cmdline`), or
    /// `None` when the node has none.
    #[serde(default)]
    pub config_source: Option<String>,
    /// What went wrong with the config sources at boot; empty when nothing did.
    #[serde(default)]
    pub config_report: ConfigReport,
    pub services: Vec<ServiceInfo>,
    pub join: JoinStatus,
    /// PID1's resident memory.
    #[serde(default)]
    pub rss_kib: Option<u64>,
    /// The certificate the node API serves (from `[api] cert`).
    #[serde(default)]
    pub api_cert: Option<ApiCert>,
    /// The A/B slots, upgrades and rollbacks; `None` from an older node.
    #[serde(default)]
    pub upgrade: Option<UpgradeStatus>,
}

/// The A/B root slots of a node and what its upgrades did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpgradeStatus {
    /// The slot this boot runs (`a` or `b`).
    pub booted: String,
    /// GRUB's default (`saved_entry`): the slot known good.
    #[serde(default)]
    pub default_slot: Option<String>,
    /// GRUB's one-shot next boot (`next_entry`), set by an upgrade until it reboots.
    #[serde(default)]
    pub next_boot: Option<String>,
    /// Both slots, `a` first.
    #[serde(default)]
    pub slots: Vec<SlotInfo>,
    /// Set while this boot is on trial (a new slot that has not proved healthy yet).
    #[serde(default)]
    pub trial: Option<String>,
    #[serde(default)]
    pub last_rollback: Option<Rollback>,
    /// Upgrades that ended with the new slot marked good, on this node's STATE.
    #[serde(default)]
    pub upgrades: u64,
    #[serde(default)]
    pub rollbacks: u64,
    /// The watchdog armed during a trial (`/dev/watchdog` and its driver), if any.
    #[serde(default)]
    pub watchdog: Option<String>,
    /// What could not be read (the ESP, STATE), if anything.
    #[serde(default)]
    pub error: Option<String>,
}

/// One root slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// `a` or `b`.
    pub name: String,
    /// The image version in it, when known.
    #[serde(default)]
    pub version: Option<String>,
    /// Its dm-verity root hash, when known.
    #[serde(default)]
    pub root_hash: Option<String>,
    /// `active` (booted and good), `trial` (booted, not proved yet), `good`, `pending`
    /// (written, armed or not yet booted), `failed` (rolled back from) or `empty`.
    pub state: String,
}

/// The last time a node went back to its old slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The slot given up.
    pub slot: String,
    #[serde(default)]
    pub version: Option<String>,
    pub reason: String,
    /// Seconds since the Unix epoch, by the node's clock.
    pub at: u64,
}

/// `POST /v1/upgrade`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeResponse {
    /// The slot written, booted once at the next boot.
    pub slot: String,
    pub version: String,
    pub root_hash: String,
    /// Whether the node reboots into it now.
    pub rebooting: bool,
    pub message: String,
}

/// `POST /v1/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackResponse {
    /// The slot that is the default now.
    pub slot: String,
    pub rebooting: bool,
    pub message: String,
}

/// The node API's own certificate, so that its expiry is seen before it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiCert {
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// The same, for people (`Nov 30 15:44:59 2027 +00:00`).
    pub not_after_text: String,
    /// Its serial, lowercase hex.
    pub serial: String,
}

/// What went wrong with the machine config's sources at boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReport {
    /// Sources that held a config the node did not use (invalid, unreadable, or a
    /// `[cluster]` on the kernel command line), in the order asked, each with why.
    #[serde(default)]
    pub rejected: Vec<RejectedSource>,
    /// About the config in use, e.g. that it could not be saved to STATE, so the next
    /// boot will not find it there.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// A config source passed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedSource {
    /// As [`Status::config_source`] names sources (`state`, `fw_cfg`, ...).
    pub source: String,
    /// The error, naming the key or the file; never the config's text.
    pub reason: String,
}

/// One boot milestone and when it was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MilestoneTime {
    /// The milestone's name as on the console (`init-start`, `standby`, ...).
    pub name: String,
    /// Seconds since kernel start.
    pub t: f64,
}

/// One step of the boot and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    /// As on the console (`mount-state`, `k3s-modules`, ...).
    pub name: String,
    /// Seconds since kernel start when it started.
    pub at: f64,
    /// Seconds it took.
    pub took: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    pub basalt: String,
    pub kernel: String,
}

/// A supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    /// As the supervisor names it (`running`, `backoff`, `stopped`, ...).
    pub state: String,
    pub restarts: u32,
    /// How the last run ended (`exit 1`, `signal 9`), if it ever ended.
    #[serde(default)]
    pub last_exit: Option<String>,
}

/// Where the node is on its way into the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinStatus {
    pub state: JoinState,
    /// The K3s server the node joins or joined.
    #[serde(default)]
    pub server: Option<String>,
    /// Why the last attempt failed (e.g. the server's CA does not match the token).
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The join's state on the wire: lowercase, words joined by `-`.
///
/// `agent-started` was `joined` before registration was told apart; a status from such
/// a node still reads (`joined` is taken as `agent-started`, which is all it proved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JoinState {
    /// No `[cluster]` config: waiting to be promoted.
    Standby,
    /// A join config was applied; `k3s agent` is being started.
    Joining,
    /// `k3s agent` was started with the applied config, but K3s has not issued this run
    /// of it the node's kubelet credentials (yet): the token's password is not proven.
    #[serde(alias = "joined")]
    AgentStarted,
    /// K3s issued the running agent the node's kubelet client certificate: the server
    /// accepted the token's password and registered the node.
    Registered,
    /// The agent keeps exiting without registering; see [`JoinStatus::last_error`].
    /// A new `[cluster]` may replace the config.
    CrashLooping,
    /// The join was refused or failed; see [`JoinStatus::last_error`].
    Failed,
}

impl JoinState {
    pub fn name(self) -> &'static str {
        match self {
            JoinState::Standby => "standby",
            JoinState::Joining => "joining",
            JoinState::AgentStarted => "agent-started",
            JoinState::Registered => "registered",
            JoinState::CrashLooping => "crash-looping",
            JoinState::Failed => "failed",
        }
    }

    /// Every state, in the order a join goes through them.
    pub const ALL: [JoinState; 6] = [
        JoinState::Standby,
        JoinState::Joining,
        JoinState::AgentStarted,
        JoinState::Registered,
        JoinState::CrashLooping,
        JoinState::Failed,
    ];
}

impl std::fmt::Display for JoinState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `POST /v1/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// Whether the config was persisted and put into effect.
    pub applied: bool,
    /// Where the config is kept now (`state`).
    pub source: String,
    pub join: JoinStatus,
    /// A sentence for people.
    pub message: String,
    /// What was accepted but deserves a look (e.g. a token without a CA pin).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The body of every 4xx/5xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status as a node sends it, written out by hand so a renamed field breaks the test.
    const STATUS_JSON: &str = r#"{
        "milestones": [{"name": "init-start", "t": 0.512}, {"name": "standby", "t": 1.904}],
        "steps": [{"name": "mount-state", "at": 0.9, "took": 0.25}],
        "slot": "a",
        "versions": {"basalt": "0.1.0", "kernel": "6.1.0-28-cloud-amd64"},
        "addresses": ["10.0.2.15/24"],
        "hostname": "node-1",
        "config_source": null,
        "config_report": {"rejected": [{"source": "fw_cfg", "reason": "machine config from fw_cfg opt/basalt/config: node.surprise: unknown key"}],
                          "warnings": ["not kept for the next boot"]},
        "services": [{"name": "k3s", "state": "backoff", "restarts": 3, "last_exit": "exit 1"}],
        "join": {"state": "failed", "server": "https://10.0.2.2:6443",
                 "last_error": "CA hash mismatch"},
        "rss_kib": 2048,
        "some_future_field": true
    }"#;

    #[test]
    fn status_reads_the_documented_fields() {
        let s: Status = serde_json::from_str(STATUS_JSON).expect("parse");
        assert_eq!(s.milestones[1].name, "standby");
        assert_eq!(s.milestones[1].t, 1.904);
        assert_eq!(s.steps[0].name, "mount-state");
        assert_eq!((s.steps[0].at, s.steps[0].took), (0.9, 0.25));
        assert_eq!(s.versions.kernel, "6.1.0-28-cloud-amd64");
        assert_eq!(s.config_source, None);
        assert_eq!(s.config_report.rejected[0].source, "fw_cfg");
        assert!(s.config_report.rejected[0].reason.contains("node.surprise"));
        assert_eq!(s.config_report.warnings, ["not kept for the next boot"]);
        assert_eq!(s.services[0].last_exit.as_deref(), Some("exit 1"));
        assert_eq!(s.join.state, JoinState::Failed);
        assert_eq!(s.join.last_error.as_deref(), Some("CA hash mismatch"));
        assert_eq!(s.rss_kib, Some(2048));
    }

    #[test]
    fn status_round_trips() {
        let s: Status = serde_json::from_str(STATUS_JSON).expect("parse");
        let again: Status =
            serde_json::from_str(&serde_json::to_string(&s).expect("json")).expect("parse");
        assert_eq!(s, again);
    }

    #[test]
    fn join_state_is_lowercase_on_the_wire() {
        let names = [
            (JoinState::Standby, "standby"),
            (JoinState::Joining, "joining"),
            (JoinState::AgentStarted, "agent-started"),
            (JoinState::Registered, "registered"),
            (JoinState::CrashLooping, "crash-looping"),
            (JoinState::Failed, "failed"),
        ];
        for (state, name) in names {
            assert_eq!(
                serde_json::to_string(&state).expect("json"),
                format!("\"{name}\"")
            );
            assert_eq!(state.to_string(), name);
            assert_eq!(
                serde_json::from_str::<JoinState>(&format!("\"{name}\"")).expect("parse"),
                state
            );
        }
        assert_eq!(JoinState::ALL.to_vec(), names.map(|(s, _)| s).to_vec());
        assert!(serde_json::from_str::<JoinState>("\"Joined\"").is_err());
        assert!(serde_json::from_str::<JoinState>("\"agent_started\"").is_err());
        // An older node's `joined` proved only that the agent started.
        assert_eq!(
            serde_json::from_str::<JoinState>("\"joined\"").expect("parse"),
            JoinState::AgentStarted
        );
    }

    #[test]
    fn optional_fields_may_be_missing() {
        let j: JoinStatus = serde_json::from_str(r#"{"state": "standby"}"#).expect("parse");
        assert_eq!(j.server, None);
        assert_eq!(j.last_error, None);
        let a: ApplyResponse = serde_json::from_str(
            r#"{"applied": true, "source": "state", "join": {"state": "joining"}, "message": "ok"}"#,
        )
        .expect("parse");
        assert!(a.applied);
        assert_eq!(a.join.state, JoinState::Joining);
    }

    #[test]
    fn error_and_health_bodies() {
        let e: ErrorBody = serde_json::from_str(r#"{"error": "no"}"#).expect("parse");
        assert_eq!(e.error, "no");
        let h: Health =
            serde_json::from_str(r#"{"status": "ok", "milestone": "standby"}"#).expect("parse");
        assert_eq!(h.milestone, "standby");
        assert_eq!(path::logs("k3s"), "/v1/logs/k3s");
    }

    #[test]
    fn a_status_from_an_older_node_has_an_empty_config_report() {
        let old = STATUS_JSON.replace("\"config_report\"", "\"x_config_report\"");
        let s: Status = serde_json::from_str(&old).expect("parse");
        assert_eq!(s.config_report, ConfigReport::default());
        let old = STATUS_JSON.replace("\"steps\"", "\"x_steps\"");
        let s: Status = serde_json::from_str(&old).expect("parse");
        assert!(s.steps.is_empty());
    }
}
