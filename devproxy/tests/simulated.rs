//! The devproxy between a client and the SIMULATED driver
//! (`support/simulator.rs`, a FUSE stand-in: no GPU here): the calls a
//! CUDA client makes first go through and work; every malformed or
//! disallowed call is refused and never reaches the simulator, which
//! records everything it receives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/simulator.rs"]
mod simulator;

#[path = "support/harness.rs"]
mod harness;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use airlock_devproxy::abi::AbiSet;
use airlock_devproxy::forward::{DeviceKey, Devices, Forwarder, Served};
use airlock_devproxy::validate::Grant;
use simulator::{Received, SIM_BUILD, SIM_CLASSES, SIM_GPU_NAME, SIM_VERSION, Simulator};

/// The simulator mounted in a temp dir, and the devices it stands for.
fn simulated() -> (
    tempfile::TempDir,
    Simulator,
    fuser::BackgroundSession,
    Devices,
) {
    let tmp = tempfile::tempdir().unwrap();
    let sim = Simulator::default();
    let session = fuser::spawn_mount(sim.clone(), tmp.path(), &fuser::Config::default()).unwrap();
    let devices = Devices {
        ctl: Some(key(&tmp.path().join("nvidiactl"))),
        gpus: vec![key(&tmp.path().join("nvidia0"))],
        uvm: None,
    };
    (tmp, sim, session, devices)
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
    let (tmp, sim, _session, devices) = simulated();
    let set = AbiSet::builtin().unwrap();
    let abi = set.select(SIM_VERSION, Default::default()).unwrap().abi();
    let mut cmd = Command::new(harness::build("driver_client", &[]));
    cmd.arg(tmp.path())
        .arg(harness::filter_file(abi, "driver-filter.bpf"));
    let mut c = harness::attach(cmd);
    // The host has three GPUs; the sandbox is granted the third and the
    // first, in that order.
    let grant = Grant {
        gpu_ids: vec![0x300, 0x100],
    };
    let fwd = Forwarder::new(abi, grant, devices, c.listener);
    let served = harness::serve(&fwd, &mut c.child, 22);
    let out = harness::outputs(c.lines);
    assert!(c.child.wait().unwrap().success());

    // Only the granted GPUs show, numbered as the sandbox's nodes.
    assert_eq!(out["cards"], "rc=0 errno=0 status=0 0x300:0,0x100:1");
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
    // GPU enumeration shows the granted GPUs only; another is not named.
    assert_eq!(out["attached"], "rc=0 errno=0 status=0 0x100,0x300");
    assert_eq!(out["pci_granted"], "rc=0 errno=0 status=0");
    assert_eq!(out["pci_not_granted"], "rc=0 errno=0 status=31");
    // Device instances: 2 and 0 are the granted GPUs' (0x300, 0x100).
    assert_eq!(out["device_ids"], "rc=0 errno=0 status=0 0x5");
    assert_eq!(out["device_not_granted"], "rc=0 errno=0 status=31");
    // From a thread that is not its process's leader, too.
    assert_eq!(
        out["thread_version"],
        format!("rc=0 errno=0 status=1 {SIM_VERSION}")
    );
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

    // The simulator saw exactly the eight good calls, canonical and sized.
    let got = sim.received();
    let want = [
        ("nvidiactl", 210, 72, 0),
        ("nvidiactl", 200, 8 * 72, 0),
        ("nvidiactl", 0x2B, 48, 0x41),
        ("nvidiactl", 0x2A, 32, 0x205),
        ("nvidiactl", 0x2A, 32, 0x205),
        ("nvidiactl", 0x2B, 48, 0x80),
        ("nvidiactl", 0x2B, 48, 0x2080),
        ("nvidiactl", 0x2A, 32, 0x2080_0110),
        ("nvidiactl", 0x2A, 32, 0x201),
        ("nvidiactl", 0x2A, 32, 0x204),
        ("nvidiactl", 0x2A, 32, 0x21B),
        ("nvidiactl", 210, 72, 0),
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
    assert_eq!(refused, 11, "{served:#?}");
}

#[test]
fn embedded_pointers_and_fds_reach_the_driver_only_as_the_proxys_own() {
    let (tmp, sim, _session, devices) = simulated();
    let set = AbiSet::builtin().unwrap();
    let abi = set.select(SIM_VERSION, Default::default()).unwrap().abi();
    let mut cmd = Command::new(harness::build("embedded_client", &[]));
    cmd.arg(tmp.path())
        .arg(harness::filter_file(abi, "embedded-filter.bpf"));
    let mut c = harness::attach(cmd);
    let grant = Grant {
        gpu_ids: vec![0x100],
    };
    let fwd = Forwarder::new(abi, grant, devices, c.listener);
    let served = harness::serve(&fwd, &mut c.child, 14);
    let out = harness::outputs(c.lines);
    assert!(c.child.wait().unwrap().success());

    assert_eq!(out["device"], "rc=0 errno=0 status=0");
    // The class list: its length through a NULL list, then the list,
    // copied through a buffer of the proxy's and back.
    assert_eq!(
        out["classes_count"],
        format!("rc=0 errno=0 status=0 {}", SIM_CLASSES.len())
    );
    let listed: Vec<String> = SIM_CLASSES.iter().map(|c| format!("{c:#x}")).collect();
    assert_eq!(
        out["classes"],
        format!("rc=0 errno=0 status=0 {}", listed.join(","))
    );
    assert_eq!(out["list_kept"], "1");
    // Three strings, each through its own buffer.
    assert_eq!(
        out["build"],
        format!("rc=0 errno=0 status=0 {SIM_BUILD}|{SIM_BUILD}|{SIM_BUILD}|142")
    );
    // The fd in the params reached the driver as one of the proxy's, a
    // control node (the simulator resolves it in the caller's table), and
    // went back to the sandbox as its own number.
    assert_eq!(out["export"], "rc=0 errno=0 status=0 1");
    // An OS event's fd, the same way; another client's event is refused.
    assert_eq!(out["event"], "rc=0 errno=0 status=0 1");
    assert_eq!(out["event_other_client"], "rc=0 errno=0 status=31");
    // A count past the driver's 1 MiB bound, an unmapped list, an fd that
    // is no nvidia node, one that is not open, register ops.
    assert_eq!(out["classes_huge"], "rc=0 errno=0 status=31");
    assert_eq!(
        out["classes_wild"],
        format!("rc=-1 errno={} status=0", libc::EFAULT)
    );
    let einval = format!("rc=-1 errno={} status=0", libc::EINVAL);
    assert_eq!(out["export_not_device"], einval);
    assert_eq!(out["export_bad_fd"], einval);
    assert_eq!(out["event_not_device"], einval);
    assert_eq!(out["reg_ops"], "rc=0 errno=0 status=86");

    // The driver never saw a sandbox address: every embedded pointer it
    // dereferenced was the proxy's (four: one list, three strings).
    let sandbox_list = u64::from_str_radix(out["list_addr"].trim_start_matches("0x"), 16).unwrap();
    let seen = sim.embedded();
    assert_eq!(seen.len(), 4, "{seen:x?}");
    assert!(!seen.contains(&sandbox_list), "{seen:x?}");
    // And only the good calls reached it.
    let what: Vec<u32> = sim
        .received()
        .iter()
        .filter(|r| r.nr == 0x2A)
        .map(|r| r.what)
        .collect();
    assert_eq!(
        what,
        [0x205, 0x80_0201, 0x80_0201, 0x101, 0x3D05],
        "{served:#?}"
    );
}

#[test]
fn swapping_the_fd_under_a_call_never_moves_it_to_another_device() {
    let (tmp, sim, _session, devices) = simulated();
    let set = AbiSet::builtin().unwrap();
    let abi = set.select(SIM_VERSION, Default::default()).unwrap().abi();
    const ROUNDS: usize = 2000;
    let mut cmd = Command::new(harness::build("race_client", &["-pthread"]));
    cmd.arg(tmp.path())
        .arg(ROUNDS.to_string())
        .arg(harness::filter_file(abi, "race-filter.bpf"));
    let mut c = harness::attach(cmd);
    let fwd = Forwarder::new(abi, Grant::default(), devices, c.listener);
    harness::serve(&fwd, &mut c.child, ROUNDS);
    let mut lines = c.lines;
    let mut child = c.child;
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
