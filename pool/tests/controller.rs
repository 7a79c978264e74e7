//! The controller against the in-memory provider double and the node API double.

// Helpers of tests: a failure here is a test failure, and the lint's test exemption does
// not reach outside `#[test]` functions.
#![allow(clippy::unwrap_used)]

use basalt_api::config::Token;
use basalt_client::pki::Ca;
use basalt_pool::config::ClusterConfig;
use basalt_pool::controller::{Controller, ControllerError, Settings};
use basalt_pool::provider::{Provider, Server, ServerState, LABEL_CLUSTER, LABEL_IMAGE};
use basalt_pool::testing::{FakeNodes, Freeze, MemoryProvider};
use std::sync::Arc;
use std::time::Duration;

type Ctl = Controller<MemoryProvider, FakeNodes>;

const A_URL: &str = "https://10.0.0.2:6443";
const B_URL: &str = "https://10.1.0.2:6443";

fn cluster(name: &str, url: &str) -> ClusterConfig {
    ClusterConfig {
        name: name.into(),
        server: url.parse().unwrap(),
        token: Token::parse(&format!("token-of-{name}")).unwrap(),
        client_name: format!("autoscaler-{name}"),
        labels: Default::default(),
        taints: vec![],
        network: None,
    }
}

fn settings(standby: u32, max: u32, holder: &str) -> Settings {
    Settings {
        pool: "p".into(),
        standby,
        max,
        standby_timeout: Duration::from_secs(30),
        promote_timeout: Duration::from_secs(5),
        tick: Duration::from_millis(20),
        lock_ttl: Duration::from_secs(30),
        holder: holder.into(),
        clusters: vec![cluster("a", A_URL), cluster("b", B_URL)],
    }
}

fn cloud() -> (MemoryProvider, FakeNodes) {
    let p = MemoryProvider::new();
    p.add_image("img-1", Duration::from_secs(3600));
    (p, FakeNodes::new())
}

async fn start(p: &MemoryProvider, n: &FakeNodes, s: Settings) -> Ctl {
    Controller::start(p.clone(), n.clone(), Ca::generate().unwrap(), s)
        .await
        .expect("the controller starts")
}

async fn passes(c: &Ctl, n: usize) {
    for _ in 0..n {
        let r = c.reconcile().await.expect("a pass");
        assert!(r.errors.is_empty() || !r.steps.is_empty(), "{r:?}");
    }
}

fn count(p: &MemoryProvider, state: ServerState) -> usize {
    p.servers_now()
        .iter()
        .filter(|s| s.state() == Some(state))
        .count()
}

fn in_cluster(p: &MemoryProvider, state: ServerState, cluster: &str) -> Vec<Server> {
    p.servers_now()
        .into_iter()
        .filter(|s| {
            s.state() == Some(state)
                && s.labels.get(LABEL_CLUSTER).map(String::as_str) == Some(cluster)
        })
        .collect()
}

/// Every server ever created is either still there or was deleted; nothing else exists.
fn assert_no_leak(p: &MemoryProvider) {
    let (created, deleted) = p.history();
    let now = p.servers_now();
    assert_eq!(
        created.len(),
        deleted.len() + now.len(),
        "created {created:?}, deleted {deleted:?}, now {now:#?}"
    );
    for s in &now {
        assert!(
            matches!(s.state(), Some(ServerState::Standby | ServerState::Active)),
            "left over: {s:#?}"
        );
    }
}

