//! The kernel plumbing K3s expects below it, as tables applied by small idempotent
//! functions over a root path: cgroup v2 with every controller delegated to children,
//! the sysctls kubelet and the CNI check, and the modules loaded up front (by
//! [`crate::kmod::parallel`]).

use crate::boot::mounts::{self, Mount, MountError};
use crate::sys::System;
use nix::mount::MsFlags;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The unified cgroup hierarchy. `nsdelegate` lets containerd hand a cgroup namespace to
/// each container as a delegation boundary.
pub const CGROUP2: Mount = Mount {
    source: "cgroup2",
    target: "/sys/fs/cgroup",
    fstype: "cgroup2",
    flags: MsFlags::MS_NODEV
        .union(MsFlags::MS_NOSUID)
        .union(MsFlags::MS_NOEXEC)
        .union(MsFlags::MS_RELATIME),
    data: Some("nsdelegate"),
};

/// One `/proc/sys` setting.
pub struct Sysctl {
    /// Dotted name, as `sysctl(8)` takes it.
    pub key: &'static str,
    pub value: &'static str,
}

const fn sysctl(key: &'static str, value: &'static str) -> Sysctl {
    Sysctl { key, value }
}

/// What K3s needs: forwarding for pod traffic, bridged traffic through iptables (needs
/// `br_netfilter` loaded first), inotify room for kubelet and containerd, and the values
/// kubelet's `--protect-kernel-defaults` insists on (it refuses to start when they differ).
pub const K3S_SYSCTLS: &[Sysctl] = &[
    sysctl("net.ipv4.ip_forward", "1"),
    sysctl("net.ipv6.conf.all.forwarding", "1"),
    sysctl("net.bridge.bridge-nf-call-iptables", "1"),
    sysctl("net.bridge.bridge-nf-call-ip6tables", "1"),
    sysctl("fs.inotify.max_user_instances", "8192"),
    sysctl("fs.inotify.max_user_watches", "524288"),
    sysctl("vm.overcommit_memory", "1"),
    sysctl("vm.panic_on_oom", "0"),
    sysctl("kernel.panic", "10"),
    sysctl("kernel.panic_on_oops", "1"),
    sysctl("kernel.keys.root_maxkeys", "1000000"),
    sysctl("kernel.keys.root_maxbytes", "25000000"),
];

