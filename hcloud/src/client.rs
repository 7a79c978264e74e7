//! An async client for the Hetzner Cloud API v1, with the API's quirks in one place.
//!
//! Why not the `hcloud` crate (crates.io, 0.26): it is generated from the OpenAPI document
//! and is a thin mapping of every endpoint. It does not retry, does not read
//! `RateLimit-Reset`, does not paginate, and its errors are the generator's generic
//! ones, so `error.code` (what every decision here is made on) has to be dug out of a
//! string; its default TLS is native-tls. basalt needs a dozen endpoints and all of that
//! behaviour, so it owns this small client on reqwest (rustls) instead.
//!
//! Every call goes through [`Client::send`]:
//! - each request has a time-out;
//! - a 429 (`rate_limit_exceeded`) waits until `RateLimit-Reset`, bounded;
//! - `locked`, `conflict`, `timeout`, `unavailable`, and 502/503/504 without an API error
//!   body (a proxy's page), are retried with exponential backoff and full jitter;
//! - decisions are made on `error.code`, the HTTP status only when there is no API body;
//! - `resource_unavailable` is [`ApiError::ResourceUnavailable`], which says to try
//!   another location;
//! - a request without an answer is retried when it is safe to send again (GET, DELETE).
//!   A POST that lost its answer may have happened: the methods that create things
//!   resolve that by looking the thing up before sending again (see
//!   [`Client::create_server`] and [`Client::create_image`]).

use crate::api::{
    Action, CreateImage, CreateServer, CreateSshKey, EnableRescue, ErrorBody, Image, Meta, Network,
    Server, SshKey,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Hetzner's API, what hcloud-go and the hcloud CLI use unless `HCLOUD_ENDPOINT` says
/// otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://api.hetzner.cloud/v1";
/// Largest page the API serves.
const PER_PAGE: u32 = 50;

/// Error codes the API documents as "try again".
const RETRY_CODES: &[&str] = &["locked", "conflict", "timeout", "unavailable"];

/// How the client waits and gives up. One policy for every call.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Time-out of one HTTP request.
    pub call_timeout: Duration,
    /// Attempts of one call before it gives up (the first included).
    pub attempts: u32,
    /// First backoff; doubled each attempt, with full jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Longest wait for a rate limit to reset before the call gives up.
    pub rate_limit_max_wait: Duration,
    /// Interval between two reads of a running action.
    pub action_poll: Duration,
    /// Longest time an action may run.
    pub action_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            call_timeout: Duration::from_secs(30),
            attempts: 8,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            rate_limit_max_wait: Duration::from_secs(120),
            action_poll: Duration::from_secs(1),
            action_timeout: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{method} {path}: {code}: {message}")]
    Api {
        method: Method,
        path: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error(
        "{method} {path}: no capacity for this server type in this location ({message}); \
         try another --location or --server-type"
    )]
    ResourceUnavailable {
        method: Method,
        path: String,
        message: String,
    },
    #[error("{method} {path}: no answer")]
    Transport {
        method: Method,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {path}: still failing after {attempts} attempts: {last}")]
    Exhausted {
        method: Method,
        path: String,
        attempts: u32,
        last: String,
    },
    #[error("{method} {path}: HTTP {status} with a body that is not the API's")]
    BadAnswer {
        method: Method,
        path: String,
        status: u16,
        #[source]
        source: serde_json::Error,
    },
    #[error("action {id} ({command}) failed: {code}: {message}")]
    ActionFailed {
        id: u64,
        command: String,
        code: String,
        message: String,
    },
    #[error("action {id} ({command}) still running after {waited:?}")]
    ActionTimeout {
        id: u64,
        command: String,
        waited: Duration,
    },
    #[error("{what} not in the answer")]
    Missing { what: String },
    #[error("cancelled")]
    Cancelled,
}

impl ApiError {
    /// The API's `error.code`, when the API answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Api { code, .. } => Some(code),
            ApiError::ResourceUnavailable { .. } => Some("resource_unavailable"),
            _ => None,
        }
    }

    fn is_not_found(&self) -> bool {
        self.code() == Some("not_found")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no API token: set HCLOUD_TOKEN or pass --token-file")]
    Missing,
    #[error("token file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("token file {0} is empty")]
    Empty(PathBuf),
    #[error("HCLOUD_TOKEN is empty")]
    EmptyEnv,
}

