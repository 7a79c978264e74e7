//! `basalt hcloud upload`: an image becomes a snapshot through the rescue system.
//!
//! 1. a temporary ed25519 key and a temporary server (`start_after_create=false`), both
//!    labelled `basalt.io/created-by=basalt-upload` and `basalt.io/run=<run id>`, with
//!    names unique to the run;
//! 2. rescue `linux64` with that key, power on, SSH with bounded backoff;
//! 3. `blkdiscard`, then the image streamed over the SSH channel into
//!    `zstd -d | dd of=/dev/sda conv=sparse` (discard first and write sparse, so holes stay
//!    holes and the snapshot is as small as the image), `sync`;
//! 4. the rescue system's sha256 of the raw size's first bytes of `/dev/sda` must equal
//!    the manifest's, or there is no snapshot and the error names both hashes;
//! 5. shut down, `create_image` with basalt's labels and the user's;
//! 6. the server and the key are deleted whatever happened: success, error or
//!    cancellation (Ctrl-C), found by id or, when a create lost its answer, by name.

use crate::api::{CreateImage, CreateServer, CreateSshKey, Image, Server, SshKey};
use crate::client::{ApiError, Client};
use crate::image::{Encoding, ImageError, Upload};
use crate::labels::{self, LabelError};
use crate::progress::{Counter, Mode, Reporter};
use crate::ssh::{Rescue, SshError, SshTiming};
use russh::keys::PrivateKey;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::CancellationToken;

/// A zstd level for a `.raw` sent as it is: fast, and a hole costs nothing.
const RAW_LEVEL: i32 = 1;
/// Longest time the cleanup may take after an upload, even after Ctrl-C.
const CLEANUP_BOUND: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub image: PathBuf,
    /// `manifest.json` beside the image unless given.
    pub manifest: Option<PathBuf>,
    pub location: String,
    pub server_type: String,
    /// Any image the server type can be created with; rescue replaces it at once.
    pub base_image: String,
    pub labels: BTreeMap<String, String>,
    pub description: Option<String>,
    /// The rescue system's SSH port (22 on Hetzner).
    pub ssh_port: u16,
    pub ssh: SshTiming,
    /// After `shutdown`, how long to wait for the server to be off before `poweroff`.
    pub shutdown_timeout: Duration,
    pub progress: Mode,
}

impl UploadOptions {
    pub fn new(image: PathBuf) -> Self {
        UploadOptions {
            image,
            manifest: None,
            location: "fsn1".into(),
            server_type: "cx22".into(),
            base_image: "debian-12".into(),
            labels: BTreeMap::new(),
            description: None,
            ssh_port: 22,
            ssh: SshTiming::default(),
            shutdown_timeout: Duration::from_secs(60),
            progress: Mode::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error("{step}")]
    Api {
        step: &'static str,
        #[source]
        source: Box<ApiError>,
    },
    #[error("{step}")]
    Ssh {
        step: &'static str,
        #[source]
        source: Box<SshError>,
    },
    #[error("server {0} has no public IPv4 address to reach its rescue system by")]
    NoAddress(u64),
    #[error(
        "the server's disk holds {disk} bytes, the image {raw}: choose a larger --server-type"
    )]
    DiskTooSmall { disk: u64, raw: u64 },
    #[error("the rescue system answered {0:?} where a number or a sha256 was expected")]
    Unexpected(String),
    #[error(
        "the disk does not hold the image: sha256 of its first {size} bytes is {actual}, \
         the manifest says {expected}; no snapshot was made"
    )]
    Mismatch {
        size: u64,
        expected: String,
        actual: String,
    },
    #[error("cancelled; the temporary server and key were deleted")]
    Cancelled,
    #[error(
        "the upload's temporary resources could not all be deleted ({what}); \
         `basalt hcloud cleanup` finds them by their labels"
    )]
    Cleanup {
        what: String,
        #[source]
        source: Box<ApiError>,
    },
}

/// What an upload made.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub snapshot: Image,
    pub run_id: String,
    /// Each step and how long it took.
    pub steps: Vec<(String, Duration)>,
    /// Time spent streaming, and the bytes sent (the file's).
    pub stream: Duration,
    pub bytes: u64,
}

/// What the run created, for the cleanup: ids once known, names from the start.
#[derive(Debug, Default)]
struct Created {
    server: Option<u64>,
    key: Option<u64>,
}

