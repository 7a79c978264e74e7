//! The fake's HTTP side: routing, the JSON of each resource, faults, rate-limit headers.

use super::selector::Selector;
use super::{rescue, BootInfo, FAction, FImage, FServer, Fault, Inner, Op, State};
use crate::api::{Action, ActionResource, ErrorDetail, SshKey};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const RATE_LIMIT: u64 = 3600;
/// Servers' addresses, 127.77.x.y.
static NEXT_IP: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// Hetzner's system images a server can be created from.
const SYSTEM_IMAGES: &[(u64, &str)] = &[(1, "debian-12"), (2, "ubuntu-24.04")];

/// The connection is closed without an answer.
#[derive(Debug)]
pub(crate) struct Lost;

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answer dropped on purpose (fault injection)")
    }
}

impl std::error::Error for Lost {}

pub(crate) struct Reply {
    status: StatusCode,
    body: Option<Value>,
    /// A raw body that is not JSON (a proxy's page).
    raw: Option<&'static str>,
    reset_in: Option<u64>,
}

impl Reply {
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} {}",
            self.status,
            self.body.as_ref().map(Value::to_string).unwrap_or_default()
        )
    }
}

fn ok(status: u16, body: Value) -> Reply {
    Reply {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        body: Some(body),
        raw: None,
        reset_in: None,
    }
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    ok(
        status,
        json!({"error": {"code": code, "message": message, "details": {}}}),
    )
}

fn not_found(what: &str) -> Reply {
    error(404, "not_found", &format!("{what} not found"))
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            () = inner.stop.cancelled() => return,
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move { handle(&inner, req).await }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

async fn handle(
    inner: &Arc<Inner>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Lost> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", inner.opts.token));
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = uri.path().to_owned();
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), decode(v)))
                .collect()
        })
        .unwrap_or_default();
    let calls = {
        let mut st = inner.lock();
        st.requests.push(format!("{method} {uri}"));
        st.calls += 1;
        st.calls
    };
    let reply = if !authorized {
        error(401, "unauthorized", "unable to authenticate")
    } else {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return Ok(respond(error(400, "json_error", &e.to_string()), calls)),
            }
        };
        route(inner, &method, &segs, &query, &body).await?
    };
    Ok(respond(reply, calls))
}

fn respond(reply: Reply, calls: u64) -> Response<Full<Bytes>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (remaining, reset) = match reply.reset_in {
        Some(r) => (0, now + r),
        None => {
            let used = calls.min(RATE_LIMIT - 1);
            (RATE_LIMIT - used, now + used)
        }
    };
    let (ctype, body) = match (reply.raw, reply.body) {
        (Some(raw), _) => ("text/html", Bytes::from_static(raw.as_bytes())),
        (None, Some(v)) => ("application/json", Bytes::from(v.to_string())),
        (None, None) => ("application/json", Bytes::new()),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = reply.status;
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        hyper::header::HeaderValue::from_static(ctype),
    );
    for (k, v) in [
        ("RateLimit-Limit", RATE_LIMIT),
        ("RateLimit-Remaining", remaining),
        ("RateLimit-Reset", reset),
    ] {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&v.to_string()) {
            h.insert(k, v);
        }
    }
    resp
}

