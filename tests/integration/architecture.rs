//! The layering of `src/`, as a test: each module may import (`crate::…`) only modules of lower
//! layers. The table is the one in `src/lib.rs`'s map; `DEBTS` lists the imports that still break
//! it, each with what fixing it takes, so that no new one comes in unnoticed and each one fixed
//! must leave the list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top. A module may use any module of a lower layer, never one of its own layer or
/// above (so there are no cycles).
const LAYERS: &[&[&str]] = &[
    &["failpoint", "tls"],
    &["config"],
    // The simulator shares no code with the client: it uses only its `[sim]` section of the
    // configuration, below every stage.
    &["sim"],
    &["output"],
    &["ingest"],
    &["plan"],
    &["normalize"],
    &["state"],
    // Two stages side by side: neither knows the other; the pipeline drives them together.
    &["submit", "collect"],
    &["write"],
    &["report"],
    &["fuzzing"],
    &["error"],
    &["logging"],
    &["pipeline"],
];

/// Imports that break the layering today: (module, module it uses, what fixing it takes).
const DEBTS: &[(&str, &str, &str)] = &[];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a file under `src/` belongs to (`lib.rs` and `main.rs` are the top).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// The top-level modules `text` imports: `crate::x…` in `use` lines and paths, and `crate::{x, …}`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    // `crate::Error` and `crate::Result` are the crate error's.
    let names: BTreeSet<String> = out
        .into_iter()
        .map(|n| match n.as_str() {
            "Error" | "Result" => "error".to_owned(),
            _ => n,
        })
        .collect();
    names
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every (module, imported module) pair under `src/`, with a file that has it.
fn edges() -> BTreeMap<(String, String), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let Some(module) = module_of(relative) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read");
        // Test modules may reach anywhere.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for used in imports(text) {
            if used != module {
                out.entry((module.clone(), used))
                    .or_insert_with(|| relative.display().to_string());
            }
        }
    }
    out
}

#[test]
fn every_module_of_src_is_in_the_layer_table() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(f.strip_prefix(&src).expect("under src")))
        .collect();
    let missing: Vec<&String> = modules.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(missing.is_empty(), "modules without a layer: {missing:?}");
}

#[test]
fn modules_import_only_lower_layers_besides_the_listed_debts() {
    let mut wrong = Vec::new();
    let mut debts_seen = BTreeSet::new();
    for ((module, used), file) in edges() {
        let (Some(mine), Some(theirs)) = (layer_of(&module), layer_of(&used)) else {
            continue;
        };
        if theirs < mine {
            continue;
        }
        match DEBTS
            .iter()
            .find(|(m, u, _)| *m == module.as_str() && *u == used.as_str())
        {
            Some(debt) => {
                debts_seen.insert(*debt);
            }
            None => wrong.push(format!("{module} -> {used} ({file})")),
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering (src/lib.rs):\n{}",
        wrong.join("\n")
    );
    let paid: Vec<_> = DEBTS
        .iter()
        .filter(|d| !debts_seen.contains(*d))
        .map(|(m, u, _)| format!("{m} -> {u}"))
        .collect();
    assert!(
        paid.is_empty(),
        "these imports are gone: take them off DEBTS: {paid:?}"
    );
}

/// Each state backend's types stay in its own file: the rest of the crate sees the `Store` trait;
/// likewise the object-storage client stays behind `output::bucket::Bucket`.
#[test]
fn backend_types_stay_in_their_backend_file() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // (what may not appear, the one place it may)
    let confined = [
        ("rusqlite", "state/sqlite.rs"),
        ("SqliteStore", "state/"),
        ("tokio_postgres", "state/postgres.rs"),
        ("deadpool_postgres", "state/postgres.rs"),
        ("PgStore", "state/"),
        ("object_store", "output/bucket.rs"),
    ];
    let mut wrong = Vec::new();
    for file in files {
        let relative = file
            .strip_prefix(&src)
            .expect("under src")
            .display()
            .to_string();
        let text = std::fs::read_to_string(&file).expect("read");
        // Test modules may use a backend to exercise what they test.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (name, home) in confined {
            if text.contains(name) && !relative.starts_with(home) {
                wrong.push(format!("{name} in {relative}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "backend types outside their home: {wrong:?}"
    );
}
