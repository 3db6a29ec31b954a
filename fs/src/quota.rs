//! Disk quota: the bytes and inodes a sandbox adds across its copy-on-write
//! layer (which holds `/tmp` and every other write outside `/workspace`)
//! and its workspace, together; and, for an agent's persistent workspace,
//! what all the agent's sandboxes hold there together.
//!
//! Bytes are the space files occupy on the host (allocated blocks), so a
//! sparse file counts what it holds, not its length. An operation that can
//! allocate (a write, a fallocate, a copy-up) must fit in what is left
//! before it runs (as much as it could allocate at most), then is charged
//! what it did allocate; a new entry takes an inode first. What goes (the
//! last name of an upper or workspace file removed or renamed over, a
//! shrinking truncate) is refunded. An operation that would pass a limit
//! fails with ENOSPC and changes nothing, so nothing already written is
//! lost. Concurrent writes to one file may count a little high until the
//! next start.
//!
//! What the workspace already holds when the server starts (a persistent
//! workspace) is counted by a walk on a thread of its own after the server
//! is confined; until the walk ends, only new charges count. The upper
//! layer is new with every sandbox, so it starts empty. Changes made by
//! others to a shared workspace are seen at the next start.
//!
//! An agent's workspace is shared live by its sandboxes, each served by a
//! process of its own, so its quota cannot live in any one of them: its
//! counters are a [`SharedUsage`], one page of a sealed memfd the broker
//! made and every server of that workspace maps, charged with atomic
//! operations. Every charge and refund on the workspace tree goes to both
//! the sandbox's counters and the agent's; the broker keeps the agent's
//! across restarts and charges what it adds or removes itself (snapshot
//! layers it stores, leftovers it collects).
use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::error::{OpError, OpResult};
use crate::{EventSink, FsEvent};

/// Limits on what a sandbox adds (0: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskQuota {
    /// Bytes (apparent file sizes).
    pub bytes: u64,
    /// Inodes (files, directories, links, special files).
    pub inodes: u64,
}

/// Deepest directory the start-up walk descends into.
const MAX_WALK_DEPTH: usize = 4096;
/// How often the usage is reported when it changed.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How long the first report waits: a sandbox's first command runs while
/// its server starts, and reporting at once competed with it (0.7 ms of a
/// 10 ms `airlock run`).
const FIRST_REPORT_AFTER: Duration = Duration::from_millis(250);

/// Which writable tree a charge or refund is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Tree {
    /// The sandbox's copy-on-write layer.
    Upper,
    /// The workspace.
    Workspace,
}

impl Tree {
    /// The workspace if `workspace`, else the copy-on-write layer.
    pub(crate) fn of(workspace: bool) -> Tree {
        if workspace {
            Tree::Workspace
        } else {
            Tree::Upper
        }
    }
}

/// Counters (bytes, then inodes) in one page of a sealed memfd, mapped
/// shared by every process that holds it: the broker that made it and
/// each filesystem server of one agent's workspace. A holder can change
/// the numbers (a server is trusted with its own agent's), not the file's
/// size (sealed), so no holder can make another fault on its mapping or
/// use the file to fill memory.
pub struct SharedUsage {
    map: crate::sys::SharedWords,
    fd: OwnedFd,
}

impl std::fmt::Debug for SharedUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (bytes, inodes) = self.get();
        f.debug_struct("SharedUsage")
            .field("bytes", &bytes)
            .field("inodes", &inodes)
            .finish()
    }
}

impl SharedUsage {
    /// Makes new counters at zero, in a memfd sealed at one page.
    ///
    /// # Errors
    /// When the memfd cannot be made, sized, sealed or mapped.
    pub fn create() -> std::io::Result<SharedUsage> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let fd = rustix::fs::memfd_create(
            c"airlock-usage",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, crate::sys::SharedWords::LEN as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        SharedUsage::map(fd)
    }

