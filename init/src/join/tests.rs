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

/// [`FakeServer`]'s verdict, given only once `host` has written K3s's config aside
/// (or after 5 s): a join that prepares only after the check waits here in vain.
struct AnswersOnceStaged {
    server: Arc<FakeServer>,
    host: Arc<FakeHost>,
}

impl CaChecker for AnswersOnceStaged {
    fn check(&self, server: &str, token: &Token) -> Result<CaCheck, K3sError> {
        let calls = self.host.calls();
        let (calls, _) = self
            .host
            .staged
            .wait_timeout_while(calls, Duration::from_secs(5), |c| c.staged == 0)
            .expect("lock");
        if calls.staged == 0 {
            return Err(K3sError::BadResponse {
                url: format!("{server}/cacerts"),
                reason: "the test: nothing was prepared while the check ran".into(),
            });
        }
        drop(calls);
        self.server.check(server, token)
    }
}

#[derive(Default)]
struct Recorded {
    persisted: Vec<String>,
    k3s_config: Vec<String>,
    started: usize,
    restarted: usize,
    /// K3s configs written aside (committed or not).
    staged: usize,
    metadata_closed: usize,
}

#[derive(Default)]
struct FakeHost {
    calls: Mutex<Recorded>,
    /// What `agent_run` answers.
    run: Mutex<Option<AgentRun>>,
    /// Nothing taken under supervision.
    fail_start: bool,
    /// Supervised, but the process does not run.
    not_running: bool,
    /// The applied config's save fails when committed.
    fail_persist: bool,
    /// Told when a K3s config is written aside.
    staged: std::sync::Condvar,
}

impl FakeHost {
    fn calls(&self) -> MutexGuard<'_, Recorded> {
        self.calls.lock().expect("lock")
    }

    fn set_run(&self, run: Option<AgentRun>) {
        *self.run.lock().expect("lock") = run;
    }
}

/// Running for a minute, the kubelet certificate written 50 s ago: registered.
fn registered_run() -> AgentRun {
    AgentRun {
        running_for: Some(Duration::from_secs(60)),
        credentials_age: Some(Duration::from_secs(50)),
        ..AgentRun::default()
    }
}

