//! `fuser::Filesystem` for the merged tree: thin translation from requests
//! to layer operations, replies, and events.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use fuser::{
    AccessFlags, BackingId, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::error::{FsError, OpError, OpResult};
use crate::inode::{HostKey, Inodes, Link, ROOT};
use crate::layers::{
    Found, Meta, Part, READ, SEARCH, Src, Store, WRITE, chown_at, is_reserved, is_whiteout,
    make_whiteout, set_opaque, unlink_whiteout,
};
use crate::policy::Name;
use crate::quota::Tree;
use crate::resolve::{open_dir, open_file, open_path, stat_at};
use crate::synth::{Synth, SynthEntry, SynthSpec};
use crate::walks::{Change, Walks};
use crate::{BaseSpec, EventSink, FsEvent, IdMap, MountOptions, MountSpec, MutationOp, Shared};

/// Audit reason for refusing a base entry's contents.
const PRIVATE_REASON: &str = "host file not readable by unprivileged host users";
/// Audit reason for refusing access the workspace owner lacks on the host.
const NOT_OWNER_REASON: &str = "the workspace owner has no such access to this host file";
/// Audit reason for dropping set-id bits in /workspace.
const SETID_REASON: &str = "set-id bits are not kept in the host-visible workspace";

/// Base and synthesized entries: the kernel may cache them for long.
const TTL_BASE: Duration = Duration::from_secs(3600);
/// Upper-layer entries only change through this mount.
const TTL_UPPER: Duration = Duration::from_secs(60);
/// The workspace may be changed live by other sandboxes.
const TTL_WORKSPACE: Duration = Duration::from_secs(1);
/// Most live workspace directories whose walks are remembered (one
/// descriptor each).
const WS_WALKS_CACHED: usize = 32;

/// `statfs` magics of stacking filesystems: a base on one of them needs
/// passthrough `max_stack_depth` 2.
const OVERLAYFS_MAGIC: i64 = 0x794c_7630;
const FUSE_MAGIC: i64 = 0x6573_5546;
const ECRYPTFS_MAGIC: i64 = 0xf15f;

/// Largest xattr value or list we fetch.
const XATTR_MAX: usize = 64 * 1024;

const WORKSPACE: &str = "workspace";

/// Audit reason for refusing to create or move onto [`LAYERS_DIR`].
const RESERVED_REASON: &str = "the name holds the snapshot layers";

/// Where an entry is served from, for ownership, caching and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Base,
    Synth,
    Upper,
    Workspace,
}

impl Area {
    /// The writable tree a write through a handle in this area charges.
    fn tree(self) -> Tree {
        Tree::of(self == Area::Workspace)
    }
}

/// A node's place: in the merged stack or in the workspace subtree.
#[derive(Debug, Clone)]
enum Loc {
    Merged(Vec<Name>),
    /// Components relative to the workspace root.
    Ws(Vec<Name>),
}

#[derive(Debug)]
enum HandleKind {
    File {
        file: File,
        writable: bool,
    },
    Synth(Vec<u8>),
    /// A directory: its listing, made at the first read of it.
    Dir(Mutex<Option<Listing>>),
}

/// A directory listing: (ino, kind, name) per entry, "." and ".." aside.
type Listing = Arc<Vec<(u64, FileType, Name)>>;

/// How the kernel does a file handle's I/O. It refuses to mix the two on
/// one inode (an open in the other mode fails with EIO), and all
/// passthrough opens of an inode must share one backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Io {
    /// Reads and writes come to this server (through the page cache).
    Cached,
    /// The kernel reads the backing host file itself.
    Passthrough,
}

/// Smallest base file given a passthrough backing file when registering
/// one costs a round trip to a registrar ([`crate::BackingFiles`]).
const DELEGATED_PASSTHROUGH_MIN_BYTES: i64 = 128 * 1024;

/// A backing id registered with the kernel; closed (`BACKING_CLOSE`) when
/// the last reference goes.
struct Backing {
    /// Always `Some` until dropped.
    id: Option<BackingId>,
    shared: Arc<Shared>,
}

impl Drop for Backing {
    fn drop(&mut self) {
        self.shared.live_backing.fetch_sub(1, Ordering::Relaxed);
        // A delegated id is closed by its registrar: this process's own
        // close ioctl (the BackingId's drop) would be refused.
        if let (Some(files), Some(id)) = (self.shared.backing_files.get(), self.id.take())
            && let Err(e) = files.close(id.into_raw())
        {
            tracing::debug!(error = %e, "closing a delegated backing id");
        }
    }
}

/// The open file handles of one inode, by I/O mode. This server's counts
/// never fall below the kernel's: they rise before the open reply and fall
/// at RELEASE, which the kernel sends after dropping its own count.
#[derive(Default)]
struct InodeIo {
    cached: usize,
    passthrough: usize,
    /// While `passthrough > 0`: the backing file and its host identity.
    backing: Option<(Arc<Backing>, HostKey)>,
}

/// Registers a file as a backing file with the kernel (the open request's
/// `ReplyOpen::open_backing`).
type MakeBacking<'a> = &'a dyn Fn(&File) -> std::io::Result<BackingId>;

/// A successful open: handle, flags, and the backing file to reply with.
struct Opened {
    fh: u64,
    flags: FopenFlags,
    backing: Option<Arc<Backing>>,
}

/// Who asked for a new entry (the request's ids, in the server's view).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl Caller {
    fn of(req: &Request) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
        }
    }
}

/// The most one READ returns (the kernel's max_pages is at most 256 pages).
const MAX_READ: usize = 1 << 20;

/// The changes of one setattr, for a file reached through its handle.
struct Detached {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

#[derive(Debug)]
struct Handle {
    /// The inode it was opened on.
    ino: u64,
    kind: HandleKind,
    /// The I/O mode it was opened in; `None` for directories.
    io: Option<Io>,
    area: Area,
    /// Sandbox path for workspace write events.
    ws_path: Option<String>,
    written: AtomicBool,
}

/// Where a mount's frozen layers are found, by name: each tree's own
/// `.airlock/layers`, then the directories the broker moved layers to
/// ([`crate::FrozenDirs`]). A layer once opened (or made by a freeze) is
/// kept open, so it stays reachable after the broker moves it.
struct LayerStores {
    upper_root: Arc<Dir>,
    ws_root: Arc<Dir>,
    upper: Vec<Arc<Dir>>,
    workspace: Option<Arc<Dir>>,
    open: Mutex<HashMap<(Tree, String), Arc<Dir>>>,
}

impl LayerStores {
    fn open(&self, tree: Tree, name: &str) -> OpResult<Arc<Dir>> {
        if let Some(d) = lock(&self.open).get(&(tree, name.to_string())) {
            return Ok(Arc::clone(d));
        }
        if !crate::snapshot::valid_name(name) {
            return Err(OpError::Invalid);
        }
        let (root, extra): (&Dir, Vec<&Arc<Dir>>) = match tree {
            Tree::Upper => (&self.upper_root, self.upper.iter().collect()),
            Tree::Workspace => (&self.ws_root, self.workspace.iter().collect()),
        };
        let n = Name::new(OsStr::new(name))?;
        let found = crate::snapshot::open_layer(root, name)
            .or_else(|e| extra.iter().find_map(|d| open_dir(&***d, &n).ok()).ok_or(e))?;
        lock(&self.open).insert((tree, name.to_string()), Arc::clone(&found));
        Ok(found)
    }

    fn remember(&self, tree: Tree, name: &str, dir: &Arc<Dir>) {
        lock(&self.open).insert((tree, name.to_string()), Arc::clone(dir));
    }

    fn forget(&self, tree: Tree, name: &str) -> Option<Arc<Dir>> {
        lock(&self.open).remove(&(tree, name.to_string()))
    }
}

/// The filesystem state shared by all session threads.
pub(crate) struct AirlockFs {
    store: Store,
    ws: Arc<Dir>,
    /// The workspace's frozen layers under its live tree `ws`, once it has
    /// any (see [`Store::workspace`]); `None` while it is a plain tree.
    ws_stack: RwLock<Option<Arc<Store>>>,
    /// Remembered walks of the live workspace (the agent's own only).
    ws_walks: Walks<Arc<Dir>>,
    /// Whether snapshots are on: [`LAYERS_DIR`] is reserved at the roots
    /// of the sandbox and of its workspace.
    layered: bool,
    /// The frozen layers' names, bottom first (see [`crate::LayerChain`]).
    chain: Mutex<crate::LayerChain>,
    /// Where frozen layers are found.
    stores: LayerStores,
    ws_owner: (u32, u32),
    ids: IdMap,
    /// Host ids of the sandbox user.
    user: (u32, u32),
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    events: EventSink,
    /// Open file handles per inode, by I/O mode (passthrough bookkeeping).
    io: Mutex<HashMap<u64, InodeIo>>,
    /// Whether to ask the kernel for passthrough at INIT.
    want_passthrough: bool,
    /// The `max_stack_depth` to ask for: 1, or 2 when the base itself is
    /// on a stacking filesystem (overlayfs, FUSE, ecryptfs).
    stack_depth: u32,
    shared: Arc<Shared>,
    /// Bytes held by open directory listings (see [`LISTING_BUDGET`]).
    listing_bytes: AtomicUsize,
    /// Whether nothing but this server (and, in the agent's own
    /// workspace, its other sandboxes' reported changes) changes any tree
    /// of this mount: no caller's rootfs, no caller's own workspace.
    exclusive: bool,
    /// Whether OPENDIR is answered ENOSYS, so that the kernel opens
    /// directories without a request (see `opendir`): `exclusive`, and
    /// the kernel offered FUSE_NO_OPENDIR_SUPPORT at INIT.
    no_opendir: AtomicBool,
    /// Listings read without a handle (`no_opendir`), by cursor.
    cursors: Mutex<Cursors>,
    /// Names the kernel was told are missing for a while (negative
    /// entries; see `lookup_or_miss`), so that whatever makes
    /// them appear behind the kernel (another sandbox, a restore) can
    /// drop them.
    negatives: Mutex<Negatives>,
    /// What the sandbox's writable layers hold, against its quota.
    usage: Arc<crate::quota::Usage>,
}

impl std::fmt::Debug for AirlockFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AirlockFs").finish_non_exhaustive()
    }
}

fn open_root(path: &Path) -> Result<Dir, FsError> {
    Dir::open_ambient_dir(path, ambient_authority()).map_err(|source| FsError::OpenLayer {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn sandbox_path(comps: &[Name]) -> String {
    let mut s = String::new();
    for c in comps {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c.as_bytes()));
    }
    if s.is_empty() { "/".to_owned() } else { s }
}

/// Longest path an event carries: a deeper one (a sandbox can nest
/// directories far past PATH_MAX through relative paths) keeps its head
/// and its tail around a marker, so every event fits the channel to the
/// broker and no change goes unreported.
const MAX_REPORTED_PATH: usize = 4096;

fn reported(path: String) -> String {
    if path.len() <= MAX_REPORTED_PATH {
        return path;
    }
    let cut = |mut i: usize, up: bool| {
        while !path.is_char_boundary(i) {
            if up {
                i += 1;
            } else {
                i -= 1;
            }
        }
        i
    };
    let head = cut(MAX_REPORTED_PATH / 2, false);
    let tail = cut(path.len() - MAX_REPORTED_PATH / 2, true);
    format!(
        "{}/...({} bytes)...{}",
        &path[..head],
        tail - head,
        &path[tail..]
    )
}

fn ws_path(rel: &[Name]) -> String {
    let mut s = String::from("/workspace");
    for c in rel {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c.as_bytes()));
    }
    s
}

fn to_ts(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(d.subsec_nanos()),
            },
            Err(e) => {
                let d = e.duration();
                Timespec {
                    tv_sec: -i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: 0,
                }
            }
        },
    }
}

