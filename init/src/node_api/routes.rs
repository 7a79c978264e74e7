//! The endpoints. `GET /v1/health` answers anyone who completed the handshake; every
//! other path needs a client certificate from the pool CA (401 otherwise, before the
//! path is even looked at, so an anonymous client learns nothing of the API), whose
//! serial is not in `[api] revoked` (401), and whose role allows the route (403):
//! [`needs`] says which. Read: status, metrics, logs. Admin: apply, reboot, shutdown,
//! upgrade, rollback.
//! A certificate without a role OID is read-only ([`Access::of_unmarked`]).
//!
//! Apply (`POST /v1/config`, a TOML machine config): invalid → 400 naming the key; an
//! `[api]` that would lock the applying client out, or whose certificate is expired or
//! not for the node's name → 400 naming the key ([`guard`]); the join check failed →
//! 200 with `applied: false` and `join.state: failed` (the client shows the whole answer
//! and exits non-zero); another `[cluster]` while the agent runs registered, or a config
//! without `[cluster]` while an agent is supervised → 409; another `[cluster]` while the
//! agent is not registered replaces the old one (see [`crate::join`]). A token without a
//! CA pin is applied with a warning in the answer.

use super::guard::{self, Client};
use super::http::{Request, Response, PROMETHEUS, TEXT};
use super::{status, Context};
use crate::join::timeline::Timeline;
use crate::join::{Applied, ApplyError};
use crate::pid1::mailbox::Power;
use basalt_api::config::{CertSerial, MachineConfig, Token};
use basalt_api::node::access::Access;
use basalt_api::node::{path, ApplyResponse};
use std::time::{Instant, SystemTime};

/// The role a request needs: `None` for health (anyone), [`Access::Admin`] for the
/// routes that change the node, [`Access::Read`] for everything else (unknown paths
/// included, so that they answer 404 only to pool clients). From the head alone, so a
/// server can refuse before it reads a body.
pub fn needs(_method: &str, path: &str) -> Option<Access> {
    match path {
        path::HEALTH => None,
        path::CONFIG | path::REBOOT | path::SHUTDOWN | path::UPGRADE | path::ROLLBACK => {
            Some(Access::Admin)
        }
        _ => Some(Access::Read),
    }
}

/// Whether `client` may send `method path`: `Err` is the answer to send instead (401
/// without a certificate or with a revoked one, 403 with too small a role).
pub fn authorize(ctx: &Context, method: &str, path: &str, client: &Client) -> Result<(), Response> {
    authorize_with(&ctx.api_state().revoked, method, path, client)
}

/// [`authorize`] against the serials in `revoked`.
pub fn authorize_with(
    revoked: &[CertSerial],
    method: &str,
    path: &str,
    client: &Client,
) -> Result<(), Response> {
    let Some(needed) = needs(method, path) else {
        return Ok(());
    };
    let (Some(facts), Some(access)) = (&client.facts, client.access()) else {
        return Err(Response::error(
            401,
            "a client certificate from the pool CA is required",
        ));
    };
    if revoked.iter().any(|s| s.as_str() == facts.serial) {
        return Err(Response::error(
            401,
            &format!(
                "client certificate serial {} is revoked ([api] revoked)",
                facts.serial
            ),
        ));
    }
    if access < needed {
        let why = if facts.access.is_none() {
            " (it carries no basalt role, as certificates issued before roles; \
             re-issue it with `basalt pki issue client NAME --role admin`)"
        } else {
            ""
        };
        return Err(Response::error(
            403,
            &format!("{method} {path} needs the {needed} role; this certificate has {access}{why}"),
        ));
    }
    Ok(())
}

/// What the connection does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Done(Response),
    /// Answer, close, then ask the main loop to power off or reboot.
    ThenPower(Response, Power),
    /// Stream the service's log as it grows.
    Follow(String),
}

/// Routes one request; `received` is when its head arrived (the join measures from it).
pub fn route(ctx: &Context, req: &Request, client: &Client, received: Instant) -> Reply {
    let p = req.path.as_str();
    if let Err(refused) = authorize(ctx, &req.method, p, client) {
        return Reply::Done(refused);
    }
    match p {
        path::HEALTH => only(req, "GET", || {
            Reply::Done(Response::json(200, &status::health()))
        }),
        path::STATUS => only(req, "GET", || {
            let services = ctx.control.services().unwrap_or_default();
            Reply::Done(Response::json(200, &status::status(ctx, services)))
        }),
        path::METRICS => only(req, "GET", || {
            let services = ctx.control.services().unwrap_or_default();
            Reply::Done(Response::text(
                200,
                PROMETHEUS,
                status::metrics(ctx, &services),
            ))
        }),
        path::CONFIG => only(req, "POST", || {
            Reply::Done(apply(ctx, req, client, received))
        }),
        path::REBOOT => only(req, "POST", || power(Power::Reboot, "rebooting")),
        path::SHUTDOWN => only(req, "POST", || power(Power::PowerOff, "powering off")),
        // A POST is streamed by the server before routing ([`super::upgrade`]).
        path::UPGRADE => only(req, "POST", || {
            Reply::Done(Response::error(500, "upgrade body not streamed"))
        }),
        path::ROLLBACK => only(req, "POST", || super::upgrade::rollback(ctx, req)),
        _ => match p
            .strip_prefix(path::LOGS)
            .and_then(|rest| rest.strip_prefix('/'))
        {
            Some(service) => only(req, "GET", || logs(ctx, req, service)),
            None => Reply::Done(Response::error(404, &format!("no endpoint {p}"))),
        },
    }
}

