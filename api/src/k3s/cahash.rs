//! K3s's `hashCA` (pkg/clientaccess/token.go), step for step.
//!
//! - The bundle is parsed like `certutil.ParseCertsPEM`: every `CERTIFICATE` block, other
//!   blocks skipped; no certificate at all, or one that does not parse, is an error.
//! - One certificate: the sha256 of the bytes as served (the legacy rule; K3s's own
//!   self-signed CA is one PEM certificate, so its token hashes the file).
//! - More: the first certificate is verified, as Go's `Certificate.Verify` does, against
//!   the others split into roots (no authority key id, or one equal to the subject key id)
//!   and intermediates. If a chain is found, the hash is of the DER of the root ending the
//!   first chain; if not, it falls back to the bytes as served.
//!
//! From `Verify` we keep what decides whether a chain is found: issuer/subject matching
//! with Go's key-id candidate order, signatures (the algorithms rustls/ring verify; like Go,
//! no SHA-1), `CheckSignatureFrom`'s CA and certSign rules, validity at `now`, intermediates
//! being CAs, path length limits, the server-auth extended key usage (Go's default), no
//! certificate twice in a chain, and Go's budget of 100 signature checks. Not modelled: name
//! constraints, policy constraints and unhandled critical extensions, which K3s clusters'
//! CAs do not use; such a bundle may pick a chain Go would refuse.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm};
use sha2::{Digest, Sha256};

use super::x509::{Cert, EKU_ANY, EKU_SERVER_AUTH, KEY_USAGE_CERT_SIGN};
use super::K3sError;

/// Go's `maxChainSignatureChecks`.
const MAX_SIGNATURE_CHECKS: usize = 100;

pub(super) fn hash_ca(bundle: &[u8], now: i64) -> Result<String, K3sError> {
    let ders = CertificateDer::pem_slice_iter(bundle)
        .collect::<Result<Vec<_>, _>>()
        .map_err(K3sError::Pem)?;
    let certs = ders
        .iter()
        .enumerate()
        .map(|(index, der)| {
            Cert::parse(der).map_err(|e| K3sError::BadCertificate { index, reason: e.0 })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let hashed = match certs.len() {
        0 => return Err(K3sError::NoCertificates),
        1 => bundle,
        _ => root_of_first(&certs, now).unwrap_or(bundle),
    };
    Ok(hex::encode(Sha256::digest(hashed)))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Intermediate,
    Root,
}

struct Verifier<'c, 'a> {
    certs: &'c [Cert<'a>],
    roots: Vec<usize>,
    intermediates: Vec<usize>,
    now: i64,
    algs: &'static [&'static dyn SignatureVerificationAlgorithm],
    signature_checks: usize,
}

/// The DER of the root of the first chain Go's `certs[0].Verify` would return.
fn root_of_first<'a>(certs: &[Cert<'a>], now: i64) -> Option<&'a [u8]> {
    let (roots, intermediates) = (1..certs.len()).partition(|&i| {
        let c = &certs[i];
        c.authority_key_id.is_none() || c.authority_key_id == c.subject_key_id
    });
    let mut v = Verifier {
        certs,
        roots,
        intermediates,
        now,
        algs: rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
        signature_checks: 0,
    };
    let leaf = &certs[0];
    if !v.in_time(leaf) {
        return None;
    }
    // `opts.Roots.contains(c)`: the chain is the leaf alone.
    if v.roots.iter().any(|&r| certs[r].der == leaf.der) {
        return Some(leaf.der);
    }
    let chain = v.build(&mut vec![0])?;
    chain.last().map(|&i| certs[i].der)
}

