//! `basalt bench boot`: boots an image N times under QEMU and reads its boot timeline off
//! the serial console, and in the same run boots the floor (see [`super::floor`]) as
//! often, interleaved, so both see the same machine load. The figure to track is the
//! ratio of our milestones to the floor: it holds across noisy machines and accelerators.

use super::content::{self, ContentError};
use super::floor::{self, FloorBoot, FloorError};
use super::stats::Spread;
use basalt_api::milestone::{self, Milestone};
use basalt_builder::image::{DiskImage, ImageError};
use basalt_qemu::{Accel, Firmware, HarnessError, Vm, VmBuilder};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Guest memory and CPUs of both the image and the floor (the harness's defaults, set
/// here so that the report can say them).
pub const MEMORY_MIB: u32 = 1024;
pub const CPUS: u32 = 2;

/// Boot budget on KVM, as the end-to-end tests give it; scaled for TCG.
const BOOT: Duration = Duration::from_secs(60);
/// How long network-up may come after standby before a run is reported without it.
const NETWORK_GRACE: Duration = Duration::from_secs(10);
/// How long the floor may take to power off after its marker.
const POWER_OFF: Duration = Duration::from_secs(10);
/// The footprint line PID1 prints before standby (`init/src/boot/stage2/node.rs`).
const FOOTPRINT: &str = "[basalt] footprint: PID1 VmRSS ";

#[derive(Debug, thiserror::Error)]
pub enum BootBenchError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error("{image}: read basalt-init (/init) from the initramfs {file}")]
    Initramfs {
        image: PathBuf,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Floor(#[from] FloorError),
    #[error("{what}, run {run}; the serial log ends:\n{tail}")]
    Boot {
        what: &'static str,
        run: usize,
        tail: String,
        #[source]
        source: HarnessError,
    },
}

pub struct BootBenchOptions {
    /// A .raw or .qcow2 image.
    pub image: PathBuf,
    pub runs: usize,
    pub firmware: Firmware,
    /// A prebuilt static basalt-floor; built from the workspace when `None`.
    pub floor_init: Option<PathBuf>,
}

/// A milestone as one boot reached it.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub name: String,
    /// Seconds since kernel start, as the guest printed them.
    pub guest: f64,
    /// Seconds from QEMU's start until the line was seen on the console.
    pub wall: f64,
}

/// PID1's memory as its footprint line reports it, in kB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

/// A step of the boot as one run printed it (`[basalt] step <name> at=… took=…`).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    /// Seconds since kernel start when it started.
    pub at: f64,
    /// Its own duration, in seconds.
    pub took: f64,
}

#[derive(Debug, Clone)]
pub struct ImageRun {
    pub marks: Vec<Mark>,
    /// The steps seen until the run ended, in the order printed.
    pub steps: Vec<Step>,
    pub footprint: Option<Footprint>,
}

#[derive(Debug, Clone)]
pub struct FloorRun {
    pub mark: Mark,
    /// Seconds from QEMU's start until QEMU exited; `None` when it did not power off.
    pub powered_off: Option<f64>,
}

/// Everything one `bench boot` measured, and what it ran on.
pub struct BootBench {
    pub image: PathBuf,
    pub accel: Accel,
    pub firmware: Firmware,
    pub kernel_version: Option<String>,
    pub kernel_path: String,
    pub floor_cmdline: String,
    pub floor_init_bytes: u64,
    pub floor_initrd_bytes: u64,
    /// Size of `/init` of the image's initramfs: basalt-stage1 (stage 1 alone), or
    /// basalt-init where the image was built with that one binary.
    pub basalt_init_bytes: u64,
    pub image_runs: Vec<ImageRun>,
    pub floor_runs: Vec<FloorRun>,
}

