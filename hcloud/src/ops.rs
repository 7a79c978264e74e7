//! The read and tidy commands: `images`, `prune` and `cleanup`.

use crate::api::{Image, Server, SshKey};
use crate::client::{ApiError, Client};
use crate::labels;
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("list {what}")]
    List {
        what: &'static str,
        #[source]
        source: Box<ApiError>,
    },
    #[error("delete {what} {id}")]
    Delete {
        what: &'static str,
        id: u64,
        #[source]
        source: Box<ApiError>,
    },
    #[error("{what} {id}: `created` {value:?} is not an RFC 3339 time")]
    Created {
        what: &'static str,
        id: u64,
        value: String,
    },
}

/// One snapshot as `images` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub id: u64,
    pub created: String,
    pub description: String,
    /// GB, as the API bills it; null while it is being created.
    pub image_size_gb: Option<f64>,
    pub disk_size_gb: f64,
    pub image: Option<String>,
    pub version: Option<String>,
    pub sha256: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl From<Image> for Snapshot {
    fn from(i: Image) -> Self {
        let get = |k: &str| i.labels.get(k).cloned();
        Snapshot {
            id: i.id,
            image: get(labels::IMAGE),
            version: get(labels::VERSION),
            sha256: get(labels::SHA256),
            created: i.created,
            description: i.description,
            image_size_gb: i.image_size,
            disk_size_gb: i.disk_size,
            labels: i.labels,
        }
    }
}

fn selector_or_default(selector: Option<&str>) -> &str {
    selector.unwrap_or(labels::ANY_IMAGE)
}

/// basalt's snapshots (or those matching `selector`), newest first.
pub async fn images(client: &Client, selector: Option<&str>) -> Result<Vec<Snapshot>, OpsError> {
    let mut list = client
        .images(Some(selector_or_default(selector)))
        .await
        .map_err(|source| OpsError::List {
            source: Box::new(source),
            what: "snapshots",
        })?;
    // The API sorts too; sorting again does not trust a proxy or an old API with it.
    sort_newest_first(&mut list)?;
    Ok(list.into_iter().map(Snapshot::from).collect())
}

fn sort_newest_first(list: &mut [Image]) -> Result<(), OpsError> {
    let mut keyed = Vec::with_capacity(list.len());
    for i in list.iter() {
        keyed.push((created(&i.created, "snapshot", i.id)?, i.id));
    }
    keyed.sort_by(|a, b| b.cmp(a));
    let order: Vec<u64> = keyed.into_iter().map(|(_, id)| id).collect();
    list.sort_by_key(|i| order.iter().position(|&id| id == i.id));
    Ok(())
}

/// What `prune` did.
#[derive(Debug, Clone, Serialize)]
pub struct Pruned {
    pub kept: Vec<u64>,
    /// Older than the newest N, but a server was created from it and still exists.
    pub in_use: Vec<u64>,
    pub deleted: Vec<u64>,
}

/// Keeps the newest `keep` snapshots matching `selector` and deletes the others, except
/// those a server still exists from (its `image.id`): deleting those would break that
/// server's rebuild, and cluster-autoscaler's nodes are created from them.
pub async fn prune(
    client: &Client,
    keep: usize,
    selector: Option<&str>,
) -> Result<Pruned, OpsError> {
    let mut list = client
        .images(Some(selector_or_default(selector)))
        .await
        .map_err(|source| OpsError::List {
            source: Box::new(source),
            what: "snapshots",
        })?;
    sort_newest_first(&mut list)?;
    let servers: Vec<Server> = client
        .servers(None)
        .await
        .map_err(|source| OpsError::List {
            source: Box::new(source),
            what: "servers",
        })?;
    let used: BTreeSet<u64> = servers
        .iter()
        .filter_map(|s| s.image.as_ref().map(|i| i.id))
        .collect();
    let mut out = Pruned {
        kept: Vec::new(),
        in_use: Vec::new(),
        deleted: Vec::new(),
    };
    for (n, image) in list.iter().enumerate() {
        if n < keep {
            out.kept.push(image.id);
        } else if used.contains(&image.id) {
            out.in_use.push(image.id);
        } else {
            client
                .delete_image(image.id)
                .await
                .map_err(|source| OpsError::Delete {
                    source: Box::new(source),
                    what: "snapshot",
                    id: image.id,
                })?;
            tracing::info!(id = image.id, "deleted snapshot");
            out.deleted.push(image.id);
        }
    }
    Ok(out)
}

/// What `cleanup` deleted.
#[derive(Debug, Clone, Serialize)]
pub struct Cleaned {
    pub servers: Vec<Leftover>,
    pub ssh_keys: Vec<Leftover>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Leftover {
    pub id: u64,
    pub name: String,
    pub created: String,
}

/// Deletes the servers and keys an upload left behind (`basalt.io/created-by=basalt-upload`)
/// that are older than `older_than`: younger ones may belong to an upload still running.
pub async fn cleanup(client: &Client, older_than: Duration) -> Result<Cleaned, OpsError> {
    let selector = format!("{}={}", labels::CREATED_BY, labels::UPLOADER);
    let cutoff = SystemTime::now() - older_than;
    let servers: Vec<Server> =
        client
            .servers(Some(&selector))
            .await
            .map_err(|source| OpsError::List {
                source: Box::new(source),
                what: "servers",
            })?;
    let mut out = Cleaned {
        servers: Vec::new(),
        ssh_keys: Vec::new(),
    };
    for s in servers {
        if created(&s.created, "server", s.id)? > cutoff {
            continue;
        }
        client
            .delete_server(s.id)
            .await
            .map_err(|source| OpsError::Delete {
                source: Box::new(source),
                what: "server",
                id: s.id,
            })?;
        tracing::info!(id = s.id, name = %s.name, "deleted leftover server");
        out.servers.push(Leftover {
            id: s.id,
            name: s.name,
            created: s.created,
        });
    }
    let keys: Vec<SshKey> =
        client
            .ssh_keys(Some(&selector))
            .await
            .map_err(|source| OpsError::List {
                source: Box::new(source),
                what: "SSH keys",
            })?;
    for k in keys {
        if created(&k.created, "SSH key", k.id)? > cutoff {
            continue;
        }
        client
            .delete_ssh_key(k.id)
            .await
            .map_err(|source| OpsError::Delete {
                source: Box::new(source),
                what: "SSH key",
                id: k.id,
            })?;
        tracing::info!(id = k.id, name = %k.name, "deleted leftover SSH key");
        out.ssh_keys.push(Leftover {
            id: k.id,
            name: k.name,
            created: k.created,
        });
    }
    Ok(out)
}

fn created(value: &str, what: &'static str, id: u64) -> Result<SystemTime, OpsError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| OpsError::Created {
            what,
            id,
            value: value.to_owned(),
        })
}

/// A time as the API writes them (RFC 3339, UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
