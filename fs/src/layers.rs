//! The layer stack: a read-only base at the bottom, synthesized entries
//! above it, then zero or more frozen layers and one writable layer on top.
//!
//! Format (overlayfs conventions, so a layer can be inspected with `ls`):
//! a whiteout is a character device 0:0, an opaque directory carries the
//! xattr `user.overlay.opaque = "y"` (overlayfs's `userxattr` form: the
//! server runs in a user namespace, where `trusted.*` is out of reach).
//! The sandbox can neither read nor write `user.overlay.*` names.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cap_std::fs::Dir;
use fuser::FileType;
use rustix::fs::{AtFlags, FileType as RFileType, Mode, OFlags, Stat, Timespec, Timestamps};

use crate::error::{OpError, OpResult};
use crate::policy::{Name, host_visible};
use crate::resolve::{is_loop, open_dir, open_file, stat_at};
use crate::synth::{Synth, SynthEntry};
use crate::walks::{Change, Walks};

pub(crate) const OPAQUE_XATTR: &str = "user.overlay.opaque";

/// The directory, at the root of a writable layer, that holds its frozen
/// layers (`layers/NAME`) and what a restore set aside (`trash/N`). Never
/// shown at the root of the sandbox or of its workspace, never creatable
/// there.
pub(crate) const LAYERS_DIR: &str = ".airlock";

/// Whether `name` in directory `dir` (components from a stack's root) is
/// [`LAYERS_DIR`].
pub(crate) fn is_reserved(dir: &[Name], name: &Name) -> bool {
    dir.is_empty() && name.as_bytes() == LAYERS_DIR.as_bytes()
}

/// Xattr names the layer format reserves: hidden from the sandbox.
pub(crate) const RESERVED_XATTR_PREFIX: &[u8] = b"user.overlay.";

/// Permission bit: read (a file's contents, a directory's listing).
pub(crate) const READ: u16 = 0o4;
/// Permission bit: write.
pub(crate) const WRITE: u16 = 0o2;
/// Permission bit: search a directory.
pub(crate) const SEARCH: u16 = 0o1;

/// Metadata of one entry, as stored (before ownership translation).
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub kind: FileType,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub nlink: u32,
    pub rdev: u32,
    pub blksize: u32,
    /// The host file's `(st_dev, st_ino)`: its identity when it lives in a
    /// writable area (see [`crate::inode`]). `None` for synthesized entries.
    pub host: Option<crate::inode::HostKey>,
}

fn ts(sec: i64, nsec: i64) -> SystemTime {
    let nsec = u32::try_from(nsec.clamp(0, 999_999_999)).unwrap_or(0);
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec.unsigned_abs(), nsec)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::new(sec.unsigned_abs(), 0))
            .unwrap_or(UNIX_EPOCH)
            + Duration::new(0, nsec)
    }
}

