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

/// Pins glibc's mmap threshold at 128 KiB for a network gateway: each
/// flow's two 256 KiB socket buffers are then always fresh mappings whose
/// pages are zero until touched (a short connection touches a few), never
/// heap blocks that calloc must clear whole (512 KiB per connection once
/// glibc's dynamic threshold has risen past them).
pub fn map_large_allocations() {
    const THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only changes allocator tunables; it is called first
    // thing in the gateway's entry point, before other threads exist, and
    // takes plain integers.
    let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
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

/// `mount_setattr(tree, "", AT_EMPTY_PATH, {MOUNT_ATTR_IDMAP, userns})`:
/// makes the detached mount `tree` (an `open_tree(OPEN_TREE_CLONE)`
/// result, not yet attached anywhere) show its files' owners through the
/// id maps of the user namespace `userns`: an owner stored as id `n` reads
/// as the host id that `n` maps to there, and a file created through the
/// mount by host id `h` is stored as the id that maps to `h`. Fails with
/// EINVAL where the filesystem does not support idmapped mounts.
pub fn idmap_mount(
    tree: std::os::fd::BorrowedFd<'_>,
    userns: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    /// `struct mount_attr` of <linux/mount.h> (size version 0, 32 bytes).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).unwrap_or(u64::MAX),
    };
    // SAFETY: the kernel reads `size_of::<MountAttr>()` bytes from `attr`,
    // a live local with the layout of `struct mount_attr`, and the static
    // NUL-terminated empty path; both descriptors are borrowed for the
    // call. Nothing of ours is written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Closes every descriptor of the calling process from 3 up except
/// those in `keep` (`close_range` over the gaps between them).
pub fn close_all_but(keep: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    let mut keep: Vec<u32> = keep.iter().filter_map(|&f| u32::try_from(f).ok()).collect();
    keep.sort_unstable();
    let mut first = 3u32;
    for k in keep {
        if k > first {
            close_range(first, k - 1)?;
        }
        first = first.max(k.saturating_add(1));
    }
    close_range(first, u32::MAX)
}

fn close_range(first: u32, last: u32) -> std::io::Result<()> {
    // SAFETY: close_range only closes descriptors. Its one caller is a
    // freshly forked helper (single-threaded) dropping what it inherited;
    // the Rust owners of those descriptors live on only in the parent, and
    // the helper never uses them (nor drops them: it leaves by _exit).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds the AF_PACKET socket `fd` to interface `index` (all protocols).
pub fn bind_packet(fd: std::os::fd::BorrowedFd<'_>, index: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex =
        i32::try_from(index).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the kernel reads `size_of::<sockaddr_ll>()` bytes from a live
    // local of that type; `fd` is borrowed for the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `PACKET_IGNORE_OUTGOING` on an AF_PACKET socket: it does not read back
/// the frames it sends itself.
pub fn packet_ignore_outgoing(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
    let one: libc::c_int = 1;
    // SAFETY: the kernel reads one int from a live local; `fd` is borrowed
    // for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            (&one as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets the size of the terminal on `fd` (TIOCSWINSZ): its foreground
/// process group gets SIGWINCH.
pub fn set_winsize(fd: std::os::fd::BorrowedFd<'_>, rows: u16, cols: u16) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, a live local;
    // the borrowed fd stays open for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The size (rows, columns) of the terminal on `fd`, if it is one.
pub fn winsize(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u16, u16)> {
    use std::os::fd::AsRawFd;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer, a live local;
    // the borrowed fd stays open for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Registers an owned descriptor with tokio's reactor.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: an OwnedFd owns its descriptor: it stays open and is the same
    // for the OwnedFd's whole life, which the AsyncFd now holds.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}
