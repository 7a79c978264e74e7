//! `hcloud-fake`, what scripts and `examples/pipeline` run: it writes its env file, the
//! API answers with the token it names, and SIGTERM stops it cleanly.

mod common;

use basalt_hcloud::client::Client;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_writes_its_env_file_serves_and_stops_on_sigterm() {
    if !basalt_hcloud::fake::available_or_skip("hcloud-fake binary") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hcloud-fake"))
        .arg("--env-file")
        .arg(&env_file)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !env_file.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "no env file");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let env: BTreeMap<String, String> = std::fs::read_to_string(&env_file)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let port: u16 = env["BASALT_HCLOUD_SSH_PORT"].parse().unwrap();
    assert_ne!(port, 0);
    let client = Client::new(
        &env["HCLOUD_ENDPOINT"],
        &env["HCLOUD_TOKEN"],
        common::timing(),
    )
    .unwrap();
    assert!(client.images(None).await.unwrap().is_empty());
    // A wrong token is the API's `unauthorized`.
    let wrong = Client::new(&env["HCLOUD_ENDPOINT"], "wrong", common::timing()).unwrap();
    let e = wrong.images(None).await.unwrap_err();
    assert_eq!(e.code(), Some("unauthorized"), "{e}");

    // SIGTERM: a clean exit.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}
