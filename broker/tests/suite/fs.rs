//! The sandbox's filesystem: copy-on-write outside /workspace, persistence
//! and isolation of workspaces, ownership translation.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::harness::{Env, create, ok, text};

#[test]
fn writes_outside_workspace_vanish_and_workspace_persists_per_agent() {
    let env = Env::new();
    let out = env.run(&[
        "--agent",
        "a1",
        "--user",
        "root",
        "--",
        "sh",
        "-c",
        "echo cow > /usr/local/airlock-cow && echo tmp > /tmp/t && echo keep > /workspace/keep && cat /usr/local/airlock-cow",
    ]);
    assert_eq!(ok(&out), "cow\n");
    assert!(
        !std::path::Path::new("/usr/local/airlock-cow").exists(),
        "write reached the host"
    );
    let out = env.run(&[
        "--agent",
        "a1",
        "--",
        "sh",
        "-c",
        "cat /workspace/keep; ls /usr/local/airlock-cow /tmp/t 2>&1 | grep -c 'No such'",
    ]);
    assert_eq!(ok(&out), "keep\n2\n");
    let out = env.run(&[
        "--agent",
        "a2",
        "--",
        "sh",
        "-c",
        "ls -A /workspace | wc -l",
    ]);
    assert_eq!(ok(&out).trim(), "0", "another agent sees a1's workspace");
}

