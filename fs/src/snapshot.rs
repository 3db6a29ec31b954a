//! Snapshot layers on disk.
//!
//! A writable tree (the sandbox's copy-on-write layer, the workspace) keeps
//! its frozen layers beside its live contents, in [`LAYERS_DIR`] at its
//! root: `layers/NAME` for each frozen layer and `trash/N` for what a
//! restore set aside until it is deleted. A snapshot moves the live
//! contents, one rename per top-level entry, into a new `layers/NAME`,
//! which then lies under the (now empty) live tree; nothing is copied. A
//! restore moves the live contents into the trash and puts the named
//! layers under the live tree instead. Every step is a rename within one
//! filesystem, through the directory handles this server already holds.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::fs::Dir;
use rustix::fs::{AtFlags, FileType as RFileType, Mode};

use crate::error::{OpError, OpResult};
use crate::layers::{LAYERS_DIR, is_whiteout};
use crate::policy::Name;
use crate::resolve::{open_dir, stat_at};

/// The longest layer name.
const MAX_NAME: usize = 64;

/// Whether `name` may name a layer: 1 to 64 of `[A-Za-z0-9_.-]`, not
/// starting with a dot.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn name(s: &str) -> OpResult<Name> {
    Name::new(OsStr::new(s))
}

/// `dir/sub`, made (mode 0700) if missing.
fn subdir(dir: &Dir, sub: &str) -> OpResult<Arc<Dir>> {
    let n = name(sub)?;
    match rustix::fs::mkdirat(dir, n.as_os_str(), Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::EXIST => {}
        Err(e) => return Err(e.into()),
    }
    open_dir(dir, &n)
}

/// `LAYERS_DIR/sub` of the tree at `root`, made if missing.
fn area(root: &Dir, sub: &str) -> OpResult<Arc<Dir>> {
    let top = subdir(root, LAYERS_DIR)?;
    subdir(&top, sub)
}

/// The frozen layer `layer` of the tree at `root`.
pub(crate) fn open_layer(root: &Dir, layer: &str) -> OpResult<Arc<Dir>> {
    if !valid_name(layer) {
        return Err(OpError::Invalid);
    }
    let top = open_dir(root, &name(LAYERS_DIR)?)?;
    let layers = open_dir(&*top, &name("layers")?)?;
    open_dir(&*layers, &name(layer)?)
}

/// The live top-level entries of `root`: all but [`LAYERS_DIR`].
fn live_entries(root: &Dir) -> OpResult<Vec<Name>> {
    let mut out = Vec::new();
    for e in root.entries()? {
        let e = e?;
        let raw = e.file_name();
        if raw.as_bytes() == LAYERS_DIR.as_bytes() {
            continue;
        }
        out.push(Name::new(&raw)?);
    }
    Ok(out)
}

/// Moves every live top-level entry of `from` into `to`; on a failure,
/// moves back what it moved.
fn move_all(from: &Dir, to: &Dir) -> OpResult<()> {
    let names = live_entries(from)?;
    for (i, n) in names.iter().enumerate() {
        if let Err(e) = rustix::fs::renameat(from, n.as_os_str(), to, n.as_os_str()) {
            for back in &names[..i] {
                let _ = rustix::fs::renameat(to, back.as_os_str(), from, back.as_os_str());
            }
            return Err(e.into());
        }
    }
    Ok(())
}

/// Freezes the live contents of the tree at `root` into the new layer
/// `layer` and returns it. The live tree is left empty. Refused with
/// `Exists` when the layer name is taken.
pub(crate) fn freeze(root: &Dir, layer: &str) -> OpResult<Arc<Dir>> {
    if !valid_name(layer) {
        return Err(OpError::Invalid);
    }
    let layers = area(root, "layers")?;
    let n = name(layer)?;
    rustix::fs::mkdirat(&*layers, n.as_os_str(), Mode::from_raw_mode(0o755)).map_err(|e| {
        if e == rustix::io::Errno::EXIST {
            OpError::Exists
        } else {
            e.into()
        }
    })?;
    let dir = open_dir(&*layers, &n)?;
    if let Err(e) = move_all(root, &dir) {
        let _ = rustix::fs::unlinkat(&*layers, n.as_os_str(), AtFlags::REMOVEDIR);
        return Err(e);
    }
    Ok(dir)
}

