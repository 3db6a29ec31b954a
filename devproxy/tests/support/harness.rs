//! What the forwarder tests share: building the C clients, the generated
//! filter as a file, starting a client and taking its listener, serving
//! its notifications.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Lines, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use airlock_devproxy::Abi;
use airlock_devproxy::forward::{Forwarder, Served};

/// Builds `tests/support/NAME.c` with `cc` into the test's temp dir.
pub fn build(name: &str, flags: &[&str]) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/support/{name}.c"));
    let st = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror"])
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs");
    assert!(st.success(), "{name}.c does not build");
    out
}

/// The filter the sandbox would get for `abi`, as a file of raw records.
pub fn filter_file(abi: &Abi, name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let prog: Vec<u8> = airlock_devproxy::filter::ioctl_filter(abi)
        .unwrap()
        .into_iter()
        .flat_map(|i| i.to_bytes())
        .collect();
    std::fs::write(&path, prog).unwrap();
    path
}

/// A started client whose listener the proxy holds.
pub struct Attached {
    pub child: Child,
    pub lines: Lines<BufReader<ChildStdout>>,
    pub listener: OwnedFd,
}

/// Starts `cmd` and takes the listener it announces (`LISTENER n`).
pub fn attach(mut cmd: Command) -> Attached {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let n: i32 = first.strip_prefix("LISTENER ").unwrap().parse().unwrap();
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let listener =
        rustix::process::pidfd_getfd(&pidfd, n, rustix::process::PidfdGetfdFlags::empty()).unwrap();
    Attached {
        child,
        lines,
        listener,
    }
}

/// Tells the client to go and serves `count` notifications.
pub fn serve(fwd: &Forwarder<'_>, child: &mut Child, count: usize) -> Vec<Served> {
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let mut served = Vec::new();
            while served.len() < count {
                assert!(fwd.ready(10_000).unwrap(), "no notification: {served:?}");
                served.push(fwd.serve_one().unwrap());
            }
            served
        });
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        server.join().unwrap()
    })
}

/// The client's `NAME rest` lines, by name.
pub fn outputs(lines: Lines<BufReader<ChildStdout>>) -> HashMap<String, String> {
    lines
        .map(|l| l.unwrap())
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect()
}
