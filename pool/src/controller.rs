//! The warm-pool controller: a reconcile loop over the provider's servers, and the calls the
//! gRPC side and the CLI make (promote, target size, nodes, delete, status, metrics).
//!
//! **Run it as a single replica.** The pool's state is in the provider's labels; the
//! controller holds only what it is doing right now (the servers a promotion is working
//! on). A second controller on the same pool is refused while the first one's lock is
//! fresh ([`Provider::lock`], renewed every pass), because two controllers would both
//! fill the pool and could exceed `max`.
//!
//! Killed at any instant and restarted, it converges: a `creating` server is waited for
//! (or deleted after the timeout), a `promoting` one is resolved by asking its node API
//! whether it joined (joined → active; still standby → the join config again, for the same
//! cluster; failed → broken), and every create is counted against `max` from a fresh list.

use crate::config::{ClusterConfig, PoolConfig};
use crate::metrics::Metrics;
use crate::nodes::{join_config, standby_config, Nodes};
use crate::plan::{plan, DeleteReason, JoinSeen, PlanInput, Step, LABEL_SINCE};
use crate::provider::{
    CreateServer, Provider, ProviderError, Server, ServerState, LABEL_CLUSTER, LABEL_GENERATION,
    LABEL_IMAGE, LABEL_POOL, LABEL_STATE,
};
use basalt_api::node::JoinState;
use basalt_client::pki::Ca;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("pool {pool}: another controller holds the lock (run one controller per pool)")]
    LockHeld { pool: String },
    #[error("pool {pool}: the lock was taken by another controller; stopping")]
    LockLost { pool: String },
    #[error("unknown cluster {0:?}")]
    UnknownCluster(String),
    #[error("{provider_id} is not a node of cluster {cluster}")]
    NotInCluster {
        cluster: String,
        provider_id: String,
    },
    #[error("no image to create servers from")]
    NoImage,
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// How the controller runs: pool.toml's values and the loop's timing.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pool: String,
    pub standby: u32,
    pub max: u32,
    pub standby_timeout: Duration,
    /// Apply → joined deadline; also how long a `promoting` server left by an earlier
    /// controller may stay unanswered before it is `broken`.
    pub promote_timeout: Duration,
    /// Interval between passes (a promotion wakes the loop at once).
    pub tick: Duration,
    /// A lock not renewed for this long may be taken over.
    pub lock_ttl: Duration,
    /// Who holds the lock: a label value (≤ 63 of `[A-Za-z0-9._-]`).
    pub holder: String,
    pub clusters: Vec<ClusterConfig>,
}

impl Settings {
    pub fn from_config(c: &PoolConfig) -> Settings {
        Settings {
            pool: c.name.clone(),
            standby: c.standby,
            max: c.max,
            standby_timeout: c.standby_timeout,
            promote_timeout: Duration::from_secs(120),
            tick: c.tick,
            lock_ttl: c.lock_ttl,
            holder: holder_id(),
            clusters: c.clusters.clone(),
        }
    }
}

/// `<host>-<pid>-<random>`, cut to a valid label value.
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let raw = format!(
        "{}-{}-{:08x}",
        host.trim(),
        std::process::id(),
        rand::random::<u32>()
    );
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cut = &clean[clean.len().saturating_sub(63)..];
    cut.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// What a promotion did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PromoteReport {
    /// Provider ids of the servers that joined.
    pub promoted: Vec<String>,
    /// Standbys that failed (server name, why); each is `broken` now.
    pub failed: Vec<(String, String)>,
    /// Servers created cold for the rest; they join when booted.
    pub cold: u32,
    /// What could be neither promoted nor created (`max` reached, or no image).
    pub unmet: u32,
    /// Standbys labelled `promoting` whose label answer was lost and could not be
    /// checked: the next reconcile pass promotes them (they count toward the target).
    pub deferred: u32,
}

/// Standbys claimed for one promotion.
#[derive(Default)]
struct Claimed {
    labelled: Vec<Server>,
    deferred: u32,
}

