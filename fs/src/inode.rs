//! The inode table: ino -> (names, host identity, lookup count).
//!
//! Paths are never stored; they are computed by walking parents, so a rename
//! is O(1). Directories, base and synthesized entries are identified by
//! their (parent, name): the same (parent, name) keeps its ino while the
//! table knows it. Non-directories of the writable areas (the upper layer
//! and /workspace) are identified by their host file's `(st_dev, st_ino)`
//! ([`HostKey`]): every name of one host file maps to one ino, so hard links
//! are one inode to the kernel. Such a node remembers all its known names
//! and reaches the file through the first one still linked.

use std::collections::HashMap;

use crate::error::{OpError, OpResult};
use crate::policy::Name;

/// The kernel's root inode number.
pub(crate) const ROOT: u64 = 1;

/// Depth beyond which a parent chain is treated as corrupt.
const MAX_DEPTH: usize = 4096;

/// A host file's identity: `(st_dev, st_ino)`.
pub(crate) type HostKey = (u64, u64);

/// One name of a node: (parent ino, name).
pub(crate) type Link = (u64, Name);

/// A name of a node with its path from the root.
pub(crate) type Reach = (Link, Vec<Name>);

#[derive(Debug)]
struct Node {
    /// Known names, the first one used to reach the node. Empty for the
    /// root and once every known name is unlinked or replaced: the ino then
    /// lives on for open handles until the kernel forgets it.
    names: Vec<Link>,
    /// Host identity of a writable-layer non-directory.
    key: Option<HostKey>,
    /// Lookups the kernel holds (decremented by forget).
    nlookup: u64,
}

/// The table. Callers hold it behind one mutex.
#[derive(Debug)]
pub(crate) struct Inodes {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<Link, u64>,
    by_key: HashMap<HostKey, u64>,
    next: u64,
    /// Past this many nodes, listings stop registering names.
    listing_cap: usize,
}

/// Most nodes the table holds before a directory listing stops registering
/// the names it has not seen: their entries get a stand-in ino (a lookup
/// still registers them as usual). Listed names stay registered until they
/// are unlinked, so without a bound, listing huge directories would grow the
/// broker without limit; nodes the kernel holds are bounded by the kernel's
/// own inode cache, which the sandbox's memory limit pays for.
const LISTING_CAP: usize = 1 << 20;

/// Names a node remembers at most (see [`Inodes::insert`]).
const MAX_NAMES_PER_NODE: usize = 16;

/// Stand-in inos of unregistered listing entries are at or above this; the
/// counter of real inos never gets near it. The kernel only passes a
/// listing's inos on to readdir(3) callers (there is no readdirplus here).
const STAND_IN_BASE: u64 = 1 << 62;

