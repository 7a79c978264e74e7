//! The text `basalt bench boot` prints: the timeline table, the ratios to the floor, the
//! init footprint, and what the floor is.

use super::boot::{BootBench, Footprint, CPUS, MEMORY_MIB};
use super::stats::Spread;
use basalt_api::milestone::Milestone;
use basalt_qemu::Firmware;
use std::fmt::{self, Formatter};

const MILESTONES: [Milestone; 7] = [
    Milestone::InitStart,
    Milestone::RootVerified,
    Milestone::RootMounted,
    Milestone::StateMounted,
    Milestone::Ready,
    Milestone::NetworkUp,
    Milestone::Standby,
];

/// The steps of K3s's preparation, which stage 2 runs in the background
/// (`init/src/boot/stage2/node.rs`, `prepare_for_k3s`), then the warm-up after it
/// (K3s's extraction, `init/src/k3s_warm.rs`).
const BACKGROUND_STEPS: [&str; 5] = [
    "cgroups",
    "k3s-modules",
    "k3s-sysctls",
    "standby-prep",
    "k3s-warm",
];

fn firmware_name(f: Firmware) -> &'static str {
    match f {
        Firmware::Bios => "SeaBIOS",
        Firmware::Uefi => "OVMF (UEFI)",
    }
}

fn spread(s: &Spread, decimals: usize) -> String {
    format!(
        "{:>7.d$}  ({:.d$}–{:.d$})",
        s.median,
        s.min,
        s.max,
        d = decimals
    )
}

fn row(
    f: &mut Formatter<'_>,
    label: &str,
    times: Option<(Spread, Spread)>,
    runs: usize,
) -> fmt::Result {
    match times {
        Some((guest, wall)) => {
            let seen = if guest.n < runs {
                format!("  reached in {} of {runs} runs", guest.n)
            } else {
                String::new()
            };
            writeln!(
                f,
                "  {label:<22}{:<28}{}{seen}",
                spread(&guest, 3),
                spread(&wall, 2)
            )
        }
        None => writeln!(f, "  {label:<22}not reached"),
    }
}

