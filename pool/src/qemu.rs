//! The `qemu` provider: the pool's servers as local QEMU VMs, for trying the pool on a laptop
//! and for the tests and the benchmark on machines without a cloud.
//!
//! Everything about a VM lives in its own directory, `<state_dir>/<name>/`, so that a
//! controller killed at any instant finds all of it again:
//!
//! | file            | what                                                                |
//! |-----------------|---------------------------------------------------------------------|
//! | `labels.json`   | the server's labels (the pool's state), always replaced atomically  |
//! | `vm.json`       | QEMU's pid, the forwarded node API port, the image, the create time |
//! | `overlay.qcow2` | the VM's disk: a qcow2 overlay backed by the (never written) image  |
//! | `config.toml`   | the machine config (user-data), handed over as fw_cfg `opt/basalt/config` |
//! | `console.log`   | the serial console                                                  |
//! | `qemu.pid`      | QEMU's own pid file                                                 |
//!
//! QEMU runs daemonized (`-daemonize`, its own session), so VMs outlive the controller. The
//! node API (port 50000) is forwarded by QEMU's user network to a free port on 127.0.0.1;
//! the guest's network is not restricted, so that a promoted node reaches its K3s server.
//!
//! **A VM whose QEMU is gone** (it crashed, the guest powered off, the host rebooted) is
//! still listed by `servers()`, with its labels unchanged and `api: None`; the controller
//! decides what that means (a `creating` server without an API yet is normal for a moment,
//! anything else without one is broken) and deletes it. A pid is only believed after
//! `/proc/<pid>/cmdline` shows that process is QEMU running with this VM's pid file, so a
//! recycled pid is never reported as the VM, nor killed.
//!
//! **Crash safety.** A VM directory appears whole with its labels (staged under a dot-name,
//! then renamed into place), so a listed VM always has a pool; `vm.json` is written before
//! QEMU starts and again with its pid, and the pid file is the fallback in between. Deleting
//! renames the directory away before removing it. Directories and files whose names start
//! with a dot are the provider's own (staging, deletion, locks) and are never VMs.
//! A create retried under the same name (the first answer lost) returns the VM when it runs
//! with the same labels and image; any other existing VM of that name is an error. A create
//! that fails removes what it made (and its QEMU, if one started).
//!
//! **The controller lock** is `.lock-<pool>.json` in the state directory (holder and
//! heartbeat time, replaced atomically), read and written under an exclusive `flock` of
//! `.lock-<pool>.flock`, so two controllers cannot both take an expired lock.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_qemu::HarnessError;
use serde::{Deserialize, Serialize};

use crate::provider::{CreateServer, Image, Provider, ProviderError, Server, LABEL_POOL};

mod create;
mod files;
mod images;
mod lock;
mod process;
mod settings;
#[cfg(test)]
mod tests;

use files::{read_json, unix_ms, write_json_atomic};
use process::{live_pid, stop_qemu};
pub use settings::{FirmwareSetting, QemuSettings};

/// [`Provider::kind`] of this provider.
pub const KIND: &str = "qemu";
/// The kubelet provider id's scheme: `basalt-qemu://<name>`.
pub const PROVIDER_ID_SCHEME: &str = "basalt-qemu://";

const LABELS_FILE: &str = "labels.json";
const VM_FILE: &str = "vm.json";
const OVERLAY_FILE: &str = "overlay.qcow2";
const CONFIG_FILE: &str = "config.toml";
const CONSOLE_FILE: &str = "console.log";
const PID_FILE: &str = "qemu.pid";
const UEFI_VARS_FILE: &str = "OVMF_VARS.fd";
/// What `basalt build` writes beside its images (`builder/src/build/outputs.rs`).
const MANIFEST_FILE: &str = "manifest.json";

const QEMU_SYSTEM: &str = "qemu-system-x86_64";
const QEMU_IMG: &str = "qemu-img";
/// A free port can be taken by someone else before QEMU binds it: try again with another.
const PORT_ATTEMPTS: usize = 3;
/// How long QEMU gets to exit after SIGTERM, and again after SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_POLL: Duration = Duration::from_millis(50);
/// QEMU writes its pid file before the daemonizing parent returns; allow for a slow disk.
const PIDFILE_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MEMORY_MIB: u32 = 1024;
const DEFAULT_CPUS: u32 = 2;
const NAME_MAX: usize = 63;

