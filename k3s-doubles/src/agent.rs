//! The agent double's logic: its command line, the config it reads, and the lines it
//! prints. The binary (`k3s-agent-double`) only wires these to stdout and signals.

use std::fmt::Write as _;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::LINE_PREFIX;

/// The config file path from `k3s agent --config FILE` (or `-c FILE`, `--config=FILE`),
/// the only invocation the double accepts. `args` excludes the program name.
pub fn config_path(args: &[String]) -> Option<PathBuf> {
    match args {
        [agent, flag, path] if agent == "agent" && (flag == "--config" || flag == "-c") => {
            Some(path.into())
        }
        [agent, flag] if agent == "agent" => flag.strip_prefix("--config=").map(PathBuf::from),
        _ => None,
    }
}

/// Why the config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "the config is not JSON (this double reads the JSON subset of YAML basalt-init writes)"
    )]
    Syntax(#[source] serde_json::Error),
    #[error("the config is not a mapping")]
    NotAMapping,
    #[error("the config lacks `{0}`")]
    Missing(&'static str),
    #[error("`{0}` must be a string or a list of strings")]
    BadType(String),
}

/// What `k3s agent` would take from its `config.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub server: String,
    pub token: String,
    pub node_name: Option<String>,
    pub node_ip: Vec<String>,
    pub node_label: Vec<String>,
    pub node_taint: Vec<String>,
    /// Keys the double does not read, reported so a test sees them.
    pub other_keys: Vec<String>,
}

impl AgentConfig {
    /// K3s's config keys are its flag names. List-valued flags take a list or one string,
    /// and `node-ip` a comma-separated string, as in K3s.
    pub fn from_json(text: &str) -> Result<AgentConfig, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(ConfigError::Syntax)?;
        let map = value.as_object().ok_or(ConfigError::NotAMapping)?;
        let list = |key: &str| -> Result<Vec<String>, ConfigError> {
            let bad = || ConfigError::BadType(key.to_owned());
            match map.get(key) {
                None => Ok(Vec::new()),
                Some(serde_json::Value::String(s)) => Ok(vec![s.clone()]),
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
                    .collect(),
                Some(_) => Err(bad()),
            }
        };
        let string = |key: &'static str| -> Result<Option<String>, ConfigError> {
            Ok(list(key)?.into_iter().next())
        };
        let known = [
            "server",
            "token",
            "node-name",
            "node-ip",
            "node-label",
            "node-taint",
        ];
        Ok(AgentConfig {
            server: string("server")?.ok_or(ConfigError::Missing("server"))?,
            token: string("token")?.ok_or(ConfigError::Missing("token"))?,
            node_name: string("node-name")?,
            node_ip: list("node-ip")?
                .iter()
                .flat_map(|s| s.split(','))
                .map(str::to_owned)
                .collect(),
            node_label: list("node-label")?,
            node_taint: list("node-taint")?,
            other_keys: map
                .keys()
                .filter(|k| !known.contains(&k.as_str()))
                .cloned()
                .collect(),
        })
    }

    /// `k3s-agent-double: config server=… node-name=… node-ip=… labels=[…] taints=[…]
    /// token-sha256=…`: lists as JSON arrays; `-` for an absent value; the token only as
    /// its sha256, never itself.
    pub fn report(&self) -> String {
        let json = |v: &[String]| serde_json::Value::from(v.to_vec()).to_string();
        let mut line = format!(
            "{LINE_PREFIX} config server={} node-name={} node-ip={} labels={} taints={} token-sha256={}",
            self.server,
            self.node_name.as_deref().unwrap_or("-"),
            if self.node_ip.is_empty() { "-".to_owned() } else { self.node_ip.join(",") },
            json(&self.node_label),
            json(&self.node_taint),
            hex::encode(Sha256::digest(self.token.as_bytes())),
        );
        if !self.other_keys.is_empty() {
            let _ = write!(line, " other-keys={}", json(&self.other_keys));
        }
        line
    }
}

