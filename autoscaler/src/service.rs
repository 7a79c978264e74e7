//! The `CloudProvider` gRPC service: checks who calls and which node group they name, then
//! asks the [`NodeGroupBackend`].
//!
//! Each cluster's autoscaler sees exactly one node group, `<pool>-<cluster>`. It cannot name
//! another: a request for any other group id is NOT_FOUND, a node of another cluster (or a
//! standby) is "not managed" in NodeGroupForNode (the group with id ""), and deleting one is
//! PERMISSION_DENIED before the backend is asked to delete anything.

use crate::backend::{BackendError, InstanceState, NodeGroupBackend, NodeTemplate};
use crate::identity::{ClusterIdentity, Identities};
use crate::proto::externalgrpc as pb;
use crate::proto::k8s::io::api::core::v1 as core;
use crate::proto::k8s::io::apimachinery::pkg::api::resource::Quantity;
use crate::proto::k8s::io::apimachinery::pkg::apis::meta::v1 as meta;
use crate::server::PeerIdentity;
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::{Request, Response, Status};

/// The label basalt answers GPULabel with. basalt nodes have no GPUs; the label is never
/// set, so the autoscaler treats every node as a CPU node.
pub const GPU_LABEL: &str = "basalt.io/gpu";

/// The service, generic over the backend.
pub struct CloudProviderService<B> {
    identities: Identities,
    backend: Arc<B>,
}

impl<B> std::fmt::Debug for CloudProviderService<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudProviderService")
            .field("identities", &self.identities)
            .finish_non_exhaustive()
    }
}

impl<B: NodeGroupBackend> CloudProviderService<B> {
    pub fn new(identities: Identities, backend: Arc<B>) -> Self {
        CloudProviderService {
            identities,
            backend,
        }
    }

    /// The cluster whose autoscaler sent this request.
    fn caller<T>(&self, req: &Request<T>) -> Result<&ClusterIdentity, Status> {
        let peer = req.extensions().get::<PeerIdentity>().ok_or_else(|| {
            Status::unauthenticated("no verified client certificate on this connection")
        })?;
        let name = peer
            .cert_name
            .as_ref()
            .map_err(|why| Status::unauthenticated(why.clone()))?;
        self.identities.by_cert_name(name).ok_or_else(|| {
            Status::permission_denied(format!(
                "client certificate {name:?} belongs to no cluster of pool {:?}",
                self.identities.pool()
            ))
        })
    }

    /// The caller's cluster, if `id` is its node group.
    fn own_group<T>(&self, req: &Request<T>, id: &str) -> Result<&ClusterIdentity, Status> {
        let caller = self.caller(req)?;
        if id == self.identities.group_id(&caller.cluster) {
            Ok(caller)
        } else {
            Err(Status::not_found(format!(
                "no node group {id:?} for client {:?}",
                caller.client_cert_name
            )))
        }
    }

    fn group(&self, c: &ClusterIdentity) -> pb::NodeGroup {
        pb::NodeGroup {
            id: self.identities.group_id(&c.cluster),
            // Identities::new checked that max (and so min) fits an i32.
            min_size: i32::try_from(c.min).unwrap_or(i32::MAX),
            max_size: i32::try_from(c.max).unwrap_or(i32::MAX),
            debug: format!(
                "basalt pool {:?}, cluster {:?} (min {}, max {})",
                self.identities.pool(),
                c.cluster,
                c.min,
                c.max
            ),
        }
    }
}

/// The gRPC status for a backend error.
pub fn status(e: BackendError) -> Status {
    match e {
        BackendError::NotFound(m) => Status::not_found(m),
        BackendError::InvalidArgument(m) => Status::invalid_argument(m),
        BackendError::LimitReached(m) => Status::resource_exhausted(m),
        BackendError::FailedPrecondition(m) => Status::failed_precondition(m),
        BackendError::Unavailable(m) => Status::unavailable(m),
        BackendError::Internal(m) => Status::internal(m),
    }
}

fn positive(delta: i32, what: &str) -> Result<u32, Status> {
    u32::try_from(delta).ok().filter(|d| *d > 0).ok_or_else(|| {
        Status::invalid_argument(format!("{what}: delta must be positive, got {delta}"))
    })
}

