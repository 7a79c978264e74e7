//! Console output of PID1: milestones and errors, one line each, on the console (stdout,
//! which the kernel opened on /dev/console) and in the kernel log (/dev/kmsg).

use basalt_api::milestone::{self, Milestone};
use std::fs::OpenOptions;
use std::io::Write;

/// Seconds since the kernel started (CLOCK_BOOTTIME), the clock of the boot timeline.
pub fn uptime() -> f64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => ts.tv_sec() as f64 + ts.tv_nsec() as f64 / 1e9,
        Err(_) => 0.0,
    }
}

/// Prints a milestone line of the boot timeline.
pub fn milestone(m: Milestone) {
    line(&milestone::format(m, uptime()));
}

/// Informational line.
pub fn info(msg: &str) {
    line(&format!("{} {msg}", milestone::PREFIX));
}

/// An error with its whole source chain, printed once.
pub fn error(context: &str, err: &dyn std::error::Error) {
    line(&format!(
        "{} error: {context}: {}",
        milestone::PREFIX,
        chain(err)
    ));
}

/// `err: cause: cause` in one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

fn line(text: &str) {
    // Both writes are best effort: PID1 must not stop because a console is missing.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
    if let Ok(mut kmsg) = OpenOptions::new().write(true).open("/dev/kmsg") {
        // <6> is KERN_INFO: kept out of a quiet console, where stdout already showed it.
        let _ = kmsg.write_all(format!("<6>{text}\n").as_bytes());
    }
}

/// A panic in PID1 is a kernel panic with no explanation; log it and reboot on purpose.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        line(&format!(
            "{} panic: {info}; rebooting in 5 s",
            milestone::PREFIX
        ));
        std::thread::sleep(std::time::Duration::from_secs(5));
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_prints_every_cause_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn uptime_is_monotonic() {
        let a = uptime();
        let b = uptime();
        assert!(a > 0.0 && b >= a);
    }
}
