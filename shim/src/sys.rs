//! The shim's raw system calls: each is a small function whose `SAFETY`
//! comment names the invariant it relies on. Everything else in the crate uses
//! safe `nix` wrappers.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// Takes ownership of a descriptor that `recvmsg` just installed via
/// `SCM_RIGHTS`.
pub fn own_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` into our table for this message and
    // nothing else holds it; we are its only owner from here on.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What a fork-like call returned.
#[derive(Debug, Clone, Copy)]
pub enum Forked {
    /// We are the new process.
    Child,
    /// We are the caller; the child's pid.
    Parent(Pid),
}

/// `clone(flags | SIGCHLD)` with fork semantics: the child continues on a
/// copy of our stack. Used to enter new namespaces (a new pid namespace only
/// takes effect for children).
///
/// Callers must be single-threaded: the child holds a copy of every lock.
pub fn clone_fork(flags: libc::c_int) -> Result<Forked, Errno> {
    let flags = libc::c_ulong::try_from(flags | libc::SIGCHLD).map_err(|_| Errno::EINVAL)?;
    // SAFETY: raw clone with a null stack behaves as fork(2): the child gets a
    // copy-on-write copy of the address space including the stack. The shim is
    // single-threaded (no runtime, no helper threads), so no lock is held by a
    // thread that does not exist in the child.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(
            i32::try_from(pid).map_err(|_| Errno::EOVERFLOW)?,
        ))),
    }
}

/// fork(2) for the single-threaded shim.
pub fn fork_single_threaded() -> Result<Forked, Errno> {
    // SAFETY: the shim never starts threads, so the child cannot inherit a
    // lock held by another thread; after fork the child only runs our jail
    // code and then execve or _exit.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
    }
}

/// Marks every descriptor from `first` up close-on-exec, so nothing but
/// stdio crosses into the sandboxed program.
pub fn cloexec_from(first: u32) -> Result<(), Errno> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on
    // descriptors; it touches no memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    Errno::result(ret).map(drop)
}

/// Ends the process at once without running destructors or atexit handlers
/// (a forked child must not flush buffers it shares with its parent).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is always safe to call; it never returns.
    unsafe { libc::_exit(code) }
}

/// Sets IFF_UP on the loopback interface of the current network namespace.
pub fn bring_up_loopback() -> Result<(), Errno> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags inside `req`,
    // which lives for the whole call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(ret)?;
    // SAFETY: the union was just filled as flags by SIOCGIFFLAGS.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    // SAFETY: SIOCSIFFLAGS reads `req`, which lives for the whole call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    Errno::result(ret).map(drop)
}

/// Takes ownership of a descriptor inherited at exec (the control channel on
/// fd 3), marking it close-on-exec. `None` if it is not open.
pub fn own_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return None;
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open (F_GETFD succeeded) and was handed to this
    // process at exec for the shim's exclusive use; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Restores default dispositions of signals the Rust runtime changes
/// (SIGPIPE is ignored by std at start-up; ignored dispositions survive exec).
pub fn reset_signal_dispositions() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for s in [Signal::SIGPIPE, Signal::SIGXFSZ] {
        // SAFETY: installing SIG_DFL runs no code of ours in signal context.
        let _ = unsafe { signal(s, SigHandler::SigDfl) };
    }
}

/// dup2(fd, target): makes `target` (0, 1 or 2) a copy of `fd`, without
/// close-on-exec.
pub fn dup_onto(fd: &OwnedFd, target: RawFd) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 only manipulates the descriptor table; `target` is one of
    // the stdio slots this forked child is about to hand to the program, and
    // nothing in this process holds an owned handle to it.
    let ret = unsafe { libc::dup2(fd.as_raw_fd(), target) };
    Errno::result(ret).map(drop)
}

/// `prctl(option, arg2, 0, 0, 0)` for options that take one integer.
pub fn prctl_int(option: libc::c_int, arg2: libc::c_ulong) -> std::io::Result<libc::c_int> {
    let zero: libc::c_ulong = 0;
    // SAFETY: the options passed here (PR_CAPBSET_READ, PR_CAPBSET_DROP,
    // PR_CAP_AMBIENT with CLEAR_ALL) take only integer arguments; the kernel
    // dereferences no pointer, so no memory of ours is touched.
    let ret = unsafe { libc::prctl(option, arg2, zero, zero, zero) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `capset(2)` with effective, permitted and inheritable all empty.
pub fn capset_all_zero() -> std::io::Result<()> {
    capset_mask(0)
}

/// `capset(2)`: effective and permitted become exactly `mask` (bit n is
/// capability n), inheritable empty. Only lowers: the kernel refuses to add
/// a capability the thread does not hold.
pub fn capset_mask(mask: u64) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    #[allow(clippy::cast_possible_truncation)]
    let data = [
        Data {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        Data {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: `header` and `data` have the kernel's v3 layout
    // (`__user_cap_header_struct` and two `__user_cap_data_struct`s, as v3
    // requires) and live until the call returns; capset only reads `data` and
    // may write `header.version`, which is a valid, exclusively borrowed u32.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capset,
            std::ptr::addr_of_mut!(header),
            data.as_ptr(),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`.
