//! Test support: `FakePoolBackend`, an in-memory stand-in for the pool controller that
//! records every call, and `Pki`, a pool CA with the certificates the tests use.

#![allow(dead_code)]

use basalt_autoscaler::proto::externalgrpc::cloud_provider_client::CloudProviderClient;
use basalt_autoscaler::{
    serve, BackendError, ClusterIdentity, Identities, Instance, InstanceError, InstanceErrorClass,
    InstanceState, NodeGroupBackend, NodeTemplate, OptionOverrides, TlsPaths,
};
use basalt_client::pki::{Ca, CertRequest, Issued, Role, Validity};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub const POOL: &str = "eu";

#[derive(Debug, Clone)]
pub struct FakeNode {
    pub provider_id: String,
    pub cluster: String,
    pub state: InstanceState,
    pub error: Option<InstanceError>,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub nodes: Vec<FakeNode>,
    pub next: u32,
    pub increases: Vec<(String, u32)>,
    pub deletes: Vec<(String, Vec<String>)>,
    pub decreases: Vec<(String, u32)>,
    pub refreshes: u32,
    pub templates: HashMap<String, NodeTemplate>,
    pub overrides: HashMap<String, OptionOverrides>,
}

/// The pool controller's stand-in: nodes in memory, every call recorded.
#[derive(Debug, Default)]
pub struct FakePoolBackend {
    pub state: Mutex<FakeState>,
}

impl FakePoolBackend {
    pub fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock().expect("fake state lock"))
    }

    /// Adds a node that has joined `cluster`.
    pub fn add_running(&self, cluster: &str, provider_id: &str) {
        self.with(|s| {
            s.nodes.push(FakeNode {
                provider_id: provider_id.into(),
                cluster: cluster.into(),
                state: InstanceState::Running,
                error: None,
            })
        })
    }

    /// True if no call changed anything.
    pub fn untouched(&self) -> bool {
        self.with(|s| s.increases.is_empty() && s.deletes.is_empty() && s.decreases.is_empty())
    }
}

impl NodeGroupBackend for FakePoolBackend {
    async fn target_size(&self, cluster: &str) -> Result<u32, BackendError> {
        Ok(self.with(|s| {
            s.nodes
                .iter()
                .filter(|n| n.cluster == cluster && n.state != InstanceState::Deleting)
                .count() as u32
        }))
    }

    async fn increase_size(&self, cluster: &str, delta: u32) -> Result<(), BackendError> {
        self.with(|s| {
            s.increases.push((cluster.into(), delta));
            for _ in 0..delta {
                s.next += 1;
                let provider_id = format!("basalt-qemu://{POOL}-{}", s.next);
                s.nodes.push(FakeNode {
                    provider_id,
                    cluster: cluster.into(),
                    state: InstanceState::Creating,
                    error: None,
                });
            }
        });
        Ok(())
    }

    async fn delete_nodes(&self, cluster: &str, ids: Vec<String>) -> Result<(), BackendError> {
        self.with(|s| {
            for id in &ids {
                match s.nodes.iter_mut().find(|n| &n.provider_id == id) {
                    Some(n) if n.cluster == cluster => n.state = InstanceState::Deleting,
                    _ => return Err(BackendError::NotFound(id.clone())),
                }
            }
            s.deletes.push((cluster.into(), ids));
            Ok(())
        })
    }

    async fn decrease_target_size(&self, cluster: &str, delta: u32) -> Result<(), BackendError> {
        self.with(|s| {
            let creating = s
                .nodes
                .iter()
                .filter(|n| n.cluster == cluster && n.state == InstanceState::Creating)
                .count() as u32;
            if creating < delta {
                return Err(BackendError::FailedPrecondition(format!(
                    "only {creating} nodes are still being created"
                )));
            }
            let mut left = delta;
            s.nodes.retain(|n| {
                let drop = left > 0 && n.cluster == cluster && n.state == InstanceState::Creating;
                if drop {
                    left -= 1;
                }
                !drop
            });
            s.decreases.push((cluster.into(), delta));
            Ok(())
        })
    }

