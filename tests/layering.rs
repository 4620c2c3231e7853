//! The dependency rule of `src/`, checked: which top-level module may name
//! which (README, "Architecture"). Reads the source; no database.
//!
//! Leaves (`protocol`, `vocab`, `sql`, `config`, `net`, `convert`) name nothing above them;
//! `pool` never names `client`, `routing`, `admin` or `server`; `routing`
//! never names `client` or `admin`; the live state never names its readers
//! or writers (`client`, `admin`); `admin` never names `client`. And no
//! import cycle of any length between top-level modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `module -> modules it must not name`.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("protocol", &["admin", "auth", "client", "config", "pool", "reload", "routing", "server", "tls", "net"]),
    ("vocab", &["admin", "auth", "client", "config", "pool", "protocol", "reload", "routing", "server", "tls", "net"]),
    ("pool", &["admin", "client", "routing", "server", "reload", "demo"]),
    ("routing", &["admin", "client", "server", "reload", "demo"]),
    ("config", &["admin", "auth", "client", "live", "pool", "reload", "routing", "server", "settings", "tls", "net"]),
    ("net", &["admin", "auth", "client", "config", "live", "pool", "reload", "routing", "server", "settings", "tls"]),
    (
        "convert",
        &[
            "admin", "auth", "client", "config", "live", "net", "pool", "reload", "routing", "server", "settings",
            "sql", "tls",
        ],
    ),
    (
        "sql",
        &["admin", "auth", "client", "config", "live", "net", "pool", "reload", "routing", "server", "settings", "tls"],
    ),
    ("live", &["admin", "client", "server", "demo"]),
    ("admin", &["client", "server", "demo"]),
];

/// Every `crate::<module>` a module's non-test code names, by top-level module.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may reach anywhere; the rule is about the product.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            let names = out.entry(top.clone()).or_default();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let rest = &line[i + "crate::".len()..];
                    let group = rest.strip_prefix('{').map(|g| g.split('}').next().unwrap_or(g));
                    let firsts: Vec<&str> = match group {
                        Some(g) => g.split(',').map(|p| p.trim().split("::").next().unwrap_or("")).collect(),
                        None => vec![rest.split(|c: char| !c.is_alphanumeric() && c != '_').next().unwrap_or("")],
                    };
                    names.extend(firsts.into_iter().filter(|m| !m.is_empty() && *m != top).map(str::to_owned));
                }
            }
        }
    }
    out
}

#[test]
fn modules_import_only_downwards() {
    let imports = imports();
    assert!(imports.contains_key("pool") && imports.contains_key("client"), "did not find src/: {imports:?}");
    let mut broken = Vec::new();
    for (module, forbidden) in FORBIDDEN {
        for name in imports.get(*module).into_iter().flatten() {
            if forbidden.contains(&name.as_str()) {
                broken.push(format!("{module} names {name}"));
            }
        }
    }
    assert!(broken.is_empty(), "imports against the dependency rule: {broken:?}");
}

#[test]
fn no_import_cycles() {
    let imports = imports();
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit<'a>(
        m: &'a str,
        imports: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| *p == m) {
            cycles.push(format!("{} -> {m}", path[i..].join(" -> ")));
            return;
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for next in imports.get(m).into_iter().flatten() {
            visit(next, imports, path, done, cycles);
        }
        path.pop();
    }
    let (mut path, mut done, mut cycles) = (Vec::new(), BTreeSet::new(), Vec::new());
    for m in imports.keys() {
        visit(m, &imports, &mut path, &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:?}");
}
