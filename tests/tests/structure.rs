//! The shape of the code, checked: the rules ARCHITECTURE.md states about
//! which file may import which, read from the sources themselves.
//!
//! Each crate's files become a graph: an edge from a file to every file whose
//! items it `use`s (re-exports in a folder's `mod.rs` are followed to the
//! file that defines the item, so importing `crate::scan::ScanError` is an
//! edge to `scan/error.rs`, not to the whole folder). Then:
//!
//! - no import circle between files, in any crate;
//! - the shared library never imports its CLI module;
//! - the trainer never imports `pleura::cli`;
//! - no worker file imports from the worker's `lib.rs`;
//! - `registry` knows nothing of `config::Settings`;
//! - no source file is much over 1,200 lines.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The source roots of the workspace's crates: (name, `src` folder, root file).
fn crates() -> Vec<(&'static str, PathBuf, &'static str)> {
    let ws = workspace();
    vec![
        ("pleura", ws.join("src"), "lib.rs"),
        ("pleura-worker", ws.join("worker/src"), "lib.rs"),
        ("pleura-trainer", ws.join("trainer/src"), "lib.rs"),
        ("pleura-phantom", ws.join("trainer/phantom/src"), "lib.rs"),
        ("pleura-tests", ws.join("tests/src"), "lib.rs"),
    ]
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A crate's files by module path (`["scan", "dicom"]` for `scan/dicom/mod.rs`).
struct Crate {
    root: PathBuf,
    modules: BTreeMap<Vec<String>, PathBuf>,
}

impl Crate {
    fn load(src: &Path, root_file: &str) -> Crate {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let mut modules = BTreeMap::new();
        for f in files {
            let rel = f.strip_prefix(src).unwrap();
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let last = parts.pop().unwrap();
            if parts.first().is_some_and(|p| p == "bin") {
                continue; // binaries are crates of their own
            }
            match last.as_str() {
                "mod.rs" => {}
                l if l == root_file && parts.is_empty() => {}
                "main.rs" if parts.is_empty() => continue,
                l => parts.push(l.trim_end_matches(".rs").to_string()),
            }
            modules.insert(parts, f);
        }
        Crate {
            root: src.join(root_file),
            modules,
        }
    }

    fn module_of(&self, file: &Path) -> Vec<String> {
        self.modules
            .iter()
            .find(|(_, f)| f.as_path() == file)
            .map(|(m, _)| m.clone())
            .expect("file is a module")
    }

    /// The file an item path resolves to, following `pub use` re-exports in
    /// the module it names; `None` outside this crate.
    fn resolve(&self, path: &[String], depth: usize) -> Option<PathBuf> {
        // The longest prefix that is a module of this crate.
        let (module, rest) = (0..=path.len()).rev().find_map(|n| {
            self.modules
                .get(&path[..n])
                .map(|_| (&path[..n], &path[n..]))
        })?;
        let file = self.modules[module].clone();
        let Some(item) = rest.first() else {
            return Some(file);
        };
        if depth > 8 {
            return Some(file);
        }
        // A re-export of `item` in that module: follow it.
        for re in pub_uses(&file) {
            if re.last() == Some(item) {
                if let Some(abs) = absolute(module, &file, &re) {
                    if abs != path {
                        return self.resolve(&abs, depth + 1).or(Some(file));
                    }
                }
            }
        }
        Some(file)
    }
}

/// Expands a use tree (`a::{b, c::{d, e}}`) into flat paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let prefix = tree[..open].trim_end_matches("::").trim();
        let inner = &tree[open + 1..tree.rfind('}').expect("closing brace")];
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&inner[start..]);
        parts
            .into_iter()
            .filter(|p| !p.trim().is_empty())
            .flat_map(|p| {
                expand(p).into_iter().map(|mut tail| {
                    let mut full: Vec<String> = if prefix.is_empty() {
                        Vec::new()
                    } else {
                        prefix.split("::").map(|s| s.trim().to_string()).collect()
                    };
                    if tail.first().is_some_and(|s| s == "self") {
                        tail.remove(0);
                    }
                    full.extend(tail);
                    full
                })
            })
            .collect()
    } else {
        let path = tree.split(" as ").next().unwrap().trim();
        vec![path.split("::").map(|s| s.trim().to_string()).collect()]
    }
}

