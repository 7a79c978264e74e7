//! A/B upgrades on the node (issue 16): a bundle received into the inactive slot and
//! armed for one boot ([`install`]), the first boot of the new slot on trial until it is
//! healthy ([`trial`], started by stage 2 through [`start_boot_hook`]), rollbacks found
//! and recorded ([`record`]), and what status shows of it all ([`status`]).
//!
//! The disk: ROOT-A / ROOT-B and the ESP are found on the disk of the verified root, as
//! STATE is. GRUB's environment block on the ESP says which slot boots: `saved_entry`
//! (the good one) and `next_entry` (one boot of a new one, cleared by GRUB as it boots it).

pub mod esp;
pub mod fetch;
pub mod hang;
pub mod install;
pub mod record;
pub mod refuse;
pub mod trial;
pub mod verity;
pub mod watchdog;

use crate::pid1::console;
use crate::storage::partition;
use basalt_api::bootparams::{BootParams, Slot};
use basalt_api::grubenv::{NEXT_ENTRY, SAVED_ENTRY};
use basalt_api::layout::{Partition, SECTOR_SIZE};
use basalt_api::node::{SlotInfo, UpgradeStatus};
use esp::Esp;
use install::{InstallError, Installed, Options, Target};
use record::SlotRecord;
use refuse::Refusal;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use trial::{Check, Found};

/// One upgrade or rollback at a time.
static BUSY: Mutex<()> = Mutex::new(());
/// What the trial of this boot is doing, for status.
static TRIAL: Mutex<Option<String>> = Mutex::new(None);
static WATCHDOG: Mutex<Option<String>> = Mutex::new(None);
/// Set by a rollback during the trial: the trial stops and never marks its slot good.
static TRIAL_ABORT: Mutex<Option<String>> = Mutex::new(None);

/// The kernel parameter a test image sets to make its trial fail its health check (only
/// honoured by a basalt-init built with the `testd` feature).
#[cfg(feature = "testd")]
pub const TEST_FAIL_PARAM: &str = "testd.trial=fail";

fn set(m: &Mutex<Option<String>>, v: Option<String>) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

fn get(m: &Mutex<Option<String>>) -> Option<String> {
    m.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

pub fn other(slot: Slot) -> Slot {
    match slot {
        Slot::A => Slot::B,
        Slot::B => Slot::A,
    }
}

/// The running boot's parameters.
pub fn booted(root: &Path) -> Result<BootParams, InstallError> {
    let path = root.join("proc/cmdline");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| InstallError::Locate(format!("read {}: {e}", path.display())))?;
    BootParams::parse(&text).map_err(|e| InstallError::Locate(format!("{}: {e}", path.display())))
}

/// The inactive slot's partition and the ESP, on the disk of the verified root.
pub fn target(root: &Path, booted: Slot) -> Result<Target, InstallError> {
    let sys = root.join("sys");
    let disk = partition::disk_under_dm(&sys, crate::boot::stage1::DM_NAME)
        .map_err(|e| InstallError::Locate(e.to_string()))?;
    let find = |name: &str| {
        partition::find_on(&disk, name).ok_or_else(|| {
            InstallError::Locate(format!("no partition named {name} on {}", disk.display()))
        })
    };
    let slot = other(booted);
    let slot_part = find(slot.partition_name())?;
    let esp_part = find(Partition::Efi.name())?;
    let size_path = sys.join("class/block").join(&slot_part.name).join("size");
    let sectors: u64 = std::fs::read_to_string(&size_path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| InstallError::Locate(format!("read {}", size_path.display())))?;
    Ok(Target {
        slot,
        slot_dev: root.join("dev").join(&slot_part.name),
        slot_name: format!("{} ({})", slot.partition_name(), slot_part.name),
        slot_bytes: sectors * SECTOR_SIZE,
        esp_dev: root.join("dev").join(&esp_part.name),
        root: root.to_path_buf(),
    })
}

fn esp_dev(root: &Path) -> Result<PathBuf, InstallError> {
    let b = booted(root)?;
    Ok(target(root, b.slot)?.esp_dev)
}

