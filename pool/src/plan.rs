//! The controller's decisions as a pure function: from the servers the provider lists (and
//! what their node APIs said), the steps of one reconcile pass. No I/O here; the executor
//! in [`crate::controller`] carries the steps out.
//!
//! The rules (issue 13):
//! - `creating`: reached standby → `standby`, or promoted into the cluster it was created
//!   for (a cold start claims a server for a cluster with `basalt.io/cluster`); not within
//!   the timeout → deleted (and replaced by the standby rule).
//! - `promoting` left by an earlier controller life: the node says joined → `active`,
//!   failed → `broken`, still standby → the join config is applied again (same cluster:
//!   nothing is promoted twice), no answer past the timeout → `broken`.
//! - `broken` and servers without a known state: deleted.
//! - standbys: fewer than N (counting those on their way) → create; more → delete the
//!   surplus, oldest image first; a standby on an older image than the newest → one extra
//!   is created, and the surplus rule then deletes the old one: one at a time.
//! - `active`: never touched here.
//! - every create fits under `max`, counting every server of the pool in every state.

use crate::provider::{Server, ServerState, LABEL_CLUSTER, LABEL_GENERATION, LABEL_IMAGE};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

/// When a server entered its current state (UNIX seconds).
pub const LABEL_SINCE: &str = "basalt.io/since";

/// What a promoting server's node API said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinSeen {
    Joined,
    Joining,
    /// Still without `[cluster]`: the join config never arrived.
    Standby,
    Failed(String),
    Unreachable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeleteReason {
    /// Did not reach standby within the timeout.
    StandbyTimeout,
    Broken,
    /// Its state label is missing or unknown.
    UnknownState,
    /// More standbys than wanted.
    Surplus,
}

impl DeleteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::StandbyTimeout => "standby_timeout",
            DeleteReason::Broken => "broken",
            DeleteReason::UnknownState => "unknown_state",
            DeleteReason::Surplus => "surplus",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create a standby on the newest image.
    Create,
    Delete {
        id: String,
        reason: DeleteReason,
    },
    MarkStandby {
        id: String,
    },
    /// Apply the join config for `cluster` (a claimed cold start, or a promotion an
    /// earlier controller began).
    Promote {
        id: String,
        cluster: String,
    },
    MarkActive {
        id: String,
    },
    MarkBroken {
        id: String,
        reason: String,
    },
}

/// Everything one pass decides on.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub servers: &'a [Server],
    /// Image id → its creation time; the newest image is the one servers are created from.
    pub images: &'a BTreeMap<String, SystemTime>,
    pub newest_image: Option<&'a str>,
    pub now: SystemTime,
    pub standby: u32,
    pub max: u32,
    pub standby_timeout: Duration,
    pub promote_timeout: Duration,
    /// `creating` servers whose node API reports standby.
    pub ready: &'a BTreeSet<String>,
    /// `promoting` servers that no promotion of this controller is working on, and what
    /// their node said.
    pub promoting: &'a BTreeMap<String, JoinSeen>,
    /// Servers a promotion of this controller is working on: left alone.
    pub in_flight: &'a BTreeSet<String>,
}

fn since(s: &Server) -> SystemTime {
    s.labels
        .get(LABEL_SINCE)
        .and_then(|v| v.parse::<u64>().ok())
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap_or(s.created)
}

fn older_than(now: SystemTime, t: SystemTime, limit: Duration) -> bool {
    now.duration_since(t).is_ok_and(|age| age > limit)
}

fn cluster(s: &Server) -> Option<&str> {
    s.labels.get(LABEL_CLUSTER).map(String::as_str)
}

/// The steps of one pass, in order: state changes first, then deletions, then creates.
pub fn plan(input: &PlanInput<'_>) -> Vec<Step> {
    let mut steps = Vec::new();
    for s in input
        .servers
        .iter()
        .filter(|s| !input.in_flight.contains(&s.id))
    {
        if let Some(step) = server_step(input, s) {
            steps.push(step);
        }
    }
    steps.extend(standby_steps(input, &steps));
    steps
}