/// A `use` statement: whether it is a `pub` re-export, the inline modules
/// it sits in (`["tests"]` inside `mod tests { ... }`), and one expanded path.
struct Use {
    public: bool,
    inline: Vec<String>,
    path: Vec<String>,
}

/// The `use` statements of a file. Inline modules are followed by their
/// indentation, which rustfmt keeps: `mod x {` opens one, and a `}` at the
/// same indentation closes it.
fn uses(file: &Path) -> Vec<Use> {
    let text = std::fs::read_to_string(file).expect("read source");
    let mut out = Vec::new();
    let mut inline: Vec<(usize, String)> = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let indent = line.len() - line.trim_start().len();
        let l = line.trim_start();
        if inline.last().is_some_and(|(i, _)| *i == indent && l == "}") {
            inline.pop();
            continue;
        }
        let declared = l
            .strip_prefix("pub(crate) ")
            .or_else(|| l.strip_prefix("pub "))
            .unwrap_or(l);
        if let Some(name) = declared
            .strip_prefix("mod ")
            .and_then(|r| r.strip_suffix(" {"))
        {
            inline.push((indent, name.trim().to_string()));
            continue;
        }
        let (public, rest) = if let Some(r) = l.strip_prefix("use ") {
            (false, r)
        } else if let Some(r) = l.strip_prefix("pub use ") {
            (true, r)
        } else if let Some(r) = l.strip_prefix("pub(crate) use ") {
            (true, r)
        } else if let Some(r) = l.strip_prefix("pub(super) use ") {
            (true, r)
        } else {
            continue;
        };
        // Not a statement but prose that happens to start with "use" (in a
        // string or a comment's continuation).
        if rest.contains('"')
            || !rest.starts_with(|c: char| c.is_alphabetic() || c == '{' || c == ':')
        {
            continue;
        }
        let mut stmt = rest.to_string();
        while !stmt.contains(';') {
            match lines.next() {
                Some(more) => stmt.push_str(more.trim()),
                None => break,
            }
        }
        let stmt = stmt.split(';').next().unwrap();
        for path in expand(stmt) {
            out.push(Use {
                public,
                inline: inline.iter().map(|(_, n)| n.clone()).collect(),
                path,
            });
        }
    }
    out
}

fn pub_uses(file: &Path) -> Vec<Vec<String>> {
    uses(file)
        .into_iter()
        .filter(|u| u.public && u.inline.is_empty())
        .map(|u| u.path)
        .collect()
}

/// A use path made absolute from `module` (the module of `file`); `None`
/// for paths into other crates or the standard library.
fn absolute(module: &[String], file: &Path, path: &[String]) -> Option<Vec<String>> {
    let mut segs = path.iter();
    let first = segs.next()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.to_vec(),
        "super" => {
            let mut m = module.to_vec();
            m.pop();
            m
        }
        // A sibling or child module named without `self::` (2018 paths).
        name if child_exists(file, name) => {
            let mut m = module.to_vec();
            m.push(name.to_string());
            return Some(m.into_iter().chain(segs.cloned()).collect());
        }
        _ => return None,
    };
    for s in segs {
        if s == "super" {
            base.pop();
        } else {
            base.push(s.clone());
        }
    }
    Some(base)
}

/// Whether `file` declares a child module `name`.
fn child_exists(file: &Path, name: &str) -> bool {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines().any(|l| {
        let l = l.trim();
        l == format!("mod {name};")
            || l == format!("pub mod {name};")
            || l == format!("pub(crate) mod {name};")
    })
}

