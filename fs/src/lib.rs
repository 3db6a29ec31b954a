//! airlock-fs: the FUSE filesystem that is a sandbox's entire root.
//!
//! # Layers
//! A request names an inode; the [`inode`] table turns it into a list of
//! validated components from the sandbox root. `/workspace` and everything
//! under it is its own subtree (like a mount), served only from
//! [`MountSpec::workspace`]. Everything else is the merge of a stack, top
//! first:
//!
//! 1. the writable upper layer (per sandbox, copy-on-write);
//! 2. frozen layers: what snapshots froze ([`Snapshots`]), newest first;
//! 3. synthesized entries ([`synth`]): `/etc/hostname`, `hosts`,
//!    `resolv.conf`, `passwd`, `group`, and empty directories such as `/tmp`;
//! 4. the read-only base: the host's `usr`, `bin`, `lib*` and a filtered
//!    `etc` ([`policy::ETC_DENY`]), or a rootfs directory.
//!
//! Once it has frozen layers, the workspace is such a stack too: its live
//! tree over its frozen layers (see [`Snapshots`]); until then it is the
//! plain host directory.
//!
//! Lookups and listings walk that order and stop at whiteouts (character
//! device 0:0) and opaque directories (`user.overlay.opaque = "y"`), the
//! overlayfs format. Writes copy the entry (and its directory chain) up into
//! the writable layer first.
//!
//! # Resolution
//! Each layer root is opened once at mount time; afterwards every host
//! access is a single validated component relative to a directory handle
//! ([`resolve`]), opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so no
//! symlink is ever followed by this server and no host path is built from
//! sandbox input. The sandbox's kernel resolves `..` and symlinks itself.
//!
//! # Inodes
//! Directories and lower-layer entries are identified by their path; the
//! writable areas' other entries by their host file's `(st_dev, st_ino)`, so
//! hard links are one inode ([`inode`]). Copy-up keeps the inode number.
//!
//! # Passthrough
//! When the kernel grants `FUSE_PASSTHROUGH` (Linux >= 6.9, a root server),
//! a read-only open of a base-layer regular file is answered with a backing
//! id for the host file this server opened through [`resolve`]: the kernel
//! then serves read and mmap straight from that host file (and its page
//! cache, shared by every sandbox) without a request to this server. The
//! kernel requires every open of one inode to use the same mode and backing
//! file, so opens are accounted per inode; an open that cannot join the
//! inode's current mode (a write, or a read after a copy-up) detaches the
//! inode from its names and answers `ESTALE`, which makes the kernel look the
//! path up again and open a fresh inode. See [`Mount::passthrough_enabled`].
//!
//! # Ownership
//! Requests carry host ids (`host_base + sandbox id`). Base files owned by
//! host id `u < count` are shown as `host_base + u`, others as nobody;
//! workspace files are all shown as the sandbox user and are created on the
//! host as the owner of the workspace directory.

mod error;
mod fuse;
mod hostile;
mod inode;
mod layers;
mod policy;
mod quota;
mod resolve;
mod snapshot;
mod synth;
mod sys;
mod walks;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use error::FsError;

/// Sandbox id `u` is host id `base + u`, for `u < count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMap {
    /// Host uid of sandbox uid 0.
    pub host_uid_base: u32,
    /// Host gid of sandbox gid 0.
    pub host_gid_base: u32,
    /// Number of mapped ids.
    pub count: u32,
}

/// The sandbox-visible nobody id.
const NOBODY: u32 = 65534;

impl IdMap {
    fn base_id(base: u32, count: u32, id: u32) -> u32 {
        if id < count {
            base.saturating_add(id)
        } else {
            base.saturating_add(NOBODY.min(count.saturating_sub(1)))
        }
    }

    fn clamp_id(base: u32, count: u32, id: u32) -> u32 {
        if id >= base && id - base < count {
            id
        } else {
            Self::base_id(base, count, NOBODY)
        }
    }

    /// Host uid shown for a base file owned by host uid `uid`.
    pub(crate) fn base_uid(&self, uid: u32) -> u32 {
        Self::base_id(self.host_uid_base, self.count, uid)
    }

    pub(crate) fn base_gid(&self, gid: u32) -> u32 {
        Self::base_id(self.host_gid_base, self.count, gid)
    }

