//! Loading many modules at once on a few threads, each module only after every module
//! it depends on.
//!
//! `modules.dep` gives each module the whole closure of what it needs, so a module is
//! ready once each module of its line is loaded. Independent modules (K3s's netfilter
//! tables and overlay, the NIC's and the RNG's drivers) then load side by side: under
//! TCG each `finit_module` costs milliseconds of relocation, signature checking and
//! reading the file off the root, and a guest has more than one vCPU. A module whose
//! dependency failed is not tried, and its error names the dependency.

use super::modprobe::{name_of, ModprobeError, Modules};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

/// What inserts one module file. `Sync`: the threads share it.
pub trait Loader: Sync {
    fn load(&self, path: &Path) -> std::io::Result<()>;
}

/// The kernel: `finit_module(2)`.
pub struct Finit;

impl Loader for Finit {
    fn load(&self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::File::open(path)?;
        nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty())
            .map_err(std::io::Error::from)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    /// A requested name that resolves to no module.
    #[error("module {name}")]
    Resolve {
        name: String,
        #[source]
        source: ModprobeError,
    },
    #[error("module {module}: load {path}")]
    Load {
        module: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {module}: not loaded because its dependency {dependency} failed")]
    Dependency { module: String, dependency: String },
}

/// What [`load_all`] did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Modules inserted (already loaded ones are not counted).
    pub loaded: usize,
    /// One per module that failed or was not tried, each naming its module.
    pub errors: Vec<ParallelError>,
}

/// One module file to load.
struct Job {
    module: String,
    path: PathBuf,
    /// Jobs (indexes) that wait for this one.
    dependents: Vec<usize>,
    /// Dependencies not yet loaded.
    waiting_on: usize,
    /// The first dependency that failed, if one did.
    failed_dependency: Option<String>,
}

struct Plan {
    jobs: Vec<Job>,
    ready: VecDeque<usize>,
    /// Jobs neither finished nor failed.
    open: usize,
    outcome: Outcome,
}

/// Where the kernel lists a loaded module (relative to the root): `initstate` exists
/// only for loadable modules, not for a built-in that has parameters.
fn loaded_marker(root: &Path, module: &str) -> PathBuf {
    root.join("sys/module").join(module).join("initstate")
}

/// The jobs for `names`: every module they resolve to and everything those need, each
/// file once, with its dependencies as edges. A module the kernel already has (stage 1
/// loaded it, or an earlier batch did) is no job: `finit_module` would read, check the
/// signature of and relocate it only to answer EEXIST, and under TCG that costs as much
/// as a real load.
fn plan(root: &Path, modules: &Modules, names: &[&str]) -> Plan {
    let index = &modules.index;
    let mut outcome = Outcome::default();
    let mut by_rel: BTreeMap<String, usize> = BTreeMap::new();
    let mut jobs: Vec<Job> = Vec::new();
    let mut edges: Vec<(usize, Vec<String>)> = Vec::new();
    for name in names {
        let resolved = match index.resolve(name) {
            Ok(r) => r,
            Err(source) => {
                outcome.errors.push(ParallelError::Resolve {
                    name: (*name).to_owned(),
                    source,
                });
                continue;
            }
        };
        for module in resolved {
            // Dependencies first, then the module (modules.dep read right to left).
            for rel in index.load_order(&module) {
                if by_rel.contains_key(rel) || loaded_marker(root, &name_of(rel)).exists() {
                    continue;
                }
                let path = match rel.strip_prefix('/') {
                    Some(abs) => root.join(abs),
                    None => modules.moddir.join(rel),
                };
                let deps = index
                    .deps
                    .get(&name_of(rel))
                    .map(|(_, d)| d.clone())
                    .unwrap_or_default();
                by_rel.insert(rel.to_owned(), jobs.len());
                edges.push((jobs.len(), deps));
                jobs.push(Job {
                    module: name_of(rel),
                    path,
                    dependents: Vec::new(),
                    waiting_on: 0,
                    failed_dependency: None,
                });
            }
        }
    }
    for (job, deps) in edges {
        for dep in deps {
            // A dependency the index lists for a module but not as a line of its own
            // is in no job: the kernel reports the missing symbol when it matters.
            if let Some(&d) = by_rel.get(&dep) {
                if d != job {
                    jobs[d].dependents.push(job);
                    jobs[job].waiting_on += 1;
                }
            }
        }
    }
    let ready = (0..jobs.len())
        .filter(|&j| jobs[j].waiting_on == 0)
        .collect();
    Plan {
        open: jobs.len(),
        jobs,
        ready,
        outcome,
    }
}

