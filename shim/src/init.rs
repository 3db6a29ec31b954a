//! pid 1 of a sandbox.
//!
//! Theory of operation:
//! 1. wait until the launcher has written our id maps, then become uid/gid 0
//!    of the new user namespace (unprivileged on the host);
//! 2. build the view: run the mount [`plan`](crate::plan) (private
//!    propagation, fresh /proc, a minimal read-only /dev, pivot_root into the
//!    FUSE root, old root detached), set the hostname, bring up loopback;
//! 3. prepare the jail once: the landlock ruleset and the compiled seccomp
//!    program;
//! 4. self-test: fork a probe that jails itself exactly as a command would and
//!    checks from inside that the jail holds; report [`FromShim::Ready`] (or
//!    refuse to run anything);
//! 5. serve: for each exec request fork a child that takes its stdio, jails
//!    itself (capabilities, user, no_new_privs, landlock, seccomp), re-runs the
//!    self-test and only then execs. Reap every zombie, report exits, forward
//!    signals. When the broker's end of the channel closes, kill everything.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::waitpid;
use nix::unistd::{Gid, Pid, Uid};

use crate::channel::{Channel, ExitStatus, FromShim, ToShim};
use crate::landlock::PreparedLandlock;
use crate::selftest::{self, Expect, SelfTestReport};
use crate::spec::{DEFAULT_PATH, ExecRequest, SandboxSpec};
use crate::sys::{self, Forked};
use crate::{caps, landlock, mount, plan, seccomp};

/// What every exec child needs, prepared once.
struct Jail {
    landlock: PreparedLandlock,
    bpf: seccompiler::BpfProgram,
    floor: u8,
    rlimits: crate::spec::Rlimits,
    /// pid 1 runs under `bpf` itself, so exec children inherit it.
    seccomp_inherited: bool,
}

/// Runs pid 1; returns its exit code.
pub fn run(spec: &SandboxSpec, ctrl: Channel, go: OwnedFd) -> i32 {
    let mut b = [0u8; 1];
    let mut go = std::fs::File::from(go);
    if !matches!(go.read(&mut b), Ok(1)) {
        return 1;
    }
    drop(go);
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let mut clock = Stages::new();
    let jail = match setup(spec, &mut clock) {
        Ok(j) => j,
        Err(StageError { stage, error }) => {
            let stage = stage.to_string();
            let _ = ctrl.send(&FromShim::SetupFailed { stage, error }, &[]);
            return 1;
        }
    };
    let mut jail = jail;
    let mut listener: Option<OwnedFd> = None;
    let mut report = probe(&jail, spec.probe_user);
    clock.mark("probe");
    if report.passed {
        // pid 1 takes the sandbox filter too, once the probe has proved it.
        // pid 1 is the one process that keeps capabilities (in the user
        // namespace), so it meets the same deny list as every command; and
        // exec children inherit the filter instead of each loading it into
        // the kernel again (0.5 ms per exec).
        // With GPUs, the device proxy's filter goes first: every process
        // of the sandbox inherits it, and its listener goes to the broker.
        let installed = nix::sys::prctl::set_no_new_privs()
            .map_err(|e| format!("no_new_privs: {e}"))
            .and_then(|()| match &spec.gpu {
                Some(g) => sys::install_notify_filter(&g.filter)
                    .map(|fd| listener = Some(fd))
                    .map_err(|e| format!("device proxy filter: {e}")),
                None => Ok(()),
            })
            .and_then(|()| {
                seccomp::install_on_current_thread(&jail.bpf).map_err(|e| e.to_string())
            });
        match installed {
            Ok(()) => jail.seccomp_inherited = true,
            Err(e) => {
                report.passed = false;
                report.failures.push(format!("seccomp on pid 1: {e}"));
            }
        }
        clock.mark("seccomp-pid1");
    }
    let passed = report.passed;
    let ready = FromShim::Ready {
        selftest: Box::new(report),
        landlock_abi: jail.landlock.abi(),
        seccomp_profile: seccomp::PROFILE_VERSION.to_string(),
        stages_us: clock.done,
    };
    let fds: Vec<_> = listener.iter().map(AsFd::as_fd).collect();
    if ctrl.send(&ready, &fds).is_err() || !passed {
        return 1;
    }
    // pid 1 never answers its own notifications.
    drop(listener);
    serve(&ctrl, &jail)
}