    /// A stored upper-layer owner, or nobody when outside the map.
    pub(crate) fn clamp_uid(&self, uid: u32) -> u32 {
        Self::clamp_id(self.host_uid_base, self.count, uid)
    }

    pub(crate) fn clamp_gid(&self, gid: u32) -> u32 {
        Self::clamp_id(self.host_gid_base, self.count, gid)
    }

    pub(crate) fn uid_mapped(&self, uid: u32) -> bool {
        uid >= self.host_uid_base && uid - self.host_uid_base < self.count
    }

    pub(crate) fn gid_mapped(&self, gid: u32) -> bool {
        gid >= self.host_gid_base && gid - self.host_gid_base < self.count
    }

    /// The owner a request's new files get: its id when mapped, sandbox
    /// root for host root (the broker, tests), nobody otherwise.
    pub(crate) fn req_uid(&self, uid: u32) -> u32 {
        if uid == 0 {
            self.host_uid_base
        } else {
            self.clamp_uid(uid)
        }
    }

    pub(crate) fn req_gid(&self, gid: u32) -> u32 {
        if gid == 0 {
            self.host_gid_base
        } else {
            self.clamp_gid(gid)
        }
    }
}

/// What the read-only base layer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseSpec {
    /// The host's `usr`, `bin`, `sbin`, `lib*` and a filtered `etc`.
    Host,
    /// This directory, entirely.
    Rootfs(PathBuf),
}

/// Everything needed to serve one sandbox's tree.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// The read-only base.
    pub base: BaseSpec,
    /// Existing empty host dir (root-owned, 0700) for the copy-on-write layer.
    pub upper: PathBuf,
    /// Existing host dir shown at /workspace (may be shared live).
    pub workspace: PathBuf,
    /// The sandbox's id map.
    pub ids: IdMap,
    /// Whether the base is mounted idmapped through the sandbox's id map,
    /// so its owners already read as host ids in the sandbox's range (host
    /// root's files as sandbox root's host uid). Otherwise the base shows
    /// the host's own ids, translated with [`IdMap`] here.
    pub base_idmapped: bool,
    /// In-sandbox uid of the sandbox user.
    pub sandbox_uid: u32,
    /// In-sandbox gid of the sandbox user.
    pub sandbox_gid: u32,
    /// Its name, for the synthesized passwd/group.
    pub sandbox_user: String,
    /// For /etc/hostname and /etc/hosts.
    pub hostname: String,
    /// What the sandbox may add across its copy-on-write layer and its
    /// workspace (see [`DiskQuota`]).
    pub quota: DiskQuota,
    /// Snapshots: `Some` with the frozen layers to serve under the live
    /// trees (empty for a fresh sandbox), `None` to have none (a workspace
    /// that is the caller's own directory). See [`Snapshots`].
    pub snapshots: Option<LayerChain>,
    /// Where else frozen layers are found by name, beside each tree's own
    /// `.airlock/layers` (layers the broker moved to its stores).
    pub frozen: FrozenDirs,
    /// The agent's quota on its persistent workspace, shared with its
    /// other sandboxes' servers; `None` for a workspace that is the
    /// caller's own directory.
    pub workspace_usage: Option<WorkspaceUsage>,
}

/// Directories holding frozen layers, each layer a subdirectory named as
/// in [`LayerChain`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrozenDirs {
    /// For the copy-on-write layer (searched in order).
    pub upper: Vec<PathBuf>,
    /// For the workspace.
    pub workspace: Option<PathBuf>,
}

/// The frozen layers under a sandbox's two writable trees, bottom first,
/// by name. Each tree keeps its own in `.airlock/layers/NAME` at its root
/// (hidden from the sandbox).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerChain {
    /// Frozen layers of the copy-on-write layer.
    pub upper: Vec<String>,
    /// Frozen layers of the workspace.
    pub workspace: Vec<String>,
}

/// Whether `name` may name a snapshot layer: 1 to 64 of
/// `[A-Za-z0-9_.-]`, not starting with a dot.
pub fn valid_layer_name(name: &str) -> bool {
    snapshot::valid_name(name)
}