fn op_of(method: &Method, segs: &[&str]) -> Op {
    match (method.as_str(), segs) {
        ("GET", ["v1", "servers"]) => Op::ListServers,
        ("POST", ["v1", "servers"]) => Op::CreateServer,
        ("GET", ["v1", "servers", _]) => Op::GetServer,
        ("DELETE", ["v1", "servers", _]) => Op::DeleteServer,
        ("POST", ["v1", "servers", _, "actions", "enable_rescue"]) => Op::EnableRescue,
        ("POST", ["v1", "servers", _, "actions", "poweron"]) => Op::PowerOn,
        ("POST", ["v1", "servers", _, "actions", "poweroff"]) => Op::PowerOff,
        ("POST", ["v1", "servers", _, "actions", "shutdown"]) => Op::Shutdown,
        ("POST", ["v1", "servers", _, "actions", "create_image"]) => Op::CreateImage,
        ("GET", ["v1", "actions", _]) => Op::GetAction,
        ("GET", ["v1", "images"]) => Op::ListImages,
        ("GET", ["v1", "images", _]) => Op::GetImage,
        ("DELETE", ["v1", "images", _]) => Op::DeleteImage,
        ("GET", ["v1", "ssh_keys"]) => Op::ListSshKeys,
        ("POST", ["v1", "ssh_keys"]) => Op::CreateSshKey,
        ("DELETE", ["v1", "ssh_keys", _]) => Op::DeleteSshKey,
        ("PUT", ["v1", "servers", _]) => Op::UpdateServer,
        ("POST", ["v1", "servers", _, "actions", "attach_to_network"]) => Op::AttachToNetwork,
        ("GET", ["v1", "networks"]) => Op::ListNetworks,
        ("PUT", ["v1", "ssh_keys", _]) => Op::UpdateSshKey,
        _ => Op::Any,
    }
}

/// Takes the first fault put on `op` (or on any call), one of its `times`.
fn take_fault(st: &mut State, op: Op) -> Option<Fault> {
    let i = st
        .faults
        .iter()
        .position(|(o, _, n)| *n > 0 && (*o == op || *o == Op::Any))?;
    st.faults[i].2 -= 1;
    let fault = st.faults[i].1.clone();
    if st.faults[i].2 == 0 {
        st.faults.remove(i);
    }
    Some(fault)
}

async fn route(
    inner: &Arc<Inner>,
    method: &Method,
    segs: &[&str],
    query: &BTreeMap<String, String>,
    body: &Value,
) -> Result<Reply, Lost> {
    let op = op_of(method, segs);
    let fault = take_fault(&mut inner.lock(), op);
    let mut fail_action = None;
    let mut lose = false;
    match fault {
        Some(Fault::RateLimited { reset_in }) => {
            let mut r = error(
                429,
                "rate_limit_exceeded",
                "limit of 3600 requests per hour reached",
            );
            r.reset_in = Some(reset_in);
            return Ok(r);
        }
        Some(Fault::Status(s)) => {
            return Ok(Reply {
                status: StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY),
                body: None,
                raw: Some("<html><body><h1>502 Bad Gateway</h1></body></html>"),
                reset_in: None,
            })
        }
        Some(Fault::Code(s, code)) => return Ok(error(s, code, &format!("injected {code}"))),
        Some(Fault::LostAnswer) => lose = true,
        Some(Fault::FailAction(code)) => fail_action = Some(code),
        None => {}
    }
    let id = |i: usize| segs.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let reply = match op {
        Op::ListServers => list_servers(inner, query),
        Op::CreateServer => create_server(inner, body, fail_action).await,
        Op::GetServer => get_server(inner, id(2)),
        Op::DeleteServer => delete_server(inner, id(2)).await,
        Op::EnableRescue | Op::PowerOn | Op::PowerOff | Op::Shutdown => {
            server_action(inner, id(2), op, body, fail_action).await
        }
        Op::CreateImage => create_image(inner, id(2), body, fail_action).await,
        Op::GetAction => get_action(inner, id(2)),
        Op::ListImages => list_images(inner, query),
        Op::GetImage => get_image(inner, id(2)),
        Op::DeleteImage => delete_image(inner, id(2)),
        Op::ListSshKeys => list_keys(inner, query),
        Op::CreateSshKey => create_key(inner, body),
        Op::DeleteSshKey => delete_key(inner, id(2)),
        Op::UpdateServer => update_server(inner, id(2), body),
        Op::AttachToNetwork => attach_to_network(inner, id(2), body, fail_action),
        Op::ListNetworks => list_networks(inner, query),
        Op::UpdateSshKey => update_key(inner, id(2), body),
        Op::Any => error(
            404,
            "not_found",
            &format!("no route {method} /{}", segs.join("/")),
        ),
    };
    if lose {
        return Err(Lost);
    }
    Ok(reply)
}

