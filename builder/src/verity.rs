//! dm-verity hash tree in the on-disk format `veritysetup` reads (format 1, sha256,
//! 4096-byte blocks): superblock in the first hash block, then the tree, top level first.
//!
//! Written by hand: no maintained crate builds verity trees; the format is small and
//! `veritysetup verify` is the oracle in the tests.

use basalt_api::bootparams::VERITY_BLOCK_SIZE;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};

const BS: usize = VERITY_BLOCK_SIZE as usize;
const DIGEST: usize = 32;
const PER_BLOCK: usize = BS / DIGEST;

/// The result: what the kernel command line and the manifest need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityInfo {
    pub root_hash: [u8; 32],
    pub data_blocks: u64,
    /// Bytes of superblock + tree appended after the data.
    pub hash_bytes: u64,
}

fn hash(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The superblock (`struct verity_sb` of cryptsetup), padded to a full block.
fn superblock(uuid: [u8; 16], data_blocks: u64, salt: &[u8]) -> Vec<u8> {
    let mut sb = vec![0u8; BS];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&1u32.to_le_bytes());
    sb[16..32].copy_from_slice(&uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BS as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BS as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

/// Hashes the first `data_len` bytes of `dev` (a multiple of the block size) and writes
/// the superblock and hash tree right after them.
pub fn append<D: Read + Write + Seek>(
    dev: &mut D,
    data_len: u64,
    salt: &[u8],
    uuid: [u8; 16],
) -> std::io::Result<VerityInfo> {
    assert!(salt.len() <= 256);
    if data_len == 0 || !data_len.is_multiple_of(VERITY_BLOCK_SIZE) {
        return Err(std::io::Error::other(
            "verity data must be a non-zero number of blocks",
        ));
    }
    let data_blocks = data_len / VERITY_BLOCK_SIZE;
    // Level 0: one digest per data block.
    dev.seek(SeekFrom::Start(0))?;
    let mut level: Vec<[u8; 32]> = Vec::with_capacity(data_blocks as usize);
    let mut block = vec![0u8; BS];
    for _ in 0..data_blocks {
        dev.read_exact(&mut block)?;
        level.push(hash(salt, &block));
    }
    // Build levels upwards until one block holds them all; keep their bytes.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    loop {
        let bytes = pack(&level);
        if bytes.len() == BS {
            let root = hash(salt, &bytes);
            levels.push(bytes);
            levels.reverse(); // on disk: top level first
            let mut written = BS as u64;
            dev.seek(SeekFrom::Start(data_len))?;
            dev.write_all(&superblock(uuid, data_blocks, salt))?;
            for l in &levels {
                dev.write_all(l)?;
                written += l.len() as u64;
            }
            return Ok(VerityInfo {
                root_hash: root,
                data_blocks,
                hash_bytes: written,
            });
        }
        level = bytes.chunks(BS).map(|b| hash(salt, b)).collect();
        levels.push(bytes);
    }
}

/// Digests packed into zero-padded hash blocks.
fn pack(digests: &[[u8; 32]]) -> Vec<u8> {
    let blocks = digests.len().div_ceil(PER_BLOCK).max(1);
    let mut out = vec![0u8; blocks * BS];
    for (i, d) in digests.iter().enumerate() {
        out[i * DIGEST..(i + 1) * DIGEST].copy_from_slice(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn single_level_tree_root_is_hash_of_the_level_block() {
        let mut dev = Cursor::new(vec![7u8; 3 * BS]);
        let info = append(&mut dev, 3 * BS as u64, b"salt", [1; 16]).expect("append");
        let data = dev.into_inner();
        let mut level = vec![0u8; BS];
        for i in 0..3 {
            level[i * 32..(i + 1) * 32].copy_from_slice(&hash(b"salt", &[7u8; BS]));
        }
        assert_eq!(info.root_hash, hash(b"salt", &level));
        assert_eq!(info.hash_bytes, 2 * BS as u64);
        assert_eq!(&data[3 * BS..3 * BS + 8], b"verity\0\0");
        assert_eq!(&data[4 * BS..5 * BS], &level[..]);
    }

    #[test]
    fn two_levels_put_the_top_first() {
        let n = PER_BLOCK + 1; // needs two level-0 blocks, one level-1 block
        let mut dev = Cursor::new(vec![0u8; n * BS]);
        let info = append(&mut dev, (n * BS) as u64, b"", [0; 16]).expect("append");
        assert_eq!(info.hash_bytes, 4 * BS as u64);
        let data = dev.into_inner();
        let top = &data[(n + 1) * BS..(n + 2) * BS];
        assert_eq!(info.root_hash, hash(b"", top));
        let l0a = &data[(n + 2) * BS..(n + 3) * BS];
        assert_eq!(&top[..32], &hash(b"", l0a));
    }

    #[test]
    fn unaligned_data_is_refused() {
        let mut dev = Cursor::new(vec![0u8; 100]);
        assert!(append(&mut dev, 100, b"", [0; 16]).is_err());
    }
}
