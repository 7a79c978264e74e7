//! Shared by the tests against the fake Hetzner API: images made here and checked with
//! independent tools (`zstd`, `sha256sum`), a fast client, and the leak check.

#![allow(dead_code)]
// Helpers of tests: a failure here is a test failure, and the lint's test exemption does
// not reach outside `#[test]` functions.
#![allow(clippy::unwrap_used)]

use basalt_hcloud::client::{Client, Timing};
use basalt_hcloud::fake::{Fake, FakeOptions};
use basalt_hcloud::progress::Mode;
use basalt_hcloud::ssh::SshTiming;
use basalt_hcloud::upload::UploadOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const MIB: u64 = 1024 * 1024;

/// A sparse raw disk of `size` bytes with random data at `regions` (offset, length),
/// its `.raw.zst` (by the zstd tool) and a manifest as `basalt build` writes one.
pub struct TestImage {
    pub raw: PathBuf,
    pub zst: PathBuf,
    pub sha256: String,
    pub size: u64,
}

pub fn sha256sum(path: &Path, bytes: Option<u64>) -> String {
    let cmd = match bytes {
        Some(n) => format!("head -c {n} '{}' | sha256sum", path.display()),
        None => format!("sha256sum '{}'", path.display()),
    };
    let out = Command::new("sh")
        .args(["-c", &cmd])
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "{cmd}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_owned()
}

pub fn make_image(dir: &Path, name: &str, size: u64, regions: &[(u64, u64)]) -> TestImage {
    let raw = dir.join(format!("{name}.raw"));
    let mut f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    for &(offset, len) in regions {
        let data: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&data).unwrap();
    }
    drop(f);
    let zst = dir.join(format!("{name}.raw.zst"));
    let st = Command::new("zstd")
        .args(["-q", "-3", "-f", "-o"])
        .arg(&zst)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success(), "zstd");
    let sha256 = sha256sum(&raw, None);
    let manifest = serde_json::json!({
        "basalt_version": "0.1.0",
        "name": name,
        "outputs": [
            {"file": format!("{name}.raw"), "sha256": sha256, "size": size},
            {"file": format!("{name}.raw.zst"), "sha256": sha256sum(&zst, None),
             "size": std::fs::metadata(&zst).unwrap().len()},
        ],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    TestImage {
        raw,
        zst,
        sha256,
        size,
    }
}

pub async fn fake() -> Fake {
    Fake::start(FakeOptions {
        disk_bytes: 96 * MIB,
        action_time: Duration::from_millis(30),
        ..FakeOptions::default()
    })
    .await
    .expect("start the fake")
}

pub fn timing() -> Timing {
    Timing {
        call_timeout: Duration::from_secs(10),
        attempts: 6,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        rate_limit_max_wait: Duration::from_secs(3),
        action_poll: Duration::from_millis(20),
        action_timeout: Duration::from_secs(60),
    }
}

pub fn client(fake: &Fake) -> Client {
    Client::new(&fake.endpoint(), fake.token(), timing()).unwrap()
}

pub fn options(fake: &Fake, image: &Path) -> UploadOptions {
    let mut o = UploadOptions::new(image.to_path_buf());
    o.ssh_port = fake.ssh_port();
    o.ssh = SshTiming {
        bound: Duration::from_secs(20),
        first_wait: Duration::from_millis(100),
        max_wait: Duration::from_secs(1),
        attempt_timeout: Duration::from_secs(5),
        inactivity: Duration::from_secs(30),
    };
    o.shutdown_timeout = Duration::from_secs(5);
    o.progress = Mode::Quiet;
    o
}

/// No server and no key is left, and no loop device points into the fake's files.
pub fn assert_nothing_leaked(fake: &Fake) {
    assert!(
        fake.servers().is_empty(),
        "servers leaked: {:?}",
        fake.servers()
    );
    assert!(
        fake.ssh_keys().is_empty(),
        "keys leaked: {:?}",
        fake.ssh_keys()
    );
}

/// Logs of the code under test in the test's output (`RUST_LOG` to change the level).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "basalt_hcloud=info".into()),
        )
        .with_test_writer()
        .try_init();
}
