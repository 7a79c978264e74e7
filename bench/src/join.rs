//! `basalt bench join`: promotes a standby node into a cluster N times and times it, and
//! reads PID1's memory before and after.
//!
//! Each run boots the image fresh with a standby machine config (no `[cluster]`) over
//! fw_cfg, waits for `standby` and the node API, then applies a join config and watches
//! the serial console. The cluster is the **K3s server double** on the host's loopback
//! (the guest reaches it as 10.0.2.2), and what the node starts as `k3s agent` is whatever
//! the image carries as its `k3s` input: for this benchmark the **K3s agent double**
//! (`k3s_doubles::build_agent_double`), which performs K3s's CA-hash check and then
//! idles. Neither is K3s, so the figures are basalt's share of a promotion: the API
//! round trip, PID1's own CA check against the server, writing K3s's config, the exec.
//!
//! A promotion is measured at two moments ([`When`]): right after `standby` (the node API
//! answers; K3s's background preparation is still running and the promotion waits for
//! it), and on a prepared standby, [`SETTLE`] after stage 2's last background step
//! (`k3s-warm`), the same delay for every image whatever warm-ups it runs after that
//! step: what a warm pool's node, promoted minutes after its boot, looks like.
//!
//! Besides the totals, each run reads PID1's own timeline of the apply (`join: timeline
//! ms after the request: …`, `init/src/join/timeline.rs`) and the agent double's times
//! for its own first, cold CA check (`ca-check times ms: …`): the same check PID1 runs,
//! so the two compare cold to cold, and its `response` is a cold TLS round trip.

use super::boot::{parse_footprint, Footprint, CPUS, MEMORY_MIB};
use super::stats::Spread;
use basalt_api::layout::fw_cfg;
use basalt_api::milestone::{self, Milestone};
use basalt_api::node::JoinState;
use basalt_api::node::DEFAULT_PORT;
use basalt_client::node::{ClientOptions, Endpoint, NodeClient, NodeError};
use basalt_client::pki::{Ca, CertRequest, Issued, PkiError, Role, Validity};
use basalt_qemu::{Accel, HarnessError, Vm, VmBuilder};
use k3s_doubles::{K3sServerDouble, ServerDoubleError, CHECK_TIMES, LINE_PREFIX};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The node's name: its hostname and the name its API certificate carries.
const NODE: &str = "bench-node";
/// Boot budget on KVM, as the end-to-end tests give it; scaled for TCG.
const BOOT: Duration = Duration::from_secs(60);
/// How long the join may take from the apply until the agent's CA check; scaled for TCG.
const JOIN: Duration = Duration::from_secs(30);
/// How often the serial log is read while a join runs: the resolution of the wall times.
const POLL: Duration = Duration::from_millis(10);
/// What PID1 prints when it has spawned the agent (`init/src/join.rs`).
const AGENT_EXEC: &str = "[basalt] join: agent exec ";
/// What PID1 prints once its CA check has ended (`init/src/join.rs`).
const CA_CHECK: &str = "[basalt] join: CA check ";
/// The agent double's own timing of one `/cacerts` fetch (`k3s-agent-double`).
const ROUND_TRIP: &str = "cacerts round trip ";
/// PID1's timeline of the apply (`init/src/join/timeline.rs`).
const TIMELINE: &str = "[basalt] join: timeline ms after the request: ";
/// The last step of K3s's background preparation, K3s's extraction
/// (`init/src/boot/stage2/node.rs`), which every image prints.
const K3S_WARM: &str = "k3s-warm";
/// How long a prepared run waits after [`K3S_WARM`] before it promotes: the same for
/// every image, and long enough for the warm-ups PID1 starts after it.
pub const SETTLE: Duration = Duration::from_secs(10);
/// Warm-ups that PID1 may run after [`K3S_WARM`]: the CA check's dry run and the
/// rehearsal of the preparation beside it (`init/src/join/warm.rs`; an image before
/// them has neither). A prepared run records which of them had ended when it promoted.
const WARM_UPS: [&str; 2] = ["check-warm", "prepare-warm"];
/// PID1's line when its standby prefetch checked a server's CA (`init/src/join/warm.rs`).
const PREFETCHED: &str = "[basalt] prefetch: ";
/// PID1's note on how its promotion's check went (`resumed`, `prefetched`).
const CHECK_HOW: &str = "[basalt] join: CA check ";

/// When a run promotes its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum When {
    /// As soon as the node API answers after `standby`.
    #[default]
    Standby,
    /// Once K3s's background preparation (and the warm-up) has printed its step.
    Prepared,
    /// As [`When::Prepared`], with the server named in the standby config's
    /// `standby.servers`, as the warm pool names its clusters' servers: PID1 checks its
    /// CA ahead, and the promotion's check resumes that TLS session.
    Prefetched,
}

