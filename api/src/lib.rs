//! Types shared by the basalt builder, basalt-init and the CLI.
//!
//! The boundary: anything both sides of the boot must agree on byte for byte lives here:
//! the kernel command-line parameters the builder writes and stage 1 reads
//! ([`bootparams`]), the partition table, sector unit and fw_cfg names ([`layout`]), the
//! one GPT reader ([`gpt`]), and the console line format of boot milestones that init
//! prints and tests and benchmarks read ([`milestone`]), and the time floor the builder
//! writes into the root and init keeps the clock above ([`time_floor`]). The machine
//! config ([`config`]) is the versioned TOML document the CLI writes, the node API
//! accepts and basalt-init applies. A/B upgrades share the bundle manifest and image
//! identity ([`bundle`]), GRUB's environment block ([`grubenv`]), and the dm-verity tree
//! the builder writes and the node checks ([`verity`]).

pub mod bootparams;
pub mod bundle;
pub mod config;
pub mod gpt;
pub mod grubenv;
pub mod k3s;
pub mod layout;
pub mod milestone;
pub mod node;
pub mod time_floor;
pub mod verity;
