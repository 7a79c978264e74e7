//! `basalt hcloud` against the fake Hetzner API (a test double with a real sshd as its
//! rescue system): upload, images, prune, cleanup, and refusals of bad input. The
//! snapshot is checked with `sha256sum` over the fake's file, not with basalt's code.

use basalt_hcloud::fake::{Fake, FakeOptions, RescueFaults};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Output};

const MIB: u64 = 1024 * 1024;

fn sha256sum(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(out.status.success(), "{cmd}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("hash")
        .to_owned()
}

/// A sparse raw disk with some random data, its `.raw.zst` by the zstd tool and a
/// manifest as `basalt build` writes it; returns the raw sha256.
fn make_image(dir: &Path, name: &str, size: u64) -> String {
    let raw = dir.join(format!("{name}.raw"));
    let mut f = std::fs::File::create(&raw).expect("create");
    f.set_len(size).expect("size");
    f.seek(SeekFrom::Start(MIB)).expect("seek");
    let mut data = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open("/dev/urandom").expect("urandom"), MIB),
        &mut data,
    )
    .expect("random bytes");
    f.write_all(&data).expect("write");
    drop(f);
    let zst = dir.join(format!("{name}.raw.zst"));
    let ok = Command::new("zstd")
        .args(["-q", "-f", "-o"])
        .arg(&zst)
        .arg(&raw)
        .status()
        .expect("zstd");
    assert!(ok.success());
    let sha = sha256sum(&format!("sha256sum '{}'", raw.display()));
    let manifest = serde_json::json!({
        "basalt_version": "0.1.0", "name": name,
        "outputs": [{"file": format!("{name}.raw"), "sha256": sha, "size": size}],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).expect("manifest");
    sha
}

async fn basalt(fake: &Fake, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_basalt"));
    cmd.args(args)
        .env("HCLOUD_ENDPOINT", fake.endpoint())
        .env("HCLOUD_TOKEN", fake.token())
        .env("BASALT_HCLOUD_SSH_PORT", fake.ssh_port().to_string());
    tokio::task::spawn_blocking(move || cmd.output().expect("run basalt"))
        .await
        .expect("join")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "basalt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_images_prune_cleanup_through_the_cli() {
    if !basalt_hcloud::fake::available_or_skip("basalt hcloud CLI") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sha = make_image(dir.path(), "k3s-node", 12 * MIB);
    let image = dir.path().join("k3s-node.raw.zst");
    let image = image.to_str().expect("utf-8");
    let fake = Fake::start(FakeOptions {
        disk_bytes: 64 * MIB,
        ..FakeOptions::default()
    })
    .await
    .expect("fake");

    let first = json(
        &basalt(
            &fake,
            &["hcloud", "upload", image, "--label", "team=ops", "--json"],
        )
        .await,
    );
    let first_id = first["id"].as_u64().expect("id");
    assert_eq!(first["labels"]["team"], "ops");
    assert_eq!(first["labels"]["basalt.io/image"], "k3s-node");
    let snap = fake
        .snapshots()
        .into_iter()
        .find(|s| s.id == first_id)
        .expect("snapshot in the fake");
    let on_disk = sha256sum(&format!(
        "head -c {} '{}' | sha256sum",
        12 * MIB,
        snap.file.display()
    ));
    assert_eq!(on_disk, sha);
    assert!(
        fake.servers().is_empty() && fake.ssh_keys().is_empty(),
        "leaked"
    );

    let second = json(&basalt(&fake, &["hcloud", "upload", image, "--json"]).await);
    let second_id = second["id"].as_u64().expect("id");

    let list = json(
        &basalt(
            &fake,
            &[
                "hcloud",
                "images",
                "--selector",
                "basalt.io/image=k3s-node",
                "--json",
            ],
        )
        .await,
    );
    let ids: Vec<u64> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, vec![second_id, first_id], "newest first");
    assert_eq!(list[0]["sha256"], sha[..32]);
    let table = basalt(&fake, &["hcloud", "images"]).await;
    assert!(String::from_utf8_lossy(&table.stdout).contains(&sha[..32]));

    let pruned = json(&basalt(&fake, &["hcloud", "prune", "--keep", "1", "--json"]).await);
    assert_eq!(pruned["deleted"], serde_json::json!([first_id]));
    assert_eq!(fake.snapshots().len(), 1);

    let cleaned = json(
        &basalt(
            &fake,
            &["hcloud", "cleanup", "--older-than", "0s", "--json"],
        )
        .await,
    );
    assert_eq!(cleaned["servers"], serde_json::json!([]));

    // Refusals: a reserved label, a missing token file; nothing is created.
    let bad = basalt(
        &fake,
        &["hcloud", "upload", image, "--label", "basalt.io/image=x"],
    )
    .await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("basalt.io/"));
    let missing = dir.path().join("no-token");
    let bad = basalt(
        &fake,
        &[
            "hcloud",
            "images",
            "--token-file",
            missing.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no-token"));
    assert!(fake.servers().is_empty() && fake.ssh_keys().is_empty());
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_an_upload_deletes_the_server_and_key() {
    if !basalt_hcloud::fake::available_or_skip("basalt hcloud upload, Ctrl-C") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    make_image(dir.path(), "k3s-node", 4 * MIB);
    let fake = Fake::start(FakeOptions {
        disk_bytes: 16 * MIB,
        ..FakeOptions::default()
    })
    .await
    .expect("fake");
    // The rescue system never answers: the upload waits for SSH when SIGINT comes.
    fake.set_rescue_faults(RescueFaults {
        ssh_delay: std::time::Duration::from_secs(600),
        ..RescueFaults::default()
    });
    let child = Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(["hcloud", "upload"])
        .arg(dir.path().join("k3s-node.raw.zst"))
        .env("HCLOUD_ENDPOINT", fake.endpoint())
        .env("HCLOUD_TOKEN", fake.token())
        .env("BASALT_HCLOUD_SSH_PORT", fake.ssh_port().to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run basalt");
    // Wait until the server is up in rescue, then interrupt.
    let started = std::time::Instant::now();
    while !fake.servers().iter().any(|s| s.status == "running") {
        assert!(started.elapsed().as_secs() < 30, "no server powered on");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill")
        .success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"))
        .await
        .expect("join");
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("deleted"));
    assert!(
        fake.servers().is_empty(),
        "server leaked: {:?}",
        fake.servers()
    );
    assert!(fake.ssh_keys().is_empty(), "key leaked");
    assert!(fake.snapshots().is_empty());
    fake.shutdown().await;
}