fn only(req: &Request, method: &str, then: impl FnOnce() -> Reply) -> Reply {
    if req.method == method {
        then()
    } else {
        Reply::Done(Response::error(
            405,
            &format!("{} takes {method}, not {}", req.path, req.method),
        ))
    }
}

fn power(what: Power, message: &str) -> Reply {
    let body = serde_json::json!({ "message": format!("node is {message}") });
    Reply::ThenPower(Response::json(202, &body), what)
}

fn logs(ctx: &Context, req: &Request, service: &str) -> Reply {
    let valid = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
    if service.is_empty() || service.len() > 64 || !service.bytes().all(valid) {
        return Reply::Done(Response::error(400, "invalid service name"));
    }
    match ctx.control.logs(service, None) {
        Ok(None) => Reply::Done(Response::error(404, &format!("no service {service}"))),
        Err(e) => Reply::Done(Response::error(503, &e.to_string())),
        Ok(Some(_)) if req.flag("follow") => Reply::Follow(service.to_owned()),
        Ok(Some(chunk)) => {
            let mut text = String::new();
            for line in chunk.lines {
                text.push_str(&line);
                text.push('\n');
            }
            Reply::Done(Response::text(200, TEXT, text))
        }
    }
}

/// The node's name for its certificate: `[node] hostname`, else the running one.
fn node_name(ctx: &Context, config: &MachineConfig) -> Option<String> {
    if let Some(h) = &config.node.hostname {
        return Some(h.as_str().to_owned());
    }
    let running = std::fs::read_to_string(ctx.root.join("proc/sys/kernel/hostname")).ok()?;
    let running = running.trim();
    (!running.is_empty() && running != "(none)").then(|| running.to_owned())
}

/// What is applied but deserves a word in the answer.
fn warnings(config: &MachineConfig) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = &config.cluster {
        if matches!(c.token, Token::Plain(_)) {
            out.push(
                "cluster.token has no CA pin (the short form, not K10<ca hash>::...): \
                 the K3s server's CA is not checked, so any server at cluster.server is \
                 trusted"
                    .into(),
            );
        }
    }
    out
}

fn apply(ctx: &Context, req: &Request, client: &Client, received: Instant) -> Response {
    let Ok(text) = std::str::from_utf8(&req.body) else {
        return Response::error(400, "the machine config is not UTF-8");
    };
    if text.trim().is_empty() {
        return Response::error(400, "empty body: send a machine config (TOML)");
    }
    let timeline = Timeline::new(received);
    let config = match MachineConfig::parse(text) {
        Ok(c) => c,
        Err(e) => return Response::error(400, &crate::pid1::console::chain(&e)),
    };
    timeline.mark("parsed");
    // Before anything is saved: certificates that cannot serve would lock us out.
    let tls = match ctx.server_config_for(&config.api) {
        Ok(t) => t,
        Err(e) => return Response::error(400, &crate::pid1::console::chain(&e)),
    };
    let name = node_name(ctx, &config);
    if let Err(e) = guard::check_apply(&config.api, name.as_deref(), client, SystemTime::now()) {
        return Response::error(400, &crate::pid1::console::chain(&e));
    }
    timeline.mark("validated");
    let applied = match ctx.joiner.apply_timed(&config, text, &timeline) {
        Ok(a) => a,
        Err(e @ (ApplyError::AlreadyJoined { .. } | ApplyError::AgentSupervised { .. })) => {
            return Response::error(409, &e.to_string())
        }
        Err(e @ ApplyError::Persist(_)) => {
            return Response::error(500, &crate::pid1::console::chain(&e))
        }
    };
    let (ok, message) = match &applied {
        Applied::Standby => (
            true,
            "saved to STATE; no [cluster], so the node stays in standby".into(),
        ),
        Applied::Joined { exec } => (
            true,
            format!(
                "saved to STATE; k3s agent started {} ms after the request",
                exec.as_millis()
            ),
        ),
        Applied::Replaced => (
            true,
            "saved to STATE; the k3s agent had not registered, so it starts again with the \
             new [cluster]"
                .into(),
        ),
        Applied::Unchanged => (
            true,
            "k3s agent is already supervised with this config".into(),
        ),
        Applied::Updated => (
            true,
            "saved to STATE; [cluster] unchanged, so the k3s agent keeps running; new \
             connections use the new [api] certificates"
                .into(),
        ),
        Applied::Refused { error } => (false, format!("nothing saved or started: {error}")),
        Applied::Failed { error } => (
            true,
            format!("saved to STATE, but the join failed: {error}"),
        ),
    };
    if matches!(
        applied,
        Applied::Standby
            | Applied::Joined { .. }
            | Applied::Replaced
            | Applied::Failed { .. }
            | Applied::Updated
    ) {
        // New connections use the new certificates; the listen address, network and
        // hostname take effect at the next boot.
        ctx.set_api(tls, &config.api);
        ctx.set_config_source("state");
    }
    let body = ApplyResponse {
        applied: ok,
        source: ctx.config_source().unwrap_or_else(|| "none".into()),
        join: ctx.joiner.status(),
        message,
        warnings: warnings(&config),
    };
    Response::json(200, &body)
}
