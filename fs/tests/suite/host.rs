use std::fs;

use airlock_fs::FsEvent;

use super::common::*;

#[test]
fn host_base_filters_etc() {
    let f = host();
    assert_eq!(errno(fs::metadata(f.m("etc/shadow"))), libc::ENOENT);
    assert!(f.events().iter().any(|e| matches!(
        e,
        FsEvent::Denied { op, path, .. } if op == "lookup" && path == "/etc/shadow"
    )));
    assert!(fs::metadata(f.m("etc/os-release")).is_ok());
    let etc: Vec<String> = fs::read_dir(f.m("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!etc.iter().any(|n| n == "shadow" || n == "gshadow"));
    assert!(etc.iter().any(|n| n == "passwd"));
    let passwd = fs::read_to_string(f.m("etc/passwd")).unwrap();
    assert_eq!(passwd.lines().count(), 3, "{passwd}");
    // top level: only the allowed host entries plus synthesized dirs
    assert!(!f.m("boot").exists());
    assert!(!f.m("work").exists());
    assert!(fs::metadata(f.m("usr/bin")).unwrap().is_dir());
    assert_eq!(
        fs::read_link(f.m("bin")).unwrap().to_str().unwrap(),
        "usr/bin"
    );
    assert!(fs::metadata(f.m("bin/sh")).is_ok());
}
