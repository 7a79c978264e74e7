//! Which autoscaler is which: each cluster's client certificate name, its node group and
//! the group's size limits.
//!
//! An autoscaler is identified by the subject common name (CN) of the client certificate it
//! presents, after the certificate chain has been verified against the client CA. The CN is
//! what `basalt pki issue NAME` writes (and cert-manager's `commonName`); SANs are not
//! consulted.

use serde::Deserialize;
use std::collections::BTreeSet;

/// A bad identity list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the pool name is empty")]
    EmptyPool,
    #[error("cluster #{index}: the cluster name is empty")]
    EmptyCluster { index: usize },
    #[error("cluster {cluster:?}: client_cert_name is empty")]
    EmptyCertName { cluster: String },
    #[error("cluster {cluster:?} is listed twice")]
    DuplicateCluster { cluster: String },
    #[error("client certificate name {name:?} is given to both {first:?} and {second:?}")]
    DuplicateCertName {
        name: String,
        first: String,
        second: String,
    },
    #[error("cluster {cluster:?}: min ({min}) is larger than max ({max})")]
    MinAboveMax { cluster: String, min: u32, max: u32 },
    #[error(
        "cluster {cluster:?}: max ({max}) is larger than the protocol allows ({})",
        i32::MAX
    )]
    MaxTooLarge { cluster: String, max: u32 },
}

/// One cluster that the pool serves, as configured (for example a `[[clusters]]` table).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterIdentity {
    /// The cluster's name in the pool.
    pub cluster: String,
    /// The subject CN of the client certificate its autoscaler presents.
    pub client_cert_name: String,
    /// The node group's minimum size.
    #[serde(default)]
    pub min: u32,
    /// The node group's maximum size.
    pub max: u32,
}

/// The checked list of clusters of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identities {
    pool: String,
    clusters: Vec<ClusterIdentity>,
}

impl Identities {
    /// Checks the list: names non-empty and unique (clusters and certificate names alike),
    /// `min <= max`.
    pub fn new(pool: &str, clusters: Vec<ClusterIdentity>) -> Result<Identities, IdentityError> {
        if pool.is_empty() {
            return Err(IdentityError::EmptyPool);
        }
        let mut seen = BTreeSet::new();
        for (index, c) in clusters.iter().enumerate() {
            if c.cluster.is_empty() {
                return Err(IdentityError::EmptyCluster { index });
            }
            if c.client_cert_name.is_empty() {
                return Err(IdentityError::EmptyCertName {
                    cluster: c.cluster.clone(),
                });
            }
            if !seen.insert(c.cluster.as_str()) {
                return Err(IdentityError::DuplicateCluster {
                    cluster: c.cluster.clone(),
                });
            }
            if let Some(first) = clusters[..index]
                .iter()
                .find(|o| o.client_cert_name == c.client_cert_name)
            {
                return Err(IdentityError::DuplicateCertName {
                    name: c.client_cert_name.clone(),
                    first: first.cluster.clone(),
                    second: c.cluster.clone(),
                });
            }
            if c.min > c.max {
                return Err(IdentityError::MinAboveMax {
                    cluster: c.cluster.clone(),
                    min: c.min,
                    max: c.max,
                });
            }
            if i32::try_from(c.max).is_err() {
                return Err(IdentityError::MaxTooLarge {
                    cluster: c.cluster.clone(),
                    max: c.max,
                });
            }
        }
        Ok(Identities {
            pool: pool.to_owned(),
            clusters,
        })
    }

    /// The pool's name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The cluster whose autoscaler presents a certificate with this CN.
    pub fn by_cert_name(&self, name: &str) -> Option<&ClusterIdentity> {
        self.clusters.iter().find(|c| c.client_cert_name == name)
    }

    /// The configured cluster of this name.
    pub fn by_cluster(&self, cluster: &str) -> Option<&ClusterIdentity> {
        self.clusters.iter().find(|c| c.cluster == cluster)
    }

    /// The node group id of a cluster: `<pool>-<cluster>`.
    pub fn group_id(&self, cluster: &str) -> String {
        format!("{}-{}", self.pool, cluster)
    }

    /// All configured clusters.
    pub fn clusters(&self) -> &[ClusterIdentity] {
        &self.clusters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(cluster: &str, cert: &str, min: u32, max: u32) -> ClusterIdentity {
        ClusterIdentity {
            cluster: cluster.into(),
            client_cert_name: cert.into(),
            min,
            max,
        }
    }

    #[test]
    fn lookups_and_group_ids() {
        let ids =
            Identities::new("eu", vec![c("a", "ca-a", 0, 3), c("b", "ca-b", 1, 5)]).expect("valid");
        assert_eq!(
            ids.by_cert_name("ca-b").map(|c| c.cluster.as_str()),
            Some("b")
        );
        assert_eq!(ids.by_cert_name("a"), None);
        assert_eq!(ids.group_id("a"), "eu-a");
    }

    #[test]
    fn rejects_bad_lists() {
        assert_eq!(
            Identities::new("p", vec![c("a", "x", 0, 1), c("b", "x", 0, 1)]),
            Err(IdentityError::DuplicateCertName {
                name: "x".into(),
                first: "a".into(),
                second: "b".into()
            })
        );
        assert!(matches!(
            Identities::new("p", vec![c("a", "x", 0, 1), c("a", "y", 0, 1)]),
            Err(IdentityError::DuplicateCluster { .. })
        ));
        assert!(matches!(
            Identities::new("p", vec![c("a", "x", 4, 1)]),
            Err(IdentityError::MinAboveMax { min: 4, max: 1, .. })
        ));
        assert!(matches!(
            Identities::new("p", vec![c("a", "", 0, 1)]),
            Err(IdentityError::EmptyCertName { .. })
        ));
        assert!(matches!(
            Identities::new("p", vec![c("a", "x", 0, u32::MAX)]),
            Err(IdentityError::MaxTooLarge { .. })
        ));
        assert_eq!(Identities::new("", vec![]), Err(IdentityError::EmptyPool));
    }
}
