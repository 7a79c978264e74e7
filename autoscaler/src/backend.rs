//! What the gRPC server asks of the pool: [`NodeGroupBackend`], which the pool controller
//! implements. The server checks who is asking and which group they may touch; the backend
//! acts for one named cluster at a time.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// A failure of the backend, mapped to a gRPC status by the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// A node or group that does not exist (NOT_FOUND).
    #[error("not found: {0}")]
    NotFound(String),
    /// A request the backend refuses as malformed (INVALID_ARGUMENT).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// A request that would pass a limit, such as the pool's `max` (RESOURCE_EXHAUSTED).
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// A request that cannot be met in the current state, such as a decrease that would
    /// delete existing nodes (FAILED_PRECONDITION).
    #[error("not possible now: {0}")]
    FailedPrecondition(String),
    /// The provider (cloud API, VMs) could not be reached or failed transiently; the
    /// autoscaler retries (UNAVAILABLE).
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// Anything else (INTERNAL).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where an instance of a node group is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Joined (or joining) the cluster: the pool's `active` servers.
    Running,
    /// Asked for and not yet there: a standby being promoted, or a server created cold.
    Creating,
    /// Being deleted.
    Deleting,
}

/// The autoscaler's classes of instance errors (its `InstanceErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceErrorClass {
    /// The provider is out of capacity or quota (1).
    OutOfResources,
    /// Any other failure (99).
    Other,
}

impl InstanceErrorClass {
    /// The number the protocol carries.
    pub fn code(self) -> i32 {
        match self {
            InstanceErrorClass::OutOfResources => 1,
            InstanceErrorClass::Other => 99,
        }
    }
}

/// Why an instance failed, reported to the autoscaler so that it can back off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceError {
    pub class: InstanceErrorClass,
    /// A short machine-readable code, e.g. `promote-failed`. Must not be empty.
    pub code: String,
    pub message: String,
}

/// One instance of a node group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The Node's `spec.providerID`: `hcloud://<server id>` or `basalt-qemu://<name>`.
    pub provider_id: String,
    pub state: InstanceState,
    pub error: Option<InstanceError>,
}

/// A taint on the template node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// What a new node of a cluster's group looks like, for scale-from-zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTemplate {
    /// The labels applied at promotion. The server adds `kubernetes.io/os=linux`,
    /// `kubernetes.io/arch` and `kubernetes.io/hostname` unless given here.
    pub labels: BTreeMap<String, String>,
    /// The taints applied at promotion.
    pub taints: Vec<Taint>,
    /// CPU cores, as a Kubernetes quantity (e.g. `"2"`).
    pub cpu: String,
    /// Memory, as a Kubernetes quantity (e.g. `"3838Mi"`).
    pub memory: String,
    /// The kubelet's pod limit (e.g. 110).
    pub pods: u32,
    /// `kubernetes.io/arch` (e.g. `amd64`).
    pub arch: String,
}

/// Per-group changes to the autoscaler's own options; `None` keeps the autoscaler's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptionOverrides {
    pub scale_down_utilization_threshold: Option<f64>,
    pub scale_down_gpu_utilization_threshold: Option<f64>,
    pub scale_down_unneeded: Option<Duration>,
    pub scale_down_unready: Option<Duration>,
    /// How long the autoscaler waits for a new node to register. A warm promote takes
    /// seconds; a cold start (no standby left) takes minutes.
    pub max_node_provision: Option<Duration>,
    pub max_node_startup: Option<Duration>,
}

/// The pool, as the gRPC server sees it. Every call names the cluster it acts for; the
/// server has already checked that the caller is that cluster's autoscaler.
///
/// The methods return `Send` futures so that the server can run them on any tokio worker;
/// an implementation writes them as `async fn`.
pub trait NodeGroupBackend: Send + Sync + 'static {
    /// The cluster's target size: active plus promoting (or creating) nodes.
    fn target_size(&self, cluster: &str) -> impl Future<Output = Result<u32, BackendError>> + Send;

    /// Adds `delta` (at least 1) nodes to the cluster: promotes standbys, creates the rest
    /// cold. Returns once the target size includes them.
    ///
    /// The server refuses a delta that would take [`Self::target_size`] above the group's
    /// max, but two calls at once can both pass that check: the backend enforces its own
    /// limits (the group's max, the pool's `max`) and answers
    /// [`BackendError::LimitReached`].
    fn increase_size(
        &self,
        cluster: &str,
        delta: u32,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Deletes these nodes of the cluster (by provider id). The server has checked that
    /// each belongs to `cluster`; the backend must not delete any that does not.
    fn delete_nodes(
        &self,
        cluster: &str,
        provider_ids: Vec<String>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Lowers the target by `delta` (at least 1) without deleting a node that exists.
    fn decrease_target_size(
        &self,
        cluster: &str,
        delta: u32,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The cluster's instances.
    fn nodes(
        &self,
        cluster: &str,
    ) -> impl Future<Output = Result<Vec<Instance>, BackendError>> + Send;

    /// The cluster a node (by provider id) belongs to; `None` if it is no node of this
    /// pool's clusters (a standby, another pool's, or unknown).
    fn cluster_of(
        &self,
        provider_id: &str,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send;

    /// Called at the start of every autoscaler loop: a chance to re-read the provider.
    fn refresh(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The template node of the cluster's group; `None` if none is configured (the
    /// server then answers Unimplemented, and the autoscaler cannot scale the group from
    /// zero).
    fn template(
        &self,
        cluster: &str,
    ) -> impl Future<Output = Result<Option<NodeTemplate>, BackendError>> + Send;

    /// Overrides of the autoscaler's per-group options. The default changes nothing.
    fn options(&self, _cluster: &str) -> OptionOverrides {
        OptionOverrides::default()
    }
}