/// What one server needs on its own.
fn server_step(input: &PlanInput<'_>, s: &Server) -> Option<Step> {
    let id = s.id.clone();
    match s.state() {
        None => Some(Step::Delete {
            id,
            reason: DeleteReason::UnknownState,
        }),
        Some(ServerState::Broken) => Some(Step::Delete {
            id,
            reason: DeleteReason::Broken,
        }),
        Some(ServerState::Creating) if input.ready.contains(&s.id) => Some(match cluster(s) {
            Some(c) => Step::Promote {
                id,
                cluster: c.to_owned(),
            },
            None => Step::MarkStandby { id },
        }),
        Some(ServerState::Creating) => older_than(input.now, s.created, input.standby_timeout)
            .then_some(Step::Delete {
                id,
                reason: DeleteReason::StandbyTimeout,
            }),
        Some(ServerState::Promoting) => promoting_step(input, s),
        Some(ServerState::Standby | ServerState::Active) => None,
    }
}

fn promoting_step(input: &PlanInput<'_>, s: &Server) -> Option<Step> {
    let id = s.id.clone();
    let Some(c) = cluster(s) else {
        return Some(Step::MarkBroken {
            id,
            reason: "promoting without a cluster label".into(),
        });
    };
    let timed_out = older_than(input.now, since(s), input.promote_timeout);
    match input.promoting.get(&s.id)? {
        JoinSeen::Joined => Some(Step::MarkActive { id }),
        JoinSeen::Failed(e) => Some(Step::MarkBroken {
            id,
            reason: format!("join failed: {e}"),
        }),
        JoinSeen::Standby => Some(Step::Promote {
            id,
            cluster: c.to_owned(),
        }),
        JoinSeen::Joining if timed_out => Some(Step::MarkBroken {
            id,
            reason: "not joined within the promote timeout".into(),
        }),
        JoinSeen::Unreachable(e) if timed_out => Some(Step::MarkBroken {
            id,
            reason: format!("node API unreachable past the promote timeout: {e}"),
        }),
        JoinSeen::Joining | JoinSeen::Unreachable(_) => None,
    }
}

