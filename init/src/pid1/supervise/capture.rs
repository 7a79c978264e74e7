//! A service's output: read line by line from non-blocking pipes (PID1 never waits on a
//! child's write), kept in a bounded log per service.

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::AsRawFd;

/// Lines kept per service; older lines are dropped first.
pub const LOG_LINES: usize = 1000;
/// Bytes kept per service (sum of line lengths).
pub const LOG_BYTES: usize = 256 * 1024;
/// A line longer than this is cut into pieces, so one endless line cannot grow memory.
pub(super) const MAX_LINE: usize = 4096;

/// Bounded log of one service.
#[derive(Debug, Default)]
pub(super) struct Ring {
    pub(super) lines: VecDeque<String>,
    pub(super) bytes: usize,
}

impl Ring {
    pub(super) fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > LOG_LINES || self.bytes > LOG_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }
}

/// A non-blocking pipe from a child and the unfinished line read from it.
pub(super) struct Stream<R> {
    pipe: Option<R>,
    partial: Vec<u8>,
}

impl<R: Read + AsRawFd> Stream<R> {
    pub(super) fn new(pipe: Option<R>) -> Self {
        if let Some(p) = &pipe {
            // Without O_NONBLOCK a read would stall PID1 until the child writes.
            if let Ok(flags) = fcntl(p.as_raw_fd(), FcntlArg::F_GETFL) {
                let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
                let _ = fcntl(p.as_raw_fd(), FcntlArg::F_SETFL(flags));
            }
        }
        Self {
            pipe,
            partial: Vec::new(),
        }
    }

    /// Reads what is available; returns complete lines. At EOF the pipe is closed and the
    /// unfinished line flushed.
    pub(super) fn drain(&mut self, out: &mut Vec<String>) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        let mut buf = [0u8; 8192];
        let eof = loop {
            match pipe.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    for &b in &buf[..n] {
                        if b == b'\n' {
                            out.push(take_line(&mut self.partial));
                        } else {
                            self.partial.push(b);
                            if self.partial.len() >= MAX_LINE {
                                out.push(take_line(&mut self.partial));
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        if eof {
            self.pipe = None;
            if !self.partial.is_empty() {
                out.push(take_line(&mut self.partial));
            }
        }
    }
}

fn take_line(partial: &mut Vec<u8>) -> String {
    let line = String::from_utf8_lossy(partial).into_owned();
    partial.clear();
    line
}
