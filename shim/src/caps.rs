//! Capability dropping for jailed processes, and reading the sets back.
//!
//! The shim's pid 1 is uid 0 of the sandbox's user namespace and holds a full
//! capability set there. An exec child gives up all of it but [`caps_for`]
//! its user before it runs a command: first the bounding and ambient sets
//! (this needs CAP_SETPCAP, so it runs before the switch to the target
//! user), then, after the lead's setresuid, the effective, permitted and
//! inheritable sets (capset to exactly the kept set, which also works for
//! uid 0), then `no_new_privs`, so that no later execve (setuid binaries,
//! file capabilities) can grant anything back.
//!
//! Sandbox root keeps [`ROOT_CAPS`], a container root's file and process
//! capabilities, so it is root over the sandbox's own files (chown, any
//! mode, setuid to any sandbox user). They are capabilities in the
//! sandbox's user namespace only: the kernel lets them act on inodes whose
//! owner and group are mapped there (the sandbox's own 65536 ids) and on
//! processes of that namespace, never on anything of the host's. Every
//! other user keeps none.
//! [`current_sets`] reads the result back from `/proc/self/status` for the
//! self-test.

use std::io;

use serde::{Deserialize, Serialize};

/// Capability numbers (linux/capability.h).
pub mod cap {
    /// Change file owners and groups.
    pub const CHOWN: u32 = 0;
    /// Bypass file read, write and execute permission checks.
    pub const DAC_OVERRIDE: u32 = 1;
    /// Bypass checks that need the file's owner (chmod, utimes...).
    pub const FOWNER: u32 = 3;
    /// Keep set-user/group-id bits when a file is written.
    pub const FSETID: u32 = 4;
    /// Signal processes of other users.
    pub const KILL: u32 = 5;
    /// Change group ids.
    pub const SETGID: u32 = 6;
    /// Change user ids.
    pub const SETUID: u32 = 7;
    /// Bind ports below 1024.
    pub const NET_BIND_SERVICE: u32 = 10;
    /// Write to the kernel's audit log (refused anyway outside the host's
    /// user namespace; some login tools insist on holding it).
    pub const AUDIT_WRITE: u32 = 29;
    /// Set file capabilities (they grant nothing under `no_new_privs`).
    pub const SETFCAP: u32 = 31;
}

/// What sandbox root holds, in the sandbox's user namespace only: what a
/// container's root needs over its own files and processes. Not
/// CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_PTRACE, CAP_MKNOD,
/// CAP_DAC_READ_SEARCH, CAP_SETPCAP or any other.
pub const ROOT_CAPS: u64 = (1 << cap::CHOWN)
    | (1 << cap::DAC_OVERRIDE)
    | (1 << cap::FOWNER)
    | (1 << cap::FSETID)
    | (1 << cap::KILL)
    | (1 << cap::SETGID)
    | (1 << cap::SETUID)
    | (1 << cap::NET_BIND_SERVICE)
    | (1 << cap::AUDIT_WRITE)
    | (1 << cap::SETFCAP);

/// The capabilities a command run as sandbox user `uid` keeps.
pub fn caps_for(uid: u32) -> u64 {
    if uid == 0 { ROOT_CAPS } else { 0 }
}

/// A capability operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// Dropping one capability from the bounding set failed.
    #[error("cannot drop capability {cap} from the bounding set")]
    DropBounding {
        /// The capability number.
        cap: u32,
        /// What prctl said.
        #[source]
        source: io::Error,
    },
    /// Clearing the ambient set failed.
    #[error("cannot clear the ambient capability set")]
    ClearAmbient(#[source] io::Error),
    /// capset to the kept set failed.
    #[error("cannot set the effective, permitted and inheritable capability sets")]
    Capset(#[source] io::Error),
    /// Setting no_new_privs failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    /// `/proc/self/status` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: &'static str,
        /// What the read said.
        #[source]
        source: io::Error,
    },
    /// A `Cap*` line is missing or not hex.
    #[error("capability field {field} in /proc/self/status is missing or not hex: {seen:?}")]
    Field {
        /// The field name, e.g. `CapEff`.
        field: &'static str,
        /// The text seen (empty when missing).
        seen: String,
    },
    /// The kernel's last capability could not be found.
    #[error("cannot find the kernel's last capability (cap_last_cap {seen:?})")]
    LastCap {
        /// What `/proc/sys/kernel/cap_last_cap` held, if readable.
        seen: String,
    },
}

/// The five capability sets of a process, as in `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSets {
    /// CapInh.
    pub inheritable: u64,
    /// CapPrm.
    pub permitted: u64,
    /// CapEff.
    pub effective: u64,
    /// CapBnd.
    pub bounding: u64,
    /// CapAmb.
    pub ambient: u64,
}

impl CapSets {
    /// Whether all five sets are empty.
    pub fn all_empty(&self) -> bool {
        *self == CapSets::default()
    }
}

