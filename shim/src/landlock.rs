//! Landlock for sandboxed commands.
//!
//! The shim's pid 1 prepares one ruleset after it has pivoted into the
//! sandbox's FUSE root ([`prepare`]), and every exec child applies a copy of
//! it ([`PreparedLandlock::restrict_self`]) just before seccomp. The ABI used
//! is the best the kernel offers (best effort, as far as this crate knows);
//! the ABI reached is reported so the broker can audit it, and [`prepare`]
//! fails when the kernel is below the configured floor.
//!
//! The policy is one table ([`policy`]) turned into exact access masks by a
//! pure function ([`plan`]): the FUSE tree is itself the confinement for
//! files (writes land in a copy-on-write layer), so every filesystem right of
//! the reached ABI is granted beneath `/` except device ioctls, which only the
//! terminal devices get. From ABI 6 on, signals and abstract unix sockets are
//! scoped to the command's own landlock domain: nothing inside can signal the
//! shim's pid 1 or connect to an abstract socket created outside. Network
//! rights (TCP bind/connect) are not handled yet: the sandbox's network
//! namespace has loopback only until the network policy lands.

use std::io;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, PathFdError,
    Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope,
};
use serde::{Deserialize, Serialize};

/// A landlock failure.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The kernel's ABI is below the configured floor.
    #[error("landlock ABI {have} is below the required floor {floor}")]
    BelowFloor {
        /// What the kernel offers (0: no landlock).
        have: u8,
        /// What the configuration requires.
        floor: u8,
    },
    /// A required policy path could not be opened.
    #[error("cannot open landlock policy path {path}")]
    Path {
        /// The path.
        path: PathBuf,
        /// What opening it said.
        #[source]
        source: PathFdError,
    },
    /// Creating the ruleset or adding a rule failed.
    #[error("cannot build the landlock ruleset (ABI {abi})")]
    Ruleset {
        /// The ABI the ruleset was built for.
        abi: u8,
        /// What the landlock crate said.
        #[source]
        source: RulesetError,
    },
    /// Duplicating the prepared ruleset's descriptor failed.
    #[error("cannot duplicate the prepared landlock ruleset")]
    Clone(#[source] io::Error),
    /// `landlock_restrict_self` failed.
    #[error("cannot restrict the calling process with landlock (ABI {abi})")]
    Restrict {
        /// The ABI of the ruleset.
        abi: u8,
        /// What the landlock crate said.
        #[source]
        source: RulesetError,
    },
}

/// How well the ruleset was enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Every requested right is enforced.
    FullyEnforced,
    /// Some requested rights are unknown to this kernel.
    PartiallyEnforced,
    /// Nothing is enforced (no landlock).
    NotEnforced,
}

/// Outcome of [`PreparedLandlock::restrict_self`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockStatus {
    /// ABI the ruleset was built for (0: none).
    pub abi: u8,
    /// Enforcement reached.
    pub enforced: Enforcement,
}

/// What a policy rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Every handled filesystem right except `IOCTL_DEV`.
    AllButDeviceIoctl,
    /// `IOCTL_DEV` only (on top of what the root rule gives).
    DeviceIoctl,
    /// Reading files, listing directories and executing files beneath the
    /// path (a FUSE passthrough open for execve is made with the server's
    /// credentials, its landlock domain included).
    Read,
    /// Listing the directory itself and the directories beneath it; no
    /// file contents.
    ReadDir,
    /// Every handled right, device ioctls included.
    All,
}

/// One rule of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// Path beneath which the grant applies.
    pub path: PathBuf,
    /// The grant.
    pub grant: Grant,
    /// Whether a missing path is an error (else the rule is skipped).
    pub required: bool,
    /// Why the rule exists.
    pub comment: &'static str,
}

/// The policy for a process whose root is `root` (the sandbox's `/` in
/// production; tests pass a temporary directory).
pub fn policy(root: &Path) -> Vec<PolicyRule> {
    policy_with_devices(root, &[])
}

