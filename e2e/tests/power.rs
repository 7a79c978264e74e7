//! The ACPI power button (QEMU's `system_powerdown`, a cloud console's "shutdown") powers
//! a standby node off in order, and QEMU exits by itself.

mod common;

use anyhow::Context;
use basalt_qemu::{Vm, VmBuilder};
use common::{dump, expect_line, image};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Guest boot budget on KVM; the harness scales it for TCG.
const BOOT: Duration = Duration::from_secs(60);

/// Power-off budget once the button is pressed (no children to stop in standby).
const POWER_OFF: Duration = Duration::from_secs(30);

/// How long QEMU's monitor may take to answer one command.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads QMP lines until one carries `key` at the top level (events are skipped).
fn qmp_read(reader: &mut impl BufRead, key: &str) -> anyhow::Result<serde_json::Value> {
    loop {
        let mut line = String::new();
        anyhow::ensure!(reader.read_line(&mut line)? > 0, "QMP closed before {key}");
        let msg: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))?;
        if let Some(err) = msg.get("error") {
            anyhow::bail!("QMP error: {err}");
        }
        if msg.get(key).is_some() {
            return Ok(msg);
        }
    }
}

/// Presses the ACPI power button through QMP and waits for QEMU to accept it.
fn system_powerdown(socket: &Path) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).with_context(|| format!("connect {socket:?}"))?;
    stream.set_read_timeout(Some(QMP_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    qmp_read(&mut reader, "QMP")?;
    for command in ["qmp_capabilities", "system_powerdown"] {
        writeln!(writer, r#"{{"execute": "{command}"}}"#)?;
        qmp_read(&mut reader, "return").with_context(|| command.to_string())?;
    }
    Ok(())
}

/// Fails unless every needle appears in `text` after the previous one.
fn in_order(text: &str, needles: &[&str]) -> anyhow::Result<()> {
    let mut rest = text;
    for needle in needles {
        let at = rest
            .find(needle)
            .with_context(|| format!("{needle:?} missing or out of order"))?;
        rest = &rest[at + needle.len()..];
    }
    Ok(())
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn in_order_finds_lines_only_in_that_order() {
    let log = "a\nb\nc\n";
    assert!(in_order(log, &["a", "b", "c"]).is_ok());
    assert!(in_order(log, &["a", "c", "b"]).is_err());
    assert!(in_order(log, &["a", "d"]).is_err());
}

#[test]
#[cfg_attr(
    basalt_skip_qemu,
    ignore = "needs QEMU and the image host tools: scripts/install-host-tools"
)]
fn the_acpi_power_button_powers_a_standby_node_off_in_order() -> anyhow::Result<()> {
    let img = image();
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("qmp.sock");
    let mut vm = VmBuilder::new(&img.qcow2)
        .extra_args([
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", socket.display()),
        ])
        .spawn()?;
    expect_line(
        &mut vm,
        "[basalt] power button: watching /dev/input/event",
        BOOT,
    )?;
    expect_line(&mut vm, "[basalt] standby t=", BOOT)?;

    if let Err(e) = system_powerdown(&socket) {
        print_logs(&vm);
        return Err(e);
    }
    expect_line(&mut vm, "[basalt] shutdown: power-off", POWER_OFF)?;
    let status = vm
        .wait_exit(vm.accel().scale(POWER_OFF))
        .map_err(|e| dump(&vm, e))?;

    let serial = vm.serial();
    let after_standby = &serial[serial.find("[basalt] standby t=").context("standby")?..];
    let checks = in_order(
        after_standby,
        &[
            "[basalt] power button pressed: powering off",
            "[basalt] shutdown (power-off): stopping processes",
            "[basalt] shutdown: syncing filesystems",
            "[basalt] shutdown: STATE unmounted",
            "[basalt] shutdown: power-off",
        ],
    )
    .and_then(|()| {
        anyhow::ensure!(!serial.contains("[basalt] error"), "an error was logged");
        anyhow::ensure!(status.success(), "QEMU exited with {status}");
        Ok(())
    });
    match &checks {
        Ok(()) => eprintln!("----- after standby -----\n{after_standby}\n-----"),
        Err(_) => print_logs(&vm),
    }
    checks
}

fn print_logs(vm: &Vm) {
    eprintln!(
        "----- serial log -----\n{}\n----- QEMU output -----\n{}\n-----",
        vm.serial(),
        vm.qemu_output()
    );
}