/// The highest capability number the kernel knows: from
/// `/proc/sys/kernel/cap_last_cap`, or, when that is not readable (a fresh
/// /proc that hides sysctls), by probing the bounding set with
/// `PR_CAPBSET_READ`, which fails with EINVAL past the last capability.
pub fn last_cap() -> Result<u32, CapsError> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap");
    if let Ok(Ok(n)) = text.as_deref().map(|t| t.trim().parse::<u32>()) {
        return Ok(n);
    }
    let mut last = None;
    for cap in 0..64u32 {
        match crate::sys::prctl_int(libc::PR_CAPBSET_READ, cap.into()) {
            Ok(_) => last = Some(cap),
            Err(_) => break,
        }
    }
    last.ok_or_else(|| CapsError::LastCap {
        seen: text.unwrap_or_default(),
    })
}

/// Drops every capability (0 up to [`last_cap`]) from the bounding set and
/// clears the ambient set. Needs CAP_SETPCAP, so it runs before the switch to
/// the target user.
pub fn drop_bounding_and_ambient() -> Result<(), CapsError> {
    drop_bounding_and_ambient_except(0)
}

/// Like [`drop_bounding_and_ambient`], keeping the capabilities whose bits
/// are set in `keep` (bit n is capability n) in the bounding set.
pub fn drop_bounding_and_ambient_except(keep: u64) -> Result<(), CapsError> {
    for cap in 0..=last_cap()? {
        if cap < 64 && keep & (1u64 << cap) != 0 {
            continue;
        }
        crate::sys::prctl_int(libc::PR_CAPBSET_DROP, cap.into())
            .map_err(|source| CapsError::DropBounding { cap, source })?;
    }
    crate::sys::prctl_int(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )
    .map_err(CapsError::ClearAmbient)?;
    Ok(())
}

/// Empties the effective, permitted and inheritable sets of the calling
/// thread (also for uid 0, whose sets would otherwise survive execve).
pub fn clear_all_capability_sets() -> Result<(), CapsError> {
    crate::sys::capset_all_zero().map_err(CapsError::Capset)
}

/// Makes the effective and permitted sets of the calling thread exactly
/// `keep` and empties the inheritable set. Only lowers.
pub fn keep_only(keep: u64) -> Result<(), CapsError> {
    crate::sys::capset_mask(keep).map_err(CapsError::Capset)
}

/// Sets `no_new_privs`: execve can never grant privileges again. Seccomp and
/// landlock require it of an unprivileged caller.
pub fn set_no_new_privs() -> Result<(), CapsError> {
    nix::sys::prctl::set_no_new_privs().map_err(CapsError::NoNewPrivs)
}

/// The calling process's capability sets, from `/proc/self/status`.
pub fn current_sets() -> Result<CapSets, CapsError> {
    let path = "/proc/self/status";
    let text = std::fs::read_to_string(path).map_err(|source| CapsError::Read { path, source })?;
    parse_status(&text)
}

/// The value of field `key` (without the colon) of a `/proc/PID/status` text.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then_some(v.trim())
    })
}

/// Parses the `Cap*` lines of a `/proc/PID/status` text.
pub fn parse_status(text: &str) -> Result<CapSets, CapsError> {
    let get = |field: &'static str| {
        let seen = status_field(text, field).unwrap_or("");
        u64::from_str_radix(seen, 16).map_err(|_| CapsError::Field {
            field,
            seen: seen.to_string(),
        })
    };
    Ok(CapSets {
        inheritable: get("CapInh")?,
        permitted: get("CapPrm")?,
        effective: get("CapEff")?,
        bounding: get("CapBnd")?,
        ambient: get("CapAmb")?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::selftest::tests::run_in_child;

    #[test]
    fn parse_reads_hex_sets() {
        let s = parse_status(
            "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
             CapEff:\t0\nCapBnd:\t1\nCapAmb:\t0\n",
        )
        .unwrap();
        assert_eq!(s.permitted, 0x1ff_ffff_ffff);
        assert_eq!(s.bounding, 1);
        assert!(!s.all_empty());
    }

    #[test]
    fn parse_names_a_missing_field() {
        let e = parse_status("CapInh:\t0\nCapPrm:\t0\nCapEff:\tzz\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "capability field CapEff in /proc/self/status is missing or not hex: \"zz\""
        );
    }

    #[test]
    fn last_cap_is_sane() {
        let n = last_cap().unwrap();
        assert!((30..64).contains(&n), "{n}");
    }

    #[test]
    fn current_sets_reads_this_process() {
        current_sets().unwrap();
    }

    #[test]
    fn a_jailed_child_has_no_capabilities_left() {
        let out = run_in_child(|| {
            let res = drop_bounding_and_ambient()
                .and_then(|()| clear_all_capability_sets())
                .and_then(|()| set_no_new_privs())
                .and_then(|()| current_sets());
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let nnp = status_field(&status, "NoNewPrivs")
                .unwrap_or("?")
                .to_string();
            match res {
                Ok(s) => format!("{s:?} nnp={nnp}"),
                Err(e) => format!("error {e}"),
            }
        });
        assert_eq!(
            out,
            format!("{:?} nnp=1", CapSets::default()),
            "child reported {out}"
        );
    }
}
