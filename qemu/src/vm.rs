//! A QEMU guest over a throwaway overlay of a disk image, observed through its serial log.
//!
//! The image under test is never written: every VM boots a qcow2 overlay in its own temporary
//! directory, which also holds the serial log, QEMU's own output and the UEFI variable store.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::accel::{detect_accel, Accel};
use crate::error::HarnessError;
use crate::firmware::{ovmf, Firmware};
use crate::overlay::create_overlay;

pub(crate) const QEMU_SYSTEM: &str = "qemu-system-x86_64";

const POLL_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_MEMORY_MIB: u32 = 1024;
const DEFAULT_CPUS: u32 = 2;

/// QEMU arguments for a node's devices: a virtio NIC on QEMU's user network and
/// virtio-rng (the kernel's CRNG needs a source in a guest without RDRAND).
/// `restrict` closes the network to the outside (the guest reaches only QEMU's DHCP
/// server); without it the guest reaches the host's loopback as 10.0.2.2. `forwards` are
/// `(host port on 127.0.0.1, guest port)` TCP forwards.
pub fn node_devices(restrict: bool, forwards: &[(u16, u16)]) -> Vec<String> {
    let mut netdev = String::from("user,id=n0");
    if restrict {
        netdev.push_str(",restrict=on");
    }
    for (host, guest) in forwards {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    [
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=n0",
        "-device",
        "virtio-rng-pci",
    ]
    .map(String::from)
    .to_vec()
}

/// The first whole line of `serial` that contains `what`, without its line ending. A last
/// line still being written (no newline yet) is not returned: under TCG the console is
/// slow enough that a waiter would otherwise see half a line.
fn complete_line(serial: &str, what: &str) -> Option<String> {
    serial
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .find(|line| line.contains(what))
        .map(|line| line.trim_end_matches(['\n', '\r']).to_string())
}

/// Configures and starts a [`Vm`].
#[derive(Clone, Debug)]
pub struct VmBuilder {
    image: PathBuf,
    firmware: Firmware,
    memory_mib: u32,
    cpus: u32,
    disk_size: Option<u64>,
    serial_log: Option<PathBuf>,
    extra_args: Vec<OsString>,
    accel: Option<Accel>,
    reboots: bool,
}

impl VmBuilder {
    /// A VM booting `image` (raw or qcow2) with SeaBIOS, 1 GiB and 2 CPUs.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        VmBuilder {
            image: image.into(),
            firmware: Firmware::Bios,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            disk_size: None,
            serial_log: None,
            extra_args: Vec::new(),
            accel: None,
            reboots: false,
        }
    }

    /// Whether a reboot of the guest stays a reboot (default: no, `-no-reboot` makes it
    /// end QEMU, which most tests wait for). A/B upgrade tests need the node to reboot
    /// itself, into its new slot and back.
    pub fn reboots(mut self, reboots: bool) -> Self {
        self.reboots = reboots;
        self
    }

    /// BIOS (default) or UEFI.
    pub fn firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }

    /// Guest memory in MiB (default 1024).
    pub fn memory_mib(mut self, memory_mib: u32) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Guest CPUs (default 2).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Size in bytes of the disk the guest sees; `None` (default) keeps the image's size.
    /// Growing it is how a first boot that grows its data partition is tested.
    pub fn disk_size(mut self, bytes: Option<u64>) -> Self {
        self.disk_size = bytes;
        self
    }

    /// Where the serial log is written (default: `serial.log` in the VM's temporary directory,
    /// gone with the [`Vm`]). Ignored by [`run_interactive`](Self::run_interactive).
    pub fn serial_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.serial_log = Some(path.into());
        self
    }

    /// Arguments appended to the QEMU command line, e.g. a `-netdev user,hostfwd=…` and its
    /// `-device`.
    pub fn extra_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Use this accelerator instead of [`detect_accel`]'s choice.
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = Some(accel);
        self
    }

    /// Starts QEMU in the background with the serial port going to the log file.
    pub fn spawn(self) -> Result<Vm, HarnessError> {
        let prepared = self.prepare()?;
        let serial = self
            .serial_log
            .clone()
            .unwrap_or_else(|| prepared.dir.path().join("serial.log"));
        let qemu_log = prepared.dir.path().join("qemu.log");
        let stdout = create_file(&qemu_log, "create QEMU log")?;
        let stderr = stdout.try_clone().map_err(|source| HarnessError::Io {
            step: "duplicate handle of QEMU log",
            path: qemu_log.clone(),
            source,
        })?;
        let mut serial_arg = OsString::from("file:");
        serial_arg.push(&serial);
        let child = Command::new(QEMU_SYSTEM)
            .args(&prepared.args)
            .args(["-display", "none", "-serial"])
            .arg(serial_arg)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| spawn_error(QEMU_SYSTEM, e))?;
        Ok(Vm {
            child,
            exit: None,
            accel: prepared.accel,
            started: Instant::now(),
            serial,
            qemu_log,
            overlay: prepared.overlay,
            _dir: prepared.dir,
        })
    }

    /// Runs QEMU in the foreground with the guest console (and QEMU's monitor, Ctrl-A C) on
    /// this terminal, over the same kind of throwaway overlay; returns when QEMU exits.
    pub fn run_interactive(self) -> Result<ExitStatus, HarnessError> {
        let prepared = self.prepare()?;
        Command::new(QEMU_SYSTEM)
            .args(&prepared.args)
            .args(["-display", "none", "-serial", "mon:stdio"])
            .args(&self.extra_args)
            .status()
            .map_err(|e| spawn_error(QEMU_SYSTEM, e))
    }

    /// Everything but the serial port: temporary directory, overlay, firmware, arguments.
    fn prepare(&self) -> Result<Prepared, HarnessError> {
        let accel = self.accel.unwrap_or_else(detect_accel);
        let dir = tempfile::Builder::new()
            .prefix("basalt-vm-")
            .tempdir()
            .map_err(HarnessError::TempDir)?;
        let overlay = dir.path().join("overlay.qcow2");
        create_overlay(&self.image, &overlay, self.disk_size)?;

        let mut args: Vec<OsString> = accel.machine_args().iter().map(Into::into).collect();
        args.extend(
            [
                "-m".to_string(),
                self.memory_mib.to_string(),
                "-smp".to_string(),
                self.cpus.to_string(),
                "-nodefaults".to_string(),
                "-no-user-config".to_string(),
                "-drive".to_string(),
                format!("if=virtio,format=qcow2,file={}", option_path(&overlay)),
            ]
            .map(OsString::from),
        );
        if !self.reboots {
            args.push("-no-reboot".into());
        }
        if self.firmware == Firmware::Uefi {
            args.extend(uefi_args(dir.path())?);
        }
        Ok(Prepared {
            dir,
            overlay,
            accel,
            args,
        })
    }
}

