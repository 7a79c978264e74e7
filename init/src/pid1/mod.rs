//! Being PID1: the console and kernel log, the service supervisor and its mailbox (how
//! other threads reach it), the main loop, reaping, shutdown, the power button, and what
//! a panic does.

pub mod console;
pub mod mailbox;
pub mod memory;
pub mod panic;
pub mod power;
pub mod reap;
pub mod serve;
pub mod shutdown;
pub mod supervise;
