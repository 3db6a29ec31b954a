//! Capability dropping for jailed processes, and reading the sets back.
//!
//! The shim's pid 1 is uid 0 of the sandbox's user namespace and holds a full
//! capability set there. An exec child gives all of it up before it runs a
//! command: first the bounding and ambient sets (this needs CAP_SETPCAP, so
//! it runs before the switch to the target user), then, after the lead's
//! setresuid, the effective, permitted and inheritable sets (capset with all
//! zero, which also works for uid 0), then `no_new_privs`, so that no later
//! execve (setuid binaries, file capabilities) can grant anything back.
//! [`current_sets`] reads the result back from `/proc/self/status` for the
//! self-test.

use std::io;

use serde::{Deserialize, Serialize};

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
    /// capset with all sets empty failed.
    #[error("cannot clear the effective, permitted and inheritable capability sets")]
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
