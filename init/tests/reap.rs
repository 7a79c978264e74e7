//! PID1's reaper, in a process of its own: `reap` waits for any child (waitpid(-1)), so
//! it must not run beside tests whose children it would take.

use basalt_init::pid1::reap::reap;
use basalt_init::pid1::supervise::Exit;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn reap_collects_every_exited_child_with_its_exit() {
    let mut pids: Vec<i32> = ["true", "false"]
        .iter()
        .map(|p| std::process::Command::new(p).spawn().expect("spawn").id() as i32)
        .collect();
    pids.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reaped = Vec::new();
    while reaped.len() < pids.len() {
        assert!(
            Instant::now() < deadline,
            "children still not reaped: {reaped:?}"
        );
        reaped.extend(reap());
        std::thread::sleep(Duration::from_millis(10));
    }
    reaped.sort_by_key(|(pid, _)| pid.as_raw());
    let got: Vec<i32> = reaped.iter().map(|(p, _)| p.as_raw()).collect();
    assert_eq!(got, pids);
    assert!(reaped.iter().any(|(_, e)| *e == Exit::Code(0)));
    assert!(reaped.iter().any(|(_, e)| *e == Exit::Code(1)));
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} left as a zombie"
        );
    }
    // Nothing left: an empty answer, not a hang.
    assert!(reap().is_empty());
}
