//! `basalt bench boot --runs 1` on the default image, through the library function the
//! command calls: the benchmark must parse the milestones of a real boot and find the
//! floor's marker, so that it cannot rot silently. Times are never asserted here: figures
//! come from the benchmark command, not from tests.

mod common;

use anyhow::Context;
use basalt_api::milestone::Milestone;
use basalt_bench::boot::{self, BootBenchOptions};
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

    let init_size = img.manifest["basalt_init"]["size"]
        .as_u64()
        .context("basalt_init.size")?;
    assert_eq!(bench.basalt_init_bytes, init_size);
    for m in Milestone::ALL {
        assert!(report.contains(m.name()), "{report}");
    }
    assert!(report.contains("see `basalt bench join`"), "{report}");
    Ok(())
}
