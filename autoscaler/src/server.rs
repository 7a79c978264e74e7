//! The listener: TLS handshakes with a required client certificate, then gRPC over HTTP/2.
//!
//! Connections are accepted here rather than by tonic's own TLS so that each connection
//! carries the verified client's certificate name ([`PeerIdentity`]) to the service, a
//! slow or failing handshake is logged and dropped without touching the others, and the
//! rustls configuration (ring provider, required client certificates) is ours.

use crate::backend::NodeGroupBackend;
use crate::identity::Identities;
use crate::proto::externalgrpc::cloud_provider_server::CloudProviderServer;
use crate::service::CloudProviderService;
use crate::tls::{common_name, TlsError, TlsPaths};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS setup")]
    Tls(#[from] TlsError),
    #[error("gRPC server")]
    Transport(#[from] tonic::transport::Error),
}

/// Who is on the other end of a connection, as the TLS handshake established it. Tonic
/// puts it in each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub remote_addr: Option<SocketAddr>,
    /// The subject CN of the verified client certificate, or why there is none.
    pub cert_name: Result<String, String>,
}

/// A TLS connection whose client certificate has been verified.
struct AuthedStream {
    inner: TlsStream<TcpStream>,
    peer: PeerIdentity,
}

impl Connected for AuthedStream {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for AuthedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves the `CloudProvider` service on `listener` until `shutdown` resolves, with the
/// TLS files at `tls` (read once, at start; errors name the file).
pub async fn serve<B: NodeGroupBackend>(
    listener: TcpListener,
    tls: &TlsPaths,
    identities: Identities,
    backend: Arc<B>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let config = tls.server_config()?;
    serve_with_config(listener, config, identities, backend, shutdown).await
}

/// As [`serve`], with a rustls configuration already built (for example by
/// [`crate::tls::TlsPem::server_config`]). It must require client certificates.
pub async fn serve_with_config<B: NodeGroupBackend>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    identities: Identities,
    backend: Arc<B>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (tx, rx) = mpsc::channel::<io::Result<AuthedStream>>(16);
    let accept = tokio::spawn(accept_loop(listener, TlsAcceptor::from(tls), tx, shutdown));
    let service = CloudProviderServer::new(CloudProviderService::new(identities, backend));
    // The accept loop owns the shutdown signal: when it fires, the loop ends and drops the
    // sender, which ends the incoming stream. Tonic then closes its connections gracefully
    // (it does so when it was given a signal, even one that never fires).
    let result = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), std::future::pending::<()>())
        .await;
    accept.abort();
    result.map_err(ServeError::from)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<io::Result<AuthedStream>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let cert_name = match tls.get_ref().1.peer_certificates() {
                Some([leaf, ..]) => common_name(leaf),
                _ => Err("no client certificate".to_owned()),
            };
            tracing::debug!(%remote, name = ?cert_name, "client connected");
            let peer = PeerIdentity {
                remote_addr: Some(remote),
                cert_name,
            };
            // The server is gone when the receiver is: drop the connection.
            let _ = tx.send(Ok(AuthedStream { inner: tls, peer })).await;
        });
    }
}
