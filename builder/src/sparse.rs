//! Reading a sparse file front to back without reading its holes: data extents are read,
//! holes are handed out from a zero buffer (SEEK_DATA / SEEK_HOLE).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const CHUNK: usize = 1 << 20;

/// Calls `sink` with the file's bytes in order; returns the length.
pub fn stream(
    path: &Path,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let mut src = std::fs::File::open(path)?;
    let len = src.metadata()?.len();
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let data_start = seek(&src, pos, nix::unistd::Whence::SeekData)
            .unwrap_or(len)
            .min(len);
        while pos < data_start {
            let n = (data_start - pos).min(CHUNK as u64) as usize;
            sink(&zeros[..n])?;
            pos += n as u64;
        }
        if pos >= len {
            break;
        }
        let data_end = seek(&src, pos, nix::unistd::Whence::SeekHole)
            .unwrap_or(len)
            .min(len);
        src.seek(SeekFrom::Start(pos))?;
        while pos < data_end {
            let n = (data_end - pos).min(CHUNK as u64) as usize;
            src.read_exact(&mut buf[..n])?;
            sink(&buf[..n])?;
            pos += n as u64;
        }
    }
    Ok(len)
}

/// Where the first data at or after `from` is (SEEK_DATA): `None` when only a hole
/// follows; `from` itself where the filesystem cannot tell, so that the caller reads.
pub fn next_data(f: &std::fs::File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let off = i64::try_from(from).ok()?;
    match nix::unistd::lseek(f.as_raw_fd(), off, nix::unistd::Whence::SeekData) {
        Ok(at) => Some(at as u64),
        Err(nix::errno::Errno::ENXIO) => None,
        Err(_) => Some(from),
    }
}

/// SEEK_DATA / SEEK_HOLE; None where the filesystem cannot tell or, for SEEK_DATA, when
/// no data follows.
fn seek(f: &std::fs::File, from: u64, whence: nix::unistd::Whence) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let off = i64::try_from(from).ok()?;
    nix::unistd::lseek(f.as_raw_fd(), off, whence)
        .ok()
        .map(|o| o as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn streams_data_and_holes_in_order() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("s");
        let mut f = std::fs::File::create(&p).expect("create");
        f.set_len(5 << 20).expect("len");
        f.seek(SeekFrom::Start(2 << 20)).expect("seek");
        f.write_all(b"middle").expect("write");
        f.seek(SeekFrom::Start((5 << 20) - 3)).expect("seek");
        f.write_all(b"end").expect("write");
        drop(f);
        let mut got = vec![];
        let len = stream(&p, |b| {
            got.extend_from_slice(b);
            Ok(())
        })
        .expect("stream");
        assert_eq!(len, 5 << 20);
        assert_eq!(got, std::fs::read(&p).expect("read"));
    }
}
