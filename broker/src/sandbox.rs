//! One sandbox and everything it owns: its FUSE mount, cgroup, uid slot,
//! layer directories, shim process and control channel. [`Sandbox::teardown`]
//! (also run when the shim dies on its own) removes all of it, once.
//!
//! States: `Running` from a successful create until teardown, then `Dead`.
//! Execs are tracked by id until the shim reports their end (or the sandbox
//! dies, which ends them all).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use airlock_shim::cgroup::{Cgroup, LimitCounters};
use airlock_shim::channel::{Channel, ChannelError, FromShim, ToShim};
use airlock_shim::selftest::SelfTestReport;
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::api::types::{AppliedLimits, ExecExit, SandboxInfo};
use crate::audit::{AuditEvent, AuditStore};
use crate::util::lock_or_recover;

/// Facts reported by the shim once the jail proved itself.
#[derive(Debug, Clone)]
pub struct ReadyInfo {
    /// What the probe saw.
    pub selftest: SelfTestReport,
    /// Landlock ABI reached.
    pub landlock_abi: u8,
    /// Seccomp profile version.
    pub seccomp_profile: String,
    /// Setup stage timings inside the sandbox, µs.
    pub stages_us: Vec<(String, u64)>,
}

/// How an exec ended, as the shim said.
#[derive(Debug)]
pub enum ExecOutcome {
    /// It ran and ended.
    Exited(airlock_shim::channel::ExitStatus),
    /// It never ran.
    Failed {
        /// Why.
        error: String,
        /// Shell-style code (126, 127).
        code: i32,
    },
    /// The sandbox ended under it.
    SandboxGone,
}

/// How long a network gateway (or device proxy) gets to write its last
/// rows (open flows' end rows, call counts) and exit before it is killed.
/// It exits within milliseconds; the bound is for a loaded host or a
/// CPU-throttled sandbox cgroup (it runs in the sandbox's), where 200 ms
/// lost end rows.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long a filesystem server gets to exit by itself once its mount is
/// gone (it sends its last events first) before it is killed.
const SERVER_EXIT_GRACE: Duration = Duration::from_millis(500);

/// The sandbox's FUSE root: the mount the broker made, and the server
/// process that serves it. Released by detaching the mount (aborting its
/// connection first, so nothing waits on the server), then killing and
/// reaping the server.
#[derive(Debug)]
pub struct ServedMount {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The server, once started.
    pub server: Option<crate::component::Component>,
}

impl ServedMount {
    /// Detaches the mount and stops its server; returns what went wrong
    /// (a server that did not exit by itself once its mount was gone lost
    /// its last events).
    pub fn unmount(mut self) -> Vec<String> {
        self.release()
    }

    fn release(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = airlock_fs::force_unmount(&self.mountpoint) {
            problems.push(format!("{e}"));
        }
        if let Some(server) = self.server.take()
            && !server.stop(SERVER_EXIT_GRACE)
        {
            problems.push(format!(
                "the filesystem server did not exit within {} ms of its mount going, and was killed",
                SERVER_EXIT_GRACE.as_millis()
            ));
        }
        problems
    }
}

impl Drop for ServedMount {
    fn drop(&mut self) {
        if self.server.is_some() {
            for p in self.release() {
                tracing::warn!(problem = %p, "release of a dropped mount");
            }
        }
    }
}

/// Everything that must be released when the sandbox goes away.
#[derive(Debug)]
pub struct Resources {
    /// The FUSE root and its server.
    pub mount: Option<ServedMount>,
    /// The network gateway, when the sandbox has a network.
    pub net: Option<crate::component::Component>,
    /// The broker's end for commanding that gateway.
    pub net_ctl: Option<Channel>,
    /// The device proxy, when the sandbox has GPUs.
    pub gpu: Option<crate::component::Component>,
    /// The broker's end for commanding that proxy.
    pub gpu_ctl: Option<Channel>,
    /// The broker's end for commanding the filesystem server.
    pub fs_ctl: Option<Channel>,
    /// The cgroup.
    pub cgroup: Cgroup,
    /// Directories to delete (mountpoint parent, layers).
    pub dirs: Vec<PathBuf>,
    /// The uid-range slot lock.
    pub slot: Option<nix::fcntl::Flock<File>>,
}

