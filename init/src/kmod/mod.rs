//! Kernel modules: the initramfs's fixed list (stage 1) and a modprobe over the running
//! kernel's module index (stage 2, and `/sbin/modprobe` for the kernel's own requests).

pub mod modprobe;
pub mod modules;
pub mod parallel;
