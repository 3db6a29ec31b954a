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

/// A buffer for a nested (embedded-pointer) array, placed so that it ends
/// right at an inaccessible guard page: the driver copies as many bytes
/// as its own reading of the params says, and should that reading ever
/// differ from the proxy's (a count in other units, a longer element), a
/// copy past the end faults (the call fails with EFAULT) instead of
/// landing in the proxy's heap.
#[derive(Debug)]
pub struct GuardedBuf {
    map: *mut libc::c_void,
    map_len: usize,
    /// Offset of the data in the mapping.
    start: usize,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (no aliases are handed
// out beyond borrows of `self`), so it may move to another thread.
unsafe impl Send for GuardedBuf {}

impl GuardedBuf {
    /// A zeroed buffer of `len` bytes (at least one page is mapped, and
    /// the page after the data is the guard).
    ///
    /// # Errors
    /// `mmap`'s or `mprotect`'s error (ENOMEM past the cgroup's limit).
    pub fn new(len: usize) -> io::Result<Self> {
        const PAGE: usize = 4096;
        let data_pages = len.div_ceil(PAGE).max(1);
        let map_len = (data_pages + 1) * PAGE;
        // SAFETY: an anonymous private mapping at an address the kernel
        // picks; nothing else refers to it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let buf = Self {
            map,
            map_len,
            start: data_pages * PAGE - len,
            len,
        };
        // SAFETY: the last page lies inside the mapping made above.
        let rc = unsafe {
            libc::mprotect(
                map.cast::<u8>().add(data_pages * PAGE).cast(),
                PAGE,
                libc::PROT_NONE,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(buf)
    }

    /// The address the driver is given.
    pub fn addr(&self) -> u64 {
        self.as_slice().as_ptr() as u64
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `start + len` is at most the data pages' size, inside
        // the mapping, readable and writable, and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.map.cast::<u8>().add(self.start), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, borrowed exclusively through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.map.cast::<u8>().add(self.start), self.len) }
    }
}

impl Drop for GuardedBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no borrow of
        // it outlives `self`.
        unsafe {
            libc::munmap(self.map, self.map_len);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::GuardedBuf;

    /// Reads one byte at `addr` of this process as the driver would copy
    /// from a user pointer: Err on a fault.
    fn probe(addr: u64) -> Result<u8, nix::errno::Errno> {
        let mut b = [0u8; 1];
        let remote = [nix::sys::uio::RemoteIoVec {
            base: addr as usize,
            len: 1,
        }];
        nix::sys::uio::process_vm_readv(
            nix::unistd::getpid(),
            &mut [std::io::IoSliceMut::new(&mut b)],
            &remote,
        )
        .map(|_| b[0])
    }

    #[test]
    fn a_copy_past_a_nested_buffer_faults_instead_of_reaching_the_heap() {
        for len in [0usize, 1, 20, 4096, 4097, 1 << 20] {
            let mut b = GuardedBuf::new(len).unwrap();
            assert_eq!(b.as_slice().len(), len);
            assert!(b.as_slice().iter().all(|x| *x == 0));
            if len > 0 {
                b.as_mut_slice()[len - 1] = 7;
                assert_eq!(probe(b.addr() + len as u64 - 1), Ok(7));
            }
            assert_eq!(
                probe(b.addr() + len as u64),
                Err(nix::errno::Errno::EFAULT),
                "{len}"
            );
        }
    }
}