/// Why a snapshot operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The mount was made without snapshots.
    #[error("this sandbox has no snapshots (its workspace is the caller's own directory)")]
    Unsupported,
    /// A file is open for writing.
    #[error("a file is open for writing in the sandbox")]
    Busy,
    /// A layer name is taken.
    #[error("a layer named {0} exists")]
    Exists(String),
    /// A layer named is missing.
    #[error("a frozen layer is missing")]
    Missing,
    /// A name is malformed.
    #[error("invalid layer name")]
    InvalidName,
    /// The host refused an operation.
    #[error("host error: {0}")]
    Host(String),
}

/// Takes and restores snapshots of a served mount: O(1) in what the trees
/// hold (one rename per top-level entry). The caller makes sure nothing
/// in the sandbox runs meanwhile; a file open for writing is refused.
pub struct Snapshots {
    /// Weak: the filesystem (and its event stream, whose end lets the
    /// server's last events go out) goes with its session, not with this
    /// handle.
    fs: std::sync::Weak<fuse::AirlockFs>,
    notifier: fuser::Notifier,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots").finish_non_exhaustive()
    }
}

impl Snapshots {
    fn err(e: error::OpError, name: &str) -> SnapshotError {
        match e {
            error::OpError::NotSupported => SnapshotError::Unsupported,
            error::OpError::Busy => SnapshotError::Busy,
            error::OpError::Exists => SnapshotError::Exists(name.to_string()),
            error::OpError::NotFound | error::OpError::NotDir => SnapshotError::Missing,
            error::OpError::Invalid => SnapshotError::InvalidName,
            e => SnapshotError::Host(e.errno().code().to_string()),
        }
    }

    fn fs(&self) -> Result<Arc<fuse::AirlockFs>, SnapshotError> {
        self.fs
            .upgrade()
            .ok_or_else(|| SnapshotError::Host("the filesystem is no longer served".into()))
    }

    /// The frozen layers now served (none once the mount is gone).
    pub fn chain(&self) -> LayerChain {
        self.fs.upgrade().map(|f| f.chain()).unwrap_or_default()
    }

    /// Freezes both live trees into new layers named `name`; returns the
    /// chain a restore to this moment takes.
    ///
    /// # Errors
    /// See [`SnapshotError`].
    pub fn freeze(&self, name: &str) -> Result<LayerChain, SnapshotError> {
        self.fs()?.freeze(name).map_err(|e| Self::err(e, name))
    }

    /// Serves `to` under empty live trees; what was live is deleted in the
    /// background. The kernel's cached entries under both trees are
    /// invalidated (through their top-level names).
    ///
    /// # Errors
    /// See [`SnapshotError`].
    pub fn restore(&self, to: &LayerChain) -> Result<(), SnapshotError> {
        let (links, dirs) = self.fs()?.restore(to).map_err(|e| Self::err(e, ""))?;
        for (parent, name, ino) in links {
            let _ = self.notifier.inval_inode(fuser::INodeNo(ino), 0, 0);
            let _ = self
                .notifier
                .inval_entry(fuser::INodeNo(parent), name.as_os_str());
        }
        for ino in dirs {
            let _ = self.notifier.inval_inode(fuser::INodeNo(ino), 0, 0);
        }
        Ok(())
    }

    /// Refreshes what the kernel may hold stale after another mount of
    /// the same workspace changed `paths` (sandbox paths,
    /// `/workspace/...`), or with `all` anything in it (then names
    /// refresh when their cached entries expire, within a second).
    pub fn workspace_changed(&self, paths: &[String], all: bool) {
        let Some(fs) = self.fs.upgrade() else {
            return;
        };
        for stale in fs.ws_stale(paths, all) {
            let _ = match stale {
                fuse::Stale::Inode(ino) => self.notifier.inval_inode(fuser::INodeNo(ino), 0, 0),
                fuse::Stale::Entry(parent, name) => self
                    .notifier
                    .inval_entry(fuser::INodeNo(parent), name.as_os_str()),
            };
        }
    }

    /// Deletes frozen layers that no snapshot needs any more (never one
    /// now served).
    ///
    /// # Errors
    /// See [`SnapshotError`].
    pub fn remove(&self, layers: &LayerChain) -> Result<(), SnapshotError> {
        self.fs()?
            .remove_layers(layers)
            .map_err(|e| Self::err(e, ""))
    }
}

