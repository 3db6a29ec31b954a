//! The broker: owns every sandbox, checks who may do what, and audits it.
//! Both brokerd (behind the HTTP API) and `airlock run` (embedded) drive
//! this same object.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use airlock_shim::cgroup::{CgroupLimits, CgroupManager};
use airlock_shim::channel::{Channel, ToShim};
use airlock_shim::spec::{ExecRequest, IdRange, Rlimits, SandboxSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::api::types::{AppliedLimits, Chunk, ExecEvent, ExecExit, SandboxInfo};
use crate::audit::{AuditEvent, AuditQuery, AuditRow, AuditStore};
use crate::authz::{AuthzError, Principal};
use crate::component::{Component, Ended};
use crate::config::BrokerConfig;
use crate::fs_server::{FsRole, FsServerEvent, FsServerSpec};
use crate::sandbox::{ExecOutcome, ReadyInfo, Resources, Sandbox, ServedMount};
use crate::spec::{CreateSpec, ExecSpec, ExecUser};
use crate::util::{RateLimiter, lock_or_recover, now_ms, random_hex};

mod pool;
mod recovery;

use pool::{PoolEntry, PoolKey};
use recovery::{OwnerRecord, start_ticks};

pub use crate::spec::{IDS_PER_SANDBOX, SANDBOX_UID};
/// File events audited per sandbox per second (and burst), beyond which
/// they are counted instead.
const FS_EVENTS_PER_SEC: f64 = 500.0;
const FS_EVENTS_BURST: f64 = 5000.0;
/// Connection refusals audited per second (and burst) broker-wide.
const REFUSALS_PER_SEC: f64 = 20.0;
const REFUSALS_BURST: f64 = 200.0;

/// Open files a sandbox's filesystem server may hold at least, whatever
/// the sandbox's own limit (its layer roots, the FUSE device clones, and a
/// margin for the sandbox's open files).
const FS_SERVER_MIN_NOFILE: u64 = 256;

/// Audits one event of a sandbox's filesystem server.
type FsSink = Box<dyn FnMut(FsServerEvent) + Send>;

/// What [`Broker::build`] made: the mountpoint, and the running server's
/// channel and audit sink, to supervise once the sandbox exists.
struct BuiltFs {
    mountpoint: PathBuf,
    chan: Channel,
    sink: FsSink,
}

/// Supervises a sandbox's filesystem server: its events become audit rows;
/// its death (or a malformed message) is audited and tears the sandbox
/// down, sparing every other sandbox and the broker.
fn supervise_fs(sandbox: &Arc<Sandbox>, chan: Channel, sink: FsSink) -> std::io::Result<()> {
    let weak = Arc::downgrade(sandbox);
    let res = lock_or_recover(&sandbox.resources);
    let Some(server) = res.as_ref().and_then(|r| r.mount.as_ref()?.server.as_ref()) else {
        return Err(std::io::Error::other("no filesystem server"));
    };
    server.supervise::<FsRole>(chan, sink, move |ended| {
        let reason = match ended {
            Ended::Stopped => return,
            Ended::Died => "the filesystem server exited".to_string(),
            Ended::Malformed(m) => format!("the filesystem server sent a malformed message: {m}"),
            Ended::Failed(f) => format!("the filesystem server failed at {f}"),
        };
        let Some(sb) = weak.upgrade() else {
            return;
        };
        if !sb.is_running() {
            return;
        }
        tracing::warn!(sandbox = %sb.id, %reason, "component failed");
        sb.audit.event(
            Some(&sb.id),
            Some(&sb.agent),
            AuditEvent::ComponentFailed { role: "fs", reason },
        );
        sb.teardown("filesystem server failed");
    })
}

/// How long a sandbox may take to come up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a request failed; mapped to an HTTP status in one place (api).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    BadRequest(String),
    /// Authorization refused it.
    #[error(transparent)]
    Forbidden(#[from] AuthzError),
    /// No such sandbox (or not visible to the caller).
    #[error("no sandbox {0:?}")]
    NotFound(String),
    /// The sandbox is not running.
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    /// Out of capacity.
    #[error("{0}")]
    Unavailable(String),
    /// Something on the host failed.
    #[error("{0}")]
    Internal(String),
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> BrokerError + '_ {
    move |e| BrokerError::Internal(format!("{what}: {e}"))
}

/// The broker.
#[derive(Debug)]
pub struct Broker {
    cfg: BrokerConfig,
    audit: AuditStore,
    cgroups: CgroupManager,
    exe: PathBuf,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    me: (i32, u64),
    /// Pre-started sandboxes by (agent, user), not yet handed out.
    pool: Mutex<HashMap<PoolKey, Vec<PoolEntry>>>,
    /// Keys with a refill thread running.
    refilling: Mutex<std::collections::HashSet<PoolKey>>,
    /// Commands running in any sandbox of this broker (refills wait for
    /// a quiet moment, see [`Broker::wait_for_quiet`]).
    execs_in_flight: Arc<AtomicUsize>,
    /// Set at shutdown: no more refills.
    closing: AtomicBool,
    /// This broker, for background refills.
    me_ref: OnceLock<Weak<Broker>>,
    /// Budget for auditing refused connections.
    refusals: RateLimiter,
    /// Creates under way per agent, counted against
    /// `max_sandboxes_per_agent` together with the registry (lock order:
    /// `sandboxes`, then this).
    creating: Mutex<HashMap<String, usize>>,
}

/// One create under way for an agent; released on drop (after the sandbox
/// entered the registry, or on failure).
struct AgentReservation<'a> {
    creating: &'a Mutex<HashMap<String, usize>>,
    agent: String,
}

impl Drop for AgentReservation<'_> {
    fn drop(&mut self) {
        let mut c = lock_or_recover(self.creating);
        if let Some(n) = c.get_mut(&self.agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.agent);
            }
        }
    }
}

