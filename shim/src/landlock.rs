//! Landlock for sandboxed processes.
//!
//! Whatever ABI the kernel offers is used (best effort), the ABI reached is
//! reported (and audited by the broker), and a configurable floor refuses to
//! start below it. The policy is one table ([`policy`]) built by a pure
//! function: the FUSE tree is the confinement for files, so everything
//! beneath `/` is allowed except device ioctls, which only terminals get.
//! From ABI 6 on, signals and abstract unix sockets are scoped to the
//! sandbox's own landlock domain, so nothing inside can signal pid 1 or reach
//! an abstract socket outside. Network rights are not handled yet: the net
//! namespace holds loopback only until the network policy lands.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope,
};
use serde::{Deserialize, Serialize};

/// A landlock failure.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The kernel's ABI is below the configured floor.
    #[error("landlock ABI {have} is below the required floor {floor}")]
    BelowFloor {
        /// What the kernel offers.
        have: u8,
        /// What the config requires.
        floor: u8,
    },
    /// Building or applying the ruleset failed.
    #[error("landlock ruleset: {0}")]
    Ruleset(String),
}

/// How well the ruleset was enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Every requested right is enforced.
    FullyEnforced,
    /// Some rights are not known to this kernel.
    PartiallyEnforced,
    /// Nothing is enforced.
    NotEnforced,
}

/// Outcome of [`PreparedLandlock::restrict_self`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockStatus {
    /// ABI in use.
    pub abi: u8,
    /// Enforcement reached.
    pub enforced: Enforcement,
}

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Every handled filesystem right except device ioctls.
    AllButDeviceIoctl,
    /// Everything, device ioctls included.
    All,
}

/// One rule of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// Path beneath which the grant applies.
    pub path: PathBuf,
    /// The grant.
    pub grant: Grant,
    /// Why.
    pub comment: &'static str,
}

/// The policy for a process whose root is `root` (the sandbox's `/`).
pub fn policy(root: &Path) -> Vec<PolicyRule> {
    vec![
        PolicyRule {
            path: root.to_path_buf(),
            grant: Grant::AllButDeviceIoctl,
            comment: "the FUSE tree: writes land in the copy-on-write layer or /workspace",
        },
        PolicyRule {
            path: root.join("dev/pts"),
            grant: Grant::All,
            comment: "terminals need ioctls (termios, window size)",
        },
        PolicyRule {
            path: root.join("dev/tty"),
            grant: Grant::All,
            comment: "the controlling terminal",
        },
        PolicyRule {
            path: root.join("dev/null"),
            grant: Grant::All,
            comment: "programs probe /dev/null with isatty-style ioctls",
        },
    ]
}

/// A ruleset prepared once (by pid 1) and applied in every exec child.
#[derive(Debug)]
pub struct PreparedLandlock {
    ruleset: Option<RulesetCreated>,
    abi: u8,
}

/// The kernel's landlock ABI (0 when unsupported).
pub fn kernel_abi() -> u8 {
    crate::sys::landlock_abi_version()
}

fn abi_of(v: u8) -> ABI {
    ABI::from(i32::from(v))
}

/// Prepares the ruleset for the sandbox rooted at `/`.
pub fn prepare(floor: u8) -> Result<PreparedLandlock, LandlockError> {
    prepare_at(Path::new("/"), floor)
}

