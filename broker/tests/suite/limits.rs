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

/// The disk quota bounds what a sandbox adds across /tmp (the
/// copy-on-write layer) and /workspace together: past it writes fail with
/// ENOSPC, nothing already written is lost, freed space is usable again,
/// and the first hit is audited.
#[test]
fn the_disk_quota_bounds_the_layer_and_workspace_together() {
    let env = Env::new();
    let out = env.run(&[
        "--disk",
        "20M",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/tmp/a bs=1M count=12 2>/dev/null && echo a-ok\n\
         dd if=/dev/zero of=/workspace/b bs=1M count=12 2>&1 | grep -o 'No space left on device' | head -1\n\
         stat -c %s /tmp/a\n\
         rm /workspace/b /tmp/a\n\
         dd if=/dev/zero of=/workspace/c bs=1M count=15 2>/dev/null && echo c-ok\n\
         rm /workspace/c\n\
         dd if=/dev/zero of=/dev/shm/x bs=1M count=100 2>&1 | grep -o 'No space left on device' | head -1",
    ]);
    assert_eq!(
        text(&out.stdout),
        "a-ok\nNo space left on device\n12582912\nc-ok\nNo space left on device\n",
        "{}",
        text(&out.stderr)
    );
    let rows = env.audit(&["--kind", "limit"]);
    let disk: Vec<_> = rows.iter().filter(|r| r["action"] == "disk").collect();
    assert_eq!(disk.len(), 1, "{rows:?}");
    assert_eq!(
        disk[0]["detail"]["QuotaHit"]["what"], "disk bytes",
        "{rows:?}"
    );
}

#[test]
fn the_inode_quota_bounds_how_many_files_a_sandbox_makes() {
    let env = Env::new();
    let out = env.run(&[
        "--inodes",
        "200",
        "--",
        "python3",
        "-c",
        "import os\n\
         n = 0\n\
         try:\n\
         \x20   while n < 10000:\n\
         \x20       open(f'/tmp/f{n}', 'w').close(); n += 1\n\
         except OSError as e:\n\
         \x20   print(e.errno == 28, n <= 200, n > 100)\n\
         os.remove('/tmp/f0'); open('/tmp/again', 'w').close(); print('again')",
    ]);
    assert_eq!(
        text(&out.stdout),
        "True True True\nagain\n",
        "{}",
        text(&out.stderr)
    );
    let bad = env.run(&["--disk", "10", "--", "true"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("disk_bytes 10 is outside"),
        "{}",
        text(&bad.stderr)
    );
}

/// `inspect` shows what the layers hold against the quota, counted again
/// when the filesystem server starts (a persistent workspace's files
/// count).
#[test]
fn inspect_shows_disk_usage_against_the_quota() {
    let env = Env::new();
    // Files left in the agent's workspace by an earlier sandbox.
    let out = env.run(&[
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/workspace/old bs=1M count=3 2>/dev/null",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _b = env.start_brokerd();
    let info: serde_json::Value = serde_json::from_str(&super::harness::ok(
        &env.remote(&["--json", "create", "--disk", "50M"]),
    ))
    .unwrap();
    let id = info["id"].as_str().unwrap().to_string();
    let out = env.remote(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/tmp/new bs=1M count=5 2>/dev/null",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let insp: serde_json::Value = serde_json::from_str(&super::harness::ok(
            &env.remote(&["--json", "inspect", &id]),
        ))
        .unwrap();
        let d = &insp["disk"];
        if d["used_bytes"].as_u64() == Some(8 << 20) {
            assert_eq!(d["limit_bytes"], 50u64 << 20, "{d}");
            assert!(d["used_inodes"].as_u64().unwrap() >= 2, "{d}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{d}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let text_info = super::harness::ok(&env.remote(&["inspect", &id]));
    assert!(
        text_info.contains("disk:        8 of 50 MiB"),
        "{text_info}"
    );
}
