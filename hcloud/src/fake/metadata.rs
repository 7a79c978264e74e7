//! Hetzner's metadata service for one fake server, on its own loopback port: what
//! basalt-init reads (`init/src/metadata.rs`) at `/hetzner/v1/metadata/{hostname,
//! instance-id,public-ipv4,network-config}`, `/hetzner/v1/metadata` (all of it, YAML)
//! and `/hetzner/v1/userdata`. A QEMU test forwards the guest's 169.254.169.254:80 here.

use super::Inner;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub(crate) async fn start(
    inner: Arc<Inner>,
    id: u64,
) -> std::io::Result<(SocketAddr, CancellationToken)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let (stop2, all) = (stop.clone(), inner.stop.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                () = stop2.cancelled() => return,
                () = all.cancelled() => return,
            };
            let inner = inner.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let reply = answer(&inner, id, req.uri().path());
                    async move { Ok::<_, std::convert::Infallible>(reply) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, stop))
}

fn answer(inner: &Inner, id: u64, path: &str) -> Response<Full<Bytes>> {
    let st = inner.lock();
    let Some(s) = st.servers.get(&id) else {
        return reply(StatusCode::NOT_FOUND, String::new());
    };
    let network = format!(
        "config:\n- mac_address: 96:00:00:00:{:02x}:{:02x}\n  name: eth0\n  subnets:\n  \
         - ipv4: true\n    type: dhcp\n  - address: 2001:db8:{:x}::1/64\n    gateway: fe80::1\n    \
         ipv6: true\n    type: static\n  type: physical\nversion: 1\n",
        (id >> 8) & 0xff,
        id & 0xff,
        id
    );
    let body = match path.trim_end_matches('/') {
        "/hetzner/v1/metadata/hostname" => s.name.clone(),
        "/hetzner/v1/metadata/instance-id" => id.to_string(),
        "/hetzner/v1/metadata/public-ipv4" => s.ip.to_string(),
        "/hetzner/v1/metadata/network-config" => network,
        "/hetzner/v1/metadata" => format!(
            "hostname: {}\ninstance-id: {id}\npublic-ipv4: {}\nregion: eu-central\n\
             availability-zone: {}-dc14\n",
            s.name, s.ip, s.location
        ),
        "/hetzner/v1/userdata" => s.user_data.clone().unwrap_or_default(),
        _ => return reply(StatusCode::NOT_FOUND, "not found".into()),
    };
    reply(StatusCode::OK, body)
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
