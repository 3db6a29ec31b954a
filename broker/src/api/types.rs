//! Wire types of the /v1 API. Requests refuse unknown fields; they are
//! validated and converted before anything is created.

use std::path::PathBuf;

use airlock_shim::cgroup::{CgroupVersion, LimitCounters};
use airlock_shim::selftest::SelfTestReport;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// Limits asked for at create time; each absent field takes the default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// Memory, bytes.
    pub memory_bytes: Option<u64>,
    /// Tasks.
    pub pids: Option<u64>,
    /// CPU in thousandths of a CPU.
    pub cpu_millis: Option<u64>,
    /// Open files per process.
    pub nofile: Option<u64>,
    /// Bytes the sandbox may add to its copy-on-write layer and workspace.
    pub disk_bytes: Option<u64>,
    /// Inodes it may add there.
    pub inodes: Option<u64>,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Agent to act for (default: the caller's).
    pub agent: Option<String>,
    /// Host directory to use as the read-only base instead of the host's.
    pub rootfs: Option<PathBuf>,
    /// Host directory to show at /workspace instead of the agent's own.
    pub workspace: Option<PathBuf>,
    /// Default user of execs: "sandbox" (uid 1000, default) or "root".
    pub user: Option<String>,
    /// Limits.
    pub limits: Option<LimitsRequest>,
    /// Wall-clock lifetime in seconds; the whole sandbox is killed then.
    pub timeout_secs: Option<u64>,
    /// Environment every exec starts with (`KEY=VALUE`).
    pub env: Option<Vec<String>>,
    /// Network: `{"mode": "none"|"open"|"allow", "allow": ["RULE", ...]}`
    /// (default: the broker's configured default).
    pub network: Option<airlock_net::policy::NetworkSpec>,
    /// Fork from a snapshot, `"SANDBOX_ID:NAME"`: the new sandbox starts
    /// with that snapshot's files (copy-on-write layer and workspace), in
    /// O(1), in a workspace branch of its own.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Host GPUs to grant, each by index (`"0"`), UUID (`"GPU-8f2c..."`,
    /// or a unique prefix of one) or CDI name (`"nvidia.com/gpu=0"`,
    /// `"nvidia.com/gpu=all"`); inside they are `/dev/nvidia0`... in this
    /// order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
}

/// `POST /v1/sandboxes/{id}/ports`: serve a host port by a sandbox port.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// The sandbox's port (its server listens on 0.0.0.0 or 10.0.2.15).
    pub port: u16,
    /// The host port (default: any free one).
    pub host_port: Option<u16>,
    /// The host address to listen on (default 127.0.0.1; other addresses
    /// only for root).
    pub host_addr: Option<std::net::IpAddr>,
}

/// `POST /v1/sandboxes/{id}/exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment (`KEY=VALUE`), over the sandbox's.
    pub env: Option<Vec<String>>,
    /// Working directory (default /workspace).
    pub cwd: Option<String>,
    /// "sandbox", "root", or a uid inside the sandbox.
    pub user: Option<String>,
    /// Bytes for stdin (UTF-8); stdin is empty otherwise.
    pub stdin: Option<String>,
    /// Kill the command after this many seconds.
    pub timeout_secs: Option<u64>,
    /// Run it on a terminal (a pseudo-terminal inside, its controlling
    /// terminal): stdout and stderr arrive merged, as on a terminal.
    #[serde(default)]
    pub tty: Option<bool>,
    /// The terminal's size at start.
    #[serde(default)]
    pub size: Option<TtySize>,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// What an attached client sends after its exec body, as a text message
/// (stdin bytes travel as binary messages).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AttachControl {
    /// The terminal's new size.
    Resize(TtySize),
    /// A signal for the command's process group.
    Signal(i32),
    /// No more stdin.
    Eof(bool),
}

/// Limits in force.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppliedLimits {
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Tasks.
    pub pids: u64,
    /// CPU in thousandths of a CPU.
    pub cpu_millis: u64,
    /// Open files per process.
    pub nofile: u64,
    /// Lifetime, seconds (0: none).
    pub timeout_secs: u64,
    /// Bytes it may add to its copy-on-write layer and workspace.
    #[serde(default)]
    pub disk_bytes: u64,
    /// Inodes it may add there.
    #[serde(default)]
    pub inodes: u64,
}

/// What a sandbox's copy-on-write layer and workspace hold, against its
/// quota (reported by its filesystem server once a second at most).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes.
    pub used_bytes: u64,
    /// Inodes.
    pub used_inodes: u64,
    /// The bytes limit.
    pub limit_bytes: u64,
    /// The inodes limit.
    pub limit_inodes: u64,
}

