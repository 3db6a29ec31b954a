//! Snapshots: freezing the live trees and restoring them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use super::common::*;

fn snaps(f: &Fixture) -> &airlock_fs::Snapshots {
    f.mount.as_ref().unwrap().snapshots()
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// What a tree looks like: (path, kind, mode, content or target).
fn shape(root: &std::path::Path) -> Vec<(String, String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let (kind, data) = if md.is_dir() {
                stack.push(p.clone());
                ("dir", Vec::new())
            } else if md.file_type().is_symlink() {
                (
                    "link",
                    fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else {
                ("file", fs::read(&p).unwrap())
            };
            out.push((rel, kind.to_string(), md.mode() & 0o7777, data));
        }
    }
    out.sort();
    out
}

fn populate(f: &Fixture, at: &str) {
    let p = |s: &str| f.m(&format!("{at}/{s}"));
    fs::create_dir_all(p("src/deep/er")).unwrap();
    fs::write(p("src/main.c"), b"int main(){}\n").unwrap();
    fs::write(p("src/deep/er/x"), b"x").unwrap();
    fs::write(p("exec.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(p("exec.sh"), fs::Permissions::from_mode(0o751)).unwrap();
    symlink("src/main.c", p("link")).unwrap();
    fs::hard_link(p("src/main.c"), p("hard")).unwrap();
    fs::write(p("doomed"), b"d").unwrap();
}

fn mutate(f: &Fixture, at: &str) {
    let p = |s: &str| f.m(&format!("{at}/{s}"));
    fs::OpenOptions::new()
        .append(true)
        .open(p("src/main.c"))
        .unwrap()
        .write_all(b"// more\n")
        .unwrap();
    fs::remove_file(p("doomed")).unwrap();
    fs::remove_dir_all(p("src/deep")).unwrap();
    fs::rename(p("exec.sh"), p("renamed.sh")).unwrap();
    fs::set_permissions(p("renamed.sh"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(p("new"), b"n").unwrap();
    fs::remove_file(p("link")).unwrap();
    symlink("elsewhere", p("link")).unwrap();
}

#[test]
fn restore_brings_back_contents_modes_links_and_deletions() {
    let f = rootfs();
    fs::create_dir(f.m("proj")).unwrap();
    populate(&f, "workspace");
    populate(&f, "proj");
    let before_ws = shape(&f.m("workspace"));
    let before_root = shape(&f.m("proj"));
    let s1 = snaps(&f).freeze("s1").unwrap();
    assert_eq!(s1.workspace, vec!["s1".to_string()]);
    // Frozen, nothing changed to the eye.
    assert_eq!(shape(&f.m("workspace")), before_ws);
    assert_eq!(shape(&f.m("proj")), before_root);
    mutate(&f, "workspace");
    mutate(&f, "proj");
    for at in ["workspace", "proj"] {
        let p = |s: &str| f.m(&format!("{at}/{s}"));
        assert!(!p("doomed").exists() && !p("src/deep").exists());
        assert_eq!(
            fs::read(p("src/main.c")).unwrap(),
            b"int main(){}\n// more\n"
        );
        assert_eq!(
            fs::read_link(p("link")).unwrap().to_str(),
            Some("elsewhere")
        );
    }
    snaps(&f).restore(&s1).unwrap();
    assert_eq!(shape(&f.m("workspace")), before_ws);
    assert_eq!(shape(&f.m("proj")), before_root);
    for at in ["workspace", "proj"] {
        let a = fs::metadata(f.m(&format!("{at}/src/main.c"))).unwrap();
        let b = fs::metadata(f.m(&format!("{at}/hard"))).unwrap();
        assert_eq!(
            (a.ino(), a.nlink()),
            (b.ino(), 2),
            "{at}: hard links are one inode"
        );
    }
    // The live trees work on after a restore.
    fs::write(f.m("workspace/after"), b"a").unwrap();
    fs::remove_file(f.m("workspace/src/main.c")).unwrap();
    assert_eq!(fs::read(f.m("workspace/hard")).unwrap(), b"int main(){}\n");
    assert!(!f.m("workspace/src/main.c").exists());
}

#[test]
fn snapshots_branch_and_layers_stay_hidden() {
    let f = rootfs();
    fs::write(f.m("workspace/v"), b"1").unwrap();
    let s1 = snaps(&f).freeze("s1").unwrap();
    fs::write(f.m("workspace/v"), b"2").unwrap();
    let s2 = snaps(&f).freeze("s2").unwrap();
    assert_eq!(s2.workspace, vec!["s1".to_string(), "s2".to_string()]);
    fs::write(f.m("workspace/v"), b"3").unwrap();
    snaps(&f).restore(&s1).unwrap();
    assert_eq!(fs::read(f.m("workspace/v")).unwrap(), b"1");
    snaps(&f).restore(&s2).unwrap();
    assert_eq!(fs::read(f.m("workspace/v")).unwrap(), b"2");
    // The layers' directory is neither listed, found nor creatable.
    assert!(!names(&f.m("workspace")).contains(&".airlock".to_string()));
    assert!(!names(&f.mnt).contains(&".airlock".to_string()));
    assert!(f.ws.join(".airlock/layers/s1").is_dir());
    for p in ["workspace/.airlock", ".airlock"] {
        assert_eq!(errno(fs::metadata(f.m(p))), libc::ENOENT, "{p}");
        assert_eq!(errno(fs::create_dir(f.m(p))), libc::EPERM, "{p}");
        assert_eq!(errno(fs::write(f.m(p), b"x")), libc::EPERM, "{p}");
    }
    assert_eq!(
        errno(fs::rename(f.m("workspace/v"), f.m("workspace/.airlock"))),
        libc::EPERM
    );
    // Layer names are checked; a taken one is refused.
    assert!(snaps(&f).freeze("../x").is_err());
    assert!(snaps(&f).freeze("s1").is_err());
    // A layer the live stack uses is never removed; others are.
    assert!(snaps(&f).remove(&s1).is_err());
    let only_s2 = airlock_fs::LayerChain {
        upper: vec!["s2".into()],
        workspace: vec!["s2".into()],
    };
    snaps(&f).restore(&s1).unwrap();
    snaps(&f).remove(&only_s2).unwrap();
    assert!(!f.ws.join(".airlock/layers/s2").exists());
    assert_eq!(fs::read(f.m("workspace/v")).unwrap(), b"1");
}

#[test]
fn a_file_open_for_writing_refuses_a_snapshot() {
    let f = rootfs();
    let mut h = fs::File::create(f.m("workspace/open")).unwrap();
    assert!(matches!(
        snaps(&f).freeze("s1"),
        Err(airlock_fs::SnapshotError::Busy)
    ));
    h.write_all(b"x").unwrap();
    drop(h);
    snaps(&f).freeze("s1").unwrap();
}

#[test]
fn frozen_layers_behave_like_a_copy_on_write_stack() {
    let f = rootfs();
    let w = |s: &str| f.m(&format!("workspace/{s}"));
    fs::create_dir_all(w("d/sub")).unwrap();
    fs::write(w("d/a"), b"a").unwrap();
    fs::write(w("d/sub/b"), b"b").unwrap();
    fs::write(w("f"), b"f").unwrap();
    let ino_f = fs::metadata(w("f")).unwrap().ino();
    snaps(&f).freeze("s1").unwrap();
    assert_eq!(
        fs::metadata(w("f")).unwrap().ino(),
        ino_f,
        "freezing keeps st_ino"
    );
    // A write copies up and keeps st_ino.
    fs::OpenOptions::new()
        .append(true)
        .open(w("f"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert_eq!(
        fs::metadata(w("f")).unwrap().ino(),
        ino_f,
        "copy-up keeps st_ino"
    );
    assert_eq!(fs::read(w("f")).unwrap(), b"f+");
    // A frozen directory cannot be renamed in one step (mv copies).
    assert_eq!(errno(fs::rename(w("d"), w("d2"))), libc::EXDEV);
    // A frozen file can.
    fs::rename(w("d/a"), w("a2")).unwrap();
    assert_eq!(names(&w("d")), vec!["sub".to_string()]);
    // Removed and made again: the old contents stay hidden.
    assert_eq!(errno(fs::remove_dir(w("d"))), libc::ENOTEMPTY);
    fs::remove_dir_all(w("d")).unwrap();
    assert!(!w("d").exists());
    fs::create_dir(w("d")).unwrap();
    assert!(names(&w("d")).is_empty());
    fs::write(w("d/sub"), b"now a file").unwrap();
    assert_eq!(fs::read(w("d/sub")).unwrap(), b"now a file");
    // Exclusive create sees frozen names.
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(w("a2"))
        ),
        libc::EEXIST
    );
    fs::hard_link(w("a2"), w("a3")).unwrap();
    assert_eq!(
        fs::metadata(w("a2")).unwrap().ino(),
        fs::metadata(w("a3")).unwrap().ino()
    );
    let mut listed = names(&f.m("workspace"));
    listed.retain(|n| n != "lost+found");
    assert_eq!(listed, vec!["a2", "a3", "d", "f"]);
}

#[test]
fn the_layers_name_is_never_the_sandboxs_to_make() {
    // Before any snapshot too: only the server makes it, as a real
    // directory (the broker walks it).
    let f = rootfs();
    fs::create_dir(f.m("workspace/d")).unwrap();
    fs::create_dir(f.m("d")).unwrap();
    fs::write(f.m("workspace/file"), b"x").unwrap();
    fs::write(f.m("file"), b"x").unwrap();
    for (src, dst) in [
        ("workspace/d", "workspace/.airlock"),
        ("d", ".airlock"),
        ("workspace/file", "workspace/.airlock"),
        ("file", ".airlock"),
    ] {
        assert_eq!(errno(fs::rename(f.m(src), f.m(dst))), libc::EPERM, "{src}");
        assert_eq!(
            errno(fs::hard_link(f.m(src), f.m(dst))),
            libc::EPERM,
            "{src}"
        );
        assert_eq!(errno(symlink("/", f.m(dst))), libc::EPERM, "{dst}");
    }
    assert!(!f.ws.join(".airlock").exists() && !f.upper.join(".airlock").exists());
    // Deeper down the name is an ordinary one.
    fs::create_dir(f.m("workspace/d/.airlock")).unwrap();
}