#[test]
fn host_workspace_ownership_is_translated_both_ways() {
    let env = Env::new();
    let ws = tempfile::Builder::new().prefix("ws-").tempdir().unwrap();
    std::os::unix::fs::chown(ws.path(), Some(4242), Some(4343)).unwrap();
    std::fs::write(ws.path().join("given"), "hi").unwrap();
    std::os::unix::fs::chown(ws.path().join("given"), Some(0), Some(0)).unwrap();
    let wsp = ws.path().display().to_string();
    let out = env.run(&[
        "--workspace",
        &wsp,
        "--",
        "sh",
        "-c",
        "stat -c '%u:%g' /workspace/given; echo made > /workspace/made; mkdir /workspace/d; cat /workspace/given",
    ]);
    assert_eq!(ok(&out), "1000:1000\nhi");
    for name in ["made", "d"] {
        let md = std::fs::metadata(ws.path().join(name)).unwrap();
        assert_eq!((md.uid(), md.gid()), (4242, 4343), "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(ws.path().join("made")).unwrap(),
        "made\n"
    );
    // Mutations in /workspace are audited.
    let rows = env.audit(&["--kind", "fs"]);
    assert!(
        rows.iter()
            .any(|r| r["detail"].to_string().contains("/workspace/made")),
        "{rows:?}"
    );
}

#[test]
fn daily_posix_operations_work() {
    let env = Env::new();
    let script = r#"
set -e
cd /workspace
mkdir -p a/b && echo 1 > a/b/f && mv a/b/f a/g && ln a/g a/h && ln -s g a/s
test "$(cat a/s)" = 1 && chmod 600 a/g && test "$(stat -c %a a/g)" = 600
truncate -s 3 a/h && test "$(stat -c %s a/g)" = 3
for i in $(seq 1 2000); do : > many_$i; done; test "$(ls | grep -c many_)" = 2000
python3 -c "
import mmap, os
f = open('/workspace/m', 'w+b'); f.write(b'x' * 4096); f.flush()
m = mmap.mmap(f.fileno(), 4096); m[0:5] = b'hello'; m.flush(); m.close(); f.close()
assert open('/workspace/m', 'rb').read(5) == b'hello'
os.fsync(os.open('/workspace/m', os.O_RDONLY))
"
rm -r a && test ! -e a
cd /tmp && echo t > t && mv t u && test "$(cat u)" = t
echo ok
"#;
    let out = env.run(&["--", "sh", "-c", script]);
    assert_eq!(ok(&out).trim(), "ok", "{}", text(&out.stderr));
}

#[test]
fn set_id_bits_never_reach_the_host_workspace() {
    // Workspace files are host files owned by the workspace's owner (root
    // here): a set-user-id bit planted from inside would run as root on
    // the host. chmod, a create mode and mkdir all lose the bits.
    let env = Env::new();
    let ws = tempfile::Builder::new().prefix("ws-").tempdir().unwrap();
    let wsp = ws.path().display().to_string();
    let script = r#"
cd /workspace
cp /bin/true t && chmod 4755 t && chmod g+s t
python3 -c "import os; os.close(os.open('/workspace/c', os.O_CREAT | os.O_WRONLY, 0o6755))"
mkdir d && chmod 3775 d
stat -c '%n %a' t c d
echo done
"#;
    for user in ["sandbox", "root"] {
        let s = run_in_workspace(&env, user, &wsp, script);
        assert!(s.contains("t 755\n"), "{user}: {s}");
        assert!(s.contains("c 755\n"), "{user}: {s}");
        // A directory keeps set-group-id (group inheritance) and sticky.
        assert!(s.contains("d 3775\n"), "{user}: {s}");
        for name in ["t", "c"] {
            let mode = std::fs::metadata(ws.path().join(name)).unwrap().mode();
            assert_eq!(mode & 0o6000, 0, "{user}: host {name} mode {mode:o}");
        }
        let mode = std::fs::metadata(ws.path().join("d")).unwrap().mode();
        assert_eq!(mode & 0o4000, 0, "{user}: host d mode {mode:o}");
        for name in ["t", "c", "d"] {
            let p = ws.path().join(name);
            if p.is_dir() {
                std::fs::remove_dir(p).unwrap();
            } else {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    let rows = env.audit(&["--kind", "denial"]);
    assert!(
        rows.iter()
            .any(|r| r["detail"].to_string().contains("set-id bits")),
        "{rows:?}"
    );
}

#[test]
fn workspace_files_of_other_host_users_keep_their_protection() {
    // The sandbox acts as the workspace directory's owner (4242 here): a
    // root file left in their checkout is no more open to it than to them.
    let env = Env::new();
    let ws = tempfile::Builder::new().prefix("ws-").tempdir().unwrap();
    std::os::unix::fs::chown(ws.path(), Some(4242), Some(4242)).unwrap();
    let secret = ws.path().join("secret");
    std::fs::write(&secret, "root-only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let public = ws.path().join("public");
    std::fs::write(&public, "read-only\n").unwrap();
    let wsp = ws.path().display().to_string();
    let script = r#"
cd /workspace
cat secret 2>/dev/null
chmod 666 secret 2>/dev/null && echo CHMOD-WORKED
echo more >> public 2>/dev/null && echo WRITE-WORKED
cat public
echo mine > new && cat new
echo done
"#;
    for user in ["sandbox", "root"] {
        let s = run_in_workspace(&env, user, &wsp, script);
        assert!(!s.contains("root-only"), "{user}: {s}");
        assert!(!s.contains("WORKED"), "{user}: {s}");
        assert!(s.contains("read-only\nmine\ndone"), "{user}: {s}");
    }
    assert_eq!(std::fs::read_to_string(&public).unwrap(), "read-only\n");
    assert_eq!(std::fs::metadata(&secret).unwrap().mode() & 0o777, 0o600);
    // What the sandbox made belongs to the workspace's owner.
    assert_eq!(
        std::fs::metadata(ws.path().join("new")).unwrap().uid(),
        4242
    );
}

#[test]
fn git_works_in_a_host_workspace() {
    // git writes objects with open(O_CREAT|O_EXCL|O_RDWR, 0444), renames,
    // links and chmods: the everyday test of a workspace's POSIX behaviour.
    let Some(git) = ["/usr/bin/git", "/usr/local/bin/git"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!("git is not installed on this host; nothing to run");
        return;
    };
    let env = Env::new();
    let ws = tempfile::Builder::new().prefix("ws-").tempdir().unwrap();
    std::os::unix::fs::chown(ws.path(), Some(4242), Some(4242)).unwrap();
    let wsp = ws.path().display().to_string();
    let script = format!(
        "set -e; cd /workspace; {git} init -q repo; cd repo; \
         {git} config user.email a@example.com; {git} config user.name agent; \
         echo hello > f; {git} add f; {git} commit -qm first; \
         echo more >> f; {git} commit -qam second; {git} log --oneline | wc -l"
    );
    let out = env.run(&["--workspace", &wsp, "--", "sh", "-c", &script]);
    assert_eq!(ok(&out).trim(), "2", "{}", text(&out.stderr));
    // The repository on the host belongs to the workspace's owner.
    let md = std::fs::metadata(ws.path().join("repo/.git/HEAD")).unwrap();
    assert_eq!(md.uid(), 4242);
}

/// Runs `script` with sh as `user` ("sandbox" or "root") with the host
/// directory `ws` as /workspace; its stdout (it must succeed).
fn run_in_workspace(env: &Env, user: &str, ws: &str, script: &str) -> String {
    ok(&env.run(&["--user", user, "--workspace", ws, "--", "sh", "-c", script]))
}

/// A file unlinked while open can still be truncated and written through
/// its descriptor, on the copy-on-write root and in /workspace (mkstemp,
/// unlink, ftruncate, mmap: what iperf3 and many runtimes do).
#[test]
fn an_unlinked_open_file_can_be_truncated_through_its_descriptor() {
    let env = Env::new();
    let script = r#"
import mmap, os, tempfile
for d in ("/tmp", "/workspace"):
    fd, p = tempfile.mkstemp(dir=d)
    os.unlink(p)
    os.ftruncate(fd, 8192)
    m = mmap.mmap(fd, 8192)
    m[:5] = b"hello"
    m.close()
    print(d, os.fstat(fd).st_size, os.pread(fd, 5, 0).decode())
"#;
    let out = env.run(&["--", "python3", "-c", script]);
    assert_eq!(ok(&out), "/tmp 8192 hello\n/workspace 8192 hello\n");
}

/// What a file opened, then unlinked or renamed over, still lets its
/// descriptor do; printed one line per step.
const OPEN_FILE_OUTLIVES_ITS_NAME: &str = r#"
import os, sys, tempfile
d = sys.argv[1]
p, q = os.path.join(d, "f"), os.path.join(d, "g")
fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"hello world")
os.unlink(p)
os.ftruncate(fd, 5)
os.fchmod(fd, 0o600)
os.utime(fd, (1000000000, 1000000000))
os.fsync(fd)
os.lseek(fd, 0, 0)
st = os.fstat(fd)
print(st.st_size, oct(st.st_mode & 0o777), int(st.st_mtime), os.read(fd, 100).decode())
os.posix_fallocate(fd, 0, 8192)
print(os.fstat(fd).st_size)
os.close(fd)
# Renamed over: the open file changes, the file now at the name does not.
fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"old")
with open(q, "w") as f:
    f.write("new")
os.rename(q, p)
os.fchmod(fd, 0o640)
os.ftruncate(fd, 1)
print(oct(os.stat(p).st_mode & 0o777), open(p).read(), os.fstat(fd).st_size, oct(os.fstat(fd).st_mode & 0o777))
os.close(fd)
# As CPython's SpooledTemporaryFile uses it: an unlinked temporary file,
# truncated through its descriptor.
t = tempfile.SpooledTemporaryFile(max_size=10, dir=d)
t.write(b"x" * 100)
t.truncate(20)
t.seek(0)
print(len(t.read()))
"#;

#[test]
fn open_files_outlive_their_names_in_the_workspace_and_on_the_root() {
    let env = Env::new();
    for (user, dir) in [
        ("sandbox", "/workspace"),
        ("sandbox", "/tmp"),
        ("root", "/tmp"),
    ] {
        let out = env.run(&[
            "--user",
            user,
            "--",
            "python3",
            "-c",
            OPEN_FILE_OUTLIVES_ITS_NAME,
            dir,
        ]);
        assert_eq!(
            ok(&out),
            "5 0o600 1000000000 hello\n8192\n0o644 new 1 0o640\n20\n",
            "{user} in {dir}: {}",
            text(&out.stderr)
        );
    }
}

/// pjdfstest's subset (scripts/pjdfstest.sh --subset) as sandbox root, in
/// /workspace and on the copy-on-write root: nothing fails but the
/// subtests scripts/pjdfstest-exceptions.txt lists with their reasons.
#[test]
fn pjdfstest_passes_as_root_but_for_the_listed_exceptions() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join("scripts/pjdfstest.sh"))
        .arg("--subset")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("root unexpected: none"), "{stdout}");
    assert!(stdout.contains("workspace unexpected: none"), "{stdout}");
}

