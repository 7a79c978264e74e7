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

//!
//! The certificates are read by `x509-parser` (already in the workspace for the PKI, so no
//! new crate). It keeps the raw encodings Go compares byte for byte (names, key
//! identifiers, the signed `tbsCertificate`), which `x509-cert` would re-encode. Its own
//! signature checks (feature `verify`) are not used: they accept SHA-1, which Go refuses,
//! so signatures go through the rustls/ring algorithms as before. Cost in the static
//! release basalt-init: 5,482,680 → 5,636,648 bytes (+150 KiB; zstd -19: +56 KiB) against
//! the hand-written reader it replaces; a parser of untrusted DER is worth that.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm};
use sha2::{Digest, Sha256};
use x509_parser::asn1_rs::{ASN1TimeZone, Any, Class, GeneralizedTime, Tag, ToDer, UtcTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AlgorithmIdentifier, X509Version};

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
            Cert::parse(der).map_err(|source| K3sError::BadCertificate { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let hashed = match certs.len() {
        0 => return Err(K3sError::NoCertificates),
        1 => bundle,
        _ => root_of_first(&certs, now).unwrap_or(bundle),
    };
    Ok(hex::encode(Sha256::digest(hashed)))
}

/// Why a certificate of the bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("not a DER X.509 certificate")]
    Parse(#[source] X509Error),
    #[error("bytes after the certificate")]
    TrailingData,
    #[error("unknown version")]
    Version,
    #[error("inner and outer signature algorithms differ")]
    AlgorithmMismatch,
    #[error("bit string with unused bits")]
    UnusedBits,
    #[error("an algorithm identifier cannot be re-encoded")]
    Encode,
    /// RFC 5280: UTCTime or GeneralizedTime, in UTC (`Z`), with seconds.
    #[error("validity time is not a UTC time with seconds")]
    Time,
    /// A known extension whose contents do not parse (x509-parser keeps such an
    /// extension as `ParseError` instead of failing the certificate).
    #[error("malformed extension {oid}")]
    Extension { oid: String },
}

/// Go's `x509.KeyUsageCertSign` (bit 5; x509-parser numbers the bits as Go does).
const KEY_USAGE_CERT_SIGN: u16 = 1 << 5;

/// One certificate of the bundle with what chain building looks at, read once.
struct Cert<'a> {
    x509: X509Certificate<'a>,
    /// DER contents of the outer and the key's AlgorithmIdentifier, as rustls names
    /// algorithms. DER is canonical, so re-encoding gives the bytes as served.
    sig_alg: Vec<u8>,
    spki_alg: Vec<u8>,
    subject_key_id: Option<&'a [u8]>,
    authority_key_id: Option<&'a [u8]>,
    /// `basicConstraints`: is a CA, and `MaxPathLen` (`None` when absent).
    basic_constraints: Option<(bool, Option<u32>)>,
    /// Go's `KeyUsage` bit set (bit 0 = digitalSignature); 0 when absent.
    key_usage: u16,
    /// Go's `checkChainForKeyUsage` for server authentication: no extended key usage,
    /// an empty one, `anyExtendedKeyUsage` or `serverAuth`.
    server_auth: bool,
    /// notBefore and notAfter in Unix seconds.
    validity: (i64, i64),
}

