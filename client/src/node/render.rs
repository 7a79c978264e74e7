//! Human output of `basalt node`: short, aligned summaries of the node API's answers.

use basalt_api::node::{ApplyResponse, JoinStatus, Status, UpgradeStatus};
use std::fmt::Write;

/// The status as a person reads it: who and what the node is, its join state (and why it
/// failed), the boot timeline and the services.
pub fn status(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  slot {}  basalt {}  kernel {}",
        s.hostname, s.slot, s.versions.basalt, s.versions.kernel
    );
    let addresses = match s.addresses.as_slice() {
        [] => "none".to_string(),
        a => a.join(", "),
    };
    let _ = writeln!(out, "addresses: {addresses}");
    let _ = writeln!(
        out,
        "config:    {}",
        s.config_source.as_deref().unwrap_or("none")
    );
    for r in &s.config_report.rejected {
        let _ = writeln!(out, "  passed over {}: {}", r.source, r.reason);
    }
    for w in &s.config_report.warnings {
        let _ = writeln!(out, "  warning: {w}");
    }
    out.push_str(&join(&s.join));
    if let Some(c) = &s.api_cert {
        let _ = writeln!(
            out,
            "api cert:  expires {}  serial {}",
            c.not_after_text, c.serial
        );
    }
    if let Some(rss) = s.rss_kib {
        let _ = writeln!(out, "pid1 rss:  {rss} KiB");
    }
    if let Some(u) = &s.upgrade {
        out.push_str(&slots(u));
    }
    let _ = writeln!(out, "milestones:");
    if s.milestones.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    let width = s.milestones.iter().map(|m| m.name.len()).max().unwrap_or(0);
    for m in &s.milestones {
        let _ = writeln!(out, "  {:<width$}  {:>8.3} s", m.name, m.t);
    }
    // Only from a node that reports them: an older node's status prints as before.
    if !s.steps.is_empty() {
        let _ = writeln!(out, "steps:");
        let width = s.steps.iter().map(|m| m.name.len()).max().unwrap_or(0);
        for st in &s.steps {
            let _ = writeln!(
                out,
                "  {:<width$}  {:>8.3} s  at {:.3} s",
                st.name, st.took, st.at
            );
        }
    }
    let _ = writeln!(out, "services:");
    if s.services.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    let name_w = s.services.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let state_w = s.services.iter().map(|v| v.state.len()).max().unwrap_or(0);
    for v in &s.services {
        let _ = write!(
            out,
            "  {:<name_w$}  {:<state_w$}  restarts {}",
            v.name, v.state, v.restarts
        );
        if let Some(exit) = &v.last_exit {
            let _ = write!(out, "  last exit: {exit}");
        }
        out.push('\n');
    }
    out
}

