//! The read-only root filesystem: a deterministic squashfs written from a [`Tree`].

pub mod blocks;

use crate::kmod::DepmodFiles;
use crate::tree::{Content, Node, Tree};
use backhand::{FilesystemCompressor, FilesystemWriter, NodeHeader};
use blocks::{Block, Precompressed, Session, CODEC};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("squashfs entry {0}")]
    Entry(String, #[source] backhand::BackhandError),
    #[error("write squashfs {0}")]
    Write(PathBuf, #[source] backhand::BackhandError),
    #[error("create {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("read {0} for the root")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("compress the root's blocks")]
    Compress(#[source] std::io::Error),
}

impl From<std::io::Error> for RootfsError {
    fn from(e: std::io::Error) -> Self {
        RootfsError::Compress(e)
    }
}

/// What goes into the root besides kernel modules.
pub struct RootContent<'a> {
    pub init: &'a Path,
    pub k3s: &'a Path,
    pub k3s_images: &'a Path,
    pub ca_bundle: Vec<u8>,
    pub os_release: String,
    /// The image identity ([`basalt_api::bundle::Identity`]) as JSON.
    pub identity: Vec<u8>,
    pub kver: &'a str,
    pub moddir: &'a Path,
    /// `modules.dep`, `modules.alias`, `modules.softdep` for the modules under `moddir`.
    pub depmod: DepmodFiles,
}

/// Where the airgap images live on the root; K3s is pointed at them at join time.
pub const K3S_IMAGES: &str = "usr/share/basalt/k3s-airgap-images-amd64.tar.zst";

pub fn tree(c: &RootContent<'_>) -> Result<Tree, crate::tree::CopyError> {
    let mut t = Tree::default();
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "var",
        "mnt",
        "root",
        "etc/rancher",
    ] {
        t.dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 });
    }
    t.file("sbin/init", c.init, 0o755);
    t.file("usr/local/bin/k3s", c.k3s, 0o755);
    t.file(K3S_IMAGES, c.k3s_images, 0o644);
    t.bytes(
        "etc/ssl/certs/ca-certificates.crt",
        c.ca_bundle.clone(),
        0o644,
    );
    t.bytes("etc/os-release", c.os_release.clone(), 0o644);
    t.bytes(basalt_api::bundle::IDENTITY_PATH, c.identity.clone(), 0o644);
    let modules = format!("lib/modules/{}", c.kver);
    t.copy_dir(c.moddir, &modules)?;
    // After the copy, so these win over any stale index the package might ship.
    for (name, text) in [
        ("modules.dep", &c.depmod.dep),
        ("modules.alias", &c.depmod.alias),
        ("modules.softdep", &c.depmod.softdep),
    ] {
        t.bytes(&format!("{modules}/{name}"), text.clone(), 0o644);
    }
    // The root is read-only: resolv.conf follows the DHCP lease under /run.
    t.nodes.insert(
        "etc/resolv.conf".into(),
        Node {
            content: Content::Symlink("../run/resolv.conf".into()),
            mode: 0o777,
        },
    );
    // The kernel's request_module runs /sbin/modprobe; basalt-init answers under that name.
    t.nodes.insert(
        "sbin/modprobe".into(),
        Node {
            content: Content::Symlink("init".into()),
            mode: 0o777,
        },
    );
    Ok(t)
}

/// backhand's compressor for the root (a `Kind` takes it by `'static` reference).
static PRECOMPRESSED: Precompressed = Precompressed(CODEC);

/// Writes the tree as squashfs ([`CODEC`], 128 KiB blocks, all owned by root, all times 0).
/// The data blocks are compressed ahead on all cores (see [`blocks`]); backhand then writes
/// them in its own order, so the image does not depend on the number of threads.
pub fn write(tree: &Tree, out: &Path) -> Result<u64, RootfsError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    write_with(tree, out, threads)
}

/// A regular file of the tree, as the block plan reads it.
struct Source<'a> {
    path: &'a str,
    content: &'a Content,
    size: usize,
}

