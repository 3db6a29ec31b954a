//! The seccomp filter every sandboxed command runs under.
//!
//! The profile is data, not code: `shim/seccomp/sandbox.json` lists one rule
//! per denied syscall (or syscall/argument combination), each with a comment
//! saying why. Everything the profile does not name is allowed; the kernel's
//! own checks (the user namespace, capabilities already dropped, landlock)
//! still apply to it. This module parses that file with a small schema of our
//! own, checks it (known syscalls and errnos, no duplicate rules), and builds
//! [`seccompiler::SeccompFilter`]s through seccompiler's Rust API, one per
//! errno the profile answers with (`EPERM` by default; `clone3` answers
//! `ENOSYS` so glibc falls back to `clone`, whose flags can be inspected). The
//! per-errno programs are chained into one BPF program: in every program but
//! the last, "allow" becomes "jump to the next program".
//!
//! The filter kills a process that makes a system call for another
//! architecture (seccompiler's architecture check; this covers i386). On
//! x86_64 the x32 ABI shares the architecture value, so every rule is also
//! applied to the syscall's x32 number (`nr | 0x4000_0000`) and x32 is no way
//! around the profile.
//!
//! The shim's pid 1 compiles the program once with
//! [`compile_sandbox_profile`]; each exec child installs it with
//! [`install_on_current_thread`] as the last step of its jail, after
//! `no_new_privs`.

use std::collections::{BTreeMap, BTreeSet};

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch, sock_filter,
};
use serde::{Deserialize, Serialize};

/// Version of the profile compiled into this shim (the `version` field of
/// `shim/seccomp/sandbox.json`; [`profile`] fails if they differ). The shim
/// reports it to the broker, which records it in the audit log.
pub const PROFILE_VERSION: &str = "1";

/// The compiled program pid 1 prepares once and every exec child installs.
pub type SandboxFilter = BpfProgram;

/// The profile's JSON text, as shipped.
const PROFILE_JSON: &str = include_str!("../seccomp/sandbox.json");

/// Bit the x86_64 kernel sets in the syscall number for the x32 ABI.
pub const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// What can go wrong reading, compiling or installing the profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile is not valid JSON or does not fit the schema.
    #[error("seccomp profile is not valid")]
    Parse(#[source] serde_json::Error),
    /// The profile's `version` differs from [`PROFILE_VERSION`].
    #[error("seccomp profile version {found:?} differs from the compiled-in version {expected:?}")]
    Version {
        /// The version in the JSON.
        found: String,
        /// [`PROFILE_VERSION`].
        expected: &'static str,
    },
    /// A rule names a syscall this architecture does not know.
    #[error("unknown syscall {0:?} in the seccomp profile for this architecture")]
    UnknownSyscall(String),
    /// A rule or the profile names an errno we do not know.
    #[error("unknown errno {0:?} in the seccomp profile")]
    UnknownErrno(String),
    /// A rule names an architecture we do not know.
    #[error("unknown architecture {arch:?} in the seccomp rule for {syscall}")]
    UnknownArch {
        /// The rule's syscall.
        syscall: String,
        /// The unknown name.
        arch: String,
    },
    /// A numeric value in the profile could not be read.
    #[error("bad number {value:?} in the seccomp rule for {syscall}")]
    BadNumber {
        /// The rule's syscall.
        syscall: String,
        /// The text that is not a number.
        value: String,
    },
    /// Two rules say the same thing.
    #[error("duplicate seccomp rule for {0} (same syscall and arguments twice)")]
    DuplicateRule(String),
    /// Rules for one syscall that cannot be combined.
    #[error("conflicting seccomp rules for {syscall}: {why}")]
    Conflict {
        /// The syscall.
        syscall: String,
        /// What conflicts.
        why: &'static str,
    },
    /// An argument condition is malformed (bad index, missing mask).
    #[error("invalid argument condition in the seccomp rule for {syscall}")]
    Condition {
        /// The rule's syscall.
        syscall: String,
        /// What seccompiler said.
        #[source]
        source: BackendError,
    },
    /// A `masked_eq` condition without a mask, or a mask on another operator.
    #[error(
        "argument {index} of the seccomp rule for {syscall}: mask is only for masked_eq, which needs one"
    )]
    Mask {
        /// The rule's syscall.
        syscall: String,
        /// The argument index.
        index: u8,
    },
    /// Seccompiler could not build the filter for one errno.
    #[error("cannot compile the seccomp filter for errno {errno}")]
    Compile {
        /// The errno of the group that failed.
        errno: u32,
        /// What seccompiler said.
        #[source]
        source: BackendError,
    },
    /// The chained program is longer than the kernel accepts.
    #[error("seccomp program has {0} instructions, more than the kernel's 4096")]
    TooLarge(usize),
    /// This CPU architecture has no syscall table here.
    #[error("seccomp profiles are not supported on architecture {0}")]
    UnsupportedArch(&'static str),
    /// `no_new_privs` could not be read.
    #[error("cannot read no_new_privs before installing the seccomp filter")]
    ReadNoNewPrivs(#[source] nix::Error),
    /// The caller did not set `no_new_privs` first.
    #[error("no_new_privs is not set; set it before installing the seccomp filter")]
    NoNewPrivs,
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// The parsed profile (`shim/seccomp/sandbox.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompProfile {
    /// Profile version; must equal [`PROFILE_VERSION`].
    pub version: String,
    /// What the file is for.
    #[serde(default)]
    pub comment: String,
    /// Action for syscalls no rule matches; only `allow` exists.
    pub default: DefaultAction,
    /// Errno a matching rule answers unless it names its own (`"EPERM"`).
    pub deny_errno: String,
    /// The deny rules.
    pub rules: Vec<ProfileRule>,
}

/// Action for syscalls no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    /// Let the syscall through (to the kernel's own checks).
    Allow,
}

