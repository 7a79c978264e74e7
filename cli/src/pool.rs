//! `basalt pool`: run the warm-pool controller, and talk to a running one. The work is in
//! `basalt-pool` and `basalt-autoscaler`; this is the arguments, a tokio runtime, signals and
//! what each subcommand prints.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use basalt_autoscaler::TlsPaths;
use basalt_client::pki::Ca;
use basalt_hcloud::client::Timing;
use basalt_pool::admin::{self, AdminClient};
use basalt_pool::config::{ListenConfig, PoolConfig, ProviderConfig};
use basalt_pool::controller::{Controller, Settings};
use basalt_pool::hetzner::Hetzner;
use basalt_pool::nodes::NodeApi;
use basalt_pool::provider::Provider;
use basalt_pool::qemu::QemuProvider;
use basalt_pool::serve::{self, Pool};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct PoolArgs {
    #[command(subcommand)]
    what: PoolCmd,
}

#[derive(Debug, clap::Subcommand)]
enum PoolCmd {
    /// Run the controller of pool.toml: keep `standby` nodes booted, promote them when
    /// cluster-autoscaler asks (externalgrpc), serve the pool API. Run one per pool: a
    /// second one on the same pool is refused while the first holds the pool's lock.
    Run {
        #[arg(long, value_name = "POOL.TOML")]
        config: PathBuf,
    },
    /// Every server of the pool with its state, image, age and last error.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        json: bool,
    },
    /// Promote standbys into a cluster (the rest are created cold).
    Promote {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        json: bool,
    },
    /// Delete one server of the pool by name (an active node, or a standby, which is replaced).
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        node: String,
        #[arg(long)]
        json: bool,
    },
}

