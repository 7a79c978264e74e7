//! `sbom.spdx.json`: an SPDX 2.3 JSON document listing each input of the image with its
//! version, sha256, download location and license where the package declares one.
//!
//! Written with serde from the SPDX 2.3 JSON schema's field names; no maintained crate
//! writes SPDX 2.3 documents.

use crate::cache::{Origin, Resolved};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub spdx_version: &'static str,
    pub data_license: &'static str,
    #[serde(rename = "SPDXID")]
    pub spdx_id: &'static str,
    pub name: String,
    pub document_namespace: String,
    pub creation_info: CreationInfo,
    pub packages: Vec<Package>,
    pub relationships: Vec<Relationship>,
}

#[derive(Debug, Serialize)]
pub struct CreationInfo {
    /// Fixed so that the document is reproducible, like the image (SOURCE_DATE_EPOCH 0).
    pub created: &'static str,
    pub creators: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Package {
    #[serde(rename = "SPDXID")]
    pub spdx_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_info: Option<String>,
    pub download_location: String,
    pub files_analyzed: bool,
    pub checksums: Vec<Checksum>,
    pub license_declared: String,
    pub license_concluded: &'static str,
    pub copyright_text: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Checksum {
    pub algorithm: &'static str,
    #[serde(rename = "checksumValue")]
    pub value: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Relationship {
    pub spdx_element_id: String,
    pub relationship_type: &'static str,
    pub related_spdx_element: String,
}

/// One input as the SBOM sees it.
pub struct Item<'a> {
    pub input: &'a Resolved,
    pub version: Option<String>,
    /// Unpacked Debian package, to read its declared license from.
    pub unpacked: Option<&'a Path>,
    pub package: Option<String>,
}

pub fn document(image: &str, seed: &str, items: &[Item<'_>], init_sha256: &str) -> Document {
    let mut packages: Vec<Package> = items.iter().map(package).collect();
    packages.push(Package {
        spdx_id: "SPDXRef-Package-basalt-init".into(),
        name: "basalt-init".into(),
        version_info: Some(env!("CARGO_PKG_VERSION").into()),
        download_location: "NOASSERTION".into(),
        files_analyzed: false,
        checksums: vec![Checksum {
            algorithm: "SHA256",
            value: init_sha256.into(),
        }],
        license_declared: env!("CARGO_PKG_LICENSE").into(),
        license_concluded: "NOASSERTION",
        copyright_text: "NOASSERTION",
        comment: Some("built from the basalt source tree".into()),
    });
    let relationships = packages
        .iter()
        .map(|p| Relationship {
            spdx_element_id: "SPDXRef-DOCUMENT".into(),
            relationship_type: "DESCRIBES",
            related_spdx_element: p.spdx_id.clone(),
        })
        .collect();
    Document {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: format!("basalt image {image}"),
        document_namespace: format!("https://basalt.invalid/spdx/{image}-{seed}"),
        creation_info: CreationInfo {
            created: "1970-01-01T00:00:00Z",
            creators: vec![format!("Tool: basalt-{}", env!("CARGO_PKG_VERSION"))],
        },
        packages,
        relationships,
    }
}

fn package(item: &Item<'_>) -> Package {
    let r = item.input;
    let (download_location, comment) = match &r.origin {
        Origin::Apt { package, version } => (format!("apt:{package}={version}"), None),
        Origin::Url { url } => (url.clone(), None),
        Origin::Override {
            path,
            pinned_sha256,
            matches_pin,
        } => (
            "NOASSERTION".into(),
            Some(format!(
                "local override {} (pinned sha256 {pinned_sha256}, matches pin: {matches_pin})",
                path.display()
            )),
        ),
    };
    let license = item
        .unpacked
        .zip(item.package.as_deref())
        .and_then(|(dir, pkg)| debian_license(dir, pkg))
        .unwrap_or_else(|| "NOASSERTION".into());
    Package {
        spdx_id: format!("SPDXRef-Package-{}", sanitize(&r.name)),
        name: item.package.clone().unwrap_or_else(|| r.name.clone()),
        version_info: item.version.clone(),
        download_location,
        files_analyzed: false,
        checksums: vec![Checksum {
            algorithm: "SHA256",
            value: r.sha256.clone(),
        }],
        license_declared: license,
        license_concluded: "NOASSERTION",
        copyright_text: "NOASSERTION",
        comment,
    }
}

/// The license a Debian package declares in its machine-readable copyright file: the
/// `Files: *` paragraph's `License:`, else the first one; as an SPDX expression.
pub fn debian_license(unpacked: &Path, package: &str) -> Option<String> {
    let text = std::fs::read_to_string(
        unpacked
            .join("usr/share/doc")
            .join(package)
            .join("copyright"),
    )
    .ok()?;
    if !text.starts_with("Format:") {
        return None;
    }
    let mut first = None;
    for para in text.split("\n\n") {
        let license = para
            .lines()
            .find_map(|l| l.strip_prefix("License:"))
            .map(str::trim);
        let Some(license) = license.filter(|l| !l.is_empty()) else {
            continue;
        };
        if para.lines().any(|l| l.trim() == "Files: *") {
            return Some(spdx_name(license));
        }
        first.get_or_insert_with(|| spdx_name(license));
    }
    first
}

/// Debian short names to SPDX identifiers; unknown ones become `LicenseRef-`.
fn spdx_name(debian: &str) -> String {
    let known = match debian {
        "GPL-2" => "GPL-2.0-only",
        "GPL-2+" => "GPL-2.0-or-later",
        "GPL-3" => "GPL-3.0-only",
        "GPL-3+" => "GPL-3.0-or-later",
        "LGPL-2.1" => "LGPL-2.1-only",
        "LGPL-2.1+" => "LGPL-2.1-or-later",
        "MPL-2.0" => "MPL-2.0",
        "Apache-2.0" => "Apache-2.0",
        "MIT" | "Expat" => "MIT",
        "BSD-3-clause" => "BSD-3-Clause",
        _ => return format!("LicenseRef-{}", sanitize(debian)),
    };
    known.into()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_license_prefers_the_files_star_paragraph() {
        let d = tempfile::tempdir().expect("tempdir");
        let doc = d.path().join("usr/share/doc/pkg");
        std::fs::create_dir_all(&doc).expect("mkdir");
        std::fs::write(
            doc.join("copyright"),
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: debian/*\nLicense: GPL-2+\n\nFiles: *\nLicense: MPL-2.0\n",
        )
        .expect("write");
        assert_eq!(debian_license(d.path(), "pkg").as_deref(), Some("MPL-2.0"));
        assert_eq!(debian_license(d.path(), "other"), None);
    }

    #[test]
    fn unknown_licenses_become_license_refs() {
        assert_eq!(spdx_name("GPL-2"), "GPL-2.0-only");
        assert_eq!(spdx_name("Some thing"), "LicenseRef-Some-thing");
    }

    #[test]
    fn document_has_the_spdx_2_3_shape() {
        let r = Resolved {
            name: "k3s".into(),
            path: "/x".into(),
            sha256: "ab".repeat(32),
            size: 1,
            origin: Origin::Url {
                url: "https://example.invalid/k3s".into(),
            },
            cached: true,
        };
        let doc = document(
            "img",
            "seed",
            &[Item {
                input: &r,
                version: Some("v1".into()),
                unpacked: None,
                package: None,
            }],
            &"cd".repeat(32),
        );
        let v = serde_json::to_value(&doc).expect("json");
        assert_eq!(v["spdxVersion"], "SPDX-2.3");
        assert_eq!(v["SPDXID"], "SPDXRef-DOCUMENT");
        assert_eq!(
            v["packages"][0]["downloadLocation"],
            "https://example.invalid/k3s"
        );
        assert_eq!(v["packages"][0]["checksums"][0]["algorithm"], "SHA256");
        assert_eq!(v["packages"][1]["name"], "basalt-init");
        assert_eq!(v["relationships"].as_array().expect("rels").len(), 2);
    }
}
