//! PID1's heap: one malloc arena, trimmed after a join.
//!
//! glibc's malloc gives a thread that allocates while another holds the main arena an
//! arena of its own, up to 8 per CPU, and keeps it for the process's life. PID1 serves
//! each API connection in a thread and runs the join's CA check beside its preparation,
//! so arenas appeared with every burst of requests, each holding on to what its threads
//! had freed (TLS records, certificate parsing). PID1 has no allocation-heavy threads
//! to spread over arenas, so one is enough ([`limit_arenas`]), and [`trim`] hands what a
//! join freed back to the kernel.

/// Makes every thread share the main arena. Called once, first thing in PID1, before
/// any other thread exists.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc parameter; no pointer is involved.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns freed heap memory to the kernel (`malloc_trim`: the top of the heap and the
/// free pages inside it).
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and may be called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    /// Heap bytes in use and held, from glibc's own statistics.
    fn heap() -> (usize, usize) {
        // SAFETY: mallinfo2 only reads malloc's statistics.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks, info.arena)
    }

    #[test]
    fn trim_returns_what_was_freed() {
        // Many small blocks (below the mmap threshold), freed out of order so that the
        // top of the heap cannot simply shrink.
        let blocks: Vec<Vec<u8>> = (0..4000).map(|i| vec![i as u8; 4000]).collect();
        let keep: Vec<Vec<u8>> = blocks
            .into_iter()
            .enumerate()
            .filter_map(|(i, b)| (i % 64 == 0).then_some(b))
            .collect();
        let before = std::fs::read_to_string("/proc/self/status").expect("status");
        super::trim();
        let after = std::fs::read_to_string("/proc/self/status").expect("status");
        let anon = |s: &str| -> u64 {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("RssAnon")
        };
        // 16 MB were allocated and most of it freed: the trim gives back megabytes.
        assert!(
            anon(&before) > anon(&after) + 4 * 1024,
            "RssAnon {} kB before the trim, {} kB after; heap {:?}",
            anon(&before),
            anon(&after),
            heap()
        );
        assert_eq!(keep.len(), 63);
    }
}
