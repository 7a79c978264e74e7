//! Creating a VM: its directory staged with its labels, the overlay and the config, then
//! QEMU daemonized with the node API forwarded to a free loopback port.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use basalt_api::layout::fw_cfg;
use basalt_qemu::{Accel, Firmware};

use super::files::{unix_ms, write_json_atomic, write_private};
use super::process::{free_port, option_path, read_pidfile, run};
use super::*;

impl Inner {
    pub(super) fn create(&self, req: &CreateServer) -> Result<Server, QemuError> {
        check_name("VM", &req.name)?;
        let name = req.name.as_str();
        let image = Path::new(&req.image)
            .canonicalize()
            .map_err(|source| QemuError::Image {
                path: req.image.clone().into(),
                source,
            })?;
        let dir = self.vm_dir(name);
        if dir.exists() {
            if let Some(server) = self.same_running_vm(req, &image)? {
                // A retried create whose first answer was lost: the VM is already there.
                return Ok(server);
            }
            return Err(QemuError::Exists {
                vm: name.to_owned(),
                dir,
            });
        }
        let created = SystemTime::now();
        self.stage(name, &req.labels, &dir)?;
        tracing::info!(vm = name, image = %image.display(), "creating a QEMU VM");
        match self.start(name, &image, &req.user_data, &dir, created) {
            Ok(api_port) => Ok(Server {
                id: name.to_owned(),
                name: name.to_owned(),
                labels: req.labels.clone(),
                created,
                api: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, api_port))),
            }),
            Err(e) => {
                // Nothing of a failed create is left behind; the error says why.
                if let Err(cleanup) = self.delete(name) {
                    tracing::warn!(vm = name, error = %error_chain(&cleanup), "cleaning up after a failed create");
                }
                Err(e)
            }
        }
    }

    /// The existing VM `req.name` when it is what `req` asks for (its labels, its image)
    /// and its QEMU runs.
    fn same_running_vm(
        &self,
        req: &CreateServer,
        image: &Path,
    ) -> Result<Option<Server>, QemuError> {
        let Some(info) = self.inspect(&req.name)? else {
            return Ok(None);
        };
        let same_image = info.image.as_deref() == image.to_str();
        Ok(self
            .server(&req.name)?
            .filter(|s| same_image && s.api.is_some() && s.labels == req.labels))
    }

    /// Makes the VM's directory appear with its labels in one rename, so that a listed VM
    /// always has its pool label.
    pub(super) fn stage(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        dir: &Path,
    ) -> Result<(), QemuError> {
        let staging = self.state_dir.join(format!(".creating-{name}"));
        if staging.exists() {
            // Left by a create that was killed before its rename: never a VM.
            fs::remove_dir_all(&staging).map_err(|source| QemuError::Io {
                step: "remove the stale staging directory",
                path: staging.clone(),
                source,
            })?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|source| QemuError::Io {
                step: "create the staging directory",
                path: staging.clone(),
                source,
            })?;
        write_json_atomic(&staging.join(LABELS_FILE), labels)?;
        if let Err(source) = fs::rename(&staging, dir) {
            // Best effort: the next create of this name removes it anyway.
            let _ = fs::remove_dir_all(&staging);
            return Err(if dir.exists() {
                QemuError::Exists {
                    vm: name.to_owned(),
                    dir: dir.to_path_buf(),
                }
            } else {
                QemuError::Io {
                    step: "move the staged VM into place at",
                    path: dir.to_path_buf(),
                    source,
                }
            });
        }
        Ok(())
    }

    /// Overlay, config, QEMU; returns the forwarded API port.
    pub(super) fn start(
        &self,
        name: &str,
        image: &Path,
        user_data: &str,
        dir: &Path,
        created: SystemTime,
    ) -> Result<u16, QemuError> {
        let config = dir.join(CONFIG_FILE);
        // The machine config carries the node's private key.
        write_private(&config, user_data.as_bytes())?;
        let overlay = dir.join(OVERLAY_FILE);
        let format = if image.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        let mut qemu_img = Command::new(QEMU_IMG);
        qemu_img
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(image)
            .args(["-F", format])
            .arg(&overlay);
        run(name, QEMU_IMG, qemu_img)?;
        let firmware = self.firmware_args(name, dir)?;
        let accel = basalt_qemu::detect_accel();
        let image_id = image.to_string_lossy().into_owned();
        let created_unix_ms = unix_ms(created);
        let mut attempt = 0;
        let api_port = loop {
            attempt += 1;
            let api_port = free_port(name)?;
            let record = VmRecord {
                pid: None,
                api_port,
                image: image_id.clone(),
                created_unix_ms,
            };
            write_json_atomic(&dir.join(VM_FILE), &record)?;
            let qemu = self.qemu_command(accel, dir, name, api_port, &firmware);
            match run(name, QEMU_SYSTEM, qemu) {
                Ok(()) => break api_port,
                Err(QemuError::Tool { stderr, .. })
                    if attempt < PORT_ATTEMPTS && stderr.contains("host forwarding") =>
                {
                    tracing::debug!(vm = name, api_port, "port taken before QEMU bound it");
                }
                Err(e) => return Err(e),
            }
        };
        let pid = read_pidfile(name, &dir.join(PID_FILE))?;
        let record = VmRecord {
            pid: Some(pid),
            api_port,
            image: image_id,
            created_unix_ms,
        };
        write_json_atomic(&dir.join(VM_FILE), &record)?;
        tracing::info!(
            vm = name,
            pid,
            api_port,
            accel = accel.name(),
            "QEMU VM started"
        );
        Ok(api_port)
    }

    pub(super) fn firmware_args(&self, name: &str, dir: &Path) -> Result<Vec<OsString>, QemuError> {
        let firmware = match self.settings.firmware.unwrap_or_default() {
            FirmwareSetting::Bios => Firmware::Bios,
            FirmwareSetting::Uefi => Firmware::Uefi,
        };
        if firmware == Firmware::Bios {
            return Ok(Vec::new());
        }
        let ovmf = basalt_qemu::ovmf().map_err(|source| QemuError::Firmware {
            vm: name.to_owned(),
            source,
        })?;
        let vars = dir.join(UEFI_VARS_FILE);
        fs::copy(&ovmf.vars_template, &vars).map_err(|source| QemuError::Io {
            step: "copy the OVMF variable store to",
            path: vars.clone(),
            source,
        })?;
        Ok(vec![
            "-drive".into(),
            format!(
                "if=pflash,unit=0,format=raw,readonly=on,file={}",
                option_path(&ovmf.code)
            )
            .into(),
            "-drive".into(),
            format!("if=pflash,unit=1,format=raw,file={}", option_path(&vars)).into(),
        ])
    }

    /// The VM's QEMU, daemonized; the same machine as the harness's `VmBuilder`, but a
    /// reboot of the guest stays a reboot (no `-no-reboot`): a node may reboot itself.
    pub(super) fn qemu_command(
        &self,
        accel: Accel,
        dir: &Path,
        name: &str,
        api_port: u16,
        firmware: &[OsString],
    ) -> Command {
        let mut command = Command::new(QEMU_SYSTEM);
        command.args(accel.machine_args()).args([
            "-name".to_owned(),
            name.to_owned(),
            "-m".to_owned(),
            self.settings.memory_mib.to_string(),
            "-smp".to_owned(),
            self.settings.cpus.to_string(),
            "-nodefaults".to_owned(),
            "-no-user-config".to_owned(),
            "-drive".to_owned(),
            format!(
                "if=virtio,format=qcow2,file={}",
                option_path(&dir.join(OVERLAY_FILE))
            ),
        ]);
        command.args(firmware);
        let mut serial = OsString::from("file:");
        serial.push(dir.join(CONSOLE_FILE));
        command
            .args(["-display", "none", "-serial"])
            .arg(serial)
            .arg("-fw_cfg")
            .arg(fw_cfg::qemu_arg(fw_cfg::CONFIG, &dir.join(CONFIG_FILE)))
            .args(basalt_qemu::node_devices(
                false,
                &[(api_port, basalt_api::node::DEFAULT_PORT)],
            ))
            .arg("-daemonize")
            .arg("-pidfile")
            .arg(dir.join(PID_FILE));
        command
    }
}