/// Why the qemu provider could not do something; each names the VM, file or command.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("qemu provider settings: {0}")]
    Settings(String),
    #[error("image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {0}: the path is not UTF-8")]
    ImagePath(PathBuf),
    #[error("{what} name {name:?}: want 1 to {NAME_MAX} letters, digits, '-', '_' or '.', not starting with '.' or '-'")]
    Name { what: &'static str, name: String },
    #[error("VM {vm}: {dir} already exists")]
    Exists { vm: String, dir: PathBuf },
    #[error("VM {vm}: no such VM in {state_dir}")]
    NoSuchVm { vm: String, state_dir: PathBuf },
    #[error("cannot {step} {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not valid JSON of its kind")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{program} not found on PATH (install the qemu-system-x86 and qemu-utils packages)")]
    ToolMissing { program: &'static str },
    #[error("VM {vm}: cannot run {program}")]
    Spawn {
        vm: String,
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("VM {vm}: `{command}` failed ({status}): {stderr}")]
    Tool {
        vm: String,
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("VM {vm}: QEMU started but {path} holds no pid")]
    Pidfile { vm: String, path: PathBuf },
    #[error("VM {vm}: firmware")]
    Firmware {
        vm: String,
        #[source]
        source: HarnessError,
    },
    #[error("VM {vm}: cannot signal QEMU (pid {pid})")]
    Kill {
        vm: String,
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("VM {vm}: QEMU (pid {pid}) still runs {EXIT_TIMEOUT:?} after SIGKILL")]
    Stuck { vm: String, pid: u32 },
    #[error("cannot lock {path}")]
    Flock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("qemu provider worker thread")]
    Worker(#[source] tokio::task::JoinError),
}

impl From<QemuError> for ProviderError {
    fn from(e: QemuError) -> ProviderError {
        ProviderError {
            provider: KIND,
            what: error_chain(&e),
            transient: matches!(e, QemuError::Worker(_)),
        }
    }
}

/// `vm.json`: what the provider knows about a VM's QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VmRecord {
    /// QEMU's pid; `None` between writing the record and QEMU having started.
    pid: Option<u32>,
    /// The host port on 127.0.0.1 forwarded to the node API.
    api_port: u16,
    /// The image the overlay is backed by.
    image: String,
    /// When the VM was created, milliseconds since the Unix epoch.
    created_unix_ms: u64,
}

/// One VM as the provider sees it on the host, for tools and tests (the controller only
/// needs [`Server`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub dir: PathBuf,
    /// QEMU's pid, only when that process is this VM's QEMU and still running.
    pub pid: Option<u32>,
    /// The host port forwarded to the node API.
    pub api_port: Option<u16>,
    pub image: Option<String>,
    /// The serial console log.
    pub console: PathBuf,
}

/// The qemu provider over one state directory. Cheap to clone; every instance on the same
/// directory sees the same VMs.
#[derive(Debug, Clone)]
pub struct QemuProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: QemuSettings,
    /// Absolute: QEMU's arguments and the `/proc` check name paths under it.
    state_dir: PathBuf,
}

impl QemuProvider {
    /// Checks the settings and opens (creating, mode 0700) the state directory.
    pub fn open(settings: QemuSettings) -> Result<QemuProvider, QemuError> {
        if settings.images.is_empty() {
            return Err(QemuError::Settings("images: no image given".into()));
        }
        if settings.memory_mib == 0 || settings.cpus == 0 {
            return Err(QemuError::Settings(
                "memory_mib and cpus must be at least 1".into(),
            ));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.state_dir)
            .map_err(|source| QemuError::Io {
                step: "create the state directory",
                path: settings.state_dir.clone(),
                source,
            })?;
        let state_dir = settings
            .state_dir
            .canonicalize()
            .map_err(|source| QemuError::Io {
                step: "resolve the state directory",
                path: settings.state_dir.clone(),
                source,
            })?;
        Ok(QemuProvider {
            inner: Arc::new(Inner {
                settings,
                state_dir,
            }),
        })
    }

    pub fn settings(&self) -> &QemuSettings {
        &self.inner.settings
    }

    /// The state directory, absolute.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// A VM's host-side view, or `None` when there is no such VM.
    pub fn inspect(&self, name: &str) -> Result<Option<VmInfo>, QemuError> {
        self.inner.inspect(name)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, ProviderError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, QemuError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(QemuError::Worker)?
            .map_err(ProviderError::from)
    }
}

impl Provider for QemuProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn provider_id(&self, server: &Server) -> String {
        format!("{PROVIDER_ID_SCHEME}{}", server.name)
    }

    async fn images(&self) -> Result<Vec<Image>, ProviderError> {
        self.blocking(Inner::images).await
    }

    async fn servers(&self, pool: &str) -> Result<Vec<Server>, ProviderError> {
        let pool = pool.to_owned();
        self.blocking(move |inner| inner.servers(&pool)).await
    }

    async fn create(&self, req: &CreateServer) -> Result<Server, ProviderError> {
        let req = req.clone();
        self.blocking(move |inner| inner.create(&req)).await
    }

    async fn set_labels(
        &self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let (id, labels) = (id.to_owned(), labels.clone());
        self.blocking(move |inner| inner.set_labels(&id, &labels))
            .await
    }

    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        let id = id.to_owned();
        self.blocking(move |inner| inner.delete(&id)).await
    }

    async fn lock(&self, pool: &str, holder: &str, ttl: Duration) -> Result<bool, ProviderError> {
        let (pool, holder) = (pool.to_owned(), holder.to_owned());
        self.blocking(move |inner| inner.lock(&pool, &holder, ttl))
            .await
    }
}

