//! FUSE passthrough of read-only base files (Linux >= 6.9, run as root).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use airlock_fs::{MountOptions, MountStats};

use super::common::*;

const BIG: usize = 2 * 1024 * 1024;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn stats(f: &Fixture) -> MountStats {
    f.mount.as_ref().unwrap().stats()
}

/// RELEASE is sent asynchronously after close(2): wait for the backing ids
/// to be closed.
fn wait_backing_closed(f: &Fixture) -> MountStats {
    let start = Instant::now();
    loop {
        let s = stats(f);
        if s.live_backing_ids == 0 || start.elapsed() > Duration::from_secs(5) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Map `len` bytes of `file` read-only and copy them out.
fn mmap_read(file: &fs::File, len: usize) -> Vec<u8> {
    #[allow(unsafe_code)]
    // SAFETY: a private read-only mapping of `len` bytes of a file at least
    // that long, copied out and unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let v = std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec();
        assert_eq!(libc::munmap(p, len), 0);
        v
    }
}

#[test]
fn base_reads_and_mmap_bypass_the_server() {
    let f = rootfs();
    let data = pattern(BIG, 7);
    fs::write(f.base.join("big.bin"), &data).unwrap();
    let mount = f.mount.as_ref().unwrap();
    assert!(
        mount.passthrough_enabled(),
        "this kernel supports FUSE passthrough"
    );

    let before = stats(&f);
    assert_eq!(fs::read(f.m("big.bin")).unwrap(), data);
    let file = fs::File::open(f.m("big.bin")).unwrap();
    assert_eq!(mmap_read(&file, BIG), data);
    let mut buf = [0u8; 16];
    let mut g = &file;
    g.seek(SeekFrom::Start(BIG as u64 - 16)).unwrap();
    g.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &data[BIG - 16..]);
    // fstat keeps showing the base file's size and mapped owner.
    let md = file.metadata().unwrap();
    assert_eq!(md.len(), BIG as u64);
    assert_eq!(md.uid(), BASE_UID);
    let during = stats(&f);
    assert_eq!(during.live_backing_ids, 1, "one backing id per open inode");
    drop(file);

    let after = wait_backing_closed(&f);
    assert_eq!(
        after.read_requests, before.read_requests,
        "passthrough reads never reach the server"
    );
    assert!(after.passthrough_opens >= before.passthrough_opens + 2);
    assert_eq!(after.live_backing_ids, 0);

    // Small files and synthesized files still read right.
    assert_eq!(
        fs::read_to_string(f.m("hello.txt")).unwrap(),
        "hello from base\n"
    );
    assert!(
        fs::read_to_string(f.m("etc/hostname"))
            .unwrap()
            .contains("testbox")
    );
}

#[test]
fn without_passthrough_reads_come_to_the_server() {
    let mut opts = MountOptions::default();
    opts.passthrough = false;
    let f = rootfs_opts(&opts);
    let data = pattern(BIG, 9);
    fs::write(f.base.join("big.bin"), &data).unwrap();
    assert!(!f.mount.as_ref().unwrap().passthrough_enabled());
    assert_eq!(fs::read(f.m("big.bin")).unwrap(), data);
    let file = fs::File::open(f.m("big.bin")).unwrap();
    assert_eq!(mmap_read(&file, BIG), data);
    let s = stats(&f);
    assert!(s.read_requests > 0);
    assert_eq!(s.passthrough_opens, 0);
    assert_eq!(s.live_backing_ids, 0);
}

