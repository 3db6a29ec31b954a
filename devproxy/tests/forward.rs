//! The forwarder against a real seccomp listener: a C client (the sandbox
//! side) sends its ioctls through `SECCOMP_RET_USER_NOTIF`, and the
//! forwarder performs or refuses each. No GPU here: `/dev/null` stands in
//! for `/dev/nvidiactl` (an ioctl that reaches it fails with ENOTTY, which
//! is how a test sees a call was performed); the simulated driver will
//! replace it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use airlock_devproxy::abi::AbiSet;
use airlock_devproxy::forward::{DeviceKey, Devices, Forwarder, Served};
use airlock_devproxy::validate::{Grant, Reply, status};

fn client() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("devproxy-client");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/client.c");
    let st = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs");
    assert!(st.success(), "client.c does not build");
    out
}

#[test]
fn calls_are_performed_or_refused_through_the_listener() {
    let set = AbiSet::builtin().unwrap();
    let abi = set
        .versions()
        .find(|a| a.version.to_string() == "580.142")
        .unwrap();
    let ctl = abi
        .controls
        .values()
        .filter(|c| !c.embedded && c.param_size > 0)
        .min_by_key(|c| c.cmd)
        .unwrap();
    // The filter the sandbox would get for this version.
    assert!(abi.native_uvm().contains(&37), "UVM 37 is admitted");
    let filter = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("forward-filter.bpf");
    let prog: Vec<u8> = airlock_devproxy::filter::ioctl_filter(abi)
        .unwrap()
        .into_iter()
        .flat_map(|i| i.to_bytes())
        .collect();
    std::fs::write(&filter, prog).unwrap();
    let mut child = Command::new(client())
        .args([
            "/dev/null",
            &format!("{:#x}", ctl.cmd),
            &ctl.param_size.to_string(),
        ])
        .arg(&filter)
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
    let devices = Devices {
        ctl: Some(DeviceKey::Char(
            std::fs::metadata("/dev/null").unwrap().rdev(),
        )),
        ..Devices::default()
    };
    let fwd = Forwarder::new(abi, Grant::default(), devices, listener);
    let served = std::thread::scope(|s| {
        let server = s.spawn(|| {
            let mut served = Vec::new();
            // Ten calls notify; the UVM one and TCGETS are let through by
            // the filter.
            while served.len() < 10 {
                assert!(
                    fwd.ready(10_000).unwrap(),
                    "no notification within 10 s: {served:?}"
                );
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
    let enotty = format!("rc=-1 errno={} status=0", libc::ENOTTY);
    let einval = format!("rc=-1 errno={} status=0", libc::EINVAL);
    let efault = format!("rc=-1 errno={} status=0", libc::EFAULT);
    // Performed: the stand-in device answered.
    assert_eq!(out["version"], enotty);
    assert_eq!(out["version_odd_bits"], enotty);
    assert_eq!(out["control_ok"], enotty);
    assert_eq!(out["control_ok_pointer"], "same");
    // Refused, never performed.
    assert_eq!(out["version_bad_size"], einval);
    assert_eq!(out["xfer"], einval);
    assert_eq!(
        out["control_unknown"],
        format!("rc=0 errno=0 status={}", status::NV_ERR_NOT_SUPPORTED)
    );
    assert_eq!(out["control_wild"], efault);
    assert_eq!(out["block_wild"], efault);
    assert_eq!(out["pipe"], enotty);
    // Let through by the filter (reach the file directly, no notification).
    assert_eq!(out["uvm_native"], enotty);
    assert_eq!(out["tcgets"], enotty);
    assert_eq!(out["pipe_other_device"], enotty);
    assert_eq!(
        served
            .iter()
            .filter(|s| matches!(
                s,
                Served::Continued {
                    request: 0x5441,
                    ..
                }
            ))
            .count(),
        1,
        "{served:?}"
    );

    let performed: Vec<&str> = served
        .iter()
        .filter_map(|s| match s {
            Served::Forwarded { what, .. } => Some(what.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(performed.len(), 3, "{served:?}");
    assert!(
        performed[0].starts_with("NV_ESC_CHECK_VERSION_STR"),
        "{performed:?}"
    );
    assert!(performed[2].contains(&ctl.name), "{performed:?}");
    let refused: Vec<&Served> = served
        .iter()
        .filter(|s| matches!(s, Served::Refused { .. }))
        .collect();
    assert_eq!(refused.len(), 3, "{served:?}");
    assert!(served.iter().any(|s| matches!(
        s,
        Served::Refused {
            reply: Reply::Status {
                at: 28,
                status: 0x56
            },
            ..
        }
    )));
    assert_eq!(
        served
            .iter()
            .filter(|s| matches!(s, Served::Fault { .. }))
            .count(),
        2
    );
    assert_eq!(
        served
            .iter()
            .filter(|s| matches!(s, Served::NotADevice { .. }))
            .count(),
        1
    );
}
