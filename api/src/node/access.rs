//! Who may do what on the node API: the role a pool client certificate carries, and the
//! facts about a certificate the node checks (serial, expiry, names).
//!
//! The role is an extended key usage next to `clientAuth`, one OID per role, under an arc
//! made from a UUID as ITU-T X.667 allows (`2.25.<uuid as an integer>`), so no registry
//! number is borrowed: [`ADMIN_OID`] for every route, [`READ_OID`] for status, health,
//! logs and metrics. A certificate with neither (issued before roles existed) is treated
//! as read-only: see [`Access::of_unmarked`].

use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The arc both role OIDs live under: `2.25.138498017241214147597015022900120177115`.
pub const ROLE_ARC: &str = "2.25.138498017241214147597015022900120177115";
/// The extended key usage of an admin client: every route.
pub const ADMIN_OID: &str = "2.25.138498017241214147597015022900120177115.1";
/// The extended key usage of a read-only client: status, health, logs, metrics.
pub const READ_OID: &str = "2.25.138498017241214147597015022900120177115.2";

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Status, health, logs and metrics.
    Read,
    /// Also apply, reboot and power off.
    Admin,
}

impl Access {
    /// What a pool certificate without a role OID gets: read-only. Such a certificate
    /// was issued before roles existed, for any purpose; the node cannot tell an
    /// operator's from a dashboard's, so it grants the least. Re-issuing with
    /// `basalt pki issue client NAME --role admin` restores apply and power.
    pub const fn of_unmarked() -> Access {
        Access::Read
    }

    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Admin => "admin",
        }
    }

    pub fn oid(self) -> &'static str {
        match self {
            Access::Read => READ_OID,
            Access::Admin => ADMIN_OID,
        }
    }

    /// The OID's DER content bytes (what goes inside the `OBJECT IDENTIFIER` tag).
    pub fn oid_der(self) -> Vec<u8> {
        // A dotted OID that the constants above spell correctly; see the tests.
        oid_content(self.oid()).unwrap_or_default()
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// DER content of a dotted OID; arcs up to 128 bits (a UUID arc).
pub fn oid_content(dotted: &str) -> Option<Vec<u8>> {
    let arcs = dotted
        .split('.')
        .map(|a| a.parse::<u128>().ok())
        .collect::<Option<Vec<_>>>()?;
    let (&first, rest) = arcs.split_first()?;
    let (&second, rest) = rest.split_first()?;
    if first > 2 || (first < 2 && second >= 40) {
        return None;
    }
    let mut out = Vec::new();
    for arc in std::iter::once(first * 40 + second).chain(rest.iter().copied()) {
        let mut groups = vec![(arc & 0x7f) as u8];
        let mut v = arc >> 7;
        while v > 0 {
            groups.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        out.extend(groups.iter().rev());
    }
    Some(out)
}

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("not a DER X.509 certificate")]
    Der,
    #[error("not PEM")]
    Pem,
    #[error("no certificate")]
    Empty,
    #[error("bad {0} extension")]
    Extension(&'static str),
}

/// What the node looks at in a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The serial as [`crate::config::CertSerial`] spells it (lowercase hex, no leading zeros).
    pub serial: String,
    /// The role OID it carries, if any.
    pub access: Option<Access>,
    /// Validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// `not_after` for people, as `openssl x509 -enddate` prints it.
    pub not_after_text: String,
    /// DNS names in the subject alternative names.
    pub dns_names: Vec<String>,
}

impl CertFacts {
    pub fn from_der(der: &[u8]) -> Result<CertFacts, CertError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| CertError::Der)?;
        let eku = cert
            .extended_key_usage()
            .map_err(|_| CertError::Extension("extended key usage"))?;
        let has = |a: Access| {
            let want = a.oid_der();
            eku.as_ref()
                .is_some_and(|e| e.value.other.iter().any(|o| o.as_bytes() == want))
        };
        // Both: the stronger one was meant (a CA would not issue both by accident).
        let access = if has(Access::Admin) {
            Some(Access::Admin)
        } else if has(Access::Read) {
            Some(Access::Read)
        } else {
            None
        };
        let dns_names = cert
            .subject_alternative_name()
            .map_err(|_| CertError::Extension("subject alternative name"))?
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some((*d).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let v = cert.validity();
        Ok(CertFacts {
            serial: serial_hex(cert.raw_serial()),
            access,
            not_before: v.not_before.timestamp(),
            not_after: v.not_after.timestamp(),
            not_after_text: v.not_after.to_string(),
            dns_names,
        })
    }

    /// The first certificate of a PEM chain (the leaf).
    pub fn from_pem(pem: &str) -> Result<CertFacts, CertError> {
        let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .next()
            .ok_or(CertError::Empty)?
            .map_err(|_| CertError::Pem)?;
        CertFacts::from_der(&block.contents)
    }

    /// The name is one of the DNS SANs (case does not matter).
    pub fn is_for(&self, name: &str) -> bool {
        self.dns_names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Serial bytes as lowercase hex without leading zeros (`0` for zero), as the
/// `[api] revoked` list is normalized.
pub fn serial_hex(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_oids_are_under_the_arc_and_encode_by_the_book() {
        assert_eq!(ADMIN_OID, format!("{ROLE_ARC}.1"));
        assert_eq!(READ_OID, format!("{ROLE_ARC}.2"));
        // By hand: 2*40+25 = 105 = 0x69, then the UUID in base 128, then the role.
        let arc = [
            0x69, 0x81, 0xd0, 0xb1, 0xdf, 0xdd, 0x81, 0x91, 0xba, 0xba, 0x85, 0xae, 0xf0, 0xb9,
            0xae, 0x8f, 0x89, 0xf3, 0x93, 0x5b,
        ];
        assert_eq!(oid_content(ROLE_ARC).expect("oid"), arc);
        assert_eq!(Access::Admin.oid_der(), [&arc[..], &[1]].concat());
        assert_eq!(Access::Read.oid_der(), [&arc[..], &[2]].concat());
        // clientAuth, 1.3.6.1.5.5.7.3.2, a known vector.
        assert_eq!(
            oid_content("1.3.6.1.5.5.7.3.2").expect("oid"),
            [0x2b, 6, 1, 5, 5, 7, 3, 2]
        );
        assert_eq!(oid_content("1.40"), None);
        assert_eq!(oid_content("1"), None);
        assert_eq!(oid_content("1.x"), None);
    }

    #[test]
    fn serials_lose_leading_zeros() {
        assert_eq!(serial_hex(&[0x00, 0x8a, 0x01]), "8a01");
        assert_eq!(serial_hex(&[0x0a]), "a");
        assert_eq!(serial_hex(&[0, 0]), "0");
    }

    #[test]
    fn read_is_less_than_admin() {
        assert!(Access::Read < Access::Admin);
        assert_eq!(Access::of_unmarked(), Access::Read);
    }
}
