//! The real node behind [`Host`]: the config and `/etc/rancher` on STATE, the agent
//! started through PID1's mailbox; and what standby prepares for a join.

use super::{
    AgentRun, Commit, Durable, Host, JoinError, AGENT_SERVICE, AIRGAP_IMAGES, K3S_BIN, K3S_CONFIG,
    K3S_IMAGES_DIR, KUBELET_CLIENT_CERT, RANCHER_MOUNT, RANCHER_STATE,
};
use crate::atomic_file::{Gate, Renamed, Staged};
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

/// A secret file written aside, and the error its commit fails with.
struct StagedSecret {
    staged: Staged,
    error: fn(PathBuf, std::io::Error) -> JoinError,
}

impl StagedSecret {
    /// Written aside and synced (`sync`), or only written.
    fn stage(
        path: PathBuf,
        bytes: &[u8],
        error: fn(PathBuf, std::io::Error) -> JoinError,
        sync: bool,
    ) -> Result<Box<dyn Commit>, JoinError> {
        let staged = if sync {
            crate::atomic_file::stage_mode(&path, bytes, SECRET_MODE)
        } else {
            crate::atomic_file::stage_mode_unsynced(&path, bytes, SECRET_MODE)
        };
        match staged {
            Ok(staged) => Ok(Box::new(StagedSecret { staged, error })),
            Err(e) => Err(error(path, e)),
        }
    }
}

impl Commit for StagedSecret {
    fn commit(self: Box<Self>) -> Result<(), JoinError> {
        let path = self.staged.path().to_path_buf();
        self.staged.commit().map_err(|e| (self.error)(path, e))
    }

    fn rename(self: Box<Self>) -> Result<Box<dyn Durable>, JoinError> {
        let path = self.staged.path().to_path_buf();
        let error = self.error;
        match self.staged.rename() {
            Ok(renamed) => Ok(Box::new(RenamedSecret {
                renamed,
                path,
                error,
            })),
            Err(e) => Err(error(path, e)),
        }
    }
}

/// A [`StagedSecret`] renamed into place, not yet synced.
struct RenamedSecret {
    renamed: Renamed,
    path: PathBuf,
    error: fn(PathBuf, std::io::Error) -> JoinError,
}

impl Durable for RenamedSecret {
    fn sync(self: Box<Self>) -> Result<(), JoinError> {
        let RenamedSecret {
            renamed,
            path,
            error,
        } = *self;
        renamed.sync().map_err(|e| error(path, e))
    }
}

impl Host for NodeHost {
    fn stage_persist(&self, text: &str) -> Result<Box<dyn Commit>, JoinError> {
        let path = self.root.join(crate::config_source::STATE_CONFIG);
        StagedSecret::stage(path, text.as_bytes(), JoinError::Persist, true)
    }

    fn node_ip(&self, config: &MachineConfig) -> Option<IpAddr> {
        node_ip(config)
    }

    fn stage_k3s_config(&self, json: &str) -> Result<Box<dyn Commit>, JoinError> {
        bind_rancher(&mut crate::sys::Real, &self.root)?;
        let path = self.root.join(K3S_CONFIG);
        // Not synced before the agent's start: K3s reads it from the page cache, and
        // PID1 writes it again before every start (see `Joiner::apply_timed`).
        StagedSecret::stage(path, json.as_bytes(), JoinError::Write, false)
    }

    /// No agent, and so no pod, ever runs with the user-data readable: the joiner
    /// closes it before every start, and a failure to close it fails the start.
    fn close_metadata(&self) -> Result<(), JoinError> {
        crate::net::metadata_block::block().map_err(JoinError::BlockMetadata)
    }

    fn start_agent(&self) -> Result<(), JoinError> {
        self.control.start(agent_spec()).map_err(|e| match e {
            StartError::Refused(why) => JoinError::Start(why),
            StartError::NotRunning(why) => JoinError::NotRunning(why),
        })
    }