/// Where the pool API is and who is asking: an admin certificate of the pool CA.
#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// The controller's pool API; its host must be a name in the controller's certificate.
    #[arg(long, default_value = "https://127.0.0.1:8087")]
    endpoint: String,
    /// The pool CA certificate.
    #[arg(long, value_name = "CA.PEM")]
    ca: PathBuf,
    /// A client certificate whose name is one of `[listen] admins`.
    #[arg(long, value_name = "CERT.PEM")]
    cert: PathBuf,
    #[arg(long, value_name = "KEY.PEM")]
    key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolCliError {
    #[error(transparent)]
    Config(#[from] basalt_pool::config::ConfigError),
    #[error("{}: [listen]: missing; `basalt pool run` needs the controller's cert and key", .0.display())]
    NoListen(PathBuf),
    #[error("the pool CA in {}", .0.display())]
    Ca(PathBuf, #[source] basalt_client::pki::PkiError),
    #[error("the node API client")]
    Nodes(#[source] basalt_pool::nodes::NodeApiError),
    #[error(transparent)]
    Provider(#[from] basalt_pool::provider::ProviderError),
    #[error("the qemu provider")]
    Qemu(#[source] basalt_pool::qemu::QemuError),
    #[error(transparent)]
    Controller(#[from] basalt_pool::controller::ControllerError),
    #[error("the clusters as node groups")]
    Identities(#[source] basalt_autoscaler::IdentityError),
    #[error("the controller's TLS")]
    Tls(#[source] basalt_autoscaler::TlsError),
    #[error("listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Api(#[from] admin::ClientError),
}

pub fn run(args: PoolArgs) -> Result<(), PoolCliError> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BASALT_LOG")
                .unwrap_or_else(|_| "basalt_pool=info,basalt_autoscaler=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(PoolCliError::Runtime)?;
    rt.block_on(dispatch(args.what))
}

async fn dispatch(cmd: PoolCmd) -> Result<(), PoolCliError> {
    match cmd {
        PoolCmd::Run { config } => run_controller(&config).await,
        PoolCmd::Status { api, json } => {
            let status = client(&api)?.status().await?;
            print(&status, json, render_status)
        }
        PoolCmd::Promote {
            api,
            cluster,
            count,
            json,
        } => {
            let report = client(&api)?.promote(&cluster, count).await?;
            print(&report, json, |r| {
                format!(
                    "promoted {}; created cold {}; failed {}; not met {}",
                    list(&r["promoted"]),
                    r["cold"],
                    list(&r["failed"]),
                    r["unmet"]
                )
            })
        }
        PoolCmd::Delete { api, node, json } => {
            let done = client(&api)?.delete(&node).await?;
            print(&done, json, |d| {
                format!(
                    "deleted {} ({})",
                    text(&d["deleted"]),
                    text(&d["provider_id"])
                )
            })
        }
    }
}

fn client(api: &ApiArgs) -> Result<AdminClient, PoolCliError> {
    Ok(AdminClient::new(
        &api.endpoint,
        &api.ca,
        &api.cert,
        &api.key,
    )?)
}

fn print(v: &Value, json: bool, human: impl Fn(&Value) -> String) -> Result<(), PoolCliError> {
    if json {
        println!("{v:#}");
    } else {
        println!("{}", human(v));
    }
    Ok(())
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn list(v: &Value) -> String {
    match v.as_array() {
        Some(items) if !items.is_empty() => items.iter().map(text).collect::<Vec<_>>().join(", "),
        _ => "none".into(),
    }
}

fn render_status(s: &Value) -> String {
    let mut out = format!(
        "pool {} ({}): standby target {}, max {}, newest image {}\n",
        text(&s["pool"]),
        text(&s["provider"]),
        s["standby_target"],
        s["max"],
        text(&s["newest_image"]),
    );
    out.push_str(&format!(
        "{:<28} {:<10} {:<12} {:>7}  {:<24} {}\n",
        "NAME", "STATE", "CLUSTER", "AGE", "IMAGE", "LAST ERROR"
    ));
    for server in s["servers"].as_array().into_iter().flatten() {
        let outdated = if server["outdated"].as_bool() == Some(true) {
            " (outdated)"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<28} {:<10} {:<12} {:>6}s  {:<24} {}\n",
            text(&server["name"]),
            text(&server["state"]),
            server["cluster"].as_str().unwrap_or("-"),
            server["age_seconds"],
            format!("{}{outdated}", server["image"].as_str().unwrap_or("-")),
            server["last_error"].as_str().unwrap_or(""),
        ));
    }
    if let Some(e) = s["last_pass_error"].as_str() {
        out.push_str(&format!("last pass: {e}\n"));
    }
    out.trim_end().to_owned()
}

async fn run_controller(path: &Path) -> Result<(), PoolCliError> {
    let config = PoolConfig::load(path)?;
    let listen = config
        .listen
        .clone()
        .ok_or_else(|| PoolCliError::NoListen(path.to_owned()))?;
    let ca = Ca::load(&config.ca_dir).map_err(|e| PoolCliError::Ca(config.ca_dir.clone(), e))?;
    let nodes = NodeApi::new(&ca).map_err(PoolCliError::Nodes)?;
    match &config.provider {
        ProviderConfig::Hetzner(h) => {
            let provider = Hetzner::new(h, Timing::default())?;
            serve_pool(provider, nodes, ca, &config, &listen).await
        }
        ProviderConfig::Qemu(q) => {
            let provider = QemuProvider::open(q.clone()).map_err(PoolCliError::Qemu)?;
            serve_pool(provider, nodes, ca, &config, &listen).await
        }
    }
}

async fn serve_pool<P: Provider>(
    provider: P,
    nodes: NodeApi,
    ca: Ca,
    config: &PoolConfig,
    listen: &ListenConfig,
) -> Result<(), PoolCliError> {
    let identities = serve::identities(config).map_err(PoolCliError::Identities)?;
    let tls = TlsPaths {
        cert: listen.cert.clone(),
        key: listen.key.clone(),
        client_ca: config.ca_dir.join(basalt_client::pki::CA_CERT_FILE),
    }
    .server_config()
    .map_err(PoolCliError::Tls)?;
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| PoolCliError::Listen(addr, e))
    };
    // The lock first: a second controller on the pool is told so, not that a port is taken.
    let controller = Controller::start(provider, nodes, ca, Settings::from_config(config)).await?;
    let (grpc_listener, api_listener) = (bind(listen.grpc).await?, bind(listen.api).await?);
    let pool = Arc::new(Pool {
        controller,
        templates: serve::templates(config),
    });
    let stop = CancellationToken::new();
    let grpc = tokio::spawn(basalt_autoscaler::serve_with_config(
        grpc_listener,
        tls.clone(),
        identities,
        pool.clone(),
        stop.clone().cancelled_owned(),
    ));
    let admins: BTreeSet<String> = listen.admins.iter().cloned().collect();
    let api = tokio::spawn(admin::serve(
        api_listener,
        tls,
        admins,
        pool.clone(),
        stop.clone().cancelled_owned(),
    ));
    tokio::spawn(stop_on_signal(stop.clone()));
    eprintln!(
        "basalt: pool {} ({}): standby {}, max {}; externalgrpc on {}, pool API on {}",
        config.name,
        pool.controller.provider().kind(),
        config.standby,
        config.max,
        listen.grpc,
        listen.api
    );
    let result = pool.controller.run(stop.clone()).await;
    stop.cancel();
    let _ = grpc.await;
    let _ = api.await;
    eprintln!("basalt: pool {}: controller stopped", config.name);
    Ok(result?)
}

/// SIGINT or SIGTERM stop the controller between passes; servers stay as they are.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    stop.cancel();
}
