//! `<name>.raw.zst`: the raw disk compressed as it is read, for upload; the raw's sha256
//! is computed in the same pass. Holes of the sparse raw are not read.
//!
//! Most of the raw is zeros (2 GiB of disk, some 35 MiB of data), and feeding those zeros
//! through zstd's match finder at [`LEVEL`] was most of this step's CPU. So the raw is cut,
//! by content, into 1 MiB-aligned chunks that are all zeros and chunks that are not. A run
//! of data chunks becomes one zstd frame at [`LEVEL`], compressed on all cores; a run of
//! zero chunks becomes copies of a frame of [`ZERO_FRAME`] zeros (and of 1 MiB of zeros for
//! the rest), each compressed once. zstd decompresses concatenated frames as one stream
//! (`zstd -d`, the upload's `zstd -dc | dd`), so the result decompresses to the raw.
//!
//! The output depends on the raw's bytes alone: the chunks are cut by content (a hole and
//! written zeros are the same), and zstd's multi-threaded output does not depend on the
//! number of workers (checked by a test below), so two machines write the same bytes.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// zstd level: near the size of 19 at a fraction of the time on disk images.
pub const LEVEL: i32 = 12;

/// The unit the raw is cut into: a chunk is all zeros or data.
const CHUNK: u64 = 1 << 20;

/// Zeros per copied frame: a run of zero chunks is this many bytes per frame, then 1 MiB
/// frames. 64 MiB of zeros is a 2 KiB frame, so 2 GiB of holes cost 70 KiB, as they did
/// through the one stream.
const ZERO_FRAME: u64 = 64 << 20;

/// What one pass over the raw gives.
pub struct Compressed {
    pub size: u64,
    pub raw_sha256: String,
}

/// Compresses `raw` into `out`.
pub fn compress(raw: &Path, out: &Path) -> std::io::Result<Compressed> {
    let file = std::fs::File::create(out)?;
    let mut w = std::io::BufWriter::new(file);
    let mut hasher = Sha256::new();
    let zeros = ZeroFrames::new()?;
    let workers = workers();
    // The data frame being written, and the length of the zero run being counted.
    let mut data: Option<zstd::stream::write::Encoder<'static, Vec<u8>>> = None;
    let mut zero_run = 0u64;
    let zero_chunk = vec![0u8; CHUNK as usize];
    chunks(raw, |chunk| {
        match chunk {
            Chunk::Zero(n) => {
                hasher.update(&zero_chunk[..n as usize]);
                if let Some(enc) = data.take() {
                    w.write_all(&enc.finish()?)?;
                }
                zero_run += n;
            }
            Chunk::Data(bytes) => {
                hasher.update(bytes);
                if zero_run > 0 {
                    zeros.write(&mut w, zero_run)?;
                    zero_run = 0;
                }
                let enc = match &mut data {
                    Some(enc) => enc,
                    None => data.insert(data_encoder(workers)?),
                };
                enc.write_all(bytes)?;
                // What the workers have finished goes out now, not at the end of the run.
                let done = std::mem::take(enc.get_mut());
                w.write_all(&done)?;
            }
        }
        Ok(())
    })?;
    if let Some(enc) = data.take() {
        w.write_all(&enc.finish()?)?;
    }
    zeros.write(&mut w, zero_run)?;
    w.flush()?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(Compressed {
        size: file.metadata()?.len(),
        raw_sha256: hex::encode(hasher.finalize()),
    })
}

/// zstd workers: one per core, and at least one, so the output is the multi-threaded
/// format on every machine (one worker or many give the same bytes; none differs).
fn workers() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

fn data_encoder(workers: u32) -> std::io::Result<zstd::stream::write::Encoder<'static, Vec<u8>>> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), LEVEL)?;
    enc.include_checksum(true)?;
    enc.multithread(workers.max(1))?;
    Ok(enc)
}

/// The frames a zero run is written with, each compressed once.
struct ZeroFrames {
    big: Vec<u8>,
    chunk: Vec<u8>,
}

impl ZeroFrames {
    fn new() -> std::io::Result<Self> {
        let frame = |n: u64| -> std::io::Result<Vec<u8>> {
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), LEVEL)?;
            enc.include_checksum(true)?;
            enc.set_pledged_src_size(Some(n))?;
            let zeros = vec![0u8; CHUNK as usize];
            for _ in 0..n / CHUNK {
                enc.write_all(&zeros)?;
            }
            enc.finish()
        };
        Ok(ZeroFrames {
            big: frame(ZERO_FRAME)?,
            chunk: frame(CHUNK)?,
        })
    }

    /// Frames for `n` zeros (a multiple of [`CHUNK`], but for the raw's last chunk).
    fn write(&self, w: &mut dyn Write, n: u64) -> std::io::Result<()> {
        for _ in 0..n / ZERO_FRAME {
            w.write_all(&self.big)?;
        }
        for _ in 0..(n % ZERO_FRAME) / CHUNK {
            w.write_all(&self.chunk)?;
        }
        let rest = n % CHUNK;
        if rest > 0 {
            w.write_all(&zstd::bulk::compress(&vec![0u8; rest as usize], LEVEL)?)?;
        }
        Ok(())
    }
}

