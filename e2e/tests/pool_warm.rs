//! The warm pool end to end with real QEMU (TCG here): the controller keeps two join-image
//! VMs in standby through the qemu provider; cluster-autoscaler's side, a gRPC client
//! generated from the same .proto with the cluster's client certificate, asks for one more
//! node with `NodeGroupIncreaseSize`; a standby is promoted, joins the K3s server double
//! (the agent double says so on the VM's serial console), `NodeGroupNodes` lists it by its
//! provider id, and the controller boots a new standby to refill the pool.

mod common;
use common::{console, process_runs};

use anyhow::Context;
use basalt_autoscaler::proto::externalgrpc as pb;
use basalt_autoscaler::proto::externalgrpc::cloud_provider_client::CloudProviderClient;
use basalt_autoscaler::{serve, ClusterIdentity, Identities, TlsPaths};
use basalt_client::pki::{Ca, CertRequest, Issued, Role, Validity};
use basalt_pool::config::ClusterConfig;
use basalt_pool::controller::{holder_id, Controller, PoolStatus, Settings};
use basalt_pool::nodes::NodeApi;
use basalt_pool::provider::Provider;
use basalt_pool::qemu::{QemuProvider, QemuSettings};
use basalt_pool::serve::Pool;
use k3s_doubles::K3sServerDouble;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const POOL: &str = "e2e-warm";
const CLUSTER: &str = "a";
/// One boot to standby on KVM; scaled for TCG (×6) as the harness does.
const BOOT: Duration = Duration::from_secs(60);

type QemuPool = Pool<QemuProvider, NodeApi>;

/// Deletes every VM of the state directory, so that no QEMU outlives a failed test.
struct Cleanup {
    settings: QemuSettings,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(provider) = QemuProvider::open(self.settings.clone()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(servers) = provider.servers(POOL).await else {
                return;
            };
            for s in servers {
                if let Err(e) = provider.delete(&s.id).await {
                    eprintln!("cleanup of VM {}: {e}", s.name);
                }
            }
        });
    }
}

fn count(status: &PoolStatus, state: &str) -> usize {
    status.servers.iter().filter(|s| s.state == state).count()
}