impl Resources {
    /// What a broker that died left of sandbox `id`, found by name in its
    /// state directory, to [`Resources::release`] at recovery.
    pub fn leftover(id: &str, state_dir: &std::path::Path, cgroup: Cgroup) -> Resources {
        let sb_dir = state_dir.join("sandboxes").join(id);
        Resources {
            net: None,
            net_ctl: None,
            gpu: None,
            gpu_ctl: None,
            fs_ctl: None,
            mount: Some(ServedMount {
                mountpoint: sb_dir.join("root"),
                server: None,
            }),
            cgroup,
            dirs: vec![sb_dir, state_dir.join("layers").join(id)],
            slot: None,
        }
    }

    /// Releases everything, in the one order that works whatever state the
    /// sandbox is in, and returns what could not be released. The mount
    /// first: aborting its connection wakes everything that waits on its
    /// server (so no kill below is held up by a request), and a live server
    /// sends the events of the sandbox's last file changes as it winds
    /// down. Then every process in the cgroup, the directories (in constant
    /// memory whatever their shape), and last the id slot.
    pub fn release(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // The gateway first: its link goes with it (the kernel deletes the
        // veth pair with the link's namespace, which only its socket holds).
        // Asked to drain, it writes the end rows of its open flows and
        // exits; the stop waits a moment for that, then kills.
        drain::<crate::net_server::NetRole>(
            self.net.take(),
            self.net_ctl.take(),
            crate::net_server::NetCommand::Drain,
        );
        // The device proxy reports its last counts and exits; a sandbox
        // call still waiting on it then fails (ENOSYS) and the cgroup's
        // kill below ends its caller.
        drain::<crate::gpu_server::GpuRole>(
            self.gpu.take(),
            self.gpu_ctl.take(),
            crate::gpu_server::GpuCommand::Drain,
        );
        if let Some(m) = self.mount.take() {
            problems.extend(m.unmount());
        }
        if let Err(e) = self.cgroup.remove() {
            problems.push(format!("{e}"));
        }
        for d in &self.dirs {
            if let Err(e) = crate::tree::remove_tree(d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                problems.push(format!("remove {}: {e}", d.display()));
            }
        }
        drop(self.slot.take());
        problems
    }
}

/// Asks a component to drain (`command` on `ctl`) and stops it: it gets
/// [`DRAIN_GRACE`] to send its last events and exit when the command
/// went out, none otherwise.
fn drain<R: crate::component::Role>(
    component: Option<crate::component::Component>,
    ctl: Option<Channel>,
    command: R::Command,
) {
    let drained = ctl.is_some_and(|ctl| crate::component::send_command::<R>(&ctl, command).is_ok());
    if let Some(c) = component {
        c.stop(if drained { DRAIN_GRACE } else { Duration::ZERO });
    }
}

