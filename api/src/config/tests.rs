//! Whole-document tests: good and bad configs, round trips, K3s output, properties.

use std::net::{IpAddr, SocketAddr};

use super::*;
use proptest::prelude::*;

const PEM_CERT: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n";
const PEM_KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIsecretkeymaterial\n-----END PRIVATE KEY-----\n";
const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn api_section() -> String {
    format!("[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n{PEM_CERT}'''\nkey = '''\n{PEM_KEY}'''\n")
}

/// `version = 1`, then `body`, then a valid `[api]`.
fn doc(body: &str) -> String {
    format!("version = 1\n{body}\n{}", api_section())
}

fn full() -> String {
    doc(&format!(
        r#"
[node]
hostname = "worker-1.example.com"
labels = {{ "example.com/pool" = "warm", app = "", "node.kubernetes.io/x_y" = "a.b-c_d" }}
taints = ["dedicated=gpu:NoSchedule", "example.com/flaky:PreferNoSchedule", "k=:NoExecute"]

[network]
dhcp4 = false
addresses = ["10.0.0.5/24", "2a01:4f8::5/64"]
dns = ["10.0.0.1", "2a01:4ff:ff00::add:1"]
ntp = ["ntp1.hetzner.de", "192.0.2.123"]
ipv6_from_metadata = false

[[network.routes]]
to = "0.0.0.0/0"
via = "10.0.0.1"

[[network.routes]]
to = "::/0"
via = "fe80::1"

[cluster]
server = "https://10.0.0.2:6443"
token = "K10{HASH}::server:s3cr3t-pa55"
node_name = "w1"
"#
    ))
}

#[test]
fn full_config_parses_into_typed_values() {
    let c = MachineConfig::parse(&full()).unwrap();
    assert_eq!(c.version, 1);
    assert_eq!(
        c.node.hostname.as_ref().map(Hostname::as_str),
        Some("worker-1.example.com")
    );
    assert_eq!(c.node.labels.len(), 3);
    assert_eq!(
        c.node.taints[0],
        Taint {
            key: "dedicated".parse().unwrap(),
            value: Some("gpu".parse().unwrap()),
            effect: TaintEffect::NoSchedule,
        }
    );
    assert_eq!(c.node.taints[1].value, None);
    assert_eq!(c.node.taints[2].value, Some("".parse().unwrap()));
    assert!(!c.network.dhcp4);
    assert!(!c.network.ipv6_from_metadata);
    assert_eq!(
        c.network.addresses[0],
        Cidr {
            addr: "10.0.0.5".parse().unwrap(),
            prefix: 24
        }
    );
    assert_eq!(c.network.addresses[1].prefix, 64);
    assert_eq!(
        c.network.routes[1].via,
        "fe80::1".parse::<IpAddr>().unwrap()
    );
    assert_eq!(c.network.dns.len(), 2);
    assert!(matches!(c.network.ntp[0], Host::Name(_)));
    assert!(matches!(c.network.ntp[1], Host::Ip(_)));
    assert_eq!(c.api.listen, DEFAULT_API_LISTEN.parse().unwrap());
    assert_eq!(c.api.ca.as_str(), PEM_CERT);
    assert_eq!(c.api.key.expose(), PEM_KEY);
    assert!(!c.is_standby());
    let cluster = c.cluster.as_ref().unwrap();
    assert_eq!(cluster.server.as_str(), "https://10.0.0.2:6443");
    assert_eq!(cluster.token.ca_hash(), Some(HASH));
    assert_eq!(c.k3s_node_name().as_ref().map(Hostname::as_str), Some("w1"));
}

#[test]
fn minimal_config_is_standby_with_defaults() {
    let c = MachineConfig::parse(&doc("")).unwrap();
    assert!(c.is_standby());
    assert_eq!(c.node, NodeConfig::default());
    assert!(c.network.dhcp4);
    assert!(c.network.ipv6_from_metadata);
    assert_eq!(c.api.listen.to_string(), DEFAULT_API_LISTEN);
    assert_eq!(c.k3s_config_json(None), None);
    assert_eq!(c.k3s_node_name(), None);
}

