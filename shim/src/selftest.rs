//! The jail's self-test, run from inside a jailed process just before the
//! command would run.
//!
//! A sandbox that silently runs unconfined is the worst failure there is, so
//! every property of the jail is checked where it matters, from the inside,
//! by reading what the kernel reports: seccomp mode 2 (filter) and
//! `no_new_privs` from `/proc/self/status`, the capability sets exactly
//! what the user keeps (none but sandbox root's [`crate::caps::ROOT_CAPS`]),
//! no line of `/proc/self/uid_map` or `gid_map` mapping the host's root, `/`
//! being the sandbox's FUSE tree, and landlock applied at or above the floor.
//! Every failure is a readable line naming the check and the value seen; the
//! shim refuses to run anything when the report does not pass.

use serde::{Deserialize, Serialize};

use crate::caps::{CapSets, parse_status, status_field};
use crate::landlock::{Enforcement, LandlockStatus};

/// FUSE's statfs magic (`FUSE_SUPER_MAGIC`).
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// What the jail must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// `/` must be a FUSE filesystem (the sandbox's tree).
    pub fuse_root: bool,
    /// Landlock ABI must reach this (0: landlock may be absent).
    pub landlock_floor: u8,
    /// The effective, permitted and bounding sets must be exactly this
    /// (the inheritable and ambient sets empty).
    pub caps: u64,
}

/// What the self-test saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestReport {
    /// All checks passed.
    pub passed: bool,
    /// Seccomp mode from `/proc/self/status` (2 = filter).
    pub seccomp_mode: u8,
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// The capability sets (the user's kept set; none for most users).
    pub caps: CapSets,
    /// Landlock as enforced on this process.
    pub landlock: Option<LandlockStatus>,
    /// The uid or gid map maps the host's root (outside id 0) into the
    /// namespace.
    pub uid_map_maps_host_root: bool,
    /// `/` is a FUSE filesystem.
    pub root_fs_is_fuse: bool,
    /// One line per failed check, naming the check and the value seen.
    pub failures: Vec<String>,
}

/// Whether an id map text (`/proc/PID/uid_map` format: inside, outside,
/// count) maps outside id 0, the host's root, into the namespace. An
/// unparsable line counts as mapping it (fail closed).
pub fn map_includes_host_root(map: &str) -> bool {
    map.lines().filter(|l| !l.trim().is_empty()).any(|l| {
        let f: Vec<Option<u64>> = l.split_whitespace().map(|x| x.parse().ok()).collect();
        match f.as_slice() {
            [Some(_), Some(outside), Some(count)] => *outside == 0 && *count > 0,
            _ => true,
        }
    })
}