#[tonic::async_trait]
impl<B: NodeGroupBackend> pb::cloud_provider_server::CloudProvider for CloudProviderService<B> {
    async fn node_groups(
        &self,
        req: Request<pb::NodeGroupsRequest>,
    ) -> Result<Response<pb::NodeGroupsResponse>, Status> {
        let caller = self.caller(&req)?;
        Ok(Response::new(pb::NodeGroupsResponse {
            node_groups: vec![self.group(caller)],
        }))
    }

    async fn node_group_for_node(
        &self,
        req: Request<pb::NodeGroupForNodeRequest>,
    ) -> Result<Response<pb::NodeGroupForNodeResponse>, Status> {
        let caller = self.caller(&req)?;
        let provider_id = req
            .get_ref()
            .node
            .as_ref()
            .map(|n| n.provider_id.as_str())
            .unwrap_or_default();
        let owner = if provider_id.is_empty() {
            None
        } else {
            self.backend.cluster_of(provider_id).await.map_err(status)?
        };
        // Not the caller's: the empty group, which the protocol defines as "not managed".
        let node_group = match owner {
            Some(c) if c == caller.cluster => self.group(caller),
            _ => pb::NodeGroup::default(),
        };
        Ok(Response::new(pb::NodeGroupForNodeResponse {
            node_group: Some(node_group),
        }))
    }

    async fn pricing_node_price(
        &self,
        req: Request<pb::PricingNodePriceRequest>,
    ) -> Result<Response<pb::PricingNodePriceResponse>, Status> {
        self.caller(&req)?;
        Err(Status::unimplemented("basalt offers no pricing model"))
    }

    async fn pricing_pod_price(
        &self,
        req: Request<pb::PricingPodPriceRequest>,
    ) -> Result<Response<pb::PricingPodPriceResponse>, Status> {
        self.caller(&req)?;
        Err(Status::unimplemented("basalt offers no pricing model"))
    }

    async fn gpu_label(
        &self,
        req: Request<pb::GpuLabelRequest>,
    ) -> Result<Response<pb::GpuLabelResponse>, Status> {
        self.caller(&req)?;
        Ok(Response::new(pb::GpuLabelResponse {
            label: GPU_LABEL.to_owned(),
        }))
    }

    async fn get_available_gpu_types(
        &self,
        req: Request<pb::GetAvailableGpuTypesRequest>,
    ) -> Result<Response<pb::GetAvailableGpuTypesResponse>, Status> {
        self.caller(&req)?;
        Ok(Response::new(pb::GetAvailableGpuTypesResponse::default()))
    }