pub use quota::{DiskQuota, SharedUsage, WorkspaceUsage};

/// Runs the requests `data` describes straight through the operations a
/// FUSE request reaches, on a private temporary tree: the fuzz target's
/// entry (see `fs/fuzz`). Needs root, as a server does.
///
/// # Panics
/// When a request made the server touch anything outside its layers.
#[doc(hidden)]
pub fn fuzz_requests(data: &[u8]) {
    hostile::run(data);
}

/// The capabilities a confined server process keeps (all others are
/// dropped from every set, the bounding set included), each with why.
/// Numbers are the kernel's `CAP_*` values. A jailed server holds them in
/// a user namespace of its own that maps only the sandbox's host id range
/// (see the broker's `fs_server` module): they reach only inodes whose
/// owner and group are in that range, never a host file of anyone else,
/// and none of them means anything to the host's mounts, devices or
/// processes.
pub const SERVER_CAPABILITIES: &[(u32, &str)] = &[
    (
        0,
        "CAP_CHOWN: copy-up and creation give upper-layer files their sandbox owners",
    ),
    (
        1,
        "CAP_DAC_OVERRIDE: the server reads and writes upper-layer files of every sandbox user; the kernel checked the caller's rights already (default_permissions)",
    ),
    (
        2,
        "CAP_DAC_READ_SEARCH: walking upper-layer directories whatever their modes",
    ),
    (
        3,
        "CAP_FOWNER: chmod, utimes and xattrs (user.overlay.opaque included) on upper-layer files owned by sandbox users",
    ),
    (
        4,
        "CAP_FSETID: copy-up keeps set-id bits of files the sandbox may keep them on",
    ),
    (
        6,
        "CAP_SETGID: setfsgid to the workspace owner's group when creating workspace files",
    ),
    (
        7,
        "CAP_SETUID: setfsuid to the workspace owner when creating workspace files",
    ),
    (
        31,
        "CAP_SETFCAP: a write removes the file's security.capability, as the kernel does for a local write",
    ),
];

/// The seccomp allow-list of a server process, as data: every system call
/// the server makes once it serves, each with why; everything else is
/// refused (see the file's own comment for the format).
pub const SERVER_SECCOMP: &str = include_str!("../seccomp.json");

/// The host's top-level directories a `BaseSpec::Host` base shows (those
/// that exist); `etc` is filtered further.
pub const HOST_BASE_NAMES: &[&str] = policy::HOST_ROOT_ALLOW;

/// The rights a server needs beneath one host path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostAccess {
    /// Read files and list directories.
    Read,
    /// List the directory (and directories beneath it), read no file.
    ReadDir,
    /// Everything: create, write, remove, rename, link.
    ReadWrite,
    /// A device opened and driven with ioctls.
    Device,
}

/// A host path a server of a [`MountSpec`] reaches, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPath {
    /// The path (in the server's process; `/proc/self/fd/N` names an
    /// inherited handle).
    pub path: PathBuf,
    /// The rights needed beneath it.
    pub access: HostAccess,
    /// Why.
    pub why: &'static str,
}

impl MountSpec {
    /// Every host path the server of this spec may ever touch, for
    /// confining its process (landlock) to exactly its own layers: the
    /// upper layer and the workspace read-write, and the base read-only
    /// (the FUSE connection is the descriptor the server was handed). For the
    /// host base, hidden `/etc` entries ([`policy::ETC_DENY`]) get no rule,
    /// so even a compromised server cannot read them.
    pub fn host_paths(&self) -> Vec<HostPath> {
        let mut out = vec![
            HostPath {
                path: self.upper.clone(),
                access: HostAccess::ReadWrite,
                why: "the sandbox's copy-on-write layer",
            },
            HostPath {
                path: self.workspace.clone(),
                access: HostAccess::ReadWrite,
                why: "the workspace shown at /workspace",
            },
        ];
        for dir in self.frozen.upper.iter().chain(&self.frozen.workspace) {
            out.push(HostPath {
                path: dir.clone(),
                access: HostAccess::ReadWrite,
                why: "frozen layers of the sandbox's snapshots",
            });
        }
        match &self.base {
            BaseSpec::Rootfs(dir) => out.push(HostPath {
                path: dir.clone(),
                access: HostAccess::Read,
                why: "the read-only base (a rootfs)",
            }),
            BaseSpec::Host => {
                for top in policy::HOST_ROOT_ALLOW {
                    if *top == "etc" {
                        visible_etc(Path::new("/etc"), &mut vec![b"etc".to_vec()], &mut out);
                    } else {
                        out.push(HostPath {
                            path: Path::new("/").join(top),
                            access: HostAccess::Read,
                            why: "the read-only base (the host's system directories)",
                        });
                    }
                }
            }
        }
        out
    }
}

