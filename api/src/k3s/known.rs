//! CA bundles a node in standby fetched and checked ahead of its promotion
//! ([`super::prefetch_server_ca`], for the machine config's `standby.servers`).
//!
//! A promotion's check still fetches `/cacerts` from the server, every time. When the
//! bundle and the certificates the server showed are byte for byte the ones a prefetch
//! verified, and that prefetch is recent, the verification of the server against the
//! bundle and the bundle's hash are taken from it instead of being computed again: the
//! same inputs, so the same outcome. Under QEMU's TCG that work (X.509 parsing, ECDSA) is
//! most of a first check (BENCHMARKS.md, issue 15 item 2). The hash is then compared with
//! the token's as always: a prefetch can make a check faster, never make it pass.
//!
//! Entries older than [`FRESH_FOR`] are not used: the verification depends on the time
//! (certificate validity), and a standby node refreshes its prefetch well within it.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

/// How long a prefetch's verdict is used.
pub const FRESH_FOR: Duration = Duration::from_secs(15 * 60);

struct Known {
    body: Vec<u8>,
    peer: Vec<CertificateDer<'static>>,
    hash: String,
    at: Instant,
}

fn table() -> &'static Mutex<HashMap<String, Known>> {
    static TABLE: OnceLock<Mutex<HashMap<String, Known>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// Keeps what a prefetch of `url` fetched and verified, and the bundle's hash.
pub(super) fn remember(url: &str, body: Vec<u8>, peer: Vec<CertificateDer<'static>>, hash: String) {
    let known = Known {
        body,
        peer,
        hash,
        at: Instant::now(),
    };
    let mut table = table().lock().unwrap_or_else(|e| e.into_inner());
    table.insert(url.to_owned(), known);
}

/// The hash of `body` when a fresh prefetch of `url` verified exactly this bundle and
/// these server certificates.
pub(super) fn recall(url: &str, body: &[u8], peer: &[CertificateDer<'_>]) -> Option<String> {
    let table = table().lock().unwrap_or_else(|e| e.into_inner());
    let known = table.get(url)?;
    let same = known.at.elapsed() < FRESH_FOR && known.body == body && known.peer == peer;
    same.then(|| known.hash.clone())
}
