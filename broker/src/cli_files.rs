//! `airlock cp`: files and directories between a sandbox and here,
//! through the files API, streamed (no file is held whole), modes kept.
//!
//! As with `docker cp`, one side is `ID:/path` in a sandbox and the other
//! a local path; a destination that is an existing directory receives the
//! source under its own name. Directories are walked with an explicit
//! stack (any depth), symlinks are copied as symlinks, and a downloaded
//! file lands under a temporary name beside its destination and is
//! renamed into place once complete (uploads are atomic on the sandbox's
//! side).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::client::RemoteClient;

/// One side of a copy.
enum Side {
    Sandbox { id: String, path: String },
    Local(PathBuf),
}

fn side(arg: &str) -> Result<Side, String> {
    if let Some((id, path)) = arg.split_once(':')
        && crate::spec::SandboxId::try_from(id).is_ok()
    {
        if !path.starts_with('/') {
            return Err(format!("{arg}: the path in a sandbox must be absolute"));
        }
        return Ok(Side::Sandbox {
            id: id.to_string(),
            path: path.to_string(),
        });
    }
    Ok(Side::Local(PathBuf::from(arg)))
}

/// The last component of a sandbox path.
fn base_name(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("root")
        .to_string()
}

/// Whether `name`, as a sandbox listed it, is one plain name: what comes
/// from a sandbox is untrusted, and a name like `..` or `a/b` would place
/// a download outside its destination.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// `path/name` in a sandbox.
fn join(path: &str, name: &str) -> String {
    format!("{}/{name}", path.trim_end_matches('/'))
}

/// Copies `src` to `dst`; the number of entries copied.
pub async fn cp(c: &RemoteClient, src: &str, dst: &str) -> Result<u64, String> {
    match (side(src)?, side(dst)?) {
        (Side::Sandbox { id, path }, Side::Local(to)) => download(c, &id, &path, &to).await,
        (Side::Local(from), Side::Sandbox { id, path }) => upload(c, &from, &id, &path).await,
        (Side::Sandbox { .. }, Side::Sandbox { .. }) => {
            Err("copy between two sandboxes through here: one side must be local".into())
        }
        (Side::Local(_), Side::Local(_)) => {
            Err("one side must be ID:/path in a sandbox (ID is the sandbox's 12-digit id)".into())
        }
    }
}

async fn download(c: &RemoteClient, id: &str, src: &str, to: &Path) -> Result<u64, String> {
    let top = c.stat_file(id, src).await.map_err(|e| e.to_string())?;
    let target = if to.is_dir() {
        to.join(base_name(src))
    } else {
        to.to_path_buf()
    };
    let mut n = 0;
    let mut stack = vec![(src.to_string(), target, top)];
    while let Some((from, to, info)) = stack.pop() {
        match info.kind.as_str() {
            "dir" => {
                match std::fs::create_dir(&to) {
                    Ok(()) => {}
                    // An existing directory is reused; a symlink (one an
                    // earlier entry made, say) is never followed.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AlreadyExists
                            && std::fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir()) => {}
                    Err(e) => return Err(format!("create {}: {e}", to.display())),
                }
                let _ = std::fs::set_permissions(&to, std::fs::Permissions::from_mode(info.mode));
                for e in c.list_files(id, &from).await.map_err(|e| e.to_string())? {
                    if !plain_name(&e.name) {
                        return Err(format!(
                            "{id}:{from} lists an entry named {:?}: not copied",
                            e.name.chars().take(100).collect::<String>()
                        ));
                    }
                    let child = to.join(&e.name);
                    stack.push((join(&from, &e.name), child, e));
                }
            }
            "file" => {
                let tmp = to.with_file_name(format!(
                    ".{}.airlock-cp-{}",
                    to.file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                    std::process::id()
                ));
                let mut f = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| format!("create {}: {e}", tmp.display()))?;
                let got = c.read_file(id, &from, &mut f).await;
                let done = match got {
                    Ok(_) => {
                        use tokio::io::AsyncWriteExt;
                        f.flush().await.map_err(|e| e.to_string()).and_then(|()| {
                            std::fs::set_permissions(
                                &tmp,
                                std::fs::Permissions::from_mode(info.mode),
                            )
                            .and_then(|()| std::fs::rename(&tmp, &to))
                            .map_err(|e| format!("{}: {e}", to.display()))
                        })
                    }
                    Err(e) => Err(format!("{id}:{from}: {e}")),
                };
                if done.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                done?;
            }
            "symlink" => {
                let target = info.target.clone().unwrap_or_default();
                let _ = std::fs::remove_file(&to);
                std::os::unix::fs::symlink(&target, &to)
                    .map_err(|e| format!("symlink {}: {e}", to.display()))?;
            }
            other => {
                eprintln!(
                    "airlock: skipped {id}:{from} (a {other}, not a file, directory or symlink)"
                );
                continue;
            }
        }
        n += 1;
    }
    Ok(n)
}

