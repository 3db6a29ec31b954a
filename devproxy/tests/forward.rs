//! The forwarder against a real seccomp listener: a C client (the sandbox
//! side) sends its ioctls through `SECCOMP_RET_USER_NOTIF`, and the
//! forwarder performs or refuses each. No GPU here: `/dev/null` stands in
//! for `/dev/nvidiactl` (an ioctl that reaches it fails with ENOTTY, which
//! is how a test sees a call was performed); the simulated driver will
//! replace it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/harness.rs"]
mod harness;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use airlock_devproxy::abi::AbiSet;
use airlock_devproxy::forward::{DeviceKey, Devices, Forwarder, Served};
use airlock_devproxy::validate::{Grant, Reply, status};

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
    let mut cmd = Command::new(harness::build("client", &[]));
    cmd.args([
        "/dev/null",
        &format!("{:#x}", ctl.cmd),
        &ctl.param_size.to_string(),
    ])
    .arg(harness::filter_file(abi, "forward-filter.bpf"));
    let mut c = harness::attach(cmd);
    let devices = Devices {
        ctl: Some(DeviceKey::Char(
            std::fs::metadata("/dev/null").unwrap().rdev(),
        )),
        ..Devices::default()
    };
    let fwd = Forwarder::new(abi, Grant::default(), devices, c.listener);
    // Ten calls notify; the UVM one and TCGETS are let through by the
    // filter.
    let served = harness::serve(&fwd, &mut c.child, 10);
    let out = harness::outputs(c.lines);
    assert!(c.child.wait().unwrap().success());
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