#[test]
fn standby_servers_are_prefetched_only_in_standby() {
    let standby =
        doc("[standby]\nservers = [\"https://10.0.0.2:6443\", \"https://k3s.example.com\"]");
    let c = MachineConfig::parse(&standby).unwrap();
    assert_eq!(
        c.prefetch_servers(),
        ["https://10.0.0.2:6443", "https://k3s.example.com"]
    );
    let joining = standby + "[cluster]\nserver = \"https://10.0.0.2:6443\"\ntoken = \"t\"\n";
    let c = MachineConfig::parse(&joining).unwrap();
    assert!(c.prefetch_servers().is_empty());
    assert!(MachineConfig::parse(&doc(""))
        .unwrap()
        .prefetch_servers()
        .is_empty());
}

#[test]
fn other_good_configs() {
    let good = [
        "[node]\nhostname = \"a\"",
        "[node]\nhostname = \"UPPER-case.Example\"",
        "node.hostname = \"dotted\"\nnetwork.dhcp4 = true",
        "[network]\nroutes = [{ to = \"10.0.0.0/8\", via = \"10.0.0.1\" }]",
        "[network]\naddresses = [\"192.0.2.1/32\", \"::1/128\", \"0.0.0.0/0\"]",
        "[cluster]\nserver = \"https://k3s.example.com\"\ntoken = \"plain-secret\"",
        "[cluster]\nserver = \"https://[2a01:4f8::2]:6443/\"\ntoken = \"abcdef.0123456789abcdef\"",
        "[standby]\nservers = []",
    ];
    for body in good {
        let text = doc(body);
        if let Err(e) = MachineConfig::parse(&text) {
            panic!("{body:?} rejected: {e}");
        }
    }
    let listen = "version = 1\n[api]\nlisten = \"[::]:443\"\n".to_owned()
        + &api_section().replace("[api]\n", "");
    let c = MachineConfig::parse(&listen).unwrap();
    assert_eq!(c.api.listen.port(), 443);
}