/// What a sandbox is built with and cannot change afterwards.
#[derive(Debug, Clone)]
struct Shape {
    agent: String,
    user: String,
    user_ids: (u32, u32),
    workspace: HostDir,
    rootfs: Option<HostDir>,
    nofile: u64,
}

/// A host directory opened once by the broker.
#[derive(Debug, Clone)]
struct HostDir {
    /// Canonical path, for messages and the audit log.
    path: PathBuf,
    /// The opened directory (O_PATH).
    fd: Arc<OwnedFd>,
}

/// A running exec: its events, and a way to signal it.
#[derive(Debug)]
pub struct ExecHandle {
    /// Exec id.
    pub exec_id: u64,
    /// Output and the final exit.
    pub events: mpsc::Receiver<ExecEvent>,
    /// The sandbox, to forward signals.
    pub sandbox: Arc<Sandbox>,
}

impl ExecHandle {
    /// Forwards a signal to the command's process group.
    pub fn signal(&self, sig: i32) {
        self.sandbox.signal(self.exec_id, sig);
    }
}

impl Broker {
    /// Opens state, the audit log and the cgroup hierarchy, and removes
    /// whatever a crashed broker left behind. `exe` is the binary that
    /// serves the `__shim` role.
    pub fn start(cfg: BrokerConfig, exe: PathBuf) -> Result<Arc<Broker>, BrokerError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(BrokerError::Internal(
                "the broker must run as root (it maps uid ranges, creates cgroups and mounts \
                 FUSE); start brokerd as a system service or run airlock as root"
                    .into(),
            ));
        }
        for (d, mode) in [
            (cfg.state_dir.clone(), 0o711),
            (cfg.state_dir.join("sandboxes"), 0o711),
            (cfg.state_dir.join("layers"), 0o700),
            (cfg.state_dir.join("workspaces"), 0o700),
            (cfg.state_dir.join("slots"), 0o700),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&d)
                .map_err(internal("create state directory"))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
                .map_err(internal("chmod state directory"))?;
        }
        let audit = AuditStore::open(&cfg.state_dir.join("audit.db"))
            .map_err(|e| BrokerError::Internal(format!("open audit log: {e}")))?;
        let cgroups =
            CgroupManager::detect().map_err(|e| BrokerError::Internal(format!("cgroups: {e}")))?;
        let pid = i32::try_from(std::process::id()).unwrap_or(0);
        let me = (pid, start_ticks(pid).unwrap_or(0));
        let broker = Arc::new(Broker {
            cfg,
            audit,
            cgroups,
            exe,
            sandboxes: Mutex::new(HashMap::new()),
            me,
            pool: Mutex::new(HashMap::new()),
            refilling: Mutex::new(std::collections::HashSet::new()),
            execs_in_flight: Arc::new(AtomicUsize::new(0)),
            closing: AtomicBool::new(false),
            me_ref: OnceLock::new(),
            refusals: RateLimiter::new(REFUSALS_PER_SEC, REFUSALS_BURST),
            creating: Mutex::new(HashMap::new()),
        });
        let _ = broker.me_ref.set(Arc::downgrade(&broker));
        broker.recover();
        Ok(broker)
    }

    /// The config in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// The audit store.
    pub fn audit_store(&self) -> &AuditStore {
        &self.audit
    }

    fn take_slot(&self) -> Result<(u32, nix::fcntl::Flock<File>), BrokerError> {
        for slot in 0..self.cfg.max_sandboxes {
            let path = self
                .cfg
                .state_dir
                .join("slots")
                .join(format!("{slot}.lock"));
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(internal("open slot lock"))?;
            if let Ok(lock) =
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                return Ok((slot, lock));
            }
        }
        Err(BrokerError::Unavailable(format!(
            "all {} sandbox slots are in use",
            self.cfg.max_sandboxes
        )))
    }

    /// Opens a caller-named host directory once and checks the opened
    /// directory itself: the canonical path is opened with
    /// RESOLVE_NO_SYMLINKS (a component swapped for a symlink after
    /// canonicalize fails instead of redirecting), and ownership is read
    /// from the handle. The filesystem server later opens exactly this
    /// directory through the handle, so no rename race can substitute
    /// another one.
    fn validate_dir_for(
        &self,
        p: &Principal,
        what: &'static str,
        dir: &Path,
    ) -> Result<HostDir, BrokerError> {
        let bad = |e: &dyn std::fmt::Display| {
            BrokerError::BadRequest(format!("{what} {}: {e}", dir.display()))
        };
        let (canon, fd) = if p.is_admin() {
            open_host_dir(dir)
        } else {
            // Resolved and opened with the caller's own filesystem identity
            // (uid, gid, supplementary groups): the kernel applies exactly
            // the caller's rights (ACLs included) to every directory on the
            // way, so nothing out of their reach is opened, and errors say
            // no more than the caller could learn by trying themselves.
            let path = dir.to_path_buf();
            crate::sys::as_caller(p.uid, p.gid, caller_groups(p), move || open_host_dir(&path))
                .map_err(|e| bad(&e))?
        }
        .map_err(|e| match e {
            nix::Error::ENOTDIR => bad(&"not a directory"),
            nix::Error::ELOOP => bad(&"changed while being opened"),
            e => bad(&std::io::Error::from(e)),
        })?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| bad(&e))?;
        check_disk_filesystem(&fd).map_err(|e| bad(&e))?;
        if !p.is_admin() && st.st_uid != p.uid {
            return Err(BrokerError::Forbidden(AuthzError::NotOwner {
                uid: p.uid,
                what,
                path: canon.display().to_string(),
                owner: st.st_uid,
            }));
        }
        if canon.starts_with(&self.cfg.state_dir) {
            return Err(BrokerError::BadRequest(format!(
                "{what} {} is inside the broker's state directory",
                canon.display()
            )));
        }
        Ok(HostDir {
            path: canon,
            fd: Arc::new(fd),
        })
    }

    /// Creates a sandbox and waits until its jail has proved itself; hands
    /// out a pre-started one from the pool when the request allows.
    /// Blocking: call from a blocking context.
    pub fn create(&self, p: &Principal, req: CreateSpec) -> Result<SandboxInfo, BrokerError> {
        let agent = match p.resolve_agent(&self.cfg, req.agent.as_deref()) {
            Ok(a) => a,
            Err(e) => {
                self.audit_refusal(p, "create", &e);
                return Err(e.into());
            }
        };
        let d = &self.cfg.limits;
        let l = req.limits.clone();
        let limits = AppliedLimits {
            memory_bytes: l.memory_bytes.unwrap_or(d.memory_bytes),
            pids: l.pids.unwrap_or(d.pids),
            cpu_millis: l.cpu_millis.unwrap_or(d.cpu_millis),
            nofile: l.nofile.unwrap_or(d.nofile),
            timeout_secs: req.timeout_secs.unwrap_or(d.timeout_secs),
        };
        check_limits(&limits, d)?;
        let (user, user_ids) = (req.user.name().to_string(), req.user.ids());
        let env = req.env.clone();
        let rootfs = match &req.rootfs {
            Some(r) => Some(self.validate_dir_for(p, "rootfs", r)?),
            None => None,
        };
        let workspace = match &req.workspace {
            Some(w) => self.validate_dir_for(p, "workspace", w)?,
            None => self.agent_workspace(&agent)?,
        };
        let shape = Shape {
            agent,
            user,
            user_ids,
            workspace,
            rootfs,
            nofile: limits.nofile,
        };
        let _reservation = self.reserve_for_agent(&shape.agent)?;
        let key = self.pool_key(&shape);
        let pooled = key.as_ref().and_then(|k| self.claim(k));
        let was_pooled = pooled.is_some();
        let (sandbox, ready) = match pooled {
            Some(x) => x,
            None => self.spawn(&shape, &limits, true)?,
        };
        if let Some(k) = key {
            self.refill(k, shape.clone());
        }
        self.activate(p, sandbox, ready, limits, env, was_pooled)
    }

    /// Counts a create against the agent's cap, atomically with the check:
    /// concurrent creates cannot all pass a check made before any of them
    /// is registered.
    fn reserve_for_agent(&self, agent: &str) -> Result<AgentReservation<'_>, BrokerError> {
        let registry = lock_or_recover(&self.sandboxes);
        let mut creating = lock_or_recover(&self.creating);
        let under_way = creating.get(agent).copied().unwrap_or(0);
        let held = registry.values().filter(|s| s.agent == agent).count() + under_way;
        if held >= self.cfg.max_sandboxes_per_agent {
            return Err(BrokerError::Unavailable(format!(
                "agent {agent:?} already holds {held} sandboxes (max_sandboxes_per_agent); destroy some first"
            )));
        }
        *creating.entry(agent.to_string()).or_insert(0) += 1;
        Ok(AgentReservation {
            creating: &self.creating,
            agent: agent.to_string(),
        })
    }

    /// The agent's own persistent workspace directory.
    fn agent_workspace(&self, agent: &str) -> Result<HostDir, BrokerError> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
        let w = self.cfg.state_dir.join("workspaces").join(agent);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&w)
            .map_err(internal("create agent workspace"))?;
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = openat2(nix::fcntl::AT_FDCWD, &w, how)
            .map_err(|e| BrokerError::Internal(format!("open {}: {e}", w.display())))?;
        Ok(HostDir {
            path: w,
            fd: Arc::new(fd),
        })
    }

    /// Hands a ready sandbox to its caller: limits, environment and timeout
    /// of the request, audit rows, registry.
    fn activate(
        &self,
        p: &Principal,
        sandbox: Arc<Sandbox>,
        ready: ReadyInfo,
        limits: AppliedLimits,
        env: Vec<String>,
        pooled: bool,
    ) -> Result<SandboxInfo, BrokerError> {
        let id = sandbox.id.clone();
        if pooled {
            let res = lock_or_recover(&sandbox.resources);
            let restored = match res.as_ref() {
                Some(r) => r.cgroup.set_background(false),
                None => Ok(()),
            };
            drop(res);
            if let Err(e) = restored {
                sandbox.teardown("create failed");
                return Err(BrokerError::Internal(format!("restore cpu weight: {e}")));
            }
        }
        let current = *lock_or_recover(&sandbox.limits);
        if current != limits {
            let res = lock_or_recover(&sandbox.resources);
            let applied = match res.as_ref() {
                Some(r) => r.cgroup.set_limits(&CgroupLimits {
                    memory_bytes: limits.memory_bytes,
                    pids: limits.pids,
                    cpu_millis: limits.cpu_millis,
                }),
                None => Ok(()),
            };
            drop(res);
            if let Err(e) = applied {
                sandbox.teardown("create failed");
                return Err(BrokerError::Internal(format!("apply limits: {e}")));
            }
            *lock_or_recover(&sandbox.limits) = limits;
        }
        *lock_or_recover(&sandbox.env) = env;
        sandbox.created_ms.store(now_ms(), Ordering::SeqCst);
        self.audit.event(
            Some(&id),
            Some(&sandbox.agent),
            AuditEvent::SandboxCreated {
                caller: (p.uid, p.pid),
                user: sandbox.user.clone(),
                limits,
                workspace: sandbox.workspace.clone(),
                rootfs: sandbox.rootfs.clone(),
                host_uid_base: sandbox.host_uid_base,
                cgroup_version: sandbox.cgroup_version,
                hostname: sandbox.hostname.clone(),
                pre_started: pooled,
            },
        );
        self.audit.event(
            Some(&id),
            Some(&sandbox.agent),
            AuditEvent::JailSelftest {
                landlock_abi: ready.landlock_abi,
                seccomp_profile: ready.seccomp_profile,
                report: Box::new(ready.selftest),
                setup_us: Some(ready.stages_us),
                fs_server: sandbox.fs_ready.get().cloned().map(Box::new),
            },
        );
        if limits.timeout_secs > 0 {
            let sb = Arc::clone(&sandbox);
            let t = Duration::from_secs(limits.timeout_secs);
            let _ = std::thread::Builder::new()
                .name(format!("timeout-{id}"))
                .spawn(move || {
                    if !sb.wait_ended(t) {
                        sb.timed_out.store(true, Ordering::SeqCst);
                        sb.audit.event(
                            Some(&sb.id),
                            Some(&sb.agent),
                            AuditEvent::Timeout {
                                timeout_secs: t.as_secs(),
                            },
                        );
                        sb.teardown("timeout");
                    }
                });
        }
        let info = sandbox.info();
        lock_or_recover(&self.sandboxes).insert(id, sandbox);
        Ok(info)
    }

    /// Builds and starts a sandbox of `shape`, and waits for its jail to
    /// prove itself. Everything is torn down on any failure.
    /// `for_request`: a caller waits for it, so a pre-started sandbox may
    /// be evicted to free a slot (never for a refill).
    fn spawn(
        &self,
        shape: &Shape,
        limits: &AppliedLimits,
        for_request: bool,
    ) -> Result<(Arc<Sandbox>, ReadyInfo), BrokerError> {
        let Shape {
            agent,
            user,
            user_ids,
            workspace,
            rootfs,
            ..
        } = shape;
        let user_ids = *user_ids;
        let t0 = Instant::now();
        let id = random_hex(6).map_err(internal("random id"))?;
        let (slot, slot_lock) = match self.take_slot() {
            Ok(s) => s,
            // Pre-started sandboxes must never starve a real request.
            Err(_) if for_request && self.evict_one() => self.take_slot()?,
            Err(e) => return Err(e),
        };
        let base = self.cfg.id_range_start + slot * IDS_PER_SANDBOX;
        let hostname = format!("airlock-{id}");

        // From here on every resource is owned by `res`, so a failure tears
        // down exactly what was built.
        let sb_dir = self.cfg.state_dir.join("sandboxes").join(&id);
        let layer_dir = self.cfg.state_dir.join("layers").join(&id);
        let cg_limits = CgroupLimits {
            memory_bytes: limits.memory_bytes,
            pids: limits.pids,
            cpu_millis: limits.cpu_millis,
        };
        // The layer directory and its owner record come first, so that a
        // crash at any later point leaves something recovery can find.
        let upper = layer_dir.join("upper");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&upper)
            .map_err(internal("create upper layer"))?;
        // The fs server serves it as sandbox root's host uid, in a user
        // namespace that maps only the sandbox's range (host root's files
        // are out of its reach).
        if let Err(e) = std::os::unix::fs::chown(&upper, Some(base), Some(base)) {
            let _ = crate::tree::remove_tree(&layer_dir);
            return Err(BrokerError::Internal(format!("chown upper layer: {e}")));
        }
        let owner = OwnerRecord {
            pid: self.me.0,
            start_ticks: self.me.1,
            agent: agent.clone(),
        };
        if let Err(e) = std::fs::write(
            layer_dir.join("owner.json"),
            serde_json::to_vec(&owner).unwrap_or_default(),
        ) {
            let _ = crate::tree::remove_tree(&layer_dir);
            return Err(BrokerError::Internal(format!("write owner record: {e}")));
        }
        let cgroup = match self.cgroups.create(&id, &cg_limits) {
            Ok(c) => c,
            Err(e) => {
                let _ = crate::tree::remove_tree(&layer_dir);
                return Err(BrokerError::Internal(format!("create cgroup: {e}")));
            }
        };
        if !for_request && let Err(e) = cgroup.set_background(true) {
            // Only costs the foreground some CPU while this one is built.
            tracing::debug!(error = %e, "background cpu weight");
        }
        let mut res = Resources {
            mount: None,
            cgroup,
            dirs: vec![sb_dir.clone(), layer_dir.clone()],
            slot: Some(slot_lock),
        };
        let built = self.build(
            &id,
            agent,
            base,
            &sb_dir,
            &layer_dir,
            workspace,
            rootfs,
            user,
            user_ids,
            &hostname,
            limits.nofile,
            &mut res,
        );
        let BuiltFs {
            mountpoint,
            chan: fs_chan,
            sink: fs_sink,
        } = match built {
            Ok(x) => x,
            Err(e) => {
                cleanup_partial(res);
                return Err(e);
            }
        };
        let t_mounted = t0.elapsed();
        let cg_procs = res.cgroup.join_files();
        let cgroup_version = self.cgroups.version();
        let (mine, theirs) = match Channel::pair() {
            Ok(p) => p,
            Err(e) => {
                cleanup_partial(res);
                return Err(BrokerError::Internal(format!("control channel: {e}")));
            }
        };
        let shim_pid =
            match crate::component::spawn_role(&self.exe, crate::SHIM_ROLE, theirs.into_fd()) {
                Ok(pid) => pid,
                Err(e) => {
                    cleanup_partial(res);
                    return Err(BrokerError::Internal(format!(
                        "start shim {}: {e}",
                        self.exe.display()
                    )));
                }
            };
        let spec = SandboxSpec {
            id: id.clone(),
            hostname: hostname.clone(),
            root: mountpoint,
            ids: IdRange {
                uid_base: base,
                gid_base: base,
                count: IDS_PER_SANDBOX,
            },
            cgroup_procs: cg_procs,
            rlimits: Rlimits {
                nofile: limits.nofile,
                core: 0,
            },
            landlock_floor: self.cfg.landlock_floor,
            probe_user: user_ids,
        };
        let sandbox = Arc::new(Sandbox {
            id: id.clone(),
            agent: agent.clone(),
            created_ms: AtomicI64::new(now_ms()),
            hostname,
            user: user.clone(),
            user_ids,
            workspace: workspace.path.clone(),
            rootfs: rootfs.as_ref().map(|r| r.path.clone()),
            limits: Mutex::new(*limits),
            host_uid_base: base,
            env: Mutex::new(Vec::new()),
            cgroup_version,
            ctrl: mine,
            shim_pid,
            init_pid: OnceLock::new(),
            ready: OnceLock::new(),
            fs_ready: OnceLock::new(),
            pending: Mutex::new(HashMap::new()),
            next_exec: AtomicU64::new(1),
            resources: Mutex::new(Some(res)),
            dead: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            ended: (Mutex::new(false), Condvar::new()),
            audit: self.audit.clone(),
            counters: Mutex::new(Default::default()),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = Arc::clone(&sandbox);
        let spawned = std::thread::Builder::new()
            .name(format!("sandbox-{id}"))
            .spawn(move || reader.reader_loop(ready_tx));
        if let Err(e) = spawned {
            sandbox.teardown("create failed");
            let _ = nix::sys::wait::waitpid(shim_pid, None);
            return Err(BrokerError::Internal(format!("control thread: {e}")));
        }
        if let Err(e) = sandbox
            .ctrl
            .send(&ToShim::Spec(Box::new(spec.clone())), &[])
        {
            sandbox.teardown("create failed");
            return Err(BrokerError::Internal(format!("send spec to shim: {e}")));
        }
        let t_spawned = t0.elapsed();
        // The filesystem server started before the shim and served it
        // meanwhile; its own set-up must have succeeded too.
        match Component::await_ready::<FsRole>(&fs_chan) {
            Ok(ready) => {
                tracing::debug!(sandbox = %id, ?ready, "fs server ready");
                let _ = sandbox.fs_ready.set(ready);
            }
            Err(e) => {
                sandbox.teardown("create failed");
                return Err(BrokerError::Internal(format!(
                    "start the filesystem server: {e}"
                )));
            }
        }
        if let Err(e) = supervise_fs(&sandbox, fs_chan, fs_sink) {
            sandbox.teardown("create failed");
            return Err(BrokerError::Internal(format!("fs supervisor thread: {e}")));
        }
        let ready = match ready_rx.recv_timeout(SETUP_TIMEOUT) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                sandbox.teardown("create failed");
                return Err(BrokerError::Internal(e));
            }
            Err(_) => {
                sandbox.teardown("create failed");
                return Err(BrokerError::Internal(format!(
                    "sandbox {id} did not come up within {}s",
                    SETUP_TIMEOUT.as_secs()
                )));
            }
        };
        tracing::debug!(
            sandbox = %id,
            mounted_ms = t_mounted.as_secs_f64() * 1e3,
            spawned_ms = t_spawned.as_secs_f64() * 1e3,
            ready_ms = t0.elapsed().as_secs_f64() * 1e3,
            "create"
        );
        if !ready.selftest.passed {
            self.audit.event(
                Some(&id),
                Some(agent),
                AuditEvent::JailSelftest {
                    landlock_abi: ready.landlock_abi,
                    seccomp_profile: ready.seccomp_profile.clone(),
                    report: Box::new(ready.selftest.clone()),
                    setup_us: None,
                    fs_server: None,
                },
            );
            sandbox.teardown("jail self-test failed");
            return Err(BrokerError::Internal(format!(
                "sandbox {id} refused to start: jail self-test failed: {}",
                ready.selftest.failures.join("; ")
            )));
        }
        Ok((sandbox, ready))
    }

    /// Builds the sandbox directory and the FUSE mount, and starts the
    /// mount's server process in the sandbox's cgroup.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        id: &str,
        agent: &str,
        base: u32,
        sb_dir: &Path,
        layer_dir: &Path,
        workspace: &HostDir,
        rootfs: &Option<HostDir>,
        user: &str,
        user_ids: (u32, u32),
        hostname: &str,
        nofile: u64,
        res: &mut Resources,
    ) -> Result<BuiltFs, BrokerError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(sb_dir)
            .map_err(internal("create sandbox directory"))?;
        // Only host root and the sandbox's own root (pid 1 walks this path
        // to pivot into it) may traverse to the mount.
        std::os::unix::fs::chown(sb_dir, Some(base), Some(base))
            .map_err(internal("chown sandbox directory"))?;
        let mountpoint = sb_dir.join("root");
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&mountpoint)
            .map_err(internal("create mountpoint"))?;
        let upper = layer_dir.join("upper");
        let audit = self.audit.clone();
        let (sid, sagent) = (id.to_string(), agent.to_string());
        // A sandbox can make file events as fast as it can loop: its server
        // sends at most the budget and counts the rest (in the sandbox's
        // own process), and the count lands in one row. The same budget
        // here holds a server that would not keep to it.
        let limiter = RateLimiter::new(FS_EVENTS_PER_SEC, FS_EVENTS_BURST);
        let sink: FsSink = Box::new(move |ev: FsServerEvent| {
            let (ev, dropped) = match ev {
                FsServerEvent::Fs { event } => match limiter.admit() {
                    Some(d) => (Some(event), d),
                    None => return,
                },
                FsServerEvent::RateLimited { dropped } => (None, dropped),
            };
            if dropped > 0 {
                audit.event(
                    Some(&sid),
                    Some(&sagent),
                    AuditEvent::FsEventsDropped {
                        dropped,
                        events_per_sec: FS_EVENTS_PER_SEC,
                    },
                );
            }
            if let Some(ev) = ev {
                audit.event(Some(&sid), Some(&sagent), AuditEvent::Fs(ev));
            }
        });
        let dev = airlock_fs::mount_device(&mountpoint)
            .map_err(|e| BrokerError::Internal(format!("mount sandbox filesystem: {e}")))?;
        res.mount = Some(ServedMount {
            mountpoint: mountpoint.clone(),
            server: None,
        });
        let spec = FsServerSpec {
            sandbox_id: id.to_string(),
            rootfs: rootfs.is_some(),
            upper,
            ids: airlock_fs::IdMap {
                host_uid_base: base,
                host_gid_base: base,
                count: IDS_PER_SANDBOX,
            },
            user_ids,
            user: user.to_string(),
            hostname: hostname.to_string(),
            cgroup_procs: res.cgroup.join_files(),
            nofile: nofile.max(FS_SERVER_MIN_NOFILE),
            landlock_floor: self.cfg.landlock_floor,
            events_per_sec: FS_EVENTS_PER_SEC,
            events_burst: FS_EVENTS_BURST,
        };
        let mut fds = vec![dev.as_fd(), workspace.fd.as_fd()];
        if let Some(r) = rootfs {
            fds.push(r.fd.as_fd());
        }
        // Launched, not awaited: it answers INIT while the shim sets up
        // (whose first steps wait on the mount), see Broker::spawn.
        let (server, chan) = Component::launch::<FsRole>(&self.exe, &spec, &fds)
            .map_err(|e| BrokerError::Internal(format!("start the filesystem server: {e}")))?;
        drop(dev);
        if let Some(m) = res.mount.as_mut() {
            m.server = Some(server);
        }
        Ok(BuiltFs {
            mountpoint,
            chan,
            sink,
        })
    }

    /// Audits a connection refused at accept.
    pub fn audit_connection_refused(&self, p: &Principal, error: &str) {
        let Some(dropped) = self.refusals.admit() else {
            return;
        };
        self.audit.event(
            None,
            None,
            AuditEvent::AuthRefused {
                op: "connect".into(),
                caller: (p.uid, p.gid, p.pid),
                error: error.to_string(),
                unaudited_before: Some(dropped),
            },
        );
    }

    fn audit_refusal(&self, p: &Principal, op: &str, e: &AuthzError) {
        self.audit.event(
            None,
            None,
            AuditEvent::AuthRefused {
                op: op.to_string(),
                caller: (p.uid, p.gid, p.pid),
                error: e.to_string(),
                unaudited_before: None,
            },
        );
    }

    fn get(&self, p: &Principal, id: &str) -> Result<Arc<Sandbox>, BrokerError> {
        if let Err(e) = p.check_mapped(&self.cfg) {
            self.audit_refusal(p, "access", &e);
            return Err(e.into());
        }
        let sb = lock_or_recover(&self.sandboxes).get(id).cloned();
        match sb {
            Some(sb) if p.may_access(&self.cfg, &sb.agent) => Ok(sb),
            // Another agent's sandbox is indistinguishable from none.
            _ => Err(BrokerError::NotFound(id.to_string())),
        }
    }

    /// Delivers a signal to a running exec's process group.
    pub fn signal_exec(
        &self,
        p: &Principal,
        id: &str,
        exec_id: u64,
        signal: i32,
    ) -> Result<(), BrokerError> {
        let sb = self.get(p, id)?;
        if !sb.is_running() {
            return Err(BrokerError::NotRunning(id.to_string()));
        }
        if nix::sys::signal::Signal::try_from(signal).is_err() {
            return Err(BrokerError::BadRequest(format!(
                "signal {signal} is not a valid signal number"
            )));
        }
        if !sb.has_exec(exec_id) {
            return Err(BrokerError::NotFound(format!("{id}/execs/{exec_id}")));
        }
        sb.signal(exec_id, signal);
        Ok(())
    }

    /// Sandboxes the caller may see.
    pub fn list(&self, p: &Principal) -> Result<Vec<SandboxInfo>, BrokerError> {
        if let Err(e) = p.check_mapped(&self.cfg) {
            self.audit_refusal(p, "list", &e);
            return Err(e.into());
        }
        let all: Vec<Arc<Sandbox>> = lock_or_recover(&self.sandboxes).values().cloned().collect();
        let mut out: Vec<SandboxInfo> = all
            .iter()
            .filter(|s| p.may_access(&self.cfg, &s.agent))
            .map(|s| s.info())
            .collect();
        out.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// One sandbox.
    pub fn inspect(&self, p: &Principal, id: &str) -> Result<SandboxInfo, BrokerError> {
        Ok(self.get(p, id)?.info())
    }

    /// Destroys a sandbox and forgets it. Blocking.
    pub fn destroy(&self, p: &Principal, id: &str) -> Result<(), BrokerError> {
        let sb = self.get(p, id)?;
        sb.teardown("destroyed");
        lock_or_recover(&self.sandboxes).remove(id);
        Ok(())
    }

    /// Starts destroying a sandbox and returns at once; it shows as
    /// "stopping" until every resource is released, then disappears.
    pub fn destroy_detached(&self, p: &Principal, id: &str) -> Result<(), BrokerError> {
        let sb = self.get(p, id)?;
        let Some(me) = self.me_ref.get().and_then(Weak::upgrade) else {
            return self.destroy(p, id);
        };
        sb.mark_stopping();
        let spawned = std::thread::Builder::new()
            .name(format!("destroy-{id}"))
            .spawn(move || {
                sb.teardown("destroyed");
                lock_or_recover(&me.sandboxes).remove(&sb.id);
            });
        spawned
            .map(drop)
            .map_err(|e| BrokerError::Internal(format!("destroy thread: {e}")))
    }

    /// Destroys every sandbox (broker shutdown).
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // Let refills in flight finish (they stop at the flag and drain).
        let deadline = Instant::now() + SETUP_TIMEOUT;
        while !lock_or_recover(&self.refilling).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.drain_pool();
        let all: Vec<Arc<Sandbox>> = lock_or_recover(&self.sandboxes)
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in all {
            s.teardown("broker shutdown");
        }
        self.audit.flush();
    }

    /// Audit rows the caller may see.
    /// `agent` narrows to one agent the caller may see.
    pub fn audit(
        &self,
        p: &Principal,
        mut q: AuditQuery,
        agent: Option<&str>,
    ) -> Result<Vec<AuditRow>, BrokerError> {
        if let Err(e) = p.check_mapped(&self.cfg) {
            self.audit_refusal(p, "audit", &e);
            return Err(e.into());
        }
        q.agents = match agent {
            Some(a) if p.may_access(&self.cfg, a) => Some(vec![a.to_string()]),
            Some(a) => {
                return Err(AuthzError::Forbidden {
                    uid: p.uid,
                    agent: a.to_string(),
                }
                .into());
            }
            None => p.agents(&self.cfg),
        };
        self.audit.flush();
        self.audit
            .query(&q)
            .map_err(|e| BrokerError::Internal(format!("audit query: {e}")))
    }

    /// Starts a command; output and the exit arrive on the handle.
    pub async fn exec(
        &self,
        p: &Principal,
        id: &str,
        body: ExecSpec,
    ) -> Result<ExecHandle, BrokerError> {
        let sb = self.get(p, id)?;
        if !sb.is_running() {
            return Err(BrokerError::NotRunning(id.to_string()));
        }
        let env = merge_env(&lock_or_recover(&sb.env), body.env.clone());
        let (uid, gid, user) = match body.user {
            ExecUser::Default => (sb.user_ids.0, sb.user_ids.1, sb.user.clone()),
            ExecUser::Named(u) => (u.ids().0, u.ids().1, u.name().to_string()),
            ExecUser::Uid(u) => (u, u, u.to_string()),
        };
        let cwd = body.cwd.clone();
        let pipe = || -> Result<(OwnedFd, OwnedFd), BrokerError> {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| BrokerError::Internal(format!("pipe: {e}")))
        };
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let req = ExecRequest {
            exec_id: 0,
            argv: body.argv.clone(),
            env,
            cwd: cwd.clone(),
            uid,
            gid,
        };
        let before = sb.current_counters();
        let started = Instant::now();
        let in_flight = InFlight::enter(&self.execs_in_flight);
        let (exec_id, outcome_rx) = sb
            .send_exec(req, [in_r, out_w, err_w])
            .map_err(BrokerError::Internal)?;
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.try_send(ExecEvent::Started { exec_id });
        let stdin_bytes = body.stdin.clone();
        let sb2 = Arc::clone(&sb);
        let timeout = body.timeout;
        let argv = body.argv.clone();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let exit = pump(
                &sb2,
                exec_id,
                in_w,
                out_r,
                err_r,
                stdin_bytes,
                outcome_rx,
                &tx,
                started,
                timeout,
            )
            .await;
            let after = sb2.current_counters();
            let mut exit = exit;
            if after.oom_kills > before.oom_kills && exit.signal == Some(libc::SIGKILL) {
                exit.oom = true;
            }
            if after.pids_max_hits > before.pids_max_hits {
                exit.pids_limit_hit = true;
            }
            sb2.audit_limit_hits(before, after, Some(exec_id));
            sb2.audit.event(
                Some(&sb2.id),
                Some(&sb2.agent),
                AuditEvent::ExecExit {
                    exec_id,
                    argv,
                    cwd,
                    user: (user, uid),
                    exit: exit.clone(),
                },
            );
            let _ = tx.send(ExecEvent::Exit(exit)).await;
        });
        Ok(ExecHandle {
            exec_id,
            events: rx,
            sandbox: sb,
        })
    }
}