/// [`policy`] plus device ioctls on the granted GPU nodes `dev/NAME`
/// (`nvidiactl`, `nvidia0`, `nvidia-uvm`): their ioctls reach the sandbox's
/// device proxy through seccomp notification (and the device proxy's
/// duplicate of the file carries the rights of the sandbox's open), the
/// admitted UVM numbers run natively.
pub fn policy_with_devices(root: &Path, devices: &[String]) -> Vec<PolicyRule> {
    let mut rules = base_policy(root);
    rules.extend(devices.iter().map(|d| PolicyRule {
        path: root.join("dev").join(d),
        grant: Grant::DeviceIoctl,
        required: true,
        comment: "a granted GPU node: each ioctl is checked by the sandbox's device proxy \
                  against the host driver's ABI table before the driver sees it",
    }));
    rules
}

fn base_policy(root: &Path) -> Vec<PolicyRule> {
    let terminal = |p: &str, comment| PolicyRule {
        path: root.join(p),
        grant: Grant::DeviceIoctl,
        required: false,
        comment,
    };
    vec![
        PolicyRule {
            path: root.to_path_buf(),
            grant: Grant::AllButDeviceIoctl,
            required: true,
            comment: "the sandbox's FUSE tree is itself the confinement: reads come from the \
                      image, writes land in its copy-on-write layer",
        },
        terminal(
            "dev/pts",
            "pseudo-terminals need termios and window-size ioctls",
        ),
        terminal(
            "dev/ptmx",
            "opening a new pseudo-terminal pair (TIOCGPTN, TIOCSPTLCK)",
        ),
        terminal("dev/tty", "the controlling terminal (termios, job control)"),
        terminal(
            "dev/null",
            "programs probe stdio with isatty-style ioctls, and stdio is often /dev/null",
        ),
    ]
}

/// A planned rule: a path and the exact rights granted beneath it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRule {
    /// The path.
    pub path: PathBuf,
    /// The rights granted beneath it.
    pub access: BitFlags<AccessFs>,
    /// Whether a missing path is an error.
    pub required: bool,
    /// Why.
    pub comment: &'static str,
}

/// The ruleset for one ABI, before any system call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandlockPlan {
    /// The ABI planned for.
    pub abi: u8,
    /// Filesystem rights handled (denied unless a rule grants them).
    pub handled: BitFlags<AccessFs>,
    /// Scopes (ABI 6 and up).
    pub scopes: BitFlags<Scope>,
    /// Rules with a non-empty grant.
    pub rules: Vec<PlannedRule>,
}

/// Turns the policy into exact rights for `abi`: all filesystem rights of the
/// ABI are handled; rules whose grant is empty at this ABI (device ioctls
/// before ABI 5) are dropped. Pure.
pub fn plan(abi: u8, rules: &[PolicyRule]) -> LandlockPlan {
    let handled = AccessFs::from_all(abi_of(abi));
    let ioctl = handled & BitFlags::from(AccessFs::IoctlDev);
    let scopes = if abi >= 6 {
        Scope::AbstractUnixSocket | Scope::Signal
    } else {
        BitFlags::EMPTY
    };
    let rules = rules
        .iter()
        .map(|r| PlannedRule {
            path: r.path.clone(),
            access: match r.grant {
                Grant::AllButDeviceIoctl => handled & !ioctl,
                Grant::DeviceIoctl => ioctl,
                Grant::Read => {
                    handled & (AccessFs::ReadFile | AccessFs::ReadDir | AccessFs::Execute)
                }
                Grant::ReadDir => handled & BitFlags::from(AccessFs::ReadDir),
                Grant::All => handled,
            },
            required: r.required,
            comment: r.comment,
        })
        .filter(|r| !r.access.is_empty())
        .collect();
    LandlockPlan {
        abi,
        handled,
        scopes,
        rules,
    }
}

/// A ruleset prepared once (by pid 1) and applied in every exec child.
#[derive(Debug)]
pub struct PreparedLandlock {
    ruleset: Option<RulesetCreated>,
    abi: u8,
}

