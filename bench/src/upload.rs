//! `basalt bench upload`: the upload's throughput on loopback against the fake Hetzner
//! API (a test double; its rescue system is a real OpenSSH sshd over a loop device),
//! against a floor measured in the same run, alternating with it.
//!
//! Two baselines, both one plain SSH session with OpenSSH's own client to the same sshd,
//! on a fresh rescue system, with no API calls, no discard, no sync and no verification:
//! - the **floor**, the work no upload can skip: read the `.raw.zst`, send it, decompress
//!   it on the rescue side (`ssh … 'zstd -dc > /dev/null' < FILE`);
//! - **plain dd**: the same, writing every decompressed byte to `/dev/sda`
//!   (`'zstd -dc | dd of=/dev/sda bs=4M'`), holes included, as an upload without
//!   `conv=sparse` would.

use super::stats::Spread;
use basalt_hcloud::api::{CreateServer, CreateSshKey};
use basalt_hcloud::client::{ApiError, Client, Timing};
use basalt_hcloud::fake::{Fake, FakeError, FakeOptions};
use basalt_hcloud::progress::Mode;
use basalt_hcloud::upload::{upload, UploadError, UploadOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum UploadBenchError {
    #[error("{0}: bench upload takes a .raw.zst")]
    NotZst(PathBuf),
    #[error(transparent)]
    Fake(#[from] FakeError),
    #[error("the upload")]
    Upload(#[source] Box<UploadError>),
    #[error("the floor's server")]
    Api(#[source] Box<ApiError>),
    #[error("the floor: {0}")]
    Floor(String),
    #[error("HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("start the async runtime")]
    Runtime(#[source] std::io::Error),
}

pub struct UploadBench {
    image: PathBuf,
    file_bytes: u64,
    raw_bytes: u64,
    /// Seconds: the upload's stream step, the whole upload, the floor, plain dd.
    stream: Vec<f64>,
    total: Vec<f64>,
    floor: Vec<f64>,
    plain: Vec<f64>,
}

/// Runs `runs` uploads and `runs` floors, alternating.
pub fn run(image: &Path, runs: usize) -> Result<UploadBench, UploadBenchError> {
    if !image.to_string_lossy().ends_with(".raw.zst") {
        return Err(UploadBenchError::NotZst(image.to_path_buf()));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(UploadBenchError::Runtime)?;
    rt.block_on(run_async(image, runs))
}

async fn run_async(image: &Path, runs: usize) -> Result<UploadBench, UploadBenchError> {
    let meta = basalt_hcloud::image::Upload::open(image, None)
        .map_err(|e| UploadBenchError::Upload(Box::new(e.into())))?;
    let fake = Fake::start(FakeOptions {
        disk_bytes: meta.raw_size.max(1 << 30),
        ..FakeOptions::default()
    })
    .await?;
    let client = Client::new(&fake.endpoint(), fake.token(), Timing::default())
        .map_err(UploadBenchError::Http)?;
    let mut bench = UploadBench {
        image: image.to_path_buf(),
        file_bytes: meta.file_size,
        raw_bytes: meta.raw_size,
        stream: Vec::new(),
        total: Vec::new(),
        floor: Vec::new(),
        plain: Vec::new(),
    };
    let result = async {
        for n in 0..runs {
            let mut opts = UploadOptions::new(image.to_path_buf());
            opts.ssh_port = fake.ssh_port();
            opts.progress = Mode::Quiet;
            let t = Instant::now();
            let done = upload(&client, &opts, CancellationToken::new())
                .await
                .map_err(|e| UploadBenchError::Upload(Box::new(e)))?;
            bench.total.push(t.elapsed().as_secs_f64());
            bench.stream.push(done.stream.as_secs_f64());
            client
                .delete_image(done.snapshot.id)
                .await
                .map_err(|e| UploadBenchError::Api(Box::new(e)))?;
            let (floor, plain) = floor(&client, &fake, image, n).await?;
            bench.floor.push(floor);
            bench.plain.push(plain);
        }
        Ok(())
    }
    .await;
    fake.shutdown().await;
    result.map(|()| bench)
}

/// One floor and one plain dd run on a fresh rescue system; their seconds.
// Over 80 lines: the floor provisions its own rescue system through the API, times two
// streams on it and always deletes it; one place keeps the cleanup next to the setup.
async fn floor(
    client: &Client,
    fake: &Fake,
    image: &Path,
    n: usize,
) -> Result<(f64, f64), UploadBenchError> {
    let api = |e| UploadBenchError::Api(Box::new(e));
    let dir = tempfile::tempdir().map_err(|e| UploadBenchError::Floor(e.to_string()))?;
    let key = dir.path().join("key");
    let keygen = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .await
        .map_err(|e| UploadBenchError::Floor(format!("ssh-keygen: {e}")))?;
    if !keygen.success() {
        return Err(UploadBenchError::Floor("ssh-keygen failed".into()));
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .map_err(|e| UploadBenchError::Floor(e.to_string()))?;
    let name = format!("basalt-bench-floor-{n}");
    let labels = BTreeMap::from([("basalt.io/created-by".to_owned(), "basalt-bench".to_owned())]);
    let ssh_key = client
        .create_ssh_key(&CreateSshKey {
            name: name.clone(),
            public_key: public.trim().to_owned(),
            labels: labels.clone(),
        })
        .await
        .map_err(api)?;
    let server = client
        .create_server(&CreateServer {
            name,
            server_type: "cx22".into(),
            image: "debian-12".into(),
            location: Some("fsn1".into()),
            start_after_create: false,
            labels,
            user_data: None,
        })
        .await
        .map_err(api)?;
    let timed = async {
        client
            .enable_rescue(server.id, ssh_key.id)
            .await
            .map_err(api)?;
        client
            .server_action(server.id, "poweron", None)
            .await
            .map_err(api)?;
        let ip = server
            .public_net
            .ipv4
            .as_ref()
            .map(|v| v.ip.clone())
            .unwrap_or_default();
        let ssh = |cmd: &str| {
            let mut c = tokio::process::Command::new("ssh");
            c.arg("-i")
                .arg(&key)
                .args(["-p", &fake.ssh_port().to_string()])
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                ])
                .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
                .arg(format!("root@{ip}"))
                .arg(cmd);
            c
        };
        for _ in 0..50 {
            let up = ssh("true").stdin(Stdio::null()).status().await;
            if up.is_ok_and(|s| s.success()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut secs = Vec::new();
        for cmd in [
            "zstd -dc > /dev/null",
            "zstd -dc | dd of=/dev/sda bs=4M status=none",
        ] {
            let file =
                std::fs::File::open(image).map_err(|e| UploadBenchError::Floor(e.to_string()))?;
            let t = Instant::now();
            let st = ssh(cmd)
                .stdin(Stdio::from(file))
                .status()
                .await
                .map_err(|e| UploadBenchError::Floor(format!("ssh: {e}")))?;
            secs.push(t.elapsed().as_secs_f64());
            if !st.success() {
                return Err(UploadBenchError::Floor(format!("ssh '{cmd}' exited {st}")));
            }
        }
        Ok((secs[0], secs[1]))
    }
    .await;
    let _ = client.delete_server(server.id).await;
    let _ = client.delete_ssh_key(ssh_key.id).await;
    timed
}

impl std::fmt::Display for UploadBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(f, "basalt bench upload {}", self.image.display())?;
        writeln!(f, "  machine: {}", super::machine())?;
        writeln!(
            f,
            "  {:.1} MiB .raw.zst, {:.1} MiB raw; the fake Hetzner API on loopback, its rescue a real \
             OpenSSH sshd with a loop device as /dev/sda; {} runs of each, alternating",
            mib(self.file_bytes),
            mib(self.raw_bytes),
            self.stream.len()
        )?;
        writeln!(f)?;
        let rows = [
            (
                "upload, stream step (russh → zstd -d | dd conv=sparse, sync)",
                &self.stream,
            ),
            (
                "upload, whole (API, rescue, discard, stream, verify, snapshot, cleanup)",
                &self.total,
            ),
            (
                "floor (ssh < FILE 'zstd -dc > /dev/null', OpenSSH client)",
                &self.floor,
            ),
            (
                "plain dd (ssh < FILE 'zstd -dc | dd of=/dev/sda', every byte)",
                &self.plain,
            ),
        ];
        writeln!(
            f,
            "  {:<76}{:>9} {:>17} {:>10}",
            "", "median s", "(min–max)", "file MiB/s"
        )?;
        for (name, samples) in rows {
            if let Some(s) = Spread::of(samples.iter().copied()) {
                writeln!(
                    f,
                    "  {name:<76}{:>9.2} ({:>6.2}–{:<6.2}) {:>10.1}",
                    s.median,
                    s.min,
                    s.max,
                    mib(self.file_bytes) / s.median.max(1e-9)
                )?;
            }
        }
        let (Some(st), Some(tot), Some(fl), Some(pl)) = (
            Spread::of(self.stream.iter().copied()),
            Spread::of(self.total.iter().copied()),
            Spread::of(self.floor.iter().copied()),
            Spread::of(self.plain.iter().copied()),
        ) else {
            return Ok(());
        };
        writeln!(
            f,
            "\n  ratio to the floor (median): stream {:.2}×, whole upload {:.2}×; plain dd {:.2}×",
            st.median / fl.median,
            tot.median / fl.median,
            pl.median / fl.median
        )
    }
}
