//! What a built image holds, read back for the benchmarks: the default boot entry (kernel,
//! initramfs, command line) from the ESP, the initramfs's files, and every file of the
//! active root filesystem; and the root's compression redone the way the image's squashfs
//! does it, block by block.

use basalt_builder::image::{self, DiskImage, ImageError};
use basalt_builder::inspect::{self, InspectError, ESP};
use liblzma::stream::{Check, Filters, LzmaOptions, Stream};
use std::io::{BufReader, Read, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The squashfs block size `rootfs::write` uses (backhand's default).
pub const SQUASHFS_BLOCK: usize = 128 << 10;
/// backhand's xz level (LZMA_PRESET_DEFAULT) with the dictionary cut to one block.
const XZ_PRESET: u32 = 6;

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
    #[error("xz encoder")]
    Xz(#[source] std::io::Error),
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

/// One squashfs data block: a whole block of one file, or a fragment block that packs
/// the tails (the last partial block) of several files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// (file index, byte range in that file)
    pub parts: Vec<(usize, Range<usize>)>,
}

impl Block {
    fn len(&self) -> usize {
        self.parts.iter().map(|(_, r)| r.len()).sum()
    }
}

/// Cuts files into blocks as squashfs does: each file's whole blocks alone, its tail
/// into a shared fragment block (a new one when the tail does not fit).
pub fn plan_blocks(sizes: &[usize], block: usize) -> Vec<Block> {
    let mut blocks = vec![];
    let mut fragment = Block { parts: vec![] };
    for (i, &size) in sizes.iter().enumerate() {
        let whole = size / block * block;
        for start in (0..whole).step_by(block) {
            blocks.push(Block {
                parts: vec![(i, start..start + block)],
            });
        }
        let tail = whole..size;
        if tail.is_empty() {
            continue;
        }
        if fragment.len() + tail.len() > block {
            blocks.push(std::mem::replace(&mut fragment, Block { parts: vec![] }));
        }
        fragment.parts.push((i, tail));
    }
    if !fragment.parts.is_empty() {
        blocks.push(fragment);
    }
    blocks
}

/// The root's content compressed as its squashfs stores it.
pub struct Squashed {
    /// Compressed bytes of each block of [`plan_blocks`], in order.
    pub blocks: Vec<Vec<u8>>,
    /// Each file's share of the compressed bytes (fragment blocks split by input bytes).
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
}

/// What one compressing thread did: (block index, compressed bytes), and its CPU time.
struct Done {
    blocks: Vec<(usize, Vec<u8>)>,
    cpu: Duration,
}

/// Takes blocks off the shared counter and compresses them until none are left.
fn compress_blocks(
    plan: &[Block],
    files: &[File],
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
        blocks.push((i, xz_block(&input)?));
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

/// Compresses the files' blocks with xz as backhand does (preset 6, dictionary one
/// block, CRC32), the blocks shared out over `threads` threads; timed.
pub fn squash(files: &[File], threads: usize) -> Result<Squashed, ContentError> {
    let sizes: Vec<usize> = files.iter().map(|f| f.data.len()).collect();
    let plan = plan_blocks(&sizes, SQUASHFS_BLOCK);
    let threads = threads.max(1);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let done: Vec<Result<Done, ContentError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| compress_blocks(&plan, files, &next)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let wall = started.elapsed();
    let mut blocks = vec![vec![]; plan.len()];
    let mut cpu = Duration::ZERO;
    for d in done {
        let d = d?;
        cpu += d.cpu;
        for (i, bytes) in d.blocks {
            blocks[i] = bytes;
        }
    }
    let mut per_file = vec![0.0; files.len()];
    for (block, bytes) in plan.iter().zip(&blocks) {
        let total = block.len() as f64;
        for (f, range) in &block.parts {
            per_file[*f] += bytes.len() as f64 * range.len() as f64 / total;
        }
    }
    Ok(Squashed {
        blocks,
        per_file,
        input_bytes: sizes.iter().map(|&s| s as u64).sum(),
        wall,
        cpu,
        threads,
    })
}

/// One block through a fresh xz stream, as backhand compresses each block.
fn xz_block(input: &[u8]) -> Result<Vec<u8>, ContentError> {
    let mut opts = LzmaOptions::new_preset(XZ_PRESET).map_err(|e| ContentError::Xz(e.into()))?;
    opts.dict_size(SQUASHFS_BLOCK as u32);
    let mut filters = Filters::new();
    filters.lzma2(&opts);
    let stream = Stream::new_stream_encoder(&filters, Check::Crc32)
        .map_err(|e| ContentError::Xz(e.into()))?;
    let mut enc = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
    enc.write_all(input).map_err(ContentError::Xz)?;
    enc.finish().map_err(ContentError::Xz)
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

    type Parts = Vec<(usize, Range<usize>)>;

    fn ranges(blocks: &[Block]) -> Vec<Parts> {
        blocks.iter().map(|b| b.parts.clone()).collect()
    }

    #[test]
    fn blocks_are_whole_per_file_and_tails_share_fragments() {
        let cases: &[(&[usize], Vec<Parts>)] = &[
            (&[], vec![]),
            (&[0], vec![]),
            (&[10], vec![vec![(0, 0..10)]]),
            (
                &[20, 5],
                vec![vec![(0, 0..16)], vec![(0, 16..20), (1, 0..5)]],
            ),
            (
                &[12, 12],
                vec![vec![(0, 0..12)], vec![(1, 0..12)]], // two tails do not fit one block
            ),
            (&[32], vec![vec![(0, 0..16)], vec![(0, 16..32)]]),
        ];
        for (sizes, want) in cases {
            assert_eq!(&ranges(&plan_blocks(sizes, 16)), want, "{sizes:?}");
        }
    }

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
        for b in &sq.blocks {
            liblzma::read::XzDecoder::new(&b[..])
                .read_to_end(&mut back)
                .expect("xz");
        }
        let mut want = files[0].data.clone();
        want.extend_from_slice(&files[1].data);
        assert_eq!(back, want);
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
