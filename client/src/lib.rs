//! Talking to nodes, for the `basalt` CLI and the pool controller: the node API client
//! ([`node`], mutual TLS against the pool CA) and the pool's PKI ([`pki`]) that issues the
//! CA, node and client certificates. No image building, no QEMU.

pub mod node;
pub mod pki;