impl<'a> Cert<'a> {
    /// Strict where Go is: the whole input is one certificate, versions 1 to 3, the same
    /// signature algorithm inside and outside, keys and signatures in whole bytes, and
    /// the extensions chain building uses well formed.
    fn parse(der: &'a [u8]) -> Result<Cert<'a>, CertError> {
        let (rest, x509) = X509Certificate::from_der(der).map_err(|e| {
            CertError::Parse(match e {
                x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
                x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
            })
        })?;
        if !rest.is_empty() {
            return Err(CertError::TrailingData);
        }
        let tbs = &x509.tbs_certificate;
        if tbs.version.0 > X509Version::V3.0 {
            return Err(CertError::Version);
        }
        if tbs.signature != x509.signature_algorithm {
            return Err(CertError::AlgorithmMismatch);
        }
        if x509.signature_value.unused_bits != 0
            || tbs.subject_pki.subject_public_key.unused_bits != 0
        {
            return Err(CertError::UnusedBits);
        }
        let mut cert = Cert {
            sig_alg: algorithm_contents(&x509.signature_algorithm)?,
            spki_alg: algorithm_contents(&tbs.subject_pki.algorithm)?,
            subject_key_id: None,
            authority_key_id: None,
            basic_constraints: None,
            key_usage: 0,
            server_auth: true,
            validity: validity(tbs.as_ref())?,
            x509: x509.clone(),
        };
        for ext in x509.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => cert.subject_key_id = Some(id.0),
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    cert.authority_key_id = aki.key_identifier.as_ref().map(|id| id.0);
                }
                ParsedExtension::BasicConstraints(bc) => {
                    cert.basic_constraints = Some((bc.ca, bc.path_len_constraint));
                }
                ParsedExtension::KeyUsage(ku) => cert.key_usage = ku.flags,
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    let empty = !(eku.client_auth
                        || eku.code_signing
                        || eku.email_protection
                        || eku.time_stamping
                        || eku.ocsp_signing)
                        && eku.other.is_empty();
                    cert.server_auth = eku.any || eku.server_auth || empty;
                }
                ParsedExtension::ParseError { .. } => {
                    return Err(CertError::Extension {
                        oid: ext.oid.to_id_string(),
                    })
                }
                _ => {}
            }
        }
        Ok(cert)
    }

    /// The whole certificate (what K3s hashes for a bundle's root).
    fn der(&self) -> &'a [u8] {
        self.x509.as_raw()
    }

    /// The encoded Names, compared byte for byte as Go does.
    fn issuer(&self) -> &'a [u8] {
        self.x509.tbs_certificate.issuer.as_raw()
    }

    fn subject(&self) -> &'a [u8] {
        self.x509.tbs_certificate.subject.as_raw()
    }

    fn public_key(&self) -> &[u8] {
        &self
            .x509
            .tbs_certificate
            .subject_pki
            .subject_public_key
            .data
    }

    fn is_v3(&self) -> bool {
        self.x509.tbs_certificate.version == X509Version::V3
    }

    fn in_time(&self, now: i64) -> bool {
        let (not_before, not_after) = self.validity;
        not_before <= now && now <= not_after
    }
}

/// The validity of a `tbsCertificate`, read again from its encoding: x509-parser also
/// takes UTCTime with an offset or without seconds (BER), which RFC 5280 forbids.
fn validity(tbs: &[u8]) -> Result<(i64, i64), CertError> {
    let mut fields = Any::from_der(tbs).map_err(|_| CertError::Time)?.1.data;
    let first = next_element(&mut fields)?;
    if first.class() == Class::ContextSpecific && first.tag() == Tag(0) {
        next_element(&mut fields)?; // after the version, the serial number
    }
    next_element(&mut fields)?; // the signature algorithm
    next_element(&mut fields)?; // the issuer
    let mut times = next_element(&mut fields)?.data;
    let not_before = time(&next_element(&mut times)?)?;
    let not_after = time(&next_element(&mut times)?)?;
    Ok((not_before, not_after))
}

fn next_element<'a>(data: &mut &'a [u8]) -> Result<Any<'a>, CertError> {
    let (rest, any) = Any::from_der(data).map_err(|_| CertError::Time)?;
    *data = rest;
    Ok(any)
}

/// A DER UTCTime (`YYMMDDHHMMSSZ`, years 1950 to 2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn time(any: &Any<'_>) -> Result<i64, CertError> {
    let (len, datetime) = if any.tag() == Tag::UtcTime {
        let t = UtcTime::try_from(any).map_err(|_| CertError::Time)?;
        (13, t.utc_adjusted_datetime().map(|dt| (t.0.tz, dt)))
    } else if any.tag() == Tag::GeneralizedTime {
        let t = GeneralizedTime::try_from(any).map_err(|_| CertError::Time)?;
        (15, t.utc_datetime().map(|dt| (t.0.tz, dt)))
    } else {
        return Err(CertError::Time);
    };
    match datetime {
        Ok((ASN1TimeZone::Z, dt)) if any.data.len() == len => Ok(dt.unix_timestamp()),
        _ => Err(CertError::Time),
    }
}

