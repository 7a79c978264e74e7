//! What a built image holds, read back for the benchmarks: the default boot entry (kernel,
//! initramfs, command line) from the ESP, the initramfs's files, and every file of the
//! active root filesystem; and the root's compression redone the way the image's squashfs
//! does it, block by block, with the builder's own block plan and block compressor.

use basalt_builder::image::{self, DiskImage, ImageError};
use basalt_builder::inspect::{self, InspectError, ESP};
use basalt_builder::rootfs::blocks::{self, Block, Stored};
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error("{image}: the ESP holds no {file} (named by grub.cfg's default entry)")]
    MissingEspFile { image: PathBuf, file: String },
    #[error("{image}: initramfs {file}")]
    Initramfs {
        image: PathBuf,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{image}: root filesystem in {partition}")]
    Squashfs {
        image: PathBuf,
        partition: String,
        #[source]
        source: backhand::BackhandError,
    },
    #[error("{image}: {file} in {partition}")]
    RootFile {
        image: PathBuf,
        partition: String,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("compress the root's blocks")]
    Compress(#[source] std::io::Error),
}

/// A file read out of the image: its path (relative, no leading `/`) and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub data: Vec<u8>,
}

/// grub.cfg's default entry with the files it names.
#[derive(Debug)]
pub struct DefaultBoot {
    /// The ESP paths of kernel and initramfs, as grub.cfg names them.
    pub kernel_path: String,
    pub initrd_path: String,
    pub kernel: Vec<u8>,
    /// The initramfs file as stored (zstd-compressed cpio).
    pub initrd: Vec<u8>,
    /// The whole kernel command line of the entry.
    pub cmdline: String,
    /// GPT name of the entry's root partition.
    pub root_partition: String,
}

/// Reads grub.cfg's default entry and its kernel and initramfs from the image's ESP.
pub fn default_boot(img: &DiskImage) -> Result<DefaultBoot, ContentError> {
    let parts = img.table()?.partitions;
    let fat = img.fat(image::find(img, &parts, ESP)?)?;
    let (default, slots) = inspect::boot_slots(img, &fat)?;
    // boot_slots has checked that the default entry exists.
    let Some(slot) = slots.into_iter().find(|s| s.entry.id == default) else {
        return Err(InspectError::NoDefaultEntry {
            path: img.path().into(),
            id: default,
        }
        .into());
    };
    let read = |file: &str| {
        fat.read(file, None)?
            .ok_or_else(|| ContentError::MissingEspFile {
                image: img.path().into(),
                file: file.into(),
            })
    };
    Ok(DefaultBoot {
        kernel: read(&slot.entry.kernel)?,
        initrd: read(&slot.entry.initrd)?,
        kernel_path: slot.entry.kernel,
        initrd_path: slot.entry.initrd,
        cmdline: slot.entry.cmdline,
        root_partition: slot.params.slot.partition_name().into(),
    })
}

/// Every regular file of the ESP, in path order (8.3 names, as `Fat::files` gives them).
pub fn esp_files(img: &DiskImage) -> Result<Vec<File>, ContentError> {
    let parts = img.table()?.partitions;
    let fat = img.fat(image::find(img, &parts, ESP)?)?;
    let mut out = vec![];
    for path in fat.files()? {
        if let Some(data) = fat.read(&path, None)? {
            out.push(File { path, data });
        }
    }
    Ok(out)
}

/// The regular files of a zstd-compressed newc initramfs, in archive order.
pub fn initramfs_files(initrd: &[u8]) -> std::io::Result<Vec<File>> {
    let cpio = zstd::decode_all(initrd)?;
    let mut out = vec![];
    let mut rest = &cpio[..];
    loop {
        let mut entry = cpio::newc::Reader::new(rest)?;
        if entry.entry().is_trailer() {
            return Ok(out);
        }
        let regular = entry.entry().mode() & 0o170000 == 0o100000;
        let path = entry.entry().name().trim_start_matches('/').to_string();
        let mut data = vec![];
        entry.read_to_end(&mut data)?;
        if regular {
            out.push(File { path, data });
        }
        rest = entry.finish()?;
    }
}

