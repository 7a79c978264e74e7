//! Device-mapper control through `/dev/mapper/control`: create a device, load one target,
//! resume it, read its status.
//!
//! Written by hand because the maintained crate (`devicemapper`) generates its bindings
//! with bindgen at build time (libclang on every build host) for the five ioctls stage 1
//! needs. The layout below is `struct dm_ioctl` / `struct dm_target_spec` of
//! `<linux/dm-ioctl.h>`, interface version 4.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_MAX_TYPE_NAME: usize = 16;

/// `struct dm_ioctl`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; DM_MAX_TYPE_NAME],
}

const HEADER: usize = std::mem::size_of::<DmIoctl>();
const SPEC: usize = std::mem::size_of::<DmTargetSpec>();
const BUF_SIZE: usize = 16 * 1024;

const DM_READONLY_FLAG: u32 = 1 << 0;
const DM_SUSPEND_FLAG: u32 = 1 << 1;

const DM_DEV_CREATE: u8 = 3;
const DM_DEV_SUSPEND: u8 = 6;
const DM_TABLE_LOAD: u8 = 9;
const DM_TABLE_STATUS: u8 = 12;

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("open /dev/mapper/control")]
    Control(#[source] std::io::Error),
    #[error("device-mapper {op} on {name}")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("device-mapper name or table too long: {0}")]
    TooLong(String),
}

/// One target line of a table.
pub struct Target<'a> {
    pub start: u64,
    pub sectors: u64,
    pub kind: &'a str,
    pub params: &'a str,
}

/// Buffer aligned for `DmIoctl` (its largest field is a u64).
struct Buf(Vec<u64>);

impl Buf {
    fn new(name: &str, flags: u32) -> Result<Self, DmError> {
        if name.len() >= DM_NAME_LEN {
            return Err(DmError::TooLong(name.into()));
        }
        let mut hdr = DmIoctl {
            version: [4, 0, 0],
            data_size: BUF_SIZE as u32,
            data_start: HEADER as u32,
            target_count: 0,
            open_count: 0,
            flags,
            event_nr: 0,
            padding: 0,
            dev: 0,
            name: [0; DM_NAME_LEN],
            uuid: [0; DM_UUID_LEN],
            data: [0; 7],
        };
        hdr.name[..name.len()].copy_from_slice(name.as_bytes());
        let mut buf = Buf(vec![0u64; BUF_SIZE / 8]);
        *buf.header_mut() = hdr;
        Ok(buf)
    }

    fn header_mut(&mut self) -> &mut DmIoctl {
        // SAFETY: the buffer is 8-byte aligned, BUF_SIZE >= size_of::<DmIoctl>() and every
        // bit pattern is a valid DmIoctl (integers and byte arrays only).
        unsafe { &mut *(self.0.as_mut_ptr() as *mut DmIoctl) }
    }

    fn header(&self) -> DmIoctl {
        // SAFETY: as in header_mut; read_unaligned copies out plain-old-data.
        unsafe { std::ptr::read_unaligned(self.0.as_ptr() as *const DmIoctl) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: reinterpreting an initialised [u64] as bytes of the same total length.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, BUF_SIZE) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: as in bytes_mut.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, BUF_SIZE) }
    }
}

/// An open `/dev/mapper/control`.
pub struct Control(File);

impl Control {
    pub fn open(dev_root: &Path) -> Result<Self, DmError> {
        File::options()
            .read(true)
            .write(true)
            .open(dev_root.join("mapper/control"))
            .map(Control)
            .map_err(DmError::Control)
    }

    fn ioctl(&self, cmd: u8, op: &'static str, buf: &mut Buf) -> Result<(), DmError> {
        let name = String::from_utf8_lossy(&buf.header().name)
            .trim_end_matches('\0')
            .to_owned();
        let request = nix::request_code_readwrite!(0xfd, cmd, HEADER);
        // SAFETY: the kernel reads and writes at most data_size (= the buffer's length)
        // bytes starting with a valid, initialised struct dm_ioctl.
        let rc = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                request as libc::Ioctl,
                buf.0.as_mut_ptr(),
            )
        };
        nix::errno::Errno::result(rc)
            .map(drop)
            .map_err(|source| DmError::Ioctl { op, name, source })
    }

    /// Creates device `name` with the table and activates it; returns (major, minor).
    pub fn create(
        &self,
        name: &str,
        targets: &[Target<'_>],
        read_only: bool,
    ) -> Result<(u32, u32), DmError> {
        let mut buf = Buf::new(name, 0)?;
        self.ioctl(DM_DEV_CREATE, "create", &mut buf)?;

        let flags = if read_only { DM_READONLY_FLAG } else { 0 };
        let mut buf = Buf::new(name, flags)?;
        write_targets(&mut buf, targets, name)?;
        self.ioctl(DM_TABLE_LOAD, "table load", &mut buf)?;

        // DEV_SUSPEND without the suspend flag resumes: the new table becomes live.
        let mut buf = Buf::new(name, 0)?;
        self.ioctl(DM_DEV_SUSPEND, "resume", &mut buf)?;
        let dev = buf.header().dev;
        Ok((
            nix::sys::stat::major(dev) as u32,
            nix::sys::stat::minor(dev) as u32,
        ))
    }

    /// Suspends device `name`: I/O to it waits, uninterruptibly, until it is resumed.
    /// Used only by the test hook that makes a boot hang (`testd`).
    pub fn suspend(&self, name: &str) -> Result<(), DmError> {
        let mut buf = Buf::new(name, DM_SUSPEND_FLAG)?;
        self.ioctl(DM_DEV_SUSPEND, "suspend", &mut buf)
    }

    /// The status string of the first target (for verity: `V` verified, `C` corrupted).
    pub fn status(&self, name: &str) -> Result<String, DmError> {
        let mut buf = Buf::new(name, 0)?;
        self.ioctl(DM_TABLE_STATUS, "status", &mut buf)?;
        if buf.header().target_count == 0 {
            return Ok(String::new());
        }
        let params = &buf.bytes()[HEADER + SPEC..];
        let end = params.iter().position(|&b| b == 0).unwrap_or(params.len());
        Ok(String::from_utf8_lossy(&params[..end]).into_owned())
    }
}

