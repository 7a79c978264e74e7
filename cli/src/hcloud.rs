//! `basalt hcloud`: upload an image as a Hetzner Cloud snapshot, list, prune and clean
//! up. The work is in `basalt-hcloud`; this is the arguments, a tokio runtime, Ctrl-C,
//! and what each subcommand prints.

use basalt_hcloud::client::{self, Client, Timing, TokenError};
use basalt_hcloud::ops::{self, OpsError, Snapshot};
use basalt_hcloud::upload::{self, UploadError, UploadOptions};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct HcloudArgs {
    /// Read the API token from this file instead of HCLOUD_TOKEN. The endpoint is
    /// HCLOUD_ENDPOINT, else Hetzner's (https://api.hetzner.cloud/v1).
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    what: HcloudCmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum HcloudCmd {
    /// Upload OUT/<name>.raw.zst (or .raw) as a snapshot through the rescue system: the
    /// disk is checked against the manifest's sha256 before the snapshot is taken; the
    /// temporary server and key are always deleted.
    Upload(UploadArgs),
    /// basalt's snapshots, newest first, with size, version and sha256.
    Images {
        /// A label selector [default: basalt.io/image, every basalt snapshot].
        #[arg(long)]
        selector: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Keep the newest N snapshots and delete the others, except those a server still
    /// exists from.
    Prune {
        #[arg(long)]
        keep: usize,
        /// A label selector [default: basalt.io/image]; e.g. basalt.io/image=k3s-node.
        #[arg(long)]
        selector: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete servers and SSH keys an interrupted upload left behind (label
    /// basalt.io/created-by=basalt-upload), older than --older-than.
    Cleanup {
        /// e.g. 30m, 2h, 1d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        older_than: Duration,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// OUT/<name>.raw.zst or .raw.
    image: PathBuf,
    /// The build's manifest [default: manifest.json beside the image].
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    #[arg(long, default_value = "fsn1")]
    location: String,
    /// The temporary server's type; its disk must hold the raw image.
    #[arg(long, default_value = "cx22")]
    server_type: String,
    /// A label for the snapshot, KEY=VALUE (repeatable); basalt.io/* are basalt's.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    #[arg(long)]
    description: Option<String>,
    /// The rescue system's SSH port [default: BASALT_HCLOUD_SSH_PORT, else 22].
    #[arg(long, value_name = "PORT")]
    ssh_port: Option<u16>,
    /// Longest wait for the rescue system's SSH, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    ssh_timeout: u64,
    /// Print the snapshot as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HcloudCliError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("BASALT_HCLOUD_SSH_PORT={0:?} is not a port")]
    SshPort(String),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("encode JSON")]
    Json(#[source] serde_json::Error),
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    basalt_hcloud::labels::parse_user(s).map_err(|e| e.to_string())
}

pub fn run(args: HcloudArgs) -> Result<(), HcloudCliError> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BASALT_LOG")
                .unwrap_or_else(|_| "basalt_hcloud=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let token = client::token_from(args.token_file.as_deref())?;
    let client = Client::new(&client::endpoint_from_env(), &token, Timing::default())
        .map_err(HcloudCliError::Http)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(HcloudCliError::Runtime)?;
    let result = rt.block_on(dispatch(client, args.what));
    drop(rt);
    if let Err(HcloudCliError::Upload(e @ UploadError::Cancelled)) = &result {
        // As `basalt build` does on Ctrl-C: the shell's code for SIGINT, after the cleanup.
        eprintln!("basalt: {e}");
        std::process::exit(130);
    }
    result
}

async fn dispatch(client: Client, cmd: HcloudCmd) -> Result<(), HcloudCliError> {
    match cmd {
        HcloudCmd::Upload(args) => upload_cmd(&client, args).await,
        HcloudCmd::Images { selector, json } => {
            let list = ops::images(&client, selector.as_deref()).await?;
            if json {
                println!("{}", to_json(&list)?);
            } else {
                print_images(&list);
            }
            Ok(())
        }
        HcloudCmd::Prune {
            keep,
            selector,
            json,
        } => {
            let pruned = ops::prune(&client, keep, selector.as_deref()).await?;
            if json {
                println!("{}", to_json(&pruned)?);
            } else {
                println!(
                    "kept {:?}; in use by servers {:?}; deleted {:?}",
                    pruned.kept, pruned.in_use, pruned.deleted
                );
            }
            Ok(())
        }
        HcloudCmd::Cleanup { older_than, json } => {
            let cleaned = ops::cleanup(&client, older_than).await?;
            if json {
                println!("{}", to_json(&cleaned)?);
            } else {
                for s in &cleaned.servers {
                    println!("deleted server {} {} (created {})", s.id, s.name, s.created);
                }
                for k in &cleaned.ssh_keys {
                    println!(
                        "deleted SSH key {} {} (created {})",
                        k.id, k.name, k.created
                    );
                }
                if cleaned.servers.is_empty() && cleaned.ssh_keys.is_empty() {
                    println!("nothing to clean up");
                }
            }
            Ok(())
        }
    }
}

async fn upload_cmd(client: &Client, args: UploadArgs) -> Result<(), HcloudCliError> {
    let UploadArgs {
        image,
        manifest,
        location,
        server_type,
        labels,
        description,
        ssh_port,
        ssh_timeout,
        json,
    } = args;
    let mut opts = UploadOptions::new(image);
    opts.manifest = manifest;
    opts.location = location;
    opts.server_type = server_type;
    opts.labels = labels.into_iter().collect();
    opts.description = description;
    opts.ssh_port = match (ssh_port, std::env::var("BASALT_HCLOUD_SSH_PORT")) {
        (Some(p), _) => p,
        (None, Ok(v)) => v.trim().parse().map_err(|_| HcloudCliError::SshPort(v))?,
        (None, Err(_)) => 22,
    };
    opts.ssh.bound = Duration::from_secs(ssh_timeout);
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("basalt: interrupted; deleting the temporary server and key");
            on_signal.cancel();
        }
    });
    let done = upload::upload(client, &opts, cancel).await?;
    let snap = Snapshot::from(done.snapshot.clone());
    if json {
        println!("{}", to_json(&snap)?);
    } else {
        let mib = done.bytes as f64 / (1024.0 * 1024.0);
        eprintln!(
            "basalt: streamed {mib:.1} MiB in {:.1} s ({:.1} MiB/s)",
            done.stream.as_secs_f64(),
            mib / done.stream.as_secs_f64().max(0.001)
        );
        println!("snapshot {}", snap.id);
        for (k, v) in &snap.labels {
            println!("  {k}={v}");
        }
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, HcloudCliError> {
    serde_json::to_string_pretty(v).map_err(HcloudCliError::Json)
}

fn print_images(list: &[Snapshot]) {
    println!(
        "{:<10} {:<26} {:>8} {:<12} {:<18} {:<34} DESCRIPTION",
        "ID", "CREATED", "SIZE GB", "VERSION", "IMAGE", "SHA256"
    );
    for s in list {
        println!(
            "{:<10} {:<26} {:>8} {:<12} {:<18} {:<34} {}",
            s.id,
            s.created,
            s.image_size_gb.map_or("-".into(), |g| format!("{g:.2}")),
            s.version.as_deref().unwrap_or("-"),
            s.image.as_deref().unwrap_or("-"),
            s.sha256.as_deref().unwrap_or("-"),
            s.description
        );
    }
}