/// (document, key the error must name, fragment of the message): a table, long because
/// every bad value gets its own row.
fn bad_cases() -> Vec<(String, String, &'static str)> {
    let long_label = "a".repeat(64);
    let long_name = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(63)
    );
    let cases: Vec<(String, &'static str, &'static str)> = vec![
        (doc("bogus = 1"), "bogus", "unknown field `bogus`"),
        (doc("[node]\nfoo = 1"), "node.foo", "unknown field `foo`"),
        (doc("[node]\nhostname = \"-bad\""), "node.hostname", "'-'"),
        (doc("[node]\nhostname = \"a..b\""), "node.hostname", "empty label"),
        (doc("[node]\nhostname = \"under_score\""), "node.hostname", "not a hostname"),
        (doc(&format!("[node]\nhostname = \"{long_label}\"")), "node.hostname", "63"),
        (doc(&format!("[node]\nhostname = \"{long_name}\"")), "node.hostname", "253"),
        (doc("[node]\nhostname = 3"), "node.hostname", "invalid type: integer"),
        (doc("[node]\nlabels = { \"bad key\" = \"v\" }"), "node.labels.\"bad key\"", "label name"),
        (doc("[node.labels]\n\"Example.com/x\" = \"v\""), "node.labels.\"Example.com/x\"", "prefix"),
        (doc("[node.labels]\n\"/x\" = \"v\""), "node.labels.\"/x\"", "prefix"),
        (doc("[node.labels]\n\"a/\" = \"v\""), "node.labels.\"a/\"", "empty label name"),
        (doc(&format!("[node.labels]\napp = \"{long_label}\"")), "node.labels.app", "longer than 63"),
        (doc("[node.labels]\napp = \"-x\""), "node.labels.app", "label value"),
        (doc("[node.labels]\napp = 1"), "node.labels.app", "invalid type"),
        (doc("[node]\ntaints = [\"a=b:Sometimes\"]"), "node.taints[0]", "effect \"Sometimes\""),
        (doc("[node]\ntaints = [\"ok:NoSchedule\", \"key=value\"]"), "node.taints[1]", "key[=value]:Effect"),
        (doc("[node]\ntaints = [\"bad key:NoSchedule\"]"), "node.taints[0]", "label name"),
        (doc("[node]\ntaints = \"k:NoSchedule\""), "node.taints", "invalid type"),
        (
            doc("[network]\nroutes = [{ to = \"10.0.0.0/8\", via = \"10.0.0.1\" }, { to = \"10.0.0.0/8\", via = \"10.0.0.x\" }]"),
            "network.routes[1].via",
            "\"10.0.0.x\" is not an IP address",
        ),
        (doc("[[network.routes]]\nto = \"10.0.0.0/8\"\ngw = \"10.0.0.1\""), "network.routes[0].gw", "unknown field `gw`"),
        (doc("[[network.routes]]\nto = \"10.0.0.0/8\""), "network.routes[0]", "missing field `via`"),
        (doc("[[network.routes]]\nto = \"10.0.0.0/8\"\nvia = \"fe80::1\""), "network.routes[0].via", "family"),
        (doc("[[network.routes]]\nto = \"10.0.0.0\"\nvia = \"10.0.0.1\""), "network.routes[0].to", "CIDR"),
        (doc("[network]\naddresses = [\"10.0.0.5/33\"]"), "network.addresses[0]", "prefix length"),
        (doc("[network]\naddresses = [\"::1/129\"]"), "network.addresses[0]", "prefix length"),
        (doc("[network]\naddresses = [\"10.0.0.5\"]"), "network.addresses[0]", "CIDR"),
        (doc("[network]\naddresses = [\"10.0.0.256/8\"]"), "network.addresses[0]", "not an IP address"),
        (doc("[network]\ndns = [\"1.1.1.1\", \"1.1.1\"]"), "network.dns[1]", "\"1.1.1\" is not an IP address"),
        (doc("[network]\nntp = [\"bad host!\"]"), "network.ntp[0]", "neither an IP address nor a host name"),
        (doc("[network]\ndhcp4 = \"yes\""), "network.dhcp4", "invalid type: string"),
        (doc("[network]\nipv6_from_metadata = 1"), "network.ipv6_from_metadata", "invalid type: integer"),
        (doc("[network]\ndhcp6 = true"), "network.dhcp6", "unknown field"),
        (doc("[cluster]\nserver = \"http://10.0.0.2:6443\"\ntoken = \"t\""), "cluster.server", "https://"),
        (doc("[standby]\nservers = [\"https://a:6443\", \"http://b:6443\"]"), "standby.servers[1]", "https://"),
        (doc("[standby]\nserver = \"https://a:6443\""), "standby.server", "unknown field"),
        (doc("[cluster]\nserver = \"https://:6443\"\ntoken = \"t\""), "cluster.server", "host"),
        (doc("[cluster]\nserver = \"https://a:99999\"\ntoken = \"t\""), "cluster.server", "port"),
        (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"K10abc::u:p\""), "cluster.token", "CA hash"),
        (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"\""), "cluster.token", "empty"),
        (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"t\"\nnode_name = \"a_b\""), "cluster.node_name", "not a hostname"),
        (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"t\"\nnode_name = \"Worker-1\""), "cluster.node_name", "lowercase"),
        (doc("[cluster]\nserver = \"https://a:6443\""), "cluster", "missing field `token`"),
        (doc("[cluster]\nserver = \"https://a:6443\"\ntoken = \"t\"\nname = \"x\""), "cluster.name", "unknown field `name`"),
        ("version = 2\n[whatever]\nx = 1\n".into(), "version", "unsupported 2, this basalt reads 1"),
        ("[node]\nhostname = \"a\"\n".into(), "version", "missing"),
        ("version = \"1\"\n".into(), "version", "expected an integer, found string"),
        ("version = 1\n".into(), "api", "missing; the node API needs"),
        (
            "version = 1\n[api]\nlisten = \"0.0.0.0\"\n".to_owned() + &api_section().replace("[api]\n", ""),
            "api.listen",
            "not a socket address",
        ),
        ("version = 1\n[api]\nca = \"x\"\n".into(), "api.ca", "not PEM"),
        (
            format!("version = 1\n[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n{PEM_CERT}'''\n"),
            "api",
            "missing field `key`",
        ),
        (
            format!("version = 1\n[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n{PEM_CERT}'''\nkey = '''\n-----BEGIN PRIVATE KEY-----\nAA\n-----END CERTIFICATE-----\n'''\n"),
            "api.key",
            "ends with END",
        ),
        (
            format!("version = 1\n[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n-----BEGIN CERTIFICATE-----\nAA\n'''\nkey = '''\n{PEM_KEY}'''\n"),
            "api.cert",
            "no END line",
        ),
        (
            format!("version = 1\n[api]\nca = '''\n{PEM_CERT}'''\ncert = '''\n{PEM_CERT}'''\nkey = '''\n{PEM_KEY}'''\nextra = 1\n"),
            "api.extra",
            "unknown field",
        ),
        (
            format!("{}revoked = [\"0a\", \"xyz\"]\n", api_section()).replace("[api]", "version = 1\n[api]"),
            "api.revoked[1]",
            "not a certificate serial",
        ),
        (
            format!("{}revoked = [\"{}\"]\n", api_section(), "a".repeat(43)).replace("[api]", "version = 1\n[api]"),
            "api.revoked[0]",
            "20 octets",
        ),
        (
            format!("{}revoked = \"0a\"\n", api_section()).replace("[api]", "version = 1\n[api]"),
            "api.revoked",
            "invalid type",
        ),
    ];
    let mut cases: Vec<(String, String, &'static str)> = cases
        .into_iter()
        .map(|(t, k, m)| (t, k.to_owned(), m))
        .collect();
    cases.push((
        doc(&format!("[node.labels]\n{long_label} = \"v\"")),
        format!("node.labels.{long_label}"),
        "longer than 63",
    ));
    cases
}

