//! The crate layout the brief and `docs/architecture.md` promise, checked on the sources themselves:
//! dependencies between Kiln's crates point one way (frontend → ir ← passes, codegen → ir, the runtime
//! never reaches a frontend, LLVM/MLIR only in codegen); no module of a crate depends, through its
//! `crate::`/`super::` references, on a module that depends back on it; and the CLI crate (`src/`)
//! stays a thin layer over the driver library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `[dependencies]` (not dev-dependencies) of a Cargo.toml, by name.
fn dependencies(manifest: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(manifest).unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
    let mut deps = BTreeSet::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[dependencies]";
            continue;
        }
        if inside {
            if let Some((name, _)) = line.split_once('=') {
                let name = name.trim();
                if !name.is_empty() && !name.starts_with('#') {
                    deps.insert(name.split('.').next().unwrap().to_string());
                }
            }
        }
    }
    deps
}

/// The crates of the workspace: (package directory, its kiln-* dependencies, all its dependencies).
fn crates() -> BTreeMap<&'static str, BTreeSet<String>> {
    let dirs = [
        ("kiln", "."),
        ("kiln-ir", "ir"),
        ("kiln-frontend", "frontend"),
        ("kiln-passes", "passes"),
        ("kiln-codegen", "codegen"),
        ("kiln-runtime", "runtime"),
        ("kiln-driver", "driver"),
        ("kiln-capi", "capi"),
        ("kiln-build", "kiln-build"),
    ];
    dirs.iter().map(|(name, dir)| (*name, dependencies(&root().join(dir).join("Cargo.toml")))).collect()
}

#[test]
fn crate_dependencies_point_one_way() {
    let crates = crates();
    let kiln = |c: &str| -> BTreeSet<String> { crates[c].iter().filter(|d| d.starts_with("kiln-")).cloned().collect() };
    let set = |xs: &[&str]| -> BTreeSet<String> { xs.iter().map(|s| s.to_string()).collect() };
    assert_eq!(kiln("kiln-ir"), set(&[]), "ir depends on no other Kiln crate");
    assert_eq!(kiln("kiln-frontend"), set(&["kiln-ir"]));
    assert_eq!(kiln("kiln-passes"), set(&["kiln-ir"]));
    assert_eq!(kiln("kiln-codegen"), set(&["kiln-ir"]));
    assert_eq!(kiln("kiln-runtime"), set(&["kiln-ir"]), "the runtime never depends on a frontend");
    assert_eq!(kiln("kiln-capi"), set(&["kiln-ir", "kiln-runtime"]), "the C ABI runtime links no LLVM");
    assert!(
        kiln("kiln-driver").is_superset(&set(&[
            "kiln-ir",
            "kiln-frontend",
            "kiln-passes",
            "kiln-codegen",
            "kiln-runtime"
        ])),
        "{:?}",
        kiln("kiln-driver")
    );
    assert!(!kiln("kiln-driver").contains("kiln"), "the driver is below the CLI");
    for (name, deps) in &crates {
        for heavy in ["inkwell", "melior", "mlir-sys", "llvm-sys"] {
            assert!(
                *name == "kiln-codegen" || !deps.contains(heavy),
                "{name} depends on {heavy}: LLVM/MLIR stay inside kiln-codegen"
            );
        }
    }
}