/// A node of a cluster, as the autoscaler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub provider_id: String,
    pub name: String,
    /// `creating` (a cold start for this cluster), `promoting`, `active` or `broken`.
    pub state: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerStatus {
    pub id: String,
    pub name: String,
    pub provider_id: String,
    /// The state label (`unknown` when missing or unrecognised).
    pub state: String,
    pub cluster: Option<String>,
    pub image: Option<String>,
    /// Not on the newest image (standbys are replaced; active nodes only reported).
    pub outdated: bool,
    pub age_seconds: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    pub pool: String,
    pub provider: String,
    pub standby_target: u32,
    pub max: u32,
    pub newest_image: Option<String>,
    pub servers: Vec<ServerStatus>,
    /// Per cluster: servers created cold by the last promotion that found too few standbys.
    pub cold_starts: BTreeMap<String, u32>,
    pub last_pass_error: Option<String>,
}

/// What one pass did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub steps: Vec<Step>,
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Claims {
    /// Servers a promotion of this controller works on.
    in_flight: BTreeSet<String>,
    /// Standbys being deleted as surplus: not to be claimed.
    doomed: BTreeSet<String>,
}

pub struct Controller<P: Provider, N: Nodes> {
    provider: P,
    nodes: N,
    ca: Ca,
    settings: Settings,
    claims: Mutex<Claims>,
    /// Creates are counted against `max` from a fresh list, one batch at a time.
    create_gate: tokio::sync::Mutex<u64>,
    /// One reconcile pass at a time.
    pass_gate: tokio::sync::Mutex<()>,
    errors: Mutex<BTreeMap<String, String>>,
    cold_starts: Mutex<BTreeMap<String, u32>>,
    last_pass_error: Mutex<Option<String>>,
    /// Image id → created, from the last listing (orders standbys for promotion).
    image_times: Mutex<BTreeMap<String, SystemTime>>,
    wake: tokio::sync::Notify,
    metrics: Metrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> String {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .to_string()
}

/// `labels` with the state (and its time) set, and the cluster when given.
fn relabel(
    labels: &BTreeMap<String, String>,
    state: ServerState,
    cluster: Option<&str>,
) -> BTreeMap<String, String> {
    let mut l = labels.clone();
    l.insert(LABEL_STATE.into(), state.as_str().into());
    l.insert(LABEL_SINCE.into(), unix_now());
    if let Some(c) = cluster {
        l.insert(LABEL_CLUSTER.into(), c.into());
    }
    l
}

fn cluster_of(s: &Server) -> Option<&str> {
    s.labels.get(LABEL_CLUSTER).map(String::as_str)
}

impl<P: Provider, N: Nodes> Controller<P, N> {
    /// Takes the pool's lock and returns the controller; [`ControllerError::LockHeld`]
    /// while another controller's lock is fresh.
    pub async fn start(
        provider: P,
        nodes: N,
        ca: Ca,
        settings: Settings,
    ) -> Result<Controller<P, N>, ControllerError> {
        let c = Controller {
            provider,
            nodes,
            ca,
            settings,
            claims: Mutex::default(),
            create_gate: tokio::sync::Mutex::new(0),
            pass_gate: tokio::sync::Mutex::new(()),
            errors: Mutex::default(),
            cold_starts: Mutex::default(),
            last_pass_error: Mutex::default(),
            image_times: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            metrics: Metrics::new(),
        };
        if !c.take_lock().await? {
            return Err(ControllerError::LockHeld {
                pool: c.settings.pool.clone(),
            });
        }
        Ok(c)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn provider(&self) -> &P {
        &self.provider
    }

    /// The cluster whose autoscaler's client certificate is named `client_name`.
    pub fn cluster_for_client(&self, client_name: &str) -> Option<&str> {
        self.settings
            .clusters
            .iter()
            .find(|c| c.client_name == client_name)
            .map(|c| c.name.as_str())
    }

    fn cluster(&self, name: &str) -> Result<&ClusterConfig, ControllerError> {
        self.settings
            .clusters
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ControllerError::UnknownCluster(name.into()))
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// Reconciles every `tick` (and at once after a promotion) until `stop`; returns an
    /// error only when the lock is lost.
    pub async fn run(&self, stop: CancellationToken) -> Result<(), ControllerError> {
        loop {
            match self.reconcile().await {
                Err(e @ ControllerError::LockLost { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(pool = %self.settings.pool, "reconcile: {e}");
                    *lock(&self.last_pass_error) = Some(e.to_string());
                }
                Ok(r) => {
                    *lock(&self.last_pass_error) = r.errors.first().cloned();
                }
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.settings.tick) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    // ---- provider and node calls, counted ----

    async fn counted<T>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let r = f.await;
        self.metrics
            .call("provider", op, r.as_ref().is_err_and(|e| e.transient));
        r
    }

    async fn take_lock(&self) -> Result<bool, ControllerError> {
        let s = &self.settings;
        Ok(self
            .counted("lock", self.provider.lock(&s.pool, &s.holder, s.lock_ttl))
            .await?)
    }

    async fn list(&self) -> Result<Vec<Server>, ProviderError> {
        self.counted("servers", self.provider.servers(&self.settings.pool))
            .await
    }

    async fn set_state(
        &self,
        s: &Server,
        state: ServerState,
        cluster: Option<&str>,
    ) -> Result<(), ProviderError> {
        let labels = relabel(&s.labels, state, cluster);
        self.counted("set_labels", self.provider.set_labels(&s.id, &labels))
            .await
    }

    fn note_error(&self, id: &str, what: impl Into<String>) {
        let what = what.into();
        tracing::warn!(pool = %self.settings.pool, server = id, "{what}");
        lock(&self.errors).insert(id.to_owned(), what);
    }

    async fn join_seen(&self, s: &Server) -> JoinSeen {
        let r = self.nodes.status(s).await;
        self.metrics.call("node", "status", r.is_err());
        match r {
            // Only a registered node has joined: an agent that started has not yet shown
            // that the server takes its token's password, and one that crash-loops
            // never will with this config.
            Ok(st) => match st.join.state {
                JoinState::Registered => JoinSeen::Joined,
                JoinState::Joining | JoinState::AgentStarted => JoinSeen::Joining,
                JoinState::Standby => JoinSeen::Standby,
                JoinState::Failed | JoinState::CrashLooping => JoinSeen::Failed(
                    st.join
                        .last_error
                        .unwrap_or_else(|| "no reason given".into()),
                ),
            },
            Err(e) => JoinSeen::Unreachable(e.to_string()),
        }
    }

    // ---- one reconcile pass ----

    /// One pass: renew the lock, list, ask the nodes, plan, carry the plan out.
    pub async fn reconcile(&self) -> Result<PassReport, ControllerError> {
        let _pass = self.pass_gate.lock().await;
        if !self.take_lock().await? {
            return Err(ControllerError::LockLost {
                pool: self.settings.pool.clone(),
            });
        }
        let servers = self.list().await?;
        let images = self.counted("images", self.provider.images()).await?;
        let times: BTreeMap<String, SystemTime> =
            images.iter().map(|i| (i.id.clone(), i.created)).collect();
        *lock(&self.image_times) = times.clone();
        self.count_states(&servers);
        let in_flight = lock(&self.claims).in_flight.clone();
        let (ready, promoting) = self.observe(&servers, &in_flight).await;
        let steps = plan(&PlanInput {
            servers: &servers,
            images: &times,
            newest_image: images.first().map(|i| i.id.as_str()),
            now: SystemTime::now(),
            standby: self.settings.standby,
            max: self.settings.max,
            standby_timeout: self.settings.standby_timeout,
            promote_timeout: self.settings.promote_timeout,
            ready: &ready,
            promoting: &promoting,
            in_flight: &in_flight,
        });
        let mut report = PassReport {
            steps: steps.clone(),
            errors: Vec::new(),
        };
        self.execute(&servers, steps, &mut report).await;
        Ok(report)
    }

    fn count_states(&self, servers: &[Server]) {
        for st in ServerState::ALL {
            let n = servers.iter().filter(|s| s.state() == Some(st)).count();
            self.metrics.set_servers(st.as_str(), n);
        }
        let unknown = servers.iter().filter(|s| s.state().is_none()).count();
        self.metrics.set_servers("unknown", unknown);
    }

    /// Asks the node APIs of `creating` and unattended `promoting` servers.
    async fn observe(
        &self,
        servers: &[Server],
        in_flight: &BTreeSet<String>,
    ) -> (BTreeSet<String>, BTreeMap<String, JoinSeen>) {
        let asked: Vec<&Server> = servers
            .iter()
            .filter(|s| !in_flight.contains(&s.id))
            .filter(|s| {
                matches!(
                    s.state(),
                    Some(ServerState::Creating | ServerState::Promoting)
                )
            })
            .collect();
        let seen = futures_util::future::join_all(asked.iter().map(|s| self.join_seen(s))).await;
        let mut ready = BTreeSet::new();
        let mut promoting = BTreeMap::new();
        for (s, seen) in asked.into_iter().zip(seen) {
            match s.state() {
                Some(ServerState::Creating) if seen == JoinSeen::Standby => {
                    ready.insert(s.id.clone());
                }
                Some(ServerState::Promoting) => {
                    promoting.insert(s.id.clone(), seen);
                }
                _ => {}
            }
        }
        (ready, promoting)
    }

    async fn execute(&self, servers: &[Server], steps: Vec<Step>, report: &mut PassReport) {
        let by_id: BTreeMap<&str, &Server> = servers.iter().map(|s| (s.id.as_str(), s)).collect();
        let mut creates = 0u32;
        for step in steps {
            let r = match &step {
                Step::Create => {
                    creates += 1;
                    continue;
                }
                Step::Delete { id, reason } => self.delete_step(id, *reason).await,
                Step::MarkStandby { id } => match by_id.get(id.as_str()) {
                    Some(s) => self.mark_standby(s).await,
                    None => Ok(()),
                },
                Step::Promote { id, cluster } => match by_id.get(id.as_str()) {
                    Some(s) => self.promote_claimed(s, cluster).await,
                    None => Ok(()),
                },
                Step::MarkActive { id } => match by_id.get(id.as_str()) {
                    Some(s) => self.set_state(s, ServerState::Active, None).await,
                    None => Ok(()),
                },
                Step::MarkBroken { id, reason } => match by_id.get(id.as_str()) {
                    Some(s) => {
                        self.note_error(id, reason.clone());
                        self.metrics.failure("promote");
                        self.set_state(s, ServerState::Broken, None).await
                    }
                    None => Ok(()),
                },
            };
            if let Err(e) = r {
                report.errors.push(format!("{step:?}: {e}"));
            }
        }
        if creates > 0 {
            if let Err(e) = self.create_servers(creates, None).await {
                report.errors.push(format!("create: {e}"));
            }
        }
    }

    async fn mark_standby(&self, s: &Server) -> Result<(), ProviderError> {
        self.set_state(s, ServerState::Standby, None).await?;
        if let Ok(took) = SystemTime::now().duration_since(s.created) {
            self.metrics.reached_standby(took);
        }
        lock(&self.errors).remove(&s.id);
        Ok(())
    }

    async fn delete_step(&self, id: &str, reason: DeleteReason) -> Result<(), ProviderError> {
        if reason == DeleteReason::Surplus {
            let mut claims = lock(&self.claims);
            if claims.in_flight.contains(id) {
                return Ok(()); // claimed since the list: not a standby any more
            }
            claims.doomed.insert(id.to_owned());
        }
        if reason != DeleteReason::Surplus {
            self.metrics.failure(reason.as_str());
        }
        let r = self.counted("delete", self.provider.delete(id)).await;
        lock(&self.claims).doomed.remove(id);
        if r.is_ok() {
            lock(&self.errors).remove(id);
        }
        r
    }

    // ---- creating ----

    /// Creates up to `n` servers on the newest image (claimed for `cluster` when given),
    /// never more than `max` counting every server of the pool. Returns how many.
    pub async fn create_servers(
        &self,
        n: u32,
        cluster: Option<&str>,
    ) -> Result<u32, ControllerError> {
        let mut generation = self.create_gate.lock().await;
        let servers = self.list().await?;
        let images = self.counted("images", self.provider.images()).await?;
        let image = images.first().ok_or(ControllerError::NoImage)?;
        let listed_max = servers
            .iter()
            .filter_map(|s| s.labels.get(LABEL_GENERATION)?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        *generation = (*generation).max(listed_max);
        let room = self.settings.max.saturating_sub(servers.len() as u32);
        let mut made = 0;
        for _ in 0..n.min(room) {
            *generation += 1;
            match self.create_one(&image.id, *generation, cluster).await {
                Ok(_) => made += 1,
                Err(e) => {
                    // It may exist all the same: stop here, the next pass counts it.
                    self.metrics.failure("create");
                    return if made > 0 {
                        tracing::warn!(pool = %self.settings.pool, "create: {e}");
                        Ok(made)
                    } else {
                        Err(e)
                    };
                }
            }
        }
        Ok(made)
    }

    async fn create_one(
        &self,
        image: &str,
        generation: u64,
        cluster: Option<&str>,
    ) -> Result<Server, ControllerError> {
        let pool = &self.settings.pool;
        let name = format!("{pool}-{generation}-{:04x}", rand::random::<u16>());
        // Its promotion's CA check prepared ahead: the one cluster it is made for, or
        // any of the pool's.
        let clusters: Vec<&ClusterConfig> = self
            .settings
            .clusters
            .iter()
            .filter(|c| cluster.is_none_or(|name| c.name == name))
            .collect();
        let user_data = standby_config(&self.ca, &name, &clusters).map_err(|e| ProviderError {
            provider: self.provider.kind(),
            what: e.to_string(),
            transient: false,
        })?;
        let mut labels = BTreeMap::from([
            (LABEL_POOL.to_owned(), pool.clone()),
            (
                LABEL_STATE.to_owned(),
                ServerState::Creating.as_str().to_owned(),
            ),
            (LABEL_IMAGE.to_owned(), image.to_owned()),
            (LABEL_GENERATION.to_owned(), generation.to_string()),
            (LABEL_SINCE.to_owned(), unix_now()),
        ]);
        if let Some(c) = cluster {
            labels.insert(LABEL_CLUSTER.into(), c.into());
        }
        let req = CreateServer {
            name,
            image: image.to_owned(),
            labels,
            user_data,
        };
        let s = self.counted("create", self.provider.create(&req)).await?;
        tracing::info!(pool = %pool, server = %s.name, cluster, "created");
        Ok(s)
    }

    // ---- promoting ----

    /// Promotes `n` standbys into `cluster`: healthy standbys newest image first, each
    /// labelled `promoting` before its join config is applied, `active` once joined; a
    /// failing one is `broken` and the next is tried. What no standby can serve is
    /// created cold (claimed for the cluster) within `max`.
    pub async fn promote(&self, cluster: &str, n: u32) -> Result<PromoteReport, ControllerError> {
        let cl = self.cluster(cluster)?.clone();
        let started = Instant::now();
        let mut report = PromoteReport::default();
        let mut remaining = n;
        while remaining > 0 {
            let Claimed {
                labelled: batch,
                deferred,
            } = self.claim(&cl.name, remaining).await?;
            remaining -= deferred;
            report.deferred += deferred;
            if batch.is_empty() {
                if deferred > 0 {
                    continue;
                }
                break;
            }
            let results =
                futures_util::future::join_all(batch.iter().map(|s| self.promote_one(s, &cl)))
                    .await;
            for (s, r) in batch.iter().zip(results) {
                lock(&self.claims).in_flight.remove(&s.id);
                match r {
                    Ok(()) => {
                        remaining -= 1;
                        self.metrics.promoted("warm", started.elapsed());
                        report.promoted.push(self.provider.provider_id(s));
                    }
                    Err(e) => report.failed.push((s.name.clone(), e)),
                }
            }
        }
        if remaining > 0 {
            report.cold = match self.create_servers(remaining, Some(&cl.name)).await {
                Ok(made) => made,
                Err(ControllerError::NoImage) => 0,
                Err(e) => return Err(e),
            };
            report.unmet = remaining - report.cold;
        }
        lock(&self.cold_starts).insert(cl.name.clone(), report.cold);
        self.wake.notify_one();
        Ok(report)
    }

    /// Picks up to `k` free standbys, newest image first, and labels them `promoting`
    /// for `cluster`. They stay in flight until the caller releases them.
    async fn claim(&self, cluster: &str, k: u32) -> Result<Claimed, ControllerError> {
        let servers = self.list().await?;
        let times = lock(&self.image_times).clone();
        let image_time = |s: &Server| {
            s.labels
                .get(LABEL_IMAGE)
                .and_then(|i| times.get(i))
                .copied()
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        let picked: Vec<Server> = {
            let mut claims = lock(&self.claims);
            let mut free: Vec<&Server> = servers
                .iter()
                .filter(|s| s.state() == Some(ServerState::Standby) && cluster_of(s).is_none())
                .filter(|s| !claims.in_flight.contains(&s.id) && !claims.doomed.contains(&s.id))
                .collect();
            free.sort_by_key(|s| std::cmp::Reverse((image_time(s), s.created)));
            let picked: Vec<Server> = free.into_iter().take(k as usize).cloned().collect();
            claims.in_flight.extend(picked.iter().map(|s| s.id.clone()));
            picked
        };
        let mut claimed = Claimed::default();
        for s in picked {
            let Err(e) = self
                .set_state(&s, ServerState::Promoting, Some(cluster))
                .await
            else {
                claimed.labelled.push(s);
                continue;
            };
            self.note_error(&s.id, format!("label promoting: {e}"));
            // The label may have landed all the same (a lost answer): look before
            // claiming another standby for the same demand.
            match self.labelled_for(&s.id, cluster).await {
                Some(true) => claimed.labelled.push(s),
                Some(false) => {
                    lock(&self.claims).in_flight.remove(&s.id);
                }
                None => {
                    // Unknown: leave it to the next pass, which resolves a `promoting`
                    // server for its cluster; do not take another one for it.
                    lock(&self.claims).in_flight.remove(&s.id);
                    claimed.deferred += 1;
                }
            }
        }
        Ok(claimed)
    }

    /// Whether server `id` is labelled promoting for `cluster` (`None`: cannot tell).
    async fn labelled_for(&self, id: &str, cluster: &str) -> Option<bool> {
        let servers = self.list().await.ok()?;
        Some(servers.iter().any(|s| {
            s.id == id
                && s.state() == Some(ServerState::Promoting)
                && cluster_of(s) == Some(cluster)
        }))
    }

    /// Promotes a claimed server that a pass found ready (a cold start for `cluster`, or
    /// a promotion an earlier controller began).
    async fn promote_claimed(&self, s: &Server, cluster: &str) -> Result<(), ProviderError> {
        let Ok(cl) = self.cluster(cluster).cloned() else {
            self.note_error(&s.id, format!("cluster {cluster:?} is not in pool.toml"));
            return self.set_state(s, ServerState::Broken, None).await;
        };
        if !lock(&self.claims).in_flight.insert(s.id.clone()) {
            return Ok(());
        }
        let r = async {
            if s.state() != Some(ServerState::Promoting) {
                self.set_state(s, ServerState::Promoting, Some(cluster))
                    .await?;
            }
            if self.promote_one(s, &cl).await.is_ok() {
                if let Ok(took) = SystemTime::now().duration_since(s.created) {
                    self.metrics.promoted("cold", took);
                }
            }
            Ok(())
        }
        .await;
        lock(&self.claims).in_flight.remove(&s.id);
        r
    }

    /// Join config → applied → joined → `active`. On failure the server is `broken`.
    async fn promote_one(&self, s: &Server, cl: &ClusterConfig) -> Result<(), String> {
        match self.join(s, cl).await {
            Ok(()) => {
                lock(&self.errors).remove(&s.id);
                if let Err(e) = self.set_state(s, ServerState::Active, Some(&cl.name)).await {
                    // Joined all the same; the next pass asks the node and labels it.
                    self.note_error(&s.id, format!("label active: {e}"));
                }
                Ok(())
            }
            Err(e) => {
                self.note_error(&s.id, format!("promote into {}: {e}", cl.name));
                self.metrics.failure("promote");
                if let Err(le) = self.set_state(s, ServerState::Broken, Some(&cl.name)).await {
                    self.note_error(&s.id, format!("promote: {e}; label broken: {le}"));
                }
                Err(e)
            }
        }
    }

    async fn join(&self, s: &Server, cl: &ClusterConfig) -> Result<(), String> {
        if let Some(net) = &cl.network {
            self.counted("attach_network", self.provider.attach_network(&s.id, net))
                .await
                .map_err(|e| e.to_string())?;
        }
        let provider_id = self.provider.provider_id(s);
        let config = join_config(&self.ca, &s.name, cl, &provider_id).map_err(|e| e.to_string())?;
        let r = self.nodes.apply(s, config).await;
        self.metrics.call("node", "apply", r.is_err());
        let resp = r.map_err(|e| e.to_string())?;
        if !resp.applied {
            return Err(resp.message);
        }
        self.wait_joined(s, resp.join.state, resp.join.last_error)
            .await
    }

    async fn wait_joined(
        &self,
        s: &Server,
        mut state: JoinState,
        mut last_error: Option<String>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + self.settings.promote_timeout;
        loop {
            match state {
                JoinState::Registered => return Ok(()),
                JoinState::Failed | JoinState::CrashLooping => {
                    return Err(last_error.unwrap_or_else(|| "the join failed".into()))
                }
                JoinState::Standby | JoinState::Joining | JoinState::AgentStarted => {}
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not joined within {:?}",
                    self.settings.promote_timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.join_seen(s).await {
                JoinSeen::Joined => state = JoinState::Registered,
                JoinSeen::Failed(e) => {
                    state = JoinState::Failed;
                    last_error = Some(e);
                }
                _ => {}
            }
        }
    }

    // ---- what the autoscaler and the CLI ask ----

    /// Nodes of `cluster` that count toward its size: active, promoting, and cold starts
    /// created for it.
    pub async fn target_size(&self, cluster: &str) -> Result<u32, ControllerError> {
        let nodes = self.nodes(cluster).await?;
        Ok(nodes.iter().filter(|n| n.state != "broken").count() as u32)
    }

    /// Every server that belongs to `cluster` (and only those), with provider ids.
    pub async fn nodes(&self, cluster: &str) -> Result<Vec<NodeInfo>, ControllerError> {
        self.cluster(cluster)?;
        let servers = self.list().await?;
        let errors = lock(&self.errors).clone();
        Ok(servers
            .iter()
            .filter(|s| cluster_of(s) == Some(cluster))
            .map(|s| NodeInfo {
                provider_id: self.provider.provider_id(s),
                name: s.name.clone(),
                state: s.state().map_or("unknown", ServerState::as_str).to_owned(),
                last_error: errors.get(&s.id).cloned(),
            })
            .collect())
    }

    /// Deletes the servers with these provider ids, all of which must belong to
    /// `cluster`: a request naming any other server is refused before anything is
    /// deleted. Returns the provider ids deleted.
    pub async fn delete_nodes(
        &self,
        cluster: &str,
        provider_ids: &[String],
    ) -> Result<Vec<String>, ControllerError> {
        self.cluster(cluster)?;
        let servers = self.list().await?;
        let mut doomed = Vec::new();
        for pid in provider_ids {
            let found = servers
                .iter()
                .find(|s| self.provider.provider_id(s) == *pid && cluster_of(s) == Some(cluster));
            match found {
                Some(s) => doomed.push(s),
                None => {
                    return Err(ControllerError::NotInCluster {
                        cluster: cluster.into(),
                        provider_id: pid.clone(),
                    })
                }
            }
        }
        let mut deleted = Vec::new();
        for s in doomed {
            self.counted("delete", self.provider.delete(&s.id)).await?;
            tracing::info!(pool = %self.settings.pool, server = %s.name, cluster, "deleted on request");
            deleted.push(self.provider.provider_id(s));
        }
        self.wake.notify_one();
        Ok(deleted)
    }

    /// Every server of the pool with its state, image, age and last error.
    pub async fn status(&self) -> Result<PoolStatus, ControllerError> {
        let servers = self.list().await?;
        let images = self.counted("images", self.provider.images()).await?;
        let newest = images.first().map(|i| i.id.clone());
        let errors = lock(&self.errors).clone();
        let now = SystemTime::now();
        let list = servers
            .iter()
            .map(|s| {
                let image = s.labels.get(LABEL_IMAGE).cloned();
                ServerStatus {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    provider_id: self.provider.provider_id(s),
                    state: s.state().map_or("unknown", ServerState::as_str).to_owned(),
                    cluster: cluster_of(s).map(str::to_owned),
                    outdated: newest.is_some() && image != newest,
                    image,
                    age_seconds: now.duration_since(s.created).map_or(0, |d| d.as_secs()),
                    last_error: errors.get(&s.id).cloned(),
                }
            })
            .collect();
        Ok(PoolStatus {
            pool: self.settings.pool.clone(),
            provider: self.provider.kind().to_owned(),
            standby_target: self.settings.standby,
            max: self.settings.max,
            newest_image: newest,
            servers: list,
            cold_starts: lock(&self.cold_starts).clone(),
            last_pass_error: lock(&self.last_pass_error).clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_ids_are_label_values() {
        let h = holder_id();
        assert!(!h.is_empty() && h.len() <= 63, "{h}");
        assert!(
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{h}"
        );
        assert_ne!(h, holder_id());
    }

    #[test]
    fn relabel_keeps_the_pool_and_sets_state_and_cluster() {
        let base = BTreeMap::from([
            (LABEL_POOL.to_owned(), "p".to_owned()),
            (LABEL_STATE.to_owned(), "standby".to_owned()),
        ]);
        let l = relabel(&base, ServerState::Promoting, Some("a"));
        assert_eq!(l[LABEL_POOL], "p");
        assert_eq!(l[LABEL_STATE], "promoting");
        assert_eq!(l[LABEL_CLUSTER], "a");
        assert!(l[LABEL_SINCE].parse::<u64>().is_ok());
    }
}
