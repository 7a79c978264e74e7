use super::files::write_json_atomic;
use super::lock::LockRecord;
use super::process::is_vm_qemu;
use super::*;
use crate::provider::{LABEL_IMAGE, LABEL_STATE};
use nix::sys::signal::Signal;
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn settings(state_dir: &Path, images: Vec<PathBuf>) -> QemuSettings {
    QemuSettings {
        images,
        state_dir: state_dir.to_path_buf(),
        memory_mib: 512,
        cpus: 1,
        firmware: None,
    }
}

fn open(state_dir: &Path) -> anyhow::Result<QemuProvider> {
    Ok(QemuProvider::open(settings(
        state_dir,
        vec!["/nonexistent.raw".into()],
    ))?)
}

fn labels(pool: &str, state: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_POOL.to_owned(), pool.to_owned()),
        (LABEL_STATE.to_owned(), state.to_owned()),
        (LABEL_IMAGE.to_owned(), "/images/a.raw".to_owned()),
    ])
}

/// A VM as `create` leaves it, but without QEMU: labels staged into place, and a
/// record with `pid` (nothing runs unless the test starts something with that pid).
fn plant_vm(
    provider: &QemuProvider,
    name: &str,
    labels: &BTreeMap<String, String>,
    pid: Option<u32>,
) -> anyhow::Result<PathBuf> {
    let inner = &provider.inner;
    let dir = inner.vm_dir(name);
    inner.stage(name, labels, &dir)?;
    write_json_atomic(
        &dir.join(VM_FILE),
        &VmRecord {
            pid,
            api_port: 40_000,
            image: "/images/a.raw".into(),
            created_unix_ms: 1_700_000_000_000,
        },
    )?;
    Ok(dir)
}

/// A clearly fake QEMU: `tail` running under the name `qemu-system-x86_64` with the
/// VM's `-pidfile` argument, which is all the `/proc` check looks at.
fn fake_qemu(dir: &Path) -> anyhow::Result<Child> {
    let child = Command::new("bash")
        .arg("-c")
        .arg("exec -a qemu-system-x86_64 tail -f -- /dev/null -pidfile \"$0\"")
        .arg(dir.join(PID_FILE))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_vm_qemu(Path::new("/proc"), child.id(), dir) {
        anyhow::ensure!(Instant::now() < deadline, "the fake QEMU did not start");
        std::thread::sleep(EXIT_POLL);
    }
    Ok(child)
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

#[test]
fn settings_take_one_image_or_a_list_and_refuse_unknown_keys() -> anyhow::Result<()> {
    let one: QemuSettings = toml::from_str("images = \"/i/a.raw\"\nstate_dir = \"/s\"\n")?;
    assert_eq!(one.images, vec![PathBuf::from("/i/a.raw")]);
    assert_eq!((one.memory_mib, one.cpus, one.firmware), (1024, 2, None));
    let many: QemuSettings = toml::from_str(
        "images = [\"/i\", \"/j/b.raw\"]\nstate_dir = \"/s\"\nmemory_mib = 2048\ncpus = 4\nfirmware = \"uefi\"\n",
    )?;
    assert_eq!(many.images.len(), 2);
    assert_eq!(many.firmware, Some(FirmwareSetting::Uefi));
    assert_eq!((many.memory_mib, many.cpus), (2048, 4));
    let unknown = toml::from_str::<QemuSettings>("images = \"/i\"\nstate_dir = \"/s\"\nram = 1\n");
    assert!(unknown.is_err_and(|e| e.to_string().contains("ram")));
    let bad = toml::from_str::<QemuSettings>("images = 3\nstate_dir = \"/s\"\n");
    assert!(bad.is_err_and(|e| e.to_string().contains("images")));
    Ok(())
}

#[test]
fn open_refuses_settings_without_images_or_memory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path(), vec![]);
    assert!(matches!(
        QemuProvider::open(s.clone()),
        Err(QemuError::Settings(_))
    ));
    s.images = vec!["/x.raw".into()];
    s.memory_mib = 0;
    assert!(matches!(QemuProvider::open(s), Err(QemuError::Settings(_))));
    Ok(())
}

