//! The pool CA and the certificates it issues (`basalt pki`).
//!
//! One CA per pool signs two kinds of leaf: client certificates (clientAuth), which the
//! node API requires for anything beyond health, each with a role as a second extended
//! key usage ([`basalt_api::node::access`]: admin for every route, read for status, logs
//! and metrics), and node certificates (serverAuth, with
//! the node's name and addresses as SANs), which the client checks because the join token
//! crosses that wire. All keys are ECDSA P-256. Key files are written 0600, every file
//! atomically (a temporary file beside it, then a rename), and nothing is replaced unless
//! asked to.

pub mod cli;

use basalt_api::node::access::{oid_content, Access};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The CA certificate's file name in a CA folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a CA folder.
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA certificate's subject common name.
pub const CA_COMMON_NAME: &str = "basalt pool CA";
/// How long a new CA is valid.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// How long an issued certificate is valid unless told otherwise.
pub const DEFAULT_LEAF_DAYS: u32 = 365;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Certificates start a little in the past so that a node whose clock lags accepts them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} exists; pass --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("create folder {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a PEM {what}", path.display())]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{}: the key does not belong to the CA certificate {CA_CERT_FILE}", path.display())]
    KeyMismatch { path: PathBuf },
    #[error("generate a key pair")]
    KeyGen(#[source] rcgen::Error),
    #[error("sign the certificate of {name:?}")]
    Sign {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("not_after must be later than not_before")]
    EmptyValidity,
    #[error("--days must be at least 1")]
    ZeroDays,
}

/// What an issued certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An admin client of the node API: every route (EKU clientAuth and the admin role).
    Client,
    /// A read-only client: status, health, logs and metrics (EKU clientAuth and the read
    /// role).
    ReadClient,
    /// A node's API server (EKU serverAuth). The name is always a DNS SAN; these are added.
    Node { ips: Vec<IpAddr>, dns: Vec<String> },
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a few minutes ago (clock skew) to `days` days from now.
    pub fn days_from_now(days: u32) -> Result<Validity, PkiError> {
        if days == 0 {
            return Err(PkiError::ZeroDays);
        }
        let now = SystemTime::now();
        Ok(Validity {
            not_before: now - BACKDATE,
            not_after: now + DAY * days,
        })
    }
}

/// A certificate to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRequest {
    /// The subject's common name and the files' stem (`NAME.pem`, `NAME.key`).
    pub name: String,
    pub role: Role,
    pub validity: Validity,
}

