//! Targets on what a node reads from the network at boot: SNTP answers, the Hetzner
//! metadata's network-config, and the config on the kernel command line.

use basalt_init::config_source::{from_cmdline, Found, Source, CMDLINE};
use basalt_init::net::metadata::parse_ipv6;
use basalt_init::net::sntp::{check_step, validate, StepPolicy, MAX_DELAY};
use std::net::SocketAddr;

/// The input is our send and arrival times (two `i64` nanosecond clocks), the clock
/// now and the image's time floor, then the server's reply. Properties: an accepted
/// answer has a believable round trip and stratum; a step allowed never sets the clock
/// below the floor, nor by more than the bound from a clock already past the floor.
pub fn sntp(data: &[u8]) {
    let Some((head, reply)) = data.split_at_checked(26) else {
        return;
    };
    let i64_at = |i: usize| i64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let (t1, t4, now) = (i64_at(0), i64_at(8), i64_at(16));
    let floor_secs = u64::from(u16::from_le_bytes([head[24], head[25]])) * 100_000;
    let server: SocketAddr = ([192, 0, 2, 1], 123).into();
    let Ok(sample) = validate(server, reply, t1.into(), t4.into()) else {
        return;
    };
    assert!(sample.delay <= MAX_DELAY);
    assert!((1..=15).contains(&sample.stratum));
    let policy = StepPolicy {
        floor_secs,
        max_step: basalt_init::net::sntp::MAX_STEP,
    };
    if check_step(server, &sample, now.into(), &policy).is_ok() {
        let floor = i128::from(floor_secs) * 1_000_000_000;
        let after = i128::from(now) + i128::from(sample.offset.as_nanos());
        assert!(after >= floor, "stepped below the floor");
        if i128::from(now) >= floor {
            let step = u128::from(sample.offset.as_nanos().unsigned_abs());
            assert!(step <= policy.max_step.as_nanos(), "an unbounded step");
        }
    }
}

/// Hetzner's network-config (YAML). Property: an address found has a valid prefix.
pub fn network_config(data: &[u8]) {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some((_, prefix))) = parse_ipv6(yaml) {
        assert!(prefix <= 128);
    }
}

/// The input as `/proc/cmdline`. Properties: a config found there comes from the
/// command line and never carries `[cluster]` (its token would be readable by every
/// process); nothing is saved (STATE is not mounted).
pub fn cmdline(data: &[u8]) {
    let root = tempfile::tempdir().expect("temporary root");
    let path = root.path().join(CMDLINE);
    std::fs::create_dir_all(path.parent().expect("proc")).expect("proc");
    std::fs::write(&path, data).expect("write cmdline");
    if let Ok(Found::Config(source, config, unsaved)) = from_cmdline(root.path(), false) {
        assert_eq!(source, Source::Cmdline);
        assert!(
            config.cluster.is_none(),
            "a [cluster] from the command line"
        );
        assert!(unsaved.is_none());
    }
    let entries = walk(root.path());
    assert_eq!(entries, [path], "something was written");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
