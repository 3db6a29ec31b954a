//! Crafted requests straight into the request-to-operation path, for the
//! fuzz target (`fs/fuzz`) and a bounded randomized test: every byte of
//! input picks an operation and its arguments (forged inode numbers and
//! file handles, names with `/`, `..`, NUL or over 255 bytes, huge sizes,
//! offsets and flags). Each must end in a clean result or error: no panic,
//! no allocation the input sizes, and nothing outside the layers touched.
//!
//! The filesystem is served from directories of a private temporary tree
//! (a rootfs base, an upper layer, a workspace) beside an `outside`
//! directory whose contents must never change.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use fuser::{FileHandle, RenameFlags, TimeOrNow};

use crate::fuse::{AirlockFs, Caller};
use crate::{BaseSpec, DiskQuota, IdMap, MountOptions, MountSpec, Shared};

/// First host id of the fixture's map.
const BASE_ID: u32 = 300_000;

struct Fixture {
    fs: AirlockFs,
    outside: PathBuf,
    /// Inode numbers and file handles seen so far (the kernel would only
    /// send those, a forged request anything).
    seen: Mutex<(Vec<u64>, Vec<u64>)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("airlock-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["base/usr/bin", "base/etc", "upper", "ws", "outside/sub"] {
            std::fs::create_dir_all(root.join(d)).unwrap_or_default();
        }
        let _ = std::fs::write(root.join("base/etc/passwd-base"), b"base\n");
        let _ = std::fs::write(root.join("base/usr/bin/tool"), vec![7u8; 300_000]);
        let _ = std::os::unix::fs::symlink("/outside", root.join("base/escape"));
        let _ = std::fs::write(root.join("outside/canary"), b"canary");
        let _ = std::fs::write(root.join("ws/file"), b"workspace");
        let events: crate::EventSink = Arc::new(|_| {});
        let spec = MountSpec {
            base: BaseSpec::Rootfs(root.join("base")),
            upper: root.join("upper"),
            workspace: root.join("ws"),
            ids: IdMap {
                host_uid_base: BASE_ID,
                host_gid_base: BASE_ID,
                count: 65536,
            },
            base_idmapped: false,
            sandbox_uid: 1000,
            sandbox_gid: 1000,
            sandbox_user: "sandbox".into(),
            hostname: "hostile".into(),
            quota: DiskQuota {
                bytes: 64 << 20,
                inodes: 10_000,
            },
            snapshots: Some(crate::LayerChain::default()),
            workspace_usage: None,
            frozen: crate::FrozenDirs::default(),
        };
        let usage = Arc::new(crate::quota::Usage::new(
            spec.quota,
            None,
            Arc::clone(&events),
        ));
        let fs = AirlockFs::new(
            &spec,
            events,
            &MountOptions { passthrough: false },
            Arc::new(Shared::default()),
            usage,
        )
        .unwrap_or_else(|e| panic!("hostile fixture: {e}"));
        // Requests then reach the workspace's file through a frozen layer
        // (copy-up, whiteouts, merged listings) as well as the live tree.
        fs.freeze("s0")
            .unwrap_or_else(|e| panic!("hostile fixture: freeze: {e}"));
        Fixture {
            fs,
            outside: root.join("outside"),
            seen: Mutex::new((vec![1], Vec::new())),
        }
    })
}

