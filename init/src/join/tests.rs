use super::*;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};

const HASH: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const OTHER: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn config(cluster: bool) -> (MachineConfig, String) {
    let mut text = String::from(
        "version = 1\n[node]\nhostname = \"w1\"\nlabels = { \"pool\" = \"warm\" }\n\
             taints = [\"dedicated=gpu:NoSchedule\"]\n[api]\n\
             ca = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\n\
             cert = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\n\
             key = \"-----BEGIN PRIVATE KEY-----\\nAA==\\n-----END PRIVATE KEY-----\\n\"\n",
    );
    if cluster {
        text.push_str(&format!(
            "[cluster]\nserver = \"https://10.0.2.2:6443\"\ntoken = \"K10{HASH}::server:pw\"\n"
        ));
    }
    (MachineConfig::parse(&text).expect("valid config"), text)
}

/// A server whose CA hashes to `actual`, or that cannot be reached for the first
/// `unreachable` checks.
struct FakeServer {
    actual: String,
    unreachable: AtomicUsize,
    checks: AtomicUsize,
}

impl FakeServer {
    fn new(actual: &str, unreachable: usize) -> FakeServer {
        FakeServer {
            actual: actual.into(),
            unreachable: AtomicUsize::new(unreachable),
            checks: AtomicUsize::new(0),
        }
    }
}

impl CaChecker for Arc<FakeServer> {
    fn check(&self, server: &str, token: &Token) -> Result<CaCheck, K3sError> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        if self.unreachable.load(Ordering::SeqCst) > 0 {
            self.unreachable.fetch_sub(1, Ordering::SeqCst);
            return Err(K3sError::Connect {
                url: format!("{server}/cacerts"),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        }
        let expected = token.ca_hash().unwrap_or_default();
        if expected == self.actual {
            Ok(CaCheck::Matched {
                hash: self.actual.clone(),
            })
        } else {
            Err(K3sError::CaMismatch {
                server: server.into(),
                expected: expected.into(),
                actual: self.actual.clone(),
            })
        }
    }
}

#[derive(Default)]
struct Recorded {
    persisted: Vec<String>,
    k3s_config: Vec<String>,
    started: usize,
}

#[derive(Default)]
struct FakeHost {
    calls: Mutex<Recorded>,
    /// Nothing taken under supervision.
    fail_start: bool,
    /// Supervised, but the process does not run.
    not_running: bool,
}

impl FakeHost {
    fn calls(&self) -> MutexGuard<'_, Recorded> {
        self.calls.lock().expect("lock")
    }
}

impl Host for Arc<FakeHost> {
    fn persist(&self, text: &str) -> Result<(), JoinError> {
        self.calls().persisted.push(text.into());
        Ok(())
    }
    fn node_ip(&self, _: &MachineConfig) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 2, 15]))
    }
    fn write_k3s_config(&self, json: &str) -> Result<(), JoinError> {
        self.calls().k3s_config.push(json.into());
        Ok(())
    }
    fn start_agent(&self) -> Result<(), JoinError> {
        if self.fail_start {
            return Err(JoinError::Start(
                "spawn /usr/local/bin/k3s: not found".into(),
            ));
        }
        self.calls().started += 1;
        if self.not_running {
            return Err(JoinError::NotRunning("exit 1".into()));
        }
        Ok(())
    }
}

fn joiner(server: &Arc<FakeServer>, host: &Arc<FakeHost>) -> Arc<Joiner> {
    let retry = Retry {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(40),
    };
    Arc::new(Joiner::new(
        Box::new(server.clone()),
        Box::new(host.clone()),
        retry,
    ))
}