/// The double refused by the server: restarted 1, 3 and 7 s ago, in backoff now.
fn crash_looping_run() -> AgentRun {
    AgentRun {
        running_for: None,
        restart_ages: vec![secs(7), secs(3), secs(1)],
        last_exit: Some("exit 1".into()),
        last_line: Some(
            "k3s-agent-double: registration failed: https://10.0.2.2:6443/v1-k3s/client-kubelet.crt: 401 Unauthorized".into(),
        ),
        credentials_age: None,
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Host for Arc<FakeHost> {
    fn stage_persist(&self, text: &str) -> Result<Box<dyn Commit>, JoinError> {
        let (me, text) = (Arc::clone(self), text.to_owned());
        Ok(Box::new(CommitFn(move || {
            if me.fail_persist {
                return Err(JoinError::Persist(
                    "/var/lib/basalt/config.toml".into(),
                    std::io::Error::other("EIO"),
                ));
            }
            me.calls().persisted.push(text);
            Ok(())
        })))
    }
    fn node_ip(&self, _: &MachineConfig) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 2, 15]))
    }
    fn stage_k3s_config(&self, json: &str) -> Result<Box<dyn Commit>, JoinError> {
        self.calls().staged += 1;
        self.staged.notify_all();
        let (me, json) = (Arc::clone(self), json.to_owned());
        Ok(Box::new(CommitFn(move || {
            me.calls().k3s_config.push(json);
            Ok(())
        })))
    }
    fn close_metadata(&self) -> Result<(), JoinError> {
        self.calls().metadata_closed += 1;
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
    fn restart_agent(&self) -> Result<(), JoinError> {
        self.calls().restarted += 1;
        Ok(())
    }
    fn agent_run(&self) -> Option<AgentRun> {
        self.run.lock().expect("lock").clone()
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
fn a_save_failing_after_the_start_is_an_error_answer_and_in_status() {
    // The agent is started before the applied config's save is committed (the save
    // is off the exec's path); a save that then fails is no success to report.
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost {
        fail_persist: true,
        ..FakeHost::default()
    });
    let j = joiner(&server, &host);
    let (c, text) = config(true);
    let err = j.apply(&c, &text, Instant::now()).expect_err("not saved");
    assert!(matches!(err, ApplyError::Persist(_)), "{err:?}");
    assert_eq!(host.calls().started, 1);
    assert_eq!(host.calls().k3s_config.len(), 1);
    let error = j.status().last_error.expect("an error in status");
    assert!(
        error.contains("not saved") && error.contains("EIO"),
        "{error}"
    );
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
    assert_eq!(j.status().state, JoinState::AgentStarted);
    assert_eq!(j.status().last_error, None);
    // The same config again changes nothing; one without [cluster] is refused.
    assert_eq!(
        j.apply(&c, &text, Instant::now()).expect("answered"),
        Applied::Unchanged
    );
    let (standby, text) = config(false);
    assert!(matches!(
        j.apply(&standby, &text, Instant::now()),
        Err(ApplyError::AgentSupervised { .. })
    ));
    assert_eq!(host.calls().started, 1);
    assert_eq!(host.calls().persisted.len(), 1);
}

#[test]
fn the_agent_is_prepared_while_the_check_runs_and_only_committed_once_it_passed() {
    for (actual, joins) in [(HASH, true), (OTHER, false)] {
        let server = Arc::new(FakeServer::new(actual, 0));
        let host = Arc::new(FakeHost::default());
        let checker = AnswersOnceStaged {
            server: Arc::clone(&server),
            host: Arc::clone(&host),
        };
        let j = Joiner::new(Box::new(checker), Box::new(host.clone()), Retry::default());
        let (c, text) = config(true);
        let got = j.apply(&c, &text, Instant::now()).expect("answered");
        let calls = host.calls();
        assert_eq!(calls.staged, 1);
        assert_eq!(calls.metadata_closed, 1, "closed before any start");
        if joins {
            assert!(matches!(got, Applied::Joined { .. }), "{got:?}");
            assert_eq!(calls.persisted, std::slice::from_ref(&text));
            assert_eq!(calls.k3s_config.len(), 1);
            assert_eq!(calls.started, 1);
        } else {
            assert!(matches!(got, Applied::Refused { .. }), "{got:?}");
            assert!(calls.persisted.is_empty() && calls.k3s_config.is_empty());
            assert_eq!(calls.started, 0);
        }
    }
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
fn a_supervised_agent_that_does_not_run_is_reported_but_not_started_again() {
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
    // Supervised: it may yet run and register.
    assert_eq!(st.state, JoinState::AgentStarted);
    assert!(st.last_error.is_some_and(|e| e.contains("exit 1")));
    // The supervisor owns it now: a config without [cluster] is refused, the same one
    // is not started twice.
    let (standby, text) = config(false);
    assert!(matches!(
        j.apply(&standby, &text, Instant::now()),
        Err(ApplyError::AgentSupervised { .. })
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
    assert_eq!(j.status().state, JoinState::AgentStarted);
    host.set_run(Some(registered_run()));
    assert_eq!(j.status().state, JoinState::Registered);
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
    assert_eq!(j.status().state, JoinState::AgentStarted);
    host.set_run(Some(registered_run()));
    assert_eq!(j.status().state, JoinState::Registered);
    // The rotated config is now the running one.
    assert_eq!(
        j.apply(&rotated, &rotated_text, Instant::now())
            .expect("answered"),
        Applied::Unchanged
    );
    // Another [cluster] is a conflict for a registered agent, and nothing is saved.
    let other_text = rotated_text.replace("server:pw", "server:other");
    let other = MachineConfig::parse(&other_text).expect("valid");
    assert!(matches!(
        j.apply(&other, &other_text, Instant::now()),
        Err(ApplyError::AlreadyJoined { .. })
    ));
    assert_eq!(host.calls().persisted.len(), 2);
}

#[test]
fn registered_means_credentials_written_by_the_running_agent() {
    let long_ago = secs(3600);
    // Running, no certificate yet: started only.
    let mut run = AgentRun {
        running_for: Some(secs(5)),
        ..AgentRun::default()
    };
    assert_eq!(agent_state(&run, long_ago), (JoinState::AgentStarted, None));
    // A certificate from an earlier run (older than this process): not registered.
    run.credentials_age = Some(secs(6));
    assert_eq!(agent_state(&run, long_ago).0, JoinState::AgentStarted);
    // Written after this run started: registered.
    run.credentials_age = Some(secs(4));
    assert_eq!(agent_state(&run, long_ago), (JoinState::Registered, None));
    // A certificate, but no process: not registered.
    run.running_for = None;
    run.last_exit = Some("signal 9".into());
    let (state, error) = agent_state(&run, long_ago);
    assert_eq!(state, JoinState::AgentStarted);
    let error = error.expect("a reason");
    assert!(error.contains("exited (signal 9)"), "{error}");
}

#[test]
fn restarts_within_the_window_make_an_unregistered_agent_crash_looping() {
    let long_ago = secs(3600);
    let run = crash_looping_run();
    let (state, error) = agent_state(&run, long_ago);
    assert_eq!(state, JoinState::CrashLooping);
    let error = error.expect("a reason");
    assert!(
        error.contains("restarted 3 times in the last 600 s"),
        "{error}"
    );
    assert!(error.contains("(last exit: exit 1)"), "{error}");
    assert!(error.contains("401 Unauthorized"), "{error}");
    // Two restarts are not a loop yet.
    let mut two = run.clone();
    two.restart_ages.remove(0);
    assert_eq!(agent_state(&two, long_ago).0, JoinState::AgentStarted);
    // Restarts older than the window, or than the last start with a new config, do not
    // count.
    let mut old = run.clone();
    old.restart_ages = vec![secs(900), secs(800), secs(700)];
    assert_eq!(agent_state(&old, long_ago).0, JoinState::AgentStarted);
    assert_eq!(agent_state(&run, secs(2)).0, JoinState::AgentStarted);
    assert_eq!(agent_state(&run, secs(8)).0, JoinState::CrashLooping);
    // Registered wins: it restarted, but this run got its credentials.
    let mut fine = run.clone();
    fine.running_for = Some(secs(1));
    fine.credentials_age = Some(Duration::from_millis(500));
    assert_eq!(agent_state(&fine, long_ago), (JoinState::Registered, None));
    // A long last line is cut, on a character boundary.
    let mut long = run;
    long.last_line = Some("é".repeat(400));
    let error = agent_state(&long, long_ago).1.expect("a reason");
    assert!(error.ends_with('…'), "{error}");
    assert_eq!(error.matches('é').count(), LAST_LINE_MAX / 2, "{error}");
}

#[test]
fn another_cluster_replaces_the_config_of_an_agent_that_did_not_register() {
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost::default());
    let j = joiner(&server, &host);
    let (c, text) = config(true);
    assert!(matches!(
        j.apply(&c, &text, Instant::now()).expect("answered"),
        Applied::Joined { .. }
    ));
    // The server refuses the password: the agent exits and is restarted, again and again.
    host.set_run(Some(crash_looping_run()));
    // Restarts from before the agent was started with this config would not count.
    std::thread::sleep(Duration::from_millis(20));
    let st = j.status();
    assert_eq!(st.state, JoinState::AgentStarted, "{st:?}");
    // Now as the supervisor would report it 8 s after the start.
    host.set_run(Some(AgentRun {
        restart_ages: vec![
            Duration::from_millis(15),
            Duration::from_millis(10),
            Duration::from_millis(5),
        ],
        ..crash_looping_run()
    }));
    let st = j.status();
    assert_eq!(st.state, JoinState::CrashLooping, "{st:?}");
    assert!(
        st.last_error.as_deref().is_some_and(|e| e.contains("401")),
        "{st:?}"
    );
    // A corrected [cluster] (the right password) is taken: checked, saved, restarted.
    let fixed_text = text.replace("server:pw", "server:right");
    let fixed = MachineConfig::parse(&fixed_text).expect("valid");
    assert_eq!(
        j.apply(&fixed, &fixed_text, Instant::now())
            .expect("answered"),
        Applied::Replaced
    );
    {
        let calls = host.calls();
        assert_eq!(calls.persisted.last(), Some(&fixed_text));
        assert_eq!((calls.started, calls.restarted), (1, 1));
        let k3s: serde_json::Value =
            serde_json::from_str(calls.k3s_config.last().expect("written")).expect("json");
        assert_eq!(k3s["token"], format!("K10{HASH}::server:right"));
    }
    assert_eq!(
        server.checks.load(Ordering::SeqCst),
        2,
        "the new [cluster] is checked"
    );
    // The old config's restarts are history: started, then registered.
    host.set_run(Some(crash_looping_run()));
    let st = j.status();
    assert_eq!(st.state, JoinState::AgentStarted, "{st:?}");
    host.set_run(Some(AgentRun {
        running_for: Some(secs(2)),
        credentials_age: Some(secs(1)),
        ..crash_looping_run()
    }));
    assert_eq!(
        j.status(),
        JoinStatus {
            state: JoinState::Registered,
            server: Some("https://10.0.2.2:6443".into()),
            last_error: None,
        }
    );
    // Registered now: another [cluster] is a conflict.
    let again = MachineConfig::parse(&text).expect("valid");
    assert!(matches!(
        j.apply(&again, &text, Instant::now()),
        Err(ApplyError::AlreadyJoined { .. })
    ));
    assert_eq!(host.calls().restarted, 1);
}

#[test]
fn an_agent_that_runs_but_is_not_registered_may_be_given_another_cluster() {
    // Real K3s keeps running and retrying when the server refuses its password.
    let server = Arc::new(FakeServer::new(HASH, 0));
    let host = Arc::new(FakeHost::default());
    let j = joiner(&server, &host);
    let (c, text) = config(true);
    j.apply(&c, &text, Instant::now()).expect("answered");
    host.set_run(Some(AgentRun {
        running_for: Some(secs(300)),
        ..AgentRun::default()
    }));
    assert_eq!(j.status().state, JoinState::AgentStarted);
    let other_text = text.replace("server:pw", "server:other");
    let other = MachineConfig::parse(&other_text).expect("valid");
    assert_eq!(
        j.apply(&other, &other_text, Instant::now())
            .expect("answered"),
        Applied::Replaced
    );
    assert_eq!(host.calls().restarted, 1);
    // A replacement whose CA check fails changes nothing: not saved, not restarted.
    let mismatch_text = other_text.replace(HASH, OTHER);
    let mismatch = MachineConfig::parse(&mismatch_text).expect("valid");
    assert!(matches!(
        j.apply(&mismatch, &mismatch_text, Instant::now())
            .expect("answered"),
        Applied::Refused { .. }
    ));
    assert_eq!(host.calls().restarted, 1);
    assert_eq!(host.calls().persisted.last(), Some(&other_text));
    assert_eq!(j.status().state, JoinState::Failed);
}

#[test]
fn the_supervisors_view_becomes_ages() {
    use crate::pid1::mailbox::ServiceRun;
    use crate::pid1::supervise::Exit;
    let now = std::time::SystemTime::UNIX_EPOCH + secs(1_000_000);
    let run = ServiceRun {
        running_for: Some(secs(10)),
        restart_ages: vec![secs(30)],
        last_exit: Some(Exit::Code(1)),
        last_line: Some("x".into()),
    };
    let got = agent_run_of(run.clone(), Some(now - secs(4)), now);
    assert_eq!(
        got,
        AgentRun {
            running_for: Some(secs(10)),
            restart_ages: vec![secs(30)],
            last_exit: Some("exit 1".into()),
            last_line: Some("x".into()),
            credentials_age: Some(secs(4)),
        }
    );
    assert_eq!(agent_run_of(run.clone(), None, now).credentials_age, None);
    // Dated after now (the clock was stepped back): new.
    assert_eq!(
        agent_run_of(run, Some(now + secs(4)), now).credentials_age,
        Some(Duration::ZERO)
    );
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