/// Limits must lie within the configured bounds.
fn check_limits(
    limits: &AppliedLimits,
    d: &crate::config::LimitsConfig,
) -> Result<(), BrokerError> {
    if limits.memory_bytes < (8 << 20) || limits.memory_bytes > d.max_memory_bytes {
        return Err(BrokerError::BadRequest(format!(
            "limits.memory_bytes {} is outside 8 MiB..{} bytes",
            limits.memory_bytes, d.max_memory_bytes
        )));
    }
    if limits.pids < 4 || limits.pids > d.max_pids {
        return Err(BrokerError::BadRequest(format!(
            "limits.pids {} is outside 4..{}",
            limits.pids, d.max_pids
        )));
    }
    if limits.cpu_millis < 10 || limits.cpu_millis > d.max_cpu_millis {
        return Err(BrokerError::BadRequest(format!(
            "limits.cpu_millis {} is outside 10..{}",
            limits.cpu_millis, d.max_cpu_millis
        )));
    }
    if limits.timeout_secs > d.max_timeout_secs {
        return Err(BrokerError::BadRequest(format!(
            "timeout_secs {} exceeds the maximum {}",
            limits.timeout_secs, d.max_timeout_secs
        )));
    }
    if limits.nofile < 16 || limits.nofile > 1 << 20 {
        return Err(BrokerError::BadRequest(format!(
            "limits.nofile {} is outside 16..1048576",
            limits.nofile
        )));
    }
    Ok(())
}

