use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};

use super::common::*;

#[test]
fn read_base_and_synth() {
    let f = rootfs();
    assert_eq!(fs::read(f.m("hello.txt")).unwrap(), b"hello from base\n");
    assert_eq!(fs::read(f.m("dir/sub/b.txt")).unwrap(), b"b");
    assert_eq!(
        fs::read_to_string(f.m("etc/hostname")).unwrap(),
        "testbox\n"
    );
    let passwd = fs::read_to_string(f.m("etc/passwd")).unwrap();
    assert!(passwd.contains("sandbox:x:1000:1000"), "{passwd}");
    assert!(!passwd.contains("hostuser"));
    assert!(
        fs::read_to_string(f.m("etc/hosts"))
            .unwrap()
            .contains("testbox")
    );
    // base root-owned files look root-owned inside the sandbox
    let md = fs::metadata(f.m("hello.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), (BASE_UID, BASE_UID));
    for d in [
        "tmp",
        "var/tmp",
        "proc",
        "dev",
        "root",
        "home",
        "run",
        "opt",
        "workspace",
    ] {
        assert!(fs::metadata(f.m(d)).unwrap().is_dir(), "{d}");
    }
    assert_eq!(
        fs::metadata(f.m("tmp")).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        fs::metadata(f.m("root")).unwrap().permissions().mode() & 0o7777,
        0o700
    );
}

#[test]
fn write_copies_up() {
    let f = rootfs();
    let mut h = fs::OpenOptions::new()
        .append(true)
        .open(f.m("hello.txt"))
        .unwrap();
    h.write_all(b"more\n").unwrap();
    drop(h);
    assert_eq!(
        fs::read(f.m("hello.txt")).unwrap(),
        b"hello from base\nmore\n"
    );
    assert_eq!(
        fs::read(f.upper.join("hello.txt")).unwrap(),
        b"hello from base\nmore\n"
    );
    assert_eq!(
        fs::read(f.base.join("hello.txt")).unwrap(),
        b"hello from base\n"
    );
    // nested: the directory chain is copied up
    fs::write(f.m("dir/sub/b.txt"), b"B").unwrap();
    assert_eq!(fs::read(f.upper.join("dir/sub/b.txt")).unwrap(), b"B");
    assert_eq!(fs::read(f.base.join("dir/sub/b.txt")).unwrap(), b"b");
    // copy-up preserves the shown owner
    let md = fs::metadata(f.upper.join("dir/sub/b.txt")).unwrap();
    assert_eq!(md.uid(), BASE_UID);
    // synthesized files copy up too
    fs::write(f.m("etc/hostname"), b"other\n").unwrap();
    assert_eq!(fs::read(f.m("etc/hostname")).unwrap(), b"other\n");
    // truncate through the mount
    fs::OpenOptions::new()
        .write(true)
        .open(f.m("dir/a.txt"))
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(fs::metadata(f.m("dir/a.txt")).unwrap().len(), 0);
    assert_eq!(fs::read(f.base.join("dir/a.txt")).unwrap(), b"a");
}

#[test]
fn unlink_whiteout_and_readdir_merge() {
    let f = rootfs();
    fs::remove_file(f.m("hello.txt")).unwrap();
    assert_eq!(errno(fs::metadata(f.m("hello.txt"))), libc::ENOENT);
    let wo = fs::symlink_metadata(f.upper.join("hello.txt")).unwrap();
    assert!(wo.file_type().is_char_device());
    assert_eq!(wo.rdev(), 0);
    assert!(f.base.join("hello.txt").exists());
    fs::write(f.m("new.txt"), b"n").unwrap();
    let names: BTreeSet<String> = fs::read_dir(f.mnt.clone())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.contains("hello.txt"));
    for n in ["new.txt", "dir", "etc", "escape", "tmp", "workspace"] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    // recreate over the whiteout
    fs::write(f.m("hello.txt"), b"again").unwrap();
    assert_eq!(fs::read(f.m("hello.txt")).unwrap(), b"again");
    // a deleted synthesized file stays deleted
    fs::remove_file(f.m("etc/hosts")).unwrap();
    assert!(!f.m("etc/hosts").exists());
    let etc: BTreeSet<String> = fs::read_dir(f.m("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(etc.contains("os-release") && etc.contains("hostname") && !etc.contains("hosts"));
}

#[test]
fn rename_across_layers() {
    let f = rootfs();
    fs::rename(f.m("dir/a.txt"), f.m("moved.txt")).unwrap();
    assert_eq!(fs::read(f.m("moved.txt")).unwrap(), b"a");
    assert!(!f.m("dir/a.txt").exists());
    assert!(f.base.join("dir/a.txt").exists());
    // directory with lower content: EXDEV, like overlayfs
    assert_eq!(errno(fs::rename(f.m("dir"), f.m("dir2"))), libc::EXDEV);
    // upper-only directories rename fine
    fs::create_dir(f.m("fresh")).unwrap();
    fs::write(f.m("fresh/x"), b"x").unwrap();
    fs::rename(f.m("fresh"), f.m("fresh2")).unwrap();
    assert_eq!(fs::read(f.m("fresh2/x")).unwrap(), b"x");
    // replace a lower file
    fs::write(f.m("tmp/t"), b"t").unwrap();
    fs::rename(f.m("tmp/t"), f.m("hello.txt")).unwrap();
    assert_eq!(fs::read(f.m("hello.txt")).unwrap(), b"t");
    // RENAME_NOREPLACE
    fs::write(f.m("tmp/u"), b"u").unwrap();
    let a = std::ffi::CString::new(f.m("tmp/u").to_str().unwrap()).unwrap();
    let b = std::ffi::CString::new(f.m("hello.txt").to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated paths
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
}

#[test]
fn mkdir_rmdir_notempty() {
    let f = rootfs();
    assert_eq!(errno(fs::remove_dir(f.m("dir"))), libc::ENOTEMPTY);
    fs::remove_file(f.m("dir/a.txt")).unwrap();
    fs::remove_file(f.m("dir/sub/b.txt")).unwrap();
    fs::remove_dir(f.m("dir/sub")).unwrap();
    fs::remove_dir(f.m("dir")).unwrap();
    assert!(!f.m("dir").exists());
    assert!(f.base.join("dir/sub/b.txt").exists());
    // recreate: opaque, lower content does not show through
    fs::create_dir(f.m("dir")).unwrap();
    assert_eq!(fs::read_dir(f.m("dir")).unwrap().count(), 0);
    fs::create_dir_all(f.m("x/y/z")).unwrap();
    assert_eq!(errno(fs::create_dir(f.m("x"))), libc::EEXIST);
    fs::remove_dir(f.m("x/y/z")).unwrap();
    assert_eq!(errno(fs::remove_dir(f.m("x"))), libc::ENOTEMPTY);
}

#[test]
fn symlinks_are_never_followed_by_the_server() {
    let f = rootfs();
    assert_eq!(
        fs::read_link(f.m("escape")).unwrap().to_str().unwrap(),
        "../../../../etc/passwd"
    );
    symlink("/etc/shadow", f.m("tmp/l")).unwrap();
    assert_eq!(
        fs::read_link(f.m("tmp/l")).unwrap().to_str().unwrap(),
        "/etc/shadow"
    );
    // The base Dir refuses to open through the symlink.
    let dir = cap_std::fs::Dir::open_ambient_dir(&f.base, cap_std::ambient_authority()).unwrap();
    assert!(dir.open("escape").is_err());
    // lchown/utimes on a symlink act on the link (copied up), not its target
    let st = fs::symlink_metadata(f.m("escape")).unwrap();
    assert!(st.file_type().is_symlink());
}

#[test]
fn large_directory_lists_completely() {
    let f = rootfs();
    fs::create_dir(f.m("big")).unwrap();
    for i in 0..5000 {
        fs::File::create(f.m(&format!("big/file-{i:05}"))).unwrap();
    }
    let n = fs::read_dir(f.m("big")).unwrap().count();
    assert_eq!(n, 5000);
}

#[test]
fn mknod_devices_denied_fifo_ok() {
    let f = rootfs();
    let p = std::ffi::CString::new(f.m("tmp/dev").to_str().unwrap()).unwrap();
    // SAFETY: valid path
    #[allow(unsafe_code)]
    let rc = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    assert!(
        f.events()
            .iter()
            .any(|e| matches!(e, airlock_fs::FsEvent::Denied { op, .. } if op == "mknod"))
    );
    let p = std::ffi::CString::new(f.m("tmp/fifo").to_str().unwrap()).unwrap();
    // SAFETY: valid path
    #[allow(unsafe_code)]
    let rc = unsafe { libc::mkfifo(p.as_ptr(), 0o644) };
    assert_eq!(rc, 0);
    assert!(
        fs::symlink_metadata(f.m("tmp/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
}

#[test]
fn chmod_chown_utimes_xattr() {
    let f = rootfs();
    fs::set_permissions(f.m("hello.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(f.m("hello.txt")).unwrap().mode() & 0o7777,
        0o600
    );
    assert_eq!(
        fs::metadata(f.base.join("hello.txt")).unwrap().mode() & 0o7777,
        0o644
    );
    std::os::unix::fs::chown(f.m("hello.txt"), Some(BASE_UID + 5), Some(BASE_UID + 6)).unwrap();
    let md = fs::metadata(f.m("hello.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), (BASE_UID + 5, BASE_UID + 6));
    assert_eq!(
        errno(std::os::unix::fs::chown(f.m("hello.txt"), Some(7), None)),
        libc::EPERM
    );
    let h = fs::File::open(f.m("dir/a.txt")).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    drop(h);
    let h = fs::OpenOptions::new()
        .write(true)
        .open(f.m("dir/a.txt"))
        .unwrap();
    h.set_modified(t).unwrap();
    drop(h);
    assert_eq!(fs::metadata(f.m("dir/a.txt")).unwrap().mtime(), 1_000_000);
    // xattrs: user.* round-trip, trusted.* denied
    let p = std::ffi::CString::new(f.m("tmp").join("x").to_str().unwrap()).unwrap();
    fs::write(f.m("tmp/x"), b"x").unwrap();
    #[allow(unsafe_code)]
    // SAFETY: valid pointers and lengths
    unsafe {
        assert_eq!(
            libc::setxattr(p.as_ptr(), c"user.k".as_ptr(), b"v1".as_ptr().cast(), 2, 0),
            0
        );
        let mut buf = [0u8; 16];
        let n = libc::getxattr(p.as_ptr(), c"user.k".as_ptr(), buf.as_mut_ptr().cast(), 16);
        assert_eq!(&buf[..usize::try_from(n).unwrap()], b"v1");
        let n = libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), 16);
        assert_eq!(&buf[..usize::try_from(n).unwrap()], b"user.k\0");
        assert_eq!(
            libc::setxattr(
                p.as_ptr(),
                c"trusted.x".as_ptr(),
                b"v".as_ptr().cast(),
                1,
                0
            ),
            -1
        );
        assert_eq!(libc::removexattr(p.as_ptr(), c"user.k".as_ptr()), 0);
    }
    assert!(
        f.events()
            .iter()
            .any(|e| matches!(e, airlock_fs::FsEvent::Denied { op, .. } if op == "setxattr"))
    );
}

#[test]
fn mmap_read_write() {
    let f = rootfs();
    let path = f.m("tmp/mm");
    fs::write(&path, vec![0u8; 8192]).unwrap();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    use std::os::fd::AsRawFd;
    #[allow(unsafe_code)]
    // SAFETY: mapping 8192 bytes of a file that is 8192 bytes long; unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts_mut(p.cast::<u8>(), 8192);
        s[..5].copy_from_slice(b"mmap!");
        s[4096..4100].copy_from_slice(b"page");
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(p, 8192), 0);
    }
    drop(file);
    let data = fs::read(f.upper.join("tmp/mm")).unwrap();
    assert_eq!(&data[..5], b"mmap!");
    assert_eq!(&data[4096..4100], b"page");
    let mut r = fs::File::open(&path).unwrap();
    r.seek(SeekFrom::Start(4096)).unwrap();
    let mut b = [0u8; 4];
    r.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"page");
}

#[test]
fn hard_links_and_o_excl() {
    let f = rootfs();
    fs::hard_link(f.m("hello.txt"), f.m("tmp/hl")).unwrap();
    assert_eq!(fs::read(f.m("tmp/hl")).unwrap(), b"hello from base\n");
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(f.m("hello.txt"))
        ),
        libc::EEXIST
    );
    let mut t = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(f.m("hello.txt"))
        .unwrap();
    t.write_all(b"x").unwrap();
    drop(t);
    assert_eq!(fs::read(f.m("hello.txt")).unwrap(), b"x");
}

#[test]
fn unmount_on_drop_and_force_unmount() {
    let mut f = rootfs();
    assert!(is_mounted(&f.mnt));
    drop(f.mount.take());
    assert!(!is_mounted(&f.mnt));
    airlock_fs::force_unmount(&f.mnt).unwrap();
    let g = rootfs();
    let m = g.mnt.clone();
    let mut g = g;
    g.mount.take().unwrap().unmount().unwrap();
    assert!(!is_mounted(&m));
    airlock_fs::force_unmount(&m.join("nope")).unwrap();
}

#[test]
fn base_entries_grant_the_sandbox_only_what_an_unprivileged_host_user_gets() {
    // This runner is host root, so the kernel lets every request through
    // and the server's own checks are what is tested here.
    let f = rootfs();
    let mine = f.base.join("mine.txt");
    fs::write(&mine, "mine").unwrap();
    fs::set_permissions(&mine, fs::Permissions::from_mode(0o600)).unwrap();
    let theirs = f.base.join("theirs.txt");
    fs::write(&theirs, "secret").unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(4321), Some(4321)).unwrap();
    let dir = f.base.join("theirdir");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("inner"), "secret").unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(&dir, Some(4321), Some(4321)).unwrap();

    // The rootfs owner's own file keeps its owner class.
    assert_eq!(fs::read_to_string(f.m("mine.txt")).unwrap(), "mine");
    assert_eq!(
        fs::metadata(f.m("mine.txt")).unwrap().mode() & 0o7777,
        0o600
    );
    // Another host user's private file: shown without read bits, and
    // neither readable nor copied up with its contents.
    assert_eq!(
        fs::metadata(f.m("theirs.txt")).unwrap().mode() & 0o7777,
        0o200
    );
    let e = fs::read(f.m("theirs.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let e = fs::OpenOptions::new()
        .append(true)
        .open(f.m("theirs.txt"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let e = fs::set_permissions(f.m("theirs.txt"), fs::Permissions::from_mode(0o644)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    // Replacing it reads nothing, so it is allowed.
    fs::write(f.m("theirs.txt"), "new").unwrap();
    assert_eq!(fs::read_to_string(f.m("theirs.txt")).unwrap(), "new");
    assert_eq!(fs::read_to_string(&theirs).unwrap(), "secret");
    // Their private directory: its name shows, its contents do not.
    assert_eq!(
        fs::metadata(f.m("theirdir")).unwrap().mode() & 0o7777,
        0o200
    );
    assert_eq!(fs::read_dir(f.m("theirdir")).unwrap().count(), 0);
    assert!(fs::read(f.m("theirdir/inner")).is_err());
    let denied = f
        .events()
        .into_iter()
        .filter(|e| matches!(e, airlock_fs::FsEvent::Denied { path, .. } if path == "/theirs.txt"))
        .count();
    assert!(denied >= 2, "{:?}", f.events());
}

#[test]
fn open_directory_listings_are_bounded_and_released() {
    let f = rootfs();
    let big = f.base.join("big");
    fs::create_dir(&big).unwrap();
    let long = "n".repeat(200);
    for i in 0..20_000 {
        fs::File::create(big.join(format!("{long}{i}"))).unwrap();
    }
    // Each open listing of this directory holds about 5 MB once read: the
    // mount's 64 MiB budget refuses the 14th at the latest, with ENOMEM.
    let mut held = Vec::new();
    let err = loop {
        let mut d = fs::read_dir(f.m("big")).unwrap();
        match d.next() {
            Some(Ok(_)) => held.push(d),
            Some(Err(e)) => break e,
            None => panic!("the listing is empty"),
        }
        assert!(held.len() < 20, "listings were never bounded");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOMEM), "{err}");
    assert!(held.len() >= 10, "refused too early: {}", held.len());
    // Closing them gives the budget back.
    drop(held);
    assert_eq!(fs::read_dir(f.m("big")).unwrap().count(), 20_000);
    assert!(f.events().iter().any(|e| matches!(
        e,
        airlock_fs::FsEvent::Denied { op, .. } if op == "opendir"
    )));
}

#[test]
fn ioctls_get_enotty() {
    let f = rootfs();
    let p = f.m("hello.txt").display().to_string();
    // FS_IOC_GETFLAGS through Python: the call fails with ENOTTY.
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import fcntl, errno\ntry:\n    fcntl.ioctl(open({p:?}), 0x80086601, bytes(8))\n    print('served')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ENOTTY");
}