/// Boots the image and the floor `runs` times each, alternating.
pub fn run(opts: &BootBenchOptions) -> Result<BootBench, BootBenchError> {
    let img = DiskImage::open(&opts.image)?;
    let boot = content::default_boot(&img)?;
    let basalt_init_bytes = basalt_init_size(&opts.image, &boot)?;
    let floor_init = match &opts.floor_init {
        Some(p) => p.clone(),
        None => floor::build_init(&std::env::current_dir().unwrap_or_default())?,
    };
    let floor_boot = FloorBoot::prepare(&boot.kernel, &floor_init, &boot.cmdline)?;
    let accel = basalt_qemu::detect_accel();
    let mut bench = BootBench {
        image: opts.image.clone(),
        accel,
        firmware: opts.firmware,
        kernel_version: basalt_builder::inspect::bzimage_version(&boot.kernel),
        kernel_path: boot.kernel_path.clone(),
        floor_cmdline: floor_boot.cmdline.clone(),
        floor_init_bytes: floor_boot.init_bytes,
        floor_initrd_bytes: floor_boot.initrd_bytes,
        basalt_init_bytes,
        image_runs: vec![],
        floor_runs: vec![],
    };
    for n in 1..=opts.runs.max(1) {
        eprintln!("basalt: bench boot run {n}: image");
        let image = once_more_if_qemu_crashed(|| boot_image(opts, accel, n))?;
        bench.image_runs.push(image);
        eprintln!("basalt: bench boot run {n}: floor");
        let floor = once_more_if_qemu_crashed(|| boot_floor(opts, accel, &floor_boot, n))?;
        bench.floor_runs.push(floor);
    }
    Ok(bench)
}

/// Runs a boot again, once, when QEMU itself died of a fatal signal (a CI run saw QEMU 7.2's
/// TCG take a general protection fault before the guest printed anything). That is the
/// emulator's fault, not the guest's: the retry is announced, and a second crash fails.
fn once_more_if_qemu_crashed<T>(
    boot: impl Fn() -> Result<T, BootBenchError>,
) -> Result<T, BootBenchError> {
    use nix::sys::signal::Signal;
    use std::os::unix::process::ExitStatusExt;
    match boot() {
        Err(BootBenchError::Boot {
            what,
            run,
            source: HarnessError::Exited { status, .. },
            ..
        }) if status.signal().is_some_and(|sig| {
            [
                Signal::SIGSEGV,
                Signal::SIGBUS,
                Signal::SIGILL,
                Signal::SIGABRT,
            ]
            .iter()
            .any(|s| *s as i32 == sig)
        }) =>
        {
            eprintln!("basalt: bench boot run {run}: QEMU crashed ({status}) {what}; once more");
            boot()
        }
        other => other,
    }
}

fn basalt_init_size(image: &Path, boot: &content::DefaultBoot) -> Result<u64, BootBenchError> {
    let err = |source| BootBenchError::Initramfs {
        image: image.into(),
        file: boot.initrd_path.clone(),
        source,
    };
    let files = content::initramfs_files(&boot.initrd).map_err(err)?;
    files
        .iter()
        .find(|f| f.path == "init")
        .map(|f| f.data.len() as u64)
        .ok_or_else(|| err(std::io::ErrorKind::NotFound.into()))
}

fn vm(opts: &BootBenchOptions, accel: Accel) -> VmBuilder {
    VmBuilder::new(&opts.image)
        .firmware(opts.firmware)
        .memory_mib(MEMORY_MIB)
        .cpus(CPUS)
        .accel(accel)
        // A node's devices, as `basalt run` gives them: a NIC on QEMU's user network
        // closed to the outside, and virtio-rng.
        .extra_args(basalt_qemu::node_devices(true, &[]))
}

fn boot_error(vm: &Vm, what: &'static str, run: usize, source: HarnessError) -> BootBenchError {
    let serial = vm.serial();
    let lines: Vec<&str> = serial.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    BootBenchError::Boot {
        what,
        run,
        tail,
        source,
    }
}

