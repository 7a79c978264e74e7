//! Progress of the byte stream: an indicatif bar (bytes, rate, ETA) on a terminal, a
//! plain line every few seconds otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes read so far, shared with the reader that counts them.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A bar when stderr is a terminal, lines otherwise.
    Auto,
    Lines,
    Quiet,
}

/// Shows `counter` against `total` until dropped.
pub struct Reporter {
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Reporter {
    pub fn start(mode: Mode, what: &str, total: u64, counter: Counter) -> Reporter {
        let stop = tokio_util::sync::CancellationToken::new();
        let tty = std::io::stderr().is_terminal();
        let task = match mode {
            Mode::Quiet => None,
            Mode::Auto if tty => Some(tokio::spawn(bar(
                what.to_owned(),
                total,
                counter,
                stop.clone(),
            ))),
            _ => Some(tokio::spawn(lines(
                what.to_owned(),
                total,
                counter,
                stop.clone(),
            ))),
        };
        Reporter { stop, task }
    }

    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn bar(
    what: String,
    total: u64,
    counter: Counter,
    stop: tokio_util::sync::CancellationToken,
) {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(what);
    loop {
        pb.set_position(counter.get());
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = stop.cancelled() => break,
        }
    }
    pb.set_position(counter.get());
    pb.finish();
}

async fn lines(
    what: String,
    total: u64,
    counter: Counter,
    stop: tokio_util::sync::CancellationToken,
) {
    let started = Instant::now();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let line = |done: u64| {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        eprintln!(
            "basalt: {what}: {:.1} of {:.1} MiB ({:.1} MiB/s)",
            mib(done),
            mib(total),
            mib(done) / secs
        );
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => line(counter.get()),
            () = stop.cancelled() => break,
        }
    }
    line(counter.get());
}