#[test]
fn bad_configs_name_the_key() {
    let cases = bad_cases();
    assert!(cases.len() > 40);
    for (text, key, fragment) in cases {
        let err = match MachineConfig::parse(&text) {
            Ok(_) => panic!("accepted, expected an error at {key}:\n{text}"),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert_eq!(err.key(), Some(&*key), "wrong key in {msg:?} for\n{text}");
        assert!(
            msg.starts_with(&format!("{key}: ")),
            "{msg:?} does not start with the key {key}"
        );
        assert!(msg.contains(fragment), "{msg:?} lacks {fragment:?}");
    }
}

#[test]
fn syntax_errors_keep_toml_location() {
    let err = MachineConfig::parse("version = 1\n[node\n").unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Syntax {
                line: 2,
                column: 6,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.key(), None);
    assert!(err.to_string().contains("line 2, column 6"), "{err}");
    // A key given twice is TOML's business too.
    let err = MachineConfig::parse(&doc("[node]\nhostname = \"a\"\nhostname = \"b\"")).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
}

/// The offending line may hold the join token or the API key: a syntax error names the
/// place and never quotes the text.
#[test]
fn syntax_errors_never_quote_the_document() {
    for text in [
        "version = 1\n[cluster]\ntoken = \"K10abc::server:hunter2-secret\n",
        "version = 1\n[api]\nkey = hunter2-secret\n",
        "version = 1\n[cluster]\ntoken = \"a\"\ntoken = \"hunter2-secret\"\n",
    ] {
        let err = MachineConfig::parse(text).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert!(std::error::Error::source(&err).is_none());
    }
}

#[test]
fn round_trips_through_to_toml() {
    for text in [
        full(),
        doc(""),
        doc("[node]\nhostname = \"x\"\n[cluster]\nserver = \"https://a\"\ntoken = \"p\""),
    ] {
        let c = MachineConfig::parse(&text).unwrap();
        let written = c.to_toml().unwrap();
        let again = MachineConfig::parse(&written).unwrap_or_else(|e| panic!("{e}\n{written}"));
        assert_eq!(again, c, "{written}");
        assert_eq!(again.to_toml().unwrap(), written);
    }
}

#[test]
fn secrets_stay_out_of_display_and_debug() {
    let c = MachineConfig::parse(&full()).unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cr3t-pa55"), "{debug}");
    assert!(!debug.contains("secretkeymaterial"), "{debug}");
    let token = &c.cluster.as_ref().unwrap().token;
    assert_eq!(token.to_string(), format!("K10{HASH}::server:<redacted>"));
    let plain = Token::parse("hunter2").unwrap();
    assert_eq!(plain.to_string(), "<redacted>");
    assert_eq!(format!("{plain:?}"), "Plain(<redacted>)");
    // But the secret is written where K3s and the next boot read it.
    assert!(c.to_toml().unwrap().contains("s3cr3t-pa55"));
    assert!(c.to_toml().unwrap().contains("secretkeymaterial"));
}

#[test]
fn node_name_is_the_lowercased_hostname() {
    let text = doc(
        "[node]\nhostname = \"Worker-1.Example\"\n[cluster]\nserver = \"https://a\"\ntoken = \"t\"",
    );
    let c = MachineConfig::parse(&text).unwrap();
    // The hostname keeps its capitals, in the config and in what is written back.
    assert_eq!(
        c.node.hostname.as_ref().map(Hostname::as_str),
        Some("Worker-1.Example")
    );
    assert!(c.to_toml().unwrap().contains("\"Worker-1.Example\""));
    // The node name derived from it does not.
    assert_eq!(
        c.k3s_node_name().as_ref().map(Hostname::as_str),
        Some("worker-1.example")
    );
    let v: serde_json::Value = serde_json::from_str(&c.k3s_config_json(None).unwrap()).unwrap();
    assert_eq!(v["node-name"], "worker-1.example");

    // An explicit node name must already be lowercase.
    let err = MachineConfig::parse(&doc(
        "[cluster]\nserver = \"https://a\"\ntoken = \"t\"\nnode_name = \"W1\"",
    ))
    .unwrap_err();
    assert_eq!(err.key(), Some("cluster.node_name"), "{err}");
    assert!(err.to_string().contains("lowercase"), "{err}");
}

#[test]
fn k3s_config_json() {
    let c = MachineConfig::parse(&full()).unwrap();
    let json = c
        .k3s_config_json(Some("10.0.0.5".parse().unwrap()))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["server"], "https://10.0.0.2:6443");
    assert_eq!(v["token"], format!("K10{HASH}::server:s3cr3t-pa55"));
    assert_eq!(v["node-name"], "w1");
    assert_eq!(v["node-ip"], "10.0.0.5");
    assert_eq!(
        v["node-label"],
        serde_json::json!([
            "app=",
            "example.com/pool=warm",
            "node.kubernetes.io/x_y=a.b-c_d"
        ])
    );
    assert_eq!(
        v["node-taint"],
        serde_json::json!([
            "dedicated=gpu:NoSchedule",
            "example.com/flaky:PreferNoSchedule",
            "k=:NoExecute"
        ])
    );
    assert_eq!(v.as_object().unwrap().len(), 6);

    // node-name falls back to the hostname; node-ip is optional; escaping is JSON's.
    let c = MachineConfig::parse(&doc(
        "[node]\nhostname = \"h1\"\n[cluster]\nserver = \"https://a\"\ntoken = 'q\"uo\\te'",
    ))
    .unwrap();
    let json = c.k3s_config_json(None).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["node-name"], "h1");
    assert_eq!(v["token"], "q\"uo\\te");
    assert!(v.get("node-ip").is_none());
    assert_eq!(v["node-label"], serde_json::json!([]));
}