    async fn cleanup(
        &self,
        req: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupResponse>, Status> {
        // The pool outlives any one autoscaler: nothing to release.
        self.caller(&req)?;
        Ok(Response::new(pb::CleanupResponse {}))
    }

    async fn refresh(
        &self,
        req: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        self.caller(&req)?;
        self.backend.refresh().await.map_err(status)?;
        Ok(Response::new(pb::RefreshResponse {}))
    }

    async fn node_group_target_size(
        &self,
        req: Request<pb::NodeGroupTargetSizeRequest>,
    ) -> Result<Response<pb::NodeGroupTargetSizeResponse>, Status> {
        let c = self.own_group(&req, &req.get_ref().id)?;
        let size = self.backend.target_size(&c.cluster).await.map_err(status)?;
        let target_size = i32::try_from(size).map_err(|_| {
            Status::internal(format!("target size {size} does not fit the protocol"))
        })?;
        Ok(Response::new(pb::NodeGroupTargetSizeResponse {
            target_size,
        }))
    }

    async fn node_group_increase_size(
        &self,
        req: Request<pb::NodeGroupIncreaseSizeRequest>,
    ) -> Result<Response<pb::NodeGroupIncreaseSizeResponse>, Status> {
        let c = self.own_group(&req, &req.get_ref().id)?;
        let delta = positive(req.get_ref().delta, "NodeGroupIncreaseSize")?;
        let current = self.backend.target_size(&c.cluster).await.map_err(status)?;
        if u64::from(current) + u64::from(delta) > u64::from(c.max) {
            return Err(Status::invalid_argument(format!(
                "size increase too large: {current} + {delta} is above the group's max {}",
                c.max
            )));
        }
        self.backend
            .increase_size(&c.cluster, delta)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::NodeGroupIncreaseSizeResponse {}))
    }

    async fn node_group_delete_nodes(
        &self,
        req: Request<pb::NodeGroupDeleteNodesRequest>,
    ) -> Result<Response<pb::NodeGroupDeleteNodesResponse>, Status> {
        let c = self.own_group(&req, &req.get_ref().id)?;
        let mut ids = Vec::with_capacity(req.get_ref().nodes.len());
        // Every node is checked before any is deleted.
        for node in &req.get_ref().nodes {
            if node.provider_id.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "node {:?} has no provider id",
                    node.name
                )));
            }
            match self
                .backend
                .cluster_of(&node.provider_id)
                .await
                .map_err(status)?
            {
                Some(owner) if owner == c.cluster => ids.push(node.provider_id.clone()),
                Some(_) => {
                    return Err(Status::permission_denied(format!(
                        "node {:?} ({}) is not in node group {:?}",
                        node.name,
                        node.provider_id,
                        self.identities.group_id(&c.cluster)
                    )))
                }
                None => {
                    return Err(Status::not_found(format!(
                        "node {:?} ({}) is in no node group of this pool",
                        node.name, node.provider_id
                    )))
                }
            }
        }
        if !ids.is_empty() {
            self.backend
                .delete_nodes(&c.cluster, ids)
                .await
                .map_err(status)?;
        }
        Ok(Response::new(pb::NodeGroupDeleteNodesResponse {}))
    }

    async fn node_group_decrease_target_size(
        &self,
        req: Request<pb::NodeGroupDecreaseTargetSizeRequest>,
    ) -> Result<Response<pb::NodeGroupDecreaseTargetSizeResponse>, Status> {
        let c = self.own_group(&req, &req.get_ref().id)?;
        let delta = req.get_ref().delta;
        // The protocol's delta is negative.
        let by = positive(delta.saturating_neg(), "NodeGroupDecreaseTargetSize").map_err(|_| {
            Status::invalid_argument(format!("delta must be negative, got {delta}"))
        })?;
        self.backend
            .decrease_target_size(&c.cluster, by)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::NodeGroupDecreaseTargetSizeResponse {}))
    }

    async fn node_group_nodes(
        &self,
        req: Request<pb::NodeGroupNodesRequest>,
    ) -> Result<Response<pb::NodeGroupNodesResponse>, Status> {
        let c = self.own_group(&req, &req.get_ref().id)?;
        let nodes = self.backend.nodes(&c.cluster).await.map_err(status)?;
        let instances = nodes
            .into_iter()
            .map(|i| {
                let state = match i.state {
                    InstanceState::Running => pb::instance_status::InstanceState::InstanceRunning,
                    InstanceState::Creating => pb::instance_status::InstanceState::InstanceCreating,
                    InstanceState::Deleting => pb::instance_status::InstanceState::InstanceDeleting,
                };
                pb::Instance {
                    id: i.provider_id,
                    status: Some(pb::InstanceStatus {
                        instance_state: state as i32,
                        error_info: i.error.map(|e| pb::InstanceErrorInfo {
                            error_code: e.code,
                            error_message: e.message,
                            instance_error_class: e.class.code(),
                        }),
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::NodeGroupNodesResponse { instances }))
    }

    async fn node_group_template_node_info(
        &self,
        req: Request<pb::NodeGroupTemplateNodeInfoRequest>,
    ) -> Result<Response<pb::NodeGroupTemplateNodeInfoResponse>, Status> {
        let c = self.own_group(&req, &req.get_ref().id)?;
        let Some(template) = self.backend.template(&c.cluster).await.map_err(status)? else {
            return Err(Status::unimplemented(format!(
                "no node template is configured for cluster {:?}: the autoscaler builds one \
                 from a running node of the group, and cannot scale it up from zero",
                c.cluster
            )));
        };
        let node = template_node(&self.identities.group_id(&c.cluster), &template);
        Ok(Response::new(pb::NodeGroupTemplateNodeInfoResponse {
            node_bytes: node.encode_to_vec(),
            node_info: Some(node),
            resource_slice_bytes: Vec::new(),
        }))
    }

    async fn node_group_get_options(
        &self,
        req: Request<pb::NodeGroupAutoscalingOptionsRequest>,
    ) -> Result<Response<pb::NodeGroupAutoscalingOptionsResponse>, Status> {
        let c = self.own_group(&req, &req.get_ref().id)?;
        let Some(defaults) = req.get_ref().defaults else {
            // Without defaults there is nothing complete to answer with; Unimplemented makes
            // the autoscaler use its own.
            return Err(Status::unimplemented("no defaults in the request"));
        };
        let options = apply_overrides(defaults, &self.backend.options(&c.cluster));
        Ok(Response::new(pb::NodeGroupAutoscalingOptionsResponse {
            node_group_autoscaling_options: Some(options),
        }))
    }
}

/// The template Node of a group: the configured labels and taints, the standard node
/// labels, capacity = allocatable, and a Ready condition (as a node that just joined).
pub fn template_node(group_id: &str, t: &NodeTemplate) -> core::Node {
    let name = format!("{group_id}-template");
    let mut labels: HashMap<String, String> = HashMap::new();
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), t.arch.clone());
    labels.insert("kubernetes.io/hostname".into(), name.clone());
    labels.extend(t.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    let q = |s: String| Quantity { string: s };
    let resources: HashMap<String, Quantity> = [
        ("cpu".to_owned(), q(t.cpu.clone())),
        ("memory".to_owned(), q(t.memory.clone())),
        ("pods".to_owned(), q(t.pods.to_string())),
    ]
    .into_iter()
    .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| meta::Time {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: 0,
        })
        .ok();
    core::Node {
        metadata: Some(meta::ObjectMeta {
            name,
            labels,
            annotations: HashMap::new(),
        }),
        spec: Some(core::NodeSpec {
            provider_id: String::new(),
            unschedulable: false,
            taints: t
                .taints
                .iter()
                .map(|x| core::Taint {
                    key: x.key.clone(),
                    value: x.value.clone(),
                    effect: x.effect.clone(),
                })
                .collect(),
        }),
        status: Some(core::NodeStatus {
            capacity: resources.clone(),
            allocatable: resources,
            conditions: vec![core::NodeCondition {
                r#type: "Ready".into(),
                status: "True".into(),
                last_heartbeat_time: now,
                last_transition_time: now,
                reason: "KubeletReady".into(),
                message: "template node of a basalt pool node group".into(),
            }],
        }),
    }
}