/// Uploads `opts.image` as a snapshot. `cancel` (Ctrl-C) stops it; the cleanup runs
/// anyway.
pub async fn upload(
    client: &Client,
    opts: &UploadOptions,
    cancel: CancellationToken,
) -> Result<Uploaded, UploadError> {
    let image = Upload::open(&opts.image, opts.manifest.as_deref())?;
    labels::check(&opts.labels)?;
    let run_id = hex::encode(rand::random::<[u8; 6]>());
    let names = format!("basalt-upload-{run_id}");
    let created = Arc::new(Mutex::new(Created::default()));
    let flow = Flow {
        client: client.with_cancel(cancel.clone()),
        opts,
        image: &image,
        run_id: run_id.clone(),
        name: names.clone(),
        created: created.clone(),
        steps: Vec::new(),
        cancel: cancel.clone(),
    };
    let result = tokio::select! {
        r = flow.run() => r,
        () = cancel.cancelled() => Err(UploadError::Cancelled),
    };
    // A step that saw the cancellation first (an SSH wait, an API backoff) fails with its
    // own error; it is still a cancellation.
    let result = match result {
        Err(_) if cancel.is_cancelled() => Err(UploadError::Cancelled),
        r => r,
    };
    let ids = std::mem::take(&mut *created.lock().unwrap_or_else(|e| e.into_inner()));
    let cleaned = tokio::time::timeout(CLEANUP_BOUND, cleanup(client, &names, ids)).await;
    let cleaned = cleaned.unwrap_or_else(|_| {
        Err(UploadError::Cleanup {
            what: format!("{names} not gone after {CLEANUP_BOUND:?}"),
            source: Box::new(ApiError::Cancelled),
        })
    });
    match (result, cleaned) {
        (Ok(done), Ok(())) => Ok(done),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        // "Cancelled" says the resources were deleted: here they were not.
        (Err(UploadError::Cancelled), Err(c)) => Err(c),
        (Err(e), Err(c)) => {
            tracing::error!(
                "{c}: {:?}",
                std::error::Error::source(&c).map(ToString::to_string)
            );
            Err(e)
        }
    }
}

/// Deletes the run's server, then its key (a key in use by a server's rescue cannot
/// always go first). Ids when known, else the unique names: a create whose answer was
/// lost, or a cancellation in the middle of one, may have made them anyway.
async fn cleanup(client: &Client, name: &str, ids: Created) -> Result<(), UploadError> {
    let started = Instant::now();
    let client = client.with_cancel(CancellationToken::new());
    let fail = |what: String| {
        move |source| UploadError::Cleanup {
            what,
            source: Box::new(source),
        }
    };
    let server = match ids.server {
        Some(id) => Some(id),
        None => client
            .server_by_name(name)
            .await
            .map_err(fail(format!("server {name}")))?
            .map(|s| s.id),
    };
    if let Some(id) = server {
        client
            .delete_server(id)
            .await
            .map_err(fail(format!("server {name} ({id})")))?;
    }
    let key = match ids.key {
        Some(id) => Some(id),
        None => client
            .ssh_key_by_name(name)
            .await
            .map_err(fail(format!("SSH key {name}")))?
            .map(|k| k.id),
    };
    if let Some(id) = key {
        client
            .delete_ssh_key(id)
            .await
            .map_err(fail(format!("SSH key {name} ({id})")))?;
    }
    tracing::info!(
        step = "cleanup",
        seconds = started.elapsed().as_secs_f64(),
        "deleted the temporary server and key"
    );
    Ok(())
}

struct Flow<'a> {
    client: Client,
    opts: &'a UploadOptions,
    image: &'a Upload,
    run_id: String,
    name: String,
    created: Arc<Mutex<Created>>,
    steps: Vec<(String, Duration)>,
    cancel: CancellationToken,
}