/// Sets the live contents of the tree at `root` aside (into its trash) and
/// returns the trash directory, for [`remove_tree`] off the request path.
pub(crate) fn set_aside(root: &Dir) -> OpResult<(Arc<Dir>, Name)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let trash = area(root, "trash")?;
    loop {
        let n = name(&format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))?;
        match rustix::fs::mkdirat(&*trash, n.as_os_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::EXIST => continue,
            Err(e) => return Err(e.into()),
        }
        let dir = open_dir(&*trash, &n)?;
        move_all(root, &dir)?;
        return Ok((trash, n));
    }
}

/// What a removal freed: allocated bytes and inodes, counted as the
/// quota counts them (a file once its last link goes, no whiteouts).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Freed {
    pub bytes: u64,
    pub inodes: u64,
}

/// Removes `name` in `parent` and everything under it, without following
/// a symlink, in constant memory and with two directories open at a time
/// whatever the tree's depth (a sandbox may have made it thousands of
/// levels deep): each subdirectory found is moved up to the top (one
/// rename) before its parent is removed. Entries that cannot be removed
/// are left.
pub(crate) fn remove_tree(parent: &Arc<Dir>, name: &Name) -> Freed {
    let mut freed = Freed::default();
    let Ok(Some(st)) = stat_at(&**parent, name) else {
        return freed;
    };
    if RFileType::from_raw_mode(st.st_mode) != RFileType::Directory {
        unlink_counted(parent, name, &st, &mut freed);
        return freed;
    }
    let Ok(top) = open_dir(&**parent, name) else {
        return freed;
    };
    let mut counter: u64 = 0;
    while let Ok(batch) = entries(&top) {
        if batch.is_empty() {
            break;
        }
        let mut progress = false;
        for n in batch {
            let Ok(Some(st)) = stat_at(&*top, &n) else {
                continue;
            };
            if RFileType::from_raw_mode(st.st_mode) != RFileType::Directory {
                progress |= unlink_counted(&top, &n, &st, &mut freed);
                continue;
            }
            let Ok(sub) = open_dir(&*top, &n) else {
                continue;
            };
            for c in entries(&sub).unwrap_or_default() {
                let Ok(Some(cst)) = stat_at(&*sub, &c) else {
                    continue;
                };
                if RFileType::from_raw_mode(cst.st_mode) == RFileType::Directory {
                    progress |= move_up(&sub, &c, &top, &mut counter);
                } else {
                    progress |= unlink_counted(&sub, &c, &cst, &mut freed);
                }
            }
            drop(sub);
            if rustix::fs::unlinkat(&*top, n.as_os_str(), AtFlags::REMOVEDIR).is_ok() {
                freed.inodes += 1;
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    drop(top);
    if rustix::fs::unlinkat(&**parent, name.as_os_str(), AtFlags::REMOVEDIR).is_ok() {
        freed.inodes += 1;
    }
    freed
}

/// Removes everything in directory `dir`, which stays (empty).
pub(crate) fn empty_dir(dir: &Arc<Dir>) -> Freed {
    let mut freed = Freed::default();
    while let Ok(batch) = entries(dir) {
        if batch.is_empty() {
            break;
        }
        let mut progress = false;
        for n in batch {
            let f = remove_tree(dir, &n);
            progress |= f.inodes > 0;
            freed.bytes += f.bytes;
            freed.inodes += f.inodes;
        }
        if !progress {
            break;
        }
    }
    freed
}

/// Unlinks a non-directory, counting it as the quota does (a file once
/// its last link goes; whiteouts not at all).
fn unlink_counted(dir: &Dir, name: &Name, st: &rustix::fs::Stat, freed: &mut Freed) -> bool {
    if rustix::fs::unlinkat(dir, name.as_os_str(), AtFlags::empty()).is_err() {
        return false;
    }
    if !is_whiteout(st) && st.st_nlink <= 1 {
        freed.inodes += 1;
        freed.bytes += crate::quota::allocated(st);
    }
    true
}

/// Moves directory `name` of `dir` to the top of the tree under a fresh
/// name.
fn move_up(dir: &Dir, name: &Name, top: &Dir, counter: &mut u64) -> bool {
    loop {
        *counter += 1;
        let fresh = format!(".rm-{counter}");
        match rustix::fs::renameat_with(
            dir,
            name.as_os_str(),
            top,
            fresh.as_str(),
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => return true,
            Err(e) if e == rustix::io::Errno::EXIST => {}
            Err(_) => return false,
        }
    }
}

/// Up to a batch of the names in `dir` (the caller comes back for more).
fn entries(dir: &Dir) -> OpResult<Vec<Name>> {
    let mut out = Vec::new();
    for e in dir.entries()? {
        out.push(Name::new(&e?.file_name())?);
        if out.len() >= 4096 {
            break;
        }
    }
    Ok(out)
}

/// Removes frozen layer `layer` of the tree at `root`.
pub(crate) fn remove_layer(root: &Dir, layer: &str) -> OpResult<Freed> {
    if !valid_name(layer) {
        return Err(OpError::Invalid);
    }
    let top = open_dir(root, &name(LAYERS_DIR)?)?;
    let layers = open_dir(&*top, &name("layers")?)?;
    let n = name(layer)?;
    if stat_at(&*layers, &n)?.is_none() {
        return Err(OpError::NotFound);
    }
    Ok(remove_tree(&layers, &n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().expect("tempdir");
        let d = Dir::open_ambient_dir(t.path(), cap_std::ambient_authority()).expect("open");
        (t, d)
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("s1"));
        assert!(valid_name("before-refactor_2.b"));
        for bad in ["", ".x", "a/b", "..", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn freeze_moves_the_live_tree_and_set_aside_empties_it() {
        let (t, root) = tree();
        std::fs::create_dir_all(t.path().join("a/b")).expect("mkdir");
        std::fs::write(t.path().join("a/b/f"), b"x").expect("write");
        std::fs::write(t.path().join("g"), b"y").expect("write");
        let layer = freeze(&root, "s1").expect("freeze");
        assert!(live_entries(&root).expect("list").is_empty());
        assert!(layer.exists("a/b/f") && layer.exists("g"));
        assert!(matches!(freeze(&root, "s1"), Err(OpError::Exists)));
        std::fs::write(t.path().join("h"), b"z").expect("write");
        let (trash, n) = set_aside(&root).expect("set aside");
        assert!(live_entries(&root).expect("list").is_empty());
        let freed = remove_tree(&trash, &n);
        assert_eq!(freed.inodes, 2, "the file and its trash directory");
        assert!(open_layer(&root, "s1").is_ok());
        let freed = remove_layer(&root, "s1").expect("remove");
        assert_eq!(freed.inodes, 5);
        assert!(open_layer(&root, "s1").is_err());
    }

    #[test]
    fn deep_trees_are_removed_without_recursion() {
        let (t, root) = tree();
        // One level at a time: a path this deep is longer than PATH_MAX.
        let mut cur = Arc::new(root.try_clone().expect("clone"));
        for _ in 0..3000 {
            let d = subdir(&cur, "d").expect("mkdir");
            cur = d;
        }
        let root = Arc::new(root);
        let freed = remove_tree(&root, &name("d").expect("name"));
        assert_eq!(freed.inodes, 3000);
        assert!(!t.path().join("d").exists());
    }
}
