//! What refuses a bundle before anything is written: another upgrade on its way, a
//! bundle for another disk layout or slot size, an older version without
//! `allow_downgrade`.

use super::record::Record;
use super::trial;
use basalt_api::bundle::{Identity, Manifest, ROOT};
use basalt_api::grubenv::{GrubEnv, NEXT_ENTRY};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("an upgrade is already pending: {0}")]
    Pending(String),
    #[error(
        "the bundle is for another partition layout (compat.layout {bundle}, this node's \
         image has {node})"
    )]
    Layout { bundle: String, node: String },
    #[error(
        "the bundle is for another slot size (compat.slot_size {bundle} bytes, this node's \
         image has {node})"
    )]
    SlotSize { bundle: u64, node: u64 },
    #[error("root.img is {root} bytes, more than the {partition}-byte partition {name}")]
    TooLarge {
        root: u64,
        partition: u64,
        name: String,
    },
    #[error(
        "the bundle's version {bundle} is older than the running {running}; send it with \
         allow_downgrade (basalt node upgrade --allow-downgrade) to install it anyway"
    )]
    Downgrade { bundle: String, running: String },
}

/// Whether the node may start an upgrade now: no `next_entry` armed, not on trial (the
/// booted slot is GRUB's default), no upgrade left pending in the record.
pub fn idle(booted: &str, env: &GrubEnv, rec: &Record) -> Result<(), Refusal> {
    if let Some(next) = env.get(NEXT_ENTRY) {
        return Err(Refusal::Pending(format!(
            "slot {next} is armed for the next boot (GRUB next_entry); reboot into it first"
        )));
    }
    let saved = trial::saved(env);
    if booted != saved {
        return Err(Refusal::Pending(format!(
            "this boot of slot {booted} is on trial (GRUB's default is still {saved}); \
             wait until it is marked good"
        )));
    }
    if let Some(p) = &rec.pending {
        return Err(Refusal::Pending(format!(
            "version {} in slot {} has not been settled yet",
            p.version, p.slot
        )));
    }
    Ok(())
}

/// Checks a manifest (already validated by [`Manifest::parse`]) against the running
/// image's identity and the partition it would be written to.
pub fn check(
    m: &Manifest,
    running: &Identity,
    partition: (&str, u64),
    allow_downgrade: bool,
) -> Result<(), Refusal> {
    if m.compat.layout != running.compat.layout {
        return Err(Refusal::Layout {
            bundle: m.compat.layout.clone(),
            node: running.compat.layout.clone(),
        });
    }
    if m.compat.slot_size != running.compat.slot_size {
        return Err(Refusal::SlotSize {
            bundle: m.compat.slot_size,
            node: running.compat.slot_size,
        });
    }
    let root = m.part(ROOT).map_or(0, |p| p.size);
    if root > partition.1 {
        return Err(Refusal::TooLarge {
            root,
            partition: partition.1,
            name: partition.0.to_owned(),
        });
    }
    if m.version < running.version && !allow_downgrade {
        return Err(Refusal::Downgrade {
            bundle: m.version.to_string(),
            running: running.version.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::record::Pending;
    use super::*;
    use basalt_api::bundle::{Compat, Part, VerityParams, FORMAT, INITRD, KERNEL};

    pub fn manifest(version: &str) -> Manifest {
        Manifest {
            format: FORMAT,
            version: version.parse().expect("semver"),
            root_hash: "ab".repeat(32),
            verity: VerityParams {
                salt: String::new(),
                data_blocks: 4,
                hash_offset: 4 * 4096,
            },
            cmdline: String::new(),
            parts: [(ROOT, 6 * 4096), (KERNEL, 10), (INITRD, 10)]
                .iter()
                .map(|(n, s)| Part {
                    name: (*n).into(),
                    size: *s,
                    sha256: "00".repeat(32),
                })
                .collect(),
            compat: Compat {
                layout: "cd".repeat(32),
                slot_size: 1 << 20,
            },
        }
    }

    fn identity(version: &str) -> Identity {
        manifest(version).identity()
    }

    #[test]
    fn a_bundle_for_this_layout_and_a_newer_or_equal_version_is_taken() {
        let part = ("vda4", 1 << 20);
        check(&manifest("2.0.0"), &identity("1.0.0"), part, false).expect("newer");
        check(&manifest("1.0.0"), &identity("1.0.0"), part, false).expect("same");
    }

    #[test]
    fn another_layout_slot_size_or_a_too_small_partition_is_refused() {
        let part = ("vda4", 1 << 20);
        let mut m = manifest("2.0.0");
        m.compat.layout = "ee".repeat(32);
        let err = check(&m, &identity("1.0.0"), part, true).unwrap_err();
        assert!(matches!(err, Refusal::Layout { .. }), "{err}");
        assert!(err.to_string().contains("compat.layout"), "{err}");
        let mut m = manifest("2.0.0");
        m.compat.slot_size = 2 << 20;
        assert!(matches!(
            check(&m, &identity("1.0.0"), part, true),
            Err(Refusal::SlotSize { .. })
        ));
        assert!(matches!(
            check(&manifest("2.0.0"), &identity("1.0.0"), ("vda4", 4096), true),
            Err(Refusal::TooLarge { .. })
        ));
    }

    #[test]
    fn an_older_version_needs_allow_downgrade() {
        let part = ("vda4", 1 << 20);
        let err = check(&manifest("1.9.9"), &identity("1.10.0"), part, false).unwrap_err();
        assert_eq!(
            err,
            Refusal::Downgrade {
                bundle: "1.9.9".into(),
                running: "1.10.0".into()
            }
        );
        assert!(err.to_string().contains("--allow-downgrade"));
        check(&manifest("1.9.9"), &identity("1.10.0"), part, true).expect("allowed");
    }

    #[test]
    fn a_second_upgrade_is_refused_while_one_is_armed_on_trial_or_unsettled() {
        let mut env = GrubEnv::new();
        env.set("saved_entry", "a").expect("set");
        let rec = Record::default();
        idle("a", &env, &rec).expect("idle");
        let mut armed = env.clone();
        armed.set(NEXT_ENTRY, "b").expect("set");
        let err = idle("a", &armed, &rec).unwrap_err();
        assert!(err.to_string().contains("armed"), "{err}");
        let err = idle("b", &env, &rec).unwrap_err();
        assert!(err.to_string().contains("on trial"), "{err}");
        let rec = Record {
            pending: Some(Pending {
                slot: "b".into(),
                version: "2.0.0".into(),
                root_hash: "h".into(),
                at: 1,
                armed: false,
            }),
            ..Record::default()
        };
        assert!(matches!(idle("a", &env, &rec), Err(Refusal::Pending(_))));
    }
}
