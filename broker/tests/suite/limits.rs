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

/// The agent's persistent workspace has a quota of its own over all its
/// sandboxes and snapshots (brokerd.toml `[limits] workspace_bytes`):
/// what one sandbox wrote there leaves less for the next, its
/// copy-on-write layer is not the workspace's, a snapshot's stored layer
/// counts until it is removed, and the count survives a broker restart.
#[test]
fn the_agent_workspace_quota_holds_across_sandboxes_snapshots_and_restarts() {
    use super::harness::{create, ok};
    let env = Env::with_extra("pool_size = 0\n[limits]\nworkspace_bytes = 16777216\n");
    let mut broker = env.start_brokerd();
    let sh =
        |id: &str, script: &str| text(&env.remote(&["exec", id, "--", "sh", "-c", script]).stdout);
    let ws_used = |id: &str| -> serde_json::Value {
        let insp: serde_json::Value =
            serde_json::from_str(&ok(&env.remote(&["--json", "inspect", id]))).unwrap();
        insp["workspace_disk"].clone()
    };
    let wait_used = |id: &str, pred: &dyn Fn(u64) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let w = ws_used(id);
            if pred(w["used_bytes"].as_u64().unwrap_or(0)) {
                return w;
            }
            assert!(std::time::Instant::now() < deadline, "{w}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    const MIB: u64 = 1 << 20;
    let a = create(&env, &[])["id"].as_str().unwrap().to_string();
    let b = create(&env, &[])["id"].as_str().unwrap().to_string();
    assert_eq!(
        sh(
            &a,
            "dd if=/dev/zero of=/workspace/a bs=1M count=10 2>/dev/null && echo ok"
        ),
        "ok\n"
    );
    // The other sandbox of the agent finds the rest of the quota only.
    assert_eq!(
        sh(
            &b,
            "dd if=/dev/zero of=/workspace/b bs=1M count=10 2>&1 | grep -o 'No space left on device' | head -1\n\
             dd if=/dev/zero of=/tmp/t bs=1M count=10 2>/dev/null && echo tmp-ok\n\
             stat -c %s /workspace/a\n\
             rm /workspace/b"
        ),
        "No space left on device\ntmp-ok\n10485760\n"
    );
    let w = wait_used(&a, &|u| (10 * MIB..12 * MIB).contains(&u));
    assert_eq!(w["limit_bytes"], 16 * MIB, "{w}");
    assert!(
        ok(&env.remote(&["inspect", &a])).contains("workspace:   10 of 16 MiB"),
        "inspect shows the agent's usage"
    );
    let rows = env.audit(&["--kind", "limit"]);
    assert!(
        rows.iter()
            .any(|r| r["detail"]["QuotaHit"]["what"] == "workspace bytes"),
        "{rows:?}"
    );
    // A snapshot's stored copy-on-write layer is the agent's: 4 MiB of
    // /tmp now counts, so 3 MiB more no longer fits, until it goes.
    ok(&env.remote(&["rm", &b]));
    assert_eq!(
        sh(
            &a,
            "dd if=/dev/zero of=/tmp/big bs=1M count=4 2>/dev/null && echo ok"
        ),
        "ok\n"
    );
    ok(&env.remote(&["snapshot", &a, "--name", "s1"]));
    wait_used(&a, &|u| u >= 14 * MIB);
    assert_eq!(
        sh(
            &a,
            "dd if=/dev/zero of=/workspace/c bs=1M count=3 2>&1 | grep -o 'No space left on device' | head -1\n\
             rm /workspace/c"
        ),
        "No space left on device\n"
    );
    // Removed, its layer goes once no sandbox serves it (here, with the
    // sandbox).
    ok(&env.remote(&["snapshot", "rm", &a, "s1"]));
    ok(&env.remote(&["rm", &a]));
    // Kept across a restart: the workspace still holds 10 MiB of the 16.
    broker.stop();
    let _broker = env.start_brokerd();
    let c = create(&env, &[])["id"].as_str().unwrap().to_string();
    let w = ws_used(&c);
    assert!(
        (10 * MIB..12 * MIB).contains(&w["used_bytes"].as_u64().unwrap()),
        "{w}"
    );
    assert_eq!(
        sh(
            &c,
            "dd if=/dev/zero of=/workspace/d bs=1M count=8 2>&1 | grep -o 'No space left on device' | head -1\n\
             rm /workspace/d\n\
             dd if=/dev/zero of=/workspace/e bs=1M count=5 2>/dev/null && echo freed-ok"
        ),
        "No space left on device\nfreed-ok\n"
    );
}
