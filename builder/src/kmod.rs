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
}

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
    fn modinfo_reads_a_real_elf_section() {
        // The test binary itself is ELF but has no .modinfo: None, not a panic.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert_eq!(modinfo(&me), None);
    }
}
