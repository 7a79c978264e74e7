//! The image to upload and what its build said about it: `manifest.json` beside the
//! file, as `basalt build` writes it (`builder/src/manifest.rs`). The raw disk's sha256
//! and size are what the rescue system's write is checked against.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}: not a .raw or .raw.zst image")]
    Kind(PathBuf),
    #[error("{0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("{path}: not a basalt manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{manifest}: outputs has no entry for {file}")]
    NoOutput { manifest: PathBuf, file: String },
    #[error("{manifest}: outputs[{file}].sha256 {value:?} is not a sha256")]
    BadHash {
        manifest: PathBuf,
        file: String,
        value: String,
    },
}

/// How the bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Sent as it is and decompressed on the rescue side.
    Zstd,
    /// A plain raw disk; compressed on the fly (holes cost nothing on the wire).
    Raw,
}

/// An image ready to upload.
#[derive(Debug, Clone)]
pub struct Upload {
    pub path: PathBuf,
    pub encoding: Encoding,
    /// Bytes of the file as sent (compressed size for a `.raw.zst`).
    pub file_size: u64,
    /// The spec's name (`manifest.name`).
    pub name: String,
    /// basalt's version that built it.
    pub version: String,
    /// Logical size of the raw disk.
    pub raw_size: u64,
    /// sha256 of the raw disk, lowercase hex.
    pub raw_sha256: String,
}

#[derive(Deserialize)]
struct Manifest {
    name: String,
    basalt_version: String,
    outputs: Vec<Output>,
}

#[derive(Deserialize)]
struct Output {
    file: String,
    sha256: String,
    size: u64,
}

impl Upload {
    /// Reads `IMAGE`'s manifest (`manifest.json` beside it, unless `manifest` is given).
    pub fn open(path: &Path, manifest: Option<&Path>) -> Result<Upload, ImageError> {
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ImageError::Kind(path.to_path_buf()))?;
        let (raw_name, encoding) = if let Some(raw) = file_name.strip_suffix(".zst") {
            (raw.to_owned(), Encoding::Zstd)
        } else if file_name.ends_with(".raw") {
            (file_name.to_owned(), Encoding::Raw)
        } else {
            return Err(ImageError::Kind(path.to_path_buf()));
        };
        if !raw_name.ends_with(".raw") {
            return Err(ImageError::Kind(path.to_path_buf()));
        }
        let file_size = std::fs::metadata(path)
            .map_err(|e| ImageError::Open(path.to_path_buf(), e))?
            .len();
        let manifest_path =
            manifest.map_or_else(|| path.with_file_name("manifest.json"), Path::to_path_buf);
        let text = std::fs::read(&manifest_path)
            .map_err(|e| ImageError::Open(manifest_path.clone(), e))?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|source| ImageError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
        let out = m
            .outputs
            .iter()
            .find(|o| o.file == raw_name)
            .ok_or_else(|| ImageError::NoOutput {
                manifest: manifest_path.clone(),
                file: raw_name.clone(),
            })?;
        if out.sha256.len() != 64 || !out.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImageError::BadHash {
                manifest: manifest_path,
                file: raw_name,
                value: out.sha256.clone(),
            });
        }
        Ok(Upload {
            path: path.to_path_buf(),
            encoding,
            file_size,
            name: m.name,
            version: m.basalt_version,
            raw_size: out.size,
            raw_sha256: out.sha256.to_ascii_lowercase(),
        })
    }
}
