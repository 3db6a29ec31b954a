//! File operations the API asks for, run inside the sandbox.
//!
//! A file operation is an exec whose child, once jailed exactly as a
//! command is (the sandbox's user, its capabilities, landlock, seccomp,
//! its root), runs one of these functions instead of `execve`. So every
//! path is resolved by the kernel inside the sandbox's own tree with the
//! rules the sandbox's own processes have: no host path is reachable, a
//! symlink resolves inside the sandbox, and every change goes through its
//! filesystem server, which audits it like any other.
//!
//! Data moves on the exec's pipes: a read's bytes on stdout, an upload's
//! on stdin; other answers are one JSON value on stdout. A failure is one
//! JSON object on stderr (`{"error", "kind"}`) and exit status 1.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One file operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileOp {
    /// A file's bytes from `offset`, `length` of them at most (all if
    /// `None`), on stdout.
    Read {
        /// Absolute path.
        path: String,
        /// First byte.
        offset: u64,
        /// Most bytes.
        length: Option<u64>,
    },
    /// Replaces (or makes) a file with exactly `size` bytes from stdin,
    /// atomically: written beside it and renamed over it only once all of
    /// them arrived. Its mode: `mode`, else the replaced file's, else 0644.
    Write {
        /// Absolute path.
        path: String,
        /// Bytes that must arrive.
        size: u64,
        /// Permission bits.
        mode: Option<u32>,
    },
    /// A directory's entries.
    List {
        /// Absolute path.
        path: String,
    },
    /// One entry (not following a final symlink).
    Stat {
        /// Absolute path.
        path: String,
    },
    /// Makes a directory (and its parents with `parents`).
    Mkdir {
        /// Absolute path.
        path: String,
        /// Make missing parents too; an existing directory is fine.
        parents: bool,
        /// Permission bits (0755 if `None`).
        mode: Option<u32>,
    },
    /// Removes a file, a symlink or an empty directory (any directory
    /// with `recursive`).
    Remove {
        /// Absolute path.
        path: String,
        /// Remove a directory and everything in it.
        recursive: bool,
    },
    /// Makes a symlink at `path` pointing to `target` (kept as given).
    Symlink {
        /// Absolute path of the new link.
        path: String,
        /// What it points to.
        target: String,
    },
    /// Renames `from` to `to` (replacing `to` as rename(2) does).
    Rename {
        /// Absolute path.
        from: String,
        /// Absolute path.
        to: String,
    },
}

impl FileOp {
    /// Every path the operation names.
    pub fn paths(&self) -> Vec<&str> {
        match self {
            FileOp::Read { path, .. }
            | FileOp::Write { path, .. }
            | FileOp::List { path }
            | FileOp::Stat { path }
            | FileOp::Mkdir { path, .. }
            | FileOp::Remove { path, .. }
            | FileOp::Symlink { path, .. } => vec![path],
            FileOp::Rename { from, to } => vec![from, to],
        }
    }

    /// Whether it changes the tree.
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            FileOp::Read { .. } | FileOp::List { .. } | FileOp::Stat { .. }
        )
    }
}

/// One directory entry or stat answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Its name (the last component).
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Bytes.
    pub size: u64,
    /// Permission bits (with set-id and sticky).
    pub mode: u32,
    /// Modification time, unix ms.
    pub mtime_ms: i64,
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
}

/// A failure, as written on stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileError {
    /// What went wrong, naming the path.
    pub error: String,
    /// `not_found`, `forbidden`, `exists`, `is_directory`,
    /// `not_directory`, `not_empty`, `no_space`, `invalid`,
    /// `incomplete` or `io`.
    pub kind: String,
}

fn kind_of(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "not_found",
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => "forbidden",
        Some(libc::EEXIST) => "exists",
        Some(libc::EISDIR) => "is_directory",
        Some(libc::ENOTDIR | libc::ELOOP) => "not_directory",
        Some(libc::ENOTEMPTY) => "not_empty",
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => "no_space",
        Some(libc::EINVAL | libc::ENAMETOOLONG | libc::EXDEV | libc::EBUSY) => "invalid",
        _ => "io",
    }
}

