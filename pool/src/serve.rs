//! The controller behind its two doors: cluster-autoscaler's externalgrpc node groups
//! ([`NodeGroupBackend`]) and the pool API of `basalt pool status|promote|delete`
//! ([`Admin`]).

use std::collections::BTreeMap;

use basalt_autoscaler::backend::{
    BackendError, Instance, InstanceError, InstanceErrorClass, InstanceState, NodeGroupBackend,
    NodeTemplate, Taint,
};
use basalt_autoscaler::identity::{ClusterIdentity, Identities, IdentityError};
use serde_json::Value;

use crate::admin::{Admin, AdminError};
use crate::config::{PoolConfig, ProviderConfig};
use crate::controller::{Controller, ControllerError};
use crate::nodes::Nodes;
use crate::provider::Provider;

/// Each cluster of `pool.toml` as a node group: its autoscaler's certificate name, from 0
/// to the pool's `max` nodes.
pub fn identities(config: &PoolConfig) -> Result<Identities, IdentityError> {
    let clusters = config
        .clusters
        .iter()
        .map(|c| ClusterIdentity {
            cluster: c.name.clone(),
            client_cert_name: c.client_name.clone(),
            min: 0,
            max: config.max,
        })
        .collect();
    Identities::new(&config.name, clusters)
}

/// What a node of each cluster looks like, for scale-from-zero: known for QEMU VMs (their
/// memory and CPUs are in pool.toml). For Hetzner the server type's resources would need
/// the API's server types, which basalt does not read yet: no template, so the autoscaler
/// scales such a group from one running node, not from zero.
pub fn templates(config: &PoolConfig) -> BTreeMap<String, NodeTemplate> {
    let ProviderConfig::Qemu(q) = &config.provider else {
        return BTreeMap::new();
    };
    config
        .clusters
        .iter()
        .map(|c| {
            let template = NodeTemplate {
                labels: c
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
                    .collect(),
                taints: c
                    .taints
                    .iter()
                    .map(|t| Taint {
                        key: t.key.as_str().to_owned(),
                        value: t
                            .value
                            .as_ref()
                            .map(|v| v.as_str().to_owned())
                            .unwrap_or_default(),
                        effect: t.effect.as_str().to_owned(),
                    })
                    .collect(),
                cpu: q.cpus.to_string(),
                memory: format!("{}Mi", q.memory_mib),
                pods: 110,
                arch: "amd64".into(),
            };
            (c.name.clone(), template)
        })
        .collect()
}

fn backend_error(e: ControllerError) -> BackendError {
    match e {
        ControllerError::UnknownCluster(_) | ControllerError::NotInCluster { .. } => {
            BackendError::NotFound(e.to_string())
        }
        ControllerError::NoImage => BackendError::FailedPrecondition(e.to_string()),
        ControllerError::Provider(ref p) if p.transient => BackendError::Unavailable(e.to_string()),
        ControllerError::LockHeld { .. } | ControllerError::LockLost { .. } => {
            BackendError::Unavailable(e.to_string())
        }
        ControllerError::Provider(_) => BackendError::Internal(e.to_string()),
    }
}

fn admin_error(e: ControllerError) -> AdminError {
    let status = match e {
        ControllerError::UnknownCluster(_) | ControllerError::NotInCluster { .. } => 404,
        ControllerError::NoImage => 409,
        _ => 503,
    };
    AdminError {
        status,
        message: e.to_string(),
    }
}

/// The controller with the templates it answers for scale-from-zero.
pub struct Pool<P: Provider, N: Nodes> {
    pub controller: Controller<P, N>,
    pub templates: BTreeMap<String, NodeTemplate>,
}

impl<P: Provider, N: Nodes> NodeGroupBackend for Pool<P, N> {
    async fn target_size(&self, cluster: &str) -> Result<u32, BackendError> {
        self.controller
            .target_size(cluster)
            .await
            .map_err(backend_error)
    }

