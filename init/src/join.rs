//! Joining the cluster: a machine config with `[cluster]` makes the node a K3s agent.
//!
//! Before anything is written or started, the server's `/cacerts` is checked against
//! the CA hash in the token, as `k3s agent` itself would ([`basalt_api::k3s`]), so a
//! wrong token or server is reported through the API instead of a crash-looping agent.
//! On a match: `/etc/rancher` is STATE's `lib/basalt/rancher` (bind-mounted in standby,
//! so node identity under `/etc/rancher/node` never lives in the image), K3s's
//! `config.yaml` is written there from the machine config, and `k3s agent` starts under
//! supervision.
//!
//! Two ways in. [`Joiner::apply`] (the node API's apply, in the API thread): check,
//! persist, start, and answer with the outcome; a mismatch persists and starts nothing.
//! [`Joiner::join_at_boot`] (a `[cluster]` config read at boot): the same check in a
//! worker thread, retried with backoff for as long as it fails, with the last error in
//! status. A later apply supersedes a boot join still trying.
//!
//! Applying again once the agent runs: the same config is a no-op; one with the same
//! `[cluster]` and other changes (a rotated `[api]` certificate, say) is saved and kept
//! for the API and the next boot while the agent runs on ([`Applied::Updated`]); one
//! with another `[cluster]` is refused ([`ApplyError::AlreadyJoined`], HTTP 409). A
//! node's cluster identity is changed by replacing the node, not by re-joining it under
//! a running agent.

mod node;

pub use node::{agent_spec, bind_rancher, prepare_standby, write_secret, NodeHost};

use crate::boot::background::{self, PrepSlot};
use crate::pid1::console;
use basalt_api::config::{MachineConfig, Token};
use basalt_api::k3s::{CaCheck, K3sError};
use basalt_api::milestone::Milestone;
use basalt_api::node::{JoinState, JoinStatus};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The supervised service's name (`basalt node logs k3s`).
pub const AGENT_SERVICE: &str = "k3s";
/// Where the image carries K3s.
pub const K3S_BIN: &str = "/usr/local/bin/k3s";
/// K3s's config, relative to the root.
pub const K3S_CONFIG: &str = "etc/rancher/k3s/config.yaml";
/// The image's empty mount point for K3s's configuration and node identity.
pub const RANCHER_MOUNT: &str = "etc/rancher";
/// What is mounted there: a folder on STATE.
pub const RANCHER_STATE: &str = "var/lib/basalt/rancher";
/// The airgap images the builder puts on the root (builder's `rootfs::K3S_IMAGES`).
const AIRGAP_IMAGES: &str = "usr/share/basalt/k3s-airgap-images-amd64.tar.zst";
/// Where K3s imports images from at start.
const K3S_IMAGES_DIR: &str = "var/lib/rancher/k3s/agent/images";
/// Each request of the CA check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a boot join waits for the network before its first try.
const NETWORK_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("check the server's CA")]
    Check(#[source] K3sError),
    #[error("create {0}")]
    Mkdir(PathBuf, #[source] std::io::Error),
    #[error("bind-mount {0} on {1}")]
    Mount(PathBuf, PathBuf, #[source] nix::errno::Errno),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("save the machine config to {0}")]
    Persist(PathBuf, #[source] std::io::Error),
    #[error("start k3s agent: {0}")]
    Start(String),
    /// The agent is not started with the metadata service open to its pods.
    #[error("close the metadata service (169.254.169.254) before starting k3s agent")]
    BlockMetadata(#[source] crate::net::netlink::NetlinkError),
    /// Under supervision, which restarts it with backoff, but not running.
    #[error("k3s agent is supervised but not running (restarted with backoff): {0}")]
    NotRunning(String),
}

/// Why an apply was refused before anything happened.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "k3s agent already runs, joined to {server}; a joined node takes no other [cluster] \
         (replace the node to change its cluster; other sections may change)"
    )]
    AlreadyJoined { server: String },
    #[error(transparent)]
    Persist(JoinError),
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// No `[cluster]`: persisted, the node stays in standby.
    Standby,
    /// Persisted, `k3s agent` started `exec` after the request arrived.
    Joined { exec: Duration },
    /// The same config the agent already runs with.
    Unchanged,
    /// The agent runs with the same `[cluster]`; the rest of the config changed and was
    /// persisted (the agent is not touched).
    Updated,
    /// The CA check failed: nothing persisted, nothing started.
    Refused { error: String },
    /// Persisted, but the agent could not be started (or is supervised but not running).
    Failed { error: String },
}

/// How far an activation got.
enum Activation {
    Running,
    /// Supervised, restarted with backoff, but not running now.
    Supervised(String),
    /// Nothing runs; another try may do better.
    Failed(String),
}

/// K3s's CA check against a server; a trait so tests fake the server.
pub trait CaChecker: Send + Sync {
    fn check(&self, server: &str, token: &Token) -> Result<CaCheck, K3sError>;
}

/// The real check, over the network.
pub struct NetworkCheck {
    pub timeout: Duration,
}

impl CaChecker for NetworkCheck {
    fn check(&self, server: &str, token: &Token) -> Result<CaCheck, K3sError> {
        basalt_api::k3s::check_server_ca(server, token, self.timeout)
    }
}

/// The side effects of a join; a trait so tests record them.
pub trait Host: Send + Sync {
    /// Saves the applied config (TOML as received) where the next boot finds it.
    fn persist(&self, text: &str) -> Result<(), JoinError>;
    /// The address K3s should register, if one is known.
    fn node_ip(&self, config: &MachineConfig) -> Option<IpAddr>;
    /// Makes `/etc/rancher` writable and writes K3s's config there.
    fn write_k3s_config(&self, json: &str) -> Result<(), JoinError>;
    /// Starts `k3s agent` under supervision.
    fn start_agent(&self) -> Result<(), JoinError>;
}

/// Backoff of a boot join's retries.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
        }
    }
}