fn fail(what: &str, path: &str, e: &io::Error) -> FileError {
    FileError {
        error: format!("{what} {path}: {e}"),
        kind: kind_of(e).to_string(),
    }
}

/// Runs `op` with stdio on fds 0-2; returns the exit status.
pub fn run(op: &FileOp) -> i32 {
    let result = match op {
        FileOp::Read {
            path,
            offset,
            length,
        } => read(path, *offset, *length),
        FileOp::Write { path, size, mode } => write(path, *size, *mode).and_then(|()| stat(path)),
        FileOp::List { path } => list(path),
        FileOp::Stat { path } => stat(path),
        FileOp::Mkdir {
            path,
            parents,
            mode,
        } => mkdir(path, *parents, mode.unwrap_or(0o755)).and_then(|()| stat(path)),
        FileOp::Remove { path, recursive } => remove(path, *recursive).map(|()| {
            println!("{}", serde_json::json!({ "removed": path }));
        }),
        FileOp::Symlink { path, target } => std::os::unix::fs::symlink(target, path)
            .map_err(|e| fail("symlink", path, &e))
            .and_then(|()| stat(path)),
        FileOp::Rename { from, to } => fs::rename(from, to)
            .map_err(|e| fail("rename", &format!("{from} to {to}"), &e))
            .and_then(|()| stat(to)),
    };
    let _ = io::stdout().flush();
    match result {
        Ok(()) => 0,
        Err(e) => {
            if let Ok(j) = serde_json::to_string(&e) {
                let _ = writeln!(io::stderr(), "{j}");
            }
            1
        }
    }
}

fn read(path: &str, offset: u64, length: Option<u64>) -> Result<(), FileError> {
    // Non-blocking, so a FIFO or a device put in a file's place cannot hold
    // the read open forever; only a regular file is read.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| fail("open", path, &e))?;
    let meta = f.metadata().map_err(|e| fail("stat", path, &e))?;
    if meta.is_dir() {
        return Err(FileError {
            error: format!("{path} is a directory (list it instead)"),
            kind: "is_directory".into(),
        });
    }
    if !meta.is_file() {
        return Err(FileError {
            error: format!("{path} is not a regular file"),
            kind: "invalid".into(),
        });
    }
    let mut f = io::BufReader::with_capacity(256 * 1024, f);
    if offset > 0 {
        io::copy(&mut (&mut f).take(offset), &mut io::sink())
            .map_err(|e| fail("read", path, &e))?;
    }
    let mut out = io::stdout().lock();
    let copied = match length {
        Some(n) => io::copy(&mut f.take(n), &mut out),
        None => io::copy(&mut f, &mut out),
    };
    copied.map(drop).map_err(|e| fail("read", path, &e))
}

/// The temporary name an upload to `path` is written under.
fn temp_beside(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy();
    let tmp = format!(".{}.airlock-upload-{}", name, std::process::id());
    // A name too long for the directory falls back to a short one.
    let tmp = if tmp.len() > 255 {
        format!(".airlock-upload-{}", std::process::id())
    } else {
        tmp
    };
    Some(path.with_file_name(tmp))
}

fn write(path: &str, size: u64, mode: Option<u32>) -> Result<(), FileError> {
    let p = Path::new(path);
    let existing = fs::metadata(p).ok();
    if existing.as_ref().is_some_and(fs::Metadata::is_dir) {
        return Err(FileError {
            error: format!("{path} is a directory"),
            kind: "is_directory".into(),
        });
    }
    let mode = mode
        .or_else(|| existing.as_ref().map(|m| m.permissions().mode() & 0o7777))
        .unwrap_or(0o644);
    let tmp = temp_beside(p).ok_or_else(|| FileError {
        error: format!("{path} names no file"),
        kind: "invalid".into(),
    })?;
    let tmp_s = tmp.to_string_lossy().into_owned();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| fail("create", &tmp_s, &e))?;
    let tmp_path = tmp.clone();
    let done = (move || {
        let mut input = io::stdin().lock();
        let got =
            io::copy(&mut (&mut input).take(size), &mut f).map_err(|e| fail("write", path, &e))?;
        // One byte more than announced is as wrong as one fewer.
        let extra = input.read(&mut [0u8; 1]).unwrap_or(0);
        if got != size || extra != 0 {
            return Err(FileError {
                error: format!(
                    "upload to {path} ended after {} of {size} bytes; the file is unchanged",
                    got + extra as u64
                ),
                kind: "incomplete".into(),
            });
        }
        // The mode asked for, whatever the umask took.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| fail("chmod", path, &e))?;
        f.sync_all().map_err(|e| fail("sync", path, &e))?;
        // Closed before the rename, so the write is reported under the
        // temporary name's life, not after it became the file.
        drop(f);
        fs::rename(&tmp_path, p).map_err(|e| fail("replace", path, &e))
    })();
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done
}