#[tokio::test]
async fn the_pool_fills_promotes_warm_and_refills() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(2, 5, "h1")).await;
    passes(&c, 2).await;
    assert_eq!(count(&p, ServerState::Standby), 2);

    let r = c.promote("a", 1).await.unwrap();
    assert_eq!(r.promoted.len(), 1, "{r:?}");
    assert_eq!((r.cold, r.unmet), (0, 0));
    let active = in_cluster(&p, ServerState::Active, "a");
    assert_eq!(active.len(), 1);
    assert_eq!(r.promoted[0], p.provider_id(&active[0]));
    assert_eq!(
        n.joined().get(&active[0].name).map(String::as_str),
        Some(A_URL)
    );
    // The kubelet is told its provider id, which is what NodeGroupNodes lists.
    assert_eq!(
        n.provider_ids().get(&active[0].name),
        Some(&format!("memory://{}", active[0].id))
    );
    assert_eq!(c.target_size("a").await.unwrap(), 1);
    assert_eq!(c.target_size("b").await.unwrap(), 0);

    passes(&c, 2).await;
    assert_eq!(count(&p, ServerState::Standby), 2, "refilled");
    assert_eq!(count(&p, ServerState::Active), 1);
    assert_no_leak(&p);
    let text = c.metrics_text();
    assert!(
        text.contains("basalt_pool_servers{state=\"active\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("basalt_pool_promote_seconds_count{path=\"warm\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("basalt_pool_create_to_standby_seconds_count 3"),
        "{text}"
    );
}

#[tokio::test]
async fn a_standby_that_fails_to_join_is_broken_and_the_next_is_tried() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(3, 6, "h1")).await;
    passes(&c, 2).await;
    // Newest first: the last one created is tried first, and fails.
    let mut standbys = p.servers_now();
    standbys.sort_by_key(|s| s.created);
    n.fail_join(&standbys[2].name);
    let r = c.promote("a", 2).await.unwrap();
    assert_eq!(r.promoted.len(), 2, "{r:?}");
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].0, standbys[2].name);
    assert_eq!(in_cluster(&p, ServerState::Broken, "a").len(), 1);
    let status = c.status().await.unwrap();
    let broken = status.servers.iter().find(|s| s.state == "broken").unwrap();
    assert!(
        broken.last_error.as_deref().unwrap_or("").contains("CA"),
        "{broken:?}"
    );
    // The broken one is deleted, and the pool refills.
    passes(&c, 3).await;
    assert_eq!(count(&p, ServerState::Broken), 0);
    assert_eq!(count(&p, ServerState::Active), 2);
    assert_eq!(count(&p, ServerState::Standby), 3);
    assert_no_leak(&p);
    assert!(c
        .metrics_text()
        .contains("basalt_pool_failures_total{reason=\"promote\"} 1"));
}

#[tokio::test]
async fn a_shortfall_is_created_cold_for_the_cluster_within_max() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(1, 4, "h1")).await;
    passes(&c, 2).await;
    let r = c.promote("a", 5).await.unwrap();
    assert_eq!(r.promoted.len(), 1, "{r:?}");
    // 4 servers at most: 1 promoted, 3 cold, 1 unmet.
    assert_eq!((r.cold, r.unmet), (3, 1), "{r:?}");
    assert_eq!(in_cluster(&p, ServerState::Creating, "a").len(), 3);
    assert_eq!(c.target_size("a").await.unwrap(), 4);
    assert_eq!(c.status().await.unwrap().cold_starts.get("a"), Some(&3));
    // Once booted they join cluster a.
    passes(&c, 2).await;
    assert_eq!(in_cluster(&p, ServerState::Active, "a").len(), 4);
    assert_eq!(n.joined().values().filter(|u| *u == A_URL).count(), 4);
    assert!(p.peak() <= 4, "peak {}", p.peak());
    // No room for the standby while the pool is at max.
    assert_eq!(count(&p, ServerState::Standby), 0);
    assert!(c
        .metrics_text()
        .contains("basalt_pool_promote_seconds_count{path=\"cold\"} 3"));
}

#[tokio::test]
async fn max_holds_under_transient_failures_and_the_pool_converges() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(3, 3, "h1")).await;
    p.fail_next("create", 2);
    p.fail_next("set_labels", 1);
    for _ in 0..8 {
        let _ = c.reconcile().await;
    }
    assert_eq!(count(&p, ServerState::Standby), 3);
    assert!(p.peak() <= 3);
    assert_no_leak(&p);
    assert!(c
        .metrics_text()
        .contains("basalt_pool_api_retries_total{api=\"provider\",op=\"create\"} 2"));
}

#[tokio::test]
async fn a_server_that_never_boots_is_deleted_and_replaced() {
    let (p, n) = cloud();
    let mut s = settings(1, 2, "h1");
    s.standby_timeout = Duration::from_millis(300);
    let c = start(&p, &n, s).await;
    passes(&c, 1).await;
    let first = p.servers_now()[0].name.clone();
    n.never_boot(&first);
    passes(&c, 1).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    passes(&c, 3).await;
    assert!(p.servers_now().iter().all(|s| s.name != first));
    assert_eq!(count(&p, ServerState::Standby), 1);
    assert_no_leak(&p);
    assert!(c
        .metrics_text()
        .contains("basalt_pool_failures_total{reason=\"standby_timeout\"} 1"));
}