/// The kernel's landlock ABI (0 when landlock is missing or disabled).
pub fn kernel_abi() -> u8 {
    u8::try_from(crate::sys::landlock_version()).unwrap_or(0)
}

/// The crate's ABI value for a kernel ABI number (numbers beyond what the
/// crate knows map to the newest it knows).
fn abi_of(v: u8) -> ABI {
    ABI::from(i32::from(v))
}

/// The ABI we use: the kernel's, capped at the newest this crate knows.
fn reached_abi(kernel: u8) -> u8 {
    let mut v = kernel;
    while v > 0 && abi_of(v) as i32 != i32::from(v) {
        v -= 1;
    }
    v
}

/// Prepares the ruleset for the sandbox rooted at `/` (call after
/// pivot_root). Fails when the kernel's ABI is below `floor`.
pub fn prepare(floor: u8, devices: &[String]) -> Result<PreparedLandlock, LandlockError> {
    prepare_with(Path::new("/"), floor, devices)
}

/// Prepares the ruleset for a tree rooted at `root`.
pub fn prepare_at(root: &Path, floor: u8) -> Result<PreparedLandlock, LandlockError> {
    prepare_with(root, floor, &[])
}

/// Prepares the ruleset for a tree rooted at `root` with device ioctls on
/// the GPU nodes `devices` (see [`policy_with_devices`]).
fn prepare_with(
    root: &Path,
    floor: u8,
    devices: &[String],
) -> Result<PreparedLandlock, LandlockError> {
    let have = kernel_abi();
    if have < floor {
        return Err(LandlockError::BelowFloor { have, floor });
    }
    let abi = reached_abi(have);
    if abi == 0 {
        return Ok(PreparedLandlock { ruleset: None, abi });
    }
    let plan = plan(abi, &policy_with_devices(root, devices));
    let ruleset = build(&plan)?;
    Ok(PreparedLandlock {
        ruleset: Some(ruleset),
        abi,
    })
}

/// Creates the kernel ruleset for a plan (opens each path).
fn build(plan: &LandlockPlan) -> Result<RulesetCreated, LandlockError> {
    let err = |source| LandlockError::Ruleset {
        abi: plan.abi,
        source,
    };
    let mut rs = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(plan.handled)
        .map_err(err)?;
    if !plan.scopes.is_empty() {
        rs = rs.scope(plan.scopes).map_err(err)?;
    }
    let mut created = rs.create().map_err(err)?;
    for rule in &plan.rules {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            Err(_) if !rule.required => continue,
            Err(source) => {
                return Err(LandlockError::Path {
                    path: rule.path.clone(),
                    source,
                });
            }
        };
        // A rule on a file (or device) may only grant rights that apply to
        // files; directory rights there would make the ruleset "partially
        // enforced" for no reason.
        let is_dir = {
            use std::os::fd::AsFd;
            nix::sys::stat::fstat(fd.as_fd())
                .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                .unwrap_or(true)
        };
        let access = if is_dir {
            rule.access
        } else {
            rule.access & AccessFs::from_file(abi_of(plan.abi))
        };
        if access.is_empty() {
            continue;
        }
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
    }
    Ok(created)
}

/// Restricts the calling process to `rules` (every right of the kernel's
/// ABI handled, so whatever no rule grants is denied, plus the abstract
/// socket and signal scopes). For a component of the broker confining
/// itself to its own handles before it serves. Fails when the kernel's ABI
/// is below `floor`; a kernel without landlock reports `NotEnforced`.
pub fn restrict_self_to(rules: &[PolicyRule], floor: u8) -> Result<LandlockStatus, LandlockError> {
    let have = kernel_abi();
    if have < floor {
        return Err(LandlockError::BelowFloor { have, floor });
    }
    let abi = reached_abi(have);
    if abi == 0 {
        return Ok(LandlockStatus {
            abi: 0,
            enforced: Enforcement::NotEnforced,
        });
    }
    let ruleset = build(&plan(abi, rules))?;
    PreparedLandlock {
        ruleset: Some(ruleset),
        abi,
    }
    .restrict_self()
}

