//! Hard links: two names of one host file are one inode.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use super::common::*;

/// truncate(2) by path: a setattr without a file handle.
fn truncate(p: &Path, len: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::truncate(c.as_ptr(), len) };
    assert_eq!(rc, 0, "{p:?}: {}", std::io::Error::last_os_error());
}

/// The sequence from the bug report, in directory `dir` of the mount.
fn links_are_one_inode(f: &Fixture, dir: &str) {
    let p = |n: &str| f.m(&format!("{dir}/{n}"));
    fs::create_dir_all(f.m(dir)).unwrap();
    fs::write(p("g"), b"hello world").unwrap();
    fs::hard_link(p("g"), p("h")).unwrap();
    let (g, h) = (fs::metadata(p("g")).unwrap(), fs::metadata(p("h")).unwrap());
    assert_eq!(g.ino(), h.ino(), "{dir}");
    assert_eq!((g.nlink(), h.nlink()), (2, 2), "{dir}");

    // a change through one name is visible through the other at once
    truncate(&p("h"), 3);
    assert_eq!(fs::metadata(p("g")).unwrap().len(), 3, "{dir}");
    assert_eq!(fs::read(p("g")).unwrap(), b"hel", "{dir}");
    // like truncate(1): ftruncate through a handle on the other name
    fs::OpenOptions::new()
        .write(true)
        .open(p("g"))
        .unwrap()
        .set_len(2)
        .unwrap();
    assert_eq!(fs::metadata(p("h")).unwrap().len(), 2, "{dir}");
    let w = fs::OpenOptions::new().write(true).open(p("g")).unwrap();
    w.write_all_at(b"HELLO", 0).unwrap();
    drop(w);
    assert_eq!(fs::read(p("h")).unwrap(), b"HELLO", "{dir}");
    assert_eq!(fs::metadata(p("h")).unwrap().len(), 5, "{dir}");
    // through an open handle too
    let r = fs::File::open(p("h")).unwrap();
    let w = fs::OpenOptions::new().append(true).open(p("g")).unwrap();
    (&w).write_all(b"!").unwrap();
    let mut got = Vec::new();
    (&r).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"HELLO!", "{dir}");
    assert_eq!(fs::metadata(p("h")).unwrap().len(), 6, "{dir}");

    // the first name goes: the other keeps working, nlink drops
    fs::remove_file(p("g")).unwrap();
    assert!(fs::metadata(p("g")).is_err());
    assert_eq!(fs::read(p("h")).unwrap(), b"HELLO!", "{dir}");
    let h2 = fs::metadata(p("h")).unwrap();
    assert_eq!((h2.ino(), h2.nlink()), (h.ino(), 1), "{dir}");
    truncate(&p("h"), 1);
    assert_eq!(fs::read(p("h")).unwrap(), b"H", "{dir}");

    // rename keeps the inode
    fs::rename(p("h"), p("i")).unwrap();
    let i = fs::metadata(p("i")).unwrap();
    assert_eq!((i.ino(), i.nlink(), i.len()), (h.ino(), 1, 1), "{dir}");
    fs::hard_link(p("i"), p("j")).unwrap();
    fs::rename(p("i"), p("k")).unwrap();
    fs::write(p("k"), b"kk").unwrap();
    assert_eq!(fs::read(p("j")).unwrap(), b"kk", "{dir}");
    assert_eq!(fs::metadata(p("j")).unwrap().ino(), h.ino(), "{dir}");
    // renaming one name over another of the same file changes nothing
    fs::rename(p("j"), p("k")).unwrap();
    assert_eq!(fs::metadata(p("k")).unwrap().nlink(), 2, "{dir}");

    // both names gone: an open handle keeps working
    let mut o = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("k"))
        .unwrap();
    let _ = fs::remove_file(p("j"));
    fs::remove_file(p("k")).unwrap();
    o.write_all(b"zz").unwrap();
    assert_eq!(o.metadata().unwrap().nlink(), 0, "{dir}");
    let mut buf = [0u8; 2];
    o.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"zz", "{dir}");
}

#[test]
fn hard_links_in_workspace() {
    let f = rootfs();
    links_are_one_inode(&f, "workspace");
    links_are_one_inode(&f, "workspace/sub");
}

#[test]
fn hard_links_in_upper() {
    let f = rootfs();
    links_are_one_inode(&f, "tmp");
    links_are_one_inode(&f, "newdir");
    links_are_one_inode(&f, "dir/sub");
}

#[test]
fn link_of_lower_file_keeps_its_inode() {
    let f = rootfs();
    let before = fs::metadata(f.m("hello.txt")).unwrap();
    let keep = fs::File::open(f.m("hello.txt")).unwrap();
    fs::hard_link(f.m("hello.txt"), f.m("tmp/hl")).unwrap();
    let a = fs::metadata(f.m("hello.txt")).unwrap();
    let b = fs::metadata(f.m("tmp/hl")).unwrap();
    assert_eq!((a.ino(), b.ino()), (before.ino(), before.ino()));
    assert_eq!((a.nlink(), b.nlink()), (2, 2));
    assert_eq!(
        fs::metadata(f.upper.join("hello.txt")).unwrap().ino(),
        fs::metadata(f.upper.join("tmp/hl")).unwrap().ino()
    );
    truncate(&f.m("tmp/hl"), 5);
    assert_eq!(fs::metadata(f.m("hello.txt")).unwrap().len(), 5);
    assert_eq!(fs::read(f.m("hello.txt")).unwrap(), b"hello");
    drop(keep);
    // a base file copied up by a write keeps its inode too
    let sub = fs::metadata(f.m("dir/a.txt")).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(f.m("dir/a.txt"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    let after = fs::metadata(f.m("dir/a.txt")).unwrap();
    assert_eq!((after.ino(), after.len()), (sub.ino(), 2));
    fs::hard_link(f.m("dir/a.txt"), f.m("dir/a2.txt")).unwrap();
    assert_eq!(fs::metadata(f.m("dir/a2.txt")).unwrap().ino(), sub.ino());
    assert_eq!(fs::metadata(f.m("dir/a.txt")).unwrap().nlink(), 2);
}

#[test]
fn host_side_links_in_workspace_are_one_inode() {
    // Edits on the host are a caller's own directory's case (the agent's
    // workspace changes only through its sandboxes).
    let f = rootfs_callers_workspace();
    fs::write(f.ws.join("x"), b"x").unwrap();
    // The workspace owner's file, as if they had made it on the host.
    std::os::unix::fs::chown(f.ws.join("x"), Some(4242), Some(4242)).unwrap();
    fs::hard_link(f.ws.join("x"), f.ws.join("y")).unwrap();
    let x = fs::metadata(f.m("workspace/x")).unwrap();
    let y = fs::metadata(f.m("workspace/y")).unwrap();
    assert_eq!((x.ino(), x.nlink()), (y.ino(), 2));
    // the name the node was reached by is replaced behind our back: the
    // other name still reaches the file
    fs::remove_file(f.ws.join("x")).unwrap();
    fs::write(f.ws.join("x"), b"other").unwrap();
    let w = fs::OpenOptions::new()
        .write(true)
        .open(f.m("workspace/y"))
        .unwrap();
    w.write_all_at(b"Y", 0).unwrap();
    drop(w);
    assert_eq!(fs::read(f.ws.join("y")).unwrap(), b"Y");
    assert_eq!(fs::read(f.ws.join("x")).unwrap(), b"other");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let x2 = fs::metadata(f.m("workspace/x")).unwrap();
    assert_ne!(x2.ino(), x.ino());
    assert_eq!(fs::read(f.m("workspace/x")).unwrap(), b"other");
}