struct Prepared {
    dir: TempDir,
    overlay: PathBuf,
    accel: Accel,
    args: Vec<OsString>,
}

/// OVMF as two pflash drives: shared read-only code, and a private copy of the variable store.
fn uefi_args(dir: &Path) -> Result<Vec<OsString>, HarnessError> {
    let ovmf = ovmf()?;
    let vars = dir.join("OVMF_VARS.fd");
    std::fs::copy(&ovmf.vars_template, &vars).map_err(|source| HarnessError::Io {
        step: "copy OVMF variable store",
        path: ovmf.vars_template.clone(),
        source,
    })?;
    let code = option_path(&ovmf.code);
    let vars = option_path(&vars);
    Ok([
        "-drive".to_string(),
        format!("if=pflash,unit=0,format=raw,readonly=on,file={code}"),
        "-drive".to_string(),
        format!("if=pflash,unit=1,format=raw,file={vars}"),
    ]
    .map(OsString::from)
    .into())
}

fn spawn_error(program: &'static str, source: io::Error) -> HarnessError {
    if source.kind() == io::ErrorKind::NotFound {
        HarnessError::QemuNotFound { program }
    } else {
        HarnessError::Spawn { program, source }
    }
}

fn create_file(path: &Path, step: &'static str) -> Result<File, HarnessError> {
    File::create(path).map_err(|source| HarnessError::Io {
        step,
        path: path.to_path_buf(),
        source,
    })
}

/// A path as the value of a QEMU `key=value,…` option, where a literal comma is doubled.
fn option_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// A running QEMU guest. Dropping it kills QEMU and waits for it, then deletes its overlay.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    exit: Option<ExitStatus>,
    accel: Accel,
    started: Instant,
    serial: PathBuf,
    qemu_log: PathBuf,
    overlay: PathBuf,
    _dir: TempDir,
}