    /// Maps counters another process made (from [`SharedUsage::fd`]).
    ///
    /// # Errors
    /// When `fd` is not a memfd sealed against resizing at one page, or
    /// cannot be mapped.
    pub fn map(fd: OwnedFd) -> std::io::Result<SharedUsage> {
        use rustix::fs::SealFlags;
        let seals = rustix::fs::fcntl_get_seals(&fd)?;
        let size = rustix::fs::fstat(&fd)?.st_size;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW)
            || usize::try_from(size).ok() != Some(crate::sys::SharedWords::LEN)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "usage counters: not a sealed one-page memfd",
            ));
        }
        let map = crate::sys::SharedWords::map(fd.as_fd())?;
        Ok(SharedUsage { map, fd })
    }

    /// The memfd, to pass to another process.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        self.map.word(i)
    }

    /// Bytes and inodes now.
    #[must_use]
    pub fn get(&self) -> (u64, u64) {
        (
            self.slot(0).load(Ordering::Acquire),
            self.slot(1).load(Ordering::Acquire),
        )
    }

    /// Sets both counters (a fresh count).
    pub fn set(&self, bytes: u64, inodes: u64) {
        self.slot(0).store(bytes, Ordering::Release);
        self.slot(1).store(inodes, Ordering::Release);
    }

    /// Adds what was stored (never refused: it is there).
    pub fn add(&self, bytes: u64, inodes: u64) {
        self.slot(0).fetch_add(bytes, Ordering::AcqRel);
        self.slot(1).fetch_add(inodes, Ordering::AcqRel);
    }

    /// Takes away what was removed (never below zero).
    pub fn sub(&self, bytes: u64, inodes: u64) {
        take_back(self.slot(0), bytes);
        take_back(self.slot(1), inodes);
    }
}

/// Subtracts `n` from `counter`, stopping at zero.
fn take_back(counter: &AtomicU64, n: u64) {
    if n > 0 {
        let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            Some(cur.saturating_sub(n))
        });
    }
}

/// Adds `n` to `counter` unless that would pass `limit` (0: none).
fn take(counter: &AtomicU64, limit: u64, n: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            let next = cur.saturating_add(n);
            (limit == 0 || next <= limit).then_some(next)
        })
        .is_ok()
}

/// The agent's workspace counters and limits, for a server of a
/// persistent workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceUsage {
    /// The counters, shared with the broker and the agent's other servers.
    pub counters: Arc<SharedUsage>,
    /// The agent's limits on its workspace (0: none).
    pub limit: DiskQuota,
}

/// Live usage against a [`DiskQuota`], and against the agent's workspace
/// quota when the workspace is an agent's.
pub(crate) struct Usage {
    limit: DiskQuota,
    bytes: AtomicU64,
    inodes: AtomicU64,
    /// Whether each limit's first hit was reported: the sandbox's bytes
    /// and inodes, then the workspace's.
    hit: [AtomicBool; 4],
    changed: AtomicBool,
    events: EventSink,
    workspace: Option<WorkspaceUsage>,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage")
            .field("limit", &self.limit)
            .field("bytes", &self.bytes)
            .field("inodes", &self.inodes)
            .finish_non_exhaustive()
    }
}

impl Usage {
    pub(crate) fn new(
        limit: DiskQuota,
        workspace: Option<WorkspaceUsage>,
        events: EventSink,
    ) -> Usage {
        Usage {
            limit,
            bytes: AtomicU64::new(0),
            inodes: AtomicU64::new(0),
            hit: std::array::from_fn(|_| AtomicBool::new(false)),
            changed: AtomicBool::new(true),
            events,
            workspace,
        }
    }

    /// Reports the first hit of limit `which` (0, 1: the sandbox's bytes
    /// and inodes; 2, 3: the workspace's).
    fn hit(&self, which: usize, limit: u64, used: u64) {
        const WHAT: [&str; 4] = [
            "disk bytes",
            "inodes",
            "workspace bytes",
            "workspace inodes",
        ];
        if let (Some(h), Some(what)) = (self.hit.get(which), WHAT.get(which))
            && !h.swap(true, Ordering::AcqRel)
        {
            (self.events)(FsEvent::QuotaHit {
                what: (*what).to_string(),
                limit,
                used,
            });
        }
    }