pub fn landlock_version() -> libc::c_long {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the
    // kernel only returns the ABI number (or -1/errno); it reads and writes
    // no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    }
}

/// Whether `signal` is a signal number a command may be sent: 1 to
/// SIGRTMAX, real-time signals included (which `nix::Signal` cannot
/// name).
pub fn is_signal(signal: i32) -> bool {
    (1..=libc::SIGRTMAX()).contains(&signal)
}

/// `kill(pid, signal)` with a raw signal number (real-time ones too);
/// a negative `pid` names a process group.
pub fn kill_raw(pid: i32, signal: i32) -> Result<(), Errno> {
    if !is_signal(signal) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 { Ok(()) } else { Err(Errno::last()) }
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// It exited with this code.
    Exited(i32, i32),
    /// A signal (any number, real-time ones included) killed it.
    Signaled(i32, i32),
}

/// Reaps one ended child without blocking: `Ok(None)` when none has ended
/// (or none is left). Unlike `nix::waitpid`, a child killed by a
/// real-time signal is reported, not turned into an error after its
/// status was consumed.
pub fn reap_any() -> Result<Option<Reaped>, Errno> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one int into `status`, a live local.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            return match Errno::last() {
                Errno::ECHILD => Ok(None),
                e => Err(e),
            };
        }
        if pid == 0 {
            return Ok(None);
        }
        if libc::WIFEXITED(status) {
            return Ok(Some(Reaped::Exited(pid, libc::WEXITSTATUS(status))));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Some(Reaped::Signaled(pid, libc::WTERMSIG(status))));
        }
        // Stopped or continued (not asked for): look again.
    }
}

/// Makes the terminal on `fd` the calling session leader's controlling
/// terminal (TIOCSCTTY), so the line discipline signals its foreground
/// process group (Ctrl-C) and job control works.
pub fn take_controlling_tty(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal) and
    // touches no memory of ours.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) };
    if rc == 0 { Ok(()) } else { Err(Errno::last()) }
}

/// Installs the classic BPF program `filter` on the calling thread with
/// `SECCOMP_FILTER_FLAG_NEW_LISTENER` and returns the listener: the
/// calls the program answers with `SECCOMP_RET_USER_NOTIF` wait for
/// whoever holds it. The caller has set no_new_privs (or holds
/// CAP_SYS_ADMIN in its user namespace).
pub fn install_notify_filter(filter: &[crate::spec::BpfInsn]) -> Result<OwnedFd, Errno> {
    let mut insns: Vec<libc::sock_filter> = filter
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let prog = libc::sock_fprog {
        len: u16::try_from(insns.len()).map_err(|_| Errno::E2BIG)?,
        filter: insns.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `insns.len()` initialised instructions that
    // live until the call returns; the kernel copies the program and does
    // not keep the pointer. The program itself is checked by the kernel's
    // verifier (a malformed one is refused with EINVAL, nothing runs).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if ret < 0 {
        return Err(Errno::last());
    }
    let fd = RawFd::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: with NEW_LISTENER the call returns a new descriptor that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