impl Inodes {
    pub(crate) fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                names: Vec::new(),
                key: None,
                nlookup: 1,
            },
        );
        Self {
            nodes,
            by_name: HashMap::new(),
            by_key: HashMap::new(),
            listing_cap: LISTING_CAP,
            next: ROOT + 1,
        }
    }

    /// The ino of `name` in `parent`, allocating one if unknown. With a
    /// `key`, the ino of that host file if any name of it is known (the name
    /// is added to it); a path-identified node found under the name takes
    /// the key (copy-up keeps the ino). `lookups` is added to its lookup
    /// count (1 for replies that create a kernel reference, 0 for readdir).
    pub(crate) fn insert(
        &mut self,
        parent: u64,
        name: &Name,
        key: Option<HostKey>,
        lookups: u64,
    ) -> u64 {
        let link = (parent, name.clone());
        let existing = self.by_name.get(&link).copied();
        let unkeyed = |t: &Self, ino: u64| t.nodes.get(&ino).is_some_and(|n| n.key.is_none());
        let target = match key {
            None => existing.filter(|&x| unkeyed(self, x)),
            Some(k) => match self.by_key.get(&k).copied() {
                Some(y) => Some(y),
                None => match existing {
                    Some(x) if unkeyed(self, x) => {
                        if let Some(node) = self.nodes.get_mut(&x) {
                            node.key = Some(k);
                        }
                        self.by_key.insert(k, x);
                        Some(x)
                    }
                    _ => None,
                },
            },
        };
        let Some(ino) = target else {
            if existing.is_some() {
                self.detach(&link);
            }
            return self.alloc(link, key, lookups);
        };
        if existing != Some(ino) {
            if existing.is_some() {
                self.detach(&link);
            }
            let mut evicted = None;
            if let Some(node) = self.nodes.get_mut(&ino) {
                // A file may have tens of thousands of hard links; the
                // node remembers only the most recent few names, so the
                // cost of reaching it stays bounded (a forgotten name that
                // is looked up again finds the node by its host identity).
                if node.names.len() >= MAX_NAMES_PER_NODE {
                    evicted = Some(node.names.remove(0));
                }
                node.names.push(link.clone());
            }
            if let Some(old) = evicted {
                self.by_name.remove(&old);
            }
            self.by_name.insert(link, ino);
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_add(lookups);
        }
        ino
    }

    fn alloc(&mut self, link: Link, key: Option<HostKey>, lookups: u64) -> u64 {
        let ino = self.next;
        self.next += 1;
        self.by_name.insert(link.clone(), ino);
        if let Some(k) = key {
            self.by_key.insert(k, ino);
        }
        self.nodes.insert(
            ino,
            Node {
                names: vec![link],
                key,
                nlookup: lookups,
            },
        );
        ino
    }

    /// The ino of `name` in `parent` for a listing: the known one, else a
    /// fresh path-identified one with no lookups.
    pub(crate) fn register(&mut self, parent: u64, name: &Name) -> u64 {
        match self.find(parent, name) {
            Some(ino) => ino,
            None if self.nodes.len() >= self.listing_cap => {
                use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
                let h = BuildHasherDefault::<DefaultHasher>::default()
                    .hash_one((parent, name.as_bytes()));
                STAND_IN_BASE | (h & (STAND_IN_BASE - 1))
            }
            None => self.alloc((parent, name.clone()), None, 0),
        }
    }

    /// Give `ino` the host identity `key` (its file was just copied up, or
    /// it is about to get another name). A node that already has a key
    /// keeps it.
    pub(crate) fn bind_key(&mut self, ino: u64, key: HostKey) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if node.key.is_some() || node.names.is_empty() {
            return;
        }
        node.key = Some(key);
        self.by_key.insert(key, ino);
    }

    /// Gives the node at path `comps` (if the table knows it) the host
    /// identity `key`, replacing the one it had: its file was just copied
    /// up from a frozen layer. Other names of the old file (hard links not
    /// copied up) leave the node when next looked up.
    pub(crate) fn rekey(&mut self, comps: &[Name], key: HostKey) {
        let mut ino = ROOT;
        for c in comps {
            match self.by_name.get(&(ino, c.clone())) {
                Some(&next) => ino = next,
                None => return,
            }
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if let Some(old) = node.key.replace(key)
            && self.by_key.get(&old) == Some(&ino)
        {
            self.by_key.remove(&old);
        }
        if let Some(other) = self.by_key.insert(key, ino)
            && other != ino
            && let Some(n) = self.nodes.get_mut(&other)
        {
            n.key = None;
        }
    }

    /// Every known node below `top` (not `top` itself), at most
    /// [`LISTING_CAP`]. A scan of the table: not for requests.
    pub(crate) fn below(&self, top: u64) -> Vec<u64> {
        let mut children: HashMap<u64, Vec<u64>> = HashMap::new();
        for ((p, _), ino) in &self.by_name {
            children.entry(*p).or_default().push(*ino);
        }
        let mut out = Vec::new();
        let mut frontier = vec![top];
        let mut seen = std::collections::HashSet::new();
        while let Some(dir) = frontier.pop() {
            for ino in children.remove(&dir).unwrap_or_default() {
                if seen.insert(ino) {
                    out.push(ino);
                    frontier.push(ino);
                    if out.len() >= LISTING_CAP {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// The known names in directory `parent`, with their inos. A scan of
    /// the table: for a restore, not for requests.
    pub(crate) fn children(&self, parent: u64) -> Vec<(Name, u64)> {
        self.by_name
            .iter()
            .filter(|((p, _), _)| *p == parent)
            .map(|((_, n), ino)| (n.clone(), *ino))
            .collect()
    }

    /// The root and every path-identified node the kernel holds
    /// (directories among them): what may cache a listing.
    pub(crate) fn held_dirs(&self) -> Vec<u64> {
        std::iter::once(ROOT)
            .chain(
                self.nodes
                    .iter()
                    .filter(|(ino, n)| **ino != ROOT && n.key.is_none() && n.nlookup > 0)
                    .map(|(ino, _)| *ino),
            )
            .collect()
    }

    /// The known ino of `name` in `parent`, without touching counts.
    pub(crate) fn find(&self, parent: u64, name: &Name) -> Option<u64> {
        self.by_name.get(&(parent, name.clone())).copied()
    }

    /// Components from the root to `ino`, through its first known name.
    pub(crate) fn path(&self, ino: u64) -> OpResult<Vec<Name>> {
        let mut out = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let node = self.nodes.get(&cur).ok_or(OpError::Stale(ino))?;
            let (parent, name) = node.names.first().ok_or(OpError::Stale(ino))?;
            if out.len() > MAX_DEPTH {
                return Err(OpError::Stale(ino));
            }
            out.push(name.clone());
            cur = *parent;
        }
        out.reverse();
        Ok(out)
    }

    /// Every known name of `ino` with its path, and its host identity.
    pub(crate) fn paths(&self, ino: u64) -> OpResult<(Vec<Reach>, Option<HostKey>)> {
        let node = self.nodes.get(&ino).ok_or(OpError::Stale(ino))?;
        let mut out = Vec::with_capacity(node.names.len());
        for (parent, name) in &node.names {
            if let Ok(mut p) = self.path(*parent) {
                p.push(name.clone());
                out.push(((*parent, name.clone()), p));
            }
        }
        if out.is_empty() && ino != ROOT {
            return Err(OpError::Stale(ino));
        }
        Ok((out, node.key))
    }

    /// The node holding host file `key` and the paths of its names other
    /// than (`parent`, `name`), when there is one and it does not already
    /// have that name: the caller checks they still reach the same file.
    pub(crate) fn key_owner(
        &self,
        key: HostKey,
        parent: u64,
        name: &Name,
    ) -> Option<(u64, Vec<Reach>)> {
        let ino = *self.by_key.get(&key)?;
        if self.find(parent, name) == Some(ino) {
            return None;
        }
        let (paths, _) = self.paths(ino).ok()?;
        Some((ino, paths))
    }

    /// Forget that `link` names `ino` (it no longer reaches its file).
    pub(crate) fn drop_name(&mut self, ino: u64, link: &Link) {
        if self.by_name.get(link) == Some(&ino) {
            self.detach(link);
        }
    }

    /// Detach `ino` from all its names: the next lookup of any of them
    /// makes a new node (a new inode to the kernel). `ino` lives on without
    /// names for its open handles until the kernel forgets it.
    pub(crate) fn detach_all(&mut self, ino: u64) {
        if ino == ROOT {
            return;
        }
        let names = self
            .nodes
            .get(&ino)
            .map(|n| n.names.clone())
            .unwrap_or_default();
        for link in &names {
            self.drop_name(ino, link);
        }
    }

    pub(crate) fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.nlookup = node.nlookup.saturating_sub(n);
        if node.nlookup == 0 {
            self.remove(ino);
        }
    }

    fn remove(&mut self, ino: u64) {
        if let Some(node) = self.nodes.remove(&ino) {
            for link in node.names {
                if self.by_name.get(&link) == Some(&ino) {
                    self.by_name.remove(&link);
                }
            }
            if let Some(k) = node.key
                && self.by_key.get(&k) == Some(&ino)
            {
                self.by_key.remove(&k);
            }
        }
    }

    /// Drop `link` from the node it names. A node left without names keeps
    /// its ino while the kernel references it, but no longer claims its host
    /// identity (the host may reuse the inode number for a new file).
    fn detach(&mut self, link: &Link) -> Option<u64> {
        let ino = self.by_name.remove(link)?;
        let Some(node) = self.nodes.get_mut(&ino) else {
            return Some(ino);
        };
        node.names.retain(|l| l != link);
        if node.names.is_empty() {
            if node.nlookup == 0 {
                self.remove(ino);
            } else if let Some(k) = node.key
                && self.by_key.get(&k) == Some(&ino)
            {
                self.by_key.remove(&k);
            }
        }
        Some(ino)
    }

    /// `name` in `parent` is gone: drop the name, keep the ino while the
    /// kernel still references it (reachable through its other names).
    pub(crate) fn unlink(&mut self, parent: u64, name: &Name) {
        self.detach(&(parent, name.clone()));
    }

    /// Move `name` in `parent` to `new_name` in `new_parent`, replacing
    /// whatever was there.
    pub(crate) fn rename(&mut self, parent: u64, name: &Name, new_parent: u64, new_name: &Name) {
        let from = (parent, name.clone());
        let to = (new_parent, new_name.clone());
        if from == to {
            return;
        }
        let src = self.by_name.get(&from).copied();
        if src.is_some() && src == self.by_name.get(&to).copied() {
            // Two names of one file: rename(2) leaves both in place.
            return;
        }
        self.detach(&to);
        if let Some(ino) = self.by_name.remove(&from) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                for l in &mut node.names {
                    if *l == from {
                        *l = to.clone();
                    }
                }
            }
            self.by_name.insert(to, ino);
        }
    }

    /// Swap two entries (RENAME_EXCHANGE).
    pub(crate) fn exchange(&mut self, parent: u64, name: &Name, new_parent: u64, new_name: &Name) {
        let la = (parent, name.clone());
        let lb = (new_parent, new_name.clone());
        let a = self.by_name.get(&la).copied();
        let b = self.by_name.get(&lb).copied();
        if a == b {
            return;
        }
        self.by_name.remove(&la);
        self.by_name.remove(&lb);
        for (ino, from, to) in [(a, &la, &lb), (b, &lb, &la)] {
            let Some(ino) = ino else { continue };
            if let Some(node) = self.nodes.get_mut(&ino) {
                for l in &mut node.names {
                    if l == from {
                        *l = to.clone();
                    }
                }
            }
            self.by_name.insert(to.clone(), ino);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn n(s: &str) -> Name {
        Name::new(OsStr::new(s)).unwrap()
    }

    #[test]
    fn paths_follow_renames_and_forget() {
        let mut t = Inodes::new();
        let a = t.insert(ROOT, &n("a"), None, 1);
        let b = t.insert(a, &n("b"), None, 1);
        assert_eq!(t.insert(a, &n("b"), None, 1), b);
        assert_eq!(t.path(b).unwrap(), vec![n("a"), n("b")]);
        t.rename(a, &n("b"), ROOT, &n("c"));
        assert_eq!(t.path(b).unwrap(), vec![n("c")]);
        t.unlink(ROOT, &n("c"));
        assert!(t.path(b).is_err());
        t.forget(b, 2);
        assert!(t.find(ROOT, &n("c")).is_none());
        let c = t.insert(ROOT, &n("c"), None, 1);
        assert_ne!(c, b);
    }

    #[test]
    fn a_file_with_many_links_keeps_a_bounded_number_of_names() {
        let mut t = Inodes::new();
        let k = (9, 99);
        let first = t.insert(ROOT, &n("l0"), Some(k), 1);
        for i in 1..10_000 {
            assert_eq!(t.insert(ROOT, &n(&format!("l{i}")), Some(k), 1), first);
        }
        let (paths, _) = t.paths(first).unwrap();
        assert_eq!(paths.len(), MAX_NAMES_PER_NODE);
        assert!(t.by_name.len() <= MAX_NAMES_PER_NODE);
        // An evicted name looked up again is the same file.
        assert_eq!(t.insert(ROOT, &n("l0"), Some(k), 1), first);
        assert_eq!(t.path(first).unwrap().len(), 1);
    }

    #[test]
    fn detach_all_gives_names_a_new_ino() {
        let mut t = Inodes::new();
        let k = (7, 43);
        let a = t.insert(ROOT, &n("a"), None, 1);
        // copied up: the path node takes the key, a hard link joins it
        assert_eq!(t.insert(ROOT, &n("a"), Some(k), 1), a);
        assert_eq!(t.insert(ROOT, &n("l"), Some(k), 1), a);
        t.detach_all(a);
        assert!(t.path(a).is_err());
        assert!(t.find(ROOT, &n("a")).is_none());
        let b = t.insert(ROOT, &n("a"), Some(k), 1);
        assert_ne!(b, a);
        assert_eq!(t.insert(ROOT, &n("l"), Some(k), 1), b);
        // the old ino lives until forgotten
        assert!(t.nodes.contains_key(&a));
        t.forget(a, 3);
        assert!(!t.nodes.contains_key(&a));
        assert_eq!(t.path(b).unwrap(), vec![n("a")]);
    }

    #[test]
    fn hard_links_share_one_ino() {
        let mut t = Inodes::new();
        let k = (7, 42);
        let d = t.insert(ROOT, &n("d"), None, 1);
        let g = t.insert(d, &n("g"), Some(k), 1);
        let h = t.insert(d, &n("h"), Some(k), 1);
        assert_eq!(g, h);
        assert_eq!(t.path(g).unwrap(), vec![n("d"), n("g")]);
        // the first name goes: the next one reaches the file
        t.unlink(d, &n("g"));
        assert_eq!(t.path(g).unwrap(), vec![n("d"), n("h")]);
        t.rename(d, &n("h"), ROOT, &n("i"));
        assert_eq!(t.path(g).unwrap(), vec![n("i")]);
        assert_eq!(t.insert(ROOT, &n("i"), Some(k), 0), g);
        // no names left: the ino lives until forgotten, the key is released
        t.unlink(ROOT, &n("i"));
        assert!(t.path(g).is_err());
        let again = t.insert(ROOT, &n("j"), Some(k), 1);
        assert_ne!(again, g);
        t.forget(g, 2);
        assert!(!t.nodes.contains_key(&g));
        t.forget(again, 1);
        assert!(t.by_key.is_empty());
        assert_eq!(t.by_name.len(), 1);
    }

    #[test]
    fn copy_up_keeps_the_ino() {
        let mut t = Inodes::new();
        let a = t.insert(ROOT, &n("a"), None, 1);
        // first lookup after copy-up: the path-identified node takes the key
        assert_eq!(t.insert(ROOT, &n("a"), Some((1, 5)), 1), a);
        assert_eq!(t.insert(ROOT, &n("b"), Some((1, 5)), 1), a);
        // link after an explicit copy-up
        let c = t.insert(ROOT, &n("c"), None, 1);
        t.bind_key(c, (1, 6));
        assert_eq!(t.insert(ROOT, &n("e"), Some((1, 6)), 1), c);
        // a name now showing another host file gets a new ino
        let x = t.insert(ROOT, &n("a"), Some((1, 9)), 1);
        assert_ne!(x, a);
        assert_eq!(t.path(a).unwrap(), vec![n("b")]);
        // readdir registration never steals a known name
        assert_eq!(t.register(ROOT, &n("b")), a);
    }

    #[test]
    fn listings_stop_registering_at_the_cap() {
        let mut t = Inodes::new();
        t.listing_cap = 3;
        let a = t.register(ROOT, &n("a"));
        let b = t.register(ROOT, &n("b"));
        assert!(a < STAND_IN_BASE && b < STAND_IN_BASE);
        // Full: a new name gets a stable stand-in and no node.
        let c = t.register(ROOT, &n("c"));
        assert!(c >= STAND_IN_BASE);
        assert_eq!(t.register(ROOT, &n("c")), c);
        assert_eq!(t.find(ROOT, &n("c")), None);
        // Known names keep their ino; a lookup still registers.
        assert_eq!(t.register(ROOT, &n("a")), a);
        let looked = t.insert(ROOT, &n("c"), None, 1);
        assert!(looked < STAND_IN_BASE);
        assert_eq!(t.register(ROOT, &n("c")), looked);
    }
}
