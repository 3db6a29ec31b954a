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

/// A backing id that a [`crate::BackingFiles`] registrar just registered
/// on `reply`'s connection, wrapped for `opened_passthrough`. The invariant
/// fuser asks of `wrap_backing`: the id is live on this very connection and
/// owned by nothing else. The caller hands it back to the registrar to
/// close (`BackingId::into_raw`), never to the wrapper's own drop.
pub(crate) fn wrap_delegated_backing(reply: &fuser::ReplyOpen, id: u32) -> fuser::BackingId {
    // SAFETY: see above; the registrar returned `id` for this connection
    // and this is its only wrapper.
    unsafe { reply.wrap_backing(id) }
}

/// `FUSE_DEV_IOC_BACKING_CLOSE` of `id` on the connection `dev`.
pub(crate) fn close_backing(dev: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    // SAFETY: the ioctl reads one u32 (the id, a live local) and writes
    // nothing; `dev` is a live descriptor borrowed for the call (a non-FUSE
    // descriptor fails with ENOTTY).
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE as _, &id) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Check that the kernel accepts backing files on this FUSE connection:
/// register an empty memfd as a backing file and close the id again.
/// Fails with EPERM or EOPNOTSUPP where passthrough was not granted.
pub(crate) fn probe_backing(dev: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsFd;
    let memfd = rustix::fs::memfd_create(c"airlock-probe", rustix::fs::MemfdFlags::CLOEXEC)?;
    let id = fuser::BackingId::create_raw(dev.as_fd(), memfd.as_fd())?;
    close_backing(dev.as_fd(), id)
}

/// The calling thread's filesystem identity switched to `(uid, gid)` until
/// dropped. While switched, the kernel checks and creates as that user:
/// a change of fsuid away from 0 also clears the thread's filesystem
/// capabilities (DAC override, chown, fowner, fsetid), restored on the way
/// back. Per thread: other threads of the process keep their identity.
#[derive(Debug)]
pub(crate) struct FsIds {
    uid: u32,
    gid: u32,
}

impl FsIds {
    /// Switches to `(uid, gid)`; fails if the kernel did not take it.
    pub(crate) fn switch(uid: u32, gid: u32) -> io::Result<FsIds> {
        let back = FsIds {
            uid: set_fsuid(u32::MAX),
            gid: set_fsgid(u32::MAX),
        };
        set_fsgid(gid);
        set_fsuid(uid);
        // setfsuid/setfsgid report the previous id, never an error: read
        // the ids back (-1 changes nothing) to know they were taken.
        if set_fsuid(u32::MAX) != uid || set_fsgid(u32::MAX) != gid {
            drop(back);
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(back)
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        set_fsuid(self.uid);
        set_fsgid(self.gid);
    }
}

/// `setfsuid(uid)` for the calling thread; returns the previous fsuid.
/// `u32::MAX` (-1) only reads it.
fn set_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid takes an integer and only changes this thread's
    // credentials; it touches no memory of ours.
    let prev = unsafe { libc::setfsuid(uid) };
    // An id of 2^31 or more comes back as a negative int: same bits.
    u32::from_ne_bytes(prev.to_ne_bytes())
}

/// `setfsgid(gid)` for the calling thread; returns the previous fsgid.
fn set_fsgid(gid: u32) -> u32 {
    // SAFETY: as for set_fsuid.
    let prev = unsafe { libc::setfsgid(gid) };
    u32::from_ne_bytes(prev.to_ne_bytes())
}

/// One page of a file mapped shared and read-write, seen as atomic words
/// (cross-process counters).
pub(crate) struct SharedWords {
    /// Start of the mapping: `LEN` bytes, page-aligned, valid until drop.
    map: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
}

// SAFETY: the mapping is only reached as `AtomicU64`s (Sync), and it
// lives as long as the value.
unsafe impl Send for SharedWords {}
// SAFETY: as above.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Bytes mapped.
    pub(crate) const LEN: usize = 4096;
    const WORDS: usize = Self::LEN / 8;

    /// Maps the first `LEN` bytes of `fd`. The caller has checked that the
    /// file is `LEN` bytes and sealed against shrinking, so every mapped
    /// byte stays backed (no SIGBUS).
    pub(crate) fn map(fd: BorrowedFd<'_>) -> io::Result<SharedWords> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a fresh mapping placed by the kernel (null hint) aliases
        // no Rust object; its bytes are only ever used as atomics.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let map = std::ptr::NonNull::new(p.cast::<std::sync::atomic::AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedWords { map })
    }

    /// Word `i` (the last one if `i` is past it).
    pub(crate) fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        let i = i.min(Self::WORDS - 1);
        // SAFETY: the mapping holds LEN bytes (page-aligned, so 8-aligned)
        // for as long as `self`; i < WORDS keeps the word inside it.
        unsafe { &*self.map.as_ptr().add(i) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: `map` came from mmap of LEN bytes and no reference into
        // it outlives `self` (`word` borrows `self`).
        unsafe {
            let _ = rustix::mm::munmap(self.map.as_ptr().cast(), Self::LEN);
        }
    }
}
