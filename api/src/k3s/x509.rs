//! Just enough DER and X.509 to follow K3s's `hashCA`: names, keys, validity and the
//! extensions Go's `x509.Certificate.Verify` looks at while building a chain
//! (basic constraints, key usage, extended key usage, key identifiers).
//!
//! Our own reader rather than a general X.509 crate: it is small, has no dependencies, and
//! keeps the PID1 lean. It rejects what it does not understand instead of guessing.

/// Why a certificate could not be read. `&'static str` so the message needs no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DerError(pub &'static str);

const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const SEQUENCE: u8 = 0x30;
const EXPLICIT_0: u8 = 0xa0;
const EXPLICIT_3: u8 = 0xa3;
const IMPLICIT_0: u8 = 0x80;

// Extension OIDs (DER contents of the OBJECT IDENTIFIER).
const OID_SKI: &[u8] = &[0x55, 0x1d, 0x0e];
const OID_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
const OID_AKI: &[u8] = &[0x55, 0x1d, 0x23];
const OID_EKU: &[u8] = &[0x55, 0x1d, 0x25];
/// id-kp-serverAuth, 1.3.6.1.5.5.7.3.1.
pub const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// anyExtendedKeyUsage, 2.5.29.37.0.
pub const EKU_ANY: &[u8] = &[0x55, 0x1d, 0x25, 0x00];
/// Go's `x509.KeyUsageCertSign` (bit 5 of the KeyUsage BIT STRING).
pub const KEY_USAGE_CERT_SIGN: u16 = 1 << 5;

/// One DER element: its tag, its contents and the whole encoding (tag and length included).
#[derive(Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    whole: &'a [u8],
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Reader { rest }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn any(&mut self) -> Result<Tlv<'a>, DerError> {
        let data = self.rest;
        let (&tag, after_tag) = data.split_first().ok_or(DerError("truncated"))?;
        if tag & 0x1f == 0x1f {
            return Err(DerError("high tag numbers are not used in certificates"));
        }
        let (&first, mut after_len) = after_tag.split_first().ok_or(DerError("truncated"))?;
        let len = match first {
            0..=0x7f => usize::from(first),
            0x81..=0x84 => {
                let n = usize::from(first & 0x7f);
                if after_len.len() < n {
                    return Err(DerError("truncated length"));
                }
                let (bytes, rest) = after_len.split_at(n);
                after_len = rest;
                bytes
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
            }
            _ => return Err(DerError("indefinite or oversized length")),
        };
        if after_len.len() < len {
            return Err(DerError("truncated"));
        }
        let header = data.len() - after_len.len();
        let (content, rest) = after_len.split_at(len);
        self.rest = rest;
        Ok(Tlv {
            tag,
            content,
            whole: &data[..header + len],
        })
    }

    fn expect(&mut self, tag: u8) -> Result<Tlv<'a>, DerError> {
        let tlv = self.any()?;
        if tlv.tag == tag {
            Ok(tlv)
        } else {
            Err(DerError("unexpected element"))
        }
    }

    fn optional(&mut self, tag: u8) -> Result<Option<Tlv<'a>>, DerError> {
        if self.rest.first() == Some(&tag) {
            self.any().map(Some)
        } else {
            Ok(None)
        }
    }

    fn finish(&self) -> Result<(), DerError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DerError("trailing data"))
        }
    }
}

/// `basicConstraints` as Go reads it: `MaxPathLen` is `None` when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasicConstraints {
    pub is_ca: bool,
    pub max_path_len: Option<u64>,
}

