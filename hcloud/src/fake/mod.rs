//! A fake Hetzner Cloud API: a test double, not Hetzner. It speaks the API v1's JSON
//! over HTTP on 127.0.0.1 (servers and their actions, actions, images, SSH keys, label
//! selectors, pagination, `RateLimit-*` headers, error bodies), keeps everything in
//! memory, and has a disk FILE per server. Its rescue system is Debian's real OpenSSH
//! `sshd` with that file as `/dev/sda` through a loop device ([`rescue`]).
//!
//! - Creating a server from a snapshot copies the snapshot's bytes to its disk; a
//!   snapshot is a sparse copy of the disk file.
//! - Power-on without rescue calls the boot hook (a later QEMU test boots the disk
//!   there), and every server has a metadata service on its own loopback port serving
//!   Hetzner's `/hetzner/v1/metadata/*` and `/hetzner/v1/userdata`.
//! - Faults: [`Fault`] on a chosen [`Op`] (429, a proxy's 5xx, an API error code, a lost
//!   answer after the work was done, a failed action) and [`RescueFaults`] (SSH late, a
//!   cut connection, a flipped byte after the write).
//!
//! It needs root (loop devices, mount namespaces); [`prerequisites`] says what is
//! missing.

mod http;
mod metadata;
pub mod rescue;
pub mod selector;

pub use rescue::RescueFaults;

use crate::api::{Action, ErrorDetail, SshKey};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// The API call a fault is put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Any,
    ListServers,
    GetServer,
    CreateServer,
    DeleteServer,
    EnableRescue,
    PowerOn,
    PowerOff,
    Shutdown,
    CreateImage,
    GetAction,
    ListImages,
    GetImage,
    DeleteImage,
    ListSshKeys,
    CreateSshKey,
    DeleteSshKey,
    /// `PUT /servers/{id}` (labels).
    UpdateServer,
    /// `POST /servers/{id}/actions/attach_to_network`.
    AttachToNetwork,
    ListNetworks,
    /// `PUT /ssh_keys/{id}` (labels).
    UpdateSshKey,
}

/// What goes wrong.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429 `rate_limit_exceeded`, `RateLimit-Remaining: 0`, reset this many seconds ahead.
    RateLimited { reset_in: u64 },
    /// This HTTP status with a body that is not the API's (a proxy's error page).
    Status(u16),
    /// An API error: status and `error.code`.
    Code(u16, &'static str),
    /// The call is carried out but its answer never comes: the connection is closed.
    LostAnswer,
    /// The call is answered, but its action ends in `error` with this code.
    FailAction(&'static str),
}

#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// The token clients must send (`Authorization: Bearer …`).
    pub token: String,
    /// Size of each server's disk file (sparse).
    pub disk_bytes: u64,
    /// How long an action stays `running`.
    pub action_time: Duration,
    /// The port of every rescue system's SSH on its server's own address (0: a free one).
    pub ssh_port: u16,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            token: "fake-token".into(),
            disk_bytes: 40 * 1024 * 1024 * 1024,
            action_time: Duration::from_millis(50),
            ssh_port: 0,
        }
    }
}

/// What the boot hook is told when a server powers on without rescue.
#[derive(Debug, Clone)]
pub struct BootInfo {
    pub server: u64,
    pub name: String,
    pub disk: PathBuf,
    /// The server's metadata service (`http://ADDR/hetzner/v1/…`), for QEMU's guestfwd
    /// to 169.254.169.254:80.
    pub metadata: SocketAddr,
    pub user_data: Option<String>,
}

