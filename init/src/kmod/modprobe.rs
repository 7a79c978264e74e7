//! basalt-init answering as `/sbin/modprobe`.
//!
//! The kernel's `request_module` runs `/sbin/modprobe -q -- <alias>` (the path in
//! `/proc/sys/kernel/modprobe`), and K3s's tools run `modprobe <name>`. Both are served
//! from the text indexes the builder writes in kmod's format under
//! `/lib/modules/<kver>`: `modules.dep`, `modules.alias` and `modules.builtin`. Removal,
//! module parameters and configuration files are not supported.

use crate::sys::System;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where the kernel says which release it is; joined to the root passed in.
pub const OSRELEASE: &str = "proc/sys/kernel/osrelease";

#[derive(Debug, thiserror::Error)]
pub enum ModprobeError {
    #[error("no module name given")]
    NoName,
    #[error("option {0} is not supported")]
    Unsupported(String),
    #[error("option {0} needs a value")]
    MissingValue(String),
    #[error("module parameters are not supported: {0}")]
    Params(String),
    #[error("read kernel release {0}")]
    Release(PathBuf, #[source] std::io::Error),
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("module {0} not found")]
    NotFound(String),
    #[error("load module {0}")]
    Load(PathBuf, #[source] std::io::Error),
}

/// A parsed command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub names: Vec<String>,
    /// `-q`: a name that resolves to nothing is not reported.
    pub quiet: bool,
    /// `-n`: resolve and print, load nothing.
    pub dry_run: bool,
    /// `-S`: kernel release instead of the running one.
    pub kver: Option<String>,
    /// `-d`: root directory instead of `/`.
    pub dirname: Option<PathBuf>,
}

/// Parses modprobe's arguments (without the program name). Without `-a` the first name is
/// the module and anything after it would be module parameters, which are refused. Flags
/// that change nothing here (`-b`, `-v`, `-s`, …) are accepted and ignored.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Request, ModprobeError> {
    let mut req = Request::default();
    let mut all = false;
    let mut rest = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            rest.extend(args.by_ref());
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            rest.push(arg);
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if arg.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |flag: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| ModprobeError::MissingValue(flag.into()))
        };
        match flag.as_str() {
            "-q" | "--quiet" => req.quiet = true,
            "-n" | "--dry-run" | "--show" => req.dry_run = true,
            "-a" | "--all" => all = true,
            "-S" | "--set-version" => req.kver = Some(value(&flag)?),
            "-d" | "--dirname" => req.dirname = Some(value(&flag)?.into()),
            "-C" | "--config" => {
                value(&flag)?;
            }
            "-r"
            | "--remove"
            | "--remove-dependencies"
            | "--show-depends"
            | "-D"
            | "-c"
            | "--showconfig" => return Err(ModprobeError::Unsupported(flag)),
            // Combined short flags such as `-qb`: take the ones that matter, refuse removal.
            f if !f.starts_with("--") && f.len() > 2 => {
                for c in f[1..].chars() {
                    match c {
                        'q' => req.quiet = true,
                        'n' => req.dry_run = true,
                        'a' => all = true,
                        'r' => return Err(ModprobeError::Unsupported("-r".into())),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if rest.is_empty() {
        return Err(ModprobeError::NoName);
    }
    if !all && rest.len() > 1 {
        return Err(ModprobeError::Params(rest[1..].join(" ")));
    }
    req.names = rest;
    Ok(req)
}

/// kmod's `alias_normalize`: `-` becomes `_` except inside `[...]`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_class = false;
    for c in name.chars() {
        match c {
            '[' => in_class = true,
            ']' => in_class = false,
            '-' if !in_class => {
                out.push('_');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The module name of a `modules.dep` path: `kernel/fs/overlayfs/overlay.ko.xz` → `overlay`.
pub(crate) fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalize(file.split(".ko").next().unwrap_or(file))
}

/// The text indexes of one `/lib/modules/<kver>` directory.
#[derive(Debug, Default)]
pub struct Index {
    /// Module name → (path, dependencies as written: dependents first, deepest last).
    pub deps: BTreeMap<String, (String, Vec<String>)>,
    /// `(normalised pattern, module)` in file order.
    pub aliases: Vec<(String, String)>,
    pub builtin: BTreeSet<String>,
}

impl Index {
    /// Reads `modules.dep` (required), `modules.alias` and `modules.builtin` (optional).
    pub fn read(moddir: &Path) -> Result<Self, ModprobeError> {
        let read = |name: &str, required: bool| {
            let path = moddir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(text),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(String::new())
                }
                Err(e) => Err(ModprobeError::Read(path, e)),
            }
        };
        let mut index = Index::default();
        for line in read("modules.dep", true)?.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(String::from).collect();
            index
                .deps
                .insert(name_of(path.trim()), (path.trim().to_owned(), deps));
        }
        for line in read("modules.alias", false)?.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(pattern), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                index.aliases.push((normalize(pattern), normalize(module)));
            }
        }
        for line in read("modules.builtin", false)?.lines() {
            if !line.trim().is_empty() {
                index.builtin.insert(name_of(line.trim()));
            }
        }
        Ok(index)
    }

    /// The modules a name or alias stands for, as kmod resolves it: a module of that name,
    /// else a built-in of that name, else every module whose alias pattern matches.
    /// Built-ins resolve to an empty list (nothing to load); no match at all is an error.
    pub fn resolve(&self, wanted: &str) -> Result<Vec<String>, ModprobeError> {
        let name = normalize(wanted);
        if self.deps.contains_key(&name) {
            return Ok(vec![name]);
        }
        if self.builtin.contains(&name) {
            return Ok(vec![]);
        }
        let mut found: Vec<String> = Vec::new();
        for (pattern, module) in &self.aliases {
            if fnmatch(pattern, &name) && !found.contains(module) {
                found.push(module.clone());
            }
        }
        if found.is_empty() {
            return Err(ModprobeError::NotFound(wanted.into()));
        }
        // An alias may name a built-in: matched, nothing to load.
        found.retain(|m| !self.builtin.contains(m) || self.deps.contains_key(m));
        Ok(found)
    }

    /// Paths (relative to the module directory, or absolute as written) to load for one
    /// module, dependencies first: `modules.dep` read right to left, then the module.
    pub fn load_order(&self, module: &str) -> Vec<&str> {
        match self.deps.get(module) {
            Some((path, deps)) => deps
                .iter()
                .rev()
                .map(String::as_str)
                .chain([path.as_str()])
                .collect(),
            None => vec![],
        }
    }
}

