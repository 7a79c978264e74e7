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
//! Applying again once the agent runs: the same config is a no-op; any other is refused
//! ([`ApplyError::AlreadyJoined`], HTTP 409). A node's cluster identity is changed by
//! replacing the node, not by re-joining it under a running agent.

use crate::pid1::console;
use crate::pid1::mailbox::{Control, StartError};
use crate::pid1::supervise::{RestartPolicy, ServiceSpec};
use crate::sys::System;
use basalt_api::config::{MachineConfig, Token};
use basalt_api::k3s::{CaCheck, K3sError};
use basalt_api::milestone::Milestone;
use basalt_api::node::{JoinState, JoinStatus};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
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
    /// Under supervision, which restarts it with backoff, but not running.
    #[error("k3s agent is supervised but not running (restarted with backoff): {0}")]
    NotRunning(String),
}

/// Why an apply was refused before anything happened.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "k3s agent already runs, joined to {server}; a joined node takes no other config \
         (replace the node to change its cluster)"
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
        }
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
            .and_then(|json| self.host.write_k3s_config(&json))
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

/// The real node: STATE for the config and `/etc/rancher`, the main loop for the agent.
pub struct NodeHost {
    pub root: PathBuf,
    pub control: Control,
}

impl Host for NodeHost {
    fn persist(&self, text: &str) -> Result<(), JoinError> {
        let path = self.root.join(crate::config_source::STATE_CONFIG);
        write_secret(&path, text.as_bytes()).map_err(|e| JoinError::Persist(path, e))
    }

    fn node_ip(&self, config: &MachineConfig) -> Option<IpAddr> {
        // A static address of the config first; else what the network has now.
        let configured = config.network.addresses.iter().map(|c| c.addr);
        configured
            .chain(crate::net::addresses().into_iter().map(|(a, _)| a))
            .find(|a| a.is_ipv4() && !a.is_loopback())
    }

    fn write_k3s_config(&self, json: &str) -> Result<(), JoinError> {
        bind_rancher(&mut crate::sys::Real, &self.root)?;
        let path = self.root.join(K3S_CONFIG);
        write_secret(&path, json.as_bytes()).map_err(|e| JoinError::Write(path, e))
    }

    fn start_agent(&self) -> Result<(), JoinError> {
        self.control.start(agent_spec()).map_err(|e| match e {
            StartError::Refused(why) => JoinError::Start(why),
            StartError::NotRunning(why) => JoinError::NotRunning(why),
        })
    }
}

/// `k3s agent --config /etc/rancher/k3s/config.yaml`, restarted with backoff forever.
pub fn agent_spec() -> ServiceSpec {
    ServiceSpec {
        name: AGENT_SERVICE.into(),
        argv: vec![
            K3S_BIN.into(),
            "agent".into(),
            "--config".into(),
            format!("/{K3S_CONFIG}"),
        ],
        // PID1 has the kernel's bare environment; K3s finds its tools through PATH.
        env: vec![(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        )],
        restart: RestartPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            ..RestartPolicy::default()
        },
        stop_timeout: Duration::from_secs(20),
    }
}

/// What a join needs that no credential does, done in standby so that promotion is
/// "write config, exec": `/etc/rancher` on STATE, and the image's airgap images where
/// K3s imports them from. Failures are reported and left for the join to retry.
pub fn prepare_standby(sys: &mut dyn System, root: &Path) {
    if let Err(e) = bind_rancher(sys, root) {
        console::error("standby prep", &e);
    }
    let images = root.join(AIRGAP_IMAGES);
    if images.exists() {
        let dir = root.join(K3S_IMAGES_DIR);
        let link = dir.join("k3s-airgap-images.tar.zst");
        let made = std::fs::create_dir_all(&dir).and_then(|()| {
            match std::os::unix::fs::symlink(Path::new("/").join(AIRGAP_IMAGES), &link) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                other => other,
            }
        });
        if let Err(e) = made {
            console::error("standby prep", &JoinError::Write(link, e));
        }
    }
}

