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
//! Started is not registered. The CA check proves the server, not the token's password:
//! only K3s's answer to the agent's credentials does. So status reads the agent's state
//! from the supervisor and the disk ([`Host::agent_run`], [`agent_state`]):
//! `agent-started` once it was started, `registered` once K3s has issued this run of it
//! the node's kubelet client certificate (`client-kubelet.crt` under K3s's data dir is
//! younger than the running process: K3s writes it on every start, after the server
//! took the password), `crash-looping` when the supervisor restarted it
//! [`CRASH_LOOP_RESTARTS`] times within [`CRASH_LOOP_WINDOW`] without it registering.
//!
//! Applying again once the agent is supervised: the same config is a no-op; one with the
//! same `[cluster]` and other changes (a rotated `[api]` certificate, say) is saved and
//! kept for the API and the next boot while the agent runs on ([`Applied::Updated`]).
//! Another `[cluster]` is refused with HTTP 409 ([`ApplyError::AlreadyJoined`]) only
//! while the agent runs registered: a node's cluster identity is changed by replacing
//! the node, not by re-joining it under a running agent. An agent that is not registered
//! (crash-looping, waiting to be restarted, or running but refused by the server, as
//! real K3s keeps retrying in-process) proves nothing worth keeping, so a new
//! `[cluster]` replaces the old one: checked, saved, and the agent started again at
//! once with it. A config without `[cluster]` cannot stop a supervised agent
//! ([`ApplyError::AgentSupervised`], 409).

mod node;
pub mod timeline;
pub mod warm;

pub use node::agent_run_of;
pub use node::{agent_spec, bind_rancher, prepare_standby, write_secret, NodeHost};

use crate::boot::background::{self, PrepSlot};
use crate::pid1::console;
use basalt_api::config::{MachineConfig, Token};
use basalt_api::k3s::{CaCheck, CheckTimes, K3sError};
use basalt_api::milestone::Milestone;
use basalt_api::node::{JoinState, JoinStatus};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use timeline::Timeline;

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
/// The kubelet client certificate K3s writes, relative to the root, once the server has
/// accepted the token's password and registered the node (K3s's default data dir;
/// basalt sets no other).
pub const KUBELET_CLIENT_CERT: &str = "var/lib/rancher/k3s/agent/client-kubelet.crt";
/// Supervisor restarts within [`CRASH_LOOP_WINDOW`] that make an unregistered agent
/// `crash-looping`. With the agent's backoff (1 s doubling), an agent that fails at
/// once gets there within about 10 s.
pub const CRASH_LOOP_RESTARTS: usize = 3;
/// See [`CRASH_LOOP_RESTARTS`]; restarts from before the last (re)start with a new
/// config do not count.
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(600);
/// The longest agent line quoted in status.
const LAST_LINE_MAX: usize = 300;
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
        "k3s agent runs registered with {server}; a registered node takes no other [cluster] \
         (replace the node to change its cluster; other sections may change)"
    )]
    AlreadyJoined { server: String },
    #[error(
        "k3s agent is supervised for {server}; a config without [cluster] cannot stop it \
         (send a corrected [cluster], or replace the node)"
    )]
    AgentSupervised { server: String },
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
    /// Another `[cluster]` replaced the one of an agent that had not registered:
    /// persisted, and the agent told to start again with it.
    Replaced,
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

/// What a checked join did: the verdict, the agent's start (after a passed check), and
/// what is left to make durable.
struct Joined {
    checked: Result<CaCheck, K3sError>,
    activation: Activation,
    /// K3s's config, in place but not synced yet.
    k3s_config: Option<Box<dyn Durable>>,
    /// The applied config, written aside (synced), to commit.
    persist: Result<Box<dyn Commit>, JoinError>,
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
    /// [`CaChecker::check`], and when its steps ended, where the checker knows.
    fn check_timed(
        &self,
        server: &str,
        token: &Token,
    ) -> (Result<CaCheck, K3sError>, Option<CheckTimes>) {
        (self.check(server, token), None)
    }
}

/// The real check, over the network.
pub struct NetworkCheck {
    pub timeout: Duration,
}

impl CaChecker for NetworkCheck {
    fn check(&self, server: &str, token: &Token) -> Result<CaCheck, K3sError> {
        basalt_api::k3s::check_server_ca(server, token, self.timeout)
    }

    fn check_timed(
        &self,
        server: &str,
        token: &Token,
    ) -> (Result<CaCheck, K3sError>, Option<CheckTimes>) {
        let (checked, times) = basalt_api::k3s::check_server_ca_timed(server, token, self.timeout);
        (checked, Some(times))
    }
}

