//! The pool PKI and cluster setup the node API tests share: a pool CA, the node's
//! certificate, client certificates (good, read-only, expired, from a stranger CA), a
//! machine config carrying the node's API material, and node API clients reaching the
//! node through a QEMU host forward.

use basalt_client::node::{ClientOptions, Endpoint, NodeClient};
use basalt_client::pki::{Ca, CertRequest, Issued, Role, Validity};
use std::path::PathBuf;

/// A pool CA, the node's certificate (named `name`), and client certificates written
/// as `<who>.pem` / `<who>.key` beside `ca.pem` in `dir`.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub node: Issued,
    pub name: String,
}

impl Pki {
    /// The CA and the node's certificate for `name`; no client yet (see [`Pki::issue`]).
    pub fn new(name: &str) -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate()?;
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem())?;
        let node = ca.issue(&CertRequest {
            name: name.into(),
            role: Role::Node {
                ips: vec![],
                dns: vec![],
            },
            validity: Validity::days_from_now(30)?,
        })?;
        Ok(Pki {
            dir,
            ca,
            node,
            name: name.into(),
        })
    }

    /// The CA, the node's certificate, and a 30-day client certificate for each of
    /// `clients` (name, role), issued by the pool CA.
    pub fn with_clients(name: &str, clients: &[(&str, Role)]) -> anyhow::Result<Pki> {
        let pki = Pki::new(name)?;
        for (who, role) in clients {
            pki.issue(who, role.clone(), &pki.ca, Validity::days_from_now(30)?)?;
        }
        Ok(pki)
    }

    /// Writes a client certificate `who` with `role`, issued by `ca` (the pool's or a
    /// stranger's) for `validity`.
    pub fn issue(&self, who: &str, role: Role, ca: &Ca, validity: Validity) -> anyhow::Result<()> {
        ca.issue(&CertRequest {
            name: who.into(),
            role,
            validity,
        })?
        .write(self.dir.path(), who, false)?;
        Ok(())
    }

    /// A node API client presenting `who`'s certificate, to the forwarded `port`.
    pub fn client(&self, who: &str, port: u16) -> anyhow::Result<NodeClient> {
        let path = |f: String| -> PathBuf { self.dir.path().join(f) };
        Ok(NodeClient::new(&ClientOptions {
            endpoint: Endpoint {
                host: "127.0.0.1".into(),
                port,
            },
            ca: path("ca.pem".into()),
            cert: path(format!("{who}.pem")),
            key: path(format!("{who}.key")),
            name: Some(self.name.clone()),
        })?)
    }

    /// A machine config: the node's hostname and API material, plus `extra` TOML (a
    /// `[cluster]`, say).
    pub fn config(&self, extra: &str) -> String {
        format!(
            "version = 1\n[node]\nhostname = \"{}\"\n{extra}\n[api]\nca = '''\n{}'''\ncert = '''\n{}'''\nkey = '''\n{}'''\n",
            self.name,
            self.ca.cert_pem(),
            self.node.cert_pem,
            self.node.key_pem
        )
    }

    /// A reqwest client presenting `who`'s certificate, resolving the node's name to the
    /// forwarded `port` (for requests the node client does not make: a body of our own).
    pub fn raw_client(&self, who: &str, port: u16) -> anyhow::Result<reqwest::blocking::Client> {
        let identity = reqwest::Identity::from_pem(
            &[
                std::fs::read(self.dir.path().join(format!("{who}.pem")))?,
                std::fs::read(self.dir.path().join(format!("{who}.key")))?,
            ]
            .concat(),
        )?;
        Ok(reqwest::blocking::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(
                self.ca.cert_pem().as_bytes(),
            )?)
            .identity(identity)
            .resolve(&self.name, ([127, 0, 0, 1], port).into())
            .timeout(None)
            .build()?)
    }
}

/// A free port on the host's loopback for QEMU's forward of the node API.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
