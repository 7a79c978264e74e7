//! basalt-init: `/init` in the initramfs (stage 1) and `/sbin/init` on the verified root (stage 2).

fn main() {
    basalt_init::main()
}
