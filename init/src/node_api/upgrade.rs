//! `POST /v1/upgrade` and `POST /v1/rollback`: the HTTP side of [`crate::upgrade`].
//!
//! Upgrade: the body is the bundle (a tar, `Content-Length` required), streamed into the
//! inactive slot as it arrives, never held. Or the body is empty and the query has
//! `url=<percent-encoded URL>`: the node fetches the bundle from there
//! ([`crate::upgrade::fetch`]) and reads it exactly as a body; a server that cannot be
//! reached or does not answer 200 with the bundle is a 502. The query carries `sha256=<hex>`, the
//! sha256 of the whole bundle (required: a bundle whose bytes hash otherwise is refused
//! after it arrived, before anything is switched), and optionally `allow_downgrade=1`
//! and `reboot=1`. Answers: 200 with [`UpgradeResponse`]; 400 for a bundle that is
//! refused (another layout, an older version, a bad hash, a truncated body, a slot that
//! fails its verity check), naming why; 409 while an upgrade is pending or running; 500
//! when the node cannot write. Whatever the answer, the body is read to its end first,
//! so the client reads the answer rather than a reset.

use super::http::{self, Head, Response};
use super::routes::Reply;
use super::Context;
use crate::pid1::console;
use crate::pid1::mailbox::Power;
use crate::upgrade::install::Options;
use crate::upgrade::Source;
use basalt_api::node::{RollbackResponse, UpgradeResponse};
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;

/// Streams the bundle of an authorized `POST /v1/upgrade` from `stream`.
pub fn receive<S: Read + Write>(ctx: &Context, head: Head, stream: &mut S) -> Reply {
    let length = head.length as u64;
    let (req, mut body) = match http::body_reader(stream, head) {
        Ok(b) => b,
        Err(e) => {
            return Reply::Done(
                e.response()
                    .unwrap_or_else(|| Response::error(400, &e.to_string())),
            )
        }
    };
    let answer = |resp: Response, body: &mut dyn Read| {
        // The rest of the body, so that the client gets to read the answer.
        let _ = io::copy(body, &mut io::sink());
        if resp.status >= 400 {
            ctx.metrics.upgrades_refused.fetch_add(1, Ordering::Relaxed);
        }
        resp
    };
    let url = req.param("url");
    if url.is_some() && length != 0 {
        let resp = Response::error(400, "send either the bundle as the body or url=, not both");
        return Reply::Done(answer(resp, &mut body));
    }
    if url.is_none() && length == 0 {
        let resp = Response::error(
            400,
            "send the upgrade bundle as the body, with Content-Length \
             (basalt node upgrade BUNDLE), or its URL as url= (basalt node upgrade URL)",
        );
        return Reply::Done(answer(resp, &mut body));
    }
    let Some(sha256) = req.param("sha256") else {
        let resp = Response::error(
            400,
            "the query needs sha256=<the bundle's sha256>: the node checks the whole bundle \
             against it before it switches",
        );
        return Reply::Done(answer(resp, &mut body));
    };
    let opts = Options {
        sha256: sha256.to_owned(),
        allow_downgrade: req.flag("allow_downgrade"),
    };
    let reboot = req.flag("reboot");
    let source = match &url {
        Some(u) => Source::Url(u),
        None => Source::Body {
            body: &mut body,
            length,
        },
    };
    let done = crate::upgrade::upgrade(&ctx.root, source, &opts);
    match done {
        Ok(done) => {
            let slot = done.slot.as_str();
            let message = if reboot {
                format!("version {} is in slot {slot}, verified; rebooting into it once: it becomes the default when it is healthy", done.version)
            } else {
                format!("version {} is in slot {slot}, verified, and armed for the next boot (once: it becomes the default when it is healthy)", done.version)
            };
            let resp = Response::json(
                200,
                &UpgradeResponse {
                    slot: slot.to_owned(),
                    version: done.version,
                    root_hash: done.root_hash,
                    rebooting: reboot,
                    message,
                },
            );
            let resp = answer(resp, &mut body);
            if reboot {
                Reply::ThenPower(resp, Power::Reboot)
            } else {
                Reply::Done(resp)
            }
        }
        Err(e) => Reply::Done(answer(
            Response::error(e.status(), &console::chain(&e)),
            &mut body,
        )),
    }
}

/// `POST /v1/rollback[?reboot=1]`. On a trial boot it gives the trial up (see
/// [`crate::upgrade::rollback_on`]): without `reboot=1` the node runs on, never marked
/// good, and its next boot is the old slot's.
pub fn rollback(ctx: &Context, req: &http::Request) -> Reply {
    let reboot = req.flag("reboot");
    match crate::upgrade::rollback(&ctx.root) {
        Ok(done) => {
            let slot = done.slot.as_str();
            let message = match (done.ended_trial, reboot) {
                (true, true) => {
                    format!("the trial is given up (never marked good); rebooting into slot {slot}")
                }
                (true, false) => format!(
                    "the trial is given up (never marked good); slot {slot}, still GRUB's \
                     default, boots next (reboot to go there now)"
                ),
                (false, true) => format!("slot {slot} is the default again; rebooting into it"),
                (false, false) => {
                    format!("slot {slot} is the default again from the next boot")
                }
            };
            let resp = Response::json(
                200,
                &RollbackResponse {
                    slot: slot.to_owned(),
                    rebooting: reboot,
                    message,
                },
            );
            if reboot {
                Reply::ThenPower(resp, Power::Reboot)
            } else {
                Reply::Done(resp)
            }
        }
        Err(e) => Reply::Done(Response::error(e.status(), &console::chain(&e))),
    }
}
