//! The ACPI power button as an orderly power-off.
//!
//! QEMU's `system_powerdown` and a cloud console's "shutdown" press the ACPI power button.
//! The kernel's `button` driver turns that into a `KEY_POWER` press on an input device
//! named "Power Button", which `evdev` exposes as `/dev/input/eventN`; with no acpid,
//! nobody listens. Here a thread per such device waits for the press and sends SIGTERM
//! to PID1, whose signal loop then powers off as for any other SIGTERM.

use crate::pid1::console;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The drivers. Both are modules in Debian's cloud kernel (the input core is built in).
/// Stage 2 loads them with the other drivers in one parallel batch (its coldplug), so in
/// no set order: whichever comes second connects them (`evdev` attaches to input devices
/// already registered, and to each one registered after it). Registration is synchronous:
/// the event node exists once both are loaded.
pub const MODULES: &[&str] = &["evdev", "button"];

/// The input device name the ACPI `button` driver gives both the fixed-feature power
/// button (LNXPWRBN) and the control-method one (PNP0C0C).
pub const DEVICE_NAME: &str = "Power Button";

/// Input devices in sysfs, relative to the root.
pub const INPUT_CLASS: &str = "sys/class/input";

/// Their nodes on devtmpfs, relative to the root.
pub const INPUT_DEV: &str = "dev/input";

/// `EV_KEY` and `KEY_POWER` of `<linux/input-event-codes.h>`.
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// Size of the kernel's `struct input_event`: a `struct timeval`, then type (u16), code
/// (u16) and value (i32).
pub const EVENT_SIZE: usize = std::mem::size_of::<libc::input_event>();

