//! How the root's squashfs stores file data, block by block, and the parallel compression of
//! those blocks ahead of backhand's (single-threaded) write.
//!
//! backhand 0.25 compresses data blocks one after the other inside `FilesystemWriter::write`;
//! its `parallel` feature only covers reading. So the builder works out the blocks the write
//! will ask for ([`plan`]), compresses them on all cores ([`store_block`]), and hands backhand a
//! compressor ([`Precompressed`]) that answers from those results. The answers are looked up
//! by the SHA-256 of the block's bytes, so a wrong plan can only cost time: a block nobody
//! compressed ahead is compressed when backhand asks, with the same function, and the image
//! is the same bytes either way.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The squashfs block size (backhand's default).
pub const BLOCK_SIZE: usize = 128 << 10;

/// The root's compressor. See BENCHMARKS.md "Build" for the measurements behind the choice.
pub const CODEC: Codec = Codec::Zstd { level: 15 };

/// A squashfs compressor and its setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// xz as backhand writes it: preset 6, the dictionary cut to one block, CRC32.
    Xz,
    Zstd {
        level: i32,
    },
}

impl Codec {
    /// backhand's name for it in the superblock.
    pub fn squashfs_id(self) -> backhand::compression::Compressor {
        match self {
            Codec::Xz => backhand::compression::Compressor::Xz,
            Codec::Zstd { .. } => backhand::compression::Compressor::Zstd,
        }
    }

    /// How `bench` describes it.
    pub fn describe(self) -> String {
        match self {
            Codec::Xz => "xz preset 6".into(),
            Codec::Zstd { level } => format!("zstd level {level}"),
        }
    }

    fn compress(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Codec::Xz => xz(data),
            Codec::Zstd { level } => zstd::bulk::compress(data, level),
        }
    }
}

fn xz(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use liblzma::stream::{Check, Filters, LzmaOptions, Stream};
    use std::io::Write;
    let mut opts = LzmaOptions::new_preset(6)?;
    opts.dict_size(BLOCK_SIZE as u32);
    let mut filters = Filters::new();
    filters.lzma2(&opts);
    let stream = Stream::new_stream_encoder(&filters, Check::Crc32)?;
    let mut enc = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
    enc.write_all(data)?;
    enc.finish()
}

/// How one block is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Compressed(Vec<u8>),
    /// As is, with the block's "uncompressed" bit.
    Raw,
}

impl Stored {
    /// The bytes the image holds for `data`.
    pub fn len(&self, data: &[u8]) -> usize {
        match self {
            Stored::Compressed(c) => c.len(),
            Stored::Raw => data.len(),
        }
    }
}

/// A block that zstd's fastest level cannot shrink by 1/64 is stored as is. Content that is
/// already compressed (the airgap images' tar.zst, compressed payloads inside binaries) is
/// found out at a fraction of the codec's cost, and reads back with no decompression at all.
pub fn store_block(codec: Codec, data: &[u8]) -> std::io::Result<Stored> {
    if data.is_empty() {
        return Ok(Stored::Compressed(codec.compress(data)?));
    }
    let trial = zstd::bulk::compress(data, 1)?;
    if trial.len() + data.len() / 64 >= data.len() {
        return Ok(Stored::Raw);
    }
    let c = codec.compress(data)?;
    // backhand stores a block raw when the compressed one is longer.
    Ok(if c.len() > data.len() {
        Stored::Raw
    } else {
        Stored::Compressed(c)
    })
}

/// One data block of the squashfs: whole blocks of one file, or a fragment block that packs
/// several small files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// (file index, byte range in that file)
    pub parts: Vec<(usize, Range<usize>)>,
}

