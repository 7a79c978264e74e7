//! Work of the boot that standby does not need but a promotion does, done in a thread of
//! its own after stage 2 has started it, and waited for by the promotion only.
//!
//! Standby needs the network, entropy, the config and the node API; K3s's kernel setup
//! (cgroup controllers, netfilter, bridge and overlay modules, their sysctls) and what
//! standby prepares on STATE for a join matter only once `k3s agent` is about to start.
//! [`Background::spawn`] runs such work; [`Background::wait`] blocks until it has ended
//! and says how. The one the promotion waits for is put in the node's [`k3s_prep`] slot,
//! whose [`PrepSlot::wait`] returns at once while it is empty (stage 2 did not get that
//! far, or a test).

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a promotion waits for K3s's preparation. It takes about a second under TCG,
/// plus K3s's extraction of its userspace the first time (bounded by
/// [`crate::k3s_warm::TIMEOUT`]); this bounds a thread stuck in the kernel.
pub const K3S_PREP_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackgroundError {
    #[error("{name} failed: {reason}")]
    Failed { name: &'static str, reason: String },
    #[error("{name} not finished after {waited:?}")]
    Timeout {
        name: &'static str,
        waited: Duration,
    },
    #[error("start {name}: {reason}")]
    Spawn { name: &'static str, reason: String },
}

/// One piece of background work and, once it has ended, how.
pub struct Background {
    name: &'static str,
    result: Mutex<Option<Result<(), String>>>,
    ended: Condvar,
}

impl Background {
    /// Runs `work` in a thread named `name`. Its `Err` is the reason a waiter gets.
    pub fn spawn(
        name: &'static str,
        work: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Arc<Background> {
        let me = Arc::new(Background {
            name,
            result: Mutex::new(None),
            ended: Condvar::new(),
        });
        let done = Arc::clone(&me);
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || done.finish(work()));
        if let Err(e) = spawned {
            me.finish(Err(format!("start the thread: {e}")));
        }
        me
    }

    fn finish(&self, result: Result<(), String>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.ended.notify_all();
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the work has ended (well or not).
    pub fn is_done(&self) -> bool {
        self.result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits at most `timeout` for the work to end; its failure is this error's reason.
    pub fn wait(&self, timeout: Duration) -> Result<(), BackgroundError> {
        let deadline = Instant::now() + timeout;
        let mut result = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*result {
                Some(Ok(())) => return Ok(()),
                Some(Err(reason)) => {
                    return Err(BackgroundError::Failed {
                        name: self.name,
                        reason: reason.clone(),
                    })
                }
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackgroundError::Timeout {
                    name: self.name,
                    waited: timeout,
                });
            }
            result = self
                .ended
                .wait_timeout(result, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Where the background work a promotion waits for is put once started: a handle shared
/// by stage 2, which fills it, and the joiner, which waits on it.
#[derive(Clone, Default)]
pub struct PrepSlot(Arc<Mutex<Option<Arc<Background>>>>);

impl PrepSlot {
    /// Puts the work in the slot; the last one put is the one waited for.
    pub fn set(&self, prep: Arc<Background>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(prep);
    }

    /// Waits (at most [`K3S_PREP_WAIT`]) for the work in the slot and fails with its
    /// reason; returns at once when the slot is empty.
    pub fn wait(&self) -> Result<(), BackgroundError> {
        let prep = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match prep {
            Some(prep) => prep.wait(K3S_PREP_WAIT),
            None => Ok(()),
        }
    }
}

/// The node's slot for K3s's preparation: stage 2 fills it, a promotion waits on it.
pub fn k3s_prep() -> PrepSlot {
    static SLOT: OnceLock<PrepSlot> = OnceLock::new();
    SLOT.get_or_init(PrepSlot::default).clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_waiter_waits_until_the_work_has_ended() {
        let (go, gate) = mpsc::channel::<()>();
        let bg = Background::spawn("prep-test", move || {
            gate.recv().map_err(|e| e.to_string())?;
            Ok(())
        });
        assert!(!bg.is_done());
        assert_eq!(
            bg.wait(Duration::from_millis(50)),
            Err(BackgroundError::Timeout {
                name: "prep-test",
                waited: Duration::from_millis(50)
            })
        );
        let waiter = {
            let bg = Arc::clone(&bg);
            std::thread::spawn(move || {
                let r = bg.wait(Duration::from_secs(10));
                (r, bg.is_done())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "returned before the work ended");
        go.send(()).expect("send");
        let (result, done) = waiter.join().expect("join");
        assert_eq!(result, Ok(()));
        assert!(done);
        // Once ended, every later wait answers at once.
        assert_eq!(bg.wait(Duration::ZERO), Ok(()));
    }

    #[test]
    fn an_empty_slot_does_not_wait_and_a_filled_one_waits_for_its_work() {
        let slot = PrepSlot::default();
        assert_eq!(slot.wait(), Ok(()));
        let shared = slot.clone();
        let (go, gate) = mpsc::channel::<()>();
        shared.set(Background::spawn("slot-test", move || {
            gate.recv().map_err(|e| e.to_string())
        }));
        let waiter = std::thread::spawn(move || slot.wait());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        go.send(()).expect("send");
        assert_eq!(waiter.join().expect("join"), Ok(()));
    }

    #[test]
    fn a_failure_reaches_every_waiter_with_its_reason() {
        let bg = Background::spawn("k3s-prep-test", || {
            Err("module overlay: load /lib/modules/x/overlay.ko: Exec format error".into())
        });
        for _ in 0..2 {
            let err = bg.wait(Duration::from_secs(10)).unwrap_err();
            assert_eq!(
                err.to_string(),
                "k3s-prep-test failed: module overlay: load /lib/modules/x/overlay.ko: Exec format error"
            );
        }
    }
}
