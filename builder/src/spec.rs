//! The image spec: a TOML file that pins every input of an image.
//!
//! Parsing is strict: unknown keys and bad values are errors that name the file and the
//! key (serde's `deny_unknown_fields` plus checks in [`ImageSpec::validate`]).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Image name: output files are `<name>.raw`, `<name>.qcow2`, `<name>.bundle`.
    pub name: String,
    /// The image's version, semver (`1.2.0`, `1.3.0-rc.1`): os-release `VERSION_ID`, the
    /// root's image identity and the upgrade bundle; a node refuses a lower one unless told.
    /// Absent: `0.0.0` ([`basalt_api::bundle::DEFAULT_VERSION`]).
    #[serde(default)]
    pub version: Option<String>,
    pub kernel: Kernel,
    pub grub: Grub,
    pub k3s: K3s,
    pub ca_certificates: DebInput,
    #[serde(default)]
    pub init: Init,
    #[serde(default)]
    pub disk: Disk,
    #[serde(default)]
    pub apt: Apt,
}

/// A Debian package, fetched with `apt-get download NAME=VERSION`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DebInput {
    pub package: String,
    pub version: String,
    pub sha256: String,
}

/// A file fetched over HTTPS.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UrlInput {
    pub url: String,
    pub sha256: String,
    /// Size in bytes, as published; lets `basalt lock` pin it without a download.
    #[serde(default)]
    pub size: Option<u64>,
}