/// Runs every check on the calling process. `landlock` is what
/// [`crate::landlock::PreparedLandlock::restrict_self`] returned (`None` if
/// it was not applied).
pub fn run(expect: &Expect, landlock: Option<LandlockStatus>) -> SelfTestReport {
    let mut failures = Vec::new();
    let status = match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => s,
        Err(e) => {
            failures.push(format!("cannot read /proc/self/status: {e}"));
            String::new()
        }
    };

    let seccomp_seen = status_field(&status, "Seccomp").unwrap_or("missing");
    let seccomp_mode: u8 = seccomp_seen.parse().unwrap_or(0);
    if seccomp_mode != 2 {
        failures.push(format!("seccomp: mode is {seccomp_seen}, want 2 (filter)"));
    }

    let nnp_seen = status_field(&status, "NoNewPrivs").unwrap_or("missing");
    let no_new_privs = nnp_seen == "1";
    if !no_new_privs {
        failures.push(format!("no_new_privs: NoNewPrivs is {nnp_seen}, want 1"));
    }

    let caps = match parse_status(&status) {
        Ok(c) => {
            let k = expect.caps;
            let want = CapSets {
                inheritable: 0,
                permitted: k,
                effective: k,
                bounding: k,
                ambient: 0,
            };
            if c != want && k == 0 {
                failures.push(format!(
                    "capabilities: sets are not empty: CapInh {:016x} CapPrm {:016x} \
                     CapEff {:016x} CapBnd {:016x} CapAmb {:016x}",
                    c.inheritable, c.permitted, c.effective, c.bounding, c.ambient
                ));
            } else if c != want {
                failures.push(format!(
                    "capabilities: want CapPrm, CapEff and CapBnd {k:016x} and nothing \
                     else, see CapInh {:016x} CapPrm {:016x} CapEff {:016x} CapBnd {:016x} \
                     CapAmb {:016x}",
                    c.inheritable, c.permitted, c.effective, c.bounding, c.ambient
                ));
            }
            c
        }
        Err(e) => {
            failures.push(format!("capabilities: {e}"));
            CapSets {
                inheritable: u64::MAX,
                permitted: u64::MAX,
                effective: u64::MAX,
                bounding: u64::MAX,
                ambient: u64::MAX,
            }
        }
    };

    let floor = expect.landlock_floor;
    match landlock {
        None if floor == 0 => {}
        None => failures.push(format!("landlock: not applied, want ABI >= {floor}")),
        Some(l) if floor == 0 && l.abi == 0 => {}
        Some(l) if l.abi < floor => failures.push(format!(
            "landlock: ABI {} is below the floor {floor}",
            l.abi
        )),
        Some(l) if l.enforced == Enforcement::NotEnforced => {
            failures.push(format!("landlock: ABI {} ruleset is not enforced", l.abi))
        }
        Some(_) => {}
    }

    let mut maps_root = false;
    for path in ["/proc/self/uid_map", "/proc/self/gid_map"] {
        match std::fs::read_to_string(path) {
            Ok(m) if map_includes_host_root(&m) => {
                maps_root = true;
                let lines: Vec<&str> = m.lines().map(str::trim).collect();
                failures.push(format!(
                    "id map: {path} maps host root: {}",
                    lines.join(" | ")
                ));
            }
            Ok(_) => {}
            Err(e) => {
                maps_root = true;
                failures.push(format!("id map: cannot read {path}: {e}"));
            }
        }
    }

    let root_fs_is_fuse = match nix::sys::statfs::statfs("/") {
        Ok(s) => {
            let ty = s.filesystem_type();
            let is_fuse = ty == nix::sys::statfs::FUSE_SUPER_MAGIC;
            if expect.fuse_root && !is_fuse {
                failures.push(format!(
                    "root fs: / has f_type {:#x}, want FUSE ({FUSE_SUPER_MAGIC:#x})",
                    ty.0
                ));
            }
            is_fuse
        }
        Err(e) => {
            if expect.fuse_root {
                failures.push(format!("root fs: statfs(/) failed: {e}"));
            }
            false
        }
    };

    SelfTestReport {
        passed: failures.is_empty(),
        seccomp_mode,
        no_new_privs,
        caps,
        landlock,
        uid_map_maps_host_root: maps_root,
        root_fs_is_fuse,
        failures,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::fs::File;
    use std::io::{Read, Write};

    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, Gid, Pid, Uid};

    use super::*;

    /// Two pipes between a test and its forked child.
    pub(crate) struct Link {
        /// Reads what the other side wrote.
        pub rx: File,
        /// Writes to the other side.
        pub tx: File,
    }

    fn pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (File::from(r), File::from(w))
    }

    /// Runs `body` in a forked child and returns the string it produced.
    /// Irreversible restrictions (seccomp, landlock, capability drops) go
    /// into such children only, never into the test runner.
    pub(crate) fn run_in_child(body: impl FnOnce() -> String) -> String {
        run_in_child_linked(|_| body(), |_, _| {})
    }

    /// Like [`run_in_child`], with a [`Link`] each way and a hook that runs
    /// in the parent (with the child's pid) while the child runs.
    pub(crate) fn run_in_child_linked(
        body: impl FnOnce(&mut Link) -> String,
        parent: impl FnOnce(Pid, &mut Link),
    ) -> String {
        let (result_r, result_w) = pipe();
        let (to_child_r, to_child_w) = pipe();
        let (to_parent_r, to_parent_w) = pipe();
        match fork().unwrap() {
            ForkResult::Child => {
                drop((result_r, to_child_w, to_parent_r));
                let mut link = Link {
                    rx: to_child_r,
                    tx: to_parent_w,
                };
                // Printing a panic could wait on a lock some other test
                // thread held at fork time: report through the pipe instead.
                std::panic::set_hook(Box::new(|_| {}));
                let out =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut link)));
                let (text, code) = match out {
                    Ok(s) => (s, 0),
                    Err(p) => {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        (format!("child panicked: {msg}"), 101)
                    }
                };
                let mut w = result_w;
                let _ = w.write_all(text.as_bytes());
                drop(w);
                exit_child(code)
            }
            ForkResult::Parent { child } => {
                drop((result_w, to_child_r, to_parent_w));
                let mut link = Link {
                    rx: to_parent_r,
                    tx: to_child_w,
                };
                parent(child, &mut link);
                drop(link);
                let mut out = String::new();
                let mut r = result_r;
                r.read_to_string(&mut out).unwrap();
                let st = waitpid(child, None).unwrap();
                assert_eq!(st, WaitStatus::Exited(child, 0), "child said: {out}");
                out
            }
        }
    }

    #[allow(unsafe_code)]
    fn fork() -> nix::Result<ForkResult> {
        // SAFETY: the child runs only the test's closure and then `_exit`; it
        // never returns into the (multi-threaded) test harness. The closures
        // allocate (glibc's fork resets malloc's locks in the child) and make
        // system calls, and take no lock another thread could hold: no
        // printing, and the panic hook is replaced before anything can panic.
        unsafe { nix::unistd::fork() }
    }

    #[allow(unsafe_code)]
    fn exit_child(code: i32) -> ! {
        // SAFETY: `_exit` ends the forked child at once without running the
        // harness's atexit handlers or destructors; it never returns.
        unsafe { libc::_exit(code) }
    }

    #[test]
    fn fuse_magic_matches_nix() {
        assert_eq!(nix::sys::statfs::FUSE_SUPER_MAGIC.0, FUSE_SUPER_MAGIC);
    }

    #[test]
    fn host_root_in_a_map_is_detected() {
        assert!(map_includes_host_root("         0          0 4294967295\n"));
        assert!(map_includes_host_root("0 100000 1\n1000 0 1\n"));
        assert!(map_includes_host_root("garbage\n"));
        assert!(!map_includes_host_root("0 268435456 65536\n"));
        assert!(!map_includes_host_root(""));
    }

    #[test]
    fn an_unjailed_process_fails_with_named_reasons() {
        let r = run(
            &Expect {
                fuse_root: true,
                landlock_floor: 1,
                caps: 0,
            },
            None,
        );
        assert!(!r.passed);
        assert_eq!(r.seccomp_mode, 0);
        assert!(!r.no_new_privs);
        assert!(!r.root_fs_is_fuse);
        let all = r.failures.join("\n");
        assert!(all.contains("seccomp: mode is 0, want 2 (filter)"), "{all}");
        assert!(
            all.contains("no_new_privs: NoNewPrivs is 0, want 1"),
            "{all}"
        );
        assert!(
            all.contains("landlock: not applied, want ABI >= 1"),
            "{all}"
        );
        assert!(all.contains("root fs: / has f_type"), "{all}");
        // The test runner is root with capabilities (as in CI).
        if !r.caps.all_empty() {
            assert!(
                all.contains("capabilities: sets are not empty: CapInh"),
                "{all}"
            );
        }
        if r.uid_map_maps_host_root {
            assert!(
                all.contains("id map: /proc/self/uid_map maps host root"),
                "{all}"
            );
        }
        let json = serde_json::to_string(&r).unwrap();
        let back: SelfTestReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn landlock_below_floor_or_unenforced_fails() {
        let e = Expect {
            fuse_root: false,
            landlock_floor: 5,
            caps: 0,
        };
        let low = run(
            &e,
            Some(LandlockStatus {
                abi: 4,
                enforced: Enforcement::FullyEnforced,
            }),
        );
        assert!(
            low.failures
                .iter()
                .any(|f| f == "landlock: ABI 4 is below the floor 5")
        );
        let off = run(
            &e,
            Some(LandlockStatus {
                abi: 6,
                enforced: Enforcement::NotEnforced,
            }),
        );
        assert!(
            off.failures
                .iter()
                .any(|f| f == "landlock: ABI 6 ruleset is not enforced")
        );
    }

    /// The full jail, in the order the shim applies it, inside a fresh user
    /// namespace whose maps the parent writes (as the launcher does).
    fn fully_jailed_report(keep: u64) -> SelfTestReport {
        let floor = crate::landlock::kernel_abi().min(1);
        let prepared = crate::landlock::prepare(floor, &[]).unwrap();
        let bpf = crate::seccomp::compile_sandbox_profile().unwrap();
        let out = run_in_child_linked(
            |link| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).unwrap();
                link.tx.write_all(b"u").unwrap();
                let mut b = [0u8; 1];
                link.rx.read_exact(&mut b).unwrap();
                crate::caps::drop_bounding_and_ambient_except(keep).unwrap();
                nix::unistd::setgroups(&[]).unwrap();
                let (u, g) = (Uid::from_raw(0), Gid::from_raw(0));
                nix::unistd::setresgid(g, g, g).unwrap();
                nix::unistd::setresuid(u, u, u).unwrap();
                crate::caps::keep_only(keep).unwrap();
                crate::caps::set_no_new_privs().unwrap();
                let status = prepared.restrict_self().unwrap();
                crate::seccomp::install_on_current_thread(&bpf).unwrap();
                let report = run(
                    &Expect {
                        fuse_root: false,
                        landlock_floor: floor,
                        caps: keep,
                    },
                    Some(status),
                );
                serde_json::to_string(&report).unwrap()
            },
            |pid, link| {
                let mut b = [0u8; 1];
                link.rx.read_exact(&mut b).unwrap();
                for map in ["uid_map", "gid_map"] {
                    std::fs::write(format!("/proc/{pid}/{map}"), "0 100000 65536\n").unwrap();
                }
                link.tx.write_all(b"g").unwrap();
            },
        );
        serde_json::from_str(&out).expect(&out)
    }

    /// The full jail, in the order the shim applies it, inside a fresh user
    /// namespace whose maps the parent writes (as the launcher does).
    #[test]
    fn a_fully_jailed_child_passes() {
        let report = fully_jailed_report(0);
        assert!(report.passed, "{report:#?}");
        assert_eq!(report.seccomp_mode, 2);
        assert!(report.no_new_privs);
        assert!(report.caps.all_empty());
        assert!(!report.uid_map_maps_host_root);
        assert!(report.failures.is_empty());
    }

    /// Sandbox root keeps exactly its set; a set other than the one
    /// expected fails with both named.
    #[test]
    fn a_jailed_root_keeps_exactly_its_capabilities() {
        let report = fully_jailed_report(crate::caps::ROOT_CAPS);
        assert!(report.passed, "{report:#?}");
        assert_eq!(report.caps.effective, crate::caps::ROOT_CAPS);
        assert_eq!(report.caps.bounding, crate::caps::ROOT_CAPS);
        assert_eq!(report.caps.ambient | report.caps.inheritable, 0);
        let wrong = run(
            &Expect {
                fuse_root: false,
                landlock_floor: 0,
                caps: crate::caps::ROOT_CAPS & !(1 << crate::caps::cap::CHOWN),
            },
            None,
        );
        assert!(
            wrong
                .failures
                .iter()
                .any(|f| f
                    .starts_with("capabilities: want CapPrm, CapEff and CapBnd 00000000a00004fa")),
            "{:?}",
            wrong.failures
        );
    }
}
