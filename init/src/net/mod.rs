//! PID1's side of the network: load drivers for the devices present (coldplug by
//! modalias, what udev would do), pick the first Ethernet interface, and keep a DHCPv4
//! lease on it in a thread of its own; `/run/resolv.conf` follows the lease.
//!
//! Below: netlink for links, addresses and routes, the DHCPv4 client, SNTP and Hetzner's
//! metadata service. All synchronous and std-only: PID1 runs no async runtime.

pub mod dhcp;
pub mod metadata;
pub mod metadata_block;
pub mod netlink;
pub mod sntp;

use crate::kmod::modprobe::Modules;
use crate::net::dhcp::{Backoff, Client, Event, Options};
use crate::net::netlink::{Netlink, NetlinkError};
use crate::pid1::console;
use basalt_api::config::NetworkConfig;
use basalt_api::milestone::Milestone;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
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

/// Loads, in one batch on `threads` threads ([`crate::kmod::parallel`]), the drivers of
/// the devices present ([`modaliases`]) and the modules named in `also` (drivers found
/// by name, not by device: the power button's, fw_cfg's). They are independent of each
/// other, so they load side by side. A device without a driver module is normal and not
/// reported; every other failure is returned, naming its module. Returns how many
/// modules were loaded, and the failures.
pub fn coldplug(
    loader: &dyn crate::kmod::parallel::Loader,
    root: &Path,
    modules: &Modules,
    also: &[&str],
    threads: usize,
) -> (usize, Vec<crate::kmod::parallel::ParallelError>) {
    use crate::kmod::parallel::{load_all, ParallelError};
    let aliases = crate::pid1::console::timed("coldplug.scan", || modaliases(root));
    let names: Vec<&str> = aliases
        .iter()
        .map(String::as_str)
        .chain(also.iter().copied())
        .collect();
    let outcome = crate::pid1::console::timed("coldplug.load", || {
        load_all(loader, root, modules, &names, threads)
    });
    let errors = outcome
        .errors
        .into_iter()
        .filter(|e| !matches!(e, ParallelError::Resolve { name, .. } if aliases.contains(name)))
        .collect();
    (outcome.loaded, errors)
}

/// The node's addresses and prefix lengths, loopback left out.
pub fn addresses() -> Vec<(IpAddr, u8)> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter(|a| {
        !a.flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
    })
    .filter_map(|a| {
        let addr = a.address?;
        let mask = a.netmask;
        if let Some(v4) = addr.as_sockaddr_in() {
            let prefix = mask
                .and_then(|m| m.as_sockaddr_in().map(|m| u32::from(m.ip()).count_ones()))
                .unwrap_or(32);
            Some((IpAddr::V4(v4.ip()), prefix as u8))
        } else {
            let v6 = addr.as_sockaddr_in6()?;
            let prefix = mask
                .and_then(|m| m.as_sockaddr_in6().map(|m| u128::from(m.ip()).count_ones()))
                .unwrap_or(128);
            Some((IpAddr::V6(v6.ip()), prefix as u8))
        }
    })
    .collect()
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

/// resolv.conf for these DNS servers; `origin` says where they came from.
pub fn resolv_conf(origin: &str, dns: &[IpAddr]) -> String {
    let mut s = format!("# Written by basalt-init from {origin}.\n");
    for server in dns {
        s.push_str(&format!("nameserver {server}\n"));
    }
    s
}

/// Set once, the first time the node has its addresses (a DHCP lease, or the static
/// addresses when DHCP is off); prints the `network-up` milestone then. Waitable, so
/// that stage 2 can hold what needs the network (the metadata service) for a bounded
/// time.
#[derive(Clone, Default)]
pub struct NetworkUp(Arc<(Mutex<bool>, Condvar)>);

impl NetworkUp {
    /// Marks the network up; the milestone prints only the first time.
    pub fn mark(&self) {
        let (lock, cond) = &*self.0;
        let mut up = lock.lock().unwrap_or_else(|e| e.into_inner());
        if !*up {
            *up = true;
            console::milestone(Milestone::NetworkUp);
            cond.notify_all();
        }
    }