/// `src` without comments, string contents and `#[cfg(test)]` modules (a test may reach anywhere).
fn code_of(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b: Vec<char> = src.chars().collect();
    let mut i = 0;
    while i < b.len() {
        if b[i] == '/' && b.get(i + 1) == Some(&'/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if b[i] == '/' && b.get(i + 1) == Some(&'*') {
            while i + 1 < b.len() && !(b[i] == '*' && b[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                i += if b[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == '\'' && b.get(i + 2) == Some(&'\'') {
            // A char literal such as '{' must not count as a brace.
            i += 3;
        } else if b[i] == '\'' && b.get(i + 1) == Some(&'\\') {
            i += 2;
            while i < b.len() && b[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    // Drop `#[cfg(test)] mod NAME { … }` blocks by brace matching.
    let mut code = out;
    while let Some(at) = code.find("#[cfg(test)]") {
        let rest = &code[at..];
        let Some(open) = rest.find('{') else { break };
        let header = &rest[..open];
        if !header.contains("mod ") {
            code.replace_range(at..at + "#[cfg(test)]".len(), "");
            continue;
        }
        let mut depth = 0;
        let mut end = rest.len();
        for (j, c) in rest[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        code.replace_range(at..at + end, "");
    }
    code
}

/// The module path (`a::b`, "" for the crate root) of each source file under `src`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, src, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).unwrap().with_extension("");
                let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
                if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                    parts.pop();
                }
                out.insert(parts.join("::"), p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The longest known module prefix of `path` (`a::b::Item` → `a::b`).
fn resolve(path: &[&str], mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| mods.contains_key(m))
}

/// Paths after `prefix::` in `code`, with `{a, b::c}` groups expanded to their first segments' paths.
fn referenced(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let pat = format!("{prefix}::");
    let mut from = 0;
    while let Some(at) = code[from..].find(&pat) {
        let start = from + at;
        from = start + pat.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[from..];
        let mut segs: Vec<String> = Vec::new();
        let mut r = rest;
        loop {
            let ident: String = r.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if ident.is_empty() {
                break;
            }
            segs.push(ident.clone());
            r = &r[ident.len()..];
            if let Some(next) = r.strip_prefix("::") {
                r = next;
            } else {
                break;
            }
        }
        if r.starts_with('{') {
            let mut depth = 0;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in r.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        if depth == 1 {
                            continue;
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            items.push(std::mem::take(&mut item));
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        items.push(std::mem::take(&mut item));
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            for it in items {
                let mut p = segs.clone();
                p.extend(
                    it.trim()
                        .split("::")
                        .map(|s| s.trim().to_string())
                        .take_while(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')),
                );
                out.push(p);
            }
        } else {
            out.push(segs);
        }
    }
    out
}

/// Module → modules it refers to (neither its ancestors nor its descendants: a parent declares and
/// re-exports its children, a child may name the parent's re-exports).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, file) in &mods {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let me: Vec<&str> = if m.is_empty() { vec![] } else { m.split("::").collect() };
        // `super` is the parent module (for `a/mod.rs` as for `a.rs`).
        let parent: Vec<&str> = if me.is_empty() { vec![] } else { me[..me.len() - 1].to_vec() };
        let mut targets = Vec::new();
        for p in referenced(&code, "crate") {
            targets.push(p);
        }
        for p in referenced(&code, "super") {
            let mut full: Vec<String> = parent.iter().map(|s| s.to_string()).collect();
            full.extend(p);
            targets.push(full);
        }
        let edges = g.entry(m.clone()).or_default();
        for t in targets {
            let t: Vec<&str> = t.iter().map(String::as_str).collect();
            if let Some(target) = resolve(&t, &mods) {
                let related = target == *m
                    || m.starts_with(&format!("{target}::"))
                    || target.starts_with(&format!("{m}::"))
                    || target.is_empty()
                    || m.is_empty();
                if !related {
                    edges.insert(target);
                }
            }
        }
    }
    g
}

/// The first cycle found in `g`, as the modules along it.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(v.to_string(), 1);
        stack.push(v.to_string());
        for w in g.get(v).into_iter().flatten() {
            match state.get(w.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == w).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(w.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(w, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(v.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for v in g.keys() {
        if state.get(v.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(v, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_cycles_inside_a_crate() {
    for dir in ["ir", "frontend", "passes", "codegen", "runtime", "driver"] {
        let g = module_graph(&root().join(dir).join("src"));
        assert!(g.len() > 3, "{dir}: only {} modules found", g.len());
        if let Some(c) = find_cycle(&g) {
            panic!("{dir}/src: modules depend on each other in a cycle: {}", c.join(" → "));
        }
    }
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // The checker itself, on a crate made for it: a → b → a through `use crate::` and `super::`.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("k")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod k;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::k::{b::B, c};\n// crate::nothing\n").unwrap();
    std::fs::write(src.join("k/mod.rs"), "pub mod b;\npub mod c;\n").unwrap();
    std::fs::write(src.join("k/b.rs"), "pub struct B;\nfn f() { super::c::g() }\n").unwrap();
    std::fs::write(src.join("k/c.rs"), "pub fn g() { let _ = crate::a::X; }\n").unwrap();
    let g = module_graph(&src);
    assert_eq!(g["a"], ["k::b".to_string(), "k::c".to_string()].into());
    assert_eq!(g["k::b"], ["k::c".to_string()].into());
    let c = find_cycle(&g).expect("a → k::c → a");
    assert!(c.contains(&"a".to_string()) && c.contains(&"k::c".to_string()), "{c:?}");
    // A comment or a test module is not a dependency.
    std::fs::write(src.join("k/c.rs"), "// crate::a\n#[cfg(test)]\nmod tests { use crate::a; }\n").unwrap();
    assert_eq!(find_cycle(&module_graph(&src)), None);
}

#[test]
fn the_cli_crate_stays_thin() {
    let mut lines = 0;
    for e in std::fs::read_dir(root().join("src")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rs") {
            lines += std::fs::read_to_string(&p).unwrap().lines().count();
        }
    }
    assert!(lines < 2000, "src/ has {lines} lines: library logic belongs in kiln-driver");
}
