//! What the broker asks the shim to build, as typed data read from the
//! control channel (never from argv or the environment).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A contiguous id range: id `u` inside the sandbox is `base + u` on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// First host uid of the range (sandbox uid 0).
    pub uid_base: u32,
    /// First host gid of the range (sandbox gid 0).
    pub gid_base: u32,
    /// Number of ids mapped.
    pub count: u32,
}

/// Resource limits applied with setrlimit to every exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    /// RLIMIT_NOFILE (soft = hard).
    pub nofile: u64,
    /// RLIMIT_CORE (0: no core dumps).
    pub core: u64,
}

/// The sandbox to build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Sandbox id, for messages.
    pub id: String,
    /// Hostname inside the UTS namespace.
    pub hostname: String,
    /// Host path where the broker mounted the sandbox's FUSE root.
    pub root: PathBuf,
    /// The id maps written for the user namespace.
    pub ids: IdRange,
    /// Files the launcher writes "0" to, joining the cgroup before cloning.
    pub cgroup_procs: Vec<PathBuf>,
    /// Limits for every exec.
    pub rlimits: Rlimits,
    /// Lowest landlock ABI accepted; below it the sandbox refuses to start.
    pub landlock_floor: u8,
    /// The user (uid, gid inside) the self-test probe runs as.
    pub probe_user: (u32, u32),
    /// Granted GPUs: their nodes and the ioctl filter whose listener goes
    /// to the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,
}

/// What a sandbox with GPUs gets beyond the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// `(host node, name in the sandbox's /dev)`: `nvidiactl`,
    /// `nvidia-uvm`, and the granted GPUs renumbered from `nvidia0`.
    pub nodes: Vec<(PathBuf, String)>,
    /// The device proxy's ioctl filter, classic BPF, installed in pid 1
    /// (so every process of the sandbox inherits it) with a new listener,
    /// which pid 1 sends to the broker with [`crate::channel::FromShim::Ready`].
    pub filter: Vec<BpfInsn>,
    /// A host directory holding the granted GPUs' part of the driver's
    /// procfs directory, shown read-only at /proc/driver/nvidia.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_view: Option<PathBuf>,
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpfInsn {
    /// Opcode.
    pub code: u16,
    /// Jump if true.
    pub jt: u8,
    /// Jump if false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// One command to run inside a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Broker-assigned id, echoed in every reply.
    pub exec_id: u64,
    /// Program and arguments; argv\[0\] is looked up in PATH when it has no '/'.
    pub argv: Vec<String>,
    /// Exactly the environment, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// uid inside the sandbox.
    pub uid: u32,
    /// gid inside the sandbox.
    pub gid: u32,
    /// A file operation to run, jailed as the command would be, instead
    /// of executing `argv` (see [`crate::files`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_op: Option<crate::files::FileOp>,
    /// Whether stdin is a terminal the command takes as its controlling
    /// terminal (an interactive session: job control, Ctrl-C).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
}

/// PATH used to find argv\[0\] when the caller passed no PATH.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
