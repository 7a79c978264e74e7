//! The basalt image builder: from a pinned image spec to a bootable disk image.
//!
//! Data flows spec → inputs (cache) → kernel, modules, basalt-init → initramfs and root
//! filesystem (squashfs + dm-verity) → ESP and GRUB → GPT disk → outputs and manifest.
//! One module per step; `build` strings them together.

pub mod apt;
pub mod build;
pub mod bundle;
pub mod cache;
pub mod deb;
pub mod disk;
pub mod esp;
pub mod grub;
pub mod image;
pub mod initbuild;
pub mod initramfs;
pub mod inspect;
pub mod interrupt;
pub mod kmod;
pub mod lock;
pub mod manifest;
pub mod progress;
pub mod rootfs;
pub mod sbom;
pub mod sparse;
pub mod spec;
pub mod store;
pub mod tree;
pub mod verify;
pub mod verity;
pub mod zst;
