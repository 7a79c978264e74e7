//! `basalt bench pool`: the warm pool's promise, measured. cluster-autoscaler's demand (a
//! gRPC `NodeGroupIncreaseSize` over mutual TLS, as `basalt pool run` serves it) → the node
//! `joined`, and → the agent reporting, for a **warm** promote (a booted standby is waiting)
//! and for a **cold** start (no standby: the same call creates a server, which boots,
//! reaches standby and is then joined), both in every run.
//!
//! Each run is two pools in turn, each with its own controller (the real one, in process,
//! with the qemu provider), one VM at a time so that neither competes for the host's CPUs:
//! - warm: `standby = 1, max = 1`; once the standby is up, one node is demanded. `max = 1`
//!   keeps the controller from booting a replacement during the measurement;
//! - cold: `standby = 0, max = 1`; one node is demanded, which creates the server.
//!
//! As in `bench join`, the cluster is the **K3s server double** on the host's loopback
//! (reached as 10.0.2.2) and the image's `k3s` is the **K3s agent double**, which checks
//! the server's CA as `k3s agent` does and prints `k3s-agent-double: ca-check passed`; the
//! double stands in for registration that way. Neither is K3s, so K3s's own start-up is in
//! neither figure.

use super::boot::{CPUS, MEMORY_MIB};
use super::join::{AfterApply, AgentLine};
use super::stats::Spread;
use basalt_autoscaler::proto::externalgrpc as pb;
use basalt_autoscaler::proto::externalgrpc::cloud_provider_client::CloudProviderClient;
use basalt_autoscaler::{serve, ClusterIdentity, Identities, IdentityError, ServeError, TlsPaths};
use basalt_client::pki::{Ca, CertRequest, Issued, PkiError, Role, Validity};
use basalt_pool::config::ClusterConfig;
use basalt_pool::controller::{holder_id, Controller, ControllerError, Settings};
use basalt_pool::nodes::{NodeApi, NodeApiError};
use basalt_pool::provider::{Provider, ProviderError, Server, ServerState, LABEL_CLUSTER};
use basalt_pool::qemu::{QemuError, QemuProvider, QemuSettings};
use basalt_pool::serve::Pool;
use basalt_qemu::Accel;
use k3s_doubles::{K3sServerDouble, ServerDoubleError};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The one cluster both pools serve, and its autoscaler's certificate name.
const CLUSTER: &str = "bench";
const CLIENT: &str = "autoscaler-bench";
/// One boot to standby on KVM; scaled for TCG as the harness does.
const BOOT: Duration = Duration::from_secs(60);
/// How often the console and the provider's labels are read while a demand is served:
/// the resolution of the wall times.
const POLL: Duration = Duration::from_millis(10);

type QemuPool = Pool<QemuProvider, NodeApi>;