impl Inner {
    fn vm_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    fn servers(&self, pool: &str) -> Result<Vec<Server>, QemuError> {
        let entries = fs::read_dir(&self.state_dir).map_err(|source| QemuError::Io {
            step: "list the state directory",
            path: self.state_dir.clone(),
            source,
        })?;
        let mut servers = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| QemuError::Io {
                step: "list the state directory",
                path: self.state_dir.clone(),
                source,
            })?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if check_name("VM", &name).is_err() || !entry.path().is_dir() {
                continue;
            }
            // A damaged VM must not hide the others from the controller.
            match self.server(&name) {
                Ok(Some(server))
                    if server.labels.get(LABEL_POOL).map(String::as_str) == Some(pool) =>
                {
                    servers.push(server)
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(vm = %name, error = %error_chain(&e), "skipping a VM directory")
                }
            }
        }
        servers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(servers)
    }

    /// The VM `name` as a [`Server`]; `None` when it has no labels (not a VM).
    fn server(&self, name: &str) -> Result<Option<Server>, QemuError> {
        let dir = self.vm_dir(name);
        let Some(labels) = read_json::<BTreeMap<String, String>>(&dir.join(LABELS_FILE))? else {
            return Ok(None);
        };
        let record = read_json::<VmRecord>(&dir.join(VM_FILE))?;
        let running = live_pid(&dir, record.as_ref()).is_some();
        let api = record
            .as_ref()
            .filter(|_| running)
            .map(|r| SocketAddr::from((Ipv4Addr::LOCALHOST, r.api_port)));
        let created = match &record {
            Some(r) => UNIX_EPOCH + Duration::from_millis(r.created_unix_ms),
            None => fs::metadata(&dir)
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH),
        };
        Ok(Some(Server {
            id: name.to_owned(),
            name: name.to_owned(),
            labels,
            created,
            api,
        }))
    }

    fn inspect(&self, name: &str) -> Result<Option<VmInfo>, QemuError> {
        check_name("VM", name)?;
        let dir = self.vm_dir(name);
        if !dir.is_dir() {
            return Ok(None);
        }
        let record = read_json::<VmRecord>(&dir.join(VM_FILE))?;
        Ok(Some(VmInfo {
            name: name.to_owned(),
            pid: live_pid(&dir, record.as_ref()),
            api_port: record.as_ref().map(|r| r.api_port),
            image: record.map(|r| r.image),
            console: dir.join(CONSOLE_FILE),
            dir,
        }))
    }

    fn set_labels(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<(), QemuError> {
        check_name("VM", name)?;
        let file = self.vm_dir(name).join(LABELS_FILE);
        if !file.is_file() {
            return Err(QemuError::NoSuchVm {
                vm: name.to_owned(),
                state_dir: self.state_dir.clone(),
            });
        }
        write_json_atomic(&file, labels)
    }

    fn delete(&self, name: &str) -> Result<(), QemuError> {
        check_name("VM", name)?;
        let dir = self.vm_dir(name);
        if !dir.exists() {
            return Ok(());
        }
        let record = read_json::<VmRecord>(&dir.join(VM_FILE)).unwrap_or_else(|e| {
            // The pid file still finds QEMU.
            tracing::warn!(vm = name, error = %error_chain(&e), "unreadable VM record");
            None
        });
        if let Some(pid) = live_pid(&dir, record.as_ref()) {
            stop_qemu(name, &dir, pid)?;
        }
        // Gone from listings in one step; a crash during the removal leaves a dot-name.
        let doomed = self
            .state_dir
            .join(format!(".deleting-{name}-{}", unix_ms(SystemTime::now())));
        match fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(QemuError::Io {
                    step: "move away the VM directory",
                    path: dir,
                    source,
                })
            }
        }
        fs::remove_dir_all(&doomed).map_err(|source| QemuError::Io {
            step: "remove",
            path: doomed,
            source,
        })?;
        tracing::info!(vm = name, "QEMU VM deleted");
        Ok(())
    }
}

/// VM and pool names become file names: no separators, no dot-names (the provider's own).
fn check_name(what: &'static str, name: &str) -> Result<(), QemuError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(QemuError::Name {
            what,
            name: name.to_owned(),
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
