//! Snapshots through brokerd: taken and restored while the sandbox is
//! idle, refused with a reason otherwise, and the workspace's layers kept
//! for the agent's next sandbox.

use std::time::{Duration, Instant};

use super::harness::{Env, create, ok, text};

fn sh(env: &Env, id: &str, script: &str) -> String {
    ok(&env.remote(&["exec", "--user", "root", id, "--", "sh", "-c", script]))
}

#[test]
fn restore_brings_back_files_modes_links_and_deletions() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let id = create(&env, &[])["id"].as_str().unwrap().to_string();
    sh(
        &env,
        &id,
        "mkdir -p /workspace/p/deep && echo v1 > /workspace/p/f && ln /workspace/p/f /workspace/p/h \
         && ln -s f /workspace/p/l && chmod 640 /workspace/p/f && echo d > /workspace/p/deep/x \
         && echo r1 > /opt/x",
    );
    let listing = "cd /workspace/p && ls -lR --time-style=+ .; cat f h /opt/x; readlink l; \
                   stat -c %i f h | uniq | wc -l; true";
    let before = sh(&env, &id, listing);
    assert_eq!(
        ok(&env.remote(&["snapshot", &id, "--name", "good"])).trim(),
        "good"
    );
    sh(
        &env,
        &id,
        "echo v2 > /workspace/p/f; rm /workspace/p/h; rm -r /workspace/p/deep; chmod 600 /workspace/p/f; \
         ln -sf elsewhere /workspace/p/l; echo r2 > /opt/x; touch /workspace/p/new /usr/local/new",
    );
    assert_ne!(sh(&env, &id, listing), before);
    let list = ok(&env.remote(&["snapshots", &id]));
    assert!(list.lines().any(|l| l.starts_with("good ")), "{list}");
    assert_eq!(ok(&env.remote(&["restore", &id, "good"])).trim(), "good");
    assert_eq!(sh(&env, &id, listing), before, "restored exactly");
    assert!(
        sh(&env, &id, "ls /workspace/p /usr/local")
            .lines()
            .all(|l| l != "new"),
        "files made after the snapshot are gone"
    );
    // Each step is audited.
    let rows = env.audit_wait(&["--kind", "sandbox"], |r| r["action"] == "restore");
    assert!(
        rows.iter()
            .any(|r| r["action"] == "snapshot" && r["detail"]["name"] == "good")
    );
    // Unknown names and bad names are refused, naming what was wrong.
    let out = env.remote(&["restore", &id, "nope"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no snapshot named \"nope\""),
        "{}",
        text(&out.stderr)
    );
    let out = env.remote(&["snapshot", &id, "--name", "../x"]);
    assert!(
        text(&out.stderr).contains("snapshot name"),
        "{}",
        text(&out.stderr)
    );
    let out = env.remote(&["snapshot", &id, "--name", "good"]);
    assert!(text(&out.stderr).contains("already has a snapshot named good"));
    ok(&env.remote(&["snapshot", "rm", &id, "good"]));
    assert!(!ok(&env.remote(&["snapshots", &id])).contains("good"));
    // The layers' directory is nowhere to be seen inside.
    assert_eq!(
        sh(&env, &id, "ls -a /workspace / | grep -c airlock || true").trim(),
        "0"
    );
}

