//! The controller's access to a server's node API, behind a small trait: the real one over
//! [`basalt_client::node::NodeClient`] (mutual TLS against the pool CA, the server's name
//! always verified), and test doubles.
//!
//! Also the machine configs the controller writes: the standby config (user-data at
//! create: `[api]`, no `[cluster]`) and the join config (applied at promotion).

use crate::config::ClusterConfig;
use crate::provider::Server;
use basalt_api::config::{
    ApiConfig, ClusterConfig as JoinCluster, Hostname, MachineConfig, NodeConfig, Pem, SecretPem,
    StandbyConfig, CONFIG_VERSION, DEFAULT_API_LISTEN,
};
use basalt_api::node::{ApplyResponse, Health, Status};
use basalt_client::node::{ClientOptions, Endpoint, NodeClient};
use basalt_client::pki::{Ca, CertRequest, Role, Validity};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    #[error("server {server}: its node API address is not known yet")]
    NoAddress { server: String },
    #[error("server {server}: {message}")]
    Call { server: String, message: String },
    #[error("certificate for {name}: {message}")]
    Cert { name: String, message: String },
    #[error("machine config for {name}: {message}")]
    Config { name: String, message: String },
    #[error("write the controller's client certificate: {0}")]
    Setup(String),
}

/// What the controller asks of a node.
pub trait Nodes: Send + Sync + 'static {
    fn health(&self, server: &Server) -> impl Future<Output = Result<Health, NodeApiError>> + Send;
    fn status(&self, server: &Server) -> impl Future<Output = Result<Status, NodeApiError>> + Send;
    /// Sends a machine config (TOML).
    fn apply(
        &self,
        server: &Server,
        config: String,
    ) -> impl Future<Output = Result<ApplyResponse, NodeApiError>> + Send;
}

/// The node API over HTTPS. Each call runs the blocking client on tokio's blocking pool.
pub struct NodeApi {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

/// The controller's client certificate's name (what nodes see).
pub const CONTROLLER_CLIENT_NAME: &str = "basalt-pool-controller";

impl NodeApi {
    /// Issues the controller a client certificate from the pool CA, kept in a private
    /// temporary folder for as long as this lives.
    pub fn new(ca: &Ca) -> Result<NodeApi, NodeApiError> {
        let setup = |e: &dyn std::fmt::Display| NodeApiError::Setup(e.to_string());
        let dir = tempfile::Builder::new()
            .prefix("basalt-pool-client-")
            .tempdir()
            .map_err(|e| setup(&e))?;
        let issued = ca
            .issue(&CertRequest {
                name: CONTROLLER_CLIENT_NAME.into(),
                role: Role::Client,
                validity: Validity::days_from_now(365).map_err(|e| setup(&e))?,
            })
            .map_err(|e| setup(&e))?;
        let (cert, key) = issued
            .write(dir.path(), CONTROLLER_CLIENT_NAME, true)
            .map_err(|e| setup(&e))?;
        let ca_path = dir.path().join("pool-ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).map_err(|e| setup(&e))?;
        Ok(NodeApi {
            ca: ca_path,
            cert,
            key,
            _dir: Arc::new(dir),
        })
    }

    async fn call<T: Send + 'static>(
        &self,
        server: &Server,
        f: impl FnOnce(&NodeClient) -> Result<T, basalt_client::node::NodeError> + Send + 'static,
    ) -> Result<T, NodeApiError> {
        let addr = server.api.ok_or_else(|| NodeApiError::NoAddress {
            server: server.name.clone(),
        })?;
        let opts = ClientOptions {
            endpoint: Endpoint {
                host: addr.ip().to_string(),
                port: addr.port(),
            },
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            // The node's certificate must carry the server's name.
            name: Some(server.name.clone()),
        };
        let name = server.name.clone();
        let chain = |e: &dyn std::error::Error| {
            let mut s = e.to_string();
            let mut src = e.source();
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        };
        let joined = tokio::task::spawn_blocking(move || {
            let client = NodeClient::new(&opts).map_err(|e| chain(&e))?;
            f(&client).map_err(|e| chain(&e))
        })
        .await;
        match joined {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(message)) => Err(NodeApiError::Call {
                server: name,
                message,
            }),
            Err(e) => Err(NodeApiError::Call {
                server: name,
                message: format!("the call's task failed: {e}"),
            }),
        }
    }
}