/// A [`CHUNK`]-aligned piece of the raw (the last one may be shorter).
enum Chunk<'a> {
    Zero(u64),
    Data(&'a [u8]),
}

/// Calls `sink` with the raw's chunks in order. A chunk inside a hole is not read; a
/// chunk with data is read and is [`Chunk::Zero`] if its bytes are all zeros.
fn chunks(
    path: &Path,
    mut sink: impl FnMut(Chunk<'_>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(path)?;
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(CHUNK);
        let data_at = crate::sparse::next_data(&src, pos).unwrap_or(len);
        if data_at >= pos + n {
            sink(Chunk::Zero(n))?;
        } else {
            let bytes = &mut buf[..n as usize];
            src.read_exact_at(bytes, pos)?;
            if bytes.iter().all(|&b| b == 0) {
                sink(Chunk::Zero(n))?;
            } else {
                sink(Chunk::Data(bytes))?;
            }
        }
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    #[test]
    fn a_sparse_file_decompresses_to_the_same_bytes_and_hash() {
        let d = tempfile::tempdir().expect("tempdir");
        let raw = d.path().join("d.raw");
        let mut f = std::fs::File::create(&raw).expect("create");
        f.set_len((200 << 20) + 5).expect("len");
        f.seek(SeekFrom::Start(3 << 20)).expect("seek");
        f.write_all(b"data in the middle").expect("write");
        // Written zeros across a chunk boundary: data to the filesystem, zeros by content.
        f.seek(SeekFrom::Start((10 << 20) - 4096)).expect("seek");
        f.write_all(&vec![0u8; 3 << 20]).expect("write");
        f.seek(SeekFrom::Start((150 << 20) - 7)).expect("seek");
        f.write_all(b"across a chunk boundary").expect("write");
        f.seek(SeekFrom::Start((200 << 20) + 1)).expect("seek");
        f.write_all(b"tail").expect("write");
        drop(f);
        let out = d.path().join("d.raw.zst");
        let c = compress(&raw, &out).expect("compress");
        assert_eq!(c.size, std::fs::metadata(&out).expect("meta").len());
        let original = std::fs::read(&raw).expect("read");
        assert_eq!(c.raw_sha256, hex::encode(Sha256::digest(&original)));
        let back = zstd::decode_all(std::fs::File::open(&out).expect("open")).expect("decode");
        assert_eq!(back.len(), original.len());
        assert!(back == original, "decompressed bytes differ");
        // The zstd tool, as the upload's rescue system runs it, reads the frames as one.
        let tool = std::process::Command::new("zstd")
            .args(["-dc", "--"])
            .arg(&out)
            .output();
        if let Ok(tool) = tool {
            assert!(tool.status.success(), "{tool:?}");
            assert!(tool.stdout == original, "zstd -dc differs");
        }
        // 200 MiB, nearly all zeros: a few KiB.
        assert!(c.size < 16 << 10, "{} bytes", c.size);
    }

    #[test]
    fn holes_and_written_zeros_give_the_same_bytes() {
        let d = tempfile::tempdir().expect("tempdir");
        let content = |i: usize| -> u8 {
            match i {
                _ if (1 << 20..(5 << 20) + 333).contains(&i) => (i * 7 % 251) as u8,
                _ => 0,
            }
        };
        let len = 9 << 20;
        let bytes: Vec<u8> = (0..len).map(content).collect();
        let written = d.path().join("written.raw");
        std::fs::write(&written, &bytes).expect("write");
        let sparse = d.path().join("sparse.raw");
        let mut f = std::fs::File::create(&sparse).expect("create");
        f.set_len(len as u64).expect("len");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(&bytes[1 << 20..(5 << 20) + 333])
            .expect("write");
        drop(f);
        let (a, b) = (d.path().join("a.zst"), d.path().join("b.zst"));
        let ca = compress(&written, &a).expect("compress");
        let cb = compress(&sparse, &b).expect("compress");
        assert_eq!(ca.raw_sha256, cb.raw_sha256);
        assert!(std::fs::read(&a).expect("a") == std::fs::read(&b).expect("b"));
    }

    /// The data frames are written by zstd's workers: the bytes must not depend on how
    /// many there are (the image is the same on a 2-core and a 64-core machine).
    #[test]
    fn the_data_frames_do_not_depend_on_the_number_of_workers() {
        // 40 MiB of compressible, varied bytes: several zstd jobs at LEVEL.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..40 << 20)
            .map(|i: usize| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 4096 < 3000 {
                    b"basalt node image "[i % 18]
                } else {
                    (x % 16) as u8
                }
            })
            .collect();
        let frame = |workers: u32, write_size: usize| {
            let mut enc = data_encoder(workers).expect("encoder");
            for piece in data.chunks(write_size) {
                enc.write_all(piece).expect("write");
            }
            enc.finish().expect("finish")
        };
        let one = frame(1, 1 << 20);
        assert!(one.len() < data.len() / 2, "{} bytes", one.len());
        for (workers, write_size) in [(2, 1 << 20), (4, 77_777), (7, 1 << 20)] {
            assert!(
                frame(workers, write_size) == one,
                "{workers} workers, writes of {write_size}: other bytes"
            );
        }
        assert_eq!(zstd::decode_all(&one[..]).expect("decode"), data);
    }
}