/// Where a bundle comes from.
pub enum Source<'a> {
    /// The request's body, `length` bytes announced.
    Body { body: &'a mut dyn Read, length: u64 },
    /// A URL the node fetches ([`fetch`]).
    Url(&'a str),
}

/// `POST /v1/upgrade` on the node: the bundle from `source` into the inactive slot.
pub fn upgrade(root: &Path, source: Source<'_>, opts: &Options) -> Result<Installed, InstallError> {
    let Ok(_busy) = BUSY.try_lock() else {
        return Err(
            Refusal::Pending("another upgrade or rollback is being done now".into()).into(),
        );
    };
    let params = booted(root)?;
    let t = target(root, params.slot)?;
    let running = install::identity(root)?;
    let done = install_from(source, opts, params.slot.as_str(), &running, &t);
    match &done {
        Ok(i) => console::info(&format!(
            "upgrade: version {} written to slot {} and verified; armed for the next boot",
            i.version,
            i.slot.as_str()
        )),
        Err(e) => console::warn(&format!("upgrade: refused: {}", console::chain(e))),
    }
    done
}

/// One path for both sources: a URL is checked, the node's state too (so nothing is
/// downloaded for an upgrade that would be refused as pending), then its body is read
/// exactly as a streamed one.
pub fn install_from(
    source: Source<'_>,
    opts: &Options,
    booted: &str,
    running: &basalt_api::bundle::Identity,
    t: &Target,
) -> Result<Installed, InstallError> {
    match source {
        Source::Body { body, length } => install::install(body, length, opts, booted, running, t),
        Source::Url(url) => {
            fetch::check_url(url)?;
            install::expected_sha256(opts)?;
            install::precheck(booted, t)?;
            console::info(&format!("upgrade: fetching {}", fetch::shown(url)));
            let mut got = fetch::open(url)?;
            install::install(&mut got.body, got.length, opts, booted, running, t)
        }
    }
}

/// The reason recorded when the operator gives up a trial (`basalt node rollback`).
pub const OPERATOR_ROLLBACK: &str =
    "rollback requested by the operator during the trial (basalt node rollback)";

/// What `POST /v1/rollback` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolledBack {
    /// The slot GRUB boots from the next boot on.
    pub slot: Slot,
    /// The booted slot was on trial: the trial is given up (never marked good), and the
    /// rollback is counted when the old slot boots, as an automatic one is.
    pub ended_trial: bool,
}

/// `POST /v1/rollback`: the other slot becomes GRUB's default again, if it holds a good
/// image and nothing is pending. On a trial boot, the trial is given up instead: see
/// [`rollback_on`].
pub fn rollback(root: &Path) -> Result<RolledBack, InstallError> {
    let Ok(_busy) = BUSY.try_lock() else {
        return Err(Refusal::Pending("an upgrade or rollback is being done now".into()).into());
    };
    let params = booted(root)?;
    let t = target(root, params.slot)?;
    let done = rollback_on(params.slot, &t, &TRIAL_ABORT, record::now())?;
    if done.ended_trial {
        set(
            &TRIAL,
            Some(format!(
                "given up: {OPERATOR_ROLLBACK}; slot {} (GRUB's default) boots next",
                done.slot.as_str()
            )),
        );
        console::warn(&format!(
            "upgrade: the trial of slot {} is given up by the operator; slot {} boots next",
            params.slot.as_str(),
            done.slot.as_str()
        ));
    } else {
        console::info(&format!(
            "upgrade: rollback requested; slot {} is the default from the next boot",
            done.slot.as_str()
        ));
    }
    Ok(done)
}

