//! The Python SDK (sdk/python), installed with pip as a user would and
//! driven by its own pytest suite against a real brokerd.

use super::harness::{Env, text};

/// `python3 -m pytest` works, installing pytest with pip if it is missing
/// (the README promises no manual set-up).
fn require_pytest() {
    let has = |args: &[&str]| {
        std::process::Command::new("python3")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has(&["-m", "pytest", "--version"]) {
        let out = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "-q", "pytest"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip install pytest: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn the_python_sdk_passes_its_suite_against_brokerd() {
    require_pytest();
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/python");
    // Installed as a user would (`pip install ./sdk/python`), into a
    // directory of its own; built from a copy, so the tree stays clean.
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("src");
    let out = std::process::Command::new("cp")
        .arg("-r")
        .arg(&sdk)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let site = work.path().join("site");
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "-q", "--no-deps", "--target"])
        .arg(&site)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "pip install: {}", text(&out.stderr));
    let env = Env::new();
    let _b = env.start_brokerd();
    // The CLI finds the same socket in the same variable.
    let ls = env
        .airlock()
        .env("AIRLOCK_SOCKET", &env.socket)
        .arg("ls")
        .output()
        .unwrap();
    assert!(ls.status.success(), "{}", text(&ls.stderr));
    let out = std::process::Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(copy.join("tests"))
        .env("PYTHONPATH", &site)
        .env("AIRLOCK_SOCKET", &env.socket)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pytest:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("passed"),
        "{}",
        text(&out.stdout)
    );
}
