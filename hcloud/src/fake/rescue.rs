//! The fake's rescue system: Debian's real OpenSSH `sshd`, in a private mount and PID
//! namespace where `/dev` is a fresh tmpfs and `/dev/sda` is a loop device over the
//! server's disk file. `blkdiscard` punches holes in that file and `dd conv=sparse`
//! leaves them, as on a real disk.
//!
//! Clients reach it through a TCP proxy on the server's own loopback address: the proxy
//! is where the network faults are made (a late rescue system, a cut connection).
//!
//! Nothing here may write a real disk: the device bound as `/dev/sda` is checked to be
//! a loop device (major 7) whose backing file is the server's disk file, before sshd
//! starts.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const LOOP_MAJOR: u64 = 7;

#[derive(Debug, thiserror::Error)]
pub enum RescueError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Tool { what: String, detail: String },
    #[error("refusing {device}: {why}")]
    NotOurLoop { device: PathBuf, why: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RescueError {
    let what = what.into();
    move |source| RescueError::Io { what, source }
}

/// Faults the rescue system can be told to have.
#[derive(Debug, Clone, Default)]
pub struct RescueFaults {
    /// SSH answers only this long after power-on.
    pub ssh_delay: Duration,
    /// The proxy cuts the connection after this many bytes from the client.
    pub cut_after_bytes: Option<u64>,
    /// The first `sync` on the rescue system flips the byte at this offset of /dev/sda
    /// (a disk that does not keep what was written).
    pub flip_byte_at: Option<u64>,
}

/// A running rescue system. Dropping it does not stop it: call [`Rescue::stop`].
pub struct Rescue {
    loop_dev: PathBuf,
    sshd: Option<tokio::process::Child>,
    stop: CancellationToken,
    /// Bytes the proxy carried from clients.
    pub received: Arc<AtomicU64>,
}

/// Files shared by every rescue system of one fake.
pub struct Host {
    pub dir: PathBuf,
    pub host_key: PathBuf,
}

impl Host {
    pub fn prepare(dir: &Path) -> Result<Host, RescueError> {
        let host_key = dir.join("ssh_host_ed25519_key");
        run(
            std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&host_key),
            "ssh-keygen for the rescue's host key",
        )?;
        // sshd's privilege separation directory, as Debian's package makes it.
        std::fs::create_dir_all("/run/sshd").map_err(io("create /run/sshd"))?;
        Ok(Host {
            dir: dir.to_path_buf(),
            host_key,
        })
    }
}

/// Linux's `dev_t` encoding (glibc's `gnu_dev_major`/`gnu_dev_minor`).
fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