pub type BootHook = Arc<dyn Fn(BootInfo) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("the fake Hetzner API needs {0}")]
    Missing(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Rescue(#[from] rescue::RescueError),
}

/// What a test can see of a server.
#[derive(Debug, Clone)]
pub struct ServerView {
    pub id: u64,
    pub name: String,
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub disk: PathBuf,
    pub image: Option<u64>,
    pub metadata: SocketAddr,
    /// The private networks it is attached to.
    pub networks: Vec<u64>,
}

/// What a test can see of a snapshot.
#[derive(Debug, Clone)]
pub struct ImageView {
    pub id: u64,
    pub file: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub description: String,
    pub status: String,
}

pub(crate) struct FServer {
    id: u64,
    name: String,
    status: String,
    created: String,
    labels: BTreeMap<String, String>,
    server_type: String,
    location: String,
    image: Option<u64>,
    ip: Ipv4Addr,
    disk: PathBuf,
    rescue_enabled: bool,
    rescue_key: Option<String>,
    rescue: Option<rescue::Rescue>,
    user_data: Option<String>,
    metadata: SocketAddr,
    metadata_stop: CancellationToken,
    /// Attached private networks and the server's address in each.
    private_net: Vec<(u64, Ipv4Addr)>,
}

pub(crate) struct FNetwork {
    id: u64,
    name: String,
    ip_range: String,
    next_host: u32,
}

pub(crate) struct FImage {
    id: u64,
    kind: &'static str,
    name: Option<String>,
    status: String,
    description: String,
    created: String,
    labels: BTreeMap<String, String>,
    file: Option<PathBuf>,
    disk_bytes: u64,
    from_server: Option<(u64, String)>,
}

pub(crate) struct FAction {
    action: Action,
    done_at: Instant,
    error: Option<ErrorDetail>,
}

#[derive(Default)]
pub(crate) struct State {
    next_id: u64,
    servers: BTreeMap<u64, FServer>,
    images: BTreeMap<u64, FImage>,
    keys: BTreeMap<u64, SshKey>,
    networks: BTreeMap<u64, FNetwork>,
    actions: BTreeMap<u64, FAction>,
    faults: Vec<(Op, Fault, u32)>,
    rescue_faults: RescueFaults,
    boot_hook: Option<BootHook>,
    requests: Vec<String>,
    calls: u64,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    opts: FakeOptions,
    host: rescue::Host,
    dir: PathBuf,
    ssh_port: u16,
    stop: CancellationToken,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake. Dropping it stops the API; call [`Fake::shutdown`] to stop the
/// rescue systems and detach their loop devices too.
pub struct Fake {
    inner: Arc<Inner>,
    addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

/// What is missing for the fake to run here, if anything.
pub fn prerequisites() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        return Err("root (loop devices and mount namespaces)".into());
    }
    for tool in [
        "/usr/sbin/sshd",
        "/usr/bin/ssh-keygen",
        "/usr/bin/unshare",
        "/usr/sbin/losetup",
        "/usr/sbin/blkdiscard",
        "/usr/sbin/blockdev",
        "/usr/bin/zstd",
        "/usr/bin/sha256sum",
    ] {
        if !Path::new(tool).exists() {
            return Err(format!(
                "{tool} (openssh-server, openssh-client, util-linux, zstd)"
            ));
        }
    }
    let free = std::process::Command::new("losetup").arg("-f").output();
    match free {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("a free loop device (losetup -f)".into()),
    }
}

/// For tests, at run time (what the build script's probe cannot see, such as a free loop
/// device): true when the fake can run. Otherwise, under CI (`CI` set) it panics with the
/// reason; elsewhere it prints `skipped: <reason>` and returns false.
pub fn available_or_skip(test: &str) -> bool {
    match prerequisites() {
        Ok(()) => true,
        Err(why) if std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false")) => {
            panic!("{test}: the fake Hetzner API needs {why}, and CI must run this test")
        }
        Err(why) => {
            eprintln!("skipped: {test}: the fake Hetzner API needs {why}");
            false
        }
    }
}

impl Fake {
    /// Starts the API on 127.0.0.1 with its files in a temporary folder.
    pub async fn start(opts: FakeOptions) -> Result<Fake, FakeError> {
        let dir = tempfile::Builder::new()
            .prefix("basalt-hcloud-fake-")
            .tempdir()
            .map_err(|source| FakeError::Io {
                what: "create the fake's folder".into(),
                source,
            })?;
        let path = dir.path().to_path_buf();
        let mut fake = Self::start_in(&path, opts).await?;
        fake._dir = Some(dir);
        Ok(fake)
    }

