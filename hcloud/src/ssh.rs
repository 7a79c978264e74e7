//! SSH to the rescue system with russh: connect with bounded backoff, run a command,
//! stream bytes into a command's stdin.
//!
//! The rescue system's host key is new on every boot and published nowhere, so it cannot
//! be checked (hcloud-upload-image does not either). What this costs is bounded: the data
//! sent is a public image, and what lands on the disk is checked afterwards by its sha256
//! before any snapshot is made.

use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::ChannelMsg;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("rescue system at {addr} not reachable over SSH after {waited:?}: {last}")]
    NotUp {
        addr: SocketAddr,
        waited: Duration,
        last: String,
    },
    #[error("SSH session to {addr}")]
    Session {
        addr: SocketAddr,
        #[source]
        source: russh::Error,
    },
    #[error("`{command}` on the rescue system exited with {status}: {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("the SSH connection to {addr} was lost during `{command}`")]
    Lost { addr: SocketAddr, command: String },
    #[error("reading the image to send")]
    Read(#[source] std::io::Error),
    #[error("cancelled")]
    Cancelled,
}

/// How long and how often to try while the rescue system boots (10–30 s on Hetzner).
#[derive(Debug, Clone)]
pub struct SshTiming {
    /// Give up when nothing answered for this long.
    pub bound: Duration,
    pub first_wait: Duration,
    pub max_wait: Duration,
    /// Time-out of one connection attempt (TCP, handshake and authentication).
    pub attempt_timeout: Duration,
    /// A session silent for this long is dead.
    pub inactivity: Duration,
}

impl Default for SshTiming {
    fn default() -> Self {
        SshTiming {
            bound: Duration::from_secs(180),
            first_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(15),
            inactivity: Duration::from_secs(120),
        }
    }
}

/// The client's handler: accepts the host key, and says when the session is gone (its
/// handler is dropped with it), since a channel's reader is not told on every path.
struct AnyHostKey {
    gone: CancellationToken,
}

impl Drop for AnyHostKey {
    fn drop(&mut self) {
        self.gone.cancel();
    }
}

impl client::Handler for AnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // See the module docs: the rescue's key is unknowable, the result is verified.
        Ok(true)
    }
}

/// An authenticated session to a rescue system as root.
pub struct Rescue {
    handle: Handle<AnyHostKey>,
    addr: SocketAddr,
    gone: CancellationToken,
}

/// Output of a command that exited 0.
pub struct Output {
    pub stdout: Vec<u8>,
}

impl Rescue {
    /// Connects and logs in as root with `key`, retrying with backoff until `timing.bound`.
    pub async fn connect(
        addr: SocketAddr,
        key: &PrivateKey,
        timing: &SshTiming,
        cancel: &CancellationToken,
    ) -> Result<Rescue, SshError> {
        let started = Instant::now();
        let mut wait = timing.first_wait;
        let key = Arc::new(key.clone());
        loop {
            let attempt = tokio::time::timeout(
                timing.attempt_timeout,
                Self::try_connect(addr, key.clone(), timing),
            );
            let last = tokio::select! {
                r = attempt => match r {
                    Ok(Ok((handle, gone))) => return Ok(Rescue { handle, addr, gone }),
                    Ok(Err(e)) => e,
                    Err(_) => format!("no answer within {:?}", timing.attempt_timeout),
                },
                () = cancel.cancelled() => return Err(SshError::Cancelled),
            };
            let waited = started.elapsed();
            if waited + wait > timing.bound {
                return Err(SshError::NotUp { addr, waited, last });
            }
            tracing::debug!(%addr, "SSH not up yet ({last}); again in {wait:?}");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return Err(SshError::Cancelled),
            }
            wait = (wait * 2).min(timing.max_wait);
        }
    }

    async fn try_connect(
        addr: SocketAddr,
        key: Arc<PrivateKey>,
        timing: &SshTiming,
    ) -> Result<(Handle<AnyHostKey>, CancellationToken), String> {
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(timing.inactivity),
            keepalive_interval: Some(Duration::from_secs(15)),
            ..Default::default()
        });
        let gone = CancellationToken::new();
        let handler = AnyHostKey { gone: gone.clone() };
        let mut handle = client::connect(config, addr, handler)
            .await
            .map_err(|e| e.to_string())?;
        let auth = handle
            .authenticate_publickey("root", PrivateKeyWithHashAlg::new(key, None))
            .await
            .map_err(|e| e.to_string())?;
        if !auth.success() {
            return Err("the rescue system refused the key".into());
        }
        Ok((handle, gone))
    }

    /// Runs `command`; a non-zero exit is [`SshError::Failed`] with its stderr.
    pub async fn run(&self, command: &str) -> Result<Output, SshError> {
        self.stream(command, tokio::io::empty()).await
    }

    /// Runs `command` with `input` as its stdin (EOF at the end), and waits for its exit.
    pub async fn stream<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        command: &str,
        mut input: R,
    ) -> Result<Output, SshError> {
        let session = |source| SshError::Session {
            addr: self.addr,
            source,
        };
        let channel = self.handle.channel_open_session().await.map_err(session)?;
        channel.exec(true, command).await.map_err(session)?;
        let (mut read, write) = channel.split();
        let mut writer = write.make_writer();
        let feed = tokio::spawn(async move {
            tokio::io::copy(&mut input, &mut writer).await?;
            writer.shutdown().await
        });
        let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), None);
        loop {
            let msg = tokio::select! {
                biased;
                m = read.wait() => m,
                () = self.gone.cancelled() => None,
            };
            let Some(msg) = msg else { break };
            match msg {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status.to_string()),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    status = Some(format!("signal {signal_name:?}"))
                }
                _ => {}
            }
        }
        // The feeder may wait for window space that will never come on a dead session.
        let fed = if self.gone.is_cancelled() {
            feed.abort();
            Ok(Ok(()))
        } else {
            feed.await
        };
        let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
        match status.as_deref() {
            Some("0") => {}
            Some(s) => {
                return Err(SshError::Failed {
                    command: command.to_owned(),
                    status: s.to_owned(),
                    stderr,
                })
            }
            None => {
                return Err(SshError::Lost {
                    addr: self.addr,
                    command: command.to_owned(),
                })
            }
        }
        // The command exited 0: it read everything it wanted. A read error of our own
        // input is still a failure (the command saw a short stream).
        match fed {
            Ok(Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(SshError::Read(e))
            }
            _ => {}
        }
        Ok(Output { stdout })
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}
