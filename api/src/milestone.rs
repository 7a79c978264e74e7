//! The boot timeline's console format: one line per milestone,
//! `[basalt] <milestone> t=<seconds since kernel start, 3 decimals>`.

/// Prefix of every line basalt-init prints on the console.
pub const PREFIX: &str = "[basalt]";

/// Milestones of the boot, in the order they are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Milestone {
    /// Stage 1 started as `/init` in the initramfs.
    InitStart,
    /// The dm-verity device over the active slot exists.
    RootVerified,
    /// The verified root is mounted read-only.
    RootMounted,
    /// STATE, the writable partition, is mounted on /var.
    StateMounted,
    /// Stage 2 runs as PID1 of the real root.
    Ready,
    /// No cluster to join (yet): the node waits for its join config.
    Standby,
    /// The first DHCP lease is applied. Asynchronous to the others, and only on nodes with
    /// a network interface, so not part of [`Milestone::ALL`].
    NetworkUp,
    /// The clock was set from an NTP server. Asynchronous too, and only with servers
    /// configured, so not part of [`Milestone::ALL`].
    TimeSynced,
    /// `k3s agent` was started under supervision after the server's CA passed the
    /// token's hash check. Only on nodes told to join, so not part of [`Milestone::ALL`].
    Joined,
}

impl Milestone {
    pub const ALL: [Milestone; 6] = [
        Milestone::InitStart,
        Milestone::RootVerified,
        Milestone::RootMounted,
        Milestone::StateMounted,
        Milestone::Ready,
        Milestone::Standby,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Milestone::InitStart => "init-start",
            Milestone::RootVerified => "root-verified",
            Milestone::RootMounted => "root-mounted",
            Milestone::StateMounted => "state-mounted",
            Milestone::Ready => "ready",
            Milestone::Standby => "standby",
            Milestone::NetworkUp => "network-up",
            Milestone::TimeSynced => "time-synced",
            Milestone::Joined => "joined",
        }
    }
}

/// Formats a milestone line; `seconds` is time since kernel start.
pub fn format(milestone: Milestone, seconds: f64) -> String {
    format!("{PREFIX} {} t={seconds:.3}", milestone.name())
}

/// Finds a milestone line in one line of console output (which may carry kernel
/// noise before it) and returns its name and time.
pub fn parse(line: &str) -> Option<(&str, f64)> {
    let rest = &line[line.find(PREFIX)? + PREFIX.len()..];
    let mut words = rest.split_whitespace();
    let name = words.next()?;
    let t = words.next()?.strip_prefix("t=")?;
    let seconds: f64 = t.parse().ok()?;
    if words.next().is_some() || !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some((name, seconds))
}

/// The word after [`PREFIX`] on a step line.
pub const STEP: &str = "step";

/// One step of the boot, as its line reports it: where it started and how long it took,
/// both in seconds (the start since kernel start). Steps are what the milestones are made
/// of, so that a slower milestone names the step that slowed it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLine<'a> {
    pub name: &'a str,
    pub at: f64,
    pub took: f64,
}

/// Formats a step line: `[basalt] step <name> at=<start> took=<seconds>`. A milestone
/// parser ([`parse`]) does not take it for a milestone.
pub fn format_step(name: &str, at: f64, took: f64) -> String {
    format!("{PREFIX} {STEP} {name} at={at:.3} took={took:.3}")
}

/// Finds a step line in one line of console output, as [`parse`] finds milestones.
pub fn parse_step(line: &str) -> Option<StepLine<'_>> {
    let rest = &line[line.find(PREFIX)? + PREFIX.len()..];
    let mut words = rest.split_whitespace();
    if words.next()? != STEP {
        return None;
    }
    let name = words.next()?;
    let number = |w: Option<&str>, key: &str| -> Option<f64> {
        let v: f64 = w?.strip_prefix(key)?.parse().ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    let at = number(words.next(), "at=")?;
    let took = number(words.next(), "took=")?;
    if words.next().is_some() {
        return None;
    }
    Some(StepLine { name, at, took })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lines_round_trip_and_are_not_milestones() {
        let line = format_step("k3s-modules", 3.2, 0.41234);
        assert_eq!(line, "[basalt] step k3s-modules at=3.200 took=0.412");
        assert_eq!(
            parse_step(&format!("\x1b[0m{line}\r")),
            Some(StepLine {
                name: "k3s-modules",
                at: 3.2,
                took: 0.412
            })
        );
        assert_eq!(parse(&line), None);
        assert_eq!(parse_step("[basalt] ready t=1.000"), None);
        for bad in [
            "[basalt] step x at=1.000",
            "[basalt] step x at=1.000 took=-1.000",
            "[basalt] step x took=1.000 at=1.000",
            "[basalt] step x at=1.000 took=1.000 extra",
        ] {
            assert_eq!(parse_step(bad), None, "{bad}");
        }
    }

    #[test]
    fn format_then_parse_round_trips() {
        for m in Milestone::ALL.into_iter().chain([
            Milestone::NetworkUp,
            Milestone::TimeSynced,
            Milestone::Joined,
        ]) {
            let line = format(m, 1.23456);
            assert_eq!(parse(&line), Some((m.name(), 1.235)));
        }
    }

    #[test]
    fn parse_tolerates_console_noise_before_the_prefix() {
        assert_eq!(
            parse("\x1b[0m[    2.1] [basalt] ready t=2.500"),
            Some(("ready", 2.5))
        );
    }

    #[test]
    fn parse_rejects_other_lines() {
        for line in [
            "[basalt] error: mount failed",
            "[basalt] ready",
            "[basalt] ready t=abc",
            "[basalt] ready t=-1.000",
            "ready t=1.000",
            "[basalt] ready t=1.000 extra",
        ] {
            assert_eq!(parse(line), None, "{line}");
        }
    }
}
