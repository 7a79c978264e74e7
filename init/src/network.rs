//! PID1's side of the network: load drivers for the devices present (coldplug by
//! modalias, what udev would do), pick the first Ethernet interface, and keep a DHCPv4
//! lease on it in a thread of its own; `/run/resolv.conf` follows the lease.

use crate::console;
use crate::modprobe::{self, Index};
use crate::net::dhcp::{Backoff, Client, Event, Options};
use crate::sys::System;
use basalt_api::milestone::Milestone;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where resolv.conf is written; the root's /etc/resolv.conf links here.
pub const RESOLV_CONF: &str = "run/resolv.conf";

/// Modaliases of the network devices present: every virtio device (virtio_pci itself
/// is loaded in stage 1) and PCI devices of class 0x02 (network controllers). Only
/// these: loading a driver for everything the kernel lists (CPU features, ACPI objects)
/// is slow under emulation and not what a node needs from its init.
pub fn modaliases(root: &Path) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for bus in ["virtio", "pci"] {
        let Ok(devices) = std::fs::read_dir(root.join("sys/bus").join(bus).join("devices")) else {
            continue;
        };
        for dev in devices.flatten() {
            if bus == "pci" {
                let class = std::fs::read_to_string(dev.path().join("class")).unwrap_or_default();
                if !class.trim().starts_with("0x02") {
                    continue;
                }
            }
            if let Ok(alias) = std::fs::read_to_string(dev.path().join("modalias")) {
                let alias = alias.trim();
                if !alias.is_empty() {
                    out.insert(alias.to_owned());
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Loads the drivers for present devices; returns how many modules were loaded.
/// A device without a driver module is normal and not reported.
pub fn coldplug(sys: &mut dyn System, root: &Path, kver: &str) -> usize {
    let moddir = root.join("lib/modules").join(kver);
    let Ok(index) = Index::read(&moddir) else {
        return 0;
    };
    modaliases(root)
        .iter()
        .filter_map(|alias| modprobe::probe_with(sys, root, &moddir, &index, alias, false).ok())
        .sum()
}

/// The first Ethernet interface in name order (ARPHRD_ETHER, backed by a device).
pub fn first_ethernet(root: &Path) -> Option<String> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(root.join("sys/class/net"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    names.into_iter().find_map(|dir| {
        let kind = std::fs::read_to_string(dir.join("type")).ok()?;
        let is_device = dir.join("device").exists();
        let name = dir.file_name()?.to_string_lossy().into_owned();
        (kind.trim() == "1" && is_device).then_some(name)
    })
}

/// resolv.conf for a lease's DNS servers.
pub fn resolv_conf(dns: &[std::net::Ipv4Addr]) -> String {
    let mut s = String::from("# Written by basalt-init from the DHCP lease.\n");
    for server in dns {
        s.push_str(&format!("nameserver {server}\n"));
    }
    s
}

/// Starts the DHCP client on `iface` in its own thread. The first lease prints the
/// `network-up` milestone; the client then keeps renewing for the node's life.
pub fn spawn_dhcp(
    iface: String,
    hostname: Option<String>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dhcp".into())
        .spawn(move || run_dhcp(&iface, hostname))
}

fn run_dhcp(iface: &str, hostname: Option<String>) {
    let options = Options {
        hostname,
        backoff: Backoff::default(),
        seed: None,
    };
    let mut client = match Client::new(iface, options) {
        Ok(c) => c,
        Err(e) => return console::error("dhcp", &e),
    };
    let mut up = false;
    let mut last_error: Option<Instant> = None;
    loop {
        match client.next_event(Instant::now() + Duration::from_secs(60)) {
            Ok(Some(Event::Bound(lease))) | Ok(Some(Event::Rebound(lease))) => {
                write_resolv_conf(&lease.dns);
                if !up {
                    up = true;
                    console::milestone(Milestone::NetworkUp);
                }
                console::info(&format!(
                    "dhcp: {iface} bound {}/{} via {:?}",
                    lease.addr, lease.prefix_len, lease.router
                ));
            }
            Ok(Some(Event::Expired { addr })) => {
                console::info(&format!("dhcp: {iface} lease on {addr} expired"))
            }
            Ok(Some(Event::Retrying { after })) => console::info(&format!(
                "dhcp: {iface}: no answer yet, retrying in {after:?}"
            )),
            Ok(_) => {}
            Err(e) => {
                // Rate-limited: one line a minute at most; the client keeps its timers.
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    console::error("dhcp", &e);
                    last_error = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn write_resolv_conf(dns: &[std::net::Ipv4Addr]) {
    let path = Path::new("/").join(RESOLV_CONF);
    if let Err(e) = crate::state::write_atomic(&path, resolv_conf(dns).as_bytes()) {
        console::error("write /run/resolv.conf", &e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    #[test]
    fn modaliases_are_those_of_network_devices_once_each() {
        let d = tempfile::tempdir().expect("tempdir");
        put(
            d.path(),
            "sys/bus/virtio/devices/virtio0/modalias",
            "virtio:d00000001v00001AF4\n",
        );
        put(
            d.path(),
            "sys/bus/pci/devices/0000:00:02.0/modalias",
            "pci:v00008086d0000100Esv\n",
        );
        put(
            d.path(),
            "sys/bus/pci/devices/0000:00:02.0/class",
            "0x020000\n",
        );
        put(
            d.path(),
            "sys/bus/pci/devices/0000:00:03.0/modalias",
            "pci:v00008086d0000100Esv\n",
        );
        put(
            d.path(),
            "sys/bus/pci/devices/0000:00:03.0/class",
            "0x020000\n",
        );
        put(
            d.path(),
            "sys/bus/pci/devices/0000:00:04.0/modalias",
            "pci:v00001AF4d00001001sv\n",
        );
        put(
            d.path(),
            "sys/bus/pci/devices/0000:00:04.0/class",
            "0x010000\n",
        );
        put(
            d.path(),
            "sys/bus/acpi/devices/QEMU0002:00/modalias",
            "acpi:QEMU0002:\n",
        );
        assert_eq!(
            modaliases(d.path()),
            ["pci:v00008086d0000100Esv", "virtio:d00000001v00001AF4"]
        );
    }

    #[test]
    fn first_ethernet_skips_loopback_and_virtual_links() {
        let d = tempfile::tempdir().expect("tempdir");
        put(d.path(), "sys/class/net/lo/type", "772\n");
        put(d.path(), "sys/class/net/veth0/type", "1\n");
        put(d.path(), "sys/class/net/eth1/type", "1\n");
        std::fs::create_dir_all(d.path().join("sys/class/net/eth1/device")).expect("mkdir");
        assert_eq!(first_ethernet(d.path()).as_deref(), Some("eth1"));
    }

    #[test]
    fn resolv_conf_lists_the_lease_servers() {
        let text = resolv_conf(&[
            "10.0.2.3".parse().expect("ip"),
            "1.1.1.1".parse().expect("ip"),
        ]);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("nameserver "))
                .collect::<Vec<_>>(),
            ["nameserver 10.0.2.3", "nameserver 1.1.1.1"]
        );
    }
}
