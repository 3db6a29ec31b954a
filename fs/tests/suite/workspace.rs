use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

use airlock_fs::{FsEvent, MutationOp};

use super::common::*;

#[test]
fn ownership_is_translated() {
    let f = rootfs();
    fs::write(f.ws.join("pre.txt"), b"pre").unwrap();
    let md = fs::metadata(f.m("workspace/pre.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), (BASE_UID + 1000, BASE_UID + 1000));
    let mut h = fs::File::create(f.m("workspace/new.txt")).unwrap();
    h.write_all(b"one").unwrap();
    h.write_all(b"two").unwrap();
    drop(h);
    fs::create_dir(f.m("workspace/d")).unwrap();
    std::os::unix::fs::symlink("new.txt", f.m("workspace/d/l")).unwrap();
    for p in ["new.txt", "d", "d/l"] {
        let md = fs::symlink_metadata(f.ws.join(p)).unwrap();
        assert_eq!((md.uid(), md.gid()), (4242, 4242), "{p}");
    }
    assert_eq!(fs::read(f.ws.join("new.txt")).unwrap(), b"onetwo");
    // chown to the sandbox user is a no-op, anything else EPERM
    std::os::unix::fs::chown(f.m("workspace/new.txt"), Some(BASE_UID + 1000), None).unwrap();
    assert_eq!(
        errno(std::os::unix::fs::chown(
            f.m("workspace/new.txt"),
            Some(BASE_UID),
            None
        )),
        libc::EPERM
    );
    // nothing leaks into the upper layer
    assert!(!f.upper.join("workspace").exists());
}

#[test]
fn mutation_events() {
    let f = rootfs();
    let mut h = fs::File::create(f.m("workspace/a.txt")).unwrap();
    for _ in 0..10 {
        h.write_all(b"x").unwrap();
    }
    drop(h);
    fs::rename(f.m("workspace/a.txt"), f.m("workspace/b.txt")).unwrap();
    fs::create_dir(f.m("workspace/d")).unwrap();
    fs::remove_dir(f.m("workspace/d")).unwrap();
    fs::remove_file(f.m("workspace/b.txt")).unwrap();
    // changes outside the workspace are not reported
    fs::write(f.m("tmp/x"), b"x").unwrap();
    let ev: Vec<(MutationOp, String, Option<String>)> = f
        .events()
        .into_iter()
        .filter_map(|e| match e {
            FsEvent::Mutation { op, path, to } => Some((op, path, to)),
            _ => None,
        })
        .collect();
    let writes = ev
        .iter()
        .filter(|(op, ..)| *op == MutationOp::Write)
        .count();
    assert_eq!(writes, 1, "{ev:?}");
    let want = [
        (MutationOp::Create, "/workspace/a.txt", None),
        (MutationOp::Write, "/workspace/a.txt", None),
        (
            MutationOp::Rename,
            "/workspace/a.txt",
            Some("/workspace/b.txt".to_owned()),
        ),
        (MutationOp::Mkdir, "/workspace/d", None),
        (MutationOp::Rmdir, "/workspace/d", None),
        (MutationOp::Unlink, "/workspace/b.txt", None),
    ];
    let got: Vec<(MutationOp, &str, Option<String>)> = ev
        .iter()
        .map(|(o, p, t)| (*o, p.as_str(), t.clone()))
        .collect();
    assert_eq!(got, want);
    // cross-area rename is EXDEV
    fs::write(f.m("tmp/y"), b"y").unwrap();
    assert_eq!(
        errno(fs::rename(f.m("tmp/y"), f.m("workspace/y"))),
        libc::EXDEV
    );
}
