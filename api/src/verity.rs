//! The dm-verity hash tree, as `veritysetup` lays it out (format 1, sha256, 4096-byte
//! blocks): one superblock block after the data, then the tree, top level first. The
//! builder writes it ([`basalt-builder`'s `verity`], checked against `veritysetup verify`
//! in its tests) and basalt-init rebuilds it from a written slot to check an upgrade
//! before anything points at the slot: both compute it here, so they cannot drift.

use crate::bootparams::VERITY_BLOCK_SIZE;
use sha2::{Digest, Sha256};

/// The block size of data and hash blocks, in bytes.
pub const BLOCK: usize = VERITY_BLOCK_SIZE as usize;
const DIGEST: usize = 32;
/// Digests in one hash block.
pub const PER_BLOCK: usize = BLOCK / DIGEST;

/// One block's digest: sha256 of the salt, then the block.
pub fn hash_block(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// A whole tree: the root hash and the levels' bytes, top level first (as on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub root: [u8; 32],
    pub levels: Vec<Vec<u8>>,
}

impl Tree {
    /// The tree over the data blocks whose digests are `level0` (one per data block, in
    /// order, from [`hash_block`]).
    pub fn build(mut level: Vec<[u8; 32]>, salt: &[u8]) -> Tree {
        let mut levels: Vec<Vec<u8>> = Vec::new();
        loop {
            let bytes = pack(&level);
            if bytes.len() == BLOCK {
                let root = hash_block(salt, &bytes);
                levels.push(bytes);
                levels.reverse();
                return Tree { root, levels };
            }
            level = bytes.chunks(BLOCK).map(|b| hash_block(salt, b)).collect();
            levels.push(bytes);
        }
    }

    /// Bytes of the levels (without the superblock).
    pub fn bytes(&self) -> u64 {
        self.levels.iter().map(|l| l.len() as u64).sum()
    }
}

/// Digests packed into zero-padded hash blocks.
fn pack(digests: &[[u8; 32]]) -> Vec<u8> {
    let blocks = digests.len().div_ceil(PER_BLOCK).max(1);
    let mut out = vec![0u8; blocks * BLOCK];
    for (i, d) in digests.iter().enumerate() {
        out[i * DIGEST..(i + 1) * DIGEST].copy_from_slice(d);
    }
    out
}

/// Bytes of superblock and tree after `data_blocks` data blocks.
pub fn hash_bytes(data_blocks: u64) -> u64 {
    let mut total = 1u64; // the superblock
    let mut n = data_blocks;
    loop {
        n = n.div_ceil(PER_BLOCK as u64).max(1);
        total += n;
        if n == 1 {
            return total * VERITY_BLOCK_SIZE;
        }
    }
}

/// The superblock (`struct verity_sb` of cryptsetup), padded to a full block. `salt` is
/// at most 256 bytes (longer is cut: the format has no room for more).
pub fn superblock(uuid: [u8; 16], data_blocks: u64, salt: &[u8]) -> Vec<u8> {
    let salt = &salt[..salt.len().min(256)];
    let mut sb = vec![0u8; BLOCK];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&1u32.to_le_bytes());
    sb[16..32].copy_from_slice(&uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_level_s_root_is_the_hash_of_its_block() {
        let d = hash_block(b"salt", &[7u8; BLOCK]);
        let t = Tree::build(vec![d; 3], b"salt");
        assert_eq!(t.levels.len(), 1);
        let mut level = vec![0u8; BLOCK];
        for i in 0..3 {
            level[i * 32..(i + 1) * 32].copy_from_slice(&d);
        }
        assert_eq!(t.levels[0], level);
        assert_eq!(t.root, hash_block(b"salt", &level));
        assert_eq!(hash_bytes(3), BLOCK as u64 + t.bytes());
    }

    #[test]
    fn two_levels_put_the_top_first_and_the_sizes_agree() {
        for n in [PER_BLOCK + 1, PER_BLOCK * PER_BLOCK + 1] {
            let t = Tree::build(vec![[1u8; 32]; n], b"");
            assert_eq!(&t.levels[0][..32], &hash_block(b"", &t.levels[1][..BLOCK]));
            assert_eq!(t.root, hash_block(b"", &t.levels[0]));
            assert_eq!(hash_bytes(n as u64), BLOCK as u64 + t.bytes(), "{n}");
        }
    }

    #[test]
    fn the_superblock_carries_the_layout() {
        let sb = superblock([9; 16], 1234, b"ab");
        assert_eq!(&sb[..8], b"verity\0\0");
        assert_eq!(&sb[16..32], &[9; 16]);
        assert_eq!(u64::from_le_bytes(sb[72..80].try_into().expect("8")), 1234);
        assert_eq!(&sb[80..82], &2u16.to_le_bytes());
        assert_eq!(&sb[88..90], b"ab");
    }
}