fn info(name: String, meta: &fs::Metadata, target: Option<String>) -> FileInfo {
    let ft = meta.file_type();
    FileInfo {
        name,
        kind: if ft.is_file() {
            "file"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else {
            "other"
        }
        .into(),
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime_ms: meta
            .mtime()
            .saturating_mul(1000)
            .saturating_add(meta.mtime_nsec() / 1_000_000),
        target,
    }
}

fn stat(path: &str) -> Result<(), FileError> {
    let meta = fs::symlink_metadata(path).map_err(|e| fail("stat", path, &e))?;
    let target = meta
        .file_type()
        .is_symlink()
        .then(|| fs::read_link(path).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    let name = Path::new(path)
        .file_name()
        .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
    println!(
        "{}",
        serde_json::to_string(&info(name, &meta, target)).unwrap_or_default()
    );
    Ok(())
}

fn list(path: &str) -> Result<(), FileError> {
    let entries = fs::read_dir(path).map_err(|e| fail("list", path, &e))?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    let _ = out.write_all(b"[");
    let mut first = true;
    for e in entries {
        let e = e.map_err(|e| fail("list", path, &e))?;
        let Ok(meta) = e.metadata() else { continue };
        let target = meta
            .file_type()
            .is_symlink()
            .then(|| fs::read_link(e.path()).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned());
        let i = info(e.file_name().to_string_lossy().into_owned(), &meta, target);
        if !first {
            let _ = out.write_all(b",");
        }
        first = false;
        let _ = serde_json::to_writer(&mut out, &i);
    }
    let _ = out.write_all(b"]\n");
    out.flush().map_err(|e| fail("list", path, &e))
}

fn mkdir(path: &str, parents: bool, mode: u32) -> Result<(), FileError> {
    let mut b = fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut b, mode);
    b.recursive(parents)
        .create(path)
        .map_err(|e| fail("mkdir", path, &e))
}

fn remove(path: &str, recursive: bool) -> Result<(), FileError> {
    let meta = fs::symlink_metadata(path).map_err(|e| fail("remove", path, &e))?;
    let r = if !meta.is_dir() {
        fs::remove_file(path)
    } else if recursive {
        fs::remove_dir_all(path)
    } else {
        fs::remove_dir(path)
    };
    r.map_err(|e| fail("remove", path, &e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ops_round_trip_as_json_and_name_their_paths() {
        let op = FileOp::Rename {
            from: "/a".into(),
            to: "/b".into(),
        };
        let j = serde_json::to_string(&op).unwrap();
        assert_eq!(j, r#"{"op":"rename","from":"/a","to":"/b"}"#);
        assert_eq!(serde_json::from_str::<FileOp>(&j).unwrap(), op);
        assert_eq!(op.paths(), ["/a", "/b"]);
        assert!(op.mutates());
        assert!(!FileOp::Stat { path: "/".into() }.mutates());
    }

    #[test]
    fn upload_temp_names_stay_in_the_directory_and_within_name_limits() {
        let t = temp_beside(Path::new("/w/x.txt")).unwrap();
        assert_eq!(t.parent().unwrap(), Path::new("/w"));
        let long = format!("/w/{}", "n".repeat(255));
        let t = temp_beside(Path::new(&long)).unwrap();
        assert!(t.file_name().unwrap().len() <= 255);
        assert!(temp_beside(Path::new("/")).is_none());
    }
}
