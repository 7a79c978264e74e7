//! The first boot of a new slot, and what the next boot makes of it.
//!
//! A boot is on **trial** when the slot it runs (`basalt.slot=`) is not GRUB's default
//! (`saved_entry`): GRUB tried it once through `next_entry`, which it cleared before
//! booting it. The trial arms the hardware watchdog where there is one, waits for the
//! node to be healthy (the node API listening; if the machine config saved on STATE has
//! a `[cluster]`, the K3s agent registered again) for at most the trial timeout
//! ([`TIMEOUT`], or `basalt.trial.timeout=<seconds>` on the slot's command line), then
//! marks the slot good (`saved_entry=<booted>`) and disarms the watchdog. A failed or
//! timed-out trial records why on STATE and reboots: GRUB boots `saved_entry`, the old
//! slot. Any other failure of that boot (a panic with `panic=10`, dm-verity refusing the
//! root, a hang the watchdog resets, a hang in the kernel before the watchdog is armed,
//! which GRUB's trial arguments turn into a panic: see [`super::hang`]) ends there too,
//! with no record.
//!
//! The old slot then finds an upgrade pending for the other slot, no longer armed: a
//! rollback. Its reason is the recorded one, or, when the new slot left none,
//! [`NEVER_HEALTHY`].

use super::record::{Record, SlotRecord, TrialFailure};
use basalt_api::grubenv::{GrubEnv, NEXT_ENTRY, SAVED_ENTRY};
use basalt_api::node::Rollback;
use std::time::{Duration, Instant};

/// How long a new slot has to become healthy, unless its command line says otherwise
/// (`basalt.trial.timeout=<seconds>`). Long enough for a K3s agent to register again on
/// a slow cloud VM.
pub const TIMEOUT: Duration = Duration::from_secs(300);
/// The kernel parameter that overrides [`TIMEOUT`].
pub const TIMEOUT_PARAM: &str = "basalt.trial.timeout";
/// The reason of a rollback whose new slot left none.
pub const NEVER_HEALTHY: &str =
    "the new slot never became healthy: panic, verity failure or hang before PID1";
/// GRUB's default when the environment block has no `saved_entry`.
pub const DEFAULT_SLOT: &str = "a";

/// What a boot finds, from the slot it runs, GRUB's environment and the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The default slot, nothing pending.
    Normal,
    /// Not the default slot: this boot must prove itself.
    Trial,
    /// The default slot, and an upgrade of the other slot was pending but is not armed
    /// any more: it was booted once and given up.
    RolledBack { slot: String, reason: String },
    /// The default slot is the pending one: it was marked good, and the record was not
    /// updated before the node went down.
    Finished,
    /// An upgrade is armed for the next boot and has not been booted yet.
    Armed,
    /// An upgrade stopped before it armed the slot (a power cut, a crash): nothing was
    /// tried; the slot is not good.
    Interrupted { slot: String },
}

/// GRUB's default slot.
pub fn saved(env: &GrubEnv) -> &str {
    env.get(SAVED_ENTRY).unwrap_or(DEFAULT_SLOT)
}

pub fn find(booted: &str, env: &GrubEnv, rec: &Record) -> Found {
    if booted != saved(env) {
        return Found::Trial;
    }
    let Some(pending) = &rec.pending else {
        return Found::Normal;
    };
    if pending.slot == booted {
        return Found::Finished;
    }
    if env.get(NEXT_ENTRY) == Some(pending.slot.as_str()) {
        return Found::Armed;
    }
    if !pending.armed {
        return Found::Interrupted {
            slot: pending.slot.clone(),
        };
    }
    let reason = match &rec.trial_failure {
        Some(f) if f.slot == pending.slot && f.at >= pending.at => f.reason.clone(),
        _ => NEVER_HEALTHY.to_owned(),
    };
    Found::RolledBack {
        slot: pending.slot.clone(),
        reason,
    }
}

