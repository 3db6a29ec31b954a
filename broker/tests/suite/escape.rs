//! Escape attempts: host files, identity, capabilities, denied syscalls.

use std::os::unix::fs::PermissionsExt;

use super::harness::{Env, ok, text};

const CANARY: &str = "airlock-canary-7f3a9c";

fn canary() -> (tempfile::TempDir, String) {
    let d = tempfile::Builder::new()
        .prefix("canary-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = d.path().join("secret");
    std::fs::write(&f, CANARY).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let p = f.display().to_string();
    (d, p)
}

#[test]
fn host_canary_is_unreachable_by_any_path() {
    let env = Env::new();
    let (_d, path) = canary();
    let rel = format!("../../../../../../..{path}");
    let script = format!(
        r#"
cd /workspace
for p in '{path}' '{rel}' '/proc/self/root{path}' '/proc/1/root{path}' '/proc/1/cwd/{rel}'; do
  cat "$p" 2>/dev/null && echo "LEAK via $p"
done
ln -s '{path}' abs 2>/dev/null; cat abs 2>/dev/null && echo LEAK-abs-symlink
ln -s '{rel}' relsym 2>/dev/null; cat relsym 2>/dev/null && echo LEAK-rel-symlink
cat /etc/shadow 2>/dev/null && echo LEAK-shadow
ls /etc/ssh 2>/dev/null | grep -q host_ && echo LEAK-ssh-keys
echo done
"#
    );
    for user in ["sandbox", "root"] {
        let out = env.run(&["--user", user, "--", "sh", "-c", &script]);
        let s = ok(&out);
        assert!(!s.contains(CANARY), "canary content leaked as {user}: {s}");
        assert!(!s.contains("LEAK"), "as {user}: {s}");
        assert!(s.contains("done"), "{s}");
    }
    // The hidden /etc entries were refused by the filesystem and audited.
    let rows = env.audit(&["--kind", "denial"]);
    assert!(
        rows.iter()
            .any(|r| r["detail"].to_string().contains("/etc/shadow")),
        "{rows:?}"
    );
}

/// Sandbox root's capabilities (in the sandbox's user namespace): what a
/// container's root holds over its own files and processes, nothing more.
const ROOT_CAPS_HEX: &str = "00000000a00004fb";

#[test]
fn identity_is_unprivileged_and_capabilities_are_only_roots_own() {
    let env = Env::new();
    for user in ["sandbox", "root"] {
        let out = env.run(&[
            "--user",
            user,
            "--",
            "sh",
            "-c",
            "grep -E '^(Uid|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status; cat /proc/self/uid_map",
        ]);
        let s = ok(&out);
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let line = s.lines().find(|l| l.starts_with(cap)).unwrap();
            let want = match (user, cap) {
                ("root", "CapPrm" | "CapEff" | "CapBnd") => ROOT_CAPS_HEX,
                _ => "0000000000000000",
            };
            assert!(line.ends_with(want), "{user}: {line}");
        }
        assert!(s.contains("NoNewPrivs:\t1"), "{s}");
        assert!(s.contains("Seccomp:\t2"), "{s}");
        let map = s.lines().last().unwrap();
        let cols: Vec<&str> = map.split_whitespace().collect();
        assert_eq!(cols[0], "0");
        assert_ne!(cols[1], "0", "sandbox root must not be host root: {map}");
        let uid_line = s.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let want = if user == "root" { "0" } else { "1000" };
        assert_eq!(uid_line.split_whitespace().nth(1), Some(want), "{uid_line}");
    }
}

#[test]
fn mountinfo_shows_no_host_paths() {
    let env = Env::new();
    let out = env.run(&["--", "cat", "/proc/self/mountinfo"]);
    let s = ok(&out);
    let state = env.state.display().to_string();
    assert!(!s.contains(&state), "{s}");
    assert!(!s.contains("/tmp/airlock-e2e"), "{s}");
    assert!(
        s.lines().any(|l| l.contains(" / / ") && l.contains("fuse")),
        "{s}"
    );
}

/// Calls each denied syscall family through ctypes and prints errno.
const PROBE: &str = r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def sc(name, nr, *args):
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    e = ctypes.get_errno()
    print(name, "ok" if r >= 0 else errno.errorcode.get(e, str(e)))
