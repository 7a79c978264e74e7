//! The images VMs are created from: files named in the settings, or the `*.raw` files of
//! directories named there, newest first.

use std::fs;
use std::path::Path;

use serde::Deserialize;

use super::{Inner, QemuError, MANIFEST_FILE};
use crate::provider::Image;

impl Inner {
    pub(super) fn images(&self) -> Result<Vec<Image>, QemuError> {
        let mut files = Vec::new();
        for entry in &self.settings.images {
            let image_error = |source| QemuError::Image {
                path: entry.clone(),
                source,
            };
            if fs::metadata(entry).map_err(image_error)?.is_dir() {
                for file in fs::read_dir(entry).map_err(image_error)? {
                    let path = file.map_err(image_error)?.path();
                    if path.extension().is_some_and(|e| e == "raw") && path.is_file() {
                        files.push(path);
                    }
                }
            } else {
                files.push(entry.clone());
            }
        }
        let mut images = Vec::new();
        for file in files {
            let image_error = |source| QemuError::Image {
                path: file.clone(),
                source,
            };
            let path = file.canonicalize().map_err(image_error)?;
            let created = fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(image_error)?;
            let id = path
                .to_str()
                .ok_or_else(|| QemuError::ImagePath(path.clone()))?
                .to_owned();
            if images.iter().any(|i: &Image| i.id == id) {
                continue;
            }
            images.push(Image {
                version: manifest_version(&path),
                id,
                created,
            });
        }
        images.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
        Ok(images)
    }
}

/// `basalt_version` from the `manifest.json` beside `image`, when that manifest lists the
/// image among its outputs (a directory of several builds has one manifest, of the last).
fn manifest_version(image: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Manifest {
        basalt_version: String,
        outputs: Vec<Output>,
    }
    #[derive(Deserialize)]
    struct Output {
        file: String,
    }
    let path = image.with_file_name(MANIFEST_FILE);
    let text = fs::read(&path).ok()?;
    let manifest: Manifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(manifest = %path.display(), error = %e, "not a basalt manifest");
            return None;
        }
    };
    let file = image.file_name()?.to_str()?;
    manifest
        .outputs
        .iter()
        .any(|o| o.file == file)
        .then_some(manifest.basalt_version)
}
