//! Removing a tree that a sandbox shaped, in constant memory and with a
//! constant number of descriptors, whatever its depth or width.
//!
//! `std::fs::remove_dir_all` recurses with one open descriptor per level:
//! a sandbox that nests 20,000 directories in its copy-on-write layer
//! made the broker run out of descriptors at teardown (failing other
//! tenants' requests meanwhile) and leave the layer behind; deeper still,
//! recursion is a stack overflow. [`remove_tree`] instead flattens: it
//! empties one directory at a time, moving each subdirectory it finds up
//! to the top (one rename, never a copy) and removing files, then removes
//! the emptied directory. Every directory is moved at most once, so the
//! work is linear in the number of entries; two descriptors are open at a
//! time; nothing about the tree is remembered but a counter.
//!
//! No symlink is followed (every open is `O_NOFOLLOW | O_DIRECTORY`
//! relative to a held descriptor), and nothing outside the tree is
//! touched: renames only move entries from inside the tree to its top.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, openat, renameat2};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Removes `path` and everything below it. A missing `path` is success.
///
/// # Errors
/// The first error that stops the removal (other than entries vanishing
/// under it).
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    // The path's directories are resolved without following a symlink: a
    // tree a sandbox shaped never redirects a removal elsewhere.
    let (Some(parent), Some(last)) = (path.parent(), path.file_name()) else {
        return Err(Errno::EINVAL.into());
    };
    let parent = match open_dir_nofollow(parent) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let top = match openat(&parent, last, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        // Not a directory (or a symlink): remove the entry itself.
        Err(Errno::ENOTDIR | Errno::ELOOP) => {
            return ignore_gone(unlinkat(&parent, last, UnlinkatFlags::NoRemoveDir));
        }
        Err(e) => return Err(e.into()),
    };
    let mut counter: u64 = 0;
    loop {
        let mut seen_any = false;
        for name in names(&top)? {
            seen_any = true;
            if !is_dir_at(&top, &name)? {
                ignore_gone(unlinkat(&top, name.as_c_str(), UnlinkatFlags::NoRemoveDir))?;
                continue;
            }
            let sub = match openat(&top, name.as_c_str(), flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            for child in names(&sub)? {
                if is_dir_at(&sub, &child)? {
                    move_to_top(&sub, &child, &top, &mut counter)?;
                } else {
                    ignore_gone(unlinkat(&sub, child.as_c_str(), UnlinkatFlags::NoRemoveDir))?;
                }
            }
            drop(sub);
            match unlinkat(&top, name.as_c_str(), UnlinkatFlags::RemoveDir) {
                // Refilled meanwhile: the next pass takes it again.
                Ok(()) | Err(Errno::ENOENT | Errno::ENOTEMPTY) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !seen_any {
            break;
        }
    }
    drop(top);
    ignore_gone(unlinkat(&parent, last, UnlinkatFlags::RemoveDir))
}

/// Opens directory `path` (`O_PATH`) without following a symlink in any
/// of its components.
///
/// # Errors
/// ELOOP for a symlink on the way, and the open's other errors.
pub fn open_dir_nofollow(path: &Path) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OpenHow, ResolveFlag, openat2};
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    Ok(openat2(nix::fcntl::AT_FDCWD, path, how)?)
}

