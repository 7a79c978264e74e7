//! Step 5: the root filesystem (squashfs of the root tree) with its dm-verity hash tree,
//! sized against the ROOT partitions.

use super::kernel::Kernel;
use super::{BuildError, Ctx, RootInfo};
use crate::cache::Resolved;
use crate::spec::ImageSpec;
use crate::{kmod, rootfs, store, verity};
use basalt_api::bootparams::{Verity, VERITY_BLOCK_SIZE};
use basalt_api::bundle::Identity;
use basalt_api::layout::Sectors;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The root image (squashfs + hash tree) and what its boot entries need.
pub struct Root {
    pub img: PathBuf,
    pub info: RootInfo,
    pub verity: Verity,
    pub reused: bool,
}

pub fn root(
    ctx: &Ctx,
    kernel: &Kernel,
    graph: &kmod::ModuleGraph,
    identity: &Identity,
) -> Result<Root, BuildError> {
    let key = store::key("rootfs", &[&ctx.seed]);
    let (dir, reused) = ctx.store.get_or_make("rootfs", &key, |dir| {
        make_root(
            dir,
            &ctx.spec.spec,
            &ctx.inputs,
            &kernel.unpacked["ca-certificates"],
            &ctx.init.path,
            &kernel.version,
            &kernel.moddir,
            graph,
            &ctx.seed,
            ctx.uuid("verity"),
            ctx.time_floor,
            identity,
        )
    })?;
    let info_path = dir.join("root.json");
    let info: RootInfo = serde_json::from_slice(&std::fs::read(&info_path)?)
        .map_err(|e| BuildError::Write(info_path, e.into()))?;
    let verity = Verity {
        root_hash: info.root_hash.clone(),
        salt: info.salt.clone(),
        data_blocks: info.data_blocks,
    };
    Ok(Root {
        img: dir.join("root.img"),
        info,
        verity,
        reused,
    })
}

/// The root's `/etc/os-release`: the image's version (`VERSION_ID`, `VERSION`: the spec's
/// `version`), the basalt release that built it (`BASALT_VERSION`), the image's inputs, and
/// the time floor init keeps the clock above.
fn os_release(spec: &ImageSpec, kver: &str, time_floor: u64) -> String {
    format!(
        "NAME=basalt\nID=basalt\nPRETTY_NAME=\"basalt {name} {v}\"\nVERSION=\"{v}\"\nVERSION_ID={v}\nBASALT_VERSION={b}\nBASALT_IMAGE={name}\nBASALT_KERNEL={kver}\nBASALT_K3S={}\n{}",
        spec.k3s.version,
        basalt_api::time_floor::os_release_line(time_floor),
        name = spec.name,
        v = spec.version(),
        b = env!("CARGO_PKG_VERSION")
    )
}

/// Squashfs of the root tree, padded to whole verity blocks, hash tree appended;
/// `root.img` and `root.json` in `dir`.
#[allow(clippy::too_many_arguments)]
fn make_root(
    dir: &Path,
    spec: &ImageSpec,
    inputs: &BTreeMap<String, Resolved>,
    ca_dir: &Path,
    init: &Path,
    kver: &str,
    moddir: &Path,
    graph: &kmod::ModuleGraph,
    seed: &str,
    uuid: uuid::Uuid,
    time_floor: u64,
    identity: &Identity,
) -> Result<(), BuildError> {
    let os_release = os_release(spec, kver, time_floor);
    let tree = rootfs::tree(&rootfs::RootContent {
        init,
        k3s: &inputs["k3s"].path,
        k3s_images: &inputs["k3s-images"].path,
        ca_bundle: rootfs::ca_bundle(ca_dir).map_err(BuildError::Certs)?,
        os_release,
        identity: identity.to_json(),
        kver,
        moddir,
        depmod: graph.depmod_files()?,
    })?;
    let img = dir.join("root.img");
    let squashfs_bytes = rootfs::write(&tree, &img)?;
    let salt: [u8; 32] = Sha256::digest(format!("basalt-verity-salt:{seed}")).into();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)?;
    let data_len = squashfs_bytes.div_ceil(VERITY_BLOCK_SIZE) * VERITY_BLOCK_SIZE;
    f.set_len(data_len)?;
    let info = verity::append(&mut f, data_len, &salt, *uuid.as_bytes())?;
    f.sync_all()?;
    let room = Sectors::from_mib(spec.disk.root_mib).bytes();
    let size = f.metadata()?.len();
    if size > room {
        return Err(BuildError::RootTooLarge { size, room });
    }
    let meta = RootInfo {
        squashfs_bytes,
        data_blocks: info.data_blocks,
        root_hash: hex::encode(info.root_hash),
        salt: hex::encode(salt),
    };
    std::fs::write(
        dir.join("root.json"),
        serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_carries_the_time_floor_init_reads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/k3s-node.toml");
        let spec = ImageSpec::load(&path).expect("default spec");
        let text = os_release(&spec, "6.1.0-test", 1_900_000_123);
        assert_eq!(
            basalt_api::time_floor::from_os_release(&text),
            Some(1_900_000_123)
        );
        let keys = crate::inspect::parse_os_release(&text);
        assert_eq!(
            keys.get("BASALT_KERNEL").map(String::as_str),
            Some("6.1.0-test")
        );
        assert_eq!(keys.get("NAME").map(String::as_str), Some("basalt"));
        assert_eq!(keys.get("VERSION_ID").map(String::as_str), Some("0.1.0"));
        assert_eq!(keys.get("VERSION").map(String::as_str), Some("0.1.0"));
        assert_eq!(
            keys.get("BASALT_VERSION").map(String::as_str),
            Some(env!("CARGO_PKG_VERSION"))
        );
    }
}