#[test]
fn images_are_newest_first_with_the_version_of_their_manifest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let builds = dir.path().join("builds");
    fs::create_dir(&builds)?;
    let (old, new, single) = (
        builds.join("old.raw"),
        builds.join("new.raw"),
        dir.path().join("single.raw"),
    );
    for (path, age) in [(&old, 300), (&new, 100), (&single, 200)] {
        let file = File::create(path)?;
        file.set_modified(SystemTime::now() - Duration::from_secs(age))?;
    }
    fs::write(builds.join("new.qcow2"), "not listed: not a .raw")?;
    // The manifest of the last build in the directory: it names new.raw only.
    fs::write(
        builds.join(MANIFEST_FILE),
        r#"{"basalt_version": "0.7.1", "name": "k3s-node", "outputs": [{"file": "new.raw", "sha256": "00", "size": 1}]}"#,
    )?;
    let state = dir.path().join("state");
    let provider = QemuProvider::open(settings(&state, vec![builds.clone(), single.clone()]))?;
    let images = provider.inner.images()?;
    let ids: Vec<&str> = images.iter().map(|i| i.id.as_str()).collect();
    let want = [&new, &single, &old].map(|p| p.canonicalize().map(|p| p.display().to_string()));
    assert_eq!(
        ids,
        want.iter()
            .map(|p| p.as_deref().unwrap_or("?"))
            .collect::<Vec<_>>()
    );
    assert_eq!(images[0].version.as_deref(), Some("0.7.1"));
    assert_eq!(images[1].version, None, "no manifest beside it");
    assert_eq!(images[2].version, None, "the manifest does not list it");
    assert!(images[0].created > images[1].created);

    let missing = QemuProvider::open(settings(&state, vec![dir.path().join("gone.raw")]))?;
    match missing.inner.images() {
        Err(QemuError::Image { path, .. }) => assert!(path.ends_with("gone.raw")),
        other => panic!("expected an image error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn labels_round_trip_and_survive_reopening_the_state_dir() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let rt = rt()?;
    let provider = open(dir.path())?;
    plant_vm(&provider, "warm-1", &labels("warm", "creating"), None)?;
    plant_vm(&provider, "warm-2", &labels("warm", "standby"), None)?;
    plant_vm(&provider, "other-1", &labels("other", "standby"), None)?;

    let mut promoted = labels("warm", "active");
    promoted.insert("basalt.io/cluster".into(), "customer-a".into());
    rt.block_on(provider.set_labels("warm-2", &promoted))?;
    drop(provider);

    let reopened = open(dir.path())?;
    let servers = rt.block_on(reopened.servers("warm"))?;
    let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["warm-1", "warm-2"]);
    assert_eq!(servers[1].labels, promoted);
    assert_eq!(servers[0].labels, labels("warm", "creating"));
    assert_eq!(
        servers[0].created,
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)
    );
    assert_eq!(reopened.provider_id(&servers[0]), "basalt-qemu://warm-1");
    // No temporary files are left beside the labels.
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("warm-2"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let unknown = rt.block_on(reopened.set_labels("warm-9", &promoted));
    assert!(unknown.is_err_and(|e| e.what.contains("warm-9") && !e.transient));
    Ok(())
}

#[test]
fn a_vm_whose_qemu_is_gone_is_listed_without_an_api() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let rt = rt()?;
    let provider = open(dir.path())?;
    // Recorded pids: one of an exited process, one alive but not this VM's QEMU (us).
    let mut exited = Command::new("true").spawn()?;
    exited.wait()?;
    plant_vm(
        &provider,
        "warm-1",
        &labels("warm", "standby"),
        Some(exited.id()),
    )?;
    plant_vm(
        &provider,
        "warm-2",
        &labels("warm", "standby"),
        Some(std::process::id()),
    )?;
    let vm3 = plant_vm(&provider, "warm-3", &labels("warm", "standby"), None)?;
    let mut qemu = fake_qemu(&vm3)?;
    // Only the pid file names it, as after a crash before vm.json got the pid.
    fs::write(vm3.join(PID_FILE), format!("{}\n", qemu.id()))?;

    let servers = rt.block_on(provider.servers("warm"))?;
    let apis: Vec<_> = servers.iter().map(|s| s.api).collect();
    let port = SocketAddr::from((Ipv4Addr::LOCALHOST, 40_000));
    assert_eq!(apis, [None, None, Some(port)]);
    assert!(servers
        .iter()
        .all(|s| s.labels == labels("warm", "standby")));
    assert_eq!(
        provider.inspect("warm-3")?.and_then(|i| i.pid),
        Some(qemu.id())
    );
    qemu.kill()?;
    qemu.wait()?;
    assert_eq!(rt.block_on(provider.servers("warm"))?[2].api, None);
    Ok(())
}

