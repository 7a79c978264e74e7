//! What the controller needs from a place that runs servers: Hetzner Cloud, or local QEMU.
//!
//! Everything the controller knows about a server is on the server itself, as labels. A
//! restarted controller reads them back and converges; it keeps no state of its own.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// The pool a server belongs to.
pub const LABEL_POOL: &str = "basalt.io/pool";
/// Its [`ServerState`].
pub const LABEL_STATE: &str = "basalt.io/state";
/// The id of the image it was created from.
pub const LABEL_IMAGE: &str = "basalt.io/image";
/// The controller generation that created it (a counter, so that the newest can be told).
pub const LABEL_GENERATION: &str = "basalt.io/generation";
/// For an active node: the cluster it joined.
pub const LABEL_CLUSTER: &str = "basalt.io/cluster";

/// Where a server is in its life. A server only moves forward: creating → standby →
/// promoting → active, or to broken from anywhere; it never goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServerState {
    Creating,
    Standby,
    Promoting,
    Active,
    Broken,
}

impl ServerState {
    pub const ALL: [ServerState; 5] = [
        ServerState::Creating,
        ServerState::Standby,
        ServerState::Promoting,
        ServerState::Active,
        ServerState::Broken,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Creating => "creating",
            ServerState::Standby => "standby",
            ServerState::Promoting => "promoting",
            ServerState::Active => "active",
            ServerState::Broken => "broken",
        }
    }
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServerState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServerState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown server state {s:?}"))
    }
}

/// An image servers can be created from: a Hetzner snapshot, or an image file for QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The provider's id (a snapshot id, or the file's path).
    pub id: String,
    pub created: SystemTime,
    /// The image's own version (`basalt.io/version` on a snapshot), when known.
    pub version: Option<String>,
}

/// A server of the pool, as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The provider's id: Hetzner's numeric server id, or the QEMU VM's name.
    pub id: String,
    /// The name the server was created with; its node API certificate carries this name.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    /// Where its node API can be reached from the controller, once known.
    pub api: Option<SocketAddr>,
}

impl Server {
    /// The state label, or `None` when it is missing or unknown (treated as broken).
    pub fn state(&self) -> Option<ServerState> {
        self.labels.get(LABEL_STATE)?.parse().ok()
    }
}

/// What a new server is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateServer {
    /// Unique within the pool; the controller derives it from the pool name and generation.
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// The machine config (TOML) the node reads at boot: Hetzner user-data, QEMU fw_cfg.
    pub user_data: String,
}

/// A provider's failure. `transient` ones (rate limits, 5xx, lost answers) are retried by the
/// controller on its next pass; the others are reported.
#[derive(Debug, thiserror::Error)]
#[error("{provider}: {what}")]
pub struct ProviderError {
    pub provider: &'static str,
    pub what: String,
    pub transient: bool,
}

/// One place that runs servers. Every call is idempotent from the controller's point of
/// view: it may be retried after a lost answer, and the controller re-reads the server list
/// before acting on what it believes.
pub trait Provider: Send + Sync + 'static {
    /// `hetzner` or `qemu`.
    fn kind(&self) -> &'static str;

    /// The kubelet `--provider-id` of a server: `hcloud://<id>` or `basalt-qemu://<name>`.
    fn provider_id(&self, server: &Server) -> String;

    /// The images servers may be created from, newest first.
    fn images(&self) -> impl Future<Output = Result<Vec<Image>, ProviderError>> + Send;

    /// Every server that carries `basalt.io/pool=<pool>`, whatever its state.
    fn servers(
        &self,
        pool: &str,
    ) -> impl Future<Output = Result<Vec<Server>, ProviderError>> + Send;

    /// Create and start a server.
    fn create(
        &self,
        req: &CreateServer,
    ) -> impl Future<Output = Result<Server, ProviderError>> + Send;

    /// Replace a server's labels with `labels`.
    fn set_labels(
        &self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;

    /// Delete a server. Deleting one that is already gone is not an error.
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), ProviderError>> + Send;

    /// Take or renew the pool's controller lock for `holder` (one controller per pool).
    /// `Ok(false)` when another holder renewed it less than `ttl` ago.
    fn lock(
        &self,
        pool: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, ProviderError>> + Send;

    /// Attach a server to a private network at promotion (Hetzner's networks). Providers
    /// without networks refuse.
    fn attach_network(
        &self,
        id: &str,
        network: &str,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send {
        let _ = (id, network);
        async move {
            Err(ProviderError {
                provider: self.kind(),
                what: "this provider has no private networks".into(),
                transient: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_labels() {
        for st in ServerState::ALL {
            assert_eq!(st.as_str().parse::<ServerState>(), Ok(st));
        }
        assert!("joined".parse::<ServerState>().is_err());
    }

    #[test]
    fn a_server_without_a_known_state_label_has_no_state() {
        let mut s = Server {
            id: "1".into(),
            name: "p-1".into(),
            labels: BTreeMap::new(),
            created: SystemTime::UNIX_EPOCH,
            api: None,
        };
        assert_eq!(s.state(), None);
        s.labels.insert(LABEL_STATE.into(), "standby".into());
        assert_eq!(s.state(), Some(ServerState::Standby));
        s.labels.insert(LABEL_STATE.into(), "weird".into());
        assert_eq!(s.state(), None);
    }
}
