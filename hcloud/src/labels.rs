//! The labels basalt puts on Hetzner resources, and the API's rules for labels.
//!
//! A key is an optional DNS-subdomain prefix and `/`, then a name of at most 63
//! characters; a value is empty or at most 63 characters. Names and values start and end
//! with an alphanumeric character and may hold `-`, `_` and `.` between.

use std::collections::BTreeMap;

/// The spec's name of the image in a snapshot.
pub const IMAGE: &str = "basalt.io/image";
/// basalt's version that built the image.
pub const VERSION: &str = "basalt.io/version";
/// The first [`SHA256_PREFIX`] hex digits of the raw disk's sha256 (a full one does not fit
/// a label value).
pub const SHA256: &str = "basalt.io/sha256";
pub const ARCH: &str = "basalt.io/arch";
/// Who made a temporary resource.
pub const CREATED_BY: &str = "basalt.io/created-by";
/// The upload run that made a resource (temporary ones and the snapshot).
pub const RUN: &str = "basalt.io/run";
/// [`CREATED_BY`]'s value on an upload's temporary server and key.
pub const UPLOADER: &str = "basalt-upload";
pub const SHA256_PREFIX: usize = 32;

/// Selects every snapshot basalt uploaded.
pub const ANY_IMAGE: &str = "basalt.io/image";

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("label {0:?}: expected KEY=VALUE")]
    Syntax(String),
    #[error("label key {0:?}: not a valid Hetzner label key")]
    Key(String),
    #[error("label {key}: value {value:?} is not a valid Hetzner label value")]
    Value { key: String, value: String },
    #[error("label {0}: keys under basalt.io/ are basalt's own")]
    Reserved(String),
}

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

pub fn valid_key(key: &str) -> bool {
    match key.rsplit_once('/') {
        Some((prefix, name)) => {
            prefix.len() <= 253
                && prefix.split('.').all(|p| {
                    !p.is_empty()
                        && p.len() <= 63
                        && p.bytes()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                        && !p.starts_with('-')
                        && !p.ends_with('-')
                })
                && valid_name(name)
        }
        None => valid_name(key),
    }
}

pub fn valid_value(value: &str) -> bool {
    value.is_empty() || valid_name(value)
}

/// Parses a user's `KEY=VALUE`, refusing invalid ones and basalt's own keys.
pub fn parse_user(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| LabelError::Syntax(s.to_owned()))?;
    if !valid_key(k) {
        return Err(LabelError::Key(k.to_owned()));
    }
    if k.starts_with("basalt.io/") {
        return Err(LabelError::Reserved(k.to_owned()));
    }
    if !valid_value(v) {
        return Err(LabelError::Value {
            key: k.to_owned(),
            value: v.to_owned(),
        });
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Checks a whole set (basalt's own values come from files: a spec name, a version).
pub fn check(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    for (k, v) in labels {
        if !valid_key(k) {
            return Err(LabelError::Key(k.clone()));
        }
        if !valid_value(v) {
            return Err(LabelError::Value {
                key: k.clone(),
                value: v.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_follow_the_api_rules() {
        for ok in ["a", "basalt.io/image", "x-y_z.1", "example.com/pool"] {
            assert!(valid_key(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Ex ample/x", "a/", "/a", &"a".repeat(64)] {
            assert!(!valid_key(bad), "{bad}");
        }
        assert!(valid_value(""));
        assert!(valid_value("0.1.0"));
        assert!(!valid_value("v1.36.4+k3s1"));
    }

    #[test]
    fn user_labels_are_parsed_and_checked() {
        assert_eq!(
            parse_user("team=ops").unwrap(),
            ("team".to_owned(), "ops".to_owned())
        );
        assert!(matches!(parse_user("team"), Err(LabelError::Syntax(_))));
        assert!(matches!(
            parse_user("basalt.io/image=x"),
            Err(LabelError::Reserved(_))
        ));
        assert!(matches!(
            parse_user("team=a b"),
            Err(LabelError::Value { .. })
        ));
    }
}
