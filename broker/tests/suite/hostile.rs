//! A hostile tenant, or a hostile local caller, against the shared broker:
//! nothing one of them does may take the broker down, starve another
//! tenant, make the root broker act for them, or leave anything behind.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::harness::{
    Env, argv0_is, create, ok, process_in_cgroup_of, procs_in_range, status_field, text,
};

/// A broker killed with SIGKILL is a zombie until its parent reaps it; the
/// next broker must treat it as dead and remove everything it left.
#[test]
fn a_killed_but_unreaped_broker_leaves_nothing_after_restart() {
    let env = Env::new();
    let mut b = env.start_brokerd();
    let mut ids = vec![];
    for _ in 0..3 {
        let info = create(&env, &["--agent", "zombie"]);
        ids.push((
            info["id"].as_str().unwrap().to_string(),
            info["host_uid_base"].as_u64().unwrap() as u32,
        ));
    }
    let mut zombie = b.kill9_unreaped();
    // Restarted at once: the sandboxes may still be running, and the killed
    // broker's last threads may still be exiting.
    let mut b2 = env.start_brokerd();
    for (id, _) in &ids {
        assert!(
            Env::cgroup_dirs(id).is_empty(),
            "cgroup of {id} left: {:?}",
            env.audit(&["--sandbox", id, "--kind", "sandbox"])
        );
    }
    for (_, base) in &ids {
        env.assert_no_leftovers(Some(*base));
    }
    b2.stop();
    zombie.wait().unwrap();
}

/// Concurrent creates cannot race past the per-agent cap.
#[test]
fn the_per_agent_cap_holds_under_concurrent_creates() {
    let env = Env::with_extra("pool_size = 0\nmax_sandboxes_per_agent = 2\n");
    let _b = env.start_brokerd();
    let socket = env.socket.clone();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let s = socket.clone();
            std::thread::spawn(move || {
                super::harness::http_on(&s, "POST", "/v1/sandboxes", r#"{"agent": "capped"}"#)
            })
        })
        .collect();
    let results: Vec<(u16, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let created = results.iter().filter(|(c, _)| *c / 100 == 2).count();
    assert!(
        created <= 2,
        "{created} creates passed a cap of 2: {results:?}"
    );
    assert!(created >= 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter(|(c, _)| *c / 100 != 2)
            .all(|(_, b)| b.contains("max_sandboxes_per_agent")),
        "{results:?}"
    );
    let (code, body) = env.http("GET", "/v1/sandboxes", "");
    assert_eq!(code, 200);
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(created), "{body}");
}

