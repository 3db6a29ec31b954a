//! The HTTP API on the Unix socket: errors, authz by SO_PEERCRED.

use std::os::unix::fs::PermissionsExt;

use super::harness::{Env, text};

#[test]
fn bad_requests_get_4xx_with_a_named_error_and_create_nothing() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let (code, body) = env.http("POST", "/v1/sandboxes", r#"{"agnet": "x"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("agnet"), "{body}");
    let (code, body) = env.http("POST", "/v1/sandboxes", r#"{"limits": {"pids": 1}}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("pids"), "{body}");
    let (code, body) = env.http("POST", "/v1/sandboxes/nope/exec", r#"{"argv": ["true"]}"#);
    assert_eq!(code, 404, "{body}");
    let (code, body) = env.http("GET", "/v1/audit?kind=bogus", "");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("bogus"), "{body}");
    let (code, body) = env.http("GET", "/v1/sandboxes", "");
    assert_eq!((code, body.trim()), (200, "[]"));
    env.assert_no_leftovers(None);
}

#[test]
fn exec_streams_ndjson_over_the_socket() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let (code, body) = env.http("POST", "/v1/sandboxes", "{}");
    assert_eq!(code, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, body) = env.http(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        r#"{"argv": ["sh", "-c", "echo out; echo err >&2; exit 4"], "stdin": "ignored"}"#,
    );
    assert_eq!(code, 200, "{body}");
    // chunked transfer encoding wraps the lines; look for the events.
    assert!(body.contains(r#""type":"stdout","data":"out\n""#), "{body}");
    assert!(body.contains(r#""type":"stderr","data":"err\n""#), "{body}");
    assert!(body.contains(r#""type":"exit","code":4"#), "{body}");
    let (code, _) = env.http("DELETE", &format!("/v1/sandboxes/{id}"), "");
    assert_eq!(code, 200);
}

#[test]
fn unmapped_peer_uid_is_refused_and_audited() {
    let env = Env::with_extra("pool_size = 0\n[[agents]]\nname = \"alice\"\nuids = [4001]\n");
    let _b = env.start_brokerd();
    // A caller with an unmapped uid (the socket is 0666 in this config so
    // the refusal comes from SO_PEERCRED, not file permissions).
    let out = airlock_as(4242, &env)
        .arg("ls")
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("uid 4242 is not mapped"),
        "{}",
        text(&out.stderr)
    );
    // The refusal is decided at accept: a silent unmapped client is
    // answered and closed without sending a byte, not left to hold the
    // connection until the header timeout.
    let probe = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect({:?}); print(s.recv(200).decode().split()[1])",
        env.socket.display().to_string()
    );
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "4242",
            "--regid",
            "4242",
            "--clear-groups",
            "python3",
            "-c",
        ])
        .arg(&probe)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "403", "{}", text(&out.stderr));
    // A mapped user sees only their agent; another agent's name is refused.
    let out = airlock_as(4001, &env)
        .args(["create", "--agent", "bob"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("may not act for agent \"bob\""),
        "{}",
        text(&out.stderr)
    );
    // Owning a directory is not enough: one inside a tree the caller cannot
    // enter (root's 0700 directory) is refused, with the reason.
    let closed = tempfile::Builder::new()
        .prefix("closed-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let inner = closed.path().join("mine");
    std::fs::create_dir(&inner).unwrap();
    std::os::unix::fs::chown(&inner, Some(4001), Some(4001)).unwrap();
    let out = airlock_as(4001, &env)
        .args(["create", "--agent", "alice", "--workspace"])
        .arg(&inner)
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    // brokerd commits in batches; another process sees the rows shortly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let rows = env.audit(&["--kind", "auth"]);
        if rows.iter().any(|r| r["detail"]["uid"] == 4242) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no auth row: {rows:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Every path and method in broker/openapi.yaml is routed (none falls to
/// the "no such endpoint" fallback or 405), and an unknown path is not.
#[test]
fn routes_match_the_openapi_file() {
    let spec = include_str!("../../openapi.yaml");
    let env = Env::new();
    let _b = env.start_brokerd();
    let mut path = None;
    let mut checked = 0;
    for line in spec.lines() {
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end_matches(':')));
            continue;
        }
        let Some(m) = ["get", "post", "delete", "put"]
            .iter()
            .find(|m| line == format!("    {m}:"))
        else {
            continue;
        };
        let Some(p) = &path else { continue };
        let mut url = p
            .replace("{id}", "nope")
            .replace("{exec_id}", "1")
            .replace("{op}", "mkdir");
        if url == "/v1/events" {
            // A stream that never ends: a bad filter shows it is routed.
            url.push_str("?kind=nope");
        }
        let (code, body) = env.http(&m.to_uppercase(), &url, "{}");
        assert!(
            code != 405 && !body.contains("no such endpoint"),
            "{m} {url}: {code} {body}"
        );
        checked += 1;
    }
    assert!(
        checked >= 8,
        "only {checked} operations found in openapi.yaml"
    );
    let (code, body) = env.http("GET", "/v1/nothing-here", "");
    assert_eq!(code, 404);
    assert!(body.contains("no such endpoint"), "{body}");
    // The other way: every path the router serves is in the file.
    let router = include_str!("../../src/api/server.rs");
    let documented: Vec<&str> = spec
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| l.starts_with('/'))
        .map(|l| l.trim_end_matches(':'))
        .collect();
    let mut routed = 0;
    for piece in router.split(".route(").skip(1) {
        let Some(path) = piece.split('"').nth(1) else {
            continue;
        };
        routed += 1;
        assert!(
            documented.contains(&path),
            "{path} is served but not in openapi.yaml"
        );
    }
    assert!(routed >= 20, "only {routed} routes found in server.rs");
}

/// A non-root caller swaps its own workspace directory for a symlink to a
/// root-only directory while asking for it: the broker must only ever serve
/// the directory it checked.
#[test]
fn workspace_swap_race_never_serves_a_directory_the_caller_does_not_own() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::with_extra("pool_size = 0\n[[agents]]\nname = \"alice\"\nuids = [4001]\n");
    let _b = env.start_brokerd();
    // The secret: root-only.
    let secret = tempfile::Builder::new()
        .prefix("secret-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(secret.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(secret.path().join("canary"), "TOP-SECRET").unwrap();
    // alice's playground: her dir `ws` and a symlink `ln` to the secret.
    let play = tempfile::Builder::new().prefix("race-").tempdir().unwrap();
    std::fs::set_permissions(play.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ws = play.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(4001), Some(4001)).unwrap();
    std::os::unix::fs::symlink(secret.path(), play.path().join("ln")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let dir = play.path().to_path_buf();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &dir.join("ws"),
                    nix::fcntl::AT_FDCWD,
                    &dir.join("ln"),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                );
            }
        })
    };
    let mut leaks = vec![];
    let mut served = 0;
    for _ in 0..25 {
        let out = airlock_as(4001, &env)
            .arg("run")
            .arg("--workspace")
            .arg(&ws)
            .args(["--", "sh", "-c", "cat /workspace/canary 2>/dev/null; true"])
            .env_clear()
            .output()
            .unwrap();
        if text(&out.stdout).contains("TOP-SECRET") {
            leaks.push(text(&out.stderr));
        }
        served += usize::from(out.status.success());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(leaks.is_empty(), "secret served {} times", leaks.len());
    assert!(
        served > 0,
        "the race never let a run through: nothing was tested"
    );
    // Asking for the secret directly is refused by name.
    let out = airlock_as(4001, &env)
        .arg("run")
        .arg("--workspace")
        .arg(secret.path())
        .args(["--", "true"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("may not use workspace")
            && text(&out.stderr).contains("owned by uid 0"),
        "{}",
        text(&out.stderr)
    );
}

/// `airlock --socket <env's socket>`, to be run as host uid and gid `id`
/// with no supplementary groups.
fn airlock_as(id: u32, env: &Env) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    let id = id.to_string();
    c.args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .arg("--socket")
        .arg(&env.socket);
    c
}