CLONE_NEWUSER = 0x10000000; CLONE_NEWNS = 0x20000
sc("mount", 165, 0, 0, 0, 0, 0)
sc("umount2", 166, 0, 0)
sc("pivot_root", 155, 0, 0)
sc("chroot", 161, 0)
sc("unshare_user", 272, CLONE_NEWUSER)
sc("unshare_ns", 272, CLONE_NEWNS)
sc("setns", 308, 0, 0)
sc("keyctl", 250, 0, 0, 0, 0, 0)
sc("add_key", 248, 0, 0, 0, 0, 0)
sc("request_key", 249, 0, 0, 0, 0)
sc("bpf", 321, 0, 0, 0)
sc("perf_event_open", 298, 0, 0, -1, -1, 0)
sc("userfaultfd", 323, 0)
sc("io_uring_setup", 425, 1, 0)
sc("kexec_load", 246, 0, 0, 0, 0)
sc("init_module", 175, 0, 0, 0)
sc("finit_module", 313, -1, 0, 0)
sc("delete_module", 176, 0, 0)
sc("open_by_handle_at", 304, -1, 0, 0)
sc("name_to_handle_at", 303, -1, 0, 0, 0, 0)
sc("reboot", 169, 0, 0, 0, 0)
sc("swapon", 167, 0, 0)
sc("swapoff", 168, 0)
sc("acct", 163, 0)
sc("clock_settime", 227, 0, 0)
sc("adjtimex", 159, 0)
sc("settimeofday", 164, 0, 0)
sc("syslog", 103, 3, 0, 0)
sc("iopl", 172, 3)
sc("ioperm", 173, 0, 1, 1)
sc("personality", 135, 0x0040000)
sc("socket_packet", 41, 17, 3, 0)
sc("socket_raw", 41, 2, 3, 1)
sc("socket_netlink_audit", 41, 16, 3, 9)
sc("ioctl_tiocsti", 16, 0, 0x5412, 0)
sc("ioctl_tioclinux", 16, 0, 0x541C, 0)
sc("clone3", 435, 0, 0)
sc("socket_inet", 41, 2, 1, 0)
sc("socket_unix", 41, 1, 1, 0)
"#;

#[test]
fn denied_syscall_families_fail_with_eperm() {
    let env = Env::new();
    for user in ["sandbox", "root"] {
        let out = env.run(&["--user", user, "--", "python3", "-c", PROBE]);
        let s = ok(&out);
        for line in s.lines() {
            let (name, res) = line.split_once(' ').unwrap();
            let want = match name {
                "clone3" => "ENOSYS",
                "socket_inet" | "socket_unix" => "ok",
                _ => "EPERM",
            };
            assert_eq!(res, want, "{user}: {name} gave {res}\n{s}");
        }
        assert!(s.lines().count() >= 38, "{s}");
    }
}

#[test]
fn jail_self_test_is_recorded() {
    let env = Env::new();
    ok(&env.run(&["--", "true"]));
    let rows = env.audit(&["--kind", "jail"]);
    let row = rows.last().expect("a jail row");
    assert_eq!(row["detail"]["passed"], true, "{row}");
    assert!(
        row["detail"]["landlock_abi"].as_u64().unwrap() >= 1,
        "{row}"
    );
    assert!(row["detail"]["seccomp_profile"].as_str().is_some(), "{row}");
    let _ = text(&[]);
}

#[test]
fn pid_1_runs_under_the_sandbox_filter_too() {
    // pid 1 keeps capabilities in the sandbox's user namespace: it must meet
    // the same seccomp deny list as commands, which inherit that one filter.
    let env = Env::new();
    let out = env.run(&[
        "--",
        "sh",
        "-c",
        "grep -E '^Seccomp(_filters)?:' /proc/1/status; echo --; grep -E '^Seccomp(_filters)?:' /proc/self/status",
    ]);
    let s = ok(&out);
    let (pid1, me) = s.split_once("--\n").unwrap();
    for part in [pid1, me] {
        assert!(part.contains("Seccomp:\t2"), "{s}");
        assert!(part.contains("Seccomp_filters:\t1"), "{s}");
    }
}

/// Host files placed in the base for one test, removed when dropped.
struct HostFiles(Vec<std::path::PathBuf>);

impl Drop for HostFiles {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir(p));
        }
    }
}