impl Plan {
    /// Records how job `j` ended and releases (or fails) what waited for it.
    fn finish(&mut self, j: usize, result: std::io::Result<()>) {
        self.open -= 1;
        let ok = match result {
            Ok(()) => {
                self.outcome.loaded += 1;
                true
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => true,
            Err(source) => {
                self.outcome.errors.push(ParallelError::Load {
                    module: self.jobs[j].module.clone(),
                    path: self.jobs[j].path.clone(),
                    source,
                });
                false
            }
        };
        self.release(j, ok);
    }

    fn release(&mut self, j: usize, ok: bool) {
        let failed = (!ok).then(|| {
            self.jobs[j]
                .failed_dependency
                .clone()
                .unwrap_or_else(|| self.jobs[j].module.clone())
        });
        for d in std::mem::take(&mut self.jobs[j].dependents) {
            let job = &mut self.jobs[d];
            if job.failed_dependency.is_none() {
                job.failed_dependency.clone_from(&failed);
            }
            job.waiting_on -= 1;
            if job.waiting_on == 0 {
                match job.failed_dependency.clone() {
                    None => self.ready.push_back(d),
                    Some(dependency) => {
                        self.outcome.errors.push(ParallelError::Dependency {
                            module: job.module.clone(),
                            dependency,
                        });
                        self.open -= 1;
                        self.release(d, false);
                    }
                }
            }
        }
    }
}

/// Loads every name (module or alias) of `names` and what it needs, from `modules`, on
/// up to `threads` threads. A module already loaded counts as done; a failure stops only
/// the modules that need the one that failed. Errors are in no set order.
pub fn load_all(
    loader: &dyn Loader,
    root: &Path,
    modules: &Modules,
    names: &[&str],
    threads: usize,
) -> Outcome {
    let plan = Mutex::new(plan(root, modules, names));
    let changed = Condvar::new();
    let lock = || plan.lock().unwrap_or_else(|e| e.into_inner());
    let worker = || loop {
        let next = {
            let mut p = lock();
            loop {
                if let Some(j) = p.ready.pop_front() {
                    break Some((j, p.jobs[j].path.clone()));
                }
                if p.open == 0 {
                    break None;
                }
                p = changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some((j, path)) = next else {
            changed.notify_all();
            return;
        };
        let result = loader.load(&path);
        lock().finish(j, result);
        changed.notify_all();
    };
    std::thread::scope(|s| {
        for _ in 1..threads.max(1) {
            s.spawn(worker);
        }
        worker();
    });
    plan.into_inner().unwrap_or_else(|e| e.into_inner()).outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmod::modprobe::Index;
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    /// A module tree like the kernel's: bridge needs stp needs llc, br_netfilter needs
    /// all three; overlay, veth and nf_conntrack stand alone; nft_compat needs nf_tables.
    fn modules(root: &Path) -> Modules {
        let moddir = root.join("lib/modules/6.1.0-1");
        std::fs::create_dir_all(&moddir).expect("mkdir");
        std::fs::write(
            moddir.join("modules.dep"),
            "kernel/br_netfilter.ko: kernel/bridge.ko kernel/stp.ko kernel/llc.ko\n\
             kernel/bridge.ko: kernel/stp.ko kernel/llc.ko\n\
             kernel/stp.ko: kernel/llc.ko\n\
             kernel/llc.ko:\n\
             kernel/overlay.ko:\n\
             kernel/veth.ko:\n\
             kernel/nf_conntrack.ko:\n\
             kernel/nft_compat.ko: kernel/nf_tables.ko\n\
             kernel/nf_tables.ko:\n",
        )
        .expect("dep");
        std::fs::write(
            moddir.join("modules.alias"),
            "alias virtio:d00000001v* veth\n",
        )
        .expect("alias");
        Modules {
            index: Index::read(&moddir).expect("index"),
            moddir,
        }
    }

    /// Records each load; checks, as the kernel would, that what a module needs is in.
    #[derive(Default)]
    struct Kernel {
        loaded: Mutex<Vec<String>>,
        /// Loads that came before a dependency was in: (module, missing dependency).
        too_early: Mutex<Vec<(String, String)>>,
        failing: Vec<(&'static str, i32)>,
        /// How long each load takes, so that loads overlap.
        delay: Duration,
        at_once: Mutex<(usize, usize)>,
        deps: BTreeMap<String, Vec<String>>,
    }

    impl Kernel {
        fn new(modules: &Modules) -> Kernel {
            Kernel {
                deps: modules
                    .index
                    .deps
                    .iter()
                    .map(|(name, (_, deps))| {
                        (name.clone(), deps.iter().map(|d| name_of(d)).collect())
                    })
                    .collect(),
                ..Kernel::default()
            }
        }
    }

    impl Loader for Kernel {
        fn load(&self, path: &Path) -> std::io::Result<()> {
            let name = name_of(&path.to_string_lossy());
            {
                let mut n = self.at_once.lock().expect("lock");
                n.0 += 1;
                n.1 = n.1.max(n.0);
            }
            std::thread::sleep(self.delay);
            self.at_once.lock().expect("lock").0 -= 1;
            let loaded = self.loaded.lock().expect("lock").clone();
            for dep in self.deps.get(&name).into_iter().flatten() {
                if !loaded.contains(dep) {
                    self.too_early
                        .lock()
                        .expect("lock")
                        .push((name.clone(), dep.clone()));
                }
            }
            if let Some((_, errno)) = self.failing.iter().find(|(m, _)| *m == name) {
                return Err(std::io::Error::from_raw_os_error(*errno));
            }
            self.loaded.lock().expect("lock").push(name);
            Ok(())
        }
    }

    const K3S: &[&str] = &[
        "br_netfilter",
        "overlay",
        "nft_compat",
        "veth",
        "nf_conntrack",
    ];

    #[test]
    fn a_module_never_loads_before_its_dependencies() {
        let root = tempfile::tempdir().expect("tempdir");
        let m = modules(root.path());
        for threads in [1, 2, 4, 8] {
            let mut kernel = Kernel::new(&m);
            kernel.delay = Duration::from_millis(2);
            let out = load_all(&kernel, root.path(), &m, K3S, threads);
            assert!(out.errors.is_empty(), "{:?}", out.errors);
            assert_eq!(out.loaded, 9, "each file once");
            assert_eq!(kernel.too_early.lock().expect("lock").clone(), vec![]);
            let loaded: BTreeSet<String> = kernel
                .loaded
                .lock()
                .expect("lock")
                .iter()
                .cloned()
                .collect();
            assert_eq!(loaded.len(), 9, "threads {threads}");
        }
    }

    #[test]
    fn independent_modules_load_side_by_side() {
        let root = tempfile::tempdir().expect("tempdir");
        let m = modules(root.path());
        let mut kernel = Kernel::new(&m);
        kernel.delay = Duration::from_millis(100);
        let started = Instant::now();
        let out = load_all(
            &kernel,
            root.path(),
            &m,
            &["overlay", "veth", "nf_conntrack", "llc"],
            4,
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(
            kernel.at_once.lock().expect("lock").1 > 1,
            "never more than one at once"
        );
        // Four 100 ms loads one after another would take 400 ms.
        assert!(
            started.elapsed() < Duration::from_millis(390),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_failure_names_its_module_and_stops_only_what_needs_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let m = modules(root.path());
        let mut kernel = Kernel::new(&m);
        kernel.failing = vec![("stp", libc::ENOEXEC), ("veth", libc::EEXIST)];
        let out = load_all(&kernel, root.path(), &m, K3S, 2);
        let mut errors: Vec<String> = out
            .errors
            .iter()
            .map(|e| crate::pid1::console::chain(e))
            .collect();
        errors.sort();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0]
                .starts_with("module br_netfilter: not loaded because its dependency stp failed"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("module bridge: not loaded because its dependency stp failed"),
            "{errors:?}"
        );
        assert!(errors[2].starts_with("module stp: load "), "{errors:?}");
        assert!(errors[2].contains("kernel/stp.ko"), "{errors:?}");
        let loaded = kernel.loaded.lock().expect("lock").clone();
        assert!(!loaded.contains(&"bridge".to_owned()), "{loaded:?}");
        // Independent modules went on; veth was already in (EEXIST): done, not counted.
        for m in ["overlay", "nf_tables", "nft_compat", "nf_conntrack", "llc"] {
            assert!(loaded.contains(&m.to_owned()), "{m}: {loaded:?}");
        }
        assert_eq!(out.loaded, 5);
    }

    #[test]
    fn a_module_the_kernel_already_has_is_not_loaded_again() {
        let root = tempfile::tempdir().expect("tempdir");
        let m = modules(root.path());
        for loaded in ["llc", "stp"] {
            let dir = root.path().join("sys/module").join(loaded);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("initstate"), "live\n").expect("write");
        }
        // A built-in with parameters has a folder but no initstate: not loaded here
        // either way, since it has no line in modules.dep; bridge's folder alone does
        // not count as loaded.
        std::fs::create_dir_all(root.path().join("sys/module/bridge")).expect("mkdir");
        let kernel = Kernel::new(&m);
        let out = load_all(&kernel, root.path(), &m, &["br_netfilter"], 2);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(
            kernel.loaded.lock().expect("lock").clone(),
            ["bridge", "br_netfilter"]
        );
        assert_eq!(out.loaded, 2);
    }

    #[test]
    fn an_unknown_name_is_named_and_an_alias_resolves() {
        let root = tempfile::tempdir().expect("tempdir");
        let m = modules(root.path());
        let kernel = Kernel::new(&m);
        let out = load_all(
            &kernel,
            root.path(),
            &m,
            &["no_such_mod", "virtio:d00000001v00001AF4"],
            2,
        );
        assert_eq!(out.errors.len(), 1);
        assert!(
            crate::pid1::console::chain(&out.errors[0]).contains("no_such_mod"),
            "{:?}",
            out.errors
        );
        assert_eq!(kernel.loaded.lock().expect("lock").clone(), ["veth"]);
    }
}
