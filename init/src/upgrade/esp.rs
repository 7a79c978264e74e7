//! The EFI system partition, read and written in user space with `fatfs` (as the builder
//! writes it), never mounted: the Debian cloud kernel builds vfat and its code page as
//! modules the root does not need otherwise, and nothing else on the node uses the ESP.
//!
//! What the node changes on it: a slot's boot files under `/boot/<slot>/` (temp files,
//! then renamed, `slot.cfg` last) and the GRUB environment block, overwritten in place
//! (same clusters, same size) because GRUB's `save_env` writes the blocks it finds.
//! Names are 8.3 (the builder writes no long names; fatfs without `alloc` cannot).

use basalt_api::grubenv::{GrubEnv, GrubEnvError, BLOCK_SIZE};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The GRUB environment block on the ESP (next to grub.cfg).
pub const GRUBENV: &str = "EFI/BOOT/grubenv";
/// A slot's folder on the ESP.
pub fn slot_dir(slot: &str) -> String {
    format!("boot/{slot}")
}
/// The boot files of a slot, in the order they are put in place (slot.cfg last: a slot
/// without it is not bootable, one with it has its kernel and initramfs already).
pub const FILES: [(&str, &str); 3] = [
    ("vmlinuz", "VMLINUZ.NEW"),
    ("initrd.img", "INITRD.NEW"),
    ("slot.cfg", "SLOT.NEW"),
];

#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("open the ESP {dev}")]
    Open {
        dev: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ESP {dev}: {what}")]
    Io {
        dev: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("ESP {dev}: {GRUBENV}: {source}")]
    Env {
        dev: PathBuf,
        #[source]
        source: GrubEnvError,
    },
    #[error("ESP {dev}: {GRUBENV} is {len} bytes, not a {BLOCK_SIZE}-byte GRUB environment block")]
    EnvSize { dev: PathBuf, len: u64 },
}

/// The ESP, opened on its device (a partition on a node, an image file in tests).
pub struct Esp {
    dev: PathBuf,
    file: File,
}

type Fs<'a> = fatfs::FileSystem<&'a mut File>;

