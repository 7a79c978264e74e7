//! basalt-init, the PID1 of a basalt node.
//!
//! One static binary plays two parts. As `/init` in the initramfs (stage 1, recognised by
//! `/etc/initrd-release`) it mounts the kernel filesystems, loads the modules that reach
//! the root disk, opens dm-verity over the active slot, mounts the verified root read-only
//! and switches into it. As `/sbin/init` on that root (stage 2) it is PID1 for the node's
//! life: it reaps zombies, never exits, and powers off in order on SIGTERM. The image's
//! initramfs carries `basalt-stage1` instead (`src/bin/basalt-stage1.rs`): this library
//! with stage 1 alone linked, a quarter of the size.
//!
//! Every syscall that changes the machine goes through [`sys::System`], so the boot plan
//! is unit-tested with a recording fake and without root.

pub mod atomic_file;
pub mod boot;
pub mod config_source;
pub mod join;
pub mod k3s_warm;
pub mod kmod;
pub mod net;
pub mod node_api;
pub mod pid1;
pub mod storage;
pub mod sys;
#[cfg(feature = "testd")]
pub mod testd;
pub mod upgrade;

use std::path::Path;

/// Marker file present only in the initramfs.
pub const INITRD_RELEASE: &str = "/etc/initrd-release";

/// Entry point of the binary: never returns.
pub fn main() -> ! {
    // As /sbin/modprobe (the kernel's module requests, K3s's tools) this is a short-lived
    // helper, not PID1: no panic hook that would reboot the node.
    let args: Vec<String> = std::env::args().collect();
    if args.first().and_then(|a| a.rsplit('/').next()) == Some("modprobe") {
        let code = kmod::modprobe::main(args[1..].to_vec());
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    // The test service (see `testd`): never when this process is the node's PID1.
    #[cfg(feature = "testd")]
    if args.get(1).map(String::as_str) == Some(testd::ARG) && std::process::id() != 1 {
        std::process::exit(testd::main(&args[2..]));
    }
    pid1::memory::limit_arenas();
    pid1::panic::install_hook();
    if Path::new(INITRD_RELEASE).exists() {
        boot::stage1::run()
    } else {
        boot::stage2::run()
    }
}