/// A live (or dead, until removed) sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// Id.
    pub id: crate::spec::SandboxId,
    /// Owning agent.
    pub agent: String,
    /// Creation time, unix ms (when handed to its caller).
    pub created_ms: std::sync::atomic::AtomicI64,
    /// Hostname.
    pub hostname: String,
    /// Default exec user name.
    pub user: String,
    /// (uid, gid) inside for the default user.
    pub user_ids: (u32, u32),
    /// Host dir behind /workspace.
    pub workspace: PathBuf,
    /// Base dir if not the host.
    pub rootfs: Option<PathBuf>,
    /// Limits in force (set again when a pre-started sandbox is handed out).
    pub limits: Mutex<AppliedLimits>,
    /// Host uid of sandbox root.
    pub host_uid_base: u32,
    /// Default environment of execs.
    pub env: Mutex<Vec<String>>,
    /// cgroup version.
    pub cgroup_version: airlock_shim::cgroup::CgroupVersion,
    pub(crate) ctrl: Channel,
    pub(crate) shim_pid: Pid,
    pub(crate) init_pid: OnceLock<i32>,
    pub(crate) ready: OnceLock<ReadyInfo>,
    /// What the filesystem server reported once confined.
    pub(crate) fs_ready: OnceLock<crate::fs_server::FsReady>,
    pub(crate) pending: Mutex<HashMap<u64, oneshot::Sender<ExecOutcome>>>,
    pub(crate) next_exec: AtomicU64,
    pub(crate) resources: Mutex<Option<Resources>>,
    pub(crate) dead: AtomicBool,
    pub(crate) timed_out: AtomicBool,
    pub(crate) ended: (Mutex<bool>, Condvar),
    pub(crate) audit: AuditStore,
    pub(crate) counters: Mutex<LimitCounters>,
    /// The network policy in force (mode none until a link is attached).
    pub(crate) network: Mutex<airlock_net::policy::NetworkSpec>,
    /// Host ports its gateway serves.
    pub(crate) ports: Mutex<Vec<crate::api::types::ForwardedPort>>,
    /// Its GPUs, when it has any.
    pub(crate) gpus: Option<Arc<crate::gpu::GpuGrant>>,
    /// The listener of its device proxy's filter, from pid 1's ready
    /// report until the proxy takes it.
    pub(crate) gpu_listener: Mutex<Option<std::os::fd::OwnedFd>>,
    /// Whether its cgroup bounds the devices it may open (v1 devices
    /// controller; with GPUs only).
    pub(crate) devices_cgroup: bool,
    /// What its layers hold, as its filesystem server last reported.
    pub(crate) disk: Arc<Mutex<crate::api::types::DiskUsage>>,
    /// Its agent's workspace counters, when it serves the agent's own
    /// workspace (shared with the agent's other sandboxes).
    pub(crate) workspace_usage: Option<airlock_fs::WorkspaceUsage>,
    /// Whether it takes snapshots (its workspace is its agent's own, or
    /// a branch of it).
    pub(crate) layered: bool,
    /// Whether its workspace is a fork's branch of its agent's.
    pub(crate) branch: bool,
    /// The frozen layers its filesystem server serves.
    pub(crate) serves: Mutex<airlock_fs::LayerChain>,
    /// Answers of its filesystem server to snapshot commands.
    pub(crate) fs_replies: Arc<FsReplies>,
    /// Held (for writing) while a snapshot or restore runs; an exec takes
    /// it for reading to start, and is refused while it is held.
    pub(crate) layer_gate: std::sync::RwLock<()>,
}

/// Answers of a filesystem server to [`crate::fs_server::FsCommand`]s,
/// routed by request id from its event stream to the caller waiting.
#[derive(Debug, Default)]
pub struct FsReplies {
    next: AtomicU64,
    waiting:
        Mutex<HashMap<u64, std::sync::mpsc::SyncSender<Result<airlock_fs::LayerChain, String>>>>,
}

impl FsReplies {
    /// A new request id and where its answer will arrive.
    pub fn expect(
        &self,
    ) -> (
        u64,
        std::sync::mpsc::Receiver<Result<airlock_fs::LayerChain, String>>,
    ) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        lock_or_recover(&self.waiting).insert(id, tx);
        (id, rx)
    }

    /// Hands an answer to its waiter (an unknown id is ignored).
    pub fn answer(&self, id: u64, result: Result<airlock_fs::LayerChain, String>) {
        if let Some(tx) = lock_or_recover(&self.waiting).remove(&id) {
            let _ = tx.try_send(result);
        }
    }

    /// Forgets a request nobody waits for any more.
    pub fn forget(&self, id: u64) {
        lock_or_recover(&self.waiting).remove(&id);
    }
}