impl AirlockFs {
    pub(crate) fn new(
        spec: &MountSpec,
        events: EventSink,
        opts: &MountOptions,
        shared: Arc<Shared>,
        usage: Arc<crate::quota::Usage>,
    ) -> Result<Self, FsError> {
        let ids = spec.ids;
        if ids.count == 0 || spec.sandbox_uid >= ids.count || spec.sandbox_gid >= ids.count {
            return Err(FsError::InvalidSpec {
                what: format!(
                    "sandbox uid {} / gid {} outside an id map of {}",
                    spec.sandbox_uid, spec.sandbox_gid, ids.count
                ),
            });
        }
        let (base, host_filter, base_owner) = match &spec.base {
            BaseSpec::Host => {
                let root = open_root(Path::new("/"))?;
                crate::resolve::set_union_root(&root);
                (root, true, None)
            }
            BaseSpec::Rootfs(dir) => {
                let d = open_root(dir)?;
                let st = rustix::fs::fstat(&d).map_err(|e| FsError::OpenLayer {
                    path: dir.clone(),
                    source: e.into(),
                })?;
                (d, false, Some(st.st_uid))
            }
        };
        // f_type is i64 on x86_64 but narrower on other targets.
        #[allow(clippy::unnecessary_cast)]
        let fs_type = rustix::fs::fstatfs(&base).map(|s| s.f_type as i64);
        let stack_depth = match fs_type {
            Ok(OVERLAYFS_MAGIC | FUSE_MAGIC | ECRYPTFS_MAGIC) => 2,
            _ => 1,
        };
        let upper = open_root(&spec.upper)?;
        let ws = open_root(&spec.workspace)?;
        let st = rustix::fs::fstat(&ws).map_err(|e| FsError::OpenLayer {
            path: spec.workspace.clone(),
            source: e.into(),
        })?;
        let chain = spec.snapshots.clone().unwrap_or_default();
        let mut frozen_upper = Vec::new();
        for p in &spec.frozen.upper {
            frozen_upper.push(Arc::new(open_root(p)?));
        }
        let frozen_ws = match &spec.frozen.workspace {
            Some(p) => Some(Arc::new(open_root(p)?)),
            None => None,
        };
        let upper = Arc::new(upper);
        let ws = Arc::new(ws);
        let stores = LayerStores {
            upper_root: Arc::clone(&upper),
            ws_root: Arc::clone(&ws),
            upper: frozen_upper,
            workspace: frozen_ws,
            open: Mutex::new(HashMap::new()),
        };
        let open_layers = |tree: Tree, names: &[String]| {
            names
                .iter()
                .map(|n| {
                    stores.open(tree, n).map_err(|e| FsError::OpenLayer {
                        path: PathBuf::from(crate::layers::LAYERS_DIR)
                            .join("layers")
                            .join(n),
                        source: std::io::Error::from_raw_os_error(e.errno().code()),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let upper_frozen = open_layers(Tree::Upper, &chain.upper)?;
        let ws_frozen = open_layers(Tree::Workspace, &chain.workspace)?;
        let synth = Synth::new(&SynthSpec {
            hostname: &spec.hostname,
            user: &spec.sandbox_user,
            uid: spec.sandbox_uid,
            gid: spec.sandbox_gid,
        });
        let store = Store::new(
            base,
            upper,
            host_filter,
            base_owner,
            synth,
            ids,
            spec.base_idmapped,
        );
        store.set_frozen(upper_frozen);
        // Only where the kernel may keep every listing and every miss until
        // this server (or another sandbox's, which reports it) changes the
        // directory: not on a caller's rootfs or in a caller's own
        // workspace, which the host changes unnoticed.
        let exclusive = spec.snapshots.is_some() && !store.base_may_change();
        let ws_stack = (!ws_frozen.is_empty())
            .then(|| Arc::new(Store::workspace(ws_frozen, Arc::clone(&ws), st.st_uid, ids)));
        Ok(Self {
            store,
            ws_stack: RwLock::new(ws_stack),
            ws_walks: Walks::new(WS_WALKS_CACHED, |_| 1),
            layered: spec.snapshots.is_some(),
            chain: Mutex::new(chain),
            stores,
            ws,
            ws_owner: (st.st_uid, st.st_gid),
            ids,
            user: (
                ids.host_uid_base + spec.sandbox_uid,
                ids.host_gid_base + spec.sandbox_gid,
            ),
            inodes: Mutex::new(Inodes::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            events,
            io: Mutex::new(HashMap::new()),
            want_passthrough: opts.passthrough,
            stack_depth,
            shared,
            listing_bytes: AtomicUsize::new(0),
            exclusive,
            no_opendir: AtomicBool::new(exclusive),
            cursors: Mutex::new(Cursors::default()),
            negatives: Mutex::new(Negatives::default()),
            usage,
        })
    }

    /// A duplicate of the workspace's root, for the quota's start-up walk
    /// (the upper layer is new with every sandbox, so it starts empty).
    pub(crate) fn usage_roots(&self) -> Vec<std::os::fd::OwnedFd> {
        self.ws.as_fd().try_clone_to_owned().into_iter().collect()
    }

    /// Sets the length of writable file `f` and settles what that did to
    /// its allocation (growing a file allocates nothing; shrinking frees).
    fn set_len_charged(&self, tree: Tree, f: &File, size: u64) -> OpResult<()> {
        let before = crate::quota::allocated(&rustix::fs::fstat(f)?);
        let r = f.set_len(size);
        let after = rustix::fs::fstat(f).map_or(before, |st| crate::quota::allocated(&st));
        self.usage.settle(tree, before, after);
        Ok(r?)
    }

    /// Runs `op` on writable file `f`, which may allocate up to `most`
    /// bytes: refused with ENOSPC unless that fits, then charged what it
    /// did allocate.
    fn allocating<T>(
        &self,
        tree: Tree,
        f: &File,
        most: u64,
        op: impl FnOnce() -> OpResult<T>,
    ) -> OpResult<T> {
        self.usage.fits_bytes(tree, most)?;
        let before = crate::quota::allocated(&rustix::fs::fstat(f)?);
        let r = op();
        let after = rustix::fs::fstat(f).map_or(before, |st| crate::quota::allocated(&st));
        self.usage.settle(tree, before, after);
        r
    }

    /// Refunds what a host entry about to go for good holds: its inode,
    /// and its bytes when this is its last name.
    fn refund_entry(&self, tree: Tree, dir: &Dir, name: &Name) {
        if let Ok(st) = stat_at(dir, name) {
            self.refund_stat(tree, st.as_ref());
        }
    }

    /// Refunds what the host entry `st` described held, now that one of its
    /// names went: all of it when that was its last name (or a directory).
    /// Whiteouts were never charged.
    fn refund_stat(&self, tree: Tree, st: Option<&rustix::fs::Stat>) {
        let Some(st) = st else {
            return;
        };
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if ft == rustix::fs::FileType::CharacterDevice && st.st_rdev == 0 {
            return;
        }
        if ft == rustix::fs::FileType::Directory {
            self.usage.refund_inodes(tree, 1);
        } else if st.st_nlink <= 1 {
            self.usage.refund_inodes(tree, 1);
            self.usage.refund_bytes(tree, crate::quota::allocated(st));
        }
    }

    // ---- events -------------------------------------------------------

    fn mutation(&self, op: MutationOp, path: String, to: Option<String>) {
        (self.events)(FsEvent::Mutation {
            op,
            path: reported(path),
            to: to.map(reported),
        });
    }

    fn deny(&self, op: &str, path: String, reason: &str) {
        tracing::debug!(op, path, reason, "denied");
        (self.events)(FsEvent::Denied {
            op: op.to_owned(),
            path: reported(path),
            reason: reason.to_owned(),
        });
    }

    // ---- locations ------------------------------------------------------

    /// Where `ino` is reached. A hard-linked file is reached through the
    /// first of its known names that still shows the same host file; names
    /// that no longer do (changed behind our back in the shared workspace)
    /// are dropped.
    fn loc(&self, ino: u64) -> OpResult<Loc> {
        let (paths, key) = lock(&self.inodes).paths(ino)?;
        let Some(key) = key.filter(|_| paths.len() > 1) else {
            let comps = paths.into_iter().next().map(|(_, c)| c).unwrap_or_default();
            return Ok(classify(comps));
        };
        for (link, comps) in paths {
            let loc = classify(comps);
            if self.host_key(&loc) == Some(key) {
                return Ok(loc);
            }
            lock(&self.inodes).drop_name(ino, &link);
        }
        Err(OpError::Stale(ino))
    }

    /// The identity of the entry at `loc`, when it is one of a writable
    /// area's non-directories.
    fn host_key(&self, loc: &Loc) -> Option<HostKey> {
        let (meta, area) = self.stat(loc).ok()?;
        Self::key_of(&meta, area)
    }

    /// Non-directories of the writable areas are identified by their host
    /// file; everything else by its path.
    fn key_of(meta: &Meta, area: Area) -> Option<HostKey> {
        match area {
            Area::Upper | Area::Workspace if !meta.is_dir() => meta.host,
            _ => None,
        }
    }

    fn child_loc(&self, parent: u64, name: &Name) -> OpResult<Loc> {
        let mut comps = lock(&self.inodes).path(parent)?;
        comps.push(name.clone());
        Ok(classify(comps))
    }

    /// The workspace directory at `rel`, walked one directory at a time;
    /// each must let the workspace's owner search it (the kernel checks the
    /// same from its cache, which another sandbox or the host can make
    /// stale by renaming a private directory into a known name).
    fn ws_dir(&self, rel: &[Name]) -> OpResult<Arc<Dir>> {
        self.ws_walk(rel, true)
    }

    /// [`Self::ws_dir`] for listing `rel`: its last directory needs no
    /// search permission (listing needs read, checked by the caller).
    fn ws_walk(&self, rel: &[Name], search_last: bool) -> OpResult<Arc<Dir>> {
        // The agent's own workspace changes only through its sandboxes'
        // servers, whose changes reach this one (`workspace_changed`):
        // walks of it are remembered. A caller's own directory is edited
        // on the host, unseen: walked every time.
        let seen = self.ws_walks.start();
        let (from, mut cur) = match self
            .layered
            .then(|| self.ws_walks.deepest(seen, rel))
            .flatten()
        {
            // Remembered directories passed the search check at every level.
            Some((n, d)) if n == rel.len() => return Ok(d),
            Some((n, d)) => (n, d),
            None => (0, Arc::clone(&self.ws)),
        };
        let stack = self.ws_stack();
        let mut levels = Vec::new();
        for (i, c) in rel.iter().enumerate().skip(from) {
            if i == 0 && self.layered && is_reserved(&[], c) {
                return Err(OpError::NotFound);
            }
            cur = match open_dir(&*cur, c) {
                Ok(d) => d,
                Err(e) if e.is_absent() && stack.is_some() => {
                    // Only a frozen layer has it: copied up (empty, with its
                    // owner, mode and times), so every operation below finds
                    // a live directory, as the first change under it would.
                    let Some(stack) = &stack else {
                        return Err(OpError::NotFound);
                    };
                    let _c = self.ws_walks.change();
                    let found = stack.resolve(&rel[..=i])?;
                    if !found.meta.is_dir() {
                        return Err(OpError::NotDir);
                    }
                    self.usage.charge_inodes(Tree::Workspace, 1)?;
                    match stack.upper_dir(&rel[..=i]) {
                        Ok(d) => d,
                        Err(e) => {
                            self.usage.refund_inodes(Tree::Workspace, 1);
                            return Err(e);
                        }
                    }
                }
                Err(e) if e.is_absent() || crate::resolve::is_loop(&e) => {
                    return Err(OpError::NotFound);
                }
                Err(e) => return Err(e),
            };
            if i + 1 < rel.len() || search_last {
                let meta = Meta::from_stat(&rustix::fs::fstat(&*cur)?);
                self.ws_require("search", ws_path(&rel[..=i]), &meta, SEARCH)?;
                levels.push((i + 1, Arc::clone(&cur)));
            }
        }
        if self.layered {
            self.ws_walks.remember(seen, rel, levels);
        }
        Ok(cur)
    }

    /// Marks a change to what walks of either tree find under way (see
    /// [`crate::walks`]) until the guards drop.
    fn dir_change(&self) -> (Change<'_>, Change<'_>) {
        (self.store.mutation(), self.ws_walks.change())
    }

    /// Refuses (audited) making an entry named [`crate::layers::LAYERS_DIR`]
    /// at the root of the sandbox or of its workspace: only this server
    /// makes it, as a real directory, for snapshot layers.
    fn refuse_reserved(&self, op: &str, loc: &Loc) -> OpResult<()> {
        let (comps, path) = match loc {
            Loc::Merged(c) => (c, sandbox_path(c)),
            Loc::Ws(r) if self.layered => (r, ws_path(r)),
            Loc::Ws(_) => return Ok(()),
        };
        if let Some((name, dir)) = comps.split_last()
            && is_reserved(dir, name)
        {
            self.deny(op, path, RESERVED_REASON);
            return Err(OpError::Perm);
        }
        Ok(())
    }

    fn ws_stack(&self) -> Option<Arc<Store>> {
        match self.ws_stack.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The workspace entry `name` in the live directory `d` (at `dir`):
    /// its metadata and, when only a frozen layer shows it, that layer's
    /// directory. `None` when absent or whited out.
    fn ws_find(
        &self,
        d: &Dir,
        dir: &[Name],
        name: &Name,
    ) -> OpResult<Option<(Meta, Option<Arc<Dir>>)>> {
        if self.layered && is_reserved(dir, name) {
            return Ok(None);
        }
        match stat_at(d, name)? {
            Some(st) if is_whiteout(&st) && self.layered => Ok(None),
            Some(st) => Ok(Some((Meta::from_stat(&st), None))),
            None => {
                let Some(stack) = self.ws_stack() else {
                    return Ok(None);
                };
                let parts = stack.dir_parts(dir)?;
                let l = stack.lookup(&parts, dir, name, false)?;
                let Some(Found {
                    meta,
                    src: Src::Layer(idx),
                }) = l.found
                else {
                    return Ok(None);
                };
                let layer = parts.iter().find_map(|p| match p {
                    Part::Layer(i, d) if *i == idx => Some(Arc::clone(d)),
                    _ => None,
                });
                Ok(layer.map(|l| (meta, Some(l))))
            }
        }
    }

    /// Whether a frozen layer of the workspace shows `name` in `dir`
    /// (then removing it from the live tree needs a whiteout).
    fn ws_lower_has(&self, dir: &[Name], name: &Name) -> OpResult<bool> {
        let Some(stack) = self.ws_stack() else {
            return Ok(false);
        };
        let parts = stack.dir_parts(dir)?;
        stack.lower_has(&parts, dir, name)
    }

    /// Makes sure the workspace entry `rel` is in the live tree, copying
    /// it up from a frozen layer (charged to the quota) when only one has
    /// it. Keeps the node's ino: it takes the copy's host identity.
    fn ws_copy_up(&self, rel: &[Name], truncate: bool) -> OpResult<()> {
        let Some(stack) = self.ws_stack() else {
            return Ok(());
        };
        let (name, dir) = rel.split_last().ok_or(OpError::Perm)?;
        let d = self.ws_dir(dir)?;
        match self.ws_find(&d, dir, name)? {
            Some((meta, Some(_))) => {
                let found = stack.resolve(rel)?;
                let bytes = if meta.is_dir() || truncate {
                    0
                } else {
                    meta.blocks.saturating_mul(512)
                };
                self.usage.charge_inodes(Tree::Workspace, 1)?;
                if let Err(e) = self.usage.charge_bytes(Tree::Workspace, bytes) {
                    self.usage.refund_inodes(Tree::Workspace, 1);
                    return Err(e);
                }
                if let Err(e) = stack.copy_up(rel, &found, truncate) {
                    self.usage.refund_inodes(Tree::Workspace, 1);
                    self.usage.refund_bytes(Tree::Workspace, bytes);
                    return Err(e);
                }
                if let Some(st) = stat_at(&*d, name)? {
                    let mut full = vec![Name::new(OsStr::new(WORKSPACE))?];
                    full.extend(rel.iter().cloned());
                    lock(&self.inodes).rekey(&full, (st.st_dev, st.st_ino));
                }
                Ok(())
            }
            Some((_, None)) => Ok(()),
            None => Err(OpError::NotFound),
        }
    }

    /// The live workspace directory `d` (at `rel`) listed, without
    /// [`LAYERS_DIR`].
    fn ws_list(&self, d: &Dir, rel: &[Name]) -> OpResult<Vec<(Name, FileType)>> {
        let mut out = Vec::new();
        for e in d.entries()? {
            let e = e?;
            let Ok(name) = Name::new(&e.file_name()) else {
                continue;
            };
            if self.layered && is_reserved(rel, &name) {
                continue;
            }
            if let Some(kind) = crate::layers::entry_kind(d, &e, &name)? {
                out.push((name, kind));
            }
        }
        Ok(out)
    }

    /// Removes workspace entry `rel` (in live directory `d`) when frozen
    /// layers lie under the workspace: from the live tree if it is there,
    /// and with a whiteout if a frozen layer shows the name.
    fn ws_unlink_layered(
        &self,
        stack: &Store,
        rel: &[Name],
        d: &Dir,
        name: &Name,
        dir_op: bool,
    ) -> OpResult<()> {
        let dir = parent_of(rel)?;
        let (meta, lower) = self.ws_find(d, dir, name)?.ok_or(OpError::NotFound)?;
        match (dir_op, meta.is_dir()) {
            (true, false) => return Err(OpError::NotDir),
            (false, true) => return Err(OpError::IsDir),
            _ => {}
        }
        if dir_op && !stack.list(&stack.dir_parts(rel)?, rel)?.is_empty() {
            return Err(OpError::NotEmpty);
        }
        if lower.is_none() {
            let st = stat_at(d, name)?;
            if dir_op {
                clear_whiteouts(&*open_dir(d, name)?)?;
                rustix::fs::unlinkat(d, name.as_os_str(), AtFlags::REMOVEDIR)?;
            } else {
                rustix::fs::unlinkat(d, name.as_os_str(), AtFlags::empty())?;
            }
            self.refund_stat(Tree::Workspace, st.as_ref());
        }
        if self.ws_lower_has(dir, name)? {
            make_whiteout(d, name)?;
        }
        Ok(())
    }

    /// Renames workspace entry `from` to `to` (each with its live
    /// directory and name) when frozen layers lie under the workspace, as
    /// the sandbox's copy-on-write stack does: a file only a frozen layer
    /// has is copied up first, a whiteout marks the old name when a frozen
    /// layer shows it, and a directory a frozen layer also has is refused
    /// (EXDEV, so `mv` copies).
    fn ws_rename_layered(
        &self,
        stack: &Store,
        from: (&[Name], &Dir, &Name),
        to: (&[Name], &Dir, &Name),
        noreplace: bool,
    ) -> OpResult<()> {
        let (a, da, name) = from;
        let (b, db, new_name) = to;
        let (dir_a, dir_b) = (parent_of(a)?, parent_of(b)?);
        let (src, src_lower) = self.ws_find(da, dir_a, name)?.ok_or(OpError::NotFound)?;
        let src_dir = src.is_dir();
        let src_lower_name = self.ws_lower_has(dir_a, name)?;
        if src_dir && (src_lower.is_some() || src_lower_name) {
            return Err(OpError::CrossDevice);
        }
        let dst = self.ws_find(db, dir_b, new_name)?;
        if let Some((d, _)) = &dst {
            if noreplace {
                return Err(OpError::Exists);
            }
            match (src_dir, d.is_dir()) {
                (false, true) => return Err(OpError::IsDir),
                (true, false) => return Err(OpError::NotDir),
                (true, true) => {
                    if !stack.list(&stack.dir_parts(b)?, b)?.is_empty() {
                        return Err(OpError::NotEmpty);
                    }
                }
                (false, false) => {}
            }
            if a == b || (src.host.is_some() && src.host == d.host) {
                // One name, or two names of one file: rename(2) does
                // nothing.
                return Ok(());
            }
        }
        if src_lower.is_some() {
            self.ws_copy_up(a, false)?;
        }
        let dst_lower = self.ws_lower_has(dir_b, new_name)?;
        unlink_whiteout(db, new_name)?;
        let replaced = stat_at(db, new_name)?;
        if let Some(st) = &replaced
            && rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        {
            clear_whiteouts(&*open_dir(db, new_name)?)?;
        }
        rustix::fs::renameat(da, name.as_os_str(), db, new_name.as_os_str())?;
        self.refund_stat(Tree::Workspace, replaced.as_ref());
        if src_lower_name {
            make_whiteout(da, name)?;
        }
        if src_dir && dst_lower {
            set_opaque(&*open_dir(db, new_name)?)?;
        }
        Ok(())
    }

    /// Metadata and area of a location.
    fn stat(&self, loc: &Loc) -> OpResult<(Meta, Area)> {
        match loc {
            Loc::Ws(rel) => match rel.split_last() {
                None => Ok((
                    Meta::from_stat(&rustix::fs::fstat(&*self.ws)?),
                    Area::Workspace,
                )),
                Some((name, dir)) => {
                    let d = self.ws_dir(dir)?;
                    let (meta, _) = self.ws_find(&d, dir, name)?.ok_or(OpError::NotFound)?;
                    Ok((meta, Area::Workspace))
                }
            },
            Loc::Merged(comps) => {
                let f = self.store.resolve(comps)?;
                Ok(self.shown(f))
            }
        }
    }

    fn area_of(&self, src: &Src) -> Area {
        match src {
            Src::Synth(_) => Area::Synth,
            Src::Layer(0) => Area::Base,
            Src::Layer(_) => Area::Upper,
        }
    }

    /// Metadata with the owner the kernel is shown. Only the writable
    /// layer's files keep their host identity (lower ones are read-only and
    /// change identity on copy-up).
    fn shown(&self, f: Found) -> (Meta, Area) {
        let area = self.area_of(&f.src);
        let (uid, gid) = self.store.owner(&f.src, &f.meta);
        let perm = self.store.perm(&f.src, &f.meta);
        let mut m = f.meta;
        m.uid = uid;
        m.gid = gid;
        m.perm = perm;
        if !self.store.keyed(&f.src) {
            m.host = None;
        }
        (m, area)
    }

    fn attr(&self, ino: u64, meta: &Meta, area: Area) -> FileAttr {
        let (uid, gid, perm) = if area == Area::Workspace {
            (self.user.0, self.user.1, self.ws_perm(meta))
        } else {
            (meta.uid, meta.gid, meta.perm)
        };
        FileAttr {
            ino: INodeNo(ino),
            size: meta.size,
            blocks: meta.blocks,
            atime: meta.atime,
            mtime: meta.mtime,
            ctime: meta.ctime,
            crtime: meta.ctime,
            kind: meta.kind,
            perm,
            nlink: meta.nlink,
            uid,
            gid,
            rdev: meta.rdev,
            blksize: meta.blksize,
            flags: 0,
        }
    }

    /// Whether the workspace's owner may access a workspace entry with
    /// host metadata `meta` as `bits` (READ 4, WRITE 2, SEARCH 1) on the
    /// host. The broker works on the workspace as root; the sandbox acts
    /// as the workspace directory's owner, so it gets the owner class on
    /// that owner's files and the "other" class on anyone else's (a root
    /// file someone left in a user's checkout, another user's 0700 dir).
    fn ws_grants(&self, meta: &Meta, bits: u16) -> bool {
        let class = if self.ws_owns(meta) {
            meta.perm >> 6
        } else {
            meta.perm
        };
        class & bits == bits
    }

    fn ws_owns(&self, meta: &Meta) -> bool {
        meta.uid == self.ws_owner.0
    }

    /// The mode the kernel is shown for a workspace entry (all of which
    /// are shown owned by the sandbox user): its own on the workspace
    /// owner's files, else the "other" class in every class, so the
    /// kernel's own checks refuse what the owner could not do.
    fn ws_perm(&self, meta: &Meta) -> u16 {
        if self.ws_owns(meta) {
            return meta.perm;
        }
        let o = meta.perm & 0o7;
        (meta.perm & 0o7000) | (o << 6) | (o << 3) | o
    }

    /// Refuses (EACCES, audited) unless the workspace owner has `bits` on
    /// the workspace entry `meta` at sandbox path `path`.
    fn ws_require(&self, op: &str, path: String, meta: &Meta, bits: u16) -> OpResult<()> {
        if self.ws_grants(meta, bits) {
            Ok(())
        } else {
            self.deny(op, path, NOT_OWNER_REASON);
            Err(OpError::HostPrivate)
        }
    }

    /// Refuses (audited) reading the user xattrs of a base entry that other
    /// host users may not read. (Workspace entries are checked on the
    /// descriptor opened for the call, see [`Self::ws_require_fd`].)
    fn require_base_read(&self, op: &str, loc: &Loc) -> OpResult<()> {
        match loc {
            Loc::Ws(_) => Ok(()),
            Loc::Merged(comps) => {
                let found = self.store.resolve(comps)?;
                if found.src == Src::Layer(0) && !self.store.base_grants(&found.meta, READ) {
                    self.deny(op, sandbox_path(comps), PRIVATE_REASON);
                    return Err(OpError::HostPrivate);
                }
                Ok(())
            }
        }
    }

    /// For a workspace location, [`Self::ws_require`] on the file `fd`
    /// opened for the operation (not on a name that may since show another
    /// file); other locations pass.
    fn ws_require_fd(&self, op: &str, loc: &Loc, fd: &File, bits: u16) -> OpResult<()> {
        match loc {
            Loc::Ws(rel) => {
                let meta = Meta::from_stat(&rustix::fs::fstat(fd)?);
                self.ws_require(op, ws_path(rel), &meta, bits)
            }
            Loc::Merged(_) => Ok(()),
        }
    }

    /// Refuses changing entries in the workspace directory `dir` (at
    /// sandbox path of `rel`'s parent) without write and search access.
    fn ws_require_dir_write(&self, op: &str, rel: &[Name], dir: &Dir) -> OpResult<()> {
        let meta = Meta::from_stat(&rustix::fs::fstat(dir)?);
        let parent = rel.split_last().map_or(&[][..], |(_, d)| d);
        self.ws_require(op, ws_path(parent), &meta, WRITE | SEARCH)
    }

    /// In a sticky workspace directory, only an entry's owner or the
    /// directory's owner may remove or replace it.
    fn ws_require_sticky(&self, op: &str, rel: &[Name], dir: &Dir, name: &Name) -> OpResult<()> {
        let dmeta = Meta::from_stat(&rustix::fs::fstat(dir)?);
        if dmeta.perm & 0o1000 == 0 || self.ws_owns(&dmeta) {
            return Ok(());
        }
        match stat_at(dir, name)? {
            Some(st) if !self.ws_owns(&Meta::from_stat(&st)) => {
                self.deny(op, ws_path(rel), NOT_OWNER_REASON);
                Err(OpError::Perm)
            }
            _ => Ok(()),
        }
    }

    fn ttl(&self, area: Area) -> Duration {
        match area {
            Area::Base | Area::Synth => TTL_BASE,
            Area::Upper => TTL_UPPER,
            // The agent's own workspace: other sandboxes' changes are
            // invalidated as they happen. A caller's directory: the host's
            // are not, so they show within a second.
            Area::Workspace if self.layered => TTL_UPPER,
            Area::Workspace => TTL_WORKSPACE,
        }
    }

    /// The host directory and name to modify `loc` in place: the workspace
    /// entry, or the writable-layer copy (copied up first).
    fn writable(&self, loc: &Loc, truncate: bool) -> OpResult<(Arc<Dir>, Name)> {
        match loc {
            Loc::Ws(rel) => {
                let (name, dir) = rel.split_last().ok_or(OpError::Perm)?;
                self.ws_copy_up(rel, truncate)?;
                Ok((self.ws_dir(dir)?, name.clone()))
            }
            Loc::Merged(comps) => {
                let (name, dir) = comps.split_last().ok_or(OpError::Perm)?;
                let found = self.store.resolve(comps)?;
                self.copy_up(comps, &found, truncate)?;
                Ok((self.store.upper_dir(dir)?, name.clone()))
            }
        }
    }

    /// Copy `comps` up, auditing a refusal to copy a private base file.
    fn copy_up(&self, comps: &[Name], found: &Found, truncate: bool) -> OpResult<()> {
        let (top, _) = self.store.top();
        let charged = if found.src == Src::Layer(top) {
            (0, 0)
        } else if found.meta.is_dir() || truncate {
            (0, 1)
        } else {
            (found.meta.blocks.saturating_mul(512), 1)
        };
        self.usage.charge_inodes(Tree::Upper, charged.1)?;
        if let Err(e) = self.usage.charge_bytes(Tree::Upper, charged.0) {
            self.usage.refund_inodes(Tree::Upper, charged.1);
            return Err(e);
        }
        let r = self.store.copy_up(comps, found, truncate);
        if r.is_err() {
            self.usage.refund_inodes(Tree::Upper, charged.1);
            self.usage.refund_bytes(Tree::Upper, charged.0);
        } else if found.src != Src::Layer(top)
            && self.store.keyed(&found.src)
            && !found.meta.is_dir()
            && let Some((name, dir)) = comps.split_last()
            && let Some(st) = stat_at(&*self.store.upper_dir(dir)?, name)?
        {
            // A frozen layer's file: its node takes the copy's identity.
            lock(&self.inodes).rekey(comps, (st.st_dev, st.st_ino));
        }
        if let Err(OpError::HostPrivate) = r {
            self.deny("copy-up", sandbox_path(comps), PRIVATE_REASON);
        }
        r
    }

    fn handle(&self, fh: u64) -> OpResult<Arc<Handle>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(OpError::BadHandle(fh))
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    /// Register a kernel reference to `name` in `parent` and build the
    /// entry reply: one ino per host file for the writable areas'
    /// non-directories, per path otherwise.
    fn entry(&self, parent: u64, name: &Name, meta: &Meta, area: Area) -> (FileAttr, Duration) {
        let key = Self::key_of(meta, area);
        if let Some(k) = key {
            self.check_key_owner(k, parent, name);
        }
        let ino = lock(&self.inodes).insert(parent, name, key, 1);
        (self.attr(ino, meta, area), self.ttl(area))
    }

    /// Before a new name joins the node holding host file `key`, make sure
    /// that node's names still show that file: a host inode number can be
    /// reused after the file is deleted behind our back. Stale names are
    /// dropped; a node left without names gives up the key.
    fn check_key_owner(&self, key: HostKey, parent: u64, name: &Name) {
        let Some((ino, paths)) = lock(&self.inodes).key_owner(key, parent, name) else {
            return;
        };
        let stale: Vec<Link> = paths
            .into_iter()
            .filter(|(_, comps)| self.host_key(&classify(comps.clone())) != Some(key))
            .map(|(link, _)| link)
            .collect();
        if !stale.is_empty() {
            let mut t = lock(&self.inodes);
            for link in &stale {
                t.drop_name(ino, link);
            }
        }
    }

    // ---- operations -------------------------------------------------------

    fn do_lookup(&self, parent: u64, name: &OsStr) -> OpResult<(FileAttr, Duration)> {
        let name = Name::new(name)?;
        let ctx = self.dir_ctx(parent)?;
        self.lookup_in(parent, &ctx, &name)
    }

    /// Reach directory `dir` once for looking up one or many of its names
    /// (a listing with attributes looks up every entry: walking the layers
    /// from the root for each one cost a few opens per level per entry).
    fn dir_ctx(&self, dir: u64) -> OpResult<DirCtx> {
        let comps = lock(&self.inodes).path(dir)?;
        Ok(match classify(comps) {
            Loc::Ws(rel) => {
                let d = self.ws_dir(&rel)?;
                DirCtx::Ws(rel, d)
            }
            // The root holds the workspace's mount point: its children are
            // classified one by one.
            Loc::Merged(comps) if comps.is_empty() => DirCtx::Root,
            Loc::Merged(comps) => {
                let parts = self.store.dir_parts(&comps)?;
                DirCtx::Merged(comps, parts)
            }
        })
    }

    /// LOOKUP of `name` in `parent`, reached as `ctx`.
    fn lookup_in(&self, parent: u64, ctx: &DirCtx, name: &Name) -> OpResult<(FileAttr, Duration)> {
        let (meta, area) = match ctx {
            DirCtx::Ws(rel, d) => {
                let (meta, _) = self.ws_find(d, rel, name)?.ok_or(OpError::NotFound)?;
                (meta, Area::Workspace)
            }
            DirCtx::Root if name.as_bytes() == WORKSPACE.as_bytes() => {
                self.stat(&Loc::Ws(Vec::new()))?
            }
            DirCtx::Root | DirCtx::Merged(..) => {
                let (dir, root_parts);
                let parts = match ctx {
                    DirCtx::Merged(comps, parts) => {
                        dir = comps.as_slice();
                        parts
                    }
                    _ => {
                        dir = &[];
                        root_parts = self.store.dir_parts(&[])?;
                        &root_parts
                    }
                };
                let l = self.store.lookup(parts, dir, name, false)?;
                match l.found {
                    Some(f) => self.shown(f),
                    None => {
                        if let Some(reason) = l.hidden
                            && dir.first().is_some_and(|d| d.as_bytes() == b"etc")
                        {
                            let mut comps = dir.to_vec();
                            comps.push(name.clone());
                            self.deny("lookup", sandbox_path(&comps), reason);
                        }
                        return Err(OpError::NotFound);
                    }
                }
            }
        };
        Ok(self.entry(parent, name, &meta, area))
    }

    fn do_getattr(&self, ino: u64, fh: Option<FileHandle>) -> OpResult<(FileAttr, Duration)> {
        if ino == ROOT {
            return Ok((
                self.attr(ROOT, &self.store.root_meta(), Area::Synth),
                TTL_BASE,
            ));
        }
        if let Some(fh) = fh
            && let Ok(h) = self.handle(fh.0)
            && h.area != Area::Base
            && let Some(a) = self.handle_attr(ino, &h)
        {
            return a;
        }
        match self.loc(ino) {
            Ok(loc) => {
                let (meta, area) = self.stat(&loc)?;
                Ok((self.attr(ino, &meta, area), self.ttl(area)))
            }
            // Every name is gone (fstat(2) of an unlinked open file asks
            // without a handle; a passthrough inode detached after a
            // copy-up): answer from an open handle of the inode.
            Err(OpError::Stale(_)) if let Some(h) = self.open_handle_of(ino) => self
                .handle_attr(ino, &h)
                .unwrap_or(Err(OpError::Stale(ino))),
            Err(e) => Err(e),
        }
    }

    /// Attributes from an open file handle's host file.
    fn handle_attr(&self, ino: u64, h: &Handle) -> Option<OpResult<(FileAttr, Duration)>> {
        let HandleKind::File { file, .. } = &h.kind else {
            return None;
        };
        let st = match rustix::fs::fstat(file) {
            Ok(st) => st,
            Err(e) => return Some(Err(e.into())),
        };
        let mut meta = Meta::from_stat(&st);
        match h.area {
            Area::Upper => {
                meta.uid = self.ids.clamp_uid(meta.uid);
                meta.gid = self.ids.clamp_gid(meta.gid);
            }
            Area::Base => {
                (meta.uid, meta.gid) = self.store.owner(&Src::Layer(0), &meta);
                meta.host = None;
            }
            Area::Synth | Area::Workspace => {}
        }
        Some(Ok((self.attr(ino, &meta, h.area), self.ttl(h.area))))
    }

    /// Some open file handle of `ino`.
    fn open_handle_of(&self, ino: u64) -> Option<Arc<Handle>> {
        lock(&self.handles)
            .values()
            .find(|h| h.ino == ino && matches!(h.kind, HandleKind::File { .. }))
            .cloned()
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> OpResult<(FileAttr, Duration)> {
        // A directory's owner and mode decide the workspace's search checks.
        let _m = (mode.is_some() || uid.is_some() || gid.is_some()).then(|| self.ws_walks.change());
        // ftruncate: through the caller's own writable handle, which stays
        // valid when the name is gone (a file unlinked while open, as
        // mkstemp-then-unlink users do).
        if mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && atime.is_none()
            && mtime.is_none()
            && let Some(size) = size
            && let Some(h) = fh
                .and_then(|fh| self.handle(fh.0).ok())
                .filter(|h| matches!(h.kind, HandleKind::File { writable: true, .. }))
            && let HandleKind::File { file, .. } = &h.kind
        {
            if h.area == Area::Workspace {
                kill_setid(file)?;
                if let Some(p) = &h.ws_path {
                    self.mutation(MutationOp::Truncate, p.clone(), None);
                }
            }
            self.set_len_charged(h.area.tree(), file, size)?;
            if let Some(a) = self.handle_attr(ino, &h) {
                return a;
            }
        }
        let loc = match self.loc(ino) {
            Ok(loc) => loc,
            // Every name is gone (unlinked, or renamed over) but the file
            // is still open: fchmod, fchown and futimens reach it through
            // an open handle, as on a local filesystem.
            Err(OpError::Stale(_)) => {
                let h = fh
                    .and_then(|fh| self.handle(fh.0).ok())
                    .filter(|h| h.ino == ino)
                    .or_else(|| self.open_handle_of(ino))
                    .ok_or(OpError::Stale(ino))?;
                let change = Detached {
                    mode,
                    uid,
                    gid,
                    size,
                    atime,
                    mtime,
                };
                return self.setattr_detached(ino, &h, change);
            }
            Err(e) => return Err(e),
        };
        let (is_ws, path) = match &loc {
            Loc::Ws(rel) => (true, ws_path(rel)),
            Loc::Merged(c) => (false, sandbox_path(c)),
        };
        if let Loc::Ws(rel) = &loc
            && (atime.is_some() || mtime.is_some())
        {
            // On the host, only a file's owner sets explicit times, and
            // touching someone else's file needs write access. (Mode and size
            // changes are checked below, on the inode they change; the times
            // are checked by name.)
            let (meta, _) = self.stat(&loc)?;
            let explicit_time = matches!(atime, Some(TimeOrNow::SpecificTime(_)))
                || matches!(mtime, Some(TimeOrNow::SpecificTime(_)));
            if !rel.is_empty() && !self.ws_owns(&meta) {
                if explicit_time {
                    self.deny("setattr", path, NOT_OWNER_REASON);
                    return Err(OpError::Perm);
                }
                self.ws_require("setattr", path.clone(), &meta, WRITE)?;
            }
        }
        if uid.is_some() || gid.is_some() {
            if is_ws {
                if uid.is_some_and(|u| u != self.user.0) || gid.is_some_and(|g| g != self.user.1) {
                    self.deny("chown", path, "workspace files belong to the sandbox user");
                    return Err(OpError::Perm);
                }
            } else {
                if uid.is_some_and(|u| !self.ids.uid_mapped(u))
                    || gid.is_some_and(|g| !self.ids.gid_mapped(g))
                {
                    self.deny("chown", path, "id outside the sandbox's id map");
                    return Err(OpError::Perm);
                }
                let (d, name) = self.writable(&loc, false)?;
                rustix::fs::chownat(
                    &*d,
                    name.as_os_str(),
                    uid.map(rustix::fs::Uid::from_raw),
                    gid.map(rustix::fs::Gid::from_raw),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
        }
        if let Some(mode) = mode {
            let (d, name) = self.writable(&loc, false)?;
            let p = open_path(&*d, &name)?;
            let mut mode = mode & 0o7777;
            if let Loc::Ws(rel) = &loc {
                // Checked again on the very inode about to change: the name
                // may show another file than when it was checked above.
                let st = rustix::fs::fstat(&p)?;
                if !rel.is_empty() && !self.ws_owns(&Meta::from_stat(&st)) {
                    self.deny("setattr", path, NOT_OWNER_REASON);
                    return Err(OpError::Perm);
                }
                let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory;
                let setid = setid_bits(is_dir);
                if mode & setid != 0 {
                    self.deny("chmod", path.clone(), SETID_REASON);
                    mode &= !setid;
                }
            }
            crate::sys::chmod_fd(p.as_fd(), mode)?;
            if is_ws {
                self.mutation(MutationOp::Chmod, path.clone(), None);
            }
        }
        if let Some(size) = size {
            let via_fh = fh
                .and_then(|fh| self.handle(fh.0).ok())
                .filter(|h| matches!(h.kind, HandleKind::File { writable: true, .. }));
            if let Some(h) = via_fh
                && let HandleKind::File { file, .. } = &h.kind
            {
                if is_ws {
                    kill_setid(file)?;
                }
                self.set_len_charged(Tree::of(is_ws), file, size)?;
            } else {
                let (d, name) = self.writable(&loc, size == 0)?;
                let f = open_file(&*d, &name, OFlags::WRONLY | OFlags::NONBLOCK, 0)?;
                if is_ws {
                    // Checked on the file opened, as for the mode above.
                    let meta = Meta::from_stat(&rustix::fs::fstat(&f)?);
                    self.ws_require("truncate", path.clone(), &meta, WRITE)?;
                    kill_setid(&f)?;
                }
                self.set_len_charged(Tree::of(is_ws), &f, size)?;
            }
            if is_ws {
                self.mutation(MutationOp::Truncate, path.clone(), None);
            }
        }
        if atime.is_some() || mtime.is_some() {
            let (d, name) = self.writable(&loc, false)?;
            rustix::fs::utimensat(
                &*d,
                name.as_os_str(),
                &Timestamps {
                    last_access: to_ts(atime),
                    last_modification: to_ts(mtime),
                },
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
            if is_ws {
                self.mutation(MutationOp::Utimes, path, None);
            }
        }
        self.do_getattr(ino, None)
    }

    /// A setattr on a file no name shows any more, through its open
    /// handle `h`, under the rules a named one meets: in the workspace
    /// only the owner's files change mode or take explicit times, owners
    /// stay the workspace's, and set-id bits are dropped; elsewhere owners
    /// stay within the sandbox's ids. A base file is never changed (its
    /// copy-up needs a name).
    fn setattr_detached(
        &self,
        ino: u64,
        h: &Handle,
        c: Detached,
    ) -> OpResult<(FileAttr, Duration)> {
        let HandleKind::File { file, writable } = &h.kind else {
            return Err(OpError::Stale(ino));
        };
        if matches!(h.area, Area::Base | Area::Synth) {
            return Err(OpError::Stale(ino));
        }
        let ws = h.area == Area::Workspace;
        let path = h
            .ws_path
            .clone()
            .unwrap_or_else(|| "(unlinked file)".to_string());
        let st = rustix::fs::fstat(file)?;
        let owns = !ws || self.ws_owns(&Meta::from_stat(&st));
        if c.uid.is_some() || c.gid.is_some() {
            if ws {
                if c.uid.is_some_and(|u| u != self.user.0)
                    || c.gid.is_some_and(|g| g != self.user.1)
                {
                    self.deny("chown", path, "workspace files belong to the sandbox user");
                    return Err(OpError::Perm);
                }
            } else {
                if c.uid.is_some_and(|u| !self.ids.uid_mapped(u))
                    || c.gid.is_some_and(|g| !self.ids.gid_mapped(g))
                {
                    self.deny("chown", path, "id outside the sandbox's id map");
                    return Err(OpError::Perm);
                }
                rustix::fs::fchown(
                    file,
                    c.uid.map(rustix::fs::Uid::from_raw),
                    c.gid.map(rustix::fs::Gid::from_raw),
                )?;
            }
        }
        if let Some(mode) = c.mode {
            if !owns {
                self.deny("setattr", path, NOT_OWNER_REASON);
                return Err(OpError::Perm);
            }
            let mut mode = mode & 0o7777;
            if ws && mode & setid_bits(false) != 0 {
                self.deny("chmod", path.clone(), SETID_REASON);
                mode &= !setid_bits(false);
            }
            crate::sys::chmod_fd(file.as_fd(), mode)?;
        }
        if let Some(size) = c.size {
            if !writable {
                return Err(OpError::BadHandle(0));
            }
            if ws {
                kill_setid(file)?;
            }
            self.set_len_charged(Tree::of(ws), file, size)?;
        }
        if c.atime.is_some() || c.mtime.is_some() {
            let explicit = matches!(c.atime, Some(TimeOrNow::SpecificTime(_)))
                || matches!(c.mtime, Some(TimeOrNow::SpecificTime(_)));
            if !owns && explicit {
                self.deny("setattr", path, NOT_OWNER_REASON);
                return Err(OpError::Perm);
            }
            if !owns {
                self.ws_require("setattr", path, &Meta::from_stat(&st), WRITE)?;
            }
            rustix::fs::futimens(
                file,
                &Timestamps {
                    last_access: to_ts(c.atime),
                    last_modification: to_ts(c.mtime),
                },
            )?;
        }
        self.handle_attr(ino, h).unwrap_or(Err(OpError::Stale(ino)))
    }

    fn do_readlink(&self, ino: u64) -> OpResult<Vec<u8>> {
        match self.loc(ino)? {
            Loc::Ws(rel) => {
                let (name, dir) = rel.split_last().ok_or(OpError::Invalid)?;
                let d = self.ws_dir(dir)?;
                let d = match self.ws_find(&d, dir, name)? {
                    Some((_, Some(lower))) => lower,
                    Some((_, None)) => d,
                    None => return Err(OpError::NotFound),
                };
                Ok(rustix::fs::readlinkat(&*d, name.as_os_str(), Vec::new())?.into_bytes())
            }
            Loc::Merged(comps) => match self.store.resolve(&comps)?.src {
                Src::Layer(idx) => self.store.readlink(&comps, idx),
                Src::Synth(_) => Err(OpError::Invalid),
            },
        }
    }

    /// Create an entry with `make(dir, name)`, owned per area; returns
    /// the new entry's attributes.
    fn create_entry(
        &self,
        req: Caller,
        parent: u64,
        name: &OsStr,
        op: MutationOp,
        requested: u32,
        make: &dyn Fn(&Dir, &Name, u32) -> OpResult<()>,
    ) -> OpResult<(FileAttr, Duration)> {
        let name = Name::new(name)?;
        let loc = self.child_loc(parent, &name)?;
        match &loc {
            Loc::Ws(rel) => {
                let dir = parent_of(rel)?;
                let d = self.ws_dir(dir)?;
                if self.layered && is_reserved(dir, &name) {
                    self.deny("create", ws_path(rel), RESERVED_REASON);
                    return Err(OpError::Perm);
                }
                if self.ws_find(&d, dir, &name)?.is_some() {
                    return Err(OpError::Exists);
                }
                self.ws_require_dir_write("create", rel, &d)?;
                // A name removed since the last snapshot: its whiteout goes,
                // and a directory made there hides the frozen one's entries.
                let had_whiteout = self.layered && unlink_whiteout(&d, &name)?;
                // Never created with set-id bits: a workspace file is a
                // host file of the workspace's owner.
                let setid = setid_bits(op == MutationOp::Mkdir);
                if requested & setid != 0 {
                    self.deny("create", ws_path(rel), SETID_REASON);
                }
                {
                    // Made as the workspace's owner: the kernel creates it
                    // with that owner and checks the directory as them,
                    // and whatever `make` does after creating (open by
                    // name, chmod) has only that owner's rights, so a name
                    // swapped in meanwhile cannot be changed as root.
                    let _as_owner = crate::sys::FsIds::switch(self.ws_owner.0, self.ws_owner.1)?;
                    self.usage.charge_inodes(Tree::Workspace, 1)?;
                    if let Err(e) = make(&d, &name, 0o7777 & !setid) {
                        self.usage.refund_inodes(Tree::Workspace, 1);
                        return Err(e);
                    }
                    if op == MutationOp::Mkdir && had_whiteout {
                        set_opaque(&*open_dir(&*d, &name)?)?;
                    }
                }
                self.mutation(op, ws_path(rel), None);
                let st = stat_at(&*d, &name)?.ok_or(OpError::NotFound)?;
                Ok(self.entry(parent, &name, &Meta::from_stat(&st), Area::Workspace))
            }
            Loc::Merged(comps) => {
                let dir = parent_of(comps)?;
                if dir.is_empty() && name.as_bytes() == WORKSPACE.as_bytes() {
                    return Err(OpError::Exists);
                }
                if is_reserved(dir, &name) {
                    self.deny("create", sandbox_path(comps), RESERVED_REASON);
                    return Err(OpError::Perm);
                }
                let parts = self.store.dir_parts(dir)?;
                if self
                    .store
                    .lookup(&parts, dir, &name, false)?
                    .found
                    .is_some()
                {
                    return Err(OpError::Exists);
                }
                let d = self.store.upper_dir(dir)?;
                let had_whiteout = unlink_whiteout(&d, &name)?;
                self.usage.charge_inodes(Tree::Upper, 1)?;
                if let Err(e) = make(&d, &name, 0o7777) {
                    self.usage.refund_inodes(Tree::Upper, 1);
                    return Err(e);
                }
                chown_at(
                    &d,
                    &name,
                    self.ids.req_uid(req.uid),
                    self.ids.req_gid(req.gid),
                )?;
                if op == MutationOp::Mkdir && had_whiteout {
                    set_opaque(&*open_dir(&*d, &name)?)?;
                }
                let st = stat_at(&*d, &name)?.ok_or(OpError::NotFound)?;
                let (meta, area) = self.shown(Found {
                    meta: Meta::from_stat(&st),
                    src: Src::Layer(self.store.top().0),
                });
                Ok(self.entry(parent, &name, &meta, area))
            }
        }
    }

    fn do_mknod(
        &self,
        req: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> OpResult<(FileAttr, Duration)> {
        let ft = rustix::fs::FileType::from_raw_mode(mode);
        let perm = mode & !umask & 0o7777;
        match ft {
            rustix::fs::FileType::RegularFile
            | rustix::fs::FileType::Fifo
            | rustix::fs::FileType::Socket => {}
            rustix::fs::FileType::CharacterDevice | rustix::fs::FileType::BlockDevice => {
                let mut comps = lock(&self.inodes).path(parent).unwrap_or_default();
                if let Ok(n) = Name::new(name) {
                    comps.push(n);
                }
                self.deny(
                    "mknod",
                    sandbox_path(&comps),
                    "device nodes are not allowed",
                );
                return Err(OpError::Perm);
            }
            _ => return Err(OpError::Invalid),
        }
        self.create_entry(
            req,
            parent,
            name,
            MutationOp::Create,
            perm,
            &|d, n, mask| {
                rustix::fs::mknodat(d, n.as_os_str(), ft, Mode::from_raw_mode(0o600), 0)?;
                let p = open_path(d, n)?;
                crate::sys::chmod_fd(p.as_fd(), perm & mask)?;
                Ok(())
            },
        )
    }

    fn do_mkdir(
        &self,
        req: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> OpResult<(FileAttr, Duration)> {
        let _m = self.dir_change();
        let perm = mode & !umask & 0o7777;
        self.create_entry(req, parent, name, MutationOp::Mkdir, perm, &|d, n, mask| {
            rustix::fs::mkdirat(d, n.as_os_str(), Mode::from_raw_mode(0o700))?;
            let sub = open_dir(d, n)?;
            rustix::fs::fchmod(&*sub, Mode::from_raw_mode(perm & mask))?;
            Ok(())
        })
    }

    fn do_symlink(
        &self,
        req: Caller,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> OpResult<(FileAttr, Duration)> {
        let target = target.as_os_str().as_bytes();
        if target.is_empty() || target.len() > 4095 {
            return Err(OpError::Invalid);
        }
        self.create_entry(req, parent, name, MutationOp::Symlink, 0, &|d, n, _| {
            rustix::fs::symlinkat(target, d, n.as_os_str())?;
            Ok(())
        })
    }

    fn do_create(
        &self,
        req: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> OpResult<(FileAttr, Duration, u64, FopenFlags)> {
        let perm = mode & !umask & 0o7777;
        let made = std::cell::Cell::new(None);
        let created = self.create_entry(
            req,
            parent,
            name,
            MutationOp::Create,
            perm,
            &|d, n, mask| {
                let f = open_file(d, n, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, 0o600)?;
                rustix::fs::fchmod(&f, Mode::from_raw_mode(perm & mask))?;
                let st = rustix::fs::fstat(&f)?;
                made.set(Some((st.st_dev, st.st_ino)));
                Ok(())
            },
        );
        // A new file is empty: O_TRUNC only matters for one that existed.
        let (attr, ttl, open_flags) = match created {
            Ok((a, t)) => (a, t, flags & !libc::O_TRUNC),
            Err(OpError::Exists) | Err(OpError::Sys(rustix::io::Errno::EXIST))
                if flags & libc::O_EXCL == 0 =>
            {
                let (a, t) = self.do_lookup(parent, name)?;
                (a, t, flags)
            }
            Err(e) => return Err(e),
        };
        match self.do_open(attr.ino.0, open_flags, None, made.get()) {
            Ok(o) => Ok((attr, ttl, o.fh, o.flags)),
            Err(e) => {
                // The kernel gets an error, not the entry: take back the
                // lookup the entry added.
                lock(&self.inodes).forget(attr.ino.0, 1);
                Err(e)
            }
        }
    }

    /// Open `ino`. With `make_backing`, a read-only open of a base-layer
    /// file may be answered in passthrough mode.
    fn do_open(
        &self,
        ino: u64,
        flags: i32,
        make_backing: Option<MakeBacking<'_>>,
        fresh: Option<HostKey>,
    ) -> OpResult<Opened> {
        let acc = flags & libc::O_ACCMODE;
        let write = acc != libc::O_RDONLY;
        let trunc = flags & libc::O_TRUNC != 0;
        let mut oflags = match acc {
            libc::O_WRONLY => OFlags::WRONLY,
            libc::O_RDWR => OFlags::RDWR,
            _ => OFlags::RDONLY,
        };
        if trunc {
            oflags |= OFlags::TRUNC;
        }
        // Never block on (or take a controlling tty from) an entry swapped
        // for a fifo or device under us; only regular files are served.
        oflags |= OFlags::NONBLOCK | OFlags::NOCTTY;
        let loc = self.loc(ino)?;
        match &loc {
            Loc::Ws(rel) => {
                let (d, name) = if write || trunc {
                    self.writable(&loc, false)?
                } else {
                    // A read: from whichever layer shows the file.
                    let (name, dir) = rel.split_last().ok_or(OpError::IsDir)?;
                    let d = self.ws_dir(dir)?;
                    match self.ws_find(&d, dir, name)? {
                        Some((_, Some(lower))) => (lower, name.clone()),
                        Some((_, None)) => (d, name.clone()),
                        None => return Err(OpError::NotFound),
                    }
                };
                // Opened without O_TRUNC first: nothing changes before the
                // owner's access is checked on the very file opened.
                let file = regular(open_file(&*d, &name, oflags & !OFlags::TRUNC, 0)?)?;
                let st = rustix::fs::fstat(&file)?;
                let meta = Meta::from_stat(&st);
                let mut need = 0;
                if acc != libc::O_WRONLY {
                    need |= READ;
                }
                if write || trunc {
                    need |= WRITE;
                }
                // The file this very create() made is open to its creator
                // whatever its mode (open(O_CREAT|O_EXCL|O_RDWR, 0444), as
                // git writes objects).
                if fresh != Some((st.st_dev, st.st_ino)) {
                    self.ws_require("open", ws_path(rel), &meta, need)?;
                }
                let file = match (trunc, write) {
                    (false, _) => file,
                    (true, true) => {
                        file.set_len(0)?;
                        file
                    }
                    // O_RDONLY|O_TRUNC: truncates, through a fresh open
                    // that must be the file checked.
                    (true, false) => {
                        let again = regular(open_file(&*d, &name, oflags, 0)?)?;
                        let st2 = rustix::fs::fstat(&again)?;
                        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) {
                            return Err(OpError::Busy);
                        }
                        again
                    }
                };
                if trunc {
                    self.mutation(MutationOp::Truncate, ws_path(rel), None);
                }
                let (io, _) = self.claim_io(ino, None)?;
                let fh = self.add_handle(Handle {
                    ino,
                    kind: HandleKind::File {
                        file,
                        writable: write,
                    },
                    io: Some(io),
                    area: Area::Workspace,
                    ws_path: Some(ws_path(rel)),
                    written: AtomicBool::new(false),
                });
                Ok(Opened {
                    fh,
                    flags: no_flush_if(!write),
                    backing: None,
                })
            }
            Loc::Merged(comps) => {
                let (name, dir) = comps.split_last().ok_or(OpError::IsDir)?;
                let found = self.store.resolve(comps)?;
                if found.meta.is_dir() {
                    return Err(OpError::IsDir);
                }
                let (kind, area) = if write || trunc {
                    self.copy_up(comps, &found, trunc)?;
                    let d = self.store.upper_dir(dir)?;
                    let file = regular(open_file(&*d, name, oflags, 0)?)?;
                    (
                        HandleKind::File {
                            file,
                            writable: write,
                        },
                        Area::Upper,
                    )
                } else {
                    match &found.src {
                        Src::Synth(path) => match self.store.synth.get(path) {
                            Some(SynthEntry::File { content }) => {
                                (HandleKind::Synth(content.clone()), Area::Synth)
                            }
                            _ => return Err(OpError::NotFound),
                        },
                        Src::Layer(idx) => {
                            if *idx == 0 && !self.store.base_grants(&found.meta, READ) {
                                self.deny("open", sandbox_path(comps), PRIVATE_REASON);
                                return Err(OpError::HostPrivate);
                            }
                            let d = self.store.layer_dir(dir, *idx)?;
                            let file = regular(open_file(&*d, name, oflags, 0)?)?;
                            // A caller's rootfs may have swapped the name
                            // meanwhile: check the file opened too. (No
                            // unprivileged user can rename in the host base;
                            // this exec hot path skips the fstat there.)
                            if *idx == 0
                                && self.store.base_may_change()
                                && !self
                                    .store
                                    .base_grants(&Meta::from_stat(&rustix::fs::fstat(&file)?), READ)
                            {
                                self.deny("open", sandbox_path(comps), PRIVATE_REASON);
                                return Err(OpError::HostPrivate);
                            }
                            (
                                HandleKind::File {
                                    file,
                                    writable: false,
                                },
                                self.area_of(&found.src),
                            )
                        }
                    }
                };
                // Passthrough only for read-only opens of the read-only
                // base (never writable through this mount; its files never
                // change identity under an open handle), with the very file
                // just opened through the safe resolution path.
                let candidate =
                    match (&kind, make_backing) {
                        (HandleKind::File { file, .. }, Some(mk))
                            if area == Area::Base && self.passthrough_on() =>
                        {
                            let st = rustix::fs::fstat(file)?;
                            // A delegated registration costs a round trip to
                            // the registrar process, more than serving a small
                            // file's reads (kept in the page cache across
                            // opens): only larger files go through.
                            let delegated = self.shared.backing_files.get().is_some();
                            (!delegated || st.st_size >= DELEGATED_PASSTHROUGH_MIN_BYTES)
                                .then_some((file, (st.st_dev, st.st_ino), mk))
                        }
                        _ => None,
                    };
                let (io, backing) = self.claim_io(ino, candidate)?;
                let fh = self.add_handle(Handle {
                    ino,
                    kind,
                    io: Some(io),
                    area,
                    ws_path: None,
                    written: AtomicBool::new(false),
                });
                // The kernel refuses passthrough opens with any flag outside
                // FOPEN_PASSTHROUGH_MASK (direct_io, parallel writes,
                // noflush), keep_cache included: the page cache is then the
                // host file's anyway.
                // No FLUSH on close: nothing is reported for the sandbox's
                // own layers (only workspace writes are), and this server
                // keeps no POSIX locks of its own to release.
                let flags = if backing.is_some() {
                    FopenFlags::FOPEN_NOFLUSH
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
                };
                Ok(Opened { fh, flags, backing })
            }
        }
    }

    fn passthrough_on(&self) -> bool {
        self.shared.passthrough.load(Ordering::Relaxed)
    }

    /// Account a new file handle of `ino` and choose its I/O mode. With a
    /// `candidate` (a read-only base file, its host identity, and how to
    /// register it), the handle is passthrough when the inode is not open
    /// in cached mode: it joins the inode's backing file if that is the same
    /// host file, else a new backing id is registered.
    ///
    /// An inode open in passthrough mode cannot take any other open (the
    /// kernel would fail it with EIO): that happens for a write or a read
    /// after a copy-up while a read-only base handle is still open. Then the
    /// inode is detached from its names and the open fails with ESTALE; the
    /// kernel retries the open once with a fresh lookup, which makes a new
    /// inode for the (copied-up) entry. The old inode lives on for its open
    /// handles, which keep reading the base copy, as before.
    fn claim_io(
        &self,
        ino: u64,
        candidate: Option<(&File, HostKey, MakeBacking<'_>)>,
    ) -> OpResult<(Io, Option<Arc<Backing>>)> {
        let mut table = lock(&self.io);
        let st = table.entry(ino).or_default();
        if let Some((backing, key)) = &st.backing {
            if let Some((_, k, _)) = candidate
                && k == *key
            {
                st.passthrough += 1;
                self.shared
                    .passthrough_opens
                    .fetch_add(1, Ordering::Relaxed);
                return Ok((Io::Passthrough, Some(Arc::clone(backing))));
            }
            drop(table);
            tracing::debug!(ino, "open conflicts with a passthrough inode; detaching it");
            lock(&self.inodes).detach_all(ino);
            return Err(OpError::Stale(ino));
        }
        if let Some((file, key, make)) = candidate
            && st.cached == 0
        {
            match make(file) {
                Ok(id) => {
                    self.shared.live_backing.fetch_add(1, Ordering::Relaxed);
                    let backing = Arc::new(Backing {
                        id: Some(id),
                        shared: Arc::clone(&self.shared),
                    });
                    st.backing = Some((Arc::clone(&backing), key));
                    st.passthrough = 1;
                    self.shared
                        .passthrough_opens
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok((Io::Passthrough, Some(backing)));
                }
                Err(e) => {
                    // EPERM/EOPNOTSUPP: not granted on this connection after
                    // all; anything else (ELOOP: a stacked fs below the
                    // base) only concerns this file. Serve reads.
                    if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) {
                        self.shared.passthrough.store(false, Ordering::Relaxed);
                    }
                    tracing::debug!(ino, error = %e, "no backing file; serving reads");
                }
            }
        }
        st.cached += 1;
        Ok((Io::Cached, None))
    }

    /// A file handle of `ino` was released: drop its I/O mode count, and
    /// the inode's backing id with its last passthrough handle.
    fn release_io(&self, ino: u64, io: Io) {
        let mut table = lock(&self.io);
        let Some(st) = table.get_mut(&ino) else {
            return;
        };
        let mut closed = None;
        match io {
            Io::Cached => st.cached = st.cached.saturating_sub(1),
            Io::Passthrough => {
                st.passthrough = st.passthrough.saturating_sub(1);
                if st.passthrough == 0 {
                    closed = st.backing.take();
                }
            }
        }
        if st.cached == 0 && st.passthrough == 0 {
            table.remove(&ino);
        }
        drop(table);
        // BACKING_CLOSE outside the lock (when no reply holds it any more).
        drop(closed);
    }

    fn do_fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> OpResult<()> {
        let h = self.handle(fh)?;
        match &h.kind {
            HandleKind::File {
                file,
                writable: true,
            } => {
                if h.area == Area::Workspace {
                    kill_setid(file)?;
                }
                let flags = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
                self.allocating(h.area.tree(), file, length, || {
                    Ok(rustix::fs::fallocate(file, flags, offset, length)?)
                })?;
                h.written.store(true, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(OpError::BadHandle(fh)),
        }
    }

    fn do_release(&self, fh: u64) {
        let h = lock(&self.handles).remove(&fh);
        if let Some(h) = h {
            self.report_written(&h);
            if let Some(io) = h.io {
                self.release_io(h.ino, io);
            }
        }
    }

    fn do_read(&self, fh: u64, offset: u64, size: u32) -> OpResult<Vec<u8>> {
        self.shared.reads.fetch_add(1, Ordering::Relaxed);
        let h = self.handle(fh)?;
        // The kernel never asks for more than max_pages at once; a larger
        // size is not a reason to allocate it.
        let size = (size as usize).min(MAX_READ);
        match &h.kind {
            HandleKind::File { file, .. } => {
                let mut buf = vec![0u8; size];
                let mut got = 0;
                while got < size {
                    let Some(at) = offset.checked_add(got as u64) else {
                        break;
                    };
                    match file.read_at(&mut buf[got..], at) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                buf.truncate(got);
                Ok(buf)
            }
            HandleKind::Synth(content) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(content.len());
                let end = start.saturating_add(size).min(content.len());
                Ok(content[start..end].to_vec())
            }
            HandleKind::Dir(_) => Err(OpError::IsDir),
        }
    }

    fn do_write(&self, fh: u64, offset: u64, data: &[u8]) -> OpResult<u32> {
        let h = self.handle(fh)?;
        match &h.kind {
            HandleKind::File {
                file,
                writable: true,
            } => {
                if h.area == Area::Workspace && !h.written.load(Ordering::Relaxed) {
                    kill_setid(file)?;
                }
                // A write the quota could not hold is refused before it
                // changes anything.
                self.allocating(h.area.tree(), file, data.len() as u64, || {
                    Ok(file.write_all_at(data, offset)?)
                })?;
                h.written.store(true, Ordering::Relaxed);
                Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
            }
            _ => Err(OpError::BadHandle(fh)),
        }
    }

    fn report_written(&self, h: &Handle) {
        if h.written.swap(false, Ordering::Relaxed)
            && let Some(path) = &h.ws_path
        {
            self.mutation(MutationOp::Write, path.clone(), None);
        }
    }

    fn do_unlink(&self, parent: u64, name: &OsStr, dir_op: bool) -> OpResult<()> {
        // Removing a directory changes what its path's walk finds.
        let _m = dir_op.then(|| self.dir_change());
        let name = Name::new(name)?;
        let loc = self.child_loc(parent, &name)?;
        match &loc {
            Loc::Ws(rel) => {
                if rel.is_empty() {
                    return Err(OpError::Busy);
                }
                let d = self.ws_dir(parent_of(rel)?)?;
                self.ws_require_dir_write("unlink", rel, &d)?;
                self.ws_require_sticky("unlink", rel, &d, &name)?;
                let flags = if dir_op {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                if let Some(stack) = self.ws_stack() {
                    self.ws_unlink_layered(&stack, rel, &d, &name, dir_op)?;
                } else {
                    let st = stat_at(&*d, &name)?;
                    rustix::fs::unlinkat(&*d, name.as_os_str(), flags)?;
                    self.refund_stat(Tree::Workspace, st.as_ref());
                }
                let op = if dir_op {
                    MutationOp::Rmdir
                } else {
                    MutationOp::Unlink
                };
                self.mutation(op, ws_path(rel), None);
            }
            Loc::Merged(comps) => {
                let dir = parent_of(comps)?;
                let parts = self.store.dir_parts(dir)?;
                let l = self.store.lookup(&parts, dir, &name, dir_op)?;
                let found = l.found.ok_or(OpError::NotFound)?;
                match (dir_op, found.meta.is_dir()) {
                    (true, false) => return Err(OpError::NotDir),
                    (false, true) => return Err(OpError::IsDir),
                    _ => {}
                }
                if dir_op && !self.store.list(&l.parts, comps)?.is_empty() {
                    return Err(OpError::NotEmpty);
                }
                let (top, _) = self.store.top();
                let lower = self.store.lower_has(&parts, dir, &name)?;
                if found.src == Src::Layer(top) {
                    let d = self.store.upper_dir(dir)?;
                    self.refund_entry(Tree::Upper, &d, &name);
                    if dir_op {
                        clear_whiteouts(&*open_dir(&*d, &name)?)?;
                        rustix::fs::unlinkat(&*d, name.as_os_str(), AtFlags::REMOVEDIR)?;
                    } else {
                        rustix::fs::unlinkat(&*d, name.as_os_str(), AtFlags::empty())?;
                    }
                }
                if lower {
                    let d = self.store.upper_dir(dir)?;
                    make_whiteout(&d, &name)?;
                }
            }
        }
        lock(&self.inodes).unlink(parent, &name);
        Ok(())
    }

    #[allow(clippy::too_many_lines)]
    fn do_rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> OpResult<()> {
        let _m = self.dir_change();
        let name = Name::new(name)?;
        let new_name = Name::new(new_name)?;
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(OpError::Invalid);
        }
        let from = self.child_loc(parent, &name)?;
        let to = self.child_loc(new_parent, &new_name)?;
        self.refuse_reserved("rename", &to)?;
        match (&from, &to) {
            (Loc::Ws(a), Loc::Ws(b)) => {
                if a.is_empty() || b.is_empty() {
                    return Err(OpError::Busy);
                }
                let da = self.ws_dir(parent_of(a)?)?;
                let db = self.ws_dir(parent_of(b)?)?;
                self.ws_require_dir_write("rename", a, &da)?;
                self.ws_require_dir_write("rename", b, &db)?;
                self.ws_require_sticky("rename", a, &da, &name)?;
                self.ws_require_sticky("rename", b, &db, &new_name)?;
                if let Some(stack) = self.ws_stack() {
                    let (dir_a, dir_b) = (parent_of(a)?, parent_of(b)?);
                    if is_reserved(dir_b, &new_name) {
                        self.deny("rename", ws_path(b), RESERVED_REASON);
                        return Err(OpError::Perm);
                    }
                    let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
                    if !exchange
                        || self.ws_lower_has(dir_a, &name)?
                        || self.ws_lower_has(dir_b, &new_name)?
                    {
                        if exchange {
                            return Err(OpError::Invalid);
                        }
                        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
                        self.ws_rename_layered(
                            &stack,
                            (a, &da, &name),
                            (b, &db, &new_name),
                            noreplace,
                        )?;
                        self.mutation(MutationOp::Rename, ws_path(a), Some(ws_path(b)));
                        lock(&self.inodes).rename(parent, &name, new_parent, &new_name);
                        return Ok(());
                    }
                }
                let rflags = rustix::fs::RenameFlags::from_bits_retain(flags.bits());
                let replaced = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                    None
                } else {
                    stat_at(&*db, &new_name)?
                };
                rustix::fs::renameat_with(
                    &*da,
                    name.as_os_str(),
                    &*db,
                    new_name.as_os_str(),
                    rflags,
                )?;
                self.refund_stat(Tree::Workspace, replaced.as_ref());
                self.mutation(MutationOp::Rename, ws_path(a), Some(ws_path(b)));
                let mut t = lock(&self.inodes);
                if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                    t.exchange(parent, &name, new_parent, &new_name);
                } else {
                    t.rename(parent, &name, new_parent, &new_name);
                }
                Ok(())
            }
            (Loc::Merged(a), Loc::Merged(b)) => {
                if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                    return Err(OpError::Invalid);
                }
                let (dir_a, dir_b) = (parent_of(a)?, parent_of(b)?);
                let parts_a = self.store.dir_parts(dir_a)?;
                let parts_b = self.store.dir_parts(dir_b)?;
                let src = self.store.lookup(&parts_a, dir_a, &name, true)?;
                let src_found = src.found.ok_or(OpError::NotFound)?;
                let (top, _) = self.store.top();
                let src_dir = src_found.meta.is_dir();
                if src_dir && (src_found.src != Src::Layer(top) || src.parts.len() > 1) {
                    // Like overlayfs: let `mv` fall back to copying.
                    return Err(OpError::CrossDevice);
                }
                let dst = self.store.lookup(&parts_b, dir_b, &new_name, true)?;
                if let Some(d) = &dst.found {
                    if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                        return Err(OpError::Exists);
                    }
                    match (src_dir, d.meta.is_dir()) {
                        (false, true) => return Err(OpError::IsDir),
                        (true, false) => return Err(OpError::NotDir),
                        (true, true) => {
                            if !self.store.list(&dst.parts, b)?.is_empty() {
                                return Err(OpError::NotEmpty);
                            }
                        }
                        (false, false) => {}
                    }
                }
                if a == b {
                    return Ok(());
                }
                if let Some(d) = &dst.found
                    && src_found.src == Src::Layer(top)
                    && d.src == Src::Layer(top)
                    && src_found.meta.host.is_some()
                    && src_found.meta.host == d.meta.host
                {
                    // Two names of one file: rename(2) does nothing.
                    return Ok(());
                }
                self.copy_up(a, &src_found, false)?;
                let ua = self.store.upper_dir(dir_a)?;
                let ub = self.store.upper_dir(dir_b)?;
                let dst_lower = self.store.lower_has(&parts_b, dir_b, &new_name)?;
                let src_lower = self.store.lower_has(&parts_a, dir_a, &name)?;
                unlink_whiteout(&ub, &new_name)?;
                if let Some(st) = stat_at(&*ub, &new_name)?
                    && rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory
                {
                    clear_whiteouts(&*open_dir(&*ub, &new_name)?)?;
                }
                let replaced = stat_at(&*ub, &new_name)?;
                rustix::fs::renameat(&*ua, name.as_os_str(), &*ub, new_name.as_os_str())?;
                self.refund_stat(Tree::Upper, replaced.as_ref());
                if src_lower {
                    make_whiteout(&ua, &name)?;
                }
                if src_dir && dst_lower {
                    set_opaque(&*open_dir(&*ub, &new_name)?)?;
                }
                lock(&self.inodes).rename(parent, &name, new_parent, &new_name);
                Ok(())
            }
            _ => {
                let busy = |l: &Loc| matches!(l, Loc::Ws(r) if r.is_empty());
                if busy(&from) || busy(&to) {
                    Err(OpError::Busy)
                } else {
                    Err(OpError::CrossDevice)
                }
            }
        }
    }

    fn do_link(
        &self,
        ino: u64,
        new_parent: u64,
        new_name: &OsStr,
    ) -> OpResult<(FileAttr, Duration)> {
        let new_name = Name::new(new_name)?;
        let from = self.loc(ino)?;
        let to = self.child_loc(new_parent, &new_name)?;
        self.refuse_reserved("link", &to)?;
        match (&from, &to) {
            (Loc::Ws(a), Loc::Ws(b)) => {
                let (an, ad) = a.split_last().ok_or(OpError::Perm)?;
                if self.ws_stack().is_some() {
                    let dir_b = parent_of(b)?;
                    if is_reserved(dir_b, &new_name) {
                        self.deny("link", ws_path(b), RESERVED_REASON);
                        return Err(OpError::Perm);
                    }
                    let db = self.ws_dir(dir_b)?;
                    if self.ws_find(&db, dir_b, &new_name)?.is_some() {
                        return Err(OpError::Exists);
                    }
                    self.ws_copy_up(a, false)?;
                    unlink_whiteout(&db, &new_name)?;
                }
                let da = self.ws_dir(ad)?;
                let db = self.ws_dir(parent_of(b)?)?;
                self.ws_require_dir_write("link", b, &db)?;
                // The host's protected_hardlinks rule, for the workspace's
                // owner: their own file, or a plain (not set-id) regular
                // file they may read and write. The link is made from the
                // very inode checked.
                let src = open_path(&*da, an)?;
                let st = rustix::fs::fstat(&src)?;
                let meta = Meta::from_stat(&st);
                let setid = st.st_mode & libc::S_ISUID != 0
                    || st.st_mode & (libc::S_ISGID | libc::S_IXGRP)
                        == libc::S_ISGID | libc::S_IXGRP;
                let plain = rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::RegularFile
                    && !setid;
                let may_link =
                    self.ws_owns(&meta) || (plain && self.ws_grants(&meta, READ | WRITE));
                if !may_link {
                    self.deny("link", ws_path(a), NOT_OWNER_REASON);
                    return Err(OpError::Perm);
                }
                rustix::fs::linkat(&src, "", &*db, new_name.as_os_str(), AtFlags::EMPTY_PATH)?;
                self.mutation(MutationOp::Link, ws_path(a), Some(ws_path(b)));
                let st = stat_at(&*db, &new_name)?.ok_or(OpError::NotFound)?;
                let meta = Meta::from_stat(&st);
                if let Some(k) = Self::key_of(&meta, Area::Workspace) {
                    lock(&self.inodes).bind_key(ino, k);
                }
                Ok(self.entry(new_parent, &new_name, &meta, Area::Workspace))
            }
            (Loc::Merged(a), Loc::Merged(b)) => {
                let (an, ad) = a.split_last().ok_or(OpError::Perm)?;
                let dir_b = parent_of(b)?;
                let found = self.store.resolve(a)?;
                if found.meta.is_dir() {
                    return Err(OpError::Perm);
                }
                let parts_b = self.store.dir_parts(dir_b)?;
                if self
                    .store
                    .lookup(&parts_b, dir_b, &new_name, false)?
                    .found
                    .is_some()
                {
                    return Err(OpError::Exists);
                }
                self.copy_up(a, &found, false)?;
                let ua = self.store.upper_dir(ad)?;
                let ub = self.store.upper_dir(dir_b)?;
                unlink_whiteout(&ub, &new_name)?;
                rustix::fs::linkat(
                    &*ua,
                    an.as_os_str(),
                    &*ub,
                    new_name.as_os_str(),
                    AtFlags::empty(),
                )?;
                let st = stat_at(&*ub, &new_name)?.ok_or(OpError::NotFound)?;
                let (meta, area) = self.shown(Found {
                    meta: Meta::from_stat(&st),
                    src: Src::Layer(self.store.top().0),
                });
                // A lower source was just copied up: its ino takes the upper
                // file's identity, which the new name shares.
                if let Some(k) = Self::key_of(&meta, area) {
                    lock(&self.inodes).bind_key(ino, k);
                }
                Ok(self.entry(new_parent, &new_name, &meta, area))
            }
            _ => Err(OpError::CrossDevice),
        }
    }

    /// OPENDIR: the directory must exist and be listable; its listing is
    /// made at the first READDIR (a listing the kernel has cached needs
    /// none).
    fn do_opendir(&self, ino: u64) -> OpResult<(u64, Area)> {
        let area = self.dir_check(ino)?;
        let fh = self.add_handle(Handle {
            ino,
            kind: HandleKind::Dir(Mutex::new(None)),
            io: None,
            area,
            ws_path: None,
            written: AtomicBool::new(false),
        });
        Ok((fh, area))
    }

    /// What opening directory `ino` checks: it exists and is listable
    /// (in the workspace, by its owner's rules); its area.
    fn dir_check(&self, ino: u64) -> OpResult<Area> {
        Ok(match self.loc(ino)? {
            Loc::Ws(rel) => {
                let d = self.ws_walk(&rel, false)?;
                let meta = Meta::from_stat(&rustix::fs::fstat(&*d)?);
                self.ws_require("opendir", ws_path(&rel), &meta, READ)?;
                Area::Workspace
            }
            Loc::Merged(comps) => {
                self.store.dir_parts(&comps)?;
                Area::Upper
            }
        })
    }

    /// The listing a READDIR of `ino` at `offset` reads, and the index of
    /// the entry it starts at (0 and 1 are "." and ".."): through the
    /// handle the kernel opened, or without one (`no_opendir`) through the
    /// cursor the offset carries. Offsets it hands out: [`Self::next_offset`].
    fn listing_at(&self, ino: u64, fh: u64, offset: u64) -> OpResult<(Listing, usize, u32)> {
        if fh != 0 || !self.no_opendir.load(Ordering::Relaxed) {
            let h = self.handle(fh)?;
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            return Ok((self.listing(&h)?, start, 0));
        }
        let (id, start) = ((offset >> 32) as u32, (offset & 0xFFFF_FFFF) as usize);
        let found = (offset != 0)
            .then(|| {
                lock(&self.cursors)
                    .map
                    .get(&id)
                    .filter(|c| c.ino == ino)
                    .map(|c| Arc::clone(&c.entries))
            })
            .flatten();
        if let Some(entries) = found {
            // Read to its end: this READDIR answers nothing more.
            if start >= entries.len() + 2 {
                self.end_cursor(id);
            }
            return Ok((entries, start, id));
        }
        // A new reader (or one whose cursor is gone): a fresh snapshot,
        // checked as OPENDIR would have.
        self.dir_check(ino)?;
        let entries = match self.make_listing(ino) {
            Err(OpError::NoMemory) => {
                // Make room from the oldest cursors, once.
                self.drop_cursors(usize::MAX);
                self.make_listing(ino)?
            }
            other => other?,
        };
        let entries: Listing = Arc::new(entries);
        let mut c = lock(&self.cursors);
        c.next = c.next.wrapping_add(1).max(1);
        let id = c.next;
        c.map.insert(
            id,
            Cursor {
                ino,
                entries: Arc::clone(&entries),
            },
        );
        c.order.push_back(id);
        let excess = c.map.len().saturating_sub(MAX_CURSORS);
        drop(c);
        if excess > 0 {
            self.drop_cursors(excess);
        }
        if start >= entries.len() + 2 {
            self.end_cursor(id);
        }
        Ok((entries, start, id))
    }

    /// LOOKUP of `name` in `parent`, and on a miss whether the kernel may
    /// keep it (then recorded in `negatives`): in the merged tree over a
    /// base that does not change (only this server changes it; a sandbox
    /// with a caller's own workspace included), and in the agent's own
    /// workspace (see `exclusive`).
    fn lookup_or_miss(&self, parent: u64, name: &OsStr) -> OpResult<Option<(FileAttr, Duration)>> {
        let name = Name::new(name)?;
        let ctx = self.dir_ctx(parent)?;
        match self.lookup_in(parent, &ctx, &name) {
            Err(OpError::NotFound)
                if (self.exclusive
                    || (!matches!(ctx, DirCtx::Ws(..)) && !self.store.base_may_change()))
                    && lock(&self.negatives).record(parent, &name) =>
            {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// The offset of the entry after index `i` of a listing read through
    /// cursor `id` (0: through a handle).
    fn next_offset(id: u32, i: usize) -> u64 {
        (u64::from(id) << 32) | (i as u64 + 1)
    }

    /// Drops cursor `id` (its reader got to the end), giving its listing's
    /// bytes back to the budget.
    fn end_cursor(&self, id: u32) {
        if id == 0 {
            return;
        }
        let gone = lock(&self.cursors).map.remove(&id);
        if let Some(c) = gone {
            let cost = listing_cost(c.entries.iter().map(|(_, _, n)| n));
            self.listing_bytes.fetch_sub(cost, Ordering::Relaxed);
        }
    }

    /// Drops up to `n` of the oldest cursors.
    fn drop_cursors(&self, n: usize) {
        let mut gone = Vec::new();
        {
            let mut c = lock(&self.cursors);
            while gone.len() < n {
                let Some(id) = c.order.pop_front() else { break };
                if let Some(cur) = c.map.remove(&id) {
                    gone.push(cur);
                }
            }
        }
        for c in gone {
            let cost = listing_cost(c.entries.iter().map(|(_, _, n)| n));
            self.listing_bytes.fetch_sub(cost, Ordering::Relaxed);
        }
    }

    /// The listing of open directory `h`, made now if not yet.
    fn listing(&self, h: &Handle) -> OpResult<Listing> {
        let HandleKind::Dir(slot) = &h.kind else {
            return Err(OpError::NotDir);
        };
        let mut slot = lock(slot);
        if let Some(l) = &*slot {
            return Ok(Arc::clone(l));
        }
        let l = Arc::new(self.make_listing(h.ino)?);
        *slot = Some(Arc::clone(&l));
        Ok(l)
    }

    /// Lists directory `ino`, charging the listing to the memory budget of
    /// open listings (given back at RELEASEDIR).
    fn make_listing(&self, ino: u64) -> OpResult<Vec<(u64, FileType, Name)>> {
        let loc = self.loc(ino)?;
        let listing = match &loc {
            Loc::Ws(rel) => {
                let d = self.ws_walk(rel, false)?;
                match self.ws_stack() {
                    Some(stack) => {
                        let parts = stack.dir_parts(rel)?;
                        stack.list(&parts, rel)?
                    }
                    None => self.ws_list(&d, rel)?,
                }
            }
            Loc::Merged(comps) => {
                let parts = self.store.dir_parts(comps)?;
                self.store.list(&parts, comps)?
            }
        };
        let cost = listing_cost(listing.iter().map(|(n, _)| n));
        let held = self.listing_bytes.fetch_add(cost, Ordering::Relaxed);
        if held.saturating_add(cost) > LISTING_BUDGET {
            self.listing_bytes.fetch_sub(cost, Ordering::Relaxed);
            let path = match &loc {
                Loc::Ws(rel) => ws_path(rel),
                Loc::Merged(c) => sandbox_path(c),
            };
            self.deny(
                "opendir",
                path,
                "open directory listings exceed their memory budget",
            );
            return Err(OpError::NoMemory);
        }
        let mut entries = Vec::with_capacity(listing.len() + 2);
        let mut t = lock(&self.inodes);
        for (name, kind) in listing {
            let child = t.register(ino, &name);
            entries.push((child, kind, name));
        }
        Ok(entries)
    }

    fn do_statfs(&self, ino: u64) -> OpResult<rustix::fs::StatFs> {
        let st = match self.loc(ino) {
            Ok(Loc::Ws(_)) => rustix::fs::fstatfs(&*self.ws)?,
            _ => rustix::fs::fstatfs(&*self.store.upper_root())?,
        };
        Ok(st)
    }

    /// A readable fd on the entry for xattr reads, from whichever layer
    /// shows it; `None` for synthesized entries and symlinks.
    fn xattr_fd(&self, loc: &Loc) -> OpResult<Option<File>> {
        let (d, name, kind) = match loc {
            Loc::Ws(rel) => match rel.split_last() {
                None => return Ok(Some(File::from(rustix::io::dup(&*self.ws)?))),
                Some((n, dir)) => {
                    let d = self.ws_dir(dir)?;
                    let (meta, lower) = self.ws_find(&d, dir, n)?.ok_or(OpError::NotFound)?;
                    (lower.unwrap_or(d), n.clone(), meta.kind)
                }
            },
            Loc::Merged(comps) => {
                let Some((n, dir)) = comps.split_last() else {
                    return Ok(None);
                };
                let f = self.store.resolve(comps)?;
                let Src::Layer(idx) = f.src else {
                    return Ok(None);
                };
                (self.store.layer_dir(dir, idx)?, n.clone(), f.meta.kind)
            }
        };
        match kind {
            FileType::RegularFile | FileType::Directory => Ok(Some(open_file(
                &*d,
                &name,
                OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
                0,
            )?)),
            _ => Ok(None),
        }
    }

    fn xattr_name(&self, op: &str, loc: &Loc, name: &OsStr, write: bool) -> OpResult<()> {
        let b = name.as_bytes();
        let reserved = b.starts_with(crate::layers::RESERVED_XATTR_PREFIX);
        if b.starts_with(b"user.") && b.len() > 5 && b.len() <= 255 && !reserved {
            return Ok(());
        }
        if write {
            if b.starts_with(b"trusted.") || b.starts_with(b"security.") || reserved {
                let path = match loc {
                    Loc::Ws(rel) => ws_path(rel),
                    Loc::Merged(c) => sandbox_path(c),
                };
                let why = if reserved {
                    "user.overlay.* xattrs belong to the layer format"
                } else {
                    "only user.* xattrs are allowed"
                };
                self.deny(op, path, why);
                return Err(OpError::Perm);
            }
            return Err(OpError::NotSupported);
        }
        Err(OpError::NoData)
    }

    fn do_setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> OpResult<()> {
        let loc = self.loc(ino)?;
        self.xattr_name("setxattr", &loc, name, true)?;
        let (d, n) = self.writable(&loc, false)?;
        let f = open_file(
            &*d,
            &n,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            0,
        )
        .map_err(|e| {
            if crate::resolve::is_loop(&e) {
                OpError::Perm
            } else {
                e
            }
        })?;
        self.ws_require_fd("setxattr", &loc, &f, WRITE)?;
        let xflags = rustix::fs::XattrFlags::from_bits_retain(flags as u32 & 0x3);
        rustix::fs::fsetxattr(&f, name, value, xflags)?;
        if let Loc::Ws(rel) = &loc {
            self.mutation(MutationOp::SetXattr, ws_path(rel), None);
        }
        Ok(())
    }

    fn do_removexattr(&self, ino: u64, name: &OsStr) -> OpResult<()> {
        let loc = self.loc(ino)?;
        self.xattr_name("removexattr", &loc, name, true)?;
        let (d, n) = self.writable(&loc, false)?;
        let f = open_file(
            &*d,
            &n,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            0,
        )
        .map_err(|e| {
            if crate::resolve::is_loop(&e) {
                OpError::NoData
            } else {
                e
            }
        })?;
        self.ws_require_fd("removexattr", &loc, &f, WRITE)?;
        rustix::fs::fremovexattr(&f, name)?;
        if let Loc::Ws(rel) = &loc {
            self.mutation(MutationOp::RemoveXattr, ws_path(rel), None);
        }
        Ok(())
    }

    fn do_getxattr(&self, ino: u64, name: &OsStr) -> OpResult<Vec<u8>> {
        let loc = self.loc(ino)?;
        self.xattr_name("getxattr", &loc, name, false)?;
        self.require_base_read("getxattr", &loc)?;
        let Some(f) = self.xattr_fd(&loc)? else {
            return Err(OpError::NoData);
        };
        self.ws_require_fd("getxattr", &loc, &f, READ)?;
        let mut buf = vec![0u8; XATTR_MAX];
        let n = rustix::fs::fgetxattr(&f, name, &mut buf[..])?;
        buf.truncate(n);
        Ok(buf)
    }

    fn do_listxattr(&self, ino: u64) -> OpResult<Vec<u8>> {
        let loc = self.loc(ino)?;
        self.require_base_read("listxattr", &loc)?;
        let Some(f) = self.xattr_fd(&loc)? else {
            return Ok(Vec::new());
        };
        self.ws_require_fd("listxattr", &loc, &f, READ)?;
        let mut buf = vec![0u8; XATTR_MAX];
        let n = rustix::fs::flistxattr(&f, &mut buf[..])?;
        buf.truncate(n);
        let mut out = Vec::new();
        let shown = |n: &&[u8]| {
            n.starts_with(b"user.") && !n.starts_with(crate::layers::RESERVED_XATTR_PREFIX)
        };
        for name in buf.split(|&c| c == 0).filter(shown) {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }
}

/// Only regular files get file handles.
fn regular(f: File) -> OpResult<File> {
    let st = rustix::fs::fstat(&f)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile {
        Ok(f)
    } else {
        Err(OpError::Invalid)
    }
}

/// All components but the last; an empty path has no parent (EBUSY: it is
/// the root or the workspace mount point).
/// `FOPEN_NOFLUSH` for workspace handles that cannot have written
/// anything: the kernel then skips the FLUSH round trip on each close(2)
/// of them. Writable workspace handles keep FLUSH, where their write is
/// reported to the other sandboxes and the audit log. (Handles of the
/// sandbox's own layers never get FLUSH.)
fn no_flush_if(read_only: bool) -> FopenFlags {
    if read_only {
        FopenFlags::FOPEN_NOFLUSH
    } else {
        FopenFlags::empty()
    }
}

/// Clears set-user-id, and set-group-id with group execute, before a
/// write through `file`, as the kernel does for a writer without
/// CAP_FSETID. The server writes as root, which keeps them: the sandbox
/// could otherwise rewrite the workspace owner's set-id program and keep
/// its bit.
fn kill_setid(file: &File) -> OpResult<()> {
    let mode = rustix::fs::fstat(file)?.st_mode;
    let mut kill = mode & libc::S_ISUID;
    if mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        kill |= libc::S_ISGID;
    }
    if kill != 0 {
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode & 0o7777 & !kill))?;
    }
    // File capabilities go too, as the kernel drops them on a write (its
    // own pass cannot: this server never shows security.* xattrs).
    match rustix::fs::fremovexattr(file, "security.capability") {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::NOTSUP => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Set-id bits never kept in /workspace: files there are host files owned
/// by the workspace's owner (root for an admin's), so a set-user-id or
/// set-group-id bit would let the sandbox plant a program that runs with
/// that owner's rights on the host. A directory keeps set-group-id (group
/// inheritance, no privilege).
fn setid_bits(is_dir: bool) -> u32 {
    if is_dir {
        libc::S_ISUID
    } else {
        libc::S_ISUID | libc::S_ISGID
    }
}

/// Listings read without a handle: the kernel opens directories without
/// a request (`AirlockFs::no_opendir`), so a READDIR's offset carries the
/// listing it continues, a cursor: `id << 32 | index of the next entry`.
/// Each listing is a snapshot made at offset 0 (so a directory changing
/// under a reader neither repeats nor skips a name), kept until it is read
/// to its end or, oldest first, to make room ([`MAX_CURSORS`], the
/// listings' memory budget). A reader whose cursor was dropped continues
/// at its index in a fresh listing.
#[derive(Default)]
struct Cursors {
    next: u32,
    map: HashMap<u32, Cursor>,
    /// Ids, oldest first (some may be gone from `map`).
    order: VecDeque<u32>,
}

struct Cursor {
    ino: u64,
    entries: Listing,
}

/// Most listings kept for readers without a handle.
const MAX_CURSORS: usize = 1024;

/// How long the kernel may keep a name's absence.
const TTL_NEGATIVE: Duration = TTL_UPPER;

/// Most negative entries handed out within [`TTL_NEGATIVE`]; past it a
/// miss is answered plain ENOENT (nothing cached), so the set, each of
/// which a restore or another sandbox's change may have to invalidate,
/// stays small.
const MAX_NEGATIVES: usize = 16 << 10;

/// The negative entries handed out in the last [`TTL_NEGATIVE`], oldest
/// first (an entry older than that the kernel has dropped itself).
#[derive(Default)]
struct Negatives {
    live: HashMap<(u64, Name), std::time::Instant>,
    order: VecDeque<((u64, Name), std::time::Instant)>,
}

impl Negatives {
    /// Records a negative entry for `name` in `parent`; false when there
    /// is no room (the miss must then not be cached).
    fn record(&mut self, parent: u64, name: &Name) -> bool {
        let now = std::time::Instant::now();
        while let Some((key, at)) = self.order.front() {
            if now.duration_since(*at) < TTL_NEGATIVE {
                break;
            }
            if self.live.get(key) == Some(at) {
                self.live.remove(key);
            }
            self.order.pop_front();
        }
        if self.live.len() >= MAX_NEGATIVES || self.order.len() >= 2 * MAX_NEGATIVES {
            return false;
        }
        let key = (parent, name.clone());
        self.live.insert(key.clone(), now);
        self.order.push_back((key, now));
        true
    }

    fn contains(&self, parent: u64, name: &Name) -> bool {
        self.live.contains_key(&(parent, name.clone()))
    }

    /// Every recorded entry, forgotten (its invalidation is on its way).
    fn take_all(&mut self) -> Vec<(u64, Name)> {
        self.order.clear();
        self.live.drain().map(|(k, _)| k).collect()
    }
}

/// Most bytes the open directory listings of one mount may hold. Each
/// open directory keeps a snapshot of its names until it is closed (so
/// offsets stay stable); without a bound, a sandbox opening many handles
/// on a directory of many long names could grow the broker without limit.
const LISTING_BUDGET: usize = 64 << 20;

/// What a restore leaves the kernel to forget: (parent, name, ino) entries
/// and directory inodes.
pub(crate) type Invalidations = (Vec<(u64, Name, u64)>, Vec<u64>);

/// A directory reached once for looking up several of its names.
enum DirCtx {
    /// The root: the workspace's mount point or a merged entry.
    Root,
    /// A merged-tree directory below the root and its layers' parts.
    Merged(Vec<Name>, Vec<Part>),
    /// A workspace directory (relative path) and its live directory.
    Ws(Vec<Name>, Arc<Dir>),
}

/// The attributes of a negative entry: node id 0, nothing else read.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// Bytes a listing of these names is charged: the name plus its entry.
fn listing_cost<'a>(names: impl Iterator<Item = &'a Name>) -> usize {
    names.map(|n| n.as_bytes().len() + 48).sum()
}

fn parent_of(comps: &[Name]) -> OpResult<&[Name]> {
    comps.split_last().map(|(_, d)| d).ok_or(OpError::Busy)
}

fn classify(comps: Vec<Name>) -> Loc {
    if comps
        .first()
        .is_some_and(|c| c.as_bytes() == WORKSPACE.as_bytes())
    {
        Loc::Ws(comps[1..].to_vec())
    } else {
        Loc::Merged(comps)
    }
}

/// Remove the whiteouts of an upper directory that is empty when merged.
fn clear_whiteouts(dir: &Dir) -> OpResult<()> {
    for e in dir.entries()? {
        let e = e?;
        let Ok(name) = Name::new(&e.file_name()) else {
            continue;
        };
        if let Some(st) = stat_at(dir, &name)?
            && is_whiteout(&st)
        {
            rustix::fs::unlinkat(dir, name.as_os_str(), AtFlags::empty())?;
        } else {
            return Err(OpError::NotEmpty);
        }
    }
    Ok(())
}

fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(fuser::Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// The operations as crafted requests reach them, with results reduced to
/// what the next request may name (see [`crate::hostile`]).
impl AirlockFs {
    pub(crate) fn op_lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.do_lookup(parent, name).ok().map(|(a, _)| a.ino.0)
    }

    pub(crate) fn op_getattr(&self, ino: u64, fh: Option<FileHandle>) -> Option<u64> {
        self.do_getattr(ino, fh).ok().map(|(a, _)| a.ino.0)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn op_setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Option<u64> {
        self.do_setattr(ino, mode, uid, gid, size, atime, mtime, fh)
            .ok()
            .map(|(a, _)| a.ino.0)
    }

    pub(crate) fn op_mknod(
        &self,
        c: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Option<u64> {
        self.do_mknod(c, parent, name, mode, umask)
            .ok()
            .map(|(a, _)| a.ino.0)
    }

    pub(crate) fn op_mkdir(
        &self,
        c: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Option<u64> {
        self.do_mkdir(c, parent, name, mode, umask)
            .ok()
            .map(|(a, _)| a.ino.0)
    }

    pub(crate) fn op_symlink(
        &self,
        c: Caller,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> Option<u64> {
        self.do_symlink(c, parent, name, target)
            .ok()
            .map(|(a, _)| a.ino.0)
    }

    pub(crate) fn op_create(
        &self,
        c: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Option<(u64, u64)> {
        #[allow(clippy::cast_possible_wrap)]
        self.do_create(c, parent, name, mode, umask, flags as i32)
            .ok()
            .map(|(a, _, fh, _)| (a.ino.0, fh))
    }

    pub(crate) fn op_open(&self, ino: u64, flags: u32) -> Option<u64> {
        #[allow(clippy::cast_possible_wrap)]
        self.do_open(ino, flags as i32, None, None)
            .ok()
            .map(|o| o.fh)
    }

    pub(crate) fn op_read(&self, fh: u64, offset: u64, size: u32) {
        let _ = self.do_read(fh, offset, size);
    }

    pub(crate) fn op_write(&self, fh: u64, offset: u64, data: &[u8]) {
        let _ = self.do_write(fh, offset, data);
    }

    pub(crate) fn op_unlink(&self, parent: u64, name: &OsStr, dir: bool) {
        let _ = self.do_unlink(parent, name, dir);
    }

    pub(crate) fn op_rename(
        &self,
        parent: u64,
        name: &OsStr,
        to: u64,
        to_name: &OsStr,
        flags: RenameFlags,
    ) {
        let _ = self.do_rename(parent, name, to, to_name, flags);
    }

    pub(crate) fn op_link(&self, ino: u64, parent: u64, name: &OsStr) -> Option<u64> {
        self.do_link(ino, parent, name).ok().map(|(a, _)| a.ino.0)
    }

    pub(crate) fn op_opendir(&self, ino: u64) -> Option<u64> {
        let (fh, _) = self.do_opendir(ino).ok()?;
        if let Ok(h) = self.handle(fh) {
            let _ = self.listing(&h);
        }
        Some(fh)
    }

    pub(crate) fn op_xattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: u32) {
        #[allow(clippy::cast_possible_wrap)]
        let _ = self.do_setxattr(ino, name, value, flags as i32);
        let _ = self.do_getxattr(ino, name);
        let _ = self.do_listxattr(ino);
        if flags & 4 != 0 {
            let _ = self.do_removexattr(ino, name);
        }
    }

    pub(crate) fn op_release(&self, fh: u64) {
        self.do_release(fh);
    }

    pub(crate) fn op_fallocate(&self, fh: u64, offset: u64, length: u64, mode: u32) {
        #[allow(clippy::cast_possible_wrap)]
        let _ = self.do_fallocate(fh, offset, length, mode as i32);
    }

    pub(crate) fn op_readlink(&self, ino: u64) -> Option<Vec<u8>> {
        self.do_readlink(ino).ok()
    }

    pub(crate) fn op_statfs(&self, ino: u64) -> Option<u64> {
        self.do_statfs(ino).ok().map(|s| s.f_blocks)
    }
}

/// Root-level names the sandbox's own mounts sit on (see the shim's mount
/// plan): their dentries are never invalidated, which would detach the
/// mounts.
const MOUNTED_AT_ROOT: &[&[u8]] = &[b"proc", b"dev"];

/// How long a snapshot waits for files closed just before it to be
/// released.
const WRITERS_GRACE: Duration = Duration::from_millis(500);

impl AirlockFs {
    /// The frozen layers' names, bottom first.
    pub(crate) fn chain(&self) -> crate::LayerChain {
        lock(&self.chain).clone()
    }

    /// Refuses a snapshot or restore while a file is open for writing: its
    /// writes would land in a frozen layer.
    /// The kernel releases a closed file's handle asynchronously, so a
    /// writer that just closed gets a moment to be gone.
    fn require_no_writers(&self) -> OpResult<()> {
        let deadline = std::time::Instant::now() + WRITERS_GRACE;
        loop {
            let writers = lock(&self.handles)
                .values()
                .any(|h| matches!(h.kind, HandleKind::File { writable: true, .. }));
            if !writers {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(OpError::Busy);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Freezes the live copy-on-write layer and the live workspace into
    /// new frozen layers both named `name`, and returns the new chain.
    pub(crate) fn freeze(&self, name: &str) -> OpResult<crate::LayerChain> {
        let _m = self.dir_change();
        if !self.layered {
            return Err(OpError::NotSupported);
        }
        self.require_no_writers()?;
        let mut chain = lock(&self.chain);
        let upper = crate::snapshot::freeze(&self.store.upper_root(), name)?;
        let ws = match crate::snapshot::freeze(&self.ws, name) {
            Ok(w) => w,
            Err(e) => {
                // Put the upper layer's contents back where they were.
                let _ = move_back(&upper, &self.store.upper_root());
                let _ = crate::snapshot::remove_layer(&self.store.upper_root(), name);
                return Err(e);
            }
        };
        self.stores.remember(Tree::Upper, name, &upper);
        self.stores.remember(Tree::Workspace, name, &ws);
        self.store.push_frozen(upper);
        {
            let mut st = match self.ws_stack.write() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            match &*st {
                Some(stack) => stack.push_frozen(ws),
                None => {
                    let owner = self.ws_owner.0;
                    *st = Some(Arc::new(Store::workspace(
                        vec![ws],
                        Arc::clone(&self.ws),
                        owner,
                        self.ids,
                    )));
                }
            }
        }
        chain.upper.push(name.to_string());
        chain.workspace.push(name.to_string());
        Ok(chain.clone())
    }

    /// Makes the live trees empty again over the frozen layers `to`: what
    /// was live is set aside and deleted on a thread of its own (its
    /// quota refunded as it goes). Returns the kernel references to
    /// invalidate.
    pub(crate) fn restore(&self, to: &crate::LayerChain) -> OpResult<Invalidations> {
        let _m = self.dir_change();
        if !self.layered {
            return Err(OpError::NotSupported);
        }
        self.require_no_writers()?;
        let mut chain = lock(&self.chain);
        let upper_root = self.store.upper_root();
        let upper = to
            .upper
            .iter()
            .map(|n| self.stores.open(Tree::Upper, n))
            .collect::<OpResult<Vec<_>>>()?;
        let ws = to
            .workspace
            .iter()
            .map(|n| self.stores.open(Tree::Workspace, n))
            .collect::<OpResult<Vec<_>>>()?;
        let trash_upper = crate::snapshot::set_aside(&upper_root)?;
        let trash_ws = match crate::snapshot::set_aside(&self.ws) {
            Ok(t) => t,
            Err(e) => {
                let _ = move_back(&*open_dir(&*trash_upper.0, &trash_upper.1)?, &upper_root);
                return Err(e);
            }
        };
        self.store.set_frozen(upper);
        {
            let mut st = match self.ws_stack.write() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            *st = if ws.is_empty() {
                None
            } else {
                Some(Arc::new(Store::workspace(
                    ws,
                    Arc::clone(&self.ws),
                    self.ws_owner.0,
                    self.ids,
                )))
            };
        }
        *chain = to.clone();
        drop(chain);
        let usage = Arc::clone(&self.usage);
        let _ = std::thread::Builder::new()
            .name("fs-trash".into())
            .spawn(move || {
                for (tree, (dir, name)) in [(Tree::Upper, trash_upper), (Tree::Workspace, trash_ws)]
                {
                    let freed = crate::snapshot::remove_tree(&dir, &name);
                    usage.refund_bytes(tree, freed.bytes);
                    usage.refund_inodes(tree, freed.inodes);
                }
            });
        // The top-level names of both trees: invalidating a directory's
        // entry drops everything the kernel cached beneath it, so the work
        // is in the number of top-level names, not of files.
        let t = lock(&self.inodes);
        let ws_ino = Name::new(OsStr::new(WORKSPACE))
            .ok()
            .and_then(|w| t.find(ROOT, &w));
        let mut links: Vec<(u64, Name, u64)> = t
            .children(ROOT)
            .into_iter()
            .filter(|(name, _)| !MOUNTED_AT_ROOT.contains(&name.as_bytes()))
            .map(|(name, ino)| (ROOT, name, ino))
            .collect();
        if let Some(w) = ws_ino {
            links.extend(t.children(w).into_iter().map(|(name, ino)| (w, name, ino)));
        }
        // Names the kernel keeps as missing go with the directories above
        // them (the root itself holds no name a sandbox can make).
        drop(lock(&self.negatives).take_all());
        // Directories the kernel still holds (the root, a cwd) would keep
        // their cached listings and attributes: those are dropped too.
        Ok((links, t.held_dirs()))
    }

    /// Deletes frozen layers no snapshot and no live stack needs.
    pub(crate) fn remove_layers(&self, names: &crate::LayerChain) -> OpResult<()> {
        let chain = lock(&self.chain);
        for n in &names.upper {
            if chain.upper.contains(n) {
                return Err(OpError::Busy);
            }
        }
        for n in &names.workspace {
            if chain.workspace.contains(n) {
                return Err(OpError::Busy);
            }
        }
        let upper_root = self.store.upper_root();
        for (tree, root, list) in [
            (Tree::Upper, &upper_root, &names.upper),
            (Tree::Workspace, &self.ws, &names.workspace),
        ] {
            for n in list {
                // A layer the broker moved away is emptied through its
                // handle (the broker removes the empty directory).
                if let Some(dir) = self.stores.forget(tree, n) {
                    let freed = crate::snapshot::empty_dir(&dir);
                    self.usage.refund_bytes(tree, freed.bytes);
                    self.usage.refund_inodes(tree, freed.inodes);
                }
                match crate::snapshot::remove_layer(root, n) {
                    Ok(freed) => {
                        self.usage.refund_bytes(tree, freed.bytes);
                        self.usage.refund_inodes(tree, freed.inodes);
                    }
                    Err(OpError::NotFound | OpError::NotDir) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// What to tell the kernel about a workspace path another mount changed.
pub(crate) enum Stale {
    /// The node's attributes and cached data.
    Inode(u64),
    /// The name in its directory (it was made, removed or moved).
    Entry(u64, Name),
}

impl AirlockFs {
    /// What the kernel may hold stale after another mount of this
    /// workspace changed `paths` (sandbox paths, `/workspace/...`), or,
    /// with `all`, anything in it. Only names and nodes this server handed
    /// the kernel can be stale. A directory that still exists keeps its
    /// entry (it may be a process's working directory); its attributes and
    /// the names changed in it are refreshed.
    pub(crate) fn ws_stale(&self, paths: &[String], all: bool) -> Vec<Stale> {
        // Another sandbox changed the workspace: forget every walk of it.
        drop(self.ws_walks.change());
        let t = lock(&self.inodes);
        let Some(ws) = Name::new(OsStr::new(WORKSPACE))
            .ok()
            .and_then(|w| t.find(ROOT, &w))
        else {
            return Vec::new();
        };
        let mut out = vec![Stale::Inode(ws)];
        if all {
            out.extend(t.below(ws).into_iter().map(Stale::Inode));
            // Any name kept as missing may exist now.
            out.extend(
                lock(&self.negatives)
                    .take_all()
                    .into_iter()
                    .map(|(parent, name)| Stale::Entry(parent, name)),
            );
            return out;
        }
        let negatives = lock(&self.negatives);
        for p in paths {
            let Some(rel) = p.strip_prefix("/workspace/") else {
                continue;
            };
            let mut parent = ws;
            let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
            for (i, c) in comps.iter().enumerate() {
                let Ok(name) = Name::new(OsStr::new(c)) else {
                    break;
                };
                let node = t.find(parent, &name);
                if i + 1 == comps.len() {
                    out.push(Stale::Inode(parent));
                    if let Some(n) = node {
                        out.push(Stale::Inode(n));
                    }
                    let live_dir = comps[..=i]
                        .iter()
                        .map(|c| Name::new(OsStr::new(c)))
                        .collect::<OpResult<Vec<_>>>()
                        .ok()
                        .and_then(|rel| self.stat(&Loc::Ws(rel)).ok())
                        .is_some_and(|(m, _)| m.is_dir());
                    // A directory made where the kernel keeps the name as
                    // missing must be dropped too.
                    if !live_dir || negatives.contains(parent, &name) {
                        out.push(Stale::Entry(parent, name));
                    }
                    break;
                }
                match node {
                    Some(n) => parent = n,
                    None => {
                        // A directory made on the way, which the kernel
                        // may keep as missing.
                        if negatives.contains(parent, &name) {
                            out.push(Stale::Entry(parent, name));
                        }
                        break;
                    }
                }
            }
        }
        out
    }
}

/// Moves every entry of `from` back into `to` (undoing a freeze).
fn move_back(from: &Dir, to: &Dir) -> OpResult<()> {
    for e in from.entries()? {
        let n = e?.file_name();
        rustix::fs::renameat(from, &n, to, &n)?;
    }
    Ok(())
}

/// What the session serves: the filesystem, shared with its snapshot
/// control ([`crate::Snapshots`]).
pub(crate) struct FuseFs(pub(crate) Arc<AirlockFs>);

impl std::ops::Deref for FuseFs {
    type Target = AirlockFs;
    fn deref(&self) -> &AirlockFs {
        &self.0
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC);
        // A symlink's target is immutable for its ino (a new link gets a new
        // ino; a host inode number reused after unlink does too), so the
        // kernel may keep it in the page cache: every `stat` through
        // `/etc/localtime` (each `localtime()`) used to cost a READLINK.
        // Lookups and listings of one directory need no mutual exclusion
        // here (the table has its own lock), so let them run in parallel.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_CACHE_SYMLINKS | fuser::InitFlags::FUSE_PARALLEL_DIROPS,
        );
        // Listings carry each entry's attributes when the kernel sees they
        // will be looked up anyway (`ls -l`, `find -ls`, `git status`):
        // one request per buffer of entries instead of one per entry.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        // A kernel that does not offer zero-message opendir (before 5.1)
        // would fail every directory open answered ENOSYS.
        if config
            .add_capabilities(fuser::InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_err()
        {
            self.no_opendir.store(false, Ordering::Relaxed);
        }
        // Passthrough needs a stack depth (1: the base is a plain fs; 2: it
        // is itself stacked) and the capability; where either is refused,
        // every read stays a request to this server.
        let granted = self.want_passthrough
            && config.set_max_stack_depth(self.stack_depth).is_ok()
            && config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok();
        if !granted {
            let _ = config.set_max_stack_depth(0);
        }
        self.shared.passthrough.store(granted, Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_or_miss(parent.0, name) {
            Ok(Some((attr, ttl))) => reply.entry(&ttl, &attr, Generation(0)),
            // A miss the kernel may keep where nothing makes names appear
            // behind it unnoticed: Python's imports probe dozens of
            // missing files per start, git its ignore and lock files.
            // Node id 0 with a timeout is a negative entry.
            Ok(None) => reply.entry(&TTL_NEGATIVE, &negative_attr(), Generation(0)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.inodes).forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.do_getattr(ino.0, fh) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(ino.0, mode, uid, gid, size, atime, mtime, fh) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.do_readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.do_mknod(Caller::of(req), parent.0, name, mode, umask) {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.do_mkdir(Caller::of(req), parent.0, name, mode, umask) {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.do_unlink(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.do_unlink(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.do_symlink(Caller::of(req), parent.0, link_name, target) {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.do_rename(parent.0, name, newparent.0, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.do_link(ino.0, newparent.0, newname) {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let make = |f: &File| match self.shared.backing_files.get() {
            Some(files) => {
                let id = files.open(f.as_fd())?;
                Ok(crate::sys::wrap_delegated_backing(&reply, id))
            }
            None => reply.open_backing(f),
        };
        match self.do_open(ino.0, flags.0, Some(&make), None) {
            Ok(Opened {
                fh,
                flags,
                backing: Some(b),
            }) => match &b.id {
                Some(id) => reply.opened_passthrough(FileHandle(fh), flags, id),
                None => reply.error(fuser::Errno::EIO),
            },
            Ok(o) => reply.opened(FileHandle(o.fh), o.flags),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if let Ok(h) = self.handle(fh.0) {
            self.report_written(&h);
        }
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.do_release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let res = self.handle(fh.0).and_then(|h| match &h.kind {
            HandleKind::File { file, .. } => {
                if datasync {
                    file.sync_data()?;
                } else {
                    file.sync_all()?;
                }
                Ok(())
            }
            _ => Ok(()),
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // ENOSYS once, and the kernel opens and closes every directory of
        // this connection without a request (FUSE_NO_OPENDIR_SUPPORT),
        // keeping listings across opens (it marks them KEEP_CACHE |
        // CACHE_DIR): two requests fewer per directory walked (`git
        // status` sent 846 OPENDIRs and RELEASEDIRs, two thirds of its
        // time). What OPENDIR checked, READDIR checks at offset 0.
        if self.no_opendir.load(Ordering::Relaxed) {
            return reply.error(fuser::Errno::ENOSYS);
        }
        match self.do_opendir(ino.0) {
            // Only this server changes the sandbox's own directories, and
            // the kernel drops what it cached of one when it changes it (or
            // sees its mtime change): it may keep listings across opens.
            // A workspace directory is shared live, a caller's rootfs is
            // theirs to change.
            Ok((fh, area)) if area != Area::Workspace && !self.store.base_may_change() => reply
                .opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                ),
            Ok((fh, _)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (entries, start, id) = match self.listing_at(ino.0, fh.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e.errno()),
        };
        let parent = lock(&self.inodes)
            .path(ino.0)
            .ok()
            .and_then(|p| {
                p.len().checked_sub(1).map(|_| ROOT) // the kernel fills in ".." itself; any ino will do
            })
            .unwrap_or(ROOT);
        let total = entries.len() + 2;
        for i in start..total {
            let next = AirlockFs::next_offset(id, i);
            let full = match i {
                0 => reply.add(ino, next, FileType::Directory, "."),
                1 => reply.add(INodeNo(parent), next, FileType::Directory, ".."),
                _ => {
                    let (child, kind, name) = &entries[i - 2];
                    reply.add(INodeNo(*child), next, *kind, name.as_os_str())
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    /// A listing with each entry's attributes: every entry sent is looked
    /// up as LOOKUP would (the kernel takes a reference for each but "."
    /// and ".."); one the reply has no room for is forgotten again, and one
    /// gone since the listing was made is left out.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (entries, start, id) = match self.listing_at(ino.0, fh.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e.errno()),
        };
        let total = entries.len() + 2;
        // The kernel ignores the attributes of "." and ".." and takes no
        // reference for them: the directory's own do for both.
        let dot = if start < 2 {
            match self.do_getattr(ino.0, None) {
                Ok(a) => Some(a),
                Err(e) => return reply.error(e.errno()),
            }
        } else {
            None
        };
        let mut ctx = None;
        for i in start..total {
            let next = AirlockFs::next_offset(id, i);
            let full = match (i, &dot) {
                (0 | 1, Some((attr, ttl))) => {
                    let name = if i == 0 { "." } else { ".." };
                    reply.add(ino, next, name, ttl, attr, Generation(0))
                }
                (0 | 1, None) => false,
                _ => {
                    let (_, _, name) = &entries[i - 2];
                    let ctx = match &ctx {
                        Some(c) => c,
                        None => match self.dir_ctx(ino.0) {
                            Ok(c) => ctx.insert(c),
                            Err(e) => return reply.error(e.errno()),
                        },
                    };
                    let Ok((attr, ttl)) = self.lookup_in(ino.0, ctx, name) else {
                        continue;
                    };
                    let full =
                        reply.add(attr.ino, next, name.as_os_str(), &ttl, &attr, Generation(0));
                    if full {
                        lock(&self.inodes).forget(attr.ino.0, 1);
                    }
                    full
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if let Some(h) = lock(&self.handles).remove(&fh.0)
            && let HandleKind::Dir(slot) = &h.kind
            && let Some(entries) = &*lock(slot)
        {
            let cost = listing_cost(entries.iter().map(|(_, _, n)| n));
            self.listing_bytes.fetch_sub(cost, Ordering::Relaxed);
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctl is served on these files (as on most filesystems for
        // most commands): the caller gets the ordinary answer, and the
        // broker's log is not written once per call.
        reply.error(fuser::Errno::ENOTTY);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.do_statfs(ino.0) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                u32::try_from(s.f_bsize).unwrap_or(4096),
                255,
                u32::try_from(s.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.do_setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.do_getxattr(ino.0, name) {
            Ok(v) => xattr_reply(&v, size, reply),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.do_listxattr(ino.0) {
            Ok(v) => xattr_reply(&v, size, reply),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.do_removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes; we only confirm existence.
        match self.loc(ino.0).and_then(|l| self.stat(&l)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.do_create(Caller::of(req), parent.0, name, mode, umask, flags) {
            Ok((attr, ttl, fh, f)) => reply.created(&ttl, &attr, Generation(0), FileHandle(fh), f),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.do_fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let res = self.handle(fh.0).and_then(|h| match &h.kind {
            HandleKind::File { file, .. } => {
                let off = u64::try_from(offset).map_err(|_| OpError::Invalid)?;
                let pos = match whence {
                    libc::SEEK_DATA => rustix::fs::seek(file, rustix::fs::SeekFrom::Data(off))?,
                    libc::SEEK_HOLE => rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(off))?,
                    _ => return Err(OpError::Invalid),
                };
                Ok(i64::try_from(pos).unwrap_or(i64::MAX))
            }
            _ => Err(OpError::Invalid),
        });
        match res {
            Ok(p) => reply.offset(p),
            Err(e) => reply.error(e.errno()),
        }
    }
}

#[cfg(test)]
mod reported_tests {
    use super::*;

    #[test]
    fn deep_paths_are_cut_to_fit_an_event() {
        let short = "/workspace/a/b".to_string();
        assert_eq!(reported(short.clone()), short);
        let deep = format!("/workspace/{}end", "é/".repeat(30_000));
        let r = reported(deep.clone());
        assert!(r.len() < MAX_REPORTED_PATH + 64, "{}", r.len());
        assert!(r.starts_with("/workspace/é/") && r.ends_with("/end"));
        assert!(r.contains("bytes)..."));
    }
}