impl Nodes for NodeApi {
    async fn health(&self, server: &Server) -> Result<Health, NodeApiError> {
        self.call(server, |c| c.health().map(|r| r.body)).await
    }

    async fn status(&self, server: &Server) -> Result<Status, NodeApiError> {
        self.call(server, |c| c.status().map(|r| r.body)).await
    }

    async fn apply(&self, server: &Server, config: String) -> Result<ApplyResponse, NodeApiError> {
        self.call(server, move |c| c.apply(config).map(|r| r.body))
            .await
    }
}

/// A fresh node API certificate for `name` from the pool CA, and the `[api]` it goes in.
fn api_section(ca: &Ca, name: &str) -> Result<ApiConfig, NodeApiError> {
    let cert_err = |e: &dyn std::fmt::Display| NodeApiError::Cert {
        name: name.into(),
        message: e.to_string(),
    };
    let issued = ca
        .issue(&CertRequest {
            name: name.into(),
            role: Role::Node {
                ips: vec![],
                dns: vec![],
            },
            validity: Validity::days_from_now(3650).map_err(|e| cert_err(&e))?,
        })
        .map_err(|e| cert_err(&e))?;
    let pem = |s: &str| s.parse::<Pem>().map_err(|e| cert_err(&e));
    Ok(ApiConfig {
        listen: DEFAULT_API_LISTEN
            .parse()
            .map_err(|e: std::net::AddrParseError| cert_err(&e))?,
        ca: pem(ca.cert_pem())?,
        cert: pem(&issued.cert_pem)?,
        key: issued
            .key_pem
            .parse::<SecretPem>()
            .map_err(|e| cert_err(&e))?,
        revoked: Vec::new(),
    })
}

fn hostname(name: &str) -> Result<Hostname, NodeApiError> {
    name.parse().map_err(|e: String| NodeApiError::Config {
        name: name.into(),
        message: e,
    })
}

fn render(name: &str, config: &MachineConfig) -> Result<String, NodeApiError> {
    config.to_toml().map_err(|e| NodeApiError::Config {
        name: name.into(),
        message: e.to_string(),
    })
}

/// The standby machine config of a new server named `name`: its hostname, and its node
/// API with its own certificate from the pool CA; no `[cluster]`. `clusters` are those it
/// may be promoted into: their servers go in `standby.servers`, whose CA the node checks
/// ahead so that its promotion's check is one round trip.
pub fn standby_config(
    ca: &Ca,
    name: &str,
    clusters: &[&ClusterConfig],
) -> Result<String, NodeApiError> {
    let mut servers: Vec<_> = clusters.iter().map(|c| c.server.clone()).collect();
    servers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    servers.dedup();
    let config = MachineConfig {
        version: CONFIG_VERSION,
        node: NodeConfig {
            hostname: Some(hostname(name)?),
            ..NodeConfig::default()
        },
        network: Default::default(),
        api: api_section(ca, name)?,
        cluster: None,
        standby: StandbyConfig { servers },
    };
    render(name, &config)
}

