//! Remembered walks: what walking a path of directories found, kept while
//! nothing that could change it has happened.
//!
//! Every request names its place by path, and walking a path opens each
//! component (in each layer) with landlock checking each open. A
//! [`Walks`] remembers the result for recently walked directories (and
//! every directory on the way) for one generation. Whoever changes what a
//! walk would find (a directory made, removed, renamed or copied up, its
//! permissions changed, a snapshot or restore, another sandbox's change to
//! a shared tree) holds a [`Change`] while doing it: it bumps the
//! generation when it starts and when it ends, and no walk that overlaps
//! one is remembered (a seqlock). Files made, written or removed inside
//! existing directories change no walk.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fuse::lock;
use crate::policy::Name;

/// Remembered walks of one tree, valued `V` (what a walk found).
#[derive(Debug)]
pub(crate) struct Walks<V> {
    cap: usize,
    cache: Mutex<Cache<V>>,
    generation: AtomicU64,
    under_way: AtomicU64,
}

#[derive(Debug)]
struct Cache<V> {
    generation: u64,
    dirs: HashMap<Vec<Name>, V>,
}

/// A change under way (see the module docs).
#[derive(Debug)]
pub(crate) struct Change<'a> {
    generation: &'a AtomicU64,
    under_way: &'a AtomicU64,
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.under_way.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A walk in progress: the generation it started in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen(Option<u64>);

impl<V: Clone> Walks<V> {
    /// Remembers at most `cap` directories (each value may hold
    /// descriptors: the cap bounds them).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            cache: Mutex::new(Cache {
                generation: 0,
                dirs: HashMap::new(),
            }),
            generation: AtomicU64::new(0),
            under_way: AtomicU64::new(0),
        }
    }

    /// Starts a walk: the generation, or `None` while a change is under way
    /// (nothing is remembered or recalled then).
    pub(crate) fn start(&self) -> Seen {
        let g = self.generation.load(Ordering::Acquire);
        Seen((self.under_way.load(Ordering::Acquire) == 0).then_some(g))
    }

    /// The deepest remembered directory on `path` (itself included):
    /// `(depth, value)`.
    pub(crate) fn deepest(&self, seen: Seen, path: &[Name]) -> Option<(usize, V)> {
        let g = seen.0?;
        let cache = lock(&self.cache);
        if cache.generation != g {
            return None;
        }
        (1..=path.len())
            .rev()
            .find_map(|n| cache.dirs.get(&path[..n]).map(|v| (n, v.clone())))
    }

    /// Remembers `levels` (depth, value) of `path`, if no change overlapped
    /// the walk that started at `seen`.
    pub(crate) fn remember(&self, seen: Seen, path: &[Name], levels: Vec<(usize, V)>) {
        let Some(g) = seen.0 else {
            return;
        };
        if self.under_way.load(Ordering::Acquire) != 0
            || self.generation.load(Ordering::Acquire) != g
        {
            return;
        }
        let mut cache = lock(&self.cache);
        if cache.generation != g || cache.dirs.len() + levels.len() > self.cap {
            cache.dirs.clear();
            cache.generation = g;
        }
        for (n, v) in levels {
            if let Some(p) = path.get(..n) {
                cache.dirs.insert(p.to_vec(), v);
            }
        }
    }

    /// Marks a change under way until the guard drops.
    pub(crate) fn change(&self) -> Change<'_> {
        self.under_way.fetch_add(1, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Change {
            generation: &self.generation,
            under_way: &self.under_way,
        }
    }
}