/// The rollback itself, for the booted slot `booted` whose other slot is `t.slot`, at
/// `now`. Called with [`BUSY`] held, which the trial also takes to mark its slot good,
/// so the two never cross.
///
/// - Booted slot on trial (GRUB's default is still the other, good slot): nothing in
///   GRUB's environment changes, since the old slot is already what the next boot runs.
///   The trial's failure is recorded with [`OPERATOR_ROLLBACK`] (so the old slot's next
///   boot records the rollback with that reason, exactly as after a failed health check)
///   and `abort` is set, so the running trial stops and never marks its slot good. The
///   node reboots only if asked (`?reboot=1`); until then it runs on, not marked good.
/// - Otherwise: the other slot must hold a good image and nothing may be pending; it
///   becomes `saved_entry`, and the rollback is recorded at once.
pub fn rollback_on(
    booted: Slot,
    t: &Target,
    abort: &Mutex<Option<String>>,
    now: u64,
) -> Result<RolledBack, InstallError> {
    let mut esp = Esp::open(&t.esp_dev)?;
    let mut env = esp.read_env()?;
    let mut rec = record::load(&t.root)?;
    let from = booted.as_str();
    let to = t.slot.as_str();
    if trial::saved(&env) == to {
        if get(abort).is_some() {
            return Err(Refusal::Pending(format!(
                "the trial of slot {from} was already given up; slot {to} boots next \
                 (POST /v1/reboot, or basalt node rollback --reboot, to go there now)"
            ))
            .into());
        }
        trial::fail(from, OPERATOR_ROLLBACK, &mut rec, now);
        record::save(&t.root, &rec)?;
        if env.get(NEXT_ENTRY).is_some() {
            env.remove(NEXT_ENTRY);
            esp.write_env(&env)?;
        }
        set(abort, Some(OPERATOR_ROLLBACK.to_owned()));
        return Ok(RolledBack {
            slot: t.slot,
            ended_trial: true,
        });
    }
    refuse::idle(from, &env, &rec)?;
    match rec.slots.get(to) {
        Some(s) if s.good && !s.failed => {}
        _ => {
            return Err(InstallError::Bundle(format!(
                "slot {to} holds no image known to be good; nothing to roll back to"
            )))
        }
    }
    env.set(SAVED_ENTRY, to)
        .map_err(|e| InstallError::Locate(e.to_string()))?;
    env.remove(NEXT_ENTRY);
    esp.write_env(&env)?;
    rec.rollbacks += 1;
    rec.last_rollback = Some(basalt_api::node::Rollback {
        slot: from.to_owned(),
        version: rec.slots.get(from).and_then(|s| s.version.clone()),
        reason: "requested through the node API (basalt node rollback)".into(),
        at: now,
    });
    record::save(&t.root, &rec)?;
    Ok(RolledBack {
        slot: t.slot,
        ended_trial: false,
    })
}

/// What this boot's own slot is: its version (image identity) and root hash.
fn running_slot(root: &Path, params: &BootParams) -> SlotRecord {
    SlotRecord {
        version: install::identity(root).ok().map(|i| i.version.to_string()),
        root_hash: Some(params.verity.root_hash.clone()),
        good: false,
        failed: false,
    }
}