#[tokio::test]
async fn refresh_replaces_standbys_one_at_a_time_and_leaves_active_nodes() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(2, 4, "h1")).await;
    passes(&c, 2).await;
    c.promote("a", 1).await.unwrap();
    passes(&c, 2).await;
    p.add_image("img-2", Duration::ZERO);
    let mut peak_standby_on_new = 0;
    for _ in 0..10 {
        passes(&c, 1).await;
        assert!(p.servers_now().len() <= 4);
        let creating = count(&p, ServerState::Creating);
        assert!(creating <= 1, "one at a time");
        peak_standby_on_new = peak_standby_on_new.max(creating);
    }
    let image = |s: &Server| s.labels.get(LABEL_IMAGE).cloned().unwrap_or_default();
    let servers = p.servers_now();
    let standbys: Vec<_> = servers
        .iter()
        .filter(|s| s.state() == Some(ServerState::Standby))
        .collect();
    assert_eq!(standbys.len(), 2);
    assert!(standbys.iter().all(|s| image(s) == "img-2"));
    let active = in_cluster(&p, ServerState::Active, "a");
    assert_eq!(active.len(), 1);
    assert_eq!(image(&active[0]), "img-1", "active nodes are never touched");
    let status = c.status().await.unwrap();
    let a = status.servers.iter().find(|s| s.state == "active").unwrap();
    assert!(a.outdated, "{a:?}");
    assert_eq!(status.newest_image.as_deref(), Some("img-2"));
    assert_no_leak(&p);
}

#[tokio::test]
async fn scale_down_deletes_surplus_standbys_oldest_image_first() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(2, 4, "h1")).await;
    passes(&c, 2).await;
    drop(c);
    p.add_image("img-2", Duration::ZERO);
    p.age_lock(Duration::from_secs(60));
    let c = start(&p, &n, settings(3, 4, "h2")).await;
    passes(&c, 2).await;
    assert_eq!(count(&p, ServerState::Standby), 3);
    drop(c);
    p.age_lock(Duration::from_secs(60));
    let c = start(&p, &n, settings(1, 4, "h3")).await;
    // 3 standbys (two on img-1) and a fourth on img-2 that the refresh made, just ready:
    // the three standbys go, oldest image first, and the ready one stays.
    let r = c.reconcile().await.unwrap();
    assert_eq!(r.steps.len(), 4, "{r:?}");
    let left = p.servers_now();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].labels[LABEL_IMAGE], "img-2");
}

#[tokio::test]
async fn a_cluster_cannot_list_or_delete_another_clusters_nodes() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(2, 6, "h1")).await;
    passes(&c, 2).await;
    let ra = c.promote("a", 1).await.unwrap();
    let rb = c.promote("b", 1).await.unwrap();
    let a_nodes = c.nodes("a").await.unwrap();
    assert_eq!(a_nodes.len(), 1);
    assert_eq!(a_nodes[0].provider_id, ra.promoted[0]);
    assert!(c
        .nodes("b")
        .await
        .unwrap()
        .iter()
        .all(|x| x.provider_id != ra.promoted[0]));
    // b names a's node: refused, nothing deleted.
    let e = c
        .delete_nodes("b", &[rb.promoted[0].clone(), ra.promoted[0].clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(e, ControllerError::NotInCluster { ref provider_id, .. } if *provider_id == ra.promoted[0]),
        "{e}"
    );
    assert_eq!(count(&p, ServerState::Active), 2);
    passes(&c, 2).await;
    // Standbys belong to no cluster: not deletable through one either.
    let standby = p
        .servers_now()
        .into_iter()
        .find(|s| s.state() == Some(ServerState::Standby))
        .unwrap();
    assert!(c
        .delete_nodes("a", &[p.provider_id(&standby)])
        .await
        .is_err());
    let done = c.delete_nodes("a", &ra.promoted).await.unwrap();
    assert_eq!(done, ra.promoted);
    assert_eq!(in_cluster(&p, ServerState::Active, "a").len(), 0);
    assert_eq!(in_cluster(&p, ServerState::Active, "b").len(), 1);
    assert!(matches!(
        c.nodes("c").await,
        Err(ControllerError::UnknownCluster(_))
    ));
    assert_eq!(c.cluster_for_client("autoscaler-b"), Some("b"));
}