/// The supervised agent as the host sees it now, times as ages (see [`agent_state`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRun {
    /// How long the current process has run; `None` when none runs.
    pub running_for: Option<Duration>,
    /// The ages of the supervisor's restarts.
    pub restart_ages: Vec<Duration>,
    /// How the last run ended (`exit 1`).
    pub last_exit: Option<String>,
    /// The last line the agent wrote.
    pub last_line: Option<String>,
    /// The age of [`KUBELET_CLIENT_CERT`]; `None` when there is none.
    pub credentials_age: Option<Duration>,
}

/// The join state a supervised agent is in, and why, from `run` and the time since it
/// was last started with a new config (`since_start`).
pub fn agent_state(run: &AgentRun, since_start: Duration) -> (JoinState, Option<String>) {
    if let (Some(up), Some(age)) = (run.running_for, run.credentials_age) {
        // Written by this run of the agent, so after the server took the password.
        if age <= up {
            return (JoinState::Registered, None);
        }
    }
    let window = CRASH_LOOP_WINDOW.min(since_start);
    let recent = run.restart_ages.iter().filter(|a| **a <= window).count();
    let exit = run.last_exit.as_deref().unwrap_or("no exit seen");
    let line = run.last_line.as_deref().map_or_else(String::new, |l| {
        let mut l = l.to_owned();
        if l.len() > LAST_LINE_MAX {
            let mut cut = LAST_LINE_MAX;
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            l.truncate(cut);
            l.push('…');
        }
        format!("; its last line: {l}")
    });
    if recent >= CRASH_LOOP_RESTARTS {
        let error = format!(
            "k3s agent was restarted {recent} times in the last {} s without registering \
             (last exit: {exit}){line}",
            window.as_secs()
        );
        return (JoinState::CrashLooping, Some(error));
    }
    if run.running_for.is_none() && run.last_exit.is_some() {
        let error = format!("k3s agent exited ({exit}) and is restarted with backoff{line}");
        return (JoinState::AgentStarted, Some(error));
    }
    (JoinState::AgentStarted, None)
}

/// A write made while the CA check runs, applied by [`Commit::commit`] once it passed;
/// dropped uncommitted (a refused join), it leaves nothing behind.
pub trait Commit: Send {
    fn commit(self: Box<Self>) -> Result<(), JoinError>;
    /// Puts the file in place now, readers see it at once; what it returns makes it
    /// survive a crash. By default, the commit, with nothing left to sync.
    fn rename(self: Box<Self>) -> Result<Box<dyn Durable>, JoinError> {
        self.commit()?;
        Ok(Box::new(Synced))
    }
}

/// A file in place whose crash safety waits for [`Durable::sync`].
pub trait Durable: Send {
    fn sync(self: Box<Self>) -> Result<(), JoinError>;
}

/// Nothing left to sync.
struct Synced;

impl Durable for Synced {
    fn sync(self: Box<Self>) -> Result<(), JoinError> {
        Ok(())
    }
}

/// A [`Commit`] that runs a closure: for test hosts, whose writes need no staging.
#[cfg(test)]
pub(crate) struct CommitFn<F>(pub F);

#[cfg(test)]
impl<F: FnOnce() -> Result<(), JoinError> + Send> Commit for CommitFn<F> {
    fn commit(self: Box<Self>) -> Result<(), JoinError> {
        (self.0)()
    }
}

/// The side effects of a join; a trait so tests record them.
pub trait Host: Send + Sync {
    /// Writes the applied config (TOML as received) aside; committed, it is where the
    /// next boot finds it.
    fn stage_persist(&self, text: &str) -> Result<Box<dyn Commit>, JoinError>;
    /// Saves the applied config at once.
    fn persist(&self, text: &str) -> Result<(), JoinError> {
        self.stage_persist(text)?.commit()
    }
    /// The address K3s should register, if one is known.
    fn node_ip(&self, config: &MachineConfig) -> Option<IpAddr>;
    /// Makes `/etc/rancher` writable and writes K3s's config aside there; committed, it
    /// is the config the agent reads.
    fn stage_k3s_config(&self, json: &str) -> Result<Box<dyn Commit>, JoinError>;
    /// Closes the metadata service to everything on the node, before any agent starts
    /// (see [`crate::net::metadata_block`]). PID1 reads the metadata only at boot, so
    /// doing it for a join that the CA check then refuses costs nothing.
    fn close_metadata(&self) -> Result<(), JoinError>;
    /// Starts `k3s agent` under supervision.
    fn start_agent(&self) -> Result<(), JoinError>;
    /// Starts the supervised agent again now, with the config just written.
    fn restart_agent(&self) -> Result<(), JoinError>;
    /// The supervised agent now; `None` when that is not known (no agent, or PID1's
    /// loop did not answer).
    fn agent_run(&self) -> Option<AgentRun>;
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
    /// When the agent was last started with a new config.
    started: Option<Instant>,
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
                started: None,
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

