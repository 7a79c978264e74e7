//! Unpacking Debian packages: `ar` archive, then `data.tar.{xz,zst,gz}`.

use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("read Debian package {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Debian package {0} has no data.tar member")]
    NoData(PathBuf),
    #[error("Debian package {0}: unknown data member {1}")]
    Compression(PathBuf, String),
    #[error("unpack {deb} into {dir}")]
    Unpack {
        deb: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Unpacks the package's data (the files it installs) into `dir`.
pub fn unpack(deb: &Path, dir: &Path) -> Result<(), DebError> {
    let file = std::fs::File::open(deb).map_err(|e| DebError::Read(deb.into(), e))?;
    let mut archive = ar::Archive::new(file);
    while let Some(entry) = archive.next_entry() {
        let entry = entry.map_err(|e| DebError::Read(deb.into(), e))?;
        let name = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        if !name.starts_with("data.tar") {
            continue;
        }
        let reader: Box<dyn Read> = match name.as_str() {
            "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(entry)),
            "data.tar.zst" => Box::new(
                zstd::stream::read::Decoder::new(entry)
                    .map_err(|e| DebError::Read(deb.into(), e))?,
            ),
            "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(entry)),
            "data.tar" => Box::new(entry),
            other => return Err(DebError::Compression(deb.into(), other.into())),
        };
        let mut tar = tar::Archive::new(reader);
        tar.set_preserve_permissions(true);
        tar.set_preserve_mtime(false);
        return tar.unpack(dir).map_err(|source| DebError::Unpack {
            deb: deb.into(),
            dir: dir.into(),
            source,
        });
    }
    Err(DebError::NoData(deb.into()))
}