/// inotify instances (and every other per-user kernel count) made inside a
/// sandbox are charged to the sandbox's own host uid: a sandbox that uses
/// up its allowance leaves host root's untouched.
#[test]
fn kernel_per_user_counts_are_charged_to_the_sandbox_not_host_root() {
    let env = Env::new();
    let script = r#"
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while n < 100000:
    if libc.inotify_init1(0o2000000) < 0:
        break
    n += 1
print("held", n, ctypes.get_errno(), flush=True)
time.sleep(30)
"#;
    // Through brokerd: the sandbox is destroyed when the client goes, not
    // left to a killed embedded broker.
    let _b = env.start_brokerd();
    let info = create(&env, &["--user", "root"]);
    let id = info["id"].as_str().unwrap().to_string();
    let mut c = env.airlock();
    c.arg("--socket").arg(&env.socket);
    c.args(["exec", &id, "--", "python3", "-c", script]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        r.read_line(&mut line).unwrap();
    }
    // The sandbox hit its own limit...
    assert!(line.starts_with("held "), "{line:?}");
    let n: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(n > 0 && n < 100000, "{line}");
    // ...while host root still gets instances.
    let host = std::process::Command::new("python3")
        .args([
            "-c",
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             fds = [libc.inotify_init1(0o2000000) for _ in range(8)]\n\
             print('ok' if min(fds) >= 0 else 'refused %d' % ctypes.get_errno())",
        ])
        .output()
        .unwrap();
    assert_eq!(
        text(&host.stdout).trim(),
        "ok",
        "host root could not create inotify instances while a sandbox held {n}: {}",
        text(&host.stderr)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    ok(&env.remote(&["rm", &id]));
    env.assert_no_leftovers(None);
}

/// A caller-supplied workspace or rootfs must be an ordinary directory on
/// a disk filesystem: procfs, sysfs and cgroupfs are refused by name, and
/// a pseudo filesystem mounted below an accepted directory is never
/// entered.
#[test]
fn pseudo_filesystems_are_refused_as_workspace_or_rootfs_and_below() {
    let env = Env::new();
    // A cgroup hierarchy: v1's pids controller, else the v2 root.
    let cgroupfs = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| std::path::Path::new(p).join("cgroup.procs").exists())
        .unwrap();
    for (flag, dir) in [
        ("--workspace", "/proc/self"),
        ("--workspace", "/proc"),
        ("--rootfs", "/proc/1"),
        ("--workspace", cgroupfs),
        ("--workspace", "/sys/kernel"),
    ] {
        let out = env.run(&[flag, dir, "--", "true"]);
        assert_eq!(
            out.status.code(),
            Some(125),
            "{flag} {dir}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.contains("not an ordinary disk filesystem"),
            "{flag} {dir}: {err}"
        );
    }
    // procfs mounted inside an ordinary workspace.
    let ws = tempfile::tempdir().unwrap();
    std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sub = ws.path().join("p");
    std::fs::create_dir(&sub).unwrap();
    nix::mount::mount(
        Some("proc"),
        &sub,
        Some("proc"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(sub.clone());
    let ws_s = ws.path().display().to_string();
    let out = env.run(&[
        "--workspace",
        &ws_s,
        "--user",
        "root",
        "--",
        "sh",
        "-c",
        "cat /workspace/p/1/environ >/dev/null 2>&1 && echo LEAK-environ; \
         cat /workspace/p/self/status 2>/dev/null | grep -q Name && echo LEAK-status; \
         ls /workspace/p/ 2>/dev/null | grep -qx 1 && echo LEAK-list; echo done",
    ]);
    let s = ok(&out);
    assert!(!s.contains("LEAK"), "{s}");
    assert!(s.contains("done"), "{s}");
}

/// The process of sandbox `id`'s cgroup whose argv\[0\] is `airlock-fs`
/// and whose name is (`want`) or is not (`!want`) `fs-registrar`.
fn fs_process_of(id: &str, registrar: bool) -> i32 {
    process_in_cgroup_of(id, |p| {
        argv0_is(p, "airlock-fs")
            && std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| (c.trim() == "fs-registrar") == registrar)
    })
}

/// The filesystem server of sandbox `id`.
fn fs_server_of(id: &str) -> i32 {
    fs_process_of(id, false)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Each sandbox's filesystem server is a process of its own, in the
/// sandbox's cgroup, confined (no_new_privs, a reduced bounding set), and
/// the files a sandbox holds open through it count against the server,
/// never against the broker.
#[test]
fn the_fs_server_is_a_confined_process_charged_to_its_sandbox() {
    let env = Env::new();
    let b = env.start_brokerd();
    let broker_pid = b.0.as_ref().unwrap().id() as i32;
    let info = create(&env, &["--agent", "holder"]);
    let id = info["id"].as_str().unwrap().to_string();
    let server = fs_server_of(&id);
    assert_ne!(server, broker_pid);
    assert_eq!(status_field(server, "NoNewPrivs:"), "1");
    // Its own seccomp allow-list (filter mode).
    assert_eq!(status_field(server, "Seccomp:"), "2");
    // Its own mount namespace, whose root holds only what it serves: no
    // host path beyond them resolves there, and the base is read-only (so
    // no chown or chmod by name reaches a host file).
    assert_ne!(
        std::fs::read_link(format!("/proc/{server}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    let mut top: Vec<String> = std::fs::read_dir(format!("/proc/{server}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert!(
        top.contains(&"layers".to_string()) && top.contains(&"usr".to_string()),
        "{top:?}"
    );
    for absent in ["var", "root", "home", "proc", "sys", "tmp"] {
        assert!(
            !top.contains(&absent.to_string()),
            "{absent} in the server's root: {top:?}"
        );
    }
    let mounts = std::fs::read_to_string(format!("/proc/{server}/mountinfo")).unwrap();
    for ro in ["/usr", "/etc", "/"] {
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(ro))
            .unwrap_or_else(|| panic!("no {ro} mount: {mounts}"));
        assert!(line.split(' ').nth(5).unwrap().starts_with("ro"), "{line}");
    }
    // What it reported of its jail is in the sandbox's jail row.
    let rows = env.audit_wait(&["--sandbox", &id, "--kind", "jail"], |r| {
        r["detail"]["fs_server"].is_object()
    });
    let fs = &rows[0]["detail"]["fs_server"];
    assert_eq!(fs["jail"]["landlock"]["enforced"], "fully_enforced", "{fs}");
    let bnd = u64::from_str_radix(&status_field(server, "CapBnd:"), 16).unwrap();
    // The bounding set is exactly the capabilities it reports keeping.
    assert_eq!(fs["jail"]["caps_kept"].as_u64(), Some(bnd), "{fs}");
    // No CAP_SYS_PTRACE (19), CAP_NET_ADMIN (12), CAP_SYS_MODULE (16),
    // CAP_KILL (5) or CAP_SYS_RAWIO (17) in reach, ever.
    for cap in [5, 12, 16, 17, 19, 21] {
        assert_eq!(bnd & (1 << cap), 0, "capability {cap} kept: {bnd:#x}");
    }
    ok(&env.remote(&["exec", &id, "--", "sh", "-c", "echo x > /workspace/held"]));
    let broker_before = open_fds(broker_pid);
    let server_before = open_fds(server);
    let mut c = env.airlock();
    c.args(["--socket"]).arg(&env.socket).args([
        "exec",
        &id,
        "--",
        "python3",
        "-c",
        "import time\nfs = [open('/workspace/held') for _ in range(600)]\nprint('held', flush=True)\ntime.sleep(30)",
    ]);
    c.stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    {
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
    }
    assert_eq!(line.trim(), "held");
    let server_after = open_fds(server);
    let broker_after = open_fds(broker_pid);
    assert!(
        server_after >= server_before + 500,
        "server fds {server_before} -> {server_after}"
    );
    assert!(
        broker_after < broker_before + 50,
        "broker fds {broker_before} -> {broker_after}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A filesystem server holds no host-root identity: it runs as an id of
/// the sandbox's host range with no supplementary groups, in a user
/// namespace of its own that maps exactly that range, so its capabilities reach only inodes owned within that range.
/// Its registrar, the one process beside it that keeps anything of host
/// root, keeps only CAP_SYS_ADMIN (FUSE backing ids need it), under
/// seccomp and no_new_privs. What the sandbox writes to /workspace is
/// still its owner's on the host, and passthrough reads of the base work.
#[test]
fn the_fs_server_holds_only_the_sandboxs_host_ids() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let info = create(&env, &["--agent", "ids"]);
    let id = info["id"].as_str().unwrap().to_string();
    let server = fs_server_of(&id);
    assert_ne!(
        std::fs::read_link(format!("/proc/{server}/ns/user")).unwrap(),
        std::fs::read_link("/proc/self/ns/user").unwrap()
    );
    let map = std::fs::read_to_string(format!("/proc/{server}/uid_map")).unwrap();
    let fields: Vec<u32> = map.split_whitespace().map(|f| f.parse().unwrap()).collect();
    let base = fields[0];
    assert!(base != 0 && fields == [base, base, 65536], "{map}");
    // Every id is the range's last one (what the workspace owner reads as).
    let last = (base + 65535).to_string();
    for key in ["Uid:", "Gid:"] {
        let v = status_field(server, key);
        assert!(v.split_whitespace().all(|u| u == last), "{key} {v}");
    }
    assert_eq!(status_field(server, "Groups:"), "");
    // The sandbox's root is that same host uid: the range is the sandbox's.
    let out = ok(&env.remote(&["exec", &id, "--", "cat", "/proc/self/uid_map"]));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0".to_string(), base.to_string(), "65536".to_string()],
        "{out}"
    );
    let registrar = fs_process_of(&id, true);
    let bnd = u64::from_str_radix(&status_field(registrar, "CapBnd:"), 16).unwrap();
    assert_eq!(bnd, 1 << 21, "registrar bounding set {bnd:#x}");
    assert_eq!(status_field(registrar, "Seccomp:"), "2");
    assert_eq!(status_field(registrar, "NoNewPrivs:"), "1");
    // Files still work end to end: a base binary runs (read through the
    // registrar's passthrough where the kernel offers it), a workspace
    // file belongs to its host owner, the copy-on-write layer takes writes.
    let out = ok(&env.remote(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo w > /workspace/owned && /usr/bin/env true && echo ran",
    ]));
    assert_eq!(out.trim(), "ran");
    let out = ok(&env.remote(&[
        "exec",
        &id,
        "--user",
        "root",
        "--cwd",
        "/",
        "--",
        "sh",
        "-c",
        "mkdir -p /usr/local/x && rm -rf /usr/share/doc && ls /usr/share | grep -c '^doc$' || true",
    ]));
    assert_eq!(out.trim(), "0");
    let ws = env.state.join("workspaces/ids");
    let meta = std::fs::metadata(ws.join("owned")).unwrap();
    let dir_meta = std::fs::metadata(&ws).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (dir_meta.uid(), dir_meta.gid()));
}

/// Killing one sandbox's filesystem server ends that sandbox (audited
/// with the reason) and nothing else: the broker and a neighbour go on.
#[test]
fn killing_one_fs_server_ends_only_its_sandbox() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let victim = create(&env, &["--agent", "victim"]);
    let neighbour = create(&env, &["--agent", "neighbour"]);
    let vid = victim["id"].as_str().unwrap().to_string();
    let nid = neighbour["id"].as_str().unwrap().to_string();
    let vbase = victim["host_uid_base"].as_u64().unwrap() as u32;
    let server = fs_server_of(&vid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    env.audit_wait(&["--sandbox", &vid], |r| {
        r["action"] == "component_failed" && r["detail"]["role"] == "fs"
    });
    env.audit_wait(&["--sandbox", &vid], |r| r["action"] == "destroy");
    assert!(
        Env::cgroup_dirs(&vid).is_empty(),
        "cgroup of the victim left"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !procs_in_range(vbase).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(procs_in_range(vbase).is_empty(), "victim processes left");
    let out = env.remote(&["exec", &vid, "--", "true"]);
    assert!(!out.status.success());
    assert_eq!(
        ok(&env.remote(&[
            "exec",
            &nid,
            "--",
            "sh",
            "-c",
            "echo alive > /workspace/a; cat /workspace/a"
        ])),
        "alive\n"
    );
    ok(&env.remote(&["rm", &vid, &nid]));
    env.assert_no_leftovers(None);
}

/// Builds a directory chain `depth` levels deep under `dir` (as a
/// sandbox can build in its copy-on-write layer), quickly, from the host.
fn deep_chain(dir: &std::path::Path, depth: usize) {
    let script = format!(
        "import os\nos.makedirs({dir:?}, exist_ok=True)\nos.chdir({dir:?})\n\
         for _ in range({depth}):\n    os.mkdir('d'); os.chdir('d')\n\
         open('f', 'w').write('x')\n",
        dir = dir.display().to_string()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A copy-on-write layer nested deeper than the broker's open-files limit
/// is removed at destroy and at recovery alike, and the broker goes on
/// serving.
#[test]
fn trees_deeper_than_the_open_files_limit_are_torn_down_and_recovered() {
    let env = Env::new();
    let mut b = env.start_brokerd();
    let a = create(&env, &["--agent", "deep"]);
    let c = create(&env, &["--agent", "deep"]);
    let (aid, cid) = (a["id"].as_str().unwrap(), c["id"].as_str().unwrap());
    for id in [aid, cid] {
        deep_chain(
            &env.state.join("layers").join(id).join("upper/tmp/deep"),
            25_000,
        );
    }
    ok(&env.remote(&["rm", aid]));
    assert!(
        !env.state.join("layers").join(aid).exists(),
        "layer of {aid} left"
    );
    assert_eq!(
        ok(&env.remote(&["exec", cid, "--", "echo", "still"])),
        "still\n"
    );
    b.kill9();
    let _b2 = env.start_brokerd();
    env.assert_no_leftovers(None);
    env.audit_wait(&["--sandbox", cid], |r| {
        r["action"] == "recovered" && r["detail"]["problems"] == serde_json::json!([])
    });
}

/// A raw request on the API socket; the stream is returned for the test
/// to read from, or to drop.
fn raw_request(env: &Env, head_and_body: &str) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    s.write_all(head_and_body.as_bytes()).unwrap();
    s
}

/// A caller cannot hold the broker with a request: a body that is
/// declared but never sent times out, a huge environment is refused by
/// size, and neither keeps another caller waiting.
#[test]
fn slow_or_huge_requests_do_not_hold_the_broker() {
    use std::io::Read;
    let env = Env::new();
    let _b = env.start_brokerd();
    let info = create(&env, &[]);
    let id = info["id"].as_str().unwrap().to_string();
    // Declared 100 bytes, sent none.
    let mut stalled = raw_request(
        &env,
        "POST /v1/sandboxes HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n",
    );
    // Meanwhile another caller is served.
    let (code, _) = env.http("GET", "/v1/sandboxes", "");
    assert_eq!(code, 200);
    let env_entries: Vec<String> = (0..50_000).map(|i| format!("\"K{i}=v\"")).collect();
    let body = format!(
        r#"{{"argv": ["true"], "env": [{}]}}"#,
        env_entries.join(",")
    );
    let (code, resp) = env.http("POST", &format!("/v1/sandboxes/{id}/exec"), &body);
    assert_eq!(code, 400, "{resp}");
    assert!(resp.contains("argv and env hold"), "{resp}");
    let mut answer = String::new();
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = stalled.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request body not received"), "{answer}");
}

/// Hanging up ends the command, even one that prints nothing or is
/// stopped: nothing runs on without a client to hold it.
#[test]
fn a_closed_connection_ends_a_silent_or_stopped_command() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let _b = env.start_brokerd();
    let info = create(&env, &[]);
    let id = info["id"].as_str().unwrap().to_string();
    let base = info["host_uid_base"].as_u64().unwrap() as u32;
    for script in ["exec sleep 600", "kill -STOP $$; sleep 600"] {
        let body = format!(r#"{{"argv": ["sh", "-c", "{script}"]}}"#);
        let s = raw_request(
            &env,
            &format!(
                "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: a\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while !line.contains("started") {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "no start for {script}");
        }
        // The command runs (or is stopped) in the sandbox.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !procs_in_range(base).iter().any(|(p, _)| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"sleep") || c.starts_with(b"sh\0-c\0kill"))
        }) {
            assert!(Instant::now() < deadline, "command of {script} never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(r);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = env.http("GET", &format!("/v1/sandboxes/{id}"), "");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["execs_running"] == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{script} outlived its client: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// brokerd killed with SIGKILL while 32 creates and execs are in flight:
/// the next start leaves no mount, cgroup, directory or process behind,
/// and every write a command reported done is on disk.
#[test]
fn sigkill_under_load_leaves_nothing_and_loses_no_acknowledged_write() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let env = Env::with_extra("pool_size = 0\nmax_sandboxes = 40\nmax_sandboxes_per_agent = 40\n");
    let mut b = env.start_brokerd();
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..32)
        .map(|i| {
            let socket = env.socket.clone();
            let config = env.config.clone();
            let done = Arc::clone(&done);
            std::thread::spawn(move || -> (Option<String>, bool) {
                let airlock = |args: &[&str]| {
                    std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
                        .arg("--config")
                        .arg(&config)
                        .arg("--socket")
                        .arg(&socket)
                        .args(args)
                        .env_clear()
                        .stdin(Stdio::null())
                        .output()
                        .ok()
                };
                let Some(out) = airlock(&["--json", "create", "--agent", "load"]) else {
                    return (None, false);
                };
                let Some(id) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_string))
                else {
                    return (None, false);
                };
                let script = format!("echo {i} > /workspace/w{i} && echo done-{i}");
                let acked = airlock(&["exec", &id, "--", "sh", "-c", &script]).is_some_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains(&format!("done-{i}"))
                });
                if acked {
                    done.fetch_add(1, Ordering::SeqCst);
                }
                (Some(id), acked)
            })
        })
        .collect();
    // Kill once a few are done and the rest are in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let in_flight = 32 - done.load(Ordering::SeqCst);
    let mut zombie = b.kill9_unreaped();
    let results: Vec<(usize, (Option<String>, bool))> = workers
        .into_iter()
        .map(|w| w.join().unwrap())
        .enumerate()
        .collect();
    let mut b2 = env.start_brokerd();
    env.assert_no_leftovers(None);
    for (_, (id, _)) in &results {
        if let Some(id) = id {
            assert!(Env::cgroup_dirs(id).is_empty(), "cgroup of {id} left");
        }
    }
    let cfg = std::fs::read_to_string(&env.config).unwrap();
    let start: u32 = cfg
        .lines()
        .find_map(|l| l.strip_prefix("id_range_start = "))
        .unwrap()
        .parse()
        .unwrap();
    // Killed processes may take a moment to be reaped.
    for slot in 0..40 {
        env.assert_no_leftovers(Some(start + slot * 65536));
    }
    let (_, listed) = env.http("GET", "/v1/sandboxes", "");
    assert_eq!(listed.trim(), "[]");
    let ws = env.state.join("workspaces/load");
    let mut acked = 0;
    for (i, (_, ok)) in &results {
        if *ok {
            acked += 1;
            assert_eq!(
                std::fs::read_to_string(ws.join(format!("w{i}"))).unwrap(),
                format!("{i}\n"),
                "acknowledged write {i} lost"
            );
        }
    }
    eprintln!("{acked} of 32 writes acknowledged; {in_flight} in flight at the kill");
    assert!(
        in_flight >= 8,
        "too few in flight to show anything: {in_flight}"
    );
    b2.stop();
    zombie.wait().unwrap();
}

/// A flood of file changes is audited up to the budget and counted past
/// it, by the sandbox's own server: the broker receives a bounded stream.
#[test]
fn a_flood_of_file_events_is_counted_not_stored() {
    let env = Env::new();
    let out = env.run(&[
        "--",
        "python3",
        "-c",
        "import os\nfor i in range(12000):\n    open(f'/workspace/f{i}', 'w').close()\nprint('made')",
    ]);
    assert_eq!(ok(&out), "made\n");
    let rows = env.audit(&["--kind", "fs", "--limit", "100000"]);
    assert!(
        rows.len() < 12_000 && rows.len() >= 5000,
        "{} fs rows for 24,000 events",
        rows.len()
    );
    let limited = env.audit(&["--kind", "limit"]);
    let dropped: u64 = limited
        .iter()
        .filter(|r| r["action"] == "audit_rate_limited")
        .filter_map(|r| r["detail"]["dropped_fs_events"].as_u64())
        .sum();
    assert!(dropped > 0, "{limited:?}");
}

/// CPU time in clock ticks (utime + stime, all threads) of a process.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Serving a sandbox's file work costs the sandbox's own server (in its
/// cgroup, under its CPU limit), not the shared broker.
#[test]
fn file_work_is_charged_to_the_sandbox_not_the_broker() {
    let env = Env::new();
    let b = env.start_brokerd();
    let broker = b.0.as_ref().unwrap().id() as i32;
    let info = create(&env, &["--cpus", "0.25"]);
    let id = info["id"].as_str().unwrap().to_string();
    let server = fs_server_of(&id);
    let (broker_before, server_before) = (cpu_ticks(broker), cpu_ticks(server));
    let script = "import os\nos.makedirs('/tmp/m', exist_ok=True)\n\
                  for i in range(2500):\n    p = f'/tmp/m/{i}'\n    open(p, 'w').close()\n    os.stat(p)\n    os.rename(p, p + 'x')\n    os.unlink(p + 'x')\n\
                  print('done')";
    assert_eq!(
        ok(&env.remote(&["exec", &id, "--", "python3", "-c", script])),
        "done\n"
    );
    let broker_used = cpu_ticks(broker) - broker_before;
    let server_used = cpu_ticks(server) - server_before;
    eprintln!("server {server_used} ticks, broker {broker_used} ticks");
    assert!(
        server_used >= 20,
        "the server did little work: {server_used} ticks"
    );
    assert!(
        broker_used * 4 < server_used,
        "broker used {broker_used} ticks while the sandbox's server used {server_used}"
    );
}
