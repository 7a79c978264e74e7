//! The boot: stage 1 in the initramfs, stage 2 on the verified root, and the tables they
//! apply (the kernel filesystems' mounts, what K3s needs of the kernel).

pub mod background;
pub mod kernel;
pub mod mounts;
pub mod stage1;
pub mod stage2;
