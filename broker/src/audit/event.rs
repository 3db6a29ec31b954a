//! Every kind of audit row, as one typed enum. [`AuditEvent::into_record`]
//! is the only place that turns them into rows (kind, action, detail), so
//! the stored schema is written down once, here, and a row cannot be built
//! with a field misspelt at one call site.

use std::path::PathBuf;

use airlock_shim::cgroup::CgroupVersion;
use airlock_shim::selftest::SelfTestReport;
use serde_json::json;

use super::{AuditKind, AuditRecord};
use crate::api::types::{AppliedLimits, ExecExit};
use crate::fs_server::FsReady;

/// What happened, with what the row records about it.
#[derive(Debug)]
#[non_exhaustive]
pub enum AuditEvent {
    /// `sandbox/create`: a sandbox was handed to its caller.
    SandboxCreated {
        /// Caller's uid and pid.
        caller: (u32, i32),
        /// Default exec user.
        user: String,
        /// Limits applied.
        limits: AppliedLimits,
        /// Host directory behind /workspace.
        workspace: PathBuf,
        /// Base directory, if not the host.
        rootfs: Option<PathBuf>,
        /// Host uid of sandbox root.
        host_uid_base: u32,
        /// cgroup version.
        cgroup_version: CgroupVersion,
        /// Hostname.
        hostname: String,
        /// Whether it came from the pool.
        pre_started: bool,
        /// Its GPUs, when it has any.
        gpus: Option<super::GpusGranted>,
    },
    /// `sandbox/destroy`: every resource released (or what could not be).
    SandboxDestroyed {
        /// Why it went.
        reason: String,
        /// What could not be released.
        problems: Vec<String>,
    },
    /// `sandbox/recovered`: what a dead broker left was removed.
    SandboxRecovered {
        /// What could not be removed.
        problems: Vec<String>,
    },
    /// `sandbox/component_failed`: a per-sandbox process died or spoke
    /// out of protocol; the sandbox is torn down.
    ComponentFailed {
        /// "fs", "shim".
        role: &'static str,
        /// Why.
        reason: String,
    },
    /// `jail/selftest`: what the probe saw from inside, and the facts of
    /// the jail reached.
    JailSelftest {
        /// Landlock ABI reached in the sandbox.
        landlock_abi: u8,
        /// Seccomp profile version.
        seccomp_profile: String,
        /// The probe's report.
        report: Box<SelfTestReport>,
        /// Set-up stages inside, µs (for a sandbox that started).
        setup_us: Option<Vec<(String, u64)>>,
        /// What the filesystem server reported once confined.
        fs_server: Option<Box<FsReady>>,
    },
    /// `exec/start`: a command started (sent to live subscribers only,
    /// not stored: its `exec/exit` row says everything it would).
    ExecStarted {
        /// Exec id.
        exec_id: u64,
        /// Program and arguments.
        argv: Vec<String>,
        /// Working directory.
        cwd: String,
        /// User name and uid inside.
        user: (String, u32),
    },
    /// `exec/exit`: a command ended (or never started).
    ExecExit {
        /// Exec id.
        exec_id: u64,
        /// Program and arguments.
        argv: Vec<String>,
        /// Working directory.
        cwd: String,
        /// User name and uid inside.
        user: (String, u32),
        /// How it ended.
        exit: ExecExit,
    },
    /// `fs/mutation` or `denial/fs_denied`: what the filesystem server saw.
    Fs(airlock_fs::FsEvent),
    /// `net/flow`, `net/dns` or `limit/net`: what the network gateway
    /// decided (every flow and question, allowed or refused, with the rule
    /// or reason that decided).
    Net(airlock_net::gateway::NetEvent),
    /// `limit/audit_rate_limited`: file events counted, not stored.
    FsEventsDropped {
        /// How many.
        dropped: u64,
        /// The budget.
        events_per_sec: f64,
    },
    /// `net/policy`: a running sandbox's network policy was changed.
    NetPolicy {
        /// Caller's uid and pid.
        caller: (u32, i32),
        /// The new policy.
        policy: airlock_net::policy::NetworkSpec,
    },
    /// `net/port_forward`: a host port now reaches a sandbox port.
    PortForward {
        /// Caller's uid and pid.
        caller: (u32, i32),
        /// The host address bound.
        host: std::net::SocketAddr,
        /// The sandbox's port.
        port: u16,
    },
    /// `net/port_forward_removed`: a host port no longer served.
    PortForwardRemoved {
        /// Caller's uid and pid.
        caller: (u32, i32),
        /// The host address that was bound.
        host: std::net::SocketAddr,
        /// The sandbox's port.
        port: u16,
    },
    /// `sandbox/kill`: every process but init killed on request.
    Killed {
        /// Caller's uid and pid.
        caller: (u32, i32),
        /// How many.
        processes: usize,
    },
    /// `sandbox/snapshot`, `sandbox/restore`, `sandbox/snapshot_removed`.
    Snapshot {
        /// Caller's uid and pid.
        caller: (u32, i32),
        /// Which of the three.
        action: &'static str,
        /// The snapshot's name.
        name: String,
        /// Its newest frozen layer.
        layer: String,
    },
    /// `limit/audit_rate_limited`: network events counted, not stored.
    NetEventsDropped {
        /// How many.
        dropped: u64,
        /// The budget.
        events_per_sec: f64,
    },
    /// `device/proxy`: a sandbox's device proxy is serving, with the
    /// tables it chose and the jail it reached.
    DeviceProxy {
        /// The host driver's version.
        driver: String,
        /// Whose tables serve it.
        tables: String,
        /// Whether those are a newer release's of the same branch, by the
        /// operator's opt-in.
        newer_in_branch: bool,
        /// What the proxy's jail reached.
        jail: airlock_shim::jail::JailReport,
    },
    /// `device/ioctls`: driver calls a sandbox's device proxy served over
    /// an interval, by kind and outcome.
    DeviceIoctls(crate::gpu_server::IoctlCounts),
    /// `denial/ioctl`: a device call refused before the driver saw it.
    IoctlRefused {
        /// Why.
        reason: String,
        /// What the caller got.
        reply: String,
    },
    /// `limit/oom`: the memory limit killed processes.
    Oom {
        /// How many OOM kills.
        oom_kills: u64,
        /// The exec it happened under, if known.
        exec_id: Option<u64>,
        /// The limit.
        memory_bytes: u64,
    },
    /// `limit/pids_max`: forks refused by the pids limit.
    PidsMax {
        /// How many.
        refused_forks: u64,
        /// The exec it happened under, if known.
        exec_id: Option<u64>,
        /// The limit.
        pids: u64,
    },
    /// `limit/timeout`: the sandbox's wall-clock limit ended it.
    Timeout {
        /// The limit.
        timeout_secs: u64,
    },
    /// `auth/refused`: a caller was refused.
    AuthRefused {
        /// What it asked for ("connect", "create", "access", ...).
        op: String,
        /// Its uid, gid and pid.
        caller: (u32, u32, i32),
        /// Why.
        error: String,
        /// Refusals not audited (over budget) before this one.
        unaudited_before: Option<u64>,
    },
}

