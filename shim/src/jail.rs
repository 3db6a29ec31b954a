//! The confinement a per-sandbox component of the broker (a filesystem
//! server today; a network gateway and a device proxy next) applies to
//! itself once it holds the handles it serves from and before it reads a
//! byte of sandbox input.
//!
//! Stages, in order (each only lowers what the process may do):
//! 1. rlimits: open files as the sandbox's limit, no core dumps;
//! 2. capabilities: the bounding set keeps only the named ones, the
//!    ambient set is cleared, effective and permitted become exactly them;
//! 3. `no_new_privs`;
//! 4. landlock: only the component's own paths, with the rights each rule
//!    names; abstract sockets and signals scoped to the component;
//! 5. seccomp: the component's own allow-list, every other system call
//!    refused.

use crate::caps::CapsError;
use crate::landlock::{LandlockError, LandlockStatus, PolicyRule};

/// What to confine a component to.
#[derive(Debug, Clone)]
pub struct ComponentJail<'a> {
    /// Paths beneath which the component may act, with the rights each.
    pub landlock: &'a [PolicyRule],
    /// Lowest landlock ABI accepted.
    pub landlock_floor: u8,
    /// Capabilities kept, each with why it is needed; every other one is
    /// dropped from every set, the bounding set included.
    pub keep_caps: &'a [(u32, &'a str)],
    /// RLIMIT_NOFILE (soft = hard).
    pub nofile: u64,
    /// An allow-list seccomp program ([`crate::seccomp::compile_allow_list`]),
    /// installed last.
    pub seccomp: Option<&'a seccompiler::BpfProgram>,
}

/// What the jail reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailReport {
    /// Landlock ABI and enforcement.
    pub landlock: LandlockStatus,
    /// Bit mask of the capabilities kept.
    pub caps_kept: u64,
}

/// Why a component could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// setrlimit failed.
    #[error("cannot set {what} limit")]
    Rlimit {
        /// Which limit.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Dropping capabilities failed.
    #[error(transparent)]
    Caps(#[from] CapsError),
    /// Landlock failed.
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    /// Installing the seccomp filter failed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Applies `j` to the calling process. Call it while single-threaded, or
/// at least before any other thread of the process runs untrusted work:
/// capability sets are per thread, and threads started later inherit them.
pub fn apply(j: &ComponentJail<'_>) -> Result<JailReport, JailError> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_NOFILE, j.nofile, j.nofile).map_err(|source| JailError::Rlimit {
        what: "open files",
        source,
    })?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|source| JailError::Rlimit {
        what: "core",
        source,
    })?;
    let mask = j
        .keep_caps
        .iter()
        .filter(|(c, _)| *c < 64)
        .fold(0u64, |m, (c, _)| m | (1u64 << c));
    crate::caps::drop_bounding_and_ambient_except(mask)?;
    crate::sys::capset_mask(mask).map_err(CapsError::Capset)?;
    crate::caps::set_no_new_privs()?;
    let landlock = crate::landlock::restrict_self_to(j.landlock, j.landlock_floor)?;
    if let Some(program) = j.seccomp {
        crate::seccomp::install_on_current_thread(program)?;
    }
    Ok(JailReport {
        landlock,
        caps_kept: mask,
    })
}
