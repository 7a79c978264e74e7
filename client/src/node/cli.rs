//! `basalt node`: the arguments and what each subcommand prints.

use super::{render, ClientOptions, Endpoint, NodeClient, NodeError};
use basalt_api::node::JoinState;
use std::io::Write;
use std::path::PathBuf;

/// Talk to a node's API over mutual TLS.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The node API's address: HOST:PORT (port 50000 if left out).
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Endpoint,
    /// The pool CA certificate that signed the node's certificate.
    #[arg(long, value_name = "CA.pem")]
    pub ca: PathBuf,
    /// Our client certificate, issued by the pool CA (`basalt pki issue client`).
    #[arg(long, value_name = "CERT.pem")]
    pub cert: PathBuf,
    /// The client certificate's private key.
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
    /// The node's name as in its certificate [default: the endpoint's host]. Needed when
    /// the endpoint is an address the certificate does not name (e.g. a forwarded port).
    #[arg(long, value_name = "NODE_NAME")]
    pub name: Option<String>,
    /// Print the node's JSON answer as it came instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub what: NodeCmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum NodeCmd {
    /// Boot timeline, slot, versions, addresses, services and the join state.
    Status,
    /// Send a machine config (TOML) to the node; with a [cluster] table it joins. Exits
    /// non-zero if the node did not apply it or could not join.
    Apply {
        /// The machine config file.
        file: PathBuf,
    },
    /// A service's log lines.
    Logs {
        service: String,
        /// Keep printing new lines until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Reboot the node.
    Reboot,
    /// Power the node off.
    Shutdown,
    /// Whether the node answers, and its last boot milestone.
    Health,
    /// Prometheus metrics, as text.
    Metrics,
    /// Upgrade the node's other root slot from a bundle (`basalt build` writes one): its
    /// sha256 is computed here and checked by the node, which writes and verifies the
    /// slot and boots it once at the next boot; the slot becomes the default only when
    /// it proves healthy, else the node rolls back by itself.
    ///
    /// Given an `http://` or `https://` URL instead of a file, the node fetches the
    /// bundle itself (`--sha256` is then required: the node checks what it fetched
    /// against it before anything is switched).
    Upgrade {
        /// The bundle file (`*.bundle.tar`), or its URL for the node to fetch.
        bundle: String,
        /// The bundle's sha256 (64 hex digits): required with a URL; with a file, checked
        /// against the file's before it is sent.
        #[arg(long)]
        sha256: Option<String>,
        /// Reboot into the new slot at once.
        #[arg(long)]
        reboot: bool,
        /// Install an older version than the running one.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Make the other slot the default again, if it holds an image that was good.
    Rollback {
        /// Reboot into it at once.
        #[arg(long)]
        reboot: bool,
    },
}

/// Runs one `basalt node` subcommand, printing to stdout.
pub fn run(args: NodeArgs) -> Result<(), NodeError> {
    let client = NodeClient::new(&ClientOptions {
        endpoint: args.endpoint,
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        name: args.name,
    })?;
    let json = args.json;
    let text = match args.what {
        NodeCmd::Status => {
            let r = client.status()?;
            pick(json, r.raw, || render::status(&r.body))
        }
        NodeCmd::Apply { file } => {
            let config = std::fs::read_to_string(&file)
                .map_err(|source| NodeError::Read { path: file, source })?;
            let r = client.apply(config)?;
            print(&pick(json, r.raw, || render::apply(&r.body)))?;
            if !r.body.applied {
                return Err(NodeError::NotApplied(r.body.message));
            }
            if matches!(
                r.body.join.state,
                JoinState::Failed | JoinState::CrashLooping
            ) {
                let why = r.body.join.last_error.unwrap_or(r.body.message);
                return Err(NodeError::JoinFailed(why));
            }
            return Ok(());
        }
        NodeCmd::Logs { service, follow } => {
            let stdout = std::io::stdout();
            return client.logs(&service, follow, &mut stdout.lock());
        }
        NodeCmd::Reboot => {
            let r = client.reboot()?;
            pick(json, r.raw, || render::accepted("reboot", &r.body))
        }
        NodeCmd::Shutdown => {
            let r = client.shutdown()?;
            pick(json, r.raw, || render::accepted("shutdown", &r.body))
        }
        NodeCmd::Health => {
            let r = client.health()?;
            pick(json, r.raw, || {
                format!(
                    "{}: {} ({})\n",
                    client.name(),
                    r.body.status,
                    r.body.milestone
                )
            })
        }
        NodeCmd::Metrics => client.metrics()?,
        NodeCmd::Upgrade {
            bundle,
            sha256,
            reboot,
            allow_downgrade,
        } => {
            let r = match upgrade_source(&bundle, sha256.as_deref())? {
                UpgradeSource::Url { url, sha256 } => {
                    client.upgrade_url(url, &sha256, allow_downgrade, reboot)?
                }
                UpgradeSource::File(path) => client.upgrade(&path, allow_downgrade, reboot)?,
            };
            pick(json, r.raw, || format!("{}\n", r.body.message))
        }
        NodeCmd::Rollback { reboot } => {
            let r = client.rollback(reboot)?;
            pick(json, r.raw, || format!("{}\n", r.body.message))
        }
    };
    print(&text)
}

#[derive(Debug, PartialEq, Eq)]
enum UpgradeSource<'a> {
    File(PathBuf),
    Url { url: &'a str, sha256: String },
}

/// A URL (the node fetches it; `--sha256` required) or a file (hashed here; a given
/// `--sha256` must match it).
fn upgrade_source<'a>(
    bundle: &'a str,
    sha256: Option<&str>,
) -> Result<UpgradeSource<'a>, NodeError> {
    let sha256 = match sha256 {
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(s.to_ascii_lowercase())
        }
        Some(s) => {
            return Err(NodeError::Usage(format!(
                "--sha256 {s:?} is not a sha256 (64 hex digits)"
            )))
        }
        None => None,
    };
    if bundle.starts_with("http://") || bundle.starts_with("https://") {
        let sha256 = sha256.ok_or_else(|| {
            NodeError::Usage(format!(
                "{bundle}: a URL needs --sha256 (the bundle's, e.g. from sha256sum): the \
                 node checks what it fetches against it"
            ))
        })?;
        return Ok(UpgradeSource::Url {
            url: bundle,
            sha256,
        });
    }
    let path = PathBuf::from(bundle);
    if let Some(want) = sha256 {
        let got = super::sha256_file(&path).map_err(|source| NodeError::Bundle {
            path: path.clone(),
            source,
        })?;
        if got != want {
            return Err(NodeError::Usage(format!(
                "{bundle}: its sha256 is {got}, not the --sha256 given ({want})"
            )));
        }
    }
    Ok(UpgradeSource::File(path))
}

