//! The disk layout and the host interface that the builder, basalt-init, the CLI and the
//! tests must agree on: the partition table as a typed table (name, type GUID, order), the
//! sector unit, and the QEMU fw_cfg names a host passes a node its config through.
//!
//! Nothing here reads or writes a disk; it is the one place where the names and numbers
//! are spelled out, so that a renamed partition cannot be missed on one side.

use std::fmt;

/// Bytes per logical sector: GPT LBAs in every basalt image count 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

/// A count of (or an LBA in) 512-byte sectors: never to be mixed up with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sectors(pub u64);

impl Sectors {
    /// Bytes per sector.
    pub const SIZE: u64 = SECTOR_SIZE;

    /// `mib` MiB in sectors.
    pub const fn from_mib(mib: u64) -> Self {
        Sectors(mib * (1 << 20) / SECTOR_SIZE)
    }

    /// Whole sectors in `bytes` (rounded down).
    pub const fn from_bytes(bytes: u64) -> Self {
        Sectors(bytes / SECTOR_SIZE)
    }

    /// The byte count (or byte offset, for an LBA); saturates rather than wraps, since
    /// basalt-init reads sector counts from sysfs.
    pub const fn bytes(self) -> u64 {
        self.0.saturating_mul(SECTOR_SIZE)
    }

    /// Whole MiB, rounded down.
    pub const fn mib(self) -> u64 {
        self.0 / ((1 << 20) / SECTOR_SIZE)
    }
}

impl serde::Serialize for Sectors {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl fmt::Display for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sectors", self.0)
    }
}

/// The partitions of a basalt disk, in GPT order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Partition {
    /// GRUB's core image for legacy BIOS boot.
    Bios,
    /// The EFI system partition (FAT): GRUB EFI, grub.cfg, kernels and initramfs.
    Efi,
    /// Root slot A: squashfs and its dm-verity tree.
    RootA,
    /// Root slot B, the other half of A/B upgrades.
    RootB,
    /// ext4 for the node's state; grown to the disk's end on first boot.
    State,
}

/// GPT partition type GUIDs, upper case as `sfdisk` and `sgdisk` print them.
pub mod type_guid {
    /// BIOS boot partition (GRUB's core image).
    pub const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
    /// EFI system partition.
    pub const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    /// Linux root (x86-64), as the Discoverable Partitions Specification names it.
    pub const LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    /// Linux filesystem data.
    pub const LINUX_FS: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
}

impl Partition {
    /// Every partition, in the order of the GPT's entries.
    pub const ALL: [Partition; 5] = [
        Partition::Bios,
        Partition::Efi,
        Partition::RootA,
        Partition::RootB,
        Partition::State,
    ];