/// One deny rule: the syscall is refused when all `args` conditions hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileRule {
    /// Syscall name, as in `man 2 syscalls`.
    pub syscall: String,
    /// Why the rule exists and who it affects.
    pub comment: String,
    /// Conditions, all of which must hold (empty: always).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<ArgCondition>,
    /// Errno to answer instead of the profile's `deny_errno`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// Architectures the rule applies to (`x86_64`, `aarch64`); all if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arches: Option<Vec<String>>,
}

/// A condition on one syscall argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgCondition {
    /// Argument index, 0 to 5.
    pub index: u8,
    /// How much of the argument to compare.
    pub len: ArgLen,
    /// The comparison.
    pub op: CmpOp,
    /// The value compared with (a number, or a `"0x..."` string).
    pub value: Number,
    /// For `masked_eq`: the bits compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Number>,
}

/// How much of an argument a condition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgLen {
    /// The low 32 bits (for `int`/`unsigned int` arguments).
    Dword,
    /// All 64 bits.
    Qword,
}

/// Comparison of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    /// Equal.
    Eq,
    /// Not equal.
    Ne,
    /// `(arg & mask) == (value & mask)`.
    MaskedEq,
    /// Greater or equal.
    Ge,
    /// Greater.
    Gt,
    /// Less or equal.
    Le,
    /// Less.
    Lt,
}

/// A number in the profile: JSON integer or a string (`"0x5412"`, `"17"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Number {
    /// A JSON integer.
    Int(u64),
    /// Hex (`0x` prefix) or decimal text.
    Text(String),
}

impl Number {
    /// The value, or `None` if the text is not a number.
    pub fn value(&self) -> Option<u64> {
        match self {
            Number::Int(v) => Some(*v),
            Number::Text(t) => match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => t.parse().ok(),
            },
        }
    }
}

/// Parses and checks the compiled-in profile.
pub fn profile() -> Result<SeccompProfile, SeccompError> {
    parse_profile(PROFILE_JSON)
}

/// Parses a profile and checks it with [`validate`]. Syscall names are
/// checked when compiling, for the architecture compiled for.
pub fn parse_profile(json: &str) -> Result<SeccompProfile, SeccompError> {
    let p: SeccompProfile = serde_json::from_str(json).map_err(SeccompError::Parse)?;
    validate(&p)?;
    Ok(p)
}

