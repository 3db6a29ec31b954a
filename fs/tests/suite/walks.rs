//! The server remembers recent walks of the sandbox's own directories and
//! the kernel keeps their listings across opens: both must stay true
//! through every change that moves, removes or copies up a directory, and
//! through a restore.

use std::fs;

use super::common::*;

fn names(p: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn remembered_walks_follow_copy_up_rename_and_rmdir() {
    let f = host();
    // A base-only directory, walked (and remembered) before it is copied up.
    let lower: Vec<String> = names(&f.m("usr/share"));
    assert!(lower.iter().any(|n| n == "doc"));
    fs::write(f.m("usr/share/airlock-new"), b"n").unwrap();
    let mut want = lower.clone();
    want.push("airlock-new".into());
    want.sort();
    assert_eq!(names(&f.m("usr/share")), want);
    assert_eq!(fs::read(f.m("usr/share/airlock-new")).unwrap(), b"n");
    assert!(f.upper.join("usr/share/airlock-new").exists());

    // A directory renamed away and a new one made at its name.
    fs::create_dir_all(f.m("proj/a/b")).unwrap();
    fs::write(f.m("proj/a/b/f"), b"f").unwrap();
    assert_eq!(names(&f.m("proj/a/b")), ["f"]);
    fs::rename(f.m("proj/a"), f.m("proj/c")).unwrap();
    assert!(!f.m("proj/a").exists());
    assert_eq!(fs::read(f.m("proj/c/b/f")).unwrap(), b"f");
    fs::create_dir(f.m("proj/a")).unwrap();
    fs::write(f.m("proj/a/g"), b"g").unwrap();
    assert_eq!(names(&f.m("proj/a")), ["g"]);
    assert_eq!(names(&f.m("proj/c/b")), ["f"]);

    // Removed and made again: the new directory starts empty.
    fs::remove_dir_all(f.m("proj/c")).unwrap();
    fs::create_dir_all(f.m("proj/c/b")).unwrap();
    assert!(names(&f.m("proj/c/b")).is_empty());
    fs::write(f.m("proj/c/b/h"), b"h").unwrap();
    assert_eq!(names(&f.m("proj/c/b")), ["h"]);

    // A listing the kernel keeps sees this mount's own changes.
    assert_eq!(names(&f.m("proj")), ["a", "c"]);
    fs::write(f.m("proj/z"), b"z").unwrap();
    assert_eq!(names(&f.m("proj")), ["a", "c", "z"]);
    fs::remove_file(f.m("proj/z")).unwrap();
    assert_eq!(names(&f.m("proj")), ["a", "c"]);
}

#[test]
fn a_restore_drops_listings_of_directories_still_held() {
    let f = host();
    fs::create_dir_all(f.m("proj/sub")).unwrap();
    fs::write(f.m("proj/sub/kept"), b"k").unwrap();
    // Held open (as a shell's cwd would be) and listed: the kernel keeps
    // the inode and its listing. (Top-level names are invalidated with
    // their parent anyway; one below is what a restore must reach.)
    let held = fs::File::open(f.m("proj/sub")).unwrap();
    assert_eq!(names(&f.m("proj/sub")), ["kept"]);
    let root_before = names(&f.m(""));
    let snaps = f.mount.as_ref().unwrap().snapshots();
    let s1 = snaps.freeze("s1").unwrap();
    fs::write(f.m("proj/sub/after"), b"a").unwrap();
    fs::create_dir(f.m("new-top")).unwrap();
    assert_eq!(names(&f.m("proj/sub")), ["after", "kept"]);
    {
        use std::os::fd::AsRawFd;
        let via_fd = format!("/proc/self/fd/{}", held.as_raw_fd());
        assert_eq!(names(std::path::Path::new(&via_fd)), ["after", "kept"]);
    }
    assert!(names(&f.m("")).iter().any(|n| n == "new-top"));
    snaps.restore(&s1).unwrap();
    assert_eq!(names(&f.m("proj/sub")), ["kept"]);
    // Through the held directory itself (no new lookup refreshes it).
    use std::os::fd::AsRawFd;
    let via_fd = std::path::PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
    assert_eq!(names(&via_fd), ["kept"]);
    assert_eq!(names(&f.m("")), root_before);
    assert!(!f.m("proj/sub/after").exists());
}

#[test]
fn remembered_workspace_walks_follow_renames_removals_and_modes() {
    use std::os::unix::fs::PermissionsExt;
    let f = host();
    let w = |p: &str| f.m(&format!("workspace/{p}"));
    fs::create_dir_all(w("a/b")).unwrap();
    fs::write(w("a/b/f"), b"1").unwrap();
    fs::write(w("a/b/g"), b"2").unwrap();
    // Renamed away, made again: each name reaches its own directory.
    fs::rename(w("a"), w("c")).unwrap();
    fs::create_dir_all(w("a/b")).unwrap();
    fs::write(w("a/b/h"), b"3").unwrap();
    assert_eq!(names(&w("a/b")), ["h"]);
    assert_eq!(names(&w("c/b")), ["f", "g"]);
    assert_eq!(fs::read(f.ws.join("c/b/f")).unwrap(), b"1");
    assert_eq!(fs::read(f.ws.join("a/b/h")).unwrap(), b"3");
    // Removed and made again.
    fs::remove_dir_all(w("c")).unwrap();
    fs::create_dir_all(w("c/b")).unwrap();
    fs::write(w("c/b/new"), b"n").unwrap();
    assert!(f.ws.join("c/b/new").exists());
    // The workspace owner loses search on a directory: what is made below
    // it is refused, though its walk was remembered before.
    fs::write(w("a/b/before-chmod"), b"x").unwrap();
    fs::set_permissions(w("a"), fs::Permissions::from_mode(0o000)).unwrap();
    let err = fs::write(w("a/b/after-chmod"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    fs::set_permissions(w("a"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(w("a/b/after-chmod"), b"x").unwrap();
    assert!(f.ws.join("a/b/after-chmod").exists());
}