#[derive(Debug, thiserror::Error)]
pub enum PoolBenchError {
    #[error("start the K3s server double")]
    ServerDouble(#[source] ServerDoubleError),
    #[error("make the run's pool CA and certificates")]
    Pki(#[source] PkiError),
    #[error("create a scratch folder")]
    TempDir(#[source] std::io::Error),
    #[error("write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the cluster's settings: {0}")]
    Cluster(String),
    #[error("open the qemu provider's state directory")]
    Qemu(#[source] QemuError),
    #[error("set up the controller's node API client")]
    NodeApi(#[source] NodeApiError),
    #[error("pool {pool}: the controller")]
    Controller {
        pool: String,
        #[source]
        source: ControllerError,
    },
    #[error("pool {pool}: the qemu provider")]
    Provider {
        pool: String,
        #[source]
        source: ProviderError,
    },
    #[error("the autoscaler's node group")]
    Identity(#[source] IdentityError),
    #[error("bind the gRPC port on the loopback")]
    Bind(#[source] std::io::Error),
    #[error("connect to the pool's gRPC server at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("pool {pool}: NodeGroupIncreaseSize")]
    IncreaseSize {
        pool: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("pool {pool}: the gRPC server")]
    Serve {
        pool: String,
        #[source]
        source: ServeError,
    },
    #[error("pool {pool}: a task of the benchmark")]
    Task {
        pool: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("pool {pool}, run {run}: {what}; servers: {servers}; the console ends:\n{tail}")]
    NotReached {
        pool: String,
        run: usize,
        what: String,
        servers: String,
        tail: String,
    },
}

pub struct PoolBenchOptions {
    /// A .raw or .qcow2 image whose `k3s` is the K3s agent double.
    pub image: PathBuf,
    pub runs: usize,
}

/// One demand served. Wall times are seconds from sending `NodeGroupIncreaseSize`, as
/// seen on the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    /// The server that took the demand.
    pub server: String,
    /// Until the gRPC answer. Warm: after the node joined. Cold: once the server is created.
    pub answered: f64,
    /// Until the controller labelled the server `active`: it confirmed `joined` through the
    /// node API.
    pub active: f64,
    /// What the console showed (the `joined` milestone, the agent double's verdict).
    pub console: AfterApply,
}

impl Demand {
    /// Until PID1's `[basalt] joined` line was seen on the console.
    pub fn joined(&self) -> Option<f64> {
        self.console.joined.map(|j| j.0)
    }

    /// Until the agent double's `ca-check passed` line was seen on the console.
    pub fn agent(&self) -> Option<f64> {
        self.console.agent.as_ref().map(|a| a.0)
    }
}

/// A warm promote and a cold start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolRun {
    pub warm: Demand,
    pub cold: Demand,
}

/// Everything one `bench pool` measured, and what it ran on.
pub struct PoolBench {
    pub image: PathBuf,
    pub accel: Accel,
    pub runs: Vec<PoolRun>,
}

/// Runs `runs` pairs of a warm promote and a cold start.
pub fn run(opts: &PoolBenchOptions) -> Result<PoolBench, PoolBenchError> {
    let accel = basalt_qemu::detect_accel();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(PoolBenchError::Runtime)?;
    let runs = rt.block_on(async {
        let env = Env::new(&opts.image, accel)?;
        let mut runs = vec![];
        for n in 1..=opts.runs.max(1) {
            eprintln!("basalt: bench pool run {n}: warm");
            let warm = env.demand(Start::Warm, n).await?;
            eprintln!("basalt: bench pool run {n}: cold");
            let cold = env.demand(Start::Cold, n).await?;
            runs.push(PoolRun { warm, cold });
        }
        Ok::<_, PoolBenchError>(runs)
    })?;
    Ok(PoolBench {
        image: opts.image.clone(),
        accel,
        runs,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Warm,
    Cold,
}

impl Start {
    fn name(self) -> &'static str {
        match self {
            Start::Warm => "warm",
            Start::Cold => "cold",
        }
    }
}

/// What every demand shares: the server double, the pool CA with the gRPC server's and the
/// autoscaler's certificates, the image, a scratch folder for the providers' states.
struct Env {
    image: PathBuf,
    accel: Accel,
    server: K3sServerDouble,
    dir: tempfile::TempDir,
    ca: Ca,
    client: Issued,
}

impl Env {
    fn new(image: &Path, accel: Accel) -> Result<Env, PoolBenchError> {
        let server = K3sServerDouble::start("127.0.0.1:0").map_err(PoolBenchError::ServerDouble)?;
        let dir = tempfile::tempdir().map_err(PoolBenchError::TempDir)?;
        let ca = Ca::generate().map_err(PoolBenchError::Pki)?;
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(|e| PoolBenchError::Write(path, e))
        };
        write("ca.pem", ca.cert_pem())?;
        ca.write(&dir.path().join("ca"), false)
            .map_err(PoolBenchError::Pki)?;
        let issue = |name: &str, role| {
            Validity::days_from_now(1)
                .and_then(|validity| {
                    ca.issue(&CertRequest {
                        name: name.into(),
                        role,
                        validity,
                    })
                })
                .map_err(PoolBenchError::Pki)
        };
        let grpc = issue(
            "basalt-pool",
            Role::Node {
                ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
                dns: vec!["localhost".into()],
            },
        )?;
        write("server.pem", &grpc.cert_pem)?;
        write("server.key", &grpc.key_pem)?;
        let client = issue(CLIENT, Role::Client)?;
        Ok(Env {
            image: image.to_path_buf(),
            accel,
            server,
            dir,
            ca,
            client,
        })
    }

    fn cluster(&self) -> Result<ClusterConfig, PoolBenchError> {
        let url = self.server.url_for("10.0.2.2");
        Ok(ClusterConfig {
            name: CLUSTER.into(),
            server: url
                .parse()
                .map_err(|e| PoolBenchError::Cluster(format!("server {url}: {e}")))?,
            token: self
                .server
                .token("bench")
                .parse()
                .map_err(|e| PoolBenchError::Cluster(format!("token: {e}")))?,
            client_name: CLIENT.into(),
            labels: BTreeMap::new(),
            taints: vec![],
            network: None,
        })
    }

    fn tls_paths(&self) -> TlsPaths {
        let path = |f: &str| self.dir.path().join(f);
        TlsPaths {
            cert: path("server.pem"),
            key: path("server.key"),
            client_ca: path("ca.pem"),
        }
    }

    /// One pool with its controller and gRPC server; one demand; every VM deleted after.
    async fn demand(&self, start: Start, run: usize) -> Result<Demand, PoolBenchError> {
        let pool = format!("bench-{}-{run}", start.name());
        let provider = QemuProvider::open(QemuSettings {
            images: vec![self.image.clone()],
            state_dir: self.dir.path().join(&pool),
            memory_mib: MEMORY_MIB,
            cpus: CPUS,
            firmware: None,
        })
        .map_err(PoolBenchError::Qemu)?;
        let result = self.serve_demand(&provider, &pool, start, run).await;
        // Whatever happened, no VM outlives its pool.
        if let Ok(servers) = provider.servers(&pool).await {
            for s in servers {
                if let Err(e) = provider.delete(&s.id).await {
                    eprintln!("basalt: bench pool: delete VM {}: {e}", s.name);
                }
            }
        }
        result
    }

    async fn serve_demand(
        &self,
        provider: &QemuProvider,
        pool: &str,
        start: Start,
        run: usize,
    ) -> Result<Demand, PoolBenchError> {
        let boot = self.accel.scale(BOOT);
        let controller_err = |source| PoolBenchError::Controller {
            pool: pool.into(),
            source,
        };
        let max = 1;
        let controller = Controller::start(
            provider.clone(),
            NodeApi::new(&self.ca).map_err(PoolBenchError::NodeApi)?,
            Ca::load(&self.dir.path().join("ca")).map_err(PoolBenchError::Pki)?,
            Settings {
                pool: pool.into(),
                standby: match start {
                    Start::Warm => 1,
                    Start::Cold => 0,
                },
                max,
                standby_timeout: boot * 3,
                promote_timeout: boot * 2,
                tick: Duration::from_secs(1),
                lock_ttl: Duration::from_secs(3600),
                holder: holder_id(),
                clusters: vec![self.cluster()?],
            },
        )
        .await
        .map_err(controller_err)?;
        let backend: Arc<QemuPool> = Arc::new(Pool {
            controller,
            templates: BTreeMap::new(),
        });
        let stop = CancellationToken::new();
        let reconcile = tokio::spawn({
            let backend = backend.clone();
            let stop = stop.clone();
            async move { backend.controller.run(stop).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(PoolBenchError::Bind)?;
        let addr = listener.local_addr().map_err(PoolBenchError::Bind)?;
        let identities = Identities::new(
            pool,
            vec![ClusterIdentity {
                cluster: CLUSTER.into(),
                client_cert_name: CLIENT.into(),
                min: 0,
                max,
            }],
        )
        .map_err(PoolBenchError::Identity)?;
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let grpc = tokio::spawn({
            let paths = self.tls_paths();
            let backend = backend.clone();
            async move {
                serve(listener, &paths, identities, backend, async move {
                    let _ = shutdown_rx.await;
                })
                .await
            }
        });

        let measured = async {
            let client = self.client(addr, boot * 3).await?;
            let before = match start {
                Start::Warm => Some(self.standby(provider, pool, run, boot * 3).await?),
                Start::Cold => None,
            };
            measure(provider, client, pool, run, before, boot * 3).await
        }
        .await;

        stop.cancel();
        let _ = shutdown.send(());
        let task_err = |source| PoolBenchError::Task {
            pool: pool.into(),
            source,
        };
        let stopped = reconcile.await.map_err(task_err)?;
        let served = grpc.await.map_err(task_err)?;
        let demand = measured?;
        stopped.map_err(controller_err)?;
        served.map_err(|source| PoolBenchError::Serve {
            pool: pool.into(),
            source,
        })?;
        Ok(demand)
    }

    /// cluster-autoscaler's side: a gRPC client with its certificate of the pool CA.
    async fn client(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<CloudProviderClient<Channel>, PoolBenchError> {
        let connect = |source| PoolBenchError::Connect { addr, source };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.cert_pem()))
            .domain_name("localhost")
            .identity(Identity::from_pem(
                &self.client.cert_pem,
                &self.client.key_pem,
            ));
        let channel = Channel::from_shared(format!("https://{addr}"))
            .map_err(|e| PoolBenchError::Cluster(format!("gRPC address {addr}: {e}")))?
            .tls_config(tls)
            .map_err(connect)?
            .timeout(timeout)
            .connect()
            .await
            .map_err(connect)?;
        Ok(CloudProviderClient::new(channel))
    }

    /// Waits for the warm pool's one standby; returns it.
    async fn standby(
        &self,
        provider: &QemuProvider,
        pool: &str,
        run: usize,
        timeout: Duration,
    ) -> Result<Server, PoolBenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let servers = list(provider, pool).await?;
            if let Some(s) = servers
                .iter()
                .find(|s| s.state() == Some(ServerState::Standby))
            {
                return Ok(s.clone());
            }
            if Instant::now() > deadline {
                return Err(not_reached(
                    provider,
                    pool,
                    run,
                    format!("no standby within {timeout:?}"),
                    &servers,
                    None,
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn list(provider: &QemuProvider, pool: &str) -> Result<Vec<Server>, PoolBenchError> {
    provider
        .servers(pool)
        .await
        .map_err(|source| PoolBenchError::Provider {
            pool: pool.into(),
            source,
        })
}

fn console(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The error for a demand that did not get as far as `what`, with the servers' states and
/// the last lines of the console of the server that took it (or the first server).
fn not_reached(
    provider: &QemuProvider,
    pool: &str,
    run: usize,
    what: String,
    servers: &[Server],
    name: Option<&str>,
) -> PoolBenchError {
    let shown: Vec<String> = servers
        .iter()
        .map(|s| {
            format!(
                "{}={}",
                s.name,
                s.state().map_or("unknown", ServerState::as_str)
            )
        })
        .collect();
    let name = name.or(servers.first().map(|s| s.name.as_str()));
    let tail = name
        .and_then(|n| provider.inspect(n).ok().flatten())
        .map(|info| {
            let text = console(&info.console);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        })
        .unwrap_or_default();
    PoolBenchError::NotReached {
        pool: pool.into(),
        run,
        what,
        servers: format!("[{}]", shown.join(", ")),
        tail,
    }
}

/// Sends the demand and, while it is served, watches the server that takes it (the
/// standby `before`, or the one created for the cluster): its labels until `active`, its
/// console until the `joined` milestone and the agent double's verdict.
async fn measure(
    provider: &QemuProvider,
    mut client: CloudProviderClient<Channel>,
    pool: &str,
    run: usize,
    before: Option<Server>,
    budget: Duration,
) -> Result<Demand, PoolBenchError> {
    // The console from where it stood at the demand (a cold server's from its start).
    let mut from = 0;
    let mut console_path = None;
    if let Some(s) = &before {
        if let Some(info) = provider.inspect(&s.name).map_err(PoolBenchError::Qemu)? {
            from = console(&info.console).len();
            console_path = Some(info.console);
        }
    }
    let id = format!("{pool}-{CLUSTER}");
    let sent = Instant::now();
    let call = tokio::spawn(async move {
        let r = client
            .node_group_increase_size(pb::NodeGroupIncreaseSizeRequest { id, delta: 1 })
            .await;
        (r, sent.elapsed().as_secs_f64())
    });
    let mut answered = None;
    let mut active = None;
    let mut seen = AfterApply::default();
    let mut server: Option<String> = before.map(|s| s.name);
    let mut call = Some(call);
    loop {
        if let Some(c) = call.take_if(|c| c.is_finished()) {
            let (r, took) = c.await.map_err(|source| PoolBenchError::Task {
                pool: pool.into(),
                source,
            })?;
            r.map_err(|source| PoolBenchError::IncreaseSize {
                pool: pool.into(),
                source: Box::new(source),
            })?;
            answered = Some(took);
        }
        let servers = list(provider, pool).await?;
        let taken = servers.iter().find(|s| {
            s.labels.get(LABEL_CLUSTER).map(String::as_str) == Some(CLUSTER)
                && server.as_ref().is_none_or(|n| *n == s.name)
        });
        if let Some(s) = taken {
            if server.is_none() {
                server = Some(s.name.clone());
            }
            if active.is_none() && s.state() == Some(ServerState::Active) {
                active = Some(sent.elapsed().as_secs_f64());
            }
            if console_path.is_none() {
                console_path = provider
                    .inspect(&s.name)
                    .map_err(PoolBenchError::Qemu)?
                    .map(|i| i.console);
            }
        }
        if let Some(path) = &console_path {
            let text = console(path);
            seen.update(text.get(from..).unwrap_or(&text), sent.elapsed());
        }
        if let Some((_, verdict)) = &seen.agent {
            if *verdict != AgentLine::CaCheckPassed {
                return Err(not_reached(
                    provider,
                    pool,
                    run,
                    format!("the agent double said {verdict:?}"),
                    &servers,
                    server.as_deref(),
                ));
            }
        }
        if let (Some(answered), Some(active), Some(_), Some(_), Some(server)) =
            (answered, active, seen.joined, &seen.agent, &server)
        {
            return Ok(Demand {
                server: server.clone(),
                answered,
                active,
                console: seen,
            });
        }
        if sent.elapsed() > budget {
            let missing: Vec<&str> = [
                ("the gRPC answer", answered.is_some()),
                ("the `active` label", active.is_some()),
                ("`[basalt] joined` on the console", seen.joined.is_some()),
                ("the agent double's ca-check", seen.agent.is_some()),
            ]
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(what, _)| what)
            .collect();
            return Err(not_reached(
                provider,
                pool,
                run,
                format!("not seen within {budget:?}: {}", missing.join(", ")),
                &servers,
                server.as_deref(),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A figure of the report: its label and how to read it off a demand.
type Figure = (&'static str, fn(&Demand) -> Option<f64>);

/// Milliseconds from the demand.
const FIGURES: [Figure; 4] = [
    ("gRPC answer", |d| Some(d.answered * 1e3)),
    ("`joined` on the console", |d| d.joined().map(|s| s * 1e3)),
    ("`active` label (controller saw joined)", |d| {
        Some(d.active * 1e3)
    }),
    ("agent double's CA check passed", |d| {
        d.agent().map(|s| s * 1e3)
    }),
];

impl PoolBench {
    fn spread(&self, start: Start, read: fn(&Demand) -> Option<f64>) -> Option<Spread> {
        Spread::of(self.runs.iter().filter_map(|r| {
            read(match start {
                Start::Warm => &r.warm,
                Start::Cold => &r.cold,
            })
        }))
    }

    /// Median cold over median warm, for demand → `joined` (console) and → the agent.
    pub fn ratios(&self) -> Option<(f64, f64)> {
        let median = |start, read| self.spread(start, read).map(|s| s.median);
        let joined = median(Start::Cold, FIGURES[1].1)? / median(Start::Warm, FIGURES[1].1)?;
        let agent = median(Start::Cold, FIGURES[3].1)? / median(Start::Warm, FIGURES[3].1)?;
        Some((joined, agent))
    }
}

fn ms(s: Option<Spread>) -> String {
    s.map_or("not seen".into(), |s| {
        format!("{:.0} ms ({:.0}–{:.0})", s.median, s.min, s.max)
    })
}

impl std::fmt::Display for PoolBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "basalt bench pool {}", self.image.display())?;
        writeln!(f, "  machine: {}", super::machine())?;
        writeln!(
            f,
            "  QEMU: accelerator {}, the qemu provider (SeaBIOS, {MEMORY_MIB} MiB, {CPUS} vCPUs, a qcow2 overlay, config over fw_cfg), \
one VM at a time",
            self.accel.name()
        )?;
        writeln!(
            f,
            "  demand: NodeGroupIncreaseSize (delta 1) over mutual TLS to the pool's externalgrpc server, the controller in process"
        )?;
        writeln!(
            f,
            "  agent: the K3s agent double (the image's `k3s`; checks the server's CA against the token as `k3s agent` does), \
joining the K3s server double on the host's loopback. Not K3s: K3s's own start-up is not in these figures."
        )?;
        writeln!(
            f,
            "  runs: {}, each a warm promote (standby = 1, max = 1: a booted standby waits) and a cold start \
(standby = 0, max = 1: the call creates a server, which boots to standby and is then joined)",
            self.runs.len()
        )?;
        writeln!(f)?;
        for start in [Start::Warm, Start::Cold] {
            writeln!(
                f,
                "  {}: demand→joined {}, demand→agent {}",
                start.name(),
                ms(self.spread(start, FIGURES[1].1)),
                ms(self.spread(start, FIGURES[3].1)),
            )?;
        }
        match self.ratios() {
            Some((joined, agent)) => writeln!(
                f,
                "  cold/warm ratio: joined {joined:.1}x, agent {agent:.1}x (medians)"
            )?,
            None => writeln!(f, "  cold/warm ratio: not measured")?,
        }
        writeln!(f)?;
        writeln!(
            f,
            "  {:<42}{:<28}cold",
            "demand → …, median (min–max)", "warm"
        )?;
        for (label, read) in FIGURES {
            writeln!(
                f,
                "  {label:<42}{:<28}{}",
                ms(self.spread(Start::Warm, read)),
                ms(self.spread(Start::Cold, read))
            )?;
        }
        writeln!(f)?;
        let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0}", v * 1e3));
        for (n, r) in self.runs.iter().enumerate() {
            for (start, d) in [(Start::Warm, &r.warm), (Start::Cold, &r.cold)] {
                writeln!(
                    f,
                    "  run {} {}: {} answered {:.0} ms, joined {} ms, active {:.0} ms, agent {} ms",
                    n + 1,
                    start.name(),
                    d.server,
                    d.answered * 1e3,
                    opt(d.joined()),
                    d.active * 1e3,
                    opt(d.agent()),
                )?;
            }
        }
        writeln!(f)?;
        writeln!(
            f,
            "  wall times count from the host sending the call; the console and the labels are polled every {} ms, \
so they are late by up to that and by the serial port's delivery. A warm call answers once the node has joined; \
a cold one once the server is created.",
            POLL.as_millis()
        )
    }
}

/// The `warm:`/`cold:` lines of a report: (demand→joined, demand→agent) medians in ms.
pub fn parse_summary(report: &str, start: &str) -> Option<(f64, f64)> {
    let line = report
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{start}: ")))?;
    let median = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some((median("demand→joined ")?, median("demand→agent ")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(answered: f64, active: f64, joined: f64, agent: f64) -> Demand {
        Demand {
            server: "bench-x-1-0001".into(),
            answered,
            active,
            console: AfterApply {
                joined: Some((joined, 4.0)),
                agent_exec_ms: Some(10),
                agent: Some((agent, AgentLine::CaCheckPassed)),
                ..AfterApply::default()
            },
        }
    }

    #[test]
    fn the_report_gives_both_starts_and_their_ratio() {
        let bench = PoolBench {
            image: "join.qcow2".into(),
            accel: Accel::Tcg,
            runs: vec![
                PoolRun {
                    warm: demand(0.3, 0.32, 0.25, 1.0),
                    cold: demand(0.1, 40.0, 39.0, 41.0),
                },
                PoolRun {
                    warm: demand(0.5, 0.52, 0.45, 2.0),
                    cold: demand(0.2, 60.0, 59.0, 61.0),
                },
                PoolRun {
                    warm: demand(0.4, 0.42, 0.35, 1.5),
                    cold: demand(0.1, 50.0, 49.0, 51.0),
                },
            ],
        };
        let text = bench.to_string();
        for want in [
            "accelerator tcg",
            "the K3s agent double",
            "warm: demand→joined 350 ms (250–450), demand→agent 1500 ms (1000–2000)\n",
            "cold: demand→joined 49000 ms (39000–59000), demand→agent 51000 ms (41000–61000)\n",
            "cold/warm ratio: joined 140.0x, agent 34.0x",
            "run 2 cold: bench-x-1-0001 answered 200 ms, joined 59000 ms, active 60000 ms, agent 61000 ms",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert_eq!(parse_summary(&text, "warm"), Some((350.0, 1500.0)));
        assert_eq!(parse_summary(&text, "cold"), Some((49000.0, 51000.0)));
        assert_eq!(parse_summary(&text, "hot"), None);
    }

    #[test]
    fn a_report_without_runs_says_nothing_was_seen() {
        let bench = PoolBench {
            image: "join.qcow2".into(),
            accel: Accel::Tcg,
            runs: vec![],
        };
        let text = bench.to_string();
        assert!(text.contains("warm: demand→joined not seen"), "{text}");
        assert!(text.contains("cold/warm ratio: not measured"), "{text}");
        assert_eq!(parse_summary(&text, "warm"), None);
    }
}
