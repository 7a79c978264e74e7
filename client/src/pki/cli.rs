//! `basalt pki`: the arguments and what each subcommand prints.

use super::{CertRequest, PkiError, Role, Validity, DEFAULT_LEAF_DAYS};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum PkiCmd {
    /// Create a pool CA: DIR/ca.pem and DIR/ca.key (0600); ECDSA P-256, valid 10 years.
    Init {
        dir: PathBuf,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the pool CA, with a new key: OUT/NAME.pem, OUT/NAME.key.
    Issue {
        #[command(subcommand)]
        what: IssueCmd,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum IssueCmd {
    /// A client certificate (clientAuth) for `basalt node`, with its role.
    Client {
        /// The subject's common name and the files' name.
        name: String,
        /// admin: every route (apply, reboot, poweroff); read: status, health, logs and
        /// metrics only.
        #[arg(long, value_enum, default_value_t = ClientRole::Admin)]
        role: ClientRole,
        #[command(flatten)]
        common: IssueArgs,
    },
    /// A node's API certificate (serverAuth); NAME is always a DNS name in it.
    Node {
        /// The node's name: its certificate's common name and first DNS name.
        name: String,
        /// An address the node is reached at (repeatable).
        #[arg(long = "ip", value_name = "IP", num_args = 1..)]
        ips: Vec<IpAddr>,
        /// Another DNS name of the node (repeatable).
        #[arg(long = "dns", value_name = "NAME", num_args = 1..)]
        dns: Vec<String>,
        #[command(flatten)]
        common: IssueArgs,
    },
}

/// `--role` of a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientRole {
    Admin,
    Read,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The CA folder (from `basalt pki init`).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Where to write NAME.pem and NAME.key.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
    days: u32,
    /// Replace existing NAME.pem and NAME.key.
    #[arg(long)]
    force: bool,
}

/// Runs one `basalt pki` subcommand; prints the files written, certificate first.
pub fn run(cmd: PkiCmd) -> Result<(), PkiError> {
    let (cert, key) = match cmd {
        PkiCmd::Init { dir, force } => {
            let (_, cert, key) = super::init(&dir, force)?;
            (cert, key)
        }
        PkiCmd::Issue {
            what: IssueCmd::Client { name, role, common },
        } => {
            let role = match role {
                ClientRole::Admin => Role::Client,
                ClientRole::Read => Role::ReadClient,
            };
            issue(name, role, &common)?
        }
        PkiCmd::Issue {
            what:
                IssueCmd::Node {
                    name,
                    ips,
                    dns,
                    common,
                },
        } => issue(name, Role::Node { ips, dns }, &common)?,
    };
    println!("{}", cert.display());
    println!("{}", key.display());
    Ok(())
}

fn issue(name: String, role: Role, args: &IssueArgs) -> Result<(PathBuf, PathBuf), PkiError> {
    let req = CertRequest {
        name,
        role,
        validity: Validity::days_from_now(args.days)?,
    };
    super::issue(Path::new(&args.ca), &args.out, &req, args.force)
}