    /// An agent the supervisor does not know yet is started.
    fn restart_agent(&self) -> Result<(), JoinError> {
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

/// K3s's `node-ip`: a static address of the config first; else what the network has now.
fn node_ip(config: &MachineConfig) -> Option<IpAddr> {
    let configured = config.network.addresses.iter().map(|c| c.addr);
    configured
        .chain(crate::net::addresses().into_iter().map(|(a, _)| a))
        .find(|a| a.is_ipv4() && !a.is_loopback())
}

/// A promotion's config, for [`rehearse_prepare`]: a `[cluster]`, labels and a taint,
/// so that every part of K3s's config is rendered. Its token pins no real CA.
const REHEARSAL_CONFIG: &str = r#"version = 1
[node]
hostname = "rehearsal"
labels = { "example.com/pool" = "warm", app = "" }
taints = ["dedicated=warm:NoSchedule"]
[cluster]
server = "https://127.0.0.1:6443"
token = "K100000000000000000000000000000000000000000000000000000000000000000::server:rehearsal"
provider_id = "hcloud://1"
[api]
ca = """
-----BEGIN CERTIFICATE-----
MIIB
-----END CERTIFICATE-----
"""
cert = """
-----BEGIN CERTIFICATE-----
MIIB
-----END CERTIFICATE-----
"""
key = """
-----BEGIN PRIVATE KEY-----
MC4C
-----END PRIVATE KEY-----
"""
"#;

/// The file name the rehearsal writes aside (and removes) in its folder.
pub const REHEARSAL_FILE: &str = "k3s-config-rehearsal.yaml";

/// Runs once, in standby, what a promotion's preparation runs beside its CA check
/// (`Joiner::prepare_agent`): the node's address read, K3s's config rendered from a
/// config with a `[cluster]` ([`REHEARSAL_CONFIG`]) and written aside, as a secret and
/// unsynced, into `dir`, then removed. Under QEMU's TCG the first run of this code costs
/// 7–14 ms of translation and page faults on the promotion's path (BENCHMARKS.md, issue 15
/// item 2); run here first, the promotion finds it translated and paged in. Writes
/// nothing that stays. Returns the rendered config.
pub fn rehearse_prepare(dir: &Path) -> Result<String, JoinError> {
    let config = MachineConfig::parse(REHEARSAL_CONFIG)
        .map_err(|e| JoinError::Start(format!("the rehearsal's config: {e}")))?;
    let json = config
        .k3s_config_json(node_ip(&config))
        .ok_or_else(|| JoinError::Start("the rehearsal's config has no [cluster]".into()))?;
    let staged = StagedSecret::stage(
        dir.join(REHEARSAL_FILE),
        json.as_bytes(),
        JoinError::Write,
        false,
    )?;
    // Dropped uncommitted: the file written aside is removed.
    drop(staged);
    Ok(json)
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
/// K3s imports them from ([`link_airgap_images`]). Failures are reported and left for
/// the join to retry. It holds the node's write gate ([`crate::atomic_file::gate`]), so
/// that a shutdown waits for it before it unmounts STATE, and after that it does nothing.
pub fn prepare_standby(sys: &mut dyn System, root: &Path) {
    prepare_standby_under(sys, root, crate::atomic_file::gate())
}

/// [`prepare_standby`] holding `gate` open throughout.
fn prepare_standby_under(sys: &mut dyn System, root: &Path, gate: &Gate) {
    let Ok(_held) = gate.hold() else {
        console::info("standby prep: not done, the node is shutting down");
        return;
    };
    if let Err(e) = bind_rancher(sys, root) {
        console::error("standby prep", &e);
    }
    if let Err(e) = link_airgap_images(root) {
        console::error("standby prep", &e);
    }
}

/// K3s's import cache (K3s ≥ 1.30.13, 1.31.9, 1.32.5, 1.33.1): when this file exists in
/// the images folder, K3s records each tarball's path, size and mtime after importing
/// it, and on later starts skips the tarballs it has recorded unchanged. It never
/// creates the file itself. Older versions ignore it (not an image suffix).
pub const IMPORT_CACHE: &str = ".cache.json";

/// The name the image's airgap images get in K3s's images folder when the root cannot
/// be told apart from another (no `basalt.verity.root` on the command line).
const UNKEYED_LINK: &str = "k3s-airgap-images.tar.zst";

/// Links the root's airgap images into K3s's images folder on STATE, under a name that
/// carries the verified root's hash, and turns K3s's import cache on.
///
/// K3s imports every tarball of `agent/images` before it starts the kubelet, about
/// 30 s for the K3s bundle, at every start. With [`IMPORT_CACHE`] present it skips a
/// tarball whose path, size and mtime it has recorded. The root's files all have mtime
/// 0, so after an A/B upgrade a new bundle at the same path would differ at most in
/// size: K3s without k3s-io/k3s#14284 (backported in July 2026) wants a
/// newer mtime as well, and any K3s misses a bundle of the same size, so the new images
/// would not be imported. The root hash in the link's name
/// makes every new root a new path, which K3s imports once; links of other roots (and
/// the unkeyed name) are removed, and K3s prunes their entries from its cache itself.
/// Without a root hash the link is unkeyed and the cache is turned off. An existing
/// cache file is never truncated: it is K3s's record of what containerd holds.
pub fn link_airgap_images(root: &Path) -> Result<(), JoinError> {
    if !root.join(AIRGAP_IMAGES).exists() {
        return Ok(());
    }
    let dir = root.join(K3S_IMAGES_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| JoinError::Mkdir(dir.clone(), e))?;
    let target = Path::new("/").join(AIRGAP_IMAGES);
    let key = root_key(root);
    let name = match &key {
        Some(k) => format!("k3s-airgap-images-{k}.tar.zst"),
        None => UNKEYED_LINK.to_string(),
    };
    let entries = std::fs::read_dir(&dir).map_err(|e| JoinError::Write(dir.clone(), e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = std::fs::read_link(&path).is_ok_and(|t| t == target);
        if ours && entry.file_name() != name.as_str() {
            std::fs::remove_file(&path).map_err(|e| JoinError::Write(path.clone(), e))?;
        }
    }
    let link = dir.join(&name);
    match std::fs::read_link(&link) {
        Ok(t) if t == target => {}
        Ok(_) => {
            std::fs::remove_file(&link).map_err(|e| JoinError::Write(link.clone(), e))?;
            std::os::unix::fs::symlink(&target, &link)
                .map_err(|e| JoinError::Write(link.clone(), e))?;
        }
        Err(_) => std::os::unix::fs::symlink(&target, &link)
            .map_err(|e| JoinError::Write(link.clone(), e))?,
    }
    let cache = dir.join(IMPORT_CACHE);
    if key.is_some() {
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&cache);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(JoinError::Write(cache, e)),
        }
    } else {
        match std::fs::remove_file(&cache) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(JoinError::Write(cache, e)),
        }
    }
    Ok(())
}

/// The first 16 hex digits of the verified root's hash, from the kernel command line
/// stage 1 booted with.
fn root_key(root: &Path) -> Option<String> {
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).ok()?;
    let params = basalt_api::bootparams::BootParams::parse(&cmdline).ok()?;
    params.verity.root_hash.get(..16).map(str::to_string)
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
    crate::atomic_file::write_mode(path, bytes, SECRET_MODE)
}

