//! Lifecycle through brokerd: create, concurrent execs, destroy, crash
//! recovery — and nothing left behind.

use std::time::{Duration, Instant};

use super::harness::{Env, create, ok, procs_in_range, text};

#[test]
fn concurrent_execs_share_one_sandbox() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let info = create(&env, &[]);
    let id = info["id"].as_str().unwrap().to_string();
    let mut waiter = env.airlock();
    waiter.arg("--socket").arg(&env.socket).args([
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "while [ ! -f /tmp/go ]; do sleep 0.05; done; echo waited",
    ]);
    let waiter = waiter.stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    ok(&env.remote(&["exec", &id, "--", "touch", "/tmp/go"]));
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(ok(&out), "waited\n");
    let ls = ok(&env.remote(&["ls"]));
    assert!(ls.contains(&id), "{ls}");
    let insp = ok(&env.remote(&["inspect", &id]));
    assert!(insp.contains("self-test:   passed"), "{insp}");
    ok(&env.remote(&["rm", &id]));
    assert!(Env::cgroup_dirs(&id).is_empty());
    env.assert_no_leftovers(info["host_uid_base"].as_u64().map(|b| b as u32));
}

#[test]
fn destroy_leaves_nothing_behind() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let info = create(&env, &[]);
    let id = info["id"].as_str().unwrap();
    let base = info["host_uid_base"].as_u64().unwrap() as u32;
    // A background process that would outlive a careless teardown.
    let mut bg = env.airlock();
    bg.arg("--socket")
        .arg(&env.socket)
        .args(["exec", id, "--", "sh", "-c", "sleep 300"]);
    let bg = bg.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!procs_in_range(base).is_empty());
    ok(&env.remote(&["rm", id]));
    let _ = bg.wait_with_output();
    assert!(Env::cgroup_dirs(id).is_empty(), "cgroup left");
    env.assert_no_leftovers(Some(base));
    let rows = env.audit_wait(&["--sandbox", id], |r| r["action"] == "destroy");
    let actions: Vec<_> = rows
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect();
    assert!(actions.contains(&"create".to_string()), "{actions:?}");
    assert!(actions.contains(&"destroy".to_string()), "{actions:?}");
    // Everything went as it should: the filesystem server, its mount gone,
    // sent its last events and exited by itself (it is killed otherwise).
    let destroy = rows.iter().find(|r| r["action"] == "destroy").unwrap();
    assert_eq!(
        destroy["detail"]["problems"],
        serde_json::json!([]),
        "{destroy}"
    );
}

#[test]
fn brokerd_crash_is_cleaned_up_by_the_next_start() {
    let env = Env::new();
    let mut b = env.start_brokerd();
    let info = create(&env, &["--agent", "crashy"]);
    let id = info["id"].as_str().unwrap().to_string();
    let base = info["host_uid_base"].as_u64().unwrap() as u32;
    ok(&env.remote(&["exec", &id, "--", "sh", "-c", "echo kept > /workspace/f"]));
    b.kill9();
    // Sandbox processes notice the broker is gone and die with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !procs_in_range(base).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        procs_in_range(base).is_empty(),
        "sandbox outlived its broker"
    );
    let _b2 = env.start_brokerd();
    assert!(
        Env::cgroup_dirs(&id).is_empty(),
        "cgroup left after recovery"
    );
    env.assert_no_leftovers(Some(base));
    let out = env.remote(&["exec", "nope", "--", "true"]);
    assert!(!out.status.success());
    // The workspace and the audit log survived.
    let ws = env.state.join("workspaces/crashy/f");
    assert_eq!(std::fs::read_to_string(ws).unwrap(), "kept\n");
    env.audit_wait(&["--sandbox", &id], |r| r["action"] == "recovered");
}

#[test]
fn killing_the_sandbox_from_outside_cleans_up_and_spares_the_broker() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let victim = create(&env, &[]);
    let other = create(&env, &[]);
    let id = victim["id"].as_str().unwrap().to_string();
    let base = victim["host_uid_base"].as_u64().unwrap() as u32;
    // Every process of the sandbox, pid 1 included, gets SIGKILL from the host.
    for (pid, _) in procs_in_range(base) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let insp = env.remote(&["--json", "inspect", &id]);
        let state: serde_json::Value = serde_json::from_str(&ok(&insp)).unwrap();
        if state["state"] == "dead" {
            break;
        }
        assert!(Instant::now() < deadline, "sandbox still running: {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Env::cgroup_dirs(&id).is_empty(), "cgroup left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&id), "mount left");
    // The broker and the other sandbox carry on.
    let other_id = other["id"].as_str().unwrap();
    assert_eq!(
        ok(&env.remote(&["exec", other_id, "--", "echo", "alive"])),
        "alive\n"
    );
    let out = env.remote(&["exec", &id, "--", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not running"),
        "{}",
        text(&out.stderr)
    );
    ok(&env.remote(&["rm", &id, other_id]));
    env.assert_no_leftovers(Some(base));
}

