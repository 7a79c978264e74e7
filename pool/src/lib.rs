//! The warm pool (`basalt pool`): standby nodes booted ahead of demand and promoted into a
//! cluster in seconds.
//!
//! The state of the pool lives in the provider, as labels on its servers ([`provider`]); the
//! controller is a reconcile loop that can be killed at any instant and restarted.

pub mod provider;
pub mod qemu;
