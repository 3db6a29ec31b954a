use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

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

#[test]
fn workspace_grants_only_what_its_owner_has_on_the_host() {
    // The runner is host root, so the kernel passes every request and the
    // server's own checks are what is tested. The workspace belongs to
    // 4242; files someone else left there keep their host protection.
    let f = rootfs();
    let root_secret = f.ws.join("root-secret");
    fs::write(&root_secret, "secret").unwrap();
    fs::set_permissions(&root_secret, fs::Permissions::from_mode(0o600)).unwrap();
    let root_public = f.ws.join("root-public");
    fs::write(&root_public, "public").unwrap();
    fs::set_permissions(&root_public, fs::Permissions::from_mode(0o644)).unwrap();
    let mine = f.ws.join("mine");
    fs::write(&mine, "mine").unwrap();
    std::os::unix::fs::chown(&mine, Some(4242), Some(4242)).unwrap();
    fs::set_permissions(&mine, fs::Permissions::from_mode(0o600)).unwrap();
    let sticky = f.ws.join("sticky");
    fs::create_dir(&sticky).unwrap();
    fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(sticky.join("theirs"), "t").unwrap();

    // Shown with the "other" class in every class.
    let mode = |p: &str| fs::metadata(f.m(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("workspace/root-secret"), 0o000);
    assert_eq!(mode("workspace/root-public"), 0o444);
    assert_eq!(mode("workspace/mine"), 0o600);
    let eacces = |e: std::io::Error| assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    eacces(fs::read(f.m("workspace/root-secret")).unwrap_err());
    assert_eq!(
        fs::read_to_string(f.m("workspace/root-public")).unwrap(),
        "public"
    );
    eacces(
        fs::OpenOptions::new()
            .write(true)
            .open(f.m("workspace/root-public"))
            .unwrap_err(),
    );
    eacces(
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(f.m("workspace/root-public"))
            .unwrap_err(),
    );
    // Only the owner changes a mode.
    let e = fs::set_permissions(
        f.m("workspace/root-secret"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    assert_eq!(fs::read_to_string(f.m("workspace/mine")).unwrap(), "mine");
    fs::set_permissions(f.m("workspace/mine"), fs::Permissions::from_mode(0o640)).unwrap();
    // A sticky directory of someone else's: their file stays.
    let e = fs::remove_file(f.m("workspace/sticky/theirs")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // No hard link to someone else's private file (protected_hardlinks).
    let e = fs::hard_link(f.m("workspace/root-secret"), f.m("workspace/link")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // Nothing is reached through someone else's private directory.
    let private = f.ws.join("private");
    fs::create_dir(&private).unwrap();
    fs::write(private.join("inside"), "inside").unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    eacces(fs::read(f.m("workspace/private/inside")).unwrap_err());
    // Writing to the owner's own set-uid program clears the bit, as a
    // write by the owner would on the host.
    let tool = f.ws.join("tool");
    fs::write(&tool, "v1").unwrap();
    std::os::unix::fs::chown(&tool, Some(4242), Some(4242)).unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o4755)).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(f.m("workspace/tool"))
        .unwrap()
        .write_all(b"v2")
        .unwrap();
    assert_eq!(fs::metadata(&tool).unwrap().mode() & 0o7777, 0o755);
    // What the sandbox creates is the owner's from the start.
    fs::write(f.m("workspace/made"), "m").unwrap();
    fs::create_dir(f.m("workspace/made-dir")).unwrap();
    for n in ["made", "made-dir"] {
        let md = fs::metadata(f.ws.join(n)).unwrap();
        assert_eq!((md.uid(), md.gid()), (4242, 4242), "{n}");
    }
    // A file created read-only is still open to its creator for writing
    // (open(O_CREAT|O_EXCL|O_RDWR, 0444), as git writes objects).
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut obj = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(f.m("workspace/object"))
            .unwrap();
        obj.write_all(b"blob").unwrap();
    }
    assert_eq!(fs::read_to_string(f.ws.join("object")).unwrap(), "blob");
    assert_eq!(mode("workspace/object"), 0o444);
    // Its user xattrs are as private as its contents.
    let p = std::ffi::CString::new(f.m("workspace/root-secret").to_str().unwrap()).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: valid pointers and lengths.
    let (get, list) = unsafe {
        let mut buf = [0u8; 16];
        let get = libc::getxattr(p.as_ptr(), c"user.k".as_ptr(), buf.as_mut_ptr().cast(), 16);
        let get_errno = std::io::Error::last_os_error().raw_os_error();
        let list = libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), 16);
        let list_errno = std::io::Error::last_os_error().raw_os_error();
        ((get, get_errno), (list, list_errno))
    };
    assert_eq!(get, (-1, Some(libc::EACCES)));
    assert_eq!(list, (-1, Some(libc::EACCES)));
    // Nothing changed on the host.
    assert_eq!(fs::read_to_string(&root_secret).unwrap(), "secret");
    assert_eq!(fs::read_to_string(&root_public).unwrap(), "public");
    assert!(sticky.join("theirs").exists());
    assert_eq!(fs::metadata(&root_secret).unwrap().mode() & 0o7777, 0o600);
    let denied = f
        .events()
        .into_iter()
        .filter(|e| matches!(e, airlock_fs::FsEvent::Denied { .. }))
        .count();
    assert!(denied >= 4, "{:?}", f.events());
}