    /// Takes `n` of kind `which` (0: bytes, 1: inodes) for `tree`: from the
    /// agent's workspace counters too when it is the workspace, unless
    /// either would pass its limit.
    fn charge(&self, tree: Tree, which: usize, n: u64) -> OpResult<()> {
        if n == 0 {
            return Ok(());
        }
        let pool = match &self.workspace {
            Some(w) if tree == Tree::Workspace => Some(w),
            _ => None,
        };
        if let Some(w) = pool {
            let limit = if which == 0 {
                w.limit.bytes
            } else {
                w.limit.inodes
            };
            let counter = w.counters.slot(which);
            if !take(counter, limit, n) {
                self.hit(2 + which, limit, counter.load(Ordering::Acquire));
                return Err(OpError::NoSpace);
            }
        }
        let (counter, limit) = match which {
            0 => (&self.bytes, self.limit.bytes),
            _ => (&self.inodes, self.limit.inodes),
        };
        if !take(counter, limit, n) {
            if let Some(w) = pool {
                take_back(w.counters.slot(which), n);
            }
            self.hit(which, limit, counter.load(Ordering::Acquire));
            return Err(OpError::NoSpace);
        }
        self.changed.store(true, Ordering::Release);
        Ok(())
    }

    /// Gives back `n` of kind `which` for `tree`.
    fn refund(&self, tree: Tree, which: usize, n: u64) {
        if n == 0 {
            return;
        }
        if tree == Tree::Workspace
            && let Some(w) = &self.workspace
        {
            take_back(w.counters.slot(which), n);
        }
        take_back(
            if which == 0 {
                &self.bytes
            } else {
                &self.inodes
            },
            n,
        );
        self.changed.store(true, Ordering::Release);
    }

    /// Charges `n` bytes to `tree`.
    pub(crate) fn charge_bytes(&self, tree: Tree, n: u64) -> OpResult<()> {
        self.charge(tree, 0, n)
    }

    /// Charges `n` inodes to `tree`.
    pub(crate) fn charge_inodes(&self, tree: Tree, n: u64) -> OpResult<()> {
        self.charge(tree, 1, n)
    }

    /// Whether `n` more bytes would fit in `tree` (without charging them).
    pub(crate) fn fits_bytes(&self, tree: Tree, n: u64) -> OpResult<()> {
        self.charge_bytes(tree, n)?;
        self.refund_bytes(tree, n);
        Ok(())
    }

    /// Gives back `n` bytes of `tree`.
    pub(crate) fn refund_bytes(&self, tree: Tree, n: u64) {
        self.refund(tree, 0, n);
    }

    /// Gives back `n` inodes of `tree`.
    pub(crate) fn refund_inodes(&self, tree: Tree, n: u64) {
        self.refund(tree, 1, n);
    }

    /// Records what an operation did to the allocation of a file in
    /// `tree`, from `before` to `after` bytes: never refused (it happened;
    /// the caller checked it would fit first).
    pub(crate) fn settle(&self, tree: Tree, before: u64, after: u64) {
        if after > before {
            let n = after - before;
            if tree == Tree::Workspace
                && let Some(w) = &self.workspace
            {
                w.counters.slot(0).fetch_add(n, Ordering::AcqRel);
            }
            self.bytes.fetch_add(n, Ordering::AcqRel);
            self.changed.store(true, Ordering::Release);
        } else {
            self.refund_bytes(tree, before - after);
        }
    }

    /// Adds what a start-up walk found (never refused: it is already
    /// there).
    fn add_found(&self, bytes: u64, inodes: u64) {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.inodes.fetch_add(inodes, Ordering::AcqRel);
        self.changed.store(true, Ordering::Release);
    }
}

