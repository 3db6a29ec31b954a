//! Shared set-up: a private state directory, config and uid range per test.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One isolated broker environment.
pub struct Env {
    /// Keeps the directory alive for the test's duration.
    pub _dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
}

impl Env {
    /// An environment whose brokerd keeps no pre-started sandboxes (so
    /// leftover checks see only what a test made).
    pub fn new() -> Env {
        Env::with_extra("pool_size = 0\n")
    }

    pub fn with_extra(extra: &str) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("airlock-e2e-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let state = dir.path().join("state");
        let socket = dir.path().join("brokerd.sock");
        // Distinct uid ranges per test process and test, so parallel tests
        // never share ids.
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // 64 slots of 65536 ids each per environment.
        let start = 0x2000_0000u32 + (((std::process::id() % 100) * 64 + n) % 800) * 64 * 65536;
        let config = dir.path().join("brokerd.toml");
        std::fs::write(
            &config,
            format!(
                "socket = \"{}\"\nsocket_mode = \"0666\"\nstate_dir = \"{}\"\nid_range_start = {start}\n{}{extra}",
                socket.display(),
                state.display(),
                if extra.contains("max_sandboxes =") {
                    ""
                } else {
                    "max_sandboxes = 8\n"
                },
            ),
        )
        .unwrap();
        Env {
            _dir: dir,
            config,
            state,
            socket,
        }
    }

    /// `airlock --embedded --config ...` + args.
    pub fn airlock(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_airlock"));
        c.arg("--config").arg(&self.config);
        c.env_clear();
        c.stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut c = self.airlock();
        c.arg("--embedded").arg("run");
        c.args(args);
        c.output().unwrap()
    }

    /// `airlock --socket S` + args, against a running brokerd.
    pub fn remote(&self, args: &[&str]) -> Output {
        let mut c = self.airlock();
        c.arg("--socket").arg(&self.socket);
        c.args(args);
        c.output().unwrap()
    }

    pub fn start_brokerd(&self) -> Broker {
        // Owned by the guard from the start, so a failed start is reaped too.
        let broker = Broker(Some(
            Command::new(env!("CARGO_BIN_EXE_brokerd"))
                .arg("--config")
                .arg(&self.config)
                .env_clear()
                .env("AIRLOCK_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        // Up when it answers a request: a connect alone may reach the
        // listening socket of a killed predecessor whose last thread is
        // still exiting (nobody accepts there).
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if answers(&self.socket) {
                return broker;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "brokerd did not start listening on {}",
            self.socket.display()
        );
    }

    /// Audit rows as JSON, via the embedded broker's store.
    pub fn audit(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut c = self.airlock();
        c.arg("--embedded").arg("--json").arg("audit").args(args);
        let out = c.output().unwrap();
        assert!(out.status.success(), "audit failed: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Audit rows once `pred` holds for one of them: brokerd commits in
    /// batches, so another process sees its rows a few ms later.
    pub fn audit_wait(
        &self,
        args: &[&str],
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let rows = self.audit(args);
            if rows.iter().any(&pred) {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "no matching audit row in {rows:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A raw HTTP request on the API socket: (status, body).
    pub fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http_on(&self.socket, method, path, body)
    }

    /// Asserts nothing of any sandbox is left: mounts, cgroups, dirs, processes.
    pub fn assert_no_leftovers(&self, uid_base: Option<u32>) {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let st = self.state.display().to_string();
        assert!(
            !mounts.contains(&st),
            "mounts left under {st}:\n{}",
            mounts
                .lines()
                .filter(|l| l.contains(&st))
                .collect::<Vec<_>>()
                .join("\n")
        );
        for sub in ["sandboxes", "layers"] {
            let d = self.state.join(sub);
            if let Ok(rd) = std::fs::read_dir(&d) {
                let left: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
                assert!(left.is_empty(), "{} not empty: {left:?}", d.display());
            }
        }
        if let Some(base) = uid_base {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let procs = procs_in_range(base);
                if procs.is_empty() {
                    break;
                }
                assert!(Instant::now() < deadline, "processes left: {procs:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// cgroup directories named `id` under any hierarchy.
    pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
        let mut out = vec![];
        for h in ["memory", "pids", "cpu", "devices", "unified", ""] {
            let p = Path::new("/sys/fs/cgroup").join(h).join("airlock").join(id);
            if p.exists() {
                out.push(p);
            }
        }
        out
    }
}

/// Host processes whose real uid falls in a sandbox's range.
pub fn procs_in_range(base: u32) -> Vec<(i32, u32)> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if let Some(uid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok())
            && uid >= base
            && uid < base + 65536
        {
            out.push((pid, uid));
        }
    }
    out
}

/// Whether an API server answers on `socket` within a short while.
fn answers(socket: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(250)));
    let req = "GET /v1/sandboxes HTTP/1.1\r\nHost: airlock\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 ")
}

pub fn http_on(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: airlock\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The server may answer (and close) before reading a body it does not
    // need; what it answered is what counts.
    let _ = s.write_all(req.as_bytes());
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

pub struct Broker(pub Option<Child>);

impl Broker {
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL without reaping: the broker stays a zombie of the test
    /// process (as under a parent that is slow to reap) until the returned
    /// child is waited for.
    #[allow(clippy::zombie_processes)]
    pub fn kill9_unreaped(&mut self) -> Child {
        let mut c = self.0.take().unwrap();
        c.kill().unwrap();
        let pid = c.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .map(|x| x.1)
                .unwrap_or("")
                .chars()
                .next();
            if state == Some('Z') {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "brokerd {pid} did not die: {stat}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `airlock --json create` + args against brokerd; the sandbox's info.
pub fn create(env: &Env, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "create"];
    args.extend_from_slice(extra);
    let out = env.remote(&args);
    serde_json::from_str(&ok(&out)).unwrap()
}

/// Makes sure `bin` is on PATH, installing Debian's `package` if it is
/// not (the suite runs as root; the README promises no manual set-up).
pub fn require_tool(bin: &str, package: &str) {
    let found = |b: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found(bin) {
        return;
    }
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "(apt-get install -y --no-install-recommends {package} || \
                 (apt-get update && apt-get install -y --no-install-recommends {package})) >/dev/null 2>&1"
            ),
        ])
        .output();
    assert!(
        found(bin),
        "{bin} is needed and could not be installed (apt-get install {package}): {out:?}"
    );
}

/// A field of /proc/PID/status (`key` with its colon), trimmed.
pub fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The first process of sandbox `id`'s cgroup that `is` picks (given its
/// pid); panics naming the cgroup's processes if none.
pub fn process_in_cgroup_of(id: &str, is: impl Fn(i32) -> bool) -> i32 {
    let dirs = Env::cgroup_dirs(id);
    let procs = std::fs::read_to_string(dirs[0].join("cgroup.procs")).unwrap();
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .find(|p| is(*p))
        .unwrap_or_else(|| panic!("no such process in the cgroup of {id}: {procs}"))
}

/// Whether process `pid`'s argv\[0\] is `argv0`.
pub fn argv0_is(pid: i32, argv0: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .is_some_and(|a| a == argv0.as_bytes())
    })
}