// --- property tests -----------------------------------------------------------

fn hostname() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]{1,6}){0,2}"
}

fn label_key() -> impl Strategy<Value = String> {
    "([a-z0-9]{1,5}\\.[a-z]{2,3}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,8}[A-Za-z0-9])?"
}

fn label_value() -> impl Strategy<Value = String> {
    "([A-Za-z0-9]([-A-Za-z0-9_.]{0,8}[A-Za-z0-9])?)?"
}

fn taint() -> impl Strategy<Value = String> {
    (
        label_key(),
        proptest::option::of(label_value()),
        prop_oneof![
            Just("NoSchedule"),
            Just("PreferNoSchedule"),
            Just("NoExecute")
        ],
    )
        .prop_map(|(k, v, e)| match v {
            Some(v) => format!("{k}={v}:{e}"),
            None => format!("{k}:{e}"),
        })
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<std::net::Ipv4Addr>().prop_map(IpAddr::V4),
        any::<std::net::Ipv6Addr>().prop_map(IpAddr::V6),
    ]
}

fn cidr() -> impl Strategy<Value = Cidr> {
    ip().prop_flat_map(|addr| {
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        (0..=max).prop_map(move |prefix| Cidr { addr, prefix })
    })
}

fn route() -> impl Strategy<Value = Route> {
    cidr().prop_flat_map(|to| {
        let via = if to.addr.is_ipv4() {
            any::<std::net::Ipv4Addr>().prop_map(IpAddr::V4).boxed()
        } else {
            any::<std::net::Ipv6Addr>().prop_map(IpAddr::V6).boxed()
        };
        via.prop_map(move |via| Route { to, via })
    })
}

