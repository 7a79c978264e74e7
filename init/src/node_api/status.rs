//! What the node reports: status (JSON), health, and metrics (Prometheus text).

use super::Context;
use crate::pid1::console;
use basalt_api::bootparams::BootParams;
use basalt_api::node::{
    ApiCert, Health, JoinState, MilestoneTime, ServiceInfo, Status, StepTime, Versions,
};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;

/// `GET /v1/health`: that the node answers, and how far it got. Nothing secret.
pub fn health() -> Health {
    Health {
        status: "ok".into(),
        milestone: console::milestones()
            .last()
            .map_or_else(|| "none".into(), |(n, _)| n.clone()),
    }
}

/// `GET /v1/status`; `services` from the main loop (empty if it did not answer).
pub fn status(ctx: &Context, services: Vec<ServiceInfo>) -> Status {
    Status {
        milestones: console::milestones()
            .into_iter()
            .map(|(name, t)| MilestoneTime { name, t })
            .collect(),
        steps: console::steps()
            .into_iter()
            .map(|(name, at, took)| StepTime { name, at, took })
            .collect(),
        slot: slot(&ctx.root),
        versions: Versions {
            basalt: env!("CARGO_PKG_VERSION").into(),
            kernel: crate::kmod::modprobe::kernel_release(&ctx.root)
                .unwrap_or_else(|_| "unknown".into()),
        },
        addresses: crate::net::addresses()
            .into_iter()
            .map(|(a, p)| format!("{a}/{p}"))
            .collect(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config_source: ctx.config_source(),
        config_report: ctx.config_report(),
        services,
        join: ctx.joiner.status(),
        rss_kib: rss_kib(&ctx.root),
        api_cert: ctx.api_state().cert.map(|c| ApiCert {
            not_after: c.not_after,
            not_after_text: c.not_after_text,
            serial: c.serial,
        }),
        upgrade: Some(crate::upgrade::status(&ctx.root)),
    }
}

/// The active slot from the kernel command line; `unknown` off a basalt boot.
fn slot(root: &Path) -> String {
    std::fs::read_to_string(root.join("proc/cmdline"))
        .ok()
        .and_then(|c| BootParams::parse(&c).ok())
        .map_or_else(|| "unknown".into(), |p| p.slot.as_str().into())
}

/// PID1's VmRSS.
fn rss_kib(root: &Path) -> Option<u64> {
    status_kib(root, "VmRSS")
}

/// A `kB` field of PID1's `/proc/self/status`.
fn status_kib(root: &Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(root.join("proc/self/status")).ok()?;
    parse_status_kib(&text, field)
}

fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// `GET /v1/metrics`: Prometheus text exposition.
pub fn metrics(ctx: &Context, services: &[ServiceInfo]) -> String {
    let mut out = String::new();
    help(
        &mut out,
        "basalt_milestone_seconds",
        "gauge",
        "Seconds since kernel start when a boot milestone was reached.",
    );
    for (name, t) in console::milestones() {
        let _ = writeln!(
            out,
            "basalt_milestone_seconds{{milestone=\"{}\"}} {t:.3}",
            escape(&name)
        );
    }
    help(
        &mut out,
        "basalt_boot_step_seconds",
        "gauge",
        "Seconds a step of the boot took.",
    );
    for (name, _, took) in console::steps() {
        let _ = writeln!(
            out,
            "basalt_boot_step_seconds{{step=\"{}\"}} {took:.3}",
            escape(&name)
        );
    }
    write_services(&mut out, services);
    write_node(&mut out, ctx);
    help(
        &mut out,
        "basalt_console_dropped_lines_total",
        "counter",
        "Console lines dropped because the console did not keep up (the kernel log has them).",
    );
    let _ = writeln!(
        out,
        "basalt_console_dropped_lines_total {}",
        console::dropped()
    );
    out
}

fn help(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn write_services(out: &mut String, services: &[ServiceInfo]) {
    help(
        out,
        "basalt_service_restarts_total",
        "counter",
        "Restarts of a supervised service since boot.",
    );
    for s in services {
        let _ = writeln!(
            out,
            "basalt_service_restarts_total{{service=\"{}\"}} {}",
            escape(&s.name),
            s.restarts
        );
    }
    help(
        out,
        "basalt_service_up",
        "gauge",
        "1 while a supervised service runs.",
    );
    for s in services {
        let up = u8::from(s.state == "running");
        let _ = writeln!(
            out,
            "basalt_service_up{{service=\"{}\"}} {up}",
            escape(&s.name)
        );
    }
}

fn write_node(out: &mut String, ctx: &Context) {
    write_upgrades(out, ctx);
    help(
        out,
        "basalt_network_up",
        "gauge",
        "1 once the node has its addresses (the first DHCP lease, or static ones).",
    );
    let _ = writeln!(out, "basalt_network_up {}", u8::from(ctx.network.is_up()));
    help(
        out,
        "basalt_join_state",
        "gauge",
        "1 for the node's join state.",
    );
    let now = ctx.joiner.status().state;
    for state in JoinState::ALL {
        let v = u8::from(state == now);
        let _ = writeln!(out, "basalt_join_state{{state=\"{state}\"}} {v}");
    }
    help(
        out,
        "basalt_api_requests_total",
        "counter",
        "Node API requests answered, by HTTP status.",
    );
    let requests = ctx
        .metrics
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (code, n) in requests {
        let _ = writeln!(out, "basalt_api_requests_total{{code=\"{code}\"}} {n}");
    }
    help(
        out,
        "basalt_api_handshake_failures_total",
        "counter",
        "Node API connections refused in the TLS handshake.",
    );
    let _ = writeln!(
        out,
        "basalt_api_handshake_failures_total {}",
        ctx.metrics.handshake_failures.load(Ordering::Relaxed)
    );
    help(
        out,
        "basalt_api_over_capacity_total",
        "counter",
        "Node API connections closed because too many were open.",
    );
    let _ = writeln!(
        out,
        "basalt_api_over_capacity_total {}",
        ctx.metrics.over_capacity.load(Ordering::Relaxed)
    );
    if let Some(cert) = ctx.api_state().cert {
        help(
            out,
            "basalt_api_cert_not_after_seconds",
            "gauge",
            "When the node API's certificate expires, in seconds since the Unix epoch.",
        );
        let _ = writeln!(out, "basalt_api_cert_not_after_seconds {}", cert.not_after);
    }
    if let Some(kib) = rss_kib(&ctx.root) {
        help(
            out,
            "basalt_pid1_rss_bytes",
            "gauge",
            "PID1's resident memory.",
        );
        let _ = writeln!(out, "basalt_pid1_rss_bytes {}", kib * 1024);
    }
    // The share of it that is PID1's own (heap, stacks) and the share that is its
    // binary's pages, which the kernel may drop and read again.
    for (field, name, what) in [
        (
            "RssAnon",
            "basalt_pid1_rss_anon_bytes",
            "PID1's resident anonymous memory (heap, stacks).",
        ),
        (
            "RssFile",
            "basalt_pid1_rss_file_bytes",
            "PID1's resident file pages (its binary's text and data).",
        ),
    ] {
        if let Some(kib) = status_kib(&ctx.root, field) {
            help(out, name, "gauge", what);
            let _ = writeln!(out, "{name} {}", kib * 1024);
        }
    }
}

/// A label value as the exposition format quotes it.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Upgrades and rollbacks, as counted on STATE (so across boots).
fn write_upgrades(out: &mut String, ctx: &Context) {
    let rec = crate::upgrade::record::load(&ctx.root).unwrap_or_default();
    help(
        out,
        "basalt_upgrades_total",
        "counter",
        "A/B upgrades whose new slot was marked good (kept on STATE).",
    );
    let _ = writeln!(out, "basalt_upgrades_total {}", rec.upgrades);
    help(
        out,
        "basalt_rollbacks_total",
        "counter",
        "Rollbacks to the old slot, automatic or requested (kept on STATE).",
    );
    let _ = writeln!(out, "basalt_rollbacks_total {}", rec.rollbacks);
    help(
        out,
        "basalt_upgrades_refused_total",
        "counter",
        "Upgrade bundles refused or failed since this boot.",
    );
    let _ = writeln!(
        out,
        "basalt_upgrades_refused_total {}",
        ctx.metrics
            .upgrades_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[cfg(test)]
mod tests {
    use super::parse_status_kib;

    #[test]
    fn status_fields_are_read_by_their_exact_name() {
        let text = "Name:\tbasalt-init\nVmRSS:\t    5316 kB\nRssAnon:\t    1200 kB\n\
                    RssFile:\t    4116 kB\nRssShmem:\t       0 kB\n";
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(5316));
        assert_eq!(parse_status_kib(text, "RssAnon"), Some(1200));
        assert_eq!(parse_status_kib(text, "RssFile"), Some(4116));
        assert_eq!(
            parse_status_kib(text, "Rss"),
            None,
            "a prefix is not a field"
        );
        assert_eq!(parse_status_kib(text, "VmHWM"), None);
    }
}
