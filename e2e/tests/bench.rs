//! `basalt bench boot --runs 1` on the default image, and `basalt bench pool --runs 1` on
//! the join image, through the library functions the commands call: the benchmarks must
//! parse the milestones of a real boot and find the floor's marker, and see a warm promote
//! and a cold start through to the agent double, so that they cannot rot silently. Times
//! are not asserted here (figures come from the benchmark commands, not from tests), only
//! that a cold start, which boots a VM, takes longer than promoting a booted one.

mod common;

use anyhow::Context;
use basalt_api::milestone::Milestone;
use basalt_bench::boot::{self, BootBenchOptions};
use basalt_bench::pool::{self, PoolBenchOptions};
use basalt_qemu::Firmware;

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn bench_boot_parses_a_real_boot_and_finds_the_floor() -> anyhow::Result<()> {
    let img = common::image();
    let bench = boot::run(&BootBenchOptions {
        image: img.qcow2.clone(),
        runs: 1,
        firmware: Firmware::Bios,
        floor_init: None,
    })?;
    let report = bench.to_string();
    println!("{report}");

    let [run] = bench.image_runs.as_slice() else {
        anyhow::bail!("expected one image run, got {}", bench.image_runs.len());
    };
    let mut previous = 0.0;
    for m in Milestone::ALL {
        let mark = run
            .marks
            .iter()
            .find(|mark| mark.name == m.name())
            .with_context(|| format!("milestone {} not parsed: {:?}", m.name(), run.marks))?;
        assert!(
            mark.guest >= previous,
            "{} out of order: {:?}",
            m.name(),
            run.marks
        );
        previous = mark.guest;
    }
    let footprint = run.footprint.context("no footprint line parsed")?;
    assert!(
        footprint.rss_kb > 0 && footprint.hwm_kb >= footprint.rss_kb,
        "{footprint:?}"
    );

    let [floor] = bench.floor_runs.as_slice() else {
        anyhow::bail!("expected one floor run, got {}", bench.floor_runs.len());
    };
    assert_eq!(floor.mark.name, "floor");
    // The kernel boots before any init runs: a marker at 0 would be a parse gone wrong.
    assert!(floor.mark.guest > 0.0, "{floor:?}");
    assert!(floor.powered_off.is_some(), "the floor did not power off");
    assert!(
        !bench.floor_cmdline.contains("basalt."),
        "{}",
        bench.floor_cmdline
    );

    // `/init` of the initramfs is basalt-stage1.
    let init_size = img.manifest["basalt_stage1"]["size"]
        .as_u64()
        .context("basalt_stage1.size")?;
    assert_eq!(bench.basalt_init_bytes, init_size);
    for m in Milestone::ALL {
        assert!(report.contains(m.name()), "{report}");
    }
    assert!(report.contains("see `basalt bench join`"), "{report}");
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn bench_pool_sees_a_warm_promote_and_a_cold_start_join() -> anyhow::Result<()> {
    let img = common::join_image();
    let bench = pool::run(&PoolBenchOptions {
        image: img.raw.clone(),
        runs: 1,
    })?;
    let report = bench.to_string();
    println!("{report}");

    let [run] = bench.runs.as_slice() else {
        anyhow::bail!("expected one run, got {}", bench.runs.len());
    };
    assert_ne!(
        run.warm.server, run.cold.server,
        "two servers, one per pool"
    );
    for (start, d) in [("warm", &run.warm), ("cold", &run.cold)] {
        let joined = d.joined().with_context(|| format!("{start}: no joined"))?;
        let agent = d.agent().with_context(|| format!("{start}: no agent"))?;
        assert!(joined > 0.0 && agent >= joined, "{start}: {d:?}");
        assert!(d.active > 0.0, "{start}: {d:?}");
    }
    // A cold call answers once the server exists, long before it joins.
    assert!(run.cold.answered < run.cold.active, "{run:?}");

    let warm = pool::parse_summary(&report, "warm").context("the warm line")?;
    let cold = pool::parse_summary(&report, "cold").context("the cold line")?;
    assert!(cold.0 > warm.0, "cold joined {cold:?} vs warm {warm:?}");
    assert!(cold.1 > warm.1, "cold agent {cold:?} vs warm {warm:?}");
    let (joined, agent) = bench.ratios().context("no ratio")?;
    assert!(joined > 1.0 && agent > 1.0, "{joined} {agent}");
    assert!(report.contains("cold/warm ratio: joined "), "{report}");
    Ok(())
}