/// The join config for server `name` into `cluster`: `[cluster]`, the cluster's labels
/// and taints, the kubelet provider id, and a fresh API certificate (the node's standby
/// key is not kept anywhere).
pub fn join_config(
    ca: &Ca,
    name: &str,
    cluster: &ClusterConfig,
    provider_id: &str,
) -> Result<String, NodeApiError> {
    let node_name = hostname(&name.to_ascii_lowercase())?;
    let config =
        MachineConfig {
            version: CONFIG_VERSION,
            node: NodeConfig {
                hostname: Some(hostname(name)?),
                labels: cluster.labels.clone(),
                taints: cluster.taints.clone(),
            },
            network: Default::default(),
            api: api_section(ca, name)?,
            cluster: Some(JoinCluster {
                server: cluster.server.clone(),
                token: cluster.token.clone(),
                node_name: Some(node_name),
                provider_id: Some(provider_id.parse().map_err(|e: String| {
                    NodeApiError::Config {
                        name: name.into(),
                        message: e,
                    }
                })?),
            }),
            standby: StandbyConfig::default(),
        };
    render(name, &config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::config::Token;

    fn cluster() -> ClusterConfig {
        ClusterConfig {
            name: "customer-a".into(),
            server: "https://10.0.0.2:6443".parse().expect("url"),
            token: Token::parse("plain-s3cret").expect("token"),
            client_name: "autoscaler-a".into(),
            labels: [(
                "example.com/customer".parse().expect("k"),
                "a".parse().expect("v"),
            )]
            .into_iter()
            .collect(),
            taints: vec!["dedicated=a:NoSchedule".parse().expect("taint")],
            network: None,
        }
    }

    fn server(api: Option<std::net::SocketAddr>) -> Server {
        Server {
            id: "7".into(),
            name: "pool-g7-beef".into(),
            labels: Default::default(),
            created: std::time::SystemTime::now(),
            api,
        }
    }

    #[tokio::test]
    async fn node_api_errors_name_the_server() {
        let ca = Ca::generate().expect("ca");
        let api = NodeApi::new(&ca).expect("client certificate");
        let e = api.health(&server(None)).await.expect_err("no address");
        assert!(matches!(e, NodeApiError::NoAddress { .. }), "{e}");
        // Nothing listens on port 1 of the loopback.
        let e = api
            .status(&server(Some("127.0.0.1:1".parse().expect("addr"))))
            .await
            .expect_err("refused");
        let text = e.to_string();
        assert!(
            text.contains("pool-g7-beef") && text.contains("127.0.0.1:1"),
            "{text}"
        );
    }

    #[test]
    fn the_standby_config_parses_and_has_no_cluster() {
        let ca = Ca::generate().expect("ca");
        let text = standby_config(&ca, "pool-g1-abc", &[]).expect("config");
        let c = MachineConfig::parse(&text).expect("valid machine config");
        assert!(c.is_standby());
        assert!(c.prefetch_servers().is_empty());
        // The servers of the clusters it may join, each once, for the CA prefetch.
        let (a, mut b) = (cluster(), cluster());
        b.name = "customer-b".into();
        let text = standby_config(&ca, "pool-g1-abc", &[&a, &b]).expect("config");
        let c = MachineConfig::parse(&text).expect("valid machine config");
        assert_eq!(c.prefetch_servers(), ["https://10.0.0.2:6443"]);
        assert_eq!(c.api.ca.as_str(), ca.cert_pem());
        assert_eq!(
            c.node.hostname.as_ref().map(Hostname::as_str),
            Some("pool-g1-abc")
        );
    }

    #[test]
    fn the_join_config_carries_cluster_labels_taints_and_provider_id() {
        let ca = Ca::generate().expect("ca");
        let text = join_config(&ca, "pool-g1-abc", &cluster(), "hcloud://42").expect("config");
        let c = MachineConfig::parse(&text).expect("valid machine config");
        let k3s = c.k3s_config_json(None).expect("joins");
        let v: serde_json::Value = serde_json::from_str(&k3s).expect("json");
        assert_eq!(v["server"], "https://10.0.0.2:6443");
        assert_eq!(v["token"], "plain-s3cret");
        assert_eq!(v["node-name"], "pool-g1-abc");
        assert_eq!(v["node-label"][0], "example.com/customer=a");
        assert_eq!(v["node-taint"][0], "dedicated=a:NoSchedule");
        assert_eq!(v["kubelet-arg"][0], "provider-id=hcloud://42");
    }
}