/// One boot of the image until standby (and network-up, given a grace period).
fn boot_image(
    opts: &BootBenchOptions,
    accel: Accel,
    run: usize,
) -> Result<ImageRun, BootBenchError> {
    let what = "booting the image to standby";
    let spawn_err = |source| BootBenchError::Boot {
        what,
        run,
        tail: String::new(),
        source,
    };
    let mut vm = vm(opts, accel).spawn().map_err(spawn_err)?;
    let started = vm.started();
    let mut marks: Vec<Mark> = vec![];
    let grace = accel.scale(NETWORK_GRACE);
    let waited = vm.wait_until(accel.scale(BOOT), |serial| {
        record_marks(serial, started, &mut marks, milestone::parse);
        let standby = marks.iter().find(|m| m.name == Milestone::Standby.name())?;
        let network = marks.iter().any(|m| m.name == Milestone::NetworkUp.name());
        let late = started.elapsed().as_secs_f64() > standby.wall + grace.as_secs_f64();
        (network || late).then_some(())
    });
    if let Err(e) = waited {
        return Err(boot_error(&vm, what, run, e));
    }
    let serial = vm.serial();
    let footprint = serial.lines().find_map(parse_footprint);
    Ok(ImageRun {
        marks,
        steps: parse_steps(&serial),
        footprint,
    })
}

/// One boot of the floor until its marker, then until QEMU exits.
pub(crate) fn boot_floor(
    opts: &BootBenchOptions,
    accel: Accel,
    floor_boot: &FloorBoot,
    run: usize,
) -> Result<FloorRun, BootBenchError> {
    let what = "booting the floor to its marker";
    let spawn_err = |source| BootBenchError::Boot {
        what,
        run,
        tail: String::new(),
        source,
    };
    let mut vm = vm(opts, accel)
        .extra_args(floor_boot.qemu_args())
        .spawn()
        .map_err(spawn_err)?;
    let started = vm.started();
    let mut marks: Vec<Mark> = vec![];
    let waited = vm.wait_until(accel.scale(BOOT), |serial| {
        record_marks(serial, started, &mut marks, |line| {
            floor::parse_marker(line).map(|t| ("floor", t))
        });
        marks.first().cloned()
    });
    let mark = waited.map_err(|e| boot_error(&vm, what, run, e))?;
    let powered_off = vm
        .wait_exit(accel.scale(POWER_OFF))
        .ok()
        .map(|_| started.elapsed().as_secs_f64());
    Ok(FloorRun { mark, powered_off })
}

/// Adds a mark for each parsable line not seen before, stamped with the time now.
fn record_marks<'a>(
    serial: &'a str,
    started: Instant,
    marks: &mut Vec<Mark>,
    parse: impl Fn(&'a str) -> Option<(&'a str, f64)>,
) {
    let now = started.elapsed().as_secs_f64();
    for (name, guest) in serial.lines().filter_map(parse) {
        if !marks.iter().any(|m| m.name == name) {
            marks.push(Mark {
                name: name.to_string(),
                guest,
                wall: now,
            });
        }
    }
}

/// Every step line of a serial log, in order; a step printed twice (the console and the
/// kernel log both reach the serial port) is kept once.
pub fn parse_steps(serial: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for s in serial.lines().filter_map(milestone::parse_step) {
        if !steps.iter().any(|t| t.name == s.name && t.at == s.at) {
            steps.push(Step {
                name: s.name.to_owned(),
                at: s.at,
                took: s.took,
            });
        }
    }
    steps
}

/// `[basalt] footprint: PID1 VmRSS 1234 kB, VmHWM 2345 kB`
pub fn parse_footprint(line: &str) -> Option<Footprint> {
    let rest = &line[line.find(FOOTPRINT)? + FOOTPRINT.len()..];
    let (rss, hwm) = rest.trim_end().split_once(", VmHWM ")?;
    let kb = |s: &str| s.strip_suffix(" kB")?.trim().parse().ok();
    Some(Footprint {
        rss_kb: kb(rss)?,
        hwm_kb: kb(hwm)?,
    })
}