/// Every regular file of the squashfs at the start of `partition`, in path order.
pub fn root_files(img: &DiskImage, partition: &str) -> Result<Vec<File>, ContentError> {
    let parts = img.table()?.partitions;
    let part = image::find(img, &parts, partition)?;
    let reader = BufReader::new(img.partition_reader(part)?);
    let sqfs_err = |source| ContentError::Squashfs {
        image: img.path().into(),
        partition: partition.into(),
        source,
    };
    let fs = backhand::FilesystemReader::from_reader(reader).map_err(sqfs_err)?;
    let mut out = vec![];
    for node in fs.files() {
        let backhand::InnerNode::File(f) = &node.inner else {
            continue;
        };
        let path = node.fullpath.to_string_lossy();
        let path = path.trim_start_matches('/').to_string();
        let mut data = vec![];
        fs.file(f)
            .reader()
            .read_to_end(&mut data)
            .map_err(|source| ContentError::RootFile {
                image: img.path().into(),
                partition: partition.into(),
                file: path.clone(),
                source,
            })?;
        out.push(File { path, data });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The root's content compressed as its squashfs stores it.
pub struct Squashed {
    /// The bytes the squashfs holds for each block of [`blocks::plan`], in order: the
    /// compressed block, the block itself where it is stored raw, nothing for a hole.
    pub blocks: Vec<Vec<u8>>,
    /// Which blocks are stored raw.
    pub raw: Vec<bool>,
    /// Each file's share of the stored bytes (fragment blocks split by input bytes).
    pub per_file: Vec<f64>,
    pub input_bytes: u64,
    pub wall: Duration,
    /// CPU time of the compressing threads, summed.
    pub cpu: Duration,
    pub threads: usize,
}

impl Squashed {
    pub fn compressed_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.len() as u64).sum()
    }

    /// Input bytes of the blocks stored raw.
    pub fn raw_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .zip(&self.raw)
            .filter(|(_, r)| **r)
            .map(|(b, _)| b.len() as u64)
            .sum()
    }
}

/// What one compressing thread did: (block index, stored bytes, raw), and its CPU time.
struct Done {
    blocks: Vec<(usize, Vec<u8>, bool)>,
    cpu: Duration,
}

/// Takes blocks off the shared counter and stores them until none are left.
fn compress_blocks(
    plan: &[Block],
    files: &[&File],
    next: &AtomicUsize,
) -> Result<Done, ContentError> {
    let cpu_start = thread_cpu();
    let mut blocks = vec![];
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(block) = plan.get(i) else { break };
        let mut input = Vec::with_capacity(block.len());
        for (f, range) in &block.parts {
            input.extend_from_slice(&files[*f].data[range.clone()]);
        }
        if input.iter().all(|&b| b == 0) {
            blocks.push((i, vec![], false)); // a hole: backhand stores no bytes
            continue;
        }
        match blocks::store_block(blocks::CODEC, &input).map_err(ContentError::Compress)? {
            Stored::Compressed(c) => blocks.push((i, c, false)),
            Stored::Raw => blocks.push((i, input, true)),
        }
    }
    Ok(Done {
        blocks,
        cpu: thread_cpu().saturating_sub(cpu_start),
    })
}

