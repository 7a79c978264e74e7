//! The controller's own API, behind `basalt pool status|promote|delete`, and its metrics.
//!
//! HTTP/1.1 with JSON over mutual TLS: the client certificate must chain to the pool CA. Who
//! may do what is decided by the certificate's common name:
//!
//! | route | who |
//! | --- | --- |
//! | `GET /v1/status` | an admin (a CN in `[admin] clients`) |
//! | `POST /v1/promote` `{"cluster": C, "count": N}` | an admin |
//! | `DELETE /v1/nodes/<name>` | an admin |
//! | `GET /metrics` (Prometheus text) | any client of the pool CA (autoscalers, Prometheus) |
//!
//! Anything else is 404; a stranger (no certificate, or one of another CA) fails the handshake
//! and never reaches a route.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The most a request body may hold.
const BODY_LIMIT: usize = 4096;
/// A client has this long for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API can be asked; the controller implements it.
pub trait Admin: Send + Sync + 'static {
    /// Every server of the pool with its state, image, age and last error.
    fn status(&self) -> impl Future<Output = Result<Value, AdminError>> + Send;
    /// Promote `count` standbys into `cluster`.
    fn promote(
        &self,
        cluster: &str,
        count: u32,
    ) -> impl Future<Output = Result<Value, AdminError>> + Send;
    /// Delete one node of the pool by name.
    fn delete(&self, node: &str) -> impl Future<Output = Result<Value, AdminError>> + Send;
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// A refused or failed request: its HTTP status and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct AdminError {
    pub status: u16,
    pub message: String,
}

impl AdminError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        AdminError {
            status: 400,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        AdminError {
            status: 404,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        AdminError {
            status: 503,
            message: message.into(),
        }
    }
}

/// `POST /v1/promote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub cluster: String,
    pub count: u32,
}

