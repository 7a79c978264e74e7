//! Targets on what a node reads as its configuration: the machine config (TOML), the
//! kernel command line, the join token, and the CA bundle a server answers with.

use basalt_api::bootparams::BootParams;
use basalt_api::config::{MachineConfig, Token};

/// Stands for a secret wherever an input has `@@`: a value no error message of basalt
/// has any reason to contain.
pub const SECRET: &str = "Zq9SECRETxK7vW2pass";

/// `MachineConfig::parse` on the input as text (`@@` replaced by [`SECRET`]). Property:
/// when the secret sits only in `token` or `key` values, no error message or `Debug`
/// of the error or of the parsed config contains it.
pub fn machine_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let text = text.replace("@@", SECRET);
    let secret_only_in_secrets = secret_only_in_secret_values(&text);
    match MachineConfig::parse(&text) {
        Ok(config) => {
            if secret_only_in_secrets {
                let debug = format!("{config:?}");
                assert!(!debug.contains(SECRET), "Debug of a config shows a secret");
            }
            // What is accepted survives its own serialisation.
            let again = config.to_toml().expect("an accepted config serialises");
            let back = MachineConfig::parse(&again).expect("a serialised config parses");
            assert_eq!(back, config, "serialising changed the config");
        }
        Err(e) => {
            if secret_only_in_secrets {
                let shown = format!("{e} / {e:?}");
                assert!(
                    !shown.contains(SECRET),
                    "a config error shows a secret: {shown}"
                );
            }
        }
    }
}

/// Whether every occurrence of [`SECRET`] in `text` is inside the value of a `token` or
/// `key` key, judged by the independent `toml` parser where the text is TOML, and line
/// by line (`token = …` / `key = …`) where it is not.
fn secret_only_in_secret_values(text: &str) -> bool {
    if !text.contains(SECRET) {
        return false;
    }
    match text.parse::<toml::Table>() {
        Ok(table) => only_in_secret_values(&toml::Value::Table(table), None),
        Err(_) => text.lines().all(|line| {
            if !line.contains(SECRET) {
                return true;
            }
            let Some((key, value)) = line.split_once('=') else {
                return false;
            };
            let key = key.trim();
            matches!(key, "token" | "key") && !key.contains(SECRET) && value.contains(SECRET)
        }),
    }
}

fn only_in_secret_values(value: &toml::Value, key: Option<&str>) -> bool {
    match value {
        toml::Value::String(s) => !s.contains(SECRET) || matches!(key, Some("token" | "key")),
        toml::Value::Table(t) => t
            .iter()
            .all(|(k, v)| !k.contains(SECRET) && only_in_secret_values(v, Some(k))),
        toml::Value::Array(a) => a.iter().all(|v| only_in_secret_values(v, None)),
        _ => true,
    }
}

/// `BootParams::parse` on the input as a kernel command line. Property: what is accepted
/// is what the line says (the root hash is 64 hex digits, the block count positive).
pub fn boot_params(data: &[u8]) {
    let Ok(cmdline) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = BootParams::parse(cmdline) {
        assert_eq!(p.verity.root_hash.len(), 64);
        assert!(p.verity.root_hash.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(p.verity.data_blocks > 0);
        assert!(cmdline.contains(&p.verity.root_hash));
    }
}

/// `Token::parse`. Properties: the full form round-trips, and `Display` and `Debug`
/// do not depend on the password or secret: the same token with another secret shows
/// exactly the same.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(token) = Token::parse(text) else {
        return;
    };
    assert_eq!(
        token.secret_string(),
        text,
        "the token as K3s reads it changed"
    );
    let other = match token.clone() {
        Token::Secure { ca_hash, user, .. } => Token::Secure {
            ca_hash,
            user,
            password: "other".into(),
        },
        Token::Bootstrap { ca_hash, id, .. } => Token::Bootstrap {
            ca_hash,
            id,
            secret: "0000000000000000".into(),
        },
        Token::Plain(_) => Token::Plain("other".into()),
    };
    assert_eq!(
        format!("{token}"),
        format!("{other}"),
        "Display shows the secret"
    );
    assert_eq!(
        format!("{token:?}"),
        format!("{other:?}"),
        "Debug shows the secret"
    );
}

/// `ca_hash` over the input as a `/cacerts` body. Property: an answer is 64 lowercase
/// hex digits.
pub fn ca_hash(data: &[u8]) {
    if let Ok(hash) = basalt_api::k3s::ca_hash(data) {
        assert_eq!(hash.len(), 64);
        assert!(hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
}
