//! Guest firmware: SeaBIOS (QEMU's default) or OVMF for UEFI.
//!
//! OVMF comes from the `ovmf-prebuilt` crate (pinned edk2 release, hash-checked, cached) when it
//! can be downloaded, else from Debian's `ovmf` package.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::Duration;

use ovmf_prebuilt::{Arch, FileType, Prebuilt, Source};

use crate::error::HarnessError;

/// `BASALT_OVMF_OFFLINE=1` skips the download.
pub const OVMF_OFFLINE_ENV: &str = "BASALT_OVMF_OFFLINE";
/// Where `ovmf-prebuilt` caches its download (default: `$TMPDIR/basalt-ovmf-prebuilt`).
pub const OVMF_CACHE_ENV: &str = "BASALT_OVMF_CACHE";

/// The download runs on a thread given this long; a hung connection must not hang a test.
const PREBUILT_TIMEOUT: Duration = Duration::from_secs(20);
/// Where `ovmf-prebuilt` downloads from.
const DOWNLOAD_HOST: &str = "github.com";

/// Debian's OVMF builds as (code, vars template), best first: the 4 MiB layout since bookworm.
const DEBIAN_OVMF: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// How the guest boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS boot through SeaBIOS.
    #[default]
    Bios,
    /// UEFI boot through OVMF (see [`ovmf`]).
    Uefi,
}

/// An OVMF build: read-only code and a template for the per-VM variable store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ovmf {
    /// The firmware code volume, mapped read-only.
    pub code: PathBuf,
    /// A pristine variable store; each VM writes to its own copy.
    pub vars_template: PathBuf,
    /// Where it came from: `"ovmf-prebuilt"` or `"debian ovmf package"`.
    pub source: String,
}

/// Finds OVMF once per process: `ovmf-prebuilt` (skipped when `BASALT_OVMF_OFFLINE=1`, given
/// up on after 20 s), then Debian's `ovmf` package. The error names why each attempt failed.
pub fn ovmf() -> Result<Ovmf, HarnessError> {
    static OVMF: OnceLock<Result<Ovmf, (String, String)>> = OnceLock::new();
    OVMF.get_or_init(find_ovmf)
        .clone()
        .map_err(|(prebuilt, debian)| HarnessError::Ovmf { prebuilt, debian })
}

fn find_ovmf() -> Result<Ovmf, (String, String)> {
    let prebuilt = if std::env::var_os(OVMF_OFFLINE_ENV).is_some_and(|v| v == "1") {
        Err(format!("skipped ({OVMF_OFFLINE_ENV}=1)"))
    } else {
        fetch_prebuilt(cache_dir(), PREBUILT_TIMEOUT)
    };
    let prebuilt_error = match prebuilt {
        Ok(found) => return Ok(found),
        Err(e) => e,
    };
    debian_ovmf(DEBIAN_OVMF).map_err(|debian_error| (prebuilt_error, debian_error))
}

fn cache_dir() -> PathBuf {
    std::env::var_os(OVMF_CACHE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("basalt-ovmf-prebuilt"))
}

fn fetch_prebuilt(dir: PathBuf, timeout: Duration) -> Result<Ovmf, String> {
    let prebuilt = on_thread_with_timeout(timeout, move || {
        download_host_resolves(&dir)?;
        Prebuilt::fetch(Source::LATEST, &dir).map_err(|e| error_chain(&e))
    })??;
    let code = prebuilt.get_file(Arch::X64, FileType::Code);
    let vars_template = prebuilt.get_file(Arch::X64, FileType::Vars);
    for file in [&code, &vars_template] {
        if !file.is_file() {
            return Err(format!("{} missing after download", file.display()));
        }
    }
    Ok(Ovmf {
        code,
        vars_template,
        source: "ovmf-prebuilt".into(),
    })
}

/// `ovmf-prebuilt` retries a failed download for 15 s; where the download host does not even
/// resolve, fail at once. A filled cache (its documented `sha256` file) needs no network.
fn download_host_resolves(dir: &Path) -> Result<(), String> {
    if dir.join("sha256").is_file() {
        return Ok(());
    }
    (DOWNLOAD_HOST, 443)
        .to_socket_addrs()
        .map(drop)
        .map_err(|e| format!("{DOWNLOAD_HOST} does not resolve: {e}"))
}

/// Runs `f` on its own thread and waits at most `timeout` for it. A thread that overruns is left
/// behind: a blocking download (ureq) cannot be cancelled.
fn on_thread_with_timeout<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("ovmf-prebuilt".into())
        .spawn(move || {
            // The receiver is gone when the caller gave up waiting: nothing left to tell.
            let _ = tx.send(f());
        })
        .map_err(|e| format!("cannot start download thread: {e}"))?;
    rx.recv_timeout(timeout).map_err(|e| match e {
        mpsc::RecvTimeoutError::Timeout => format!("gave up after {timeout:?}"),
        mpsc::RecvTimeoutError::Disconnected => "download thread died".into(),
    })
}

fn debian_ovmf(candidates: &[(&str, &str)]) -> Result<Ovmf, String> {
    candidates
        .iter()
        .map(|&(code, vars)| (Path::new(code), Path::new(vars)))
        .find(|(code, vars)| code.is_file() && vars.is_file())
        .map(|(code, vars)| Ovmf {
            code: code.to_path_buf(),
            vars_template: vars.to_path_buf(),
            source: "debian ovmf package".into(),
        })
        .ok_or_else(|| {
            let tried: Vec<&str> = candidates.iter().map(|&(code, _)| code).collect();
            format!("none of {} exists (apt install ovmf)", tried.join(", "))
        })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_fallback_takes_the_first_complete_pair() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        std::fs::write(path("CODE_4M.fd"), b"code")?;
        std::fs::write(path("CODE.fd"), b"code")?;
        std::fs::write(path("VARS.fd"), b"vars")?;
        let (code_4m, vars_4m) = (path("CODE_4M.fd"), path("VARS_4M.fd"));
        let (code, vars) = (path("CODE.fd"), path("VARS.fd"));
        let found =
            debian_ovmf(&[(&code_4m, &vars_4m), (&code, &vars)]).map_err(anyhow::Error::msg)?;
        assert_eq!(found.code, PathBuf::from(&code));
        assert_eq!(found.vars_template, PathBuf::from(&vars));
        assert_eq!(found.source, "debian ovmf package");
        Ok(())
    }

    #[test]
    fn debian_fallback_names_what_it_looked_for() {
        let Err(e) = debian_ovmf(&[("/nonexistent/CODE.fd", "/nonexistent/VARS.fd")]) else {
            panic!("found OVMF in /nonexistent");
        };
        assert!(e.contains("/nonexistent/CODE.fd"), "{e}");
    }

    #[test]
    fn a_hung_download_is_given_up_on() {
        let started = std::time::Instant::now();
        let result = on_thread_with_timeout(Duration::from_millis(100), || {
            thread::sleep(Duration::from_secs(30));
        });
        assert!(result.is_err_and(|e| e.contains("gave up")));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn ovmf_is_found_on_this_host() -> anyhow::Result<()> {
        let found = ovmf()?;
        assert!(found.code.is_file(), "{}", found.code.display());
        assert!(found.vars_template.is_file());
        assert!(["ovmf-prebuilt", "debian ovmf package"].contains(&found.source.as_str()));
        Ok(())
    }
}
