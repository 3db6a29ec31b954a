//! GPUs through real sandboxes, against a SIMULATED NVIDIA driver (no GPU
//! exists on these machines): the simulator of the devproxy crate's test
//! support, a FUSE filesystem standing where the driver's nodes are, and
//! a procfs-like directory naming its three GPUs. Everything else is
//! real: brokerd, the sandbox's pid 1 installing the proxy's filter, the
//! device proxy process serving the seccomp listener, SQLite.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::harness::*;

#[path = "../../../devproxy/tests/support/simulator.rs"]
#[allow(dead_code, clippy::all)]
mod simulator;

use simulator::{Received, SIM_GPU_NAME, SIM_VERSION, Simulator};

/// The simulated driver mounted, its procfs stand-in, and a broker
/// configured to use both.
struct Gpus {
    env: Env,
    sim: Simulator,
    _session: fuser::BackgroundSession,
    _dir: tempfile::TempDir,
}

fn gpus(extra: &str) -> Gpus {
    gpus_of(Simulator::default(), extra)
}

/// [`gpus`] with a given simulator.
fn gpus_of(sim: Simulator, extra: &str) -> Gpus {
    let dir = tempfile::Builder::new()
        .prefix("airlock-gpu-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dev = dir.path().join("dev");
    std::fs::create_dir(&dev).unwrap();
    let mut cfg = fuser::Config::default();
    cfg.acl = fuser::SessionACL::All;
    // The kernel checks the files' modes, as for real device nodes.
    cfg.mount_options
        .push(fuser::MountOption::DefaultPermissions);
    let session = fuser::spawn_mount(sim.clone(), &dev, &cfg).unwrap();
    // The driver's procfs: UUID and model per PCI address; PCI order is
    // not minor order (index 0 is minor 2).
    let proc_dir = dir.path().join("proc");
    std::fs::create_dir(&proc_dir).unwrap();
    std::fs::write(proc_dir.join("version"), "NVRM version: simulated\n").unwrap();
    for (pci, minor) in [
        ("0000:01:00.0", 2),
        ("0000:41:00.0", 0),
        ("0000:81:00.0", 1),
    ] {
        let d = proc_dir.join("gpus").join(pci);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("information"),
            format!(
                "Model: \t\t {SIM_GPU_NAME}\nIRQ:   \t\t 0\nGPU UUID: \t GPU-5e000000-0000-0000-0000-00000000000{minor}\nDevice Minor: \t {minor}\n"
            ),
        )
        .unwrap();
    }
    let env = Env::with_extra(&format!(
        "pool_size = 0\n[gpu]\ndev_dir = \"{}\"\nproc_dir = \"{}\"\n{extra}",
        dev.display(),
        proc_dir.display()
    ));
    Gpus {
        env,
        sim,
        _session: session,
        _dir: dir,
    }
}

impl Gpus {
    /// `airlock run --gpu GPUS -- ARGV` with the C client `client` built
    /// into the sandbox's `--workspace` (ARGV names it as
    /// `/workspace/CLIENT`); returns the run and the client's host path.
    fn run_with(&self, client: &str, gpus: &str, argv: &[&str]) -> (Output, PathBuf) {
        let ws = self._dir.path().join("ws");
        if !ws.exists() {
            std::fs::create_dir(&ws).unwrap();
        }
        let bin = build_into(&ws, client);
        let mut args = vec!["--workspace", ws.to_str().unwrap(), "--gpu", gpus, "--"];
        args.extend_from_slice(argv);
        (self.env.run(&args), bin)
    }
}

/// Audit rows of `kind` whose action is `action`.
fn rows(env: &Env, kind: &str, action: &str) -> Vec<serde_json::Value> {
    env.audit(&["--kind", kind, "--limit", "100000"])
        .into_iter()
        .filter(|r| r["action"] == action)
        .collect()
}

fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no line {name} in:\n{out}"))
}