#[test]
fn a_ca_mismatch_persists_nothing_starts_nothing_and_names_both_hashes() {
    let server = Arc::new(FakeServer::new(OTHER, 0));
    let host = Arc::new(FakeHost::default());
    let j = joiner(&server, &host);
    let (c, text) = config(true);
    let got = j.apply(&c, &text, Instant::now()).expect("answered");
    let Applied::Refused { error } = got else {
        panic!("not refused: {got:?}");
    };
    assert!(error.contains(HASH) && error.contains(OTHER), "{error}");
    let calls = host.calls();
    assert!(calls.persisted.is_empty() && calls.k3s_config.is_empty());
    assert_eq!(calls.started, 0);
    let st = j.status();
    assert_eq!(st.state, JoinState::Failed);
    assert_eq!(st.server.as_deref(), Some("https://10.0.2.2:6443"));
    assert_eq!(st.last_error.as_deref(), Some(error.as_str()));
}

#[test]
fn a_match_persists_writes_k3s_config_and_starts_the_agent_once() {
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost::default());
    let j = joiner(&server, &host);
    let (c, text) = config(true);
    let got = j.apply(&c, &text, Instant::now()).expect("answered");
    assert!(matches!(got, Applied::Joined { .. }), "{got:?}");
    {
        let calls = host.calls();
        assert_eq!(calls.persisted, std::slice::from_ref(&text));
        assert_eq!(calls.started, 1);
        let k3s: serde_json::Value = serde_json::from_str(&calls.k3s_config[0]).expect("json");
        assert_eq!(k3s["server"], "https://10.0.2.2:6443");
        assert_eq!(k3s["token"], format!("K10{HASH}::server:pw"));
        assert_eq!(k3s["node-name"], "w1");
        assert_eq!(k3s["node-ip"], "10.0.2.15");
        assert_eq!(k3s["node-label"], serde_json::json!(["pool=warm"]));
        assert_eq!(
            k3s["node-taint"],
            serde_json::json!(["dedicated=gpu:NoSchedule"])
        );
    }
    assert_eq!(j.status().state, JoinState::Joined);
    assert_eq!(j.status().last_error, None);
    // The same config again changes nothing; another one is refused.
    assert_eq!(
        j.apply(&c, &text, Instant::now()).expect("answered"),
        Applied::Unchanged
    );
    let (standby, text) = config(false);
    assert!(matches!(
        j.apply(&standby, &text, Instant::now()),
        Err(ApplyError::AlreadyJoined { .. })
    ));
    assert_eq!(host.calls().started, 1);
    assert_eq!(host.calls().persisted.len(), 1);
}

#[test]
fn a_config_without_cluster_is_persisted_and_stays_standby() {
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost::default());
    let j = joiner(&server, &host);
    let (c, text) = config(false);
    assert_eq!(
        j.apply(&c, &text, Instant::now()).expect("answered"),
        Applied::Standby
    );
    assert_eq!(host.calls().persisted, [text]);
    assert_eq!(host.calls().started, 0);
    assert_eq!(server.checks.load(Ordering::SeqCst), 0);
    assert_eq!(j.status().state, JoinState::Standby);
}

#[test]
fn an_agent_that_cannot_start_is_a_failed_join_of_a_persisted_config() {
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost {
        fail_start: true,
        ..FakeHost::default()
    });
    let j = joiner(&server, &host);
    let (c, text) = config(true);
    let got = j.apply(&c, &text, Instant::now()).expect("answered");
    let Applied::Failed { error } = got else {
        panic!("{got:?}");
    };
    assert!(error.contains("not found"), "{error}");
    assert_eq!(host.calls().persisted.len(), 1);
    assert_eq!(j.status().state, JoinState::Failed);
    // Nothing runs, so a corrected config may come.
    assert!(j.apply(&c, &text, Instant::now()).is_ok());
}

