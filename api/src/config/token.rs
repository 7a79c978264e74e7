//! The K3s join token.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A K3s join token.
///
/// `Display` and `Debug` never print the password or the shared secret; use
/// [`Token::secret_string`] to write it where K3s reads it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Token {
    /// `K10<ca_hash>::<user>:<password>`: `ca_hash` is the sha256 of the server's CA
    /// bundle, 64 lowercase hex digits, checked against the server's `/cacerts`.
    Secure {
        ca_hash: String,
        user: String,
        password: String,
    },
    /// `K10<ca_hash>::<id>.<secret>`: a bootstrap token as `k3s token create` makes it
    /// (`[a-z0-9]{6}.[a-z0-9]{16}`), sent by K3s as a bearer token; the CA hash as above.
    Bootstrap {
        ca_hash: String,
        id: String,
        secret: String,
    },
    /// A shared secret without CA pinning: a password, or a bare bootstrap token.
    Plain(String),
}

/// Why a token was rejected. The messages never contain the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token contains whitespace or control characters")]
    BadCharacter,
    #[error("secure token (K10…) lacks `::` between the CA hash and the credentials")]
    NoSeparator,
    #[error("secure token's CA hash is not 64 lowercase hex digits (sha256)")]
    BadCaHash,
    #[error("secure token's credentials are neither `<user>:<password>` nor a bootstrap token `<id>.<secret>`")]
    NoCredentials,
    #[error("secure token has an empty user name")]
    EmptyUser,
    #[error("secure token has an empty password")]
    EmptyPassword,
}

impl Token {
    /// Parse a K3s token: `K10…` is a secure token (and must be well formed); anything
    /// else is a plain shared secret.
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenError::BadCharacter);
        }
        let Some(rest) = s.strip_prefix("K10") else {
            return Ok(Token::Plain(s.to_owned()));
        };
        let (hash, creds) = rest.split_once("::").ok_or(TokenError::NoSeparator)?;
        if hash.len() != 64
            || !hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(TokenError::BadCaHash);
        }
        // K3s (pkg/clientaccess/token.go) tries a bootstrap token first, then basic auth.
        if let Some((id, secret)) = bootstrap_token(creds) {
            return Ok(Token::Bootstrap {
                ca_hash: hash.to_owned(),
                id: id.to_owned(),
                secret: secret.to_owned(),
            });
        }
        let (user, password) = creds.split_once(':').ok_or(TokenError::NoCredentials)?;
        if user.is_empty() {
            return Err(TokenError::EmptyUser);
        }
        if password.is_empty() {
            return Err(TokenError::EmptyPassword);
        }
        Ok(Token::Secure {
            ca_hash: hash.to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// The CA hash to check against the server's `/cacerts`, for a secure token.
    pub fn ca_hash(&self) -> Option<&str> {
        match self {
            Token::Secure { ca_hash, .. } | Token::Bootstrap { ca_hash, .. } => Some(ca_hash),
            Token::Plain(_) => None,
        }
    }

    /// The token in full, as K3s reads it.
    pub fn secret_string(&self) -> String {
        match self {
            Token::Secure {
                ca_hash,
                user,
                password,
            } => format!("K10{ca_hash}::{user}:{password}"),
            Token::Bootstrap {
                ca_hash,
                id,
                secret,
            } => format!("K10{ca_hash}::{id}.{secret}"),
            Token::Plain(s) => s.clone(),
        }
    }
}

/// Kubernetes' bootstrap token form (`kubeadm.NewBootstrapTokenString`): `[a-z0-9]{6}` `.`
/// `[a-z0-9]{16}`.
fn bootstrap_token(creds: &str) -> Option<(&str, &str)> {
    let (id, secret) = creds.split_once('.')?;
    let ok = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    (ok(id, 6) && ok(secret, 16)).then_some((id, secret))
}

impl FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        Token::parse(s)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Secure { ca_hash, user, .. } => write!(f, "K10{ca_hash}::{user}:<redacted>"),
            Token::Bootstrap { ca_hash, id, .. } => write!(f, "K10{ca_hash}::{id}.<redacted>"),
            Token::Plain(_) => f.write_str("<redacted>"),
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Secure { ca_hash, user, .. } => f
                .debug_struct("Secure")
                .field("ca_hash", ca_hash)
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            Token::Bootstrap { ca_hash, id, .. } => f
                .debug_struct("Bootstrap")
                .field("ca_hash", ca_hash)
                .field("id", id)
                .field("secret", &"<redacted>")
                .finish(),
            Token::Plain(_) => f.write_str("Plain(<redacted>)"),
        }
    }
}