impl AuditEvent {
    /// The row for this event, about `sandbox_id` of `agent` (when it is
    /// about one).
    pub fn into_record(self, sandbox_id: Option<&str>, agent: Option<&str>) -> AuditRecord {
        let (kind, action, detail) = match self {
            AuditEvent::SandboxCreated {
                caller,
                user,
                limits,
                workspace,
                rootfs,
                host_uid_base,
                cgroup_version,
                hostname,
                pre_started,
                gpus,
            } => {
                let mut d = json!({
                    "caller_uid": caller.0, "caller_pid": caller.1,
                    "user": user, "limits": limits, "workspace": workspace,
                    "rootfs": rootfs, "host_uid_base": host_uid_base,
                    "cgroup_version": cgroup_version, "hostname": hostname,
                    "pre_started": pre_started,
                });
                if let (Some(g), Some(o)) = (gpus, d.as_object_mut()) {
                    o.insert("gpus".into(), json!(g));
                }
                (AuditKind::Sandbox, "create", d)
            }
            AuditEvent::SandboxDestroyed { reason, problems } => (
                AuditKind::Sandbox,
                "destroy",
                json!({"reason": reason, "problems": problems}),
            ),
            AuditEvent::SandboxRecovered { problems } => (
                AuditKind::Sandbox,
                "recovered",
                json!({"reason": "owner broker gone", "problems": problems}),
            ),
            AuditEvent::ComponentFailed { role, reason } => (
                AuditKind::Sandbox,
                "component_failed",
                json!({"role": role, "reason": reason}),
            ),
            AuditEvent::JailSelftest {
                landlock_abi,
                seccomp_profile,
                report,
                setup_us,
                fs_server,
            } => {
                let mut d = json!({
                    "passed": report.passed,
                    "landlock_abi": landlock_abi,
                    "seccomp_profile": seccomp_profile,
                    "report": report,
                });
                if let Some(o) = d.as_object_mut() {
                    if let Some(s) = setup_us {
                        o.insert("setup_us".into(), json!(s));
                    }
                    if let Some(f) = fs_server {
                        o.insert("fs_server".into(), json!(f));
                    }
                }
                (AuditKind::Jail, "selftest", d)
            }
            AuditEvent::ExecStarted {
                exec_id,
                argv,
                cwd,
                user,
            } => (
                AuditKind::Exec,
                "start",
                json!({
                    "exec_id": exec_id, "argv": argv, "cwd": cwd, "user": user.0, "uid": user.1,
                }),
            ),
            AuditEvent::ExecExit {
                exec_id,
                argv,
                cwd,
                user,
                exit,
            } => (
                AuditKind::Exec,
                "exit",
                json!({
                    "exec_id": exec_id, "argv": argv, "cwd": cwd, "user": user.0, "uid": user.1,
                    "exit_code": exit.code, "signal": exit.signal, "oom": exit.oom,
                    "pids_limit_hit": exit.pids_limit_hit, "timed_out": exit.timed_out,
                    "duration_ms": exit.duration_ms, "error": exit.error,
                }),
            ),
            AuditEvent::Fs(ev) => {
                let (kind, action) = match &ev {
                    airlock_fs::FsEvent::Denied { .. } => (AuditKind::Denial, "fs_denied"),
                    airlock_fs::FsEvent::QuotaHit { .. } => (AuditKind::Limit, "disk"),
                    _ => (AuditKind::Fs, "mutation"),
                };
                (kind, action, serde_json::to_value(&ev).unwrap_or_default())
            }
            AuditEvent::Net(ev) => {
                use airlock_net::gateway::NetEvent;
                let (kind, action) = match &ev {
                    NetEvent::Flow { .. } => (AuditKind::Net, "flow"),
                    NetEvent::Dns { .. } => (AuditKind::Net, "dns"),
                    NetEvent::Limit { .. } => (AuditKind::Limit, "net"),
                    NetEvent::Dropped { .. } => (AuditKind::Limit, "audit_rate_limited"),
                };
                (kind, action, serde_json::to_value(&ev).unwrap_or_default())
            }
            AuditEvent::FsEventsDropped {
                dropped,
                events_per_sec,
            } => (
                AuditKind::Limit,
                "audit_rate_limited",
                json!({"dropped_fs_events": dropped, "events_per_sec": events_per_sec}),
            ),
            AuditEvent::PortForward { caller, host, port } => (
                AuditKind::Net,
                "port_forward",
                json!({"caller_uid": caller.0, "caller_pid": caller.1, "host": host, "port": port}),
            ),
            AuditEvent::PortForwardRemoved { caller, host, port } => (
                AuditKind::Net,
                "port_forward_removed",
                json!({"caller_uid": caller.0, "caller_pid": caller.1, "host": host, "port": port}),
            ),
            AuditEvent::Killed { caller, processes } => (
                AuditKind::Sandbox,
                "kill",
                json!({"caller_uid": caller.0, "caller_pid": caller.1, "processes": processes}),
            ),
            AuditEvent::Snapshot {
                caller,
                action,
                name,
                layer,
            } => (
                AuditKind::Sandbox,
                action,
                json!({"caller_uid": caller.0, "caller_pid": caller.1, "name": name, "layer": layer}),
            ),
            AuditEvent::NetPolicy { caller, policy } => (
                AuditKind::Net,
                "policy",
                json!({"caller_uid": caller.0, "caller_pid": caller.1, "policy": policy}),
            ),
            AuditEvent::NetEventsDropped {
                dropped,
                events_per_sec,
            } => (
                AuditKind::Limit,
                "audit_rate_limited",
                json!({"dropped_net_events": dropped, "events_per_sec": events_per_sec}),
            ),
            AuditEvent::Oom {
                oom_kills,
                exec_id,
                memory_bytes,
            } => (
                AuditKind::Limit,
                "oom",
                json!({"oom_kills": oom_kills, "exec_id": exec_id, "memory_bytes": memory_bytes}),
            ),
            AuditEvent::PidsMax {
                refused_forks,
                exec_id,
                pids,
            } => (
                AuditKind::Limit,
                "pids_max",
                json!({"refused_forks": refused_forks, "exec_id": exec_id, "pids": pids}),
            ),
            AuditEvent::DeviceProxy {
                driver,
                tables,
                newer_in_branch,
                jail,
            } => (
                AuditKind::Device,
                "proxy",
                json!({"driver": driver, "tables": tables, "newer_in_branch": newer_in_branch,
                       "jail": jail}),
            ),
            AuditEvent::DeviceIoctls(counts) => (AuditKind::Device, "ioctls", json!(counts)),
            AuditEvent::IoctlRefused { reason, reply } => (
                AuditKind::Denial,
                "ioctl",
                json!({"reason": reason, "reply": reply}),
            ),
            AuditEvent::Timeout { timeout_secs } => (
                AuditKind::Limit,
                "timeout",
                json!({"timeout_secs": timeout_secs}),
            ),
            AuditEvent::AuthRefused {
                op,
                caller,
                error,
                unaudited_before,
            } => {
                let mut d = json!({"op": op, "uid": caller.0, "gid": caller.1, "pid": caller.2,
                                   "error": error});
                if let (Some(n), Some(o)) = (unaudited_before, d.as_object_mut()) {
                    o.insert("unaudited_refusals_before".into(), json!(n));
                }
                (AuditKind::Auth, "refused", d)
            }
        };
        AuditRecord {
            kind,
            action: action.to_string(),
            sandbox_id: sandbox_id.map(str::to_string),
            agent: agent.map(str::to_string),
            detail,
        }
    }
}