    /// The GPT partition name (also the ext4/FAT label where the partition has one).
    pub const fn name(self) -> &'static str {
        match self {
            Partition::Bios => "BIOS",
            Partition::Efi => "EFI",
            Partition::RootA => "ROOT-A",
            Partition::RootB => "ROOT-B",
            Partition::State => "STATE",
        }
    }

    /// The GPT partition type GUID.
    pub const fn type_guid(self) -> &'static str {
        match self {
            Partition::Bios => type_guid::BIOS_BOOT,
            Partition::Efi => type_guid::EFI_SYSTEM,
            Partition::RootA | Partition::RootB => type_guid::LINUX_ROOT_X86_64,
            Partition::State => type_guid::LINUX_FS,
        }
    }

    /// The 1-based GPT entry number (`/dev/vda<number>`).
    pub const fn number(self) -> u32 {
        match self {
            Partition::Bios => 1,
            Partition::Efi => 2,
            Partition::RootA => 3,
            Partition::RootB => 4,
            Partition::State => 5,
        }
    }

    /// The partition with GPT name `name`.
    pub fn from_name(name: &str) -> Option<Partition> {
        Partition::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// QEMU fw_cfg: how a local host hands a node its machine config (a hypervisor's host
/// controls its guest anyway; nothing in a cloud's API can set fw_cfg).
pub mod fw_cfg {
    // The names as macros, so that `concat!` can build the sysfs paths as constants: the
    // one way to name where an entry appears.
    macro_rules! config_name {
        () => {
            "opt/basalt/config"
        };
    }
    macro_rules! test_service_name {
        () => {
            "opt/basalt/test-service"
        };
    }
    macro_rules! test_upgrade_stall_name {
        () => {
            "opt/basalt/test-upgrade-stall"
        };
    }
    macro_rules! sysfs {
        ($name:expr) => {
            concat!("sys/firmware/qemu_fw_cfg/by_name/", $name, "/raw")
        };
    }

    /// The machine config (TOML), as `-fw_cfg name=opt/basalt/config,file=…`.
    pub const CONFIG: &str = config_name!();
    /// Turns on the test service in test images; its content is the mode.
    pub const TEST_SERVICE: &str = test_service_name!();
    /// [`CONFIG`] where the `qemu_fw_cfg` module exposes it, relative to the root.
    pub const CONFIG_SYSFS: &str = sysfs!(config_name!());
    /// [`TEST_SERVICE`] where the `qemu_fw_cfg` module exposes it, relative to the root.
    pub const TEST_SERVICE_SYSFS: &str = sysfs!(test_service_name!());
    /// Makes a test image's upgrade stop for good at a named point (`armed-before`), so
    /// that a test can cut the power there; only a basalt-init with the `testd` feature
    /// reads it.
    pub const TEST_UPGRADE_STALL: &str = test_upgrade_stall_name!();
    /// [`TEST_UPGRADE_STALL`] where the `qemu_fw_cfg` module exposes it.
    pub const TEST_UPGRADE_STALL_SYSFS: &str = sysfs!(test_upgrade_stall_name!());
    /// How logs and errors name the config source [`CONFIG`].
    pub const CONFIG_LABEL: &str = concat!("fw_cfg ", config_name!());

    /// QEMU's `-fw_cfg` argument that passes `file` as entry `name` (a comma in the path
    /// doubled, as QEMU's option syntax wants).
    pub fn qemu_arg(name: &str, file: &std::path::Path) -> String {
        format!(
            "name={name},file={}",
            file.display().to_string().replace(',', ",,")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_gpt_order_with_unique_names_and_numbers() {
        for (i, p) in Partition::ALL.iter().enumerate() {
            assert_eq!(p.number() as usize, i + 1, "{p}");
            assert_eq!(Partition::from_name(p.name()), Some(*p));
        }
        assert_eq!(Partition::from_name("ROOT-C"), None);
    }

    #[test]
    fn sectors_convert_to_bytes_and_back() {
        assert_eq!(Sectors::from_mib(1), Sectors(2048));
        assert_eq!(Sectors(2048).bytes(), 1 << 20);
        assert_eq!(Sectors::from_bytes(1023), Sectors(1));
    }

    #[test]
    fn a_comma_in_a_fw_cfg_file_path_is_doubled() {
        assert_eq!(
            fw_cfg::qemu_arg(fw_cfg::CONFIG, std::path::Path::new("/tmp/a,b.toml")),
            "name=opt/basalt/config,file=/tmp/a,,b.toml"
        );
    }

    #[test]
    fn fw_cfg_paths_are_where_the_kernel_module_puts_them() {
        assert_eq!(
            fw_cfg::CONFIG_SYSFS,
            "sys/firmware/qemu_fw_cfg/by_name/opt/basalt/config/raw"
        );
        assert_eq!(
            fw_cfg::TEST_SERVICE_SYSFS,
            "sys/firmware/qemu_fw_cfg/by_name/opt/basalt/test-service/raw"
        );
        assert_eq!(fw_cfg::CONFIG_LABEL, "fw_cfg opt/basalt/config");
    }
}