/// The sandbox's environment with an exec's entries on top: an entry of
/// `extra` replaces the one with the same key (the last one wins), in
/// time linear in the number of entries.
fn merge_env(base: &[String], extra: Vec<String>) -> Vec<String> {
    fn key(e: &str) -> &str {
        e.split_once('=').map_or(e, |(k, _)| k)
    }
    let mut slot: HashMap<String, usize> = HashMap::with_capacity(base.len() + extra.len());
    let mut out: Vec<Option<String>> = Vec::with_capacity(base.len() + extra.len());
    for e in base.iter().cloned().chain(extra) {
        if let Some(old) = slot.insert(key(&e).to_string(), out.len())
            && let Some(o) = out.get_mut(old)
        {
            *o = None;
        }
        out.push(Some(e));
    }
    out.into_iter().flatten().collect()
}

fn cleanup_partial(mut res: Resources) {
    for problem in res.release() {
        tracing::warn!(%problem, "cleanup after a failed create");
    }
}

#[allow(clippy::too_many_arguments)]
async fn pump(
    sb: &Arc<Sandbox>,
    exec_id: u64,
    stdin_w: OwnedFd,
    out_r: OwnedFd,
    err_r: OwnedFd,
    stdin: Vec<u8>,
    outcome: tokio::sync::oneshot::Receiver<ExecOutcome>,
    tx: &mpsc::Sender<ExecEvent>,
    started: Instant,
    timeout: Option<Duration>,
) -> ExecExit {
    use tokio::net::unix::pipe;
    // stdin: write what was given, then EOF.
    if let Ok(mut w) = pipe::Sender::from_owned_fd(stdin_w) {
        tokio::spawn(async move {
            let _ = w.write_all(&stdin).await;
        });
    }
    let mut readers = Vec::new();
    for (fd, is_err) in [(out_r, false), (err_r, true)] {
        let tx = tx.clone();
        let sb = Arc::clone(sb);
        readers.push(tokio::spawn(async move {
            let Ok(mut r) = pipe::Receiver::from_owned_fd(fd) else {
                return;
            };
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let chunk = Chunk::new(buf[..n].to_vec());
                        let ev = if is_err {
                            ExecEvent::Stderr(chunk)
                        } else {
                            ExecEvent::Stdout(chunk)
                        };
                        if tx.send(ev).await.is_err() {
                            // Nobody listens any more: stop the command.
                            sb.signal(exec_id, libc::SIGKILL);
                            return;
                        }
                    }
                }
            }
        }));
    }
    let mut timed_out = false;
    let outcome = {
        let closed = tx.clone();
        let wait = async {
            tokio::select! {
                o = outcome => o.unwrap_or(ExecOutcome::SandboxGone),
                _ = closed.closed() => {
                    sb.signal(exec_id, libc::SIGKILL);
                    ExecOutcome::SandboxGone
                }
            }
        };
        match timeout {
            Some(t) => {
                tokio::pin!(wait);
                tokio::select! {
                    o = &mut wait => o,
                    _ = tokio::time::sleep(t) => {
                        timed_out = true;
                        sb.signal(exec_id, libc::SIGKILL);
                        wait.await
                    }
                }
            }
            None => wait.await,
        }
    };
    // Output written just before exit is still in the pipes: drain it, but
    // do not wait forever on a background process that kept them open.
    for mut r in readers {
        if tokio::time::timeout(Duration::from_millis(500), &mut r)
            .await
            .is_err()
        {
            r.abort();
        }
    }
    sb.exit_of(outcome, started, timed_out)
}