fn summary(status: &PoolStatus) -> String {
    let servers: Vec<String> = status
        .servers
        .iter()
        .map(|s| {
            format!(
                "{}={}{}{}",
                s.name,
                s.state,
                s.cluster
                    .as_deref()
                    .map(|c| format!("@{c}"))
                    .unwrap_or_default(),
                s.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    format!(
        "[{}] last pass error: {:?}",
        servers.join(", "),
        status.last_pass_error
    )
}

/// Every VM's console, for a failure message.
fn consoles(provider: &QemuProvider, status: &PoolStatus) -> String {
    let mut out = String::new();
    for s in &status.servers {
        if let Ok(Some(info)) = provider.inspect(&s.name) {
            let text = console(&info.console);
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!(
                "----- console of {} (last 40 lines) -----\n",
                s.name
            ));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Polls the controller's status until `done` holds, or fails after `timeout` with the
/// pool's servers and their consoles.
async fn wait_status(
    pool: &QemuPool,
    what: &str,
    timeout: Duration,
    done: impl Fn(&PoolStatus) -> bool,
) -> anyhow::Result<PoolStatus> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let status = pool.controller.status().await?;
        let now = summary(&status);
        if now != last {
            eprintln!("pool: {now}");
            last = now;
        }
        if done(&status) {
            return Ok(status);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{what}: not reached within {timeout:?}: {last}\n{}",
                consoles(pool.controller.provider(), &status)
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The pool CA with the gRPC server's certificate (for localhost) and the autoscalers'
/// client certificates, in a folder.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate()?;
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem())?;
        // The CA folder the controller loads its own copy from (as `ca_dir` in pool.toml).
        ca.write(&dir.path().join("ca"), false)?;
        let pki = Pki { dir, ca };
        pki.issue(
            "server",
            "basalt-pool",
            Role::Node {
                ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
                dns: vec!["localhost".into()],
            },
        )?;
        Ok(pki)
    }

    fn issue(&self, stem: &str, name: &str, role: Role) -> anyhow::Result<Issued> {
        let issued = self.ca.issue(&CertRequest {
            name: name.into(),
            role,
            validity: Validity::days_from_now(1)?,
        })?;
        std::fs::write(
            self.dir.path().join(format!("{stem}.pem")),
            &issued.cert_pem,
        )?;
        std::fs::write(self.dir.path().join(format!("{stem}.key")), &issued.key_pem)?;
        Ok(issued)
    }

    fn tls_paths(&self) -> TlsPaths {
        let path = |f: &str| self.dir.path().join(f);
        TlsPaths {
            cert: path("server.pem"),
            key: path("server.key"),
            client_ca: path("ca.pem"),
        }
    }

    /// A gRPC client with a client certificate of the pool CA named `name`. The timeout
    /// covers a promotion, which answers once the node has joined.
    async fn client(
        &self,
        addr: SocketAddr,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<CloudProviderClient<Channel>> {
        let cert = self.issue(name, name, Role::Client)?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.cert_pem()))
            .domain_name("localhost")
            .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
        let channel = Channel::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .timeout(timeout)
            .connect()
            .await?;
        Ok(CloudProviderClient::new(channel))
    }
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_standby_promoted_over_grpc_joins_the_cluster_and_the_pool_refills() -> anyhow::Result<()> {
    let img = common::join_image();
    let state = tempfile::tempdir()?;
    let settings = QemuSettings {
        images: vec![img.raw.clone()],
        state_dir: state.path().to_path_buf(),
        memory_mib: 1024,
        // One CPU each: three VMs share a small host.
        cpus: 1,
        firmware: None,
    };
    let _cleanup = Cleanup {
        settings: settings.clone(),
    };
    // Dropped before `_cleanup`: the controller's tasks end before the VMs are deleted.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(warm_pool(settings))
}

async fn warm_pool(settings: QemuSettings) -> anyhow::Result<()> {
    let server = K3sServerDouble::start("127.0.0.1:0")?;
    let url = server.url_for("10.0.2.2");
    let token = server.token("secret");
    let pki = Pki::new()?;
    let accel = basalt_qemu::detect_accel();
    let boot = accel.scale(BOOT);
    eprintln!("accelerator {accel:?}: boot budget {boot:?}");

    let provider = QemuProvider::open(settings)?;
    let nodes = NodeApi::new(&pki.ca)?;
    let cluster = ClusterConfig {
        name: CLUSTER.into(),
        server: url.parse().map_err(anyhow::Error::msg)?,
        token: token.parse().map_err(anyhow::Error::msg)?,
        client_name: "autoscaler-a".into(),
        labels: BTreeMap::from([(
            "example.com/pool".parse().map_err(anyhow::Error::msg)?,
            "warm".parse().map_err(anyhow::Error::msg)?,
        )]),
        taints: vec![],
        network: None,
    };
    let max = 3;
    let controller = Controller::start(
        provider.clone(),
        nodes,
        Ca::load(&pki.dir.path().join("ca"))?,
        Settings {
            pool: POOL.into(),
            standby: 2,
            max,
            standby_timeout: boot * 3,
            promote_timeout: boot * 2,
            tick: Duration::from_secs(1),
            lock_ttl: Duration::from_secs(3600),
            holder: holder_id(),
            clusters: vec![cluster],
        },
    )
    .await?;
    let pool = Arc::new(Pool {
        controller,
        templates: BTreeMap::new(),
    });
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let pool = pool.clone();
        let stop = stop.clone();
        async move { pool.controller.run(stop).await }
    });

    // Two standbys, booted from nothing.
    let started = Instant::now();
    let status = wait_status(&pool, "two standbys", boot * 3, |s| {
        count(s, "standby") == 2
    })
    .await?;
    eprintln!(
        "TIMING standby reached: 2 standbys after {:?}",
        started.elapsed()
    );
    assert_eq!(status.servers.len(), 2, "{}", summary(&status));
    let standbys: Vec<String> = status.servers.iter().map(|s| s.name.clone()).collect();

    // cluster-autoscaler's side: the gRPC server with the pool as its backend.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let identities = Identities::new(
        POOL,
        vec![ClusterIdentity {
            cluster: CLUSTER.into(),
            client_cert_name: "autoscaler-a".into(),
            min: 0,
            max,
        }],
    )?;
    let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let grpc = tokio::spawn({
        let paths = pki.tls_paths();
        let backend = pool.clone();
        async move {
            serve(listener, &paths, identities, backend, async move {
                let _ = shutdown_rx.await;
            })
            .await
        }
    });
    let group = format!("{POOL}-{CLUSTER}");
    let mut client = pki.client(addr, "autoscaler-a", boot * 2).await?;
    let size = |c: &mut CloudProviderClient<Channel>| {
        let mut c = c.clone();
        let id = group.clone();
        async move {
            anyhow::Ok(
                c.node_group_target_size(pb::NodeGroupTargetSizeRequest { id })
                    .await?
                    .into_inner()
                    .target_size,
            )
        }
    };
    assert_eq!(size(&mut client).await?, 0, "no node in the cluster yet");

    // Demand: one node. The call answers once the node has joined.
    let asked = Instant::now();
    client
        .node_group_increase_size(pb::NodeGroupIncreaseSizeRequest {
            id: group.clone(),
            delta: 1,
        })
        .await
        .context("NodeGroupIncreaseSize")?;
    let took = asked.elapsed();
    eprintln!("TIMING increase_size (warm promote to joined): {took:?}");

    // A standby was promoted (no cold start): it is active in cluster a.
    let status = pool.controller.status().await?;
    let active: Vec<_> = status
        .servers
        .iter()
        .filter(|s| s.state == "active")
        .collect();
    assert_eq!(active.len(), 1, "{}", summary(&status));
    let node = active[0].clone();
    assert_eq!(node.cluster.as_deref(), Some(CLUSTER), "{node:?}");
    assert!(
        standbys.contains(&node.name),
        "{} was one of the standbys {standbys:?}",
        node.name
    );
    assert_eq!(node.provider_id, format!("basalt-qemu://{}", node.name));
    assert_eq!(status.cold_starts.get(CLUSTER), Some(&0), "a warm promote");

    // It joined the K3s server double: the agent double ran with the cluster's config and
    // checked the server's CA (its lines are on the VM's serial console).
    let info = provider
        .inspect(&node.name)?
        .context("inspect the promoted VM")?;
    let deadline = Instant::now() + boot;
    while !console(&info.console).contains("k3s-agent-double: ca-check passed") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: no ca-check from the agent double\n{}",
            node.name,
            console(&info.console)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let text = console(&info.console);
    assert!(text.contains("[basalt] joined t="), "{text}");
    let config = text
        .lines()
        .find(|l| l.contains("k3s-agent-double: config "))
        .context("the agent double's config line")?;
    for want in [
        format!("server={url}"),
        format!("node-name={}", node.name),
        r#"labels=["example.com/pool=warm"]"#.to_string(),
    ] {
        assert!(config.contains(&want), "{config:?} lacks {want:?}");
    }
    assert!(
        server.requests("/cacerts") >= 2,
        "PID1 and the agent both asked the server double"
    );
    assert!(!text.contains(&token), "the token is on the console");

    // What the autoscaler sees: target size 1, the node by its provider id, running.
    assert_eq!(size(&mut client).await?, 1);
    let instances = client
        .node_group_nodes(pb::NodeGroupNodesRequest { id: group.clone() })
        .await?
        .into_inner()
        .instances;
    let listed: Vec<(String, pb::instance_status::InstanceState)> = instances
        .iter()
        .map(|i| {
            (
                i.id.clone(),
                i.status
                    .as_ref()
                    .map_or(pb::instance_status::InstanceState::Unspecified, |s| {
                        s.instance_state()
                    }),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![(
            node.provider_id.clone(),
            pb::instance_status::InstanceState::InstanceRunning
        )]
    );

    // Another cluster's autoscaler (unknown to this pool) is refused.
    let stranger = pki
        .client(addr, "autoscaler-b", Duration::from_secs(30))
        .await?;
    let refused = size(&mut stranger.clone()).await;
    let code = refused
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<tonic::Status>())
        .map(tonic::Status::code);
    assert_eq!(code, Some(tonic::Code::PermissionDenied), "{refused:?}");

    // The pool refills: a new VM boots to standby, beside the active node.
    let refill = Instant::now();
    let status = wait_status(&pool, "refill to two standbys", boot * 3, |s| {
        count(s, "standby") == 2
    })
    .await?;
    eprintln!(
        "TIMING refill: standby count back to 2 after {:?}",
        refill.elapsed()
    );
    assert_eq!(count(&status, "active"), 1, "{}", summary(&status));
    assert_eq!(status.servers.len(), 3, "{}", summary(&status));
    assert!(
        status
            .servers
            .iter()
            .any(|s| s.state == "standby" && !standbys.contains(&s.name)),
        "a new standby: {}",
        summary(&status)
    );
    assert_eq!(
        size(&mut client).await?,
        1,
        "standbys are no cluster's nodes"
    );

    // Stop the controller and the gRPC server, then delete every VM; no QEMU is left.
    stop.cancel();
    run.await??;
    let _ = shutdown.send(());
    grpc.await??;
    let servers = provider.servers(POOL).await?;
    let mut pids = Vec::new();
    for s in &servers {
        let info = provider.inspect(&s.name)?.context("inspect")?;
        pids.push(info.pid.context("every VM's QEMU runs")?);
        provider.delete(&s.id).await?;
    }
    for pid in pids {
        assert!(!process_runs(pid), "QEMU pid {pid} still runs");
    }
    assert!(provider.servers(POOL).await?.is_empty());
    Ok(())
}