#[test]
fn copy_up_while_open_read_only() {
    let f = rootfs();
    let old = pattern(64 * 1024, 1);
    fs::write(f.base.join("lib.so"), &old).unwrap();
    // A reader (and a mapping) of the base file, in passthrough mode.
    let reader = fs::File::open(f.m("lib.so")).unwrap();
    let ino_before = reader.metadata().unwrap().ino();
    assert_eq!(stats(&f).live_backing_ids, 1);
    let mapped = mmap_read(&reader, old.len());
    assert_eq!(mapped, old);

    // Opening it for writing copies it up; the kernel could not mix that
    // handle with the passthrough one on one inode, so the name moves to a
    // new inode and the write goes to the upper copy.
    let mut w = fs::OpenOptions::new()
        .append(true)
        .open(f.m("lib.so"))
        .unwrap();
    w.write_all(b"appended").unwrap();
    drop(w);
    let mut new = old.clone();
    new.extend_from_slice(b"appended");
    assert_eq!(fs::read(f.upper.join("lib.so")).unwrap(), new);
    assert_eq!(fs::read(f.base.join("lib.so")).unwrap(), old);
    assert_eq!(fs::read(f.m("lib.so")).unwrap(), new);
    assert_ne!(fs::metadata(f.m("lib.so")).unwrap().ino(), ino_before);

    // As documented: the read-only fd opened before the copy-up keeps
    // reading the lower copy; fstat on it still works.
    let mut got = Vec::new();
    (&reader).seek(SeekFrom::Start(0)).unwrap();
    (&reader).read_to_end(&mut got).unwrap();
    assert_eq!(got, old);
    assert_eq!(reader.metadata().unwrap().len(), old.len() as u64);
    assert_eq!(mmap_read(&reader, old.len()), old);

    // A metadata-only copy-up (chmod) while a passthrough fd is open: new
    // read-only opens see the upper copy.
    fs::write(f.base.join("other"), b"base other").unwrap();
    let r2 = fs::File::open(f.m("other")).unwrap();
    fs::set_permissions(
        f.m("other"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    fs::write(f.upper.join("other"), b"changed on the upper side").unwrap();
    assert_eq!(
        fs::read(f.m("other")).unwrap(),
        b"changed on the upper side"
    );
    let mut got = String::new();
    (&r2).read_to_string(&mut got).unwrap();
    assert_eq!(got, "base other");

    // O_TRUNC over a base file held open for passthrough.
    fs::write(f.base.join("third"), b"base third").unwrap();
    let r3 = fs::File::open(f.m("third")).unwrap();
    fs::write(f.m("third"), b"new").unwrap();
    assert_eq!(fs::read(f.m("third")).unwrap(), b"new");
    assert_eq!(fs::read(f.upper.join("third")).unwrap(), b"new");
    let mut got = String::new();
    (&r3).read_to_string(&mut got).unwrap();
    assert_eq!(got, "base third");

    drop(reader);
    drop(r2);
    drop(r3);
    assert_eq!(wait_backing_closed(&f).live_backing_ids, 0);
}

#[test]
fn many_opens_release_their_backing_ids() {
    let f = rootfs();
    let data = pattern(4096, 3);
    fs::write(f.base.join("a.bin"), &data).unwrap();
    fs::write(f.base.join("b.bin"), &data).unwrap();
    // Two files open at once, one inode shared by concurrent handles.
    let keep = fs::File::open(f.m("b.bin")).unwrap();
    for i in 0..10_000 {
        let mut file = fs::File::open(f.m("a.bin")).unwrap();
        let mut b = [0u8; 8];
        file.read_exact(&mut b).unwrap();
        assert_eq!(&b, &data[..8], "iteration {i}");
        let again = fs::File::open(f.m("b.bin")).unwrap();
        drop(again);
    }
    let s = stats(&f);
    assert!(s.passthrough_opens >= 20_000, "{s:?}");
    assert!(s.live_backing_ids <= 3, "{s:?}");
    drop(keep);
    let s = wait_backing_closed(&f);
    assert_eq!(s.live_backing_ids, 0, "{s:?}");
    assert_eq!(s.read_requests, 0, "{s:?}");
}

#[test]
fn writable_and_upper_files_are_not_passthrough() {
    let f = rootfs();
    fs::write(f.m("tmp/up.txt"), b"upper").unwrap();
    fs::write(f.m("workspace/ws.txt"), b"ws").unwrap();
    let before = stats(&f);
    assert_eq!(fs::read(f.m("tmp/up.txt")).unwrap(), b"upper");
    assert_eq!(fs::read(f.m("workspace/ws.txt")).unwrap(), b"ws");
    // Read-write open of a base file: copied up, served by the server.
    let mut rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.m("dir/a.txt"))
        .unwrap();
    let mut s = String::new();
    rw.read_to_string(&mut s).unwrap();
    assert_eq!(s, "a");
    // A read-only open of that inode while it is open for writing.
    assert_eq!(fs::read(f.m("dir/a.txt")).unwrap(), b"a");
    drop(rw);
    let after = stats(&f);
    assert_eq!(after.passthrough_opens, before.passthrough_opens);
    assert!(after.read_requests > before.read_requests);
}

/// Not a check: time a cold mount reading a 2 MB base file, with and
/// without passthrough (`cargo test -p airlock-fs -- --ignored --nocapture
/// cold_read_timing`).
#[test]
#[ignore = "timing, run by hand"]
fn cold_read_timing() {
    let data = pattern(BIG, 5);
    time_fresh_mounts("per cold 2 MB read", |opts| {
        let f = rootfs_opts(opts);
        fs::write(f.base.join("big.bin"), &data).unwrap();
        // Warm the host page cache: only the FUSE side is cold.
        fs::read(f.base.join("big.bin")).unwrap();
        let t = Instant::now();
        let got = fs::read(f.m("big.bin")).unwrap();
        let took = t.elapsed();
        assert_eq!(got.len(), BIG);
        took
    });
    // The sandbox start-up case: the first exec on a fresh mount pulls the
    // program, ld.so and libc through it.
    time_fresh_mounts("per first exec of sh", |opts| {
        let f = host_opts(opts);
        let t = Instant::now();
        let st = std::process::Command::new("chroot")
            .arg(&f.mnt)
            .args(["/bin/sh", "-c", ":"])
            .status()
            .unwrap();
        let took = t.elapsed();
        assert!(st.success());
        took
    });
}

/// Prints the mean of `once` over 30 fresh mounts, alternating without and
/// with passthrough twice.
fn time_fresh_mounts(what: &str, once: impl Fn(&MountOptions) -> Duration) {
    for pass in [false, true, false, true] {
        let mut opts = MountOptions::default();
        opts.passthrough = pass;
        let n = 30;
        let total: Duration = (0..n).map(|_| once(&opts)).sum();
        println!("passthrough={pass}: {:?} {what}", total / n);
    }
}

#[test]
fn exec_from_host_base_uses_passthrough() {
    let f = host();
    assert!(f.mount.as_ref().unwrap().passthrough_enabled());
    let before = stats(&f);
    // The dynamic loader, libc and the program itself come through the
    // mount; their reads and mappings must not reach the server.
    let out = std::process::Command::new("chroot")
        .arg(&f.mnt)
        .args(["/bin/sh", "-c", "echo ok"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"ok\n");
    let after = wait_backing_closed(&f);
    assert!(
        after.passthrough_opens >= before.passthrough_opens + 2,
        "{after:?}"
    );
    assert_eq!(after.read_requests, before.read_requests, "{after:?}");
    assert_eq!(after.live_backing_ids, 0, "{after:?}");
    assert_eq!(
        fs::read(f.m("usr/bin/env")).unwrap(),
        fs::read("/usr/bin/env").unwrap()
    );
}
