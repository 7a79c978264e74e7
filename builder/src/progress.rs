//! Progress of a build: one line per step on stderr, or an indicatif spinner when stderr
//! is a terminal; each step's wall time and whether it was reused are kept for the
//! manifest.

use serde::Serialize;
use std::io::IsTerminal;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: String,
    pub seconds: f64,
    /// The step's result came from the intermediate cache.
    pub reused: bool,
}

pub struct Progress {
    total: usize,
    done: Vec<StepTiming>,
    current: Option<(String, Instant, Option<indicatif::ProgressBar>)>,
    tty: bool,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Progress {
            total,
            done: vec![],
            current: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Starts a step (ending the previous one as not reused, if still open).
    pub fn start(&mut self, step: &str) {
        self.finish(false);
        let n = self.done.len() + 1;
        let label = format!("[{n}/{}] {step}", self.total);
        let bar = if self.tty {
            let bar = indicatif::ProgressBar::new_spinner().with_message(label);
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            Some(bar)
        } else {
            eprintln!("basalt: {label}");
            None
        };
        self.current = Some((step.to_owned(), Instant::now(), bar));
    }

    /// Ends the current step.
    pub fn finish(&mut self, reused: bool) {
        if let Some((step, started, bar)) = self.current.take() {
            let seconds = started.elapsed().as_secs_f64();
            let note = if reused { "reused" } else { "done" };
            let n = self.done.len() + 1;
            let line = format!("[{n}/{}] {step}: {note} in {seconds:.1} s", self.total);
            match bar {
                Some(bar) => bar.finish_with_message(line),
                None => eprintln!("basalt: {line}"),
            }
            self.done.push(StepTiming {
                step,
                seconds,
                reused,
            });
        }
    }

    /// A line of detail under the current step.
    pub fn note(&self, text: &str) {
        match &self.current {
            Some((_, _, Some(bar))) => bar.println(format!("basalt:       {text}")),
            _ => eprintln!("basalt:       {text}"),
        }
    }

    pub fn timings(mut self) -> Vec<StepTiming> {
        self.finish(false);
        self.done
    }
}
