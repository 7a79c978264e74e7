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

#[test]
fn the_gpt_seed_reads_as_sfdisk_reads_it() {
    let path = seed("gpt", "sfdisk.bin");
    let data = std::fs::read(&path).expect("seed");
    let table = basalt_fuzz::gpt::read(&data).expect("the seed's table reads");
    let disk = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(disk.path(), &data[1..]).expect("write");
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
    let json = String::from_utf8_lossy(&out.stdout);
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
    use basalt_init::node_api::http::read_head;
    use basalt_init::node_api::routes::authorize;
    let head = |name| {
        let data = std::fs::read(seed("api_request", name)).expect("seed");
        read_head(&mut &data[1..]).expect("a head")
    };
    let refused = authorize(&head("apply.txt").request, false).expect_err("a stranger's apply");
    assert_eq!(refused.status, 401);
    assert!(authorize(&head("health.txt").request, false).is_ok());
}