fn pick(json: bool, raw: String, human: impl FnOnce() -> String) -> String {
    if json {
        let mut raw = raw;
        if !raw.ends_with('\n') {
            raw.push('\n');
        }
        raw
    } else {
        human()
    }
}

fn print(text: &str) -> Result<(), NodeError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(NodeError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_needs_its_sha256_and_a_file_given_one_must_match_it() {
        let sha = "AB".repeat(32);
        assert_eq!(
            upgrade_source("https://example.com/v2.bundle.tar", Some(&sha)).expect("url"),
            UpgradeSource::Url {
                url: "https://example.com/v2.bundle.tar",
                sha256: "ab".repeat(32)
            }
        );
        let err = upgrade_source("http://10.0.2.2:8000/v2.bundle.tar", None).unwrap_err();
        assert!(err.to_string().contains("needs --sha256"), "{err}");
        let err = upgrade_source("http://h/b", Some("123")).unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("v2.bundle.tar");
        std::fs::write(&file, b"bundle").expect("write");
        let name = file.to_str().expect("utf8");
        assert_eq!(
            upgrade_source(name, None).expect("file"),
            UpgradeSource::File(file.clone())
        );
        let real = super::super::sha256_file(&file).expect("sha");
        assert_eq!(
            upgrade_source(name, Some(&real)).expect("file"),
            UpgradeSource::File(file.clone())
        );
        let err = upgrade_source(name, Some(&sha)).unwrap_err();
        assert!(err.to_string().contains("not the --sha256 given"), "{err}");
    }
}