fn run(cmd: &mut std::process::Command, what: &str) -> Result<String, RescueError> {
    let out = cmd.output().map_err(io(what))?;
    if !out.status.success() {
        return Err(RescueError::Tool {
            what: what.to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Attaches `disk` to a free loop device and checks that it is one.
fn attach(disk: &Path) -> Result<PathBuf, RescueError> {
    let dev = PathBuf::from(run(
        std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(disk),
        "losetup",
    )?);
    if let Err(e) = check_loop(&dev, disk) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&dev)
            .status();
        return Err(e);
    }
    Ok(dev)
}

fn check_loop(dev: &Path, disk: &Path) -> Result<(), RescueError> {
    let refuse = |why: String| RescueError::NotOurLoop {
        device: dev.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(dev).map_err(io(format!("stat {}", dev.display())))?;
    let major = major(meta.rdev());
    if !meta.file_type().is_block_device() || major != LOOP_MAJOR {
        return Err(refuse(format!("not a loop device (major {major})")));
    }
    let name = dev
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| refuse("no name".into()))?;
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .map_err(io(format!("backing file of {}", dev.display())))?;
    let want = disk
        .canonicalize()
        .map_err(io(format!("canonicalize {}", disk.display())))?;
    if Path::new(backing.trim()) != want {
        return Err(refuse(format!(
            "its backing file is {}, not {}",
            backing.trim(),
            want.display()
        )));
    }
    Ok(())
}

/// The namespace's `/dev`: a tmpfs with the usual character devices and the loop
/// device as `sda`; sshd in the foreground as the namespace's PID 1.
fn script(
    host: &Host,
    work: &Path,
    dev: &Path,
    faults: &RescueFaults,
) -> Result<String, RescueError> {
    let meta = std::fs::metadata(dev).map_err(io(format!("stat {}", dev.display())))?;
    let (major, minor) = (major(meta.rdev()), minor(meta.rdev()));
    let mut s = String::from(
        "set -e\n\
         mount -t tmpfs -o mode=0755,size=1m basalt-fake-dev /dev\n\
         mknod -m 666 /dev/null c 1 3\nmknod -m 666 /dev/zero c 1 5\n\
         mknod -m 666 /dev/full c 1 7\nmknod -m 666 /dev/random c 1 8\n\
         mknod -m 666 /dev/urandom c 1 9\nmknod -m 666 /dev/tty c 5 0\n\
         ln -s /proc/self/fd /dev/fd\nln -s /proc/self/fd/0 /dev/stdin\n\
         ln -s /proc/self/fd/1 /dev/stdout\nln -s /proc/self/fd/2 /dev/stderr\n\
         mkdir /dev/pts /dev/shm\n",
    );
    s.push_str(&format!("mknod -m 660 /dev/sda b {major} {minor}\n"));
    if let Some(offset) = faults.flip_byte_at {
        // A `sync` that, once, flips a byte of the disk after flushing it.
        let real = work.join("sync.real");
        let wrapper = work.join("sync");
        let marker = work.join("flipped");
        std::fs::copy("/usr/bin/sync", &real).map_err(io("copy sync"))?;
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\n{real} \"$@\"\nif [ ! -e {marker} ]; then\n  touch {marker}\n  \
                 b=$(dd if=/dev/sda bs=1 skip={offset} count=1 status=none | od -An -tu1 | tr -d ' ')\n  \
                 printf \"$(printf '\\\\%03o' $((b ^ 255)))\" | dd of=/dev/sda bs=1 seek={offset} conv=notrunc status=none\n  \
                 {real}\nfi\n",
                real = real.display(),
                marker = marker.display()
            ),
        )
        .map_err(io("write the sync wrapper"))?;
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(io("chmod the sync wrapper"))?;
        s.push_str(&format!(
            "mount --bind {} /usr/bin/sync\n",
            wrapper.display()
        ));
    }
    s.push_str(&format!(
        "exec /usr/sbin/sshd -D -e -f {} -h {}\n",
        work.join("sshd_config").display(),
        host.host_key.display()
    ));
    Ok(s)
}

impl Rescue {
    /// Boots the rescue system of a server: `disk` as /dev/sda, `authorized` as root's key,
    /// reachable on `public` (the server's address) after `faults.ssh_delay`.
    pub async fn start(
        host: &Host,
        work: &Path,
        disk: &Path,
        authorized: &str,
        public: SocketAddr,
        faults: &RescueFaults,
    ) -> Result<Rescue, RescueError> {
        std::fs::create_dir_all(work).map_err(io(format!("create {}", work.display())))?;
        let _ = std::fs::remove_file(work.join("flipped"));
        let loop_dev = attach(disk)?;
        let started = Self::start_sshd(host, work, &loop_dev, authorized, public, faults).await;
        match started {
            Ok(r) => Ok(r),
            Err(e) => {
                detach(&loop_dev);
                Err(e)
            }
        }
    }