/// The record after a boot that found `found`, at `now`. `running` is what this boot
/// knows of its own slot (version, root hash).
pub fn settle(found: &Found, booted: &str, running: &SlotRecord, rec: &mut Record, now: u64) {
    match found {
        Found::Normal | Found::Armed => {
            let entry = rec
                .slots
                .entry(booted.to_owned())
                .or_insert(running.clone());
            entry.good = true;
            entry.failed = false;
            if entry.version.is_none() {
                entry.version = running.version.clone();
            }
            if entry.root_hash.is_none() {
                entry.root_hash = running.root_hash.clone();
            }
        }
        Found::Trial => {}
        Found::Interrupted { slot } => {
            rec.pending = None;
            if let Some(s) = rec.slots.get_mut(slot) {
                s.good = false;
            }
            settle(&Found::Normal, booted, running, rec, now);
        }
        Found::Finished => mark_good(booted, running, rec),
        Found::RolledBack { slot, reason } => {
            let version = rec.pending.take().map(|p| p.version);
            rec.trial_failure = None;
            rec.rollbacks += 1;
            rec.last_rollback = Some(Rollback {
                slot: slot.clone(),
                version,
                reason: reason.clone(),
                at: now,
            });
            if let Some(s) = rec.slots.get_mut(slot) {
                s.good = false;
                s.failed = true;
            }
            settle(&Found::Normal, booted, running, rec, now);
        }
    }
}

/// The record once the booted slot is marked good in GRUB's environment.
pub fn mark_good(booted: &str, running: &SlotRecord, rec: &mut Record) {
    let was_pending = rec.pending.take().is_some_and(|p| p.slot == booted);
    if was_pending {
        rec.upgrades += 1;
    }
    rec.trial_failure = None;
    rec.slots.insert(
        booted.to_owned(),
        SlotRecord {
            good: true,
            failed: false,
            ..running.clone()
        },
    );
}

/// The record of a trial that gave up, just before the reboot.
pub fn fail(booted: &str, reason: &str, rec: &mut Record, now: u64) {
    rec.trial_failure = Some(TrialFailure {
        slot: booted.to_owned(),
        reason: reason.to_owned(),
        at: now,
    });
}

/// The trial timeout from a kernel command line.
pub fn timeout(cmdline: &str) -> Duration {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(TIMEOUT_PARAM)?.strip_prefix('='))
        .next_back()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(TIMEOUT, Duration::from_secs)
}

/// One look at the node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Healthy,
    /// Not yet; what is still missing.
    Waiting(String),
    /// Never will be; why.
    Failed(String),
}

