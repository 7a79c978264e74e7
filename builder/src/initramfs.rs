//! The initramfs: basalt-stage1 (stage 1 alone) as `/init`, the module closure that reaches the root, and
//! the list stage 1 loads them from; written as a deterministic newc cpio, zstd-compressed.

use crate::kmod::Module;
use crate::tree::{Content, Tree};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("write initramfs {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("initramfs entry {0} is larger than cpio's 4 GiB limit")]
    TooLarge(String),
}

/// The tree of the initramfs. `dep` is the `modules.dep` of `modules`
/// ([`crate::kmod::ModuleGraph::depmod_files`]): stage 1 loads them in parallel along it.
pub fn tree(init: &Path, kver: &str, moddir: &Path, modules: &[&Module], dep: &str) -> Tree {
    let mut t = Tree::default();
    for dir in ["dev", "proc", "sys", "run", "newroot", "tmp"] {
        t.dir(dir, 0o755);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    t.char_dev("dev/console", 5, 1, 0o600);
    t.file("init", init, 0o755);
    t.bytes("etc/initrd-release", "NAME=basalt-initramfs\n", 0o644);
    let mut list = String::new();
    for m in modules {
        let dest = format!("lib/modules/{kver}/{}", m.rel_path.display());
        t.file(&dest, &moddir.join(&m.rel_path), 0o644);
        list.push('/');
        list.push_str(&dest);
        list.push('\n');
    }
    t.bytes("etc/basalt/initrd-modules", list, 0o644);
    t.bytes(&format!("lib/modules/{kver}/modules.dep"), dep, 0o644);
    t
}

/// Writes the tree as newc cpio through zstd into `out`.
pub fn write(tree: &Tree, out: &Path) -> Result<(), InitramfsError> {
    let werr = |e| InitramfsError::Write(out.into(), e);
    let file = std::fs::File::create(out).map_err(werr)?;
    let mut enc = zstd::stream::write::Encoder::new(file, 19).map_err(werr)?;
    write_cpio(tree, &mut enc)?;
    let file = enc.finish().map_err(werr)?;
    file.sync_all().map_err(werr)
}

/// The uncompressed cpio stream.
pub fn write_cpio(tree: &Tree, w: &mut dyn Write) -> Result<(), InitramfsError> {
    let werr = |e| InitramfsError::Write(PathBuf::from("<cpio>"), e);
    for (ino, (path, node)) in tree.nodes.iter().enumerate() {
        let (kind, data): (u32, Vec<u8>) = match &node.content {
            Content::Dir => (0o040000, vec![]),
            Content::File(p) => {
                let mut buf = vec![];
                std::fs::File::open(p)
                    .and_then(|mut f| f.read_to_end(&mut buf))
                    .map_err(|e| InitramfsError::Write(p.clone(), e))?;
                (0o100000, buf)
            }
            Content::Bytes(b) => (0o100000, b.clone()),
            Content::CharDev { .. } => (0o020000, vec![]),
            Content::Symlink(target) => (0o120000, target.as_bytes().to_vec()),
        };
        let (rmaj, rmin) = match node.content {
            Content::CharDev { major, minor } => (major, minor),
            _ => (0, 0),
        };
        let size = u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge(path.clone()))?;
        let mut writer = cpio::newc::Builder::new(path)
            .ino(ino as u32 + 1)
            .mode(kind | u32::from(node.mode))
            .nlink(if kind == 0o040000 { 2 } else { 1 })
            .rdev_major(rmaj)
            .rdev_minor(rmin)
            .write(&mut *w, size);
        writer.write_all(&data).map_err(werr)?;
        writer.finish().map_err(werr)?;
    }
    cpio::newc::trailer(w).map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_deterministic_and_readable() {
        let mut t = Tree::default();
        t.char_dev("dev/console", 5, 1, 0o600);
        t.bytes("init", "#!fake", 0o755);
        let mut a = vec![];
        let mut b = vec![];
        write_cpio(&t, &mut a).expect("cpio");
        write_cpio(&t, &mut b).expect("cpio");
        assert_eq!(a, b);

        let mut names = vec![];
        let mut rest = &a[..];
        loop {
            let r = cpio::newc::Reader::new(rest).expect("entry");
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            names.push((
                e.name().to_string(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
                e.mtime(),
                e.uid(),
            ));
            rest = r.finish().expect("finish");
        }
        assert_eq!(
            names,
            [
                ("dev".to_string(), 0o040755, 0, 0, 0, 0),
                ("dev/console".to_string(), 0o020600, 5, 1, 0, 0),
                ("init".to_string(), 0o100755, 0, 0, 0, 0),
            ]
        );
    }

    #[test]
    fn module_list_names_each_module_under_its_kernel_version() {
        let m = Module {
            name: "dm_mod".into(),
            rel_path: "kernel/drivers/md/dm-mod.ko".into(),
            depends: vec![],
        };
        let dep = "kernel/drivers/md/dm-mod.ko:\n";
        let t = tree(Path::new("/x/init"), "6.1.0-1", Path::new("/m"), &[&m], dep);
        assert_eq!(
            t.nodes["etc/basalt/initrd-modules"].content,
            Content::Bytes(b"/lib/modules/6.1.0-1/kernel/drivers/md/dm-mod.ko\n".to_vec())
        );
        assert_eq!(
            t.nodes["lib/modules/6.1.0-1/kernel/drivers/md/dm-mod.ko"].content,
            Content::File("/m/kernel/drivers/md/dm-mod.ko".into())
        );
        assert_eq!(
            t.nodes["lib/modules/6.1.0-1/modules.dep"].content,
            Content::Bytes(dep.as_bytes().to_vec())
        );
    }
}