/// Checks a profile: version, errnos, architectures, numbers, masks,
/// duplicate rules (same syscall and arguments twice), and rule sets that
/// cannot be combined (an unconditional rule next to conditional ones, or two
/// errnos for one syscall).
pub fn validate(p: &SeccompProfile) -> Result<(), SeccompError> {
    if p.version != PROFILE_VERSION {
        return Err(SeccompError::Version {
            found: p.version.clone(),
            expected: PROFILE_VERSION,
        });
    }
    errno_by_name(&p.deny_errno).ok_or_else(|| SeccompError::UnknownErrno(p.deny_errno.clone()))?;
    let mut seen = BTreeSet::new();
    // Per syscall: (has an unconditional rule, has a conditional rule, errnos).
    let mut shape: BTreeMap<&str, (bool, bool, BTreeSet<u32>)> = BTreeMap::new();
    for rule in &p.rules {
        let errno = rule_errno(p, rule)?;
        for arch in rule.arches.iter().flatten() {
            if !matches!(arch.as_str(), "x86_64" | "aarch64") {
                return Err(SeccompError::UnknownArch {
                    syscall: rule.syscall.clone(),
                    arch: arch.clone(),
                });
            }
        }
        let mut key = Vec::new();
        for c in &rule.args {
            let value = number(rule, &c.value)?;
            let mask = match (c.op, &c.mask) {
                (CmpOp::MaskedEq, Some(m)) => Some(number(rule, m)?),
                (CmpOp::MaskedEq, None) | (_, Some(_)) => {
                    return Err(SeccompError::Mask {
                        syscall: rule.syscall.clone(),
                        index: c.index,
                    });
                }
                (_, None) => None,
            };
            key.push((c.index, c.len, c.op, value, mask));
        }
        key.sort_unstable();
        if !seen.insert((rule.syscall.clone(), key)) {
            return Err(SeccompError::DuplicateRule(rule.syscall.clone()));
        }
        let entry = shape.entry(rule.syscall.as_str()).or_default();
        if rule.args.is_empty() {
            entry.0 = true;
        } else {
            entry.1 = true;
        }
        entry.2.insert(errno);
    }
    for (syscall, (always, conditional, errnos)) in shape {
        if always && conditional {
            return Err(SeccompError::Conflict {
                syscall: syscall.to_string(),
                why: "an unconditional rule makes the conditional ones redundant",
            });
        }
        if errnos.len() > 1 {
            return Err(SeccompError::Conflict {
                syscall: syscall.to_string(),
                why: "all rules for one syscall must answer the same errno",
            });
        }
    }
    Ok(())
}

/// Compiles the compiled-in profile for the running architecture into one
/// BPF program. Called once by the shim's pid 1.
pub fn compile_sandbox_profile() -> Result<BpfProgram, SeccompError> {
    compile(&profile()?)
}

/// Checks ([`validate`]) and compiles a profile for the running
/// architecture.
pub fn compile(profile: &SeccompProfile) -> Result<BpfProgram, SeccompError> {
    validate(profile)?;
    let arch = target_arch()?;
    // errno -> syscall number -> rules
    let mut groups: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for rule in &profile.rules {
        if !applies_here(rule) {
            continue;
        }
        let errno = rule_errno(profile, rule)?;
        let native = syscall_number(&rule.syscall)
            .ok_or_else(|| SeccompError::UnknownSyscall(rule.syscall.clone()))?;
        let chain = groups.entry(errno).or_default();
        let mut numbers = vec![native];
        if let Some(x32) = x32_number(&rule.syscall, native) {
            numbers.push(x32);
        }
        for nr in numbers {
            let rules = chain.entry(nr).or_default();
            if !rule.args.is_empty() {
                rules.push(seccomp_rule(rule)?);
            }
        }
    }
    let mut programs = Vec::new();
    for (errno, rules) in groups {
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch,
        )
        .map_err(|source| SeccompError::Compile { errno, source })?;
        let prog: BpfProgram = filter
            .try_into()
            .map_err(|source| SeccompError::Compile { errno, source })?;
        programs.push(prog);
    }
    chain_programs(programs)
}

/// Installs `program` on the calling thread. The caller must have set
/// `no_new_privs` (see [`crate::caps::set_no_new_privs`]); this checks and
/// refuses otherwise rather than setting it behind the caller's back.
pub fn install_on_current_thread(program: &BpfProgram) -> Result<(), SeccompError> {
    if !nix::sys::prctl::get_no_new_privs().map_err(SeccompError::ReadNoNewPrivs)? {
        return Err(SeccompError::NoNewPrivs);
    }
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

/// Resolves a syscall name to its number on the running architecture.
pub fn syscall_number(name: &str) -> Option<i64> {
    SYSCALLS.iter().find(|(n, _)| *n == name).map(|(_, nr)| *nr)
}

/// Whether `rule` applies to the architecture we compile for.
pub fn applies_here(rule: &ProfileRule) -> bool {
    rule.arches
        .as_ref()
        .is_none_or(|a| a.iter().any(|x| x == std::env::consts::ARCH))
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    #[cfg(target_arch = "x86_64")]
    {
        Ok(TargetArch::x86_64)
    }
    #[cfg(target_arch = "aarch64")]
    {
        Ok(TargetArch::aarch64)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
    }
}

/// The x32 number of a syscall (x86_64 only). Most x32 syscalls share the
/// 64-bit number with the x32 bit set; a few have x32-specific entries
/// (512 and up) instead, and their 64-bit numbers are not callable from x32.
/// Denying `native | X32_SYSCALL_BIT` as well is harmless for those.
fn x32_number(name: &str, native: i64) -> Option<i64> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let nr = match name {
        "ioctl" => 514,
        "kexec_load" => 528,
        _ => native,
    };
    Some(nr | X32_SYSCALL_BIT)
}