impl Retry {
    fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        self.initial.saturating_mul(1 << exp).min(self.max)
    }
}

struct Inner {
    status: JoinStatus,
    /// Bumped by every apply: a boot join of an older generation stops.
    generation: u64,
    /// The config `k3s agent` was started with.
    agent: Option<MachineConfig>,
}

/// The node's way into the cluster, shared by the API threads and the boot join.
pub struct Joiner {
    checker: Box<dyn CaChecker>,
    host: Box<dyn Host>,
    retry: Retry,
    inner: Mutex<Inner>,
    /// One apply or activation at a time (a boot join's check runs outside it).
    apply_lock: Mutex<()>,
    /// What standby left to the background and the agent needs ([`crate::boot::background`]).
    prep: PrepSlot,
}

impl Joiner {
    pub fn new(checker: Box<dyn CaChecker>, host: Box<dyn Host>, retry: Retry) -> Joiner {
        Joiner {
            checker,
            host,
            retry,
            inner: Mutex::new(Inner {
                status: JoinStatus {
                    state: JoinState::Standby,
                    server: None,
                    last_error: None,
                },
                generation: 0,
                agent: None,
            }),
            apply_lock: Mutex::new(()),
            prep: background::k3s_prep(),
        }
    }

    /// The background preparation the agent's start waits for, instead of the node's.
    pub fn with_prep(mut self, prep: PrepSlot) -> Joiner {
        self.prep = prep;
        self
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> JoinStatus {
        self.inner().status.clone()
    }

    fn set(&self, state: JoinState, server: Option<&str>, last_error: Option<String>) {
        self.inner().status = JoinStatus {
            state,
            server: server.map(str::to_owned),
            last_error,
        };
    }

    /// Validated `config` (whose TOML is `text`) from the node API, received at
    /// `received`: check, persist, start. See the module docs for the rules.
    pub fn apply(
        &self,
        config: &MachineConfig,
        text: &str,
        received: Instant,
    ) -> Result<Applied, ApplyError> {
        let _one = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut inner = self.inner();
            if let Some(running) = &inner.agent {
                if running == config {
                    return Ok(Applied::Unchanged);
                }
                if running.cluster == config.cluster {
                    // Persisted under the inner lock: a boot join cannot interleave.
                    self.host.persist(text).map_err(ApplyError::Persist)?;
                    inner.agent = Some(config.clone());
                    return Ok(Applied::Updated);
                }
                let server = running
                    .cluster
                    .as_ref()
                    .map_or_else(String::new, |c| c.server.as_str().to_owned());
                return Err(ApplyError::AlreadyJoined { server });
            }
            inner.generation += 1;
        }
        let Some(cluster) = &config.cluster else {
            self.host.persist(text).map_err(ApplyError::Persist)?;
            self.set(JoinState::Standby, None, None);
            return Ok(Applied::Standby);
        };
        let server = cluster.server.as_str();
        self.set(JoinState::Joining, Some(server), None);
        if let Err(e) = self.checker.check(server, &cluster.token) {
            let error = console::chain(&JoinError::Check(e));
            console::info(&format!("join: refused: {error}"));
            self.set(JoinState::Failed, Some(server), Some(error.clone()));
            return Ok(Applied::Refused { error });
        }
        if let Err(e) = self.host.persist(text) {
            self.set(JoinState::Failed, Some(server), Some(console::chain(&e)));
            return Err(ApplyError::Persist(e));
        }
        match self.activate(config) {
            Activation::Running => {
                let exec = received.elapsed();
                console::info(&format!(
                    "join: agent exec {} ms after apply",
                    exec.as_millis()
                ));
                Ok(Applied::Joined { exec })
            }
            Activation::Supervised(error) | Activation::Failed(error) => {
                Ok(Applied::Failed { error })
            }
        }
    }

