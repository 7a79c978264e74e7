//! A filesystem tree described as data, written out as cpio (initramfs) or squashfs
//! (root). Entries are kept sorted; owners are always root and times always zero, so the
//! output depends on content alone.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Dir,
    /// A host file, read when the tree is written.
    File(PathBuf),
    Bytes(Vec<u8>),
    CharDev {
        major: u32,
        minor: u32,
    },
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub content: Content,
    /// Permission bits only (no file type).
    pub mode: u16,
}

#[derive(Debug, Default)]
pub struct Tree {
    /// Relative paths without a leading `/`.
    pub nodes: BTreeMap<String, Node>,
}

#[derive(Debug, thiserror::Error)]
#[error("copy {0} into the image tree")]
pub struct CopyError(PathBuf, #[source] std::io::Error);

impl Tree {
    fn key(path: &str) -> String {
        path.trim_matches('/').to_owned()
    }

    fn insert(&mut self, path: &str, node: Node) {
        let key = Self::key(path);
        let mut parent = Path::new(&key).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.nodes
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Node {
                    content: Content::Dir,
                    mode: 0o755,
                });
            parent = p.parent();
        }
        self.nodes.insert(key, node);
    }

    pub fn dir(&mut self, path: &str, mode: u16) {
        self.insert(
            path,
            Node {
                content: Content::Dir,
                mode,
            },
        );
    }

    pub fn file(&mut self, path: &str, source: &Path, mode: u16) {
        self.insert(
            path,
            Node {
                content: Content::File(source.into()),
                mode,
            },
        );
    }

    pub fn bytes(&mut self, path: &str, bytes: impl Into<Vec<u8>>, mode: u16) {
        self.insert(
            path,
            Node {
                content: Content::Bytes(bytes.into()),
                mode,
            },
        );
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32, mode: u16) {
        self.insert(
            path,
            Node {
                content: Content::CharDev { major, minor },
                mode,
            },
        );
    }

    /// Copies a host directory under `dest`: directories, regular files (permission bits
    /// kept, owner and time dropped) and symlinks.
    pub fn copy_dir(&mut self, source: &Path, dest: &str) -> Result<(), CopyError> {
        let err = |p: &Path, e| CopyError(p.into(), e);
        let mut entries: Vec<_> = std::fs::read_dir(source)
            .and_then(|rd| rd.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err(source, e))?;
        entries.sort_by_key(|e| e.file_name());
        let dest = Self::key(dest);
        self.dir(&dest, 0o755);
        for e in entries {
            let path = e.path();
            let target = format!("{dest}/{}", e.file_name().to_string_lossy());
            let meta = std::fs::symlink_metadata(&path).map_err(|e| err(&path, e))?;
            let mode = (meta.permissions().mode() & 0o7777) as u16;
            if meta.is_dir() {
                self.copy_dir(&path, &target)?;
            } else if meta.file_type().is_symlink() {
                let link = std::fs::read_link(&path).map_err(|e| err(&path, e))?;
                self.insert(
                    &target,
                    Node {
                        content: Content::Symlink(link.to_string_lossy().into()),
                        mode: 0o777,
                    },
                );
            } else if meta.is_file() {
                self.file(&target, &path, mode);
            }
        }
        Ok(())
    }

    /// Total bytes of file content.
    pub fn content_size(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match &n.content {
                Content::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
                Content::Bytes(b) => b.len() as u64,
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_entries_sorted() {
        let mut t = Tree::default();
        t.bytes("/etc/basalt/x", "1", 0o644);
        t.dir("dev", 0o755);
        let keys: Vec<_> = t.nodes.keys().cloned().collect();
        assert_eq!(keys, ["dev", "etc", "etc/basalt", "etc/basalt/x"]);
    }

    #[test]
    fn copy_dir_keeps_modes_and_symlinks() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(d.path().join("a/b")).expect("mkdir");
        std::fs::write(d.path().join("a/b/f"), "x").expect("write");
        std::fs::set_permissions(
            d.path().join("a/b/f"),
            std::fs::Permissions::from_mode(0o750),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("b/f", d.path().join("a/l")).expect("symlink");
        let mut t = Tree::default();
        t.copy_dir(&d.path().join("a"), "/opt/a").expect("copy");
        assert_eq!(t.nodes["opt/a/b/f"].mode, 0o750);
        assert_eq!(t.nodes["opt/a/l"].content, Content::Symlink("b/f".into()));
        assert_eq!(t.content_size(), 1);
    }
}