/// `airlock events` follows lifecycle events as they happen, in order, and
/// `GET /metrics` counts creates and commands and shows each running
/// sandbox's use; another agent's caller sees neither that sandbox's
/// events nor its series.
#[test]
fn events_stream_lifecycle_and_metrics_show_state_to_whoever_may_see_it() {
    use std::io::BufRead;
    let env = Env::with_extra("pool_size = 0\n[[agents]]\nname = \"alice\"\nuids = [4001]\n");
    let _b = env.start_brokerd();
    let follow = |c: &mut std::process::Command| {
        c.args(["--json", "events"])
            .env_clear()
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut mine = follow(env.airlock().arg("--socket").arg(&env.socket));
    let mut alices = follow(&mut airlock_as(4001, &env));
    // Both subscribed before anything happens (a subscription is made
    // when the request is served; an alice sandbox proves alice's is).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let id = super::harness::create(&env, &[])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.remote(&["exec", &id, "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    let (code, metrics) = env.http("GET", "/metrics", "");
    assert_eq!(code, 200, "{metrics}");
    for want in [
        "airlock_creates_total{result=\"ok\"} 1\n".to_string(),
        "airlock_execs_total{result=\"ok\"} 1\n".to_string(),
        "airlock_sandboxes{state=\"running\"} 1\n".to_string(),
        format!("airlock_sandbox_pids{{sandbox=\"{id}\",agent=\"root\"}}"),
        format!("airlock_sandbox_memory_bytes{{sandbox=\"{id}\",agent=\"root\"}}"),
        "airlock_exec_seconds_count 1\n".to_string(),
        "# EOF".to_string(),
    ] {
        assert!(metrics.contains(&want), "{want} in:\n{metrics}");
    }
    // The same scrape as alice (HTTP/1.0: the broker closes after it).
    let alice_metrics = std::process::Command::new("setpriv")
        .args(["--reuid", "4001", "--regid", "4001", "--clear-groups"])
        .args([
            "python3",
            "-c",
            "import socket, sys\n\
             s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n\
             s.sendall(b'GET /metrics HTTP/1.0\\r\\nHost: airlock\\r\\n\\r\\n')\n\
             out = b''\n\
             while (d := s.recv(65536)): out += d\n\
             print(out.decode())",
        ])
        .arg(&env.socket)
        .env_clear()
        .output()
        .unwrap();
    let alice_metrics = text(&alice_metrics.stdout);
    assert!(
        alice_metrics.contains("airlock_creates_total"),
        "{alice_metrics}"
    );
    assert!(!alice_metrics.contains(&id), "{alice_metrics}");
    super::harness::ok(&env.remote(&["rm", &id]));
    let mut lines = std::io::BufReader::new(mine.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(Ok(l)) = lines.next() {
        let ev: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(ev["sandbox_id"], id.as_str(), "{l}");
        let what = format!(
            "{}/{}",
            ev["kind"].as_str().unwrap(),
            ev["action"].as_str().unwrap()
        );
        if what == "exec/exit" {
            assert_eq!(ev["detail"]["exit_code"], 3, "{l}");
        }
        seen.push(what.clone());
        if what == "sandbox/destroy" {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "sandbox/create",
            "exec/start",
            "exec/exit",
            "sandbox/destroy"
        ]
    );
    let _ = mine.kill();
    let _ = mine.wait();
    // Alice's stream never carried root's sandbox: her own sandbox's
    // create is the first line it shows.
    let alice_sb = airlock_as(4001, &env)
        .args(["--json", "create"])
        .env_clear()
        .output()
        .unwrap();
    let alice_id = serde_json::from_str::<serde_json::Value>(&super::harness::ok(&alice_sb))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut lines = std::io::BufReader::new(alices.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["sandbox_id"], alice_id.as_str(), "{first}");
    assert_eq!(first["agent"], "alice", "{first}");
    let _ = alices.kill();
    let _ = alices.wait();
    let (code, _) = env.http("GET", "/v1/events?kind=fs", "");
    assert_eq!(code, 400);
}

/// Sends `req` as is and reads the answer until the connection closes (or
/// 10 s pass): its status and body.
fn raw(env: &Env, req: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let _ = s.write_all(req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

/// Each class of bad input gets its documented status and a JSON body
/// naming what was wrong, even what the HTTP layer refuses by itself;
/// limits that a sandbox could never meet are refused up front; and the
/// broker keeps serving.
#[test]
fn every_bad_request_gets_a_json_error_a_client_can_act_on() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let error = |body: &str| -> String {
        serde_json::from_str::<serde_json::Value>(body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {body}"))
            .to_string()
    };
    let long_uri = format!("GET /v1/{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000));
    let many_headers = format!(
        "GET /v1/health HTTP/1.1\r\nHost: a\r\n{}\r\n",
        (0..300)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect::<String>()
    );
    for (req, status, says) in [
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "malformed HTTP request"),
        (long_uri.into_bytes(), 414, "URI too long"),
        (many_headers.into_bytes(), 431, "headers too large"),
        (
            b"PUT /v1/health HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            405,
            "method PUT is not allowed on /v1/health",
        ),
        (
            b"GET /v1/audit?limit=lots HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            "limit",
        ),
        (
            b"POST /v1/sandboxes/0123456789ab/execs/x/signal HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            400,
            "`x`",
        ),
        (
            b"POST /v1/sandboxes HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999\r\n\r\n".to_vec(),
            413,
            "over the limit of 4194304 bytes",
        ),
    ] {
        let (code, body) = raw(&env, &req);
        assert_eq!(code, status, "{body}");
        let e = error(&body);
        assert!(e.contains(says), "{status}: {e}");
    }
    // An env no command could carry to the sandbox is refused at create.
    let big_env = serde_json::json!({"env": [format!("BIG={}", "x".repeat(100_000))]});
    let (code, body) = env.http("POST", "/v1/sandboxes", &big_env.to_string());
    assert_eq!(code, 400, "{body}");
    assert!(
        error(&body).contains("a sandbox's env may take at most"),
        "{body}"
    );
    let id = super::harness::create(&env, &["--env", &format!("MID={}", "y".repeat(40_000))])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A command that would not fit with the sandbox's env: a 400 naming
    // argv and env, never a 500 about the control channel.
    let exec = serde_json::json!({"argv": ["true", "z".repeat(120_000)], "env": [format!("E={}", "\u{1}".repeat(20_000))]});
    let (code, body) = env.http(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &exec.to_string(),
    );
    assert_eq!(code, 400, "{body}");
    assert!(error(&body).contains("argv and env"), "{body}");
    // timeout_secs 0 is no timeout, as for sandboxes.
    let (code, body) = env.http(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        r#"{"argv": ["sh", "-c", "sleep 1; echo done"], "timeout_secs": 0}"#,
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""data":"done\n""#), "{body}");
    assert!(body.contains(r#""code":0"#), "{body}");
    // Real-time signals reach a command.
    let waiting = env
        .airlock()
        .args(["--socket"])
        .arg(&env.socket)
        .args(["exec", &id, "--", "sleep", "30"])
        .spawn()
        .unwrap();
    let mut sent = (0, String::new());
    for _ in 0..100 {
        sent = env.http(
            "POST",
            &format!("/v1/sandboxes/{id}/execs/2/signal"),
            r#"{"signal": 40}"#,
        );
        if sent.0 == 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(sent.0, 200, "{}", sent.1);
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 40));
    let (code, body) = env.http(
        "POST",
        &format!("/v1/sandboxes/{id}/execs/2/signal"),
        r#"{"signal": 99}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        error(&body).contains("signal 99 is not a signal number"),
        "{body}"
    );
    // A command a real-time signal kills from inside ends too (its exit
    // once went unreported, and the exec hung).
    let out = env.remote(&["exec", &id, "--", "sh", "-c", "kill -s RTMIN+6 $$"]);
    assert_eq!(out.status.code(), Some(128 + 40), "{}", text(&out.stderr));
    // Still serving.
    assert_eq!(env.http("GET", "/v1/health", "").0, 200);
    // One duration grammar: days work for a timeout as for --since.
    let out = env.remote(&["exec", &id, "--timeout", "1d", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    super::harness::ok(&env.remote(&["rm", &id]));
}

/// The CLI neither hangs on a server that never answers nor grows without
/// end on one that never stops.
#[test]
fn the_cli_bounds_what_it_reads_and_how_long_it_waits() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |name: &str, script: &str| {
        let sock = dir.path().join(name);
        let child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket, os\n\
                 s = socket.socket(socket.AF_UNIX); s.bind({:?}); s.listen(8)\n\
                 while True:\n\
                 \x20   c, _ = s.accept()\n\
                 \x20   try:\n\
                 {script}\n\
                 \x20   except OSError: pass",
                sock.display().to_string()
            ))
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        (sock, child)
    };
    let (silent, mut s1) = serve(
        "silent",
        "\x20       c.recv(65536); import time; time.sleep(60)",
    );
    let (endless, mut s2) = serve(
        "endless",
        "\x20       c.recv(65536)\n\
         \x20       c.sendall(b'HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\n\\r\\n[')\n\
         \x20       while True: c.sendall(b'1,' * 65536)",
    );
    let cli = |sock: &std::path::Path| {
        let t0 = std::time::Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
            .arg("--socket")
            .arg(sock)
            .arg("ls")
            .env_clear()
            .env("AIRLOCK_REPLY_TIMEOUT", "2s")
            .output()
            .unwrap();
        (out, t0.elapsed())
    };
    let (out, took) = cli(&silent);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("did not answer within 2s"),
        "{}",
        text(&out.stderr)
    );
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");
    let (out, _) = cli(&endless);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("at most 67108864 bytes"),
        "{}",
        text(&out.stderr)
    );
    let _ = s1.kill();
    let _ = s2.kill();
    let _ = s1.wait();
    let _ = s2.wait();
}
