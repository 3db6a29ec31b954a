//! The broker's only raw libc calls.
#![allow(unsafe_code)]

/// Pins glibc's mmap threshold at 1 MiB.
///
/// Every sandbox's filesystem session allocates multi-MiB request buffers
/// per thread. glibc raises its mmap threshold dynamically when such a
/// block is freed, after which the next ones come from per-thread arenas:
/// zeroed by calloc (so resident at once) and never returned to the system
/// when the sandbox goes. Measured: 20 idle sandboxes cost 355 MB of broker
/// RSS that stayed after destroy. With a fixed threshold, large blocks are
/// always fresh mappings, untouched until used and unmapped on free.
pub fn tune_allocator() {
    const ONE_MIB: libc::c_int = 1 << 20;
    // SAFETY: mallopt only changes allocator tunables; it is called first
    // thing in main, before other threads exist, and takes plain integers.
    let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_MIB) };
}

/// Runs `f` on a thread of its own whose filesystem identity is a caller's:
/// fsuid `uid`, fsgid `gid` and supplementary `groups`. The kernel then
/// applies that caller's permissions (ACLs included) to every path `f`
/// resolves. The thread ends with `f`, so no other work ever runs with
/// that identity.
pub fn as_caller<T: Send + 'static>(
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let worker = std::thread::Builder::new().name("as-caller".into()).spawn(
        move || -> std::io::Result<T> {
            thread_setgroups(&groups)?;
            // SAFETY: setfsgid/setfsuid take integers and change only this
            // thread's credentials (glibc does not broadcast them to other
            // threads); the thread exits when `f` returns.
            unsafe {
                libc::setfsgid(gid);
                libc::setfsuid(uid);
            }
            // They report the previous id, never an error: read back (-1
            // changes nothing) to know they took.
            // SAFETY: as above.
            let (now_uid, now_gid) =
                unsafe { (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX)) };
            if u32::try_from(now_uid).ok() != Some(uid) || u32::try_from(now_gid).ok() != Some(gid)
            {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(f())
        },
    )?;
    worker
        .join()
        .map_err(|_| std::io::Error::other("caller-identity thread panicked"))?
}

/// `setgroups(2)` for the calling thread only: the raw system call, since
/// glibc's wrapper changes every thread of the process.
fn thread_setgroups(groups: &[u32]) -> std::io::Result<()> {
    // SAFETY: the kernel reads `groups.len()` gid_t values from a live
    // slice of u32 (gid_t is u32 on Linux) and changes only this thread's
    // credentials.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