#[cfg(target_arch = "x86_64")]
const _: () = assert!(EVENT_SIZE == 24);

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("list {0}")]
    List(PathBuf, #[source] io::Error),
    #[error("open {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("start the watcher of {0}")]
    Spawn(PathBuf, #[source] io::Error),
    #[error("read {0}")]
    Read(PathBuf, #[source] io::Error),
}

/// One `struct input_event` without its timestamp.
///
/// Records are decoded by hand rather than with the `evdev` crate: one fixed-size record
/// and one key are all that is needed, not that crate's dependencies and ioctls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputEvent {
    pub kind: u16,
    pub code: u16,
    pub value: i32,
}

impl InputEvent {
    /// Decodes one record in native byte order. The timestamp's width varies between
    /// architectures, so the fields are taken from the record's end.
    pub fn from_bytes(b: &[u8; EVENT_SIZE]) -> Self {
        const T: usize = EVENT_SIZE - 8;
        InputEvent {
            kind: u16::from_ne_bytes([b[T], b[T + 1]]),
            code: u16::from_ne_bytes([b[T + 2], b[T + 3]]),
            value: i32::from_ne_bytes([b[T + 4], b[T + 5], b[T + 6], b[T + 7]]),
        }
    }

    /// The power key going down (not its release, not autorepeat).
    pub fn is_power_press(&self) -> bool {
        self.kind == EV_KEY && self.code == KEY_POWER && self.value == 1
    }
}

/// The device nodes (`<root>/dev/input/eventN`, sorted) of every input device named
/// [`DEVICE_NAME`]. Entries that cannot be read are skipped: they are not power buttons
/// that could be watched.
pub fn find_power_buttons(root: &Path) -> Result<Vec<PathBuf>, PowerError> {
    let class = root.join(INPUT_CLASS);
    let entries = std::fs::read_dir(&class).map_err(|e| PowerError::List(class.clone(), e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let node = entry.file_name().to_str()?.to_owned();
            if !node.starts_with("event") {
                return None;
            }
            let name = std::fs::read_to_string(entry.path().join("device/name")).ok()?;
            (name.trim_end() == DEVICE_NAME).then(|| root.join(INPUT_DEV).join(node))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Reads input events until the end of the stream, calling `on_press` for every power
/// key press. One record per read: evdev hands out whole records, and presses are rare.
pub fn watch_events(mut events: impl Read, mut on_press: impl FnMut()) -> io::Result<()> {
    let mut record = [0u8; EVENT_SIZE];
    loop {
        match events.read_exact(&mut record) {
            Ok(()) => {
                if InputEvent::from_bytes(&record).is_power_press() {
                    on_press();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Opens `device` and watches it on a thread of its own. A read error is logged and ends
/// that thread; an evdev node never reaches end of file.
pub fn spawn_watcher(
    device: &Path,
    on_press: impl FnMut() + Send + 'static,
) -> Result<(), PowerError> {
    let file = File::open(device).map_err(|e| PowerError::Open(device.to_path_buf(), e))?;
    let path = device.to_path_buf();
    std::thread::Builder::new()
        .name("power-button".into())
        .spawn(move || {
            if let Err(e) = watch_events(file, on_press) {
                console::error("power button", &PowerError::Read(path, e));
            }
        })
        .map(drop)
        .map_err(|e| PowerError::Spawn(device.to_path_buf(), e))
}

/// Sends SIGTERM to the process, not to this thread: only PID1's main thread takes
/// signals (in `sigwait`); every other thread, this one included, has them all blocked.
fn power_off() {
    console::info("power button pressed: powering off");
    if let Err(e) = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGTERM) {
        console::error("power button: signal PID1", &e);
    }
}

/// Watches every power button under `root` (its drivers [`MODULES`] loaded already);
/// returns once the watchers run. Never panics: failures are logged and the node runs on
/// without them.
pub fn watch_power_button(root: &Path) {
    let devices = match find_power_buttons(root) {
        Ok(devices) => devices,
        Err(e) => {
            console::error("power button", &e);
            return;
        }
    };
    if devices.is_empty() {
        console::info("power button: none on this machine");
    }
    for device in devices {
        match spawn_watcher(&device, power_off) {
            Ok(()) => console::info(&format!("power button: watching {}", device.display())),
            Err(e) => console::error("power button", &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// One record as the kernel writes it on x86_64.
    fn record(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut b = vec![0xaa; EVENT_SIZE - 8];
        b.extend(kind.to_ne_bytes());
        b.extend(code.to_ne_bytes());
        b.extend(value.to_ne_bytes());
        b
    }

    /// What the button driver sends for one press: key down, sync, key up, sync.
    fn one_press() -> Vec<u8> {
        [
            record(EV_KEY, KEY_POWER, 1),
            record(0, 0, 0),
            record(EV_KEY, KEY_POWER, 0),
            record(0, 0, 0),
        ]
        .concat()
    }

    #[test]
    fn records_decode_type_code_and_value() {
        let bytes = record(EV_KEY, KEY_POWER, -7);
        let b: &[u8; EVENT_SIZE] = bytes.as_slice().try_into().expect("one record");
        assert_eq!(
            InputEvent::from_bytes(b),
            InputEvent {
                kind: 1,
                code: 116,
                value: -7
            }
        );
    }

    #[test]
    fn only_the_power_key_going_down_is_a_press() {
        let cases = [
            (EV_KEY, KEY_POWER, 1, true),
            (EV_KEY, KEY_POWER, 0, false), // release
            (EV_KEY, KEY_POWER, 2, false), // autorepeat
            (EV_KEY, 115, 1, false),       // KEY_VOLUMEUP
            (0, KEY_POWER, 1, false),      // not EV_KEY
        ];
        for (kind, code, value, press) in cases {
            let ev = InputEvent { kind, code, value };
            assert_eq!(ev.is_power_press(), press, "{ev:?}");
        }
    }

    #[test]
    fn each_press_is_reported_once_and_the_end_of_the_stream_ends_the_watch() {
        let mut stream = one_press();
        stream.extend(record(EV_KEY, 115, 1));
        stream.extend(one_press());
        // A cut-off record at the end is no press.
        stream.extend(&record(EV_KEY, KEY_POWER, 1)[..EVENT_SIZE - 1]);
        let mut presses = 0;
        watch_events(stream.as_slice(), || presses += 1).expect("watch");
        assert_eq!(presses, 2);
    }

    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENODEV))
        }
    }

    #[test]
    fn a_read_error_ends_the_watch_with_that_error() {
        let e = watch_events(Failing, || panic!("no press")).expect_err("fails");
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
    }

    fn input_device(root: &Path, entry: &str, name: Option<&str>) {
        let dir = root.join(INPUT_CLASS).join(entry).join("device");
        std::fs::create_dir_all(&dir).expect("mkdir");
        if let Some(name) = name {
            std::fs::write(dir.join("name"), format!("{name}\n")).expect("write");
        }
    }

    #[test]
    fn every_event_node_named_power_button_is_found() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        input_device(r, "event3", Some("Power Button")); // PNP0C0C
        input_device(r, "event0", Some("Power Button")); // LNXPWRBN
        input_device(r, "event1", Some("AT Translated Set 2 keyboard"));
        input_device(r, "event2", Some("Power Button Extra"));
        input_device(r, "event4", None);
        // The input device itself is no event node.
        input_device(r, "input0", Some("Power Button"));
        assert_eq!(
            find_power_buttons(r).expect("found"),
            [r.join("dev/input/event0"), r.join("dev/input/event3")]
        );
    }

    #[test]
    fn no_power_button_is_an_empty_list_and_no_input_class_an_error() {
        let root = tempfile::tempdir().expect("tempdir");
        match find_power_buttons(root.path()) {
            Err(PowerError::List(path, e)) => {
                assert_eq!(path, root.path().join(INPUT_CLASS));
                assert_eq!(e.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected a list error, got {other:?}"),
        }
        input_device(root.path(), "event0", Some("QEMU QEMU USB Tablet"));
        assert!(find_power_buttons(root.path()).expect("listed").is_empty());
    }

    #[test]
    fn a_watcher_thread_reports_presses_from_its_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A regular file stands in for the event node; its end ends the thread.
        let device = dir.path().join("event0");
        std::fs::write(&device, one_press()).expect("write");
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_watcher(&device, move || {
            let _ = tx.send(());
        })
        .expect("spawned");
        rx.recv_timeout(Duration::from_secs(5)).expect("a press");
        // Exactly one: the sender is dropped when the thread ends.
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_err());
    }

    #[test]
    fn a_missing_device_node_is_an_open_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = dir.path().join("event9");
        match spawn_watcher(&device, || {}) {
            Err(PowerError::Open(path, e)) => {
                assert_eq!(path, device);
                assert_eq!(e.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected an open error, got {other:?}"),
        }
    }
}
