//! `k3s-agent-double`: a test double of `k3s agent`, not K3s. Installed as `k3s` in test
//! images. See the `k3s_doubles` crate docs and `k3s_doubles::agent`.
//!
//! Exit codes: 0 after SIGTERM or SIGINT, 1 when the config, the CA check or the
//! registration (the kubelet client certificate) fails, 2 for an invocation other than
//! `k3s agent --config FILE`. Real K3s retries a failed registration in-process; the
//! double exits, so its supervisor restarts it (see the crate docs).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use basalt_api::config::Token;
use k3s_doubles::agent::{
    ca_check_report, chain, config_path, register, AgentConfig, RegisterError,
};
use k3s_doubles::LINE_PREFIX;
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
    let Some(path) = config_path(&args) else {
        println!("{LINE_PREFIX} unsupported arguments {args:?}; expected: agent --config FILE");
        return ExitCode::from(2);
    };
    let config = match std::fs::read_to_string(&path)
        .map_err(|e| format!("read {}: {e}", path.display()))
        .and_then(|text| {
            AgentConfig::from_json(&text).map_err(|e| format!("{}: {}", path.display(), chain(&e)))
        }) {
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
    let result = basalt_api::k3s::check_server_ca(&config.server, &token, CHECK_TIMEOUT)
        .map_err(|e| chain(&e));
    let (line, go_on) = ca_check_report(&result);
    println!("{line}");
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

    println!("{LINE_PREFIX} running");
    // Any outcome of the wait means stop: a failing sigwait must not leave a double that
    // can never be stopped.
    let _ = stop.wait();
    println!("{LINE_PREFIX} stopping");
    ExitCode::SUCCESS
}
