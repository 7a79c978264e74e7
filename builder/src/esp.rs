//! The EFI system partition: a FAT filesystem written into a file with `fatfs`, no mounts.
//! Times are the FAT epoch (fatfs without a clock), the volume id comes from the caller.

use basalt_api::layout::Partition;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("create ESP image {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("format ESP image {0}")]
    Format(PathBuf, #[source] std::io::Error),
    #[error("write {file} into the ESP")]
    File {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// The FAT volume label: the partition's GPT name, space-padded to FAT's 11 bytes.
fn volume_label() -> [u8; 11] {
    let mut label = [b' '; 11];
    let name = Partition::Efi.name().as_bytes();
    let n = name.len().min(label.len());
    label[..n].copy_from_slice(&name[..n]);
    label
}

/// Creates a FAT image of `size` bytes at `out` holding `files` (path → bytes).
pub fn write(
    out: &Path,
    size: u64,
    volume_id: u32,
    files: &[(&str, Vec<u8>)],
) -> Result<(), EspError> {
    let mut img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(|e| EspError::Create(out.into(), e))?;
    img.set_len(size)
        .map_err(|e| EspError::Create(out.into(), e))?;
    let opts = fatfs::FormatVolumeOptions::new()
        .volume_id(volume_id)
        .volume_label(volume_label());
    fatfs::format_volume(&mut img, opts).map_err(|e| EspError::Format(out.into(), e))?;
    let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new())
        .map_err(|e| EspError::Format(out.into(), e))?;
    for (path, bytes) in files {
        let ferr = |source| EspError::File {
            file: (*path).into(),
            source,
        };
        let root = fs.root_dir();
        let mut dir = root.clone();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (name, parents) = parts.split_last().unwrap_or((&"", &[]));
        for p in parents {
            dir = match dir.open_dir(p) {
                Ok(d) => d,
                Err(_) => dir.create_dir(p).map_err(ferr)?,
            };
        }
        let mut f = dir.create_file(name).map_err(ferr)?;
        f.truncate().map_err(ferr)?;
        f.write_all(bytes).map_err(ferr)?;
        f.flush().map_err(ferr)?;
    }
    fs.unmount().map_err(|e| EspError::Format(out.into(), e))?;
    img.sync_all().map_err(|e| EspError::Create(out.into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn files_read_back_and_output_is_deterministic() {
        let d = tempfile::tempdir().expect("tempdir");
        let files = [
            ("EFI/BOOT/grub.cfg", b"set timeout=0\n".to_vec()),
            ("boot/a/vmlinuz", vec![9u8; 70_000]),
        ];
        let a = d.path().join("a.img");
        let b = d.path().join("b.img");
        write(&a, 32 << 20, 0x1234_5678, &files).expect("esp");
        write(&b, 32 << 20, 0x1234_5678, &files).expect("esp");
        assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));

        let img = std::fs::File::open(&a).expect("open");
        let fs = fatfs::FileSystem::new(img, fatfs::FsOptions::new()).expect("fat");
        assert_eq!(fs.volume_id(), 0x1234_5678);
        let mut s = String::new();
        fs.root_dir()
            .open_file("EFI/BOOT/grub.cfg")
            .expect("cfg")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "set timeout=0\n");
    }

    /// GRUB's save_env rewrites the environment block through the sectors it read it from
    /// and refuses a file whose sectors do not add up to its size: the block must be whole
    /// sectors, at one place on the partition, as the builder writes the ESP.
    #[test]
    fn the_environment_block_is_whole_contiguous_sectors() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut env = basalt_api::grubenv::GrubEnv::new();
        env.set("saved_entry", "a").expect("set");
        let block = env.to_block().expect("block").to_vec();
        assert_eq!(block.len() % 512, 0);
        // The ESP's files in the builder's order, with stand-in bytes that cannot be
        // mistaken for the block.
        let files = [
            ("EFI/BOOT/BOOTX64.EFI", vec![1u8; 300_000]),
            (
                crate::grub::GRUB_CFG,
                crate::grub::config(&crate::grub::SLOTS).into_bytes(),
            ),
            (crate::grub::GRUBENV, block.clone()),
            ("boot/a/vmlinuz", vec![2u8; 700_000]),
            ("boot/a/initrd.img", vec![3u8; 90_000]),
            ("boot/a/slot.cfg", b"set basalt_args='x'\n".to_vec()),
        ];
        let path = d.path().join("esp.img");
        write(&path, 64 << 20, 1, &files).expect("esp");
        let image = std::fs::read(&path).expect("read");
        let at: Vec<usize> = image
            .chunks(512)
            .enumerate()
            .filter(|(_, s)| *s == &block[..512])
            .map(|(i, _)| i * 512)
            .collect();
        assert_eq!(at.len(), 1, "the block's first sector is stored once");
        assert_eq!(
            &image[at[0]..at[0] + block.len()],
            block.as_slice(),
            "in one piece"
        );
    }
}