impl BootBench {
    /// Guest and wall times of one milestone over the runs that reached it.
    pub fn milestone(&self, name: &str) -> Option<(Spread, Spread)> {
        let marks: Vec<&Mark> = self
            .image_runs
            .iter()
            .filter_map(|r| r.marks.iter().find(|m| m.name == name))
            .collect();
        let guest = Spread::of(marks.iter().map(|m| m.guest))?;
        let wall = Spread::of(marks.iter().map(|m| m.wall))?;
        Some((guest, wall))
    }

    /// The steps any run printed, in the order first seen, each with the spread of its
    /// own duration over the runs that printed it.
    pub fn steps(&self) -> Vec<(String, Spread)> {
        let mut names: Vec<&str> = Vec::new();
        for run in &self.image_runs {
            for s in &run.steps {
                if !names.contains(&s.name.as_str()) {
                    names.push(&s.name);
                }
            }
        }
        names
            .into_iter()
            .filter_map(|name| {
                let took = self
                    .image_runs
                    .iter()
                    .filter_map(|r| r.steps.iter().find(|s| s.name == name))
                    .map(|s| s.took);
                Spread::of(took).map(|s| (name.to_owned(), s))
            })
            .collect()
    }

    /// Wall time before the kernel started (firmware, bootloader, QEMU's setup) of the
    /// image and of the floor: wall minus guest time of the first line each prints.
    pub fn before_kernel(&self) -> (Option<Spread>, Option<Spread>) {
        let image = Spread::of(
            self.image_runs
                .iter()
                .filter_map(|r| {
                    r.marks
                        .iter()
                        .find(|m| m.name == Milestone::InitStart.name())
                })
                .map(|m| m.wall - m.guest),
        );
        let floor = Spread::of(self.floor_runs.iter().map(|r| r.mark.wall - r.mark.guest));
        (image, floor)
    }

    /// Guest time of a milestone over the floor's, per pair of runs (the image boot and
    /// the floor boot right after it), over the pairs that reached it.
    pub fn paired_ratios(&self, name: &str) -> Option<Spread> {
        Spread::of(
            self.image_runs
                .iter()
                .zip(&self.floor_runs)
                .filter_map(|(run, floor)| {
                    let mark = run.marks.iter().find(|m| m.name == name)?;
                    (floor.mark.guest > 0.0).then(|| mark.guest / floor.mark.guest)
                }),
        )
    }

    /// The floor's guest and wall times to its marker.
    pub fn floor(&self) -> Option<(Spread, Spread)> {
        let guest = Spread::of(self.floor_runs.iter().map(|r| r.mark.guest))?;
        let wall = Spread::of(self.floor_runs.iter().map(|r| r.mark.wall))?;
        Some((guest, wall))
    }
}