fn token() -> impl Strategy<Value = Token> {
    prop_oneof![
        ("[0-9a-f]{64}", "[a-z]{1,8}", "[!-~]{1,20}").prop_map(|(h, u, p)| Token::Secure {
            ca_hash: h,
            user: u,
            password: p
        }),
        "[!-~]{1,30}".prop_filter_map("K10 prefix", |s| Token::parse(&s).ok()),
    ]
}

fn config() -> impl Strategy<Value = MachineConfig> {
    let node = (
        proptest::option::of(hostname()),
        proptest::collection::btree_map(label_key(), label_value(), 0..4),
        proptest::collection::vec(taint(), 0..3),
    )
        .prop_map(|(h, labels, taints)| NodeConfig {
            hostname: h.map(|h| h.parse().unwrap()),
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
                .collect(),
            taints: taints.into_iter().map(|t| t.parse().unwrap()).collect(),
        });
    let network = (
        any::<bool>(),
        proptest::collection::vec(cidr(), 0..3),
        proptest::collection::vec(route(), 0..3),
        proptest::collection::vec(ip(), 0..3),
        proptest::collection::vec(
            prop_oneof![
                ip().prop_map(Host::Ip),
                hostname().prop_map(|h| Host::Name(h.parse().unwrap()))
            ],
            0..3,
        ),
        any::<bool>(),
    )
        .prop_map(|(dhcp4, addresses, routes, dns, ntp, v6)| NetworkConfig {
            dhcp4,
            addresses,
            routes,
            dns,
            ntp,
            ipv6_from_metadata: v6,
        });
    let api = (ip(), any::<u16>()).prop_map(|(ip, port)| ApiConfig {
        listen: SocketAddr::new(ip, port),
        ca: PEM_CERT.parse().unwrap(),
        cert: format!("{PEM_CERT}{PEM_CERT}").parse().unwrap(),
        key: PEM_KEY.parse().unwrap(),
        revoked: Vec::new(),
    });
    let cluster = proptest::option::of(
        (hostname(), token(), proptest::option::of(hostname())).prop_map(|(host, token, name)| {
            ClusterConfig {
                server: format!("https://{host}:6443").parse().unwrap(),
                token,
                node_name: name.map(|n| n.parse().unwrap()),
                provider_id: None,
            }
        }),
    );
    let standby = proptest::collection::vec(hostname(), 0..3).prop_map(|hosts| StandbyConfig {
        servers: hosts
            .into_iter()
            .map(|h| format!("https://{h}:6443").parse().unwrap())
            .collect(),
    });
    (node, network, api, cluster, standby).prop_map(|(node, network, api, cluster, standby)| {
        MachineConfig {
            version: CONFIG_VERSION,
            node,
            network,
            api,
            cluster,
            standby,
        }
    })
}