/// The line for a CA check outcome, and whether the agent may go on.
pub fn ca_check_report(result: &Result<basalt_api::k3s::CaCheck, String>) -> (String, bool) {
    use basalt_api::k3s::CaCheck;
    match result {
        Ok(CaCheck::Matched { .. }) => (format!("{LINE_PREFIX} ca-check passed"), true),
        Ok(CaCheck::NotPinned) => (
            format!("{LINE_PREFIX} ca-check skipped: the token pins no CA hash"),
            true,
        ),
        Err(why) => (format!("{LINE_PREFIX} ca-check failed: {why}"), false),
    }
}

/// An error and its causes on one line, as the double prints them.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_agent_with_a_config_is_accepted() {
        let want = Some(PathBuf::from("/etc/rancher/k3s/config.yaml"));
        for ok in [
            &["agent", "--config", "/etc/rancher/k3s/config.yaml"][..],
            &["agent", "-c", "/etc/rancher/k3s/config.yaml"],
            &["agent", "--config=/etc/rancher/k3s/config.yaml"],
        ] {
            assert_eq!(config_path(&args(ok)), want, "{ok:?}");
        }
        for bad in [
            &[][..],
            &["server", "--config", "x"],
            &["agent"],
            &["agent", "--config"],
            &["agent", "--token", "x"],
            &["agent", "--config", "x", "--debug"],
        ] {
            assert_eq!(config_path(&args(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn the_config_basalt_init_writes_is_read() {
        let text = r#"{"node-ip":"10.0.2.15","node-label":["pool=warm","zone=a"],"node-name":"warm-1","node-taint":["dedicated=ci:NoSchedule"],"server":"https://10.0.2.2:6443","token":"K10abc::server:pw"}"#;
        let c = AgentConfig::from_json(text).unwrap();
        assert_eq!(
            c,
            AgentConfig {
                server: "https://10.0.2.2:6443".into(),
                token: "K10abc::server:pw".into(),
                node_name: Some("warm-1".into()),
                node_ip: vec!["10.0.2.15".into()],
                node_label: vec!["pool=warm".into(), "zone=a".into()],
                node_taint: vec!["dedicated=ci:NoSchedule".into()],
                other_keys: vec![],
            }
        );
        let line = c.report();
        assert_eq!(
            line,
            format!(
                "k3s-agent-double: config server=https://10.0.2.2:6443 node-name=warm-1 node-ip=10.0.2.15 labels=[\"pool=warm\",\"zone=a\"] taints=[\"dedicated=ci:NoSchedule\"] token-sha256={}",
                hex::encode(Sha256::digest(b"K10abc::server:pw"))
            )
        );
        assert!(!line.contains("server:pw"));
    }

    #[test]
    fn sparse_and_odd_configs() {
        let c = AgentConfig::from_json(
            r#"{"server":"https://s","token":"t","node-label":"a=b","node-ip":"10.0.0.1,fd00::1","debug":true}"#,
        )
        .unwrap();
        assert_eq!(c.node_label, vec!["a=b"]);
        assert_eq!(c.node_ip, vec!["10.0.0.1", "fd00::1"]);
        assert_eq!(c.other_keys, vec!["debug"]);
        let line = c.report();
        assert!(line.contains(" node-name=- "), "{line}");
        assert!(line.contains(" taints=[] "), "{line}");
        assert!(line.ends_with(" other-keys=[\"debug\"]"), "{line}");

        for (text, want) in [
            ("server: x", "not JSON"),
            ("[]", "not a mapping"),
            (r#"{"token":"t"}"#, "lacks `server`"),
            (r#"{"server":"s"}"#, "lacks `token`"),
            (
                r#"{"server":"s","token":"t","node-label":[1]}"#,
                "`node-label`",
            ),
            (r#"{"server":"s","token":{}}"#, "`token`"),
        ] {
            let err = AgentConfig::from_json(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