/// CPU time of the calling thread (zero where the clock is missing).
fn thread_cpu() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Stores the files' blocks as the builder's squashfs does ([`blocks::store_block`] with the
/// root's codec, blocks planned in backhand's write order), the blocks shared out over
/// `threads` threads; timed.
pub fn squash(files: &[File], threads: usize) -> Result<Squashed, ContentError> {
    // The plan follows backhand's order of paths; `per_file` stays in the caller's order.
    let mut order: Vec<usize> = (0..files.len()).collect();
    blocks::backhand_order(&mut order, |&i| files[i].path.as_str());
    let ordered: Vec<&File> = order.iter().map(|&i| &files[i]).collect();
    let sizes: Vec<usize> = ordered.iter().map(|f| f.data.len()).collect();
    let plan = blocks::plan(&sizes);
    let threads = threads.max(1);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let done: Vec<Result<Done, ContentError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| compress_blocks(&plan, &ordered, &next)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let wall = started.elapsed();
    let mut stored = vec![vec![]; plan.len()];
    let mut raw = vec![false; plan.len()];
    let mut cpu = Duration::ZERO;
    for d in done {
        let d = d?;
        cpu += d.cpu;
        for (i, bytes, r) in d.blocks {
            stored[i] = bytes;
            raw[i] = r;
        }
    }
    let mut per_file = vec![0.0; files.len()];
    for (block, bytes) in plan.iter().zip(&stored) {
        let total = block.len() as f64;
        for (f, range) in &block.parts {
            per_file[order[*f]] += bytes.len() as f64 * range.len() as f64 / total;
        }
    }
    Ok(Squashed {
        blocks: stored,
        raw,
        per_file,
        input_bytes: sizes.iter().map(|&s| s as u64).sum(),
        wall,
        cpu,
        threads,
    })
}

/// Bytes zstd at `level` makes of `parts` as one stream (the output is counted, not kept).
pub fn zstd_size<'a>(
    parts: impl IntoIterator<Item = &'a [u8]>,
    level: i32,
) -> std::io::Result<u64> {
    let mut counter = Counter(0);
    let mut enc = zstd::stream::write::Encoder::new(&mut counter, level)?;
    for part in parts {
        enc.write_all(part)?;
    }
    enc.finish()?;
    Ok(counter.0)
}

/// A writer that only counts.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squash_round_trips_and_shares_add_up() {
        let files = vec![
            File {
                path: "a".into(),
                data: b"hello ".repeat(50_000),
            },
            File {
                path: "b".into(),
                data: b"tail".to_vec(),
            },
        ];
        let sq = squash(&files, 2).expect("squash");
        assert_eq!(sq.input_bytes, 300_004);
        let mut back = vec![];
        for (b, raw) in sq.blocks.iter().zip(&sq.raw) {
            if *raw {
                back.extend_from_slice(b);
                continue;
            }
            match blocks::CODEC {
                blocks::Codec::Xz => liblzma::read::XzDecoder::new(&b[..])
                    .read_to_end(&mut back)
                    .map(drop),
                blocks::Codec::Zstd { .. } => zstd::stream::copy_decode(&b[..], &mut back),
            }
            .expect("decompress");
        }
        // "a" (300000 bytes) is three blocks of its own; "b" goes into a fragment block
        let mut want = files[0].data.clone();
        want.extend_from_slice(&files[1].data);
        assert_eq!(back, want);
        assert_eq!(sq.blocks.len(), 4);
        let shares: f64 = sq.per_file.iter().sum();
        assert!((shares - sq.compressed_bytes() as f64).abs() < 1e-6);
        assert!(sq.compressed_bytes() < 10_000, "{}", sq.compressed_bytes());
    }

    #[test]
    fn initramfs_files_lists_regular_files_only() {
        let mut t = basalt_builder::tree::Tree::default();
        t.char_dev("dev/console", 5, 1, 0o600);
        t.bytes("init", "#!init", 0o755);
        let mut cpio = vec![];
        basalt_builder::initramfs::write_cpio(&t, &mut cpio).expect("cpio");
        let zst = zstd::encode_all(&cpio[..], 3).expect("zstd");
        let files = initramfs_files(&zst).expect("read");
        assert_eq!(
            files,
            [File {
                path: "init".into(),
                data: b"#!init".to_vec()
            }]
        );
    }

    #[test]
    fn zstd_size_counts_the_real_output() {
        let data = b"abc".repeat(1000);
        assert_eq!(
            zstd_size([&data[..1000], &data[1000..]], 12).expect("size"),
            zstd::encode_all(&data[..], 12).expect("zstd").len() as u64
        );
    }
}
