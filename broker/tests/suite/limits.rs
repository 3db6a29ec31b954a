//! Limits: pids, memory, timeout — reported to the caller and audited, with
//! the host (and the broker) unaffected.

use super::harness::{Env, text};

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    let env = Env::new();
    let out = env.run(&[
        "--pids",
        "32",
        "--",
        "sh",
        "-c",
        "for i in $(seq 1 100); do sleep 2 & done 2>/dev/null; wait; echo survived",
    ]);
    let err = text(&out.stderr);
    assert!(err.contains("process limit"), "stderr: {err}");
    let rows = env.audit(&["--kind", "limit"]);
    assert!(rows.iter().any(|r| r["action"] == "pids_max"), "{rows:?}");
    let exec = env.audit(&["--kind", "exec"]);
    assert_eq!(exec.last().unwrap()["detail"]["pids_limit_hit"], true);
    // The host still forks.
    assert!(
        std::process::Command::new("true")
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn memory_balloon_is_oom_killed_and_reported() {
    let env = Env::new();
    let out = env.run(&[
        "--memory",
        "64M",
        "--",
        "python3",
        "-c",
        "b = b'x' * (512 << 20); print(len(b))",
    ]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("out of memory"),
        "{}",
        text(&out.stderr)
    );
    let rows = env.audit(&["--kind", "limit"]);
    assert!(rows.iter().any(|r| r["action"] == "oom"), "{rows:?}");
    let exec = env.audit(&["--kind", "exec"]);
    assert_eq!(exec.last().unwrap()["detail"]["oom"], true);
}

#[test]
fn timeout_kills_the_whole_sandbox() {
    let env = Env::new();
    let out = env.run(&["--timeout", "2s", "--", "sh", "-c", "sleep 60 & sleep 60"]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("timeout"),
        "{}",
        text(&out.stderr)
    );
    let rows = env.audit(&["--kind", "limit"]);
    assert!(rows.iter().any(|r| r["action"] == "timeout"), "{rows:?}");
    env.assert_no_leftovers(None);
}