/// Two sandboxes of one agent share its workspace live: what one changes
/// the other sees at once, not after its cached entries expire.
#[test]
fn sandboxes_of_one_agent_see_each_others_workspace_changes_at_once() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let a = create(&env, &[])["id"].as_str().unwrap().to_string();
    let b = create(&env, &[])["id"].as_str().unwrap().to_string();
    let sh = |id: &str, script: &str| ok(&env.remote(&["exec", id, "--", "sh", "-c", script]));
    sh(&a, "echo one > /workspace/f; mkdir -p /workspace/d");
    // b caches the file and the directory's entries.
    assert_eq!(
        sh(&b, "cat /workspace/f; ls /workspace/d | wc -l"),
        "one\n0\n"
    );
    for round in 0..20 {
        sh(
            &a,
            &format!(
                "echo {round}-longer-than-before >> /workspace/f; touch /workspace/d/n{round}"
            ),
        );
        let seen = sh(
            &b,
            "tail -n 1 /workspace/f; ls /workspace/d | wc -l; stat -c %s /workspace/f",
        );
        let size = sh(&a, "stat -c %s /workspace/f");
        assert_eq!(
            seen,
            format!("{round}-longer-than-before\n{}\n{size}", round + 1),
            "round {round}"
        );
    }
    sh(&a, "mv /workspace/f /workspace/g");
    assert_eq!(sh(&b, "ls /workspace"), "d\ng\n");
    sh(&a, "rm /workspace/g");
    assert_eq!(
        sh(&b, "test -e /workspace/g && echo there || echo gone"),
        "gone\n"
    );
}