/// Modules loaded before K3s starts: the overlay snapshotter, bridge netfilter (whose
/// sysctls exist only once it is loaded), conntrack, both iptables back ends K3s's
/// bundled iptables may pick, the matches kube-proxy and flannel use, and flannel's
/// VXLAN and veth. Anything else the kernel requests on demand through `/sbin/modprobe`.
pub const K3S_MODULES: &[&str] = &[
    "overlay",
    "br_netfilter",
    "nf_conntrack",
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "iptable_mangle",
    "ip6_tables",
    "ip6table_filter",
    "ip6table_nat",
    "ip6table_mangle",
    "nf_tables",
    "nft_compat",
    "xt_conntrack",
    "xt_MASQUERADE",
    "xt_comment",
    "xt_mark",
    "xt_addrtype",
    "vxlan",
    "veth",
];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("read {0}")]
    Controllers(PathBuf, #[source] std::io::Error),
    #[error("enable controllers {controllers:?} in {path}")]
    SubtreeControl {
        path: PathBuf,
        controllers: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("sysctl {key} ({path})")]
    Sysctl {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Mounts cgroup2 on `<root>/sys/fs/cgroup`; already mounted counts as done.
pub fn mount_cgroup2(sys: &mut dyn System, root: &Path) -> Result<(), MountError> {
    mounts::apply(sys, root, std::slice::from_ref(&CGROUP2))
}

/// Enables every controller the root cgroup offers (`cgroup.controllers`) for its
/// children (`cgroup.subtree_control`), in one write so the kernel applies them together.
/// Returns the controllers enabled.
pub fn enable_controllers(root: &Path) -> Result<Vec<String>, KernelError> {
    let cgroup = root.join(CGROUP2.target.trim_start_matches('/'));
    let available = cgroup.join("cgroup.controllers");
    let controllers: Vec<String> = std::fs::read_to_string(&available)
        .map_err(|e| KernelError::Controllers(available, e))?
        .split_whitespace()
        .map(String::from)
        .collect();
    if controllers.is_empty() {
        return Ok(controllers);
    }
    let line = controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let path = cgroup.join("cgroup.subtree_control");
    write_existing(&path, &line).map_err(|source| KernelError::SubtreeControl {
        path,
        controllers: controllers.clone(),
        source,
    })?;
    Ok(controllers)
}

/// `net.ipv4.ip_forward` → `<root>/proc/sys/net/ipv4/ip_forward`.
pub fn sysctl_path(root: &Path, key: &str) -> PathBuf {
    root.join("proc/sys").join(key.replace('.', "/"))
}

/// Writes every setting under `<root>/proc/sys`; one that fails does not stop the others.
/// Returns the failures, each naming its key and file.
pub fn apply_sysctls(root: &Path, table: &[Sysctl]) -> Vec<KernelError> {
    table
        .iter()
        .filter_map(|s| {
            let path = sysctl_path(root, s.key);
            write_existing(&path, s.value)
                .err()
                .map(|source| KernelError::Sysctl {
                    key: s.key.into(),
                    path,
                    source,
                })
        })
        .collect()
}

/// Kernel files are never created, only written: a missing one is an error, not a new
/// file in a tmpfs.
fn write_existing(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};
    use nix::errno::Errno;

    #[test]
    fn cgroup2_is_mounted_with_nsdelegate_and_already_mounted_is_fine() {
        let mut sys = Recording {
            failing_mounts: vec![(PathBuf::from("/r/sys/fs/cgroup"), Errno::EBUSY)],
            ..Default::default()
        };
        mount_cgroup2(&mut sys, Path::new("/r")).expect("EBUSY is success");
        assert!(sys.calls.contains(&Call::Mount {
            source: "cgroup2".into(),
            target: "/r/sys/fs/cgroup".into(),
            fstype: Some("cgroup2".into()),
            flags: CGROUP2.flags,
        }));
        assert_eq!(CGROUP2.data, Some("nsdelegate"));
    }

    #[test]
    fn every_available_controller_is_enabled_for_children() {
        let root = tempfile::tempdir().expect("tempdir");
        let cg = root.path().join("sys/fs/cgroup");
        std::fs::create_dir_all(&cg).expect("mkdir");
        std::fs::write(cg.join("cgroup.controllers"), "cpuset cpu io memory pids\n")
            .expect("write");
        std::fs::write(cg.join("cgroup.subtree_control"), "").expect("write");
        let enabled = enable_controllers(root.path()).expect("enabled");
        assert_eq!(enabled, ["cpuset", "cpu", "io", "memory", "pids"]);
        assert_eq!(
            std::fs::read_to_string(cg.join("cgroup.subtree_control")).expect("read"),
            "+cpuset +cpu +io +memory +pids"
        );
        // Idempotent: a second run writes the same.
        enable_controllers(root.path()).expect("again");
    }

    #[test]
    fn a_missing_cgroup_hierarchy_is_named() {
        let root = tempfile::tempdir().expect("tempdir");
        let err = enable_controllers(root.path()).expect_err("no cgroupfs");
        assert!(err.to_string().contains("cgroup.controllers"), "{err}");
    }

    #[test]
    fn sysctls_are_written_and_a_missing_one_is_named_without_stopping_the_rest() {
        let root = tempfile::tempdir().expect("tempdir");
        let table = [
            sysctl("net.ipv4.ip_forward", "1"),
            sysctl("net.bridge.bridge-nf-call-iptables", "1"),
            sysctl("kernel.panic", "10"),
        ];
        for key in ["net.ipv4.ip_forward", "kernel.panic"] {
            let p = sysctl_path(root.path(), key);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, "0\n").expect("write");
        }
        let errors = apply_sysctls(root.path(), &table);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            matches!(&errors[0], KernelError::Sysctl { key, .. }
                if key == "net.bridge.bridge-nf-call-iptables"),
            "{errors:?}"
        );
        assert!(!sysctl_path(root.path(), "net.bridge.bridge-nf-call-iptables").exists());
        let read = |k| std::fs::read_to_string(sysctl_path(root.path(), k)).expect("read");
        assert_eq!(read("net.ipv4.ip_forward"), "1");
        assert_eq!(read("kernel.panic"), "10");
    }

    #[test]
    fn the_tables_hold_what_k3s_checks() {
        let keys: Vec<_> = K3S_SYSCTLS.iter().map(|s| s.key).collect();
        for k in ["net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"] {
            assert!(keys.contains(&k), "{k}");
        }
        for m in ["overlay", "br_netfilter", "nf_conntrack", "vxlan"] {
            assert!(K3S_MODULES.contains(&m), "{m}");
        }
    }
}