/// Times setup stages for the Ready report.
struct Stages {
    last: std::time::Instant,
    done: Vec<(String, u64)>,
}

impl Stages {
    fn new() -> Stages {
        Stages {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    fn mark(&mut self, name: &str) {
        let now = std::time::Instant::now();
        let us = u64::try_from((now - self.last).as_micros()).unwrap_or(u64::MAX);
        self.done.push((name.to_string(), us));
        self.last = now;
    }
}

/// A set-up stage of pid 1 that failed, and why; reported to the broker
/// as [`FromShim::SetupFailed`].
#[derive(Debug)]
struct StageError {
    stage: &'static str,
    error: String,
}

fn stage<E: std::fmt::Display>(name: &'static str) -> impl FnOnce(E) -> StageError {
    move |e| StageError {
        stage: name,
        error: e.to_string(),
    }
}

fn setup(spec: &SandboxSpec, clock: &mut Stages) -> Result<Jail, StageError> {
    nix::unistd::setgroups(&[]).map_err(stage("setgroups"))?;
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(stage("become gid 0 in the user namespace"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(stage("become uid 0 in the user namespace"))?;
    mount::apply(&plan::plan(spec)).map_err(stage("mount"))?;
    clock.mark("mounts");
    nix::unistd::sethostname(&spec.hostname).map_err(stage("sethostname"))?;
    sys::bring_up_loopback().map_err(stage("bring up loopback"))?;
    clock.mark("uts+net");
    let gpu_nodes: Vec<String> = spec
        .gpu
        .iter()
        .flat_map(|g| g.nodes.iter().map(|(_, name)| name.clone()))
        .collect();
    let landlock = landlock::prepare(spec.landlock_floor, &gpu_nodes).map_err(stage("landlock"))?;
    clock.mark("landlock");
    let bpf = seccomp::compile_sandbox_profile().map_err(stage("seccomp"))?;
    clock.mark("seccomp");
    // Keep signals for the event loop; children restore the mask.
    let set = loop_signals();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(stage("sigprocmask"))?;
    // Nothing in the sandbox may ptrace or read the memory of pid 1.
    let _ = nix::sys::prctl::set_dumpable(false);
    Ok(Jail {
        landlock,
        bpf,
        floor: spec.landlock_floor,
        rlimits: spec.rlimits,
        seccomp_inherited: false,
    })
}

/// Applies the whole jail to the calling (forked) process and self-tests it.
fn jail_self(jail: &Jail, uid: u32, gid: u32) -> Result<SelfTestReport, String> {
    let keep = caps::caps_for(uid);
    caps::drop_bounding_and_ambient_except(keep).map_err(|e| format!("drop capabilities: {e}"))?;
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setresgid(g, g, g).map_err(|e| format!("setresgid {gid}: {e}"))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| format!("setresuid {uid}: {e}"))?;
    caps::keep_only(keep).map_err(|e| format!("drop capabilities: {e}"))?;
    caps::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    let status = jail
        .landlock
        .restrict_self()
        .map_err(|e| format!("landlock: {e}"))?;
    if !jail.seccomp_inherited {
        seccomp::install_on_current_thread(&jail.bpf).map_err(|e| format!("seccomp: {e}"))?;
    }
    let report = selftest::run(
        &Expect {
            fuse_root: true,
            landlock_floor: jail.floor,
            caps: keep,
        },
        Some(status),
    );
    if report.passed {
        Ok(report)
    } else {
        Err(format!(
            "jail self-test failed: {}",
            report.failures.join("; ")
        ))
    }
}

/// A report for a probe that could not even run: failed, with the reason
/// first and whatever the current process can still observe after it.
fn failed_report(why: String) -> SelfTestReport {
    let mut rep = selftest::run(
        &Expect {
            fuse_root: true,
            landlock_floor: 0,
            caps: 0,
        },
        None,
    );
    rep.passed = false;
    rep.failures.insert(0, why);
    rep
}

/// Forks a probe that jails itself as `user` and reports what it sees.
fn probe(jail: &Jail, user: (u32, u32)) -> SelfTestReport {
    let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return failed_report(format!("probe pipe: {e}")),
    };
    match sys::fork_single_threaded() {
        Err(e) => failed_report(format!("probe fork: {e}")),
        Ok(Forked::Child) => {
            drop(r);
            let report = match jail_self(jail, user.0, user.1) {
                Ok(rep) => rep,
                Err(why) => failed_report(why),
            };
            let mut f = std::fs::File::from(w);
            let _ = serde_json::to_writer(&mut f, &report);
            drop(f);
            sys::exit_now(0)
        }
        Ok(Forked::Parent(pid)) => {
            drop(w);
            let mut buf = Vec::new();
            let _ = std::fs::File::from(r).read_to_end(&mut buf);
            let _ = waitpid(pid, None);
            serde_json::from_slice(&buf)
                .unwrap_or_else(|e| failed_report(format!("probe report unreadable: {e}")))
        }
    }
}

struct Running {
    exec_id: u64,
}

/// Signals pid 1 takes through its signalfd: children, and requests to end.
fn loop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set
}

fn serve(ctrl: &Channel, jail: &Jail) -> i32 {
    let mask = loop_signals();
    let sfd = match SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    ) {
        Ok(s) => s,
        Err(_) => return 1,
    };
    let mut running: HashMap<Pid, Running> = HashMap::new();
    loop {
        let (ctrl_ready, sig_ready) = {
            let mut fds = [
                PollFd::new(ctrl.fd(), PollFlags::POLLIN),
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(_) => return shutdown(1),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            while let Ok(Some(info)) = sfd.read_signal() {
                let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                if signo == Signal::SIGTERM as i32
                    || signo == Signal::SIGINT as i32
                    || signo == Signal::SIGHUP as i32
                {
                    return shutdown(0);
                }
            }
            reap(ctrl, &mut running);
        }
        if ctrl_ready {
            match ctrl.recv::<ToShim>() {
                Ok((ToShim::Exec(req), fds)) => start_exec(ctrl, jail, req, fds, &mut running),
                Ok((ToShim::Signal { exec_id, signal }, _)) => {
                    for (pid, r) in &running {
                        if r.exec_id == exec_id {
                            // The exec leads its own process group.
                            if sys::kill_raw(-pid.as_raw(), signal).is_err() {
                                let _ = sys::kill_raw(pid.as_raw(), signal);
                            }
                        }
                    }
                }
                Ok((ToShim::Shutdown, _)) => return shutdown(0),
                Ok((ToShim::Spec(_), _)) => {}
                // The broker is gone: nothing may outlive it.
                Err(crate::channel::ChannelError::Closed) => return shutdown(0),
                Err(crate::channel::ChannelError::Malformed(_)) => {}
                Err(_) => return shutdown(1),
            }
        }
    }
}

fn reap(ctrl: &Channel, running: &mut HashMap<Pid, Running>) {
    loop {
        match sys::reap_any() {
            Ok(Some(sys::Reaped::Exited(pid, code))) => {
                report_exit(ctrl, running, Pid::from_raw(pid), Some(code), None);
            }
            Ok(Some(sys::Reaped::Signaled(pid, sig))) => {
                report_exit(ctrl, running, Pid::from_raw(pid), None, Some(sig));
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fn report_exit(
    ctrl: &Channel,
    running: &mut HashMap<Pid, Running>,
    pid: Pid,
    code: Option<i32>,
    signal: Option<i32>,
) {
    if let Some(r) = running.remove(&pid) {
        let _ = ctrl.send(
            &FromShim::Exited {
                exec_id: r.exec_id,
                status: ExitStatus { code, signal },
            },
            &[],
        );
    }
}

fn shutdown(code: i32) -> i32 {
    // pid 1 is immune to its own kill(-1); every other process in the pid
    // namespace dies, and with pid 1's exit the kernel reaps the rest.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    code
}

fn start_exec(
    ctrl: &Channel,
    jail: &Jail,
    req: ExecRequest,
    fds: Vec<OwnedFd>,
    running: &mut HashMap<Pid, Running>,
) {
    let exec_id = req.exec_id;
    let fail = |error: String, code: i32| {
        let _ = ctrl.send(
            &FromShim::ExecFailed {
                exec_id,
                error,
                code,
            },
            &[],
        );
    };
    if fds.len() != 3 {
        return fail(
            format!("expected 3 stdio descriptors, got {}", fds.len()),
            126,
        );
    }
    if req.argv.is_empty() {
        return fail("empty argv".into(), 126);
    }
    let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return fail(format!("pipe: {e}"), 126),
    };
    match sys::fork_single_threaded() {
        Err(e) => fail(format!("fork: {e}"), 126),
        Ok(Forked::Child) => {
            drop(r);
            exec_child(jail, &req, fds, w)
        }
        Ok(Forked::Parent(pid)) => {
            drop(w);
            drop(fds);
            let mut msg = Vec::new();
            let _ = std::fs::File::from(r).read_to_end(&mut msg);
            if msg.is_empty() {
                running.insert(pid, Running { exec_id });
                let _ = ctrl.send(
                    &FromShim::Started {
                        exec_id,
                        pid: pid.as_raw(),
                    },
                    &[],
                );
            } else {
                let f =
                    serde_json::from_slice::<ExecFailure>(&msg).unwrap_or_else(|e| ExecFailure {
                        code: 126,
                        error: format!("malformed failure report from the exec child: {e}"),
                    });
                fail(f.error, f.code);
            }
        }
    }
}

/// Why an exec child could not run its command, as it tells pid 1 before
/// exiting: the status a shell would give (126, 127) and the reason.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ExecFailure {
    code: i32,
    error: String,
}

/// In the forked child: take stdio, jail, self-test, exec. Never returns.
fn exec_child(jail: &Jail, req: &ExecRequest, fds: Vec<OwnedFd>, status: OwnedFd) -> ! {
    let mut status = std::fs::File::from(status);
    let mut die = |code: i32, error: String| -> ! {
        // One JSON report on the close-on-exec pipe: nothing on it means
        // the execve succeeded.
        let report = ExecFailure { code, error };
        if let Ok(bytes) = serde_json::to_vec(&report) {
            let _ = status.write_all(&bytes);
        }
        sys::exit_now(code)
    };
    // Stdio first, then mark everything else close-on-exec.
    for (i, fd) in fds.iter().enumerate() {
        let target = i32::try_from(i).unwrap_or(0);
        if let Err(e) = sys::dup_onto(fd, target) {
            die(126, format!("dup2 stdio {i}: {e}"));
        }
    }
    drop(fds);
    if let Err(e) = sys::cloexec_from(3) {
        die(126, format!("close_range: {e}"));
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    sys::reset_signal_dispositions();
    let _ = nix::unistd::setsid();
    if req.tty
        && let Err(e) = sys::take_controlling_tty(0)
    {
        die(126, format!("make the terminal the command's own: {e}"));
    }
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(
        Resource::RLIMIT_NOFILE,
        jail.rlimits.nofile,
        jail.rlimits.nofile,
    );
    let _ = setrlimit(Resource::RLIMIT_CORE, jail.rlimits.core, jail.rlimits.core);
    if let Err(why) = jail_self(jail, req.uid, req.gid) {
        die(126, why);
    }
    if let Err(e) = nix::unistd::chdir(req.cwd.as_str()) {
        die(126, format!("chdir {}: {e}", req.cwd));
    }
    if let Some(op) = &req.file_op {
        // Jailed as a command would be: run the operation here instead of
        // an execve. Closing the report pipe empty says it started.
        drop(status);
        sys::exit_now(crate::files::run(op));
    }
    let to_c = |s: &str| std::ffi::CString::new(s).ok();
    let argv: Option<Vec<_>> = req.argv.iter().map(|a| to_c(a)).collect();
    let env: Option<Vec<_>> = req.env.iter().map(|a| to_c(a)).collect();
    let (Some(argv), Some(env)) = (argv, env) else {
        die(126, "argument or environment contains a NUL byte".into())
    };
    let prog = &req.argv[0];
    let candidates: Vec<String> = if prog.contains('/') {
        vec![prog.clone()]
    } else {
        let path = req
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{prog}"))
            .collect()
    };
    let mut last = nix::Error::ENOENT;
    for c in candidates {
        let Some(cpath) = to_c(&c) else { continue };
        // Only returns on failure.
        let Err(e) = nix::unistd::execve(&cpath, &argv, &env);
        if e != nix::Error::ENOENT && e != nix::Error::ENOTDIR {
            last = e;
        }
    }
    if last == nix::Error::ENOENT {
        die(127, format!("command not found: {prog}"))
    } else {
        die(126, format!("cannot execute {prog}: {last}"))
    }
}
