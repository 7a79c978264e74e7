//! One workspace binary built release and statically linked, into a target directory of
//! its own so that it neither waits on nor invalidates the caller's build: the CLI's
//! build script (the basalt-init it embeds), the image library (basalt-init from a source
//! tree, the benchmark's floor) and the K3s agent double all build this way.
//!
//! The command, for running by hand:
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
//! cargo build --release --locked -p PACKAGE [--bin BIN] [--no-default-features]
//! --target x86_64-unknown-linux-gnu --target-dir DIR`

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The only target basalt images run on.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// What to build.
#[derive(Debug, Clone)]
pub struct StaticBuild<'a> {
    /// The workspace root (cargo runs there).
    pub workspace: &'a Path,
    /// The package (`-p`).
    pub package: &'a str,
    /// The binary (`--bin`); `None` builds the package's binaries and names the result
    /// after the package.
    pub bin: Option<&'a str>,
    /// `--target-dir`.
    pub target_dir: PathBuf,
    /// `false` passes `--no-default-features`.
    pub default_features: bool,
}

/// Why the build did not produce a binary.
#[derive(Debug, thiserror::Error)]
pub enum StaticBuildError {
    #[error("run cargo to build {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("cargo build of {0} failed (exit {1})")]
    Cargo(String, ExitStatus),
}

impl StaticBuild<'_> {
    /// The binary's name.
    pub fn name(&self) -> &str {
        self.bin.unwrap_or(self.package)
    }

    /// Where the binary lands.
    pub fn binary(&self) -> PathBuf {
        self.target_dir
            .join(TARGET)
            .join("release")
            .join(self.name())
    }

    /// The cargo command, for a caller that must adjust its environment further.
    pub fn command(&self) -> Command {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command.current_dir(self.workspace).args([
            "build",
            "--release",
            "--locked",
            "-p",
            self.package,
        ]);
        if let Some(bin) = self.bin {
            command.args(["--bin", bin]);
        }
        if !self.default_features {
            command.arg("--no-default-features");
        }
        command
            .args(["--target", TARGET, "--target-dir"])
            .arg(&self.target_dir)
            // Per-target flags: build scripts and proc macros stay ordinary host binaries.
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .env_remove("RUSTFLAGS");
        command
    }

    /// Runs [`StaticBuild::command`] and returns the binary's path.
    pub fn run(&self) -> Result<PathBuf, StaticBuildError> {
        self.run_command(self.command())
    }

    /// Runs `command` (made by [`StaticBuild::command`]) and returns the binary's path.
    pub fn run_command(&self, mut command: Command) -> Result<PathBuf, StaticBuildError> {
        let status = command
            .status()
            .map_err(|e| StaticBuildError::Spawn(self.name().to_owned(), e))?;
        if !status.success() {
            return Err(StaticBuildError::Cargo(self.name().to_owned(), status));
        }
        Ok(self.binary())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_command_names_package_bin_features_and_target_dir() {
        let ws = Path::new("/ws");
        let b = StaticBuild {
            workspace: ws,
            package: "k3s-doubles",
            bin: Some("k3s-agent-double"),
            target_dir: ws.join("target/doubles"),
            default_features: true,
        };
        let c = b.command();
        assert_eq!(
            args(&c),
            [
                "build",
                "--release",
                "--locked",
                "-p",
                "k3s-doubles",
                "--bin",
                "k3s-agent-double",
                "--target",
                TARGET,
                "--target-dir",
                "/ws/target/doubles"
            ]
        );
        assert_eq!(c.get_current_dir(), Some(ws));
        let envs: Vec<_> = c.get_envs().collect();
        assert!(envs.contains(&(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS".as_ref(),
            Some("-C target-feature=+crt-static".as_ref())
        )));
        assert!(envs.contains(&("RUSTFLAGS".as_ref(), None)));
        assert_eq!(
            b.binary(),
            Path::new("/ws/target/doubles/x86_64-unknown-linux-gnu/release/k3s-agent-double")
        );

        let init = StaticBuild {
            package: "basalt-init",
            bin: None,
            default_features: false,
            ..b
        };
        let a = args(&init.command());
        assert!(a.contains(&"--no-default-features".to_string()), "{a:?}");
        assert!(!a.contains(&"--bin".to_string()), "{a:?}");
        assert!(init.binary().ends_with("release/basalt-init"));
    }

    #[test]
    fn a_failed_build_names_the_binary() {
        let b = StaticBuild {
            workspace: Path::new("/"),
            package: "p",
            bin: None,
            target_dir: "/nonexistent".into(),
            default_features: true,
        };
        let mut c = Command::new("false");
        c.current_dir("/");
        let err = b.run_command(c).unwrap_err();
        assert!(matches!(err, StaticBuildError::Cargo(ref n, _) if n == "p"));
        assert!(
            err.to_string().starts_with("cargo build of p failed"),
            "{err}"
        );
        let err = b
            .run_command(Command::new("/nonexistent/cargo"))
            .unwrap_err();
        assert!(matches!(err, StaticBuildError::Spawn(..)), "{err}");
    }
}