/// Bind-mounts STATE's rancher folder on `/etc/rancher`, once.
pub fn bind_rancher(sys: &mut dyn System, root: &Path) -> Result<(), JoinError> {
    let from = root.join(RANCHER_STATE);
    let to = root.join(RANCHER_MOUNT);
    std::fs::create_dir_all(&from).map_err(|e| JoinError::Mkdir(from.clone(), e))?;
    if same_dir(&from, &to) {
        return Ok(());
    }
    sys.mount(
        &from.to_string_lossy(),
        &to,
        None,
        nix::mount::MsFlags::MS_BIND,
        None,
    )
    .map_err(|e| JoinError::Mount(from, to, e))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// [`crate::atomic_file::write`] for files with secrets (the token, the API key):
/// mode 0600 from the start.
pub fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::atomic_file::write_mode(path, bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const HASH: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn config(cluster: bool) -> (MachineConfig, String) {
        let mut text = String::from(
            "version = 1\n[node]\nhostname = \"w1\"\nlabels = { \"pool\" = \"warm\" }\n\
             taints = [\"dedicated=gpu:NoSchedule\"]\n[api]\n\
             ca = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\n\
             cert = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\n\
             key = \"-----BEGIN PRIVATE KEY-----\\nAA==\\n-----END PRIVATE KEY-----\\n\"\n",
        );
        if cluster {
            text.push_str(&format!(
                "[cluster]\nserver = \"https://10.0.2.2:6443\"\ntoken = \"K10{HASH}::server:pw\"\n"
            ));
        }
        (MachineConfig::parse(&text).expect("valid config"), text)
    }

    /// A server whose CA hashes to `actual`, or that cannot be reached for the first
    /// `unreachable` checks.
    struct FakeServer {
        actual: String,
        unreachable: AtomicUsize,
        checks: AtomicUsize,
    }

    impl FakeServer {
        fn new(actual: &str, unreachable: usize) -> FakeServer {
            FakeServer {
                actual: actual.into(),
                unreachable: AtomicUsize::new(unreachable),
                checks: AtomicUsize::new(0),
            }
        }
    }

    impl CaChecker for Arc<FakeServer> {
        fn check(&self, server: &str, token: &Token) -> Result<CaCheck, K3sError> {
            self.checks.fetch_add(1, Ordering::SeqCst);
            if self.unreachable.load(Ordering::SeqCst) > 0 {
                self.unreachable.fetch_sub(1, Ordering::SeqCst);
                return Err(K3sError::Connect {
                    url: format!("{server}/cacerts"),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                });
            }
            let expected = token.ca_hash().unwrap_or_default();
            if expected == self.actual {
                Ok(CaCheck::Matched {
                    hash: self.actual.clone(),
                })
            } else {
                Err(K3sError::CaMismatch {
                    server: server.into(),
                    expected: expected.into(),
                    actual: self.actual.clone(),
                })
            }
        }
    }

    #[derive(Default)]
    struct Recorded {
        persisted: Vec<String>,
        k3s_config: Vec<String>,
        started: usize,
    }

    #[derive(Default)]
    struct FakeHost {
        calls: Mutex<Recorded>,
        /// Nothing taken under supervision.
        fail_start: bool,
        /// Supervised, but the process does not run.
        not_running: bool,
    }

    impl FakeHost {
        fn calls(&self) -> MutexGuard<'_, Recorded> {
            self.calls.lock().expect("lock")
        }
    }

    impl Host for Arc<FakeHost> {
        fn persist(&self, text: &str) -> Result<(), JoinError> {
            self.calls().persisted.push(text.into());
            Ok(())
        }
        fn node_ip(&self, _: &MachineConfig) -> Option<IpAddr> {
            Some(IpAddr::from([10, 0, 2, 15]))
        }
        fn write_k3s_config(&self, json: &str) -> Result<(), JoinError> {
            self.calls().k3s_config.push(json.into());
            Ok(())
        }
        fn start_agent(&self) -> Result<(), JoinError> {
            if self.fail_start {
                return Err(JoinError::Start(
                    "spawn /usr/local/bin/k3s: not found".into(),
                ));
            }
            self.calls().started += 1;
            if self.not_running {
                return Err(JoinError::NotRunning("exit 1".into()));
            }
            Ok(())
        }
    }

    fn joiner(server: &Arc<FakeServer>, host: &Arc<FakeHost>) -> Arc<Joiner> {
        let retry = Retry {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(40),
        };
        Arc::new(Joiner::new(
            Box::new(server.clone()),
            Box::new(host.clone()),
            retry,
        ))
    }

    #[test]
    fn a_ca_mismatch_persists_nothing_starts_nothing_and_names_both_hashes() {
        let server = Arc::new(FakeServer::new(OTHER, 0));
        let host = Arc::new(FakeHost::default());
        let j = joiner(&server, &host);
        let (c, text) = config(true);
        let got = j.apply(&c, &text, Instant::now()).expect("answered");
        let Applied::Refused { error } = got else {
            panic!("not refused: {got:?}");
        };
        assert!(error.contains(HASH) && error.contains(OTHER), "{error}");
        let calls = host.calls();
        assert!(calls.persisted.is_empty() && calls.k3s_config.is_empty());
        assert_eq!(calls.started, 0);
        let st = j.status();
        assert_eq!(st.state, JoinState::Failed);
        assert_eq!(st.server.as_deref(), Some("https://10.0.2.2:6443"));
        assert_eq!(st.last_error.as_deref(), Some(error.as_str()));
    }

    #[test]
    fn a_match_persists_writes_k3s_config_and_starts_the_agent_once() {
        let server = Arc::new(FakeServer::new(HASH, 0));
        let host = Arc::new(FakeHost::default());
        let j = joiner(&server, &host);
        let (c, text) = config(true);
        let got = j.apply(&c, &text, Instant::now()).expect("answered");
        assert!(matches!(got, Applied::Joined { .. }), "{got:?}");
        {
            let calls = host.calls();
            assert_eq!(calls.persisted, std::slice::from_ref(&text));
            assert_eq!(calls.started, 1);
            let k3s: serde_json::Value = serde_json::from_str(&calls.k3s_config[0]).expect("json");
            assert_eq!(k3s["server"], "https://10.0.2.2:6443");
            assert_eq!(k3s["token"], format!("K10{HASH}::server:pw"));
            assert_eq!(k3s["node-name"], "w1");
            assert_eq!(k3s["node-ip"], "10.0.2.15");
            assert_eq!(k3s["node-label"], serde_json::json!(["pool=warm"]));
            assert_eq!(
                k3s["node-taint"],
                serde_json::json!(["dedicated=gpu:NoSchedule"])
            );
        }
        assert_eq!(j.status().state, JoinState::Joined);
        assert_eq!(j.status().last_error, None);
        // The same config again changes nothing; another one is refused.
        assert_eq!(
            j.apply(&c, &text, Instant::now()).expect("answered"),
            Applied::Unchanged
        );
        let (standby, text) = config(false);
        assert!(matches!(
            j.apply(&standby, &text, Instant::now()),
            Err(ApplyError::AlreadyJoined { .. })
        ));
        assert_eq!(host.calls().started, 1);
        assert_eq!(host.calls().persisted.len(), 1);
    }

    #[test]
    fn a_config_without_cluster_is_persisted_and_stays_standby() {
        let server = Arc::new(FakeServer::new(HASH, 0));
        let host = Arc::new(FakeHost::default());
        let j = joiner(&server, &host);
        let (c, text) = config(false);
        assert_eq!(
            j.apply(&c, &text, Instant::now()).expect("answered"),
            Applied::Standby
        );
        assert_eq!(host.calls().persisted, [text]);
        assert_eq!(host.calls().started, 0);
        assert_eq!(server.checks.load(Ordering::SeqCst), 0);
        assert_eq!(j.status().state, JoinState::Standby);
    }

    #[test]
    fn an_agent_that_cannot_start_is_a_failed_join_of_a_persisted_config() {
        let server = Arc::new(FakeServer::new(HASH, 0));
        let host = Arc::new(FakeHost {
            fail_start: true,
            ..FakeHost::default()
        });
        let j = joiner(&server, &host);
        let (c, text) = config(true);
        let got = j.apply(&c, &text, Instant::now()).expect("answered");
        let Applied::Failed { error } = got else {
            panic!("{got:?}");
        };
        assert!(error.contains("not found"), "{error}");
        assert_eq!(host.calls().persisted.len(), 1);
        assert_eq!(j.status().state, JoinState::Failed);
        // Nothing runs, so a corrected config may come.
        assert!(j.apply(&c, &text, Instant::now()).is_ok());
    }

    #[test]
    fn a_supervised_agent_that_does_not_run_is_failed_but_not_started_again() {
        let server = Arc::new(FakeServer::new(HASH, 0));
        let host = Arc::new(FakeHost {
            not_running: true,
            ..FakeHost::default()
        });
        let j = joiner(&server, &host);
        let (c, _) = config(true);
        j.join_at_boot(c.clone(), |_| true)
            .expect("spawn")
            .join()
            .expect("join thread");
        assert_eq!(server.checks.load(Ordering::SeqCst), 1, "no retry");
        let st = j.status();
        assert_eq!(st.state, JoinState::Failed);
        assert!(st.last_error.is_some_and(|e| e.contains("exit 1")));
        // The supervisor owns it now: another config is refused, the same one is not
        // started twice.
        let (standby, text) = config(false);
        assert!(matches!(
            j.apply(&standby, &text, Instant::now()),
            Err(ApplyError::AlreadyJoined { .. })
        ));
        let text = c.to_toml().expect("toml");
        assert_eq!(
            j.apply(&c, &text, Instant::now()).expect("answered"),
            Applied::Unchanged
        );
        assert_eq!(host.calls().started, 1);
    }

    fn wait_for(j: &Joiner, state: JoinState) -> JoinStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = j.status();
            if st.state == state {
                return st;
            }
            assert!(Instant::now() < deadline, "{st:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_boot_join_retries_an_unreachable_server_then_joins() {
        let server = Arc::new(FakeServer::new(HASH, 3));
        let host = Arc::new(FakeHost::default());
        let j = joiner(&server, &host);
        let (c, _) = config(true);
        let t = j.join_at_boot(c, |_| true).expect("spawn");
        t.join().expect("join thread");
        assert_eq!(j.status().state, JoinState::Joined);
        assert_eq!(server.checks.load(Ordering::SeqCst), 4);
        assert_eq!(host.calls().started, 1);
        // A boot join does not write the config again: it came from STATE.
        assert!(host.calls().persisted.is_empty());
    }

    #[test]
    fn a_boot_join_reports_its_last_error_and_an_apply_supersedes_it() {
        let server = Arc::new(FakeServer::new(OTHER, 0));
        let host = Arc::new(FakeHost::default());
        let j = joiner(&server, &host);
        let (c, _) = config(true);
        let t = j.join_at_boot(c, |_| true).expect("spawn");
        let st = wait_for(&j, JoinState::Failed);
        assert!(st.last_error.is_some_and(|e| e.contains(OTHER)));
        while server.checks.load(Ordering::SeqCst) < 3 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let (standby, text) = config(false);
        assert_eq!(
            j.apply(&standby, &text, Instant::now()).expect("answered"),
            Applied::Standby
        );
        t.join().expect("the boot join ends once superseded");
        assert_eq!(j.status().state, JoinState::Standby);
        assert_eq!(host.calls().started, 0);
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let r = Retry::default();
        let got: Vec<u64> = (1..=7).map(|n| r.delay(n).as_secs()).collect();
        assert_eq!(got, [2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(r.delay(u32::MAX), r.max);
    }

    #[test]
    fn rancher_is_bound_once_and_secrets_are_written_0600() {
        use crate::sys::{Call, Recording};
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join(RANCHER_MOUNT)).expect("mkdir");
        let mut sys = Recording::default();
        bind_rancher(&mut sys, root.path()).expect("bind");
        assert!(root.path().join(RANCHER_STATE).is_dir());
        assert!(
            matches!(sys.calls.as_slice(), [Call::Mount { target, .. }] if target.ends_with(RANCHER_MOUNT)),
            "{:?}",
            sys.calls
        );
        let path = root.path().join(K3S_CONFIG);
        write_secret(&path, b"{}\n").expect("write");
        write_secret(&path, b"{\"a\":1}\n").expect("write again");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"a\":1}\n");
        let spec = agent_spec();
        assert_eq!(
            spec.argv,
            [K3S_BIN, "agent", "--config", "/etc/rancher/k3s/config.yaml"]
        );
    }
}