/// The contents (no tag, no length) of an AlgorithmIdentifier SEQUENCE.
fn algorithm_contents(alg: &AlgorithmIdentifier<'_>) -> Result<Vec<u8>, CertError> {
    let mut out = alg.algorithm.to_der_vec().map_err(|_| CertError::Encode)?;
    if let Some(params) = &alg.parameters {
        out.extend(params.to_der_vec().map_err(|_| CertError::Encode)?);
    }
    Ok(out)
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
    if !leaf.in_time(now) {
        return None;
    }
    // `opts.Roots.contains(c)`: the chain is the leaf alone.
    if v.roots.iter().any(|&r| certs[r].der() == leaf.der()) {
        return Some(leaf.der());
    }
    let chain = v.build(&mut vec![0])?;
    chain.last().map(|&i| certs[i].der())
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
            .filter(|&&p| self.certs[p].subject() == c.issuer())
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
            c.subject() == p.subject()
                && c.spki_alg == p.spki_alg
                && c.public_key() == p.public_key()
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
        if (parent.is_v3() && bc.is_none()) || bc.is_some_and(|(is_ca, _)| !is_ca) {
            return false;
        }
        if parent.key_usage != 0 && parent.key_usage & KEY_USAGE_CERT_SIGN == 0 {
            return false;
        }
        self.algs.iter().any(|alg| {
            alg.signature_alg_id().as_ref() == child.sig_alg
                && alg.public_key_alg_id().as_ref() == parent.spki_alg
                && alg
                    .verify_signature(
                        parent.public_key(),
                        child.x509.tbs_certificate.as_ref(),
                        &child.x509.signature_value.data,
                    )
                    .is_ok()
        })
    }

    /// Go's `isValid` for a candidate placed above `below` certificates.
    fn valid_in_chain(&self, c: &Cert<'_>, below: usize, kind: Kind) -> bool {
        if !c.in_time(self.now) {
            return false;
        }
        let bc = c.basic_constraints;
        if kind == Kind::Intermediate && !bc.is_some_and(|(is_ca, _)| is_ca) {
            return false;
        }
        let intermediates_below = below.saturating_sub(1) as u64;
        match bc.and_then(|(_, max_path_len)| max_path_len) {
            Some(max) => intermediates_below <= u64::from(max),
            None => true,
        }
    }

    /// Go's `checkChainForKeyUsage` with its default request, server authentication.
    fn server_auth_allowed(&self, chain: &[usize]) -> bool {
        chain.iter().all(|&i| self.certs[i].server_auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_become_unix_seconds() {
        let read = |tag: u8, s: &str| {
            let der = [&[tag, s.len() as u8], s.as_bytes()].concat();
            let (rest, any) = Any::from_der(&der).unwrap();
            assert!(rest.is_empty());
            time(&any).map_err(|e| e.to_string())
        };
        let utc = |s: &str| read(0x17, s);
        let gen = |s: &str| read(0x18, s);
        assert_eq!(utc("700101000000Z"), Ok(0));
        assert_eq!(utc("000229120000Z"), Ok(951_825_600));
        assert_eq!(utc("491231235959Z"), Ok(2_524_607_999));
        assert_eq!(gen("99991231235959Z"), Ok(253_402_300_799));
        assert_eq!(gen("20380119031408Z"), Ok(2_147_483_648));
        assert!(utc("700101000000+0100").is_err());
        assert!(utc("7001010000000").is_err());
        assert!(gen("2038011903140Z").is_err());
    }

    #[test]
    fn a_certificate_reads_as_go_sees_it_and_nothing_may_follow_it() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(2));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let cert = Cert::parse(&der).unwrap();
        assert_eq!(cert.der(), der.as_slice());
        assert!(cert.is_v3());
        assert_eq!(cert.basic_constraints, Some((true, Some(2))));
        assert_eq!(cert.key_usage, KEY_USAGE_CERT_SIGN);
        assert!(cert.server_auth);
        // rcgen signs with ECDSA P-256/SHA-256: the identifiers rustls matches on.
        assert_eq!(
            cert.sig_alg,
            rustls::pki_types::alg_id::ECDSA_SHA256.as_ref()
        );
        assert_eq!(
            cert.spki_alg,
            rustls::pki_types::alg_id::ECDSA_P256.as_ref()
        );
        let trailing = [der.as_slice(), &[0]].concat();
        assert!(matches!(
            Cert::parse(&trailing),
            Err(CertError::TrailingData)
        ));
    }

    #[test]
    fn garbage_is_refused_not_misread() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x80, 0x00, 0x00],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x03, 0x02, 0x01],
            &[0x30, 0x00, 0x00],
            &[0x1f, 0x01, 0x00],
        ] {
            assert!(Cert::parse(bad).is_err(), "{bad:02x?}");
        }
    }
}