    /// Writes K3s's config and starts the agent; the status says how it went.
    fn activate(&self, config: &MachineConfig) -> Activation {
        let server = config.cluster.as_ref().map(|c| c.server.as_str());
        let result = config
            .k3s_config_json(self.host.node_ip(config))
            .ok_or_else(|| JoinError::Start("the config has no [cluster]".into()))
            .and_then(|json| {
                let prep = self
                    .prep
                    .wait()
                    .map_err(|e| JoinError::Start(e.to_string()));
                prep.and_then(|()| self.host.write_k3s_config(&json))
            })
            .and_then(|()| self.host.start_agent());
        let supervised = matches!(result, Ok(()) | Err(JoinError::NotRunning(_)));
        if supervised {
            self.inner().agent = Some(config.clone());
        }
        match result {
            Ok(()) => {
                self.set(JoinState::Joined, server, None);
                console::milestone(Milestone::Joined);
                Activation::Running
            }
            Err(e) => {
                console::error("join", &e);
                let error = console::chain(&e);
                self.set(JoinState::Failed, server, Some(error.clone()));
                if supervised {
                    Activation::Supervised(error)
                } else {
                    Activation::Failed(error)
                }
            }
        }
    }

    /// Joins with a `[cluster]` config read at boot, in a thread of its own: waits (a
    /// bounded time) for `network_up`, then checks and starts, retrying with backoff
    /// until it succeeds or an apply supersedes it. Never gives up, never crash-loops.
    pub fn join_at_boot(
        self: &Arc<Self>,
        config: MachineConfig,
        network_up: impl Fn(Duration) -> bool + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let generation = self.inner().generation;
        let server = config
            .cluster
            .as_ref()
            .map(|c| c.server.as_str().to_owned());
        self.set(JoinState::Joining, server.as_deref(), None);
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("join".into())
            .spawn(move || {
                if !network_up(NETWORK_WAIT) {
                    console::warn("join: network not up yet; trying anyway");
                }
                me.boot_loop(&config, generation);
            })
    }

    fn superseded(&self, generation: u64) -> bool {
        self.inner().generation != generation
    }

    fn boot_loop(&self, config: &MachineConfig, generation: u64) {
        let Some(cluster) = &config.cluster else {
            return;
        };
        let server = cluster.server.as_str();
        let mut failures = 0u32;
        loop {
            if self.superseded(generation) {
                return;
            }
            let error = match self.checker.check(server, &cluster.token) {
                Ok(_) => {
                    let _one = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
                    if self.superseded(generation) {
                        return;
                    }
                    match self.activate(config) {
                        Activation::Running | Activation::Supervised(_) => return,
                        Activation::Failed(error) => (JoinState::Failed, error),
                    }
                }
                Err(e) => {
                    let state = if matches!(e, K3sError::CaMismatch { .. }) {
                        JoinState::Failed
                    } else {
                        JoinState::Joining
                    };
                    (state, console::chain(&JoinError::Check(e)))
                }
            };
            failures += 1;
            let delay = self.retry.delay(failures);
            let (state, error) = error;
            console::warn(&format!(
                "join: attempt {failures} failed: {error}; retrying in {} s",
                delay.as_secs_f32()
            ));
            {
                // Checked and set at once: an apply may have taken over meanwhile.
                let mut inner = self.inner();
                if inner.generation != generation {
                    return;
                }
                inner.status = JoinStatus {
                    state,
                    server: Some(server.to_owned()),
                    last_error: Some(error),
                };
            }
            std::thread::sleep(delay);
        }
    }
}

#[cfg(test)]
mod tests;
