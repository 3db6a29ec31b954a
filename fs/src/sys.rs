//! The crate's only unsafe code: syscalls that neither cap-std nor rustix wrap.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `fchmodat2(fd, "", mode, AT_EMPTY_PATH)`: chmod the inode behind an
/// `O_PATH` descriptor, so a symlink swapped in between checking and
/// changing can never redirect the chmod (plain fchmodat follows symlinks).
pub(crate) fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    const SYS_FCHMODAT2: libc::c_long = 452;
    // SAFETY: the syscall only reads its arguments: a live borrowed fd (the
    // borrow keeps it open for the call), a pointer to a static NUL-terminated
    // empty string, and two integers. No memory is written.
    let rc = unsafe {
        libc::syscall(
            SYS_FCHMODAT2,
            fd.as_raw_fd(),
            c"".as_ptr(),
            mode as libc::c_uint,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOSYS) {
        // Kernels before 6.6: go through the fd's magic link in procfs. The
        // path names our own descriptor, never sandbox input.
        use std::os::unix::fs::PermissionsExt;
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        return std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    }
    Err(err)
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, u32)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;

/// Check that the kernel accepts backing files on this FUSE connection:
/// register an empty memfd as a backing file and close the id again.
/// Fails with EPERM or EOPNOTSUPP where passthrough was not granted.
pub(crate) fn probe_backing(dev: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsFd;
    let memfd = rustix::fs::memfd_create(c"airlock-probe", rustix::fs::MemfdFlags::CLOEXEC)?;
    let id = fuser::BackingId::create_raw(dev.as_fd(), memfd.as_fd())?;
    // SAFETY: the ioctl reads one u32 (the id, a live local) and writes
    // nothing; `dev` is a live /dev/fuse descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE as _, &id) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