/// Sends `sig` to an airlock process once its command has started.
fn signal_when_started(child: &std::process::Child, marker: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "command never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn sigterm_to_airlock_reaches_the_command_embedded_and_through_brokerd() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let ws = tempfile::Builder::new().prefix("ws-").tempdir().unwrap();
    let script = "trap 'echo got-term; exit 7' TERM; touch /workspace/started; sleep 30 & wait";
    for mode in ["--embedded", "--socket"] {
        let _ = std::fs::remove_file(ws.path().join("started"));
        let mut c = env.airlock();
        c.arg(mode);
        if mode == "--socket" {
            c.arg(&env.socket);
        }
        c.args(["run", "--workspace"])
            .arg(ws.path())
            .args(["--", "sh", "-c", script])
            .stdout(std::process::Stdio::piped());
        let child = c.spawn().unwrap();
        signal_when_started(&child, &ws.path().join("started"));
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(7), "{mode}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "got-term\n", "{mode}");
    }
}

#[test]
fn brokerd_shutdown_destroys_every_sandbox() {
    let env = Env::new();
    let mut b = env.start_brokerd();
    let a = create(&env, &[]);
    let c = create(&env, &[]);
    let bases: Vec<u32> = [&a, &c]
        .iter()
        .map(|i| i["host_uid_base"].as_u64().unwrap() as u32)
        .collect();
    b.stop();
    for (info, base) in [&a, &c].iter().zip(bases) {
        assert!(Env::cgroup_dirs(info["id"].as_str().unwrap()).is_empty());
        env.assert_no_leftovers(Some(base));
    }
    assert!(!env.socket.exists(), "socket left behind");
}

#[test]
fn shutdown_right_after_runs_leaves_nothing_with_a_pool() {
    // A shutdown that lands while pool refills and background destroys are
    // in flight must still finish every teardown before brokerd exits.
    for round in 0..4 {
        let env = Env::with_extra("pool_size = 2\n");
        let mut b = env.start_brokerd();
        for _ in 0..2 {
            ok(&env.remote(&["run", "--", "true"]));
        }
        std::thread::sleep(Duration::from_millis(10 * round));
        b.stop();
        env.assert_no_leftovers(None);
    }
}

#[test]
fn pre_started_sandboxes_are_fresh_private_and_cleaned_up() {
    let env = Env::with_extra("pool_size = 1\n");
    let mut b = env.start_brokerd();
    let first = create(&env, &["--agent", "p1"]);
    let id1 = first["id"].as_str().unwrap().to_string();
    ok(&env.remote(&["exec", &id1, "--", "sh", "-c", "echo dirty > /tmp/mark"]));
    // Wait for the pool to hold one sandbox for (p1, sandbox).
    let deadline = Instant::now() + Duration::from_secs(20);
    let second = loop {
        let info = create(&env, &["--agent", "p1", "--memory", "256M"]);
        let id = info["id"].as_str().unwrap().to_string();
        let rows = env.audit_wait(&["--sandbox", &id], |r| r["action"] == "create");
        let pre = rows
            .iter()
            .any(|r| r["action"] == "create" && r["detail"]["pre_started"] == true);
        if pre {
            break info;
        }
        ok(&env.remote(&["rm", &id]));
        assert!(Instant::now() < deadline, "pool never served a create");
        std::thread::sleep(Duration::from_millis(200));
    };
    let id2 = second["id"].as_str().unwrap().to_string();
    assert_eq!(second["limits"]["memory_bytes"], 256u64 << 20);
    // Waiting in the pool, a sandbox has the least CPU weight (building
    // it never competes with live work); handed out, the default again.
    assert_eq!(cpu_weight(&id2).as_deref(), Some("default"), "{id2}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: Vec<String> = std::fs::read_dir(env.state.join("layers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != &id1 && n != &id2)
            .collect();
        if waiting
            .iter()
            .any(|w| cpu_weight(w).as_deref() == Some("least"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no pre-started sandbox at the least weight: {waiting:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing of another sandbox is visible; the limit asked for holds.
    let out = ok(&env.remote(&[
        "exec",
        &id2,
        "--",
        "sh",
        "-c",
        "ls /tmp; cat /proc/self/status | grep -c NoNewPrivs",
    ]));
    assert_eq!(
        out, "1\n",
        "fresh /tmp and a jailed process expected: {out}"
    );
    // Another agent never gets p1's pre-started sandbox.
    let other = create(&env, &["--agent", "p2"]);
    let oid = other["id"].as_str().unwrap().to_string();
    let rows = env.audit_wait(&["--sandbox", &oid], |r| r["action"] == "create");
    assert!(
        rows.iter().all(|r| r["detail"]["pre_started"] != true),
        "{rows:?}"
    );
    assert_eq!(other["agent"], "p2");
    ok(&env.remote(&["rm", &id1, &id2, &oid]));
    // Shutdown destroys what is still pre-started.
    b.stop();
    env.assert_no_leftovers(None);
}

/// "least" or "default" for a sandbox's CPU weight, when its cgroup has one.
fn cpu_weight(id: &str) -> Option<String> {
    for d in Env::cgroup_dirs(id) {
        for (file, least, default) in [("cpu.shares", "2", "1024"), ("cpu.weight", "1", "100")] {
            if let Ok(v) = std::fs::read_to_string(d.join(file)) {
                let v = v.trim();
                return Some(if v == least {
                    "least".into()
                } else if v == default {
                    "default".into()
                } else {
                    v.to_string()
                });
            }
        }
    }
    None
}