/// Rules for the visible part of the host's /etc below `dir`: an entry
/// with nothing hidden beneath it is readable whole; a directory that
/// holds hidden entries is listable, and its visible children get rules of
/// their own. Bounded by the depth of [`policy::ETC_DENY`]'s patterns.
fn visible_etc(dir: &Path, comps: &mut Vec<Vec<u8>>, out: &mut Vec<HostPath>) {
    use std::os::unix::ffi::OsStrExt;
    out.push(HostPath {
        path: dir.to_path_buf(),
        access: HostAccess::ReadDir,
        why: "the host's /etc, listed without its hidden entries",
    });
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        comps.push(name.as_bytes().to_vec());
        let refs: Vec<&[u8]> = comps.iter().map(Vec::as_slice).collect();
        if policy::host_visible(&refs).is_ok() {
            let path = dir.join(&name);
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && policy::hides_below(&refs) {
                visible_etc(&path, comps, out);
            } else {
                out.push(HostPath {
                    path,
                    access: HostAccess::Read,
                    why: "the host's /etc, visible entries",
                });
            }
        }
        comps.pop();
    }
}

/// Kinds of change reported for /workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum MutationOp {
    /// A file, fifo or socket was created.
    Create,
    /// A handle that was written to was flushed or released.
    Write,
    /// A file was truncated.
    Truncate,
    /// A non-directory was removed.
    Unlink,
    /// A directory was created.
    Mkdir,
    /// A directory was removed.
    Rmdir,
    /// An entry was renamed (`to` holds the new path).
    Rename,
    /// A symlink was created.
    Symlink,
    /// A hard link was created (`to` holds the new path).
    Link,
    /// The mode changed.
    Chmod,
    /// An xattr was set.
    SetXattr,
    /// An xattr was removed.
    RemoveXattr,
    /// Times changed.
    Utimes,
}

/// What the filesystem reports to the broker's audit log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum FsEvent {
    /// A change under /workspace.
    Mutation {
        /// What changed.
        op: MutationOp,
        /// Sandbox path, e.g. "/workspace/a.txt".
        path: String,
        /// Rename/link target.
        to: Option<String>,
    },
    /// A request this server refused by policy.
    Denied {
        /// The operation, e.g. "lookup", "mknod", "setxattr".
        op: String,
        /// Sandbox path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The disk quota refused a change for the first time (later refusals
    /// are not reported): ENOSPC.
    QuotaHit {
        /// "disk bytes" or "inodes".
        what: String,
        /// The limit.
        limit: u64,
        /// The usage then.
        used: u64,
    },
    /// What the sandbox's layers hold now (sent when it changed, once a
    /// second at most; not an audit row).
    Usage {
        /// Bytes.
        bytes: u64,
        /// Inodes.
        inodes: u64,
        /// The bytes limit (0: none).
        bytes_limit: u64,
        /// The inodes limit (0: none).
        inodes_limit: u64,
    },
}

/// Receives events on FUSE threads; must be cheap and never block.
pub type EventSink = Arc<dyn Fn(FsEvent) + Send + Sync>;

/// Per-mount options beyond the [`MountSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MountOptions {
    /// Ask the kernel for FUSE passthrough of read-only base-layer files
    /// (default on; silently off where the kernel refuses).
    pub passthrough: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self { passthrough: true }
    }
}

/// Counters of a live mount, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MountStats {
    /// READ requests served by this server (passthrough reads never come).
    pub read_requests: u64,
    /// Opens answered with a passthrough backing file.
    pub passthrough_opens: u64,
    /// Backing ids registered with the kernel and not yet closed.
    pub live_backing_ids: u64,
}

