//! The `basalt` binary's behaviour on bad input and interruption: clear errors, nothing
//! left behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn basalt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_basalt"))
}

fn standins(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let k3s = dir.join("k3s-standin");
    let images = dir.join("k3s-airgap-images-standin.tar.zst");
    std::fs::write(&k3s, "basalt test stand-in for the k3s binary\n").expect("write");
    std::fs::write(&images, "basalt test stand-in for the k3s airgap images\n").expect("write");
    vec![
        "--input".into(),
        format!("k3s={}", k3s.display()),
        "--input".into(),
        format!("k3s-images={}", images.display()),
    ]
}

/// Every file and folder below `dir` (hidden ones included).
fn everything(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.path());
            if e.path().is_dir() {
                out.extend(everything(&e.path()));
            }
        }
    }
    out
}

/// Copies the default spec and its lock into `dir`, editing the lock.
fn spec_with_lock(dir: &Path, edit_lock: impl Fn(String) -> String) -> PathBuf {
    let spec = dir.join("node.toml");
    std::fs::copy(workspace().join("images/k3s-node.toml"), &spec).expect("copy spec");
    let lock = std::fs::read_to_string(workspace().join("images/k3s-node.lock")).expect("lock");
    std::fs::write(dir.join("node.lock"), edit_lock(lock)).expect("write lock");
    spec
}

#[test]
fn locked_build_refuses_a_lock_that_disagrees_and_names_the_input() {
    let d = tempfile::tempdir().expect("tempdir");
    let spec = spec_with_lock(d.path(), |l| l.replacen("2.06-13+deb12u2", "2.06-0", 1));
    let out = basalt()
        .args(["build", "--locked", "--out"])
        .arg(d.path().join("out"))
        .arg("--cache")
        .arg(d.path().join("cache"))
        .arg(&spec)
        .output()
        .expect("run basalt");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("input grub-bios") && stderr.contains("version"),
        "{stderr}"
    );
    assert!(!d.path().join("out").exists());
}

#[test]
fn locked_build_without_a_lock_says_how_to_make_one() {
    let d = tempfile::tempdir().expect("tempdir");
    let spec = spec_with_lock(d.path(), |l| l);
    std::fs::remove_file(d.path().join("node.lock")).expect("rm");
    let out = basalt()
        .args(["build", "--locked"])
        .arg(&spec)
        .output()
        .expect("run basalt");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("basalt lock"), "{stderr}");
}

