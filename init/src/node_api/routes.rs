//! The endpoints. `GET /v1/health` answers anyone who completed the handshake; every
//! other path needs a client certificate from the pool CA (401 otherwise, before the
//! path is even looked at, so an anonymous client learns nothing of the API).
//!
//! Apply (`POST /v1/config`, a TOML machine config): invalid → 400 naming the key; the
//! join check failed → 200 with `applied: false` and `join.state: failed` (the client
//! shows the whole answer and exits non-zero); a joined node and another config → 409.

use super::http::{Request, Response, PROMETHEUS, TEXT};
use super::{status, tls, Context};
use crate::join::{Applied, ApplyError};
use crate::pid1::mailbox::Power;
use basalt_api::config::MachineConfig;
use basalt_api::node::{path, ApplyResponse};
use std::time::Instant;

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
pub fn route(ctx: &Context, req: &Request, authenticated: bool, received: Instant) -> Reply {
    let p = req.path.as_str();
    if p == path::HEALTH {
        return only(req, "GET", || {
            Reply::Done(Response::json(200, &status::health()))
        });
    }
    if let Err(refusal) = authorize(req, authenticated) {
        return Reply::Done(refusal);
    }
    match p {
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
        path::CONFIG => only(req, "POST", || Reply::Done(apply(ctx, req, received))),
        path::REBOOT => only(req, "POST", || power(Power::Reboot, "rebooting")),
        path::SHUTDOWN => only(req, "POST", || power(Power::PowerOff, "powering off")),
        _ => match p
            .strip_prefix(path::LOGS)
            .and_then(|rest| rest.strip_prefix('/'))
        {
            Some(service) => only(req, "GET", || logs(ctx, req, service)),
            None => Reply::Done(Response::error(404, &format!("no endpoint {p}"))),
        },
    }
}

/// Whether the client may make this request, decided on the request head alone: the
/// connection answers a refusal before it reads any of the body. [`route`] asks too.
pub fn authorize(req: &Request, authenticated: bool) -> Result<(), Response> {
    if authenticated || req.path == path::HEALTH {
        return Ok(());
    }
    Err(Response::error(
        401,
        "a client certificate from the pool CA is required",
    ))
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

fn apply(ctx: &Context, req: &Request, received: Instant) -> Response {
    let Ok(text) = std::str::from_utf8(&req.body) else {
        return Response::error(400, "the machine config is not UTF-8");
    };
    if text.trim().is_empty() {
        return Response::error(400, "empty body: send a machine config (TOML)");
    }
    let config = match MachineConfig::parse(text) {
        Ok(c) => c,
        Err(e) => return Response::error(400, &crate::pid1::console::chain(&e)),
    };
    // Before anything is saved: certificates that cannot serve would lock us out.
    let tls = match tls::server_config(&config.api) {
        Ok(t) => t,
        Err(e) => return Response::error(400, &crate::pid1::console::chain(&e)),
    };
    let applied = match ctx.joiner.apply(&config, text, received) {
        Ok(a) => a,
        Err(e @ ApplyError::AlreadyJoined { .. }) => return Response::error(409, &e.to_string()),
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
        Applied::Unchanged => (
            true,
            "k3s agent is already supervised with this config".into(),
        ),
        Applied::Refused { error } => (false, format!("nothing saved or started: {error}")),
        Applied::Failed { error } => (
            true,
            format!("saved to STATE, but the join failed: {error}"),
        ),
    };
    if matches!(
        applied,
        Applied::Standby | Applied::Joined { .. } | Applied::Failed { .. }
    ) {
        // New connections use the new certificates; the listen address, network and
        // hostname take effect at the next boot.
        ctx.set_tls(tls);
        ctx.set_config_source("state");
    }
    let body = ApplyResponse {
        applied: ok,
        source: ctx.config_source().unwrap_or_else(|| "none".into()),
        join: ctx.joiner.status(),
        message,
    };
    Response::json(200, &body)
}