    /// The join's status; for a started agent, its state now (see the module docs).
    pub fn status(&self) -> JoinStatus {
        let (mut status, started) = {
            let inner = self.inner();
            (inner.status.clone(), inner.started)
        };
        if status.state == JoinState::AgentStarted {
            // Asked outside the lock: it is a round trip to PID1's main loop.
            if let (Some(run), Some(started)) = (self.host.agent_run(), started) {
                let (state, error) = agent_state(&run, started.elapsed());
                status.last_error = match state {
                    JoinState::Registered => None,
                    _ => error.or(status.last_error),
                };
                status.state = state;
            }
        }
        status
    }

    /// Whether the supervised agent is registered now.
    fn registered(&self) -> bool {
        self.status().state == JoinState::Registered
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
        self.apply_timed(config, text, &Timeline::new(received))
    }

    /// [`Joiner::apply`], marking its steps on `timeline` (which counts from the
    /// request's arrival); a join prints it once the agent runs.
    pub fn apply_timed(
        &self,
        config: &MachineConfig,
        text: &str,
        timeline: &Timeline,
    ) -> Result<Applied, ApplyError> {
        let received = timeline.start();
        let _one = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let supervised = self.inner().agent.is_some();
        // Asked before the inner lock is taken: a round trip to PID1's main loop.
        let registered = supervised && self.registered();
        let mut replace = false;
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
                if config.cluster.is_none() {
                    return Err(ApplyError::AgentSupervised { server });
                }
                if registered {
                    return Err(ApplyError::AlreadyJoined { server });
                }
                replace = true;
            }
            inner.generation += 1;
        }
        let Some(cluster) = &config.cluster else {
            self.host.persist(text).map_err(ApplyError::Persist)?;
            self.set(JoinState::Standby, None, None);
            warm::set_servers(config.prefetch_servers());
            return Ok(Applied::Standby);
        };
        let server = cluster.server.as_str();
        self.set(JoinState::Joining, Some(server), None);
        let joined = self.check_and_start(config, text, server, &cluster.token, replace, timeline);
        // The spawn, not the save waited for after it.
        let exec = timeline
            .get("agent-started")
            .unwrap_or_else(|| received.elapsed());
        let Joined {
            checked,
            activation,
            k3s_config,
            persist,
        } = joined;
        if let Err(e) = checked {
            for note in timeline.take_notes() {
                console::info(&note);
            }
            let error = console::chain(&JoinError::Check(e));
            console::info(&format!("join: refused: {error}"));
            self.set(JoinState::Failed, Some(server), Some(error.clone()));
            // The files written aside were dropped uncommitted.
            return Ok(Applied::Refused { error });
        }
        // Joining: nothing more to fetch ahead (after the exec: off its path).
        warm::set_servers(Vec::new());
        // The agent runs (or was tried); the saved config is made durable before the
        // answer, so a success reported is a config the next boot finds.
        let saved = persist.and_then(Commit::commit);
        if let Some(k3s_config) = k3s_config {
            // K3s's config is written again before every start of the agent: losing it
            // to a crash loses nothing, so a failure here is only reported.
            if let Err(e) = k3s_config.sync() {
                console::warn(&format!("join: {}", console::chain(&e)));
            }
        }
        timeline.mark("synced");
        if replace {
            console::info(&format!(
                "join: the agent is not registered; replaced its [cluster] with {server}"
            ));
        }
        if matches!(activation, Activation::Running) && !replace {
            console::info(&format!(
                "join: agent exec {} ms after apply",
                exec.as_millis()
            ));
        }
        for note in timeline.take_notes() {
            console::info(&note);
        }
        console::info(&timeline.line());
        if let Err(e) = saved {
            let error = format!(
                "k3s agent was started, but the config was not saved: {}",
                console::chain(&e)
            );
            self.inner().status.last_error = Some(error);
            return Err(ApplyError::Persist(e));
        }
        match activation {
            Activation::Running if replace => Ok(Applied::Replaced),
            Activation::Running => Ok(Applied::Joined { exec }),
            Activation::Supervised(error) | Activation::Failed(error) => {
                Ok(Applied::Failed { error })
            }
        }
    }

    /// Runs the CA check against `server` and, in threads beside it, everything of the
    /// join that does not depend on its verdict: [`Joiner::prepare_agent`] (K3s's config
    /// written aside, unsynced) and the config's save written aside (synced). A passed
    /// check then renames K3s's config into place and starts the agent; the save is only
    /// waited for after that, and committed by the caller. Nothing is printed before the
    /// agent's start: the console is slow under emulation.
    fn check_and_start(
        &self,
        config: &MachineConfig,
        text: &str,
        server: &str,
        token: &Token,
        replace: bool,
        timeline: &Timeline,
    ) -> Joined {
        let began = Instant::now();
        timeline.mark_at("check-start", began);
        let stage_persist = || {
            let staged = self.host.stage_persist(text);
            timeline.mark("config-staged");
            staged
        };
        let prepare_agent = || {
            let staged = self.prepare_agent(config, Some(timeline));
            timeline.mark("prepared");
            (staged, began.elapsed())
        };
        let gone = || JoinError::Start("the join's preparation thread panicked".into());
        let (joined, checked_in, prepared_in) = std::thread::scope(|s| {
            let persist = std::thread::Builder::new()
                .name("join-save".into())
                .spawn_scoped(s, stage_persist);
            let agent = std::thread::Builder::new()
                .name("join-prep".into())
                .spawn_scoped(s, prepare_agent);
            let (checked, times) = self.checker.check_timed(server, token);
            let checked_in = began.elapsed();
            if let Some(times) = &times {
                timeline.mark_check(times);
            }
            timeline.mark("checked");
            let (agent, prepared_in) = match agent {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| (Err(gone()), began.elapsed())),
                // No thread: the same work, after the check.
                Err(_) => prepare_agent(),
            };
            let (activation, k3s_config) = match &checked {
                // Dropped uncommitted below: nothing of a refused join stays.
                Err(_) => (Activation::Failed(String::new()), None),
                Ok(_) => self.activate(config, replace, agent, Some(timeline)),
            };
            let persist = match persist {
                Ok(handle) => handle.join().unwrap_or_else(|_| Err(gone())),
                Err(_) => stage_persist(),
            };
            let joined = Joined {
                checked,
                activation,
                k3s_config,
                persist,
            };
            (joined, checked_in, prepared_in)
        });
        timeline.note(format!(
            "join: CA check {} ms; prepared alongside in {} ms",
            checked_in.as_millis(),
            prepared_in.as_millis()
        ));
        joined
    }

    /// What starting the agent needs that no verdict of the CA check changes: the
    /// background preparation ended, K3s's config rendered and written aside, the
    /// metadata service closed.
    fn prepare_agent(
        &self,
        config: &MachineConfig,
        timeline: Option<&Timeline>,
    ) -> Result<Box<dyn Commit>, JoinError> {
        let mark = |step| {
            if let Some(t) = timeline {
                t.mark(step);
            }
        };
        let json = config
            .k3s_config_json(self.host.node_ip(config))
            .ok_or_else(|| JoinError::Start("the config has no [cluster]".into()))?;
        mark("rendered");
        self.prep
            .wait()
            .map_err(|e| JoinError::Start(e.to_string()))?;
        mark("prep-waited");
        let staged = self.host.stage_k3s_config(&json)?;
        mark("k3s-config-staged");
        self.host.close_metadata()?;
        mark("metadata-closed");
        Ok(staged)
    }

    /// Renames K3s's config prepared by [`Joiner::prepare_agent`] into place and starts
    /// the agent (again at once, with `restart`, for an agent already supervised); the
    /// status says how it went. Returns what makes K3s's config durable, to do after.
    fn activate(
        &self,
        config: &MachineConfig,
        restart: bool,
        prepared: Result<Box<dyn Commit>, JoinError>,
        timeline: Option<&Timeline>,
    ) -> (Activation, Option<Box<dyn Durable>>) {
        let mark = |step| {
            if let Some(t) = timeline {
                t.mark(step);
            }
        };
        let server = config.cluster.as_ref().map(|c| c.server.as_str());
        let mut durable = None;
        let result = prepared.and_then(Commit::rename).and_then(|renamed| {
            durable = Some(renamed);
            mark("k3s-config-renamed");
            if restart {
                self.host.restart_agent()
            } else {
                self.host.start_agent()
            }
        });
        mark("agent-started");
        let supervised = matches!(result, Ok(()) | Err(JoinError::NotRunning(_)));
        if supervised {
            let mut inner = self.inner();
            inner.agent = Some(config.clone());
            inner.started = Some(Instant::now());
        }
        match result {
            Ok(()) => {
                self.set(JoinState::AgentStarted, server, None);
                // The agent's start, the console's `joined`; registration is in status.
                console::milestone(Milestone::Joined);
                (Activation::Running, durable)
            }
            Err(e) => {
                console::error("join", &e);
                let error = console::chain(&e);
                // Supervised, it may yet run and register: status follows it.
                let state = if supervised {
                    JoinState::AgentStarted
                } else {
                    JoinState::Failed
                };
                self.set(state, server, Some(error.clone()));
                let activation = if supervised {
                    Activation::Supervised(error)
                } else {
                    Activation::Failed(error)
                };
                (activation, durable)
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
                    let prepared = self.prepare_agent(config, None);
                    let (activation, k3s_config) = self.activate(config, false, prepared, None);
                    if let Some(Err(e)) = k3s_config.map(Durable::sync) {
                        console::warn(&format!("join: {}", console::chain(&e)));
                    }
                    match activation {
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
