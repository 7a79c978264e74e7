//! PID1's reaper, in a process of its own: `reap` waits for any child (waitpid(-1)), so
//! it must not run beside tests whose children it would take.

use basalt_init::stage2::reap;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn reap_collects_every_exited_child_and_reports_when_none_remain() {
    let pids: Vec<u32> = (0..3)
        .map(|_| {
            std::process::Command::new("true")
                .spawn()
                .expect("spawn")
                .id()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while reap() {
        assert!(Instant::now() < deadline, "children still not reaped");
        std::thread::sleep(Duration::from_millis(10));
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} left as a zombie"
        );
    }
}