/// Where Debian packages come from besides the host's apt sources.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Apt {
    /// A snapshot archive (e.g. `https://snapshot.debian.org/archive/debian/20261101T000000Z`)
    /// from which a pinned package is fetched, by its pool path in the lock, once it has
    /// left the regular archive.
    #[serde(default)]
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    #[serde(flatten)]
    pub deb: DebInput,
    /// Modules the initramfs needs to reach the root (their dependencies are added).
    pub initramfs_modules: Vec<String>,
    /// Modules the root ships, as names or glob patterns (`xt_*`); dependencies and soft
    /// dependencies are added, built-ins skipped, and the initramfs's modules are always
    /// shipped too. Absent: [`crate::kmod::DEFAULT_MODULES`].
    #[serde(default)]
    pub modules: Option<Vec<String>>,
    /// Extra kernel command-line arguments, after basalt's own.
    #[serde(default)]
    pub cmdline: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grub {
    /// `grub-pc-bin`: i386-pc modules, boot.img.
    pub bios: DebInput,
    /// `grub-efi-amd64-bin`: x86_64-efi modules.
    pub efi: DebInput,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct K3s {
    pub version: String,
    pub binary: UrlInput,
    pub images: UrlInput,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum InitSource {
    /// Built from this source tree with cargo, static.
    #[default]
    Workspace,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Init {
    #[serde(default)]
    pub source: InitSource,
}

/// Partition sizes in MiB.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub esp_mib: u64,
    pub root_mib: u64,
    pub state_mib: u64,
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            esp_mib: 64,
            root_mib: 1024,
            state_mib: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("read image spec {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("image spec {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("image spec {path}: `{key}` {why}")]
    Invalid {
        path: PathBuf,
        key: String,
        why: String,
    },
}

/// Names by which inputs are known on the command line (`--input NAME=PATH`) and in the
/// manifest.
pub const INPUT_NAMES: [&str; 6] = [
    "kernel",
    "grub-bios",
    "grub-efi",
    "ca-certificates",
    "k3s",
    "k3s-images",
];

/// Where one input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Deb { package: String, version: String },
    Url(String),
}

/// A pinned input: its name, where it comes from, and the sha256 it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub name: &'static str,
    pub source: Source,
    pub sha256: String,
    /// Where to fetch it when the primary source no longer has it (from the lock).
    pub fallback_url: Option<String>,
}

impl ImageSpec {
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| SpecError::Read(path.to_owned(), e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, SpecError> {
        let spec: ImageSpec =
            toml::from_str(text).map_err(|e| SpecError::Parse(path.to_owned(), e))?;
        spec.validate(path)?;
        Ok(spec)
    }

    /// [`ImageSpec::version`], or the default when the spec names none (checked by
    /// [`ImageSpec::parse`]).
    pub fn version(&self) -> semver::Version {
        let text = self
            .version
            .as_deref()
            .unwrap_or(basalt_api::bundle::DEFAULT_VERSION);
        basalt_api::bundle::parse_version(text).unwrap_or(semver::Version::new(0, 0, 0))
    }

    /// Every pinned input, in a fixed order.
    pub fn inputs(&self) -> Vec<Pinned> {
        let deb = |name, d: &DebInput| Pinned {
            name,
            source: Source::Deb {
                package: d.package.clone(),
                version: d.version.clone(),
            },
            sha256: d.sha256.clone(),
            fallback_url: None,
        };
        let url = |name, u: &UrlInput| Pinned {
            name,
            source: Source::Url(u.url.clone()),
            sha256: u.sha256.clone(),
            fallback_url: None,
        };
        vec![
            deb("kernel", &self.kernel.deb),
            deb("grub-bios", &self.grub.bios),
            deb("grub-efi", &self.grub.efi),
            deb("ca-certificates", &self.ca_certificates),
            url("k3s", &self.k3s.binary),
            url("k3s-images", &self.k3s.images),
        ]
    }

    // One check after another, each naming its key: longer than our usual function, but a
    // flat list reads better than checks scattered over helpers.
    fn validate(&self, path: &Path) -> Result<(), SpecError> {
        let invalid = |key: &str, why: &str| SpecError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            why: why.to_owned(),
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !self.name.starts_with('.');
        if !name_ok {
            return Err(invalid(
                "name",
                "must be 1-64 of [A-Za-z0-9._-], not starting with '.'",
            ));
        }
        if let Some(v) = &self.version {
            // os-release's VERSION_ID allows [a-z0-9._-] only: no build metadata, lower case.
            let os_release_ok = v
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
            if basalt_api::bundle::parse_version(v).is_err() || !os_release_ok || v.trim() != v {
                return Err(invalid(
                    "version",
                    "must be a semantic version (1.2.3 or 1.2.3-rc.1), lower case, without +build metadata",
                ));
            }
        }
        let keys: BTreeMap<&str, &str> = [
            ("kernel.sha256", self.kernel.deb.sha256.as_str()),
            ("grub.bios.sha256", &self.grub.bios.sha256),
            ("grub.efi.sha256", &self.grub.efi.sha256),
            ("ca_certificates.sha256", &self.ca_certificates.sha256),
            ("k3s.binary.sha256", &self.k3s.binary.sha256),
            ("k3s.images.sha256", &self.k3s.images.sha256),
        ]
        .into();
        for (key, value) in keys {
            if value.len() != 64
                || !value
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(invalid(key, "must be 64 lowercase hex digits"));
            }
        }
        if let Some(snap) = &self.apt.snapshot {
            if !(snap.starts_with("https://") || snap.starts_with("http://")) {
                return Err(invalid("apt.snapshot", "must be an http(s):// URL"));
            }
        }
        for (key, url) in [
            ("k3s.binary.url", &self.k3s.binary.url),
            ("k3s.images.url", &self.k3s.images.url),
        ] {
            if !url.starts_with("https://") {
                return Err(invalid(key, "must be an https:// URL"));
            }
        }
        for (key, d) in [
            ("kernel", &self.kernel.deb),
            ("grub.bios", &self.grub.bios),
            ("grub.efi", &self.grub.efi),
            ("ca_certificates", &self.ca_certificates),
        ] {
            let ok =
                |s: &str| !s.is_empty() && !s.contains(char::is_whitespace) && !s.contains('=');
            if !ok(&d.package) {
                return Err(invalid(
                    &format!("{key}.package"),
                    "must be a Debian package name",
                ));
            }
            if !ok(&d.version) {
                return Err(invalid(
                    &format!("{key}.version"),
                    "must be a Debian version",
                ));
            }
        }
        if self.kernel.initramfs_modules.is_empty() {
            return Err(invalid(
                "kernel.initramfs_modules",
                "must name at least one module",
            ));
        }
        if let Some(bad) =
            self.kernel.cmdline.iter().find(|a| {
                a.is_empty() || a.contains(char::is_whitespace) || a.starts_with("basalt.")
            })
        {
            return Err(invalid(
                "kernel.cmdline",
                &format!("bad argument {bad:?}: one word each, and basalt.* is reserved"),
            ));
        }
        let d = &self.disk;
        if !(16..=1024).contains(&d.esp_mib) {
            return Err(invalid("disk.esp_mib", "must be between 16 and 1024"));
        }
        if !(64..=65536).contains(&d.root_mib) {
            return Err(invalid("disk.root_mib", "must be between 64 and 65536"));
        }
        if !(16..=65536).contains(&d.state_mib) {
            return Err(invalid("disk.state_mib", "must be between 16 and 65536"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn default_spec_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/k3s-node.toml")
    }

    #[test]
    fn the_default_spec_parses_and_lists_every_input() {
        let spec = ImageSpec::load(&default_spec_path()).expect("default spec is valid");
        assert_eq!(spec.name, "k3s-node");
        let names: Vec<_> = spec.inputs().iter().map(|p| p.name).collect();
        assert_eq!(names, INPUT_NAMES);
        assert_eq!(spec.version(), semver::Version::new(0, 1, 0));
    }

    #[test]
    fn a_spec_without_version_is_0_0_0() {
        let text = std::fs::read_to_string(default_spec_path()).expect("read");
        let without = text.replace("version = \"0.1.0\"\n", "");
        assert_ne!(without, text, "the default spec names its version");
        let spec = ImageSpec::parse(&without, Path::new("x.toml")).expect("valid");
        assert_eq!(spec.version, None);
        assert_eq!(
            spec.version().to_string(),
            basalt_api::bundle::DEFAULT_VERSION
        );
    }

    fn err_of(edit: impl Fn(String) -> String) -> String {
        let text = std::fs::read_to_string(default_spec_path()).expect("read");
        let edited = edit(text);
        ImageSpec::parse(&edited, Path::new("x.toml"))
            .expect_err("must be refused")
            .to_string()
            + &format!("{:?}", ImageSpec::parse(&edited, Path::new("x.toml")).err())
    }

    type Edit = Box<dyn Fn(String) -> String>;

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|t| t.replace("esp_mib", "esp_mb")), "esp_mb"),
            (
                Box::new(|t| t.replace("name = \"k3s-node\"", "name = \"../x\"")),
                "`name`",
            ),
            (
                Box::new(|t| t.replacen("sha256 = \"", "sha256 = \"zz", 1)),
                "kernel.sha256",
            ),
            (
                Box::new(|t| t.replace("esp_mib = 64", "esp_mib = 1")),
                "disk.esp_mib",
            ),
            (
                Box::new(|t| t.replace("esp_mib = 64", "esp_mib = \"big\"")),
                "esp_mib",
            ),
            (Box::new(|t| t + "\n[surprise]\nx = 1\n"), "surprise"),
            (
                Box::new(|t| t.replace("version = \"0.1.0\"\n", "version = \"1.2\"\n")),
                "`version`",
            ),
            (
                Box::new(|t| t.replace("version = \"0.1.0\"\n", "version = \"1.2.3+b1\"\n")),
                "`version`",
            ),
            (
                Box::new(|t| t.replace("\"console=tty0\"", "\"basalt.slot=b\"")),
                "kernel.cmdline",
            ),
        ];
        for (edit, key) in cases {
            let msg = err_of(edit);
            assert!(msg.contains(key), "expected {key} in: {msg}");
            assert!(msg.contains("x.toml"), "expected the file name in: {msg}");
        }
    }
}