/// Serves the API on `listener` until `shutdown` completes. `tls` must require client
/// certificates of the pool CA; `admins` are the common names allowed the admin routes.
pub async fn serve<A: Admin>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    admins: BTreeSet<String>,
    admin: Arc<A>,
    shutdown: impl Future<Output = ()> + Send,
) {
    // This API speaks HTTP/1.1 (the gRPC server beside it offers h2 from the same files).
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let admins = Arc::new(admins);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("pool API: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let (acceptor, admins, admin) = (acceptor.clone(), admins.clone(), admin.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let caller = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| basalt_autoscaler::tls::common_name(c).ok());
            let is_admin = caller.as_ref().is_some_and(|cn| admins.contains(cn));
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&*admin, is_admin, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn route<A: Admin>(
    admin: &A,
    is_admin: bool,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if method == Method::GET && path == "/metrics" {
        return reply(200, "text/plain; version=0.0.4", admin.metrics().into());
    }
    let admin_route = matches!(
        (&method, path.as_str()),
        (&Method::GET, "/v1/status") | (&Method::POST, "/v1/promote")
    ) || (method == Method::DELETE && path.starts_with("/v1/nodes/"));
    if !admin_route {
        return error(&AdminError::not_found(format!("no route {method} {path}")));
    }
    if !is_admin {
        // Before any body is read.
        return error(&AdminError {
            status: 403,
            message: "this client certificate is not one of the pool's admins".into(),
        });
    }
    let result = match (method, path.as_str()) {
        (Method::GET, "/v1/status") => admin.status().await,
        (Method::POST, "/v1/promote") => match read_json::<PromoteRequest>(req).await {
            Ok(p) => admin.promote(&p.cluster, p.count).await,
            Err(e) => Err(e),
        },
        (_, p) => match p.strip_prefix("/v1/nodes/") {
            Some(node) if !node.is_empty() && !node.contains('/') => admin.delete(node).await,
            _ => Err(AdminError::bad_request("DELETE /v1/nodes/<name>")),
        },
    };
    match result {
        Ok(body) => reply(200, "application/json", body.to_string().into()),
        Err(e) => error(&e),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<hyper::body::Incoming>,
) -> Result<T, AdminError> {
    let body = Limited::new(req.into_body(), BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| AdminError::bad_request(format!("request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| AdminError::bad_request(format!("request body: {e}")))
}

fn reply(status: u16, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn error(e: &AdminError) -> Response<Full<Bytes>> {
    reply(
        e.status,
        "application/json",
        json!({ "error": e.message }).to_string().into(),
    )
}

/// Why a call to the pool API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("pool API client")]
    Tls(#[source] basalt_client::node::NodeError),
    #[error("set up the HTTPS client")]
    Build(#[source] reqwest::Error),
    #[error("pool API at {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("pool API at {url}: {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
}

/// A client of the pool API (`basalt pool status|promote|delete`).
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
}

impl AdminClient {
    /// `endpoint` is `https://HOST:PORT`, its host a name in the controller's certificate;
    /// `ca` the pool CA, `cert` and `key` the caller's client certificate.
    pub fn new(endpoint: &str, ca: &Path, cert: &Path, key: &Path) -> Result<Self, ClientError> {
        let tls = basalt_client::node::client_tls(ca, cert, key).map_err(ClientError::Tls)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .map_err(ClientError::Build)?;
        Ok(AdminClient {
            http,
            base: endpoint.trim_end_matches('/').to_owned(),
        })
    }

    pub async fn status(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/v1/status", None).await
    }

    pub async fn promote(&self, cluster: &str, count: u32) -> Result<Value, ClientError> {
        let body = json!(PromoteRequest {
            cluster: cluster.into(),
            count
        });
        self.call(Method::POST, "/v1/promote", Some(body)).await
    }

    pub async fn delete(&self, node: &str) -> Result<Value, ClientError> {
        self.call(Method::DELETE, &format!("/v1/nodes/{node}"), None)
            .await
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let resp = self.send(self.http.get(&url), &url).await?;
        resp.text()
            .await
            .map_err(|source| ClientError::Request { url, source })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            Method::POST => self.http.post(&url),
            Method::DELETE => self.http.delete(&url),
            _ => self.http.get(&url),
        };
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = self.send(req, &url).await?;
        resp.json()
            .await
            .map_err(|source| ClientError::Request { url, source })
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Request {
            url: url.to_owned(),
            source,
        })?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(ClientError::Refused {
            url: url.to_owned(),
            status,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_client::pki::{Ca, CertRequest, Role, Validity};
    use std::sync::Mutex;

    /// Records what it was asked; answers from fixed data.
    #[derive(Default)]
    struct Recording {
        calls: Mutex<Vec<String>>,
    }

    impl Admin for Recording {
        async fn status(&self) -> Result<Value, AdminError> {
            self.calls.lock().expect("lock").push("status".into());
            Ok(json!({ "servers": [] }))
        }
        async fn promote(&self, cluster: &str, count: u32) -> Result<Value, AdminError> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("promote {cluster} {count}"));
            if cluster == "nobody" {
                return Err(AdminError::not_found("no cluster nobody"));
            }
            Ok(json!({ "promoted": count }))
        }
        async fn delete(&self, node: &str) -> Result<Value, AdminError> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("delete {node}"));
            Ok(json!({ "deleted": node }))
        }
        fn metrics(&self) -> String {
            "basalt_pool_servers{state=\"standby\"} 2\n".into()
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        url: String,
        admin: Arc<Recording>,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    fn write_issued(ca: &Ca, dir: &Path, name: &str, role: Role) {
        let issued = ca
            .issue(&CertRequest {
                name: name.into(),
                role,
                validity: Validity::days_from_now(1).expect("validity"),
            })
            .expect("issue");
        std::fs::write(dir.join(format!("{name}.pem")), issued.cert_pem).expect("cert");
        std::fs::write(dir.join(format!("{name}.key")), issued.key_pem).expect("key");
    }

    async fn start() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate().expect("ca");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("ca.pem");
        let node = Role::Node {
            ips: vec!["127.0.0.1".parse().expect("ip")],
            dns: vec![],
        };
        write_issued(&ca, dir.path(), "pool-controller", node);
        for client in ["operator", "customer-a"] {
            write_issued(&ca, dir.path(), client, Role::Client);
        }
        let other = Ca::generate().expect("other ca");
        write_issued(&other, dir.path(), "stranger", Role::Client);
        let tls = basalt_autoscaler::tls::TlsPaths {
            cert: dir.path().join("pool-controller.pem"),
            key: dir.path().join("pool-controller.key"),
            client_ca: dir.path().join("ca.pem"),
        }
        .server_config()
        .expect("server tls");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let admin = Arc::new(Recording::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            tls,
            BTreeSet::from(["operator".to_owned()]),
            admin.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Fixture {
            url: format!("https://127.0.0.1:{port}"),
            dir,
            admin,
            _stop: stop,
        }
    }

    impl Fixture {
        fn client(&self, name: &str) -> AdminClient {
            let d = self.dir.path();
            AdminClient::new(
                &self.url,
                &d.join("ca.pem"),
                &d.join(format!("{name}.pem")),
                &d.join(format!("{name}.key")),
            )
            .expect("client")
        }
        fn calls(&self) -> Vec<String> {
            self.admin.calls.lock().expect("lock").clone()
        }
    }

    #[tokio::test]
    async fn an_admin_reads_status_promotes_and_deletes() {
        let f = start().await;
        let op = f.client("operator");
        assert_eq!(op.status().await.expect("status"), json!({ "servers": [] }));
        assert_eq!(
            op.promote("customer-a", 2).await.expect("promote"),
            json!({ "promoted": 2 })
        );
        assert_eq!(
            op.delete("pool-7").await.expect("delete"),
            json!({ "deleted": "pool-7" })
        );
        assert_eq!(
            f.calls(),
            ["status", "promote customer-a 2", "delete pool-7"]
        );
        // The controller's refusal reaches the caller with its status and message.
        match op.promote("nobody", 1).await {
            Err(ClientError::Refused {
                status: 404,
                message,
                ..
            }) => assert!(message.contains("no cluster nobody"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_cluster_certificate_reads_metrics_but_changes_nothing() {
        let f = start().await;
        let autoscaler = f.client("customer-a");
        let metrics = autoscaler.metrics().await.expect("metrics");
        assert!(metrics.contains("basalt_pool_servers"), "{metrics}");
        for result in [
            autoscaler.status().await,
            autoscaler.promote("customer-a", 1).await,
            autoscaler.delete("pool-1").await,
        ] {
            assert!(
                matches!(result, Err(ClientError::Refused { status: 403, .. })),
                "{result:?}"
            );
        }
        assert!(f.calls().is_empty(), "{:?}", f.calls());
    }

    #[tokio::test]
    async fn a_stranger_never_reaches_a_route() {
        let f = start().await;
        let stranger = f.client("stranger");
        let result = stranger.metrics().await;
        assert!(
            matches!(result, Err(ClientError::Request { .. })),
            "{result:?}"
        );
        assert!(stranger.promote("customer-a", 1).await.is_err());
        assert!(f.calls().is_empty());
    }

    #[tokio::test]
    async fn a_bad_body_is_a_400_and_reaches_nothing() {
        let f = start().await;
        let op = f.client("operator");
        let url = format!("{}/v1/promote", f.url);
        let resp = op
            .http
            .post(&url)
            .body("{\"cluster\": \"a\", \"count\": -1}")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 400);
        let resp = op
            .http
            .post(&url)
            .body(vec![b' '; BODY_LIMIT + 1])
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 400);
        assert!(f.calls().is_empty(), "{:?}", f.calls());
    }
}