/// A certificate and its fresh private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The pool CA: its certificate and the key that signs with it.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA valid for [`CA_VALIDITY_DAYS`] from now.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGen)?;
        let validity = Validity::days_from_now(CA_VALIDITY_DAYS)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        set_validity(&mut params, validity)?;
        // Path length 0: the pool CA signs leaves only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(|source| PkiError::Sign {
            name: CA_COMMON_NAME.into(),
            source,
        })?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Reads `ca.pem` and `ca.key` from a CA folder and checks that they belong together.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Parse {
            path: key_path.clone(),
            what: "private key",
            source,
        })?;
        let public_key = key.public_key_raw().to_vec();
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::Parse {
                path: cert_path.clone(),
                what: "certificate",
                source,
            })?;
        if cert_public_key(&cert_pem).as_deref() != Some(public_key.as_slice()) {
            return Err(PkiError::KeyMismatch { path: key_path });
        }
        Ok(Ca { cert_pem, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.pem` and `ca.key` into `dir` (created 0700 if missing). Without `force`
    /// nothing is written if either file exists.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        create_dir(dir)?;
        refuse_existing(&[&cert_path, &key_path], force)?;
        let key_pem = self.issuer.key().serialize_pem();
        write_atomic(&key_path, key_pem.as_bytes(), KEY_MODE, force)?;
        write_atomic(&cert_path, self.cert_pem.as_bytes(), CERT_MODE, force)?;
        Ok((cert_path, key_path))
    }

    /// Issues a certificate with a fresh key for `req`.
    pub fn issue(&self, req: &CertRequest) -> Result<Issued, PkiError> {
        check_name(&req.name)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, req.name.as_str());
        set_validity(&mut params, req.validity)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        match &req.role {
            Role::Client => params.custom_extensions = vec![client_eku(Access::Admin)],
            Role::ReadClient => params.custom_extensions = vec![client_eku(Access::Read)],
            Role::Node { ips, dns } => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                params.subject_alt_names = node_sans(&req.name, ips, dns)?;
            }
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Sign {
                name: req.name.clone(),
                source,
            })?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Writes `NAME.pem` and `NAME.key` (0600) into `dir` (created 0700 if missing).
    /// Without `force` nothing is written if either file exists.
    pub fn write(
        &self,
        dir: &Path,
        name: &str,
        force: bool,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        check_name(name)?;
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        create_dir(dir)?;
        refuse_existing(&[&cert_path, &key_path], force)?;
        write_atomic(&key_path, self.key_pem.as_bytes(), KEY_MODE, force)?;
        write_atomic(&cert_path, self.cert_pem.as_bytes(), CERT_MODE, force)?;
        Ok((cert_path, key_path))
    }
}

/// `basalt pki init DIR`: a new CA written into `dir`.
pub fn init(dir: &Path, force: bool) -> Result<(Ca, PathBuf, PathBuf), PkiError> {
    // Refuse before the (cheap, but pointless) key generation.
    refuse_existing(&[&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)], force)?;
    let ca = Ca::generate()?;
    let (cert, key) = ca.write(dir, force)?;
    Ok((ca, cert, key))
}

/// `basalt pki issue`: a certificate signed by the CA in `ca_dir`, written into `out_dir`.
pub fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    req: &CertRequest,
    force: bool,
) -> Result<(PathBuf, PathBuf), PkiError> {
    check_name(&req.name)?;
    refuse_existing(
        &[
            &out_dir.join(format!("{}.pem", req.name)),
            &out_dir.join(format!("{}.key", req.name)),
        ],
        force,
    )?;
    let ca = Ca::load(ca_dir)?;
    ca.issue(req)?.write(out_dir, &req.name, force)
}

/// Extended key usage `clientAuth` plus the role's OID. rcgen's own EKU list takes arcs
/// of 64 bits at most, and the role OIDs have a UUID arc, so the extension is written
/// here: `SEQUENCE OF OBJECT IDENTIFIER`.
fn client_eku(access: Access) -> CustomExtension {
    let mut oids = Vec::new();
    for oid in [
        oid_content(CLIENT_AUTH_OID).unwrap_or_default(),
        access.oid_der(),
    ] {
        oids.push(0x06);
        oids.extend(der_len(oid.len()));
        oids.extend(oid);
    }
    let mut seq = vec![0x30];
    seq.extend(der_len(oids.len()));
    seq.extend(oids);
    CustomExtension::from_oid_content(EKU_EXTENSION, seq)
}

/// id-kp-clientAuth.
const CLIENT_AUTH_OID: &str = "1.3.6.1.5.5.7.3.2";
/// id-ce-extKeyUsage.
const EKU_EXTENSION: &[u64] = &[2, 5, 29, 37];

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        // Short form: below 128.
        vec![n as u8]
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }
}

fn set_validity(params: &mut CertificateParams, v: Validity) -> Result<(), PkiError> {
    if v.not_after <= v.not_before {
        return Err(PkiError::EmptyValidity);
    }
    params.not_before = time::OffsetDateTime::from(v.not_before);
    params.not_after = time::OffsetDateTime::from(v.not_after);
    Ok(())
}

fn node_sans(name: &str, ips: &[IpAddr], dns: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut names: Vec<&str> = vec![name];
    for d in dns {
        check_name(d)?;
        if !names.contains(&d.as_str()) {
            names.push(d);
        }
    }
    let mut sans = Vec::new();
    for n in names {
        let ia5 = n.try_into().map_err(|_| PkiError::InvalidName {
            name: n.into(),
            why: "not ASCII",
        })?;
        sans.push(SanType::DnsName(ia5));
    }
    for ip in ips {
        if !sans.contains(&SanType::IpAddress(*ip)) {
            sans.push(SanType::IpAddress(*ip));
        }
    }
    Ok(sans)
}

/// Names become file names and DNS SANs: letters, digits, `-` and `.`, as a hostname.
fn check_name(name: &str) -> Result<(), PkiError> {
    let bad = |why| {
        Err(PkiError::InvalidName {
            name: name.into(),
            why,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return bad("only letters, digits, '-' and '.' are allowed");
    }
    if name.starts_with(['.', '-']) || name.ends_with(['.', '-']) || name.contains("..") {
        return bad("must start and end with a letter or digit, without empty labels");
    }
    Ok(())
}

fn cert_public_key(cert_pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.into(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::CreateDir {
            path: dir.into(),
            source,
        })
}

fn refuse_existing(paths: &[&Path], force: bool) -> Result<(), PkiError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(p) => Err(PkiError::Exists {
            path: p.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Writes a file whole or not at all: a temporary file in the same folder, created with
/// `mode`, synced, then renamed over `path` (with `replace`) or linked to it only if
/// absent (without), and the folder synced so the rename survives a crash.
fn write_atomic(path: &Path, data: &[u8], mode: u32, replace: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.into(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".basalt-pki-")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(err)?;
    // The umask may have narrowed the mode at creation; say it exactly.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    tmp.write_all(data).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    let persisted = if replace {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    persisted.map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => PkiError::Exists { path: path.into() },
        _ => err(e.error),
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        p.contents
    }

    fn node_req(name: &str) -> CertRequest {
        CertRequest {
            name: name.into(),
            role: Role::Node {
                ips: vec!["10.0.2.15".parse().expect("ip"), "::1".parse().expect("ip")],
                dns: vec!["node-1.pool.internal".into(), name.into()],
            },
            validity: Validity::days_from_now(30).expect("validity"),
        }
    }

    fn client_req(name: &str) -> CertRequest {
        CertRequest {
            name: name.into(),
            role: Role::Client,
            validity: Validity::days_from_now(30).expect("validity"),
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    /// webpki, as rustls runs it on both ends of the node API.
    fn webpki_roots(ca: &Ca) -> std::sync::Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(der(ca.cert_pem())))
            .expect("root");
        std::sync::Arc::new(roots)
    }

    fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
        std::sync::Arc::new(rustls::crypto::ring::default_provider())
    }

    fn verify_server(ca: &Ca, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            webpki_roots(ca),
            provider(),
        )
        .build()
        .expect("verifier");
        let name = ServerName::try_from(name.to_string()).expect("name");
        let end = CertificateDer::from(der(cert_pem));
        v.verify_server_cert(&end, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn verify_client(ca: &Ca, cert_pem: &str) -> Result<(), rustls::Error> {
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            webpki_roots(ca),
            provider(),
        )
        .build()
        .expect("verifier");
        let end = CertificateDer::from(der(cert_pem));
        v.verify_client_cert(&end, &[], UnixTime::now()).map(|_| ())
    }

    #[test]
    fn ca_is_a_ten_year_p256_ca() {
        let ca = Ca::generate().expect("ca");
        let der = der(ca.cert_pem());
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        let cn = cert.subject().iter_common_name().next().expect("cn");
        assert_eq!(cn.as_str().expect("utf8"), CA_COMMON_NAME);
        assert_eq!(cert.subject(), cert.issuer());
        let bc = cert.basic_constraints().expect("ext").expect("bc").value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().expect("ext").expect("ku").value;
        assert!(ku.key_cert_sign());
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86400;
        assert!((3650..=3651).contains(&days), "{days} days");
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        assert_eq!(
            cert.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );
        assert!(cert.verify_signature(None).is_ok(), "self-signed");
    }

    #[test]
    fn node_cert_chains_to_the_ca_and_carries_the_sans() {
        let ca = Ca::generate().expect("ca");
        let issued = ca.issue(&node_req("node-1")).expect("issue");
        let der = der(&issued.cert_pem);
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        let sans = &cert
            .subject_alternative_name()
            .expect("ext")
            .expect("san")
            .value
            .general_names;
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for n in sans {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        assert_eq!(
            dns,
            ["node-1", "node-1.pool.internal"],
            "name first, no dupes"
        );
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0], [10, 0, 2, 15]);
        let eku = cert.extended_key_usage().expect("ext").expect("eku").value;
        assert!(eku.server_auth && !eku.client_auth);
        let bc = cert.basic_constraints().expect("ext").expect("bc").value;
        assert!(!bc.ca);

        for name in ["node-1", "node-1.pool.internal", "10.0.2.15", "::1"] {
            verify_server(&ca, &issued.cert_pem, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verify_server(&ca, &issued.cert_pem, "node-2").is_err());
        assert!(verify_server(&ca, &issued.cert_pem, "10.0.2.16").is_err());
        // serverAuth only: not usable as a client certificate.
        assert!(verify_client(&ca, &issued.cert_pem).is_err());
        let other = Ca::generate().expect("ca");
        assert!(verify_server(&other, &issued.cert_pem, "node-1").is_err());
    }

    #[test]
    fn client_cert_is_client_auth_only() {
        let ca = Ca::generate().expect("ca");
        let issued = ca.issue(&client_req("ops")).expect("issue");
        let der = der(&issued.cert_pem);
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        let eku = cert.extended_key_usage().expect("ext").expect("eku").value;
        assert!(eku.client_auth && !eku.server_auth);
        let cn = cert.subject().iter_common_name().next().expect("cn");
        assert_eq!(cn.as_str().expect("utf8"), "ops");
        assert!(cert.subject_alternative_name().expect("ext").is_none());
        verify_client(&ca, &issued.cert_pem).expect("chains to the CA");
        assert!(verify_client(&Ca::generate().expect("ca"), &issued.cert_pem).is_err());
    }

    #[test]
    fn client_certs_carry_their_role_and_still_verify_as_clients() {
        use basalt_api::node::access::CertFacts;
        let ca = Ca::generate().expect("ca");
        for (role, access) in [
            (Role::Client, Access::Admin),
            (Role::ReadClient, Access::Read),
        ] {
            let mut req = client_req("ops");
            req.role = role;
            let issued = ca.issue(&req).expect("issue");
            let der = der(&issued.cert_pem);
            let (_, cert) = X509Certificate::from_der(&der).expect("x509");
            let eku = cert.extended_key_usage().expect("ext").expect("eku").value;
            assert!(eku.client_auth && !eku.server_auth);
            assert_eq!(eku.other.len(), 1, "one role");
            assert_eq!(
                CertFacts::from_der(&der).expect("facts").access,
                Some(access)
            );
            verify_client(&ca, &issued.cert_pem).expect("webpki takes the extra EKU");
        }
        // A node certificate has no role.
        let node = ca.issue(&node_req("node-1")).expect("issue");
        assert_eq!(
            CertFacts::from_pem(&node.cert_pem).expect("facts").access,
            None
        );
    }

    #[test]
    fn explicit_validity_can_make_an_expired_cert() {
        let ca = Ca::generate().expect("ca");
        let now = SystemTime::now();
        let mut req = client_req("old");
        req.validity = Validity {
            not_before: now - DAY * 10,
            not_after: now - DAY,
        };
        let issued = ca.issue(&req).expect("issue");
        let err = verify_client(&ca, &issued.cert_pem).expect_err("expired");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
                    | rustls::Error::InvalidCertificate(
                        rustls::CertificateError::ExpiredContext { .. }
                    )
            ),
            "{err:?}"
        );
        req.validity.not_after = req.validity.not_before;
        assert!(matches!(ca.issue(&req), Err(PkiError::EmptyValidity)));
        assert!(matches!(
            Validity::days_from_now(0),
            Err(PkiError::ZeroDays)
        ));
    }

    #[test]
    fn init_writes_keys_0600_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("pool");
        let (_, cert, key) = init(&dir, false).expect("init");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(mode(&dir), 0o700);
        let before = std::fs::read(&key).expect("read");

        let err = init(&dir, false).expect_err("exists");
        assert!(
            matches!(&err, PkiError::Exists { path } if path.starts_with(&dir)),
            "{err}"
        );
        assert!(err.to_string().contains("--force"));
        assert_eq!(std::fs::read(&key).expect("read"), before, "untouched");

        // Only the key left over (a half-made CA) still counts as existing.
        std::fs::remove_file(&cert).expect("rm");
        assert!(matches!(init(&dir, false), Err(PkiError::Exists { .. })));

        init(&dir, true).expect("forced");
        assert_ne!(std::fs::read(&key).expect("read"), before, "replaced");
        assert_eq!(mode(&key), 0o600);
        // No temporary files left behind.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.key", "ca.pem"]);
    }

    #[test]
    fn write_atomic_without_replace_does_not_clobber() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("x.key");
        std::fs::write(&path, "old").expect("write");
        let err = write_atomic(&path, b"new", KEY_MODE, false).expect_err("exists");
        assert!(matches!(err, PkiError::Exists { .. }));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "old");
        write_atomic(&path, b"new", KEY_MODE, true).expect("replace");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 1);
    }

    #[test]
    fn issue_loads_the_ca_from_disk() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ca_dir = tmp.path().join("ca");
        let out = tmp.path().join("certs");
        let (ca, _, _) = init(&ca_dir, false).expect("init");
        let (cert, key) = issue(&ca_dir, &out, &node_req("node-1"), false).expect("issue");
        assert_eq!(cert, out.join("node-1.pem"));
        assert_eq!(mode(&key), 0o600);
        let pem = std::fs::read_to_string(&cert).expect("read");
        verify_server(&ca, &pem, "node-1").expect("chains to the CA on disk");
        // The key matches the certificate: rcgen reads it back and its public key is the cert's.
        let kp = KeyPair::from_pem(&std::fs::read_to_string(&key).expect("read")).expect("key");
        assert_eq!(cert_public_key(&pem).expect("spki"), kp.public_key_raw());

        assert!(matches!(
            issue(&ca_dir, &out, &node_req("node-1"), false),
            Err(PkiError::Exists { .. })
        ));
        issue(&ca_dir, &out, &node_req("node-1"), true).expect("forced");
    }

    #[test]
    fn load_rejects_a_key_from_another_ca() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init(&a, false).expect("init");
        init(&b, false).expect("init");
        std::fs::copy(b.join(CA_KEY_FILE), a.join(CA_KEY_FILE)).expect("cp");
        assert!(matches!(Ca::load(&a), Err(PkiError::KeyMismatch { .. })));
        std::fs::write(a.join(CA_CERT_FILE), "garbage").expect("write");
        assert!(matches!(Ca::load(&a), Err(PkiError::Parse { .. })));
        assert!(matches!(
            Ca::load(&tmp.path().join("missing")),
            Err(PkiError::Read { .. })
        ));
    }

    #[test]
    fn names_are_checked() {
        let ca = Ca::generate().expect("ca");
        for bad in ["", "../x", "a/b", "-x", "x.", "a..b", "a b", "ünï"] {
            let err = ca.issue(&client_req(bad)).expect_err(bad);
            assert!(matches!(err, PkiError::InvalidName { .. }), "{bad}: {err}");
        }
        let mut req = node_req("node-1");
        req.role = Role::Node {
            ips: vec![],
            dns: vec!["bad name".into()],
        };
        assert!(matches!(ca.issue(&req), Err(PkiError::InvalidName { .. })));
    }
}