fn write_with(tree: &Tree, out: &Path, threads: usize) -> Result<u64, RootfsError> {
    let mut files = vec![];
    for (path, node) in &tree.nodes {
        let size = match &node.content {
            Content::File(src) => std::fs::metadata(src)
                .map_err(|e| RootfsError::Read(src.clone(), e))?
                .len() as usize,
            Content::Bytes(b) => b.len(),
            _ => continue,
        };
        files.push(Source {
            path,
            content: &node.content,
            size,
        });
    }
    blocks::backhand_order(&mut files, |f| f.path);
    let sizes: Vec<usize> = files.iter().map(|f| f.size).collect();
    let plan = blocks::plan(&sizes);
    let read = |block: &Block| -> Result<Vec<u8>, RootfsError> {
        let mut data = Vec::with_capacity(block.len());
        for (i, range) in &block.parts {
            match files[*i].content {
                Content::File(src) => {
                    let start = data.len();
                    data.resize(start + range.len(), 0);
                    std::fs::File::open(src)
                        .and_then(|f| f.read_exact_at(&mut data[start..], range.start as u64))
                        .map_err(|e| RootfsError::Read(src.clone(), e))?;
                }
                Content::Bytes(b) => data.extend_from_slice(&b[range.clone()]),
                _ => {}
            }
        }
        Ok(data)
    };
    let session = Session::compress(CODEC, &plan, threads, read)?;

    let mut fs = FilesystemWriter::default();
    fs.set_kind(backhand::kind::Kind::new_v4(&PRECOMPRESSED));
    fs.set_compressor(
        FilesystemCompressor::new(CODEC.squashfs_id(), None)
            .map_err(|e| RootfsError::Write(out.into(), e))?,
    );
    fs.set_time(0);
    fs.set_root_mode(0o755);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    for (path, node) in &tree.nodes {
        let header = NodeHeader::new(node.mode, 0, 0, 0);
        let entry = |e| RootfsError::Entry(path.clone(), e);
        match &node.content {
            Content::Dir => fs.push_dir(path, header).map_err(entry)?,
            Content::File(src) => fs
                .push_file_from_path(src.clone(), path, header)
                .map_err(entry)?,
            Content::Bytes(b) => fs
                .push_file(std::io::Cursor::new(b.clone()), path, header)
                .map_err(entry)?,
            Content::CharDev { major, minor } => {
                let dev = (major << 8) | (minor & 0xff) | ((minor & !0xff) << 12);
                fs.push_char_device(dev, path, header).map_err(entry)?
            }
            Content::Symlink(target) => fs
                .push_symlink(target.clone(), path, header)
                .map_err(entry)?,
        }
    }
    let file = std::fs::File::create(out).map_err(|e| RootfsError::Create(out.into(), e))?;
    let mut w = std::io::BufWriter::new(file);
    let (_, len) = fs
        .write(&mut w)
        .map_err(|e| RootfsError::Write(out.into(), e))?;
    drop(session);
    Ok(len)
}