impl Flow<'_> {
    fn record(&mut self, step: &str, started: Instant) {
        let took = started.elapsed();
        tracing::info!(step, seconds = took.as_secs_f64(), "done");
        self.steps.push((step.to_owned(), took));
    }

    fn temp_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::CREATED_BY.to_owned(), labels::UPLOADER.to_owned()),
            (labels::RUN.to_owned(), self.run_id.clone()),
        ])
    }

    fn note(&self, f: impl FnOnce(&mut Created)) {
        f(&mut self.created.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The temporary key and server, noted for the cleanup as soon as each exists.
    async fn provision(&mut self) -> Result<(PrivateKey, SshKey, Server), UploadError> {
        let api = |step| {
            move |source| UploadError::Api {
                step,
                source: Box::new(source),
            }
        };
        let t = Instant::now();
        let key = new_key();
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|_| UploadError::Unexpected("an unencodable public key".into()))?;
        let ssh_key = self
            .client
            .create_ssh_key(&CreateSshKey {
                name: self.name.clone(),
                public_key: public,
                labels: self.temp_labels(),
            })
            .await
            .map_err(api("create the temporary SSH key"))?;
        self.note(|c| c.key = Some(ssh_key.id));
        self.record("create_ssh_key", t);

        let t = Instant::now();
        let server = self
            .client
            .create_server(&CreateServer {
                name: self.name.clone(),
                server_type: self.opts.server_type.clone(),
                image: self.opts.base_image.clone(),
                location: Some(self.opts.location.clone()),
                start_after_create: false,
                labels: self.temp_labels(),
                user_data: None,
            })
            .await
            .map_err(api("create the temporary server"))?;
        self.note(|c| c.server = Some(server.id));
        self.record("create_server", t);
        Ok((key, ssh_key, server))
    }

    async fn run(mut self) -> Result<Uploaded, UploadError> {
        let api = |step| {
            move |source| UploadError::Api {
                step,
                source: Box::new(source),
            }
        };
        let ssh = |step| {
            move |source| UploadError::Ssh {
                step,
                source: Box::new(source),
            }
        };

        let (key, ssh_key, server) = self.provision().await?;

        let t = Instant::now();
        self.client
            .enable_rescue(server.id, ssh_key.id)
            .await
            .map_err(api("enable the rescue system"))?;
        self.record("enable_rescue", t);

        let t = Instant::now();
        self.client
            .server_action(server.id, "poweron", None)
            .await
            .map_err(api("power on"))?;
        self.record("poweron", t);

        let ip: IpAddr = server
            .public_net
            .ipv4
            .as_ref()
            .and_then(|v| v.ip.parse().ok())
            .ok_or(UploadError::NoAddress(server.id))?;
        let addr = SocketAddr::new(ip, self.opts.ssh_port);
        let t = Instant::now();
        let rescue = Rescue::connect(addr, &key, &self.opts.ssh, &self.cancel)
            .await
            .map_err(ssh("reach the rescue system"))?;
        self.record("ssh", t);

        let written = self.write(&rescue).await;
        rescue.close().await;
        let (stream, bytes) = written?;

        let t = Instant::now();
        self.stop(server.id).await?;
        self.record("shutdown", t);

        let t = Instant::now();
        let snapshot = self
            .client
            .create_image(
                server.id,
                &CreateImage {
                    description: self.description(),
                    kind: "snapshot".into(),
                    labels: self.snapshot_labels()?,
                },
                &format!("{}={}", labels::RUN, self.run_id),
            )
            .await
            .map_err(api("create the snapshot"))?;
        self.record("create_image", t);
        Ok(Uploaded {
            snapshot,
            run_id: self.run_id,
            steps: self.steps,
            stream,
            bytes,
        })
    }

    /// Discard, stream, sync, verify. Returns the stream's time and bytes.
    // Over 80 lines: discard, stream and verify are one sequence on one session, each
    // step recorded; split, they would pass the session and the counter around.
    async fn write(&mut self, rescue: &Rescue) -> Result<(Duration, u64), UploadError> {
        let ssh = |step| {
            move |source| UploadError::Ssh {
                step,
                source: Box::new(source),
            }
        };
        let t = Instant::now();
        let out = rescue
            .run("blockdev --getsize64 /dev/sda")
            .await
            .map_err(ssh("read the disk's size"))?;
        let disk = number(&out.stdout)?;
        if disk < self.image.raw_size {
            return Err(UploadError::DiskTooSmall {
                disk,
                raw: self.image.raw_size,
            });
        }
        rescue
            .run("blkdiscard -f /dev/sda")
            .await
            .map_err(ssh("discard the disk"))?;
        self.record("blkdiscard", t);

        let t = Instant::now();
        let counter = Counter::default();
        let reporter = Reporter::start(
            self.opts.progress,
            "upload",
            self.image.file_size,
            counter.clone(),
        );
        let command = "set -o pipefail; zstd -dc | dd of=/dev/sda bs=4M conv=sparse \
                       iflag=fullblock status=none && sync";
        let sent = match self.image.encoding {
            Encoding::Zstd => {
                let file = tokio::fs::File::open(&self.image.path)
                    .await
                    .map_err(|e| ImageError::Open(self.image.path.clone(), e))?;
                rescue
                    .stream(command, Counted::new(file, counter.clone()))
                    .await
            }
            Encoding::Raw => {
                rescue
                    .stream(
                        command,
                        compress_raw(self.image.path.clone(), counter.clone()),
                    )
                    .await
            }
        };
        reporter.finish().await;
        sent.map_err(ssh("write the image to the disk"))?;
        let stream = t.elapsed();
        self.record("stream", t);

        let t = Instant::now();
        let out = rescue
            .run(&format!(
                "sync && head -c {} /dev/sda | sha256sum",
                self.image.raw_size
            ))
            .await
            .map_err(ssh("hash the disk"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let actual = text.split_whitespace().next().unwrap_or("").to_owned();
        if actual.len() != 64 || !actual.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(UploadError::Unexpected(text.into_owned()));
        }
        if actual != self.image.raw_sha256 {
            return Err(UploadError::Mismatch {
                size: self.image.raw_size,
                expected: self.image.raw_sha256.clone(),
                actual,
            });
        }
        self.record("verify", t);
        Ok((stream, counter.get()))
    }

    /// `shutdown` (ACPI), then `poweroff` if it is not off in time.
    async fn stop(&self, id: u64) -> Result<(), UploadError> {
        let api = |step| {
            move |source| UploadError::Api {
                step,
                source: Box::new(source),
            }
        };
        self.client
            .server_action(id, "shutdown", None)
            .await
            .map_err(api("shut down"))?;
        let started = Instant::now();
        while started.elapsed() < self.opts.shutdown_timeout {
            let s = self
                .client
                .get_server(id)
                .await
                .map_err(api("read the server's status"))?;
            if s.status == "off" {
                return Ok(());
            }
            tokio::time::sleep(self.client.timing().action_poll).await;
        }
        tracing::warn!(server = id, "not off after shutdown; powering off");
        self.client
            .server_action(id, "poweroff", None)
            .await
            .map_err(api("power off"))?;
        Ok(())
    }

    fn snapshot_labels(&self) -> Result<BTreeMap<String, String>, UploadError> {
        let mut l = self.opts.labels.clone();
        l.insert(labels::IMAGE.into(), self.image.name.clone());
        l.insert(labels::VERSION.into(), self.image.version.clone());
        l.insert(
            labels::SHA256.into(),
            self.image.raw_sha256[..labels::SHA256_PREFIX].to_owned(),
        );
        l.insert(labels::ARCH.into(), "x86".into());
        l.insert(labels::RUN.into(), self.run_id.clone());
        labels::check(&l)?;
        Ok(l)
    }

    fn description(&self) -> String {
        self.opts.description.clone().unwrap_or_else(|| {
            format!(
                "basalt {} {} sha256:{}",
                self.image.name,
                self.image.version,
                &self.image.raw_sha256[..16]
            )
        })
    }
}

fn new_key() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ))
}

