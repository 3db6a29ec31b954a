//! The devproxy between a client and the SIMULATED driver
//! (`support/simulator.rs`, a FUSE stand-in: no GPU here): the calls a
//! CUDA client makes first go through and work; every malformed or
//! disallowed call is refused and never reaches the simulator, which
//! records everything it receives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/simulator.rs"]
mod simulator;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use airlock_devproxy::abi::AbiSet;
use airlock_devproxy::forward::{DeviceKey, Devices, Forwarder, Served};
use airlock_devproxy::validate::Grant;
use simulator::{Received, SIM_GPU_NAME, SIM_VERSION, Simulator};

fn build(name: &str) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/support/{name}.c"));
    let st = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs");
    assert!(st.success(), "{name}.c does not build");
    out
}

/// The filter the sandbox would get for `abi`, as a file of raw records.
fn filter_file(abi: &airlock_devproxy::Abi, name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let prog: Vec<u8> = airlock_devproxy::filter::ioctl_filter(abi)
        .unwrap()
        .into_iter()
        .flat_map(|i| i.to_bytes())
        .collect();
    std::fs::write(&path, prog).unwrap();
    path
}

fn key(p: &std::path::Path) -> DeviceKey {
    let m = std::fs::metadata(p).unwrap();
    DeviceKey::File {
        dev: m.dev(),
        ino: m.ino(),
    }
}

#[test]
fn a_client_reaches_the_simulated_gpu_and_nothing_malformed_reaches_the_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = Simulator::default();
    let _session = fuser::spawn_mount(sim.clone(), tmp.path(), &fuser::Config::default()).unwrap();
    let set = AbiSet::builtin().unwrap();
    let abi = set.select(SIM_VERSION, Default::default()).unwrap().abi();
    let devices = Devices {
        ctl: Some(key(&tmp.path().join("nvidiactl"))),
        gpus: vec![key(&tmp.path().join("nvidia0"))],
        uvm: None,
    };
    let mut child = Command::new(build("driver_client"))
        .arg(tmp.path())
        .arg(filter_file(abi, "driver-filter.bpf"))
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
    let fwd = Forwarder::new(abi, Grant::default(), devices, listener);
    let served = std::thread::scope(|s| {
        let server = s.spawn(|| {
            let mut served = Vec::new();
            while served.len() < 15 {
                assert!(fwd.ready(10_000).unwrap(), "no notification: {served:?}");
                served.push(fwd.serve_one().unwrap());
            }
            served
        });
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        server.join().unwrap()
    });
    let out: HashMap<String, String> = lines
        .map(|l| l.unwrap())
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    assert!(child.wait().unwrap().success());

    // The first calls of a CUDA client work through the proxy.
    assert_eq!(
        out["version"],
        format!("rc=0 errno=0 status=1 {SIM_VERSION}")
    );
    assert!(
        out["client"].starts_with("rc=0 errno=0 status=0 0xc1d0"),
        "{}",
        out["client"]
    );
    assert_eq!(out["device"], "rc=0 errno=0 status=0");
    assert_eq!(out["subdevice"], "rc=0 errno=0 status=0");
    assert_eq!(out["name"], format!("rc=0 errno=0 status=0 {SIM_GPU_NAME}"));
    assert_eq!(out["free"], "rc=0 errno=0 status=0");
    // The hostile ones, answered the driver's way.
    let einval = format!("rc=-1 errno={} status=0", libc::EINVAL);
    assert_eq!(out["control_short"], einval);
    assert_eq!(out["control_on_gpu_node"], einval);
    assert_eq!(out["control_unknown"], "rc=0 errno=0 status=86");
    assert_eq!(out["control_wrong_params_size"], "rc=0 errno=0 status=58");
    assert_eq!(
        out["control_wild_pointer"],
        format!("rc=-1 errno={} status=0", libc::EFAULT)
    );
    assert_eq!(out["alloc_unknown_class"], "rc=0 errno=0 status=34");
    assert_eq!(out["alloc_on_gpu_node"], einval);
    assert_eq!(out["xfer"], einval);
    assert_eq!(out["i2c"], einval);

    // The simulator saw exactly the six good calls, canonical and sized.
    let got = sim.received();
    let want = [
        ("nvidiactl", 210, 72, 0),
        ("nvidiactl", 0x2B, 48, 0x41),
        ("nvidiactl", 0x2B, 48, 0x80),
        ("nvidiactl", 0x2B, 48, 0x2080),
        ("nvidiactl", 0x2A, 32, 0x2080_0110),
        ("nvidiactl", 0x29, 16, 0),
    ]
    .map(|(node, nr, size, what)| Received {
        node,
        nr,
        size,
        what,
    });
    assert_eq!(got, want);
    let refused = served
        .iter()
        .filter(|s| matches!(s, Served::Refused { .. } | Served::Fault { .. }))
        .count();
    assert_eq!(refused, 9, "{served:#?}");
}