impl Esp {
    pub fn open(dev: &Path) -> Result<Esp, EspError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(|source| EspError::Open {
                dev: dev.into(),
                source,
            })?;
        Ok(Esp {
            dev: dev.into(),
            file,
        })
    }

    fn io(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> EspError {
        let dev = self.dev.clone();
        let what = what.into();
        move |source| EspError::Io { dev, what, source }
    }

    /// Runs `f` on the mounted filesystem, then unmounts it and syncs the device.
    fn with_fs<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&Fs<'_>) -> io::Result<T>,
    ) -> Result<T, EspError> {
        let err = self.io(what);
        let result = (|| {
            // fatfs asserts (panics) that it starts at the volume's first byte.
            self.file.seek(SeekFrom::Start(0))?;
            let fs = fatfs::FileSystem::new(&mut self.file, fatfs::FsOptions::new())?;
            let out = f(&fs)?;
            fs.unmount()?;
            Ok(out)
        })()
        .map_err(err)?;
        self.file.sync_all().map_err(self.io("sync"))?;
        Ok(result)
    }

    /// Reads the GRUB environment block.
    pub fn read_env(&mut self) -> Result<GrubEnv, EspError> {
        let block = self.with_fs(&format!("read {GRUBENV}"), |fs| {
            let mut f = fs.root_dir().open_file(GRUBENV)?;
            let mut block = Vec::with_capacity(BLOCK_SIZE);
            f.read_to_end(&mut block)?;
            Ok(block)
        })?;
        if block.len() != BLOCK_SIZE {
            return Err(EspError::EnvSize {
                dev: self.dev.clone(),
                len: block.len() as u64,
            });
        }
        GrubEnv::parse(&block).map_err(|source| EspError::Env {
            dev: self.dev.clone(),
            source,
        })
    }

    /// Writes `env` over the block in place: the file keeps its size and clusters (no
    /// truncate), so GRUB's `save_env` still finds it where it was.
    pub fn write_env(&mut self, env: &GrubEnv) -> Result<(), EspError> {
        let block = env.to_block().map_err(|source| EspError::Env {
            dev: self.dev.clone(),
            source,
        })?;
        let dev = self.dev.clone();
        let mut len = 0;
        self.with_fs(&format!("write {GRUBENV}"), |fs| {
            let mut f = fs.root_dir().open_file(GRUBENV)?;
            len = f.seek(SeekFrom::End(0))?;
            if len != BLOCK_SIZE as u64 {
                return Ok(());
            }
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&block)?;
            f.flush()
        })?;
        if len != BLOCK_SIZE as u64 {
            return Err(EspError::EnvSize { dev, len });
        }
        Ok(())
    }

    /// Opens the temp file `temp` in `/boot/<slot>/` (created, emptied) and hands it to
    /// `fill`.
    pub fn write_temp(
        &mut self,
        slot: &str,
        temp: &str,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), EspError> {
        let dir = slot_dir(slot);
        self.with_fs(&format!("write {dir}/{temp}"), |fs| {
            let root = fs.root_dir();
            let boot = match root.open_dir("boot") {
                Ok(d) => d,
                Err(_) => root.create_dir("boot")?,
            };
            let slot_dir = match boot.open_dir(slot) {
                Ok(d) => d,
                Err(_) => boot.create_dir(slot)?,
            };
            let mut f = slot_dir.create_file(temp)?;
            f.truncate()?;
            fill(&mut f)?;
            f.flush()
        })
    }

    /// Replaces `/boot/<slot>/<name>` with its temp file.
    pub fn put_in_place(&mut self, slot: &str, temp: &str, name: &str) -> Result<(), EspError> {
        let dir = slot_dir(slot);
        self.with_fs(&format!("rename {dir}/{temp} to {name}"), |fs| {
            let d = fs.root_dir().open_dir(&dir)?;
            match d.remove(name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            d.rename(temp, &d, name)
        })
    }

    /// Removes the temp files of a slot (an upgrade that did not finish).
    pub fn remove_temps(&mut self, slot: &str) -> Result<(), EspError> {
        let dir = slot_dir(slot);
        self.with_fs(&format!("clean {dir}"), |fs| {
            if let Ok(d) = fs.root_dir().open_dir(&dir) {
                for (_, temp) in FILES {
                    let _ = d.remove(temp);
                }
            }
            Ok(())
        })
    }

    /// A file's bytes, `None` if it is not there.
    pub fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, EspError> {
        self.with_fs(&format!("read {path}"), |fs| {
            match fs.root_dir().open_file(path) {
                Ok(mut f) => {
                    let mut out = Vec::new();
                    f.read_to_end(&mut out)?;
                    Ok(Some(out))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
    }
}

/// A FAT image with a grubenv holding `vars`, as the builder writes one (tests).
#[cfg(test)]
pub fn test_image(path: &Path, vars: &[(&str, &str)]) {
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create");
    f.set_len(8 << 20).expect("size");
    fatfs::format_volume(&mut f, fatfs::FormatVolumeOptions::new()).expect("format");
    f.seek(SeekFrom::Start(0)).expect("seek");
    let fs = fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new()).expect("fs");
    let root = fs.root_dir();
    root.create_dir("EFI").expect("dir");
    root.create_dir("EFI/BOOT").expect("dir");
    root.create_dir("boot").expect("dir");
    root.create_dir("boot/a").expect("dir");
    for (name, text) in [("vmlinuz", "kernel a"), ("slot.cfg", "set basalt_args=a")] {
        let mut file = root.create_file(&format!("boot/a/{name}")).expect("file");
        file.write_all(text.as_bytes()).expect("write");
    }
    let mut env = GrubEnv::new();
    for (k, v) in vars {
        env.set(k, v).expect("set");
    }
    let mut file = root.create_file(GRUBENV).expect("grubenv");
    file.write_all(&env.to_block().expect("block"))
        .expect("write");
    drop(file);
    drop(root);
    fs.unmount().expect("unmount");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_is_rewritten_in_place_and_files_are_put_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("esp.img");
        test_image(&img, &[("saved_entry", "a")]);
        let mut esp = Esp::open(&img).expect("open");
        let mut env = esp.read_env().expect("env");
        assert_eq!(env.get("saved_entry"), Some("a"));
        // Where the block sits in the image, before and after.
        let raw = std::fs::read(&img).expect("read");
        let at = raw
            .windows(24)
            .position(|w| w == b"# GRUB Environment Block")
            .expect("block in the image");
        env.set("next_entry", "b").expect("set");
        esp.write_env(&env).expect("write");
        let raw = std::fs::read(&img).expect("read");
        assert_eq!(&raw[at..at + 24], b"# GRUB Environment Block");
        assert_eq!(
            GrubEnv::parse(&raw[at..at + BLOCK_SIZE])
                .expect("parse")
                .get("next_entry"),
            Some("b"),
            "written over the same bytes"
        );

        esp.write_temp("b", "VMLINUZ.NEW", |w: &mut dyn Write| {
            w.write_all(b"kernel b")
        })
        .expect("temp");
        assert_eq!(esp.read_file("boot/b/vmlinuz").expect("read"), None);
        esp.put_in_place("b", "VMLINUZ.NEW", "vmlinuz")
            .expect("rename");
        assert_eq!(
            esp.read_file("boot/b/vmlinuz").expect("read").as_deref(),
            Some(&b"kernel b"[..])
        );
        // Replacing an existing file.
        esp.write_temp("a", "SLOT.NEW", |w: &mut dyn Write| w.write_all(b"new"))
            .expect("temp");
        esp.put_in_place("a", "SLOT.NEW", "slot.cfg")
            .expect("rename");
        assert_eq!(
            esp.read_file("boot/a/slot.cfg").expect("read").as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(esp.read_file("boot/a/SLOT.NEW").expect("read"), None);
    }
}