fn k8s_duration(d: Duration) -> meta::Duration {
    meta::Duration {
        duration: i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
    }
}

fn from_k8s(d: &meta::Duration) -> Duration {
    Duration::from_nanos(u64::try_from(d.duration).unwrap_or(0))
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn from_pb(d: &prost_types::Duration) -> Duration {
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u32::try_from(d.nanos).unwrap_or(0);
    Duration::new(secs, 0) + Duration::from_nanos(u64::from(nanos))
}

/// The autoscaler's defaults with basalt's overrides applied, with every duration written in
/// both generations' fields (an older autoscaler dereferences its three durations without a
/// nil check, so they must always be present).
pub fn apply_overrides(
    mut o: pb::NodeGroupAutoscalingOptions,
    x: &crate::backend::OptionOverrides,
) -> pb::NodeGroupAutoscalingOptions {
    if let Some(v) = x.scale_down_utilization_threshold {
        o.scale_down_utilization_threshold = v;
    }
    if let Some(v) = x.scale_down_gpu_utilization_threshold {
        o.scale_down_gpu_utilization_threshold = v;
    }
    // Each duration: the override, else the newer field, else the older one, else zero.
    let pick = |over: Option<Duration>,
                new: &Option<prost_types::Duration>,
                old: &Option<meta::Duration>| {
        over.or_else(|| new.as_ref().map(from_pb))
            .or_else(|| old.as_ref().map(from_k8s))
            .unwrap_or_default()
    };
    let unneeded = pick(
        x.scale_down_unneeded,
        &o.scale_down_unneeded_duration,
        &o.scale_down_unneeded_time,
    );
    let unready = pick(
        x.scale_down_unready,
        &o.scale_down_unready_duration,
        &o.scale_down_unready_time,
    );
    let provision = pick(
        x.max_node_provision,
        &o.max_node_provision_duration,
        &o.max_node_provision_time,
    );
    o.scale_down_unneeded_time = Some(k8s_duration(unneeded));
    o.scale_down_unneeded_duration = Some(pb_duration(unneeded));
    o.scale_down_unready_time = Some(k8s_duration(unready));
    o.scale_down_unready_duration = Some(pb_duration(unready));
    o.max_node_provision_time = Some(k8s_duration(provision));
    o.max_node_provision_duration = Some(pb_duration(provision));
    if let Some(v) = x.max_node_startup {
        o.max_node_startup_duration = Some(pb_duration(v));
    }
    o
}