/// Registers FUSE passthrough backing files for a server that may not:
/// the kernel takes `FUSE_DEV_IOC_BACKING_OPEN` and `..._CLOSE` only from
/// a holder of CAP_SYS_ADMIN in the host's user namespace, and a confined
/// server (in a user namespace of its own) holds none there. The
/// registrar does both ioctls on the same FUSE connection for it.
pub trait BackingFiles: Send + Sync + std::fmt::Debug {
    /// Registers `file` (a read-only base file the server opened) as a
    /// backing file of this connection; returns the kernel's backing id.
    ///
    /// # Errors
    /// The ioctl's, or the registrar's transport's.
    fn open(&self, file: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u32>;
    /// Closes a backing id [`BackingFiles::open`] returned.
    ///
    /// # Errors
    /// The ioctl's, or the registrar's transport's.
    fn close(&self, id: u32) -> std::io::Result<()>;
}

/// `FUSE_DEV_IOC_BACKING_OPEN`: registers `file` as a passthrough backing
/// file of the FUSE connection `dev`, for a [`BackingFiles`] registrar.
/// Needs CAP_SYS_ADMIN in the host's user namespace.
///
/// # Errors
/// The kernel's (EPERM without the capability or passthrough).
pub fn open_backing(
    dev: std::os::fd::BorrowedFd<'_>,
    file: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<u32> {
    fuser::BackingId::create_raw(dev, file)
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: releases an id from [`open_backing`].
///
/// # Errors
/// The kernel's.
pub fn close_backing(dev: std::os::fd::BorrowedFd<'_>, id: u32) -> std::io::Result<()> {
    sys::close_backing(dev, id)
}

/// State shared between the filesystem threads and the [`Mount`].
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Passthrough negotiated and usable on this connection.
    pub(crate) passthrough: AtomicBool,
    /// Who registers backing files, when not this process itself.
    pub(crate) backing_files: std::sync::OnceLock<Arc<dyn BackingFiles>>,
    pub(crate) reads: AtomicU64,
    pub(crate) passthrough_opens: AtomicU64,
    pub(crate) live_backing: AtomicU64,
}

/// Worker threads of a session.
const THREADS: usize = 4;

/// How long unmount waits for the session threads after detaching.
const JOIN_WAIT: Duration = Duration::from_secs(2);

/// Mount `spec` at `mountpoint` and serve it on background threads.
///
/// # Errors
/// When a layer root cannot be opened, /dev/fuse cannot be opened, or the
/// mount or the FUSE handshake fails.
pub fn mount(spec: MountSpec, mountpoint: &Path, events: EventSink) -> Result<Mount, FsError> {
    mount_with(spec, mountpoint, events, &MountOptions::default())
}

/// [`mount`] with explicit [`MountOptions`]: [`Server::new`],
/// [`mount_device`] and [`Server::handshake`] in one process, served on
/// background threads of this one.
///
/// # Errors
/// As [`mount`].
pub fn mount_with(
    spec: MountSpec,
    mountpoint: &Path,
    events: EventSink,
    opts: &MountOptions,
) -> Result<Mount, FsError> {
    let server = Server::new(&spec, events, opts)?;
    let dev = mount_device(mountpoint)?;
    let serving = match server.handshake(dev) {
        Ok(s) => s,
        Err(e) => {
            let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
            return Err(e);
        }
    };
    let shared = Arc::clone(&serving.shared);
    let fs = Arc::clone(&serving.fs);
    quota::start_reporting(&serving.usage, serving.usage_roots);
    let session = match serving.session.spawn() {
        Ok(s) => s,
        Err(source) => {
            let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
            return Err(FsError::Session {
                path: mountpoint.to_path_buf(),
                source,
            });
        }
    };
    let snapshots = Snapshots {
        fs: Arc::downgrade(&fs),
        notifier: session.notifier(),
    };
    drop(fs);
    Ok(Mount {
        mountpoint: mountpoint.to_path_buf(),
        thread: Some(session.guard),
        shared,
        snapshots,
    })
}

/// The privileged half of a mount: opens `/dev/fuse` and mounts it at
/// `mountpoint` (needs CAP_SYS_ADMIN). The returned device is what a
/// [`Server`] serves, in this process or in another one it is handed to.
/// Until a server answers the kernel's INIT on it, requests to the mount
/// wait.
///
/// # Errors
/// When /dev/fuse cannot be opened or the mount fails.
pub fn mount_device(mountpoint: &Path) -> Result<std::os::fd::OwnedFd, FsError> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(FsError::OpenFuseDevice)?;
    let data = std::ffi::CString::new(format!(
        "fd={},rootmode=40755,user_id=0,group_id=0,allow_other,default_permissions",
        dev.as_raw_fd()
    ))
    .map_err(|_| FsError::InvalidSpec {
        what: "mount data contains NUL".to_owned(),
    })?;
    rustix::mount::mount(
        "airlock",
        mountpoint,
        "fuse.airlock",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        Some(data.as_c_str()),
    )
    .map_err(|e| FsError::Mount {
        path: mountpoint.to_path_buf(),
        source: e.into(),
    })?;
    Ok(dev.into())
}

/// A sandbox's filesystem with its layer roots open, before it serves a
/// mount. Opening the roots is the last step that needs the host's paths:
/// after [`Server::new`] every host access goes through those handles, so
/// the process may confine itself to them before [`Server::handshake`].
pub struct Server {
    fs: Arc<fuse::AirlockFs>,
    shared: Arc<Shared>,
    usage: Arc<quota::Usage>,
    /// What the quota's start-up walk counts (the workspace).
    usage_roots: Vec<std::os::fd::OwnedFd>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the layer roots of `spec`.
    ///
    /// # Errors
    /// When the spec is inconsistent or a layer root cannot be opened.
    pub fn new(spec: &MountSpec, events: EventSink, opts: &MountOptions) -> Result<Self, FsError> {
        let shared = Arc::new(Shared::default());
        let usage = Arc::new(quota::Usage::new(
            spec.quota,
            spec.workspace_usage.clone(),
            Arc::clone(&events),
        ));
        let fs = Arc::new(fuse::AirlockFs::new(
            spec,
            events,
            opts,
            Arc::clone(&shared),
            Arc::clone(&usage),
        )?);
        let usage_roots = fs.usage_roots();
        Ok(Self {
            fs,
            shared,
            usage,
            usage_roots,
        })
    }

