//! Where the machine config comes from, first found wins: STATE (what was applied
//! before) → QEMU fw_cfg `opt/basalt/config` → Hetzner metadata user-data → the kernel
//! command line (`basalt.config=`) → none. A source that is present but invalid is
//! reported, on the console and in the node API's status ([`Chosen::rejected`]), and the
//! next one is tried. A config first read from any source but STATE is written to STATE,
//! so later boots do not depend on the hypervisor passing it again; when that write fails
//! (STATE full or read-only) the config is used all the same, with a warning
//! ([`Chosen::warnings`]). The command line may not carry a `[cluster]`: every process
//! can read `/proc/cmdline`, and the join token with it.
//!
//! The network sits in the middle of that order: the metadata service needs it, and the
//! network wants the config's `[network]`. So [`choose`] reads the local sources, starts
//! the network with what they gave, and only then asks the metadata service (on Hetzner
//! only) and, after it, the command line. Off Hetzner the command line is read before the
//! network starts, since nothing remote comes before it. A config that arrives after the
//! network started adds its static addresses and DNS then; metadata adds the hostname
//! and IPv6. That rule lives here and nowhere else; [`read`] reads one source.

mod read;

pub use read::{
    from_cmdline, from_metadata, read, Found, SourceError, CMDLINE, CMDLINE_PARAM, FW_CFG,
    MAX_BYTES, STATE_CONFIG,
};

use crate::net::metadata::Metadata;
use crate::pid1::console;
use basalt_api::config::MachineConfig;

/// The places a machine config can come from, in the order they are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    State,
    FwCfg,
    Metadata,
    Cmdline,
}

impl Source {
    /// The source as the console names it.
    pub fn name(self) -> &'static str {
        match self {
            Source::State => basalt_api::layout::Partition::State.name(),
            Source::FwCfg => basalt_api::layout::fw_cfg::CONFIG_LABEL,
            Source::Metadata => "Hetzner metadata userdata",
            Source::Cmdline => "kernel command line basalt.config",
        }
    }

    /// The source as the node API names it.
    pub fn key(self) -> &'static str {
        match self {
            Source::State => "state",
            Source::FwCfg => "fw_cfg",
            Source::Metadata => "metadata",
            Source::Cmdline => "cmdline",
        }
    }
}

/// The config that won and where it came from.
#[derive(Debug)]
pub struct Chosen {
    pub source: Source,
    pub config: MachineConfig,
    /// The sources asked before it that were present but not used, in order.
    pub rejected: Vec<Rejected>,
    /// What went wrong with the config in use (it could not be saved to STATE).
    pub warnings: Vec<String>,
}

/// A source that was present but not used, and why (the error chain, never the
/// config's text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub source: Source,
    pub reason: String,
}

/// What [`choose`] needs of the node besides the sources' files; the real node in stage 2,
/// a recording fake in the tests. Each method reports its own failures.
pub trait Sources {
    /// `/` on a node; where the sources' files are found.
    fn root(&self) -> &std::path::Path;
    /// Without STATE, STATE is not read and nothing is saved to it.
    fn state_mounted(&self) -> bool;
    /// A Hetzner Cloud server, where the metadata service answers.
    fn on_hetzner(&mut self) -> bool;
    /// Sets the hostname and starts the network with the config found so far; once.
    fn start_network(&mut self, config: Option<&MachineConfig>);
    /// The metadata service's answer once the network is up; None when it cannot be had.
    fn fetch_metadata(&mut self) -> Option<Metadata>;
    /// The static part (addresses, routes, DNS) of a config that arrived after the
    /// network started.
    fn apply_static_network(&mut self, config: &MachineConfig);
    /// What the metadata adds: the hostname when none was set, IPv6 unless the config
    /// turns it off.
    fn apply_metadata(&mut self, meta: &Metadata, config: Option<&MachineConfig>);
    /// A source was present but invalid; the next one is tried.
    fn rejected(&mut self, err: &SourceError);
}

