//! The only way this crate touches host files: single validated components
//! opened relative to a directory handle, with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` or
//! `*at(AT_SYMLINK_NOFOLLOW)`. No symlink is ever followed, no mount below a
//! layer root is ever entered (a procfs or cgroupfs mounted inside a
//! caller's workspace stays out of reach: EXDEV), and no host path is ever
//! built from sandbox input.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use cap_std::fs::Dir;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};

use crate::error::{OpError, OpResult};
use crate::policy::Name;

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// The host base's root when it is a union of mounts (a confined server's
/// private root, whose `usr`, `etc`... are bind mounts of their own): the
/// one directory whose children may be on another mount.
static UNION_ROOT: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Marks `dir` (the host base's root) as [`UNION_ROOT`].
pub(crate) fn set_union_root(dir: impl AsFd) {
    if let Ok(st) = rustix::fs::fstat(dir) {
        let _ = UNION_ROOT.set((st.st_dev, st.st_ino));
    }
}

fn is_union_root(dir: impl AsFd) -> bool {
    UNION_ROOT
        .get()
        .is_some_and(|id| rustix::fs::fstat(dir).is_ok_and(|st| (st.st_dev, st.st_ino) == *id))
}

/// openat2 of one component; never follows a symlink (ELOOP instead), and
/// never enters another mount, except from the base's union root into one
/// of its top-level directories.
pub(crate) fn open_at(dir: impl AsFd, name: &Name, flags: OFlags, mode: u32) -> OpResult<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let dir = dir.as_fd();
    match rustix::fs::openat2(
        dir,
        name.as_os_str(),
        flags,
        Mode::from_raw_mode(mode),
        RESOLVE,
    ) {
        Err(e) if e == rustix::io::Errno::XDEV && is_union_root(dir) => Ok(rustix::fs::openat2(
            dir,
            name.as_os_str(),
            flags,
            Mode::from_raw_mode(mode),
            RESOLVE.difference(ResolveFlags::NO_XDEV),
        )?),
        other => Ok(other?),
    }
}

pub(crate) fn open_file(dir: impl AsFd, name: &Name, flags: OFlags, mode: u32) -> OpResult<File> {
    Ok(File::from(open_at(dir, name, flags, mode)?))
}

/// Open a child directory.
pub(crate) fn open_dir(dir: impl AsFd, name: &Name) -> OpResult<Arc<Dir>> {
    let fd = open_at(dir, name, OFlags::DIRECTORY | OFlags::RDONLY, 0)?;
    Ok(Arc::new(Dir::from_std_file(File::from(fd))))
}

/// An `O_PATH` handle on a child, for fd-based metadata changes.
pub(crate) fn open_path(dir: impl AsFd, name: &Name) -> OpResult<OwnedFd> {
    open_at(dir, name, OFlags::PATH, 0)
}

/// lstat of one component; `None` when absent.
pub(crate) fn stat_at(dir: impl AsFd, name: &Name) -> OpResult<Option<Stat>> {
    match rustix::fs::statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::NOTDIR => Ok(None),
        Err(e) => Err(OpError::Sys(e)),
    }
}

/// ELOOP: the component is a symlink (which we refuse to follow).
pub(crate) fn is_loop(e: &OpError) -> bool {
    matches!(e, OpError::Sys(e) if *e == rustix::io::Errno::LOOP)
}