fn errno_by_name(name: &str) -> Option<u32> {
    let e = match name {
        "EPERM" => libc::EPERM,
        "EACCES" => libc::EACCES,
        "ENOSYS" => libc::ENOSYS,
        "EINVAL" => libc::EINVAL,
        "EAFNOSUPPORT" => libc::EAFNOSUPPORT,
        _ => return None,
    };
    u32::try_from(e).ok()
}

fn rule_errno(p: &SeccompProfile, rule: &ProfileRule) -> Result<u32, SeccompError> {
    let name = rule.errno.as_deref().unwrap_or(&p.deny_errno);
    errno_by_name(name).ok_or_else(|| SeccompError::UnknownErrno(name.to_string()))
}

fn number(rule: &ProfileRule, n: &Number) -> Result<u64, SeccompError> {
    n.value().ok_or_else(|| SeccompError::BadNumber {
        syscall: rule.syscall.clone(),
        value: format!("{n:?}"),
    })
}

fn seccomp_rule(rule: &ProfileRule) -> Result<SeccompRule, SeccompError> {
    let cond_err = |source| SeccompError::Condition {
        syscall: rule.syscall.clone(),
        source,
    };
    let mut conds = Vec::with_capacity(rule.args.len());
    for c in &rule.args {
        let value = number(rule, &c.value)?;
        let op = match c.op {
            CmpOp::Eq => SeccompCmpOp::Eq,
            CmpOp::Ne => SeccompCmpOp::Ne,
            CmpOp::Ge => SeccompCmpOp::Ge,
            CmpOp::Gt => SeccompCmpOp::Gt,
            CmpOp::Le => SeccompCmpOp::Le,
            CmpOp::Lt => SeccompCmpOp::Lt,
            CmpOp::MaskedEq => {
                let mask = c.mask.as_ref().ok_or_else(|| SeccompError::Mask {
                    syscall: rule.syscall.clone(),
                    index: c.index,
                })?;
                SeccompCmpOp::MaskedEq(number(rule, mask)?)
            }
        };
        let len = match c.len {
            ArgLen::Dword => SeccompCmpArgLen::Dword,
            ArgLen::Qword => SeccompCmpArgLen::Qword,
        };
        conds.push(SeccompCondition::new(c.index, len, op, value).map_err(cond_err)?);
    }
    SeccompRule::new(conds).map_err(cond_err)
}

const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const BPF_JMP_JA: u16 = 0x05; // BPF_JMP | BPF_JA
const BPF_MAXINSNS: usize = 4096;

