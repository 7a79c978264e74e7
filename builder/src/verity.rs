//! dm-verity hash tree in the on-disk format `veritysetup` reads (format 1, sha256,
//! 4096-byte blocks): superblock in the first hash block, then the tree, top level first.
//!
//! Written by hand: no maintained crate builds verity trees; the format is small and
//! `veritysetup verify` is the oracle in the tests. The tree itself is computed in
//! [`basalt_api::verity`], which basalt-init uses to check an upgrade's slot.

use basalt_api::bootparams::VERITY_BLOCK_SIZE;
use basalt_api::verity::{hash_block as hash, superblock, Tree, BLOCK as BS};
use std::io::{Read, Seek, SeekFrom, Write};

/// The result: what the kernel command line and the manifest need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityInfo {
    pub root_hash: [u8; 32],
    pub data_blocks: u64,
    /// Bytes of superblock + tree appended after the data.
    pub hash_bytes: u64,
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
    let tree = Tree::build(level, salt);
    dev.seek(SeekFrom::Start(data_len))?;
    dev.write_all(&superblock(uuid, data_blocks, salt))?;
    for l in &tree.levels {
        dev.write_all(l)?;
    }
    Ok(VerityInfo {
        root_hash: tree.root,
        data_blocks,
        hash_bytes: BS as u64 + tree.bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::verity::PER_BLOCK;
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

    /// `veritysetup verify` (cryptsetup) as the oracle of the tree that
    /// `basalt_api::verity` computes, one and two levels; skipped without it.
    #[test]
    fn veritysetup_verifies_what_append_writes() {
        let Ok(tool) = which_veritysetup() else {
            eprintln!("veritysetup not installed: skipped");
            return;
        };
        for blocks in [3, PER_BLOCK + 1] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("slot.img");
            let data: Vec<u8> = (0..blocks * BS).map(|i| (i * 13 % 251) as u8).collect();
            let mut f = std::fs::File::options()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)
                .expect("create");
            f.write_all(&data).expect("write");
            let info = append(&mut f, data.len() as u64, b"salty", [3; 16]).expect("append");
            drop(f);
            let out = std::process::Command::new(&tool)
                .arg("verify")
                .arg(&path)
                .arg(&path)
                .arg(hex_encode(&info.root_hash))
                .arg(format!("--hash-offset={}", data.len()))
                .output()
                .expect("run veritysetup");
            assert!(
                out.status.success(),
                "{blocks} blocks: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn which_veritysetup() -> Result<std::path::PathBuf, ()> {
        [
            "/usr/sbin/veritysetup",
            "/sbin/veritysetup",
            "/usr/bin/veritysetup",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .ok_or(())
    }

    fn hex_encode(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn unaligned_data_is_refused() {
        let mut dev = Cursor::new(vec![0u8; 100]);
        assert!(append(&mut dev, 100, b"", [0; 16]).is_err());
    }
}
