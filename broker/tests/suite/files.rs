//! The files API and `airlock cp`/`airlock watch`: a sandbox's files read,
//! written and changed from outside, with the sandbox's own rules, atomic
//! uploads, streamed copies and exact change streams.

use std::io::{BufRead, Read, Write};

use super::harness::{Env, create, ok, text};

fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Sends a raw request and returns (status, body bytes), reading until the
/// broker closes.
fn raw(env: &Env, head: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    let status = String::from_utf8_lossy(&out[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut body = out[split..].to_vec();
    // Chunked replies (streamed reads): undo the framing.
    if String::from_utf8_lossy(&out[..split])
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut plain = Vec::new();
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[nl + 2 + n + 2..];
        }
        body = plain;
    }
    (status, body)
}

fn put(env: &Env, id: &str, path: &str, data: &[u8]) -> (u16, String) {
    let head = format!(
        "PUT /v1/sandboxes/{id}/files/content?path={path} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    );
    let (code, body) = raw(env, &head, data);
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn get(env: &Env, path_and_query: &str) -> (u16, Vec<u8>) {
    raw(
        env,
        &format!("GET {path_and_query} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        b"",
    )
}

/// Files written, read (whole and by range), listed, stat'ed, made,
/// renamed and removed through the API, each resolved in the sandbox's
/// own tree: a host path is not reachable even through a symlink the
/// sandbox made, and every change is audited like one made inside.
#[test]
fn the_files_api_works_inside_the_sandbox_with_its_rules() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let id = create(&env, &[])["id"].as_str().unwrap().to_string();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (code, body) = put(&env, &id, "/workspace/d.bin", &data);
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["size"], 300_000);
    assert_eq!(st["type"], "file");
    let (code, back) = get(
        &env,
        &format!("/v1/sandboxes/{id}/files/content?path=/workspace/d.bin"),
    );
    assert_eq!(code, 200);
    assert!(back == data, "read back {} bytes", back.len());
    let (_, part) = get(
        &env,
        &format!("/v1/sandboxes/{id}/files/content?path=/workspace/d.bin&offset=1000&length=10"),
    );
    assert_eq!(part, &data[1000..1010]);
    // What the sandbox sees is what was written.
    let out = env.remote(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cksum < /workspace/d.bin; stat -c %a /workspace/d.bin",
    ]);
    let ours = std::process::Command::new("sh")
        .arg("-c")
        .arg("cksum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(&data)?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        format!("{}644\n", text(&ours.stdout)),
        "{}",
        text(&out.stderr)
    );
    let change = |op: &str, body: serde_json::Value| {
        env.http(
            "POST",
            &format!("/v1/sandboxes/{id}/files/{op}"),
            &body.to_string(),
        )
    };
    assert_eq!(
        change(
            "mkdir",
            serde_json::json!({"path": "/workspace/a/b", "parents": true})
        )
        .0,
        200
    );
    assert_eq!(
        change(
            "rename",
            serde_json::json!({"from": "/workspace/d.bin", "to": "/workspace/a/b/e.bin"})
        )
        .0,
        200
    );
    assert_eq!(
        change(
            "symlink",
            serde_json::json!({"path": "/workspace/l", "target": "a/b/e.bin"})
        )
        .0,
        200
    );
    let (code, list) = env.http(
        "GET",
        &format!("/v1/sandboxes/{id}/files/list?path=/workspace"),
        "",
    );
    assert_eq!(code, 200, "{list}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let mut names: Vec<(String, String)> = list
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("a".to_string(), "dir".to_string()),
            ("l".to_string(), "symlink".to_string())
        ]
    );
    let (code, st) = env.http(
        "GET",
        &format!("/v1/sandboxes/{id}/files/stat?path=/workspace/l"),
        "",
    );
    assert_eq!(code, 200);
    assert!(st.contains(r#""target":"a/b/e.bin""#), "{st}");
    // Reads follow the sandbox's own symlinks, inside its tree.
    let (_, via) = get(
        &env,
        &format!("/v1/sandboxes/{id}/files/content?path=/workspace/l&length=4"),
    );
    assert_eq!(via, &data[..4]);
    assert_eq!(
        change(
            "remove",
            serde_json::json!({"path": "/workspace/a", "recursive": true})
        )
        .0,
        200
    );
    // A host file is out of reach, by name or through a symlink to it.
    let secret = env.state.parent().unwrap().join("secret.txt");
    std::fs::write(&secret, "TOP-SECRET").unwrap();
    let to_host = secret.display().to_string();
    assert_eq!(
        change(
            "symlink",
            serde_json::json!({"path": "/workspace/s", "target": to_host})
        )
        .0,
        200
    );
    for path in [
        to_host.as_str(),
        "/workspace/s",
        "/workspace/../../../../etc/shadow",
    ] {
        let (code, body) = get(
            &env,
            &format!("/v1/sandboxes/{id}/files/content?path={path}"),
        );
        assert_eq!(code, 404, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(!String::from_utf8_lossy(&body).contains("TOP-SECRET"));
    }
    // Bad input: clear errors naming it.
    for (url, status, says) in [
        (
            format!("/v1/sandboxes/{id}/files/content?path=workspace/x"),
            400,
            "must be absolute",
        ),
        (
            format!("/v1/sandboxes/{id}/files/content?path=/workspace"),
            409,
            "is a directory",
        ),
        (
            format!("/v1/sandboxes/{id}/files/list?path=/nope"),
            404,
            "No such file",
        ),
        (
            "/v1/sandboxes/0123456789ab/files/list?path=/".to_string(),
            404,
            "0123456789ab",
        ),
        (format!("/v1/sandboxes/{id}/files/content"), 400, "path"),
    ] {
        let (code, body) = get(&env, &url);
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(code, status, "{url}: {body}");
        assert!(error_of(&body).contains(says), "{url}: {body}");
    }
    // A FIFO in a file's place is refused at once, not read forever.
    let out = env.remote(&["exec", &id, "--", "mkfifo", "/workspace/fifo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t0 = std::time::Instant::now();
    let (code, body) = get(
        &env,
        &format!("/v1/sandboxes/{id}/files/content?path=/workspace/fifo"),
    );
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    assert!(error_of(&String::from_utf8_lossy(&body)).contains("not a regular file"));
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    // Changes made through the API are audited as the sandbox's (brokerd
    // commits rows in batches: wait for the last of them).
    let rows = env.audit_wait(&["--kind", "fs", "--sandbox", &id], |r| {
        r.to_string().contains("/workspace/s")
    });
    for want in ["/workspace/a/b/e.bin", "/workspace/s"] {
        assert!(
            rows.iter().any(|r| r.to_string().contains(want)),
            "{want} in {rows:?}"
        );
    }
    ok(&env.remote(&["rm", &id]));
}

/// An upload replaces its file only once every announced byte arrived:
/// one cut short leaves the old file whole and nothing else behind; one
/// that passes the disk quota fails with 507 and the same guarantee.
#[test]
fn interrupted_or_oversized_uploads_leave_the_previous_file_intact() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let id = create(&env, &["--disk", "8M"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(put(&env, &id, "/workspace/f", b"old contents").0, 200);
    // Announce 1 MiB, send 1000 bytes, hang up.
    {
        let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
        s.write_all(
            format!(
                "PUT /v1/sandboxes/{id}/files/content?path=/workspace/f HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                1 << 20
            )
            .as_bytes(),
        )
        .unwrap();
        s.write_all(&[b'x'; 1000]).unwrap();
    }
    // Past the quota.
    let (code, body) = put(&env, &id, "/workspace/f", &vec![b'y'; 12 << 20]);
    assert_eq!(code, 507, "{body}");
    assert!(error_of(&body).contains("No space left"), "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, list) = env.http(
            "GET",
            &format!("/v1/sandboxes/{id}/files/list?path=/workspace"),
            "",
        );
        let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&list)
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        if names == ["f"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {names:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, back) = get(
        &env,
        &format!("/v1/sandboxes/{id}/files/content?path=/workspace/f"),
    );
    assert_eq!(back, b"old contents");
    // Without a length, nothing is written.
    let (code, body) = raw(
        &env,
        &format!(
            "PUT /v1/sandboxes/{id}/files/content?path=/workspace/f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ),
        b"3\r\nabc\r\n0\r\n\r\n",
    );
    assert_eq!(code, 411, "{}", String::from_utf8_lossy(&body));
    ok(&env.remote(&["rm", &id]));
}

/// `airlock cp` copies a tree both ways, modes and symlinks kept, and a
/// destination directory receives the source under its own name;
/// `airlock watch` reports changes made inside, as they happen.
#[test]
fn cp_round_trips_a_tree_and_watch_follows_changes() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let id = create(&env, &[])["id"].as_str().unwrap().to_string();
    let here = tempfile::tempdir().unwrap();
    let src = here.path().join("proj");
    std::fs::create_dir_all(src.join("sub/deep")).unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    let big: Vec<u8> = (0..(3 << 20) as u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(src.join("sub/big.bin"), &big).unwrap();
    std::os::unix::fs::symlink("run.sh", src.join("link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(src.join("sub/deep"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut watch = env
        .airlock()
        .arg("--socket")
        .arg(&env.socket)
        .args(["watch", &id, "/workspace"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    ok(&env.remote(&["cp", src.to_str().unwrap(), &format!("{id}:/workspace")]));
    let out = env.remote(&["exec", &id, "--", "sh", "-c", "/workspace/proj/link; stat -c %a /workspace/proj/run.sh /workspace/proj/sub/deep; rm /workspace/proj/run.sh"]);
    assert_eq!(
        text(&out.stdout),
        "ran\n750\n700\n",
        "{}",
        text(&out.stderr)
    );
    let back = here.path().join("back");
    std::fs::create_dir(&back).unwrap();
    ok(&env.remote(&[
        "cp",
        &format!("{id}:/workspace/proj"),
        back.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(back.join("proj/sub/big.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read_link(back.join("proj/link")).unwrap(),
        std::path::Path::new("run.sh")
    );
    assert_eq!(
        std::fs::metadata(back.join("proj/sub/deep"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert!(!back.join("proj/run.sh").exists());
    // A single file to a new name.
    ok(&env.remote(&[
        "cp",
        &format!("{id}:/workspace/proj/sub/big.bin"),
        here.path().join("one").to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(here.path().join("one")).unwrap(), big);
    let err = env.remote(&[
        "cp",
        &format!("{id}:/workspace/nope"),
        here.path().to_str().unwrap(),
    ]);
    assert!(!err.status.success());
    assert!(
        text(&err.stderr).contains("/workspace/nope"),
        "{}",
        text(&err.stderr)
    );
    // The watch saw the upload's files appear and the removal inside.
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen.push(l.clone());
        if l.starts_with("removed") && l.ends_with("/workspace/proj/run.sh") {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.starts_with("created") && l.ends_with("/workspace/proj/sub/deep")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("renamed") && l.ends_with("-> /workspace/proj/sub/big.bin")),
        "{seen:?}"
    );
    let _ = watch.kill();
    let _ = watch.wait();
    ok(&env.remote(&["rm", &id]));
}