    /// Answers the kernel's INIT on `dev` (a device from [`mount_device`])
    /// and checks that passthrough, if granted, really works.
    ///
    /// # Errors
    /// When the handshake fails.
    pub fn handshake(self, dev: std::os::fd::OwnedFd) -> Result<Serving, FsError> {
        let Server {
            fs,
            shared,
            usage,
            usage_roots,
        } = self;
        let dev = std::fs::File::from(dev);
        // A second reference to the device, only for the passthrough probe
        // after the handshake; closed before this function returns.
        let probe_dev = dev.try_clone().map_err(FsError::OpenFuseDevice)?;
        let mut config = fuser::Config::default();
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(THREADS);
        // The session threads share the one descriptor the server was
        // handed: a jailed server cannot open /dev/fuse (host root's
        // 0600 node) to clone the connection, and needs no path to it.
        config.clone_fd = false;
        let session = fuser::Session::from_fd(
            fuse::FuseFs(Arc::clone(&fs)),
            dev.into(),
            fuser::SessionACL::All,
            config,
        )
        .map_err(|source| FsError::Session {
            path: PathBuf::from("/dev/fuse"),
            source,
        })?;
        // The handshake (INIT) is done: check that the kernel really
        // accepts backing files before any open relies on it.
        if shared.passthrough.load(Ordering::Relaxed)
            && let Err(e) = sys::probe_backing(&probe_dev)
        {
            tracing::debug!(error = %e, "fuse passthrough refused; serving reads");
            shared.passthrough.store(false, Ordering::Relaxed);
        }
        Ok(Serving {
            session,
            fs,
            shared,
            usage,
            usage_roots,
        })
    }
}

/// A mount whose handshake is done, ready to be served.
pub struct Serving {
    session: fuser::Session<fuse::FuseFs>,
    fs: Arc<fuse::AirlockFs>,
    shared: Arc<Shared>,
    usage: Arc<quota::Usage>,
    usage_roots: Vec<std::os::fd::OwnedFd>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").finish_non_exhaustive()
    }
}

