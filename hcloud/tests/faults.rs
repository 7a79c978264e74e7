//! Fault injection against the fake Hetzner API. Each test ends with nothing leaked (no
//! server, no key) and no snapshot from a bad write.

mod common;

use basalt_hcloud::client::ApiError;
use basalt_hcloud::fake::{Fault, Op, RescueFaults};
use basalt_hcloud::ssh::SshError;
use basalt_hcloud::upload::{upload, UploadError};
use common::*;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn count(reqs: &[String], prefix: &str) -> usize {
    reqs.iter().filter(|r| r.starts_with(prefix)).count()
}

macro_rules! need_fake {
    ($name:expr) => {
        if !basalt_hcloud::fake::available_or_skip($name) {
            return;
        }
        init_tracing();
    };
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_are_retried() {
    need_fake!("429 and 5xx");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    let fake = fake().await;
    fake.inject(Op::CreateServer, Fault::RateLimited { reset_in: 1 }, 1);
    fake.inject(Op::EnableRescue, Fault::Status(503), 2);
    fake.inject(Op::PowerOn, Fault::Code(409, "conflict"), 1);
    fake.inject(Op::GetAction, Fault::Code(423, "locked"), 1);
    fake.inject(Op::CreateImage, Fault::Code(503, "unavailable"), 1);
    fake.inject(Op::DeleteServer, Fault::Status(504), 1);
    let done = upload(
        &client(&fake),
        &options(&fake, &img.zst),
        CancellationToken::new(),
    )
    .await
    .expect("the upload gets through");
    let reqs = fake.requests();
    assert_eq!(count(&reqs, "POST /v1/servers "), 0);
    assert_eq!(reqs.iter().filter(|r| *r == "POST /v1/servers").count(), 2);
    assert_eq!(
        count(&reqs, "POST /v1/servers/"),
        3 + 2 + 1 + 2,
        "{reqs:#?}"
    );
    let snap = &fake.snapshots()[0];
    assert_eq!(snap.id, done.snapshot.id);
    assert_eq!(sha256sum(&snap.file, Some(img.size)), img.sha256);
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_is_a_clear_error_suggesting_another_location() {
    need_fake!("resource_unavailable");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    let fake = fake().await;
    fake.inject(
        Op::CreateServer,
        Fault::Code(412, "resource_unavailable"),
        1,
    );
    let err = upload(
        &client(&fake),
        &options(&fake, &img.zst),
        CancellationToken::new(),
    )
    .await
    .expect_err("no capacity");
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(chain.contains("--location"), "{chain}");
    assert!(fake.snapshots().is_empty());
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_after_create_server_makes_no_second_server() {
    need_fake!("lost create_server");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    let fake = fake().await;
    fake.inject(Op::CreateServer, Fault::LostAnswer, 1);
    upload(
        &client(&fake),
        &options(&fake, &img.zst),
        CancellationToken::new(),
    )
    .await
    .expect("the upload gets through");
    let reqs = fake.requests();
    assert_eq!(
        reqs.iter().filter(|r| *r == "POST /v1/servers").count(),
        1,
        "{reqs:#?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /v1/servers?name=basalt-upload-")),
        "looked up by name: {reqs:#?}"
    );
    assert_eq!(fake.snapshots().len(), 1);
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_after_create_image_makes_no_second_snapshot() {
    need_fake!("lost create_image");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    let fake = fake().await;
    fake.inject(Op::CreateImage, Fault::LostAnswer, 1);
    let done = upload(
        &client(&fake),
        &options(&fake, &img.zst),
        CancellationToken::new(),
    )
    .await
    .expect("the upload gets through");
    let reqs = fake.requests();
    assert_eq!(
        count(&reqs, "POST /v1/servers/") - 3,
        1,
        "one create_image: {reqs:#?}"
    );
    let snaps = fake.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].id, done.snapshot.id);
    assert_eq!(sha256sum(&snaps[0].file, Some(img.size)), img.sha256);
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_action_fails_the_upload_and_cleans_up() {
    need_fake!("failed action");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    for op in [
        Op::CreateServer,
        Op::EnableRescue,
        Op::PowerOn,
        Op::CreateImage,
    ] {
        let fake = fake().await;
        fake.inject(op, Fault::FailAction("action_failed"), 1);
        let err = upload(
            &client(&fake),
            &options(&fake, &img.zst),
            CancellationToken::new(),
        )
        .await
        .expect_err("a failed action");
        assert!(
            matches!(
                &err,
                UploadError::Api { source, .. }
                    if matches!(&**source, ApiError::ActionFailed { code, .. } if code == "action_failed")
            ),
            "{op:?}: {err:?}"
        );
        assert!(fake.snapshots().is_empty(), "{op:?}");
        assert_nothing_leaked(&fake);
        fake.shutdown().await;
    }
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_rescue_system_is_waited_for_within_the_bound() {
    need_fake!("SSH late");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    let fake = fake().await;
    fake.set_rescue_faults(RescueFaults {
        ssh_delay: Duration::from_secs(4),
        ..RescueFaults::default()
    });
    let done = upload(
        &client(&fake),
        &options(&fake, &img.zst),
        CancellationToken::new(),
    )
    .await
    .expect("SSH up after 4 s, bound 20 s");
    let ssh = done
        .steps
        .iter()
        .find(|(s, _)| s == "ssh")
        .expect("ssh step")
        .1;
    assert!(ssh >= Duration::from_secs(4), "{ssh:?}");
    assert_nothing_leaked(&fake);

    // Past the bound: a clear error, and still nothing left.
    let mut opts = options(&fake, &img.zst);
    opts.ssh.bound = Duration::from_secs(2);
    fake.set_rescue_faults(RescueFaults {
        ssh_delay: Duration::from_secs(60),
        ..RescueFaults::default()
    });
    let err = upload(&client(&fake), &opts, CancellationToken::new())
        .await
        .expect_err("SSH never up within 2 s");
    assert!(
        matches!(&err, UploadError::Ssh { source, .. } if matches!(**source, SshError::NotUp { .. })),
        "{err:?}"
    );
    assert_eq!(fake.snapshots().len(), 1, "no second snapshot");
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_stream_fails_cleanly() {
    need_fake!("cut mid-stream");
    let dir = tempfile::tempdir().unwrap();
    // Random data does not compress: the stream is ~8 MiB, cut after 2 MiB.
    let img = make_image(dir.path(), "node", 16 * MIB, &[(0, 8 * MIB)]);
    let fake = fake().await;
    fake.set_rescue_faults(RescueFaults {
        cut_after_bytes: Some(2 * MIB),
        ..RescueFaults::default()
    });
    let err = upload(
        &client(&fake),
        &options(&fake, &img.zst),
        CancellationToken::new(),
    )
    .await
    .expect_err("cut");
    assert!(
        matches!(
            &err,
            UploadError::Ssh { source, .. } if matches!(
                **source,
                SshError::Lost { .. } | SshError::Session { .. } | SshError::Failed { .. }
            )
        ),
        "{err:?}"
    );
    assert!(fake.snapshots().is_empty());
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_on_the_disk_is_caught_before_any_snapshot() {
    need_fake!("flipped byte");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    let fake = fake().await;
    fake.set_rescue_faults(RescueFaults {
        flip_byte_at: Some(4096 + 17),
        ..RescueFaults::default()
    });
    let err = upload(
        &client(&fake),
        &options(&fake, &img.zst),
        CancellationToken::new(),
    )
    .await
    .expect_err("mismatch");
    let UploadError::Mismatch {
        expected, actual, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(expected, &img.sha256);
    assert_ne!(actual, &img.sha256);
    let msg = err.to_string();
    assert!(msg.contains(expected) && msg.contains(actual), "{msg}");
    assert!(fake.snapshots().is_empty());
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_deletes_the_server_and_key() {
    need_fake!("Ctrl-C");
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 8 * MIB, &[(0, MIB)]);
    let fake = fake().await;
    fake.set_rescue_faults(RescueFaults {
        ssh_delay: Duration::from_secs(60),
        ..RescueFaults::default()
    });
    let cancel = CancellationToken::new();
    let fire = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        fire.cancel();
    });
    let err = upload(&client(&fake), &options(&fake, &img.zst), cancel)
        .await
        .expect_err("cancelled");
    assert!(matches!(err, UploadError::Cancelled), "{err:?}");
    assert!(fake.snapshots().is_empty());
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}