#[test]
fn a_supervised_agent_that_does_not_run_is_failed_but_not_started_again() {
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost {
        not_running: true,
        ..FakeHost::default()
    });
    let j = joiner(&server, &host);
    let (c, _) = config(true);
    j.join_at_boot(c.clone(), |_| true)
        .expect("spawn")
        .join()
        .expect("join thread");
    assert_eq!(server.checks.load(Ordering::SeqCst), 1, "no retry");
    let st = j.status();
    assert_eq!(st.state, JoinState::Failed);
    assert!(st.last_error.is_some_and(|e| e.contains("exit 1")));
    // The supervisor owns it now: another config is refused, the same one is not
    // started twice.
    let (standby, text) = config(false);
    assert!(matches!(
        j.apply(&standby, &text, Instant::now()),
        Err(ApplyError::AlreadyJoined { .. })
    ));
    let text = c.to_toml().expect("toml");
    assert_eq!(
        j.apply(&c, &text, Instant::now()).expect("answered"),
        Applied::Unchanged
    );
    assert_eq!(host.calls().started, 1);
}

fn wait_for(j: &Joiner, state: JoinState) -> JoinStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = j.status();
        if st.state == state {
            return st;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_boot_join_retries_an_unreachable_server_then_joins() {
    let server = Arc::new(FakeServer::new(HASH, 3));
    let host = Arc::new(FakeHost::default());
    let j = joiner(&server, &host);
    let (c, _) = config(true);
    let t = j.join_at_boot(c, |_| true).expect("spawn");
    t.join().expect("join thread");
    assert_eq!(j.status().state, JoinState::Joined);
    assert_eq!(server.checks.load(Ordering::SeqCst), 4);
    assert_eq!(host.calls().started, 1);
    // A boot join does not write the config again: it came from STATE.
    assert!(host.calls().persisted.is_empty());
}

#[test]
fn a_boot_join_reports_its_last_error_and_an_apply_supersedes_it() {
    let server = Arc::new(FakeServer::new(OTHER, 0));
    let host = Arc::new(FakeHost::default());
    let j = joiner(&server, &host);
    let (c, _) = config(true);
    let t = j.join_at_boot(c, |_| true).expect("spawn");
    let st = wait_for(&j, JoinState::Failed);
    assert!(st.last_error.is_some_and(|e| e.contains(OTHER)));
    while server.checks.load(Ordering::SeqCst) < 3 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let (standby, text) = config(false);
    assert_eq!(
        j.apply(&standby, &text, Instant::now()).expect("answered"),
        Applied::Standby
    );
    t.join().expect("the boot join ends once superseded");
    assert_eq!(j.status().state, JoinState::Standby);
    assert_eq!(host.calls().started, 0);
}

#[test]
fn retry_delays_double_up_to_the_cap() {
    let r = Retry::default();
    let got: Vec<u64> = (1..=7).map(|n| r.delay(n).as_secs()).collect();
    assert_eq!(got, [2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(r.delay(u32::MAX), r.max);
}

#[test]
fn rancher_is_bound_once_and_secrets_are_written_0600() {
    use crate::sys::{Call, Recording};
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join(RANCHER_MOUNT)).expect("mkdir");
    let mut sys = Recording::default();
    bind_rancher(&mut sys, root.path()).expect("bind");
    assert!(root.path().join(RANCHER_STATE).is_dir());
    assert!(
        matches!(sys.calls.as_slice(), [Call::Mount { target, .. }] if target.ends_with(RANCHER_MOUNT)),
        "{:?}",
        sys.calls
    );
    let path = root.path().join(K3S_CONFIG);
    write_secret(&path, b"{}\n").expect("write");
    write_secret(&path, b"{\"a\":1}\n").expect("write again");
    let meta = std::fs::metadata(&path).expect("meta");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&path).expect("read"), b"{\"a\":1}\n");
    let spec = agent_spec();
    assert_eq!(
        spec.argv,
        [K3S_BIN, "agent", "--config", "/etc/rancher/k3s/config.yaml"]
    );
}