/// The API token: from `file` when given, else from `HCLOUD_TOKEN`.
pub fn token_from(file: Option<&Path>) -> Result<String, TokenError> {
    if let Some(file) = file {
        let text =
            std::fs::read_to_string(file).map_err(|e| TokenError::Read(file.to_path_buf(), e))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty(file.to_path_buf()));
        }
        return Ok(token.to_owned());
    }
    match std::env::var("HCLOUD_TOKEN") {
        Ok(t) if t.trim().is_empty() => Err(TokenError::EmptyEnv),
        Ok(t) => Ok(t.trim().to_owned()),
        Err(_) => Err(TokenError::Missing),
    }
}

/// `HCLOUD_ENDPOINT`, else Hetzner's.
pub fn endpoint_from_env() -> String {
    std::env::var("HCLOUD_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned())
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    token: String,
    timing: Timing,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Client {
    // By hand: the token must not reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// What one failed attempt means.
enum Verdict {
    /// Wait this long, then send again.
    Retry(Duration, String),
    Fail(ApiError),
}

impl Client {
    pub fn new(endpoint: &str, token: &str, timing: Timing) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timing.call_timeout)
            .user_agent(concat!("basalt/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            timing,
            cancel: CancellationToken::new(),
        })
    }

    /// The same client, stopping its waits and calls when `cancel` fires.
    pub fn with_cancel(&self, cancel: CancellationToken) -> Self {
        Client {
            cancel,
            ..self.clone()
        }
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// One API call with every retry rule of the API; `Value::Null` for an empty answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let idempotent = method != Method::POST;
        let mut last = String::new();
        for attempt in 1..=self.timing.attempts {
            let verdict = match self.attempt(&method, path, body).await {
                Ok(v) => return Ok(v),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Answer(status, headers, bytes)) => {
                    self.judge(&method, path, status, &headers, &bytes, attempt)
                }
                Err(Attempt::NoAnswer(e)) if idempotent => {
                    Verdict::Retry(self.backoff(attempt), format!("no answer: {e}"))
                }
                Err(Attempt::NoAnswer(source)) => Verdict::Fail(ApiError::Transport {
                    method: method.clone(),
                    path: path.to_owned(),
                    source,
                }),
            };
            match verdict {
                Verdict::Fail(e) => return Err(e),
                Verdict::Retry(wait, why) => {
                    tracing::warn!(%method, path, attempt, wait_ms = wait.as_millis() as u64, "retrying: {why}");
                    last = why;
                    if attempt < self.timing.attempts {
                        self.sleep(wait).await?;
                    }
                }
            }
        }
        Err(ApiError::Exhausted {
            method,
            path: path.to_owned(),
            attempts: self.timing.attempts,
            last,
        })
    }

    async fn attempt(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Attempt> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.endpoint))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let send = async {
            let resp = req.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, bytes))
        };
        let (status, headers, bytes) = tokio::select! {
            r = send => r.map_err(Attempt::NoAnswer)?,
            () = self.cancel.cancelled() => return Err(Attempt::Failed(ApiError::Cancelled)),
        };
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|source| {
                Attempt::Failed(ApiError::BadAnswer {
                    method: method.clone(),
                    path: path.to_owned(),
                    status: status.as_u16(),
                    source,
                })
            });
        }
        Err(Attempt::Answer(status, headers, bytes.to_vec()))
    }

    fn judge(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        headers: &reqwest::header::HeaderMap,
        bytes: &[u8],
        attempt: u32,
    ) -> Verdict {
        let error = match serde_json::from_slice::<ErrorBody>(bytes) {
            Ok(body) => body.error,
            // Not the API's own error: a proxy or load balancer in front of it.
            Err(_) if matches!(status.as_u16(), 502..=504) => {
                return Verdict::Retry(self.backoff(attempt), format!("HTTP {status}"));
            }
            Err(source) => {
                return Verdict::Fail(ApiError::BadAnswer {
                    method: method.clone(),
                    path: path.to_owned(),
                    status: status.as_u16(),
                    source,
                })
            }
        };
        let why = format!("{}: {}", error.code, error.message);
        match error.code.as_str() {
            "rate_limit_exceeded" => {
                let wait = rate_limit_wait(headers).min(self.timing.rate_limit_max_wait);
                Verdict::Retry(wait + jitter(self.timing.backoff_base), why)
            }
            c if RETRY_CODES.contains(&c) => Verdict::Retry(self.backoff(attempt), why),
            "resource_unavailable" => Verdict::Fail(ApiError::ResourceUnavailable {
                method: method.clone(),
                path: path.to_owned(),
                message: error.message,
            }),
            _ => Verdict::Fail(ApiError::Api {
                method: method.clone(),
                path: path.to_owned(),
                status: status.as_u16(),
                code: error.code,
                message: error.message,
            }),
        }
    }

    /// Exponential backoff with full jitter (AWS's "full jitter": uniform in 0..=cap).
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .timing
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.timing.backoff_max);
        jitter(exp).max(self.timing.backoff_base / 2)
    }

    async fn sleep(&self, d: Duration) -> Result<(), ApiError> {
        tokio::select! {
            () = tokio::time::sleep(d) => Ok(()),
            () = self.cancel.cancelled() => Err(ApiError::Cancelled),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        key: &str,
    ) -> Result<T, ApiError> {
        let v = self.send(method.clone(), path, body).await?;
        field(&v, key, path)
    }

    /// Every item of a list endpoint, following `meta.pagination` page by page.
    pub async fn list<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        key: &str,
    ) -> Result<Vec<T>, ApiError> {
        let mut all = Vec::new();
        let mut page = 1u64;
        loop {
            let mut q: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect();
            q.push(format!("page={page}"));
            q.push(format!("per_page={PER_PAGE}"));
            let url = format!("{path}?{}", q.join("&"));
            let v = self.send(Method::GET, &url, None).await?;
            let items: Vec<T> = field(&v, key, &url)?;
            all.extend(items);
            let meta: Meta = field(&v, "meta", &url)?;
            match meta.pagination.next_page {
                Some(next) if next > page => page = next,
                _ => return Ok(all),
            }
        }
    }

    /// Polls an action until it succeeds; a failed action is [`ApiError::ActionFailed`].
    pub async fn wait_action(&self, action: &Action) -> Result<Action, ApiError> {
        let started = Instant::now();
        let mut a = action.clone();
        loop {
            match a.status.as_str() {
                "success" => return Ok(a),
                "error" => {
                    let (code, message) = a
                        .error
                        .map(|e| (e.code, e.message))
                        .unwrap_or_else(|| ("unknown".into(), "no error given".into()));
                    return Err(ApiError::ActionFailed {
                        id: a.id,
                        command: a.command,
                        code,
                        message,
                    });
                }
                _ => {}
            }
            if started.elapsed() > self.timing.action_timeout {
                return Err(ApiError::ActionTimeout {
                    id: a.id,
                    command: a.command,
                    waited: started.elapsed(),
                });
            }
            self.sleep(self.timing.action_poll).await?;
            a = self
                .call(Method::GET, &format!("/actions/{}", a.id), None, "action")
                .await?;
        }
    }

    pub async fn get_server(&self, id: u64) -> Result<Server, ApiError> {
        self.call(Method::GET, &format!("/servers/{id}"), None, "server")
            .await
    }

    pub async fn servers(&self, selector: Option<&str>) -> Result<Vec<Server>, ApiError> {
        let q: Vec<(&str, &str)> = selector
            .map(|s| ("label_selector", s))
            .into_iter()
            .collect();
        self.list("/servers", &q, "servers").await
    }

    pub async fn server_by_name(&self, name: &str) -> Result<Option<Server>, ApiError> {
        let found: Vec<Server> = self.list("/servers", &[("name", name)], "servers").await?;
        Ok(found.into_iter().find(|s| s.name == name))
    }

    /// Creates a server and waits for its create action. A request whose answer was lost
    /// may have created it: the server is looked up by its (unique) name before the
    /// request is sent again, so there are never two.
    pub async fn create_server(&self, req: &CreateServer) -> Result<Server, ApiError> {
        let body = to_value(req);
        let attempts = self.timing.attempts;
        for attempt in 1..=attempts {
            match self.send(Method::POST, "/servers", Some(&body)).await {
                Ok(v) => {
                    let server: Server = field(&v, "server", "/servers")?;
                    let action: Action = field(&v, "action", "/servers")?;
                    self.wait_action(&action).await?;
                    return Ok(server);
                }
                Err(ApiError::Transport { source, .. }) => {
                    tracing::warn!(name = %req.name, "create_server lost its answer ({source}); looking it up by name");
                    self.sleep(self.backoff(attempt)).await?;
                    if let Some(s) = self.server_by_name(&req.name).await? {
                        tracing::info!(id = s.id, name = %s.name, "the server was created after all");
                        return Ok(s);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Exhausted {
            method: Method::POST,
            path: "/servers".into(),
            attempts,
            last: "no answer, and no server of that name".into(),
        })
    }

    /// Deletes a server; one that is already gone is not an error.
    pub async fn delete_server(&self, id: u64) -> Result<(), ApiError> {
        match self
            .send(Method::DELETE, &format!("/servers/{id}"), None)
            .await
        {
            Ok(v) => {
                if let Ok(action) = field::<Action>(&v, "action", "/servers") {
                    self.wait_action(&action).await?;
                }
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Replaces a server's labels (`PUT /servers/{id}`). Idempotent: a lost answer is sent
    /// again.
    pub async fn update_server_labels(
        &self,
        id: u64,
        labels: &BTreeMap<String, String>,
    ) -> Result<Server, ApiError> {
        let path = format!("/servers/{id}");
        let body = serde_json::json!({ "labels": labels });
        self.call(Method::PUT, &path, Some(&body), "server").await
    }

    /// Attaches a server to a private network (`attach_to_network`), waited for. A lost
    /// answer is sent again: a server already attached to it (`server_already_attached`)
    /// is done, so attaching is idempotent.
    pub async fn attach_to_network(&self, id: u64, network: u64) -> Result<(), ApiError> {
        let body = serde_json::json!({ "network": network });
        let mut last = String::new();
        for attempt in 1..=self.timing.attempts {
            match self
                .server_action(id, "attach_to_network", Some(&body))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.code() == Some("server_already_attached") => return Ok(()),
                Err(ApiError::Transport { source, .. }) => {
                    last = format!("no answer: {source}");
                    self.sleep(self.backoff(attempt)).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Exhausted {
            method: Method::POST,
            path: format!("/servers/{id}/actions/attach_to_network"),
            attempts: self.timing.attempts,
            last,
        })
    }

    /// Private networks, by name when given.
    pub async fn networks(&self, name: Option<&str>) -> Result<Vec<Network>, ApiError> {
        let q: Vec<(&str, &str)> = name.map(|n| ("name", n)).into_iter().collect();
        self.list("/networks", &q, "networks").await
    }

    /// A server action (`poweron`, `poweroff`, `shutdown`, `enable_rescue`, …), waited for.
    pub async fn server_action(
        &self,
        id: u64,
        action: &str,
        body: Option<&Value>,
    ) -> Result<Action, ApiError> {
        let path = format!("/servers/{id}/actions/{action}");
        let empty = Value::Object(Default::default());
        let a: Action = self
            .call(Method::POST, &path, Some(body.unwrap_or(&empty)), "action")
            .await?;
        self.wait_action(&a).await
    }

    pub async fn enable_rescue(&self, id: u64, key: u64) -> Result<Action, ApiError> {
        let body = to_value(&EnableRescue {
            kind: "linux64".into(),
            ssh_keys: vec![key],
        });
        self.server_action(id, "enable_rescue", Some(&body)).await
    }

    /// Snapshots a server. `find_by` is a label selector matching only this request's
    /// image (a run id): a request whose answer was lost is resolved by it before the
    /// request is sent again, so there are never two snapshots.
    pub async fn create_image(
        &self,
        server: u64,
        req: &CreateImage,
        find_by: &str,
    ) -> Result<Image, ApiError> {
        let path = format!("/servers/{server}/actions/create_image");
        let body = to_value(req);
        let attempts = self.timing.attempts;
        for attempt in 1..=attempts {
            match self.send(Method::POST, &path, Some(&body)).await {
                Ok(v) => {
                    let image: Image = field(&v, "image", &path)?;
                    let action: Action = field(&v, "action", &path)?;
                    self.wait_action(&action).await?;
                    return self.get_image(image.id).await;
                }
                Err(ApiError::Transport { source, .. }) => {
                    tracing::warn!(
                        server,
                        "create_image lost its answer ({source}); looking it up by label"
                    );
                    self.sleep(self.backoff(attempt)).await?;
                    if let Some(image) = self.images(Some(find_by)).await?.into_iter().next() {
                        tracing::info!(id = image.id, "the snapshot was created after all");
                        return self.wait_image(image.id).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Exhausted {
            method: Method::POST,
            path,
            attempts,
            last: "no answer, and no snapshot with the run's label".into(),
        })
    }

    pub async fn get_image(&self, id: u64) -> Result<Image, ApiError> {
        self.call(Method::GET, &format!("/images/{id}"), None, "image")
            .await
    }

    /// Waits for an image found without its action to leave `creating`.
    async fn wait_image(&self, id: u64) -> Result<Image, ApiError> {
        let started = Instant::now();
        loop {
            let image = self.get_image(id).await?;
            if image.status != "creating" {
                return Ok(image);
            }
            if started.elapsed() > self.timing.action_timeout {
                return Err(ApiError::ActionTimeout {
                    id,
                    command: "create_image".into(),
                    waited: started.elapsed(),
                });
            }
            self.sleep(self.timing.action_poll).await?;
        }
    }

    /// Snapshots, newest first.
    pub async fn images(&self, selector: Option<&str>) -> Result<Vec<Image>, ApiError> {
        let mut q = vec![("type", "snapshot"), ("sort", "created:desc")];
        if let Some(s) = selector {
            q.push(("label_selector", s));
        }
        self.list("/images", &q, "images").await
    }

    pub async fn delete_image(&self, id: u64) -> Result<(), ApiError> {
        match self
            .send(Method::DELETE, &format!("/images/{id}"), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Uploads a public key. Names are unique per project, so a lost answer is resolved
    /// by the name, like a server's.
    pub async fn create_ssh_key(&self, req: &CreateSshKey) -> Result<SshKey, ApiError> {
        let body = to_value(req);
        for attempt in 1..=self.timing.attempts {
            match self.send(Method::POST, "/ssh_keys", Some(&body)).await {
                Ok(v) => return field(&v, "ssh_key", "/ssh_keys"),
                Err(ApiError::Transport { .. }) => {
                    self.sleep(self.backoff(attempt)).await?;
                    let found: Vec<SshKey> = self
                        .list("/ssh_keys", &[("name", &req.name)], "ssh_keys")
                        .await?;
                    if let Some(k) = found.into_iter().find(|k| k.name == req.name) {
                        return Ok(k);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Exhausted {
            method: Method::POST,
            path: "/ssh_keys".into(),
            attempts: self.timing.attempts,
            last: "no answer, and no key of that name".into(),
        })
    }

    pub async fn ssh_keys(&self, selector: Option<&str>) -> Result<Vec<SshKey>, ApiError> {
        let q: Vec<(&str, &str)> = selector
            .map(|s| ("label_selector", s))
            .into_iter()
            .collect();
        self.list("/ssh_keys", &q, "ssh_keys").await
    }

    /// Replaces an SSH key's labels (`PUT /ssh_keys/{id}`); idempotent.
    pub async fn update_ssh_key_labels(
        &self,
        id: u64,
        labels: &BTreeMap<String, String>,
    ) -> Result<SshKey, ApiError> {
        let path = format!("/ssh_keys/{id}");
        let body = serde_json::json!({ "labels": labels });
        self.call(Method::PUT, &path, Some(&body), "ssh_key").await
    }

    pub async fn ssh_key_by_name(&self, name: &str) -> Result<Option<SshKey>, ApiError> {
        let found: Vec<SshKey> = self
            .list("/ssh_keys", &[("name", name)], "ssh_keys")
            .await?;
        Ok(found.into_iter().find(|k| k.name == name))
    }

    pub async fn delete_ssh_key(&self, id: u64) -> Result<(), ApiError> {
        match self
            .send(Method::DELETE, &format!("/ssh_keys/{id}"), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

enum Attempt {
    /// An answer that is not a success.
    Answer(StatusCode, reqwest::header::HeaderMap, Vec<u8>),
    NoAnswer(reqwest::Error),
    Failed(ApiError),
}

fn rate_limit_wait(headers: &reqwest::header::HeaderMap) -> Duration {
    // `RateLimit-Reset` is a UNIX timestamp: when the bucket is full again. One request
    // comes back every second, so a reset in the past still means "wait a second".
    let reset = headers
        .get("RateLimit-Reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match reset {
        Some(r) if r > now => Duration::from_secs(r - now),
        _ => Duration::from_secs(1),
    }
}

fn jitter(cap: Duration) -> Duration {
    let ms = cap.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(rand::random_range(0..=ms))
}

fn field<T: DeserializeOwned>(v: &Value, key: &str, path: &str) -> Result<T, ApiError> {
    let item = v.get(key).ok_or_else(|| ApiError::Missing {
        what: format!("{key} (answer to {path})"),
    })?;
    T::deserialize(item).map_err(|e| ApiError::Missing {
        what: format!("a valid {key} (answer to {path}: {e})"),
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Percent-encodes a query value (label selectors hold `=`, `!`, `,`, `(`, spaces).
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn rate_limit_waits_until_the_reset() {
        let mut h = HeaderMap::new();
        h.insert(
            "RateLimit-Reset",
            HeaderValue::from_str(&(now() + 30).to_string()).unwrap(),
        );
        let w = rate_limit_wait(&h);
        assert!(
            w >= Duration::from_secs(29) && w <= Duration::from_secs(30),
            "{w:?}"
        );
        // Past, missing or garbage: a second, one request's refill.
        h.insert("RateLimit-Reset", HeaderValue::from_static("12"));
        assert_eq!(rate_limit_wait(&h), Duration::from_secs(1));
        assert_eq!(rate_limit_wait(&HeaderMap::new()), Duration::from_secs(1));
        h.insert("RateLimit-Reset", HeaderValue::from_static("soon"));
        assert_eq!(rate_limit_wait(&h), Duration::from_secs(1));
    }

    #[test]
    fn backoff_grows_and_stays_within_its_cap() {
        let c = Client::new("http://127.0.0.1:9/v1", "t", Timing::default()).unwrap();
        let t = c.timing().clone();
        for attempt in 1..40 {
            let cap = t
                .backoff_base
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(t.backoff_max);
            for _ in 0..20 {
                let b = c.backoff(attempt);
                assert!(b <= cap && b >= t.backoff_base / 2, "{attempt}: {b:?}");
            }
        }
    }

    #[test]
    fn selectors_are_percent_encoded() {
        assert_eq!(
            urlencode("basalt.io/image=k3s-node,env in (a, b),!x"),
            "basalt.io/image%3Dk3s-node%2Cenv%20in%20%28a%2C%20b%29%2C%21x"
        );
    }

    #[test]
    fn the_token_file_wins_and_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "  secret\n").unwrap();
        assert_eq!(token_from(Some(&f)).unwrap(), "secret");
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(token_from(Some(&f)), Err(TokenError::Empty(p)) if p == f));
        let missing = dir.path().join("missing");
        let e = token_from(Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