#[test]
fn a_typo_in_the_spec_names_the_key_and_the_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let spec = d.path().join("typo.toml");
    let text = std::fs::read_to_string(workspace().join("images/k3s-node.toml")).expect("spec");
    std::fs::write(&spec, text.replace("root_mib", "rootmib")).expect("write");
    let out = basalt()
        .arg("build")
        .arg(&spec)
        .arg("--out")
        .arg(d.path().join("out"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rootmib") && stderr.contains("typo.toml"),
        "{stderr}"
    );
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn an_interrupted_build_leaves_no_output_and_no_partial_work() {
    let d = tempfile::tempdir().expect("tempdir");
    let out_dir = d.path().join("out");
    let mut child = basalt()
        .args(["build", "--out"])
        .arg(&out_dir)
        .arg(workspace().join("images/k3s-node.toml"))
        .args(standins(&d.path().join("standins")))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn basalt");
    // Interrupt once the work folder exists (after the inputs and basalt-init steps).
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("[3/") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "build never reached step 3:\n{seen}"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{seen}{}", rest.join("\n"));
    assert!(
        rest.iter().any(|l| l.contains("interrupted")),
        "{}",
        rest.join("\n")
    );
    assert_eq!(everything(&out_dir), Vec::<PathBuf>::new());
}

#[test]
#[cfg_attr(
    any(basalt_skip_qemu, basalt_skip_root),
    ignore = "needs root and the image host tools: scripts/install-host-tools"
)]
fn a_full_disk_fails_with_the_file_named_and_leaves_no_output() {
    let d = tempfile::tempdir().expect("tempdir");
    let out_dir = d.path().join("small");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    // A 24 MiB filesystem holds the work folder's first files but not a whole image.
    let mounted = nix::mount::mount(
        Some("tmpfs"),
        &out_dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=24m"),
    );
    assert!(
        mounted.is_ok(),
        "this test mounts a small tmpfs and needs root: {mounted:?}"
    );
    let out = basalt()
        .args(["build", "--out"])
        .arg(&out_dir)
        .arg(workspace().join("images/k3s-node.toml"))
        .args(standins(&d.path().join("standins")))
        .output()
        .expect("run basalt");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let left = everything(&out_dir);
    let _ = nix::mount::umount(&out_dir);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(
        stderr.contains(&out_dir.display().to_string()),
        "the message names no file: {stderr}"
    );
    assert_eq!(left, Vec::<PathBuf>::new(), "{stderr}");
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_pin_that_left_the_archive_is_named_and_lock_update_repins_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let spec = d.path().join("node.toml");
    let text = std::fs::read_to_string(workspace().join("images/k3s-node.toml")).expect("spec");
    // A version of grub-efi-amd64-bin that the archive does not have (any more).
    let gone = text.replacen(
        "version = \"2.06-13+deb12u2\"\nsha256 = \"c04786d9f64fbf7cd181013266a8af52b463599cc54189915d03f1459e743135\"",
        "version = \"2.06-1\"\nsha256 = \"c04786d9f64fbf7cd181013266a8af52b463599cc54189915d03f1459e743135\"",
        1,
    );
    assert_ne!(
        gone, text,
        "the test could not find the grub-efi pin to edit"
    );
    std::fs::write(&spec, &gone).expect("write");

    let out = basalt()
        .arg("lock")
        .arg(&spec)
        .output()
        .expect("run basalt lock");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("has left the archive"), "{stderr}");
    assert!(stderr.contains("basalt lock --update grub-efi"), "{stderr}");
    assert!(!d.path().join("node.lock").exists());

    let out = basalt()
        .args(["lock", "--update", "grub-efi"])
        .arg(&spec)
        .output()
        .expect("run basalt lock --update");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let repinned = std::fs::read_to_string(&spec).expect("spec");
    assert!(!repinned.contains("\"2.06-1\""), "{repinned}");
    assert!(
        repinned.contains("# The default basalt node"),
        "comments were lost"
    );
    let lock = std::fs::read_to_string(d.path().join("node.lock")).expect("lock written");
    assert!(lock.contains("grub-efi-amd64-bin"), "{lock}");
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn a_basalt_copied_out_of_the_tree_builds_the_default_image_with_its_embedded_init() {
    let d = tempfile::tempdir().expect("tempdir");
    assert!(
        !d.path()
            .starts_with(workspace().canonicalize().expect("workspace")),
        "the temporary folder must lie outside the source tree"
    );
    let alone = d.path().join("bin/basalt");
    std::fs::create_dir_all(alone.parent().expect("bin")).expect("mkdir");
    std::fs::copy(env!("CARGO_BIN_EXE_basalt"), &alone).expect("copy basalt");
    let spec = spec_with_lock(d.path(), |lock| lock);
    let out = Command::new(&alone)
        .current_dir(d.path())
        .env_remove("BASALT_SOURCE")
        .args(["build", "--locked", "--out"])
        .arg(d.path().join("out"))
        .arg(&spec)
        .args(standins(&d.path().join("standins")))
        .output()
        .expect("run the copied basalt");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    // The image's basalt-init is the one embedded at compile time (sha256sum as the oracle).
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.path().join("out/manifest.json")).expect("manifest"),
    )
    .expect("manifest JSON");
    let embedded = Command::new("sha256sum")
        .arg(env!("BASALT_EMBEDDED_INIT"))
        .output()
        .expect("sha256sum");
    let embedded = String::from_utf8_lossy(&embedded.stdout);
    let recorded = manifest["basalt_init"]["sha256"]
        .as_str()
        .expect("basalt_init.sha256");
    assert_eq!(embedded.split_whitespace().next(), Some(recorded));
    assert!(d.path().join("out/k3s-node.raw").is_file());
}

#[test]
fn the_embedded_basalt_init_is_a_release_build_without_the_test_service() {
    // grep as the oracle: the test service's fw_cfg entry name is in a basalt-init built
    // with the `testd` feature and nowhere in one built without it.
    let grep = |pattern: &str| {
        Command::new("grep")
            .args(["-c", "-a", "-F", pattern])
            .arg(env!("BASALT_EMBEDDED_INIT"))
            .output()
            .expect("grep")
            .status
            .success()
    };
    assert!(grep("[basalt]"), "not basalt-init?");
    assert!(
        !grep(basalt_api::layout::fw_cfg::TEST_SERVICE),
        "the test service is in the release basalt-init"
    );
}
