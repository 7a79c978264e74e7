//! Prerequisites of tests, probed from a build script; and the one static cargo build of
//! a workspace binary ([`static_build`]).
//!
//! libtest cannot skip a test at run time: a test that returns early for lack of QEMU or
//! root counts as *passed*, and a summary full of such passes proves nothing. So the test
//! crates probe the host in `build.rs` and, where a prerequisite is missing, set a cfg that
//! turns the tests needing it into `#[ignore]`d ones, which `cargo test` counts and prints
//! with their reason. In CI (`CI` set, as every CI service does) nothing is ever ignored:
//! the tests run and fail on the missing tool, and the build prints what is missing.
//!
//! ```text
//! // build.rs
//! basalt_build_support::probe(&[basalt_build_support::QEMU]);
//! // a test
//! #[cfg_attr(basalt_skip_qemu, ignore = "needs QEMU and the image host tools")]
//! ```

use std::path::Path;

pub mod static_build;

/// One prerequisite: the cfg set when it is missing outside CI, and what it needs.
#[derive(Debug)]
pub struct Prereq {
    /// Set as `--cfg <skip_cfg>` when something is missing and this is not CI.
    pub skip_cfg: &'static str,
    /// What the tests need it for, for the build's warning.
    pub what: &'static str,
    pub needs: &'static [Need],
}

/// Something a test needs from the host.
#[derive(Debug)]
pub enum Need {
    /// Effective uid 0 (mounts, network namespaces, loop devices).
    Root,
    /// An executable on `PATH` (or in /usr/sbin, /sbin, which root's PATH has).
    Tool(&'static str),
    /// A file that must exist (firmware images).
    File(&'static str),
}

/// The host tools of `scripts/install-host-tools` that building and booting an image needs.
pub const QEMU: Prereq = Prereq {
    skip_cfg: "basalt_skip_qemu",
    what: "building images and booting them under QEMU",
    needs: &[
        Need::Tool("qemu-system-x86_64"),
        Need::Tool("qemu-img"),
        Need::Tool("apt-get"),
        Need::Tool("grub-mkimage"),
        Need::Tool("mkfs.ext4"),
        Need::Tool("sfdisk"),
        Need::Tool("sgdisk"),
        Need::Tool("veritysetup"),
        Need::Tool("unsquashfs"),
        Need::Tool("fsck.fat"),
        // The A/B tests write slot B's files into the ESP and arm it with independent tools.
        Need::Tool("mcopy"),
        Need::Tool("grub-editenv"),
        Need::File("/usr/share/seabios/bios-256k.bin"),
        Need::File("/usr/share/OVMF/OVMF_CODE_4M.fd"),
    ],
};

/// util-linux's `sfdisk`: GPTs written by a tool other than ours, for the shared reader.
pub const SFDISK: Prereq = Prereq {
    skip_cfg: "basalt_skip_sfdisk",
    what: "reading GPTs written by sfdisk",
    needs: &[Need::Tool("sfdisk")],
};

/// grub-common's `grub-editenv`: the oracle of the GRUB environment block codec.
pub const GRUB_EDITENV: Prereq = Prereq {
    skip_cfg: "basalt_skip_grub_editenv",
    what: "the GRUB environment block against grub-editenv",
    needs: &[Need::Tool("grub-editenv")],
};

/// Root privileges, for tests that mount filesystems.
pub const ROOT: Prereq = Prereq {
    skip_cfg: "basalt_skip_root",
    what: "mounting filesystems",
    needs: &[Need::Root],
};

/// Root, iproute2 and dnsmasq: DHCP against a real server in network namespaces.
pub const NETNS_DNSMASQ: Prereq = Prereq {
    skip_cfg: "basalt_skip_netns",
    what: "network namespaces with a real dnsmasq",
    needs: &[Need::Root, Need::Tool("ip"), Need::Tool("dnsmasq")],
};

/// Root, OpenSSH's sshd and the tools of its rescue shell: the fake Hetzner API, whose
/// rescue system is a real sshd with a loop device as its `/dev/sda`.
pub const HCLOUD_FAKE: Prereq = Prereq {
    skip_cfg: "basalt_skip_hcloud_fake",
    what: "the fake Hetzner API (a real sshd as its rescue system, loop devices)",
    needs: &[
        Need::Root,
        Need::Tool("sshd"),
        Need::Tool("ssh-keygen"),
        Need::Tool("unshare"),
        Need::Tool("losetup"),
        Need::Tool("blkdiscard"),
        Need::Tool("blockdev"),
        Need::Tool("zstd"),
        Need::Tool("sha256sum"),
        // The QEMU cold path's metadata forward (guestfwd to a command per connection).
        Need::Tool("socat"),
    ],
};

/// Probes each prerequisite and tells cargo. Call it from `build.rs`.
pub fn probe(prereqs: &[Prereq]) {
    let ci = in_ci();
    // Installing or removing a package rewrites dpkg's status file: probe again then. (A
    // tool's own mtime is no signal: dpkg keeps the package's timestamps.)
    println!("cargo::rerun-if-changed=/var/lib/dpkg/status");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=CI");
    for prereq in prereqs {
        println!("cargo::rustc-check-cfg=cfg({})", prereq.skip_cfg);
        let missing = missing(prereq.needs);
        if missing.is_empty() {
            continue;
        }
        let missing = missing.join(", ");
        if ci {
            println!(
                "cargo::warning=CI: the tests for {} will fail: missing {missing} (run scripts/install-host-tools)",
                prereq.what
            );
        } else {
            println!(
                "cargo::warning=tests for {} are ignored: missing {missing} (run scripts/install-host-tools)",
                prereq.what
            );
            println!("cargo::rustc-cfg={}", prereq.skip_cfg);
        }
    }
}

/// `CI` set to anything but empty, `0` or `false`, as CI services do.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// What of `needs` this host lacks, each named for the warning.
pub fn missing(needs: &[Need]) -> Vec<String> {
    needs
        .iter()
        .filter_map(|need| match need {
            Need::Root if !is_root() => Some("root".to_string()),
            Need::Tool(tool) if !on_path(tool) => Some((*tool).to_string()),
            Need::File(file) if !Path::new(file).is_file() => Some((*file).to_string()),
            _ => None,
        })
        .collect()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .filter_map(|l| l.strip_prefix("Uid:"))
                .any(|uids| uids.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .any(|dir| is_executable(&dir.join(tool)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_on_path_is_found_and_a_made_up_one_is_missing() {
        let needs = [
            Need::Tool("sh"),
            Need::Tool("basalt-no-such-tool"),
            Need::File("/basalt/no/such/file"),
            Need::File("/proc/self/status"),
        ];
        assert_eq!(
            missing(&needs),
            vec!["basalt-no-such-tool", "/basalt/no/such/file"]
        );
    }

    #[test]
    fn root_is_read_from_the_effective_uid() {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().nth(1))
            .expect("Uid line");
        assert_eq!(missing(&[Need::Root]).is_empty(), euid == "0");
    }
}