/// Counts one running command while alive.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(n: &Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(n))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Canonicalizes `dir` and opens it `O_PATH`, refusing symlinks in the
/// canonical path (one swapped in between the two steps).
fn open_host_dir(dir: &Path) -> Result<(PathBuf, OwnedFd), nix::Error> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    let canon = std::fs::canonicalize(dir)
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)))?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(nix::fcntl::AT_FDCWD, &canon, how)?;
    Ok((canon, fd))
}

/// The caller's primary gid and the supplementary groups of its process.
fn caller_groups(p: &crate::authz::Principal) -> Vec<u32> {
    let mut gids = vec![p.gid];
    // Only if that pid is still a process of the caller (not one that
    // reused the number).
    if p.pid > 0
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", p.pid))
        && status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok())
            == Some(p.uid)
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        gids.extend(
            line.trim_start_matches("Groups:")
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    gids
}

/// Filesystems a caller's `--workspace`/`--rootfs` may live on: ordinary
/// disk filesystems (and tmpfs and overlayfs, which hold ordinary files
/// too). Everything else is refused: procfs, sysfs, cgroupfs, debugfs,
/// tracefs, securityfs, bpf, configfs... expose kernel objects whose
/// permissions assume the opener is the process's owner, not a root broker
/// acting for it; FUSE and network filesystems are served by someone else
/// who could stall the broker. Mounts below the directory are never
/// crossed by the filesystem server (RESOLVE_NO_XDEV), so a pseudo
/// filesystem mounted inside an accepted directory stays unreachable.
const DISK_FILESYSTEMS: &[(i64, &str)] = &[
    (0xEF53, "ext2/3/4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0xF2F5_2010, "f2fs"),
    (0x2FC1_2FC1, "zfs"),
    (0xCA45_1A4E, "bcachefs"),
    (0x0102_1994, "tmpfs"),
    (0x794C_7630, "overlayfs"),
];

/// Refuses a directory that is not on one of [`DISK_FILESYSTEMS`].
fn check_disk_filesystem(fd: &OwnedFd) -> Result<(), String> {
    let sfs = nix::sys::statfs::fstatfs(fd).map_err(|e| format!("statfs: {e}"))?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let magic = i64::from(sfs.filesystem_type().0 as i64);
    if DISK_FILESYSTEMS.iter().any(|(m, _)| *m == magic) {
        return Ok(());
    }
    Err(format!(
        "is on a filesystem of type {magic:#x}, not an ordinary disk filesystem ({}); \
         pseudo, FUSE and network filesystems are refused",
        DISK_FILESYSTEMS
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn merged_env_replaces_by_key_and_keeps_order() {
        let base = vec!["A=1".to_string(), "B=2".to_string(), "C=3".to_string()];
        let extra = vec!["B=x".to_string(), "D=4".to_string(), "B=y".to_string()];
        assert_eq!(merge_env(&base, extra), ["A=1", "C=3", "D=4", "B=y"]);
        // Linear: 200,000 entries merge at once.
        let many: Vec<String> = (0..200_000).map(|i| format!("K{i}=v")).collect();
        assert_eq!(merge_env(&many, many.clone()).len(), 200_000);
    }
}
