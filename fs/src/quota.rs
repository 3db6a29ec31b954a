//! Disk quota: the bytes and inodes a sandbox adds across its copy-on-write
//! layer (which holds `/tmp` and every other write outside `/workspace`)
//! and its workspace, together.
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

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
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

/// Live usage against a [`DiskQuota`].
pub(crate) struct Usage {
    limit: DiskQuota,
    bytes: AtomicU64,
    inodes: AtomicU64,
    /// Whether each limit's first hit was reported.
    hit: [AtomicBool; 2],
    changed: AtomicBool,
    events: EventSink,
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
    pub(crate) fn new(limit: DiskQuota, events: EventSink) -> Usage {
        Usage {
            limit,
            bytes: AtomicU64::new(0),
            inodes: AtomicU64::new(0),
            hit: [AtomicBool::new(false), AtomicBool::new(false)],
            changed: AtomicBool::new(true),
            events,
        }
    }

    /// Takes `n` from `counter` unless that would pass `limit` (0: none).
    fn charge(&self, which: usize, n: u64) -> OpResult<()> {
        if n == 0 {
            return Ok(());
        }
        let (counter, limit, what) = match which {
            0 => (&self.bytes, self.limit.bytes, "disk bytes"),
            _ => (&self.inodes, self.limit.inodes, "inodes"),
        };
        let r = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            let next = cur.saturating_add(n);
            (limit == 0 || next <= limit).then_some(next)
        });
        if r.is_err() {
            if let Some(h) = self.hit.get(which)
                && !h.swap(true, Ordering::AcqRel)
            {
                (self.events)(FsEvent::QuotaHit {
                    what: what.to_string(),
                    limit,
                    used: counter.load(Ordering::Acquire),
                });
            }
            return Err(OpError::NoSpace);
        }
        self.changed.store(true, Ordering::Release);
        Ok(())
    }

    /// Charges `n` bytes.
    pub(crate) fn charge_bytes(&self, n: u64) -> OpResult<()> {
        self.charge(0, n)
    }

    /// Charges `n` inodes.
    pub(crate) fn charge_inodes(&self, n: u64) -> OpResult<()> {
        self.charge(1, n)
    }

    /// Whether `n` more bytes would fit (without charging them).
    pub(crate) fn fits_bytes(&self, n: u64) -> OpResult<()> {
        self.charge_bytes(n)?;
        self.refund_bytes(n);
        Ok(())
    }

    fn refund(counter: &AtomicU64, n: u64) {
        let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            Some(cur.saturating_sub(n))
        });
    }

    /// Gives back `n` bytes.
    pub(crate) fn refund_bytes(&self, n: u64) {
        if n > 0 {
            Self::refund(&self.bytes, n);
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Gives back `n` inodes.
    pub(crate) fn refund_inodes(&self, n: u64) {
        if n > 0 {
            Self::refund(&self.inodes, n);
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Records what an operation did to a file's allocation, from
    /// `before` to `after` bytes: never refused (it happened; the caller
    /// checked it would fit first).
    pub(crate) fn settle(&self, before: u64, after: u64) {
        if after > before {
            self.bytes.fetch_add(after - before, Ordering::AcqRel);
            self.changed.store(true, Ordering::Release);
        } else {
            self.refund_bytes(before - after);
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

    fn usage(limit: DiskQuota) -> (Usage, Arc<Mutex<Vec<FsEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        (
            Usage::new(limit, Arc::new(move |e| sink.lock().unwrap().push(e))),
            events,
        )
    }

    #[test]
    fn a_charge_past_the_limit_fails_changes_nothing_and_is_reported_once() {
        let (u, events) = usage(DiskQuota {
            bytes: 100,
            inodes: 2,
        });
        u.charge_bytes(60).unwrap();
        assert!(matches!(u.charge_bytes(41), Err(OpError::NoSpace)));
        assert!(matches!(u.fits_bytes(41), Err(OpError::NoSpace)));
        u.charge_bytes(40).unwrap();
        u.settle(100, 10);
        u.charge_bytes(90).unwrap();
        u.settle(0, 50);
        assert!(matches!(u.fits_bytes(1), Err(OpError::NoSpace)));
        u.refund_bytes(50);
        u.charge_inodes(2).unwrap();
        assert!(matches!(u.charge_inodes(1), Err(OpError::NoSpace)));
        u.refund_inodes(1);
        u.charge_inodes(1).unwrap();
        let hits: Vec<String> = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                FsEvent::QuotaHit { what, .. } => Some(what.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(hits, ["disk bytes", "inodes"]);
    }

    #[test]
    fn no_limit_means_no_refusal() {
        let (u, _) = usage(DiskQuota::default());
        u.charge_bytes(u64::MAX / 2).unwrap();
        u.charge_bytes(u64::MAX / 2).unwrap();
        u.charge_inodes(1 << 40).unwrap();
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
