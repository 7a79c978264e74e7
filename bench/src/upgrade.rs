//! `basalt bench upgrade`: the time from `POST /v1/upgrade` (with `reboot=1`) until the
//! new slot reaches `standby`, against a floor measured in the same run: writing the
//! bundle's bytes to a file on the host's temp folder (where QEMU's overlay of the disk
//! lives) and syncing them, plus one boot of the floor (the image's kernel straight into
//! a trivial init, as `bench boot` boots it: [`super::floor`]).
//!
//! Each run boots the image fresh (a throwaway overlay) with a standby machine config
//! over fw_cfg, waits for `standby` and the node API, then sends the bundle and watches
//! the serial console: the answer (streamed, written, verified, armed), the new slot's
//! `standby`, and the trial's end (`marked good`). The floor's write and boot follow.

use super::boot::{BootBenchError, BootBenchOptions, CPUS, MEMORY_MIB};
use super::content;
use super::floor::{self, FloorBoot};
use super::join::{machine_config, qemu_args, tail, wait_for_api, RunPki};
use super::stats::Spread;
use basalt_api::milestone::{self, Milestone};
use basalt_builder::image::DiskImage;
use basalt_client::node::NodeError;
use basalt_qemu::{Accel, Firmware, HarnessError, Vm, VmBuilder};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Boot budget on KVM; scaled for TCG.
const BOOT: Duration = Duration::from_secs(60);
/// Budget on KVM from the request until the new slot is marked good: streaming and
/// verifying the bundle, the reboot, the trial. Scaled for TCG.
const UPGRADE: Duration = Duration::from_secs(300);
/// How often the serial log is read while the upgrade runs.
const POLL: Duration = Duration::from_millis(20);
/// What the trial prints when it starts and ends well (`init/src/upgrade/mod.rs`).
const ON_TRIAL: &str = " is on trial";
const MARKED_GOOD: &str = " is healthy and marked good";

