//! Being PID1: the console and kernel log, the service supervisor and its mailbox (how
//! other threads reach it), and the power button.

pub mod console;
pub mod mailbox;
pub mod power;
pub mod supervise;