/// Chains programs built with mismatch action Allow: in each program but the
/// last, every `ret ALLOW` becomes an unconditional jump (32-bit offset) to the
/// first instruction of the next program, so a syscall is allowed only if no
/// program denies it. Replacing in place keeps all other jump offsets valid.
fn chain_programs(programs: Vec<BpfProgram>) -> Result<BpfProgram, SeccompError> {
    let count = programs.len();
    let mut out: BpfProgram = Vec::new();
    for (i, mut prog) in programs.into_iter().enumerate() {
        if i + 1 < count {
            let len = prog.len();
            for (at, insn) in prog.iter_mut().enumerate() {
                if insn.code == BPF_RET_K && insn.k == libc::SECCOMP_RET_ALLOW {
                    let skip =
                        u32::try_from(len - at - 1).map_err(|_| SeccompError::TooLarge(len))?;
                    *insn = sock_filter {
                        code: BPF_JMP_JA,
                        jt: 0,
                        jf: 0,
                        k: skip,
                    };
                }
            }
        }
        out.extend(prog);
    }
    if out.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Syscalls the profile may name, with their numbers on this architecture.
/// Numbers missing from `libc` are written out (they are the same on every
/// architecture since the syscall tables were unified at 424).
#[cfg(target_arch = "x86_64")]
const ARCH_ONLY: &[(&str, i64)] = &[
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("uselib", libc::SYS_uselib),
    ("ustat", libc::SYS_ustat),
    ("sysfs", libc::SYS_sysfs),
    ("_sysctl", libc::SYS__sysctl),
    ("poll", libc::SYS_poll),
    ("renameat", libc::SYS_renameat),
];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_ONLY: &[(&str, i64)] = &[];

const fn join<const N: usize>(
    a: &[(&'static str, i64)],
    b: &[(&'static str, i64)],
) -> [(&'static str, i64); N] {
    let mut out = [("", 0i64); N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[i + j] = b[j];
        j += 1;
    }
    out
}

const COMMON: &[(&str, i64)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("open_tree_attr", 467),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("unshare", libc::SYS_unshare),
    ("clone", libc::SYS_clone),
    ("clone3", libc::SYS_clone3),
    ("setns", libc::SYS_setns),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("settimeofday", libc::SYS_settimeofday),
    ("syslog", libc::SYS_syslog),
    ("personality", libc::SYS_personality),
    ("socket", libc::SYS_socket),
    ("socketpair", libc::SYS_socketpair),
    ("ioctl", libc::SYS_ioctl),
    ("pidfd_open", libc::SYS_pidfd_open),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("nfsservctl", libc::SYS_nfsservctl),
    ("vhangup", libc::SYS_vhangup),
    // Named by the broker components' allow-lists.
    ("openat", libc::SYS_openat),
    ("connect", libc::SYS_connect),
    ("accept4", libc::SYS_accept4),
    ("getsockopt", libc::SYS_getsockopt),
    ("setsockopt", libc::SYS_setsockopt),
    ("getpeername", libc::SYS_getpeername),
    ("shutdown", libc::SYS_shutdown),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto),
    ("openat2", libc::SYS_openat2),
    ("close", libc::SYS_close),
    ("read", libc::SYS_read),
    ("pread64", libc::SYS_pread64),
    ("write", libc::SYS_write),
    ("writev", libc::SYS_writev),
    ("pwrite64", libc::SYS_pwrite64),
    ("lseek", libc::SYS_lseek),
    ("newfstatat", libc::SYS_newfstatat),
    ("fstat", libc::SYS_fstat),
    ("statx", libc::SYS_statx),
    ("fstatfs", libc::SYS_fstatfs),
    ("getdents64", libc::SYS_getdents64),
    ("ftruncate", libc::SYS_ftruncate),
    ("fallocate", libc::SYS_fallocate),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("fchmod", libc::SYS_fchmod),
    ("fchown", libc::SYS_fchown),
    ("fchownat", libc::SYS_fchownat),
    ("mkdirat", libc::SYS_mkdirat),
    ("mknodat", libc::SYS_mknodat),
    ("symlinkat", libc::SYS_symlinkat),
    ("linkat", libc::SYS_linkat),
    ("unlinkat", libc::SYS_unlinkat),
    ("renameat2", libc::SYS_renameat2),
    ("readlinkat", libc::SYS_readlinkat),
    ("utimensat", libc::SYS_utimensat),
    ("fgetxattr", libc::SYS_fgetxattr),
    ("fsetxattr", libc::SYS_fsetxattr),
    ("fremovexattr", libc::SYS_fremovexattr),
    ("flistxattr", libc::SYS_flistxattr),
    ("setfsuid", libc::SYS_setfsuid),
    ("setfsgid", libc::SYS_setfsgid),
    ("fcntl", libc::SYS_fcntl),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendmsg", libc::SYS_sendmsg),
    ("ppoll", libc::SYS_ppoll),
    ("futex", libc::SYS_futex),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mprotect", libc::SYS_mprotect),
    ("madvise", libc::SYS_madvise),
    ("mremap", libc::SYS_mremap),
    ("brk", libc::SYS_brk),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("gettid", libc::SYS_gettid),
    ("getpid", libc::SYS_getpid),
    ("sched_yield", libc::SYS_sched_yield),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("getrandom", libc::SYS_getrandom),
    ("rseq", libc::SYS_rseq),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("nanosleep", libc::SYS_nanosleep),
    ("tgkill", libc::SYS_tgkill),
    ("geteuid", libc::SYS_geteuid),
    ("getuid", libc::SYS_getuid),
    ("getegid", libc::SYS_getegid),
    ("getgid", libc::SYS_getgid),
    ("prctl", libc::SYS_prctl),
    ("fchmodat2", 452),
];

const SYSCALLS: &[(&str, i64)] = &join::<{ COMMON.len() + ARCH_ONLY.len() }>(COMMON, ARCH_ONLY);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::selftest::tests::run_in_child;

    #[test]
    fn profile_parses_and_matches_version() {
        let p = profile().unwrap();
        assert_eq!(p.version, PROFILE_VERSION);
        assert_eq!(p.default, DefaultAction::Allow);
        assert!(p.rules.iter().all(|r| !r.comment.trim().is_empty()));
    }

    #[test]
    fn every_syscall_resolves_on_this_arch() {
        let p = profile().unwrap();
        for r in p.rules.iter().filter(|r| applies_here(r)) {
            assert!(syscall_number(&r.syscall).is_some(), "{}", r.syscall);
        }
    }

    #[test]
    fn syscall_table_has_no_duplicate_names() {
        let names: BTreeSet<_> = SYSCALLS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), SYSCALLS.len());
    }

    #[test]
    fn duplicate_rules_are_rejected() {
        let mut p = profile().unwrap();
        // Every rule is unique as shipped (checked by profile()); re-adding any
        // one of them must fail.
        for i in 0..p.rules.len() {
            let mut q = p.clone();
            q.rules.push(p.rules[i].clone());
            let json = serde_json::to_string(&q).unwrap();
            assert!(
                matches!(parse_profile(&json), Err(SeccompError::DuplicateRule(_))),
                "{}",
                p.rules[i].syscall
            );
        }
        // Same conditions in another order are the same rule.
        let socket_rule = p
            .rules
            .iter()
            .find(|r| r.syscall == "socket" && r.args.len() == 2)
            .unwrap()
            .clone();
        let mut swapped = socket_rule.clone();
        swapped.args.reverse();
        p.rules.push(swapped);
        let json = serde_json::to_string(&p).unwrap();
        assert!(matches!(
            parse_profile(&json),
            Err(SeccompError::DuplicateRule(_))
        ));
    }

    #[test]
    fn conflicting_rules_are_rejected() {
        let mut p = profile().unwrap();
        p.rules.push(ProfileRule {
            syscall: "socket".into(),
            comment: "x".into(),
            args: vec![],
            errno: None,
            arches: None,
        });
        let json = serde_json::to_string(&p).unwrap();
        assert!(matches!(
            parse_profile(&json),
            Err(SeccompError::Conflict { .. })
        ));
    }

    #[test]
    fn bad_profiles_are_rejected() {
        let bad_version = PROFILE_JSON.replacen("\"version\": \"1\"", "\"version\": \"0\"", 1);
        assert!(matches!(
            parse_profile(&bad_version),
            Err(SeccompError::Version { .. })
        ));
        let bad_errno = PROFILE_JSON.replacen("\"EPERM\"", "\"EWHAT\"", 1);
        assert!(matches!(
            parse_profile(&bad_errno),
            Err(SeccompError::UnknownErrno(_))
        ));
        let bad_name = PROFILE_JSON.replacen("\"mount\"", "\"mount_everything\"", 1);
        let p = parse_profile(&bad_name).unwrap();
        assert!(matches!(compile(&p), Err(SeccompError::UnknownSyscall(_))));
    }

    #[test]
    fn numbers_parse() {
        assert_eq!(Number::Text("0x5412".into()).value(), Some(0x5412));
        assert_eq!(Number::Text("17".into()).value(), Some(17));
        assert_eq!(Number::Int(3).value(), Some(3));
        assert_eq!(Number::Text("x".into()).value(), None);
    }

    #[test]
    fn compile_refuses_an_unchecked_profile() {
        let mut p = profile().unwrap();
        let dup = p.rules[0].clone();
        p.rules.push(dup);
        assert!(matches!(compile(&p), Err(SeccompError::DuplicateRule(_))));
    }

    #[test]
    fn program_compiles_within_limits() {
        let prog = compile_sandbox_profile().unwrap();
        assert!(prog.len() < BPF_MAXINSNS);
        // Only the last program may return ALLOW at its very end.
        assert_eq!(prog.last().unwrap().k, libc::SECCOMP_RET_ALLOW);
    }

    /// A named probe: a syscall to try under the filter.
    type Probe = (&'static str, fn() -> libc::c_long);

    /// Runs each probe in a forked child under the filter; returns
    /// `name=result` lines, where result is the return value or `-errno`.
    fn probe_under_filter(probes: &[Probe]) -> BTreeMap<String, i64> {
        let prog = compile_sandbox_profile().unwrap();
        let out = run_in_child(move || {
            crate::caps::set_no_new_privs().unwrap();
            install_on_current_thread(&prog).unwrap();
            let mut lines = String::new();
            for (name, f) in probes {
                let ret = f();
                let v = if ret < 0 {
                    -i64::from(nix::errno::Errno::last_raw())
                } else {
                    ret
                };
                lines.push_str(&format!("{name}={v}\n"));
            }
            lines
        });
        out.lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    #[allow(unsafe_code)]
    fn sys6(nr: libc::c_long, a: [libc::c_long; 6]) -> libc::c_long {
        // SAFETY: every probe passes only integers and null pointers, or
        // pointers to live locals of the right size (see each caller); the
        // calls either fail or act on resources of this forked child only.
        unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
    }

    fn sock(family: i32, ty: i32, proto: i32) -> libc::c_long {
        sys6(
            libc::SYS_socket,
            [family.into(), ty.into(), proto.into(), 0, 0, 0],
        )
    }

    #[test]
    fn filter_denies_and_allows_in_child() {
        let eperm = -i64::from(libc::EPERM);
        let probes: &[Probe] = &[
            ("mount", || sys6(libc::SYS_mount, [0; 6])),
            ("unshare_newuser", || {
                sys6(
                    libc::SYS_unshare,
                    [libc::CLONE_NEWUSER.into(), 0, 0, 0, 0, 0],
                )
            }),
            ("unshare_newns_files", || {
                sys6(
                    libc::SYS_unshare,
                    [
                        (libc::CLONE_NEWNS | libc::CLONE_FILES).into(),
                        0,
                        0,
                        0,
                        0,
                        0,
                    ],
                )
            }),
            ("unshare_files", || {
                sys6(libc::SYS_unshare, [libc::CLONE_FILES.into(), 0, 0, 0, 0, 0])
            }),
            ("clone3", || sys6(libc::SYS_clone3, [0; 6])),
            ("packet", || sock(libc::AF_PACKET, libc::SOCK_RAW, 0)),
            ("inet_raw", || {
                sock(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_ICMP,
                )
            }),
            ("inet6_raw", || {
                sock(
                    libc::AF_INET6,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    libc::IPPROTO_ICMPV6,
                )
            }),
            ("inet_stream", || sock(libc::AF_INET, libc::SOCK_STREAM, 0)),
            ("unix_stream", || sock(libc::AF_UNIX, libc::SOCK_STREAM, 0)),
            ("netlink_route", || {
                sock(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)
            }),
            ("netlink_audit", || {
                sock(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_AUDIT)
            }),
            ("vsock", || sock(libc::AF_VSOCK, libc::SOCK_STREAM, 0)),
            // fd -1: without the filter this is EBADF, so nothing is ever
            // pushed into a real terminal even if the rule were broken.
            ("tiocsti", || {
                let c: u8 = b'x';
                sys6(
                    libc::SYS_ioctl,
                    [-1, 0x5412, std::ptr::addr_of!(c) as libc::c_long, 0, 0, 0],
                )
            }),
            ("tiocsti_high_bits", || {
                let c: u8 = b'x';
                sys6(
                    libc::SYS_ioctl,
                    [
                        -1,
                        0x1_0000_5412,
                        std::ptr::addr_of!(c) as libc::c_long,
                        0,
                        0,
                        0,
                    ],
                )
            }),
            ("fionread", || {
                sys6(libc::SYS_ioctl, [-1, 0x541B, 0, 0, 0, 0])
            }),
            ("tiocsetd", || {
                let ldisc: libc::c_int = 0;
                sys6(
                    libc::SYS_ioctl,
                    [
                        -1,
                        0x5423,
                        std::ptr::addr_of!(ldisc) as libc::c_long,
                        0,
                        0,
                        0,
                    ],
                )
            }),
            ("personality_norandom", || {
                sys6(libc::SYS_personality, [0x0040000, 0, 0, 0, 0, 0])
            }),
            ("personality_query", || {
                sys6(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0])
            }),
            ("bpf", || sys6(libc::SYS_bpf, [0; 6])),
            ("io_uring_setup", || sys6(libc::SYS_io_uring_setup, [0; 6])),
            ("keyctl", || {
                sys6(libc::SYS_keyctl, [0x7fff_ffff, 0, 0, 0, 0, 0])
            }),
            ("x32_mount", || {
                sys6(X32_SYSCALL_BIT | libc::SYS_mount, [0; 6])
            }),
            ("x32_ioctl_tiocsti", || {
                sys6(X32_SYSCALL_BIT | 514, [-1, 0x5412, 0, 0, 0, 0])
            }),
            ("getpid", || sys6(libc::SYS_getpid, [0; 6])),
            ("spawn_true", || {
                // std's Command uses posix_spawn, which tries clone3 first
                // and must fall back to clone on ENOSYS.
                match std::process::Command::new("/bin/true").status() {
                    Ok(s) if s.success() => 0,
                    Ok(_) => -1000,
                    Err(e) => -i64::from(e.raw_os_error().unwrap_or(1000)),
                }
            }),
            ("fork_exec_true", fork_exec_true),
        ];
        let got = probe_under_filter(probes);
        let want_eperm = [
            "mount",
            "unshare_newuser",
            "unshare_newns_files",
            "packet",
            "inet_raw",
            "inet6_raw",
            "netlink_audit",
            "vsock",
            "tiocsti",
            "tiocsti_high_bits",
            "tiocsetd",
            "personality_norandom",
            "bpf",
            "io_uring_setup",
            "keyctl",
        ];
        for name in want_eperm {
            assert_eq!(got[name], eperm, "{name}: {got:?}");
        }
        assert_eq!(got["clone3"], -i64::from(libc::ENOSYS), "{got:?}");
        assert_eq!(got["unshare_files"], 0, "{got:?}");
        for name in ["inet_stream", "unix_stream", "netlink_route", "getpid"] {
            assert!(got[name] >= 0, "{name}: {got:?}");
        }
        // Not a TIOCSTI: reaches the kernel, which says EBADF.
        assert_eq!(got["fionread"], -i64::from(libc::EBADF), "{got:?}");
        assert!(got["personality_query"] >= 0, "{got:?}");
        for name in ["x32_mount", "x32_ioctl_tiocsti"] {
            let v = got[name];
            assert!(
                v == eperm || v == -i64::from(libc::ENOSYS),
                "{name}: {got:?}"
            );
        }
        assert_eq!(got["spawn_true"], 0, "{got:?}");
        assert_eq!(got["fork_exec_true"], 0, "{got:?}");
    }

    /// fork + execv("/bin/true") + wait, under the filter; 0 on success.
    #[allow(unsafe_code)]
    fn fork_exec_true() -> libc::c_long {
        use nix::sys::wait::{WaitStatus, waitpid};
        use nix::unistd::ForkResult;
        // SAFETY: this runs in a single-threaded forked test child; the
        // grandchild only calls execv and _exit, both async-signal-safe.
        match unsafe { nix::unistd::fork() } {
            Ok(ForkResult::Child) => {
                let _ = nix::unistd::execv(c"/bin/true", &[c"true"]);
                // SAFETY: _exit never returns and touches no Rust state.
                unsafe { libc::_exit(127) }
            }
            Ok(ForkResult::Parent { child }) => match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 0)) => 0,
                _ => -1000,
            },
            Err(e) => -i64::from(e as i32),
        }
    }
}