/// The slots, upgrades and rollbacks for `GET /v1/status`.
pub fn status(root: &Path) -> UpgradeStatus {
    let mut out = UpgradeStatus {
        trial: get(&TRIAL),
        watchdog: get(&WATCHDOG),
        ..UpgradeStatus::default()
    };
    let mut errors = Vec::new();
    let params = match booted(root) {
        Ok(p) => p,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let booted = params.slot.as_str();
    out.booted = booted.to_owned();
    let env = match esp_dev(root).and_then(|d| Ok(Esp::open(&d)?.read_env()?)) {
        Ok(env) => Some(env),
        Err(e) => {
            errors.push(console::chain(&e));
            None
        }
    };
    let rec = record::load(root).unwrap_or_else(|e| {
        errors.push(console::chain(&e));
        record::Record::default()
    });
    if let Some(env) = &env {
        out.default_slot = Some(trial::saved(env).to_owned());
        out.next_boot = env.get(NEXT_ENTRY).map(str::to_owned);
    }
    let running = running_slot(root, &params);
    for name in ["a", "b"] {
        let r = rec.slots.get(name);
        let pending = rec.pending.as_ref().filter(|p| p.slot == name);
        let state = if name == booted {
            if out.default_slot.as_deref().is_some_and(|d| d != booted) {
                "trial"
            } else {
                "active"
            }
        } else if pending.is_some() {
            "pending"
        } else {
            match r {
                Some(s) if s.good => "good",
                Some(s) if s.failed => "failed",
                Some(s) if s.version.is_some() => "pending",
                _ => "empty",
            }
        };
        let (version, root_hash) = if name == booted {
            (running.version.clone(), running.root_hash.clone())
        } else if let Some(p) = pending {
            (Some(p.version.clone()), Some(p.root_hash.clone()))
        } else {
            (
                r.and_then(|s| s.version.clone()),
                r.and_then(|s| s.root_hash.clone()),
            )
        };
        out.slots.push(SlotInfo {
            name: name.into(),
            version,
            root_hash,
            state: state.into(),
        });
    }
    out.last_rollback = rec.last_rollback.clone();
    out.upgrades = rec.upgrades;
    out.rollbacks = rec.rollbacks;
    if !errors.is_empty() {
        out.error = Some(errors.join("; "));
    }
    out
}

/// Stage 2's one call, after the boot plan: settles what the last boots left (a
/// rollback, an interrupted upgrade) and, on a trial boot, runs the trial in a thread of
/// its own. Never fails the boot: what goes wrong is said on the console.
pub fn start_boot_hook(root: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("upgrade".into())
        .spawn(move || {
            match at_boot(&root) {
                Ok(()) => {}
                // Shutdown came first: nothing was half-written, the next boot checks again.
                Err(e) if crate::atomic_file::closed() => console::info(&format!(
                    "upgrade: at boot: stopped by the shutdown ({})",
                    console::chain(&e)
                )),
                Err(e) => console::error("upgrade: at boot", &e),
            }
        });
    if let Err(e) = spawned {
        console::error("upgrade: start the boot check", &e);
    }
}

fn at_boot(root: &Path) -> Result<(), InstallError> {
    let params = booted(root)?;
    let booted = params.slot.as_str();
    let t = target(root, params.slot)?;
    let mut esp = Esp::open(&t.esp_dev)?;
    let env = esp.read_env()?;
    let mut rec = record::load(root)?;
    let running = running_slot(root, &params);
    let found = trial::find(booted, &env, &rec);
    let before = rec.clone();
    trial::settle(&found, booted, &running, &mut rec, record::now());
    if rec != before {
        record::save(root, &rec)?;
    }
    match &found {
        Found::RolledBack { slot, reason } => {
            console::warn(&format!("upgrade: rolled back from slot {slot}: {reason}"))
        }
        Found::Interrupted { slot } => console::warn(&format!(
            "upgrade: the upgrade of slot {slot} was interrupted before it was armed; \
             slot {slot} holds no good image"
        )),
        Found::Finished => console::info(&format!("upgrade: slot {booted} is good")),
        Found::Normal | Found::Armed => {}
        Found::Trial => run_trial(root, &params, &running, &mut esp)?,
    }
    // Not a trial (or the trial's slot was just marked good): GRUB's trial arguments, if
    // this boot has them, are turned off; nothing is written on a normal boot.
    if found != Found::Trial {
        hang::disarm_and_say(root);
    }
    Ok(())
}

fn run_trial(
    root: &Path,
    params: &BootParams,
    running: &SlotRecord,
    esp: &mut Esp,
) -> Result<(), InstallError> {
    let booted = params.slot.as_str();
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default();
    let timeout = trial::timeout(&cmdline);
    let mut dog = watchdog::Watchdog::arm(root);
    set(&WATCHDOG, dog.as_ref().map(|d| d.name.clone()));
    console::info(&format!(
        "upgrade: slot {booted} is on trial: healthy within {} s or back to the old slot \
         (watchdog: {})",
        timeout.as_secs(),
        dog.as_ref().map_or("none", |d| d.name.as_str())
    ));
    set(
        &TRIAL,
        Some(format!(
            "waiting up to {} s for the node to be healthy",
            timeout.as_secs()
        )),
    );
    let must_join = saved_config_joins(root);
    let mut health = || match get(&TRIAL_ABORT) {
        Some(why) => Check::Failed(why),
        None => health(&cmdline, must_join),
    };
    let tick = Duration::from_secs(1).min(watchdog::FEED_EVERY);
    let outcome = trial::wait(&mut health, timeout, tick, &mut || {
        if let Some(d) = dog.as_mut() {
            d.feed();
        }
        // A test image whose trial deadlocks here (`testd.hang=trial`; testd feature only).
        #[cfg(feature = "testd")]
        crate::testd::hang_if_asked(&cmdline, "trial");
    });
    // Held while the slot is marked good, so that a rollback cannot cross it.
    let _busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = get(&TRIAL_ABORT) {
        // Given up by `POST /v1/rollback`, which recorded why and reboots if asked:
        // the old slot is GRUB's default, so nothing is left to do but stop the watchdog.
        if let Some(d) = dog.take() {
            d.disarm();
        }
        set(&WATCHDOG, None);
        set(
            &TRIAL,
            Some(format!(
                "given up: {why}; slot {} (GRUB's default) boots next",
                other(params.slot).as_str()
            )),
        );
        return Ok(());
    }
    match outcome {
        Ok(()) => {
            let mut env = esp.read_env()?;
            env.set(SAVED_ENTRY, booted)
                .map_err(|e| InstallError::Locate(e.to_string()))?;
            esp.write_env(&env)?;
            let mut rec = record::load(root)?;
            trial::mark_good(booted, running, &mut rec);
            record::save(root, &rec)?;
            if let Some(d) = dog.take() {
                d.disarm();
            }
            set(&TRIAL, None);
            console::info(&format!(
                "upgrade: slot {booted} is healthy and marked good (GRUB saved_entry={booted})"
            ));
            hang::disarm_and_say(root);
        }
        Err(reason) => {
            set(&TRIAL, Some(format!("failed: {reason}; rebooting")));
            console::error(
                "upgrade: trial failed; rebooting into the old slot",
                &std::io::Error::other(reason.clone()),
            );
            let mut rec = record::load(root)?;
            trial::fail(booted, &reason, &mut rec, record::now());
            record::save(root, &rec)?;
            // The watchdog is no longer fed: if the orderly reboot hangs, it resets.
            std::mem::forget(dog);
            request_reboot();
        }
    }
    Ok(())
}

/// PID1's main loop takes SIGINT as an orderly reboot (as Ctrl-Alt-Del).
fn request_reboot() {
    nix::unistd::sync();
    if let Err(e) = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGINT) {
        console::error("upgrade: request the reboot", &e);
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    }
}

