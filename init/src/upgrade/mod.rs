//! A/B upgrades on the node (issue 16): a bundle received into the inactive slot and
//! armed for one boot ([`install`]), the first boot of the new slot on trial until it is
//! healthy ([`trial`], started by stage 2 through [`start_boot_hook`]), rollbacks found
//! and recorded ([`record`]), and what status shows of it all ([`status`]).
//!
//! The disk: ROOT-A / ROOT-B and the ESP are found on the disk of the verified root, as
//! STATE is. GRUB's environment block on the ESP says which slot boots: `saved_entry`
//! (the good one) and `next_entry` (one boot of a new one, cleared by GRUB as it boots it).

pub mod esp;
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

/// `POST /v1/upgrade` on the node: the bundle from `body` into the inactive slot.
pub fn upgrade(
    root: &Path,
    body: &mut dyn Read,
    length: u64,
    opts: &Options,
) -> Result<Installed, InstallError> {
    let Ok(_busy) = BUSY.try_lock() else {
        return Err(
            Refusal::Pending("another upgrade or rollback is being done now".into()).into(),
        );
    };
    let params = booted(root)?;
    let t = target(root, params.slot)?;
    let running = install::identity(root)?;
    let done = install::install(body, length, opts, params.slot.as_str(), &running, &t);
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

/// `POST /v1/rollback`: the other slot becomes GRUB's default again, if it holds a good
/// image and nothing is pending. Returns that slot.
pub fn rollback(root: &Path) -> Result<Slot, InstallError> {
    let Ok(_busy) = BUSY.try_lock() else {
        return Err(Refusal::Pending("an upgrade or rollback is being done now".into()).into());
    };
    let params = booted(root)?;
    let t = target(root, params.slot)?;
    let mut esp = Esp::open(&t.esp_dev)?;
    let mut env = esp.read_env()?;
    let mut rec = record::load(root)?;
    refuse::idle(params.slot.as_str(), &env, &rec)?;
    let to = t.slot.as_str();
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
    let from = params.slot.as_str();
    rec.rollbacks += 1;
    rec.last_rollback = Some(basalt_api::node::Rollback {
        slot: from.to_owned(),
        version: rec.slots.get(from).and_then(|s| s.version.clone()),
        reason: "requested through the node API (basalt node rollback)".into(),
        at: record::now(),
    });
    record::save(root, &rec)?;
    console::info(&format!(
        "upgrade: rollback requested; slot {to} is the default from the next boot"
    ));
    Ok(t.slot)
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
            if let Err(e) = at_boot(&root) {
                console::error("upgrade: at boot", &e);
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
    let mut health = || health(&cmdline, must_join);
    let tick = Duration::from_secs(1).min(watchdog::FEED_EVERY);
    let outcome = trial::wait(&mut health, timeout, tick, &mut || {
        if let Some(d) = dog.as_mut() {
            d.feed();
        }
    });
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