#[test]
fn delete_stops_the_vms_qemu_but_never_a_stranger_and_forgets_unknown_vms() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let rt = rt()?;
    let provider = open(dir.path())?;
    rt.block_on(provider.delete("never-was"))?;

    let vm1 = plant_vm(&provider, "warm-1", &labels("warm", "broken"), None)?;
    let mut qemu = fake_qemu(&vm1)?;
    write_json_atomic(
        &vm1.join(VM_FILE),
        &VmRecord {
            pid: Some(qemu.id()),
            api_port: 40_000,
            image: "/images/a.raw".into(),
            created_unix_ms: 0,
        },
    )?;
    rt.block_on(provider.delete("warm-1"))?;
    let status = qemu.wait()?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc_sigterm())
    );
    assert!(!vm1.exists());

    // A recorded pid that is some other process (a recycled pid) is left alone.
    let mut stranger = Command::new("sleep").arg("60").spawn()?;
    let vm2 = plant_vm(
        &provider,
        "warm-2",
        &labels("warm", "broken"),
        Some(stranger.id()),
    )?;
    rt.block_on(provider.delete("warm-2"))?;
    assert!(!vm2.exists());
    assert!(stranger.try_wait()?.is_none(), "a stranger was killed");
    stranger.kill()?;
    stranger.wait()?;

    // Deleting again, and names that are not names, are answered without touching files.
    rt.block_on(provider.delete("warm-2"))?;
    let bad = rt.block_on(provider.delete("../etc"));
    assert!(bad.is_err_and(|e| e.what.contains("../etc")));
    let left: Vec<_> = fs::read_dir(dir.path())?.filter_map(Result::ok).collect();
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}

fn libc_sigterm() -> i32 {
    Signal::SIGTERM as i32
}

#[test]
fn the_lock_is_held_by_one_holder_until_its_heartbeat_is_older_than_the_ttl() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let rt = rt()?;
    let (a, b) = (open(dir.path())?, open(dir.path())?);
    let ttl = Duration::from_millis(400);
    assert!(rt.block_on(a.lock("warm", "controller-a", ttl))?);
    assert!(!rt.block_on(b.lock("warm", "controller-b", ttl))?);
    // Another pool's lock is another lock.
    assert!(rt.block_on(b.lock("cold", "controller-b", ttl))?);
    std::thread::sleep(ttl / 2);
    // A renewal restarts the clock: b is still refused after the first ttl has passed.
    assert!(rt.block_on(a.lock("warm", "controller-a", ttl))?);
    std::thread::sleep(ttl * 3 / 4);
    assert!(!rt.block_on(b.lock("warm", "controller-b", ttl))?);
    std::thread::sleep(ttl);
    assert!(rt.block_on(b.lock("warm", "controller-b", ttl))?);
    assert!(!rt.block_on(a.lock("warm", "controller-a", ttl))?);
    let held: LockRecord = serde_json::from_slice(&fs::read(dir.path().join(".lock-warm.json"))?)?;
    assert_eq!(held.holder, "controller-b");
    // Lock files are not VMs.
    assert!(rt.block_on(a.servers("warm"))?.is_empty());
    Ok(())
}