/// Looks at `health` every `tick` until it is healthy, failed, or `timeout` passed,
/// calling `feed` (the watchdog) at each look. `Err` is the reason to record.
pub fn wait(
    health: &mut dyn FnMut() -> Check,
    timeout: Duration,
    tick: Duration,
    feed: &mut dyn FnMut(),
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        feed();
        match health() {
            Check::Healthy => return Ok(()),
            Check::Failed(why) => return Err(format!("health check failed: {why}")),
            Check::Waiting(what) => {
                if start.elapsed() >= timeout {
                    return Err(format!(
                        "health check timed out after {} s: {what}",
                        timeout.as_secs()
                    ));
                }
            }
        }
        std::thread::sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::Pending;
    use super::*;

    fn env(saved: &str, next: Option<&str>) -> GrubEnv {
        let mut e = GrubEnv::new();
        e.set(SAVED_ENTRY, saved).expect("set");
        if let Some(n) = next {
            e.set(NEXT_ENTRY, n).expect("set");
        }
        e
    }

    fn running(v: &str) -> SlotRecord {
        SlotRecord {
            version: Some(v.into()),
            root_hash: Some("r".into()),
            good: false,
            failed: false,
        }
    }

    fn pending(slot: &str, at: u64) -> Record {
        Record {
            pending: Some(Pending {
                slot: slot.into(),
                version: "2.0.0".into(),
                root_hash: "h".into(),
                at,
                armed: true,
            }),
            ..Record::default()
        }
    }

    #[test]
    fn the_default_slot_without_anything_pending_is_a_normal_boot() {
        let mut rec = Record::default();
        let found = find("a", &env("a", None), &rec);
        assert_eq!(found, Found::Normal);
        settle(&found, "a", &running("1.0.0"), &mut rec, 9);
        assert!(rec.slots["a"].good);
        assert_eq!(rec.slots["a"].version.as_deref(), Some("1.0.0"));
        // An env without saved_entry boots `a`, as GRUB does.
        assert_eq!(find("a", &GrubEnv::new(), &rec), Found::Normal);
        assert_eq!(find("b", &GrubEnv::new(), &rec), Found::Trial);
    }

    #[test]
    fn a_slot_that_is_not_the_default_is_on_trial_and_marking_it_good_counts_the_upgrade() {
        let mut rec = pending("b", 10);
        assert_eq!(find("b", &env("a", None), &rec), Found::Trial);
        settle(&Found::Trial, "b", &running("2.0.0"), &mut rec, 11);
        assert!(
            rec.pending.is_some(),
            "a trial changes nothing until it ends"
        );
        mark_good("b", &running("2.0.0"), &mut rec);
        assert_eq!(rec.pending, None);
        assert_eq!(rec.upgrades, 1);
        assert!(rec.slots["b"].good);
        // The next boot of b, now the default: normal.
        assert_eq!(find("b", &env("b", None), &rec), Found::Normal);
    }

    #[test]
    fn back_on_the_old_slot_with_the_upgrade_not_armed_is_a_rollback_with_the_recorded_reason() {
        let mut rec = pending("b", 10);
        fail(
            "b",
            "health check timed out after 300 s: node API",
            &mut rec,
            20,
        );
        let found = find("a", &env("a", None), &rec);
        assert_eq!(
            found,
            Found::RolledBack {
                slot: "b".into(),
                reason: "health check timed out after 300 s: node API".into()
            }
        );
        settle(&found, "a", &running("1.0.0"), &mut rec, 30);
        let rb = rec.last_rollback.clone().expect("rollback");
        assert_eq!((rb.slot.as_str(), rb.at), ("b", 30));
        assert_eq!(rb.version.as_deref(), Some("2.0.0"));
        assert_eq!(rec.rollbacks, 1);
        assert_eq!(
            (rec.pending.clone(), rec.trial_failure.clone()),
            (None, None)
        );
        // Seen once: the boot after that is normal and counts nothing more.
        assert_eq!(find("a", &env("a", None), &rec), Found::Normal);
    }

    #[test]
    fn a_new_slot_that_left_no_reason_never_became_healthy() {
        // A failure recorded by an older trial does not explain this one.
        let mut rec = pending("b", 50);
        fail("b", "old reason", &mut rec, 20);
        assert_eq!(
            find("a", &env("a", None), &rec),
            Found::RolledBack {
                slot: "b".into(),
                reason: NEVER_HEALTHY.into()
            }
        );
    }

    #[test]
    fn an_armed_upgrade_is_not_a_rollback_and_a_good_pending_slot_is_finished() {
        let rec = pending("b", 10);
        assert_eq!(find("a", &env("a", Some("b")), &rec), Found::Armed);
        // Marked good (saved_entry=b) and then the power went before the record.
        let mut rec = pending("b", 10);
        let found = find("b", &env("b", None), &rec);
        assert_eq!(found, Found::Finished);
        settle(&found, "b", &running("2.0.0"), &mut rec, 12);
        assert_eq!((rec.pending.clone(), rec.upgrades), (None, 1));
    }

    #[test]
    fn an_upgrade_cut_before_arming_is_no_rollback_and_leaves_the_slot_not_good() {
        let mut rec = pending("b", 10);
        if let Some(p) = rec.pending.as_mut() {
            p.armed = false;
        }
        rec.slots.insert("b".into(), running("2.0.0"));
        let found = find("a", &env("a", None), &rec);
        assert_eq!(found, Found::Interrupted { slot: "b".into() });
        settle(&found, "a", &running("1.0.0"), &mut rec, 11);
        assert_eq!((rec.pending.clone(), rec.rollbacks), (None, 0));
        assert!(!rec.slots["b"].good && rec.slots["a"].good);
    }

    #[test]
    fn the_timeout_comes_from_the_command_line_or_the_default() {
        assert_eq!(
            timeout("quiet basalt.trial.timeout=45 x"),
            Duration::from_secs(45)
        );
        assert_eq!(timeout("quiet basalt.trial.timeout=zero"), TIMEOUT);
        assert_eq!(timeout("quiet"), TIMEOUT);
    }

    #[test]
    fn waiting_ends_healthy_failed_or_timed_out_and_feeds_the_watchdog() {
        let mut n = 0;
        let mut fed = 0;
        let mut health = || {
            n += 1;
            if n < 3 {
                Check::Waiting("node API".into())
            } else {
                Check::Healthy
            }
        };
        let tick = Duration::from_millis(1);
        assert_eq!(
            wait(&mut health, Duration::from_secs(5), tick, &mut || fed += 1),
            Ok(())
        );
        assert_eq!(fed, 3);

        let mut failed = || Check::Failed("k3s agent: exit 1".into());
        let err = wait(&mut failed, Duration::from_secs(5), tick, &mut || {}).unwrap_err();
        assert_eq!(err, "health check failed: k3s agent: exit 1");

        let mut never = || Check::Waiting("the K3s agent to register".into());
        let err = wait(&mut never, Duration::from_millis(20), tick, &mut || {}).unwrap_err();
        assert_eq!(
            err,
            "health check timed out after 0 s: the K3s agent to register"
        );
    }
}
