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
//!
//! A prefetch also keeps its TLS connection open when the server allows it (HTTP/1.1
//! keep-alive, which K3s's Go server does with no idle limit): the promotion's GET then
//! goes over it, with no connect and no handshake. Its answer is used only when the bundle
//! and the certificates of that connection are the ones the prefetch verified; otherwise
//! the check asks again on a new connection ([`super::check_server_ca`]). Each prefetch
//! replaces the connection with its own, so none is older than the prefetch's refresh.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

use super::https::Kept;

/// How long a prefetch's verdict is used.
pub const FRESH_FOR: Duration = Duration::from_secs(15 * 60);

struct Known {
    body: Vec<u8>,
    peer: Vec<CertificateDer<'static>>,
    hash: String,
    at: Instant,
    /// The connection the bundle came over, open for another GET.
    conn: Option<Kept>,
}

fn table() -> &'static Mutex<HashMap<String, Known>> {
    static TABLE: OnceLock<Mutex<HashMap<String, Known>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<String, Known>> {
    table().lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps what a prefetch of `url` fetched and verified, the bundle's hash, and the
/// connection it came over if the server left it open.
pub(super) fn remember(
    url: &str,
    body: Vec<u8>,
    peer: Vec<CertificateDer<'static>>,
    hash: String,
    conn: Option<Kept>,
) {
    let known = Known {
        body,
        peer,
        hash,
        at: Instant::now(),
        conn,
    };
    lock().insert(url.to_owned(), known);
}

/// The open connection to `url`'s server a fresh prefetch left, taken out: one user at a
/// time.
pub(super) fn take_connection(url: &str) -> Option<Kept> {
    let mut table = lock();
    let known = table.get_mut(url)?;
    if known.at.elapsed() >= FRESH_FOR {
        known.conn = None;
        return None;
    }
    known.conn.take()
}

/// Puts back an open connection to `url`'s server after a check used it (or made it), if
/// that server is prefetched and holds none meanwhile.
pub(super) fn give_back(url: &str, conn: Option<Kept>) {
    if let Some(known) = lock().get_mut(url) {
        if known.conn.is_none() {
            known.conn = conn;
        }
    }
}

/// Forgets the prefetch of `url`, and closes its connection.
pub(super) fn forget(url: &str) {
    lock().remove(url);
}

/// The hash of `body` when a fresh prefetch of `url` verified exactly this bundle and
/// these server certificates.
pub(super) fn recall(url: &str, body: &[u8], peer: &[CertificateDer<'_>]) -> Option<String> {
    let table = lock();
    let known = table.get(url)?;
    let same = known.at.elapsed() < FRESH_FOR && known.body == body && known.peer == peer;
    same.then(|| known.hash.clone())
}