pub(crate) fn kind_of(mode: u32) -> FileType {
    match RFileType::from_raw_mode(mode) {
        RFileType::Directory => FileType::Directory,
        RFileType::Symlink => FileType::Symlink,
        RFileType::Fifo => FileType::NamedPipe,
        RFileType::Socket => FileType::Socket,
        RFileType::CharacterDevice => FileType::CharDevice,
        RFileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

impl Meta {
    pub(crate) fn from_stat(st: &Stat) -> Self {
        Self {
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
            blocks: u64::try_from(st.st_blocks).unwrap_or(0),
            atime: ts(st.st_atime, st.st_atime_nsec as i64),
            mtime: ts(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: ts(st.st_ctime, st.st_ctime_nsec as i64),
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            rdev: u32::try_from(st.st_rdev).unwrap_or(0),
            blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
            host: Some((st.st_dev, st.st_ino)),
        }
    }

    pub(crate) fn synth(e: &SynthEntry, epoch: SystemTime) -> Self {
        let (kind, perm, size, nlink) = match e {
            SynthEntry::Dir { mode } => (FileType::Directory, *mode as u16, 0, 2),
            SynthEntry::File { content } => (FileType::RegularFile, 0o644, content.len() as u64, 1),
        };
        Self {
            kind,
            perm,
            uid: 0,
            gid: 0,
            size,
            blocks: size.div_ceil(512),
            atime: epoch,
            mtime: epoch,
            ctime: epoch,
            nlink,
            rdev: 0,
            blksize: 4096,
            host: None,
        }
    }

    pub(crate) fn is_dir(&self) -> bool {
        self.kind == FileType::Directory
    }
}

pub(crate) fn is_whiteout(st: &Stat) -> bool {
    RFileType::from_raw_mode(st.st_mode) == RFileType::CharacterDevice && st.st_rdev == 0
}

/// Where an entry's topmost version lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Src {
    /// Layer index in the stack (0 = base).
    Layer(usize),
    /// The synthesized tree, at this path.
    Synth(String),
}

/// One layer's contribution to a merged directory.
#[derive(Debug, Clone)]
pub(crate) enum Part {
    Layer(usize, Arc<Dir>),
    Synth(String),
}

/// A resolved merged entry.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub meta: Meta,
    pub src: Src,
}

/// Result of looking a name up in a merged directory.
#[derive(Debug, Default)]
pub(crate) struct Lookup {
    pub found: Option<Found>,
    /// Set when the host filter hid a base entry of this name.
    pub hidden: Option<&'static str>,
    /// The directory's own parts, when it is one and they were asked for.
    pub parts: Vec<Part>,
}

fn join(dir: &str, name: &Name) -> String {
    let n = String::from_utf8_lossy(name.as_bytes());
    if dir.is_empty() {
        n.into_owned()
    } else {
        format!("{dir}/{n}")
    }
}

/// The stack of layers.
#[derive(Debug)]
pub(crate) struct Store {
    /// Bottom (base, index 0) to top (the writable layer), frozen layers
    /// between them. A snapshot freezes the top's contents into a frozen
    /// layer ([`Store::push_frozen`]); a restore swaps the frozen layers
    /// ([`Store::set_frozen`]).
    layers: RwLock<Vec<Arc<Dir>>>,
    /// Whether index 0 is a base that stays when the frozen layers are
    /// swapped (the sandbox's stack) or itself the bottom frozen layer (a
    /// workspace's stack).
    fixed_base: bool,
    /// Whether the base is the host root, shown through [`host_visible`].
    host_filter: bool,
    /// The host uid whose permission class the sandbox gets on base
    /// entries it owns: the owner of a caller's rootfs. Every other base
    /// entry grants only what its "other" bits grant an unprivileged host
    /// user (see [`Store::base_grants`]). `None` for the host base.
    base_owner: Option<u32>,
    pub(crate) synth: Synth,
    ids: crate::IdMap,
    /// See [`crate::MountSpec::base_idmapped`].
    base_idmapped: bool,
    epoch: SystemTime,
    /// Serializes copy-ups so two threads never copy the same file at once.
    copy_lock: std::sync::Mutex<()>,
    /// Recently walked directories' parts (see [`Store::dir_parts`]).
    walks: Walks<Vec<Part>>,
}

/// Most descriptors the remembered walks hold (one per layer showing each
/// directory); the server's descriptor limit is the sandbox's, at least
/// 256.
const PARTS_CACHED: usize = 96;

/// Descriptors one directory's parts hold (`Walks` passes the value as
/// stored, a `Vec`).
#[allow(clippy::ptr_arg)]
fn parts_weight(parts: &Vec<Part>) -> usize {
    parts
        .iter()
        .filter(|p| matches!(p, Part::Layer(..)))
        .count()
}

impl Store {
    /// The sandbox's stack: `base` under synthesized entries under the
    /// writable layer `upper`.
    pub(crate) fn new(
        base: Dir,
        upper: Arc<Dir>,
        host_filter: bool,
        base_owner: Option<u32>,
        synth: Synth,
        ids: crate::IdMap,
        base_idmapped: bool,
    ) -> Self {
        Self {
            layers: RwLock::new(vec![Arc::new(base), upper]),
            fixed_base: true,
            host_filter,
            base_owner,
            synth,
            ids,
            base_idmapped,
            epoch: SystemTime::now(),
            copy_lock: std::sync::Mutex::new(()),
            walks: Walks::new(PARTS_CACHED, parts_weight),
        }
    }

    /// A workspace's stack: `frozen` (bottom first, at least one) under
    /// the live workspace `top`. Entries show their stored owners (the
    /// workspace's, through its idmap) and modes; what the bottom layer
    /// holds is judged like a caller's rootfs owned by `owner`.
    pub(crate) fn workspace(
        frozen: Vec<Arc<Dir>>,
        top: Arc<Dir>,
        owner: u32,
        ids: crate::IdMap,
    ) -> Self {
        let mut layers = frozen;
        layers.push(top);
        Self {
            layers: RwLock::new(layers),
            fixed_base: false,
            host_filter: false,
            base_owner: Some(owner),
            synth: Synth::empty(),
            ids,
            base_idmapped: true,
            epoch: SystemTime::now(),
            copy_lock: std::sync::Mutex::new(()),
            walks: Walks::new(PARTS_CACHED, parts_weight),
        }
    }

    /// Inserts `layer` (the top's contents, just moved into it) right
    /// under the top.
    pub(crate) fn push_frozen(&self, layer: Arc<Dir>) {
        let _m = self.mutation();
        let mut l = match self.layers.write() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let at = l.len().saturating_sub(1);
        l.insert(at, layer);
    }

    /// Replaces the frozen layers (bottom first) under the top; a
    /// sandbox's base stays.
    pub(crate) fn set_frozen(&self, frozen: Vec<Arc<Dir>>) {
        let _m = self.mutation();
        let mut l = match self.layers.write() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let Some(top) = l.last().cloned() else {
            return;
        };
        let mut next = Vec::with_capacity(frozen.len() + 2);
        if self.fixed_base
            && let Some(base) = l.first()
        {
            next.push(Arc::clone(base));
        }
        next.extend(frozen);
        next.push(top);
        *l = next;
    }

    /// Whether entries of `src` keep their host file's identity: the
    /// writable and frozen layers' (frozen files never change; a file just
    /// frozen keeps its inode), not the base's or synthesized ones.
    pub(crate) fn keyed(&self, src: &Src) -> bool {
        match src {
            Src::Synth(_) => false,
            Src::Layer(0) => !self.fixed_base,
            Src::Layer(_) => true,
        }
    }

    fn layers(&self) -> Vec<Arc<Dir>> {
        match self.layers.read() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The writable layer's index and root.
    pub(crate) fn top(&self) -> (usize, Arc<Dir>) {
        let l = self.layers();
        let idx = l.len().saturating_sub(1);
        (idx, Arc::clone(&l[idx]))
    }

    pub(crate) fn upper_root(&self) -> Arc<Dir> {
        self.top().1
    }

    /// The owner the kernel is shown for an entry of this source (host ids).
    pub(crate) fn owner(&self, src: &Src, meta: &Meta) -> (u32, u32) {
        let ids = &self.ids;
        if !self.fixed_base {
            // A workspace's layers: its owner, as stored.
            return (meta.uid, meta.gid);
        }
        match src {
            Src::Synth(_) => (ids.host_uid_base, ids.host_gid_base),
            Src::Layer(0) if !self.base_idmapped => {
                (ids.base_uid(meta.uid), ids.base_gid(meta.gid))
            }
            Src::Layer(_) => (ids.clamp_uid(meta.uid), ids.clamp_gid(meta.gid)),
        }
    }

    /// `found`'s metadata with the owner and mode the kernel sees, for
    /// copy-up.
    fn shown(&self, found: &Found) -> Meta {
        let mut m = found.meta.clone();
        (m.uid, m.gid) = self.owner(&found.src, &found.meta);
        m.perm = self.perm(&found.src, &found.meta);
        m
    }

    /// Whether a base entry with host metadata `meta` grants `bits` (a
    /// mix of `READ` 4 and `SEARCH` 1) to the sandbox.
    ///
    /// The base is a view of host files the broker reads as root. Showing
    /// them with their host owner class would hand a host-root-only file
    /// (mode 0600, a 0700 directory) to the sandbox's root, who owns it in
    /// the sandbox's eyes. So the sandbox gets what an unprivileged host
    /// user gets: the "other" bits, except on entries owned by the owner of
    /// a caller's own rootfs, who could read them anyway.
    pub(crate) fn base_grants(&self, meta: &Meta, bits: u16) -> bool {
        let class = if self.base_owner == Some(meta.uid) {
            meta.perm >> 6
        } else {
            meta.perm
        };
        class & bits == bits
    }

    /// Whether the base can change under us: a caller's own rootfs (they
    /// may rename in it), not the host base (no unprivileged user can).
    pub(crate) fn base_may_change(&self) -> bool {
        self.base_owner.is_some()
    }

    /// The mode the kernel is shown for an entry of this source. For a base
    /// entry, the owner's and group's read and search bits are limited to
    /// what [`Store::base_grants`] allows, so the kernel's own permission
    /// checks refuse what the base would refuse; write bits stay (a write
    /// copies up, which needs no read access when it truncates).
    pub(crate) fn perm(&self, src: &Src, meta: &Meta) -> u16 {
        if *src != Src::Layer(0) || self.base_owner == Some(meta.uid) {
            return meta.perm;
        }
        let rx = meta.perm & 0o5;
        let keep = 0o7000 | 0o222 | (rx << 6) | (rx << 3) | rx;
        meta.perm & keep
    }

    pub(crate) fn root_meta(&self) -> Meta {
        Meta::synth(&SynthEntry::Dir { mode: 0o755 }, self.epoch)
    }

    /// Parts of the merged root, top-down.
    pub(crate) fn root_parts(&self) -> Vec<Part> {
        let l = self.layers();
        let mut parts: Vec<Part> = l
            .iter()
            .enumerate()
            .skip(1)
            .rev()
            .map(|(i, d)| Part::Layer(i, Arc::clone(d)))
            .collect();
        parts.push(Part::Synth(String::new()));
        if let Some(base) = l.first() {
            parts.push(Part::Layer(0, Arc::clone(base)));
        }
        parts
    }

    fn filtered(&self, idx: usize, dir: &[Name], name: &Name) -> Option<&'static str> {
        if idx != 0 || !self.host_filter {
            return None;
        }
        let mut comps: Vec<&[u8]> = dir.iter().map(Name::as_bytes).collect();
        comps.push(name.as_bytes());
        host_visible(&comps).err()
    }

    /// Look `name` up in the merged directory `dir` (given by its parts).
    pub(crate) fn lookup(
        &self,
        parts: &[Part],
        dir: &[Name],
        name: &Name,
        want_parts: bool,
    ) -> OpResult<Lookup> {
        let mut out = Lookup::default();
        for part in parts {
            match part {
                Part::Layer(idx, d) => {
                    if is_reserved(dir, name) {
                        continue;
                    }
                    if let Some(reason) = self.filtered(*idx, dir, name) {
                        if out.found.is_none() {
                            out.hidden = Some(reason);
                        }
                        continue;
                    }
                    let Some(st) = stat_at(&**d, name)? else {
                        continue;
                    };
                    if is_whiteout(&st) {
                        break;
                    }
                    let meta = Meta::from_stat(&st);
                    let is_dir = meta.is_dir();
                    let private = *idx == 0 && is_dir && !self.base_grants(&meta, SEARCH);
                    if out.found.is_none() {
                        out.found = Some(Found {
                            meta,
                            src: Src::Layer(*idx),
                        });
                        if !is_dir || !want_parts {
                            break;
                        }
                    } else if !is_dir {
                        break;
                    }
                    if private {
                        // A private host directory: its name shows, its
                        // contents do not.
                        break;
                    }
                    let child = match open_dir(&**d, name) {
                        Ok(c) => c,
                        Err(e) if e.is_absent() || is_loop(&e) => break,
                        Err(e) => return Err(e),
                    };
                    // A caller's own rootfs can change under us (they may
                    // swap names in it): check the directory just opened,
                    // not only the name stat'ed before.
                    if *idx == 0
                        && self.base_may_change()
                        && !self.base_grants(&Meta::from_stat(&rustix::fs::fstat(&*child)?), SEARCH)
                    {
                        break;
                    }
                    let opaque = is_opaque(&child);
                    out.parts.push(Part::Layer(*idx, child));
                    if opaque {
                        break;
                    }
                }
                Part::Synth(p) => {
                    let path = join(p, name);
                    let Some(e) = self.synth.get(&path) else {
                        continue;
                    };
                    let meta = Meta::synth(e, self.epoch);
                    let is_dir = meta.is_dir();
                    if out.found.is_none() {
                        out.found = Some(Found {
                            meta,
                            src: Src::Synth(path.clone()),
                        });
                        if !is_dir || !want_parts {
                            break;
                        }
                    } else if !is_dir {
                        break;
                    }
                    out.parts.push(Part::Synth(path));
                }
            }
        }
        if out.found.is_some() {
            out.hidden = None;
        }
        Ok(out)
    }

    /// Parts of the merged directory at `comps`.
    pub(crate) fn dir_parts(&self, comps: &[Name]) -> OpResult<Vec<Part>> {
        // Only this server changes the sandbox's layers, so a walk stays
        // true until one of its own changes: remembered walks save a few
        // opens per level per request. Not for a workspace's stack (its top
        // is shared live) nor a caller's rootfs (they may change it).
        if !self.remembers() || comps.is_empty() {
            return self.walk_parts(comps, 0, self.root_parts(), None);
        }
        let seen = self.walks.start();
        // A listing's entries and a walk down a tree share their parents:
        // start from the deepest remembered one.
        let (from, parts) = match self.walks.deepest(seen, comps) {
            Some((n, p)) if n == comps.len() => return Ok(p),
            Some((n, p)) => (n, p),
            None => (0, self.root_parts()),
        };
        let mut levels = Vec::new();
        let parts = self.walk_parts(comps, from, parts, Some(&mut levels))?;
        self.walks.remember(seen, comps, levels);
        Ok(parts)
    }

    fn remembers(&self) -> bool {
        self.fixed_base && !self.base_may_change()
    }

    /// The writable layer's directory at `comps` when a remembered walk
    /// has it (then it exists there already).
    fn cached_upper(&self, comps: &[Name]) -> Option<Arc<Dir>> {
        if !self.remembers() || comps.is_empty() {
            return None;
        }
        let (top, _) = self.top();
        match self.walks.deepest(self.walks.start(), comps)? {
            (n, parts) if n == comps.len() => parts.iter().find_map(|p| match p {
                Part::Layer(i, d) if *i == top => Some(Arc::clone(d)),
                _ => None,
            }),
            _ => None,
        }
    }

    /// Marks a change to what walks of the merged tree find (see
    /// [`crate::walks`]) under way until the guard drops.
    pub(crate) fn mutation(&self) -> Change<'_> {
        self.walks.change()
    }

    /// Walks from `parts`, those of `comps[..from]`, down to `comps`;
    /// `levels` gets each directory's parts on the way (by its depth).
    fn walk_parts(
        &self,
        comps: &[Name],
        from: usize,
        mut parts: Vec<Part>,
        mut levels: Option<&mut Vec<(usize, Vec<Part>)>>,
    ) -> OpResult<Vec<Part>> {
        for (i, c) in comps.iter().enumerate().skip(from) {
            let l = self.lookup(&parts, &comps[..i], c, true)?;
            match l.found {
                None => return Err(OpError::NotFound),
                Some(f) if !f.meta.is_dir() => return Err(OpError::NotDir),
                Some(_) => parts = l.parts,
            }
            if let Some(levels) = levels.as_deref_mut() {
                levels.push((i + 1, parts.clone()));
            }
        }
        Ok(parts)
    }

    /// Resolve the merged entry at `comps`.
    pub(crate) fn resolve(&self, comps: &[Name]) -> OpResult<Found> {
        let Some((name, dir)) = comps.split_last() else {
            return Ok(Found {
                meta: self.root_meta(),
                src: Src::Synth(String::new()),
            });
        };
        let parts = self.dir_parts(dir)?;
        self.lookup(&parts, dir, name, false)?
            .found
            .ok_or(OpError::NotFound)
    }

    /// Whether anything below the writable layer shows `name` in `dir`.
    pub(crate) fn lower_has(&self, parts: &[Part], dir: &[Name], name: &Name) -> OpResult<bool> {
        let (top, _) = self.top();
        let lower: Vec<Part> = parts
            .iter()
            .filter(|p| !matches!(p, Part::Layer(i, _) if *i == top))
            .cloned()
            .collect();
        // A whiteout in the top layer does not matter here: we ask what the
        // lower layers would show without it.
        Ok(self.lookup(&lower, dir, name, false)?.found.is_some())
    }

    /// The merged listing of a directory: (name, kind), whiteouts and
    /// filtered entries left out, upper versions shadowing lower ones.
    pub(crate) fn list(&self, parts: &[Part], dir: &[Name]) -> OpResult<Vec<(Name, FileType)>> {
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut out = Vec::new();
        for part in parts {
            match part {
                Part::Layer(idx, d) => {
                    if *idx == 0
                        && !self.base_grants(&Meta::from_stat(&rustix::fs::fstat(&**d)?), READ)
                    {
                        continue;
                    }
                    if *idx == 0 && self.host_filter && dir.is_empty() {
                        // The host root: only the allowed names exist, so
                        // they are looked at one by one instead of listing
                        // the host's whole root (which a confined server may
                        // not read).
                        for n in crate::policy::HOST_ROOT_ALLOW {
                            let Ok(name) = Name::new(std::ffi::OsStr::new(n)) else {
                                continue;
                            };
                            let Some(st) = stat_at(&**d, &name)? else {
                                continue;
                            };
                            if seen.insert(name.as_bytes().to_vec()) {
                                out.push((name, kind_of(st.st_mode)));
                            }
                        }
                        continue;
                    }
                    for entry in d.entries()? {
                        let entry = entry?;
                        let raw = entry.file_name();
                        let Ok(name) = Name::new(&raw) else {
                            continue;
                        };
                        if is_reserved(dir, &name) || !seen.insert(name.as_bytes().to_vec()) {
                            continue;
                        }
                        if self.filtered(*idx, dir, &name).is_some() {
                            continue;
                        }
                        if let Some(kind) = entry_kind(d, &entry, &name)? {
                            out.push((name, kind));
                        }
                    }
                }
                Part::Synth(p) => {
                    for (n, e) in self.synth.children(p) {
                        let Ok(name) = Name::new(std::ffi::OsStr::new(n)) else {
                            continue;
                        };
                        if !seen.insert(name.as_bytes().to_vec()) {
                            continue;
                        }
                        let kind = match e {
                            SynthEntry::Dir { .. } => FileType::Directory,
                            SynthEntry::File { .. } => FileType::RegularFile,
                        };
                        out.push((name, kind));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The writable layer's directory for merged directory `comps`, copying
    /// up the directory chain (mode, owner, times) as needed.
    pub(crate) fn upper_dir(&self, comps: &[Name]) -> OpResult<Arc<Dir>> {
        if let Some(d) = self.cached_upper(comps) {
            return Ok(d);
        }
        let mut cur = self.upper_root();
        for (i, c) in comps.iter().enumerate() {
            match open_dir(&*cur, c) {
                Ok(d) => {
                    cur = d;
                    continue;
                }
                Err(e) if e.is_absent() => {}
                Err(e) => return Err(e),
            }
            // Missing in the writable layer: copy the merged directory up.
            let found = self.resolve(&comps[..=i])?;
            if !found.meta.is_dir() {
                return Err(OpError::NotDir);
            }
            let _guard = self.copy_lock.lock();
            let _m = self.mutation();
            match rustix::fs::mkdirat(&*cur, c.as_os_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    let d = open_dir(&*cur, c)?;
                    apply_meta(&*d, &self.shown(&found))?;
                    cur = d;
                }
                Err(e) if e == rustix::io::Errno::EXIST => cur = open_dir(&*cur, c)?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(cur)
    }

    /// Make sure the entry at `comps` (resolved as `found`) exists in the
    /// writable layer. With `truncate`, regular file contents are not copied.
    pub(crate) fn copy_up(&self, comps: &[Name], found: &Found, truncate: bool) -> OpResult<()> {
        let (top, _) = self.top();
        if found.src == Src::Layer(top) {
            return Ok(());
        }
        let Some((name, dir)) = comps.split_last() else {
            return Err(OpError::Perm);
        };
        if found.meta.is_dir() {
            self.upper_dir(comps)?;
            return Ok(());
        }
        let udir = self.upper_dir(dir)?;
        let _guard = self.copy_lock.lock();
        if stat_at(&*udir, name)?.is_some_and(|st| !is_whiteout(&st)) {
            return Ok(()); // another thread won the race
        }
        let shown = self.shown(found);
        let meta = &shown;
        match (&found.src, meta.kind) {
            (Src::Synth(path), _) => {
                let content = match self.synth.get(path) {
                    Some(SynthEntry::File { content }) => content.clone(),
                    _ => return Err(OpError::NotFound),
                };
                let mut f = create_excl(&udir, name)?;
                if !truncate {
                    f.write_all(&content)?;
                }
                apply_meta(&f, meta)?;
            }
            (Src::Layer(idx), FileType::RegularFile) => {
                let parts = self.dir_parts(dir)?;
                let Some(src_dir) = parts.iter().find_map(|p| match p {
                    Part::Layer(i, d) if i == idx => Some(Arc::clone(d)),
                    _ => None,
                }) else {
                    return Err(OpError::NotFound);
                };
                if !truncate && *idx == 0 && !self.base_grants(&found.meta, READ) {
                    return Err(OpError::HostPrivate);
                }
                let mut f = create_excl(&udir, name)?;
                if !truncate {
                    let mut src = open_file(&*src_dir, name, OFlags::RDONLY | OFlags::NONBLOCK, 0)?;
                    if *idx == 0
                        && !self.base_grants(&Meta::from_stat(&rustix::fs::fstat(&src)?), READ)
                    {
                        drop(f);
                        let _ = rustix::fs::unlinkat(&*udir, name.as_os_str(), AtFlags::empty());
                        return Err(OpError::HostPrivate);
                    }
                    std::io::copy(&mut src, &mut f)?;
                }
                apply_meta(&f, meta)?;
            }
            (Src::Layer(idx), FileType::Symlink) => {
                let target = self.readlink(comps, *idx)?;
                rustix::fs::symlinkat(target.as_slice(), &*udir, name.as_os_str())?;
                chown_at(&udir, name, meta.uid, meta.gid)?;
            }
            (Src::Layer(_), FileType::NamedPipe | FileType::Socket) => {
                let ft = if meta.kind == FileType::NamedPipe {
                    RFileType::Fifo
                } else {
                    RFileType::Socket
                };
                unlink_whiteout(&udir, name)?;
                rustix::fs::mknodat(&*udir, name.as_os_str(), ft, Mode::from_raw_mode(0o600), 0)?;
                chown_at(&udir, name, meta.uid, meta.gid)?;
                let p = crate::resolve::open_path(&*udir, name)?;
                crate::sys::chmod_fd(p.as_fd(), u32::from(meta.perm))?;
            }
            _ => return Err(OpError::Perm),
        }
        Ok(())
    }

    /// Read a symlink's target from layer `idx`, verbatim.
    pub(crate) fn readlink(&self, comps: &[Name], idx: usize) -> OpResult<Vec<u8>> {
        let Some((name, dir)) = comps.split_last() else {
            return Err(OpError::Invalid);
        };
        let parts = self.dir_parts(dir)?;
        let d = parts
            .iter()
            .find_map(|p| match p {
                Part::Layer(i, d) if *i == idx => Some(Arc::clone(d)),
                _ => None,
            })
            .ok_or(OpError::NotFound)?;
        Ok(rustix::fs::readlinkat(&*d, name.as_os_str(), Vec::new())?.into_bytes())
    }

    /// The host directory of layer `idx` for merged directory `comps`.
    pub(crate) fn layer_dir(&self, comps: &[Name], idx: usize) -> OpResult<Arc<Dir>> {
        let parts = self.dir_parts(comps)?;
        parts
            .iter()
            .find_map(|p| match p {
                Part::Layer(i, d) if *i == idx => Some(Arc::clone(d)),
                _ => None,
            })
            .ok_or(OpError::NotFound)
    }
}

/// The kind of listed entry `name` of `dir`: from the listing where it
/// says, else from a stat; `None` for a whiteout or an entry gone since.
pub(crate) fn entry_kind(
    dir: &Dir,
    entry: &cap_std::fs::DirEntry,
    name: &Name,
) -> OpResult<Option<FileType>> {
    let ft = entry.file_type()?;
    Ok(Some(if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_file() {
        FileType::RegularFile
    } else {
        match stat_at(dir, name)? {
            Some(st) if !is_whiteout(&st) => kind_of(st.st_mode),
            _ => return Ok(None),
        }
    }))
}

/// Create a fresh file in the writable layer, replacing a whiteout.
fn create_excl(dir: &Dir, name: &Name) -> OpResult<File> {
    unlink_whiteout(dir, name)?;
    open_file(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        0o600,
    )
}

/// Remove a whiteout of `name` if there is one.
pub(crate) fn unlink_whiteout(dir: &Dir, name: &Name) -> OpResult<bool> {
    if let Some(st) = stat_at(dir, name)?
        && is_whiteout(&st)
    {
        rustix::fs::unlinkat(dir, name.as_os_str(), AtFlags::empty())?;
        return Ok(true);
    }
    Ok(false)
}

/// Record that `name` is deleted for everything below the writable layer.
pub(crate) fn make_whiteout(dir: &Dir, name: &Name) -> OpResult<()> {
    rustix::fs::mknodat(
        dir,
        name.as_os_str(),
        RFileType::CharacterDevice,
        Mode::empty(),
        0,
    )?;
    Ok(())
}

pub(crate) fn is_opaque(dir: &Dir) -> bool {
    let mut buf = [0u8; 4];
    matches!(
        rustix::fs::fgetxattr(dir, OPAQUE_XATTR, &mut buf[..]),
        Ok(1) if buf[0] == b'y'
    )
}

pub(crate) fn set_opaque(dir: &Dir) -> OpResult<()> {
    rustix::fs::fsetxattr(dir, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty())?;
    Ok(())
}

pub(crate) fn chown_at(dir: &Dir, name: &Name, uid: u32, gid: u32) -> OpResult<()> {
    rustix::fs::chownat(
        dir,
        name.as_os_str(),
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn to_timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(d.subsec_nanos()),
        },
        Err(_) => Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
    }
}

/// Owner, mode and times of `meta` onto an open file or directory.
fn apply_meta(fd: impl AsFd, meta: &Meta) -> OpResult<()> {
    let fd = fd.as_fd();
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(meta.uid)),
        Some(rustix::fs::Gid::from_raw(meta.gid)),
    )?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(u32::from(meta.perm)))?;
    rustix::fs::futimens(
        fd,
        &Timestamps {
            last_access: to_timespec(meta.atime),
            last_modification: to_timespec(meta.mtime),
        },
    )?;
    Ok(())
}