fn now() -> String {
    crate::ops::rfc3339(SystemTime::now())
}

/// A page of `items` and its `meta.pagination`, as `?page=&per_page=` ask.
fn page(key: &str, items: Vec<Value>, query: &BTreeMap<String, String>) -> Reply {
    let per_page = query
        .get("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(25)
        .clamp(1, 50);
    let page = query
        .get("page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let total = items.len();
    let last = total.div_ceil(per_page).max(1);
    let items: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    ok(
        200,
        json!({
            key: items,
            "meta": {"pagination": {
                "page": page, "per_page": per_page,
                "previous_page": if page > 1 { Some(page - 1) } else { None },
                "next_page": if page < last { Some(page + 1) } else { None },
                "last_page": last, "total_entries": total,
            }}
        }),
    )
}

/// Applies `label_selector`; an invalid one is the API's `invalid_input`.
fn select<'a, T>(
    query: &BTreeMap<String, String>,
    items: impl Iterator<Item = &'a T>,
    labels: impl Fn(&T) -> &BTreeMap<String, String>,
) -> Result<Vec<&'a T>, Reply>
where
    T: 'a,
{
    let sel = match query.get("label_selector") {
        Some(s) => Some(Selector::parse(s).map_err(|m| error(400, "invalid_input", &m))?),
        None => None,
    };
    Ok(items
        .filter(|i| sel.as_ref().is_none_or(|s| s.matches(labels(i))))
        .collect())
}

fn new_action(
    st: &mut State,
    inner: &Inner,
    command: &str,
    resources: &[(u64, &str)],
    fail: Option<&str>,
) -> Action {
    let id = st.id();
    let action = Action {
        id,
        command: command.into(),
        status: "running".into(),
        progress: 0,
        started: now(),
        finished: None,
        resources: resources
            .iter()
            .map(|(id, kind)| ActionResource {
                id: *id,
                kind: (*kind).into(),
            })
            .collect(),
        error: None,
    };
    st.actions.insert(
        id,
        FAction {
            action: action.clone(),
            done_at: Instant::now() + inner.opts.action_time,
            error: fail.map(|code| ErrorDetail {
                code: code.into(),
                message: format!("injected: {command} failed"),
            }),
        },
    );
    action
}

fn action_json(a: &FAction) -> Value {
    let mut action = a.action.clone();
    if Instant::now() >= a.done_at {
        action.progress = 100;
        action.finished = Some(now());
        match &a.error {
            Some(e) => {
                action.status = "error".into();
                action.error = Some(e.clone());
            }
            None => action.status = "success".into(),
        }
    }
    serde_json::to_value(action).unwrap_or(Value::Null)
}

fn get_action(inner: &Inner, id: u64) -> Reply {
    match inner.lock().actions.get(&id) {
        Some(a) => ok(200, json!({ "action": action_json(a) })),
        None => not_found("action"),
    }
}

fn server_json(s: &FServer) -> Value {
    json!({
        "id": s.id, "name": s.name, "status": s.status, "created": s.created,
        "public_net": {
            "ipv4": {"id": s.id, "ip": s.ip.to_string(), "blocked": false, "dns_ptr": format!("static.{}.fake", s.id)},
            "ipv6": null, "floating_ips": [], "firewalls": []
        },
        "private_net": s.private_net.iter().map(|(n, ip)| json!({"network": n, "ip": ip.to_string(), "alias_ips": [], "mac_address": "86:00:00:00:00:01"})).collect::<Vec<_>>(),
        "server_type": {"id": 1, "name": s.server_type, "cores": 2, "memory": 4.0, "disk": 40, "architecture": "x86"},
        "datacenter": {"id": 1, "name": format!("{}-dc14", s.location), "location": {"id": 1, "name": s.location}},
        "image": s.image.map(|id| json!({"id": id})),
        "iso": null, "rescue_enabled": s.rescue_enabled, "locked": false,
        "backup_window": null, "outgoing_traffic": 0, "ingoing_traffic": 0, "included_traffic": 0,
        "protection": {"delete": false, "rebuild": false},
        "labels": s.labels, "volumes": [], "load_balancers": [], "primary_disk_size": 40,
        "placement_group": null,
    })
}

fn list_servers(inner: &Inner, query: &BTreeMap<String, String>) -> Reply {
    let st = inner.lock();
    let named = st
        .servers
        .values()
        .filter(|s| query.get("name").is_none_or(|n| *n == s.name));
    match select(query, named, |s| &s.labels) {
        Ok(list) => page(
            "servers",
            list.into_iter().map(server_json).collect(),
            query,
        ),
        Err(r) => r,
    }
}

fn get_server(inner: &Inner, id: u64) -> Reply {
    match inner.lock().servers.get(&id) {
        Some(s) => ok(200, json!({ "server": server_json(s) })),
        None => not_found("server"),
    }
}

fn labels_of(body: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(body.get("labels").cloned().unwrap_or(Value::Null)).unwrap_or_default()
}

async fn create_server(inner: &Arc<Inner>, body: &Value, fail: Option<&str>) -> Reply {
    let (Some(name), Some(image), Some(_)) = (
        body.get("name").and_then(Value::as_str),
        body.get("image").and_then(Value::as_str),
        body.get("server_type").and_then(Value::as_str),
    ) else {
        return error(
            400,
            "invalid_input",
            "name, server_type and image are required",
        );
    };
    let user_data = body
        .get("user_data")
        .and_then(Value::as_str)
        .map(str::to_owned);
    match create_server_direct(inner, name, image, user_data, labels_of(body)).await {
        Err(r) => r,
        Ok(id) => {
            let mut st = inner.lock();
            let Some(s) = st.servers.get_mut(&id) else {
                return not_found("server");
            };
            if let Some(t) = body.get("server_type").and_then(Value::as_str) {
                s.server_type = t.to_owned();
            }
            if let Some(l) = body.get("location").and_then(Value::as_str) {
                s.location = l.to_owned();
            }
            if body.get("start_after_create").and_then(Value::as_bool) == Some(true) {
                s.status = "running".into();
            }
            let server = server_json(s);
            let action = new_action(&mut st, inner, "create_server", &[(id, "server")], fail);
            ok(
                201,
                json!({"server": server, "action": action, "next_actions": [], "root_password": null}),
            )
        }
    }
}

/// Makes a server and its disk: a copy of a snapshot, or for a system image a sparse
/// file with a marker where an OS would be.
// Over 80 lines: the checks under the lock, the disk file and the metadata service
// outside it, then the insert, in that order so the lock is never held across an await.
pub(crate) async fn create_server_direct(
    inner: &Arc<Inner>,
    name: &str,
    image: &str,
    user_data: Option<String>,
    labels: BTreeMap<String, String>,
) -> Result<u64, Reply> {
    let (id, ip, from) = {
        let mut st = inner.lock();
        if st.servers.values().any(|s| s.name == name) {
            return Err(error(
                409,
                "uniqueness_error",
                "server name is already used",
            ));
        }
        let from = match image.parse::<u64>() {
            Ok(i) => match st.images.get(&i) {
                Some(img) if img.status == "available" => (i, img.file.clone()),
                _ => {
                    return Err(error(
                        400,
                        "invalid_input",
                        &format!("image {image} not found"),
                    ))
                }
            },
            Err(_) => match SYSTEM_IMAGES.iter().find(|(_, n)| *n == image) {
                Some((i, _)) => (*i, None),
                None => {
                    return Err(error(
                        400,
                        "invalid_input",
                        &format!("image {image} not found"),
                    ))
                }
            },
        };
        // Unique across every fake in this process: two fakes may pick the same SSH port.
        let n = NEXT_IP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ip = Ipv4Addr::new(127, 77, ((n / 250) % 250) as u8, (n % 250 + 2) as u8);
        (st.id(), ip, from)
    };
    let disk = inner.dir.join("disks").join(format!("{id}.img"));
    let made = match &from.1 {
        Some(snapshot) => sparse_copy(snapshot, &disk).await,
        None => std::fs::File::create(&disk).and_then(|f| {
            use std::io::Write;
            let mut f = f;
            f.write_all(format!("fake system image {image}\n").as_bytes())
        }),
    }
    .and_then(|()| {
        let f = std::fs::OpenOptions::new().write(true).open(&disk)?;
        if f.metadata()?.len() < inner.opts.disk_bytes {
            f.set_len(inner.opts.disk_bytes)?;
        }
        Ok(())
    });
    if let Err(e) = made {
        return Err(error(500, "server_error", &format!("fake: disk: {e}")));
    }
    let (metadata, metadata_stop) = super::metadata::start(inner.clone(), id)
        .await
        .map_err(|e| error(500, "server_error", &format!("fake: metadata: {e}")))?;
    let mut st = inner.lock();
    st.servers.insert(
        id,
        FServer {
            id,
            name: name.into(),
            status: "off".into(),
            created: now(),
            labels,
            server_type: "cx22".into(),
            location: "fsn1".into(),
            image: Some(from.0),
            ip,
            disk,
            rescue_enabled: false,
            rescue_key: None,
            rescue: None,
            user_data,
            metadata,
            metadata_stop,
            private_net: Vec::new(),
        },
    );
    Ok(id)
}

async fn delete_server(inner: &Arc<Inner>, id: u64) -> Reply {
    let removed = inner.lock().servers.remove(&id);
    let Some(mut s) = removed else {
        return not_found("server");
    };
    s.metadata_stop.cancel();
    if let Some(r) = s.rescue.take() {
        r.stop().await;
    }
    let _ = std::fs::remove_file(&s.disk);
    let mut st = inner.lock();
    let action = new_action(&mut st, inner, "delete_server", &[(id, "server")], None);
    ok(200, json!({ "action": action }))
}

async fn server_action(
    inner: &Arc<Inner>,
    id: u64,
    op: Op,
    body: &Value,
    fail: Option<&str>,
) -> Reply {
    let command = match op {
        Op::EnableRescue => "enable_rescue",
        Op::PowerOn => "start_server",
        Op::PowerOff => "stop_server",
        _ => "shutdown_server",
    };
    let mut extra = json!({});
    let r = match op {
        Op::EnableRescue => enable_rescue(inner, id, body, &mut extra),
        Op::PowerOn if fail.is_none() => power_on(inner, id).await,
        Op::PowerOn => Ok(()),
        _ => power_off(inner, id).await,
    };
    if let Err(reply) = r {
        return reply;
    }
    let mut st = inner.lock();
    let action = new_action(&mut st, inner, command, &[(id, "server")], fail);
    extra["action"] = serde_json::to_value(action).unwrap_or(Value::Null);
    ok(201, extra)
}

fn enable_rescue(inner: &Inner, id: u64, body: &Value, extra: &mut Value) -> Result<(), Reply> {
    let mut st = inner.lock();
    let keys: Vec<u64> = body
        .get("ssh_keys")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    if body
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("linux64")
        != "linux64"
    {
        return Err(error(400, "invalid_input", "rescue type must be linux64"));
    }
    let mut authorized = Vec::new();
    for k in &keys {
        match st.keys.get(k) {
            Some(key) => authorized.push(key.public_key.clone()),
            None => {
                return Err(error(
                    400,
                    "invalid_input",
                    &format!("ssh key {k} not found"),
                ))
            }
        }
    }
    let Some(s) = st.servers.get_mut(&id) else {
        return Err(not_found("server"));
    };
    s.rescue_enabled = true;
    s.rescue_key = Some(authorized.join("\n"));
    extra["root_password"] = json!("fake-root-password");
    Ok(())
}

async fn power_on(inner: &Arc<Inner>, id: u64) -> Result<(), Reply> {
    let (rescue_key, disk, ip, name, metadata, user_data, faults, hook) = {
        let st = inner.lock();
        let Some(s) = st.servers.get(&id) else {
            return Err(not_found("server"));
        };
        if s.status == "running" {
            return Ok(());
        }
        let key = s
            .rescue_enabled
            .then(|| s.rescue_key.clone().unwrap_or_default());
        (
            key,
            s.disk.clone(),
            s.ip,
            s.name.clone(),
            s.metadata,
            s.user_data.clone(),
            st.rescue_faults.clone(),
            st.boot_hook.clone(),
        )
    };
    match rescue_key {
        Some(key) => {
            let work = inner.dir.join("rescue").join(id.to_string());
            let public = SocketAddr::new(ip.into(), inner.ssh_port);
            let r = rescue::Rescue::start(&inner.host, &work, &disk, &key, public, &faults)
                .await
                .map_err(|e| error(500, "server_error", &format!("fake rescue: {e}")))?;
            let mut st = inner.lock();
            match st.servers.get_mut(&id) {
                Some(s) => {
                    s.rescue = Some(r);
                    s.status = "running".into();
                }
                None => drop(r),
            }
        }
        None => {
            if let Some(s) = inner.lock().servers.get_mut(&id) {
                s.status = "running".into();
            }
            if let Some(hook) = hook {
                hook(BootInfo {
                    server: id,
                    name,
                    disk,
                    metadata,
                    user_data,
                });
            }
        }
    }
    Ok(())
}

async fn power_off(inner: &Arc<Inner>, id: u64) -> Result<(), Reply> {
    let r = {
        let mut st = inner.lock();
        let Some(s) = st.servers.get_mut(&id) else {
            return Err(not_found("server"));
        };
        s.status = "off".into();
        // Rescue is for one boot.
        s.rescue_enabled = false;
        s.rescue.take()
    };
    if let Some(r) = r {
        r.stop().await;
    }
    Ok(())
}

async fn create_image(inner: &Arc<Inner>, id: u64, body: &Value, fail: Option<&str>) -> Reply {
    let (disk, name, image_id, disk_bytes) = {
        let mut st = inner.lock();
        let Some(s) = st.servers.get(&id) else {
            return not_found("server");
        };
        let (disk, name) = (s.disk.clone(), s.name.clone());
        (disk, name, st.id(), inner.opts.disk_bytes)
    };
    let kind = body
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("snapshot");
    if kind != "snapshot" {
        return error(400, "invalid_input", "only snapshots are faked");
    }
    let file = inner.dir.join("snapshots").join(format!("{image_id}.img"));
    let copied = if fail.is_none() {
        sparse_copy(&disk, &file).await
    } else {
        Ok(())
    };
    if let Err(e) = copied {
        return error(500, "server_error", &format!("fake: snapshot: {e}"));
    }
    let mut st = inner.lock();
    let image = FImage {
        id: image_id,
        kind: "snapshot",
        name: None,
        status: "available".into(),
        description: body
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        created: now(),
        labels: labels_of(body),
        file: Some(file),
        disk_bytes,
        from_server: Some((id, name)),
    };
    let json = image_json(&image);
    // A failed snapshot leaves no image behind, as Hetzner's.
    if fail.is_none() {
        st.images.insert(image_id, image);
    }
    let action = new_action(
        &mut st,
        inner,
        "create_image",
        &[(id, "server"), (image_id, "image")],
        fail,
    );
    ok(201, json!({ "image": json, "action": action }))
}

fn image_json(i: &FImage) -> Value {
    use std::os::unix::fs::MetadataExt;
    let allocated = i
        .file
        .as_ref()
        .and_then(|f| std::fs::metadata(f).ok())
        .map(|m| m.blocks() * 512);
    json!({
        "id": i.id, "type": i.kind, "status": i.status, "name": i.name,
        "description": i.description,
        "image_size": allocated.map(|b| b as f64 / 1e9),
        "disk_size": (i.disk_bytes as f64 / 1e9).ceil(),
        "created": i.created,
        "created_from": i.from_server.as_ref().map(|(id, n)| json!({"id": id, "name": n})),
        "bound_to": null, "os_flavor": "debian", "os_version": null, "rapid_deploy": false,
        "protection": {"delete": false}, "deprecated": null, "deleted": null,
        "labels": i.labels, "architecture": "x86",
    })
}

fn system_images() -> Vec<FImage> {
    SYSTEM_IMAGES
        .iter()
        .map(|(id, name)| FImage {
            id: *id,
            kind: "system",
            name: Some((*name).to_owned()),
            status: "available".into(),
            description: (*name).to_owned(),
            created: "2023-06-13T00:00:00+00:00".into(),
            labels: BTreeMap::new(),
            file: None,
            disk_bytes: 5_000_000_000,
            from_server: None,
        })
        .collect()
}

fn list_images(inner: &Inner, query: &BTreeMap<String, String>) -> Reply {
    let st = inner.lock();
    let system = system_images();
    let all = st.images.values().chain(system.iter());
    let typed = all.filter(|i| query.get("type").is_none_or(|t| t == i.kind));
    let mut list = match select(query, typed, |i| &i.labels) {
        Ok(l) => l,
        Err(r) => return r,
    };
    match query.get("sort").map(String::as_str) {
        Some("created:desc") => list.sort_by(|a, b| (&b.created, b.id).cmp(&(&a.created, a.id))),
        Some("created:asc" | "created") => {
            list.sort_by(|a, b| (&a.created, a.id).cmp(&(&b.created, b.id)))
        }
        _ => list.sort_by_key(|i| i.id),
    }
    page("images", list.into_iter().map(image_json).collect(), query)
}

fn get_image(inner: &Inner, id: u64) -> Reply {
    match inner.lock().images.get(&id) {
        Some(i) => ok(200, json!({ "image": image_json(i) })),
        None => not_found("image"),
    }
}

fn delete_image(inner: &Inner, id: u64) -> Reply {
    let removed = inner.lock().images.remove(&id);
    match removed {
        Some(i) => {
            if let Some(f) = i.file {
                let _ = std::fs::remove_file(f);
            }
            Reply {
                status: StatusCode::NO_CONTENT,
                body: None,
                raw: None,
                reset_in: None,
            }
        }
        None => not_found("image"),
    }
}

fn list_keys(inner: &Inner, query: &BTreeMap<String, String>) -> Reply {
    let st = inner.lock();
    let named = st
        .keys
        .values()
        .filter(|k| query.get("name").is_none_or(|n| *n == k.name));
    match select(query, named, |k: &SshKey| &k.labels) {
        Ok(list) => page(
            "ssh_keys",
            list.into_iter()
                .map(|k| serde_json::to_value(k).unwrap_or(Value::Null))
                .collect(),
            query,
        ),
        Err(r) => r,
    }
}

fn create_key(inner: &Inner, body: &Value) -> Reply {
    let (Some(name), Some(public_key)) = (
        body.get("name").and_then(Value::as_str),
        body.get("public_key").and_then(Value::as_str),
    ) else {
        return error(400, "invalid_input", "name and public_key are required");
    };
    let mut st = inner.lock();
    if st
        .keys
        .values()
        .any(|k| k.name == name || k.public_key == public_key)
    {
        return error(
            409,
            "uniqueness_error",
            "SSH key with the same name or fingerprint already exists",
        );
    }
    let id = st.id();
    let key = SshKey {
        id,
        name: name.into(),
        fingerprint: format!("fake:{id}"),
        public_key: public_key.into(),
        created: now(),
        labels: labels_of(body),
    };
    st.keys.insert(id, key.clone());
    ok(201, json!({ "ssh_key": key }))
}

fn delete_key(inner: &Inner, id: u64) -> Reply {
    match inner.lock().keys.remove(&id) {
        Some(_) => Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            raw: None,
            reset_in: None,
        },
        None => not_found("ssh_key"),
    }
}