impl Sandbox {
    /// Processes running in it besides its init (the shim's pid 1):
    /// children of any of init's threads. Every process of the sandbox
    /// descends from init, and orphans are re-parented to it.
    pub fn processes(&self) -> usize {
        let Some(&pid) = self.init_pid.get() else {
            return 0;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .map(|c| c.split_whitespace().count())
            .sum()
    }

    /// Every process in it but its init, by host pid, with its start
    /// time: init's descendants (a sandbox's processes all descend from
    /// init, orphans re-parented to it). Bounded by the sandbox's pids
    /// limit.
    fn descendants(&self) -> Vec<(i32, u64)> {
        let Some(&init) = self.init_pid.get() else {
            return Vec::new();
        };
        let children = |pid: i32| -> Vec<i32> {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return Vec::new();
            };
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|c| {
                    c.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<i32>>()
                })
                .collect()
        };
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut frontier = children(init);
        while let Some(pid) = frontier.pop() {
            if !seen.insert(pid) || seen.len() > 1 << 16 {
                continue;
            }
            if let Some(t) = crate::broker::start_ticks(pid) {
                out.push((pid, t));
            }
            frontier.extend(children(pid));
        }
        out
    }

    /// Kills (SIGKILL) every process in the sandbox but its init, running
    /// commands included; returns how many. Each is signalled through a
    /// pidfd opened after checking it is the very process found (same
    /// start time), so a pid reused meanwhile is never hit. Repeats until
    /// none is left (a process may fork while it is being killed), at
    /// most a few rounds.
    pub fn kill_processes(&self) -> usize {
        let mut killed = 0;
        for _ in 0..8 {
            let procs = self.descendants();
            if procs.is_empty() {
                break;
            }
            for (pid, ticks) in procs {
                let Some(raw) = rustix::process::Pid::from_raw(pid) else {
                    continue;
                };
                let Ok(fd) = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
                else {
                    continue;
                };
                if crate::broker::start_ticks(pid) != Some(ticks) {
                    continue;
                }
                if rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL).is_ok() {
                    killed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        killed
    }

    /// Whether it still runs.
    pub fn is_running(&self) -> bool {
        !self.dead.load(Ordering::SeqCst)
    }

    /// "running"; "stopping" while teardown is under way; "dead" once every
    /// resource is released.
    pub fn state(&self) -> &'static str {
        if self.is_running() {
            "running"
        } else if *lock_or_recover(&self.ended.0) {
            "dead"
        } else {
            "stopping"
        }
    }

    /// Snapshot for the API.
    pub fn info(&self) -> SandboxInfo {
        let ready = self.ready.get().cloned();
        let counters = self.current_counters();
        SandboxInfo {
            id: self.id.to_string(),
            agent: self.agent.clone(),
            state: self.state().to_string(),
            created_ms: self.created_ms.load(Ordering::SeqCst),
            hostname: self.hostname.clone(),
            user: self.user.clone(),
            workspace: self.workspace.clone(),
            rootfs: self.rootfs.clone(),
            limits: *lock_or_recover(&self.limits),
            host_uid_base: self.host_uid_base,
            cgroup_version: self.cgroup_version,
            counters,
            landlock_abi: ready.as_ref().map(|r| r.landlock_abi).unwrap_or(0),
            seccomp_profile: ready
                .as_ref()
                .map(|r| r.seccomp_profile.clone())
                .unwrap_or_default(),
            selftest: ready.map(|r| r.selftest),
            execs_running: lock_or_recover(&self.pending).len(),
            network: lock_or_recover(&self.network).clone(),
            ports: lock_or_recover(&self.ports).clone(),
            gpus: self.gpus.as_ref().map(|g| g.granted()).unwrap_or_default(),
            disk: *lock_or_recover(&self.disk),
            workspace_disk: self.workspace_usage.as_ref().map(|w| {
                let (bytes, inodes) = w.counters.get();
                crate::api::types::DiskUsage {
                    used_bytes: bytes,
                    used_inodes: inodes,
                    limit_bytes: w.limit.bytes,
                    limit_inodes: w.limit.inodes,
                }
            }),
        }
    }

    /// Live counters (the last seen ones once dead).
    pub fn current_counters(&self) -> LimitCounters {
        let res = lock_or_recover(&self.resources);
        let mut last = lock_or_recover(&self.counters);
        if let Some(r) = res.as_ref() {
            *last = r.cgroup.counters();
        }
        *last
    }

    fn record(&self, ev: AuditEvent) {
        self.audit
            .event(Some(self.id.as_str()), Some(&self.agent), ev);
    }

    /// Audits limit counters that moved since the last look.
    pub fn audit_limit_hits(&self, before: LimitCounters, after: LimitCounters, exec: Option<u64>) {
        if after.oom_kills > before.oom_kills {
            self.record(AuditEvent::Oom {
                oom_kills: after.oom_kills - before.oom_kills,
                exec_id: exec,
                memory_bytes: lock_or_recover(&self.limits).memory_bytes,
            });
        }
        if after.pids_max_hits > before.pids_max_hits {
            self.record(AuditEvent::PidsMax {
                refused_forks: after.pids_max_hits - before.pids_max_hits,
                exec_id: exec,
                pids: lock_or_recover(&self.limits).pids,
            });
        }
    }

    /// Sends an exec request with its stdio; the outcome arrives on the
    /// returned receiver.
    pub fn send_exec(
        &self,
        mut req: airlock_shim::spec::ExecRequest,
        stdio: [OwnedFd; 3],
    ) -> Result<(u64, oneshot::Receiver<ExecOutcome>), String> {
        if !self.is_running() {
            return Err(format!("sandbox {} is not running", self.id));
        }
        let exec_id = self.next_exec.fetch_add(1, Ordering::SeqCst);
        req.exec_id = exec_id;
        let (tx, rx) = oneshot::channel();
        lock_or_recover(&self.pending).insert(exec_id, tx);
        let fds = [stdio[0].as_fd(), stdio[1].as_fd(), stdio[2].as_fd()];
        if let Err(e) = self.ctrl.send(&ToShim::Exec(req), &fds) {
            lock_or_recover(&self.pending).remove(&exec_id);
            return Err(format!("sandbox {} did not take the command: {e}", self.id));
        }
        Ok((exec_id, rx))
    }

    /// Refuses new execs from now on (teardown follows).
    pub fn mark_stopping(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

    /// Whether the exec is still running.
    pub fn has_exec(&self, exec_id: u64) -> bool {
        lock_or_recover(&self.pending).contains_key(&exec_id)
    }

    /// Delivers a signal to an exec's process group.
    pub fn signal(&self, exec_id: u64, signal: i32) {
        let _ = self.ctrl.send(&ToShim::Signal { exec_id, signal }, &[]);
    }

    /// Serves the shim's messages until its channel closes; then tears down.
    pub(crate) fn reader_loop(
        self: &Arc<Self>,
        ready_tx: std::sync::mpsc::Sender<Result<ReadyInfo, String>>,
    ) {
        let mut ready_tx = Some(ready_tx);
        loop {
            match self.ctrl.recv::<FromShim>() {
                Ok((FromShim::Launched { init_pid }, _)) => {
                    let _ = self.init_pid.set(init_pid);
                }
                Ok((
                    FromShim::Ready {
                        selftest,
                        landlock_abi,
                        seccomp_profile,
                        stages_us,
                    },
                    fds,
                )) => {
                    if self.gpus.is_some() {
                        *lock_or_recover(&self.gpu_listener) = fds.into_iter().next();
                    }
                    tracing::debug!(sandbox = %self.id, ?stages_us, "shim setup stages");
                    let info = ReadyInfo {
                        selftest: *selftest,
                        landlock_abi,
                        seccomp_profile,
                        stages_us,
                    };
                    let _ = self.ready.set(info.clone());
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(Ok(info));
                    }
                }
                Ok((FromShim::SetupFailed { stage, error }, _)) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(Err(format!("sandbox setup failed at {stage}: {error}")));
                    }
                }
                Ok((FromShim::Started { .. }, _)) => {}
                Ok((
                    FromShim::ExecFailed {
                        exec_id,
                        error,
                        code,
                    },
                    _,
                )) => {
                    if let Some(tx) = lock_or_recover(&self.pending).remove(&exec_id) {
                        let _ = tx.send(ExecOutcome::Failed { error, code });
                    }
                }
                Ok((FromShim::Exited { exec_id, status }, _)) => {
                    if let Some(tx) = lock_or_recover(&self.pending).remove(&exec_id) {
                        let _ = tx.send(ExecOutcome::Exited(status));
                    }
                }
                // pid 1 lives beside the sandbox's code: a message that does
                // not parse means it may no longer be the shim we started.
                // That sandbox ends, audited; nothing is skipped.
                Err(e @ (ChannelError::Malformed(_) | ChannelError::TooLarge(_))) => {
                    tracing::warn!(sandbox = %self.id, error = %e, "malformed message from the shim");
                    self.record(AuditEvent::ComponentFailed {
                        role: "shim",
                        reason: format!("malformed message: {e}"),
                    });
                    break;
                }
                Err(_) => break,
            }
        }
        if let Some(tx) = ready_tx.take() {
            let _ = tx.send(Err("sandbox shim exited during setup".to_string()));
        }
        let reason = if self.timed_out.load(Ordering::SeqCst) {
            "timeout"
        } else {
            "ended"
        };
        self.teardown(reason);
        // Reap the launcher.
        let _ = nix::sys::wait::waitpid(self.shim_pid, None);
    }

    /// Kills everything and releases every resource; safe to call twice.
    /// If another teardown is under way, returns once it is done, so
    /// "destroyed" means destroyed.
    pub fn teardown(&self, reason: &str) {
        if !self.teardown_unless_underway(reason) {
            self.wait_ended(Duration::from_secs(30));
        }
    }

    /// [`Sandbox::teardown`], but returns at once (false) if another
    /// teardown is under way. For a component's supervisor thread: the
    /// teardown under way stops that component and joins its supervisor,
    /// so the supervisor must not wait for it.
    pub fn teardown_unless_underway(&self, reason: &str) -> bool {
        let taken = lock_or_recover(&self.resources).take();
        let Some(mut res) = taken else {
            return false;
        };
        self.dead.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        let _ = self.ctrl.send(&ToShim::Shutdown, &[]);
        let before = *lock_or_recover(&self.counters);
        let after = res.cgroup.counters();
        *lock_or_recover(&self.counters) = after;
        let problems = res.release();
        for (_, tx) in lock_or_recover(&self.pending).drain() {
            let _ = tx.send(ExecOutcome::SandboxGone);
        }
        tracing::debug!(
            sandbox = %self.id,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "teardown"
        );
        self.audit_limit_hits(before, after, None);
        self.record(AuditEvent::SandboxDestroyed {
            reason: reason.to_string(),
            problems,
        });
        let (lock, cv) = &self.ended;
        *lock_or_recover(lock) = true;
        cv.notify_all();
        true
    }

    /// Blocks until teardown or `d` passes; true if torn down.
    pub fn wait_ended(&self, d: Duration) -> bool {
        let (lock, cv) = &self.ended;
        let deadline = Instant::now()
            .checked_add(d)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
        let mut ended = lock_or_recover(lock);
        while !*ended {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            ended = match cv.wait_timeout(ended, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Outcome to API exit.
    pub fn exit_of(&self, outcome: ExecOutcome, started: Instant, timed_out: bool) -> ExecExit {
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let timed_out = timed_out || self.timed_out.load(Ordering::SeqCst);
        match outcome {
            ExecOutcome::Exited(s) => ExecExit {
                code: s.code,
                signal: s.signal,
                timed_out,
                duration_ms,
                ..ExecExit::default()
            },
            ExecOutcome::Failed { error, code } => ExecExit {
                code: Some(code),
                error: Some(error),
                duration_ms,
                ..ExecExit::default()
            },
            ExecOutcome::SandboxGone => ExecExit {
                signal: Some(libc::SIGKILL),
                timed_out,
                error: Some(if timed_out {
                    format!("sandbox {} reached its timeout and was killed", self.id)
                } else {
                    format!("sandbox {} ended", self.id)
                }),
                duration_ms,
                ..ExecExit::default()
            },
        }
    }
}