/// What `GET /v1/sandboxes/{id}` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Id.
    pub id: String,
    /// Owning agent.
    pub agent: String,
    /// "running", "stopping" (teardown under way) or "dead".
    pub state: String,
    /// Creation time, unix ms.
    pub created_ms: i64,
    /// Hostname inside.
    pub hostname: String,
    /// Default exec user.
    pub user: String,
    /// Host directory behind /workspace.
    pub workspace: PathBuf,
    /// Host directory used as base, if not the host's.
    pub rootfs: Option<PathBuf>,
    /// Limits in force.
    pub limits: AppliedLimits,
    /// Host uid of sandbox root (first of its 65536 ids).
    pub host_uid_base: u32,
    /// cgroup version in use.
    pub cgroup_version: CgroupVersion,
    /// Limit counters so far.
    pub counters: LimitCounters,
    /// Landlock ABI in force.
    pub landlock_abi: u8,
    /// Seccomp profile version.
    pub seccomp_profile: String,
    /// The jail self-test seen from inside before any command ran.
    pub selftest: Option<SelfTestReport>,
    /// Execs running now.
    pub execs_running: usize,
    /// The network policy in force.
    #[serde(default)]
    pub network: airlock_net::policy::NetworkSpec,
    /// Host ports served by sandbox ports.
    #[serde(default)]
    pub ports: Vec<ForwardedPort>,
    /// Granted GPUs, in the order of the sandbox's `/dev/nvidiaN`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GrantedGpu>,
    /// Disk usage against the quota.
    #[serde(default)]
    pub disk: DiskUsage,
    /// What the agent's persistent workspace holds over all its sandboxes
    /// and snapshots, against the agent's quota; absent for a workspace
    /// that is the caller's own directory.
    #[serde(default)]
    pub workspace_disk: Option<DiskUsage>,
}

/// A snapshot of a sandbox (`POST /v1/sandboxes/{id}/snapshots`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name, unique in the sandbox.
    pub name: String,
    /// When it was taken, unix ms.
    pub created_ms: i64,
    /// Bytes its own layers hold (what changed since the snapshot
    /// before); in listings only (`null` in the answer to a snapshot or a
    /// restore, which stay O(1)).
    pub bytes: Option<u64>,
}

/// `POST /v1/sandboxes/{id}/snapshots` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeSnapshot {
    /// Its name (default `snap-N`): 1 to 64 of `A-Za-z0-9_.-`.
    #[serde(default)]
    pub name: Option<String>,
}

/// A host port served by a sandbox port (`POST /v1/sandboxes/{id}/ports`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardedPort {
    /// The host address listened on.
    pub host_addr: std::net::IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The sandbox's port.
    pub port: u16,
}

/// The end of an exec.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecExit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal that killed it.
    pub signal: Option<i32>,
    /// Killed by the out-of-memory killer.
    pub oom: bool,
    /// The pids limit refused a fork while it ran.
    pub pids_limit_hit: bool,
    /// Killed by its timeout or the sandbox's.
    pub timed_out: bool,
    /// Wall time, ms.
    pub duration_ms: u64,
    /// Why it could not run, if it did not.
    pub error: Option<String>,
}

impl ExecExit {
    /// What a shell would report: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        airlock_shim::channel::ExitStatus {
            code: self.code,
            signal: self.signal,
        }
        .shell_code()
    }
}

/// One line of an exec's NDJSON stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The command started.
    Started {
        /// Exec id within the sandbox.
        exec_id: u64,
    },
    /// Bytes written to stdout.
    Stdout(Chunk),
    /// Bytes written to stderr.
    Stderr(Chunk),
    /// The command ended; always the last line.
    Exit(ExecExit),
}

/// Output bytes: `data` when they are UTF-8, else `data_b64`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Chunk {
    /// Text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub data: Option<String>,
    /// Base64 of non-UTF-8 bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub data_b64: Option<String>,
}

impl Chunk {
    /// Wraps bytes.
    pub fn new(bytes: Vec<u8>) -> Chunk {
        match String::from_utf8(bytes) {
            Ok(s) => Chunk {
                data: Some(s),
                data_b64: None,
            },
            Err(e) => Chunk {
                data: None,
                data_b64: Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
            },
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> Vec<u8> {
        if let Some(s) = &self.data {
            return s.as_bytes().to_vec();
        }
        self.data_b64
            .as_deref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default()
    }
}

/// An error body: `{"error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What was wrong.
    pub error: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_bytes_exactly() {
        for bytes in [b"hello\n".to_vec(), vec![0xff, 0xfe, 0x00, b'a']] {
            let c = Chunk::new(bytes.clone());
            let line = serde_json::to_string(&ExecEvent::Stdout(c)).unwrap();
            let back: ExecEvent = serde_json::from_str(&line).unwrap();
            match back {
                ExecEvent::Stdout(c) => assert_eq!(c.bytes(), bytes),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<CreateSandbox>(r#"{"agnet":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("agnet"), "{e}");
        let e = serde_json::from_str::<ExecBody>(r#"{"argv":["a"],"cmd":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("cmd"), "{e}");
    }
}

/// One host GPU granted to a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantedGpu {
    /// Its node inside: `/dev/nvidia{inside}`.
    pub inside: u32,
    /// Its index on the host (PCI bus order, as nvidia-smi numbers).
    pub index: u32,
    /// Its UUID, where the driver names one.
    pub uuid: Option<String>,
    /// Its PCI address.
    pub pci: String,
    /// Its model name, where the driver names one.
    pub model: Option<String>,
    /// Its host node number (`/dev/nvidia{minor}`).
    pub minor: u32,
}
