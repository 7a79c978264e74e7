//! The kernel's modules as a graph: names, files, dependencies, aliases and soft
//! dependencies read from each module's `.modinfo` ELF section, built-ins from
//! `modules.builtin`; and the `modules.dep`/`modules.alias`/`modules.softdep` text files
//! that `depmod` would write at install time (Debian's package does not ship them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("read modules under {0}")]
    Walk(PathBuf, #[source] std::io::Error),
    #[error("module {0}: no readable .modinfo section")]
    ModInfo(PathBuf),
    #[error(
        "module {name} is neither a module file nor built into the kernel (needed by {needed_by})"
    )]
    Unknown { name: String, needed_by: String },
    #[error("{key}: {name:?} is neither a module of this kernel nor built into it")]
    UnknownInSpec { key: String, name: String },
    #[error("{key}: the pattern {pattern:?} matches no module of this kernel")]
    NoMatch { key: String, pattern: String },
    #[error("{key}: {pattern:?} is not a valid pattern")]
    BadPattern {
        key: String,
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
}

/// The modules a basalt root ships when the spec has no `[kernel] modules`: what a cloud
/// node can need, each closed over its dependencies and soft dependencies by
/// [`ModuleGraph::select`]. Built-in modules are skipped; a name this kernel lacks is an
/// error, so the list holds only what Debian's cloud kernel (6.1) builds as a module.
///
/// Left out on purpose: Mellanox (see below); filesystems a node has no userspace for
/// (btrfs, NFS: no `mount.nfs` on the root; a CSI driver's own image brings its tools and
/// needs only the kernel's ext4 or xfs); Xen and Hyper-V front ends (not KVM clouds);
/// InfiniBand; and the rest of the cloud kernel's 1,100 modules. A spec that needs one
/// names its own list.
pub const DEFAULT_MODULES: &[&str] = &[
    // Disks and the PCI transport (stage 1 loads these from the initramfs too).
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "nvme",
    // virtio devices a KVM cloud offers besides disks; fw_cfg for QEMU's config source.
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
    "virtio_console",
    "qemu_fw_cfg",
    // The NICs of KVM clouds: AWS (ENA), GCP (gVNIC), VMware (vmxnet3), SR-IOV virtual
    // functions of Intel cards. Not mlx5_core: 2.3 MiB (0.45 MiB of the compressed image)
    // for Mellanox virtual functions, which are Azure's (Hyper-V) and bare metal's; a
    // spec for such machines adds it.
    "ena",
    "gve",
    "vmxnet3",
    "ixgbevf",
    // The ACPI power button (basalt-init watches it).
    "evdev",
    "button",
    // The software watchdog an upgrade's trial boot arms when the machine has no
    // hardware one this kernel drives (it builds no i6300esb): a hung PID1 is reset.
    "softdog",
    // Root and STATE: verity, squashfs, erofs; ext4 is built in.
    "dm_mod",
    "dm_verity",
    "squashfs",
    "erofs",
    "xfs",
    "vfat",
    "isofs",
    "overlay",
    "fuse",
    // Container networking: bridge, veth, VXLAN and other tunnels (flannel's backends,
    // Calico's IPIP), WireGuard, VLANs, tun.
    "bridge",
    "br_netfilter",
    "veth",
    "vxlan",
    "geneve",
    "ipip",
    "ip_tunnel",
    "wireguard",
    "tun",
    "8021q",
    "macvlan",
    "ipvlan",
    "dummy",
    // Netfilter: nftables and every expression, the iptables tables and matches of both
    // back ends (kube-proxy, flannel, network policy), IPVS and ipset, conntrack.
    "nf_tables",
    "nft_*",
    "nfnetlink*",
    "x_tables",
    "xt_*",
    "ip_tables",
    "ip6_tables",
    "iptable_*",
    "ip6table_*",
    "ipt_*",
    "ip6t_*",
    "ip_set*",
    "ip_vs*",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    // Traffic control that CNIs with eBPF and bandwidth shaping use.
    "sch_ingress",
    "sch_htb",
    "cls_bpf",
    "act_bpf",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    /// Path relative to `/lib/modules/<kver>`.
    pub rel_path: PathBuf,
    pub depends: Vec<String>,
}

