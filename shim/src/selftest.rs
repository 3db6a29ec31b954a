//! The jail's self-test, run from inside a jailed process just before the
//! command would run: a sandbox that silently runs unconfined is the worst
//! failure there is, so every property is checked where it matters.

use serde::{Deserialize, Serialize};

use crate::caps::{CapSets, parse_status};
use crate::landlock::{Enforcement, LandlockStatus};

/// FUSE's statfs magic.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// What the jail must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// `/` must be a FUSE filesystem.
    pub fuse_root: bool,
    /// Landlock ABI must reach this (0: landlock may be absent).
    pub landlock_floor: u8,
}

/// What the self-test saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestReport {
    /// All checks passed.
    pub passed: bool,
    /// Seccomp mode (2 = filter).
    pub seccomp_mode: u8,
    /// no_new_privs is set.
    pub no_new_privs: bool,
    /// The capability sets (all must be 0).
    pub caps: CapSets,
    /// Landlock as enforced on this process.
    pub landlock: Option<LandlockStatus>,
    /// The uid or gid map maps the host's root into the sandbox.
    pub uid_map_maps_host_root: bool,
    /// `/` is the FUSE tree.
    pub root_fs_is_fuse: bool,
    /// One line per failed check, naming the value seen.
    pub failures: Vec<String>,
}

fn status_field(status: &str, key: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// Whether an id map text maps outside id 0 (host root) into the namespace.
pub fn map_includes_host_root(map: &str) -> bool {
    map.lines().any(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        matches!(f.as_slice(), [_, outside, count] if *outside == 0 && *count > 0)
    })
}

/// Runs every check on the calling process.
pub fn run(expect: &Expect, landlock: Option<LandlockStatus>) -> SelfTestReport {
    let mut failures = Vec::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if status.is_empty() {
        failures.push("cannot read /proc/self/status".to_string());
    }
    let seccomp_mode: u8 = status_field(&status, "Seccomp:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if seccomp_mode != 2 {
        failures.push(format!("seccomp mode is {seccomp_mode}, want 2 (filter)"));
    }
    let no_new_privs = status_field(&status, "NoNewPrivs:").as_deref() == Some("1");
    if !no_new_privs {
        failures.push("no_new_privs is not set".to_string());
    }
    let caps = parse_status(&status);
    if !caps.all_empty() {
        failures.push(format!(
            "capabilities remain: inh {:x} prm {:x} eff {:x} bnd {:x} amb {:x}",
            caps.inheritable, caps.permitted, caps.effective, caps.bounding, caps.ambient
        ));
    }
    match landlock {
        Some(l) if l.abi >= expect.landlock_floor && l.enforced != Enforcement::NotEnforced => {}
        Some(l) if expect.landlock_floor == 0 && l.abi == 0 => {}
        Some(l) => failures.push(format!(
            "landlock ABI {} {:?}, want ABI >= {} enforced",
            l.abi, l.enforced, expect.landlock_floor
        )),
        None if expect.landlock_floor == 0 => {}
        None => failures.push("landlock was not applied".to_string()),
    }
    let mut maps_root = false;
    for f in ["/proc/self/uid_map", "/proc/self/gid_map"] {
        match std::fs::read_to_string(f) {
            Ok(m) if map_includes_host_root(&m) => {
                maps_root = true;
                failures.push(format!("{f} maps host root: {}", m.trim()));
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("cannot read {f}: {e}")),
        }
    }
    let root_fs_is_fuse = match nix::sys::statfs::statfs("/") {
        Ok(s) => s.filesystem_type().0 == FUSE_SUPER_MAGIC,
        Err(_) => false,
    };
    if expect.fuse_root && !root_fs_is_fuse {
        failures.push("/ is not the sandbox's FUSE tree".to_string());
    }
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
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn host_root_in_a_map_is_detected() {
        assert!(map_includes_host_root("         0          0 4294967295\n"));
        assert!(!map_includes_host_root("0 268435456 65536\n"));
    }

    #[test]
    fn an_unjailed_process_fails_with_named_reasons() {
        let r = run(
            &Expect {
                fuse_root: true,
                landlock_floor: 1,
            },
            None,
        );
        assert!(!r.passed);
        let all = r.failures.join("\n");
        assert!(all.contains("seccomp mode is 0"), "{all}");
        assert!(all.contains("no_new_privs"), "{all}");
        assert!(all.contains("capabilities remain"), "{all}");
        assert!(all.contains("maps host root"), "{all}");
        assert!(all.contains("FUSE"), "{all}");
    }
}
