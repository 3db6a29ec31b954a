//! Runs a setup plan (see [`crate::plan`]) inside the sandbox's fresh mount
//! namespace.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::plan::{Flags, SetupOp};

/// A setup step failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct MountError {
    /// The step (e.g. "mount proc on").
    pub op: &'static str,
    /// Its target.
    pub path: String,
    /// The errno.
    #[source]
    pub source: std::io::Error,
}

fn fail(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> MountError {
    let path = path.display().to_string();
    move |e| MountError {
        op,
        path,
        source: std::io::Error::from(e),
    }
}

fn io_fail(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.display().to_string();
    move |source| MountError { op, path, source }
}

fn ms(flags: Flags) -> MsFlags {
    let mut f = MsFlags::empty();
    if flags.nosuid {
        f |= MsFlags::MS_NOSUID;
    }
    if flags.nodev {
        f |= MsFlags::MS_NODEV;
    }
    if flags.noexec {
        f |= MsFlags::MS_NOEXEC;
    }
    f
}

/// Applies every step in order; stops at the first failure.
pub fn apply(ops: &[SetupOp]) -> Result<(), MountError> {
    for op in ops {
        apply_one(op)?;
    }
    Ok(())
}

fn apply_one(op: &SetupOp) -> Result<(), MountError> {
    const NONE: Option<&str> = None;
    match op {
        SetupOp::MakeRootPrivate => {
            mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)
                .map_err(fail("make private", Path::new("/")))
        }
        SetupOp::BindSelf(root) => mount(
            Some(root.as_path()),
            root.as_path(),
            NONE,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            NONE,
        )
        .map_err(fail("bind new root", root)),
        SetupOp::Mount {
            fstype,
            target,
            flags,
            data,
        } => mount(
            Some(*fstype),
            target.as_path(),
            Some(*fstype),
            ms(*flags),
            Some(data.as_str()),
        )
        .map_err(fail("mount", target)),
        SetupOp::Touch(p) => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(p)
            .map(drop)
            .map_err(io_fail("create", p)),
        SetupOp::Mkdir(p) => std::fs::create_dir(p).map_err(io_fail("mkdir", p)),
        SetupOp::BindDevice { source, target } => mount(
            Some(source.as_path()),
            target.as_path(),
            NONE,
            MsFlags::MS_BIND,
            NONE,
        )
        .map_err(fail("bind device", target)),
        SetupOp::Symlink { target, link } => {
            std::os::unix::fs::symlink(target, link).map_err(io_fail("symlink", link))
        }
        SetupOp::CoverIfPresent { source, target } => {
            if !target.is_dir() {
                return Ok(());
            }
            mount(
                Some(source.as_path()),
                target.as_path(),
                NONE,
                MsFlags::MS_BIND,
                NONE,
            )
            .map_err(fail("cover", target))?;
            mount(
                NONE,
                target.as_path(),
                NONE,
                MsFlags::MS_REMOUNT
                    | MsFlags::MS_BIND
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                NONE,
            )
            .map_err(fail("remount read-only", target))
        }
        SetupOp::RemountReadOnly(p) => mount(
            NONE,
            p.as_path(),
            NONE,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NOEXEC,
            NONE,
        )
        .map_err(fail("remount read-only", p)),
        SetupOp::PivotRoot(root) => {
            nix::unistd::chdir(root.as_path()).map_err(fail("chdir", root))?;
            // pivot_root(".", ".") stacks the old root on top of the new one;
            // detaching "." then drops the old root without a put_old dir.
            nix::unistd::pivot_root(".", ".").map_err(fail("pivot_root", root))?;
            umount2(".", MntFlags::MNT_DETACH).map_err(fail("detach old root", root))?;
            nix::unistd::chdir("/").map_err(fail("chdir", Path::new("/")))
        }
    }
}