    async fn nodes(&self, cluster: &str) -> Result<Vec<Instance>, BackendError> {
        Ok(self.with(|s| {
            s.nodes
                .iter()
                .filter(|n| n.cluster == cluster)
                .map(|n| Instance {
                    provider_id: n.provider_id.clone(),
                    state: n.state,
                    error: n.error.clone(),
                })
                .collect()
        }))
    }

    async fn cluster_of(&self, provider_id: &str) -> Result<Option<String>, BackendError> {
        Ok(self.with(|s| {
            s.nodes
                .iter()
                .find(|n| n.provider_id == provider_id)
                .map(|n| n.cluster.clone())
        }))
    }

    async fn refresh(&self) -> Result<(), BackendError> {
        self.with(|s| s.refreshes += 1);
        Ok(())
    }

    async fn template(&self, cluster: &str) -> Result<Option<NodeTemplate>, BackendError> {
        Ok(self.with(|s| s.templates.get(cluster).cloned()))
    }

    fn options(&self, cluster: &str) -> OptionOverrides {
        self.with(|s| s.overrides.get(cluster).cloned().unwrap_or_default())
    }
}

pub fn out_of_resources(code: &str) -> InstanceError {
    InstanceError {
        class: InstanceErrorClass::OutOfResources,
        code: code.into(),
        message: "no standby left and the provider refused a new server".into(),
    }
}

/// The pool CA (basalt's own PKI) and a stranger CA, with certificates written to a folder.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub other_ca: Ca,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate().expect("pool CA");
        let other_ca = Ca::generate().expect("other CA");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("write ca");
        std::fs::write(dir.path().join("other-ca.pem"), other_ca.cert_pem()).expect("write ca");
        let pki = Pki { dir, ca, other_ca };
        let server = pki.issue_with(
            &pki.ca,
            "basalt-pool",
            Role::Node {
                ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
                dns: vec!["localhost".into()],
            },
        );
        pki.write("server", &server);
        pki
    }

    pub fn issue_with(&self, ca: &Ca, name: &str, role: Role) -> Issued {
        ca.issue(&CertRequest {
            name: name.into(),
            role,
            validity: Validity::days_from_now(1).expect("validity"),
        })
        .expect("issue")
    }

    /// A client certificate of the pool CA with this CN, written as NAME.pem/NAME.key.
    pub fn client(&self, name: &str) -> Issued {
        let issued = self.issue_with(&self.ca, name, Role::Client);
        self.write(name, &issued);
        issued
    }

    pub fn write(&self, stem: &str, issued: &Issued) {
        std::fs::write(self.path(&format!("{stem}.pem")), &issued.cert_pem).expect("write");
        std::fs::write(self.path(&format!("{stem}.key")), &issued.key_pem).expect("write");
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn tls_paths(&self) -> TlsPaths {
        TlsPaths {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: self.path("ca.pem"),
        }
    }
}

pub fn identities() -> Identities {
    Identities::new(
        POOL,
        vec![
            ClusterIdentity {
                cluster: "a".into(),
                client_cert_name: "autoscaler-a".into(),
                min: 0,
                max: 5,
            },
            ClusterIdentity {
                cluster: "b".into(),
                client_cert_name: "autoscaler-b".into(),
                min: 1,
                max: 3,
            },
        ],
    )
    .expect("identities")
}

/// A running server on a loopback port; dropping it stops the server.
pub struct Running {
    pub addr: SocketAddr,
    pub backend: Arc<FakePoolBackend>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), basalt_autoscaler::ServeError>>>,
}

impl Running {
    /// Stops the server and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), basalt_autoscaler::ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("task");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn start(pki: &Pki, backend: Arc<FakePoolBackend>) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let paths = pki.tls_paths();
    let b = backend.clone();
    let task = tokio::spawn(async move {
        serve(listener, &paths, identities(), b, async move {
            let _ = rx.await;
        })
        .await
    });
    Running {
        addr,
        backend,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A gRPC client with this certificate and key, trusting `ca_pem` for the server.
pub async fn client(
    addr: SocketAddr,
    ca_pem: &str,
    cert: Option<&Issued>,
) -> Result<CloudProviderClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(c) = cert {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(CloudProviderClient::new(channel))
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read")
}