/// The import graph of one crate: file -> files it imports from.
fn graph(krate: &Crate) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut g = BTreeMap::new();
    for file in krate.modules.values() {
        let module = krate.module_of(file);
        let mut targets = BTreeSet::new();
        for u in uses(file) {
            if u.public {
                continue; // re-exports are followed, not counted
            }
            let mut within = module.clone();
            within.extend(u.inline);
            let Some(abs) = absolute(&within, file, &u.path) else {
                continue;
            };
            if let Some(target) = krate.resolve(&abs, 0) {
                // An inline module (`mod tests`) importing its own file.
                if &target != file {
                    targets.insert(target);
                }
            }
        }
        g.insert(file.clone(), targets);
    }
    g
}

fn find_cycle(g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        n: &PathBuf,
        g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        marks: &mut HashMap<PathBuf, Mark>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let at = stack.iter().position(|s| s == n).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(n.clone());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(n.clone(), Mark::Open);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(n.clone(), Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn short(p: &Path) -> String {
    p.strip_prefix(workspace())
        .unwrap_or(p)
        .display()
        .to_string()
}

#[test]
fn no_file_imports_in_a_circle() {
    for (name, src, root) in crates() {
        let krate = Crate::load(&src, root);
        let g = graph(&krate);
        if let Some(cycle) = find_cycle(&g) {
            let path: Vec<String> = cycle.iter().map(|p| short(p)).collect();
            panic!("{name}: import circle {}", path.join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_a_circle_when_there_is_one() {
    // The same resolver on a small made-up crate: a -> b -> a.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\npub use b::Thing;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::Thing;\npub struct Other;\n").unwrap();
    std::fs::write(
        src.join("b.rs"),
        "use super::a::{self, Other};\npub struct Thing;\n",
    )
    .unwrap();
    let krate = Crate::load(src, "lib.rs");
    let g = graph(&krate);
    assert_eq!(g[&src.join("a.rs")], BTreeSet::from([src.join("b.rs")]));
    assert!(find_cycle(&g).is_some(), "{g:?}");
    // Break it: b no longer imports a. Its inline test module's `super` is
    // b itself, not the crate root.
    std::fs::write(
        src.join("b.rs"),
        "pub struct Thing;\n\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
    )
    .unwrap();
    let g = graph(&Crate::load(src, "lib.rs"));
    assert!(g[&src.join("b.rs")].is_empty(), "{g:?}");
    assert!(find_cycle(&g).is_none());
}

#[test]
fn the_library_never_imports_its_cli_and_the_trainer_never_imports_it_either() {
    let ws = workspace();
    let krate = Crate::load(&ws.join("src"), "lib.rs");
    let cli = ws.join("src/cli");
    for (file, targets) in graph(&krate) {
        if file.starts_with(&cli) {
            continue;
        }
        for t in targets {
            assert!(
                !t.starts_with(&cli),
                "{} imports the CLI ({})",
                short(&file),
                short(&t)
            );
        }
    }
    let mut trainer = Vec::new();
    rust_files(&ws.join("trainer"), &mut trainer);
    for f in trainer {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("pleura::cli"),
            "{} uses pleura::cli",
            short(&f)
        );
    }
}

#[test]
fn no_worker_file_imports_from_the_worker_lib() {
    let krate = Crate::load(&workspace().join("worker/src"), "lib.rs");
    for (file, targets) in graph(&krate) {
        assert!(
            !targets.contains(&krate.root),
            "{} imports from worker/src/lib.rs; lib.rs is only the layout and run()",
            short(&file)
        );
    }
}

#[test]
fn the_registry_knows_nothing_of_the_settings() {
    let ws = workspace();
    let mut files = Vec::new();
    rust_files(&ws.join("src/registry"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("config::") && !text.contains("Settings"),
            "{} refers to the settings; the edges (CLI, worker, trainer) map settings \
             onto registry types instead",
            short(&f)
        );
    }
}

#[test]
fn no_source_file_is_much_over_1200_lines() {
    let ws = workspace();
    let mut files = Vec::new();
    for dir in ["src", "worker", "trainer", "tests"] {
        rust_files(&ws.join(dir), &mut files);
    }
    for f in files {
        let n = std::fs::read_to_string(&f).unwrap().lines().count();
        assert!(
            n <= 1250,
            "{} has {n} lines; split it by concern",
            short(&f)
        );
    }
}