/// Labels as the API takes them: a JSON object of strings, replacing all.
fn new_labels(body: &Value) -> Result<BTreeMap<String, String>, Reply> {
    match body.get("labels") {
        None => Err(error(400, "invalid_input", "labels are required")),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| error(400, "invalid_input", &format!("labels: {e}"))),
    }
}

fn update_server(inner: &Inner, id: u64, body: &Value) -> Reply {
    let labels = match new_labels(body) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let mut st = inner.lock();
    let Some(s) = st.servers.get_mut(&id) else {
        return not_found("server");
    };
    s.labels = labels;
    if let Some(name) = body.get("name").and_then(Value::as_str) {
        s.name = name.to_owned();
    }
    ok(200, json!({ "server": server_json(s) }))
}

fn attach_to_network(inner: &Inner, id: u64, body: &Value, fail: Option<&str>) -> Reply {
    let Some(net) = body.get("network").and_then(Value::as_u64) else {
        return error(400, "invalid_input", "network (an id) is required");
    };
    let mut st = inner.lock();
    let Some(n) = st.networks.get_mut(&net) else {
        return error(404, "not_found", "network not found");
    };
    let octets: Vec<u8> = n
        .ip_range
        .split(['.', '/'])
        .filter_map(|p| p.parse().ok())
        .collect();
    let host = n.next_host;
    let ip = Ipv4Addr::new(
        octets.first().copied().unwrap_or(10),
        octets.get(1).copied().unwrap_or(0),
        (host / 250) as u8,
        (host % 250) as u8,
    );
    let Some(s) = st.servers.get_mut(&id) else {
        return not_found("server");
    };
    if s.private_net.iter().any(|(n, _)| *n == net) {
        return error(
            422,
            "server_already_attached",
            "server is already attached to this network",
        );
    }
    if fail.is_none() {
        s.private_net.push((net, ip));
        if let Some(n) = st.networks.get_mut(&net) {
            n.next_host += 1;
        }
    }
    let action = new_action(
        &mut st,
        inner,
        "attach_to_network",
        &[(id, "server"), (net, "network")],
        fail,
    );
    ok(201, json!({ "action": action }))
}