/// Concatenates the Mozilla CA certificates of Debian's ca-certificates package (unpacked
/// at `root`) into one bundle, in path order: what `update-ca-certificates` would make.
pub fn ca_bundle(root: &Path) -> std::io::Result<Vec<u8>> {
    let dir = root.join("usr/share/ca-certificates/mozilla");
    let mut certs: Vec<_> = std::fs::read_dir(&dir)?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        .collect();
    certs.sort();
    if certs.is_empty() {
        return Err(std::io::Error::other(format!(
            "no certificates under {}",
            dir.display()
        )));
    }
    let mut out = vec![];
    for c in certs {
        let mut pem = std::fs::read(&c)?;
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        out.extend(pem);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random bytes, then zstd of them: content that is already compressed.
    fn compressed_bytes(len: usize) -> Vec<u8> {
        let mut seed = 7u64;
        let mut raw = Vec::with_capacity(len);
        while raw.len() < len {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            raw.extend_from_slice(&(seed >> 16).to_le_bytes());
        }
        zstd::bulk::compress(&raw, 3).expect("zstd")
    }

    #[test]
    fn the_squashfs_is_the_same_bytes_on_any_number_of_threads_and_reads_back() {
        const B: usize = blocks::BLOCK_SIZE;
        let d = tempfile::tempdir().expect("tempdir");
        let big = d.path().join("big");
        let text: Vec<u8> = (0..3 * B + 1000)
            .map(|i| b"basalt squashfs "[i % 16] ^ (i / 4096) as u8)
            .collect();
        std::fs::write(&big, &text).expect("write");
        let packed = d.path().join("images.tar.zst");
        std::fs::write(&packed, compressed_bytes(2 * B)).expect("write");
        let mut t = Tree::default();
        t.dir("usr", 0o755);
        t.file("usr/big", &big, 0o644);
        t.file("usr/images.tar.zst", &packed, 0o644);
        t.bytes("usr/zeros", vec![0; 2 * B], 0o644);
        for i in 0..40 {
            t.bytes(
                &format!("usr/small-{i}"),
                format!("file {i}\n").repeat(i * 50),
                0o644,
            );
        }
        let images: Vec<Vec<u8>> = [1, 3]
            .into_iter()
            .map(|threads| {
                let out = d.path().join(format!("root-{threads}.img"));
                write_with(&t, &out, threads).expect("write squashfs");
                std::fs::read(&out).expect("read")
            })
            .collect();
        assert!(images[0] == images[1], "1 and 3 threads differ");

        let fs = backhand::FilesystemReader::from_reader(std::io::Cursor::new(&images[0]))
            .expect("squashfs");
        let mut seen = 0;
        for node in fs.files() {
            let backhand::InnerNode::File(f) = &node.inner else {
                continue;
            };
            let path = node.fullpath.to_string_lossy();
            let mut data = vec![];
            std::io::Read::read_to_end(&mut fs.file(f).reader(), &mut data).expect("read");
            let want = match t.nodes[path.trim_start_matches('/')].content.clone() {
                Content::File(src) => std::fs::read(src).expect("read source"),
                Content::Bytes(b) => b,
                other => panic!("{path}: {other:?}"),
            };
            assert!(data == want, "{path} reads back different");
            seen += 1;
        }
        assert_eq!(seen, 43);
        // The compressed file (2 blocks) is stored as is: the image holds at least its bytes
        // plus the text's compressed blocks, and far less than all content.
        let packed_len = std::fs::metadata(&packed).expect("meta").len() as usize;
        assert!(images[0].len() > packed_len, "{}", images[0].len());
        assert!(
            images[0].len() < packed_len + text.len() / 4,
            "{}",
            images[0].len()
        );
    }

    #[test]
    fn the_tree_carries_the_module_index_and_a_modprobe_link_to_init() {
        let moddir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(moddir.path().join("kernel")).expect("mkdir");
        std::fs::write(moddir.path().join("modules.builtin"), "kernel/x.ko\n").expect("write");
        let c = RootContent {
            init: Path::new("/b/init"),
            k3s: Path::new("/b/k3s"),
            k3s_images: Path::new("/b/images"),
            ca_bundle: vec![],
            os_release: String::new(),
            identity: vec![],
            kver: "6.1.0-1",
            moddir: moddir.path(),
            depmod: DepmodFiles {
                dep: "kernel/a.ko: kernel/b.ko\n".into(),
                alias: "alias fs-a a\n".into(),
                softdep: "softdep a pre: b\n".into(),
            },
        };
        let t = tree(&c).expect("tree");
        let content = |p: &str| t.nodes[p].content.clone();
        let m = "lib/modules/6.1.0-1";
        assert_eq!(
            content(&format!("{m}/modules.dep")),
            Content::Bytes(b"kernel/a.ko: kernel/b.ko\n".to_vec())
        );
        assert_eq!(
            content(&format!("{m}/modules.alias")),
            Content::Bytes(b"alias fs-a a\n".to_vec())
        );
        assert_eq!(
            content(&format!("{m}/modules.softdep")),
            Content::Bytes(b"softdep a pre: b\n".to_vec())
        );
        assert_eq!(
            content(&format!("{m}/modules.builtin")),
            Content::File(moddir.path().join("modules.builtin"))
        );
        assert_eq!(content("sbin/modprobe"), Content::Symlink("init".into()));
    }
}