/// An error must name a key or be TOML's own.
fn check_error(e: &ConfigError) {
    match e {
        ConfigError::Syntax { .. } | ConfigError::UnsupportedVersion(_) => {}
        ConfigError::Invalid { key, message } => {
            assert!(!key.is_empty() && !message.is_empty(), "{e:?}");
            assert!(e.to_string().starts_with(&format!("{key}: ")));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        if let Err(e) = MachineConfig::parse(&text) {
            check_error(&e);
        }
    }

    #[test]
    fn parse_never_panics_on_tomlish_text(text in "(version = 1\n)?(\\[[a-z.]{1,12}\\]\n)?([a-z_]{1,8} = (\"[ -~]{0,12}\"|[0-9]{1,3}|true|\\[\\])\n){0,6}") {
        if let Err(e) = MachineConfig::parse(&text) {
            check_error(&e);
        }
    }

    #[test]
    fn mutated_valid_documents_fail_cleanly_or_round_trip(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0..3u8, any::<char>()), 1..4)
    ) {
        let mut text: Vec<char> = full().chars().collect();
        for (at, op, c) in edits {
            let i = at.index(text.len());
            match op {
                0 => { text.remove(i); }
                1 => text.insert(i, c),
                _ => text[i] = c,
            }
        }
        let text: String = text.into_iter().collect();
        match MachineConfig::parse(&text) {
            Err(e) => check_error(&e),
            Ok(c) => {
                let written = c.to_toml().unwrap();
                prop_assert_eq!(MachineConfig::parse(&written).unwrap(), c);
            }
        }
    }

    #[test]
    fn generated_configs_round_trip(c in config()) {
        let written = c.to_toml().unwrap();
        let parsed = MachineConfig::parse(&written);
        prop_assert!(parsed.is_ok(), "{:?}\n{}", parsed.err(), written);
        prop_assert_eq!(parsed.unwrap(), c);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The token parser, fuzzed: any text either fails with a typed error or parses to a
    /// token that writes back to exactly the input, and whose Display and Debug never
    /// show the password.
    #[test]
    fn token_parse_is_total_exact_and_redacting(
        text in prop_oneof![
            any::<String>(),
            "K10[0-9a-fA-F]{60,66}(::[ -~]{0,12}(:[ -~]{0,12})?)?",
            "K10[0-9a-f]{64}::[a-z]{1,6}:[!-~]{1,16}",
        ]
    ) {
        match Token::parse(&text) {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(t) => {
                prop_assert_eq!(t.secret_string(), text.clone());
                if let Token::Secure { password, ca_hash, .. } = &t {
                    prop_assert_eq!(ca_hash.len(), 64);
                    prop_assert_eq!(t.ca_hash(), Some(ca_hash.as_str()));
                    // A password that is also a substring of the visible prefix would be
                    // "shown" trivially; only check distinctive ones.
                    if password.len() >= 4 && !format!("K10{ca_hash}::").contains(password.as_str()) {
                        prop_assert!(!t.to_string().contains(password.as_str()), "{}", t);
                        let debug = format!("{t:?}");
                        prop_assert!(!debug.contains(password.as_str()), "{}", debug);
                    }
                } else {
                    prop_assert!(!text.starts_with("K10"));
                    prop_assert_eq!(t.to_string(), "<redacted>");
                }
            }
        }
    }
}

#[test]
fn provider_id_becomes_a_kubelet_arg() {
    let c = MachineConfig::parse(&doc(
        "[cluster]\nserver = \"https://a\"\ntoken = \"t\"\nprovider_id = \"hcloud://42\"",
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&c.k3s_config_json(None).unwrap()).unwrap();
    assert_eq!(
        v["kubelet-arg"],
        serde_json::json!(["provider-id=hcloud://42"])
    );
    let back = MachineConfig::parse(&c.to_toml().unwrap()).unwrap();
    assert_eq!(back, c);
    for bad in ["hcloud:42", "hcloud://", "://x", "hcloud://4 2"] {
        let err = MachineConfig::parse(&doc(&format!(
            "[cluster]\nserver = \"https://a\"\ntoken = \"t\"\nprovider_id = \"{bad}\""
        )))
        .unwrap_err();
        assert_eq!(err.key(), Some("cluster.provider_id"), "{bad}: {err}");
    }
}

#[test]
fn revoked_serials_read_as_openssl_prints_them_and_are_normalized() {
    let text = format!(
        "version = 1\n{}revoked = [\"5A:3F:00\", \"00ab\", \"0\"]\n",
        api_section()
    );
    let c = MachineConfig::parse(&text).expect("valid");
    let got: Vec<&str> = c.api.revoked.iter().map(CertSerial::as_str).collect();
    assert_eq!(got, ["5a3f00", "ab", "0"]);
    let again = MachineConfig::parse(&c.to_toml().expect("toml")).expect("round trip");
    assert_eq!(again, c);
    // Absent: none revoked, and nothing written back.
    let c = MachineConfig::parse(&doc("")).expect("valid");
    assert!(c.api.revoked.is_empty());
    assert!(!c.to_toml().expect("toml").contains("revoked"));
}