/// The bytes allocated under `path` (itself included), never following a
/// symlink and never leaving its filesystem; entries that vanish or cannot
/// be read count nothing.
pub fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    if open_dir_nofollow(path).is_err() {
        return 0;
    }
    let Ok(top) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let dev = top.dev();
    let mut total = top.blocks().saturating_mul(512);
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else {
                continue;
            };
            if md.dev() != dev {
                continue;
            }
            total = total.saturating_add(md.blocks().saturating_mul(512));
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// The bytes allocated and the inodes under directory `path` (itself not
/// counted), as a filesystem server's quota counts them: each host inode
/// once (hard links), whiteouts not at all. Every directory is opened
/// without following a symlink on its whole path, so a tree a sandbox
/// reshapes meanwhile never leads the count elsewhere; one descriptor is
/// open at a time. Entries that vanish or cannot be reached (past
/// `PATH_MAX`) count nothing; `(0, 0)` when `path` is not a directory.
pub fn usage(path: &Path) -> (u64, u64) {
    use nix::sys::stat::{SFlag, fstatat};
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut linked = std::collections::HashSet::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(fd) = open_dir_nofollow(&dir) else {
            continue;
        };
        let Ok(mut d) = Dir::openat(
            fd.as_fd(),
            c".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        for entry in d.iter() {
            let Ok(entry) = entry else {
                break;
            };
            let name: &CStr = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let Ok(st) = fstatat(&fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            let is_dir = kind == SFlag::S_IFDIR;
            if (kind == SFlag::S_IFCHR && st.st_rdev == 0)
                || (!is_dir && st.st_nlink > 1 && !linked.insert(st.st_ino))
            {
                continue;
            }
            inodes += 1;
            if is_dir {
                stack.push(dir.join(OsStr::from_bytes(name.to_bytes())));
            } else {
                let blocks = u64::try_from(st.st_blocks).unwrap_or(0);
                bytes = bytes.saturating_add(blocks.saturating_mul(512));
            }
        }
    }
    (bytes, inodes)
}

/// The names in a directory, except `.` and `..`. One listing holds one
/// extra descriptor while it runs.
fn names(dir: &OwnedFd) -> std::io::Result<Vec<CString>> {
    let mut d = Dir::openat(
        dir.as_fd(),
        c".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        out.push(name.to_owned());
        // A listing is read whole before anything is changed, but never
        // more than a bounded batch: the outer loop comes back for the
        // rest, so a directory with millions of names costs no more memory.
        if out.len() >= BATCH {
            break;
        }
    }
    Ok(out)
}

/// Names taken from one directory per pass.
const BATCH: usize = 4096;

fn is_dir_at(dir: &OwnedFd, name: &CStr) -> std::io::Result<bool> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Moves `dir/name` to the top of the tree under a fresh name.
fn move_to_top(
    dir: &OwnedFd,
    name: &CStr,
    top: &OwnedFd,
    counter: &mut u64,
) -> std::io::Result<()> {
    loop {
        *counter += 1;
        let fresh = format!(".airlock-rm-{counter}");
        let fresh = OsStr::new(&fresh);
        match renameat2(
            dir,
            name,
            top,
            fresh.as_bytes(),
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn ignore_gone(r: nix::Result<()>) -> std::io::Result<()> {
    match r {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_symlink_on_the_way_redirects_nothing() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir_all(real.join("x")).unwrap();
        std::fs::write(real.join("x/file"), b"keep").unwrap();
        std::os::unix::fs::symlink(&real, t.path().join("link")).unwrap();
        assert!(remove_tree(&t.path().join("link/x")).is_err());
        assert_eq!(du(&t.path().join("link/x")), 0);
        assert!(open_dir_nofollow(&t.path().join("link")).is_err());
        assert_eq!(std::fs::read(real.join("x/file")).unwrap(), b"keep");
        // The link itself, named last, is removed as an entry.
        remove_tree(&t.path().join("link")).unwrap();
        assert!(real.join("x/file").exists());
    }

    #[test]
    fn removes_deep_wide_and_odd_trees_with_few_descriptors() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("tree");
        // 30,000 levels deep: more than the open-files limit of a process.
        let mut p = root.clone();
        std::fs::create_dir(&p).unwrap();
        let mut cur = std::fs::File::open(&p).unwrap();
        for _ in 0..30_000 {
            use std::os::fd::AsFd;
            nix::sys::stat::mkdirat(cur.as_fd(), c"d", Mode::from_bits_truncate(0o700)).unwrap();
            let fd = openat(
                cur.as_fd(),
                c"d",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
            cur = std::fs::File::from(fd);
        }
        drop(cur);
        // Wide, with files, a symlink pointing out, and a name that
        // collides with the renames.
        p.push("wide");
        std::fs::create_dir(&p).unwrap();
        for i in 0..5000 {
            std::fs::write(p.join(format!("f{i}")), b"x").unwrap();
        }
        std::fs::create_dir(p.join(".airlock-rm-1")).unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, p.join("link")).unwrap();
        std::os::unix::fs::symlink(t.path(), p.join("dirlink")).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        // Missing is fine.
        remove_tree(&root).unwrap();
    }
}