#[tokio::test]
async fn a_second_controller_is_refused_while_the_lock_is_fresh() {
    let (p, n) = cloud();
    let c1 = start(&p, &n, settings(1, 2, "h1")).await;
    passes(&c1, 1).await;
    let second = Controller::start(
        p.clone(),
        n.clone(),
        Ca::generate().unwrap(),
        settings(1, 2, "h2"),
    )
    .await;
    assert!(matches!(second, Err(ControllerError::LockHeld { .. })));
    // A stale lock (its holder gone) is taken over, and the old holder then stops.
    p.age_lock(Duration::from_secs(60));
    let c2 = start(&p, &n, settings(1, 2, "h2")).await;
    assert!(matches!(
        c1.reconcile().await,
        Err(ControllerError::LockLost { .. })
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    assert!(matches!(
        c1.run(stop).await,
        Err(ControllerError::LockLost { .. })
    ));
    passes(&c2, 2).await;
    assert_eq!(count(&p, ServerState::Standby), 1);
}

/// Runs `work` on a controller until the provider freezes, then drops both: a controller
/// killed right there.
async fn kill_when_frozen<F>(p: &MemoryProvider, c: Ctl, work: impl FnOnce(Arc<Ctl>) -> F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let c = Arc::new(c);
    let task = tokio::spawn(work(c.clone()));
    for _ in 0..500 {
        if p.frozen() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(p.frozen(), "the freeze point was never reached");
    task.abort();
    let _ = task.await;
    drop(c);
    p.thaw();
    // The new process comes up after the old lock went stale.
    p.age_lock(Duration::from_secs(60));
}

#[tokio::test]
async fn killed_right_after_labelling_promoting_converges_without_promoting_twice() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(2, 4, "h1")).await;
    passes(&c, 2).await;
    p.freeze(Freeze::AfterLabel("promoting".into()));
    kill_when_frozen(
        &p,
        c,
        |c| async move { c.promote("a", 1).await.map(|_| ()) },
    )
    .await;
    let promoting = in_cluster(&p, ServerState::Promoting, "a");
    assert_eq!(promoting.len(), 1);
    assert_eq!(
        n.applies().get(&promoting[0].name).copied().unwrap_or(0),
        0,
        "killed before the apply"
    );

    let c = start(&p, &n, settings(2, 4, "h2")).await;
    passes(&c, 3).await;
    assert_eq!(count(&p, ServerState::Active), 1);
    assert_eq!(count(&p, ServerState::Standby), 2);
    assert_eq!(
        in_cluster(&p, ServerState::Active, "a")[0].id,
        promoting[0].id
    );
    assert_eq!(n.joined().len(), 1, "{:?}", n.joined());
    assert!(n.applies().values().all(|a| *a <= 1), "{:?}", n.applies());
    assert!(p.peak() <= 4);
    assert_no_leak(&p);
}

#[tokio::test]
async fn killed_after_the_apply_the_node_is_asked_whether_it_joined() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(1, 3, "h1")).await;
    passes(&c, 2).await;
    // The node stays `joining` while the controller waits for `joined`; it is killed
    // mid-wait, after the apply, with the server still labelled `promoting`.
    n.set_joining_polls(1000);
    let c = Arc::new(c);
    let task = tokio::spawn({
        let c = c.clone();
        async move { c.promote("a", 1).await.map(|_| ()) }
    });
    for _ in 0..200 {
        if n.applies().values().any(|a| *a > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    let _ = task.await;
    drop(c);
    p.age_lock(Duration::from_secs(60));
    n.set_joining_polls(0);
    let c = start(&p, &n, settings(1, 3, "h2")).await;
    passes(&c, 3).await;
    assert_eq!(count(&p, ServerState::Active), 1);
    assert_eq!(count(&p, ServerState::Standby), 1);
    let applies = n.applies();
    assert_eq!(
        applies.values().filter(|a| **a > 0).count(),
        1,
        "{applies:?}"
    );
    assert!(
        applies.values().all(|a| *a <= 1),
        "not applied again: {applies:?}"
    );
    assert_no_leak(&p);
}

#[tokio::test]
async fn killed_right_after_creating_a_server_converges_without_a_leak() {
    let (p, n) = cloud();
    let c = start(&p, &n, settings(2, 3, "h1")).await;
    p.freeze(Freeze::AfterCreate);
    kill_when_frozen(&p, c, |c| async move { c.reconcile().await.map(|_| ()) }).await;
    assert_eq!(count(&p, ServerState::Creating), 1);

    let c = start(&p, &n, settings(2, 3, "h2")).await;
    passes(&c, 3).await;
    assert_eq!(count(&p, ServerState::Standby), 2);
    assert_eq!(p.servers_now().len(), 2);
    assert!(p.peak() <= 3);
    assert_no_leak(&p);
}

#[tokio::test]
async fn the_loop_refills_after_a_promotion_by_itself() {
    let (p, n) = cloud();
    let c = Arc::new(start(&p, &n, settings(2, 4, "h1")).await);
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (c, stop) = (c.clone(), stop.clone());
        async move { c.run(stop).await }
    });
    let wait_for = |want: usize| {
        let p = p.clone();
        async move {
            for _ in 0..300 {
                if count(&p, ServerState::Standby) == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("never {want} standbys: {:#?}", p.servers_now());
        }
    };
    wait_for(2).await;
    c.promote("b", 1).await.unwrap();
    wait_for(2).await;
    assert_eq!(count(&p, ServerState::Active), 1);
    stop.cancel();
    run.await.unwrap().unwrap();
    let status = c.status().await.unwrap();
    assert_eq!(status.servers.len(), 3);
    assert!(status.last_pass_error.is_none(), "{status:?}");
}