/// Finds the machine config, first valid source wins, and brings the network up on the
/// way (the module's docs say why the two are interleaved). None: standby without an API.
pub fn choose(node: &mut dyn Sources) -> Option<Chosen> {
    let hetzner = node.on_hetzner();
    let mut rejected = Vec::new();
    let mut chosen = first_valid(node, &[Source::State, Source::FwCfg], None, &mut rejected);
    if chosen.is_none() {
        console::info("machine config: none in STATE or fw_cfg");
        // No metadata service to come before it: the command line is local here.
        if !hetzner {
            chosen = first_valid(node, &[Source::Cmdline], None, &mut rejected);
        }
    }
    node.start_network(chosen.as_ref().map(|c| &c.config));
    if hetzner {
        let meta = node.fetch_metadata();
        if chosen.is_none() {
            chosen = first_valid(
                node,
                &[Source::Metadata, Source::Cmdline],
                meta.as_ref(),
                &mut rejected,
            );
            // The network started without it: its static part comes now.
            if let Some(c) = &chosen {
                node.apply_static_network(&c.config);
            }
        }
        if let Some(m) = &meta {
            node.apply_metadata(m, chosen.as_ref().map(|c| &c.config));
        }
    }
    if let Some(c) = &mut chosen {
        c.rejected = rejected;
    }
    chosen
}

