//! The harnesses reach what they are meant to exercise: a seed that should get through a
//! parser does, judged by an independent tool where there is one.

use basalt_init::net::dhcp::State;
use std::path::PathBuf;
use std::process::Command;

fn seed(target: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
        .join(name)
}

/// `sfdisk --json` on a disk image: the independent reading of its partition table.
fn sfdisk_json(image: &[u8]) -> String {
    let disk = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(disk.path(), image).expect("write");
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(disk.path())
        .output()
        .expect("run sfdisk");
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_gpt_seed_reads_as_sfdisk_reads_it() {
    let path = seed("gpt", "sfdisk.bin");
    let data = std::fs::read(&path).expect("seed");
    let table = basalt_fuzz::gpt::read(&data).expect("the seed's table reads");
    let json = sfdisk_json(&data[1..]);
    let parts = table.partitions();
    assert_eq!(parts.len(), json.matches("\"node\"").count());
    for p in &parts {
        assert!(
            json.contains(&format!("\"start\": {}", p.first_lba)),
            "{json}"
        );
        assert!(
            json.contains(&format!("\"name\": \"{}\"", p.name)),
            "{json}"
        );
    }
    // The damaged primary falls back to the backup.
    let damaged = std::fs::read(seed("gpt", "primary-damaged.bin")).expect("seed");
    let table = basalt_fuzz::gpt::read(&damaged).expect("the backup reads");
    assert!(table.from_backup);
}

#[test]
fn the_dhcp_seeds_reach_bound_and_expiry() {
    let run = |name| basalt_fuzz::dhcp::run(&std::fs::read(seed("dhcp", name)).expect("seed"));
    assert_eq!(run("offer-ack.bin"), State::Bound);
    // Renewed at T1 (1800 s) for 3600 s, then 4000 s on: the lease expired at 5400 s
    // and the client started over with a DISCOVER.
    assert_eq!(run("offer-ack-renew.bin"), State::Selecting);
    assert_eq!(
        run("raw-offer.bin"),
        State::Selecting,
        "an unmatched xid is dropped"
    );
    assert_ne!(run("expire.bin"), State::Bound);
}

#[test]
fn the_config_seeds_with_a_secret_parse_or_fail_as_expected() {
    use basalt_api::config::MachineConfig;
    let text = |name| {
        std::fs::read_to_string(seed("machine_config", name))
            .expect("seed")
            .replace("@@", basalt_fuzz::config::SECRET)
    };
    if let Err(e) = MachineConfig::parse(&text("full.toml")) {
        panic!("full.toml: {e}");
    }
    assert!(
        MachineConfig::parse(&text("bootstrap.toml")).is_err(),
        "secret not [a-z0-9]{{16}}"
    );
    assert!(MachineConfig::parse(&text("syntax.toml")).is_err());
}

#[test]
fn the_api_seeds_reach_the_refusal_and_the_health_answer() {
    use basalt_init::node_api::guard::Client;
    use basalt_init::node_api::http::read_head;
    use basalt_init::node_api::routes::authorize_with;
    let stranger = Client::from_peer(None);
    let authorize = |req: &basalt_init::node_api::http::Request| {
        authorize_with(&[], &req.method, &req.path, &stranger)
    };
    let head = |name| {
        let data = std::fs::read(seed("api_request", name)).expect("seed");
        read_head(&mut &data[1..]).expect("a head")
    };
    let refused = authorize(&head("apply.txt").request).expect_err("a stranger's apply");
    assert_eq!(refused.status, 401);
    assert!(authorize(&head("health.txt").request).is_ok());
}

#[test]
fn the_boot_network_seeds_reach_acceptance_and_refusal() {
    use basalt_init::config_source::{from_cmdline, Found, SourceError, CMDLINE};
    use basalt_init::net::sntp::{check_step, validate, StepPolicy, MAX_STEP};
    // SNTP: the good answer is taken and its 5 s step allowed; the 10 000 s one refused.
    let sample = |name| {
        let data = std::fs::read(seed("sntp", name)).expect("seed");
        let t = |i: usize| i64::from_le_bytes(data[i..i + 8].try_into().expect("8"));
        let server = ([192, 0, 2, 1], 123).into();
        let s = validate(server, &data[26..], t(0).into(), t(8).into()).expect("valid");
        let policy = StepPolicy {
            floor_secs: 1_700_000_000,
            max_step: MAX_STEP,
        };
        check_step(server, &s, t(16).into(), &policy).map(|()| s.offset.as_secs_f64())
    };
    let offset = sample("good.bin").expect("a 5 s step");
    assert!((offset - 5.0).abs() < 0.1, "{offset}");
    assert!(sample("big-step.bin").is_err());
    // The network-config's address, as the seed spells it.
    let yaml = std::fs::read_to_string(seed("network_config", "hetzner.yaml")).expect("seed");
    let (addr, prefix) = basalt_init::net::metadata::parse_ipv6(&yaml)
        .expect("YAML")
        .expect("an address");
    assert_eq!(
        (addr.to_string(), prefix),
        ("2a01:4f8:c17:1234::1".into(), 64)
    );
    // The command line: a standby config is taken, a [cluster] refused.
    let cmdline = |name| {
        let root = tempfile::tempdir().expect("root");
        let path = root.path().join(CMDLINE);
        std::fs::create_dir_all(path.parent().expect("proc")).expect("proc");
        std::fs::copy(seed("cmdline", name), &path).expect("copy");
        from_cmdline(root.path(), false)
    };
    match cmdline("standby.txt") {
        Ok(Found::Config(..)) => {}
        Ok(Found::None) => panic!("standby.txt: no config found"),
        Err(e) => panic!("standby.txt: {}", basalt_init::pid1::console::chain(&e)),
    }
    assert!(matches!(cmdline("urlsafe.txt"), Ok(Found::Config(..))));
    assert!(matches!(
        cmdline("cluster.txt"),
        Err(SourceError::ClusterOnCmdline)
    ));
}

#[test]
fn the_growth_seed_grows_state_to_the_end_as_sfdisk_reads_it() {
    use std::io::{Read, Seek};
    let data = std::fs::read(seed("growth", "sfdisk-grow-16m.bin")).expect("seed");
    let mut grown = basalt_fuzz::growth::grow(&data).expect("a plan");
    let mut bytes = Vec::new();
    grown.rewind().expect("rewind");
    grown.read_to_end(&mut bytes).expect("read");
    let json = sfdisk_json(&bytes);
    // 24 sectors grew by 16 MiB (32768 sectors); STATE starts at 12 and runs to the last
    // usable sector: the disk's end less the backup's header and its one-sector array.
    let sectors = bytes.len() as u64 / 512;
    assert_eq!(sectors, 24 + 32768);
    let size = sectors - 2 - 12;
    let state = json
        .split('{')
        .find(|p| p.contains("\"name\": \"STATE\""))
        .expect("STATE in sfdisk's table");
    assert!(state.contains("\"start\": 12,"), "{json}");
    assert!(state.contains(&format!("\"size\": {size},")), "{json}");
    assert!(
        json.contains(&format!("\"lastlba\": {}", sectors - 3)),
        "{json}"
    );
}