impl Serving {
    /// The snapshot control of this mount, usable from any thread while
    /// it is served.
    pub fn snapshots(&self) -> Snapshots {
        Snapshots {
            fs: Arc::downgrade(&self.fs),
            notifier: self.session.notifier(),
        }
    }

    /// Whether reads of base files go straight to the host files (see
    /// [`Mount::passthrough_enabled`]).
    pub fn passthrough_enabled(&self) -> bool {
        self.shared.passthrough.load(Ordering::Relaxed)
    }

    /// Registers passthrough backing files through `files` from now on,
    /// not with this process's own ioctls (which a confined server may no
    /// longer make). Call before [`Serving::run`]. Not probed here (the
    /// handshake's probe showed the connection takes backing files, and
    /// the registrar may still be confining itself): if the first
    /// registration is refused with EPERM or EOPNOTSUPP, passthrough turns
    /// off and reads are served.
    pub fn delegate_backing(&self, files: Arc<dyn BackingFiles>) {
        let _ = self.shared.backing_files.set(files);
    }

    /// Serves requests on [`THREADS`] threads until the mount goes away.
    ///
    /// # Errors
    /// When the session ends with an error other than the unmount.
    pub fn run(self) -> std::io::Result<()> {
        quota::start_reporting(&self.usage, self.usage_roots);
        self.session.run()
    }
}

/// A live mount. Unmounting (explicitly or on drop) detaches it lazily and
/// stops the session threads.
#[derive(Debug)]
pub struct Mount {
    mountpoint: PathBuf,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    shared: Arc<Shared>,
    snapshots: Snapshots,
}

impl Mount {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether this mount uses FUSE passthrough: requested, granted by the
    /// kernel at INIT, and a backing file accepted by a probe. False on
    /// kernels without it (then every read goes through this server), or
    /// after the kernel refused a backing file with EPERM/EOPNOTSUPP.
    pub fn passthrough_enabled(&self) -> bool {
        self.shared.passthrough.load(Ordering::Relaxed)
    }

    /// Its snapshot control.
    pub fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    /// Current counters.
    pub fn stats(&self) -> MountStats {
        MountStats {
            read_requests: self.shared.reads.load(Ordering::Relaxed),
            passthrough_opens: self.shared.passthrough_opens.load(Ordering::Relaxed),
            live_backing_ids: self.shared.live_backing.load(Ordering::Relaxed),
        }
    }

    /// Detach the mount and stop serving it.
    ///
    /// # Errors
    /// When umount2 fails for another reason than "not mounted".
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), FsError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let res = force_unmount(&self.mountpoint);
        // Without users the kernel ends the connection once detached; wait a
        // little for the threads, but never hang on a busy mount.
        let start = Instant::now();
        while !thread.is_finished() && start.elapsed() < JOIN_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            if let Ok(Err(e)) = thread.join() {
                tracing::debug!(error = %e, "fuse session ended with an error");
            }
        } else {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "fuse session still busy after unmount; leaving its threads");
        }
        res
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(error = %e, "unmount on drop failed");
        }
    }
}

/// Recover a mount left by a dead process: abort its FUSE connection if
/// fusectl is mounted, then detach it. "Not mounted" is success.
///
/// # Errors
/// When aborting or umount2 fails for another reason.
pub fn force_unmount(mountpoint: &Path) -> Result<(), FsError> {
    if let Some(dev) = fuse_conn_of(mountpoint) {
        let abort = PathBuf::from(format!("/sys/fs/fuse/connections/{dev}/abort"));
        if abort.exists() {
            std::fs::write(&abort, b"1").map_err(|source| FsError::Abort {
                path: mountpoint.to_path_buf(),
                source,
            })?;
        }
    }
    match rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => Ok(()),
        Err(e) => Err(FsError::Unmount {
            path: mountpoint.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// The fusectl connection number (the mount's minor device) of a FUSE mount
/// at exactly `mountpoint`, read from mountinfo so a dead server is never
/// waited on.
fn fuse_conn_of(mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.to_str()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|line| {
        let mut f = line.split(' ');
        let dev = f.nth(2)?;
        let point = f.nth(1)?;
        let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
        (point == want && fstype.starts_with("fuse"))
            .then(|| dev.split(':').nth(1)?.parse().ok())
            .flatten()
    })
}