async fn upload(c: &RemoteClient, from: &Path, id: &str, dst: &str) -> Result<u64, String> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let into_dir = c.stat_file(id, dst).await.is_ok_and(|i| i.kind == "dir");
    let target = if into_dir {
        let name = from
            .file_name()
            .map_or_else(|| "root".to_string(), |n| n.to_string_lossy().into_owned());
        join(dst, &name)
    } else {
        dst.to_string()
    };
    let mut n = 0;
    let mut stack = vec![(from.to_path_buf(), target, meta)];
    while let Some((local, remote, meta)) = stack.pop() {
        let ft = meta.file_type();
        if ft.is_dir() {
            c.change_file(
                id,
                "mkdir",
                &serde_json::json!({"path": remote, "parents": true, "mode": meta.mode() & 0o7777}),
            )
            .await
            .map_err(|e| format!("{id}:{remote}: {e}"))?;
            let entries =
                std::fs::read_dir(&local).map_err(|e| format!("{}: {e}", local.display()))?;
            for e in entries {
                let e = e.map_err(|e| format!("{}: {e}", local.display()))?;
                let m = std::fs::symlink_metadata(e.path())
                    .map_err(|err| format!("{}: {err}", e.path().display()))?;
                let name = e.file_name().to_string_lossy().into_owned();
                stack.push((e.path(), join(&remote, &name), m));
            }
        } else if ft.is_file() {
            let f = tokio::fs::File::open(&local)
                .await
                .map_err(|e| format!("{}: {e}", local.display()))?;
            c.write_file(id, &remote, Some(meta.mode() & 0o7777), meta.len(), f)
                .await
                .map_err(|e| format!("{id}:{remote}: {e}"))?;
        } else if ft.is_symlink() {
            let target =
                std::fs::read_link(&local).map_err(|e| format!("{}: {e}", local.display()))?;
            c.change_file(
                id,
                "symlink",
                &serde_json::json!({"path": remote, "target": target.to_string_lossy()}),
            )
            .await
            .map_err(|e| format!("{id}:{remote}: {e}"))?;
        } else {
            eprintln!(
                "airlock: skipped {} (not a file, directory or symlink)",
                local.display()
            );
            continue;
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_told_apart_as_docker_cp_does() {
        assert!(matches!(
            side("0123456789ab:/w/x"),
            Ok(Side::Sandbox { .. })
        ));
        assert!(side("0123456789ab:w").is_err());
        assert!(matches!(side("./a:b"), Ok(Side::Local(_))));
        assert!(matches!(side("/tmp/x"), Ok(Side::Local(_))));
        assert_eq!(base_name("/workspace/out/"), "out");
        assert_eq!(base_name("/"), "root");
        assert_eq!(join("/w/", "a"), "/w/a");
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(!plain_name(bad), "{bad:?}");
        }
        assert!(plain_name("..a") && plain_name(".hidden"));
    }
}