impl When {
    pub fn name(self) -> &'static str {
        match self {
            When::Standby => "right after standby",
            When::Prepared => "prepared standby",
            When::Prefetched => "prepared standby, the server's CA prefetched",
        }
    }

    /// `standby`, `prepared`, `prefetched`, `both` (standby and prepared: each run boots
    /// twice) or `all` (the three).
    pub fn parse_list(s: &str) -> Result<Vec<When>, String> {
        match s {
            "standby" => Ok(vec![When::Standby]),
            "prepared" => Ok(vec![When::Prepared]),
            "prefetched" => Ok(vec![When::Prefetched]),
            "both" => Ok(vec![When::Standby, When::Prepared]),
            "all" => Ok(vec![When::Standby, When::Prepared, When::Prefetched]),
            other => Err(format!(
                "--when {other:?}: expected standby, prepared, prefetched, both or all"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinBenchError {
    #[error("start the K3s server double")]
    ServerDouble(#[source] ServerDoubleError),
    #[error("make the run's pool CA and certificates")]
    Pki(#[source] PkiError),
    #[error("create a scratch folder")]
    TempDir(#[source] std::io::Error),
    #[error("write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("pick a free port on the loopback for the node API's forward")]
    Port(#[source] std::io::Error),
    #[error("{what}, run {run}; the serial log ends:\n{tail}")]
    Vm {
        what: &'static str,
        run: usize,
        tail: String,
        #[source]
        source: HarnessError,
    },
    #[error("{what}, run {run}; the serial log ends:\n{tail}")]
    Api {
        what: &'static str,
        run: usize,
        tail: String,
        #[source]
        source: Box<NodeError>,
    },
    #[error("run {run}: the node did not join: {reason}; the serial log ends:\n{tail}")]
    NotJoined {
        run: usize,
        reason: String,
        tail: String,
    },
}

pub struct JoinBenchOptions {
    /// A .raw or .qcow2 image whose `k3s` is the K3s agent double.
    pub image: PathBuf,
    pub runs: usize,
    /// Each run boots once per entry, in this order.
    pub when: Vec<When>,
}

/// One promotion. Wall times are seconds from sending the apply, as seen on the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinRun {
    /// When the node was promoted.
    pub when: When,
    /// For a prepared run: seconds on the guest's clock from `standby` until the
    /// preparation's last step (`k3s-warm`) ended.
    pub prepared_after_standby: Option<f64>,
    /// For a prepared run: the warm-ups of [`WARM_UPS`] that had ended when it promoted
    /// (and `prefetch`, when PID1 had checked the server's CA ahead).
    pub warmed: Option<Vec<String>>,
    /// PID1 said its promotion's check found the prefetch's work done.
    pub check_prefetched: bool,
    /// PID1 said its promotion's check went over the connection the prefetch left open.
    pub check_kept: bool,
    /// PID1's VmRSS (status) at standby, just before the apply.
    pub standby_rss_kib: Option<u64>,
    /// PID1's footprint line printed on the way to standby.
    pub footprint: Option<Footprint>,
    /// A status request right before the apply: an API round trip without a join.
    pub status_round_trip: f64,
    /// Until the apply's HTTP response.
    pub response: f64,
    /// What the console showed after the apply was sent.
    pub console: AfterApply,
    /// PID1's VmRSS (status) after the agent's CA check passed.
    pub joined_rss_kib: Option<u64>,
    /// PID1's resident anonymous and file memory (metrics), KiB, at standby.
    pub standby_split: Option<RssSplit>,
    /// The same after the join, read right after `joined_rss_kib`.
    pub joined_split: Option<RssSplit>,
    /// The join state status reported then.
    pub joined_state: Option<JoinState>,
}

/// PID1's resident memory by kind, in KiB (`RssAnon`, `RssFile` of its status).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RssSplit {
    pub anon_kib: u64,
    pub file_kib: u64,
}

/// The split from the node API's metrics; `None` from a PID1 that does not export it.
pub fn parse_rss_split(metrics: &str) -> Option<RssSplit> {
    let gauge = |name: &str| -> Option<u64> {
        metrics.lines().find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse::<u64>().ok())?
        })
    };
    Some(RssSplit {
        anon_kib: gauge("basalt_pid1_rss_anon_bytes")? / 1024,
        file_kib: gauge("basalt_pid1_rss_file_bytes")? / 1024,
    })
}

/// Everything one `bench join` measured, and what it ran on.
pub struct JoinBench {
    pub image: PathBuf,
    pub accel: Accel,
    pub runs: Vec<JoinRun>,
}

/// Boots and promotes the image `runs` times.
pub fn run(opts: &JoinBenchOptions) -> Result<JoinBench, JoinBenchError> {
    let accel = basalt_qemu::detect_accel();
    let mut runs = vec![];
    let when = if opts.when.is_empty() {
        vec![When::Standby]
    } else {
        opts.when.clone()
    };
    for n in 1..=opts.runs.max(1) {
        for &w in &when {
            eprintln!("basalt: bench join run {n}, promoted {}", w.name());
            runs.push(join_once(&opts.image, accel, n, w)?);
        }
    }
    Ok(JoinBench {
        image: opts.image.clone(),
        accel,
        runs,
    })
}

/// A pool CA with the node's certificate and one client's, in a scratch folder.
pub(crate) struct RunPki {
    pub(crate) dir: tempfile::TempDir,
    ca_pem: String,
    node: Issued,
}

impl RunPki {
    pub(crate) fn new() -> Result<RunPki, JoinBenchError> {
        let dir = tempfile::tempdir().map_err(JoinBenchError::TempDir)?;
        let ca = Ca::generate().map_err(JoinBenchError::Pki)?;
        let issue = |name: &str, role| {
            ca.issue(&CertRequest {
                name: name.into(),
                role,
                validity: Validity::days_from_now(1)?,
            })
        };
        let node = issue(
            NODE,
            Role::Node {
                ips: vec![],
                dns: vec![],
            },
        )
        .map_err(JoinBenchError::Pki)?;
        issue("bench", Role::Client)
            .and_then(|c| c.write(dir.path(), "bench", false))
            .map_err(JoinBenchError::Pki)?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).map_err(|e| JoinBenchError::Write(ca_file, e))?;
        Ok(RunPki {
            ca_pem: ca.cert_pem().to_string(),
            dir,
            node,
        })
    }

    pub(crate) fn client(&self, port: u16) -> Result<NodeClient, NodeError> {
        let path = |f: &str| self.dir.path().join(f);
        NodeClient::new(&ClientOptions {
            endpoint: Endpoint {
                host: "127.0.0.1".into(),
                port,
            },
            ca: path("ca.pem"),
            cert: path("bench.pem"),
            key: path("bench.key"),
            name: Some(NODE.into()),
        })
    }
}

/// The machine config: the node's name and API material, and `[cluster]` when given
/// (server URL, token), which is what turns a standby node into a joining one.
/// `prefetch` names a server in `standby.servers`.
pub(crate) fn machine_config(
    pki: &RunPki,
    cluster: Option<(&str, &str)>,
    prefetch: Option<&str>,
) -> String {
    let mut cluster = cluster.map_or_else(String::new, |(server, token)| {
        format!("[cluster]\nserver = \"{server}\"\ntoken = \"{token}\"\n")
    });
    if let Some(server) = prefetch {
        cluster.push_str(&format!("[standby]\nservers = [\"{server}\"]\n"));
    }
    format!(
        "version = 1\n[node]\nhostname = \"{NODE}\"\n{cluster}[api]\nca = '''\n{}'''\ncert = '''\n{}'''\nkey = '''\n{}'''\n",
        pki.ca_pem, pki.node.cert_pem, pki.node.key_pem
    )
}

/// QEMU's user network, not restricted so that the guest reaches the server double on
/// the host's loopback as 10.0.2.2; the node API forwarded to `port` on the host's
/// loopback; virtio-rng for TLS; the config over fw_cfg.
pub(crate) fn qemu_args(port: u16, config: &Path) -> Vec<String> {
    let mut args = basalt_qemu::node_devices(false, &[(port, DEFAULT_PORT)]);
    args.push("-fw_cfg".into());
    args.push(fw_cfg::qemu_arg(fw_cfg::CONFIG, config));
    args
}

pub(crate) fn free_port() -> Result<u16, JoinBenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(JoinBenchError::Port)?;
    Ok(listener.local_addr().map_err(JoinBenchError::Port)?.port())
}

/// `error: cause: cause` in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The last lines of the serial log, for an error.
pub(crate) fn tail(vm: &Vm) -> String {
    let serial = vm.serial();
    let lines: Vec<&str> = serial.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

// One run is one story (boot, wait for standby, promote, wait for the agent, measure);
// split up, its clocks and the VM would have to be threaded through every piece.
fn join_once(
    image: &Path,
    accel: Accel,
    run: usize,
    when: When,
) -> Result<JoinRun, JoinBenchError> {
    let server = K3sServerDouble::start("127.0.0.1:0").map_err(JoinBenchError::ServerDouble)?;
    let pki = RunPki::new()?;
    let port = free_port()?;
    let config = pki.dir.path().join("standby.toml");
    let server_url = server.url_for("10.0.2.2");
    let prefetch = (when == When::Prefetched).then_some(server_url.as_str());
    std::fs::write(&config, machine_config(&pki, None, prefetch))
        .map_err(|e| JoinBenchError::Write(config.clone(), e))?;
    let mut vm = VmBuilder::new(image)
        .memory_mib(MEMORY_MIB)
        .cpus(CPUS)
        .accel(accel)
        .extra_args(qemu_args(port, &config))
        .spawn()
        .map_err(|source| JoinBenchError::Vm {
            what: "starting QEMU",
            run,
            tail: String::new(),
            source,
        })?;
    let vm_err = |vm: &Vm, what, source| JoinBenchError::Vm {
        what,
        run,
        tail: tail(vm),
        source,
    };
    let api_err = |vm: &Vm, what, source| JoinBenchError::Api {
        what,
        run,
        tail: tail(vm),
        source: Box::new(source),
    };
    let standby = format!("{} {} t=", milestone::PREFIX, Milestone::Standby.name());
    vm.wait_for(&standby, accel.scale(BOOT))
        .map_err(|e| vm_err(&vm, "booting to standby", e))?;
    let (mut prepared_after_standby, mut warmed) = (None, None);
    if when != When::Standby {
        let step = |name| format!("{} {} {name} at=", milestone::PREFIX, milestone::STEP);
        vm.wait_for(&step(K3S_WARM), accel.scale(BOOT))
            .map_err(|e| vm_err(&vm, "waiting for K3s's preparation (k3s-warm)", e))?;
        std::thread::sleep(SETTLE);
        let serial = vm.serial();
        let standby_at = serial
            .lines()
            .filter_map(milestone::parse)
            .find(|(name, _)| *name == Milestone::Standby.name())
            .map(|(_, t)| t);
        let steps: Vec<_> = serial.lines().filter_map(milestone::parse_step).collect();
        let done = steps
            .iter()
            .find(|s| s.name == K3S_WARM)
            .map(|s| s.at + s.took);
        prepared_after_standby = standby_at.zip(done).map(|(s, d)| d - s);
        let prefetched = serial
            .lines()
            .any(|l| l.starts_with(PREFETCHED) && l.contains("checked ahead"));
        warmed = Some(
            WARM_UPS
                .iter()
                // Ended, and without a warning (a warm-up that failed warmed nothing).
                .filter(|w| steps.iter().any(|s| s.name == **w))
                .filter(|w| !serial.contains(&format!("[basalt] warning: {w}: ")))
                .map(|w| w.to_string())
                .chain(prefetched.then(|| "prefetch".to_owned()))
                .collect(),
        );
    }
    let client = pki
        .client(port)
        .map_err(|e| api_err(&vm, "setting up the node API client", e))?;
    wait_for_api(&vm, &client).map_err(|e| vm_err(&vm, "waiting for the node API", e))?;
    let footprint = vm.serial().lines().find_map(parse_footprint);

    let standby_split = client.metrics().ok().as_deref().and_then(parse_rss_split);
    let asked = Instant::now();
    let before = client
        .status()
        .map_err(|e| api_err(&vm, "reading status at standby", e))?;
    let status_round_trip = asked.elapsed().as_secs_f64();

    let join = machine_config(&pki, Some((&server_url, &server.token("bench"))), None);
    let (applied, response, console) = promote(&vm, &client, join, accel.scale(JOIN));
    let applied = applied.map_err(|e| api_err(&vm, "applying the join config", e))?;
    if !applied.body.applied {
        return Err(JoinBenchError::NotJoined {
            run,
            reason: format!("the apply answered {}", applied.raw.trim()),
            tail: tail(&vm),
        });
    }
    match &console.agent {
        Some((_, AgentLine::CaCheckPassed)) => {}
        Some((_, other)) => {
            return Err(JoinBenchError::NotJoined {
                run,
                reason: format!("the agent double said {other:?}"),
                tail: tail(&vm),
            })
        }
        None => {
            return Err(JoinBenchError::NotJoined {
                run,
                reason: format!(
                    "no \"{LINE_PREFIX} ca-check\" line within {:?}",
                    accel.scale(JOIN)
                ),
                tail: tail(&vm),
            })
        }
    }
    let after = client
        .status()
        .map_err(|e| api_err(&vm, "reading status after the join", e))?;
    let joined_split = client.metrics().ok().as_deref().and_then(parse_rss_split);
    let serial_after = vm.serial();
    Ok(JoinRun {
        when,
        prepared_after_standby,
        warmed,
        check_prefetched: check_said(&serial_after, "prefetched"),
        check_kept: check_said(&serial_after, "kept"),
        standby_split,
        joined_split,
        standby_rss_kib: before.body.rss_kib,
        footprint,
        status_round_trip,
        response,
        console,
        joined_rss_kib: after.body.rss_kib,
        joined_state: Some(after.body.join.state),
    })
}

/// Polls `health` until the node API answers (it starts at standby).
pub(crate) fn wait_for_api(vm: &Vm, client: &NodeClient) -> Result<(), HarnessError> {
    let budget = vm.accel().scale(BOOT);
    let deadline = Instant::now() + budget;
    loop {
        match client.health() {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(HarnessError::Timeout {
                    what: format!("node API health ({})", chain(&e)),
                    timeout: budget,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// PID1's note on its promotion's check (`[basalt] join: CA check …`) names `what` it
/// reused (`kept`, `resumed`, `prefetched`).
fn check_said(serial: &str, what: &str) -> bool {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix(CHECK_HOW))
        .any(|rest| rest.trim_end().split([',', ' ']).any(|w| w == what))
}

/// Sends the join config and, while the request is in flight, watches the console from
/// where it stood: until the apply has answered and the agent double has reported its
/// CA check, or `budget` has passed. Returns the apply's outcome, the seconds until its
/// response, and what the console showed.
fn promote(
    vm: &Vm,
    client: &NodeClient,
    config: String,
    budget: Duration,
) -> (
    Result<basalt_client::node::Reply<basalt_api::node::ApplyResponse>, NodeError>,
    f64,
    AfterApply,
) {
    let serial = vm.serial();
    let from = serial.rfind('\n').map_or(0, |i| i + 1);
    let mut console = AfterApply::default();
    let sent = Instant::now();
    std::thread::scope(|s| {
        let apply = s.spawn(move || {
            let reply = client.apply(config);
            (reply, sent.elapsed().as_secs_f64())
        });
        loop {
            let serial = vm.serial();
            console.update(serial.get(from..).unwrap_or(&serial), sent.elapsed());
            let answered = apply.is_finished();
            // The double times its fetch after a passed check; other verdicts end here.
            let agent_done = match &console.agent {
                Some((_, AgentLine::CaCheckPassed)) => console.floor_ms.is_some(),
                Some(_) => true,
                None => false,
            };
            if (answered && agent_done) || sent.elapsed() > budget {
                break;
            }
            std::thread::sleep(POLL);
        }
        match apply.join() {
            Ok((reply, response)) => (reply, response, console),
            // NodeClient::apply does not panic; if it did, the run is not measurable.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// What the agent double reported about its join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentLine {
    /// `ca-check passed`: the server's CA matched the token's hash.
    CaCheckPassed,
    /// `ca-check <anything else>` (failed, skipped): the rest of the line.
    CaCheckNotPassed(String),
    /// `failed: <why>`: the double could not run at all.
    Failed(String),
}

/// Console sightings after the apply, each the first, with its wall time in seconds
/// from sending the apply (as of the poll that saw it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AfterApply {
    /// `[basalt] joined t=…`: wall time, and the guest's time since kernel start.
    pub joined: Option<(f64, f64)>,
    /// `[basalt] join: agent exec N ms after apply`: PID1's own measure, from the
    /// request's arrival to the agent's spawn.
    pub agent_exec_ms: Option<u64>,
    /// The agent double's verdict on the join.
    pub agent: Option<(f64, AgentLine)>,
    /// `k3s-agent-double: cacerts round trip N ms`: one TLS round trip from the guest
    /// to the server, timed by the double in the guest: the floor.
    pub floor_ms: Option<u64>,
    /// `[basalt] join: CA check N ms; prepared alongside in M ms`: PID1's check, and
    /// the work it did beside it, both from the check's start.
    pub check_ms: Option<(u64, u64)>,
    /// PID1's timeline of the apply: `(step, ms after the request)`, in its order.
    pub timeline: Option<Vec<(String, u64)>>,
    /// The agent double's first (cold) CA check: `(step, ms from its start)`.
    pub double_check: Option<Vec<(String, u64)>>,
}

impl AfterApply {
    /// Records what `text` (the console since the apply) shows that was not seen yet.
    /// Only whole lines count: the guest may still be writing the last one.
    pub fn update(&mut self, text: &str, now: Duration) {
        let now = now.as_secs_f64();
        let whole = text.rfind('\n').map_or("", |i| &text[..i]);
        for line in whole.lines() {
            if self.joined.is_none() {
                if let Some(("joined", guest)) = milestone::parse(line) {
                    self.joined = Some((now, guest));
                }
            }
            if self.agent_exec_ms.is_none() {
                self.agent_exec_ms = parse_agent_exec(line);
            }
            if self.agent.is_none() {
                self.agent = parse_agent_line(line).map(|a| (now, a));
            }
            if self.floor_ms.is_none() {
                self.floor_ms = parse_round_trip(line);
            }
            if self.check_ms.is_none() {
                self.check_ms = parse_ca_check(line);
            }
            if self.timeline.is_none() {
                self.timeline = parse_timeline(line);
            }
            if self.double_check.is_none() {
                self.double_check = parse_double_check(line);
            }
        }
    }
}

/// `step 12, other 30` → `[("step", 12), ("other", 30)]`; `None` if any pair is not a
/// name and a number.
fn parse_steps(list: &str) -> Option<Vec<(String, u64)>> {
    list.trim_end()
        .split(", ")
        .map(|pair| {
            let (name, ms) = pair.rsplit_once(' ')?;
            Some((name.to_owned(), ms.parse().ok()?))
        })
        .collect()
}

/// `[basalt] join: timeline ms after the request: parsed 1, exec 30` → its steps.
pub fn parse_timeline(line: &str) -> Option<Vec<(String, u64)>> {
    parse_steps(&line[line.find(TIMELINE)? + TIMELINE.len()..])
}

/// `k3s-agent-double: ca-check times ms: connected 2, …, hashed 71` → its steps.
pub fn parse_double_check(line: &str) -> Option<Vec<(String, u64)>> {
    let rest = line[line.find(LINE_PREFIX)? + LINE_PREFIX.len()..].trim_start();
    parse_steps(rest.strip_prefix(CHECK_TIMES)?)
}

/// The ms of `step` in a parsed list.
fn step_ms(steps: &Option<Vec<(String, u64)>>, step: &str) -> Option<f64> {
    steps
        .as_ref()?
        .iter()
        .find(|(name, _)| name == step)
        .map(|(_, ms)| *ms as f64)
}

/// `[basalt] join: agent exec 12 ms after apply` → 12.
pub fn parse_agent_exec(line: &str) -> Option<u64> {
    let rest = &line[line.find(AGENT_EXEC)? + AGENT_EXEC.len()..];
    rest.trim_end()
        .strip_suffix(" ms after apply")?
        .parse()
        .ok()
}

/// `k3s-agent-double: cacerts round trip 41 ms` → 41.
pub fn parse_round_trip(line: &str) -> Option<u64> {
    let rest = line[line.find(LINE_PREFIX)? + LINE_PREFIX.len()..].trim();
    rest.strip_prefix(ROUND_TRIP)?
        .strip_suffix(" ms")?
        .parse()
        .ok()
}

/// `[basalt] join: CA check 40 ms; prepared alongside in 12 ms` → (40, 12).
pub fn parse_ca_check(line: &str) -> Option<(u64, u64)> {
    let rest = line[line.find(CA_CHECK)? + CA_CHECK.len()..].trim_end();
    let (check, prep) = rest.split_once(" ms; prepared alongside in ")?;
    Some((check.parse().ok()?, prep.strip_suffix(" ms")?.parse().ok()?))
}

/// The agent double's lines that end a join: its CA check's verdict, or its failure.
pub fn parse_agent_line(line: &str) -> Option<AgentLine> {
    let rest = line[line.find(LINE_PREFIX)? + LINE_PREFIX.len()..].trim();
    if let Some(verdict) = rest.strip_prefix("ca-check ") {
        return Some(match verdict {
            "passed" => AgentLine::CaCheckPassed,
            other => AgentLine::CaCheckNotPassed(other.into()),
        });
    }
    rest.strip_prefix("failed: ")
        .map(|why| AgentLine::Failed(why.into()))
}

/// A figure of the report: its label and how to read it off a run.
type Figure = (&'static str, fn(&JoinRun) -> Option<f64>);

/// Milliseconds: the floor and the guest's own measures, then the host's wall clock
/// from the apply.
const LATENCIES: [Figure; 10] = [
    ("floor: one TLS round trip (guest, double)", |r| {
        r.console.floor_ms.map(|m| m as f64)
    }),
    ("cold round trip: the double's first (guest)", |r| {
        step_ms(&r.console.double_check, "response")
    }),
    ("the double's first CA check, cold (guest)", |r| {
        step_ms(&r.console.double_check, "hashed")
    }),
    ("agent exec (guest clock, PID1's)", |r| {
        r.console.agent_exec_ms.map(|m| m as f64)
    }),
    ("PID1's CA check (guest)", |r| {
        r.console.check_ms.map(|c| c.0 as f64)
    }),
    ("prepared beside it (guest)", |r| {
        r.console.check_ms.map(|c| c.1 as f64)
    }),
    ("HTTP response to the apply (host)", |r| {
        Some(r.response * 1e3)
    }),
    ("`joined` seen on the console (host)", |r| {
        r.console.joined.map(|j| j.0 * 1e3)
    }),
    ("agent double's CA check passed (host)", |r| {
        r.console.agent.as_ref().map(|a| a.0 * 1e3)
    }),
    ("reference: a status round trip (host)", |r| {
        Some(r.status_round_trip * 1e3)
    }),
];

/// Agent exec over the floor, per run.
fn exec_over_floor(r: &JoinRun) -> Option<f64> {
    let floor = r.console.floor_ms?;
    Some(r.console.agent_exec_ms? as f64 / floor.max(1) as f64)
}

/// Agent exec over the cold round trip (the double's first), per run.
fn exec_over_cold(r: &JoinRun) -> Option<f64> {
    let cold = step_ms(&r.console.double_check, "response")?;
    Some(r.console.agent_exec_ms? as f64 / cold.max(1.0))
}

/// PID1's timeline, each step's median over the runs that marked it, in the order of
/// the first run that printed one.
fn timeline_rows(f: &mut std::fmt::Formatter<'_>, runs: &[JoinRun]) -> std::fmt::Result {
    let Some(order) = runs.iter().find_map(|r| r.console.timeline.as_ref()) else {
        return writeln!(
            f,
            "  PID1's timeline of the apply: not printed (an image from before it)"
        );
    };
    writeln!(
        f,
        "  PID1's timeline of the apply, ms after the request (step ended)"
    )?;
    for (step, _) in order {
        let s = Spread::of(
            runs.iter()
                .filter_map(|r| step_ms(&r.console.timeline, step)),
        );
        if let Some(s) = s {
            writeln!(
                f,
                "    {step:<40}{:>7.0} ms  ({:.0}–{:.0})",
                s.median, s.min, s.max
            )?;
        }
    }
    Ok(())
}

/// PID1's VmRSS in KiB, and its split (metrics).
const MEMORY: [Figure; 8] = [
    ("at standby (status)", |r| {
        r.standby_rss_kib.map(|k| k as f64)
    }),
    ("after a join, agent running (status)", |r| {
        r.joined_rss_kib.map(|k| k as f64)
    }),
    ("growth", |r| {
        Some(r.joined_rss_kib? as f64 - r.standby_rss_kib? as f64)
    }),
    ("footprint line before standby (console)", |r| {
        r.footprint.map(|p| p.rss_kb as f64)
    }),
    ("RssAnon at standby (metrics)", |r| {
        r.standby_split.map(|s| s.anon_kib as f64)
    }),
    ("RssAnon growth", |r| {
        Some(r.joined_split?.anon_kib as f64 - r.standby_split?.anon_kib as f64)
    }),
    ("RssFile at standby (metrics)", |r| {
        r.standby_split.map(|s| s.file_kib as f64)
    }),
    ("RssFile growth", |r| {
        Some(r.joined_split?.file_kib as f64 - r.standby_split?.file_kib as f64)
    }),
];

fn rows(
    f: &mut std::fmt::Formatter<'_>,
    runs: &[JoinRun],
    figures: &[Figure],
    unit: &str,
) -> std::fmt::Result {
    for (label, read) in figures {
        match Spread::of(runs.iter().filter_map(read)) {
            Some(s) => {
                write!(
                    f,
                    "  {label:<42}{:>7.0} {unit:<4}({:.0}–{:.0})",
                    s.median, s.min, s.max
                )?;
                if s.n < runs.len() {
                    write!(f, "  seen in {} of {} runs", s.n, runs.len())?;
                }
                writeln!(f)?;
            }
            None => writeln!(f, "  {label:<42}not seen")?,
        }
    }
    Ok(())
}

impl std::fmt::Display for JoinBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "basalt bench join {}", self.image.display())?;
        writeln!(f, "  machine: {}", super::machine())?;
        writeln!(
            f,
            "  QEMU: accelerator {}, firmware SeaBIOS, q35, {MEMORY_MIB} MiB, {CPUS} vCPUs, virtio disk, \
virtio-net (user, the API forwarded from the host's loopback), virtio-rng",
            self.accel.name()
        )?;
        writeln!(
            f,
            "  agent: the K3s agent double (the image's `k3s`; checks the server's CA against the token as `k3s agent` does, \
then idles), joining the K3s server double on the host's loopback (/cacerts, /ping; reached as 10.0.2.2). \
Not K3s: K3s's own start-up is not in these figures."
        )?;
        writeln!(
            f,
            "  runs: {}, each a fresh boot to standby (config over fw_cfg, no [cluster]), then one apply of a config with [cluster]",
            self.runs.len()
        )?;
        for when in [When::Standby, When::Prepared, When::Prefetched] {
            let runs: Vec<JoinRun> = self
                .runs
                .iter()
                .filter(|r| r.when == when)
                .cloned()
                .collect();
            if runs.is_empty() {
                continue;
            }
            writeln!(f)?;
            writeln!(f, "  promoted {} ({} runs)", when.name(), runs.len())?;
            if when != When::Standby {
                let label = "prepared, after standby (guest)";
                match Spread::of(runs.iter().filter_map(|r| r.prepared_after_standby)) {
                    Some(s) => writeln!(
                        f,
                        "  {label:<42}{:>7.0} ms  ({:.0}–{:.0})",
                        s.median * 1e3,
                        s.min * 1e3,
                        s.max * 1e3
                    )?,
                    None => writeln!(f, "  {label:<42}not seen")?,
                }
                writeln!(
                    f,
                    "  {:<42}{} s after k3s-warm, in every run",
                    "promoted",
                    SETTLE.as_secs()
                )?;
                for w in WARM_UPS.iter().copied().chain(["prefetch"]) {
                    let seen = runs
                        .iter()
                        .filter(|r| r.warmed.as_ref().is_some_and(|v| v.iter().any(|x| x == w)))
                        .count();
                    writeln!(
                        f,
                        "  {:<42}{seen} of {} runs",
                        format!("{w} ended before the apply"),
                        runs.len()
                    )?;
                }
            }
            if when == When::Prefetched {
                let found = runs.iter().filter(|r| r.check_prefetched).count();
                writeln!(
                    f,
                    "  {:<42}{found} of {} runs",
                    "check found the prefetch's work done",
                    runs.len()
                )?;
                let kept = runs.iter().filter(|r| r.check_kept).count();
                writeln!(
                    f,
                    "  {:<42}{kept} of {} runs",
                    "check sent on the prefetch's connection",
                    runs.len()
                )?;
            }
            writeln!(f, "  {:<42}median  (min–max)", "promote → …")?;
            rows(f, &runs, &LATENCIES, "ms")?;
            let label = "agent exec / floor, per run";
            match Spread::of(runs.iter().filter_map(exec_over_floor)) {
                Some(s) => writeln!(
                    f,
                    "  {label:<42}{:>7.2} ×   ({:.2}–{:.2}), over {} runs",
                    s.median, s.min, s.max, s.n
                )?,
                None => writeln!(f, "  {label:<42}not seen")?,
            }
            let label = "agent exec / cold round trip, per run";
            match Spread::of(runs.iter().filter_map(exec_over_cold)) {
                Some(s) => writeln!(
                    f,
                    "  {label:<42}{:>7.2} ×   ({:.2}–{:.2}), over {} runs",
                    s.median, s.min, s.max, s.n
                )?,
                None => writeln!(f, "  {label:<42}not seen")?,
            }
            timeline_rows(f, &runs)?;
            writeln!(f, "  PID1 memory, VmRSS")?;
            rows(f, &runs, &MEMORY, "KiB")?;
        }
        writeln!(f)?;
        for (n, r) in self.runs.iter().enumerate() {
            let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            writeln!(
                f,
                "  run {} ({}): floor {} ms, cold {} ms, exec {} ms, response {:.0} ms, joined {} ms, ca-check {} ms; VmRSS {} → {} KiB; state {}",
                n + 1,
                r.when.name(),
                opt(r.console.floor_ms.map(|m| m as f64)),
                opt(step_ms(&r.console.double_check, "response")),
                opt(r.console.agent_exec_ms.map(|m| m as f64)),
                r.response * 1e3,
                opt(r.console.joined.map(|j| j.0 * 1e3)),
                opt(r.console.agent.as_ref().map(|a| a.0 * 1e3)),
                opt(r.standby_rss_kib.map(|k| k as f64)),
                opt(r.joined_rss_kib.map(|k| k as f64)),
                r.joined_state.map_or("-", JoinState::name),
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  wall times count from the host sending the apply; console lines are polled every {} ms from the serial log, \
so they are late by up to that and by the serial port's delivery. The guest figure is PID1's own, from the request head's arrival to the agent's spawn. \
The floor is one TLS round trip from the guest to the same server (connect, handshake, GET /cacerts, body), timed by the agent double in the guest \
after its check, in the same run.",
            POLL.as_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::config::MachineConfig;

    #[test]
    fn agent_exec_lines_are_parsed() {
        let cases = [
            ("[basalt] join: agent exec 12 ms after apply", Some(12)),
            (
                "[    9.1] [basalt] join: agent exec 0 ms after apply\r",
                Some(0),
            ),
            ("[basalt] join: agent exec 12 ms after", None),
            ("[basalt] join: agent exec twelve ms after apply", None),
            ("[basalt] join: refused: CA hash mismatch", None),
            ("[basalt] joined t=4.200", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_agent_exec(line), want, "{line:?}");
        }
    }

    #[test]
    fn the_timelines_of_pid1_and_of_the_double_are_parsed() {
        let line = "[   12.5] [basalt] join: timeline ms after the request: parsed 1, check-response 14, exec 31\r";
        assert_eq!(
            parse_timeline(line),
            Some(vec![
                ("parsed".into(), 1),
                ("check-response".into(), 14),
                ("exec".into(), 31)
            ])
        );
        assert_eq!(
            parse_timeline("[basalt] join: timeline ms after the request: parsed one"),
            None
        );
        assert_eq!(
            parse_timeline("[basalt] join: agent exec 12 ms after apply"),
            None
        );
        let line = "k3s-agent-double: ca-check times ms: connected 2, handshake 60, response 64, verified 70, hashed 71";
        let steps = parse_double_check(line).expect("parsed");
        assert_eq!(steps.len(), 5);
        assert_eq!(step_ms(&Some(steps), "response"), Some(64.0));
        assert_eq!(
            parse_double_check("k3s-agent-double: ca-check passed"),
            None
        );
    }

    #[test]
    fn the_floor_and_the_check_lines_are_parsed() {
        assert_eq!(
            parse_round_trip("k3s-agent-double: cacerts round trip 41 ms\r"),
            Some(41)
        );
        assert_eq!(
            parse_round_trip("k3s-agent-double: cacerts round trip ms"),
            None
        );
        assert_eq!(parse_round_trip("[basalt] cacerts round trip 41 ms"), None);
        assert_eq!(
            parse_ca_check("[basalt] join: CA check 40 ms; prepared alongside in 12 ms\r"),
            Some((40, 12))
        );
        assert_eq!(parse_ca_check("[basalt] join: CA check 40 ms"), None);
    }

    #[test]
    fn the_memory_split_comes_from_the_metrics() {
        let metrics = "# HELP basalt_pid1_rss_bytes PID1's resident memory.\n\
                       basalt_pid1_rss_bytes 5443584\n\
                       basalt_pid1_rss_anon_bytes 1228800\n\
                       basalt_pid1_rss_file_bytes 4214784\n";
        assert_eq!(
            parse_rss_split(metrics),
            Some(RssSplit {
                anon_kib: 1200,
                file_kib: 4116
            })
        );
        assert_eq!(parse_rss_split("basalt_pid1_rss_bytes 5443584\n"), None);
    }

    #[test]
    fn agent_double_lines_are_parsed() {
        let cases = [
            (
                "k3s-agent-double: ca-check passed",
                Some(AgentLine::CaCheckPassed),
            ),
            (
                "k3s-agent-double: ca-check passed\r",
                Some(AgentLine::CaCheckPassed),
            ),
            (
                "k3s-agent-double: ca-check failed: hash mismatch",
                Some(AgentLine::CaCheckNotPassed("failed: hash mismatch".into())),
            ),
            (
                "k3s-agent-double: failed: read config: no such file",
                Some(AgentLine::Failed("read config: no such file".into())),
            ),
            (
                "k3s-agent-double: config server=https://10.0.2.2:1 node-name=n",
                None,
            ),
            ("k3s-agent-double: running", None),
            ("[basalt] joined t=4.200", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_agent_line(line), want, "{line:?}");
        }
    }

    #[test]
    fn console_sightings_are_the_first_whole_lines() {
        let mut seen = AfterApply::default();
        // The exec line is still being written: not taken yet.
        let text = "[basalt] join: agent exec 1";
        seen.update(text, Duration::from_millis(100));
        assert_eq!(seen, AfterApply::default());
        let text = format!("{text}7 ms after apply\r\n[basalt] joined t=5.250\r\n");
        seen.update(&text, Duration::from_millis(200));
        let text = format!("{text}[basalt] joined t=9.000\nk3s-agent-double: ca-check passed\n");
        seen.update(&text, Duration::from_millis(300));
        assert_eq!(seen.agent_exec_ms, Some(17));
        assert_eq!(seen.joined, Some((0.2, 5.25)));
        assert_eq!(seen.agent, Some((0.3, AgentLine::CaCheckPassed)));
    }

    #[test]
    fn the_configs_are_a_standby_one_and_a_join_one() {
        let pki = RunPki::new().expect("pki");
        let standby =
            MachineConfig::parse(&machine_config(&pki, None, None)).expect("standby config");
        assert!(standby.cluster.is_none());
        assert!(standby.prefetch_servers().is_empty());
        let text = machine_config(&pki, None, Some("https://10.0.2.2:6443"));
        let prefetching = MachineConfig::parse(&text).expect("prefetching standby config");
        assert_eq!(prefetching.prefetch_servers(), ["https://10.0.2.2:6443"]);
        let token = format!("K10{}::server:bench", "ab".repeat(32));
        let text = machine_config(&pki, Some(("https://10.0.2.2:6443", &token)), None);
        let join = MachineConfig::parse(&text).expect("join config");
        let cluster = join.cluster.expect("[cluster]");
        assert_eq!(cluster.server.as_str(), "https://10.0.2.2:6443");
        assert_eq!(cluster.token.ca_hash(), Some("ab".repeat(32).as_str()));
        assert!(pki.dir.path().join("bench.key").exists());
    }

    #[test]
    fn the_checks_reuse_is_read_off_its_note() {
        let serial = "[basalt] join: CA check kept, prefetched\r\n[basalt] prefetch: x: CA y checked ahead\r\n";
        assert!(check_said(serial, "kept"));
        assert!(check_said(serial, "prefetched"));
        assert!(!check_said(serial, "resumed"));
        assert!(!check_said("[basalt] join: CA check resumed\r\n", "kept"));
    }

    fn joined_run(exec: u64, response: f64, joined: Option<f64>) -> JoinRun {
        JoinRun {
            check_prefetched: false,
            check_kept: false,
            standby_rss_kib: Some(2000),
            joined_rss_kib: Some(2600),
            standby_split: Some(RssSplit {
                anon_kib: 1000,
                file_kib: 1000,
            }),
            joined_split: Some(RssSplit {
                anon_kib: 1100,
                file_kib: 1500,
            }),
            response,
            console: AfterApply {
                joined: joined.map(|j| (j, 4.0)),
                agent_exec_ms: Some(exec),
                agent: Some((0.9, AgentLine::CaCheckPassed)),
                floor_ms: Some(exec / 2),
                check_ms: Some((exec / 2 + 1, 3)),
                timeline: Some(vec![("check-response".into(), 12), ("exec".into(), exec)]),
                double_check: Some(vec![("response".into(), 40), ("hashed".into(), 45)]),
            },
            joined_state: Some(JoinState::AgentStarted),
            ..JoinRun::default()
        }
    }

    #[test]
    fn the_report_gives_medians_ranges_and_says_what_the_agent_is() {
        let bench = JoinBench {
            image: "join.qcow2".into(),
            accel: Accel::Tcg,
            runs: vec![
                joined_run(10, 0.5, Some(0.4)),
                joined_run(30, 0.7, None),
                joined_run(20, 0.6, Some(0.6)),
            ],
        };
        let text = bench.to_string();
        for want in [
            "accelerator tcg",
            "the K3s agent double",
            "Not K3s",
            "20 ms  (10–30)\n",
            "600 ms  (500–700)\n",
            "500 ms  (400–600)  seen in 2 of 3 runs\n",
            "600 KiB (600–600)\n",
            "promoted right after standby (3 runs)",
            "run 2 (right after standby): floor 15 ms, cold 40 ms, exec 30 ms, response 700 ms, joined - ms",
            "agent exec / cold round trip, per run        0.50 ×   (0.25–0.75), over 3 runs\n",
            format!("    {:<40}{:>7} ms  (12–12)\n", "check-response", 12).as_str(),
            format!("    {:<40}{:>7} ms  (10–30)\n", "exec", 20).as_str(),
            "agent exec / floor, per run                  2.00 ×   (2.00–2.00), over 3 runs\n",
            "RssAnon growth                                100 KiB (100–100)\n",
            "RssFile growth                                500 KiB (500–500)\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
    }

    #[test]
    fn prepared_runs_are_reported_apart_with_their_wait() {
        let prepared = |exec, after| JoinRun {
            when: When::Prepared,
            prepared_after_standby: Some(after),
            warmed: Some(vec!["check-warm".into()]),
            ..joined_run(exec, 0.2, Some(0.1))
        };
        let bench = JoinBench {
            image: "join.qcow2".into(),
            accel: Accel::Tcg,
            runs: vec![
                joined_run(3000, 3.2, Some(3.1)),
                prepared(40, 2.5),
                joined_run(2000, 2.2, Some(2.1)),
                prepared(60, 3.5),
            ],
        };
        let text = bench.to_string();
        let (at_standby, prepared_part) = text
            .split_once("promoted prepared standby (2 runs)")
            .expect("a prepared section");
        assert!(
            at_standby.contains("promoted right after standby (2 runs)"),
            "{text}"
        );
        assert!(at_standby.contains("2500 ms  (2000–3000)\n"), "{text}");
        assert!(
            prepared_part
                .contains("prepared, after standby (guest)              3000 ms  (2500–3500)\n"),
            "{text}"
        );
        assert!(
            prepared_part.contains(&format!(
                "  {:<42}2 of 2 runs\n",
                "check-warm ended before the apply"
            )),
            "{text}"
        );
        assert!(
            prepared_part.contains(&format!(
                "  {:<42}0 of 2 runs\n",
                "prepare-warm ended before the apply"
            )),
            "{text}"
        );
        assert!(prepared_part.contains("50 ms  (40–60)\n"), "{text}");
        assert!(
            text.contains("run 4 (prepared standby): floor 30 ms, cold 40 ms, exec 60 ms"),
            "{text}"
        );
    }

    #[test]
    fn when_names_one_or_both_moments() {
        assert_eq!(
            When::parse_list("both"),
            Ok(vec![When::Standby, When::Prepared])
        );
        assert_eq!(When::parse_list("prepared"), Ok(vec![When::Prepared]));
        assert_eq!(
            When::parse_list("all"),
            Ok(vec![When::Standby, When::Prepared, When::Prefetched])
        );
        assert_eq!(When::parse_list("standby"), Ok(vec![When::Standby]));
        let err = When::parse_list("later").unwrap_err();
        assert!(err.contains("later") && err.contains("both"), "{err}");
    }
}
