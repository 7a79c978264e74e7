//! The Hetzner provider and the controller against the fake Hetzner API (basalt-hcloud's
//! test double), with faults injected: 429, a proxy's 5xx, and lost answers on create and
//! on label updates. The node API is the node double (the fake's servers boot nothing).

// Helpers of tests: a failure here is a test failure, and the lint's test exemption does
// not reach outside `#[test]` functions.
#![allow(clippy::unwrap_used)]

use basalt_api::config::Token;
use basalt_client::pki::Ca;
use basalt_hcloud::client::Timing;
use basalt_hcloud::fake::{Fake, FakeOptions, Fault, Op};
use basalt_pool::config::{ClusterConfig, HetznerSettings};
use basalt_pool::controller::{Controller, ControllerError, Settings};
use basalt_pool::hetzner::{Hetzner, LABEL_LOCK_HOLDER};
use basalt_pool::provider::{Provider, LABEL_CLUSTER, LABEL_POOL, LABEL_STATE};
use basalt_pool::testing::FakeNodes;
use std::collections::BTreeMap;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

macro_rules! need_fake {
    ($name:expr) => {
        if !basalt_hcloud::fake::available_or_skip($name) {
            return;
        }
    };
}

fn timing() -> Timing {
    Timing {
        call_timeout: Duration::from_secs(10),
        attempts: 4,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        rate_limit_max_wait: Duration::from_secs(2),
        action_poll: Duration::from_millis(20),
        action_timeout: Duration::from_secs(30),
    }
}

/// A fake with one snapshot labelled as `basalt hcloud upload` labels it.
async fn fake_with_snapshot(dir: &std::path::Path) -> (Fake, u64) {
    let fake = Fake::start(FakeOptions {
        disk_bytes: 4 * MIB,
        action_time: Duration::from_millis(20),
        ..FakeOptions::default()
    })
    .await
    .expect("start the fake");
    let img = dir.join("node.raw");
    std::fs::write(&img, vec![0x5a; 4096]).unwrap();
    let labels = BTreeMap::from([("basalt.io/image".to_owned(), "k3s-node".to_owned())]);
    let id = fake
        .add_snapshot(&img, labels, Duration::from_secs(60))
        .await
        .unwrap();
    (fake, id)
}

fn provider(fake: &Fake) -> Hetzner {
    Hetzner::new(
        &HetznerSettings {
            server_type: "cx22".into(),
            location: Some("fsn1".into()),
            image_selector: "basalt.io/image=k3s-node".into(),
            endpoint: Some(fake.endpoint()),
            token: fake.token().into(),
        },
        timing(),
    )
    .unwrap()
}

fn settings(standby: u32, max: u32, holder: &str, network: Option<&str>) -> Settings {
    Settings {
        pool: "hz".into(),
        standby,
        max,
        standby_timeout: Duration::from_secs(60),
        promote_timeout: Duration::from_secs(5),
        tick: Duration::from_millis(50),
        lock_ttl: Duration::from_secs(30),
        holder: holder.into(),
        clusters: vec![ClusterConfig {
            name: "a".into(),
            server: "https://10.0.0.2:6443".parse().unwrap(),
            token: Token::parse("token-a").unwrap(),
            client_name: "autoscaler-a".into(),
            labels: Default::default(),
            taints: vec![],
            network: network.map(str::to_owned),
        }],
    }
}

fn states(fake: &Fake) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in fake.servers() {
        let st = s.labels.get(LABEL_STATE).cloned().unwrap_or_default();
        *m.entry(st).or_insert(0) += 1;
    }
    m
}