fn ratio(ours: Option<f64>, floor: Option<f64>) -> String {
    match (ours, floor) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

fn footprint(f: &mut Formatter<'_>, fps: &[Footprint], runs: usize) -> fmt::Result {
    let rss = Spread::of(fps.iter().map(|p| p.rss_kb as f64));
    let hwm = Spread::of(fps.iter().map(|p| p.hwm_kb as f64));
    match (rss, hwm) {
        (Some(rss), Some(hwm)) => writeln!(
            f,
            "  {:<30}VmRSS {:.0} kB ({:.0}–{:.0}), VmHWM {:.0} kB ({:.0}–{:.0}); {} of {runs} runs",
            "PID1 memory at standby",
            rss.median,
            rss.min,
            rss.max,
            hwm.median,
            hwm.min,
            hwm.max,
            rss.n
        ),
        _ => writeln!(
            f,
            "  {:<30}no footprint line seen",
            "PID1 memory at standby"
        ),
    }
}

/// Writes the whole report: its sections in the order they print, one after another (long,
/// but each line of the report is one statement here).
pub fn write(b: &BootBench, f: &mut Formatter<'_>) -> fmt::Result {
    let runs = b.image_runs.len();
    writeln!(f, "basalt bench boot {}", b.image.display())?;
    writeln!(f, "  machine: {}", super::machine())?;
    writeln!(
        f,
        "  QEMU: accelerator {}, firmware {}, q35, {MEMORY_MIB} MiB, {CPUS} vCPUs, virtio disk, virtio-net (user, restrict=on), virtio-rng",
        b.accel.name(),
        firmware_name(b.firmware)
    )?;
    writeln!(
        f,
        "  kernel: {} ({} on the ESP)",
        b.kernel_version.as_deref().unwrap_or("unknown version"),
        b.kernel_path
    )?;
    writeln!(
        f,
        "  runs: {runs} of the image and {} of the floor, alternating",
        b.floor_runs.len()
    )?;
    writeln!(f)?;
    writeln!(
        f,
        "  {:<22}{:<28}wall s since QEMU start",
        "", "guest s since kernel start"
    )?;
    writeln!(
        f,
        "  {:<22}{:<28}median  (min–max)",
        "milestone", "median  (min–max)"
    )?;
    for m in MILESTONES {
        let label = match m {
            Milestone::NetworkUp => "network-up (async)".to_string(),
            _ => m.name().to_string(),
        };
        row(f, &label, b.milestone(m.name()), runs)?;
    }
    row(f, "floor: init", b.floor(), b.floor_runs.len())?;
    let off = Spread::of(b.floor_runs.iter().filter_map(|r| r.powered_off));
    match off {
        Some(off) => writeln!(
            f,
            "  {:<22}{:<28}{}",
            "floor: QEMU exited",
            "",
            spread(&off, 2)
        )?,
        None => writeln!(f, "  floor: did not power off")?,
    }
    let (image_pre, floor_pre) = b.before_kernel();
    for (label, pre) in [
        ("before kernel: image", image_pre),
        ("before kernel: floor", floor_pre),
    ] {
        if let Some(pre) = pre {
            writeln!(f, "  {label:<22}{:<28}{}", "", spread(&pre, 2))?;
        }
    }
    let steps = b.steps();
    if !steps.is_empty() {
        writeln!(f)?;
        writeln!(
            f,
            "  {:<30}own duration, guest s: median (min–max); (bg): in the background, after which standby does not wait",
            "stage 2 steps"
        )?;
        for (name, took) in steps {
            let seen = if took.n < runs {
                format!("  in {} of {runs} runs", took.n)
            } else {
                String::new()
            };
            writeln!(
                f,
                "  {:<30}{}{seen}",
                if BACKGROUND_STEPS.contains(&name.as_str()) {
                    format!("step: {name} (bg)")
                } else {
                    format!("step: {name}")
                },
                spread(&took, 3)
            )?;
        }
    }
    writeln!(f)?;
    writeln!(
        f,
        "  {:<30}{:<12}{:<12}guest, paired runs: median (min–max)",
        "ratio to the floor", "guest", "wall"
    )?;
    let floor = b.floor();
    for m in [Milestone::Ready, Milestone::Standby] {
        let ours = b.milestone(m.name());
        let paired = b.paired_ratios(m.name()).map_or("n/a".into(), |p| {
            format!("{:.2}x ({:.2}–{:.2})", p.median, p.min, p.max)
        });
        writeln!(
            f,
            "  {:<30}{:<12}{:<12}{paired}",
            m.name(),
            ratio(ours.map(|o| o.0.median), floor.map(|o| o.0.median)),
            ratio(ours.map(|o| o.1.median), floor.map(|o| o.1.median)),
        )?;
    }
    writeln!(f)?;
    writeln!(f, "  init footprint")?;
    writeln!(
        f,
        "  {:<30}{} bytes ({:.2} MiB; /init of the initramfs, stage 1; /sbin/init is larger)",
        "basalt-stage1 static binary",
        b.basalt_init_bytes,
        b.basalt_init_bytes as f64 / f64::from(1 << 20)
    )?;
    let fps: Vec<Footprint> = b.image_runs.iter().filter_map(|r| r.footprint).collect();
    footprint(f, &fps, runs)?;
    writeln!(
        f,
        "  {:<30}see `basalt bench join` (needs an image with the K3s agent double)",
        "PID1 memory after a join"
    )?;
    writeln!(f)?;
    writeln!(
        f,
        "  the floor: the image's own kernel and command line without basalt.* (`{}`), the same firmware, machine and devices, \
booted by QEMU directly (-kernel/-initrd) into an initramfs holding only /dev/console and basalt-floor \
({} bytes static, {} bytes as zstd cpio), which prints CLOCK_BOOTTIME and powers off. \
It has no GRUB, no disk reads and no modules. Guest times compare directly (both count from kernel start); \
wall times differ also by the bootloader (see \"before kernel\"). Ratios: of the medians, and the median of each image boot \
over the floor boot right after it (paired, so both met about the same load).",
        b.floor_cmdline, b.floor_init_bytes, b.floor_initrd_bytes
    )?;
    writeln!(
        f,
        "  guest times are CLOCK_BOOTTIME as printed by the guest; wall times are when the line was first seen in the serial log \
(polled every 0.1 s), counted from QEMU's start, firmware included; \"before kernel\" is wall minus guest time of the first line \
(firmware, bootloader, QEMU loading the kernel)."
    )
}