/// Prepares the ruleset for a tree rooted at `root` (tests use a tempdir).
pub fn prepare_at(root: &Path, floor: u8) -> Result<PreparedLandlock, LandlockError> {
    let have = kernel_abi();
    if have < floor {
        return Err(LandlockError::BelowFloor { have, floor });
    }
    if have == 0 {
        return Ok(PreparedLandlock {
            ruleset: None,
            abi: 0,
        });
    }
    let abi = abi_of(have);
    let err = |e: landlock::RulesetError| LandlockError::Ruleset(e.to_string());
    let all = AccessFs::from_all(abi);
    let no_ioctl = all & !BitFlags::from(AccessFs::IoctlDev);
    let mut rs = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(err)?;
    if have >= 6 {
        rs = rs.scope(Scope::from_all(abi)).map_err(err)?;
    }
    let mut created = rs.create().map_err(err)?;
    for rule in policy(root) {
        let Ok(fd) = PathFd::new(&rule.path) else {
            // A path the tree lacks (e.g. no /dev/tty) is simply not granted.
            continue;
        };
        let access = match rule.grant {
            Grant::All => all,
            Grant::AllButDeviceIoctl => no_ioctl,
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
    }
    Ok(PreparedLandlock {
        ruleset: Some(created),
        abi: have,
    })
}

impl PreparedLandlock {
    /// The kernel ABI this ruleset was built for.
    pub fn abi(&self) -> u8 {
        self.abi
    }

    /// Restricts the calling process (no_new_privs must be set); the
    /// prepared ruleset stays usable for the next child.
    pub fn restrict_self(&self) -> Result<LandlockStatus, LandlockError> {
        let Some(rs) = &self.ruleset else {
            return Ok(LandlockStatus {
                abi: 0,
                enforced: Enforcement::NotEnforced,
            });
        };
        let copy = rs
            .try_clone()
            .map_err(|e| LandlockError::Ruleset(e.to_string()))?;
        let st = copy
            .restrict_self()
            .map_err(|e| LandlockError::Ruleset(e.to_string()))?;
        let enforced = match st.ruleset {
            RulesetStatus::FullyEnforced => Enforcement::FullyEnforced,
            RulesetStatus::PartiallyEnforced => Enforcement::PartiallyEnforced,
            _ => Enforcement::NotEnforced,
        };
        Ok(LandlockStatus {
            abi: self.abi,
            enforced,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn policy_grants_device_ioctls_only_to_terminals() {
        let p = policy(Path::new("/r"));
        assert_eq!(p[0].grant, Grant::AllButDeviceIoctl);
        assert_eq!(p[0].path, Path::new("/r"));
        for r in &p[1..] {
            assert!(r.path.starts_with("/r/dev"), "{r:?}");
        }
    }

    #[test]
    fn floor_above_the_kernel_is_refused() {
        assert!(matches!(
            prepare_at(Path::new("/"), 200),
            Err(LandlockError::BelowFloor { floor: 200, .. })
        ));
    }

    #[test]
    fn restricted_child_is_enforced_and_cannot_signal_outside() {
        let dir = tempfile::tempdir().unwrap();
        let prepared = prepare_at(dir.path(), 1).unwrap();
        let parent = nix::unistd::getpid();
        let (r, w) = nix::unistd::pipe().unwrap();
        match crate::sys::fork_single_threaded().unwrap() {
            crate::sys::Forked::Child => {
                drop(r);
                let _ = nix::sys::prctl::set_no_new_privs();
                let msg = match prepared.restrict_self() {
                    Ok(st) => {
                        let outside = std::fs::read_to_string("/etc/hostname").is_ok();
                        let sig = nix::sys::signal::kill(parent, None::<nix::sys::signal::Signal>);
                        format!(
                            "{:?} outside={outside} signal={:?} abi={}",
                            st.enforced,
                            sig.err(),
                            st.abi
                        )
                    }
                    Err(e) => format!("error {e}"),
                };
                let _ = nix::unistd::write(&w, msg.as_bytes());
                crate::sys::exit_now(0)
            }
            crate::sys::Forked::Parent(pid) => {
                drop(w);
                let mut s = String::new();
                std::fs::File::from(r).read_to_string(&mut s).unwrap();
                nix::sys::wait::waitpid(pid, None).unwrap();
                assert!(s.starts_with("FullyEnforced outside=false"), "{s}");
                if kernel_abi() >= 6 {
                    assert!(s.contains("signal=Some(EPERM)"), "{s}");
                }
            }
        }
    }
}
