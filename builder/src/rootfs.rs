//! The read-only root filesystem: a deterministic squashfs written from a [`Tree`].

use crate::kmod::DepmodFiles;
use crate::tree::{Content, Node, Tree};
use backhand::{FilesystemWriter, NodeHeader};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("squashfs entry {0}")]
    Entry(String, #[source] backhand::BackhandError),
    #[error("write squashfs {0}")]
    Write(PathBuf, #[source] backhand::BackhandError),
    #[error("create {0}")]
    Create(PathBuf, #[source] std::io::Error),
}

/// What goes into the root besides kernel modules.
pub struct RootContent<'a> {
    pub init: &'a Path,
    pub k3s: &'a Path,
    pub k3s_images: &'a Path,
    pub ca_bundle: Vec<u8>,
    pub os_release: String,
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

/// Writes the tree as squashfs (xz, 128 KiB blocks, all owned by root, all times 0).
pub fn write(tree: &Tree, out: &Path) -> Result<u64, RootfsError> {
    let mut fs = FilesystemWriter::default();
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