/// Reads the input as a stream of small values.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = (v << 8) | u64::from(self.u8().unwrap_or(0));
        }
        v
    }

    fn u32(&mut self) -> u32 {
        u32::try_from(self.u64() & 0xffff_ffff).unwrap_or(0)
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.u8().unwrap_or(0))
            .min(max)
            .min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b.to_vec()
    }

    /// An inode number: a seen one, the root, or anything.
    fn ino(&mut self, seen: &[u64]) -> u64 {
        match self.u8().unwrap_or(0) % 4 {
            0 => 1,
            1 | 2 => seen
                .get(usize::from(self.u8().unwrap_or(0)) % seen.len().max(1))
                .copied()
                .unwrap_or(1),
            _ => self.u64(),
        }
    }

    /// A file handle: a seen one or anything.
    fn fh(&mut self, seen: &[u64]) -> u64 {
        if self.u8().unwrap_or(0).is_multiple_of(3) {
            return self.u64();
        }
        seen.get(usize::from(self.u8().unwrap_or(0)) % seen.len().max(1))
            .copied()
            .unwrap_or(0)
    }

    /// A name: ordinary, one of the usual traps, or raw bytes.
    fn name(&mut self) -> Vec<u8> {
        match self.u8().unwrap_or(0) % 10 {
            0 => b"..".to_vec(),
            1 => b".".to_vec(),
            2 => b"a/../../outside".to_vec(),
            3 => vec![b'x'; 256],
            4 => b"nul\0name".to_vec(),
            5 => b"workspace".to_vec(),
            6 => b"escape".to_vec(),
            7 => Vec::new(),
            _ => {
                let mut n = self.bytes(24);
                if n.is_empty() {
                    n.push(b'f');
                }
                n
            }
        }
    }

    fn time(&mut self) -> Option<TimeOrNow> {
        match self.u8().unwrap_or(0) % 4 {
            0 => None,
            1 => Some(TimeOrNow::Now),
            2 => Some(TimeOrNow::SpecificTime(std::time::UNIX_EPOCH)),
            _ => std::time::UNIX_EPOCH
                .checked_add(std::time::Duration::from_secs(self.u64() >> 20))
                .map(TimeOrNow::SpecificTime),
        }
    }
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Runs the requests `data` describes against the fixture's filesystem.
///
/// # Panics
/// When anything outside the layers changed (that is the finding).
pub(crate) fn run(data: &[u8]) {
    let fx = fixture();
    let fs = &fx.fs;
    let mut input = Input(data);
    while let Some(op) = input.u8() {
        let (inos, fhs) = {
            let g = fx
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            g.clone()
        };
        let caller = Caller {
            uid: input.u32() % 70_000,
            gid: input.u32() % 70_000,
        };
        let ino = input.ino(&inos);
        let name = input.name();
        let mut new_ino = None;
        let mut new_fh = None;
        match op % 18 {
            0 => new_ino = fs.op_lookup(ino, os(&name)),
            1 => {
                let fh = input.fh(&fhs);
                let _ = fs.op_getattr(ino, Some(FileHandle(fh)));
            }
            2 => {
                let (mode, size, fh) = (input.u32(), input.u64(), input.fh(&fhs));
                let (uid, gid) = (input.u32(), input.u32());
                let pick = input.u8().unwrap_or(0);
                let (atime, mtime) = (input.time(), input.time());
                let _ = fs.op_setattr(
                    ino,
                    (pick & 1 != 0).then_some(mode),
                    (pick & 2 != 0).then_some(uid),
                    (pick & 4 != 0).then_some(gid),
                    (pick & 8 != 0).then_some(size),
                    atime,
                    mtime,
                    (pick & 16 != 0).then_some(FileHandle(fh)),
                );
            }
            3 => new_ino = fs.op_mknod(caller, ino, os(&name), input.u32(), input.u32()),
            4 => new_ino = fs.op_mkdir(caller, ino, os(&name), input.u32(), input.u32()),
            5 => {
                let target = input.bytes(64);
                new_ino = fs.op_symlink(caller, ino, os(&name), Path::new(os(&target)));
            }
            6 => {
                let r = fs.op_create(
                    caller,
                    ino,
                    os(&name),
                    input.u32(),
                    input.u32(),
                    input.u32(),
                );
                if let Some((i, fh)) = r {
                    new_ino = Some(i);
                    new_fh = Some(fh);
                }
            }
            7 => new_fh = fs.op_open(ino, input.u32()),
            8 => {
                let (fh, off, size) = (input.fh(&fhs), input.u64(), input.u32());
                fs.op_read(fh, off, size);
            }
            9 => {
                let (fh, off) = (input.fh(&fhs), input.u64());
                let data = input.bytes(255);
                fs.op_write(fh, off, &data);
            }
            10 => fs.op_unlink(ino, os(&name), input.u8().unwrap_or(0).is_multiple_of(2)),
            11 => {
                let (to, to_name) = (input.ino(&inos), input.name());
                let flags = RenameFlags::from_bits_retain(input.u32());
                fs.op_rename(ino, os(&name), to, os(&to_name), flags);
            }
            12 => {
                let to = input.ino(&inos);
                new_ino = fs.op_link(ino, to, os(&name));
            }
            13 => new_fh = fs.op_opendir(ino),
            14 => {
                let value = input.bytes(255);
                let flags = input.u32();
                fs.op_xattr(ino, os(&name), &value, flags);
            }
            15 => {
                let fh = input.fh(&fhs);
                fs.op_release(fh);
            }
            16 => {
                let (fh, off, len, mode) = (input.fh(&fhs), input.u64(), input.u64(), input.u32());
                fs.op_fallocate(fh, off, len, mode);
            }
            _ => {
                let _ = fs.op_readlink(ino);
                let _ = fs.op_statfs(ino);
            }
        }
        let mut g = fx
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = new_ino
            && g.0.len() < 256
        {
            g.0.push(i);
        }
        if let Some(f) = new_fh
            && g.1.len() < 256
        {
            g.1.push(f);
        }
    }
    check_outside(&fx.outside);
}

/// The `outside` directory holds exactly what it was made with.
fn check_outside(outside: &Path) {
    let mut names: Vec<String> = std::fs::read_dir(outside)
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    assert_eq!(
        names,
        ["canary", "sub"],
        "something was made outside the layers"
    );
    assert_eq!(
        std::fs::read(outside.join("canary")).unwrap_or_default(),
        b"canary",
        "the canary outside the layers changed"
    );
    assert!(
        std::fs::read_dir(outside.join("sub")).is_ok_and(|mut r| r.next().is_none()),
        "something was made outside the layers"
    );
}

#[cfg(test)]
mod tests {
    /// A bounded run of random request streams (the fuzz target runs the
    /// same path unbounded). Needs root, as the server does (it switches
    /// fsuid and chowns within its id map).
    #[test]
    fn crafted_requests_end_in_clean_errors_and_touch_nothing_outside() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let len = usize::try_from(next() % 512).unwrap_or(0);
            let data: Vec<u8> = (0..len).map(|_| (next() & 0xff) as u8).collect();
            super::run(&data);
        }
        // The streams reached real work, not only early refusals.
        let seen = super::fixture()
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        assert!(seen.0.len() > 20, "inodes made: {}", seen.0.len());
        assert!(seen.1.len() > 5, "handles opened: {}", seen.1.len());
    }
}
