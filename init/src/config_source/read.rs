//! Reading one config source: bounded reads, base64 on the command line, parsing, and
//! saving what was found to STATE. The order the sources are asked in is the parent
//! module's.

use super::Source;
use crate::net::metadata::{Item, Metadata};
use basalt_api::config::{ConfigError, MachineConfig};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine};
use std::path::{Path, PathBuf};

/// On STATE (mounted on /var), relative to the root.
pub const STATE_CONFIG: &str = "var/lib/basalt/config.toml";
/// QEMU's fw_cfg entry as the `qemu_fw_cfg` module exposes it, relative to the root.
pub const FW_CFG: &str = basalt_api::layout::fw_cfg::CONFIG_SYSFS;
/// Largest config accepted from any source.
pub const MAX_BYTES: u64 = basalt_api::config::MAX_BYTES;
/// The kernel's command line, relative to the root.
pub const CMDLINE: &str = "proc/cmdline";
/// The command-line parameter that carries a config: the TOML in base64, either the
/// standard alphabet (RFC 4648 §4) or the URL-safe one (§5), padding optional.
pub const CMDLINE_PARAM: &str = "basalt.config";
/// The kernel caps its command line at a few KiB (2 KiB by default on x86); this only
/// bounds what a broken or fake /proc could hand us.
const CMDLINE_MAX_BYTES: u64 = 64 * 1024;
// So a config that fits on the command line, decoded, always fits MAX_BYTES.
const _: () = assert!(CMDLINE_MAX_BYTES / 4 * 3 <= MAX_BYTES);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is larger than {1} bytes")]
    TooLarge(PathBuf, u64),
    #[error("machine config from {} is larger than {MAX_BYTES} bytes", .0.name())]
    SourceTooLarge(Source),
    #[error("{} is not base64", .0.name())]
    NotBase64(Source, #[source] base64::DecodeError),
    #[error("machine config from {} is not UTF-8", .0.name())]
    NotUtf8(Source),
    #[error("machine config from {}", .0.name())]
    Invalid(Source, #[source] ConfigError),
    /// `[cluster]` holds the join token, and every process on the node can read the
    /// kernel command line (`/proc/cmdline`).
    #[error("machine config from {} has a [cluster]: refused, since every process on the node can read the kernel command line (/proc/cmdline) and with it the join token; pass [cluster] in fw_cfg, Hetzner user-data or with `basalt node apply` (only [api], [node] and [network] may come from the command line)", Source::Cmdline.name())]
    ClusterOnCmdline,
    /// The source is there but its content could not be had (the metadata service's
    /// user-data failed while its other items answered).
    #[error("machine config from {}: {}", .0.name(), .1)]
    Unavailable(Source, String),
    #[error("save the machine config to {0}")]
    Save(PathBuf, #[source] std::io::Error),
}

impl SourceError {
    /// The source the error is about; None for a file read or save, which the path names.
    pub fn source_of(&self) -> Option<Source> {
        match self {
            SourceError::SourceTooLarge(s)
            | SourceError::NotBase64(s, _)
            | SourceError::NotUtf8(s)
            | SourceError::Invalid(s, _)
            | SourceError::Unavailable(s, _) => Some(*s),
            SourceError::ClusterOnCmdline => Some(Source::Cmdline),
            SourceError::Read(..) | SourceError::TooLarge(..) | SourceError::Save(..) => None,
        }
    }
}

/// The outcome of looking: no config at all, or one source, what it held, and why it
/// could not be saved to STATE when it could not (the config is used all the same).
pub enum Found {
    None,
    Config(Source, Box<MachineConfig>, Option<SourceError>),
}

/// Reads one source: STATE (only when `state_mounted`), fw_cfg or the kernel command
/// line; a config found outside STATE is saved there when `state_mounted`. The metadata
/// service's user-data is read by [`from_metadata`] (it needs the network); here it is
/// always [`Found::None`].
pub fn read(root: &Path, source: Source, state_mounted: bool) -> Result<Found, SourceError> {
    let rel = match source {
        Source::State if state_mounted => STATE_CONFIG,
        Source::FwCfg => FW_CFG,
        Source::Cmdline => return from_cmdline(root, state_mounted),
        Source::State | Source::Metadata => return Ok(Found::None),
    };
    match read_bounded(&root.join(rel))? {
        Some(text) => accept(root, source, &text, state_mounted),
        None => Ok(Found::None),
    }
}

/// The config in the server's user-data, saved to STATE when `state_mounted`; None when
/// the user-data is absent or blank.
pub fn from_metadata(
    root: &Path,
    meta: &Metadata,
    state_mounted: bool,
) -> Result<Found, SourceError> {
    let Some(text) = meta.userdata.as_deref().filter(|u| !u.trim().is_empty()) else {
        return match meta.failure(Item::Userdata) {
            Some(why) => Err(SourceError::Unavailable(Source::Metadata, why.to_owned())),
            None => Ok(Found::None),
        };
    };
    if text.len() as u64 > MAX_BYTES {
        return Err(SourceError::SourceTooLarge(Source::Metadata));
    }
    accept(root, Source::Metadata, text, state_mounted)
}

/// The config in `basalt.config=` on the kernel command line (the last one wins, as
/// for every basalt parameter), saved to STATE when `state_mounted`; None without it.
pub fn from_cmdline(root: &Path, state_mounted: bool) -> Result<Found, SourceError> {
    let path = root.join(CMDLINE);
    let cmdline = match read_bounded_to(&path, CMDLINE_MAX_BYTES)? {
        Some(c) => c,
        None => return Ok(Found::None),
    };
    let Some(encoded) = cmdline_value(&cmdline) else {
        return Ok(Found::None);
    };
    let source = Source::Cmdline;
    let bytes = decode_base64(encoded).map_err(|e| SourceError::NotBase64(source, e))?;
    let text = String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8(source))?;
    accept(root, source, &text, state_mounted)
}

/// Parses a config found in `source` and, unless it came from STATE, saves it there. A
/// config whose save failed (STATE full or read-only) is still the config: the failure
/// comes with it, to be reported as a warning.
fn accept(
    root: &Path,
    source: Source,
    text: &str,
    state_mounted: bool,
) -> Result<Found, SourceError> {
    let config = MachineConfig::parse(text).map_err(|e| SourceError::Invalid(source, e))?;
    if source == Source::Cmdline && config.cluster.is_some() {
        return Err(SourceError::ClusterOnCmdline);
    }
    let mut unsaved = None;
    if source != Source::State && state_mounted {
        let dest = root.join(STATE_CONFIG);
        // The config holds the API key and the join token: 0600.
        if let Err(e) = crate::atomic_file::write_mode(&dest, text.as_bytes(), 0o600) {
            unsaved = Some(SourceError::Save(dest, e));
        }
    }
    Ok(Found::Config(source, Box::new(config), unsaved))
}

/// The value of the last `basalt.config=` word; the kernel lets a value be quoted.
fn cmdline_value(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == CMDLINE_PARAM)
        .map(|(_, v)| v.trim_matches('"'))
        .next_back()
        .filter(|v| !v.is_empty())
}