#[test]
fn concurrent_lock_attempts_let_exactly_one_holder_in() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let providers: Vec<QemuProvider> =
        (0..8).map(|_| open(dir.path())).collect::<Result<_, _>>()?;
    let won: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = providers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                s.spawn(move || {
                    p.inner
                        .lock("warm", &format!("c{i}"), Duration::from_secs(60))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("panicked"))?
                    .map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<bool>>>()
    })?;
    assert_eq!(won.iter().filter(|&&w| w).count(), 1, "{won:?}");
    Ok(())
}

#[test]
fn create_refuses_bad_names_missing_images_and_taken_names_and_leaves_nothing() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let rt = rt()?;
    let provider = open(dir.path())?;
    let req = |name: &str, image: &str| CreateServer {
        name: name.into(),
        image: image.into(),
        labels: labels("warm", "creating"),
        user_data: "version = 1\n".into(),
    };
    for name in ["", ".hidden", "a/b", "-x", &"x".repeat(64)] {
        let e = rt.block_on(provider.create(&req(name, "/nonexistent.raw")));
        assert!(e.is_err_and(|e| e.what.contains("VM name")), "{name:?}");
    }
    let e = rt.block_on(provider.create(&req("warm-1", "/nonexistent.raw")));
    assert!(e.is_err_and(|e| e.what.contains("/nonexistent.raw")));
    assert!(
        fs::read_dir(dir.path())?.next().is_none(),
        "nothing created"
    );

    plant_vm(&provider, "warm-2", &labels("warm", "standby"), None)?;
    let image = dir.path().join("a.raw");
    fs::write(&image, [0u8; 512])?;
    let image = image.canonicalize()?.display().to_string();
    let taken = rt.block_on(provider.create(&req("warm-2", &image)));
    assert!(taken.is_err_and(|e| e.what.contains("warm-2") && e.what.contains("exists")));
    assert_eq!(rt.block_on(provider.servers("warm"))?.len(), 1);

    // A retried create of a running VM with the same labels and image answers with it.
    let vm3 = plant_vm(&provider, "warm-3", &labels("warm", "creating"), None)?;
    let mut qemu = fake_qemu(&vm3)?;
    let record = VmRecord {
        pid: Some(qemu.id()),
        api_port: 40_000,
        image: image.clone(),
        created_unix_ms: 0,
    };
    write_json_atomic(&vm3.join(VM_FILE), &record)?;
    let again = rt.block_on(provider.create(&req("warm-3", &image)))?;
    assert_eq!(
        again.api,
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 40_000)))
    );
    let mut other = req("warm-3", &image);
    other
        .labels
        .insert("basalt.io/generation".into(), "2".into());
    let e = rt.block_on(provider.create(&other));
    assert!(
        e.is_err_and(|e| e.what.contains("exists")),
        "other labels: not a retry"
    );
    qemu.kill()?;
    qemu.wait()?;
    let e = rt.block_on(provider.create(&req("warm-3", &image)));
    assert!(
        e.is_err_and(|e| e.what.contains("exists")),
        "QEMU gone: not a retry"
    );
    Ok(())
}

#[test]
fn the_proc_check_wants_qemu_with_this_vms_pid_file() -> anyhow::Result<()> {
    let proc_root = tempfile::tempdir()?;
    let vm = Path::new("/state/warm-1");
    let entry = |pid: u32, args: &[&str]| -> anyhow::Result<()> {
        let d = proc_root.path().join(pid.to_string());
        fs::create_dir_all(&d)?;
        let mut cmdline = args.join("\0");
        cmdline.push('\0');
        fs::write(d.join("cmdline"), cmdline)?;
        Ok(())
    };
    entry(
        1,
        &[
            "/usr/bin/qemu-system-x86_64",
            "-pidfile",
            "/state/warm-1/qemu.pid",
        ],
    )?;
    entry(
        2,
        &[
            "/usr/bin/qemu-system-x86_64",
            "-pidfile",
            "/state/warm-10/qemu.pid",
        ],
    )?;
    entry(3, &["/bin/sleep", "-pidfile", "/state/warm-1/qemu.pid"])?;
    entry(4, &[""])?; // a zombie
    let ours: Vec<u32> = (1..=5)
        .filter(|&p| is_vm_qemu(proc_root.path(), p, vm))
        .collect();
    assert_eq!(ours, [1]);
    Ok(())
}