/// The image's age rank: unknown images (deleted snapshots) are the oldest.
fn image_time(input: &PlanInput<'_>, s: &Server) -> SystemTime {
    s.labels
        .get(LABEL_IMAGE)
        .and_then(|i| input.images.get(i))
        .copied()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn generation(s: &Server) -> u64 {
    s.labels
        .get(LABEL_GENERATION)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

/// Scale up, scale down and refresh of the unclaimed standbys.
fn standby_steps(input: &PlanInput<'_>, earlier: &[Step]) -> Vec<Step> {
    let deleted: BTreeSet<&str> = earlier
        .iter()
        .filter_map(|st| match st {
            Step::Delete { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let free = |s: &&Server| {
        cluster(s).is_none() && !input.in_flight.contains(&s.id) && !deleted.contains(s.id.as_str())
    };
    let mut standbys: Vec<&Server> = input
        .servers
        .iter()
        .filter(free)
        .filter(|s| s.state() == Some(ServerState::Standby))
        .collect();
    let creating: Vec<&Server> = input
        .servers
        .iter()
        .filter(free)
        .filter(|s| s.state() == Some(ServerState::Creating))
        .collect();
    let ready = creating
        .iter()
        .filter(|s| input.ready.contains(&s.id))
        .count();
    let pending = creating.len() - ready;
    let have_standby = standbys.len() + ready;
    let target = input.standby as usize;
    let mut steps = Vec::new();
    if have_standby > target {
        // Oldest image first, then the oldest server.
        standbys.sort_by_key(|s| (image_time(input, s), generation(s), s.created));
        for s in standbys.iter().take(have_standby - target) {
            steps.push(Step::Delete {
                id: s.id.clone(),
                reason: DeleteReason::Surplus,
            });
        }
        return steps;
    }
    let mut want = target.saturating_sub(have_standby + pending);
    let outdated = input.newest_image.is_some_and(|newest| {
        standbys
            .iter()
            .any(|s| s.labels.get(LABEL_IMAGE).map(String::as_str) != Some(newest))
    });
    if want == 0 && outdated && pending == 0 && target > 0 {
        want = 1;
    }
    if input.newest_image.is_none() {
        return steps;
    }
    let room = (input.max as usize).saturating_sub(input.servers.len());
    steps.extend(std::iter::repeat_n(Step::Create, want.min(room)));
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{LABEL_POOL, LABEL_STATE};

    const T0: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn server(id: &str, state: &str, image: &str, cluster: Option<&str>, created: u64) -> Server {
        let mut labels = BTreeMap::from([
            (LABEL_POOL.to_owned(), "p".to_owned()),
            (LABEL_STATE.to_owned(), state.to_owned()),
            (LABEL_IMAGE.to_owned(), image.to_owned()),
            (LABEL_GENERATION.to_owned(), created.to_string()),
        ]);
        if let Some(c) = cluster {
            labels.insert(LABEL_CLUSTER.into(), c.into());
        }
        Server {
            id: id.into(),
            name: format!("p-{id}"),
            labels,
            created: at(created),
            api: None,
        }
    }

    struct World {
        servers: Vec<Server>,
        images: BTreeMap<String, SystemTime>,
        newest: Option<String>,
        ready: BTreeSet<String>,
        promoting: BTreeMap<String, JoinSeen>,
        in_flight: BTreeSet<String>,
        standby: u32,
        max: u32,
        now: SystemTime,
    }

    impl World {
        fn new(standby: u32, max: u32) -> World {
            World {
                servers: vec![],
                images: BTreeMap::from([("new".into(), at(50)), ("old".into(), at(0))]),
                newest: Some("new".into()),
                ready: BTreeSet::new(),
                promoting: BTreeMap::new(),
                in_flight: BTreeSet::new(),
                standby,
                max,
                now: at(1000),
            }
        }

        fn with(mut self, s: Server) -> World {
            self.servers.push(s);
            self
        }

        fn plan(&self) -> Vec<Step> {
            plan(&PlanInput {
                servers: &self.servers,
                images: &self.images,
                newest_image: self.newest.as_deref(),
                now: self.now,
                standby: self.standby,
                max: self.max,
                standby_timeout: Duration::from_secs(300),
                promote_timeout: Duration::from_secs(120),
                ready: &self.ready,
                promoting: &self.promoting,
                in_flight: &self.in_flight,
            })
        }
    }

    fn creates(steps: &[Step]) -> usize {
        steps.iter().filter(|s| **s == Step::Create).count()
    }

    #[test]
    fn an_empty_pool_creates_its_standbys_within_max() {
        assert_eq!(creates(&World::new(3, 10).plan()), 3);
        assert_eq!(creates(&World::new(3, 2).plan()), 2);
        let full = World::new(3, 2)
            .with(server("1", "active", "new", Some("a"), 0))
            .with(server("2", "broken", "new", None, 0));
        let steps = full.plan();
        assert_eq!(
            creates(&steps),
            0,
            "broken still counts until gone: {steps:?}"
        );
    }

    #[test]
    fn no_image_means_no_create() {
        let mut w = World::new(2, 10);
        w.newest = None;
        assert_eq!(creates(&w.plan()), 0);
    }

    #[test]
    fn servers_on_their_way_count_toward_the_standbys() {
        let w = World::new(2, 10)
            .with(server("1", "standby", "new", None, 900))
            .with(server("2", "creating", "new", None, 900));
        assert_eq!(w.plan(), vec![]);
    }

    #[test]
    fn a_ready_server_becomes_standby_and_a_late_one_is_deleted() {
        let mut w = World::new(2, 10)
            .with(server("1", "creating", "new", None, 900))
            .with(server("2", "creating", "new", None, 100));
        w.ready.insert("1".into());
        let steps = w.plan();
        assert!(
            steps.contains(&Step::MarkStandby { id: "1".into() }),
            "{steps:?}"
        );
        assert!(steps.contains(&Step::Delete {
            id: "2".into(),
            reason: DeleteReason::StandbyTimeout
        }));
        // The deleted one is replaced, but only once it is gone (max counts it now).
        assert_eq!(creates(&steps), 1, "{steps:?}");
    }

    #[test]
    fn a_claimed_cold_start_is_promoted_into_its_cluster_once_ready() {
        let mut w = World::new(0, 10).with(server("1", "creating", "new", Some("a"), 900));
        assert_eq!(w.plan(), vec![]);
        w.ready.insert("1".into());
        assert_eq!(
            w.plan(),
            vec![Step::Promote {
                id: "1".into(),
                cluster: "a".into()
            }]
        );
    }

    #[test]
    fn surplus_standbys_go_oldest_image_first() {
        let w = World::new(1, 10)
            .with(server("1", "standby", "new", None, 10))
            .with(server("2", "standby", "old", None, 20))
            .with(server("3", "standby", "new", None, 5));
        let steps = w.plan();
        assert_eq!(
            steps,
            vec![
                Step::Delete {
                    id: "2".into(),
                    reason: DeleteReason::Surplus
                },
                Step::Delete {
                    id: "3".into(),
                    reason: DeleteReason::Surplus
                },
            ]
        );
    }

    #[test]
    fn refresh_replaces_old_standbys_one_at_a_time() {
        let w = World::new(2, 10)
            .with(server("1", "standby", "old", None, 10))
            .with(server("2", "standby", "old", None, 20))
            .with(server("9", "active", "old", Some("a"), 5));
        assert_eq!(w.plan(), vec![Step::Create]);
        // While the replacement boots, nothing more.
        let w = w.with(server("3", "creating", "new", None, 990));
        assert_eq!(w.plan(), vec![]);
        // Once it is standby, the oldest old one goes; the active node is never touched.
        let mut w = w;
        w.ready.insert("3".into());
        let steps = w.plan();
        assert_eq!(
            steps,
            vec![
                Step::MarkStandby { id: "3".into() },
                Step::Delete {
                    id: "1".into(),
                    reason: DeleteReason::Surplus
                }
            ]
        );
    }

    #[test]
    fn refresh_respects_max() {
        let w = World::new(2, 2)
            .with(server("1", "standby", "old", None, 10))
            .with(server("2", "standby", "old", None, 20));
        assert_eq!(w.plan(), vec![]);
    }

    #[test]
    fn promoting_servers_are_resolved_by_what_their_node_says() {
        let mut w = World::new(0, 10)
            .with(server("1", "promoting", "new", Some("a"), 990))
            .with(server("2", "promoting", "new", Some("a"), 990))
            .with(server("3", "promoting", "new", Some("b"), 990))
            .with(server("4", "promoting", "new", Some("a"), 990))
            .with(server("5", "promoting", "new", Some("a"), 10))
            .with(server("6", "promoting", "new", None, 990));
        w.promoting.insert("1".into(), JoinSeen::Joined);
        w.promoting
            .insert("2".into(), JoinSeen::Failed("CA hash".into()));
        w.promoting.insert("3".into(), JoinSeen::Standby);
        w.promoting
            .insert("4".into(), JoinSeen::Unreachable("refused".into()));
        w.promoting
            .insert("5".into(), JoinSeen::Unreachable("refused".into()));
        w.promoting.insert("6".into(), JoinSeen::Joined);
        let steps = w.plan();
        assert!(steps.contains(&Step::MarkActive { id: "1".into() }));
        assert!(steps.iter().any(|s| matches!(s, Step::MarkBroken { id, reason } if id == "2" && reason.contains("CA hash"))));
        assert!(steps.contains(&Step::Promote {
            id: "3".into(),
            cluster: "b".into()
        }));
        assert!(
            !steps.iter().any(|s| format!("{s:?}").contains("\"4\"")),
            "{steps:?}"
        );
        assert!(steps
            .iter()
            .any(|s| matches!(s, Step::MarkBroken { id, .. } if id == "5")));
        assert!(steps
            .iter()
            .any(|s| matches!(s, Step::MarkBroken { id, .. } if id == "6")));
    }

    #[test]
    fn servers_in_flight_are_left_alone() {
        let mut w = World::new(1, 10)
            .with(server("1", "promoting", "new", Some("a"), 990))
            .with(server("2", "standby", "new", None, 990))
            .with(server("3", "standby", "new", None, 990));
        w.promoting.insert("1".into(), JoinSeen::Failed("x".into()));
        w.in_flight.insert("1".into());
        w.in_flight.insert("2".into());
        // 2 is being claimed: not a standby to count or delete; 3 is the only one.
        assert_eq!(w.plan(), vec![]);
    }

    #[test]
    fn broken_and_unlabelled_servers_are_deleted() {
        let mut odd = server("2", "standby", "new", None, 0);
        odd.labels.insert(LABEL_STATE.into(), "weird".into());
        let w = World::new(0, 10)
            .with(server("1", "broken", "new", Some("a"), 0))
            .with(odd);
        assert_eq!(
            w.plan(),
            vec![
                Step::Delete {
                    id: "1".into(),
                    reason: DeleteReason::Broken
                },
                Step::Delete {
                    id: "2".into(),
                    reason: DeleteReason::UnknownState
                },
            ]
        );
    }
}