impl Block {
    pub fn len(&self) -> usize {
        self.parts.iter().map(|(_, r)| r.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The data blocks backhand 0.25 writes for files of these sizes, in write order (the files
/// in the order of their paths as `std::path::Path` compares them, see [`backhand_order`]).
/// A file smaller than a block goes whole into the current fragment block (a new one when it
/// does not fit); a larger file is cut into blocks, its last partial block stored alone.
/// Empty files have no data.
pub fn plan(sizes: &[usize]) -> Vec<Block> {
    let mut blocks = vec![];
    let mut fragment = Block { parts: vec![] };
    for (i, &size) in sizes.iter().enumerate() {
        if size == 0 {
            continue;
        }
        if size < BLOCK_SIZE {
            if fragment.len() + size > BLOCK_SIZE {
                blocks.push(std::mem::replace(&mut fragment, Block { parts: vec![] }));
            }
            fragment.parts.push((i, 0..size));
            continue;
        }
        for start in (0..size).step_by(BLOCK_SIZE) {
            blocks.push(Block {
                parts: vec![(i, start..size.min(start + BLOCK_SIZE))],
            });
        }
    }
    if !fragment.parts.is_empty() {
        blocks.push(fragment);
    }
    blocks
}

/// Sorts paths (relative, `/`-separated) into the order backhand writes file data: by
/// `std::path::Path`, component by component (`a/b` before `a-b`).
pub fn backhand_order<'a, T>(items: &mut [T], path: impl Fn(&T) -> &'a str) {
    items.sort_by(|a, b| std::path::Path::new(path(a)).cmp(std::path::Path::new(path(b))));
}

/// Runs `f` on every index below `n`, on `threads` threads taking the next index from a
/// shared counter; the results in index order.
pub fn par_map<T: Send, E: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E> {
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut done = vec![];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return Ok(done);
            }
            done.push((i, f(i)?));
        }
    };
    let results: Vec<Result<Vec<(usize, T)>, E>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(worker)).collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for r in results {
        for (i, t) in r? {
            slots[i] = Some(t);
        }
    }
    // Every index below n was taken by exactly one worker, and no worker failed.
    Ok(slots.into_iter().flatten().collect())
}

type Key = [u8; 32];

/// The blocks compressed ahead, by the SHA-256 of their bytes, with how many live
/// [`Session`]s put each one there. Shared by every write in the process.
static AHEAD: Mutex<Option<HashMap<Key, (Stored, usize)>>> = Mutex::new(None);

fn ahead() -> MutexGuard<'static, Option<HashMap<Key, (Stored, usize)>>> {
    // The map holds plain data; a panic elsewhere cannot leave it half-changed.
    AHEAD.lock().unwrap_or_else(|p| p.into_inner())
}

/// The blocks one write compressed ahead; they leave the shared map when it is dropped.
pub struct Session {
    keys: Vec<Key>,
}