/// Whether the machine config saved on STATE joins a cluster.
fn saved_config_joins(root: &Path) -> bool {
    std::fs::read_to_string(root.join(crate::config_source::STATE_CONFIG))
        .ok()
        .and_then(|t| basalt_api::config::MachineConfig::parse(&t).ok())
        .is_some_and(|c| c.cluster.is_some())
}

/// One look at the node's health on trial.
fn health(cmdline: &str, must_join: bool) -> Check {
    #[cfg(feature = "testd")]
    if cmdline.split_whitespace().any(|w| w == TEST_FAIL_PARAM) {
        return Check::Failed(format!(
            "{TEST_FAIL_PARAM} on the kernel command line (a test image made to fail)"
        ));
    }
    let _ = cmdline;
    let Some(ctx) = crate::node_api::current() else {
        return Check::Waiting("the node API to listen".into());
    };
    if !crate::node_api::server::listening() {
        return Check::Waiting("the node API to listen".into());
    }
    if must_join {
        let join = ctx.joiner.status();
        if join.state != basalt_api::node::JoinState::Registered {
            let why = join
                .last_error
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default();
            return Check::Waiting(format!(
                "the K3s agent to register again (join {}{why})",
                join.state
            ));
        }
    }
    Check::Healthy
}

#[cfg(test)]
mod tests {
    use super::install::tests::{Node, Parts};
    use super::*;
    use sha2::{Digest, Sha256};

