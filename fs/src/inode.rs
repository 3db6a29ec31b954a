//! The inode table: ino -> (parent ino, name, lookup count).
//!
//! Paths are never stored; they are computed by walking parents, so a rename
//! is O(1). The same (parent, name) keeps its ino while the table knows it.

use std::collections::HashMap;

use crate::error::{OpError, OpResult};
use crate::policy::Name;

/// The kernel's root inode number.
pub(crate) const ROOT: u64 = 1;

/// Depth beyond which a parent chain is treated as corrupt.
const MAX_DEPTH: usize = 4096;

#[derive(Debug)]
struct Node {
    parent: u64,
    /// `None` only for the root.
    name: Option<Name>,
    /// Lookups the kernel holds (decremented by forget).
    nlookup: u64,
    /// False once unlinked or replaced: the ino lives on for open handles but
    /// no longer has a path.
    linked: bool,
}

/// The table. Callers hold it behind one mutex.
#[derive(Debug)]
pub(crate) struct Inodes {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<(u64, Name), u64>,
    next: u64,
}

impl Inodes {
    pub(crate) fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                name: None,
                nlookup: 1,
                linked: true,
            },
        );
        Self {
            nodes,
            by_name: HashMap::new(),
            next: ROOT + 1,
        }
    }

    /// The ino of `name` in `parent`, allocating one if unknown. `lookups`
    /// is added to its lookup count (1 for replies that create a kernel
    /// reference, 0 for readdir).
    pub(crate) fn get_or_insert(&mut self, parent: u64, name: &Name, lookups: u64) -> u64 {
        let key = (parent, name.clone());
        if let Some(&ino) = self.by_name.get(&key)
            && let Some(node) = self.nodes.get_mut(&ino)
        {
            node.nlookup = node.nlookup.saturating_add(lookups);
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: Some(name.clone()),
                nlookup: lookups,
                linked: true,
            },
        );
        self.by_name.insert(key, ino);
        ino
    }

    /// The known ino of `name` in `parent`, without touching counts.
    pub(crate) fn find(&self, parent: u64, name: &Name) -> Option<u64> {
        self.by_name.get(&(parent, name.clone())).copied()
    }

    /// Components from the root to `ino`.
    pub(crate) fn path(&self, ino: u64) -> OpResult<Vec<Name>> {
        let mut out = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let node = self.nodes.get(&cur).ok_or(OpError::Stale(ino))?;
            if !node.linked || out.len() > MAX_DEPTH {
                return Err(OpError::Stale(ino));
            }
            let name = node.name.clone().ok_or(OpError::Stale(ino))?;
            out.push(name);
            cur = node.parent;
        }
        out.reverse();
        Ok(out)
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
        if let Some(node) = self.nodes.remove(&ino)
            && let Some(name) = node.name
        {
            let key = (node.parent, name);
            if self.by_name.get(&key) == Some(&ino) {
                self.by_name.remove(&key);
            }
        }
    }

    /// `name` in `parent` is gone: drop the name, keep the ino while the
    /// kernel still references it.
    pub(crate) fn unlink(&mut self, parent: u64, name: &Name) {
        if let Some(ino) = self.by_name.remove(&(parent, name.clone()))
            && let Some(node) = self.nodes.get_mut(&ino)
        {
            node.linked = false;
            if node.nlookup == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    /// Move `name` in `parent` to `new_name` in `new_parent`, replacing
    /// whatever was there.
    pub(crate) fn rename(&mut self, parent: u64, name: &Name, new_parent: u64, new_name: &Name) {
        self.unlink(new_parent, new_name);
        if let Some(ino) = self.by_name.remove(&(parent, name.clone())) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.parent = new_parent;
                node.name = Some(new_name.clone());
            }
            self.by_name.insert((new_parent, new_name.clone()), ino);
        }
    }

    /// Swap two entries (RENAME_EXCHANGE).
    pub(crate) fn exchange(&mut self, parent: u64, name: &Name, new_parent: u64, new_name: &Name) {
        let a = self.by_name.remove(&(parent, name.clone()));
        let b = self.by_name.remove(&(new_parent, new_name.clone()));
        if let Some(a) = a {
            if let Some(node) = self.nodes.get_mut(&a) {
                node.parent = new_parent;
                node.name = Some(new_name.clone());
            }
            self.by_name.insert((new_parent, new_name.clone()), a);
        }
        if let Some(b) = b {
            if let Some(node) = self.nodes.get_mut(&b) {
                node.parent = parent;
                node.name = Some(name.clone());
            }
            self.by_name.insert((parent, name.clone()), b);
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
        let a = t.get_or_insert(ROOT, &n("a"), 1);
        let b = t.get_or_insert(a, &n("b"), 1);
        assert_eq!(t.get_or_insert(a, &n("b"), 1), b);
        assert_eq!(t.path(b).unwrap(), vec![n("a"), n("b")]);
        t.rename(a, &n("b"), ROOT, &n("c"));
        assert_eq!(t.path(b).unwrap(), vec![n("c")]);
        t.unlink(ROOT, &n("c"));
        assert!(t.path(b).is_err());
        t.forget(b, 2);
        assert!(t.find(ROOT, &n("c")).is_none());
        let c = t.get_or_insert(ROOT, &n("c"), 1);
        assert_ne!(c, b);
    }
}