impl PreparedLandlock {
    /// The ABI this ruleset was built for (0: landlock unavailable).
    pub fn abi(&self) -> u8 {
        self.abi
    }

    /// Restricts the calling process with a copy of the prepared ruleset;
    /// the prepared one stays usable for the next child. Sets no_new_privs
    /// if the caller has not.
    pub fn restrict_self(&self) -> Result<LandlockStatus, LandlockError> {
        let Some(rs) = &self.ruleset else {
            return Ok(LandlockStatus {
                abi: 0,
                enforced: Enforcement::NotEnforced,
            });
        };
        let copy = rs.try_clone().map_err(LandlockError::Clone)?;
        let st = copy
            .restrict_self()
            .map_err(|source| LandlockError::Restrict {
                abi: self.abi,
                source,
            })?;
        let enforced = match st.ruleset {
            RulesetStatus::FullyEnforced => Enforcement::FullyEnforced,
            RulesetStatus::PartiallyEnforced => Enforcement::PartiallyEnforced,
            RulesetStatus::NotEnforced => Enforcement::NotEnforced,
        };
        Ok(LandlockStatus {
            abi: self.abi,
            enforced,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::fd::AsRawFd;

    use super::*;
    use crate::selftest::tests::run_in_child;

    #[test]
    fn granted_gpu_nodes_get_device_ioctls_and_nothing_else_does() {
        let rules = policy_with_devices(Path::new("/r"), &["nvidiactl".into(), "nvidia0".into()]);
        let p = plan(5, &rules);
        let ioctl: Vec<_> = p
            .rules
            .iter()
            .filter(|r| r.access.contains(AccessFs::IoctlDev))
            .map(|r| r.path.clone())
            .collect();
        assert!(ioctl.contains(&PathBuf::from("/r/dev/nvidiactl")));
        assert!(ioctl.contains(&PathBuf::from("/r/dev/nvidia0")));
        assert!(!ioctl.contains(&PathBuf::from("/r")));
        let gpu = p
            .rules
            .iter()
            .find(|r| r.path.ends_with("nvidia0"))
            .unwrap();
        assert_eq!(gpu.access, BitFlags::from(AccessFs::IoctlDev));
        assert!(gpu.required, "a missing granted node is an error");
    }

    #[test]
    fn plan_grants_device_ioctls_only_to_terminals() {
        let p = plan(7, &policy(Path::new("/r")));
        assert_eq!(p.handled, AccessFs::from_all(ABI::V7));
        assert!(p.handled.contains(AccessFs::IoctlDev));
        assert_eq!(p.scopes, Scope::AbstractUnixSocket | Scope::Signal);
        assert_eq!(p.rules[0].path, Path::new("/r"));
        assert_eq!(p.rules[0].access, p.handled & !AccessFs::IoctlDev);
        assert!(p.rules[0].required);
        let dev: Vec<_> = p.rules[1..].iter().map(|r| r.path.clone()).collect();
        assert_eq!(
            dev,
            ["/r/dev/pts", "/r/dev/ptmx", "/r/dev/tty", "/r/dev/null"]
                .map(PathBuf::from)
                .to_vec()
        );
        for r in &p.rules[1..] {
            assert_eq!(r.access, BitFlags::from(AccessFs::IoctlDev), "{r:?}");
        }
        assert!(p.rules.iter().all(|r| !r.comment.is_empty()));
    }

    #[test]
    fn plan_follows_the_abi() {
        let v4 = plan(4, &policy(Path::new("/")));
        assert!(!v4.handled.contains(AccessFs::IoctlDev));
        assert_eq!(v4.rules.len(), 1, "no device rules without IOCTL_DEV");
        assert!(v4.scopes.is_empty());
        let v5 = plan(5, &policy(Path::new("/")));
        assert!(v5.handled.contains(AccessFs::IoctlDev));
        assert!(v5.scopes.is_empty());
        assert_eq!(v5.rules.len(), 5);
    }

    #[test]
    fn reached_abi_is_capped_to_what_the_crate_knows() {
        assert_eq!(reached_abi(0), 0);
        assert_eq!(reached_abi(6), 6);
        assert_eq!(reached_abi(200), abi_of(200) as u8);
    }

    #[test]
    fn floor_above_the_kernel_is_refused() {
        let e = prepare(200, &[]).unwrap_err();
        assert!(
            matches!(e, LandlockError::BelowFloor { floor: 200, .. }),
            "{e}"
        );
        assert!(e.to_string().ends_with("below the required floor 200"));
    }

    #[test]
    fn kernel_abi_is_reported() {
        // Any value is possible; it must not change between calls.
        assert_eq!(kernel_abi(), kernel_abi());
    }

    fn errno_of<T>(r: nix::Result<T>) -> String {
        match r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e:?}"),
        }
    }

    #[allow(unsafe_code)]
    fn ioctl_int(fd: &std::fs::File, req: libc::c_ulong) -> nix::Result<libc::c_int> {
        let mut out: libc::c_int = 0;
        // SAFETY: the requests used here (RNDGETENTCNT, FIONREAD) write at
        // most one int; `out` is a live, writable int for the whole call.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::addr_of_mut!(out)) };
        nix::errno::Errno::result(ret)
    }

    /// RNDGETENTCNT: `_IOR('R', 0x00, int)`, allowed to anyone without landlock.
    const RNDGETENTCNT: libc::c_ulong = 0x8004_5200;
    /// FIONREAD (`0x541B`): /dev/null answers ENOTTY without landlock.
    const FIONREAD: libc::c_ulong = 0x541B;

    #[test]
    fn restricted_children_are_enforced_and_scoped() {
        let kernel = kernel_abi();
        if kernel == 0 {
            eprintln!("landlock unavailable here; nothing to test");
            return;
        }
        let prepared = prepare(1, &[]).unwrap();
        assert_eq!(prepared.abi(), reached_abi(kernel));
        let parent = nix::unistd::getpid();
        // Two children from one preparation: restrict_self must not consume it.
        for _ in 0..2 {
            let out = run_in_child(|| {
                crate::caps::set_no_new_privs().unwrap();
                let st = prepared.restrict_self().unwrap();
                let urandom = std::fs::File::open("/dev/urandom").unwrap();
                let null = std::fs::File::open("/dev/null").unwrap();
                let read = std::fs::read("/proc/self/status").is_ok();
                format!(
                    "{:?} {} urandom={} null={} read={read} signal={}",
                    st.enforced,
                    st.abi,
                    errno_of(ioctl_int(&urandom, RNDGETENTCNT)),
                    errno_of(ioctl_int(&null, FIONREAD)),
                    errno_of(nix::sys::signal::kill(parent, None)),
                )
            });
            let abi = prepared.abi();
            let want_signal = if abi >= 6 { "EPERM" } else { "ok" };
            let want_urandom = if abi >= 5 { "EACCES" } else { "ok" };
            assert_eq!(
                out,
                format!(
                    "FullyEnforced {abi} urandom={want_urandom} null=ENOTTY read=true \
                     signal={want_signal}"
                )
            );
        }
    }

    #[test]
    fn a_tempdir_root_confines_files() {
        if kernel_abi() == 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let prepared = prepare_at(dir.path(), 1).unwrap();
        let inside = dir.path().join("file");
        let out = run_in_child(|| {
            crate::caps::set_no_new_privs().unwrap();
            prepared.restrict_self().unwrap();
            let write = std::fs::write(&inside, b"x").map_err(|e| e.kind());
            let outside = std::fs::read("/etc/passwd").map_err(|e| e.raw_os_error());
            format!("write={write:?} outside={outside:?}")
        });
        assert_eq!(
            out,
            format!("write=Ok(()) outside=Err(Some({}))", libc::EACCES)
        );
    }
}