impl Vm {
    /// The whole serial log so far, invalid UTF-8 replaced.
    pub fn serial(&self) -> String {
        // Before QEMU has created the file there is simply nothing yet.
        std::fs::read(&self.serial)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Polls the serial log until a line contains `what`; returns that line (without `\r`; the
    /// guest may still be writing it). Fails when QEMU exits first or `timeout` passes.
    pub fn wait_for(&mut self, what: &str, timeout: Duration) -> Result<String, HarnessError> {
        self.poll(
            &format!("{what:?} on the serial console"),
            timeout,
            |serial| complete_line(serial, what),
        )
    }

    /// Polls `f` over the whole serial log until it returns `Some`. Fails when QEMU exits
    /// first or `timeout` passes.
    pub fn wait_until<T>(
        &mut self,
        timeout: Duration,
        f: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, HarnessError> {
        self.poll("a condition on the serial console", timeout, f)
    }

    /// Waits for QEMU to exit, e.g. after the guest powered off (`-no-reboot` turns a reboot
    /// into an exit too).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            self.sleep_until(deadline, "QEMU to exit", timeout)?;
        }
    }

    /// Kills QEMU and waits for it; does nothing if it has already exited.
    pub fn kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        // Fails only when QEMU has exited already, which wait() then reports.
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exit = Some(status);
        }
    }

    /// The accelerator QEMU runs with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// When QEMU was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial log file.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// The qcow2 overlay the guest writes to.
    pub fn overlay(&self) -> &Path {
        &self.overlay
    }

    /// What QEMU itself printed on stdout and stderr (warnings, errors), not the guest.
    pub fn qemu_output(&self) -> String {
        std::fs::read(&self.qemu_log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn poll<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Checked before reading so that the last read after an exit sees all output.
            let exited = self.try_wait()?;
            if let Some(found) = f(&self.serial()) {
                return Ok(found);
            }
            if let Some(status) = exited {
                return Err(HarnessError::Exited {
                    what: what.to_string(),
                    status,
                    stderr: self.qemu_output(),
                });
            }
            self.sleep_until(deadline, what, timeout)?;
        }
    }

    fn sleep_until(
        &self,
        deadline: Instant,
        what: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HarnessError::Timeout {
                what: what.to_string(),
                timeout,
            });
        }
        thread::sleep(left.min(POLL_INTERVAL));
        Ok(())
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, HarnessError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(HarnessError::Wait)?;
        }
        Ok(self.exit)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_still_being_written_is_not_returned() {
        let serial = "boot\r\n[basalt] joined t=1.0\r\nk3s: config server=x token=12";
        assert_eq!(
            complete_line(serial, "joined"),
            Some("[basalt] joined t=1.0".to_string())
        );
        assert_eq!(complete_line(serial, "k3s: config"), None);
        let done = format!("{serial}34\n");
        assert_eq!(
            complete_line(&done, "k3s: config"),
            Some("k3s: config server=x token=1234".to_string())
        );
    }
    use crate::accel::boot_disk;
    use crate::overlay::{json_string_field, QEMU_IMG};

    /// Generous enough for TCG on a loaded machine; the guests here print within a second.
    const BOOT: Duration = Duration::from_secs(20);

    fn write_image(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, bytes)?;
        Ok(path)
    }

    /// A disk whose boot sector copies itself to LBA 1 through BIOS int 13h, then prints
    /// `WROTE` (or `WRITEFAIL`) to COM1 and halts.
    fn self_copying_disk() -> Vec<u8> {
        const CODE: [u8; 43] = [
            0x31, 0xc0, // xor ax, ax
            0x8e, 0xd8, // mov ds, ax
            0x8e, 0xc0, // mov es, ax
            0xfc, // cld
            0xb8, 0x01, 0x03, // mov ax, 0x0301      ; write 1 sector
            0xb9, 0x02, 0x00, // mov cx, 0x0002      ; cylinder 0, sector 2 (LBA 1)
            0xb6, 0x00, // mov dh, 0                 ; head 0; dl = boot drive from BIOS
            0xbb, 0x00, 0x7c, // mov bx, 0x7c00      ; es:bx = this sector
            0xcd, 0x13, // int 0x13
            0xbe, 0x2b, 0x7c, // mov si, ok
            0x73, 0x03, // jnc print
            0xbe, 0x33, 0x7c, // mov si, fail
            0xba, 0xf8, 0x03, // print: mov dx, 0x3f8
            0xac, // next: lodsb
            0x84, 0xc0, // test al, al
            0x74, 0x03, // jz halt
            0xee, // out dx, al
            0xeb, 0xf8, // jmp next
            0xfa, // halt: cli
            0xf4, // hlt
            0xeb, 0xfd, // jmp hlt
        ];
        let mut disk = vec![0u8; 1 << 20];
        disk[..CODE.len()].copy_from_slice(&CODE);
        let messages = b"WROTE\r\n\0WRITEFAIL\r\n\0";
        disk[CODE.len()..CODE.len() + messages.len()].copy_from_slice(messages);
        disk[510..512].copy_from_slice(&[0x55, 0xaa]);
        disk
    }

    /// A disk whose boot sector prints `BYE` and then asks `isa-debug-exit` at 0xf4 to end
    /// QEMU with exit code (2 << 1) | 1 = 5.
    fn exiting_disk() -> Vec<u8> {
        const CODE: [u8; 27] = [
            0x31, 0xc0, // xor ax, ax
            0x8e, 0xd8, // mov ds, ax
            0xfc, // cld
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xbe, 0x1b, 0x7c, // mov si, message
            0xac, // next: lodsb
            0x84, 0xc0, // test al, al
            0x74, 0x03, // jz exit
            0xee, // out dx, al
            0xeb, 0xf8, // jmp next
            0xb0, 0x02, // exit: mov al, 2
            0xe6, 0xf4, // out 0xf4, al
            0xfa, // cli
            0xf4, // halt: hlt
            0xeb, 0xfd, // jmp halt
        ];
        let mut disk = vec![0u8; 1 << 20];
        disk[..CODE.len()].copy_from_slice(&CODE);
        disk[CODE.len()..CODE.len() + 6].copy_from_slice(b"BYE\r\n\0");
        disk[510..512].copy_from_slice(&[0x55, 0xaa]);
        disk
    }

    fn process_exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn boots_a_raw_image_sees_its_serial_and_drop_kills_qemu() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let image = write_image(
            dir.path(),
            "hello.raw",
            &boot_disk("hello from the guest\r\n"),
        )?;
        let mut vm = VmBuilder::new(&image).spawn()?;
        let line = vm.wait_for("hello", vm.accel().scale(BOOT))?;
        assert_eq!(line, "hello from the guest");
        assert!(vm.serial().contains("hello from the guest\r\n"));
        assert_eq!(vm.accel(), detect_accel());
        let pid = vm.pid();
        assert!(process_exists(pid));
        drop(vm);
        assert!(!process_exists(pid), "QEMU {pid} still running after drop");
        Ok(())
    }

    #[test]
    fn guest_writes_land_in_the_overlay_not_the_image() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let original = self_copying_disk();
        // `.img` says nothing about the format: qemu-img info has to detect raw.
        let image = write_image(dir.path(), "base.img", &original)?;
        let size = 8 << 20;
        let mut vm = VmBuilder::new(&image).disk_size(Some(size)).spawn()?;
        vm.wait_for("WROTE", vm.accel().scale(BOOT))?;
        assert_eq!(
            std::fs::read(&image)?,
            original,
            "guest wrote into the base image"
        );

        let info = Command::new(QEMU_IMG)
            .args(["info", "-U", "--output=json"])
            .arg(vm.overlay())
            .output()?;
        let info = String::from_utf8(info.stdout)?;
        let backing = image.canonicalize()?;
        assert_eq!(json_string_field(&info, "format").as_deref(), Some("qcow2"));
        assert_eq!(
            json_string_field(&info, "backing-filename").as_deref(),
            backing.to_str()
        );
        assert_eq!(
            json_string_field(&info, "backing-filename-format").as_deref(),
            Some("raw")
        );
        assert!(
            info.contains(&format!("\"virtual-size\": {size},")),
            "{info}"
        );
        Ok(())
    }

    #[test]
    fn wait_for_a_missing_string_times_out() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let image = write_image(dir.path(), "quiet.raw", &boot_disk("nothing to see\r\n"))?;
        let mut vm = VmBuilder::new(&image).spawn()?;
        let timeout = Duration::from_millis(1500);
        let started = Instant::now();
        match vm.wait_for("never printed", timeout) {
            Err(HarnessError::Timeout { what, timeout: t }) => {
                assert!(what.contains("never printed"), "{what}");
                assert_eq!(t, timeout);
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() >= timeout);
        // A timeout leaves QEMU running; the VM is still usable.
        vm.wait_for("nothing to see", vm.accel().scale(BOOT))?;
        Ok(())
    }

    #[test]
    fn qemu_exiting_ends_the_wait_and_reports_its_status() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let image = write_image(dir.path(), "bye.raw", &exiting_disk())?;
        let mut vm = VmBuilder::new(&image)
            .extra_args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .spawn()?;
        match vm.wait_for("never printed", vm.accel().scale(BOOT)) {
            Err(HarnessError::Exited { status, .. }) => assert_eq!(status.code(), Some(5)),
            other => panic!("expected QEMU to exit, got {other:?}"),
        }
        assert!(vm.serial().contains("BYE"));
        assert_eq!(vm.wait_exit(Duration::ZERO)?.code(), Some(5));
        Ok(())
    }

    #[test]
    fn qemu_errors_carry_its_stderr() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let image = write_image(dir.path(), "any.raw", &boot_disk("x"))?;
        let mut vm = VmBuilder::new(&image)
            .accel(Accel::Tcg)
            .extra_args(["-no-such-option"])
            .spawn()?;
        match vm.wait_for("x", BOOT) {
            Err(HarnessError::Exited { stderr, .. }) => {
                assert!(stderr.contains("-no-such-option"), "{stderr}")
            }
            other => panic!("expected QEMU to reject the option, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn wait_until_returns_the_conditions_value() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let image = write_image(dir.path(), "n.raw", &boot_disk("answer=42\r\n"))?;
        let mut vm = VmBuilder::new(&image).spawn()?;
        let answer: u32 = vm.wait_until(vm.accel().scale(BOOT), |serial| {
            serial
                .split_once("answer=")?
                .1
                .lines()
                .next()?
                .trim()
                .parse()
                .ok()
        })?;
        assert_eq!(answer, 42);
        Ok(())
    }

    #[test]
    fn serial_log_goes_where_asked() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let image = write_image(dir.path(), "log.raw", &boot_disk("logged\r\n"))?;
        let log = dir.path().join("console.log");
        let mut vm = VmBuilder::new(&image).serial_log(&log).spawn()?;
        vm.wait_for("logged", vm.accel().scale(BOOT))?;
        assert_eq!(vm.serial_path(), log);
        drop(vm);
        assert!(std::fs::read_to_string(&log)?.contains("logged"));
        Ok(())
    }

    #[test]
    fn uefi_boots_ovmf_from_pflash() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // Not UEFI-bootable: OVMF falls through to its built-in shell, which is proof enough.
        let image = write_image(dir.path(), "bios-only.raw", &boot_disk("x"))?;
        let mut vm = VmBuilder::new(&image).firmware(Firmware::Uefi).spawn()?;
        vm.wait_for(
            "UEFI Interactive Shell",
            vm.accel().scale(Duration::from_secs(30)),
        )?;
        Ok(())
    }

    #[test]
    fn a_missing_image_fails_at_the_overlay_step() {
        let missing = PathBuf::from("/nonexistent/basalt.img");
        match VmBuilder::new(&missing).accel(Accel::Tcg).spawn() {
            Err(HarnessError::Overlay { image, source }) => {
                assert_eq!(image, missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected an overlay error, got {other:?}"),
        }
    }

    #[test]
    fn node_devices_have_a_nic_rng_and_the_forwards() {
        let args = node_devices(true, &[(50001, 50000)]);
        assert_eq!(
            args[1],
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:50001-:50000"
        );
        assert!(args.contains(&"virtio-rng-pci".to_string()));
        assert_eq!(node_devices(false, &[])[1], "user,id=n0");
    }

    #[test]
    fn option_paths_double_commas() {
        assert_eq!(option_path(Path::new("/a,b/c")), "/a,,b/c");
    }
}