/// `fnmatch(3)` without flags, as kmod matches `modules.alias` patterns: `*` any run of
/// characters, `?` one character, `[...]` a class with ranges and `!`/`^` negation, `\`
/// escaping the next character. Written out by hand because it is this small; the single
/// remembered `*` position is enough because a later `*` can absorb whatever an earlier
/// one would have had to.
pub fn fnmatch(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi + 1, ti));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match class(&p[pi..], t[ti]) {
                Some((true, len)) => Some(len),
                Some((false, _)) => None,
                None => (t[ti] == '[').then_some(1),
            },
            Some('\\') if pi + 1 < p.len() => (p[pi + 1] == t[ti]).then_some(2),
            Some(&c) => (c == t[ti]).then_some(1),
            None => None,
        };
        match (step, star) {
            (Some(len), _) => {
                pi += len;
                ti += 1;
            }
            (None, Some((after_star, from))) => {
                pi = after_star;
                ti = from + 1;
                star = Some((after_star, from + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class opening `p` (which starts with `[`): whether it matched
/// and the class's length, or `None` when the class is not closed (then `[` is literal).
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *p.get(i)?;
        if lo == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&hi| hi != ']') {
            let hi = p[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
}

/// The running kernel's release, read under `root`.
pub fn kernel_release(root: &Path) -> Result<String, ModprobeError> {
    let path = root.join(OSRELEASE);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| ModprobeError::Release(path, e))
}

/// One kernel's module folder with its indexes read: stage 2 reads them once and loads
/// everything it loads at boot (K3s's modules, coldplug, the power button, fw_cfg) from
/// the same copy.
pub struct Modules {
    pub moddir: PathBuf,
    pub index: Index,
}

impl Modules {
    /// `<root>/lib/modules/<kver>` and its indexes.
    pub fn open(root: &Path, kver: &str) -> Result<Modules, ModprobeError> {
        let moddir = root.join("lib/modules").join(kver);
        let index = Index::read(&moddir)?;
        Ok(Modules { moddir, index })
    }

    /// The running kernel's modules.
    pub fn running(root: &Path) -> Result<Modules, ModprobeError> {
        Modules::open(root, &kernel_release(root)?)
    }

    /// [`probe`] from these indexes.
    pub fn probe(
        &self,
        sys: &mut dyn System,
        root: &Path,
        name: &str,
    ) -> Result<usize, ModprobeError> {
        probe_with(sys, root, &self.moddir, &self.index, name, false)
    }
}

/// Loads one name or alias and everything it needs from `<root>/lib/modules/<kver>`.
/// Already-loaded modules (EEXIST) count as done, built-ins need nothing. Returns how
/// many modules were inserted.
pub fn probe(
    sys: &mut dyn System,
    root: &Path,
    kver: &str,
    name: &str,
) -> Result<usize, ModprobeError> {
    Modules::open(root, kver)?.probe(sys, root, name)
}

/// [`probe`] with the indexes of `moddir` already read, for loading many names.
pub fn probe_with(
    sys: &mut dyn System,
    root: &Path,
    moddir: &Path,
    index: &Index,
    name: &str,
    dry_run: bool,
) -> Result<usize, ModprobeError> {
    let mut loaded = 0;
    let mut done = BTreeSet::new();
    for module in index.resolve(name)? {
        for rel in index.load_order(&module) {
            if !done.insert(rel.to_owned()) {
                continue;
            }
            let path = match rel.strip_prefix('/') {
                Some(abs) => root.join(abs),
                None => moddir.join(rel),
            };
            if dry_run {
                println!("insmod {}", path.display());
                continue;
            }
            match sys.load_module(&path) {
                Ok(()) => loaded += 1,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(ModprobeError::Load(path, e)),
            }
        }
    }
    Ok(loaded)
}

/// modprobe's whole run: arguments in, modules loaded from under `root`.
pub fn run(sys: &mut dyn System, root: &Path, args: Vec<String>) -> Result<usize, ModprobeError> {
    let req = parse_args(args)?;
    let root = req.dirname.clone().unwrap_or_else(|| root.to_path_buf());
    let kver = match &req.kver {
        Some(k) => k.clone(),
        None => kernel_release(&root)?,
    };
    let moddir = root.join("lib/modules").join(&kver);
    let index = Index::read(&moddir)?;
    let mut loaded = 0;
    for name in &req.names {
        loaded += probe_with(sys, &root, &moddir, &index, name, req.dry_run)?;
    }
    Ok(loaded)
}

/// Entry point when called as `modprobe`: exit status 0 on success, 1 on failure, with
/// the error chain on stderr (a not-found name stays silent under `-q`, as kmod's).
pub fn main(args: Vec<String>) -> std::process::ExitCode {
    let quiet = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-q" || a == "--quiet");
    match run(&mut crate::sys::Real, Path::new("/"), args) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(ModprobeError::NotFound(_)) if quiet => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("modprobe: {}", crate::pid1::console::chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, Recording};
    use nix::errno::Errno;

    const KVER: &str = "6.1.0-1";

    /// A root with `/lib/modules/<kver>` indexes and `/proc/sys/kernel/osrelease`.
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let moddir = dir.path().join("lib/modules").join(KVER);
        std::fs::create_dir_all(&moddir).expect("mkdir");
        let write = |name: &str, text: &str| std::fs::write(moddir.join(name), text).expect(name);
        write(
            "modules.dep",
            "kernel/net/bridge/br_netfilter.ko: kernel/net/bridge/bridge.ko kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
             kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
             kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n\
             kernel/net/llc/llc.ko:\n\
             kernel/fs/overlayfs/overlay.ko:\n\
             kernel/net/netfilter/nf-conntrack-ftp.ko: kernel/net/netfilter/nf_conntrack.ko\n\
             kernel/net/netfilter/nf_conntrack.ko:\n",
        );
        write(
            "modules.alias",
            "# Aliases extracted from modules themselves.\n\
             alias fs-overlay overlay\n\
             alias net-pf-7 bridge\n\
             alias nf-conntrack-helper-ftp-* nf_conntrack_ftp\n\
             alias fs-ext4 ext4\n",
        );
        write("modules.builtin", "kernel/fs/ext4/ext4.ko\n");
        let proc = dir.path().join("proc/sys/kernel");
        std::fs::create_dir_all(&proc).expect("mkdir");
        std::fs::write(proc.join("osrelease"), format!("{KVER}\n")).expect("osrelease");
        dir
    }

    fn loads(root: &Path, rels: &[&str]) -> Vec<Call> {
        let moddir = root.join("lib/modules").join(KVER);
        rels.iter()
            .map(|r| Call::LoadModule(moddir.join(r)))
            .collect()
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_name_loads_its_dependencies_deepest_first_then_itself() {
        let root = fixture();
        let mut sys = Recording::default();
        let n = run(&mut sys, root.path(), args(&["br_netfilter"])).expect("loads");
        assert_eq!(n, 4);
        assert_eq!(
            sys.calls,
            loads(
                root.path(),
                &[
                    "kernel/net/llc/llc.ko",
                    "kernel/net/802/stp.ko",
                    "kernel/net/bridge/bridge.ko",
                    "kernel/net/bridge/br_netfilter.ko"
                ]
            )
        );
    }

    #[test]
    fn the_kernels_request_resolves_an_alias_and_glob_with_dashes_normalised() {
        let root = fixture();
        let mut sys = Recording::default();
        run(
            &mut sys,
            root.path(),
            args(&["-q", "--", "nf-conntrack-helper-ftp-21"]),
        )
        .expect("loads");
        assert_eq!(
            sys.calls,
            loads(
                root.path(),
                &[
                    "kernel/net/netfilter/nf_conntrack.ko",
                    "kernel/net/netfilter/nf-conntrack-ftp.ko"
                ]
            )
        );
    }

    #[test]
    fn already_loaded_modules_are_skipped_and_builtins_need_nothing() {
        let root = fixture();
        let llc = root
            .path()
            .join("lib/modules")
            .join(KVER)
            .join("kernel/net/llc/llc.ko");
        let mut sys = Recording {
            failing_modules: vec![(llc, Errno::EEXIST)],
            ..Default::default()
        };
        let n = run(
            &mut sys,
            root.path(),
            args(&["-a", "stp", "ext4", "fs-ext4"]),
        )
        .expect("ok");
        assert_eq!(n, 1);
        assert_eq!(sys.calls.len(), 2, "{:?}", sys.calls);
    }

    #[test]
    fn an_unknown_name_is_not_found_and_a_load_failure_names_the_file() {
        let root = fixture();
        let err = run(
            &mut Recording::default(),
            root.path(),
            args(&["-q", "ghost"]),
        )
        .expect_err("unknown");
        assert!(
            matches!(&err, ModprobeError::NotFound(n) if n == "ghost"),
            "{err:?}"
        );

        let overlay = root
            .path()
            .join("lib/modules")
            .join(KVER)
            .join("kernel/fs/overlayfs/overlay.ko");
        let mut sys = Recording {
            failing_modules: vec![(overlay.clone(), Errno::ENOEXEC)],
            ..Default::default()
        };
        let err = run(&mut sys, root.path(), args(&["fs-overlay"])).expect_err("fails");
        assert!(
            matches!(&err, ModprobeError::Load(p, _) if *p == overlay),
            "{err:?}"
        );
    }

    #[test]
    fn a_missing_modules_dep_is_named() {
        let root = fixture();
        std::fs::remove_file(
            root.path()
                .join("lib/modules")
                .join(KVER)
                .join("modules.dep"),
        )
        .expect("rm");
        let err =
            probe(&mut Recording::default(), root.path(), KVER, "overlay").expect_err("no index");
        assert!(err.to_string().contains("modules.dep"), "{err}");
    }

    #[test]
    fn arguments_are_parsed_like_modprobes() {
        let ok = |a: &[&str]| parse_args(args(a)).expect("parses");
        assert_eq!(
            ok(&["-q", "--", "-weird-alias"]),
            Request {
                names: args(&["-weird-alias"]),
                quiet: true,
                ..Default::default()
            }
        );
        let r = ok(&["-b", "-v", "-qa", "-S", "6.2", "--dirname=/x", "a", "b"]);
        assert_eq!(r.names, args(&["a", "b"]));
        assert!(r.quiet);
        assert_eq!(r.kver.as_deref(), Some("6.2"));
        assert_eq!(r.dirname, Some(PathBuf::from("/x")));

        let err = |a: &[&str]| parse_args(args(a)).expect_err("refused");
        assert!(matches!(err(&["-r", "overlay"]), ModprobeError::Unsupported(f) if f == "-r"));
        assert!(matches!(
            err(&["-qr", "overlay"]),
            ModprobeError::Unsupported(_)
        ));
        assert!(matches!(err(&["-q"]), ModprobeError::NoName));
        assert!(matches!(err(&["-S"]), ModprobeError::MissingValue(_)));
        assert!(matches!(err(&["overlay", "x=1"]), ModprobeError::Params(p) if p == "x=1"));
    }

    #[test]
    fn fnmatch_handles_stars_marks_classes_and_escapes() {
        let cases = [
            ("fs-overlay", "fs-overlay", true),
            ("fs-overlay", "fs-overlayx", false),
            (
                "pci:v00008086d*sv*sd*bc02sc00i*",
                "pci:v00008086d000010D3sv1sd2bc02sc00i00",
                true,
            ),
            (
                "pci:v00008086d*sv*sd*bc02sc00i*",
                "pci:v00008086d000010D3sv1sd2bc03sc00i00",
                false,
            ),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYcZ", false),
            ("char-major-10-2??", "char-major-10-229", true),
            ("char-major-10-2??", "char-major-10-2290", false),
            ("x[0-9]y", "x5y", true),
            ("x[!0-9]y", "x5y", false),
            ("x[^a]y", "xby", true),
            ("x[]]y", "x]y", true),
            ("x[a-]y", "x-y", true),
            ("x[ab", "x[ab", true),
            ("x\\*", "x*", true),
            ("x\\*", "xy", false),
            ("*", "", true),
            ("", "a", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(fnmatch(pattern, text), want, "{pattern} vs {text}");
        }
    }

    #[test]
    fn normalize_keeps_dashes_inside_classes() {
        assert_eq!(normalize("nf-ct-[a-z]-x"), "nf_ct_[a-z]_x");
    }
}
