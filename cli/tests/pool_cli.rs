//! `basalt pool` as a user runs it: the controller (`basalt pool run`) against the fake
//! Hetzner API (a test double speaking Hetzner's JSON), and `basalt pool status|delete`
//! through the pool API with certificates issued by `basalt pki`. The fake boots nothing,
//! so the servers stay `creating`; what is checked is the controller's bookkeeping, its
//! doors and its refusals.

use basalt_hcloud::fake::{Fake, FakeOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn basalt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(args)
        .output()
        .expect("run basalt")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "basalt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Setup {
    dir: tempfile::TempDir,
    api_port: u16,
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The pool CA and certificates, made by `basalt pki` as the README says.
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_str().expect("utf-8").to_owned();
        ok(&basalt(&["pki", "init", &format!("{d}/ca")]));
        let issue = |args: &[&str]| {
            let (ca, out) = (format!("{d}/ca"), format!("{d}/certs"));
            let mut all = vec!["pki", "issue"];
            all.extend_from_slice(args);
            all.extend_from_slice(&["--ca", &ca, "--out", &out]);
            ok(&basalt(&all));
        };
        issue(&["node", "controller", "--ip", "127.0.0.1"]);
        issue(&["client", "operator"]);
        issue(&["client", "autoscaler-a"]);
        Setup {
            dir,
            api_port: free_port(),
        }
    }

    fn pool_toml(&self, fake: &Fake, name: &str) -> PathBuf {
        std::fs::write(
            self.path("token-a"),
            "K10".to_owned() + &"0".repeat(64) + "::node:pw",
        )
        .expect("token");
        let text = format!(
            r#"name = "{name}"
standby = 2
max = 3
ca_dir = "ca"
tick = "1s"
lock_ttl = "4s"

[provider]
kind = "hetzner"
server_type = "cx22"
location = "fsn1"
image_selector = "basalt.io/image=k3s-node"
endpoint = "{endpoint}"
token_env = "TEST_HCLOUD_TOKEN"

[[cluster]]
name = "a"
server = "https://10.0.0.2:6443"
token_file = "token-a"
client_name = "autoscaler-a"

[listen]
grpc = "127.0.0.1:{grpc}"
api = "127.0.0.1:{api}"
cert = "certs/controller.pem"
key = "certs/controller.key"
admins = ["operator"]
"#,
            endpoint = fake.endpoint(),
            grpc = std::iter::repeat_with(free_port)
                .find(|p| *p != self.api_port)
                .expect("a second port"),
            api = self.api_port,
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, text).expect("pool.toml");
        path
    }

    fn run(&self, fake: &Fake, config: &Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_basalt"))
            .args(["pool", "run", "--config"])
            .arg(config)
            .env("TEST_HCLOUD_TOKEN", fake.token())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start basalt pool run")
    }

    fn api(&self, who: &str, args: &[&str]) -> Output {
        let d = self.dir.path().display();
        let endpoint = format!("https://127.0.0.1:{}", self.api_port);
        let (ca, cert, key) = (
            format!("{d}/ca/ca.pem"),
            format!("{d}/certs/{who}.pem"),
            format!("{d}/certs/{who}.key"),
        );
        let mut all: Vec<&str> = vec!["pool"];
        all.extend_from_slice(&args[..1]);
        all.extend_from_slice(&[
            "--endpoint",
            &endpoint,
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
        ]);
        all.extend_from_slice(&args[1..]);
        basalt(&all)
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop(mut child: Child) -> Output {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("basalt pool run did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_keeps_its_standbys_and_answers_only_admins() {
    if !basalt_hcloud::fake::available_or_skip("basalt pool CLI") {
        return;
    }
    let setup = Setup::new();
    let fake = Fake::start(FakeOptions {
        action_time: Duration::from_millis(20),
        ..FakeOptions::default()
    })
    .await
    .expect("start the fake Hetzner API");
    std::fs::write(setup.path("node.raw"), vec![0x5a; 4096]).expect("image");
    let labels = BTreeMap::from([("basalt.io/image".to_owned(), "k3s-node".to_owned())]);
    fake.add_snapshot(&setup.path("node.raw"), labels, Duration::from_secs(60))
        .await
        .expect("snapshot");
    let config = setup.pool_toml(&fake, "eu");
    let controller = setup.run(&fake, &config);

    // The controller creates the standbys on the fake, labelled as the pool's.
    let servers = wait_for("2 servers on the fake", Duration::from_secs(60), || {
        let s: Vec<_> = fake
            .servers()
            .into_iter()
            .filter(|s| s.labels.get("basalt.io/pool").map(String::as_str) == Some("eu"))
            .collect();
        (s.len() == 2).then_some(s)
    });
    for s in &servers {
        assert_eq!(
            s.labels.get("basalt.io/state").map(String::as_str),
            Some("creating"),
            "{s:?}"
        );
    }

    // An admin reads the status through the pool API.
    let status = wait_for("the pool API", Duration::from_secs(30), || {
        let out = setup.api("operator", &["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON status"))
    });
    assert_eq!(status["pool"], "eu", "{status}");
    assert_eq!(
        status["servers"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    let human = ok(&setup.api("operator", &["status"]));
    assert!(human.contains("creating"), "{human}");

    // An autoscaler's certificate is the pool CA's too, but it is no admin.
    let refused = setup.api("autoscaler-a", &["delete", &servers[0].name]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("403"), "{why}");
    assert_eq!(fake.servers().len(), 2, "nothing deleted");

    // A second controller on the same pool is refused while the first holds the lock.
    let mut second = setup.run(&fake, &config);
    wait_for(
        "the second controller to exit",
        Duration::from_secs(60),
        || second.try_wait().expect("wait").map(|_| ()),
    );
    let out = second.wait_with_output().expect("output");
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("another controller holds the lock"), "{why}");

    // An admin deletes a standby; the controller replaces it.
    ok(&setup.api("operator", &["delete", &servers[0].name]));
    wait_for("the replacement", Duration::from_secs(60), || {
        let names: Vec<_> = fake.servers().into_iter().map(|s| s.name).collect();
        (names.len() == 2 && !names.contains(&servers[0].name)).then_some(())
    });

    let out = stop(controller);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("controller stopped"), "{said}");
    assert!(
        !said.contains(fake.token()),
        "the Hetzner token is in the log"
    );

    // SIGKILL: nothing is cleaned up, the lock stays until its TTL. A new controller then
    // takes over and finds the pool complete: no server created twice, none leaked.
    let before: Vec<_> = fake.servers().into_iter().map(|s| s.id).collect();
    let start_one = |what: &str| {
        wait_for(what, Duration::from_secs(60), || {
            let mut c = setup.run(&fake, &config);
            std::thread::sleep(Duration::from_secs(2));
            match c.try_wait().expect("wait") {
                None => Some(c),
                Some(_) => None,
            }
        })
    };
    let mut killed = start_one("a controller after the first one's lock expired");
    // It holds the lock and serves: the pool API answers.
    wait_for("the pool API", Duration::from_secs(30), || {
        setup
            .api("operator", &["status"])
            .status
            .success()
            .then_some(())
    });
    assert!(killed.try_wait().expect("wait").is_none(), "it runs");
    killed.kill().expect("SIGKILL");
    let _ = killed.wait();
    let restarted = start_one("a controller after the killed one's lock expired");
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<_> = fake.servers().into_iter().map(|s| s.id).collect();
    assert_eq!(
        after, before,
        "the same two servers, nothing new, nothing lost"
    );
    let out = stop(restarted);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fake.shutdown().await;
}
