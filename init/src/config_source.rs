//! Where the machine config comes from, first found wins: STATE (what was applied
//! before) → QEMU fw_cfg `opt/basalt/config` → none. A config first read from fw_cfg is
//! written to STATE, so later boots do not depend on the hypervisor passing it again.
//! (Hetzner metadata and the kernel command line come with the network.)

use basalt_api::config::{ConfigError, MachineConfig};
use std::path::{Path, PathBuf};

/// On STATE (mounted on /var), relative to the root.
pub const STATE_CONFIG: &str = "var/lib/basalt/config.toml";
/// QEMU's fw_cfg entry as the `qemu_fw_cfg` module exposes it, relative to the root.
pub const FW_CFG: &str = "sys/firmware/qemu_fw_cfg/by_name/opt/basalt/config/raw";
/// Largest config accepted from any source.
pub const MAX_BYTES: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    State,
    FwCfg,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::State => "STATE",
            Source::FwCfg => "fw_cfg opt/basalt/config",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is larger than {MAX_BYTES} bytes")]
    TooLarge(PathBuf),
    #[error("machine config from {}", .0.name())]
    Invalid(Source, #[source] ConfigError),
    #[error("save the machine config to {0}")]
    Save(PathBuf, #[source] std::io::Error),
}

/// The outcome of looking: no config at all, or one source and what it held.
pub enum Found {
    None,
    Config(Source, Box<MachineConfig>),
}

/// Reads the first source present; a config from fw_cfg is saved to STATE when
/// `state_mounted`.
pub fn load(root: &Path, state_mounted: bool) -> Result<Found, SourceError> {
    let candidates = [(Source::State, STATE_CONFIG), (Source::FwCfg, FW_CFG)];
    for (source, rel) in candidates {
        if source == Source::State && !state_mounted {
            continue;
        }
        let path = root.join(rel);
        let Some(text) = read_bounded(&path)? else {
            continue;
        };
        let config = MachineConfig::parse(&text).map_err(|e| SourceError::Invalid(source, e))?;
        if source == Source::FwCfg && state_mounted {
            let dest = root.join(STATE_CONFIG);
            crate::state::write_atomic(&dest, text.as_bytes())
                .map_err(|e| SourceError::Save(dest, e))?;
        }
        return Ok(Found::Config(source, Box::new(config)));
    }
    Ok(Found::None)
}

/// The file's text, None when it does not exist.
fn read_bounded(path: &Path) -> Result<Option<String>, SourceError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SourceError::Read(path.into(), e)),
        // fw_cfg files report size 0 in sysfs; the read below is bounded anyway.
        Ok(m) if m.len() > MAX_BYTES => return Err(SourceError::TooLarge(path.into())),
        Ok(_) => {}
    }
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| SourceError::Read(path.into(), e))?;
    if text.len() as u64 > MAX_BYTES {
        return Err(SourceError::TooLarge(path.into()));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "version = 1\n[node]\nhostname = \"w1\"\n[api]\nca = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\ncert = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\nkey = \"-----BEGIN PRIVATE KEY-----\\nAA==\\n-----END PRIVATE KEY-----\\n\"\n";

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    #[test]
    fn fw_cfg_config_is_used_and_saved_to_state_then_state_wins() {
        let d = tempfile::tempdir().expect("tempdir");
        put(d.path(), FW_CFG, GOOD);
        assert!(matches!(
            load(d.path(), true),
            Ok(Found::Config(Source::FwCfg, _))
        ));
        assert_eq!(
            std::fs::read_to_string(d.path().join(STATE_CONFIG)).expect("saved"),
            GOOD
        );
        put(d.path(), FW_CFG, "garbage that would fail");
        assert!(matches!(
            load(d.path(), true),
            Ok(Found::Config(Source::State, _))
        ));
    }

    #[test]
    fn without_state_fw_cfg_is_read_but_not_saved() {
        let d = tempfile::tempdir().expect("tempdir");
        put(d.path(), FW_CFG, GOOD);
        assert!(matches!(
            load(d.path(), false),
            Ok(Found::Config(Source::FwCfg, _))
        ));
        assert!(!d.path().join(STATE_CONFIG).exists());
    }

    #[test]
    fn a_malformed_config_names_the_source_and_the_key_and_is_not_saved() {
        let d = tempfile::tempdir().expect("tempdir");
        put(
            d.path(),
            FW_CFG,
            &GOOD.replace("[node]\n", "[node]\nsurprise = 1\n"),
        );
        let err = match load(d.path(), true) {
            Err(e) => e,
            Ok(_) => panic!("a malformed config was accepted"),
        };
        let text = crate::console::chain(&err);
        assert!(
            text.contains("fw_cfg") && text.contains("node.surprise"),
            "{text}"
        );
        assert!(!d.path().join(STATE_CONFIG).exists());
    }

    #[test]
    fn no_source_is_none_and_an_oversized_one_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(matches!(load(d.path(), true), Ok(Found::None)));
        put(d.path(), FW_CFG, &"#".repeat(MAX_BYTES as usize + 10));
        assert!(matches!(
            load(d.path(), true),
            Err(SourceError::TooLarge(_))
        ));
    }
}