/// Files with secrets are readable by root only, from their creation on.
const SECRET_MODE: u32 = 0o600;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};
    use std::fs;
    use std::sync::{mpsc, Arc};

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn cmdline(hash: &str) -> String {
        format!(
            "console=ttyS0 basalt.slot=a basalt.verity.root={hash} basalt.verity.salt=00 \
             basalt.verity.blocks=10 quiet\n"
        )
    }

    /// A root with the airgap images, and `cmdline` as its `/proc/cmdline` if given.
    fn root(cmdline: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = dir.path().join(AIRGAP_IMAGES);
        fs::create_dir_all(images.parent().expect("parent")).expect("mkdir");
        fs::write(&images, b"zstd").expect("images");
        if let Some(c) = cmdline {
            fs::create_dir_all(dir.path().join("proc")).expect("proc");
            fs::write(dir.path().join("proc/cmdline"), c).expect("cmdline");
        }
        dir
    }

    /// The images folder as (name, link target or None for a plain file), sorted.
    fn listing(root: &Path) -> Vec<(String, Option<PathBuf>)> {
        let mut v: Vec<_> = fs::read_dir(root.join(K3S_IMAGES_DIR))
            .expect("images dir")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read_link(e.path()).ok(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn target() -> Option<PathBuf> {
        Some(Path::new("/").join(AIRGAP_IMAGES))
    }

    /// A machine whose mounts wait until released: standby's preparation caught in flight.
    struct SlowMount {
        calls: Recording,
        mounting: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
    }

    impl System for SlowMount {
        fn mount(
            &mut self,
            source: &str,
            target: &Path,
            fstype: Option<&str>,
            flags: nix::mount::MsFlags,
            data: Option<&str>,
        ) -> Result<(), nix::errno::Errno> {
            let _ = self.mounting.send(());
            let _ = self.release.recv();
            self.calls.mount(source, target, fstype, flags, data)
        }

        fn mkdir(&mut self, path: &Path) -> std::io::Result<()> {
            self.calls.mkdir(path)
        }

        fn load_module(&mut self, path: &Path) -> std::io::Result<()> {
            self.calls.load_module(path)
        }

        fn switch_root(&mut self, new_root: &Path) -> Result<(), nix::errno::Errno> {
            self.calls.switch_root(new_root)
        }
    }

    #[test]
    fn a_shutdown_waits_for_standby_prep_in_flight_and_a_later_one_touches_nothing() {
        let gate = Arc::new(Gate::new());
        let r = root(Some(&cmdline(HASH)));
        let (mounting_tx, mounting) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let (path, g) = (r.path().to_path_buf(), gate.clone());
        let prep = std::thread::spawn(move || {
            let mut sys = SlowMount {
                calls: Recording::default(),
                mounting: mounting_tx,
                release: release_rx,
            };
            prepare_standby_under(&mut sys, &path, &g);
            sys.calls.calls
        });
        mounting
            .recv_timeout(Duration::from_secs(5))
            .expect("the prep binds /etc/rancher");
        // In flight: closing waits for it, and gives up after its wait.
        assert!(!gate.close(Duration::from_millis(50)));
        let g = gate.clone();
        let closer = std::thread::spawn(move || g.close(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!closer.is_finished(), "closed with the prep in flight");
        release.send(()).expect("release");
        let calls = prep.join().expect("prep");
        assert!(closer.join().expect("closer"), "closed once the prep ended");
        assert!(gate.is_closed());
        // The prep in flight ran whole: bound, linked, the cache on.
        assert!(
            matches!(calls.as_slice(), [Call::Mount { target, .. }] if target.ends_with(RANCHER_MOUNT)),
            "{calls:?}"
        );
        assert_eq!(listing(r.path()).len(), 2, "{:?}", listing(r.path()));

        // One that starts after the shutdown closed the gate: nothing on STATE.
        let late = root(Some(&cmdline(HASH)));
        let mut sys = Recording::default();
        prepare_standby_under(&mut sys, late.path(), &gate);
        assert!(sys.calls.is_empty(), "{:?}", sys.calls);
        assert!(!late.path().join(RANCHER_STATE).exists());
        assert!(!late.path().join(K3S_IMAGES_DIR).exists());
    }

    #[test]
    fn the_images_are_linked_under_the_roots_hash_with_the_import_cache_on() {
        let r = root(Some(&cmdline(HASH)));
        link_airgap_images(r.path()).expect("linked");
        assert_eq!(
            listing(r.path()),
            vec![
                (IMPORT_CACHE.to_string(), None),
                (
                    "k3s-airgap-images-0123456789abcdef.tar.zst".into(),
                    target()
                ),
            ]
        );
        let cache = r.path().join(K3S_IMAGES_DIR).join(IMPORT_CACHE);
        assert_eq!(
            fs::read(cache).expect("cache"),
            b"",
            "K3s loads an empty file as none"
        );
    }

    #[test]
    fn the_cache_k3s_wrote_is_kept_and_the_link_stays() {
        let r = root(Some(&cmdline(HASH)));
        link_airgap_images(r.path()).expect("first boot");
        let cache = r.path().join(K3S_IMAGES_DIR).join(IMPORT_CACHE);
        let written = br#"{"/var/lib/rancher/k3s/agent/images/k3s-airgap-images-0123456789abcdef.tar.zst":{"size":4,"modTime":"1970-01-01T00:00:00Z"}}"#;
        fs::write(&cache, written).expect("K3s writes");
        link_airgap_images(r.path()).expect("second boot");
        assert_eq!(fs::read(&cache).expect("cache"), written);
        assert_eq!(listing(r.path()).len(), 2);
    }

    #[test]
    fn a_new_root_gets_a_new_name_and_old_links_go_but_nothing_else() {
        let r = root(Some(&cmdline(OTHER)));
        link_airgap_images(r.path()).expect("old root");
        let dir = r.path().join(K3S_IMAGES_DIR);
        // What basalt named it before keys, and a tarball someone else put there.
        std::os::unix::fs::symlink(Path::new("/").join(AIRGAP_IMAGES), dir.join(UNKEYED_LINK))
            .expect("old link");
        fs::write(dir.join("extra.tar"), b"tar").expect("extra");
        std::os::unix::fs::symlink("/elsewhere.tar.zst", dir.join("mine.tar.zst"))
            .expect("foreign link");

        fs::write(r.path().join("proc/cmdline"), cmdline(HASH)).expect("upgrade");
        link_airgap_images(r.path()).expect("new root");
        assert_eq!(
            listing(r.path()),
            vec![
                (IMPORT_CACHE.to_string(), None),
                ("extra.tar".into(), None),
                (
                    "k3s-airgap-images-0123456789abcdef.tar.zst".into(),
                    target()
                ),
                (
                    "mine.tar.zst".into(),
                    Some(PathBuf::from("/elsewhere.tar.zst"))
                ),
            ]
        );
    }

    #[test]
    fn a_link_of_that_name_pointing_elsewhere_is_replaced() {
        let r = root(Some(&cmdline(HASH)));
        let dir = r.path().join(K3S_IMAGES_DIR);
        fs::create_dir_all(&dir).expect("dir");
        let name = "k3s-airgap-images-0123456789abcdef.tar.zst";
        std::os::unix::fs::symlink("/wrong", dir.join(name)).expect("wrong link");
        link_airgap_images(r.path()).expect("linked");
        assert_eq!(fs::read_link(dir.join(name)).ok(), target());
    }

    #[test]
    fn without_a_root_hash_the_link_is_unkeyed_and_the_cache_off() {
        let r = root(Some(&cmdline(HASH)));
        link_airgap_images(r.path()).expect("keyed");
        fs::write(r.path().join("proc/cmdline"), "console=ttyS0\n").expect("no params");
        link_airgap_images(r.path()).expect("unkeyed");
        assert_eq!(
            listing(r.path()),
            vec![(UNKEYED_LINK.to_string(), target())],
            "an unkeyed name could hide a new bundle from the cache"
        );
    }

    #[test]
    fn an_image_without_airgap_images_gets_no_images_folder() {
        let r = tempfile::tempdir().expect("tempdir");
        link_airgap_images(r.path()).expect("nothing to do");
        assert!(!r.path().join(K3S_IMAGES_DIR).exists());
    }

    #[test]
    fn the_rehearsal_renders_every_key_and_leaves_nothing_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = rehearse_prepare(dir.path()).expect("rehearsed");
        let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(v["server"], "https://127.0.0.1:6443");
        assert_eq!(v["node-name"], "rehearsal");
        assert_eq!(
            v["node-label"],
            serde_json::json!(["app=", "example.com/pool=warm"])
        );
        assert_eq!(
            v["node-taint"],
            serde_json::json!(["dedicated=warm:NoSchedule"])
        );
        assert_eq!(
            v["kubelet-arg"],
            serde_json::json!(["provider-id=hcloud://1"])
        );
        assert!(v["token"]
            .as_str()
            .is_some_and(|t| t.ends_with("::server:rehearsal")));
        let left: Vec<_> = fs::read_dir(dir.path()).expect("dir").collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_rehearsal_that_cannot_write_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let not_a_dir = dir.path().join("file");
        fs::write(&not_a_dir, "x").expect("file");
        let err = rehearse_prepare(&not_a_dir).expect_err("its folder is a file");
        let text = crate::pid1::console::chain(&err);
        assert!(
            text.contains(&not_a_dir.join(REHEARSAL_FILE).display().to_string()),
            "{text}"
        );
    }
}