/// The parts of a certificate that chain building needs; every slice borrows the DER.
#[derive(Debug, Clone)]
pub struct Cert<'a> {
    /// The whole certificate (what K3s hashes for a bundle's root).
    pub der: &'a [u8],
    /// `tbsCertificate`, tag and length included: what the signature covers.
    pub tbs: &'a [u8],
    /// Contents of the outer `signatureAlgorithm` AlgorithmIdentifier.
    pub sig_alg: &'a [u8],
    pub signature: &'a [u8],
    /// 1, 2 or 3.
    pub version: u8,
    /// The encoded issuer and subject Names, compared byte for byte as Go does.
    pub issuer: &'a [u8],
    pub subject: &'a [u8],
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// Contents of the SubjectPublicKeyInfo's AlgorithmIdentifier, and the key bits.
    pub spki_alg: &'a [u8],
    pub public_key: &'a [u8],
    pub subject_key_id: Option<&'a [u8]>,
    pub authority_key_id: Option<&'a [u8]>,
    pub basic_constraints: Option<BasicConstraints>,
    /// Go's `KeyUsage` bit set (bit 0 = digitalSignature); 0 when absent.
    pub key_usage: u16,
    /// The extended key usage OIDs; empty when absent.
    pub ext_key_usage: Vec<&'a [u8]>,
}

