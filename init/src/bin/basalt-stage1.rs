//! basalt-stage1: `/init` of the initramfs, and nothing else. It runs stage 1 alone
//! (the kernel filesystems, the storage and dm-verity modules, the verified root, the
//! switch) and execs `/sbin/init`, the full basalt-init of the verified root, for stage 2.
//!
//! The same library as basalt-init, so stage 1 is one piece of code; only what stage 1
//! reaches is linked. The node API, TLS, DHCP, the join and the supervisor stay out, and
//! the initramfs (outside dm-verity, read by the bootloader through firmware disk calls)
//! carries about a fifth of basalt-init's bytes.

fn main() {
    basalt_init::pid1::panic::install_hook();
    basalt_init::boot::stage1::run()
}