/// The A/B slots: each slot's state, version and root hash; the trial; the last rollback.
pub fn slots(u: &UpgradeStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "slots:     booted {}  default {}  next boot {}  upgrades {}  rollbacks {}",
        u.booted,
        u.default_slot.as_deref().unwrap_or("?"),
        u.next_boot.as_deref().unwrap_or("-"),
        u.upgrades,
        u.rollbacks
    );
    for s in &u.slots {
        let hash = s
            .root_hash
            .as_deref()
            .map_or("-", |h| &h[..h.len().min(16)]);
        let _ = writeln!(
            out,
            "  {}  {:<7}  version {:<12}  root {hash}",
            s.name,
            s.state,
            s.version.as_deref().unwrap_or("-")
        );
    }
    if let Some(t) = &u.trial {
        let _ = writeln!(out, "  trial: {t}");
    }
    if let Some(w) = &u.watchdog {
        let _ = writeln!(out, "  watchdog: {w}");
    }
    if let Some(r) = &u.last_rollback {
        let _ = writeln!(
            out,
            "  last rollback: from slot {} (version {}): {}",
            r.slot,
            r.version.as_deref().unwrap_or("?"),
            r.reason
        );
    }
    if let Some(e) = &u.error {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

/// The answer to an applied config.
pub fn apply(a: &ApplyResponse) -> String {
    let mut out = String::new();
    let verdict = if a.applied { "applied" } else { "not applied" };
    let _ = writeln!(out, "{verdict} ({}): {}", a.source, a.message);
    out.push_str(&join(&a.join));
    for w in &a.warnings {
        let _ = writeln!(out, "warning:   {w}");
    }
    out
}

/// The answer to reboot or shutdown: the node's message if it sent one.
pub fn accepted(what: &str, body: &serde_json::Value) -> String {
    match body.get("message").and_then(|m| m.as_str()) {
        Some(m) => format!("{m}\n"),
        None => format!("{what} requested\n"),
    }
}

fn join(j: &JoinStatus) -> String {
    let mut out = format!("join:      {}", j.state);
    if let Some(server) = &j.server {
        let _ = write!(out, "  server {server}");
    }
    out.push('\n');
    if let Some(err) = &j.last_error {
        let _ = writeln!(out, "  last error: {err}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::node::{
        ApiCert, ConfigReport, JoinState, MilestoneTime, RejectedSource, ServiceInfo, Versions,
    };

    fn sample() -> Status {
        Status {
            milestones: vec![
                MilestoneTime {
                    name: "init-start".into(),
                    t: 0.5,
                },
                MilestoneTime {
                    name: "standby".into(),
                    t: 12.25,
                },
            ],
            slot: "a".into(),
            versions: Versions {
                basalt: "0.1.0".into(),
                kernel: "6.1.0".into(),
            },
            addresses: vec!["10.0.2.15/24".into()],
            hostname: "node-1".into(),
            config_source: Some("state".into()),
            config_report: Default::default(),
            services: vec![ServiceInfo {
                name: "k3s".into(),
                state: "backoff".into(),
                restarts: 3,
                last_exit: Some("exit 1".into()),
            }],
            join: JoinStatus {
                state: JoinState::Failed,
                server: Some("https://10.0.2.2:6443".into()),
                last_error: Some("CA hash mismatch".into()),
            },
            steps: vec![],
            rss_kib: Some(2048),
            api_cert: Some(ApiCert {
                not_after: 1_827_078_299,
                not_after_text: "Nov 23 15:44:59 2027 +00:00".into(),
                serial: "5a3f".into(),
            }),
            upgrade: None,
        }
    }

    #[test]
    fn slots_show_states_versions_and_the_last_rollback() {
        use basalt_api::node::{Rollback, SlotInfo, UpgradeStatus};
        let mut s = sample();
        s.upgrade = Some(UpgradeStatus {
            booted: "a".into(),
            default_slot: Some("a".into()),
            next_boot: None,
            slots: vec![
                SlotInfo {
                    name: "a".into(),
                    version: Some("1.0.0".into()),
                    root_hash: Some("ab".repeat(32)),
                    state: "active".into(),
                },
                SlotInfo {
                    name: "b".into(),
                    version: Some("2.0.0".into()),
                    root_hash: None,
                    state: "failed".into(),
                },
            ],
            last_rollback: Some(Rollback {
                slot: "b".into(),
                version: Some("2.0.0".into()),
                reason: "health check timed out after 300 s: the node API to listen".into(),
                at: 5,
            }),
            rollbacks: 1,
            ..UpgradeStatus::default()
        });
        let text = status(&s);
        assert!(
            text.contains(
                "slots:     booted a  default a  next boot -  upgrades 0  rollbacks 1
  \
                 a  active   version 1.0.0         root abababababababab
  \
                 b  failed   version 2.0.0         root -
  \
                 last rollback: from slot b (version 2.0.0): health check timed out after \
                 300 s: the node API to listen
"
            ),
            "{text}"
        );
    }

    #[test]
    fn status_is_a_readable_summary() {
        let text = status(&sample());
        let expected = "\
node-1  slot a  basalt 0.1.0  kernel 6.1.0
addresses: 10.0.2.15/24
config:    state
join:      failed  server https://10.0.2.2:6443
  last error: CA hash mismatch
api cert:  expires Nov 23 15:44:59 2027 +00:00  serial 5a3f
pid1 rss:  2048 KiB
milestones:
  init-start     0.500 s
  standby       12.250 s
services:
  k3s  backoff  restarts 3  last exit: exit 1
";
        assert_eq!(text, expected);
    }

    #[test]
    fn sources_passed_over_and_config_warnings_follow_the_source() {
        let mut s = sample();
        s.config_source = Some("cmdline".into());
        s.config_report = ConfigReport {
            rejected: vec![RejectedSource {
                source: "fw_cfg".into(),
                reason: "node.surprise: unknown key".into(),
            }],
            warnings: vec!["not kept for the next boot".into()],
        };
        let text = status(&s);
        assert!(
            text.contains("config:    cmdline\n  passed over fw_cfg: node.surprise: unknown key\n  warning: not kept for the next boot\njoin:"),
            "{text}"
        );
    }

    #[test]
    fn steps_follow_the_milestones_when_the_node_sends_them() {
        let mut s = sample();
        s.steps = vec![basalt_api::node::StepTime {
            name: "k3s-modules".into(),
            at: 3.25,
            took: 0.5,
        }];
        let text = status(&s);
        assert!(
            text.contains("steps:\n  k3s-modules     0.500 s  at 3.250 s\nservices:"),
            "{text}"
        );
    }

    #[test]
    fn empty_parts_say_so() {
        let mut s = sample();
        s.milestones.clear();
        s.services.clear();
        s.addresses.clear();
        s.config_source = None;
        s.rss_kib = None;
        s.join = JoinStatus {
            state: JoinState::Standby,
            server: None,
            last_error: None,
        };
        let text = status(&s);
        assert!(text.contains("addresses: none\nconfig:    none\njoin:      standby\n"));
        assert!(text.contains("milestones:\n  (none)\nservices:\n  (none)\n"));
    }

    #[test]
    fn apply_and_accepted() {
        let a = ApplyResponse {
            applied: true,
            source: "state".into(),
            join: JoinStatus {
                state: JoinState::Joining,
                server: Some("https://s:6443".into()),
                last_error: None,
            },
            message: "joining https://s:6443".into(),
            warnings: vec!["token has no CA pin".into()],
        };
        assert_eq!(
            apply(&a),
            "applied (state): joining https://s:6443\njoin:      joining  server https://s:6443\n\
             warning:   token has no CA pin\n"
        );
        let v = serde_json::json!({"message": "rebooting"});
        assert_eq!(accepted("reboot", &v), "rebooting\n");
        assert_eq!(
            accepted("reboot", &serde_json::json!({})),
            "reboot requested\n"
        );
    }
}