fn number(out: &[u8]) -> Result<u64, UploadError> {
    let text = String::from_utf8_lossy(out);
    text.trim()
        .parse()
        .map_err(|_| UploadError::Unexpected(text.into_owned()))
}

/// A reader that counts what passes through it.
struct Counted<R> {
    inner: R,
    counter: Counter,
}

impl<R> Counted<R> {
    fn new(inner: R, counter: Counter) -> Self {
        Counted { inner, counter }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.counter.add((buf.filled().len() - before) as u64);
        r
    }
}

/// A `.raw` compressed on the fly in a blocking thread, as an async reader.
fn compress_raw(path: PathBuf, counter: Counter) -> impl AsyncRead + Unpin + Send + 'static {
    let (rx, tx) = tokio::io::duplex(1 << 20);
    tokio::task::spawn_blocking(move || {
        let mut out = tokio_util::io::SyncIoBridge::new(tx);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(path = %path.display(), "{e}");
                return;
            }
        };
        let input = CountedSync {
            inner: file,
            counter,
        };
        // An error ends the stream short; the rescue's zstd then fails on the
        // truncated frame, and the upload with it.
        if let Err(e) = zstd::stream::copy_encode(input, &mut out, RAW_LEVEL) {
            tracing::error!(path = %path.display(), "compressing: {e}");
            return;
        }
        let _ = std::io::Write::flush(&mut out);
    });
    rx
}

struct CountedSync<R> {
    inner: R,
    counter: Counter,
}

impl<R: std::io::Read> std::io::Read for CountedSync<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.add(n as u64);
        Ok(n)
    }
}
