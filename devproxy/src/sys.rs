//! The raw calls of the forwarder, each in one small function with the
//! invariant it relies on: receiving and answering seccomp notifications,
//! and issuing an ioctl with a block in this process's memory.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// One seccomp notification: which process, which syscall, its arguments.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    pub id: u64,
    pub pid: u32,
    pub syscall: i32,
    pub args: [u64; 6],
}

/// Waits for the next notification on `listener` (a seccomp listener fd).
///
/// # Errors
/// The ioctl's error: `ENOENT` when the notifying thread went away before
/// it was received, `EINTR`, or whatever makes `listener` unusable.
pub fn recv(listener: BorrowedFd<'_>) -> io::Result<Notification> {
    // SAFETY: `seccomp_notif` is plain data the kernel fills; it must be
    // zeroed before the call (the kernel refuses a dirty buffer with
    // EINVAL). The pointer is valid and exclusively ours for the call.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: SECCOMP_IOCTL_NOTIF_RECV writes exactly one `seccomp_notif`
    // through the pointer, which points at one.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV as _,
            &mut n as *mut libc::seccomp_notif,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Notification {
        id: n.id,
        pid: n.pid,
        syscall: n.data.nr,
        args: n.data.args,
    })
}

/// Whether notification `id` is still pending (its thread has not died
/// or been interrupted): checked after resolving its pid, so the pid
/// named the notifying thread and not a reused one.
pub fn still_pending(listener: BorrowedFd<'_>, id: u64) -> bool {
    let mut id = id;
    // SAFETY: SECCOMP_IOCTL_NOTIF_ID_VALID reads one u64 through the
    // pointer, which points at one.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &mut id as *mut u64,
        )
    };
    rc == 0
}

/// Asks the kernel to wake the notifying thread and the listener's
/// reader on the current CPU (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`,
/// Linux 6.6): a call and its answer then switch straight between the
/// two instead of crossing CPUs, which dominates a round trip on VMs.
///
/// # Errors
/// `EINVAL` on kernels without the flag (nothing changes then).
pub fn sync_wake_up(listener: BorrowedFd<'_>) -> io::Result<()> {
    /// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`.
    const SYNC_WAKE_UP: u64 = 1;
    // SAFETY: SECCOMP_IOCTL_NOTIF_SET_FLAGS takes the flags by value in
    // the argument; no memory is passed.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS as _,
            SYNC_WAKE_UP,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Answers notification `id`: the syscall returns `val`, or fails with
/// `errno` when it is non-zero.
///
/// # Errors
/// `ENOENT` when the notifying thread is gone (nothing to answer).
pub fn answer(listener: BorrowedFd<'_>, id: u64, val: i64, errno: i32) -> io::Result<()> {
    send(
        listener,
        libc::seccomp_notif_resp {
            id,
            val,
            error: if errno == 0 { 0 } else { -errno },
            flags: 0,
        },
    )
}

/// Lets notification `id`'s syscall run as made. Only for a call whose
/// safety depends neither on memory nor on which file the fd names (see
/// `forward`): by the time it runs, either may have changed.
///
/// # Errors
/// `ENOENT` when the notifying thread is gone.
pub fn answer_continue(listener: BorrowedFd<'_>, id: u64) -> io::Result<()> {
    send(
        listener,
        libc::seccomp_notif_resp {
            id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        },
    )
}

fn send(listener: BorrowedFd<'_>, mut r: libc::seccomp_notif_resp) -> io::Result<()> {
    // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one `seccomp_notif_resp`
    // through the pointer, which points at one.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND as _,
            &mut r as *mut libc::seccomp_notif_resp,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Issues `request` on `fd` with `block` as its argument. Returns the
/// ioctl's value, or the errno it failed with.
///
/// The block lives in this process; every pointer inside it was rewritten
/// by the caller to a buffer of this process sized as the plan says (the
/// driver dereferences them in the caller's address space, which is ours).
pub fn ioctl_block(fd: BorrowedFd<'_>, request: u32, block: &mut [u8]) -> Result<i64, i32> {
    // SAFETY: `block` is a live, exclusively borrowed buffer of exactly the
    // size encoded in `request` (the validator checked `_IOC_SIZE` ==
    // block length); the driver reads and writes at most that many bytes
    // through the pointer, and any pointers inside name buffers the caller
    // keeps alive across this call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::c_ulong::from(request) as _,
            block.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(i64::from(rc))
}