#[derive(Debug, Default)]
pub struct ModuleGraph {
    pub modules: BTreeMap<String, Module>,
    pub builtin: BTreeSet<String>,
    /// `(pattern, module)` from each module's `alias=` entries. Kept beside [`Module`]
    /// rather than in it so the many places that build a `Module` stay unchanged.
    pub aliases: BTreeSet<(String, String)>,
    /// `(module, "pre: a post: b")` from each module's `softdep=` entries.
    pub softdeps: BTreeSet<(String, String)>,
}

/// The text index files of `/lib/modules/<kver>`, in kmod's format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DepmodFiles {
    pub dep: String,
    pub alias: String,
    pub softdep: String,
}

/// Module names use `_`; file names may use `-`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

impl ModuleGraph {
    /// Reads every `.ko` under `moddir` (`/lib/modules/<kver>`).
    pub fn load(moddir: &Path) -> Result<Self, KmodError> {
        let mut graph = ModuleGraph::default();
        if let Ok(text) = std::fs::read_to_string(moddir.join("modules.builtin")) {
            for line in text.lines() {
                if let Some(stem) = Path::new(line).file_stem() {
                    graph.builtin.insert(normalize(&stem.to_string_lossy()));
                }
            }
        }
        let mut files = Vec::new();
        walk(&moddir.join("kernel"), &mut files).map_err(|e| KmodError::Walk(moddir.into(), e))?;
        for file in files {
            let data = std::fs::read(&file).map_err(|e| KmodError::Walk(file.clone(), e))?;
            let info = modinfo(&data).ok_or_else(|| KmodError::ModInfo(file.clone()))?;
            let rel_path = file.strip_prefix(moddir).unwrap_or(&file).to_path_buf();
            let stem = file
                .file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".ko").to_owned());
            let name = info
                .iter()
                .find(|(k, _)| k == "name")
                .map(|(_, v)| normalize(v))
                .or(stem.map(|s| normalize(&s)))
                .ok_or_else(|| KmodError::ModInfo(file.clone()))?;
            let depends = info
                .iter()
                .filter(|(k, _)| k == "depends")
                .flat_map(|(_, v)| {
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(normalize)
                        .collect::<Vec<_>>()
                })
                .collect();
            for (k, v) in &info {
                match k.as_str() {
                    "alias" => {
                        graph.aliases.insert((v.clone(), name.clone()));
                    }
                    "softdep" => {
                        graph.softdeps.insert((name.clone(), v.clone()));
                    }
                    _ => {}
                }
            }
            graph.modules.insert(
                name.clone(),
                Module {
                    name,
                    rel_path,
                    depends,
                },
            );
        }
        Ok(graph)
    }

    /// The modules needed to load `wanted`, dependencies before dependents, each once;
    /// built-in modules are left out.
    pub fn closure(&self, wanted: &[String]) -> Result<Vec<&Module>, KmodError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for w in wanted {
            self.visit(&normalize(w), "the spec", &mut seen, &mut order)?;
        }
        Ok(order)
    }

    /// The modules to ship for `wanted` (the entries of the spec key `key`): each entry a
    /// module name or a glob pattern (`xt_*`), every match with its soft dependencies
    /// (`pre:` and `post:`, where they name a module or an exact alias of one, such as
    /// `crypto-crc32c`), closed over their dependencies as [`ModuleGraph::closure`] orders
    /// them. Built-in modules are skipped. A name that is neither a module nor built in,
    /// or a pattern that matches no module, is an error naming `key`.
    pub fn select(&self, key: &str, wanted: &[String]) -> Result<Vec<&Module>, KmodError> {
        let mut names: Vec<String> = Vec::new();
        for w in wanted {
            if w.contains(['*', '?', '[']) {
                let pattern =
                    glob::Pattern::new(&normalize(w)).map_err(|source| KmodError::BadPattern {
                        key: key.into(),
                        pattern: w.clone(),
                        source,
                    })?;
                let before = names.len();
                names.extend(self.modules.keys().filter(|m| pattern.matches(m)).cloned());
                if names.len() == before {
                    return Err(KmodError::NoMatch {
                        key: key.into(),
                        pattern: w.clone(),
                    });
                }
            } else {
                let name = normalize(w);
                if !self.modules.contains_key(&name) && !self.builtin.contains(&name) {
                    return Err(KmodError::UnknownInSpec {
                        key: key.into(),
                        name: w.clone(),
                    });
                }
                names.push(name);
            }
        }
        // Soft dependencies, and theirs, until nothing new is added.
        let mut seen: BTreeSet<String> = names.iter().cloned().collect();
        let mut i = 0;
        while i < names.len() {
            for soft in self.soft_dependencies(&names[i]) {
                if seen.insert(soft.clone()) {
                    names.push(soft);
                }
            }
            i += 1;
        }
        self.closure(&names)
    }

    /// The modules named by `module`'s `softdep` entries that this graph can load: by
    /// module name, else by an alias that is exactly that word.
    fn soft_dependencies(&self, module: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (m, text) in &self.softdeps {
            if m != module {
                continue;
            }
            for word in text.split_whitespace() {
                if word.ends_with(':') {
                    continue;
                }
                let name = normalize(word);
                if self.modules.contains_key(&name) {
                    out.push(name);
                } else {
                    out.extend(
                        self.aliases
                            .iter()
                            .filter(|(pattern, _)| pattern == word)
                            .map(|(_, m)| m.clone()),
                    );
                }
            }
        }
        out
    }

    /// The graph of only `shipped`: their aliases and soft dependencies, the built-ins
    /// unchanged. What the root's index files are rendered from.
    pub fn subset(&self, shipped: &[&Module]) -> ModuleGraph {
        let names: BTreeSet<&str> = shipped.iter().map(|m| m.name.as_str()).collect();
        ModuleGraph {
            modules: self
                .modules
                .iter()
                .filter(|(n, _)| names.contains(n.as_str()))
                .map(|(n, m)| (n.clone(), m.clone()))
                .collect(),
            builtin: self.builtin.clone(),
            aliases: self
                .aliases
                .iter()
                .filter(|(_, m)| names.contains(m.as_str()))
                .cloned()
                .collect(),
            softdeps: self
                .softdeps
                .iter()
                .filter(|(m, _)| names.contains(m.as_str()))
                .cloned()
                .collect(),
        }
    }

    /// Renders `modules.dep`, `modules.alias` and `modules.softdep` as depmod does.
    ///
    /// A `modules.dep` line is `path: dep dep …` with the module's whole transitive closure
    /// (built-ins left out), ordered so that every module comes before its own
    /// dependencies: the deepest dependency is last. Loaders read it right to left
    /// (libkmod prepends each entry as it parses the line; busybox walks it backwards), so
    /// dependencies load first. Lines are sorted by path rather than by `modules.order`:
    /// the output depends on the module set alone.
    pub fn depmod_files(&self) -> Result<DepmodFiles, KmodError> {
        let mut modules: Vec<&Module> = self.modules.values().collect();
        modules.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
        let mut dep = String::new();
        for m in modules {
            let mut deps = self.closure(std::slice::from_ref(&m.name))?;
            deps.pop(); // the module itself, last in the closure
            dep.push_str(&format!("{}:", m.rel_path.display()));
            for d in deps.iter().rev() {
                dep.push_str(&format!(" {}", d.rel_path.display()));
            }
            dep.push('\n');
        }
        let mut alias = String::from("# Aliases extracted from modules themselves.\n");
        for (pattern, module) in &self.aliases {
            alias.push_str(&format!("alias {pattern} {module}\n"));
        }
        let mut softdep = String::from("# Soft dependencies extracted from modules themselves.\n");
        for (module, deps) in &self.softdeps {
            softdep.push_str(&format!("softdep {module} {deps}\n"));
        }
        Ok(DepmodFiles {
            dep,
            alias,
            softdep,
        })
    }

    fn visit<'a>(
        &'a self,
        name: &str,
        needed_by: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<&'a Module>,
    ) -> Result<(), KmodError> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        if self.builtin.contains(name) && !self.modules.contains_key(name) {
            return Ok(());
        }
        let module = self.modules.get(name).ok_or_else(|| KmodError::Unknown {
            name: name.into(),
            needed_by: needed_by.into(),
        })?;
        for dep in &module.depends {
            self.visit(dep, name, seen, order)?;
        }
        order.push(module);
        Ok(())
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if e.file_type()?.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "ko") {
            out.push(p);
        }
    }
    Ok(())
}