impl<'a> Cert<'a> {
    pub fn parse(der: &'a [u8]) -> Result<Cert<'a>, DerError> {
        let mut outer = Reader::new(der);
        let cert = outer.expect(SEQUENCE)?;
        outer.finish()?;
        let mut parts = Reader::new(cert.content);
        let tbs = parts.expect(SEQUENCE)?;
        let sig_alg = parts.expect(SEQUENCE)?;
        let signature = bit_string(parts.expect(BIT_STRING)?)?;
        parts.finish()?;

        let mut t = Reader::new(tbs.content);
        let version = match t.optional(EXPLICIT_0)? {
            Some(v) => match Reader::new(v.content).expect(INTEGER)?.content {
                [n @ 0..=2] => n + 1,
                _ => return Err(DerError("unknown version")),
            },
            None => 1,
        };
        t.expect(INTEGER)?; // serial number
        if t.expect(SEQUENCE)?.content != sig_alg.content {
            return Err(DerError("inner and outer signature algorithms differ"));
        }
        let issuer = t.expect(SEQUENCE)?.whole;
        let (not_before, not_after) = validity(t.expect(SEQUENCE)?)?;
        let subject = t.expect(SEQUENCE)?.whole;
        let mut spki = Reader::new(t.expect(SEQUENCE)?.content);
        let spki_alg = spki.expect(SEQUENCE)?.content;
        let public_key = bit_string(spki.expect(BIT_STRING)?)?;
        spki.finish()?;
        // issuerUniqueID and subjectUniqueID, primitive or constructed.
        for tag in [0x81, 0xa1, 0x82, 0xa2] {
            t.optional(tag)?;
        }
        let mut cert = Cert {
            der,
            tbs: tbs.whole,
            sig_alg: sig_alg.content,
            signature,
            version,
            issuer,
            subject,
            not_before,
            not_after,
            spki_alg,
            public_key,
            subject_key_id: None,
            authority_key_id: None,
            basic_constraints: None,
            key_usage: 0,
            ext_key_usage: Vec::new(),
        };
        if let Some(exts) = t.optional(EXPLICIT_3)? {
            cert.read_extensions(exts.content)?;
        }
        t.finish()?;
        Ok(cert)
    }

    fn read_extensions(&mut self, explicit: &'a [u8]) -> Result<(), DerError> {
        let mut wrapper = Reader::new(explicit);
        let mut list = Reader::new(wrapper.expect(SEQUENCE)?.content);
        wrapper.finish()?;
        while !list.is_empty() {
            let mut ext = Reader::new(list.expect(SEQUENCE)?.content);
            let oid = ext.expect(OID)?.content;
            ext.optional(BOOLEAN)?; // critical
            let value = ext.expect(OCTET_STRING)?.content;
            ext.finish()?;
            match oid {
                OID_SKI => self.subject_key_id = Some(single(value, OCTET_STRING)?.content),
                OID_AKI => self.authority_key_id = authority_key_id(value)?,
                OID_BASIC_CONSTRAINTS => self.basic_constraints = Some(basic_constraints(value)?),
                OID_KEY_USAGE => self.key_usage = key_usage(value)?,
                OID_EKU => {
                    let mut oids = Reader::new(single(value, SEQUENCE)?.content);
                    while !oids.is_empty() {
                        self.ext_key_usage.push(oids.expect(OID)?.content);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The one element `data` must consist of.
fn single(data: &[u8], tag: u8) -> Result<Tlv<'_>, DerError> {
    let mut r = Reader::new(data);
    let tlv = r.expect(tag)?;
    r.finish()?;
    Ok(tlv)
}

/// A BIT STRING of whole bytes (signatures and keys always are).
fn bit_string(tlv: Tlv<'_>) -> Result<&[u8], DerError> {
    match tlv.content.split_first() {
        Some((0, bits)) => Ok(bits),
        _ => Err(DerError("bit string with unused bits")),
    }
}

fn authority_key_id(value: &[u8]) -> Result<Option<&[u8]>, DerError> {
    let mut r = Reader::new(single(value, SEQUENCE)?.content);
    Ok(r.optional(IMPLICIT_0)?.map(|t| t.content))
}

fn basic_constraints(value: &[u8]) -> Result<BasicConstraints, DerError> {
    let mut r = Reader::new(single(value, SEQUENCE)?.content);
    let is_ca = match r.optional(BOOLEAN)? {
        Some(b) => b.content.first().is_some_and(|&v| v != 0),
        None => false,
    };
    let max_path_len = match r.optional(INTEGER)? {
        Some(n) if n.content.len() <= 8 && n.content.first().is_some_and(|&b| b < 0x80) => Some(
            n.content
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        ),
        Some(_) => return Err(DerError("bad path length")),
        None => None,
    };
    r.finish()?;
    Ok(BasicConstraints {
        is_ca,
        max_path_len,
    })
}

/// Go's bit numbering: bit 0 is the first (most significant) bit of the first byte.
fn key_usage(value: &[u8]) -> Result<u16, DerError> {
    let tlv = single(value, BIT_STRING)?;
    let bits = tlv.content.get(1..).ok_or(DerError("empty key usage"))?;
    let mut usage = 0u16;
    for i in 0..9 {
        if bits.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0) {
            usage |= 1 << i;
        }
    }
    Ok(usage)
}

fn validity(tlv: Tlv<'_>) -> Result<(i64, i64), DerError> {
    let mut r = Reader::new(tlv.content);
    let not_before = time(r.any()?)?;
    let not_after = time(r.any()?)?;
    r.finish()?;
    Ok((not_before, not_after))
}

/// UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ`, as RFC 5280 requires.
fn time(tlv: Tlv<'_>) -> Result<i64, DerError> {
    let (year, rest) = match (tlv.tag, tlv.content.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&tlv.content[..2])?;
            (
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
                &tlv.content[2..],
            )
        }
        (GENERALIZED_TIME, 15) => (digits(&tlv.content[..4])?, &tlv.content[4..]),
        _ => return Err(DerError("unsupported time format")),
    };
    if rest[10] != b'Z' {
        return Err(DerError("time is not in UTC"));
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return Err(DerError("time out of range"));
    }
    let days = days_from_civil(year, month, day);
    Ok(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn digits(s: &[u8]) -> Result<i64, DerError> {
    s.iter().try_fold(0i64, |acc, &c| {
        if c.is_ascii_digit() {
            Ok(acc * 10 + i64::from(c - b'0'))
        } else {
            Err(DerError("bad digit in time"))
        }
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_become_unix_seconds() {
        let utc = |s: &str| {
            time(Tlv {
                tag: UTC_TIME,
                content: s.as_bytes(),
                whole: &[],
            })
        };
        let gen = |s: &str| {
            time(Tlv {
                tag: GENERALIZED_TIME,
                content: s.as_bytes(),
                whole: &[],
            })
        };
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