#[test]
fn a_joined_node_takes_a_new_api_section_but_not_another_cluster() {
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost::default());
    let j = joiner(&server, &host);
    let (c, text) = config(true);
    assert!(matches!(
        j.apply(&c, &text, Instant::now()).expect("answered"),
        Applied::Joined { .. }
    ));
    // Same [cluster], a rotated [api] cert and another label: saved, agent untouched.
    let rotated_text = text
        .replace(
            "cert = \"-----BEGIN CERTIFICATE-----\\nAA==",
            "cert = \"-----BEGIN CERTIFICATE-----\\nBB==",
        )
        .replace("\"warm\"", "\"hot\"");
    assert_ne!(rotated_text, text);
    let rotated = MachineConfig::parse(&rotated_text).expect("valid");
    assert_eq!(rotated.cluster, c.cluster);
    assert_eq!(
        j.apply(&rotated, &rotated_text, Instant::now())
            .expect("answered"),
        Applied::Updated
    );
    assert_eq!(host.calls().persisted.last(), Some(&rotated_text));
    assert_eq!(host.calls().started, 1, "the agent is not restarted");
    assert_eq!(server.checks.load(Ordering::SeqCst), 1, "no new CA check");
    assert_eq!(j.status().state, JoinState::Joined);
    // The rotated config is now the running one.
    assert_eq!(
        j.apply(&rotated, &rotated_text, Instant::now())
            .expect("answered"),
        Applied::Unchanged
    );
    // Another [cluster] is still a conflict, and nothing is saved for it.
    let other_text = rotated_text.replace("server:pw", "server:other");
    let other = MachineConfig::parse(&other_text).expect("valid");
    assert!(matches!(
        j.apply(&other, &other_text, Instant::now()),
        Err(ApplyError::AlreadyJoined { .. })
    ));
    assert_eq!(host.calls().persisted.len(), 2);
}

fn joiner_with_prep(
    server: &Arc<FakeServer>,
    host: &Arc<FakeHost>,
    prep: crate::boot::background::PrepSlot,
) -> Joiner {
    Joiner::new(
        Box::new(server.clone()),
        Box::new(host.clone()),
        Retry::default(),
    )
    .with_prep(prep)
}

#[test]
fn a_promotion_waits_for_the_background_prep_before_it_writes_or_starts() {
    use crate::boot::background::{Background, PrepSlot};
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost::default());
    let slot = PrepSlot::default();
    let (go, gate) = std::sync::mpsc::channel::<()>();
    slot.set(Background::spawn("k3s-prep", move || {
        gate.recv().map_err(|e| e.to_string())
    }));
    let j = Arc::new(joiner_with_prep(&server, &host, slot));
    let applying = {
        let j = Arc::clone(&j);
        std::thread::spawn(move || {
            let (c, text) = config(true);
            j.apply(&c, &text, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!applying.is_finished(), "did not wait for the prep");
    // The CA check and the persist ran meanwhile; nothing was written for K3s.
    assert_eq!(server.checks.load(Ordering::SeqCst), 1);
    assert!(host.calls().k3s_config.is_empty());
    assert_eq!(host.calls().started, 0);
    go.send(()).expect("send");
    let got = applying.join().expect("join").expect("answered");
    assert!(matches!(got, Applied::Joined { .. }), "{got:?}");
    assert_eq!(host.calls().started, 1);
}

#[test]
fn a_failed_background_prep_fails_the_promotion_with_its_reason() {
    use crate::boot::background::{Background, PrepSlot};
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost::default());
    let slot = PrepSlot::default();
    slot.set(Background::spawn("k3s-prep", || {
        Err("module br_netfilter: load /lib/modules/6.1/br_netfilter.ko: No such file".into())
    }));
    let j = joiner_with_prep(&server, &host, slot);
    let (c, text) = config(true);
    let got = j.apply(&c, &text, Instant::now()).expect("answered");
    let Applied::Failed { error } = got else {
        panic!("not failed: {got:?}");
    };
    assert!(
        error.contains("k3s-prep failed: module br_netfilter: load"),
        "{error}"
    );
    assert_eq!(j.status().state, JoinState::Failed);
    assert_eq!(j.status().last_error.as_deref(), Some(error.as_str()));
    assert!(host.calls().k3s_config.is_empty());
    assert_eq!(host.calls().started, 0);
}
