//! A built disk image, read back: the container (raw, or qcow2 turned into a sparse raw
//! copy by `qemu-img`), the GPT, the ESP's FAT, a root slot's squashfs and its dm-verity
//! superblock. Read-only, no root, no loop devices; `inspect` and `verify` build on it.

use basalt_api::gpt::{self, guid_string, u32_at, u64_at, HeaderFault, ReadError};
use basalt_api::layout::Sectors;
use serde::Serialize;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const VERITY_MAGIC: &[u8; 8] = b"verity\0\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// Which of the two GPT copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptCopy {
    Primary,
    Backup,
}

impl std::fmt::Display for GptCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GptCopy::Primary => "primary",
            GptCopy::Backup => "backup",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("open image {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("run qemu-img to read {0} (is qemu-utils installed?)")]
    QemuImgSpawn(PathBuf, #[source] io::Error),
    #[error("qemu-img could not convert {path} to raw: {stderr}")]
    QemuImg { path: PathBuf, stderr: String },
    #[error("read {len} bytes at byte {offset} of {path}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("{copy} GPT of {path} (LBA {lba}): {fault}")]
    Gpt {
        path: PathBuf,
        copy: GptCopy,
        lba: u64,
        fault: HeaderFault,
    },
    #[error("{path} is {sectors} sectors long, too small to hold a GPT")]
    TooSmall { path: PathBuf, sectors: u64 },
    #[error("{path} has no partition named {name}")]
    NoPartition { path: PathBuf, name: String },
    #[error("mount the FAT in {partition} of {path}")]
    Fat {
        path: PathBuf,
        partition: String,
        #[source]
        source: io::Error,
    },
    #[error("read {file} from {partition} of {path}")]
    File {
        path: PathBuf,
        partition: String,
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("read the squashfs in {partition} of {path}: {reason}")]
    Squashfs {
        path: PathBuf,
        partition: String,
        reason: &'static str,
    },
}

/// The image, open for reading. A qcow2 is read through a raw copy that lives as long as
/// this handle.
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    format: Format,
    file: File,
    len: u64,
    _raw_copy: Option<tempfile::TempDir>,
}

impl DiskImage {
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let open_err = |e| ImageError::Open(path.into(), e);
        let file = File::open(path).map_err(open_err)?;
        let mut magic = [0u8; 4];
        let n = file.read_at(&mut magic, 0).map_err(open_err)?;
        let (format, file, raw_copy) = if n == 4 && &magic == QCOW2_MAGIC {
            let (dir, raw) = qcow2_to_raw(path)?;
            let file = File::open(&raw).map_err(open_err)?;
            (Format::Qcow2, file, Some(dir))
        } else {
            (Format::Raw, file, None)
        };
        let len = file.metadata().map_err(open_err)?.len();
        Ok(DiskImage {
            path: path.into(),
            format,
            file,
            len,
            _raw_copy: raw_copy,
        })
    }

    /// The file as the caller named it (not the raw copy of a qcow2).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Size of the disk in whole sectors.
    pub fn sectors(&self) -> Sectors {
        Sectors(self.len / Sectors::SIZE)
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| ImageError::Read {
                path: self.path.clone(),
                offset,
                len: buf.len(),
                source,
            })
    }

    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, ImageError> {
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// One GPT copy, read and checked by the contract crate's reader (the one basalt-init
    /// reads STATE's table with). The primary is at LBA 1, the backup in the disk's last
    /// sector.
    pub fn gpt(&self, copy: GptCopy) -> Result<Gpt, ImageError> {
        let lba = match copy {
            GptCopy::Primary => 1,
            GptCopy::Backup => self.sectors().0.saturating_sub(1),
        };
        let table = gpt::read_copy(&self.file, lba).map_err(|e| self.gpt_error(e, copy))?;
        Ok(Gpt::new(table, lba))
    }

    /// The partition table: the primary copy, else the backup (`verify` says which is
    /// damaged). When neither is good, the primary's error.
    pub fn table(&self) -> Result<Gpt, ImageError> {
        let table = gpt::Table::read(&self.file, self.sectors())
            .map_err(|e| self.gpt_error(e, GptCopy::Primary))?;
        let lba = table.header.my_lba;
        Ok(Gpt::new(table, lba))
    }

    /// The reader's error, naming this image and the copy.
    fn gpt_error(&self, e: ReadError, copy: GptCopy) -> ImageError {
        let path = self.path.clone();
        match e {
            ReadError::Read {
                offset,
                len,
                source,
            } => ImageError::Read {
                path,
                offset,
                len,
                source,
            },
            ReadError::Header { lba, fault } => ImageError::Gpt {
                path,
                copy,
                lba,
                fault,
            },
            ReadError::TooSmall(sectors) => ImageError::TooSmall { path, sectors },
        }
    }

    /// A reader confined to one partition.
    pub fn partition_reader(&self, p: &GptPartition) -> Result<PartReader, ImageError> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| ImageError::Open(self.path.clone(), e))?;
        Ok(PartReader {
            file,
            start: p.offset(),
            len: p.size(),
            pos: 0,
        })
    }

    /// The FAT filesystem in `p` (the ESP).
    pub fn fat(&self, p: &GptPartition) -> Result<Fat, ImageError> {
        let fs = fatfs::FileSystem::new(self.partition_reader(p)?, fatfs::FsOptions::new())
            .map_err(|source| ImageError::Fat {
                path: self.path.clone(),
                partition: p.name.clone(),
                source,
            })?;
        Ok(Fat {
            fs,
            path: self.path.clone(),
            partition: p.name.clone(),
        })
    }

    /// Reads whole files (absolute paths) out of the squashfs at the start of `p`; `None`
    /// for a file that is not there.
    pub fn squashfs_files(
        &self,
        p: &GptPartition,
        files: &[&str],
    ) -> Result<Vec<Option<Vec<u8>>>, ImageError> {
        let reader = BufReader::new(self.partition_reader(p)?);
        let sqfs_err = |reason| ImageError::Squashfs {
            path: self.path.clone(),
            partition: p.name.clone(),
            reason,
        };
        let fs = backhand::FilesystemReader::from_reader(reader)
            .map_err(|e| sqfs_err(squashfs_reason(&e)))?;
        let mut out = vec![None; files.len()];
        for node in fs.files() {
            let backhand::InnerNode::File(f) = &node.inner else {
                continue;
            };
            let Some(i) = files.iter().position(|w| node.fullpath == Path::new(w)) else {
                continue;
            };
            let mut bytes = vec![];
            fs.file(f)
                .reader()
                .read_to_end(&mut bytes)
                .map_err(|source| ImageError::File {
                    path: self.path.clone(),
                    partition: p.name.clone(),
                    file: files[i].into(),
                    source,
                })?;
            out[i] = Some(bytes);
        }
        Ok(out)
    }
}

