//! The Hetzner Cloud API v1 JSON that basalt reads and writes: servers, actions, images,
//! SSH keys, pagination and the error body. Only the fields basalt uses; the API sends
//! more and serde ignores them, so an API that grows does not break the client.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `{"error": {"code": "…", "message": "…"}}`, the body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `meta.pagination` of a list answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pagination {
    pub page: u64,
    pub per_page: u64,
    pub previous_page: Option<u64>,
    pub next_page: Option<u64>,
    pub last_page: Option<u64>,
    pub total_entries: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub pagination: Pagination,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Action {
    pub id: u64,
    pub command: String,
    /// `running`, `success` or `error`.
    pub status: String,
    pub progress: u32,
    pub started: String,
    pub finished: Option<String>,
    pub resources: Vec<ActionResource>,
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionResource {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ipv4 {
    pub ip: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublicNet {
    pub ipv4: Option<Ipv4>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedRef {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Datacenter {
    pub name: String,
    pub location: NamedRef,
}

/// The image a server was created from (`null` once that image is gone).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerImage {
    pub id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Server {
    pub id: u64,
    pub name: String,
    /// `initializing`, `starting`, `running`, `stopping`, `off`, `deleting`, …
    pub status: String,
    pub created: String,
    pub public_net: PublicNet,
    pub server_type: NamedRef,
    pub datacenter: Datacenter,
    pub image: Option<ServerImage>,
    pub rescue_enabled: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub private_net: Vec<PrivateNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub id: u64,
    /// `snapshot`, `system`, `backup` or `app`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `available`, `creating` or `unavailable`.
    pub status: String,
    pub description: String,
    /// Size of the snapshot in GB (what it is billed by); null while it is created.
    pub image_size: Option<f64>,
    /// Size of the disk it was taken from, in GB.
    pub disk_size: f64,
    pub created: String,
    pub architecture: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SshKey {
    pub id: u64,
    pub name: String,
    pub fingerprint: String,
    pub public_key: String,
    pub created: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A private network (`GET /networks`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Network {
    pub id: u64,
    pub name: String,
    pub ip_range: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The server's attachment to a private network (`private_net` of a server).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrivateNet {
    pub network: u64,
    pub ip: String,
}

/// `POST /servers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateServer {
    pub name: String,
    pub server_type: String,
    pub image: String,
    pub location: Option<String>,
    pub start_after_create: bool,
    pub labels: BTreeMap<String, String>,
    /// What the server's metadata service serves as `/hetzner/v1/userdata`: for a basalt
    /// image, its machine config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// `POST /servers/{id}/actions/create_image`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateImage {
    pub description: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub labels: BTreeMap<String, String>,
}

/// `POST /ssh_keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSshKey {
    pub name: String,
    pub public_key: String,
    pub labels: BTreeMap<String, String>,
}

/// `POST /servers/{id}/actions/enable_rescue`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnableRescue {
    #[serde(rename = "type")]
    pub kind: String,
    pub ssh_keys: Vec<u64>,
}