impl Verifier<'_, '_> {
    /// Depth first, roots before intermediates at each step: Go's `buildChains` order, so
    /// the first complete chain found is Go's `chains[0]`.
    fn build(&mut self, chain: &mut Vec<usize>) -> Option<Vec<usize>> {
        let child = *chain.last()?;
        for root in self.parents(child, Kind::Root) {
            if self.consider(root, chain, Kind::Root) {
                chain.push(root);
                let done = self.server_auth_allowed(chain).then(|| chain.clone());
                chain.pop();
                if done.is_some() {
                    return done;
                }
            }
        }
        for parent in self.parents(child, Kind::Intermediate) {
            if self.consider(parent, chain, Kind::Intermediate) {
                chain.push(parent);
                let found = self.build(chain);
                chain.pop();
                if found.is_some() {
                    return found;
                }
            }
        }
        None
    }

    /// Go's `findPotentialParents`: subject equal to the child's issuer, ordered by
    /// key ids matching, then one missing, then mismatching.
    fn parents(&self, child: usize, kind: Kind) -> Vec<usize> {
        let c = &self.certs[child];
        let pool = match kind {
            Kind::Root => &self.roots,
            Kind::Intermediate => &self.intermediates,
        };
        let mut ranked: Vec<(u8, usize)> = pool
            .iter()
            .filter(|&&p| self.certs[p].subject == c.issuer)
            .map(|&p| {
                let ski = self.certs[p].subject_key_id.unwrap_or_default();
                let aki = c.authority_key_id.unwrap_or_default();
                let rank = if ski == aki {
                    0
                } else if ski.is_empty() || aki.is_empty() {
                    1
                } else {
                    2
                };
                (rank, p)
            })
            .collect();
        ranked.sort_by_key(|&(rank, _)| rank); // stable: pool order within a rank
        ranked.into_iter().map(|(_, p)| p).collect()
    }

    /// Go's `considerCandidate`: not already in the chain, signature, then `isValid`.
    fn consider(&mut self, candidate: usize, chain: &[usize], kind: Kind) -> bool {
        let p = &self.certs[candidate];
        let already = chain.iter().any(|&i| {
            let c = &self.certs[i];
            c.subject == p.subject && c.spki_alg == p.spki_alg && c.public_key == p.public_key
        });
        if already || self.signature_checks >= MAX_SIGNATURE_CHECKS {
            return false;
        }
        self.signature_checks += 1;
        let Some(&child) = chain.last() else {
            return false;
        };
        self.signed_by(&self.certs[child], p) && self.valid_in_chain(p, chain.len(), kind)
    }

    /// Go's `CheckSignatureFrom`.
    fn signed_by(&self, child: &Cert<'_>, parent: &Cert<'_>) -> bool {
        let bc = parent.basic_constraints;
        if (parent.version == 3 && bc.is_none()) || bc.is_some_and(|b| !b.is_ca) {
            return false;
        }
        if parent.key_usage != 0 && parent.key_usage & KEY_USAGE_CERT_SIGN == 0 {
            return false;
        }
        self.algs.iter().any(|alg| {
            alg.signature_alg_id().as_ref() == child.sig_alg
                && alg.public_key_alg_id().as_ref() == parent.spki_alg
                && alg
                    .verify_signature(parent.public_key, child.tbs, child.signature)
                    .is_ok()
        })
    }

    /// Go's `isValid` for a candidate placed above `below` certificates.
    fn valid_in_chain(&self, c: &Cert<'_>, below: usize, kind: Kind) -> bool {
        if !self.in_time(c) {
            return false;
        }
        let bc = c.basic_constraints;
        if kind == Kind::Intermediate && !bc.is_some_and(|b| b.is_ca) {
            return false;
        }
        let intermediates_below = below.saturating_sub(1) as u64;
        match bc.and_then(|b| b.max_path_len) {
            Some(max) => intermediates_below <= max,
            None => true,
        }
    }

    fn in_time(&self, c: &Cert<'_>) -> bool {
        c.not_before <= self.now && self.now <= c.not_after
    }

    /// Go's `checkChainForKeyUsage` with its default request, server authentication.
    fn server_auth_allowed(&self, chain: &[usize]) -> bool {
        chain.iter().all(|&i| {
            let eku = &self.certs[i].ext_key_usage;
            eku.is_empty() || eku.iter().any(|&o| o == EKU_ANY || o == EKU_SERVER_AUTH)
        })
    }
}
