//! Test doubles (feature `testing`): an in-memory provider and a node API double. They are
//! doubles, not providers: [`MemoryProvider`] keeps servers and labels in a map and can
//! stop ("freeze") right after an operation, to stand for a controller killed there;
//! [`FakeNodes`] answers as basalt-init's node API does (standby until a join config is
//! applied, then joined or failed; a second join config for another cluster refused), and
//! parses every config it is sent with the real machine-config parser.

use crate::nodes::{NodeApiError, Nodes};
use crate::provider::{CreateServer, Image, Provider, ProviderError, Server, LABEL_POOL};
use basalt_api::config::MachineConfig;
use basalt_api::node::{
    ApplyResponse, Health, JoinState, JoinStatus, MilestoneTime, Status, Versions,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the provider double stops answering, forever, after doing the work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freeze {
    /// After labels with this `basalt.io/state` value were set.
    AfterLabel(String),
    /// After a server was created.
    AfterCreate,
}

#[derive(Default)]
struct MemState {
    servers: BTreeMap<String, Server>,
    images: Vec<Image>,
    next: u64,
    lock: Option<(String, Instant)>,
    freeze: Option<Freeze>,
    frozen: bool,
    fail_next: BTreeMap<&'static str, u32>,
    peak: usize,
    created: Vec<String>,
    deleted: Vec<String>,
}

/// An in-memory provider; clones share the same servers (one "cloud").
#[derive(Clone, Default)]
pub struct MemoryProvider {
    state: Arc<Mutex<MemState>>,
}

impl MemoryProvider {
    pub fn new() -> MemoryProvider {
        MemoryProvider::default()
    }

    /// Adds an image created `age` ago.
    pub fn add_image(&self, id: &str, age: Duration) {
        let mut st = guard(&self.state);
        st.images.push(Image {
            id: id.into(),
            created: SystemTime::now() - age,
            version: None,
        });
        st.images.sort_by_key(|i| std::cmp::Reverse(i.created));
    }

    /// Every server now.
    pub fn servers_now(&self) -> Vec<Server> {
        guard(&self.state).servers.values().cloned().collect()
    }

    /// The most servers that ever existed at once.
    pub fn peak(&self) -> usize {
        guard(&self.state).peak
    }

    /// Names of every server ever created, and ids of every one deleted.
    pub fn history(&self) -> (Vec<String>, Vec<String>) {
        let st = guard(&self.state);
        (st.created.clone(), st.deleted.clone())
    }

    pub fn freeze(&self, at: Freeze) {
        let mut st = guard(&self.state);
        st.freeze = Some(at);
        st.frozen = false;
    }

    /// Whether the freeze point was reached.
    pub fn frozen(&self) -> bool {
        guard(&self.state).frozen
    }

    /// Unfreezes (a new controller on the same cloud).
    pub fn thaw(&self) {
        let mut st = guard(&self.state);
        st.freeze = None;
        st.frozen = false;
    }

    /// The next `n` calls of `op` (`create`, `set_labels`, `delete`, `servers`) fail
    /// transiently, before doing anything.
    pub fn fail_next(&self, op: &'static str, n: u32) {
        guard(&self.state).fail_next.insert(op, n);
    }

    /// Drops the lock's heartbeat into the past (as if its holder died `age` ago).
    pub fn age_lock(&self, age: Duration) {
        if let Some((_, t)) = guard(&self.state).lock.as_mut() {
            *t -= age;
        }
    }

    fn check(&self, op: &'static str) -> Result<(), ProviderError> {
        let mut st = guard(&self.state);
        if let Some(n) = st.fail_next.get_mut(op).filter(|n| **n > 0) {
            *n -= 1;
            return Err(ProviderError {
                provider: "memory",
                what: format!("{op}: injected transient failure"),
                transient: true,
            });
        }
        Ok(())
    }

    /// After the work: never return when this is the freeze point.
    async fn maybe_freeze(&self, point: Freeze) {
        let hit = {
            let mut st = guard(&self.state);
            let hit = st.freeze.as_ref() == Some(&point);
            if hit {
                st.frozen = true;
            }
            hit
        };
        if hit {
            std::future::pending::<()>().await;
        }
    }
}

impl Provider for MemoryProvider {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn provider_id(&self, server: &Server) -> String {
        format!("memory://{}", server.id)
    }

    async fn images(&self) -> Result<Vec<Image>, ProviderError> {
        Ok(guard(&self.state).images.clone())
    }

    async fn servers(&self, pool: &str) -> Result<Vec<Server>, ProviderError> {
        self.check("servers")?;
        Ok(guard(&self.state)
            .servers
            .values()
            .filter(|s| s.labels.get(LABEL_POOL).map(String::as_str) == Some(pool))
            .cloned()
            .collect())
    }

    async fn create(&self, req: &CreateServer) -> Result<Server, ProviderError> {
        self.check("create")?;
        let server = {
            let mut st = guard(&self.state);
            if st.servers.values().any(|s| s.name == req.name) {
                return Err(ProviderError {
                    provider: "memory",
                    what: format!("name {} is taken", req.name),
                    transient: false,
                });
            }
            MachineConfig::parse(&req.user_data).map_err(|e| ProviderError {
                provider: "memory",
                what: format!("user-data is not a machine config: {e}"),
                transient: false,
            })?;
            st.next += 1;
            let s = Server {
                id: st.next.to_string(),
                name: req.name.clone(),
                labels: req.labels.clone(),
                created: SystemTime::now(),
                api: None,
            };
            st.servers.insert(s.id.clone(), s.clone());
            st.created.push(s.name.clone());
            st.peak = st.peak.max(st.servers.len());
            s
        };
        self.maybe_freeze(Freeze::AfterCreate).await;
        Ok(server)
    }

    async fn set_labels(
        &self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        self.check("set_labels")?;
        let state = {
            let mut st = guard(&self.state);
            let Some(s) = st.servers.get_mut(id) else {
                return Err(ProviderError {
                    provider: "memory",
                    what: format!("server {id} not found"),
                    transient: false,
                });
            };
            s.labels = labels.clone();
            labels.get(crate::provider::LABEL_STATE).cloned()
        };
        if let Some(state) = state {
            self.maybe_freeze(Freeze::AfterLabel(state)).await;
        }
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        self.check("delete")?;
        let mut st = guard(&self.state);
        if st.servers.remove(id).is_some() {
            st.deleted.push(id.to_owned());
        }
        Ok(())
    }

    async fn lock(&self, _pool: &str, holder: &str, ttl: Duration) -> Result<bool, ProviderError> {
        let mut st = guard(&self.state);
        match &st.lock {
            Some((h, t)) if h != holder && t.elapsed() < ttl => Ok(false),
            _ => {
                st.lock = Some((holder.to_owned(), Instant::now()));
                Ok(true)
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// The K3s server URL of the join config applied, if any.
    joined: Option<String>,
    failed: bool,
    applies: u32,
    provider_id: Option<String>,
}

#[derive(Default)]
struct NodesState {
    nodes: BTreeMap<String, Node>,
    /// Names that never answer (never boot).
    dead: BTreeSet<String>,
    /// Every node whose name starts with one of these fails its join.
    fail_join: BTreeSet<String>,
    /// Nodes boot this long after their first status call.
    first_seen: BTreeMap<String, Instant>,
    boot_time: Duration,
    /// A node answers `joining` this many times before `joined`.
    joining_polls: u32,
    polls: BTreeMap<String, u32>,
}

/// The node API double; clones share the nodes.
#[derive(Clone, Default)]
pub struct FakeNodes {
    state: Arc<Mutex<NodesState>>,
}

impl FakeNodes {
    pub fn new() -> FakeNodes {
        FakeNodes::default()
    }

    /// Nodes answer only `boot_time` after they were first asked.
    pub fn set_boot_time(&self, d: Duration) {
        guard(&self.state).boot_time = d;
    }

    pub fn never_boot(&self, name: &str) {
        guard(&self.state).dead.insert(name.into());
    }

    /// Every node named with this prefix fails its join (say, a bad CA hash).
    pub fn fail_join(&self, name_prefix: &str) {
        guard(&self.state).fail_join.insert(name_prefix.into());
    }

    /// A node reports `joining` this many times before `joined`.
    pub fn set_joining_polls(&self, n: u32) {
        guard(&self.state).joining_polls = n;
    }

    /// The server URL each node joined, by node name.
    pub fn joined(&self) -> BTreeMap<String, String> {
        guard(&self.state)
            .nodes
            .iter()
            .filter_map(|(n, node)| Some((n.clone(), node.joined.clone()?)))
            .collect()
    }

    /// How many join configs each node was sent.
    pub fn applies(&self) -> BTreeMap<String, u32> {
        guard(&self.state)
            .nodes
            .iter()
            .map(|(n, node)| (n.clone(), node.applies))
            .collect()
    }

    /// The kubelet provider id each joined node was given.
    pub fn provider_ids(&self) -> BTreeMap<String, String> {
        guard(&self.state)
            .nodes
            .iter()
            .filter_map(|(n, node)| Some((n.clone(), node.provider_id.clone()?)))
            .collect()
    }

    fn up(&self, name: &str) -> Result<Node, NodeApiError> {
        let mut st = guard(&self.state);
        let down = || NodeApiError::Call {
            server: name.into(),
            message: "connection refused (the double's node is not up)".into(),
        };
        if st.dead.contains(name) {
            return Err(down());
        }
        let boot = st.boot_time;
        let first = *st
            .first_seen
            .entry(name.into())
            .or_insert_with(Instant::now);
        if first.elapsed() < boot {
            return Err(down());
        }
        Ok(st.nodes.entry(name.into()).or_default().clone())
    }

    fn join_status(&self, name: &str, node: &Node) -> JoinStatus {
        let mut st = guard(&self.state);
        let state = match (&node.joined, node.failed) {
            (None, _) => JoinState::Standby,
            (Some(_), true) => JoinState::Failed,
            (Some(_), false) => {
                let polls = st.polls.entry(name.into()).or_insert(0);
                *polls += 1;
                if *polls > st.joining_polls {
                    JoinState::Registered
                } else {
                    JoinState::Joining
                }
            }
        };
        JoinStatus {
            state,
            server: node.joined.clone(),
            last_error: node
                .failed
                .then(|| "the server's CA does not match the token (double)".into()),
        }
    }
}

fn status_of(name: &str, join: JoinStatus) -> Status {
    Status {
        milestones: vec![MilestoneTime {
            name: "standby".into(),
            t: 1.0,
        }],
        slot: "a".into(),
        versions: Versions {
            basalt: "test".into(),
            kernel: "double".into(),
        },
        addresses: vec![],
        hostname: name.into(),
        config_source: Some("metadata".into()),
        config_report: Default::default(),
        services: vec![],
        join,
        steps: vec![],
        rss_kib: None,
        api_cert: None,
        upgrade: None,
    }
}

impl Nodes for FakeNodes {
    async fn health(&self, server: &Server) -> Result<Health, NodeApiError> {
        let node = self.up(&server.name)?;
        Ok(Health {
            status: "ok".into(),
            milestone: if node.joined.is_some() {
                "joined"
            } else {
                "standby"
            }
            .into(),
        })
    }

    async fn status(&self, server: &Server) -> Result<Status, NodeApiError> {
        let node = self.up(&server.name)?;
        let join = self.join_status(&server.name, &node);
        Ok(status_of(&server.name, join))
    }

    async fn apply(&self, server: &Server, config: String) -> Result<ApplyResponse, NodeApiError> {
        self.up(&server.name)?;
        let bad = |message: String| NodeApiError::Call {
            server: server.name.clone(),
            message,
        };
        let c = MachineConfig::parse(&config).map_err(|e| bad(format!("400: {e}")))?;
        let cluster = c.cluster.as_ref().map(|cl| cl.server.as_str().to_owned());
        let node = {
            let mut st = guard(&self.state);
            let fail = st.fail_join.iter().any(|p| server.name.starts_with(p));
            let node = st.nodes.entry(server.name.clone()).or_default();
            if let (Some(had), Some(new)) = (&node.joined, &cluster) {
                if had != new {
                    return Err(bad(format!("409: already joined {had}")));
                }
            }
            node.applies += 1;
            if cluster.is_some() {
                node.joined = cluster;
                node.failed = fail;
                node.provider_id = c
                    .cluster
                    .as_ref()
                    .and_then(|cl| cl.provider_id.as_ref())
                    .map(|p| p.to_string());
            }
            node.clone()
        };
        let join = self.join_status(&server.name, &node);
        Ok(ApplyResponse {
            applied: true,
            source: "state".into(),
            join,
            message: "applied (double)".into(),
            warnings: Vec::new(),
        })
    }
}