#[test]
fn host_private_base_files_stay_private_even_to_sandbox_root() {
    // The base shows host /etc. A file or directory only host root may
    // read must not become readable because the sandbox's root "owns" it.
    let env = Env::new();
    let tag = format!("{:x}", std::process::id() ^ 0x5eed);
    let file = std::path::PathBuf::from(format!("/etc/airlock-private-{tag}"));
    let dir = std::path::PathBuf::from(format!("/etc/airlock-private-dir-{tag}"));
    let inner = dir.join("inner");
    let _cleanup = HostFiles(vec![file.clone(), dir.clone(), inner.clone()]);
    std::fs::write(&file, CANARY).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(&inner, CANARY).unwrap();
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (f, d) = (file.display(), dir.display());
    let script = format!(
        r#"
cat {f} 2>/dev/null
cat {d}/inner 2>/dev/null
ls {d} 2>/dev/null
cp {f} /tmp/x 2>/dev/null && cat /tmp/x
chmod 644 {f} 2>/dev/null && echo CHMOD-WORKED && cat {f}
chmod 755 {d} 2>/dev/null; ls {d} 2>/dev/null; cat {d}/inner 2>/dev/null
python3 -c "print(open('{f}', 'rb').read())" 2>/dev/null
stat -c 'mode %a' {f}
echo replaced > {f} && chmod 600 {f} && cat {f}
echo done
"#
    );
    for user in ["root", "sandbox"] {
        let out = env.run(&["--user", user, "--", "sh", "-c", &script]);
        let s = ok(&out);
        assert!(
            !s.contains(CANARY),
            "private base file leaked to {user}: {s}"
        );
        assert!(!s.contains("CHMOD-WORKED"), "{user}: {s}");
        assert!(s.contains("done"), "{s}");
        if user == "root" {
            // Shown write-only: writing replaces it (nothing is read), and
            // the replacement is the sandbox's own to chmod and read.
            assert!(s.contains("mode 200\n"), "{s}");
            assert!(s.contains("replaced\n"), "{s}");
        }
    }
    // The host files are untouched.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), CANARY);
    // The refused copy-up (the chmod) is audited.
    let rows = env.audit(&["--kind", "denial"]);
    assert!(
        rows.iter().any(|r| {
            let d = r["detail"].to_string();
            d.contains(&format!("airlock-private-{tag}")) && d.contains("not readable")
        }),
        "{rows:?}"
    );
}

/// A directory swapped for a symlink to a host path, over and over, while
/// other threads open and list paths through it: the filesystem server
/// never follows a host symlink, so nothing outside is ever read, in the
/// workspace or on the copy-on-write root.
#[test]
fn a_directory_swapped_for_a_symlink_never_reaches_outside() {
    let env = Env::new();
    let (_d, path) = canary();
    let dir = std::path::Path::new(&path)
        .parent()
        .unwrap()
        .display()
        .to_string();
    let script = format!(
        r#"
import os, sys, threading, time
base = sys.argv[1]
os.makedirs(base + "/real", exist_ok=True)
open(base + "/real/secret", "w").write("inside")
stop = time.monotonic() + 2.0
seen = set()
def swap():
    while time.monotonic() < stop:
        for make in (lambda: os.symlink("{dir}", base + "/tmp-l"), lambda: os.symlink(base + "/real", base + "/tmp-l")):
            try:
                make(); os.rename(base + "/tmp-l", base + "/d")
            except OSError:
                pass
            try:
                os.unlink(base + "/d")
            except OSError:
                pass
            try:
                os.rename(base + "/real", base + "/d"); os.rename(base + "/d", base + "/real")
            except OSError:
                pass
def probe():
    while time.monotonic() < stop:
        for p in (base + "/d/secret", base + "/d/../d/secret"):
            try:
                with open(p) as f:
                    seen.add(f.read())
            except OSError:
                pass
        try:
            seen.update(os.listdir(base + "/d"))
        except OSError:
            pass
ts = [threading.Thread(target=swap)] + [threading.Thread(target=probe) for _ in range(3)]
for t in ts: t.start()
for t in ts: t.join()
print(sorted(seen))
"#
    );
    for base in ["/workspace/race", "/tmp/race"] {
        let out = env.run(&["--", "python3", "-c", &script, base]);
        let s = ok(&out);
        assert!(!s.contains(CANARY), "{base}: {s}");
        assert!(
            s.contains("inside"),
            "{base}: the race never hit the real directory: {s}"
        );
    }
}