fn write_targets(buf: &mut Buf, targets: &[Target<'_>], name: &str) -> Result<(), DmError> {
    let mut off = HEADER;
    for t in targets {
        let params_len = t.params.len() + 1;
        // Each spec starts 8-byte aligned, as the kernel expects.
        let next = (SPEC + params_len).next_multiple_of(8);
        if t.kind.len() >= DM_MAX_TYPE_NAME || off + next > BUF_SIZE {
            return Err(DmError::TooLong(name.into()));
        }
        let mut kind = [0u8; DM_MAX_TYPE_NAME];
        kind[..t.kind.len()].copy_from_slice(t.kind.as_bytes());
        let spec = DmTargetSpec {
            sector_start: t.start,
            length: t.sectors,
            status: 0,
            next: next as u32,
            target_type: kind,
        };
        let bytes = buf.bytes_mut();
        // SAFETY: off + SPEC <= BUF_SIZE (checked above); write_unaligned has no
        // alignment requirement and DmTargetSpec is plain-old-data.
        unsafe {
            std::ptr::write_unaligned(bytes.as_mut_ptr().add(off) as *mut DmTargetSpec, spec)
        };
        bytes[off + SPEC..off + SPEC + t.params.len()].copy_from_slice(t.params.as_bytes());
        bytes[off + SPEC + t.params.len()] = 0;
        off += next;
    }
    buf.header_mut().target_count = targets.len() as u32;
    Ok(())
}

/// The dm-verity table parameters (format 1, sha256) for a partition that carries its
/// own hash tree after the data, as the builder lays it out.
pub fn verity_params(dev: &str, v: &basalt_api::bootparams::Verity) -> String {
    let bs = basalt_api::bootparams::VERITY_BLOCK_SIZE;
    let salt = if v.salt.is_empty() { "-" } else { &v.salt };
    format!(
        "1 {dev} {dev} {bs} {bs} {} {} sha256 {} {salt}",
        v.data_blocks,
        v.hash_start_block(),
        v.root_hash
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel_abi() {
        assert_eq!(HEADER, 312);
        assert_eq!(SPEC, 40);
    }

    #[test]
    fn targets_are_laid_out_after_the_header_with_aligned_next() {
        let mut buf = Buf::new("root", DM_READONLY_FLAG).expect("buf");
        let targets = [
            Target {
                start: 0,
                sectors: 8,
                kind: "verity",
                params: "abc",
            },
            Target {
                start: 8,
                sectors: 8,
                kind: "zero",
                params: "",
            },
        ];
        write_targets(&mut buf, &targets, "root").expect("fits");
        let h = buf.header();
        assert_eq!(h.target_count, 2);
        assert_eq!(h.flags, DM_READONLY_FLAG);
        let b = buf.bytes();
        assert_eq!(&b[HEADER + 24..HEADER + 30], b"verity");
        assert_eq!(
            u32::from_ne_bytes(b[HEADER + 20..HEADER + 24].try_into().expect("4")),
            48
        );
        assert_eq!(&b[HEADER + SPEC..HEADER + SPEC + 4], b"abc\0");
        assert_eq!(&b[HEADER + 48 + 24..HEADER + 48 + 28], b"zero");
    }

    #[test]
    fn verity_params_follow_the_kernel_table_format() {
        let v = basalt_api::bootparams::Verity {
            root_hash: "aa".repeat(32),
            salt: String::new(),
            data_blocks: 100,
        };
        assert_eq!(
            verity_params("254:3", &v),
            format!(
                "1 254:3 254:3 4096 4096 100 101 sha256 {} -",
                "aa".repeat(32)
            )
        );
    }

    #[test]
    fn overlong_names_are_refused() {
        assert!(matches!(
            Buf::new(&"x".repeat(200), 0),
            Err(DmError::TooLong(_))
        ));
    }
}