    fn write_env(node: &Node, f: impl FnOnce(&mut basalt_api::grubenv::GrubEnv)) {
        let mut esp = Esp::open(&node.target.esp_dev).expect("esp");
        let mut env = esp.read_env().expect("env");
        f(&mut env);
        esp.write_env(&env).expect("write env");
    }

    #[test]
    fn a_rollback_during_the_trial_gives_it_up_and_the_old_slot_records_why() {
        let node = Node::new("1.0.0");
        let bundle = Parts::new("2.0.0").tar();
        node.install(&bundle, &hex::encode(Sha256::digest(&bundle)), false)
            .expect("installed");
        // GRUB boots b once and clears next_entry: b is on trial, a is the default.
        write_env(&node, |env| {
            env.remove(NEXT_ENTRY);
        });
        let on_b = Target {
            slot: Slot::A,
            ..node.target.clone()
        };
        let abort = Mutex::new(None);
        let done = rollback_on(Slot::B, &on_b, &abort, record::now()).expect("rollback");
        assert_eq!(
            done,
            RolledBack {
                slot: Slot::A,
                ended_trial: true
            }
        );
        assert_eq!(get(&abort).as_deref(), Some(OPERATOR_ROLLBACK));
        let env = node.env();
        assert_eq!(
            env.get(SAVED_ENTRY),
            Some("a"),
            "the old slot stays the default"
        );
        assert_eq!(env.get(NEXT_ENTRY), None);

        // Twice is refused: it is already given up.
        let err = rollback_on(Slot::B, &on_b, &abort, record::now()).unwrap_err();
        assert_eq!(err.status(), 409, "{err}");

        // The old slot's next boot records the rollback with the operator's reason.
        let mut rec = record::load(&node.target.root).expect("rec");
        let found = trial::find("a", &env, &rec);
        assert_eq!(
            found,
            trial::Found::RolledBack {
                slot: "b".into(),
                reason: OPERATOR_ROLLBACK.into()
            }
        );
        let running = SlotRecord {
            version: Some("1.0.0".into()),
            root_hash: None,
            good: false,
            failed: false,
        };
        trial::settle(&found, "a", &running, &mut rec, record::now());
        assert_eq!(rec.rollbacks, 1);
        assert!(rec.slots["b"].failed && !rec.slots["b"].good);
        assert_eq!(
            rec.last_rollback.map(|r| r.reason).as_deref(),
            Some(OPERATOR_ROLLBACK)
        );
    }

    #[test]
    fn a_rollback_off_trial_switches_the_default_only_to_a_good_slot() {
        let node = Node::new("1.0.0");
        let abort = Mutex::new(None);
        // Slot b holds nothing known to be good.
        let err = rollback_on(Slot::A, &node.target, &abort, 5).unwrap_err();
        assert!(err.to_string().contains("nothing to roll back to"), "{err}");
        assert_eq!(node.env().get(SAVED_ENTRY), Some("a"));

        let mut rec = record::load(&node.target.root).expect("rec");
        rec.slots.insert(
            "b".into(),
            SlotRecord {
                version: Some("0.9.0".into()),
                root_hash: None,
                good: true,
                failed: false,
            },
        );
        record::save(&node.target.root, &rec).expect("save");
        let done = rollback_on(Slot::A, &node.target, &abort, 5).expect("rollback");
        assert_eq!(
            done,
            RolledBack {
                slot: Slot::B,
                ended_trial: false
            }
        );
        assert_eq!(node.env().get(SAVED_ENTRY), Some("b"));
        assert_eq!(get(&abort), None, "no trial to stop");
        let rec = record::load(&node.target.root).expect("rec");
        assert_eq!(rec.rollbacks, 1);
        assert_eq!(rec.last_rollback.map(|r| r.slot).as_deref(), Some("a"));
    }

