//! Who may import whom (ARCHITECTURE.md): every member's Cargo.toml is read
//! and its dependencies on our own crates checked against the table.

use std::collections::BTreeMap;
use std::path::Path;

fn our_deps(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap_or_default();
    let doc: toml::Table = match toml::from_str(&text) {
        Ok(t) => t,
        Err(e) => panic!("{}: {e}", manifest.display()),
    };
    let mut out = vec![];
    for section in ["dependencies", "build-dependencies"] {
        if let Some(t) = doc.get(section).and_then(|d| d.as_table()) {
            out.extend(t.keys().filter(|k| k.starts_with("airlock-")).cloned());
        }
    }
    out.sort();
    out
}

#[test]
fn crates_import_only_what_the_architecture_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        (
            "broker",
            &[
                "airlock-devproxy",
                "airlock-fs",
                "airlock-net",
                "airlock-shim",
            ][..],
        ),
        ("shim", &[][..]),
        ("fs", &[][..]),
        ("net", &[][..]),
        ("devproxy", &[][..]),
    ]);
    let mut checked = 0;
    for (dir, ok) in &allowed {
        let manifest = root.join(dir).join("Cargo.toml");
        if !manifest.exists() {
            continue;
        }
        checked += 1;
        for dep in our_deps(&manifest) {
            assert!(ok.contains(&dep.as_str()), "{dir} must not depend on {dep}");
        }
    }
    assert!(checked >= 3, "expected broker, shim and fs manifests");
}

#[test]
fn subsystems_do_not_pull_in_an_async_runtime() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("shim/Cargo.toml")).unwrap_or_default();
    assert!(
        !text.contains("tokio"),
        "the shim is single-threaded: no tokio"
    );
}