impl DiskImage {
    /// Path and size of every regular file under the directory `under` (an absolute path)
    /// of the squashfs at the start of `p`, in path order; nothing is decompressed.
    pub fn squashfs_sizes(
        &self,
        p: &GptPartition,
        under: &str,
    ) -> Result<Vec<(String, u64)>, ImageError> {
        let reader = BufReader::new(self.partition_reader(p)?);
        let fs =
            backhand::FilesystemReader::from_reader(reader).map_err(|e| ImageError::Squashfs {
                path: self.path.clone(),
                partition: p.name.clone(),
                reason: squashfs_reason(&e),
            })?;
        let dir = Path::new(under);
        let mut out: Vec<(String, u64)> = fs
            .files()
            .filter_map(|node| match &node.inner {
                backhand::InnerNode::File(f) if node.fullpath.starts_with(dir) => Some((
                    node.fullpath.to_string_lossy().into_owned(),
                    f.file_len() as u64,
                )),
                _ => None,
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

/// backhand is built without its `error-strings` feature, so its errors print nothing:
/// say what kind of fault it was here.
fn squashfs_reason(e: &backhand::BackhandError) -> &'static str {
    use backhand::BackhandError as E;
    match e {
        E::StdIo(_) => "I/O error",
        E::UnsupportedCompression(_) | E::MissingCompressor => "unsupported compression",
        E::UnsupportedSquashfsVersion(..) => "unsupported squashfs version",
        _ => "not a squashfs, or a corrupted one",
    }
}

fn qcow2_to_raw(path: &Path) -> Result<(tempfile::TempDir, PathBuf), ImageError> {
    let dir = tempfile::Builder::new()
        .prefix("basalt-image-")
        .tempdir()
        .map_err(|e| ImageError::Open(path.into(), e))?;
    let raw = dir.path().join("disk.raw");
    // qemu-img leaves zero runs as holes in a raw output: the copy stays sparse.
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .map_err(|e| ImageError::QemuImgSpawn(path.into(), e))?;
    if !out.status.success() {
        return Err(ImageError::QemuImg {
            path: path.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok((dir, raw))
}

/// One partition as a file of its own: reads and seeks stay inside it. Writes fail; the
/// FAT reader wants `Write` but writes nothing unless something is changed.
#[derive(Debug)]
pub struct PartReader {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for PartReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for PartReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before partition start")
        })?;
        Ok(self.pos)
    }
}

impl Write for PartReader {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the image is open read-only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A FAT filesystem inside the image. Without fatfs's `alloc` feature only 8.3 names are
/// seen; lookups ignore case.
pub struct Fat {
    fs: fatfs::FileSystem<PartReader>,
    path: PathBuf,
    partition: String,
}

impl Fat {
    fn err(&self, file: &str) -> impl FnOnce(io::Error) -> ImageError {
        let (path, partition, file) = (self.path.clone(), self.partition.clone(), file.into());
        move |source| ImageError::File {
            path,
            partition,
            file,
            source,
        }
    }

    /// The first `limit` bytes of a file (all of it when `limit` is `None`); `None` when
    /// the file does not exist.
    pub fn read(&self, file: &str, limit: Option<u64>) -> Result<Option<Vec<u8>>, ImageError> {
        let f = match self.fs.root_dir().open_file(file) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(file)(e)),
        };
        let mut bytes = vec![];
        f.take(limit.unwrap_or(u64::MAX))
            .read_to_end(&mut bytes)
            .map_err(self.err(file))?;
        Ok(Some(bytes))
    }

    /// Paths of all regular files, `/`-separated, in their 8.3 spelling (upper case).
    pub fn files(&self) -> Result<Vec<String>, ImageError> {
        let mut out = vec![];
        let mut todo = vec![(String::new(), self.fs.root_dir())];
        while let Some((prefix, dir)) = todo.pop() {
            for entry in dir.iter() {
                let entry = entry.map_err(self.err(&prefix))?;
                let name = String::from_utf8_lossy(entry.short_file_name_as_bytes()).into_owned();
                if name == "." || name == ".." {
                    continue;
                }
                let path = format!("{prefix}{name}");
                if entry.is_dir() {
                    todo.push((format!("{path}/"), entry.to_dir()));
                } else {
                    out.push(path);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// One parsed GPT copy.
#[derive(Debug, Clone)]
pub struct Gpt {
    pub header: gpt::Header,
    /// Where the header was read.
    pub lba: u64,
    /// The raw partition entry array.
    pub entries: Vec<u8>,
    pub partitions: Vec<GptPartition>,
}

impl Gpt {
    fn new(table: gpt::Table, lba: u64) -> Self {
        let partitions = gpt::entries(&table.entries)
            .map(|e| GptPartition {
                number: e.number,
                type_guid: guid_string(&e.type_guid),
                guid: guid_string(&e.guid),
                first_lba: Sectors(e.first_lba),
                sectors: e.sectors(),
                name: e.name,
            })
            .collect();
        Gpt {
            header: table.header,
            lba,
            entries: table.entries,
            partitions,
        }
    }
}

/// A used GPT entry. GUIDs are uppercase, as `sfdisk` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GptPartition {
    /// 1-based index in the entry array.
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub guid: String,
    pub first_lba: Sectors,
    pub sectors: Sectors,
}

impl GptPartition {
    pub fn offset(&self) -> u64 {
        self.first_lba.bytes()
    }
    pub fn size(&self) -> u64 {
        self.sectors.bytes()
    }
}

/// The named partition, or an error naming the image and the partition.
pub fn find<'a>(
    img: &DiskImage,
    parts: &'a [GptPartition],
    name: &str,
) -> Result<&'a GptPartition, ImageError> {
    parts
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| ImageError::NoPartition {
            path: img.path().into(),
            name: name.into(),
        })
}

/// The dm-verity superblock (`struct verity_sb` of cryptsetup, format 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VeritySuperblock {
    pub hash_type: u32,
    pub algorithm: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

impl VeritySuperblock {
    /// `None` when the block does not start with the verity magic.
    pub fn parse(block: &[u8]) -> Option<Self> {
        if block.len() < 344 || &block[..8] != VERITY_MAGIC {
            return None;
        }
        let alg = &block[32..64];
        let alg_len = alg.iter().position(|&b| b == 0).unwrap_or(alg.len());
        let salt_len = usize::from(u16::from_le_bytes([block[80], block[81]])).min(256);
        Some(VeritySuperblock {
            hash_type: u32_at(block, 12),
            algorithm: String::from_utf8_lossy(&alg[..alg_len]).into_owned(),
            data_block_size: u32_at(block, 64),
            hash_block_size: u32_at(block, 68),
            data_blocks: u64_at(block, 72),
            salt: block[88..88 + salt_len].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> crate::disk::Layout {
        let disk = crate::spec::Disk {
            esp_mib: 2,
            root_mib: 2,
            state_mib: 1,
        };
        crate::disk::Layout::new(&disk, |n| {
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, n.as_bytes())
        })
    }

    /// A small disk written by `disk::write`, which uses the `gpt` crate: an independent
    /// writer for this reader.
    fn small_disk(dir: &Path) -> PathBuf {
        let img = dir.join("disk.raw");
        crate::disk::write(&img, &layout(), [0; 440], &[]).expect("disk");
        img
    }

    #[test]
    fn both_gpt_copies_read_back_what_disk_wrote() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = DiskImage::open(&small_disk(d.path())).expect("open");
        assert_eq!(img.format(), Format::Raw);
        let l = layout();
        let primary = img.gpt(GptCopy::Primary).expect("primary");
        let backup = img.gpt(GptCopy::Backup).expect("backup");
        assert_eq!(primary.header.my_lba, 1);
        assert_eq!(primary.header.alternate_lba, l.total.0 - 1);
        assert_eq!(backup.header.my_lba, l.total.0 - 1);
        assert_eq!(
            guid_string(&primary.header.disk_guid),
            l.disk_guid.to_string().to_uppercase()
        );
        assert_eq!(primary.entries, backup.entries);
        let got: Vec<_> = primary
            .partitions
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.name.as_str(),
                    p.first_lba,
                    p.sectors,
                    p.guid.clone(),
                )
            })
            .collect();
        let want: Vec<_> = l
            .partitions
            .iter()
            .map(|p| {
                let guid = p.guid.to_string().to_uppercase();
                (p.number, p.name, p.first_lba, p.sectors, guid)
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            primary.partitions[1].type_guid,
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        );
    }

    #[test]
    fn damaged_gpt_copies_are_told_apart() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = small_disk(d.path());
        let total = layout().total.0;
        let flip = |at: u64| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open");
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).expect("read");
            f.write_all_at(&[b[0] ^ 0x40], at).expect("write");
        };
        flip(512 + 40); // primary header: first usable LBA
        flip((total - 33) * 512 + 60); // backup array: first entry's name
        let img = DiskImage::open(&path).expect("open");
        let err = img.gpt(GptCopy::Primary).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Gpt {
                    copy: GptCopy::Primary,
                    lba: 1,
                    fault: HeaderFault::HeaderCrc { .. },
                    ..
                }
            ),
            "{err}"
        );
        let err = img.gpt(GptCopy::Backup).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Gpt {
                    copy: GptCopy::Backup,
                    fault: HeaderFault::EntriesCrc { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("backup GPT"), "{err}");
        // Neither copy is good: the table cannot be read.
        assert!(img.table().is_err());
    }

    #[test]
    fn partition_reader_stays_inside_its_partition() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("x.raw");
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("write");
        let img = DiskImage::open(&path).expect("open");
        let p = GptPartition {
            number: 1,
            name: "P".into(),
            type_guid: String::new(),
            guid: String::new(),
            first_lba: Sectors(2),
            sectors: Sectors(2),
        };
        let mut r = img.partition_reader(&p).expect("reader");
        let mut all = vec![];
        r.read_to_end(&mut all).expect("read");
        assert_eq!(all, &bytes[1024..2048]);
        assert_eq!(r.seek(SeekFrom::End(-1)).expect("seek"), 1023);
        assert!(r.seek(SeekFrom::Current(-2000)).is_err());
        assert!(r.write(b"x").is_err());
    }

    #[test]
    fn qcow2_is_detected_and_read_as_raw() {
        let d = tempfile::tempdir().expect("tempdir");
        let raw = small_disk(d.path());
        let qcow = d.path().join("disk.qcow2");
        let st = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow)
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let img = DiskImage::open(&qcow).expect("open");
        assert_eq!(img.format(), Format::Qcow2);
        assert_eq!(img.path(), qcow);
        assert_eq!(img.sectors(), layout().total);
        assert_eq!(img.table().expect("gpt").partitions.len(), 5);
    }

    #[test]
    fn errors_name_the_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let missing = d.path().join("nope.raw");
        let err = DiskImage::open(&missing).unwrap_err();
        assert!(err.to_string().contains("nope.raw"), "{err}");
        let bad = d.path().join("bad.qcow2");
        std::fs::write(&bad, b"QFI\xfbtruncated").expect("write");
        let err = DiskImage::open(&bad).unwrap_err();
        assert!(matches!(err, ImageError::QemuImg { .. }), "{err}");
        assert!(err.to_string().contains("bad.qcow2"), "{err}");
        let tiny = d.path().join("tiny.raw");
        std::fs::write(&tiny, [0u8; 700]).expect("write");
        let err = DiskImage::open(&tiny).expect("open").table().unwrap_err();
        assert!(err.to_string().contains("tiny.raw"), "{err}");
    }

    #[test]
    fn verity_superblock_reads_what_verity_writes() {
        let mut dev = io::Cursor::new(vec![3u8; 2 * 4096]);
        crate::verity::append(&mut dev, 2 * 4096, b"pepper", [9; 16]).expect("append");
        let data = dev.into_inner();
        let sb = VeritySuperblock::parse(&data[2 * 4096..]).expect("superblock");
        assert_eq!(sb.data_blocks, 2);
        assert_eq!(sb.salt, b"pepper");
        assert_eq!(sb.algorithm, "sha256");
        assert_eq!((sb.data_block_size, sb.hash_block_size), (4096, 4096));
        assert_eq!(VeritySuperblock::parse(&data[..4096]), None);
    }
}
