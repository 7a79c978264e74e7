//! Checks a written slot against the manifest's dm-verity root hash without the kernel:
//! every data block is hashed again from the partition, the tree is rebuilt (format 1,
//! sha256, 4096-byte blocks, top level first after one superblock block, as the builder
//! and `veritysetup` lay it out), its top block must hash to the root hash, and the tree
//! on the partition must be byte for byte the rebuilt one. A byte flipped anywhere in the
//! data or in the tree is found here, before anything points at the slot. The tree is
//! computed by [`basalt_api::verity`], as the builder's is.

use basalt_api::bootparams::VERITY_BLOCK_SIZE;
use basalt_api::verity::{hash_block as hash, Tree, BLOCK as BS};
use std::io::{self, Read, Seek, SeekFrom};

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("read the written slot at byte {offset}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("manifest verity.{key}: {why}")]
    Params { key: &'static str, why: String },
    #[error(
        "the written slot does not match the manifest's root hash {expected}: its data \
         blocks hash to {got}"
    )]
    RootHash { expected: String, got: String },
    #[error(
        "the written slot's hash tree differs from the one its data blocks give (first \
         difference in hash block {block} from the partition's start)"
    )]
    Tree { block: u64 },
}

/// What the manifest says of the slot's verity layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub root_hash: String,
    pub salt: String,
    pub data_blocks: u64,
    /// Bytes from the partition's start to the verity superblock.
    pub hash_offset: u64,
}

/// Bytes of superblock and tree the slot holds after its data blocks.
pub fn hash_bytes(data_blocks: u64) -> u64 {
    basalt_api::verity::hash_bytes(data_blocks)
}

/// Reads the slot (`dev`) back and checks it against `p`.
pub fn check<D: Read + Seek>(dev: &mut D, p: &Params) -> Result<(), VerityError> {
    let bad = |key, why: &str| VerityError::Params {
        key,
        why: why.to_owned(),
    };
    let salt = hex::decode(&p.salt).map_err(|_| bad("salt", "not hex"))?;
    if p.root_hash.len() != 64 || hex::decode(&p.root_hash).is_err() {
        return Err(bad("root_hash", "not 64 hex digits"));
    }
    if p.data_blocks == 0 {
        return Err(bad("data_blocks", "zero"));
    }
    if p.hash_offset != p.data_blocks * VERITY_BLOCK_SIZE {
        return Err(bad(
            "hash_offset",
            &format!(
                "{} is not data_blocks × {VERITY_BLOCK_SIZE} ({})",
                p.hash_offset,
                p.data_blocks * VERITY_BLOCK_SIZE
            ),
        ));
    }
    let read = |dev: &mut D, offset: u64, buf: &mut [u8]| {
        dev.seek(SeekFrom::Start(offset))
            .and_then(|_| dev.read_exact(buf))
            .map_err(|source| VerityError::Read { offset, source })
    };
    // Level 0 from the data, read in large pieces.
    let mut level: Vec<[u8; 32]> = Vec::with_capacity(p.data_blocks as usize);
    let chunk_blocks = 256u64;
    let mut buf = vec![0u8; chunk_blocks as usize * BS];
    let mut at = 0u64;
    while at < p.data_blocks {
        let n = chunk_blocks.min(p.data_blocks - at);
        let piece = &mut buf[..n as usize * BS];
        read(dev, at * VERITY_BLOCK_SIZE, piece)?;
        level.extend(piece.chunks(BS).map(|b| hash(&salt, b)));
        at += n;
    }
    // Levels upwards; on disk the top level comes first.
    let Tree { root, levels } = Tree::build(level, &salt);
    let got = hex::encode(root);
    if got != p.root_hash.to_ascii_lowercase() {
        return Err(VerityError::RootHash {
            expected: p.root_hash.clone(),
            got,
        });
    }
    let mut offset = p.hash_offset + VERITY_BLOCK_SIZE;
    let mut on_disk = vec![0u8; BS];
    for l in &levels {
        for want in l.chunks(BS) {
            read(dev, offset, &mut on_disk)?;
            if on_disk != want {
                return Err(VerityError::Tree {
                    block: offset / VERITY_BLOCK_SIZE,
                });
            }
            offset += VERITY_BLOCK_SIZE;
        }
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use basalt_api::verity::PER_BLOCK;
    use std::io::Cursor;

    /// A slot as the builder writes it: `blocks` data blocks, superblock, tree (top first).
    pub fn slot(blocks: usize, salt: &[u8]) -> (Vec<u8>, Params) {
        let mut data: Vec<u8> = (0..blocks * BS).map(|i| (i * 7 % 251) as u8).collect();
        let level: Vec<[u8; 32]> = data.chunks(BS).map(|b| hash(salt, b)).collect();
        let Tree { root, levels } = Tree::build(level, salt);
        let mut sb = vec![0u8; BS];
        sb[..8].copy_from_slice(b"verity\0\0");
        data.extend_from_slice(&sb);
        for l in levels {
            data.extend_from_slice(&l);
        }
        let p = Params {
            root_hash: hex::encode(root),
            salt: hex::encode(salt),
            data_blocks: blocks as u64,
            hash_offset: (blocks * BS) as u64,
        };
        assert_eq!(data.len() as u64, p.hash_offset + hash_bytes(blocks as u64));
        (data, p)
    }

    #[test]
    fn a_slot_as_written_passes_with_one_and_two_levels() {
        for blocks in [3, PER_BLOCK + 5] {
            let (data, p) = slot(blocks, b"salt");
            check(&mut Cursor::new(data), &p).expect("passes");
        }
    }

    #[test]
    fn a_flipped_byte_in_the_data_or_the_tree_is_found() {
        let (data, p) = slot(PER_BLOCK + 5, b"s");
        let mut flipped = data.clone();
        flipped[5 * BS + 17] ^= 1;
        let err = check(&mut Cursor::new(flipped), &p).unwrap_err();
        assert!(matches!(err, VerityError::RootHash { .. }), "{err}");

        // The last hash block (level 0, second block): the root still matches only if
        // the tree is not compared, so this needs the byte-for-byte check.
        let mut flipped = data.clone();
        let last = data.len() - 10;
        flipped[last] ^= 0x80;
        let err = check(&mut Cursor::new(flipped), &p).unwrap_err();
        assert!(
            matches!(err, VerityError::Tree { block } if block == (last / BS) as u64),
            "{err}"
        );
    }

    #[test]
    fn another_root_hash_or_inconsistent_params_are_refused() {
        let (data, mut p) = slot(4, b"");
        p.root_hash = "00".repeat(32);
        assert!(matches!(
            check(&mut Cursor::new(data.clone()), &p),
            Err(VerityError::RootHash { .. })
        ));
        let (_, mut p) = slot(4, b"");
        p.hash_offset += 1;
        assert!(matches!(
            check(&mut Cursor::new(data.clone()), &p),
            Err(VerityError::Params {
                key: "hash_offset",
                ..
            })
        ));
        // A truncated slot: the read fails with its offset.
        let (data, p) = slot(4, b"");
        let short = data[..data.len() - BS].to_vec();
        assert!(matches!(
            check(&mut Cursor::new(short), &p),
            Err(VerityError::Read { .. })
        ));
    }
}