/// The key=value pairs of an ELF module's `.modinfo` section.
pub fn modinfo(elf: &[u8]) -> Option<Vec<(String, String)>> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(elf).ok()?;
    let data = file.section_by_name(".modinfo")?.data().ok()?;
    Some(
        data.split(|&b| b == 0)
            .filter_map(|kv| {
                let s = std::str::from_utf8(kv).ok()?;
                let (k, v) = s.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> ModuleGraph {
        let m = |name: &str, deps: &[&str]| {
            (
                name.to_string(),
                Module {
                    name: name.into(),
                    rel_path: format!("kernel/{name}.ko").into(),
                    depends: deps.iter().map(|d| d.to_string()).collect(),
                },
            )
        };
        ModuleGraph {
            modules: [
                m("dm_verity", &["dm_bufio", "dm_mod"]),
                m("dm_bufio", &["dm_mod"]),
                m("dm_mod", &[]),
                m("virtio_blk", &["virtio", "virtio_ring"]),
                m("virtio", &[]),
                m("virtio_ring", &[]),
            ]
            .into(),
            builtin: ["nvme".to_string(), "virtio_ring".to_string()].into(),
            aliases: [
                ("virtio:d00000002v*".to_string(), "virtio_blk".to_string()),
                ("dm-verity".to_string(), "dm_verity".to_string()),
            ]
            .into(),
            softdeps: [("dm_verity".to_string(), "pre: sha256".to_string())].into(),
        }
    }

    #[test]
    fn modules_dep_lists_the_whole_closure_deepest_last() {
        let files = graph().depmod_files().expect("render");
        assert_eq!(
            files.dep,
            "kernel/dm_bufio.ko: kernel/dm_mod.ko\n\
             kernel/dm_mod.ko:\n\
             kernel/dm_verity.ko: kernel/dm_bufio.ko kernel/dm_mod.ko\n\
             kernel/virtio.ko:\n\
             kernel/virtio_blk.ko: kernel/virtio_ring.ko kernel/virtio.ko\n\
             kernel/virtio_ring.ko:\n"
        );
    }

    #[test]
    fn a_module_comes_before_its_own_dependencies_on_a_diamond() {
        // a -> b, a -> c, b -> c, c -> d: any valid line has b before c before d.
        let mut g = ModuleGraph::default();
        for (name, deps) in [
            ("a", &["b", "c"][..]),
            ("b", &["c"]),
            ("c", &["d"]),
            ("d", &[]),
        ] {
            g.modules.insert(
                name.into(),
                Module {
                    name: name.into(),
                    rel_path: format!("kernel/{name}.ko").into(),
                    depends: deps.iter().map(|d| d.to_string()).collect(),
                },
            );
        }
        let files = g.depmod_files().expect("render");
        let line_a = files.dep.lines().next().expect("line for a");
        assert_eq!(line_a, "kernel/a.ko: kernel/b.ko kernel/c.ko kernel/d.ko");
    }

    #[test]
    fn aliases_and_softdeps_are_rendered_sorted_in_kmod_format() {
        let files = graph().depmod_files().expect("render");
        assert_eq!(
            files.alias,
            "# Aliases extracted from modules themselves.\n\
             alias dm-verity dm_verity\n\
             alias virtio:d00000002v* virtio_blk\n"
        );
        assert_eq!(
            files.softdep,
            "# Soft dependencies extracted from modules themselves.\n\
             softdep dm_verity pre: sha256\n"
        );
    }

    #[test]
    fn a_dependency_that_does_not_exist_fails_the_render_by_name() {
        let mut g = graph();
        g.modules
            .get_mut("virtio")
            .expect("virtio")
            .depends
            .push("ghost".into());
        let err = g.depmod_files().unwrap_err().to_string();
        assert!(err.contains("ghost") && err.contains("virtio"), "{err}");
    }

    #[test]
    fn closure_puts_dependencies_first_once_and_skips_builtins() {
        let g = graph();
        let wanted: Vec<String> = ["dm-verity", "nvme", "virtio_blk", "dm_mod"]
            .map(String::from)
            .into();
        let names: Vec<_> = g
            .closure(&wanted)
            .expect("closure")
            .iter()
            .map(|m| m.name.clone())
            .collect();
        assert_eq!(
            names,
            [
                "dm_mod",
                "dm_bufio",
                "dm_verity",
                "virtio",
                "virtio_ring",
                "virtio_blk"
            ]
        );
    }

    #[test]
    fn an_unknown_module_names_who_needed_it() {
        let mut g = graph();
        g.modules
            .get_mut("dm_mod")
            .expect("dm_mod")
            .depends
            .push("ghost".into());
        let err = g.closure(&["dm_verity".into()]).unwrap_err().to_string();
        assert!(err.contains("ghost") && err.contains("dm_mod"), "{err}");
    }

    #[test]
    fn an_unknown_module_in_the_spec_is_an_error_naming_the_key() {
        let g = graph();
        let err = g
            .select("kernel.modules", &["virtio_blk".into(), "ghost".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kernel.modules") && err.contains("ghost"),
            "{err}"
        );
        let err = g
            .select("kernel.modules", &["xt_*".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kernel.modules") && err.contains("xt_*"),
            "{err}"
        );
    }

    #[test]
    fn select_expands_patterns_adds_soft_dependencies_and_skips_builtins() {
        let mut g = graph();
        g.modules.insert(
            "sha256_ssse3".into(),
            Module {
                name: "sha256_ssse3".into(),
                rel_path: "kernel/sha256_ssse3.ko".into(),
                depends: vec![],
            },
        );
        g.aliases
            .insert(("sha256".to_string(), "sha256_ssse3".to_string()));
        let names: Vec<_> = g
            .select("kernel.modules", &["dm_v*".into(), "nvme".into()])
            .expect("select")
            .iter()
            .map(|m| m.name.clone())
            .collect();
        // dm_verity's `softdep pre: sha256` resolves through the alias.
        assert_eq!(names, ["dm_mod", "dm_bufio", "dm_verity", "sha256_ssse3"]);
    }

    #[test]
    fn a_subset_keeps_only_the_aliases_and_softdeps_of_its_modules() {
        let g = graph();
        let shipped = g.select("k", &["virtio_blk".into()]).expect("select");
        let sub = g.subset(&shipped);
        assert_eq!(
            sub.modules.keys().collect::<Vec<_>>(),
            ["virtio", "virtio_blk", "virtio_ring"]
        );
        let files = sub.depmod_files().expect("render");
        assert!(files.alias.contains("virtio_blk"), "{}", files.alias);
        assert!(!files.alias.contains("dm_verity"), "{}", files.alias);
        assert!(!files.softdep.contains("dm_verity"), "{}", files.softdep);
        assert!(!files.dep.contains("dm_mod"), "{}", files.dep);
    }

    /// Debian's kernel package as the spec pins it: from the build cache, fetched through
    /// apt into it when absent, unpacked once per test binary.
    fn real_kernel() -> &'static (tempfile::TempDir, PathBuf) {
        static KERNEL: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> =
            std::sync::OnceLock::new();
        KERNEL.get_or_init(|| {
            let spec = crate::spec::ImageSpec::load(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/k3s-node.toml"),
            )
            .expect("default spec");
            let pin = spec
                .inputs()
                .into_iter()
                .find(|p| p.name == "kernel")
                .expect("kernel input");
            let cache =
                crate::cache::Cache::open(&crate::cache::Cache::default_dir()).expect("cache");
            let deb = cache.fetch(&pin).expect("kernel package").path;
            let dir = tempfile::tempdir().expect("tempdir");
            crate::deb::unpack(&deb, dir.path()).expect("unpack");
            let modules = dir.path().join("lib/modules");
            let kver = std::fs::read_dir(&modules)
                .expect("lib/modules")
                .next()
                .expect("one kernel")
                .expect("entry")
                .file_name();
            let moddir = modules.join(kver);
            (dir, moddir)
        })
    }

    /// The oracle, independent of `.modinfo`'s `depends=` that [`ModuleGraph`] follows:
    /// what depmod itself computes dependencies from. Every symbol a shipped module leaves
    /// undefined and that some module of the whole tree exports (`__ksymtab_<symbol>`) must
    /// be exported by a shipped module; symbols no module exports are the kernel's own
    /// (Debian's package ships no real `System.map` to check those against). Returns the
    /// unresolved ones as `module: symbol`.
    fn unresolved_symbols(moddir: &Path, all: &[&Module], shipped: &[&Module]) -> Vec<String> {
        use object::{Object, ObjectSymbol};
        let symbols = |m: &Module| -> (Vec<String>, Vec<String>) {
            let data = std::fs::read(moddir.join(&m.rel_path)).expect("module file");
            let elf = object::File::parse(&*data).expect("ELF");
            let (mut exports, mut undefined) = (vec![], vec![]);
            for sym in elf.symbols() {
                let Ok(name) = sym.name() else { continue };
                if let Some(export) = name.strip_prefix("__ksymtab_") {
                    exports.push(export.to_owned());
                } else if sym.is_undefined() && !name.is_empty() {
                    undefined.push(name.to_owned());
                }
            }
            (exports, undefined)
        };
        let mut exported_by_any = BTreeSet::new();
        for m in all {
            exported_by_any.extend(symbols(m).0);
        }
        let mut exported = BTreeSet::new();
        let mut undefined = Vec::new();
        for m in shipped {
            let (exports, needs) = symbols(m);
            exported.extend(exports);
            undefined.extend(needs.into_iter().map(|s| (m.name.clone(), s)));
        }
        undefined
            .into_iter()
            .filter(|(_, s)| exported_by_any.contains(s) && !exported.contains(s))
            .map(|(m, s)| format!("{m}: {s}"))
            .collect()
    }

    #[test]
    fn the_default_list_is_closed_over_what_the_modules_really_link_against() {
        let (_dir, moddir) = real_kernel();
        let g = ModuleGraph::load(moddir).expect("load the kernel's modules");
        let all: Vec<&Module> = g.modules.values().collect();
        let wanted: Vec<String> = DEFAULT_MODULES.iter().map(|m| m.to_string()).collect();
        let shipped = g.select("kernel.modules", &wanted).expect("default list");
        let names: BTreeSet<&str> = shipped.iter().map(|m| m.name.as_str()).collect();
        // Dependencies that no entry of the list names.
        for dep in [
            "nf_conntrack",
            "nf_defrag_ipv4",
            "nf_defrag_ipv6",
            "libcrc32c",
            "stp",
            "llc",
            "udp_tunnel",
            "ip6_udp_tunnel",
            "curve25519_x86_64",
            "virtio_ring",
        ] {
            assert!(
                names.contains(dep) || g.builtin.contains(dep),
                "{dep} missing from {names:?}"
            );
        }
        let missing = unresolved_symbols(moddir, &all, &shipped);
        assert!(missing.is_empty(), "{missing:#?}");

        // The oracle can fail: without nf_conntrack, xt_conntrack's symbols dangle.
        let without: Vec<&Module> = shipped
            .iter()
            .copied()
            .filter(|m| m.name != "nf_conntrack")
            .collect();
        let missing = unresolved_symbols(moddir, &all, &without);
        assert!(
            missing.iter().any(|s| s.starts_with("xt_conntrack: ")),
            "{missing:#?}"
        );
        // And it is much smaller than the whole tree.
        assert!(shipped.len() * 3 < g.modules.len(), "{}", shipped.len());
    }

    #[test]
    fn the_default_list_renders_an_index_that_finds_the_virtio_drivers_by_modalias() {
        let (_dir, moddir) = real_kernel();
        let g = ModuleGraph::load(moddir).expect("load");
        let wanted: Vec<String> = DEFAULT_MODULES.iter().map(|m| m.to_string()).collect();
        let shipped = g.select("kernel.modules", &wanted).expect("default list");
        let files = g.subset(&shipped).depmod_files().expect("render");
        // virtio-net (device 1) and virtio-rng (device 4), as coldplug reads them.
        for (device, module) in [("00000001", "virtio_net"), ("00000004", "virtio_rng")] {
            let line = files.alias.lines().find(|l| {
                l.starts_with(&format!("alias virtio:d{device}v")) && l.ends_with(module)
            });
            assert!(line.is_some(), "no alias for {module}:\n{}", files.alias);
        }
        for m in &shipped {
            assert!(
                files
                    .dep
                    .lines()
                    .any(|l| l.starts_with(&format!("{}:", m.rel_path.display()))),
                "{} not in modules.dep",
                m.name
            );
        }
    }

    #[test]
    fn modinfo_reads_a_real_elf_section() {
        // The test binary itself is ELF but has no .modinfo: None, not a panic.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert_eq!(modinfo(&me), None);
    }
}