    async fn increase_size(&self, cluster: &str, delta: u32) -> Result<(), BackendError> {
        let report = self
            .controller
            .promote(cluster, delta)
            .await
            .map_err(backend_error)?;
        if report.unmet > 0 {
            return Err(BackendError::LimitReached(format!(
                "{} of {delta} nodes could be neither promoted nor created (the pool's max, or no image)",
                report.unmet
            )));
        }
        Ok(())
    }

    async fn delete_nodes(
        &self,
        cluster: &str,
        provider_ids: Vec<String>,
    ) -> Result<(), BackendError> {
        self.controller
            .delete_nodes(cluster, &provider_ids)
            .await
            .map(|_| ())
            .map_err(backend_error)
    }

    async fn decrease_target_size(&self, cluster: &str, delta: u32) -> Result<(), BackendError> {
        // Every node counted in the target exists as a server (a promote either joins a
        // standby or creates one cold), so there is no unfulfilled demand to cancel.
        let _ = delta;
        Err(BackendError::FailedPrecondition(format!(
            "cluster {cluster}: every node in the target size exists; delete nodes by name"
        )))
    }

    async fn nodes(&self, cluster: &str) -> Result<Vec<Instance>, BackendError> {
        let nodes = self
            .controller
            .nodes(cluster)
            .await
            .map_err(backend_error)?;
        Ok(nodes
            .into_iter()
            .map(|n| {
                let (state, error) = match n.state.as_str() {
                    "active" => (InstanceState::Running, None),
                    "broken" => (
                        InstanceState::Creating,
                        Some(InstanceError {
                            class: InstanceErrorClass::Other,
                            code: "basalt-broken".into(),
                            message: n.last_error.unwrap_or_else(|| "broken".into()),
                        }),
                    ),
                    _ => (InstanceState::Creating, None),
                };
                Instance {
                    provider_id: n.provider_id,
                    state,
                    error,
                }
            })
            .collect())
    }

    async fn cluster_of(&self, provider_id: &str) -> Result<Option<String>, BackendError> {
        let status = self.controller.status().await.map_err(backend_error)?;
        Ok(status
            .servers
            .into_iter()
            .find(|s| s.provider_id == provider_id)
            .and_then(|s| s.cluster))
    }

    async fn refresh(&self) -> Result<(), BackendError> {
        // The controller re-reads the provider on its own tick; nothing is cached here.
        Ok(())
    }

    async fn template(&self, cluster: &str) -> Result<Option<NodeTemplate>, BackendError> {
        Ok(self.templates.get(cluster).cloned())
    }
}

impl<P: Provider, N: Nodes> Admin for Pool<P, N> {
    async fn status(&self) -> Result<Value, AdminError> {
        let status = self.controller.status().await.map_err(admin_error)?;
        serde_json::to_value(status).map_err(|e| AdminError {
            status: 500,
            message: e.to_string(),
        })
    }

    async fn promote(&self, cluster: &str, count: u32) -> Result<Value, AdminError> {
        if count == 0 {
            return Err(AdminError::bad_request("count must be at least 1"));
        }
        let report = self
            .controller
            .promote(cluster, count)
            .await
            .map_err(admin_error)?;
        serde_json::to_value(report).map_err(|e| AdminError {
            status: 500,
            message: e.to_string(),
        })
    }

    async fn delete(&self, node: &str) -> Result<Value, AdminError> {
        let status = self.controller.status().await.map_err(admin_error)?;
        let server = status
            .servers
            .into_iter()
            .find(|s| s.name == node || s.provider_id == node)
            .ok_or_else(|| AdminError::not_found(format!("no server {node} in the pool")))?;
        match &server.cluster {
            Some(cluster) => {
                self.controller
                    .delete_nodes(cluster, std::slice::from_ref(&server.provider_id))
                    .await
                    .map_err(admin_error)?;
            }
            // A standby (or a server that never joined): the reconcile loop replaces it.
            None => self
                .controller
                .provider()
                .delete(&server.id)
                .await
                .map_err(|e| admin_error(e.into()))?,
        }
        Ok(serde_json::json!({ "deleted": server.name, "provider_id": server.provider_id }))
    }

    fn metrics(&self) -> String {
        self.controller.metrics_text()
    }
}
