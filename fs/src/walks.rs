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
    /// Most descriptors the remembered values may hold together.
    cap: usize,
    /// Descriptors one value holds.
    weight: fn(&V) -> usize,
    cache: Mutex<Cache<V>>,
    generation: AtomicU64,
    under_way: AtomicU64,
}

#[derive(Debug)]
struct Cache<V> {
    generation: u64,
    dirs: HashMap<Vec<Name>, V>,
    /// Descriptors the values hold.
    held: usize,
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
    /// Remembers walks whose values hold at most `cap` descriptors
    /// together, `weight` saying how many one value holds (a merged
    /// directory holds one per layer showing it, and every snapshot adds
    /// a layer: a count of directories would not bound them).
    pub(crate) fn new(cap: usize, weight: fn(&V) -> usize) -> Self {
        Self {
            cap,
            weight,
            cache: Mutex::new(Cache {
                generation: 0,
                dirs: HashMap::new(),
                held: 0,
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
        let adding: usize = levels.iter().map(|(_, v)| (self.weight)(v)).sum();
        if adding > self.cap {
            return;
        }
        let mut cache = lock(&self.cache);
        if cache.generation != g || cache.held + adding > self.cap {
            cache.dirs.clear();
            cache.held = 0;
            cache.generation = g;
        }
        for (n, v) in levels {
            if let Some(p) = path.get(..n) {
                cache.held += (self.weight)(&v);
                if let Some(old) = cache.dirs.insert(p.to_vec(), v) {
                    cache.held = cache.held.saturating_sub((self.weight)(&old));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn path(n: usize) -> Vec<Name> {
        (0..n)
            .map(|i| {
                Name::new(std::ffi::OsStr::new(&format!("d{i}"))).unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    }

    /// The descriptors held stay under the cap whatever each value holds
    /// (a directory shown by many layers weighs as many).
    #[test]
    fn remembered_values_never_hold_more_descriptors_than_the_cap() {
        let w: Walks<usize> = Walks::new(10, |v| *v);
        let p = path(4);
        let seen = w.start();
        w.remember(seen, &p, vec![(1, 3), (2, 3), (3, 3)]);
        assert_eq!(w.deepest(w.start(), &p), Some((3, 3)));
        // Four more would make 13: the old ones go first.
        w.remember(w.start(), &p, vec![(4, 4)]);
        assert_eq!(lock(&w.cache).held, 4);
        assert_eq!(w.deepest(w.start(), &p), Some((4, 4)));
        assert_eq!(w.deepest(w.start(), &p[..3]), None);
        // A walk heavier than the cap is not remembered at all.
        w.remember(w.start(), &p, vec![(1, 11)]);
        assert!(lock(&w.cache).held <= 10);
        // A change forgets everything, and a walk overlapping one is not
        // remembered.
        let seen = w.start();
        let c = w.change();
        w.remember(seen, &p, vec![(1, 1)]);
        drop(c);
        assert_eq!(w.deepest(w.start(), &p), None);
    }
}
