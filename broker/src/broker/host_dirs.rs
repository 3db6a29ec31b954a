//! Caller-supplied and per-agent host directories: resolved and opened
//! with the caller's own rights, refused unless on an ordinary disk
//! filesystem.

use super::*;

/// A host directory opened once by the broker.
#[derive(Debug, Clone)]
pub(super) struct HostDir {
    /// Canonical path, for messages and the audit log.
    pub(super) path: PathBuf,
    /// The opened directory (O_PATH).
    pub(super) fd: Arc<OwnedFd>,
}

/// Canonicalizes `dir` and opens it `O_PATH`, refusing symlinks in the
/// canonical path (one swapped in between the two steps).
pub(super) fn open_host_dir(dir: &Path) -> Result<(PathBuf, OwnedFd), nix::Error> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    let canon = std::fs::canonicalize(dir)
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)))?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(nix::fcntl::AT_FDCWD, &canon, how)?;
    Ok((canon, fd))
}

/// The caller's primary gid and the supplementary groups of its process.
pub(super) fn caller_groups(p: &crate::authz::Principal) -> Vec<u32> {
    let mut gids = vec![p.gid];
    // Only if that pid is still a process of the caller (not one that
    // reused the number).
    if p.pid > 0
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", p.pid))
        && status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok())
            == Some(p.uid)
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        gids.extend(
            line.trim_start_matches("Groups:")
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    gids
}

/// Filesystems a caller's `--workspace`/`--rootfs` may live on: ordinary
/// disk filesystems (and tmpfs and overlayfs, which hold ordinary files
/// too). Everything else is refused: procfs, sysfs, cgroupfs, debugfs,
/// tracefs, securityfs, bpf, configfs... expose kernel objects whose
/// permissions assume the opener is the process's owner, not a root broker
/// acting for it; FUSE and network filesystems are served by someone else
/// who could stall the broker. Mounts below the directory are never
/// crossed by the filesystem server (RESOLVE_NO_XDEV), so a pseudo
/// filesystem mounted inside an accepted directory stays unreachable.
pub(super) const DISK_FILESYSTEMS: &[(i64, &str)] = &[
    (0xEF53, "ext2/3/4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0xF2F5_2010, "f2fs"),
    (0x2FC1_2FC1, "zfs"),
    (0xCA45_1A4E, "bcachefs"),
    (0x0102_1994, "tmpfs"),
    (0x794C_7630, "overlayfs"),
];

/// Refuses a directory that is not on one of [`DISK_FILESYSTEMS`].
pub(super) fn check_disk_filesystem(fd: &OwnedFd) -> Result<(), String> {
    let sfs = nix::sys::statfs::fstatfs(fd).map_err(|e| format!("statfs: {e}"))?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let magic = i64::from(sfs.filesystem_type().0 as i64);
    if DISK_FILESYSTEMS.iter().any(|(m, _)| *m == magic) {
        return Ok(());
    }
    Err(format!(
        "is on a filesystem of type {magic:#x}, not an ordinary disk filesystem ({}); \
         pseudo, FUSE and network filesystems are refused",
        DISK_FILESYSTEMS
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

impl Broker {
    /// Opens a caller-named host directory once and checks the opened
    /// directory itself: the canonical path is opened with
    /// RESOLVE_NO_SYMLINKS (a component swapped for a symlink after
    /// canonicalize fails instead of redirecting), and ownership is read
    /// from the handle. The filesystem server later opens exactly this
    /// directory through the handle, so no rename race can substitute
    /// another one.
    pub(super) fn validate_dir_for(
        &self,
        p: &Principal,
        what: &'static str,
        dir: &Path,
    ) -> Result<HostDir, BrokerError> {
        let bad = |e: &dyn std::fmt::Display| {
            BrokerError::BadRequest(format!("{what} {}: {e}", dir.display()))
        };
        let (canon, fd) = if p.is_admin() {
            open_host_dir(dir)
        } else {
            // Resolved and opened with the caller's own filesystem identity
            // (uid, gid, supplementary groups): the kernel applies exactly
            // the caller's rights (ACLs included) to every directory on the
            // way, so nothing out of their reach is opened, and errors say
            // no more than the caller could learn by trying themselves.
            let path = dir.to_path_buf();
            crate::sys::as_caller(p.uid, p.gid, caller_groups(p), move || open_host_dir(&path))
                .map_err(|e| bad(&e))?
        }
        .map_err(|e| match e {
            nix::Error::ENOTDIR => bad(&"not a directory"),
            nix::Error::ELOOP => bad(&"changed while being opened"),
            e => bad(&std::io::Error::from(e)),
        })?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| bad(&e))?;
        check_disk_filesystem(&fd).map_err(|e| bad(&e))?;
        if !p.is_admin() && st.st_uid != p.uid {
            return Err(BrokerError::Forbidden(AuthzError::NotOwner {
                uid: p.uid,
                what,
                path: canon.display().to_string(),
                owner: st.st_uid,
            }));
        }
        if canon.starts_with(&self.cfg.state_dir) {
            return Err(BrokerError::BadRequest(format!(
                "{what} {} is inside the broker's state directory",
                canon.display()
            )));
        }
        Ok(HostDir {
            path: canon,
            fd: Arc::new(fd),
        })
    }

    /// The agent's own persistent workspace directory.
    pub(super) fn agent_workspace(&self, agent: &str) -> Result<HostDir, BrokerError> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
        let w = self.cfg.state_dir.join("workspaces").join(agent);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&w)
            .map_err(internal("create agent workspace"))?;
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = openat2(nix::fcntl::AT_FDCWD, &w, how)
            .map_err(|e| BrokerError::Internal(format!("open {}: {e}", w.display())))?;
        Ok(HostDir {
            path: w,
            fd: Arc::new(fd),
        })
    }
}