/// The first of `sources` that holds a valid config; an invalid one is reported, added
/// to `rejected` and passed over.
fn first_valid(
    node: &mut dyn Sources,
    sources: &[Source],
    meta: Option<&Metadata>,
    rejected: &mut Vec<Rejected>,
) -> Option<Chosen> {
    for &source in sources {
        let found = match (source, meta) {
            (Source::Metadata, Some(m)) => from_metadata(node.root(), m, node.state_mounted()),
            (Source::Metadata, None) => Ok(Found::None),
            _ => read(node.root(), source, node.state_mounted()),
        };
        match found {
            Ok(Found::None) => {}
            Ok(Found::Config(source, config, unsaved)) => {
                let what = if config.is_standby() {
                    "no [cluster], standby"
                } else {
                    "[cluster] present, joining"
                };
                console::info(&format!("machine config from {}: {what}", source.name()));
                let warnings = unsaved
                    .map(|e| {
                        let line = format!(
                            "machine config from {} is used, but not kept for the next boot: {}",
                            source.name(),
                            console::chain(&e)
                        );
                        console::warn(&line);
                        line
                    })
                    .into_iter()
                    .collect();
                return Some(Chosen {
                    source,
                    config: *config,
                    rejected: Vec::new(),
                    warnings,
                });
            }
            Err(e) => {
                node.rejected(&e);
                rejected.push(Rejected {
                    source,
                    reason: console::chain(&e),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::metadata::Item;
    use base64::Engine as _;
    use std::path::{Path, PathBuf};

    /// A standby config whose hostname says where it came from.
    fn config(host: &str) -> String {
        format!(
            "version = 1\n[node]\nhostname = \"{host}\"\n[api]\nca = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\ncert = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\\n\"\nkey = \"-----BEGIN PRIVATE KEY-----\\nAA==\\n-----END PRIVATE KEY-----\\n\"\n"
        )
    }

    /// A joining config: with a `[cluster]`.
    fn with_cluster(host: &str) -> String {
        format!(
            "{}[cluster]\nserver = \"https://10.0.0.1:6443\"\ntoken = \"K10{}::server:secret\"\n",
            config(host),
            "ab".repeat(32)
        )
    }

    /// Present but invalid: a key the schema does not know.
    fn invalid(host: &str) -> String {
        config(host).replace("[node]\n", "[node]\nsurprise = 1\n")
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        /// The hostname of the config the network started with.
        StartNetwork(Option<String>),
        FetchMetadata,
        ApplyStaticNetwork(Option<String>),
        ApplyMetadata(Option<String>),
        Rejected(Source),
    }

    fn host(config: &MachineConfig) -> Option<String> {
        config.node.hostname.as_ref().map(|h| h.as_str().to_owned())
    }

    struct Fake {
        root: tempfile::TempDir,
        state_mounted: bool,
        hetzner: bool,
        /// User-data of the metadata service; None: the service cannot be reached.
        userdata: Option<Option<String>>,
        /// The metadata items the service failed to give.
        meta_failed: Vec<(Item, String)>,
        calls: Vec<Call>,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                root: tempfile::tempdir().expect("tempdir"),
                state_mounted: true,
                hetzner: false,
                userdata: None,
                meta_failed: Vec::new(),
                calls: Vec::new(),
            }
        }

        fn put(&self, rel: &str, text: &str) -> PathBuf {
            let p = self.root.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write");
            p
        }

        fn cmdline(&self, text: &str) {
            let encoded = base64::engine::general_purpose::STANDARD.encode(text);
            self.put(
                CMDLINE,
                &format!("console=ttyS0 {CMDLINE_PARAM}={encoded}\n"),
            );
        }

        /// Chooses; returns the winner's source and hostname.
        fn choose(&mut self) -> Option<(Source, Option<String>)> {
            choose(self).map(|c| (c.source, host(&c.config)))
        }
    }

    impl Sources for Fake {
        fn root(&self) -> &Path {
            self.root.path()
        }
        fn state_mounted(&self) -> bool {
            self.state_mounted
        }
        fn on_hetzner(&mut self) -> bool {
            self.hetzner
        }
        fn start_network(&mut self, config: Option<&MachineConfig>) {
            self.calls.push(Call::StartNetwork(config.and_then(host)));
        }
        fn fetch_metadata(&mut self) -> Option<Metadata> {
            self.calls.push(Call::FetchMetadata);
            let userdata = self.userdata.clone()?;
            Some(Metadata {
                hostname: "from-metadata".into(),
                instance_id: Some(1),
                public_ipv4: None,
                ipv6: None,
                userdata,
                failed: self.meta_failed.clone(),
            })
        }
        fn apply_static_network(&mut self, config: &MachineConfig) {
            self.calls.push(Call::ApplyStaticNetwork(host(config)));
        }
        fn apply_metadata(&mut self, _: &Metadata, config: Option<&MachineConfig>) {
            self.calls.push(Call::ApplyMetadata(config.and_then(host)));
        }
        fn rejected(&mut self, err: &SourceError) {
            let source = err
                .source_of()
                .unwrap_or_else(|| panic!("unexpected error {err:?}"));
            self.calls.push(Call::Rejected(source));
        }
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn the_first_source_present_wins_in_order() {
        // Every source holds a config; each step takes the winner away.
        let mut f = Fake::new();
        f.hetzner = true;
        f.put(STATE_CONFIG, &config("state"));
        f.put(FW_CFG, &config("fw-cfg"));
        f.userdata = Some(Some(config("metadata")));
        f.cmdline(&config("cmdline"));
        let expected = [
            (STATE_CONFIG, Source::State, "state"),
            (FW_CFG, Source::FwCfg, "fw-cfg"),
            ("", Source::Metadata, "metadata"),
            ("", Source::Cmdline, "cmdline"),
        ];
        for (remove_after, source, hostname) in expected {
            // Whatever won was saved to STATE: clear it to see the next source.
            let _ = std::fs::remove_file(f.root.path().join(STATE_CONFIG));
            if source == Source::State {
                f.put(STATE_CONFIG, &config("state"));
            }
            assert_eq!(f.choose(), Some((source, some(hostname))), "{source:?}");
            if !remove_after.is_empty() {
                std::fs::remove_file(f.root.path().join(remove_after)).expect("rm");
            }
            if source == Source::Metadata {
                f.userdata = Some(None);
            }
        }
        let _ = std::fs::remove_file(f.root.path().join(STATE_CONFIG));
        std::fs::remove_file(f.root.path().join(CMDLINE)).expect("rm");
        assert_eq!(f.choose(), None);
    }

    #[test]
    fn a_present_but_invalid_source_is_reported_and_the_next_one_tried() {
        let mut f = Fake::new();
        f.put(STATE_CONFIG, &invalid("state"));
        f.put(FW_CFG, &invalid("fw-cfg"));
        f.cmdline(&config("cmdline"));
        assert_eq!(f.choose(), Some((Source::Cmdline, some("cmdline"))));
        assert_eq!(
            f.calls,
            [
                Call::Rejected(Source::State),
                Call::Rejected(Source::FwCfg),
                Call::StartNetwork(some("cmdline")),
            ]
        );
        // The valid config replaced the invalid one on STATE.
        let saved = std::fs::read_to_string(f.root.path().join(STATE_CONFIG)).expect("read");
        assert_eq!(saved, config("cmdline"));
    }

    #[test]
    fn off_hetzner_the_command_line_comes_before_the_network_and_no_metadata_is_asked() {
        let mut f = Fake::new();
        f.userdata = Some(Some(config("metadata")));
        f.cmdline(&config("cmdline"));
        assert_eq!(f.choose(), Some((Source::Cmdline, some("cmdline"))));
        assert_eq!(f.calls, [Call::StartNetwork(some("cmdline"))]);
    }

    #[test]
    fn on_hetzner_remote_configs_come_after_the_network_and_add_their_static_part() {
        let mut f = Fake::new();
        f.hetzner = true;
        f.userdata = Some(Some(invalid("metadata")));
        f.cmdline(&config("cmdline"));
        assert_eq!(f.choose(), Some((Source::Cmdline, some("cmdline"))));
        assert_eq!(
            f.calls,
            [
                Call::StartNetwork(None),
                Call::FetchMetadata,
                Call::Rejected(Source::Metadata),
                Call::ApplyStaticNetwork(some("cmdline")),
                Call::ApplyMetadata(some("cmdline")),
            ]
        );
    }

    #[test]
    fn on_hetzner_a_local_config_starts_the_network_and_metadata_only_adds_to_it() {
        let mut f = Fake::new();
        f.hetzner = true;
        f.put(FW_CFG, &config("fw-cfg"));
        f.userdata = Some(Some(config("metadata")));
        assert_eq!(f.choose(), Some((Source::FwCfg, some("fw-cfg"))));
        assert_eq!(
            f.calls,
            [
                Call::StartNetwork(some("fw-cfg")),
                Call::FetchMetadata,
                Call::ApplyMetadata(some("fw-cfg")),
            ]
        );
    }

    #[test]
    fn on_hetzner_without_metadata_the_command_line_is_still_read() {
        let mut f = Fake::new();
        f.hetzner = true;
        f.userdata = None;
        f.cmdline(&config("cmdline"));
        assert_eq!(f.choose(), Some((Source::Cmdline, some("cmdline"))));
        assert_eq!(
            f.calls,
            [
                Call::StartNetwork(None),
                Call::FetchMetadata,
                Call::ApplyStaticNetwork(some("cmdline")),
            ]
        );
    }

    #[test]
    fn without_state_mounted_state_is_not_read_and_nothing_is_saved() {
        let mut f = Fake::new();
        f.state_mounted = false;
        f.put(STATE_CONFIG, &config("state"));
        f.put(FW_CFG, &config("fw-cfg"));
        assert_eq!(f.choose(), Some((Source::FwCfg, some("fw-cfg"))));
        let kept = std::fs::read_to_string(f.root.path().join(STATE_CONFIG)).expect("read");
        assert_eq!(kept, config("state"));
    }

    #[test]
    fn the_sources_passed_over_and_why_come_with_the_config_that_won() {
        let mut f = Fake::new();
        f.put(STATE_CONFIG, &invalid("state"));
        f.put(FW_CFG, "version = 1\n[node\n");
        f.cmdline(&config("cmdline"));
        let chosen = choose(&mut f).expect("chosen");
        assert_eq!(chosen.source, Source::Cmdline);
        let sources: Vec<_> = chosen.rejected.iter().map(|r| r.source).collect();
        assert_eq!(sources, [Source::State, Source::FwCfg]);
        let (state, fw_cfg) = (&chosen.rejected[0].reason, &chosen.rejected[1].reason);
        assert!(
            state.contains("STATE") && state.contains("node.surprise"),
            "{state}"
        );
        assert!(
            fw_cfg.contains("fw_cfg") && fw_cfg.contains("not valid TOML: line 2"),
            "{fw_cfg}"
        );
        assert_eq!(chosen.warnings, Vec::<String>::new());
        // The first source valid: nothing passed over.
        let chosen = choose(&mut f).expect("chosen");
        assert_eq!((chosen.source, chosen.rejected.len()), (Source::State, 0));
    }

    #[test]
    fn a_config_that_cannot_be_saved_is_used_with_a_warning() {
        let mut f = Fake::new();
        // The atomic write's temporary file cannot be made: a folder is in its way.
        f.put("var/lib/basalt/.config.toml.tmp/x", "");
        f.put(FW_CFG, &with_cluster("fw-cfg"));
        let chosen = choose(&mut f).expect("a valid config was thrown away");
        assert_eq!(chosen.source, Source::FwCfg);
        assert!(chosen.config.cluster.is_some());
        assert_eq!(chosen.rejected, []);
        assert_eq!(chosen.warnings.len(), 1, "{:?}", chosen.warnings);
        let w = &chosen.warnings[0];
        assert!(
            w.contains("fw_cfg")
                && w.contains("not kept for the next boot")
                && w.contains(STATE_CONFIG),
            "{w}"
        );
        assert_eq!(f.calls, [Call::StartNetwork(some("fw-cfg"))]);
    }

    #[test]
    fn a_cluster_on_the_command_line_is_refused_and_nothing_else_wins() {
        let mut f = Fake::new();
        f.cmdline(&with_cluster("cmdline"));
        assert_eq!(f.choose(), None);
        assert_eq!(
            f.calls,
            [Call::Rejected(Source::Cmdline), Call::StartNetwork(None),]
        );
        assert!(!f.root.path().join(STATE_CONFIG).exists());
        // [api], [node] and [network] alone still come from the command line.
        f.calls.clear();
        f.cmdline(&config("cmdline"));
        assert_eq!(f.choose(), Some((Source::Cmdline, some("cmdline"))));
    }

    #[test]
    fn on_hetzner_user_data_the_service_failed_to_give_falls_through_with_its_reason() {
        let mut f = Fake::new();
        f.hetzner = true;
        f.userdata = Some(None);
        f.meta_failed = vec![(Item::Userdata, "GET …/userdata: HTTP status 403".into())];
        f.cmdline(&config("cmdline"));
        let chosen = choose(&mut f).expect("chosen");
        assert_eq!(chosen.source, Source::Cmdline);
        assert_eq!(chosen.rejected.len(), 1);
        assert_eq!(chosen.rejected[0].source, Source::Metadata);
        assert!(
            chosen.rejected[0].reason.contains("HTTP status 403"),
            "{:?}",
            chosen.rejected
        );
        // A failed network-config leaves the user-data to win.
        let mut f = Fake::new();
        f.hetzner = true;
        f.userdata = Some(Some(config("metadata")));
        f.meta_failed = vec![(
            Item::NetworkConfig,
            "not a cloud-init network config".into(),
        )];
        f.cmdline(&config("cmdline"));
        assert_eq!(f.choose(), Some((Source::Metadata, some("metadata"))));
    }
}