#[test]
fn swapping_the_fd_under_a_call_never_moves_it_to_another_device() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = Simulator::default();
    let _session = fuser::spawn_mount(sim.clone(), tmp.path(), &fuser::Config::default()).unwrap();
    let set = AbiSet::builtin().unwrap();
    let abi = set.select(SIM_VERSION, Default::default()).unwrap().abi();
    let devices = Devices {
        ctl: Some(key(&tmp.path().join("nvidiactl"))),
        gpus: vec![key(&tmp.path().join("nvidia0"))],
        uvm: None,
    };
    let bin = {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("race_client");
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/race_client.c");
        let st = Command::new("cc")
            .args(["-O1", "-Wall", "-Werror", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success());
        out
    };
    const ROUNDS: usize = 2000;
    let mut child = Command::new(bin)
        .arg(tmp.path())
        .arg(ROUNDS.to_string())
        .arg(filter_file(abi, "race-filter.bpf"))
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
    let fwd = Forwarder::new(abi, Grant::default(), devices, listener);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..ROUNDS {
                assert!(fwd.ready(10_000).unwrap());
                fwd.serve_one().unwrap();
            }
        });
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    });
    let done = lines.next().unwrap().unwrap();
    eprintln!("race: {done} (performed, refused, other)");
    assert!(child.wait().unwrap().success());
    let counts: Vec<usize> = done
        .strip_prefix("done ")
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    let (performed, refused, other) = (counts[0], counts[1], counts[2]);
    assert_eq!((performed + refused, other), (ROUNDS, 0), "{done}");
    let got = sim.received();
    // Every call the simulator got came on nvidiactl, one per success.
    assert!(
        got.iter().all(|r| r.node == "nvidiactl" && r.nr == 0x2A),
        "{got:?}"
    );
    assert_eq!(got.len(), performed);
    assert!(performed > 0, "{done}");
}

#[test]
fn the_host_version_is_asked_of_the_driver() {
    use airlock_devproxy::detect::{DetectError, host_driver_version};
    let tmp = tempfile::tempdir().unwrap();
    let _session =
        fuser::spawn_mount(Simulator::default(), tmp.path(), &fuser::Config::default()).unwrap();
    assert_eq!(
        host_driver_version(&tmp.path().join("nvidiactl")).unwrap(),
        SIM_VERSION
    );
    let err = host_driver_version(std::path::Path::new("/nonexistent/nvidiactl")).unwrap_err();
    assert!(matches!(err, DetectError::NoDriver(_)));
    assert_eq!(
        err.to_string(),
        "no NVIDIA driver on this host: /nonexistent/nvidiactl does not exist"
    );
    // Not a driver: the handshake gets no driver's answer.
    let err = host_driver_version(std::path::Path::new("/dev/null")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/dev/null did not answer the version handshake"),
        "{err}"
    );
}
