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
    let booted = dir.path().join("booted");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hcloud-fake"))
        .arg("--env-file")
        .arg(&env_file)
        .arg("--boot-hook")
        .arg(format!(
            "env | grep ^HCLOUD_FAKE_ | sort > {0}.tmp && mv {0}.tmp {0}",
            booted.display()
        ))
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

    // Power-on without rescue runs the boot hook with the server's disk and metadata.
    let server = client
        .create_server(&basalt_hcloud::api::CreateServer {
            name: "worker-1".into(),
            server_type: "cx22".into(),
            image: "debian-12".into(),
            location: None,
            start_after_create: false,
            labels: BTreeMap::new(),
            user_data: Some("version = 1\n".into()),
        })
        .await
        .unwrap();
    client
        .server_action(server.id, "poweron", None)
        .await
        .unwrap();
    let started = Instant::now();
    while !booted.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "no boot hook");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hook: BTreeMap<String, String> = std::fs::read_to_string(&booted)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(hook["HCLOUD_FAKE_SERVER_ID"], server.id.to_string());
    assert_eq!(hook["HCLOUD_FAKE_SERVER_NAME"], "worker-1");
    assert!(std::path::Path::new(&hook["HCLOUD_FAKE_DISK"]).is_file());
    let userdata = reqwest::get(format!(
        "http://{}/hetzner/v1/userdata",
        hook["HCLOUD_FAKE_METADATA"]
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(userdata, "version = 1\n");

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
