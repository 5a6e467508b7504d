//! The layering holds: no import cycle between the top-level modules of either library, the
//! pool knows nothing of the proxy, the session engine or the HTTP API, and the daemon crate
//! never depends on the tooling. Read from the source, so it runs without building anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module -> the top-level modules it names through `crate::` (outside comments).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue; // the crate root wires everything
        }
        let deps = g.entry(module.clone()).or_default();
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let code = line.split("//").next().unwrap();
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                    // `use crate::{a, b::c}`: the first segment of each item.
                    group.split('}').next().unwrap().split(',').map(|s| s.trim().split("::").next().unwrap()).collect()
                } else {
                    vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap()]
                };
                for name in names {
                    let is_module = src.join(format!("{name}.rs")).exists() || src.join(name).is_dir();
                    if is_module && name != module {
                        deps.insert(name.to_string());
                    }
                }
            }
        }
    }
    g
}

/// A cycle, if the graph has one, as the path that closes it.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    for krate in ["crates/meshgate/src", "crates/meshgate-tools/src"] {
        let g = graph(&Path::new(ROOT).join(krate));
        assert!(g.len() > 4, "{krate}: modules found: {g:?}");
        if let Some(c) = cycle(&g) {
            panic!("{krate}: import cycle {}\n{g:#?}", c.join(" -> "));
        }
    }
}

#[test]
fn the_pool_knows_nothing_of_what_uses_it() {
    let g = graph(&Path::new(ROOT).join("crates/meshgate/src"));
    let pool = &g["pool"];
    for above in ["durable", "proxy", "http", "health", "replication", "coordination", "upstream", "transport"] {
        assert!(!pool.contains(above), "pool imports {above}: {pool:?}");
    }
    // Replication follows leadership through a watch it is handed; it never asks etcd itself.
    assert!(!g["replication"].contains("coordination"), "replication imports coordination: {:?}", g["replication"]);
    for (module, deps) in [("mqtt", &g["mqtt"]), ("transport", &g["transport"])] {
        for above in ["pool", "proxy", "durable", "http", "upstream"] {
            assert!(!deps.contains(above), "{module} imports {above}: {deps:?}");
        }
    }
}

#[test]
fn the_daemon_never_depends_on_the_tooling() {
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("crates/meshgate/Cargo.toml")).unwrap();
    assert!(!manifest.contains("meshgate-tools"), "crates/meshgate/Cargo.toml names the tooling");
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("crates/meshgate/src"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains("meshgate_tools"), "{} names the tooling", f.display());
    }
}