/// Counts what `roots` already hold into `usage`, then reports the usage
/// whenever it changed, once a second at most, until the filesystem goes.
/// Runs on a thread of its own, started after the server is confined (the
/// thread inherits its jail).
pub(crate) fn walk_and_report(usage: &std::sync::Weak<Usage>, roots: Vec<OwnedFd>) {
    let mut seen = HashSet::new();
    for root in &roots {
        // The layer roots may be O_PATH descriptors: list a readable one.
        let Ok(root) = rustix::fs::openat(
            root.as_fd(),
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        let (b, i) = walk(&root, &mut seen, 0);
        match usage.upgrade() {
            Some(u) => u.add_found(b, i),
            None => return,
        }
    }
    drop(roots);
    std::thread::sleep(FIRST_REPORT_AFTER);
    while let Some(u) = usage.upgrade() {
        if u.changed.swap(false, Ordering::AcqRel) {
            (u.events)(FsEvent::Usage {
                bytes: u.bytes.load(Ordering::Acquire),
                inodes: u.inodes.load(Ordering::Acquire),
                bytes_limit: u.limit.bytes,
                inodes_limit: u.limit.inodes,
            });
        }
        drop(u);
        std::thread::sleep(REPORT_EVERY);
    }
}

/// Starts [`walk_and_report`] on a thread of its own.
pub(crate) fn start_reporting(usage: &std::sync::Arc<Usage>, roots: Vec<OwnedFd>) {
    let weak = std::sync::Arc::downgrade(usage);
    let _ = std::thread::Builder::new()
        .name("fs-usage".into())
        .spawn(move || walk_and_report(&weak, roots));
}

/// The bytes a host file occupies (its allocated blocks).
pub(crate) fn allocated(st: &rustix::fs::Stat) -> u64 {
    u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512)
}