/// A directory read while it changes (getdents in small steps, the
/// directory emptied and refilled under the reader, in the agent's
/// workspace and on the copy-on-write root, where directories are opened
/// without a request and read through cursors): every name that was
/// there throughout shows exactly once, none twice; a new reader sees
/// exactly what is there now; many half-read directories at once each
/// finish whole.
#[test]
fn directories_read_while_they_change_show_each_name_once() {
    let env = Env::new();
    let _b = env.start_brokerd();
    let id = create(&env, &[])["id"].as_str().unwrap().to_string();
    let script = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def chunk(fd, size=512):
    buf = ctypes.create_string_buffer(size)
    n = libc.syscall(217, fd, buf, size)  # getdents64
    assert n >= 0, ctypes.get_errno()
    out, i = [], 0
    while i < n:
        reclen = int.from_bytes(buf.raw[i + 16:i + 18], "little")
        name = buf.raw[i + 19:i + reclen].split(b"\0", 1)[0].decode()
        if name not in (".", ".."):
            out.append(name)
        i += reclen
    return out, n
def rest(fd):
    out = []
    while True:
        names, n = chunk(fd)
        if n == 0:
            return out
        out += names
for base in sys.argv[1:]:
    d = base + "/churn"
    os.makedirs(d)
    for i in range(3000):
        open("%s/f%d" % (d, i), "w").close()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    seen = []
    while len(seen) < 300:
        seen += chunk(fd)[0]
    for i in range(1000):
        os.unlink("%s/f%d" % (d, i))
        open("%s/g%d" % (d, i), "w").close()
    seen += rest(fd)
    os.close(fd)
    dup = sorted(n for n in set(seen) if seen.count(n) > 1)
    kept = set("f%d" % i for i in range(1000, 3000))
    missing = sorted(kept - set(seen))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    now = sorted(rest(fd))
    os.close(fd)
    want = sorted(kept | set("g%d" % i for i in range(1000)))
    # Many directories half read at once, then each read to its end.
    many = []
    for j in range(60):
        sub = "%s/m%d" % (base, j)
        os.makedirs(sub)
        for i in range(120):
            open("%s/e%d" % (sub, i), "w").close()
    for j in range(60):
        fd = os.open("%s/m%d" % (base, j), os.O_RDONLY | os.O_DIRECTORY)
        many.append((fd, chunk(fd, 256)[0]))
    whole = all(sorted(first + rest(fd)) == sorted("e%d" % i for i in range(120))
                for fd, first in many)
    print(base, "dup", dup[:5], "missing", missing[:5], "now", now == want, "many", whole)
"#;
    let out = ok(&env.remote(&[
        "exec",
        &id,
        "--",
        "python3",
        "-c",
        script,
        "/workspace",
        "/var/tmp",
    ]));
    assert_eq!(
        out,
        "/workspace dup [] missing [] now True many True\n\
         /var/tmp dup [] missing [] now True many True\n",
        "{out}"
    );
}
