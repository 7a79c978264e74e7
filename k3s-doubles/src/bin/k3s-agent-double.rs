//! `k3s-agent-double`: a test double of `k3s agent`, not K3s. Installed as `k3s` in test
//! images. See the `k3s_doubles` crate docs and `k3s_doubles::agent`.
//!
//! Invocations, each extracting the double's userspace first as K3s does
//! (`k3s_doubles::userspace`):
//! - `k3s agent --config FILE`: exit 0 after SIGTERM or SIGINT, 1 when the extraction,
//!   the config, the CA check or the registration (the kubelet client certificate)
//!   fails. Real K3s retries a failed registration in-process; the double exits, so its
//!   supervisor restarts it (see the crate docs). Once registered it imports
//!   `<data-dir>/agent/images` (`k3s_doubles::images`).
//! - `k3s ctr --version`: extracts, prints a version line, exits 0 (1 when the
//!   extraction fails); `k3s ctr` with other arguments exits 2 after the extraction.
//!
//! Anything else exits 2 and extracts nothing.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use basalt_api::config::Token;
use k3s_doubles::agent::{
    ca_check_report, chain, config_path, register, AgentConfig, RegisterError,
};
use k3s_doubles::userspace::{self, CTR_PREFIX, DATA_PREFIX};
use k3s_doubles::{images, CHECK_TIMES, LINE_PREFIX};
use nix::sys::signal::{SigSet, Signal};

/// K3s's own client timeout for these requests.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    // Blocked before anything else, so a SIGTERM during the check is kept for sigwait
    // below instead of killing the double before it says "stopping".
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    if let Err(e) = stop.thread_block() {
        println!("{LINE_PREFIX} failed: block SIGTERM: {e}");
        return ExitCode::from(1);
    }

    let args: Vec<String> = std::env::args().skip(1).collect();
    let env_dir = std::env::var(userspace::DATA_DIR_ENV).ok();
    if args.first().map(String::as_str) == Some("ctr") {
        return ctr(&args[1..], env_dir.as_deref());
    }
    let Some(path) = config_path(&args) else {
        println!("{LINE_PREFIX} unsupported arguments {args:?}; expected: agent --config FILE");
        return ExitCode::from(2);
    };
    let config = std::fs::read_to_string(&path)
        .map_err(|e| format!("read {}: {e}", path.display()))
        .and_then(|text| {
            AgentConfig::from_json(&text).map_err(|e| format!("{}: {}", path.display(), chain(&e)))
        });
    // K3s finds its data dir (its config file's `data-dir` included) and extracts before
    // anything else, whatever the config holds.
    let data_dir = userspace::data_dir(
        env_dir.as_deref(),
        config.as_ref().ok().and_then(|c| c.data_dir.as_deref()),
    );
    if !extract(&data_dir) {
        return ExitCode::from(1);
    }
    let config = match config {
        Ok(c) => c,
        Err(why) => {
            println!("{LINE_PREFIX} failed: {why}");
            return ExitCode::from(1);
        }
    };
    println!("{}", config.report());

    let token = match Token::parse(&config.token) {
        Ok(t) => t,
        Err(e) => {
            println!("{LINE_PREFIX} ca-check failed: token: {e}");
            return ExitCode::from(1);
        }
    };
    let (result, times) =
        basalt_api::k3s::check_server_ca_timed(&config.server, &token, CHECK_TIMEOUT);
    let result = result.map_err(|e| chain(&e));
    let (line, go_on) = ca_check_report(&result);
    println!("{line}");
    // The same check PID1 runs before the exec, here the first TLS code this process
    // runs (cold): `basalt bench join` compares PID1's check with it, and its `response`
    // (connect, handshake, GET, body) with the warm round trip below.
    println!("{LINE_PREFIX} {CHECK_TIMES}{}", times.describe());
    if !go_on {
        return ExitCode::from(1);
    }

    // K3s keeps the bundle its check accepted and trusts it from then on; the double
    // fetches it again and holds it to the same pin.
    let password = match &token {
        Token::Secure { password, .. } => Some(password.as_str()),
        // A short token is the password itself (K3s sends it as `node`'s).
        Token::Plain(p) => Some(p.as_str()),
        Token::Bootstrap { .. } => None,
    };
    let registered = password
        .ok_or_else(|| chain(&RegisterError::NoPassword))
        .and_then(|password| {
            let asked = Instant::now();
            let cacerts = basalt_api::k3s::fetch_cacerts(&config.server, CHECK_TIMEOUT)
                .map_err(|e| chain(&e))?;
            // One TLS round trip from this node to the server (connect, handshake, GET,
            // body): the floor `basalt bench join` holds the promotion to.
            println!(
                "{LINE_PREFIX} cacerts round trip {} ms",
                asked.elapsed().as_millis()
            );
            if let Some(pin) = token.ca_hash() {
                let hash = basalt_api::k3s::ca_hash(&cacerts).map_err(|e| chain(&e))?;
                if hash != pin {
                    return Err(format!(
                        "the CA of {} changed since the check",
                        config.server
                    ));
                }
            }
            register(&config, password, &cacerts, CHECK_TIMEOUT).map_err(|e| chain(&e))
        });
    match registered {
        Ok(r) => println!(
            "{LINE_PREFIX} registered node-name={} cert={}",
            r.node_name,
            r.cert.display()
        ),
        Err(why) => {
            println!("{LINE_PREFIX} registration failed: {why}");
            return ExitCode::from(1);
        }
    }

    // K3s starts containerd and imports the airgap images here, before the kubelet.
    match images::import(&images::images_dir(&data_dir)) {
        Ok(report) => {
            for line in report.lines() {
                println!("{line}");
            }
        }
        // K3s logs a failed import and goes on.
        Err(e) => println!("{LINE_PREFIX} images: import failed: {}", chain(&e)),
    }

    println!("{LINE_PREFIX} running");
    // Any outcome of the wait means stop: a failing sigwait must not leave a double that
    // can never be stopped.
    let _ = stop.wait();
    println!("{LINE_PREFIX} stopping");
    ExitCode::SUCCESS
}

/// K3s's `extract` before any command runs; false (after saying why) when it failed.
fn extract(data_dir: &std::path::Path) -> bool {
    let result = userspace::extract(data_dir, |dir| {
        println!("{DATA_PREFIX} preparing data dir {}", dir.display());
    });
    match result {
        Ok(done) => {
            println!("{}", done.report());
            true
        }
        Err(e) => {
            println!("{DATA_PREFIX} extracting data: {}", chain(&e));
            false
        }
    }
}

/// `k3s ctr …`: the extraction, then the double's answer to `--version`.
fn ctr(args: &[String], env_dir: Option<&str>) -> ExitCode {
    if !extract(&userspace::data_dir(env_dir, None)) {
        return ExitCode::from(1);
    }
    if matches!(args, [v] if v == "--version" || v == "-v") {
        println!("{CTR_PREFIX} ctr k3s-agent-double (a double: not containerd's ctr)");
        ExitCode::SUCCESS
    } else {
        println!("{CTR_PREFIX} unsupported ctr arguments {args:?}; expected: ctr --version");
        ExitCode::from(2)
    }
}