fn decode_base64(encoded: &str) -> Result<Vec<u8>, base64::DecodeError> {
    const LENIENT: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    // The two alphabets differ only in `+/` against `-_`: either pair tells which.
    let alphabet = if encoded.contains(['-', '_']) {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    GeneralPurpose::new(alphabet, LENIENT).decode(encoded)
}

/// The file's text, None when it does not exist.
fn read_bounded(path: &Path) -> Result<Option<String>, SourceError> {
    read_bounded_to(path, MAX_BYTES)
}

fn read_bounded_to(path: &Path, max: u64) -> Result<Option<String>, SourceError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SourceError::Read(path.into(), e)),
        // fw_cfg and procfs files report size 0; the read below is bounded anyway.
        Ok(m) if m.len() > max => return Err(SourceError::TooLarge(path.into(), max)),
        Ok(_) => {}
    }
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_string(&mut text))
        .map_err(|e| SourceError::Read(path.into(), e))?;
    if text.len() as u64 > max {
        return Err(SourceError::TooLarge(path.into(), max));
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
    fn fw_cfg_config_is_used_and_saved_to_state_for_the_next_boot() {
        let d = tempfile::tempdir().expect("tempdir");
        put(d.path(), FW_CFG, GOOD);
        assert!(matches!(
            read(d.path(), Source::FwCfg, true),
            Ok(Found::Config(Source::FwCfg, _, None))
        ));
        assert_eq!(
            std::fs::read_to_string(d.path().join(STATE_CONFIG)).expect("saved"),
            GOOD
        );
        // It holds the API key and the join token: owner only.
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join(STATE_CONFIG))
                .expect("stat")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            read(d.path(), Source::State, true),
            Ok(Found::Config(Source::State, _, None))
        ));
    }

    #[test]
    fn without_state_fw_cfg_is_read_but_not_saved() {
        let d = tempfile::tempdir().expect("tempdir");
        put(d.path(), FW_CFG, GOOD);
        assert!(matches!(
            read(d.path(), Source::FwCfg, false),
            Ok(Found::Config(Source::FwCfg, _, None))
        ));
        assert!(!d.path().join(STATE_CONFIG).exists());
        // Nor is a STATE that is not mounted read (the file is the image's, not STATE's).
        put(d.path(), STATE_CONFIG, GOOD);
        assert!(matches!(
            read(d.path(), Source::State, false),
            Ok(Found::None)
        ));
    }

    #[test]
    fn a_malformed_config_names_the_source_and_the_key_and_is_not_saved() {
        let d = tempfile::tempdir().expect("tempdir");
        put(
            d.path(),
            FW_CFG,
            &GOOD.replace("[node]\n", "[node]\nsurprise = 1\n"),
        );
        let err = match read(d.path(), Source::FwCfg, true) {
            Err(e) => e,
            Ok(_) => panic!("a malformed config was accepted"),
        };
        let text = crate::pid1::console::chain(&err);
        assert!(
            text.contains("fw_cfg") && text.contains("node.surprise"),
            "{text}"
        );
        assert!(!d.path().join(STATE_CONFIG).exists());
    }

    #[test]
    fn no_source_is_none_and_an_oversized_one_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        for source in [
            Source::State,
            Source::FwCfg,
            Source::Metadata,
            Source::Cmdline,
        ] {
            assert!(matches!(read(d.path(), source, true), Ok(Found::None)));
        }
        put(d.path(), FW_CFG, &"#".repeat(MAX_BYTES as usize + 10));
        assert!(matches!(
            read(d.path(), Source::FwCfg, true),
            Err(SourceError::TooLarge(_, MAX_BYTES))
        ));
    }
    fn meta(userdata: Option<&str>) -> Metadata {
        Metadata {
            hostname: "w1".into(),
            instance_id: Some(1),
            public_ipv4: None,
            ipv6: None,
            userdata: userdata.map(str::to_owned),
            failed: vec![],
        }
    }

    fn standard_b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn metadata_userdata_is_used_and_saved_to_state() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            from_metadata(d.path(), &meta(Some(GOOD)), true),
            Ok(Found::Config(Source::Metadata, _, None))
        ));
        assert_eq!(
            std::fs::read_to_string(d.path().join(STATE_CONFIG)).expect("saved"),
            GOOD
        );
        // And the next boot takes it from STATE.
        assert!(matches!(
            read(d.path(), Source::State, true),
            Ok(Found::Config(Source::State, _, None))
        ));
    }

    #[test]
    fn absent_or_blank_userdata_is_none_and_nothing_is_saved() {
        let d = tempfile::tempdir().expect("tempdir");
        for userdata in [None, Some(""), Some(" \n\t")] {
            assert!(matches!(
                from_metadata(d.path(), &meta(userdata), true),
                Ok(Found::None)
            ));
        }
        assert!(!d.path().join(STATE_CONFIG).exists());
    }

    #[test]
    fn bad_or_oversized_userdata_names_the_source_and_is_not_saved() {
        let d = tempfile::tempdir().expect("tempdir");
        let bad = GOOD.replace("[node]\n", "[node]\nsurprise = 1\n");
        let err = match from_metadata(d.path(), &meta(Some(&bad)), true) {
            Err(e) => e,
            Ok(_) => panic!("a malformed config was accepted"),
        };
        let text = crate::pid1::console::chain(&err);
        assert!(
            text.contains("Hetzner metadata userdata") && text.contains("node.surprise"),
            "{text}"
        );
        let huge = format!("{GOOD}#{}", "x".repeat(MAX_BYTES as usize));
        assert!(matches!(
            from_metadata(d.path(), &meta(Some(&huge)), true),
            Err(SourceError::SourceTooLarge(Source::Metadata))
        ));
        assert!(!d.path().join(STATE_CONFIG).exists());
    }

    #[test]
    fn metadata_without_state_is_used_but_not_saved() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            from_metadata(d.path(), &meta(Some(GOOD)), false),
            Ok(Found::Config(Source::Metadata, _, None))
        ));
        assert!(!d.path().join(STATE_CONFIG).exists());
    }

    #[test]
    fn cmdline_config_in_either_alphabet_is_used_and_saved() {
        // '?' and '>' are the bytes that make the two alphabets differ.
        let text = format!("{GOOD}# ??>>\n");
        let standard = standard_b64(&text);
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&text);
        assert!(standard.contains(['+', '/']) && url_safe.contains(['-', '_']));
        for (i, encoded) in [standard, url_safe.clone(), format!("\"{url_safe}\"")]
            .into_iter()
            .enumerate()
        {
            let d = tempfile::tempdir().expect("tempdir");
            put(
                d.path(),
                CMDLINE,
                &format!("BOOT_IMAGE=/vmlinuz basalt.slot=a {CMDLINE_PARAM}={encoded} quiet\n"),
            );
            assert!(
                matches!(
                    from_cmdline(d.path(), true),
                    Ok(Found::Config(Source::Cmdline, _, None))
                ),
                "case {i}"
            );
            assert_eq!(
                std::fs::read_to_string(d.path().join(STATE_CONFIG)).expect("saved"),
                text,
                "case {i}"
            );
        }
    }

    #[test]
    fn the_last_cmdline_parameter_wins() {
        let d = tempfile::tempdir().expect("tempdir");
        put(
            d.path(),
            CMDLINE,
            &format!("{CMDLINE_PARAM}=!!! {CMDLINE_PARAM}={}", standard_b64(GOOD)),
        );
        assert!(matches!(
            from_cmdline(d.path(), false),
            Ok(Found::Config(Source::Cmdline, _, None))
        ));
        assert!(!d.path().join(STATE_CONFIG).exists());
    }

    #[test]
    fn no_cmdline_or_no_parameter_is_none() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(matches!(from_cmdline(d.path(), true), Ok(Found::None)));
        put(
            d.path(),
            CMDLINE,
            "basalt.slot=a basalt.configx=AAAA basalt.config=\n",
        );
        assert!(matches!(from_cmdline(d.path(), true), Ok(Found::None)));
    }

    #[test]
    fn bad_cmdline_configs_name_the_parameter() {
        let bad_toml = standard_b64(&GOOD.replace("[node]\n", "[node]\nsurprise = 1\n"));
        let not_utf8 = base64::engine::general_purpose::STANDARD.encode([0xff, 0xfe, 0x00]);
        let huge = standard_b64(&"#".repeat(MAX_BYTES as usize + 1));
        type Check = fn(&SourceError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("not*base64", |e| {
                matches!(e, SourceError::NotBase64(Source::Cmdline, _))
            }),
            (&bad_toml, |e| {
                matches!(e, SourceError::Invalid(Source::Cmdline, _))
            }),
            (&not_utf8, |e| {
                matches!(e, SourceError::NotUtf8(Source::Cmdline))
            }),
        ];
        for (encoded, expected) in cases {
            let d = tempfile::tempdir().expect("tempdir");
            put(d.path(), CMDLINE, &format!("{CMDLINE_PARAM}={encoded}"));
            let err = match from_cmdline(d.path(), true) {
                Err(e) => e,
                Ok(_) => panic!("{encoded}: accepted"),
            };
            assert!(expected(&err), "{encoded}: {err:?}");
            let text = crate::pid1::console::chain(&err);
            assert!(text.contains("kernel command line basalt.config"), "{text}");
            assert!(!d.path().join(STATE_CONFIG).exists());
        }
        // A command line longer than any kernel allows is refused before decoding.
        let d = tempfile::tempdir().expect("tempdir");
        put(d.path(), CMDLINE, &format!("{CMDLINE_PARAM}={huge}"));
        assert!(matches!(
            from_cmdline(d.path(), true),
            Err(SourceError::TooLarge(_, CMDLINE_MAX_BYTES))
        ));
    }

    #[test]
    fn a_large_cmdline_config_within_the_bound_is_accepted() {
        let d = tempfile::tempdir().expect("tempdir");
        let text = format!("{GOOD}#{}", "x".repeat(40 * 1024));
        put(
            d.path(),
            CMDLINE,
            &format!("{CMDLINE_PARAM}={}", standard_b64(&text)),
        );
        assert!(matches!(
            from_cmdline(d.path(), true),
            Ok(Found::Config(Source::Cmdline, _, None))
        ));
    }

    /// A config with a `[cluster]`; its token's password is what must not leak.
    fn with_cluster() -> String {
        format!(
            "{GOOD}[cluster]\nserver = \"https://10.0.0.1:6443\"\ntoken = \"K10{}::server:s3cretpassword\"\n",
            "ab".repeat(32)
        )
    }

    #[test]
    fn a_cluster_on_the_command_line_is_refused_clearly_and_not_saved() {
        let d = tempfile::tempdir().expect("tempdir");
        // The same config parses: only the command line refuses it.
        assert!(MachineConfig::parse(&with_cluster()).is_ok());
        put(
            d.path(),
            CMDLINE,
            &format!("{CMDLINE_PARAM}={}", standard_b64(&with_cluster())),
        );
        let err = match from_cmdline(d.path(), true) {
            Err(e) => e,
            Ok(_) => panic!("a [cluster] from the command line was accepted"),
        };
        assert!(matches!(err, SourceError::ClusterOnCmdline), "{err:?}");
        assert_eq!(err.source_of(), Some(Source::Cmdline));
        let text = crate::pid1::console::chain(&err);
        for part in [
            "kernel command line",
            "[cluster]",
            "/proc/cmdline",
            "join token",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(!text.contains("s3cretpassword"), "{text}");
        assert!(!d.path().join(STATE_CONFIG).exists());
        // The same config through fw_cfg is fine.
        put(d.path(), FW_CFG, &with_cluster());
        assert!(matches!(
            read(d.path(), Source::FwCfg, true),
            Ok(Found::Config(Source::FwCfg, _, None))
        ));
    }

    #[test]
    fn a_config_that_cannot_be_saved_is_used_and_says_why() {
        let d = tempfile::tempdir().expect("tempdir");
        // STATE's folder for the config is a file: the save fails (even for root).
        put(d.path(), "var/lib/basalt", "not a folder");
        put(d.path(), FW_CFG, GOOD);
        put(
            d.path(),
            CMDLINE,
            &format!("{CMDLINE_PARAM}={}", standard_b64(GOOD)),
        );
        let meta = meta(Some(GOOD));
        let found = [
            read(d.path(), Source::FwCfg, true),
            from_cmdline(d.path(), true),
            from_metadata(d.path(), &meta, true),
        ];
        for (found, expected) in
            found
                .into_iter()
                .zip([Source::FwCfg, Source::Cmdline, Source::Metadata])
        {
            match found {
                Ok(Found::Config(source, config, Some(why))) => {
                    assert_eq!(source, expected);
                    assert_eq!(
                        config.node.hostname.as_ref().map(|h| h.as_str()),
                        Some("w1")
                    );
                    let text = crate::pid1::console::chain(&why);
                    assert!(
                        text.contains("save the machine config to") && text.contains(STATE_CONFIG),
                        "{text}"
                    );
                }
                Ok(Found::Config(_, _, None)) => panic!("{expected:?}: saved into a file?"),
                Ok(Found::None) => panic!("{expected:?}: not found"),
                Err(e) => panic!("{expected:?}: {}", crate::pid1::console::chain(&e)),
            }
        }
    }

    #[test]
    fn userdata_the_service_failed_to_give_is_a_reason_not_an_absence() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut m = meta(None);
        m.failed.push((
            Item::Userdata,
            "GET http://169.254.169.254/hetzner/v1/userdata: HTTP status 403".into(),
        ));
        let err = match from_metadata(d.path(), &m, true) {
            Err(e) => e,
            Ok(_) => panic!("failed user-data was taken as none"),
        };
        assert_eq!(err.source_of(), Some(Source::Metadata));
        let text = crate::pid1::console::chain(&err);
        assert!(text.contains("userdata: HTTP status 403"), "{text}");
        // Another item's failure says nothing about the user-data.
        let mut m = meta(None);
        m.failed.push((Item::NetworkConfig, "bad".into()));
        assert!(matches!(from_metadata(d.path(), &m, true), Ok(Found::None)));
    }
}
