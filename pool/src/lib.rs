//! The warm pool (`basalt pool`): standby nodes booted ahead of demand and promoted into a
//! cluster in seconds.
//!
//! The state of the pool lives in the provider, as labels on its servers ([`provider`]); the
//! controller ([`controller`]) is a reconcile loop that can be killed at any instant and
//! restarted. Its decisions are a pure function ([`plan`]); pool.toml is [`config`]; the
//! node API access and the machine configs are [`nodes`]; Hetzner Cloud is [`hetzner`].

pub mod admin;
pub mod config;
pub mod controller;
pub mod hetzner;
pub mod metrics;
pub mod nodes;
pub mod plan;
pub mod provider;
pub mod qemu;
pub mod serve;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
