//! A whole upload against the fake Hetzner API and its real sshd, checked with tools
//! that share no code with the upload: `sha256sum` of the snapshot's file, its
//! allocated blocks (holes stayed holes), its labels as the API's JSON has them.

mod common;

use basalt_hcloud::upload::upload;
use common::*;
use std::os::unix::fs::MetadataExt;
use tokio_util::sync::CancellationToken;

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zst_image_becomes_a_verified_labelled_sparse_snapshot() {
    if !basalt_hcloud::fake::available_or_skip("upload zst") {
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // 48 MiB logical, 3 MiB of data in three places, the rest holes.
    let img = make_image(
        dir.path(),
        "k3s-node",
        48 * MIB,
        &[(0, MIB), (20 * MIB + 4096, MIB), (47 * MIB, MIB)],
    );
    let fake = fake().await;
    let client = client(&fake);
    let mut opts = options(&fake, &img.zst);
    opts.labels.insert("team".into(), "ops".into());
    opts.description = Some("test upload".into());

    let done = upload(&client, &opts, CancellationToken::new())
        .await
        .expect("upload");

    let snaps = fake.snapshots();
    assert_eq!(snaps.len(), 1, "one snapshot");
    let snap = &snaps[0];
    assert_eq!(snap.id, done.snapshot.id);
    // The oracle: coreutils over the fake's file, not the rescue's hash.
    assert_eq!(sha256sum(&snap.file, Some(img.size)), img.sha256);
    // Discard + conv=sparse: the system image's marker is gone and holes stayed holes.
    let allocated = std::fs::metadata(&snap.file).unwrap().blocks() * 512;
    assert!(
        allocated <= 4 * MIB,
        "snapshot allocates {allocated} bytes for 3 MiB of data"
    );
    let l = &snap.labels;
    assert_eq!(l["basalt.io/image"], "k3s-node");
    assert_eq!(l["basalt.io/version"], "0.1.0");
    assert_eq!(l["basalt.io/sha256"], img.sha256[..32]);
    assert_eq!(l["basalt.io/arch"], "x86");
    assert_eq!(l["team"], "ops");
    assert_eq!(snap.description, "test upload");
    assert_eq!(done.snapshot.labels, snap.labels, "the API's JSON agrees");
    assert_nothing_leaked(&fake);
    // The temporary server was created powered off and only one was made.
    let reqs = fake.requests();
    assert_eq!(reqs.iter().filter(|r| *r == "POST /v1/servers").count(), 1);
    fake.shutdown().await;
}

#[cfg_attr(
    basalt_skip_hcloud_fake,
    ignore = "needs root, sshd, zstd and loop devices (scripts/install-host-tools)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_raw_image_uploads_too() {
    if !basalt_hcloud::fake::available_or_skip("upload raw") {
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), "node", 16 * MIB, &[(MIB, 2 * MIB)]);
    let fake = fake().await;
    let done = upload(
        &client(&fake),
        &options(&fake, &img.raw),
        CancellationToken::new(),
    )
    .await
    .expect("upload");
    let snap = fake
        .snapshots()
        .into_iter()
        .find(|s| s.id == done.snapshot.id)
        .expect("the snapshot");
    assert_eq!(sha256sum(&snap.file, Some(img.size)), img.sha256);
    assert_nothing_leaked(&fake);
    fake.shutdown().await;
}