    /// Starts the API with its files (disks, snapshots, sshd's) under `dir`.
    pub async fn start_in(dir: &Path, opts: FakeOptions) -> Result<Fake, FakeError> {
        prerequisites().map_err(FakeError::Missing)?;
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| FakeError::Io { what, source }
        };
        for sub in ["disks", "snapshots", "rescue"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io("create the fake's folders"))?;
        }
        let host = rescue::Host::prepare(dir)?;
        let ssh_port = match opts.ssh_port {
            0 => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(io("pick the rescue SSH port"))?;
                l.local_addr()
                    .map_err(io("pick the rescue SSH port"))?
                    .port()
            }
            p => p,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("bind the fake API"))?;
        let addr = listener
            .local_addr()
            .map_err(io("the fake API's address"))?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                next_id: 1000,
                ..State::default()
            }),
            opts,
            host,
            dir: dir.to_path_buf(),
            ssh_port,
            stop: CancellationToken::new(),
        });
        tokio::spawn(http::serve(listener, inner.clone()));
        Ok(Fake {
            inner,
            addr,
            _dir: None,
        })
    }

    /// What `HCLOUD_ENDPOINT` should be.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn token(&self) -> &str {
        &self.inner.opts.token
    }

    /// The port every rescue system's SSH answers on, at its server's address.
    pub fn ssh_port(&self) -> u16 {
        self.inner.ssh_port
    }

    /// Puts `fault` on the next `times` calls of `op`.
    pub fn inject(&self, op: Op, fault: Fault, times: u32) {
        self.inner.lock().faults.push((op, fault, times));
    }

    /// Removes every fault put with [`Fake::inject`] that is not used up.
    pub fn clear_faults(&self) {
        self.inner.lock().faults.clear();
    }

    pub fn set_rescue_faults(&self, faults: RescueFaults) {
        self.inner.lock().rescue_faults = faults;
    }

    pub fn set_boot_hook(&self, hook: BootHook) {
        self.inner.lock().boot_hook = Some(hook);
    }

    /// Every request so far, as `METHOD /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().requests.clone()
    }

    pub fn servers(&self) -> Vec<ServerView> {
        self.inner
            .lock()
            .servers
            .values()
            .map(|s| ServerView {
                id: s.id,
                name: s.name.clone(),
                status: s.status.clone(),
                labels: s.labels.clone(),
                disk: s.disk.clone(),
                image: s.image,
                metadata: s.metadata,
                networks: s.private_net.iter().map(|(n, _)| *n).collect(),
            })
            .collect()
    }

    pub fn ssh_keys(&self) -> Vec<SshKey> {
        self.inner.lock().keys.values().cloned().collect()
    }

    /// Snapshots (not the system images).
    pub fn snapshots(&self) -> Vec<ImageView> {
        self.inner
            .lock()
            .images
            .values()
            .filter(|i| i.kind == "snapshot")
            .filter_map(|i| {
                Some(ImageView {
                    id: i.id,
                    file: i.file.clone()?,
                    labels: i.labels.clone(),
                    description: i.description.clone(),
                    status: i.status.clone(),
                })
            })
            .collect()
    }

    /// Adds a snapshot made from `file` (copied) as if uploaded earlier, `age` ago.
    pub async fn add_snapshot(
        &self,
        file: &Path,
        labels: BTreeMap<String, String>,
        age: Duration,
    ) -> Result<u64, FakeError> {
        let id = self.inner.lock().id();
        let dest = self.inner.dir.join("snapshots").join(format!("{id}.img"));
        http::sparse_copy(file, &dest)
            .await
            .map_err(|source| FakeError::Io {
                what: format!("copy {}", file.display()),
                source,
            })?;
        let disk_bytes = std::fs::metadata(&dest).map_or(0, |m| m.len());
        self.inner.lock().images.insert(
            id,
            FImage {
                id,
                kind: "snapshot",
                name: None,
                status: "available".into(),
                description: format!("added by the test, {}", file.display()),
                created: crate::ops::rfc3339(SystemTime::now() - age),
                labels,
                file: Some(dest),
                disk_bytes,
                from_server: None,
            },
        );
        Ok(id)
    }

    /// Adds a private network `10.<n>.0.0/16` named `name`, as made in the console.
    pub fn add_network(&self, name: &str) -> u64 {
        let mut st = self.inner.lock();
        let id = st.id();
        let n = st.networks.len() % 250;
        st.networks.insert(
            id,
            FNetwork {
                id,
                name: name.into(),
                ip_range: format!("10.{n}.0.0/16"),
                next_host: 2,
            },
        );
        id
    }

    /// Creates a server from image `image` (a snapshot's id) directly, as another tool
    /// would, without going through a client.
    pub async fn add_server(&self, name: &str, image: u64) -> Result<u64, FakeError> {
        http::create_server_direct(&self.inner, name, &image.to_string(), None, BTreeMap::new())
            .await
            .map_err(|r| FakeError::Missing(format!("a server: {}", r.describe())))
    }

    /// Stops every rescue system, detaches its loop device, and stops the API.
    pub async fn shutdown(self) {
        let rescues: Vec<rescue::Rescue> = {
            let mut st = self.inner.lock();
            st.servers
                .values_mut()
                .filter_map(|s| {
                    s.metadata_stop.cancel();
                    s.rescue.take()
                })
                .collect()
        };
        for r in rescues {
            r.stop().await;
        }
        self.inner.stop.cancel();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}