#[derive(Debug, thiserror::Error)]
pub enum UpgradeBenchError {
    #[error(transparent)]
    Join(#[from] super::join::JoinBenchError),
    #[error(transparent)]
    Boot(#[from] BootBenchError),
    #[error(transparent)]
    Content(#[from] content::ContentError),
    #[error(transparent)]
    Image(#[from] basalt_builder::image::ImageError),
    #[error("the write floor: {}", .0.display())]
    WriteFloor(PathBuf, #[source] std::io::Error),
    #[error("{what}, run {run}; the serial log ends:\n{tail}")]
    Vm {
        what: &'static str,
        run: usize,
        tail: String,
        #[source]
        source: HarnessError,
    },
    #[error("{what}, run {run}; the serial log ends:\n{tail}")]
    Api {
        what: &'static str,
        run: usize,
        tail: String,
        #[source]
        source: Box<NodeError>,
    },
    #[error("run {run}: the new slot did not reach standby within {budget:?}; the serial log ends:\n{tail}")]
    NoStandby {
        run: usize,
        budget: Duration,
        tail: String,
    },
}

pub struct UpgradeBenchOptions {
    /// The image booted first (a .raw or .qcow2).
    pub image: PathBuf,
    /// A bundle of a newer version for the same layout (`basalt build` writes it beside
    /// the image it builds).
    pub bundle: PathBuf,
    pub runs: usize,
    pub firmware: Firmware,
    /// A prebuilt static basalt-floor; built from the workspace when `None`.
    pub floor_init: Option<PathBuf>,
}

/// Console sightings after the request, each the first, in seconds from sending it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sightings {
    pub trial: Option<f64>,
    pub standby: Option<f64>,
    pub good: Option<f64>,
}

impl Sightings {
    /// Reads `text` (the console since the request) at `now` since the request.
    pub fn update(&mut self, text: &str, now: Duration) {
        let standby = format!("{} {} t=", milestone::PREFIX, Milestone::Standby.name());
        let now = now.as_secs_f64();
        // Whole lines only: a line still being written is read at the next poll.
        let whole = text.rfind('\n').map_or("", |i| &text[..i]);
        for line in whole.lines() {
            let upgrade = line.contains("upgrade: slot ");
            if self.trial.is_none() && upgrade && line.contains(ON_TRIAL) {
                self.trial = Some(now);
            }
            if self.good.is_none() && upgrade && line.contains(MARKED_GOOD) {
                self.good = Some(now);
            }
            if self.standby.is_none() && line.contains(&standby) {
                self.standby = Some(now);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpgradeRun {
    /// Seconds from the request until its answer: streamed, written, verified, armed.
    pub response: f64,
    pub seen: Sightings,
    /// The floor: seconds to write and sync the bundle's bytes, and to boot the floor.
    pub write_floor: f64,
    pub boot_floor: f64,
}

impl UpgradeRun {
    pub fn floor(&self) -> f64 {
        self.write_floor + self.boot_floor
    }
}

pub struct UpgradeBench {
    pub image: PathBuf,
    pub bundle: PathBuf,
    pub bundle_bytes: u64,
    pub accel: Accel,
    pub firmware: Firmware,
    pub runs: Vec<UpgradeRun>,
}

pub fn run(opts: &UpgradeBenchOptions) -> Result<UpgradeBench, UpgradeBenchError> {
    let img = DiskImage::open(&opts.image)?;
    let boot = content::default_boot(&img)?;
    let floor_init = match &opts.floor_init {
        Some(p) => p.clone(),
        None => floor::build_init(&std::env::current_dir().unwrap_or_default())
            .map_err(BootBenchError::from)?,
    };
    let floor_boot = FloorBoot::prepare(&boot.kernel, &floor_init, &boot.cmdline)
        .map_err(BootBenchError::from)?;
    let bundle_bytes = std::fs::metadata(&opts.bundle)
        .map_err(|e| UpgradeBenchError::WriteFloor(opts.bundle.clone(), e))?
        .len();
    let accel = basalt_qemu::detect_accel();
    let boot_opts = BootBenchOptions {
        image: opts.image.clone(),
        runs: 1,
        firmware: opts.firmware,
        floor_init: Some(floor_init),
    };
    let mut runs = vec![];
    for n in 1..=opts.runs.max(1) {
        eprintln!("basalt: bench upgrade run {n}: upgrade");
        let (response, seen) = upgrade_once(opts, accel, n)?;
        eprintln!("basalt: bench upgrade run {n}: floor");
        let write_floor = write_floor(&opts.bundle)?;
        let boot_floor = super::boot::boot_floor(&boot_opts, accel, &floor_boot, n)?;
        runs.push(UpgradeRun {
            response,
            seen,
            write_floor,
            boot_floor: boot_floor.mark.wall,
        });
    }
    Ok(UpgradeBench {
        image: opts.image.clone(),
        bundle: opts.bundle.clone(),
        bundle_bytes,
        accel,
        firmware: opts.firmware,
        runs,
    })
}

/// Copies the bundle to a new file in the temp folder and syncs it: the least that
/// writing its bytes to a slot can take on this host's disk.
pub fn write_floor(bundle: &Path) -> Result<f64, UpgradeBenchError> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e| UpgradeBenchError::WriteFloor(p.clone(), e)
    };
    let mut from = std::fs::File::open(bundle).map_err(err(bundle))?;
    let mut to = tempfile::NamedTempFile::new().map_err(err(&std::env::temp_dir()))?;
    let path = to.path().to_path_buf();
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf).map_err(err(bundle))?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).map_err(err(&path))?;
    }
    to.as_file().sync_all().map_err(err(&path))?;
    Ok(started.elapsed().as_secs_f64())
}

fn upgrade_once(
    opts: &UpgradeBenchOptions,
    accel: Accel,
    run: usize,
) -> Result<(f64, Sightings), UpgradeBenchError> {
    let pki = RunPki::new()?;
    let port = super::join::free_port()?;
    let config = pki.dir.path().join("standby.toml");
    std::fs::write(&config, machine_config(&pki, None, None))
        .map_err(|e| super::join::JoinBenchError::Write(config.clone(), e))?;
    let vm_err = |vm: Option<&Vm>, what, source| UpgradeBenchError::Vm {
        what,
        run,
        tail: vm.map(tail).unwrap_or_default(),
        source,
    };
    let mut vm = VmBuilder::new(&opts.image)
        .firmware(opts.firmware)
        .memory_mib(MEMORY_MIB)
        .cpus(CPUS)
        .accel(accel)
        .reboots(true)
        .extra_args(qemu_args(port, &config))
        .spawn()
        .map_err(|e| vm_err(None, "starting QEMU", e))?;
    let standby = format!("{} {} t=", milestone::PREFIX, Milestone::Standby.name());
    vm.wait_for(&standby, accel.scale(BOOT))
        .map_err(|e| vm_err(Some(&vm), "booting to standby", e))?;
    let api_err = |vm: &Vm, what, source| UpgradeBenchError::Api {
        what,
        run,
        tail: tail(vm),
        source: Box::new(source),
    };
    let client = pki
        .client(port)
        .map_err(|e| api_err(&vm, "setting up the node API client", e))?;
    wait_for_api(&vm, &client).map_err(|e| vm_err(Some(&vm), "waiting for the node API", e))?;

    let serial = vm.serial();
    let from = serial.len();
    let budget = accel.scale(UPGRADE);
    let mut seen = Sightings::default();
    let sent = Instant::now();
    let (reply, response) = std::thread::scope(|s| {
        let request = s.spawn(|| {
            let reply = client.upgrade(&opts.bundle, false, true);
            (reply, sent.elapsed().as_secs_f64())
        });
        loop {
            let serial = vm.serial();
            seen.update(serial.get(from..).unwrap_or(""), sent.elapsed());
            let answered = request.is_finished();
            if (answered && seen.standby.is_some() && seen.good.is_some())
                || sent.elapsed() > budget
            {
                break;
            }
            std::thread::sleep(POLL);
        }
        match request.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    reply.map_err(|e| api_err(&vm, "sending the bundle", e))?;
    if seen.standby.is_none() {
        return Err(UpgradeBenchError::NoStandby {
            run,
            budget,
            tail: tail(&vm),
        });
    }
    vm.kill();
    Ok((response, seen))
}

type Figure = (&'static str, fn(&UpgradeRun) -> Option<f64>);

const FIGURES: [Figure; 7] = [
    ("answered (streamed, written, verified)", |r| {
        Some(r.response)
    }),
    ("new slot on trial (console)", |r| r.seen.trial),
    ("new slot at standby", |r| r.seen.standby),
    ("new slot marked good", |r| r.seen.good),
    ("floor: write the bundle's bytes + sync", |r| {
        Some(r.write_floor)
    }),
    ("floor: one boot (kernel → trivial init)", |r| {
        Some(r.boot_floor)
    }),
    ("floor: write + boot", |r| Some(r.floor())),
];

impl std::fmt::Display for UpgradeBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "basalt bench upgrade {}", self.image.display())?;
        writeln!(
            f,
            "  bundle: {} ({:.1} MiB)",
            self.bundle.display(),
            self.bundle_bytes as f64 / f64::from(1u32 << 20)
        )?;
        writeln!(f, "  machine: {}", super::machine())?;
        writeln!(
            f,
            "  QEMU: accelerator {}, firmware {}, {MEMORY_MIB} MiB, {CPUS} vCPUs, virtio disk (a throwaway overlay), \
virtio-net (user, the API forwarded from the host's loopback), virtio-rng",
            self.accel.name(),
            match self.firmware {
                Firmware::Bios => "SeaBIOS",
                Firmware::Uefi => "OVMF",
            }
        )?;
        writeln!(
            f,
            "  runs: {}, each a fresh boot to standby, then POST /v1/upgrade?reboot=1 with the bundle streamed; the floor after it",
            self.runs.len()
        )?;
        writeln!(f)?;
        writeln!(f, "  {:<44}median  (min–max)", "request → …")?;
        for (label, read) in FIGURES {
            match Spread::of(self.runs.iter().filter_map(read)) {
                Some(s) => writeln!(
                    f,
                    "  {label:<44}{:>6.1} s  ({:.1}–{:.1})",
                    s.median, s.min, s.max
                )?,
                None => writeln!(f, "  {label:<44}not seen")?,
            }
        }
        let label = "standby / floor, per run";
        match Spread::of(
            self.runs
                .iter()
                .filter_map(|r| Some(r.seen.standby? / r.floor())),
        ) {
            Some(s) => writeln!(
                f,
                "  {label:<44}{:>6.2} ×  ({:.2}–{:.2})",
                s.median, s.min, s.max
            )?,
            None => writeln!(f, "  {label:<44}not seen")?,
        }
        writeln!(f)?;
        writeln!(
            f,
            "  times are wall seconds from the host sending the request; console lines are polled every {} ms. \
The floor's write is on the host (a file in the temp folder, synced), not through the guest's virtio disk and TLS: \
what the node adds over it is streaming through TLS, hashing, the verity read-back and the write through the VM.",
            POLL.as_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_after_the_request_gives_trial_standby_and_good_once_each() {
        let mut s = Sightings::default();
        s.update(
            "[basalt] upgrade: version 2.0.0 written to slot b and verified\n[basalt] upgrade: slot b is on tr",
            Duration::from_secs(3),
        );
        assert_eq!(s, Sightings::default(), "a half line is not read");
        s.update(
            "[basalt] upgrade: slot b is on trial: healthy within 300 s\n[basalt] standby t=2.5\n",
            Duration::from_secs(9),
        );
        assert_eq!((s.trial, s.standby, s.good), (Some(9.0), Some(9.0), None));
        s.update(
            "[basalt] upgrade: slot b is on trial\n[basalt] standby t=2.5\n[basalt] upgrade: slot b is healthy and marked good (GRUB saved_entry=b)\n",
            Duration::from_secs(12),
        );
        assert_eq!(
            (s.trial, s.standby, s.good),
            (Some(9.0), Some(9.0), Some(12.0)),
            "the first sighting stays"
        );
    }

    #[test]
    fn the_write_floor_writes_the_whole_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("b.bundle");
        std::fs::write(&bundle, vec![7u8; 3 << 20]).expect("write");
        let t = write_floor(&bundle).expect("floor");
        assert!(t > 0.0 && t < 60.0, "{t}");
        let err = write_floor(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn the_report_names_the_floor_and_the_ratio() {
        let run = |standby: f64| UpgradeRun {
            response: 40.0,
            seen: Sightings {
                trial: Some(standby - 1.0),
                standby: Some(standby),
                good: Some(standby + 1.0),
            },
            write_floor: 2.0,
            boot_floor: 8.0,
        };
        let bench = UpgradeBench {
            image: "v1.qcow2".into(),
            bundle: "v2.bundle".into(),
            bundle_bytes: 3 << 20,
            accel: Accel::Tcg,
            firmware: Firmware::Bios,
            runs: vec![run(60.0), run(80.0)],
        };
        let text = bench.to_string();
        assert!(text.contains("3.0 MiB"), "{text}");
        assert!(text.contains("new slot at standby"), "{text}");
        assert!(
            text.contains("  70.0 s  (60.0–80.0)"),
            "median of the standby times: {text}"
        );
        assert!(text.contains("7.00 ×"), "70 s over a 10 s floor: {text}");
    }
}
