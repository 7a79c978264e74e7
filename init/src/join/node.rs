//! The real node behind [`Host`]: the config and `/etc/rancher` on STATE, the agent
//! started through PID1's mailbox; and what standby prepares for a join.

use super::{
    AgentRun, Host, JoinError, AGENT_SERVICE, AIRGAP_IMAGES, K3S_BIN, K3S_CONFIG, K3S_IMAGES_DIR,
    KUBELET_CLIENT_CERT, RANCHER_MOUNT, RANCHER_STATE,
};
use crate::pid1::console;
use crate::pid1::mailbox::{self, Control, ServiceRun, StartError};
use crate::pid1::supervise::{RestartPolicy, ServiceSpec};
use crate::sys::System;
use basalt_api::config::MachineConfig;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The real node: STATE for the config and `/etc/rancher`, the main loop for the agent.
pub struct NodeHost {
    pub root: PathBuf,
    pub control: Control,
}

impl Host for NodeHost {
    fn persist(&self, text: &str) -> Result<(), JoinError> {
        let path = self.root.join(crate::config_source::STATE_CONFIG);
        write_secret(&path, text.as_bytes()).map_err(|e| JoinError::Persist(path, e))
    }

    fn node_ip(&self, config: &MachineConfig) -> Option<IpAddr> {
        // A static address of the config first; else what the network has now.
        let configured = config.network.addresses.iter().map(|c| c.addr);
        configured
            .chain(crate::net::addresses().into_iter().map(|(a, _)| a))
            .find(|a| a.is_ipv4() && !a.is_loopback())
    }

    fn write_k3s_config(&self, json: &str) -> Result<(), JoinError> {
        bind_rancher(&mut crate::sys::Real, &self.root)?;
        let path = self.root.join(K3S_CONFIG);
        write_secret(&path, json.as_bytes()).map_err(|e| JoinError::Write(path, e))
    }

    /// Closes the metadata service first (see [`crate::net::metadata_block`]): no
    /// agent, and so no pod, ever runs with the user-data readable. A failure to close
    /// it fails the start.
    fn start_agent(&self) -> Result<(), JoinError> {
        crate::net::metadata_block::block().map_err(JoinError::BlockMetadata)?;
        self.control.start(agent_spec()).map_err(|e| match e {
            StartError::Refused(why) => JoinError::Start(why),
            StartError::NotRunning(why) => JoinError::NotRunning(why),
        })
    }

    /// The metadata service stays closed (see `start_agent`); an agent the supervisor
    /// does not know yet is started.
    fn restart_agent(&self) -> Result<(), JoinError> {
        crate::net::metadata_block::block().map_err(JoinError::BlockMetadata)?;
        match self.control.restart(AGENT_SERVICE) {
            Ok(true) => Ok(()),
            Ok(false) => self.start_agent(),
            Err(e) => Err(JoinError::Start(e.to_string())),
        }
    }

    fn agent_run(&self) -> Option<AgentRun> {
        let run = self.control.service(AGENT_SERVICE).ok()??;
        let cert = std::fs::metadata(self.root.join(KUBELET_CLIENT_CERT))
            .and_then(|m| m.modified())
            .ok();
        Some(agent_run_of(run, cert, SystemTime::now()))
    }
}

/// The supervisor's view of the agent and the kubelet certificate's mtime, as of `now`.
/// A certificate dated in the future (the clock was stepped back) counts as new.
pub fn agent_run_of(run: ServiceRun, cert_mtime: Option<SystemTime>, now: SystemTime) -> AgentRun {
    AgentRun {
        running_for: run.running_for,
        restart_ages: run.restart_ages,
        last_exit: run.last_exit.map(mailbox::exit_text),
        last_line: run.last_line,
        credentials_age: cert_mtime.map(|t| now.duration_since(t).unwrap_or_default()),
    }
}

/// `k3s agent --config /etc/rancher/k3s/config.yaml`, restarted with backoff forever.
pub fn agent_spec() -> ServiceSpec {
    ServiceSpec {
        name: AGENT_SERVICE.into(),
        argv: vec![
            K3S_BIN.into(),
            "agent".into(),
            "--config".into(),
            format!("/{K3S_CONFIG}"),
        ],
        // PID1 has the kernel's bare environment; K3s finds its tools through PATH.
        env: vec![(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        )],
        restart: RestartPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            ..RestartPolicy::default()
        },
        stop_timeout: Duration::from_secs(20),
    }
}

/// What a join needs that no credential does, done in standby so that promotion is
/// "write config, exec": `/etc/rancher` on STATE, and the image's airgap images where
/// K3s imports them from. Failures are reported and left for the join to retry.
pub fn prepare_standby(sys: &mut dyn System, root: &Path) {
    if let Err(e) = bind_rancher(sys, root) {
        console::error("standby prep", &e);
    }
    let images = root.join(AIRGAP_IMAGES);
    if images.exists() {
        let dir = root.join(K3S_IMAGES_DIR);
        let link = dir.join("k3s-airgap-images.tar.zst");
        let made = std::fs::create_dir_all(&dir).and_then(|()| {
            match std::os::unix::fs::symlink(Path::new("/").join(AIRGAP_IMAGES), &link) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                other => other,
            }
        });
        if let Err(e) = made {
            console::error("standby prep", &JoinError::Write(link, e));
        }
    }
}

/// Bind-mounts STATE's rancher folder on `/etc/rancher`, once.
pub fn bind_rancher(sys: &mut dyn System, root: &Path) -> Result<(), JoinError> {
    let from = root.join(RANCHER_STATE);
    let to = root.join(RANCHER_MOUNT);
    std::fs::create_dir_all(&from).map_err(|e| JoinError::Mkdir(from.clone(), e))?;
    if same_dir(&from, &to) {
        return Ok(());
    }
    sys.mount(
        &from.to_string_lossy(),
        &to,
        None,
        nix::mount::MsFlags::MS_BIND,
        None,
    )
    .map_err(|e| JoinError::Mount(from, to, e))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// [`crate::atomic_file::write`] for files with secrets (the token, the API key):
/// mode 0600 from the start.
pub fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::atomic_file::write_mode(path, bytes, 0o600)
}
