//! `hcloud-fake`: runs the fake Hetzner API (a test double, not Hetzner) until SIGINT or
//! SIGTERM, for scripts and CI: `examples/pipeline` uploads to it. It prints, and with
//! `--env-file` writes, the variables to point basalt at it:
//! `HCLOUD_ENDPOINT`, `HCLOUD_TOKEN` and `BASALT_HCLOUD_SSH_PORT`.
//!
//! `--boot-hook CMD` runs `sh -c CMD` when a server powers on without rescue, with
//! `HCLOUD_FAKE_SERVER_ID`, `HCLOUD_FAKE_SERVER_NAME`, `HCLOUD_FAKE_DISK` (its disk file)
//! and `HCLOUD_FAKE_METADATA` (host:port of its metadata service) in the environment:
//! a script boots the disk under QEMU there.

use basalt_hcloud::fake::{Fake, FakeOptions};
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: hcloud-fake [--disk-gib N] [--env-file PATH] [--dir DIR] [--boot-hook CMD]");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut opts = FakeOptions::default();
    let (mut env_file, mut dir, mut hook) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--disk-gib", Some(v)) => match v.parse::<u64>() {
                Ok(g) => opts.disk_bytes = g << 30,
                Err(_) => return usage(),
            },
            ("--env-file", Some(v)) => env_file = Some(v),
            ("--dir", Some(v)) => dir = Some(v),
            ("--boot-hook", Some(v)) => hook = Some(v),
            _ => return usage(),
        }
    }
    let started = match &dir {
        Some(d) => Fake::start_in(std::path::Path::new(d), opts).await,
        None => Fake::start(opts).await,
    };
    let fake = match started {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hcloud-fake: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(cmd) = hook {
        fake.set_boot_hook(std::sync::Arc::new(move |b| {
            let spawned = std::process::Command::new("sh")
                .args(["-c", &cmd])
                .env("HCLOUD_FAKE_SERVER_ID", b.server.to_string())
                .env("HCLOUD_FAKE_SERVER_NAME", &b.name)
                .env("HCLOUD_FAKE_DISK", &b.disk)
                .env("HCLOUD_FAKE_METADATA", b.metadata.to_string())
                .spawn();
            match spawned {
                // Reaped on its own thread: the hook may run as long as the VM does.
                Ok(mut child) => drop(std::thread::spawn(move || child.wait())),
                Err(e) => eprintln!("hcloud-fake: boot hook: {e}"),
            }
        }));
    }
    let env = format!(
        "HCLOUD_ENDPOINT={}\nHCLOUD_TOKEN={}\nBASALT_HCLOUD_SSH_PORT={}\n",
        fake.endpoint(),
        fake.token(),
        fake.ssh_port()
    );
    print!("{env}");
    if let Some(path) = env_file {
        // Written whole, then renamed: a script waiting for the file never reads half.
        let tmp = format!("{path}.tmp");
        if let Err(e) = std::fs::write(&tmp, &env).and_then(|()| std::fs::rename(&tmp, &path)) {
            eprintln!("hcloud-fake: {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hcloud-fake: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    fake.shutdown().await;
    ExitCode::SUCCESS
}
