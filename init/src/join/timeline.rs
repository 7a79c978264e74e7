//! Where an apply's time went, on PID1's monotonic clock: each step of a join marks when
//! it ended, counted from the arrival of the request's head, and the whole is printed in
//! one line once the agent runs (`basalt bench join` reads it):
//!
//! `[basalt] join: timeline ms after the request: parsed 1, validated 4, …, exec 31`
//!
//! Steps run in two threads (the CA check and the work beside it), so the marks are kept
//! in the order they were made, not sorted.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How the printed line begins, after `[basalt] `.
pub const LINE: &str = "join: timeline ms after the request: ";

/// The marks of one apply.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    marks: Mutex<Vec<(&'static str, Duration)>>,
    /// Lines to print once the agent runs, not before (the console is slow).
    notes: Mutex<Vec<String>>,
}

impl Timeline {
    /// A timeline counting from `start`, the request's arrival.
    pub fn new(start: Instant) -> Timeline {
        Timeline {
            start,
            marks: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Marks `step` as ended now.
    pub fn mark(&self, step: &'static str) {
        self.mark_at(step, Instant::now());
    }

    /// Marks `step` as ended at `at`.
    pub fn mark_at(&self, step: &'static str, at: Instant) {
        let since = at.saturating_duration_since(self.start);
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((step, since));
    }

    /// Marks the steps of a CA check, whose times count from its own start.
    pub fn mark_check(&self, times: &basalt_api::k3s::CheckTimes) {
        let steps = [
            ("check-connected", times.connected),
            ("check-handshake", times.handshake),
            ("check-response", times.response),
            ("check-verified", times.verified),
            ("check-hashed", times.hashed),
        ];
        for (name, at) in steps {
            if let Some(d) = at {
                self.mark_at(name, times.start + d);
            }
        }
        let reused = times.reused();
        if !reused.is_empty() {
            self.note(format!("join: CA check {}", reused.join(", ")));
        }
    }

    /// Keeps `line` to print later ([`Timeline::take_notes`]).
    pub fn note(&self, line: String) {
        self.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    /// The lines kept by [`Timeline::note`], in order; they are not kept any longer.
    pub fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// When `step` ended, if it was marked.
    pub fn get(&self, step: &str) -> Option<Duration> {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(name, _)| *name == step)
            .map(|(_, d)| *d)
    }

    /// The line to print: [`LINE`], then `step ms` pairs in the order marked.
    pub fn line(&self) -> String {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let steps: Vec<String> = marks
            .iter()
            .map(|(name, d)| format!("{name} {}", d.as_millis()))
            .collect();
        format!("{LINE}{}", steps.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_counted_from_the_start_in_the_order_made() {
        let start = Instant::now();
        let t = Timeline::new(start);
        t.mark_at("parsed", start + Duration::from_millis(3));
        t.mark_at("exec", start + Duration::from_millis(40));
        t.mark_at("synced", start + Duration::from_millis(12));
        assert_eq!(
            t.line(),
            "join: timeline ms after the request: parsed 3, exec 40, synced 12"
        );
        assert_eq!(t.get("exec"), Some(Duration::from_millis(40)));
        assert_eq!(t.get("spawned"), None);
    }

    #[test]
    fn notes_are_kept_until_taken_once() {
        let t = Timeline::new(Instant::now());
        t.note("join: CA check 40 ms; prepared alongside in 12 ms".into());
        assert_eq!(
            t.take_notes(),
            ["join: CA check 40 ms; prepared alongside in 12 ms"]
        );
        assert!(t.take_notes().is_empty());
    }

    #[test]
    fn a_check_marks_the_steps_it_reached() {
        let start = Instant::now();
        let t = Timeline::new(start);
        let times = basalt_api::k3s::CheckTimes {
            start: start + Duration::from_millis(10),
            connected: Some(Duration::from_millis(2)),
            handshake: Some(Duration::from_millis(20)),
            response: None,
            verified: None,
            hashed: None,
            known: false,
            resumed: false,
            kept: false,
        };
        t.mark_check(&times);
        assert_eq!(
            t.line(),
            "join: timeline ms after the request: check-connected 12, check-handshake 30"
        );
        assert!(t.take_notes().is_empty());
        // A check on a resumed session that found a prefetch's work says so.
        t.mark_check(&basalt_api::k3s::CheckTimes {
            known: true,
            resumed: true,
            ..times
        });
        assert_eq!(t.take_notes(), ["join: CA check resumed, prefetched"]);
        // And one sent on the connection the prefetch left open.
        t.mark_check(&basalt_api::k3s::CheckTimes {
            known: true,
            kept: true,
            ..times
        });
        assert_eq!(t.take_notes(), ["join: CA check kept, prefetched"]);
    }
}