/// Passes until `done` holds (each checked against `max`), or panics.
async fn converge(
    c: &Controller<Hetzner, FakeNodes>,
    fake: &Fake,
    max: usize,
    done: impl Fn(&BTreeMap<String, usize>) -> bool,
) {
    for _ in 0..30 {
        let _ = c.reconcile().await;
        assert!(
            fake.servers().len() <= max,
            "more than max: {:#?}",
            fake.servers()
        );
        if done(&states(fake)) {
            return;
        }
    }
    panic!("did not converge: {:?}", states(fake));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_converges_under_faults_without_exceeding_max_or_leaking() {
    need_fake!("pool on the fake Hetzner API");
    let dir = tempfile::tempdir().unwrap();
    let (fake, snapshot) = fake_with_snapshot(dir.path()).await;
    let nodes = FakeNodes::new();
    fake.inject(Op::CreateServer, Fault::RateLimited { reset_in: 1 }, 1);
    fake.inject(Op::CreateServer, Fault::Status(503), 1);
    fake.inject(Op::CreateServer, Fault::LostAnswer, 2);
    fake.inject(Op::UpdateServer, Fault::LostAnswer, 2);
    fake.inject(Op::UpdateServer, Fault::Status(502), 1);
    fake.inject(Op::UpdateServer, Fault::RateLimited { reset_in: 1 }, 1);
    fake.inject(Op::ListServers, Fault::Code(503, "unavailable"), 1);
    let c = Controller::start(
        provider(&fake),
        nodes.clone(),
        Ca::generate().unwrap(),
        settings(2, 3, "h1", None),
    )
    .await
    .unwrap();
    converge(&c, &fake, 3, |s| s.get("standby") == Some(&2)).await;
    assert_eq!(fake.servers().len(), 2, "{:#?}", fake.servers());
    // A lost create answer was resolved by name, not sent twice.
    let reqs = fake.requests();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /v1/servers?name=hz-")),
        "{reqs:#?}"
    );

    // Lost answers on every try of a label update: the pass fails, the next converges.
    fake.inject(Op::UpdateServer, Fault::LostAnswer, 4);
    let r = c.promote("a", 1).await.unwrap();
    // The promoting label's answers were all lost, but it landed: the controller looks
    // before taking another standby, and promotes that one.
    assert_eq!(r.promoted.len(), 1, "{r:?}");
    assert_eq!((r.cold, r.deferred), (0, 0), "{r:?}");
    converge(&c, &fake, 3, |s| {
        s.get("active") == Some(&1) && s.get("standby") == Some(&2)
    })
    .await;
    let active = fake
        .servers()
        .into_iter()
        .find(|s| s.labels.get(LABEL_STATE).map(String::as_str) == Some("active"))
        .unwrap();
    assert_eq!(active.labels[LABEL_CLUSTER], "a");
    assert_eq!(active.image, Some(snapshot));
    assert_eq!(
        nodes.joined().len(),
        1,
        "promoted once: {:?}",
        nodes.joined()
    );
    assert_eq!(
        nodes.provider_ids().values().next().cloned(),
        Some(format!("hcloud://{}", active.id))
    );
    // Every server of the fake is the pool's, standby or active: nothing leaked.
    assert_eq!(fake.servers().len(), 3);
    for s in fake.servers() {
        assert_eq!(s.labels[LABEL_POOL], "hz");
        assert!(
            ["standby", "active"].contains(&s.labels[LABEL_STATE].as_str()),
            "{s:?}"
        );
    }
    let text = c.metrics_text();
    assert!(
        text.contains("basalt_pool_api_calls_total{api=\"provider\""),
        "{text}"
    );
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_controller_is_refused_by_the_lock_key() {
    need_fake!("pool lock on the fake Hetzner API");
    let dir = tempfile::tempdir().unwrap();
    let (fake, _) = fake_with_snapshot(dir.path()).await;
    let ttl = Duration::from_secs(1);
    let p1 = provider(&fake);
    let p2 = provider(&fake);
    assert!(p1.lock("hz", "h1", ttl).await.unwrap());
    assert!(!p2.lock("hz", "h2", ttl).await.unwrap(), "fresh: refused");
    assert!(p1.lock("hz", "h1", ttl).await.unwrap(), "renewed");
    let keys = fake.ssh_keys();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].name, "basalt-pool-lock-hz");
    assert_eq!(keys[0].labels[LABEL_LOCK_HOLDER], "h1");
    // Through the controller as well.
    let mut s = settings(1, 2, "h2", None);
    s.lock_ttl = ttl;
    let refused = Controller::start(p2, FakeNodes::new(), Ca::generate().unwrap(), s.clone()).await;
    assert!(matches!(refused, Err(ControllerError::LockHeld { .. })));
    // Once the holder stops renewing, the lock is taken over.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let c2 = Controller::start(
        provider(&fake),
        FakeNodes::new(),
        Ca::generate().unwrap(),
        s,
    )
    .await
    .unwrap();
    assert_eq!(fake.ssh_keys()[0].labels[LABEL_LOCK_HOLDER], "h2");
    assert!(!p1.lock("hz", "h1", ttl).await.unwrap(), "h1 lost it");
    c2.reconcile().await.unwrap();
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_server_is_attached_to_its_clusters_network() {
    need_fake!("pool networks on the fake Hetzner API");
    let dir = tempfile::tempdir().unwrap();
    let (fake, _) = fake_with_snapshot(dir.path()).await;
    let net = fake.add_network("net-a");
    fake.inject(Op::AttachToNetwork, Fault::LostAnswer, 1);
    let c = Controller::start(
        provider(&fake),
        FakeNodes::new(),
        Ca::generate().unwrap(),
        settings(1, 2, "h1", Some("net-a")),
    )
    .await
    .unwrap();
    converge(&c, &fake, 2, |s| s.get("standby") == Some(&1)).await;
    let r = c.promote("a", 1).await.unwrap();
    assert_eq!(r.promoted.len(), 1, "{r:?}");
    let active: Vec<_> = fake
        .servers()
        .into_iter()
        .filter(|s| s.labels.get(LABEL_STATE).map(String::as_str) == Some("active"))
        .collect();
    assert_eq!(active.len(), 1);
    assert_eq!(
        active[0].networks,
        vec![net],
        "attached once, after a lost answer"
    );
    // The standbys are not on any cluster's network.
    converge(&c, &fake, 2, |s| s.get("standby") == Some(&1)).await;
    for s in fake.servers() {
        if s.labels[LABEL_STATE] == "standby" {
            assert!(s.networks.is_empty(), "{s:?}");
        }
    }
    fake.shutdown().await;
}