/// Bytes and inodes under directory `dir` (itself not counted), each host
/// inode once (hard links), whiteouts not at all.
fn walk(dir: &OwnedFd, seen: &mut HashSet<(u64, u64)>, depth: usize) -> (u64, u64) {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    if depth > MAX_WALK_DEPTH {
        return (0, 0);
    }
    let Ok(list) = rustix::fs::Dir::read_from(dir) else {
        return (0, 0);
    };
    for entry in list {
        let Ok(entry) = entry else {
            break;
        };
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if ft == rustix::fs::FileType::CharacterDevice && st.st_rdev == 0 {
            continue; // a whiteout
        }
        #[allow(clippy::useless_conversion)]
        let key = (u64::from(st.st_dev), u64::from(st.st_ino));
        if !seen.insert(key) {
            continue;
        }
        inodes += 1;
        if ft == rustix::fs::FileType::Directory {
            if let Ok(sub) = rustix::fs::openat(
                dir.as_fd(),
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                let (b, i) = walk(&sub, seen, depth + 1);
                bytes += b;
                inodes += i;
            }
        } else {
            bytes += allocated(&st);
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    /// What each reported first hit was about.
    fn hits(events: &Mutex<Vec<FsEvent>>) -> Vec<String> {
        events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                FsEvent::QuotaHit { what, .. } => Some(what.clone()),
                _ => None,
            })
            .collect()
    }

    fn usage(limit: DiskQuota) -> (Usage, Arc<Mutex<Vec<FsEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        (
            Usage::new(limit, None, Arc::new(move |e| sink.lock().unwrap().push(e))),
            events,
        )
    }

    #[test]
    fn a_charge_past_the_limit_fails_changes_nothing_and_is_reported_once() {
        let (u, events) = usage(DiskQuota {
            bytes: 100,
            inodes: 2,
        });
        u.charge_bytes(Tree::Upper, 60).unwrap();
        assert!(matches!(
            u.charge_bytes(Tree::Upper, 41),
            Err(OpError::NoSpace)
        ));
        assert!(matches!(
            u.fits_bytes(Tree::Upper, 41),
            Err(OpError::NoSpace)
        ));
        u.charge_bytes(Tree::Upper, 40).unwrap();
        u.settle(Tree::Upper, 100, 10);
        u.charge_bytes(Tree::Upper, 90).unwrap();
        u.settle(Tree::Upper, 0, 50);
        assert!(matches!(
            u.fits_bytes(Tree::Upper, 1),
            Err(OpError::NoSpace)
        ));
        u.refund_bytes(Tree::Upper, 50);
        u.charge_inodes(Tree::Upper, 2).unwrap();
        assert!(matches!(
            u.charge_inodes(Tree::Upper, 1),
            Err(OpError::NoSpace)
        ));
        u.refund_inodes(Tree::Upper, 1);
        u.charge_inodes(Tree::Upper, 1).unwrap();
        let hits = hits(&events);
        assert_eq!(hits, ["disk bytes", "inodes"]);
    }

    #[test]
    fn the_workspace_counters_are_shared_across_mappings_and_bound_every_server() {
        let counters = Arc::new(SharedUsage::create().unwrap());
        // A second process maps the same memfd: here, a second mapping.
        let other = SharedUsage::map(counters.fd().try_clone_to_owned().unwrap()).unwrap();
        let limit = DiskQuota {
            bytes: 1000,
            inodes: 10,
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        let a = Usage::new(
            DiskQuota::default(),
            Some(WorkspaceUsage {
                counters: Arc::clone(&counters),
                limit,
            }),
            Arc::new(move |e| sink.lock().unwrap().push(e)),
        );
        a.charge_bytes(Tree::Workspace, 700).unwrap();
        assert_eq!(other.get().0, 700);
        // Another server of the workspace took the rest.
        other.add(300, 0);
        assert!(matches!(
            a.charge_bytes(Tree::Workspace, 1),
            Err(OpError::NoSpace)
        ));
        // The copy-on-write layer is not the workspace's.
        a.charge_bytes(Tree::Upper, 5000).unwrap();
        assert_eq!(counters.get().0, 1000);
        a.refund_bytes(Tree::Workspace, 200);
        a.settle(Tree::Workspace, 0, 150);
        assert_eq!(other.get().0, 950);
        a.charge_inodes(Tree::Workspace, 10).unwrap();
        assert!(matches!(
            a.charge_inodes(Tree::Workspace, 1),
            Err(OpError::NoSpace)
        ));
        // A sandbox limit refusing gives the workspace its charge back.
        let small = Usage::new(
            DiskQuota {
                bytes: 10,
                inodes: 0,
            },
            Some(WorkspaceUsage {
                counters: Arc::clone(&counters),
                limit: DiskQuota::default(),
            }),
            Arc::new(|_| {}),
        );
        assert!(matches!(
            small.charge_bytes(Tree::Workspace, 20),
            Err(OpError::NoSpace)
        ));
        assert_eq!(counters.get().0, 950);
        let hits = hits(&events);
        assert_eq!(hits, ["workspace bytes", "workspace inodes"]);
    }

    #[test]
    fn the_shared_counters_cannot_be_resized_or_mapped_from_another_file() {
        let counters = SharedUsage::create().unwrap();
        assert!(rustix::fs::ftruncate(counters.fd(), 1 << 30).is_err());
        assert!(rustix::fs::ftruncate(counters.fd(), 0).is_err());
        let plain: OwnedFd = tempfile::tempfile().unwrap().into();
        rustix::fs::ftruncate(&plain, crate::sys::SharedWords::LEN as u64).unwrap();
        assert!(SharedUsage::map(plain).is_err());
        counters.set(5, 6);
        counters.sub(10, 1);
        assert_eq!(counters.get(), (0, 5));
    }

    #[test]
    fn no_limit_means_no_refusal() {
        let (u, _) = usage(DiskQuota::default());
        u.charge_bytes(Tree::Upper, u64::MAX / 2).unwrap();
        u.charge_bytes(Tree::Upper, u64::MAX / 2).unwrap();
        u.charge_inodes(Tree::Upper, 1 << 40).unwrap();
    }

    #[test]
    fn the_walk_counts_each_inode_once_and_skips_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a"), b"12345").unwrap();
        std::fs::hard_link(d.path().join("sub/a"), d.path().join("b")).unwrap();
        std::fs::write(d.path().join("c"), b"123").unwrap();
        std::os::unix::fs::symlink("sub/a", d.path().join("l")).unwrap();
        let root: OwnedFd = std::fs::File::open(d.path()).unwrap().into();
        let (bytes, inodes) = walk(&root, &mut HashSet::new(), 0);
        // sub, a (=b), c, l: each regular file takes one block at least.
        assert_eq!(inodes, 4);
        assert!(bytes >= 2 * 512, "{bytes}");
        // A sparse file counts what it holds, not its length.
        let sparse = std::fs::File::create(d.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let (bytes2, _) = walk(&root, &mut HashSet::new(), 0);
        assert!(bytes2 < bytes + 4096, "{bytes2}");
    }
}
