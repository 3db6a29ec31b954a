//! The launcher: the first shim process, started by the broker as host root.
//!
//! Theory of operation, in stages:
//! 1. read the [`SandboxSpec`] from the control channel (fd 3);
//! 2. join the sandbox's cgroup, so everything after is counted;
//! 3. `clone` into fresh user, mount, pid, ipc, uts, net and cgroup
//!    namespaces, with sandbox root's host uid as the effective id so the
//!    user namespace (and every per-user count charged through it) belongs
//!    to the sandbox, not to host root; the child becomes the sandbox's
//!    pid 1 ([`crate::init`]);
//! 4. write the child's uid/gid maps from here (only a process in the parent
//!    user namespace holding CAP_SETUID may map a range that is not its own),
//!    report the child's host pid, and release it;
//! 5. wait for pid 1 and exit with its status. If the launcher dies, pid 1
//!    gets SIGKILL (parent-death signal) and the kernel kills the whole pid
//!    namespace with it.

use std::io::Write;
use std::os::fd::OwnedFd;

use nix::sched::CloneFlags;
use nix::sys::wait::{WaitStatus, waitpid};

use crate::channel::{Channel, FromShim, ToShim};
use crate::spec::SandboxSpec;
use crate::sys::{self, Forked};

/// Namespaces every sandbox gets.
pub fn namespace_flags() -> CloneFlags {
    CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWCGROUP
}

fn setup_failed(ctrl: &Channel, stage: &str, error: impl std::fmt::Display) -> i32 {
    let _ = ctrl.send(
        &FromShim::SetupFailed {
            stage: stage.to_string(),
            error: error.to_string(),
        },
        &[],
    );
    1
}

/// Runs the launcher on the inherited control channel; returns the exit code.
pub fn run(ctrl: Channel) -> i32 {
    let spec = match ctrl.recv::<ToShim>() {
        Ok((ToShim::Spec(spec), _)) => *spec,
        Ok((other, _)) => return setup_failed(&ctrl, "read spec", format!("unexpected {other:?}")),
        Err(e) => return setup_failed(&ctrl, "read spec", e),
    };
    // No core dumps and no ptrace attach while we hold host root.
    let _ = nix::sys::prctl::set_dumpable(false);
    // "0" moves the calling thread; the launcher is single-threaded, so
    // that is the whole process (see Cgroup::join_files).
    for f in &spec.cgroup_procs {
        if let Err(e) = std::fs::write(f, "0") {
            return setup_failed(&ctrl, &format!("join cgroup {}", f.display()), e);
        }
    }
    let (go_r, go_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return setup_failed(&ctrl, "pipe", e),
    };
    // The user namespace is owned by whoever creates it, and the kernel
    // charges every per-user count made inside it (inotify instances and
    // watches, fanotify groups, mqueues, pending signals, nested
    // namespaces) to that owner on the host as well. Create it as sandbox
    // root's host uid, never as host root: a sandbox that exhausts its
    // counts then exhausts only its own.
    if let Err(e) = become_owner(&spec.ids) {
        return setup_failed(&ctrl, "switch to the sandbox's host ids", e);
    }
    let forked = sys::clone_fork(namespace_flags().bits());
    if let Ok(Forked::Parent(_)) | Err(_) = &forked
        && let Err(e) = restore_root()
    {
        if let Ok(Forked::Parent(child)) = &forked {
            let _ = nix::sys::signal::kill(*child, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(*child, None);
        }
        return setup_failed(&ctrl, "switch back to host root", e);
    }
    match forked {
        Err(e) => setup_failed(&ctrl, "clone namespaces", e),
        Ok(Forked::Child) => {
            drop(go_w);
            let code = crate::init::run(&spec, ctrl, go_r);
            sys::exit_now(code)
        }
        Ok(Forked::Parent(child)) => {
            drop(go_r);
            parent(&spec, ctrl, child, go_w)
        }
    }
}

/// Effective ids of sandbox root on the host, for creating the user
/// namespace. Real and saved ids stay 0, so the permitted capabilities
/// survive (only the effective set is cleared) and [`restore_root`] gets
/// them back; the child leaves this state when pid 1 sets all its ids.
fn become_owner(ids: &crate::spec::IdRange) -> nix::Result<()> {
    use nix::unistd::{Gid, Uid, setresgid, setresuid};
    let keep_u = Uid::from_raw(u32::MAX);
    let keep_g = Gid::from_raw(u32::MAX);
    setresgid(keep_g, Gid::from_raw(ids.gid_base), keep_g)?;
    setresuid(keep_u, Uid::from_raw(ids.uid_base), keep_u)
}

/// Back to host root (effective), with the effective capabilities again:
/// the launcher writes the id maps next, which needs CAP_SETUID and
/// CAP_SETGID in the host's user namespace.
fn restore_root() -> nix::Result<()> {
    use nix::unistd::{Gid, Uid, setresgid, setresuid};
    let keep_u = Uid::from_raw(u32::MAX);
    let keep_g = Gid::from_raw(u32::MAX);
    setresuid(keep_u, Uid::from_raw(0), keep_u)?;
    setresgid(keep_g, Gid::from_raw(0), keep_g)
}

fn write_maps(spec: &SandboxSpec, child: nix::unistd::Pid) -> std::io::Result<()> {
    let uid = format!("0 {} {}\n", spec.ids.uid_base, spec.ids.count);
    let gid = format!("0 {} {}\n", spec.ids.gid_base, spec.ids.count);
    std::fs::write(format!("/proc/{child}/uid_map"), uid)?;
    std::fs::write(format!("/proc/{child}/gid_map"), gid)
}

fn parent(spec: &SandboxSpec, ctrl: Channel, child: nix::unistd::Pid, go_w: OwnedFd) -> i32 {
    if let Err(e) = write_maps(spec, child) {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(child, None);
        return setup_failed(&ctrl, "write id maps", e);
    }
    if let Err(e) = ctrl.send(
        &FromShim::Launched {
            init_pid: child.as_raw(),
        },
        &[],
    ) {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(child, None);
        return setup_failed(&ctrl, "report launch", e);
    }
    // pid 1 owns the channel from here on.
    drop(ctrl);
    let mut go = std::fs::File::from(go_w);
    let _ = go.write_all(b"g");
    drop(go);
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(_) => return 1,
        }
    }
}

/// Entry point for the `__shim` role: fd 3 is the control channel.
pub fn main_with_fd3() -> i32 {
    match sys::own_inherited_fd(3) {
        Some(fd) => run(Channel::from_fd(fd)),
        None => {
            eprintln!("airlock shim: fd 3 (control channel) is not open");
            1
        }
    }
}
