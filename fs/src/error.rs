//! Errors of this crate, and the single place where they become errnos.

use std::io;
use std::path::PathBuf;

/// Why a mount could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// A layer root could not be opened at mount time.
    #[error("cannot open layer root {path}")]
    OpenLayer {
        /// The host path that failed.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The mount spec is not usable.
    #[error("invalid mount spec: {what}")]
    InvalidSpec {
        /// What is wrong with it.
        what: String,
    },
    /// `/dev/fuse` could not be opened.
    #[error("cannot open /dev/fuse")]
    OpenFuseDevice(#[source] io::Error),
    /// mount(2) failed.
    #[error("cannot mount fuse on {path}")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The FUSE session could not be started.
    #[error("cannot start the fuse session on {path}")]
    Session {
        /// The mountpoint.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// umount2(2) failed.
    #[error("cannot unmount {path}")]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Aborting the fuse connection failed.
    #[error("cannot abort the fuse connection of {path}")]
    Abort {
        /// The mountpoint.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A failed request. Every variant maps to one errno in [`OpError::errno`],
/// the only place in this crate where errors become errnos.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    #[error("no such entry")]
    NotFound,
    #[error("entry exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("cross-layer move of a directory")]
    CrossDevice,
    #[error("entry is busy")]
    Busy,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    Perm,
    /// A per-mount memory budget is spent.
    #[error("out of memory budget")]
    NoMemory,
    /// A base entry that unprivileged host users may not read or search.
    #[error("base entry is private to its host owner")]
    HostPrivate,
    #[error("operation not supported")]
    NotSupported,
    #[error("no such attribute")]
    NoData,
    #[error("stale inode {0}")]
    Stale(u64),
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("disk quota reached")]
    NoSpace,
    #[error("bad file handle {0}")]
    BadHandle(u64),
    #[error("host i/o failed")]
    Io(#[from] io::Error),
    #[error("host syscall failed")]
    Sys(#[from] rustix::io::Errno),
}

impl OpError {
    /// The errno a request gets for this error.
    pub(crate) fn errno(&self) -> fuser::Errno {
        use fuser::Errno as E;
        match self {
            Self::NotFound => E::ENOENT,
            Self::Exists => E::EEXIST,
            Self::NotDir => E::ENOTDIR,
            Self::IsDir => E::EISDIR,
            Self::NotEmpty => E::ENOTEMPTY,
            Self::CrossDevice => E::EXDEV,
            Self::Busy => E::EBUSY,
            Self::Invalid => E::EINVAL,
            Self::Perm => E::EPERM,
            Self::HostPrivate => E::EACCES,
            Self::NoMemory => E::ENOMEM,
            Self::NotSupported => E::EOPNOTSUPP,
            Self::NoData => E::from_i32(libc::ENODATA),
            Self::Stale(_) => E::from_i32(libc::ESTALE),
            Self::NameTooLong => E::from_i32(libc::ENAMETOOLONG),
            Self::NoSpace => E::from_i32(libc::ENOSPC),
            Self::BadHandle(_) => E::EBADF,
            Self::Io(e) => E::from_i32(e.raw_os_error().unwrap_or(libc::EIO)),
            Self::Sys(e) => E::from_i32(e.raw_os_error()),
        }
    }

    /// Whether the host said "not there" (ENOENT or ENOTDIR).
    pub(crate) fn is_absent(&self) -> bool {
        match self {
            Self::NotFound | Self::NotDir => true,
            Self::Sys(e) => *e == rustix::io::Errno::NOENT || *e == rustix::io::Errno::NOTDIR,
            Self::Io(e) => matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)),
            _ => false,
        }
    }
}

pub(crate) type OpResult<T> = Result<T, OpError>;
