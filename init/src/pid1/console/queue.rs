//! The console's bounded queue and its writer thread.
//!
//! A serial console at 115200 baud takes about 11 KiB/s, and a console that is not read
//! at all (flow control, a hung terminal) takes nothing. Whoever logs (the main loop
//! relaying service output, the API threads, the join worker) only queues the line and
//! never waits; one writer thread does the slow writes. When the queue is full the line
//! is dropped and counted, and the writer says how many were lost before the next line
//! it writes. Service output may fill only [`SERVICE_LINES`] of the queue, so that a
//! service flooding its output cannot crowd out PID1's own lines (the boot timeline,
//! warnings and errors). Every line also went to the kernel log, synchronously: that is
//! an in-memory ring, and the `quiet` command line keeps info lines off the console.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Lines waiting for the console writer, at most.
pub const QUEUE_LINES: usize = 2048;
/// Lines of service output the queue takes, at most; the rest is kept for PID1's own.
pub const SERVICE_LINES: usize = QUEUE_LINES * 3 / 4;

/// Whose line it is: the share of the queue it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// PID1's own line: may use the whole queue.
    Pid1,
    /// A supervised service's output: may use [`SERVICE_LINES`].
    Service,
}

impl Origin {
    fn limit(self) -> usize {
        match self {
            Origin::Pid1 => QUEUE_LINES,
            Origin::Service => SERVICE_LINES,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<String>,
    /// Lines dropped since boot.
    dropped: u64,
    /// Dropped and not yet reported on the console.
    unreported: u64,
    /// The writer holds a line it has taken and not finished writing.
    writing: bool,
}

/// Lines between their writers and the console writer thread.
#[derive(Debug, Default)]
pub struct Queue {
    state: Mutex<State>,
    /// Signalled when a line is queued.
    queued: Condvar,
    /// Signalled when the writer has written everything queued.
    drained: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only lines behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `line` unless its share of the queue is full; never waits for the console.
    /// Returns whether the line was queued.
    pub fn push(&self, line: String, origin: Origin) -> bool {
        let mut s = self.lock();
        if s.lines.len() >= origin.limit() {
            s.dropped += 1;
            s.unreported += 1;
            return false;
        }
        s.lines.push_back(line);
        drop(s);
        self.queued.notify_one();
        true
    }

    /// Lines dropped since boot because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// The writer thread's loop: takes each line in order and writes it to `out`, one
    /// at a time, outside the lock. A note of dropped lines comes before the next line.
    /// Returns only if `out` is gone for good (it never is for the console).
    pub fn run(&self, out: &mut dyn Write) {
        loop {
            let (line, unreported) = {
                let mut s = self.lock();
                while s.lines.is_empty() {
                    s.writing = false;
                    self.drained.notify_all();
                    s = self.queued.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                s.writing = true;
                let unreported = std::mem::take(&mut s.unreported);
                (s.lines.pop_front(), unreported)
            };
            if unreported > 0 {
                let note = super::format_line(
                    super::Level::Warn,
                    &format!("console too slow: {unreported} line(s) dropped"),
                );
                let _ = writeln!(out, "{note}");
            }
            if let Some(line) = line {
                // Best effort: PID1 must not stop because a console is missing.
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    /// Waits until everything queued so far is written, at most `timeout`: before PID1
    /// execs stage 2, reboots or powers off. Returns whether the queue drained.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while !s.lines.is_empty() || s.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .drained
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::sync::Arc;

    /// A console that writes only when the test lets it: each `writeln!` is one line
    /// handed over on `lines`, after a permit from `permits`.
    struct Gate {
        permits: Receiver<()>,
        lines: Sender<String>,
        buf: Vec<u8>,
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.buf.extend_from_slice(b);
            while let Some(nl) = self.buf.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                self.permits
                    .recv()
                    .map_err(|_| std::io::Error::other("closed"))?;
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                let _ = self.lines.send(text);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn gated() -> (Arc<Queue>, Sender<()>, Receiver<String>) {
        let queue = Arc::new(Queue::default());
        let (permit_tx, permits) = mpsc::channel();
        let (line_tx, lines) = mpsc::channel();
        let q = Arc::clone(&queue);
        std::thread::spawn(move || {
            q.run(&mut Gate {
                permits,
                lines: line_tx,
                buf: Vec::new(),
            })
        });
        (queue, permit_tx, lines)
    }

    #[test]
    fn a_stalled_console_never_blocks_a_writer_and_drops_are_counted_and_reported() {
        let (queue, permits, lines) = gated();
        // The writer takes the first line and stalls in its write.
        assert!(queue.push("first".into(), Origin::Service));
        while !queue.lock().writing {
            std::thread::yield_now();
        }
        let flood = 10_000;
        let started = Instant::now();
        let queued = (0..flood)
            .filter(|i| queue.push(format!("svc {i}"), Origin::Service))
            .count();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "pushing into a stalled console took {:?}",
            started.elapsed()
        );
        assert_eq!(queued, SERVICE_LINES);
        assert_eq!(queue.dropped(), (flood - SERVICE_LINES) as u64);
        // PID1's own lines still get in, up to the whole queue.
        assert!(queue.push("[basalt] ready t=1.0".into(), Origin::Pid1));
        assert!(
            !queue.flush(Duration::from_millis(50)),
            "nothing was written"
        );

        // Let the console go: everything kept comes out in order, with one note.
        for _ in 0..(1 + queued + 1 + 1) {
            permits.send(()).expect("writer alive");
        }
        let got: Vec<String> = (0..(1 + queued + 1 + 1))
            .map(|_| lines.recv_timeout(Duration::from_secs(10)).expect("line"))
            .collect();
        assert!(queue.flush(Duration::from_secs(10)));
        assert_eq!(got[0], "first");
        let note = format!(
            "[basalt] warning: console too slow: {} line(s) dropped",
            flood - SERVICE_LINES
        );
        assert_eq!(got[1], note);
        let expected: Vec<String> = (0..queued).map(|i| format!("svc {i}")).collect();
        assert_eq!(got[2..2 + queued], expected[..]);
        assert_eq!(got[2 + queued], "[basalt] ready t=1.0");
    }

    #[test]
    fn pid1_lines_use_the_whole_queue_then_are_dropped_too() {
        let (queue, permits, _lines) = gated();
        assert!(queue.push("held".into(), Origin::Pid1));
        while !queue.lock().writing {
            std::thread::yield_now();
        }
        let queued = (0..QUEUE_LINES + 10)
            .filter(|i| queue.push(format!("own {i}"), Origin::Pid1))
            .count();
        assert_eq!(queued, QUEUE_LINES);
        assert_eq!(queue.dropped(), 10);
        // Service output finds its share full.
        assert!(!queue.push("svc".into(), Origin::Service));
        assert_eq!(queue.dropped(), 11);
        drop(permits);
    }

    #[test]
    fn flush_waits_for_the_line_being_written() {
        let (queue, permits, lines) = gated();
        assert!(queue.flush(Duration::from_millis(10)), "empty queue");
        queue.push("one".into(), Origin::Pid1);
        assert!(!queue.flush(Duration::from_millis(100)));
        permits.send(()).expect("writer alive");
        assert_eq!(lines.recv().expect("line"), "one");
        assert!(queue.flush(Duration::from_secs(10)));
    }
}
