//! The manifests in `deploy/` say what the README says: one replica that is never rolled
//! (Recreate, so two controllers never overlap), every Secret it mounts shown in the example,
//! the ports of `[listen]` served, and a pool.toml that basalt reads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn documents(file: &str) -> Vec<serde_yaml_ng::Value> {
    let text = std::fs::read_to_string(deploy(file)).expect("read the manifest");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_yaml_ng::Value], kind: &str) -> Vec<&'a serde_yaml_ng::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

#[test]
fn one_controller_its_secrets_its_ports_and_a_pool_toml_basalt_reads() {
    let docs = documents("controller.yaml");
    let deployment = of_kind(&docs, "Deployment")[0];
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(1));
    assert_eq!(
        deployment["spec"]["strategy"]["type"].as_str(),
        Some("Recreate")
    );

    let examples: BTreeSet<_> = of_kind(&documents("secrets.example.yaml"), "Secret")
        .iter()
        .filter_map(|s| s["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let pod = &deployment["spec"]["template"]["spec"];
    let mut used = BTreeSet::new();
    for volume in pod["volumes"].as_sequence().expect("volumes") {
        if let Some(name) = volume["secret"]["secretName"].as_str() {
            used.insert(name.to_owned());
        }
    }
    for env in pod["containers"][0]["env"].as_sequence().expect("env") {
        if let Some(name) = env["valueFrom"]["secretKeyRef"]["name"].as_str() {
            used.insert(name.to_owned());
        }
    }
    assert!(!used.is_empty());
    assert!(
        used.is_subset(&examples),
        "{used:?} not all in {examples:?}"
    );

    let config = of_kind(&docs, "ConfigMap")[0]["data"]["pool.toml"]
        .as_str()
        .expect("pool.toml in the ConfigMap")
        .to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    // The token file the pod mounts from its Secret, here in a folder of the test's.
    let token = dir.path().join("token");
    std::fs::write(&token, "K10".to_owned() + &"0".repeat(64) + "::node:pw").expect("token");
    let config = config.replace(
        "/etc/basalt/join/customer-a/token",
        &token.to_string_lossy(),
    );
    let pool =
        basalt_pool::config::PoolConfig::parse(&dir.path().join("pool.toml"), &config, &|k| {
            (k == "HCLOUD_TOKEN").then(|| "a-token".to_owned())
        })
        .expect("deploy/controller.yaml's pool.toml");
    let listen = pool.listen.expect("[listen]");
    let ports: BTreeSet<u64> = pod["containers"][0]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert!(ports.contains(&u64::from(listen.grpc.port())), "{ports:?}");
    assert!(ports.contains(&u64::from(listen.api.port())), "{ports:?}");
    let service = of_kind(&docs, "Service")[0];
    assert!(service["spec"]["ports"]
        .as_sequence()
        .expect("service ports")
        .iter()
        .any(|p| p["port"].as_u64() == Some(u64::from(listen.grpc.port()))));
}

#[test]
fn the_cloud_config_has_the_keys_externalgrpc_reads() {
    let docs = documents("cloud-config.example.yaml");
    let map = docs[0].as_mapping().expect("a mapping");
    let keys: BTreeSet<_> = map.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["address", "cert", "key", "cacert", "grpc_timeout"])
    );
    assert!(docs[0]["address"]
        .as_str()
        .expect("address")
        .ends_with(":8086"));
}