impl std::fmt::Display for BootBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        super::boot_report::write(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprint_lines_are_parsed() {
        let cases = [
            (
                "[basalt] footprint: PID1 VmRSS 1234 kB, VmHWM 2345 kB",
                Some(Footprint {
                    rss_kb: 1234,
                    hwm_kb: 2345,
                }),
            ),
            (
                "[    3.1] [basalt] footprint: PID1 VmRSS 8 kB, VmHWM 9 kB\r",
                Some(Footprint {
                    rss_kb: 8,
                    hwm_kb: 9,
                }),
            ),
            ("[basalt] footprint: PID1 VmRSS ?, VmHWM ?", None),
            ("[basalt] ready t=1.000", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_footprint(line), want, "{line:?}");
        }
    }

    fn mark(name: &str, guest: f64, wall: f64) -> Mark {
        Mark {
            name: name.into(),
            guest,
            wall,
        }
    }

    fn bench(image_runs: Vec<ImageRun>, floor_guest: &[f64]) -> BootBench {
        BootBench {
            image: "node.qcow2".into(),
            accel: Accel::Tcg,
            firmware: Firmware::Bios,
            kernel_version: Some("6.1.0-1".into()),
            kernel_path: "/boot/a/vmlinuz".into(),
            floor_cmdline: "console=ttyS0 quiet".into(),
            floor_init_bytes: 1,
            floor_initrd_bytes: 1,
            basalt_init_bytes: 1,
            image_runs,
            floor_runs: floor_guest
                .iter()
                .map(|&g| FloorRun {
                    mark: mark("floor", g, g + 1.0),
                    powered_off: Some(g + 1.0),
                })
                .collect(),
        }
    }

    fn image_run(init_start: f64, ready: Option<f64>) -> ImageRun {
        let mut marks = vec![mark("init-start", init_start, init_start + 5.0)];
        marks.extend(ready.map(|r| mark("ready", r, r + 5.0)));
        ImageRun {
            marks,
            steps: vec![],
            footprint: None,
        }
    }

    #[test]
    fn steps_are_read_once_each_and_summed_up_over_the_runs() {
        let serial = "[basalt] step mount-state at=2.700 took=0.400\n\
                      [    2.9] [basalt] step mount-state at=2.700 took=0.400\n\
                      [basalt] ready t=3.000\n\
                      [basalt] step k3s-modules at=2.950 took=0.800\r\n";
        let steps = parse_steps(serial);
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["mount-state", "k3s-modules"]);
        assert_eq!(steps[1].took, 0.8);
        let mut a = image_run(1.0, Some(4.0));
        a.steps = steps;
        let mut b = image_run(1.0, Some(4.0));
        b.steps = parse_steps("[basalt] step mount-state at=2.000 took=0.200\n");
        let bench = bench(vec![a, b], &[2.0, 2.0]);
        let got = bench.steps();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "mount-state");
        assert_eq!((got[0].1.min, got[0].1.max, got[0].1.n), (0.2, 0.4, 2));
        assert_eq!((got[1].0.as_str(), got[1].1.n), ("k3s-modules", 1));
        let text = bench.to_string();
        assert!(text.contains("step: k3s-modules"), "{text}");
        assert!(text.contains("in 1 of 2 runs"), "{text}");
    }

    #[test]
    fn ratios_pair_each_image_boot_with_the_floor_boot_after_it() {
        let b = bench(
            vec![image_run(1.0, Some(4.0)), image_run(2.0, Some(9.0))],
            &[2.0, 3.0],
        );
        let paired = b.paired_ratios("ready").expect("paired");
        assert_eq!((paired.min, paired.max, paired.n), (2.0, 3.0, 2));
        let (guest, wall) = b.milestone("ready").expect("ready");
        assert_eq!((guest.median, wall.median), (6.5, 11.5));
        let (image, floor) = b.before_kernel();
        assert_eq!(image.map(|s| s.median), Some(5.0));
        assert_eq!(floor.map(|s| s.median), Some(1.0));
    }

    #[test]
    fn the_report_says_what_was_not_reached_and_what_is_not_measured() {
        let b = bench(
            vec![image_run(1.0, Some(4.0)), image_run(2.0, None)],
            &[2.0, 3.0],
        );
        let text = b.to_string();
        assert!(text.contains("reached in 1 of 2 runs"), "{text}");
        assert!(text.contains("standby               not reached"), "{text}");
        assert!(text.contains("no footprint line seen"), "{text}");
        assert!(text.contains("see `basalt bench join`"), "{text}");
        assert!(text.contains("accelerator tcg, firmware SeaBIOS"), "{text}");
    }

    #[test]
    fn marks_are_recorded_once_with_the_first_sighting() {
        let started = Instant::now();
        let mut marks = vec![];
        let serial = "noise\n[basalt] init-start t=0.500\r\n";
        record_marks(serial, started, &mut marks, milestone::parse);
        let serial = format!("{serial}[basalt] ready t=1.250\n");
        record_marks(&serial, started, &mut marks, milestone::parse);
        let got: Vec<(&str, f64)> = marks.iter().map(|m| (m.name.as_str(), m.guest)).collect();
        assert_eq!(got, [("init-start", 0.5), ("ready", 1.25)]);
        assert!(marks[0].wall <= marks[1].wall);
    }
}