    async fn start_sshd(
        host: &Host,
        work: &Path,
        loop_dev: &Path,
        authorized: &str,
        public: SocketAddr,
        faults: &RescueFaults,
    ) -> Result<Rescue, RescueError> {
        let keys = work.join("authorized_keys");
        std::fs::write(&keys, format!("{authorized}\n")).map_err(io("write authorized_keys"))?;
        let internal = free_port().await?;
        std::fs::write(
            work.join("sshd_config"),
            format!(
                "ListenAddress {internal}\nAuthorizedKeysFile {keys}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile none\nLogLevel ERROR\nMaxStartups 100\n",
                keys = keys.display()
            ),
        )
        .map_err(io("write sshd_config"))?;
        let log = std::fs::File::create(work.join("sshd.log")).map_err(io("create sshd.log"))?;
        let sshd = tokio::process::Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--kill-child",
                "--propagation",
                "private",
            ])
            .args(["/bin/sh", "-c", &script(host, work, loop_dev, faults)?])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("sshd.log"))?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(io("start sshd in a mount namespace"))?;
        let stop = CancellationToken::new();
        let received = Arc::new(AtomicU64::new(0));
        tokio::spawn(proxy(
            public,
            internal,
            faults.ssh_delay,
            faults.cut_after_bytes,
            received.clone(),
            stop.clone(),
        ));
        Ok(Rescue {
            loop_dev: loop_dev.to_path_buf(),
            sshd: Some(sshd),
            stop,
            received,
        })
    }

    /// Powers the rescue system off: the namespace dies with its PID 1, the loop device
    /// is detached (which flushes it into the disk file).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(mut child) = self.sshd.take() {
            let _ = child.kill().await;
        }
        let dev = self.loop_dev.clone();
        let _ = tokio::task::spawn_blocking(move || detach(&dev)).await;
    }
}

impl Drop for Rescue {
    /// A rescue system dropped without [`Rescue::stop`] (a test that panicked) still
    /// leaves no sshd and no loop device behind.
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(mut child) = self.sshd.take() {
            let _ = child.start_kill();
            detach(&self.loop_dev);
        }
    }
}

fn detach(dev: &Path) {
    // The namespace's processes may hold the device a moment after their PID 1 died.
    for _ in 0..50 {
        let ok = std::process::Command::new("losetup")
            .arg("-d")
            .arg(dev)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::error!(device = %dev.display(), "could not detach the loop device");
}

async fn free_port() -> Result<SocketAddr, RescueError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("bind a port for sshd"))?;
    l.local_addr().map_err(io("sshd's port"))
}

/// Forwards `public` to sshd at `internal`: nothing listens before `delay` (connections
/// are refused, as by a rescue system still booting); with `cut`, a connection is
/// dropped once that many bytes came from its client.
async fn proxy(
    public: SocketAddr,
    internal: SocketAddr,
    delay: Duration,
    cut: Option<u64>,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = stop.cancelled() => return,
    }
    let listener = match TcpListener::bind(public).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%public, "fake rescue proxy: {e}");
            return;
        }
    };
    loop {
        let (client, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            () = stop.cancelled() => return,
        };
        let (received, stop) = (received.clone(), stop.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(internal).await else {
                return;
            };
            tokio::select! {
                () = pipe(client, server, cut, received) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn pipe(client: TcpStream, server: TcpStream, cut: Option<u64>, received: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        // true: cut on purpose.
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let n = match cut {
                Some(limit) if total + n as u64 >= limit => {
                    let keep = (limit - total) as usize;
                    let _ = sw.write_all(&buf[..keep]).await;
                    received.fetch_add(keep as u64, Ordering::Relaxed);
                    tracing::info!(limit, "fake rescue: cutting the connection");
                    return true;
                }
                _ => n,
            };
            total += n as u64;
            received.fetch_add(n as u64, Ordering::Relaxed);
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
        false
    };
    let down = async {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    // A cut ends both directions at once: the halves are dropped, the sockets closed.
    // So does sshd closing its side.
    tokio::pin!(up);
    tokio::pin!(down);
    tokio::select! {
        cut = &mut up => if !cut { (&mut down).await },
        () = &mut down => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loop_device_over_the_servers_own_file_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"disk").unwrap();
        // A character device, a regular file: refused before anything is bound.
        for dev in [Path::new("/dev/null"), disk.as_path()] {
            let e = check_loop(dev, &disk).unwrap_err();
            assert!(matches!(e, RescueError::NotOurLoop { .. }), "{dev:?}: {e}");
        }
    }

    #[test]
    fn dev_t_is_decoded_as_glibc_does() {
        // makedev(7, 3) and makedev(259, 300) in glibc's encoding.
        let small = (7u64 << 8) | 3;
        assert_eq!((major(small), minor(small)), (7, 3));
        let big = ((259u64 & 0xfff) << 8) | ((300u64 & 0xff) | ((300u64 & !0xff) << 12));
        assert_eq!((major(big), minor(big)), (259, 300));
    }
}