    pub fn is_up(&self) -> bool {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the network is up or `timeout` passes; returns whether it is up.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (lock, cond) = &*self.0;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (up, _) = cond
            .wait_timeout_while(guard, timeout, |up| !*up)
            .unwrap_or_else(|e| e.into_inner());
        *up
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{iface}: netlink")]
    Netlink {
        iface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{iface}: network.addresses[{i}] {cidr}")]
    Address {
        iface: String,
        i: usize,
        cidr: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{iface}: network.routes[{i}] to {to} via {via}")]
    Route {
        iface: String,
        i: usize,
        to: String,
        via: IpAddr,
        #[source]
        source: NetlinkError,
    },
    #[error("{iface}: IPv6 {addr}/{prefix} via fe80::1 from the metadata service")]
    Ipv6 {
        iface: String,
        addr: Ipv6Addr,
        prefix: u8,
        #[source]
        source: NetlinkError,
    },
}

/// Brings `iface` up and applies the config's static addresses and routes; every
/// failure is returned (named by its key) and the others still applied.
pub fn apply_static(iface: &str, net: &NetworkConfig) -> Vec<NetworkError> {
    let mut errors = Vec::new();
    let mut link = match open_link(iface) {
        Ok(l) => l,
        Err(e) => return vec![e],
    };
    for (i, cidr) in net.addresses.iter().enumerate() {
        if let Err(source) = link.0.add_ip(link.1, cidr.addr, cidr.prefix) {
            errors.push(NetworkError::Address {
                iface: iface.to_owned(),
                i,
                cidr: format!("{}/{}", cidr.addr, cidr.prefix),
                source,
            });
        }
    }
    for (i, route) in net.routes.iter().enumerate() {
        if let Err(source) = link
            .0
            .add_route(link.1, route.to.addr, route.to.prefix, route.via)
        {
            errors.push(NetworkError::Route {
                iface: iface.to_owned(),
                i,
                to: format!("{}/{}", route.to.addr, route.to.prefix),
                via: route.via,
                source,
            });
        }
    }
    errors
}

/// Hetzner's IPv6: the /64 (or whatever prefix the metadata gives) on the interface and
/// the default route via the link-local router `fe80::1`.
pub fn apply_ipv6(iface: &str, addr: Ipv6Addr, prefix: u8) -> Result<(), NetworkError> {
    let (mut netlink, index) = open_link(iface)?;
    let err = |source| NetworkError::Ipv6 {
        iface: iface.to_owned(),
        addr,
        prefix,
        source,
    };
    netlink
        .add_ip(index, IpAddr::V6(addr), prefix)
        .map_err(err)?;
    netlink
        .add_route(
            index,
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            0,
            IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
        )
        .map_err(err)
}

/// Brings `lo` up; the kernel gives it 127.0.0.1/8 and ::1 as it comes up. It starts down
/// and nothing else on the node brings it up: K3s's agent reaches its own API load balancer
/// and the kubelet on 127.0.0.1, and the CA check's warm-up serves on it (`join/warm.rs`).
pub fn loopback_up() -> Result<(), NetworkError> {
    open_link("lo").map(drop)
}

fn open_link(iface: &str) -> Result<(Netlink, u32), NetworkError> {
    let wrap = |source| NetworkError::Netlink {
        iface: iface.to_owned(),
        source,
    };
    let mut netlink = Netlink::open().map_err(wrap)?;
    let link = netlink.link_by_name(iface).map_err(wrap)?;
    netlink.set_link_up(link.index).map_err(wrap)?;
    Ok((netlink, link.index))
}

/// Writes `/run/resolv.conf`; errors are reported, never fatal.
pub fn write_resolv_conf(origin: &str, dns: &[IpAddr]) {
    let path = Path::new("/").join(RESOLV_CONF);
    if let Err(e) = crate::atomic_file::write(&path, resolv_conf(origin, dns).as_bytes()) {
        console::error("write /run/resolv.conf", &e);
    }
}

/// Starts the DHCP client on `iface` in its own thread. Each lease marks `up`; the
/// lease's DNS servers go to resolv.conf unless the config gave its own
/// (`dns_from_lease` false). The client then keeps renewing for the node's life.
pub fn spawn_dhcp(
    iface: String,
    hostname: Option<String>,
    up: NetworkUp,
    dns_from_lease: bool,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dhcp".into())
        .spawn(move || run_dhcp(&iface, hostname, &up, dns_from_lease))
}

fn run_dhcp(iface: &str, hostname: Option<String>, up: &NetworkUp, dns_from_lease: bool) {
    let options = Options {
        hostname,
        backoff: Backoff::default(),
        seed: None,
    };
    let mut client = match Client::new(iface, options) {
        Ok(c) => c,
        Err(e) => return console::error("dhcp", &e),
    };
    let mut last_error: Option<Instant> = None;
    loop {
        match client.next_event(Instant::now() + Duration::from_secs(60)) {
            Ok(Some(Event::Bound(lease))) | Ok(Some(Event::Rebound(lease))) => {
                if dns_from_lease {
                    let dns: Vec<IpAddr> = lease.dns.iter().copied().map(IpAddr::V4).collect();
                    write_resolv_conf("the DHCP lease", &dns);
                }
                console::info(&format!(
                    "dhcp: {iface} bound {}/{} via {}, lease {} s",
                    lease.addr,
                    lease.prefix_len,
                    lease
                        .router
                        .map_or_else(|| "no router".to_owned(), |r| r.to_string()),
                    lease.lease_time.as_secs()
                ));
                up.mark();
            }
            Ok(Some(Event::Expired { addr })) => {
                console::warn(&format!("dhcp: {iface} lease on {addr} expired"))
            }
            Ok(Some(Event::Nak)) => console::warn(&format!("dhcp: {iface}: server refused")),
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

/// The node's network from its config (DHCPv4 alone when there is none): the first
/// Ethernet interface, static addresses and routes, resolv.conf, then the DHCP thread.
/// Returns at once; `up` is marked when the addresses are there.
pub fn start(root: &Path, net: &NetworkConfig, hostname: Option<String>) -> NetworkUp {
    let up = NetworkUp::default();
    if let Err(e) = loopback_up() {
        console::error("network: loopback", &e);
    }
    // A NIC driver may take a moment to register its interface after coldplug.
    let deadline = Instant::now() + Duration::from_secs(2);
    let iface = loop {
        match first_ethernet(root) {
            Some(iface) => break iface,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => {
                console::warn("network: no Ethernet interface");
                return up;
            }
        }
    };
    let errors = apply_static(&iface, net);
    let static_ok = errors.is_empty();
    for e in &errors {
        console::error("network", e);
    }
    if !net.dns.is_empty() {
        write_resolv_conf("the machine config", &net.dns);
    }
    if !net.addresses.is_empty() && static_ok {
        console::info(&format!(
            "network: {iface}: {} static address(es), {} route(s)",
            net.addresses.len(),
            net.routes.len()
        ));
    }
    if net.dhcp4 {
        if let Err(e) = spawn_dhcp(iface, hostname, up.clone(), net.dns.is_empty()) {
            console::error("start the DHCP client", &e);
        }
    } else if !net.addresses.is_empty() && static_ok {
        up.mark();
    }
    up
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

    /// Records the module files loaded; one of them refuses.
    #[derive(Default)]
    struct Kernel {
        loaded: std::sync::Mutex<Vec<String>>,
    }

    impl crate::kmod::parallel::Loader for Kernel {
        fn load(&self, path: &Path) -> std::io::Result<()> {
            let name = crate::kmod::modprobe::name_of(&path.to_string_lossy());
            if name == "button" {
                return Err(std::io::Error::from_raw_os_error(libc::ENOEXEC));
            }
            self.loaded.lock().expect("lock").push(name);
            Ok(())
        }
    }

    #[test]
    fn coldplug_loads_the_devices_drivers_and_the_named_modules_in_one_batch() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = d.path();
        // The NIC and the RNG have drivers; a virtio device of another kind has none.
        put(
            r,
            "sys/bus/virtio/devices/virtio0/modalias",
            "virtio:d00000001v00001AF4\n",
        );
        put(
            r,
            "sys/bus/virtio/devices/virtio1/modalias",
            "virtio:d00000004v00001AF4\n",
        );
        put(
            r,
            "sys/bus/virtio/devices/virtio2/modalias",
            "virtio:d00000063v00001AF4\n",
        );
        put(
            r,
            "lib/modules/6.1.0-1/modules.dep",
            "kernel/virtio_net.ko: kernel/net_failover.ko kernel/failover.ko\n\
             kernel/net_failover.ko: kernel/failover.ko\n\
             kernel/failover.ko:\n\
             kernel/virtio-rng.ko:\n\
             kernel/evdev.ko:\n\
             kernel/button.ko:\n\
             kernel/qemu_fw_cfg.ko:\n",
        );
        put(
            r,
            "lib/modules/6.1.0-1/modules.alias",
            "alias virtio:d00000001v* virtio_net\nalias virtio:d00000004v* virtio_rng\n",
        );
        let modules = Modules::open(r, "6.1.0-1").expect("index");
        let kernel = Kernel::default();
        let (loaded, errors) = coldplug(
            &kernel,
            r,
            &modules,
            &["evdev", "button", "qemu_fw_cfg", "no_such_module"],
            2,
        );
        let mut names = kernel.loaded.lock().expect("lock").clone();
        names.sort();
        assert_eq!(
            names,
            [
                "evdev",
                "failover",
                "net_failover",
                "qemu_fw_cfg",
                "virtio_net",
                "virtio_rng"
            ]
        );
        assert_eq!(loaded, 6);
        // The driverless device is not an error; a named module that fails or is
        // missing is, by name.
        let mut errors: Vec<String> = errors
            .iter()
            .map(|e| crate::pid1::console::chain(e))
            .collect();
        errors.sort();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("module button: load "), "{errors:?}");
        assert!(errors[1].contains("no_such_module"), "{errors:?}");
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
    fn network_up_is_waitable_and_set_once() {
        let up = NetworkUp::default();
        assert!(!up.wait(Duration::from_millis(10)));
        let other = up.clone();
        let t = std::thread::spawn(move || other.wait(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        up.mark();
        up.mark();
        assert!(t.join().expect("join"));
        assert!(up.is_up());
    }

    #[test]
    fn resolv_conf_lists_the_lease_servers() {
        let text = resolv_conf(
            "the DHCP lease",
            &[
                "10.0.2.3".parse().expect("ip"),
                "1.1.1.1".parse().expect("ip"),
            ],
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("nameserver "))
                .collect::<Vec<_>>(),
            ["nameserver 10.0.2.3", "nameserver 1.1.1.1"]
        );
    }
}
