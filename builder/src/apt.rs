//! Debian's archive through the host's apt: where a pinned package is (`--print-uris`),
//! which versions the archive still has, and downloads.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A package as the archive lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEntry {
    /// Path below the archive root, e.g. `pool/main/c/ca-certificates/…deb`.
    pub filename: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("run {0} (is apt installed?)")]
    Spawn(&'static str, #[source] std::io::Error),
    #[error("Debian package {package}={version} has left the archive (it still has: {available}); run `basalt lock --update {input}` to re-pin, or set [apt] snapshot in the spec")]
    LeftArchive {
        input: String,
        package: String,
        version: String,
        available: String,
    },
    #[error(
        "Debian package {package}={version}: apt-get failed (run `apt-get update`?): {stderr}"
    )]
    Failed {
        package: String,
        version: String,
        stderr: String,
    },
    #[error("Debian package {0}: apt knows no candidate version")]
    NoCandidate(String),
}

/// Where `package=version` is in the archive, with its size and sha256, without
/// downloading it.
pub fn locate(input: &str, package: &str, version: &str) -> Result<ArchiveEntry, AptError> {
    let out = Command::new("apt-get")
        .args([
            "download",
            "--print-uris",
            "-q",
            &format!("{package}={version}"),
        ])
        .output()
        .map_err(|e| AptError::Spawn("apt-get", e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), parse_print_uris(&stdout)) {
        (true, Some(entry)) => Ok(entry),
        _ => Err(explain(
            input,
            package,
            version,
            &String::from_utf8_lossy(&out.stderr),
        )),
    }
}

/// Downloads `package=version` into `dir`; returns the .deb's path.
pub fn download(
    input: &str,
    package: &str,
    version: &str,
    dir: &Path,
) -> Result<PathBuf, AptError> {
    let out = Command::new("apt-get")
        .args(["download", "-q", &format!("{package}={version}")])
        .current_dir(dir)
        .output()
        .map_err(|e| AptError::Spawn("apt-get", e))?;
    if !out.status.success() {
        return Err(explain(
            input,
            package,
            version,
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    let debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| AptError::Spawn("apt-get", e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    match debs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(AptError::Failed {
            package: package.into(),
            version: version.into(),
            stderr: format!("expected one .deb, found {}", debs.len()),
        }),
    }
}

/// The version `apt-get install` would pick now.
pub fn candidate(package: &str) -> Result<String, AptError> {
    let out = Command::new("apt-cache")
        .args(["policy", package])
        .output()
        .map_err(|e| AptError::Spawn("apt-cache", e))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Candidate:")
                .map(|v| v.trim().to_owned())
        })
        .filter(|v| v != "(none)" && !v.is_empty())
        .ok_or_else(|| AptError::NoCandidate(package.into()))
}

/// Versions of `package` the archive has.
pub fn available(package: &str) -> Vec<String> {
    let Ok(out) = Command::new("apt-cache")
        .args(["madison", package])
        .output()
    else {
        return vec![];
    };
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('|').nth(1).map(|v| v.trim().to_owned()))
        .collect();
    v.dedup();
    v
}

/// Tells "left the archive" apart from other apt failures.
fn explain(input: &str, package: &str, version: &str, stderr: &str) -> AptError {
    let available = available(package);
    if !available.is_empty() && !available.iter().any(|v| v == version) {
        return AptError::LeftArchive {
            input: input.into(),
            package: package.into(),
            version: version.into(),
            available: available.join(", "),
        };
    }
    let useful: Vec<_> = stderr.lines().filter(|l| l.starts_with("E:")).collect();
    AptError::Failed {
        package: package.into(),
        version: version.into(),
        stderr: if useful.is_empty() {
            stderr.trim().into()
        } else {
            useful.join("; ")
        },
    }
}

/// `'URI' FILE SIZE SHA256:HEX` → the archive entry.
fn parse_print_uris(stdout: &str) -> Option<ArchiveEntry> {
    let line = stdout.lines().find(|l| l.starts_with('\''))?;
    let mut words = line.split_whitespace();
    let uri = words.next()?.trim_matches('\'');
    let _file = words.next()?;
    let size = words.next()?.parse().ok()?;
    let sha256 = words.next()?.strip_prefix("SHA256:")?.to_ascii_lowercase();
    let filename = uri.find("/pool/").map(|i| &uri[i + 1..])?;
    Some(ArchiveEntry {
        filename: url_decode(filename),
        size,
        sha256,
    })
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn print_uris_line_is_parsed_into_pool_path_size_and_hash() {
        let out = "'http://deb.debian.org/debian/pool/main/c/ca-certificates/ca-certificates_20230311%2bdeb12u1_all.deb' ca-certificates_20230311+deb12u1_all.deb 155260 SHA256:0D5F\n";
        assert_eq!(
            parse_print_uris(out),
            Some(ArchiveEntry {
                filename: "pool/main/c/ca-certificates/ca-certificates_20230311+deb12u1_all.deb"
                    .into(),
                size: 155260,
                sha256: "0d5f".into()
            })
        );
        assert_eq!(parse_print_uris("E: nothing\n"), None);
    }
}