impl Session {
    /// Compresses `blocks` (their bytes given by `read`) with [`store_block`] on `threads`
    /// threads, for [`Precompressed`] to answer from. All-zero blocks are skipped: backhand
    /// stores them as holes without compressing.
    pub fn compress<E: Send + From<std::io::Error>>(
        codec: Codec,
        blocks: &[Block],
        threads: usize,
        read: impl Fn(&Block) -> Result<Vec<u8>, E> + Sync,
    ) -> Result<Session, E> {
        let done = par_map(blocks.len(), threads, |i| -> Result<_, E> {
            let data = read(&blocks[i])?;
            if data.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            let key: Key = Sha256::digest(&data).into();
            Ok(Some((key, store_block(codec, &data)?)))
        })?;
        let mut keys = vec![];
        let mut map = ahead();
        let map = map.get_or_insert_with(HashMap::new);
        for (key, stored) in done.into_iter().flatten() {
            map.entry(key).or_insert((stored, 0)).1 += 1;
            keys.push(key);
        }
        Ok(Session { keys })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut map = ahead();
        let Some(map) = map.as_mut() else { return };
        for key in &self.keys {
            if let Some(entry) = map.get_mut(key) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

/// backhand's compressor for the root: the blocks a [`Session`] compressed ahead, and
/// [`store_block`] for any other (metadata blocks, and whatever the plan missed).
pub struct Precompressed(pub Codec);

/// backhand's own compressor, for reading.
static DEFAULT: backhand::compression::DefaultCompressor = backhand::compression::DefaultCompressor;

impl backhand::traits::CompressionAction for Precompressed {
    type Error = backhand::BackhandError;
    type Compressor = backhand::compression::Compressor;
    type FilesystemCompressor = backhand::FilesystemCompressor;
    type SuperBlock = backhand::SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Self::Compressor,
    ) -> Result<(), Self::Error> {
        DEFAULT.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        _fc: Self::FilesystemCompressor,
        _block_size: u32,
    ) -> Result<Vec<u8>, Self::Error> {
        let key: Key = Sha256::digest(bytes).into();
        let hit = ahead()
            .as_ref()
            .and_then(|m| m.get(&key).map(|(s, _)| s.clone()));
        let stored = match hit {
            Some(s) => s,
            None => store_block(self.0, bytes)?,
        };
        Ok(match stored {
            Stored::Compressed(c) => c,
            // Every caller in backhand stores the input as is when the "compressed" bytes
            // are longer; this is how a compressor asks for that.
            Stored::Raw => vec![0; bytes.len() + 1],
        })
    }

    fn compression_options(
        &self,
        superblock: &mut Self::SuperBlock,
        kind: &backhand::kind::Kind,
        fs_compressor: Self::FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, Self::Error> {
        DEFAULT.compression_options(superblock, kind, fs_compressor)
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
    fn small_files_share_fragments_and_large_ones_keep_their_tails() {
        const B: usize = BLOCK_SIZE;
        let cases: &[(&[usize], Vec<Parts>)] = &[
            (&[], vec![]),
            (&[0], vec![]),
            (&[10], vec![vec![(0, 0..10)]]),
            (&[10, 0, 5], vec![vec![(0, 0..10), (2, 0..5)]]),
            // two files that do not fit one fragment block together
            (&[B - 1, 2], vec![vec![(0, 0..B - 1)], vec![(1, 0..2)]]),
            (&[B], vec![vec![(0, 0..B)]]),
            // the tail of a large file is a block of its own, not a fragment
            (
                &[B + 3, 4],
                vec![vec![(0, 0..B)], vec![(0, B..B + 3)], vec![(1, 0..4)]],
            ),
        ];
        for (sizes, want) in cases {
            assert_eq!(&ranges(&plan(sizes)), want, "{sizes:?}");
        }
    }

    #[test]
    fn paths_sort_by_component_as_backhand_writes_them() {
        let mut p = vec!["a-b", "a/c", "a.b", "a", "b"];
        backhand_order(&mut p, |s| *s);
        assert_eq!(p, ["a", "a/c", "a-b", "a.b", "b"]);
    }

    #[test]
    fn compressed_content_is_stored_raw_and_text_is_compressed() {
        let text = b"the quick brown fox ".repeat(6000);
        // a block's worth of pseudo-random bytes, then zstd of them: compressed content
        let mut packed = vec![];
        let mut seed = 1u64;
        while packed.len() < BLOCK_SIZE {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            packed.extend_from_slice(&seed.to_le_bytes());
        }
        let packed = zstd::bulk::compress(&packed, 3).expect("zstd");
        for codec in [Codec::Xz, Codec::Zstd { level: 3 }] {
            assert_eq!(store_block(codec, &packed).expect("store"), Stored::Raw);
            let Stored::Compressed(c) = store_block(codec, &text).expect("store") else {
                panic!("text stored raw with {codec:?}");
            };
            assert!(c.len() < text.len() / 10, "{codec:?}: {}", c.len());
        }
    }

    #[test]
    fn par_map_keeps_index_order_and_stops_at_an_error() {
        let squares = par_map(100, 3, |i| Ok::<_, String>(i * i)).expect("map");
        assert_eq!(squares, (0..100).map(|i| i * i).collect::<Vec<_>>());
        let err = par_map(10, 2, |i| if i == 7 { Err(i) } else { Ok(i) });
        assert_eq!(err, Err(7));
    }
}