/// An allow-list profile, for a component of the broker that knows exactly
/// which system calls it makes (a filesystem server, a network gateway):
/// every syscall the profile does not allow is refused with `deny_errno`,
/// x32 and foreign-architecture calls included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowProfile {
    /// Free-form version, reported by the component.
    pub version: String,
    /// What the profile is for.
    #[serde(default)]
    pub comment: String,
    /// Errno for everything not allowed.
    pub deny_errno: String,
    /// Syscalls refused with their own `errno` (e.g. `clone3` with ENOSYS,
    /// so the C library falls back to a call whose flags can be checked).
    #[serde(default)]
    pub refuse: Vec<ProfileRule>,
    /// Allowed syscalls; several rules for one syscall are alternatives,
    /// and a rule with `args` allows the call only when all of them hold.
    pub allow: Vec<ProfileRule>,
}

/// Parses, checks and compiles an allow-list profile for the running
/// architecture: syscalls must be known, rules unique, and a syscall
/// either allowed outright or only under conditions.
pub fn compile_allow_list(json: &str) -> Result<BpfProgram, SeccompError> {
    let p: AllowProfile = serde_json::from_str(json).map_err(SeccompError::Parse)?;
    let errno = errno_by_name(&p.deny_errno)
        .ok_or_else(|| SeccompError::UnknownErrno(p.deny_errno.clone()))?;
    let arch = target_arch()?;
    let mut seen = BTreeSet::new();
    let mut always = BTreeSet::new();
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for rule in &p.allow {
        if !applies_here(rule) {
            continue;
        }
        if !seen.insert((rule.syscall.clone(), format!("{:?}", rule.args))) {
            return Err(SeccompError::DuplicateRule(rule.syscall.clone()));
        }
        let nr = syscall_number(&rule.syscall)
            .ok_or_else(|| SeccompError::UnknownSyscall(rule.syscall.clone()))?;
        let entry = map.entry(nr).or_default();
        let conflict = if rule.args.is_empty() {
            !always.insert(nr) || !entry.is_empty()
        } else {
            always.contains(&nr)
        };
        if conflict {
            return Err(SeccompError::Conflict {
                syscall: rule.syscall.clone(),
                why: "a syscall is allowed either outright or only under conditions",
            });
        }
        if !rule.args.is_empty() {
            entry.push(seccomp_rule(rule)?);
        }
    }
    let mut programs = Vec::new();
    for rule in &p.refuse {
        if !applies_here(rule) {
            continue;
        }
        let name = rule.errno.as_deref().unwrap_or(&p.deny_errno);
        let e = errno_by_name(name).ok_or_else(|| SeccompError::UnknownErrno(name.into()))?;
        let nr = syscall_number(&rule.syscall)
            .ok_or_else(|| SeccompError::UnknownSyscall(rule.syscall.clone()))?;
        if map.contains_key(&nr) {
            return Err(SeccompError::Conflict {
                syscall: rule.syscall.clone(),
                why: "a syscall is either allowed or refused",
            });
        }
        let refusal = SeccompFilter::new(
            BTreeMap::from([(nr, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(e),
            arch,
        )
        .map_err(|source| SeccompError::Compile { errno: e, source })?;
        programs.push(
            refusal
                .try_into()
                .map_err(|source| SeccompError::Compile { errno: e, source })?,
        );
    }
    let filter = SeccompFilter::new(map, SeccompAction::Errno(errno), SeccompAction::Allow, arch)
        .map_err(|source| SeccompError::Compile { errno, source })?;
    programs.push(
        filter
            .try_into()
            .map_err(|source| SeccompError::Compile { errno, source })?,
    );
    chain_programs(programs)
}
