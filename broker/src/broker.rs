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
use crate::spec::{CreateSpec, ExecId, ExecSpec, ExecUser, SandboxId};
use crate::util::{RateLimiter, lock_or_recover, now_ms};

mod exec;
mod gpus;
mod host_dirs;
mod lifecycle;
mod network;
mod pool;
mod recovery;
mod snapshots;
mod workspace_quota;

pub(crate) use recovery::start_ticks;

pub use exec::{ExecHandle, Input, Stdin};
use host_dirs::HostDir;
use lifecycle::{SETUP_TIMEOUT, Shape, check_limits};
use pool::{PoolEntry, PoolKey};
use recovery::OwnerRecord;

pub use crate::spec::{IDS_PER_SANDBOX, SANDBOX_UID};
/// Connection refusals audited per second (and burst) broker-wide.
const REFUSALS_PER_SEC: f64 = 20.0;
const REFUSALS_BURST: f64 = 200.0;

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
    /// The sandbox serves no such host port.
    #[error("sandbox {id} does not forward host port {port}")]
    NoSuchForward {
        /// The sandbox.
        id: String,
        /// The host port asked for.
        port: u16,
    },
    /// The sandbox is not running.
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    /// Out of capacity.
    #[error("{0}")]
    Unavailable(String),
    /// The request conflicts with the sandbox's state (busy, shared).
    #[error("{0}")]
    Conflict(String),
    /// No snapshot of that name.
    #[error("sandbox {id} has no snapshot named {name:?}")]
    NoSuchSnapshot {
        /// The sandbox.
        id: String,
        /// The name asked for.
        name: String,
    },
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
    sandboxes: Mutex<HashMap<SandboxId, Arc<Sandbox>>>,
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
    /// Per agent: creates that serve its workspace's frozen layers hold
    /// it for reading, snapshots and restores for writing (see
    /// [`snapshots`]).
    workspace_locks: Mutex<HashMap<String, Arc<std::sync::RwLock<()>>>>,
    /// Per agent: its persistent workspace's counters, shared with the
    /// filesystem servers serving it (see [`workspace_quota`]).
    workspace_usage: Mutex<HashMap<String, Arc<workspace_quota::AgentUsage>>>,
    /// Counters and latencies for `GET /metrics`.
    metrics: Arc<crate::metrics::Metrics>,
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
            (cfg.state_dir.join("snapshots"), 0o700),
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
            workspace_locks: Mutex::new(HashMap::new()),
            workspace_usage: Mutex::new(HashMap::new()),
            metrics: Arc::default(),
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

    /// Creates a sandbox and waits until its jail has proved itself; hands
    /// out a pre-started one from the pool when the request allows.
    /// Blocking: call from a blocking context.
    pub fn create(&self, p: &Principal, req: CreateSpec) -> Result<SandboxInfo, BrokerError> {
        let t0 = Instant::now();
        let r = self.create_inner(p, req);
        self.metrics
            .create_done(r.is_ok(), t0.elapsed().as_secs_f64());
        r
    }

    fn create_inner(&self, p: &Principal, req: CreateSpec) -> Result<SandboxInfo, BrokerError> {
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
            disk_bytes: l.disk_bytes.unwrap_or(d.disk_bytes),
            inodes: l.inodes.unwrap_or(d.inodes),
        };
        check_limits(&limits, d)?;
        let (user, user_ids) = (req.user.name().to_string(), req.user.ids());
        let env = req.env.clone();
        let network = match &req.network {
            Some(n) => n.clone(),
            None => airlock_net::policy::Policy::from_spec(&self.cfg.net.default).map_err(|e| {
                BrokerError::Internal(format!("[net] default in the broker's config: {e}"))
            })?,
        };
        let rootfs = match &req.rootfs {
            Some(r) => Some(self.validate_dir_for(p, "rootfs", r)?),
            None => None,
        };
        let workspace = match &req.workspace {
            Some(w) => self.validate_dir_for(p, "workspace", w)?,
            None => self.agent_workspace(&agent)?,
        };
        let fork = match &req.from_snapshot {
            Some((id, name)) => Some(self.stored_snapshot(&agent, id, name)?),
            None => None,
        };
        // GPUs are resolved against the host's driver now: a request that
        // names one the host lacks, or a driver without tables, fails here
        // with what to change, before anything is built.
        let gpus = if req.gpus.is_empty() {
            None
        } else {
            let g = crate::gpu::grant(&self.cfg.gpu, &req.gpus).map_err(|e| match e {
                crate::gpu::GpuError::Request(m) => BrokerError::BadRequest(m),
                other => BrokerError::Unavailable(other.to_string()),
            })?;
            if !p.is_admin()
                && let Err(e) = self.caller_may_open(p, &g)
            {
                if let BrokerError::Forbidden(a) = &e {
                    self.audit_refusal(p, "create", a);
                }
                return Err(e);
            }
            Some(Arc::new(g))
        };
        let shape = Shape {
            fork,
            agent,
            user,
            user_ids,
            workspace,
            rootfs,
            nofile: limits.nofile,
            disk: airlock_fs::DiskQuota {
                bytes: limits.disk_bytes,
                inodes: limits.inodes,
            },
            gpus,
        };
        let _reservation = self.reserve_for_agent(&shape.agent)?;
        // Built on the workspace's frozen layers as they are: no snapshot
        // changes them until this sandbox is registered.
        let ws_lock = self.workspace_lock(&shape.agent);
        let _ws = ws_lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = self.pool_key(&shape);
        let pooled = key.as_ref().and_then(|k| self.claim(k));
        let was_pooled = pooled.is_some();
        if key.is_some() {
            self.metrics.pool(was_pooled);
        }
        let (sandbox, ready) = match pooled {
            Some(x) => x,
            None => self.spawn(&shape, &limits, true)?,
        };
        if let Some(k) = key {
            self.refill(k, shape.clone());
        }
        if let Err(e) = self.attach_network(&sandbox, &network) {
            sandbox.teardown("create failed");
            return Err(e);
        }
        if let Err(e) = self.attach_gpus(&sandbox) {
            sandbox.teardown("create failed");
            return Err(e);
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

    fn get(&self, p: &Principal, id: &SandboxId) -> Result<Arc<Sandbox>, BrokerError> {
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
        id: &SandboxId,
        exec_id: ExecId,
        signal: i32,
    ) -> Result<(), BrokerError> {
        let sb = self.get(p, id)?;
        if !sb.is_running() {
            return Err(BrokerError::NotRunning(id.to_string()));
        }
        if !airlock_shim::sys::is_signal(signal) {
            return Err(BrokerError::BadRequest(format!(
                "signal {signal} is not a signal number (1 to {}, real-time signals included)",
                libc::SIGRTMAX()
            )));
        }
        if !sb.has_exec(exec_id.0) {
            return Err(BrokerError::NotFound(format!("{id}/execs/{exec_id}")));
        }
        sb.signal(exec_id.0, signal);
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
    pub fn inspect(&self, p: &Principal, id: &SandboxId) -> Result<SandboxInfo, BrokerError> {
        Ok(self.get(p, id)?.info())
    }

    /// Kills every process in sandbox `id` but its init (running commands
    /// end with SIGKILL); the sandbox stays, idle. Returns how many.
    ///
    /// # Errors
    /// When there is no such running sandbox of the caller's.
    pub fn kill_processes(&self, p: &Principal, id: &SandboxId) -> Result<usize, BrokerError> {
        let sb = self.get(p, id)?;
        if !sb.is_running() {
            return Err(BrokerError::NotRunning(id.to_string()));
        }
        let killed = sb.kill_processes();
        self.audit.event(
            Some(id.as_str()),
            Some(&sb.agent),
            AuditEvent::Killed {
                caller: (p.uid, p.pid),
                processes: killed,
            },
        );
        Ok(killed)
    }

    /// Which agents' events `p` may see (narrowed to `agent` when given).
    ///
    /// # Errors
    /// When `p` is not mapped to any agent, or may not see `agent`.
    pub fn event_filter(
        &self,
        p: &Principal,
        agent: Option<&str>,
    ) -> Result<impl Fn(&str) -> bool + Send + 'static, BrokerError> {
        if let Err(e) = p.check_mapped(&self.cfg) {
            self.audit_refusal(p, "events", &e);
            return Err(e.into());
        }
        if let Some(a) = agent
            && !p.may_access(&self.cfg, a)
        {
            return Err(AuthzError::Forbidden {
                uid: p.uid,
                agent: a.to_string(),
            }
            .into());
        }
        let cfg = self.cfg.clone();
        let p = *p;
        let only = agent.map(str::to_string);
        Ok(move |a: &str| only.as_deref().is_none_or(|o| o == a) && p.may_access(&cfg, a))
    }

    /// Lifecycle events from now on (see [`AuditStore::subscribe`]).
    pub fn subscribe_events(
        &self,
    ) -> tokio::sync::broadcast::Receiver<Arc<crate::audit::LiveEvent>> {
        self.audit.subscribe()
    }

    /// A `GET /metrics` scrape as `p` may see it: the broker-wide series,
    /// and per-sandbox ones for the sandboxes `p` may see.
    pub fn metrics_text(&self, p: &Principal) -> Result<String, BrokerError> {
        if let Err(e) = p.check_mapped(&self.cfg) {
            self.audit_refusal(p, "metrics", &e);
            return Err(e.into());
        }
        let all: Vec<Arc<Sandbox>> = lock_or_recover(&self.sandboxes).values().cloned().collect();
        let mut states: std::collections::BTreeMap<String, i64> = ["running", "stopping", "dead"]
            .iter()
            .map(|s| ((*s).to_string(), 0))
            .collect();
        let mut used = Vec::new();
        for sb in &all {
            *states.entry(sb.state().to_string()).or_insert(0) += 1;
            if !sb.is_running() || !p.may_access(&self.cfg, &sb.agent) {
                continue;
            }
            let Some(usage) = lock_or_recover(&sb.resources)
                .as_ref()
                .map(|r| r.cgroup.usage())
            else {
                continue;
            };
            used.push(crate::metrics::SandboxUse {
                labels: crate::metrics::SandboxLabels {
                    sandbox: sb.id.to_string(),
                    agent: sb.agent.clone(),
                },
                usage,
                oom_kills: sb.current_counters().oom_kills,
                disk_bytes: lock_or_recover(&sb.disk).used_bytes,
            });
        }
        let states: Vec<(String, i64)> = states.into_iter().collect();
        let (queued, dropped) = self.audit.queue_stats();
        let state = crate::metrics::state_registry(&states, queued, dropped, &used);
        Ok(self.metrics.encode(&state))
    }

    /// Destroys a sandbox and forgets it. Blocking.
    pub fn destroy(&self, p: &Principal, id: &SandboxId) -> Result<(), BrokerError> {
        let sb = self.get(p, id)?;
        sb.teardown("destroyed");
        lock_or_recover(&self.sandboxes).remove(id);
        if sb.layered {
            self.collect_layers(&sb.agent);
        }
        Ok(())
    }

    /// Starts destroying a sandbox and returns at once; it shows as
    /// "stopping" until every resource is released, then disappears.
    pub fn destroy_detached(&self, p: &Principal, id: &SandboxId) -> Result<(), BrokerError> {
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
                if sb.layered {
                    me.collect_layers(&sb.agent);
                }
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
        let mut layered = std::collections::BTreeSet::new();
        for s in all {
            s.teardown("broker shutdown");
            if s.layered {
                layered.insert(s.agent.clone());
            }
        }
        // What no snapshot needs goes now, and each agent's workspace
        // usage is written as it stands.
        for agent in layered {
            self.collect_layers(&agent);
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
}
