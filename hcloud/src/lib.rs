//! Hetzner Cloud for basalt: images become snapshots that servers (the warm pool, or
//! cluster-autoscaler's Hetzner provider) are created from.
//!
//! - [`client`]: the API v1 client, where the API's quirks live (retries, rate limits,
//!   pagination, error codes, lost answers);
//! - [`upload`]: image → snapshot through the rescue system, verified before it is taken,
//!   with its temporary server and key always deleted;
//! - [`ops`]: `images`, `prune` and `cleanup`;
//! - `fake` (feature `fake`, tests only): a fake Hetzner API speaking the real JSON, whose
//!   rescue system is a real OpenSSH `sshd` with a loop device as its `/dev/sda`.
//!
//! The boundary: this crate talks to the API and to the rescue system. It never builds
//! or reads an image beyond its manifest; the CLI (`basalt hcloud`) is in the builder.

pub mod api;
pub mod client;
#[cfg(feature = "fake")]
pub mod fake;
pub mod image;
pub mod labels;
pub mod ops;
pub mod progress;
pub mod ssh;
pub mod upload;