fn list_networks(inner: &Inner, query: &BTreeMap<String, String>) -> Reply {
    let st = inner.lock();
    let items = st
        .networks
        .values()
        .filter(|n| query.get("name").is_none_or(|q| *q == n.name))
        .map(|n| {
            let servers: Vec<u64> = st
                .servers
                .values()
                .filter(|s| s.private_net.iter().any(|(id, _)| *id == n.id))
                .map(|s| s.id)
                .collect();
            json!({
                "id": n.id, "name": n.name, "ip_range": n.ip_range, "subnets": [],
                "routes": [], "servers": servers, "load_balancers": [],
                "protection": {"delete": false}, "labels": {}, "created": now(),
                "expose_routes_to_vswitch": false,
            })
        })
        .collect();
    page("networks", items, query)
}

fn update_key(inner: &Inner, id: u64, body: &Value) -> Reply {
    let labels = match new_labels(body) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let mut st = inner.lock();
    let Some(k) = st.keys.get_mut(&id) else {
        return not_found("ssh_key");
    };
    k.labels = labels;
    if let Some(name) = body.get("name").and_then(Value::as_str) {
        k.name = name.to_owned();
    }
    ok(200, json!({ "ssh_key": k.clone() }))
}

/// `cp --sparse=always`: holes stay holes (SEEK_DATA/SEEK_HOLE), so a 40 GB disk with a
/// small image on it copies in no time.
pub(crate) async fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let out = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .output()
        .await?;
    if !out.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
