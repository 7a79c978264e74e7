//! Finding a partition by its GPT name through sysfs, without udev: the kernel puts
//! `PARTNAME=` into each partition's `uevent`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name, e.g. `vda3`; the node is `/dev/<name>`.
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

impl BlockDev {
    pub fn dev_path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no partition named {name} appeared under {sys}/class/block within {timeout:?}")]
pub struct NotFound {
    pub name: String,
    pub sys: PathBuf,
    pub timeout: Duration,
}

/// Looks once for a partition called `partname`; the first in kernel-name order wins.
pub fn find(sys_root: &Path, partname: &str) -> Option<BlockDev> {
    let mut entries: Vec<_> = std::fs::read_dir(sys_root.join("class/block"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    entries.iter().find_map(|dir| {
        let uevent = std::fs::read_to_string(dir.join("uevent")).ok()?;
        parse_uevent(&uevent, partname)
    })
}

fn parse_uevent(uevent: &str, partname: &str) -> Option<BlockDev> {
    let field = |key: &str| {
        uevent
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    };
    if field("PARTNAME")? != partname || field("DEVTYPE")? != "partition" {
        return None;
    }
    Some(BlockDev {
        name: field("DEVNAME")?.to_owned(),
        major: field("MAJOR")?.parse().ok()?,
        minor: field("MINOR")?.parse().ok()?,
    })
}

/// Polls until the partition appears, at most `timeout`.
pub fn wait(sys_root: &Path, partname: &str, timeout: Duration) -> Result<BlockDev, NotFound> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find(sys_root, partname) {
            return Ok(dev);
        }
        if start.elapsed() >= timeout {
            return Err(NotFound {
                name: partname.into(),
                sys: sys_root.into(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::layout::Partition;

    fn add(sys: &Path, dev: &str, uevent: &str) {
        let dir = sys.join("class/block").join(dev);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("uevent"), uevent).expect("write");
    }

    #[test]
    fn finds_the_named_partition_and_ignores_others() {
        let sys = tempfile::tempdir().expect("tempdir");
        add(
            sys.path(),
            "vda",
            "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        );
        add(
            sys.path(),
            "vda2",
            &format!(
                "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME={}\n",
                Partition::Efi
            ),
        );
        add(
            sys.path(),
            "vda3",
            &format!(
                "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nDEVTYPE=partition\nPARTN=3\nPARTNAME={}\n",
                Partition::RootA
            ),
        );
        let dev = find(sys.path(), Partition::RootA.name()).expect("found");
        assert_eq!(
            dev,
            BlockDev {
                name: "vda3".into(),
                major: 254,
                minor: 3
            }
        );
        assert_eq!(dev.dev_path(), PathBuf::from("/dev/vda3"));
        assert_eq!(find(sys.path(), Partition::RootB.name()), None);
    }

    #[test]
    fn wait_gives_up_after_the_bound_and_names_the_partition() {
        let sys = tempfile::tempdir().expect("tempdir");
        let root_a = Partition::RootA.name();
        let err = wait(sys.path(), root_a, Duration::from_millis(30)).unwrap_err();
        assert!(err.to_string().contains(root_a), "{err}");
    }
}