#[test]
fn a_sandbox_reaches_only_its_granted_gpus_and_every_bad_call_is_refused_and_audited() {
    let g = gpus("");
    let (out, _) = g.run_with(
        "driver_client",
        "0,nvidia.com/gpu=GPU-5e000000-0000-0000-0000-000000000000",
        &[
            "sh",
            "-c",
            "ls /dev | grep nvidia | tr '\\n' ' '; echo; /workspace/driver_client /dev - uvm",
        ],
    );
    let text = ok(&out);
    // Index 0 is minor 2 (PCI order), then the GPU of minor 0: two nodes,
    // renumbered, and nothing of the third.
    assert_eq!(
        text.lines().next(),
        Some("nvidia-uvm nvidia0 nvidia1 nvidiactl "),
        "{text}"
    );
    assert!(line(&text, "version").contains(SIM_VERSION), "{text}");
    // From a thread that is not its process's leader, too.
    assert!(
        line(&text, "thread_version").starts_with("thread_version rc=0 errno=0 status=1"),
        "{text}"
    );
    assert_eq!(
        line(&text, "cards"),
        "cards rc=0 errno=0 status=0 0x300:0,0x100:1",
        "card info shows the granted GPUs only, as the sandbox numbers them"
    );
    for ok_call in ["client", "device", "subdevice", "free"] {
        assert!(
            line(&text, ok_call).contains("rc=0 errno=0 status=0"),
            "{ok_call}: {text}"
        );
    }
    assert!(line(&text, "name").ends_with(SIM_GPU_NAME), "{text}");
    // GPU enumeration in RM controls: the driver lists all three, the
    // sandbox sees its two; naming the third is refused.
    assert_eq!(
        line(&text, "attached"),
        "attached rc=0 errno=0 status=0 0x100,0x300"
    );
    assert_eq!(
        line(&text, "pci_granted"),
        "pci_granted rc=0 errno=0 status=0"
    );
    assert_eq!(
        line(&text, "pci_not_granted"),
        "pci_not_granted rc=0 errno=0 status=31"
    );
    // A device object reaches a GPU in RM: only the granted GPUs' device
    // instances (2 and 0) may be named, and only they show.
    assert_eq!(
        line(&text, "device_ids"),
        "device_ids rc=0 errno=0 status=0 0x5"
    );
    assert_eq!(
        line(&text, "device_not_granted"),
        "device_not_granted rc=0 errno=0 status=31"
    );
    // Each hostile call fails, the way the driver would answer it.
    for bad in [
        "control_short",
        "control_on_gpu_node",
        "xfer",
        "i2c",
        "alloc_on_gpu_node",
    ] {
        assert!(line(&text, bad).contains("errno=22"), "{bad}: {text}");
    }
    for bad in [
        "control_unknown",
        "control_wrong_params_size",
        "alloc_unknown_class",
    ] {
        assert!(!line(&text, bad).contains("status=0"), "{bad}: {text}");
    }
    assert!(
        !line(&text, "control_wild_pointer").contains("rc=0 errno=0 status=0"),
        "{text}"
    );
    // UVM: an admitted number runs natively in the caller (it binds to its
    // address space); one that is not admitted never reaches the driver.
    assert_eq!(
        line(&text, "uvm_admitted"),
        "uvm_admitted rc=0 errno=0 status=0"
    );
    assert!(
        line(&text, "uvm_not_admitted").contains("errno=22"),
        "{text}"
    );
    // None of them reached the driver. It saw the broker's own inventory
    // (the handshake, card info for 32 GPUs), then the sandbox's
    // handshake, card info, three allocations, the name, the free, all on
    // nvidiactl.
    let seen: Vec<Received> = g.sim.received();
    let broker: Vec<(u32, u32)> = seen.iter().take(2).map(|r| (r.nr, r.size)).collect();
    assert_eq!(broker, [(210, 72), (200, 32 * 72)], "{seen:?}");
    let kinds: Vec<(u32, u32)> = seen.iter().skip(2).map(|r| (r.nr, r.what)).collect();
    assert_eq!(
        kinds,
        [
            (210, 0),
            (200, 0),
            (0x2B, 0x41),
            (0x2A, 0x205),
            (0x2A, 0x205),
            (0x2B, 0x80),
            (0x2B, 0x2080),
            (0x2A, 0x2080_0110),
            (0x2A, 0x201),
            (0x2A, 0x204),
            (0x2A, 0x21B),
            (210, 0),
            (23, 0),
            (0x29, 0)
        ],
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|r| r.node
            == if r.nr == 23 {
                "nvidia-uvm"
            } else {
                "nvidiactl"
            }),
        "{seen:?}"
    );
    // The audit log: the grant in the create row, the proxy's tables and
    // jail, every refusal with its reason, the calls served by kind.
    let create = rows(&g.env, "sandbox", "create");
    let granted = &create[0]["detail"]["gpus"];
    assert_eq!(granted["driver"], SIM_VERSION, "{granted}");
    let minors: Vec<u64> = granted["granted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["minor"].as_u64().unwrap())
        .collect();
    assert_eq!(minors, [2, 0]);
    assert_eq!(granted["granted"][0]["pci"], "0000:01:00.0", "{granted}");
    let proxy = rows(&g.env, "device", "proxy");
    assert_eq!(proxy.len(), 1, "{proxy:?}");
    assert_eq!(proxy[0]["detail"]["jail"]["caps_kept"], 1 << 19);
    let denials = rows(&g.env, "denial", "ioctl");
    let reasons: Vec<String> = denials
        .iter()
        .map(|d| d["detail"]["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(reasons.len() >= 8, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("XFER")), "{reasons:?}");
    let counts = rows(&g.env, "device", "ioctls");
    let last = counts
        .iter()
        .find(|c| c["detail"]["last"] == true)
        .unwrap_or_else(|| {
            panic!(
                "no last summary: {counts:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let forwarded = last["detail"]["forwarded"].as_object().unwrap();
    let total: u64 = forwarded.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 11, "{forwarded:?}");
    g.env.assert_no_leftovers(None);
}

#[test]
fn gpu_requests_the_host_cannot_meet_fail_with_what_to_change() {
    let g = gpus("");
    let out = g.env.run(&["--gpu", "3", "--", "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no GPU \"3\""), "{err}");
    assert!(err.contains("0 (GPU-5e000000"), "{err}");
    let out = g.env.run(&["--gpu", "../nvidia0", "--", "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not a GPU name"));
    // GPUs turned off by the operator: refused, naming the knob.
    let g = gpus("enabled = false\n");
    let out = g.env.run(&["--gpu", "0", "--", "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("[gpu] enabled = false"));
}

/// The device proxy of sandbox `id`.
fn proxy_of(id: &str) -> i32 {
    process_in_cgroup_of(id, |p| argv0_is(p, "airlock-devproxy"))
}

/// Each sandbox's device proxy is a process of its own in the sandbox's
/// cgroup, running as the sandbox range's nobody with no capability in
/// the host's user namespace (only CAP_SYS_PTRACE in the sandbox's), under
/// no_new_privs and its own seccomp allow-list; if it dies, its sandbox
/// is torn down and audited, and nothing is left behind.
#[test]
fn the_device_proxy_is_an_unprivileged_process_of_its_sandbox_and_takes_it_down_when_it_dies() {
    let g = gpus("");
    let b = g.env.start_brokerd();
    let broker_pid = b.0.as_ref().unwrap().id() as i32;
    let info = create(&g.env, &["--gpu", "1"]);
    let id = info["id"].as_str().unwrap().to_string();
    let base = info["host_uid_base"].as_u64().unwrap();
    assert_eq!(info["gpus"][0]["minor"], 0, "{info}");
    assert_eq!(info["gpus"][0]["inside"], 0, "{info}");
    // What the sandbox's /proc/driver/nvidia shows (where the host has
    // one): the driver's files and the granted GPU's directory only.
    let view = g.env.state.join("sandboxes").join(&id).join("gpu-proc");
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&view), ["gpus", "version"]);
    assert_eq!(names(&view.join("gpus")), ["0000:41:00.0"]);
    assert!(
        std::fs::read_to_string(view.join("gpus/0000:41:00.0/information"))
            .unwrap()
            .contains("Device Minor: \t 0")
    );
    let proxy = proxy_of(&id);
    assert_ne!(proxy, broker_pid);
    let nobody = (base + 65534).to_string();
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<String> = status_field(proxy, key)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert_eq!(
            ids,
            [
                nobody.clone(),
                nobody.clone(),
                nobody.clone(),
                nobody.clone()
            ]
        );
    }
    assert_eq!(
        status_field(proxy, "CapEff:"),
        format!("{:016x}", 1u64 << 19)
    );
    assert_eq!(
        status_field(proxy, "CapBnd:"),
        format!("{:016x}", 1u64 << 19)
    );
    assert_eq!(status_field(proxy, "NoNewPrivs:"), "1");
    assert_eq!(status_field(proxy, "Seccomp:"), "2");
    // Its capability is the sandbox's namespace's, not the host's: it
    // lives in the user namespace of the sandbox's pid 1.
    let userns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/user")).unwrap();
    let host = userns(std::process::id() as i32);
    assert_ne!(userns(proxy), host);
    let init = process_in_cgroup_of(&id, |p| argv0_is(p, "airlock-shim") && userns(p) != host);
    assert_eq!(userns(proxy), userns(init));
    // Its nodes while it lives.
    let out = g
        .env
        .remote(&["exec", &id, "--", "sh", "-c", "ls /dev | grep -c nvidia"]);
    assert_eq!(ok(&out).trim(), "3");
    // Where the host has the v1 devices controller, the sandbox's cgroup
    // lets it open only its /dev's devices (the simulator's nodes are
    // plain files; a real GPU's would be listed too), and they work.
    let devices = Env::cgroup_dirs(&id)
        .into_iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/devices"));
    if let Some(d) = devices {
        let list = std::fs::read_to_string(d.join("devices.list")).unwrap();
        assert!(!list.contains("a *:*"), "{list}");
        for want in ["c 1:3 rw", "c 1:9 rw", "c 5:2 rw", "c 136:* rw"] {
            assert!(list.lines().any(|l| l == want), "{want}: {list}");
        }
        assert!(list.lines().all(|l| !l.contains('m')), "no mknod: {list}");
        // brokerd commits rows in batches: wait for the create row.
        g.env.audit_wait(&["--kind", "sandbox"], |r| {
            r["action"] == "create" && r["detail"]["gpus"]["devices_cgroup"] == true
        });
    }
    let out = g.env.remote(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "head -c 4 /dev/urandom | wc -c; echo x > /dev/null && echo null-ok",
    ]);
    assert_eq!(ok(&out), "4\nnull-ok\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let failed = rows(&g.env, "sandbox", "component_failed");
        if failed.iter().any(|r| r["detail"]["role"] == "devproxy") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no component_failed row: {failed:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = g.env.remote(&["exec", &id, "--", "true"]);
    assert!(
        !out.status.success(),
        "the sandbox outlived its device proxy"
    );
    drop(b);
    g.env.assert_no_leftovers(None);
}

/// Builds `devproxy/tests/support/NAME.c` into `dir` (a sandbox runs it
/// from its `--workspace`).
fn build_into(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../devproxy/tests/support/{name}.c"));
    let st = Command::new("cc")
        .args(["-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs");
    assert!(st.success(), "{name}.c does not build");
    out
}

fn bench_numbers(out: &str) -> (f64, f64) {
    let get = |k: &str| -> f64 {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {out}"))
    };
    (get("control_ns"), get("refused_ns"))
}

/// Benchmark (run by `bench/gpu.sh`, never in the test suite): what the
/// device proxy adds to one RM control, against the same call made on
/// the simulated driver directly, interleaved in one run; and the
/// validator's own cost per call. The simulator is a FUSE file, so the
/// direct call already pays one FUSE round trip.
#[test]
#[ignore = "benchmark: bench/gpu.sh"]
fn bench_ioctl_cost() {
    const N: &str = "20000";
    const ROUNDS: usize = 5;
    let g = gpus("");
    let dev = g._dir.path().join("dev");
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (out, bin) = g.run_with("ioctl_bench", "0", &["/workspace/ioctl_bench", "/dev", N]);
        proxied.push(bench_numbers(&ok(&out)));
        let out = Command::new(&bin).arg(&dev).arg(N).output().unwrap();
        direct.push(bench_numbers(&ok(&out)));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let col = |v: &[(f64, f64)], i: usize| -> Vec<f64> {
        v.iter().map(|x| if i == 0 { x.0 } else { x.1 }).collect()
    };
    // The validator alone, in process, on the same control's block.
    let set = airlock_devproxy::AbiSet::builtin().unwrap();
    let abi = set.select(SIM_VERSION, Default::default()).unwrap().abi();
    let grant = airlock_devproxy::validate::Grant {
        gpu_ids: vec![0x300],
    };
    let mut block = [0u8; 32];
    block[8..12].copy_from_slice(&0x2080_0110u32.to_le_bytes());
    block[16..24].copy_from_slice(&0x7000_0000u64.to_le_bytes());
    block[24..28].copy_from_slice(&132u32.to_le_bytes());
    let request = u64::from(airlock_devproxy::validate::canonical(0x2A, 32));
    let reps = 1_000_000u32;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        let d = airlock_devproxy::validate::check(
            abi,
            &grant,
            airlock_devproxy::Node::Ctl,
            std::hint::black_box(request),
            std::hint::black_box(&block),
        );
        assert!(matches!(d, airlock_devproxy::Decision::Forward(_)));
    }
    let validate_ns = t.elapsed().as_nanos() as f64 / f64::from(reps);
    let (dc, dr) = (median(&mut col(&direct, 0)), median(&mut col(&direct, 1)));
    let (pc, pr) = (median(&mut col(&proxied, 0)), median(&mut col(&proxied, 1)));
    println!(
        "| call (simulated driver, medians of {ROUNDS} runs of {N}) | direct | through the device proxy | added | ratio |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| RM control (GPU name) | {:.1} µs | {:.1} µs | {:.1} µs | {:.2}x |",
        dc / 1e3,
        pc / 1e3,
        (pc - dc) / 1e3,
        pc / dc
    );
    println!(
        "| unknown control (refused by the proxy; the driver's NOT_SUPPORTED directly) | {:.1} µs | {:.1} µs | {:.1} µs | {:.2}x |",
        dr / 1e3,
        pr / 1e3,
        (pr - dr) / 1e3,
        pr / dr
    );
    println!("validator alone: {validate_ns:.0} ns per RM control");
}

/// A driver without an exact table: refused, naming the host version,
/// the nearest supported ones and the knob; where its branch is known
/// frozen, the operator may opt in, and the choice is audited. Never
/// across a branch.
#[test]
fn a_driver_without_tables_is_refused_unless_the_operator_opts_in_within_its_branch() {
    let g = gpus_of(Simulator::with_version("580.159.04"), "");
    let out = g.env.run(&["--gpu", "0", "--", "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for want in ["580.159.04", "580.142", "allow_newer_in_branch"] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(g.sim.received().iter().all(|r| r.nr == 210 || r.nr == 200));
    let g = gpus_of(
        Simulator::with_version("580.159.04"),
        "allow_newer_in_branch = true\n",
    );
    // Index 1 is minor 0, device instance 0, which the client names.
    let (out, _) = g.run_with(
        "driver_client",
        "1",
        &["/workspace/driver_client", "/dev", "-"],
    );
    let served = ok(&out);
    assert!(line(&served, "name").ends_with(SIM_GPU_NAME), "{served}");
    let proxy = rows(&g.env, "device", "proxy");
    assert_eq!(proxy[0]["detail"]["driver"], "580.159.04");
    assert_eq!(proxy[0]["detail"]["tables"], "580.142");
    assert_eq!(proxy[0]["detail"]["newer_in_branch"], true);
    // Another branch is never served by a neighbour's tables.
    let g = gpus_of(
        Simulator::with_version("575.51.02"),
        "allow_newer_in_branch = true\n",
    );
    let out = g.env.run(&["--gpu", "0", "--", "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("575.51.02") && err.contains("nearest"),
        "{err}"
    );
}

/// Controls whose params embed pointers and fds work from a sandbox
/// through its jailed proxy (guarded buffers, the proxy's own fds), and
/// their hostile forms are refused and audited.
#[test]
fn embedded_pointers_and_fds_are_marshalled_through_the_jailed_proxy() {
    let g = gpus("");
    // Index 1 is minor 0, device instance 0, which the client names.
    let (out, _) = g.run_with(
        "embedded_client",
        "1",
        &["/workspace/embedded_client", "/dev", "-"],
    );
    let text = ok(&out);
    assert_eq!(
        line(&text, "classes"),
        "classes rc=0 errno=0 status=0 0x41,0x80,0x2080,0xc86f,0xc8b5"
    );
    assert!(line(&text, "build").starts_with("build rc=0 errno=0 status=0 580.142"));
    assert_eq!(line(&text, "export"), "export rc=0 errno=0 status=0 1");
    assert_eq!(line(&text, "event"), "event rc=0 errno=0 status=0 1");
    assert_eq!(
        line(&text, "event_other_client"),
        "event_other_client rc=0 errno=0 status=31"
    );
    assert_eq!(
        line(&text, "classes_huge"),
        "classes_huge rc=0 errno=0 status=31"
    );
    assert!(
        line(&text, "export_not_device").contains("errno=22"),
        "{text}"
    );
    assert_eq!(line(&text, "reg_ops"), "reg_ops rc=0 errno=0 status=86");
    assert_eq!(g.sim.embedded().len(), 4);
    // The last refused call's row (register ops) is the newest.
    let denials = g
        .env
        .audit_wait(&["--kind", "denial", "--limit", "100000"], |r| {
            r["detail"]["reason"]
                .as_str()
                .is_some_and(|x| x.contains("does not marshal"))
        });
    let reasons: Vec<String> = denials
        .iter()
        .filter(|r| r["action"] == "ioctl")
        .map(|r| r["detail"]["reason"].as_str().unwrap_or("").to_string())
        .collect();
    for want in [
        "exceed the driver's",
        "an embedded array",
        "fd 999 is not a granted device",
        "is not the caller's own",
        "does not marshal",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "{want}: {reasons:#?}"
        );
    }
}

/// A sandbox that floods its proxy with bad calls gets each refused, but
/// the audit log itemises them only within the budget and counts the
/// rest; the calls it is allowed keep working.
#[test]
fn a_flood_of_refused_calls_is_counted_not_itemised() {
    let g = gpus("");
    let (out, _) = g.run_with(
        "ioctl_bench",
        "0",
        &["/workspace/ioctl_bench", "/dev", "3000"],
    );
    ok(&out);
    let denials = rows(&g.env, "denial", "ioctl");
    let counts = rows(&g.env, "device", "ioctls");
    let sum = |k: &str| -> u64 {
        counts
            .iter()
            .map(|c| c["detail"][k].as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum("refused"), 3000, "{counts:?}");
    // The budget: a burst of 1,000 at 100 a second, in the proxy.
    assert!(denials.len() <= 1100, "{} rows", denials.len());
    assert_eq!(
        denials.len() as u64 + sum("refused_not_itemised"),
        3000,
        "every refusal is itemised or counted"
    );
    let forwarded: u64 = counts
        .iter()
        .flat_map(|c| c["detail"]["forwarded"].as_object().unwrap().values())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(forwarded >= 3000, "{counts:?}");
}

/// `airlock --socket S` + args as uid `id` (no groups).
fn airlock_as(id: u32, env: &Env) -> Command {
    let mut c = Command::new("setpriv");
    let id = id.to_string();
    c.args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .arg("--socket")
        .arg(&env.socket);
    c.env_clear();
    c
}

/// The root broker grants a GPU to a non-root caller only if that caller
/// could open its nodes on the host itself; root callers may always.
#[test]
fn a_caller_gets_no_gpu_the_host_keeps_from_it() {
    const AGENT: &str = "[[agents]]\nname = \"alice\"\nuids = [4101]\n";
    let g = gpus_of(Simulator::with_mode(0o600), AGENT);
    let _b = g.env.start_brokerd();
    let out = airlock_as(4101, &g.env)
        .args(["create", "--gpu", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("uid 4101 may not use GPU node") && err.contains("nvidiactl"),
        "{err}"
    );
    g.env.audit_wait(&["--kind", "auth"], |r| {
        r["detail"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("may not use GPU node"))
    });
    ok(&g.env.remote(&["create", "--gpu", "0"]));
    // Where the host lets everyone open them, so does the broker.
    let g = gpus_of(Simulator::default(), AGENT);
    let _b = g.env.start_brokerd();
    let out = airlock_as(4101, &g.env)
        .args(["--json", "create", "--gpu", "0"])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(info["gpus"][0]["minor"], 2, "{info}");
}