impl TryFrom<String> for Token {
    type Error = TokenError;
    fn try_from(s: String) -> Result<Self, TokenError> {
        Token::parse(&s)
    }
}

impl From<Token> for String {
    fn from(t: Token) -> String {
        t.secret_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn token_parser() {
        let secure = |h: &str, u: &str, p: &str| Token::Secure {
            ca_hash: h.into(),
            user: u.into(),
            password: p.into(),
        };
        let cases: Vec<(String, Result<Token, TokenError>)> = vec![
            (
                format!("K10{HASH}::server:pw"),
                Ok(secure(HASH, "server", "pw")),
            ),
            (
                format!("K10{HASH}::node:a:b"),
                Ok(secure(HASH, "node", "a:b")),
            ),
            // `k3s token create` makes bootstrap tokens; K3s sends them as bearer tokens.
            (
                format!("K10{HASH}::abcdef.0123456789abcdef"),
                Ok(Token::Bootstrap {
                    ca_hash: HASH.into(),
                    id: "abcdef".into(),
                    secret: "0123456789abcdef".into(),
                }),
            ),
            // Not the bootstrap form (upper case, wrong lengths): neither form, refused.
            (
                format!("K10{HASH}::ABCDEF.0123456789abcdef"),
                Err(TokenError::NoCredentials),
            ),
            (
                format!("K10{HASH}::abcdef.0123456789abcde"),
                Err(TokenError::NoCredentials),
            ),
            (
                "just-a-secret".into(),
                Ok(Token::Plain("just-a-secret".into())),
            ),
            (
                "abcdef.0123456789abcdef".into(),
                Ok(Token::Plain("abcdef.0123456789abcdef".into())),
            ),
            (
                "k10lowercase-is-plain".into(),
                Ok(Token::Plain("k10lowercase-is-plain".into())),
            ),
            ("".into(), Err(TokenError::Empty)),
            ("has space".into(), Err(TokenError::BadCharacter)),
            ("tab\there".into(), Err(TokenError::BadCharacter)),
            (format!("K10{HASH}:server:pw"), Err(TokenError::NoSeparator)),
            ("K10".into(), Err(TokenError::NoSeparator)),
            ("K10::server:pw".into(), Err(TokenError::BadCaHash)),
            (
                format!("K10{}::server:pw", &HASH[1..]),
                Err(TokenError::BadCaHash),
            ),
            (format!("K10{HASH}0::server:pw"), Err(TokenError::BadCaHash)),
            (
                format!("K10{}::server:pw", HASH.to_uppercase()),
                Err(TokenError::BadCaHash),
            ),
            (
                format!("K10{}g::server:pw", &HASH[1..]),
                Err(TokenError::BadCaHash),
            ),
            (
                format!("K10{HASH}::serverpw"),
                Err(TokenError::NoCredentials),
            ),
            (format!("K10{HASH}::"), Err(TokenError::NoCredentials)),
            (format!("K10{HASH}:::pw"), Err(TokenError::EmptyUser)),
            (
                format!("K10{HASH}::server:"),
                Err(TokenError::EmptyPassword),
            ),
        ];
        for (text, want) in cases {
            let got = Token::parse(&text);
            assert_eq!(got, want, "{text:?}");
            if let Ok(t) = got {
                assert_eq!(t.secret_string(), text);
            }
        }
        // Errors never carry the secret.
        let err = Token::parse(&format!("K10{HASH}::server:")).unwrap_err();
        assert!(!err.to_string().contains(HASH));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn token_parser_never_panics_and_never_shows_the_secret(
            text in prop_oneof![
                any::<String>(),
                "K10[0-9a-fA-F]{60,68}(::?)[a-z]{0,4}:?[!-~]{0,12}",
                "K10[0-9a-f]{64}::[a-z0-9]{5,7}\\.[a-z0-9]{15,17}",
            ]
        ) {
            if let Ok(token) = Token::parse(&text) {
                prop_assert_eq!(token.secret_string(), text.clone());
                let (secret, public) = match &token {
                    Token::Secure { ca_hash, user, password } => {
                        (password.clone(), format!("K10{ca_hash}::{user}:"))
                    }
                    Token::Bootstrap { ca_hash, id, secret } => {
                        (secret.clone(), format!("K10{ca_hash}::{id}."))
                    }
                    Token::Plain(s) => (s.clone(), String::new()),
                };
                // The secret may occur by chance in the hash or the user name.
                if !public.contains(&secret) && !"<redacted>Plain()".contains(&secret) {
                    prop_assert!(!token.to_string().contains(&secret));
                    let debug = format!("{:?}", token);
                    prop_assert!(!debug.contains(&secret));
                }
            }
        }
    }
}
