//! `airlock mcp` driven by a real MCP client (the MCP project's Python
//! package): tools listed, a sandbox created, a file written and read
//! back, a command run with its output cut, errors shown to the model.

use super::harness::{Env, text};

/// A directory holding the `mcp` package, installed with pip once per
/// build directory.
fn mcp_site() -> std::path::PathBuf {
    let site = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mcp-site");
    if site.join("mcp").is_dir() {
        return site;
    }
    let tmp = site.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "-q", "--target"])
        .arg(&tmp)
        .arg("mcp")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pip install mcp: {}",
        text(&out.stderr)
    );
    std::fs::rename(&tmp, &site).unwrap();
    site
}

#[test]
fn an_mcp_client_creates_a_sandbox_runs_commands_and_moves_files() {
    let site = mcp_site();
    let env = Env::new();
    let _b = env.start_brokerd();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/mcp_client.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .arg(&env.socket)
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mcp client:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(seen["server"], "airlock");
    for tool in [
        "sandbox_create",
        "sandbox_destroy",
        "run_command",
        "read_file",
        "write_file",
        "list_files",
        "snapshot",
        "restore",
        "audit",
    ] {
        assert!(
            seen["tools"].as_array().unwrap().iter().any(|t| t == tool),
            "{tool}: {seen}"
        );
    }
    assert_eq!(seen["write_error"], false);
    assert_eq!(seen["run"]["exit_code"], 4, "{seen}");
    assert_eq!(seen["run"]["stdout"], "from mcp\n", "{seen}");
    assert_eq!(seen["read"], "made\n");
    assert_eq!(seen["listed"], serde_json::json!(["made.txt", "mcp.txt"]));
    assert_eq!(seen["missing"][0], true, "{seen}");
    assert!(
        seen["missing"][1]
            .as_str()
            .unwrap_or("")
            .contains("/workspace/nope"),
        "{seen}"
    );
    // 1000 bytes shown, and a note of what was cut.
    let big = seen["big_len"].as_u64().unwrap();
    assert!((1000..1100).contains(&big), "{seen}");
    assert_eq!(seen["snapshot"], "m1");
    assert!(seen["audit_exits"].as_u64().unwrap() >= 2, "{seen}");
    assert_eq!(seen["destroyed"], true);
}