    /// A test double of a static file server on loopback: answers each connection with
    /// the next of `answers` (raw HTTP/1.1 bytes, so a response can be cut short), then
    /// closes it.
    fn serve(answers: Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/v2.bundle.tar",
            listener.local_addr().expect("addr")
        );
        let handle = std::thread::spawn(move || {
            let mut asked = Vec::new();
            for answer in answers {
                let (mut conn, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                reader.read_line(&mut line).expect("request line");
                asked.push(line.trim_end().to_owned());
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).expect("header") == 0 || h == "\r\n" {
                        break;
                    }
                }
                let _ = conn.write_all(&answer);
            }
            asked
        });
        (url, handle)
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn from_url(node: &Node, url: &str, sha: &str) -> Result<Installed, InstallError> {
        let running = install::identity(&node.target.root).expect("identity");
        install_from(
            Source::Url(url),
            &Options {
                sha256: sha.into(),
                allow_downgrade: false,
            },
            "a",
            &running,
            &node.target,
        )
    }

    #[test]
    fn a_bundle_fetched_from_a_url_is_written_verified_and_armed() {
        let node = Node::new("1.0.0");
        let parts = Parts::new("2.0.0");
        let bundle = parts.tar();
        let (url, server) = serve(vec![ok(&bundle)]);
        let done = from_url(&node, &url, &hex::encode(Sha256::digest(&bundle))).expect("installed");
        assert_eq!((done.slot, done.version.as_str()), (Slot::B, "2.0.0"));
        assert_eq!(&node.slot()[..parts.root.len()], &parts.root[..]);
        assert_eq!(node.env().get(NEXT_ENTRY), Some("b"));
        assert_eq!(
            server.join().expect("server"),
            ["GET /v2.bundle.tar HTTP/1.1"]
        );
    }

    #[test]
    fn a_url_that_fails_in_any_way_switches_nothing() {
        let node = Node::new("1.0.0");
        let bundle = Parts::new("2.0.0").tar();
        let sha = hex::encode(Sha256::digest(&bundle));

        // Nobody listens.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let url = format!("http://127.0.0.1:{port}/v2.bundle.tar");
        let err = from_url(&node, &url, &sha).unwrap_err();
        assert!(
            matches!(
                &err,
                InstallError::Fetch(fetch::FetchError::Unreachable { .. })
            ),
            "{err}"
        );
        assert_eq!(err.status(), 502);
        assert!(err.to_string().contains(&url), "{err}");
        node.assert_untouched();

        let mut cut = ok(&bundle);
        cut.truncate(cut.len() - bundle.len() / 2);
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        chunked.extend_from_slice(format!("{:x}\r\n", bundle.len()).as_bytes());
        chunked.extend_from_slice(&bundle);
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        let (url, server) = serve(vec![
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            cut,
            chunked,
            ok(&bundle),
        ]);
        let err = from_url(&node, &url, &sha).unwrap_err();
        assert!(
            matches!(
                &err,
                InstallError::Fetch(fetch::FetchError::Status { status: 404, .. })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("HTTP 404"), "{err}");
        node.assert_untouched();

        let err = from_url(&node, &url, &sha).unwrap_err();
        assert!(
            matches!(err, InstallError::Truncated { expected, .. } if expected == bundle.len() as u64),
            "{err}"
        );
        node.assert_untouched();

        let err = from_url(&node, &url, &sha).unwrap_err();
        assert!(
            matches!(
                &err,
                InstallError::Fetch(fetch::FetchError::NoLength { .. })
            ),
            "{err}"
        );
        node.assert_untouched();

        // The whole bundle, but not the one asked for.
        let err = from_url(&node, &url, &"ab".repeat(32)).unwrap_err();
        assert!(matches!(err, InstallError::Sha256 { .. }), "{err}");
        node.assert_untouched();
        assert_eq!(server.join().expect("server").len(), 4);

        // A sha256 that is not one: refused before anything is fetched.
        let err = from_url(&node, "http://127.0.0.1:9/x", "abc").unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }

    #[cfg(feature = "testd")]
    #[test]
    fn a_trial_asked_to_hang_stops_for_good_only_at_its_point() {
        // Not asked, or asked for another point: returns.
        crate::testd::hang_if_asked("quiet panic=10", "trial");
        crate::testd::hang_if_asked("quiet testd.hang=other", "trial");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            crate::testd::hang_if_asked("quiet testd.hang=trial panic=10", "trial");
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "the hung thread went on"
        );
    }
}