#[test]
fn snapshots_need_an_idle_sandbox_and_its_agents_own_workspace() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let id = create(&env, &[])["id"].as_str().unwrap().to_string();
    // A command running.
    let mut running = env
        .airlock()
        .arg("--socket")
        .arg(&env.socket)
        .args(["exec", &id, "--", "sleep", "300"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while serde_json::from_str::<serde_json::Value>(&ok(&env.remote(&["--json", "inspect", &id])))
        .unwrap()["execs_running"]
        != 1
    {
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = env.remote(&["snapshot", &id]);
    assert!(!out.status.success(), "a snapshot while a command runs");
    assert!(
        text(&out.stderr).contains("need it idle"),
        "{}",
        text(&out.stderr)
    );
    // The caller hangs up: the command ends, and the sandbox is idle.
    running.kill().unwrap();
    running.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = env.remote(&["snapshot", &id]);
        if out.status.success() {
            assert_eq!(text(&out.stdout).trim(), "snap-1");
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(50));
    }
    // A process a command left behind (later commands cannot signal it)
    // blocks snapshots until `airlock kill` stops it.
    sh(&env, &id, "sleep 300 >/dev/null 2>&1 </dev/null &");
    let out = env.remote(&["snapshot", &id]);
    assert!(
        text(&out.stderr).contains(&format!("airlock kill {id}")),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(ok(&env.remote(&["kill", &id])).trim(), "1");
    assert_eq!(ok(&env.remote(&["snapshot", &id])).trim(), "snap-2");
    assert_eq!(sh(&env, &id, "echo still here"), "still here\n");
    let rows = env.audit_wait(&["--kind", "sandbox"], |r| r["action"] == "kill");
    assert!(
        rows.iter()
            .any(|r| r["action"] == "kill" && r["detail"]["processes"] == 1)
    );
    // A second sandbox of the agent shares the workspace.
    let other = create(&env, &[])["id"].as_str().unwrap().to_string();
    let out = env.remote(&["snapshot", &id]);
    assert!(text(&out.stderr).contains(&format!("also in use by sandbox {other}")));
    ok(&env.remote(&["rm", &other]));
    // A workspace that is the caller's own directory is never rearranged.
    let dir = tempfile::tempdir().unwrap();
    let own = create(&env, &["--workspace", dir.path().to_str().unwrap()])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.remote(&["snapshot", &own]);
    assert!(text(&out.stderr).contains("snapshots need the agent's own workspace"));
}

#[test]
fn the_workspace_keeps_its_layers_for_the_agents_next_sandbox() {
    let env = Env::new();
    let mut b = env.start_brokerd();
    let id = create(&env, &[])["id"].as_str().unwrap().to_string();
    sh(
        &env,
        &id,
        "echo one > /workspace/a && echo keep > /workspace/b",
    );
    ok(&env.remote(&["snapshot", &id]));
    sh(
        &env,
        &id,
        "echo two > /workspace/a && rm /workspace/b && echo new > /workspace/c",
    );
    ok(&env.remote(&["rm", &id]));
    let next = create(&env, &[])["id"].as_str().unwrap().to_string();
    let want = "two\nnew\n";
    assert_eq!(
        sh(
            &env,
            &next,
            "cat /workspace/a /workspace/b /workspace/c 2>/dev/null; true"
        ),
        want
    );
    ok(&env.remote(&["rm", &next]));
    // And after a broker restart.
    b.stop();
    let _b = env.start_brokerd();
    let again = create(&env, &[])["id"].as_str().unwrap().to_string();
    assert_eq!(
        sh(
            &env,
            &again,
            "cat /workspace/a /workspace/b /workspace/c 2>/dev/null; true"
        ),
        want
    );
    assert_eq!(
        sh(&env, &again, "ls -A /workspace | sort | tr '\\n' ' '"),
        "a c "
    );
}

fn airlock_as(uid: u32, env: &Env) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    let id = uid.to_string();
    c.args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .arg("--socket")
        .arg(&env.socket)
        .env_clear();
    c
}

#[test]
fn forks_start_from_a_snapshot_outlive_restarts_and_stay_the_agents() {
    let env = Env::with_extra("pool_size = 0\n[[agents]]\nname = \"alice\"\nuids = [4001]\n");
    let mut b = env.start_brokerd();
    let id = create(&env, &[])["id"].as_str().unwrap().to_string();
    sh(
        &env,
        &id,
        "echo one > /workspace/a && echo secret > /opt/x && chown 1000:1000 /opt/x && chmod 600 /opt/x",
    );
    ok(&env.remote(&["snapshot", &id, "--name", "base"]));
    sh(&env, &id, "echo two > /workspace/a");
    let from = format!("{id}:base");
    let fork = create(&env, &["--from-snapshot", &from])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let probe = "cat /workspace/a; stat -c '%u %g %a' /opt/x; cat /opt/x";
    assert_eq!(sh(&env, &fork, probe), "one\n1000 1000 600\nsecret\n");
    // The fork's changes are its own, and the origin's are the origin's.
    sh(
        &env,
        &fork,
        "echo forked > /workspace/a && echo mine > /workspace/b",
    );
    assert_eq!(sh(&env, &id, "cat /workspace/a; ls /workspace"), "two\na\n");
    assert_eq!(sh(&env, &fork, "cat /workspace/a"), "forked\n");
    // Another agent neither sees nor forks them.
    let out = airlock_as(4001, &env)
        .args(["snapshots", &id])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let out = airlock_as(4001, &env)
        .args(["create", "--from-snapshot", &from])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no snapshot named \"base\""),
        "{}",
        text(&out.stderr)
    );
    // They outlive their sandbox and the broker.
    ok(&env.remote(&["rm", &id, &fork]));
    b.stop();
    let _b = env.start_brokerd();
    assert!(ok(&env.remote(&["snapshots", &id])).contains("base "));
    let again = create(&env, &["--from-snapshot", &from])["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sh(&env, &again, probe), "one\n1000 1000 600\nsecret\n");
    ok(&env.remote(&["rm", &again]));
    ok(&env.remote(&["snapshot", "rm", &id, "base"]));
    let out = env.remote(&["create", "--from-snapshot", &from]);
    assert!(
        text(&out.stderr).contains("no snapshot named \"base\""),
        "{}",
        text(&out.stderr)
    );
}

/// Names the kernel keeps as missing (negative entries, on the
/// copy-on-write root and in the agent's workspace) never hide what a
/// restore brings back or what another sandbox of the agent makes.
#[test]
fn names_seen_missing_appear_once_restored_or_made_elsewhere() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let a = create(&env, &[])["id"].as_str().unwrap().to_string();
    let probe = "for p in /workspace/z /workspace/d/z /opt/z /workspace/nd /workspace/x; do \
                 test -e $p && echo $p; done; true";
    sh(
        &env,
        &a,
        "mkdir -p /workspace/d && echo 1 > /workspace/z && echo 2 > /workspace/d/z && echo 3 > /opt/z",
    );
    ok(&env.remote(&["snapshot", &a, "--name", "s"]));
    sh(&env, &a, "rm /workspace/z /workspace/d/z /opt/z");
    // Twice: the second answer comes from the kernel's negative entries.
    assert_eq!(sh(&env, &a, probe), "");
    assert_eq!(sh(&env, &a, probe), "");
    assert_eq!(ok(&env.remote(&["restore", &a, "s"])).trim(), "s");
    assert_eq!(
        sh(&env, &a, probe),
        "/workspace/z\n/workspace/d/z\n/opt/z\n",
        "restored names were kept as missing"
    );
    // Made by the agent's other sandbox: a file, and a directory with a
    // file in it, each name seen missing first.
    let b = create(&env, &[])["id"].as_str().unwrap().to_string();
    assert_eq!(
        sh(&env, &a, "cat /workspace/nd/f /workspace/x 2>&1 | wc -l"),
        "2\n"
    );
    sh(
        &env,
        &b,
        "mkdir /workspace/nd && echo in > /workspace/nd/f && echo x > /workspace/x",
    );
    assert_eq!(sh(&env, &a, "cat /workspace/nd/f /workspace/x"), "in\nx\n");
}
