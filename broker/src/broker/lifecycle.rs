//! Sandbox lifecycle: the shape a sandbox is built with, taking an id
//! slot, building its resources (layers, cgroup, FUSE mount, filesystem
//! server, shim), waiting for its jail to prove itself, and handing it to
//! its caller. Any failure releases exactly what was built
//! ([`Resources::release`], the single teardown path).

use super::*;

/// File events audited per sandbox per second (and burst), beyond which
/// they are counted instead.
pub(super) const FS_EVENTS_PER_SEC: f64 = 500.0;

pub(super) const FS_EVENTS_BURST: f64 = 5000.0;

/// Open files a sandbox's filesystem server may hold at least, whatever
/// the sandbox's own limit (its layer roots, the FUSE device clones, and a
/// margin for the sandbox's open files).
pub(super) const FS_SERVER_MIN_NOFILE: u64 = 256;

/// Audits one event of a sandbox's filesystem server.
pub(super) type FsSink = Box<dyn FnMut(FsServerEvent) + Send>;

/// What [`Broker::build`] made: the mountpoint, and the running server's
/// channel and audit sink, to supervise once the sandbox exists.
pub(super) struct BuiltFs {
    mountpoint: PathBuf,
    chan: Channel,
    sink: FsSink,
    /// Where the server's usage reports land.
    disk: Arc<Mutex<crate::api::types::DiskUsage>>,
    /// Where its answers to snapshot commands land.
    replies: Arc<crate::sandbox::FsReplies>,
    /// The agent's workspace counters, when it serves the agent's own.
    workspace_usage: Option<airlock_fs::WorkspaceUsage>,
}

/// Supervises a sandbox's filesystem server: its events become audit rows;
/// its death (or a malformed message) is audited and tears the sandbox
/// down, sparing every other sandbox and the broker.
pub(super) fn supervise_fs(
    sandbox: &Arc<Sandbox>,
    chan: Channel,
    sink: FsSink,
) -> std::io::Result<()> {
    let weak = Arc::downgrade(sandbox);
    let res = lock_or_recover(&sandbox.resources);
    let Some(server) = res.as_ref().and_then(|r| r.mount.as_ref()?.server.as_ref()) else {
        return Err(std::io::Error::other("no filesystem server"));
    };
    server.supervise::<FsRole>(chan, sink, move |ended| {
        component_ended(&weak, "fs", "the filesystem server", ended);
    })
}

/// What a sandbox's component ending on its own means: the sandbox is
/// torn down (unless that is what stopped it) and the reason audited as a
/// `component_failed` row of `role`. `what` names the component in the
/// reason. Never waits for a teardown under way: it runs on the
/// component's supervisor thread, which that teardown joins.
pub(super) fn component_ended(
    sandbox: &std::sync::Weak<Sandbox>,
    role: &'static str,
    what: &str,
    ended: Ended,
) {
    let reason = match ended {
        Ended::Stopped => return,
        Ended::Died => format!("{what} exited"),
        Ended::Malformed(m) => format!("{what} sent a malformed message: {m}"),
        Ended::Failed(f) => format!("{what} failed at {f}"),
    };
    let Some(sb) = sandbox.upgrade() else {
        return;
    };
    if !sb.is_running() {
        return;
    }
    tracing::warn!(sandbox = %sb.id, %reason, "component failed");
    sb.audit.event(
        Some(sb.id.as_str()),
        Some(&sb.agent),
        AuditEvent::ComponentFailed { role, reason },
    );
    sb.teardown_unless_underway(&format!("{what} failed"));
}

/// How long a sandbox may take to come up.
pub(super) const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// What a sandbox is built with and cannot change afterwards.
#[derive(Debug, Clone)]
pub(super) struct Shape {
    pub(super) agent: String,
    pub(super) user: String,
    pub(super) user_ids: (u32, u32),
    pub(super) workspace: HostDir,
    pub(super) rootfs: Option<HostDir>,
    pub(super) nofile: u64,
    /// The disk quota (fixed when the filesystem server starts).
    pub(super) disk: airlock_fs::DiskQuota,
    /// The snapshot a fork starts from.
    pub(super) fork: Option<super::snapshots::StoredSnapshot>,
    /// Granted GPUs.
    pub(super) gpus: Option<Arc<crate::gpu::GpuGrant>>,
}

/// Limits must lie within the configured bounds.
pub(super) fn check_limits(
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
    if limits.disk_bytes < (1 << 20) || limits.disk_bytes > d.max_disk_bytes {
        return Err(BrokerError::BadRequest(format!(
            "limits.disk_bytes {} is outside 1 MiB..{} bytes",
            limits.disk_bytes, d.max_disk_bytes
        )));
    }
    if limits.inodes < 64 || limits.inodes > d.max_inodes {
        return Err(BrokerError::BadRequest(format!(
            "limits.inodes {} is outside 64..{}",
            limits.inodes, d.max_inodes
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

pub(super) fn cleanup_partial(mut res: Resources) {
    for problem in res.release() {
        tracing::warn!(%problem, "cleanup after a failed create");
    }
}

impl Broker {
    pub(super) fn take_slot(&self) -> Result<(u32, nix::fcntl::Flock<File>), BrokerError> {
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

    /// Hands a ready sandbox to its caller: limits, environment and timeout
    /// of the request, audit rows, registry.
    pub(super) fn activate(
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
            Some(id.as_str()),
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
                gpus: sandbox.gpus.as_ref().map(|g| crate::audit::GpusGranted {
                    driver: g.driver.clone(),
                    tables: g.tables.clone(),
                    newer_in_branch: g.newer_in_branch,
                    granted: g.granted(),
                    devices_cgroup: sandbox.devices_cgroup,
                }),
            },
        );
        self.audit.event(
            Some(id.as_str()),
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
                            Some(sb.id.as_str()),
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
    pub(super) fn spawn(
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
        let id = crate::spec::SandboxId::random().map_err(internal("random id"))?;
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
        let sb_dir = self.cfg.state_dir.join("sandboxes").join(id.as_str());
        let layer_dir = self.cfg.state_dir.join("layers").join(id.as_str());
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
        // A fork works in a workspace branch of its own, beside its
        // agent's frozen workspace layers.
        let branch = match &shape.fork {
            Some(_) => match self.make_branch(agent, id.as_str(), workspace) {
                Ok(b) => Some(b),
                Err(e) => {
                    let _ = crate::tree::remove_tree(&layer_dir);
                    return Err(e);
                }
            },
            None => None,
        };
        let workspace = branch.as_ref().unwrap_or(workspace);
        let plan = self.layers_for(agent, &shape.workspace, shape.fork.as_ref());
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
        let mut cgroup = match self.cgroups.create(id.as_str(), &cg_limits) {
            Ok(c) => c,
            Err(e) => {
                let _ = crate::tree::remove_tree(&layer_dir);
                return Err(BrokerError::Internal(format!("create cgroup: {e}")));
            }
        };
        // With GPUs, the devices its processes may open are bounded by the
        // cgroup too (v1), before any of them (its servers included) joins.
        let devices_cgroup = match shape.gpus.as_ref() {
            Some(g) => match cgroup.restrict_devices(&g.device_rules()) {
                Ok(done) => done,
                Err(e) => {
                    let _ = cgroup.remove();
                    let _ = crate::tree::remove_tree(&layer_dir);
                    return Err(BrokerError::Internal(format!("devices cgroup: {e}")));
                }
            },
            None => false,
        };
        if !for_request && let Err(e) = cgroup.set_background(true) {
            // Only costs the foreground some CPU while this one is built.
            tracing::debug!(error = %e, "background cpu weight");
        }
        let mut res = Resources {
            net: None,
            net_ctl: None,
            gpu: None,
            gpu_ctl: None,
            fs_ctl: None,
            mount: None,
            cgroup,
            dirs: vec![sb_dir.clone(), layer_dir.clone()],
            slot: Some(slot_lock),
        };
        if let Some(b) = &branch {
            res.dirs.push(b.path.clone());
        }
        let (layered, serves) = (plan.chain.is_some(), plan.chain.clone().unwrap_or_default());
        let built = self.build(
            id.as_str(),
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
            airlock_fs::DiskQuota {
                bytes: limits.disk_bytes,
                inodes: limits.inodes,
            },
            plan,
            &mut res,
        );
        let BuiltFs {
            mountpoint,
            chan: fs_chan,
            sink: fs_sink,
            disk,
            replies,
            workspace_usage,
        } = match built {
            Ok(x) => x,
            Err(e) => {
                cleanup_partial(res);
                return Err(e);
            }
        };
        let t_mounted = t0.elapsed();
        // The driver's procfs directory, cut down to the granted GPUs.
        let proc_view = match shape
            .gpus
            .as_ref()
            .map(|g| g.write_proc_view(&self.cfg.gpu.proc_dir, &sb_dir.join("gpu-proc")))
        {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                cleanup_partial(res);
                return Err(BrokerError::Internal(format!(
                    "copy the granted part of {}: {e}",
                    self.cfg.gpu.proc_dir.display()
                )));
            }
            None => None,
        };
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
            id: id.to_string(),
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
            gpu: shape.gpus.as_ref().map(|g| airlock_shim::spec::GpuSpec {
                nodes: g.nodes(),
                filter: g.filter.clone(),
                proc_view: proc_view.clone(),
            }),
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
            network: Mutex::new(Default::default()),
            ports: Mutex::new(Vec::new()),
            gpus: shape.gpus.clone(),
            gpu_listener: Mutex::new(None),
            devices_cgroup,
            disk,
            workspace_usage,
            layered,
            branch: branch.is_some(),
            serves: Mutex::new(serves),
            fs_replies: replies,
            layer_gate: std::sync::RwLock::new(()),
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
        match fs_chan.fd().try_clone_to_owned() {
            Ok(fd) => {
                if let Some(r) = lock_or_recover(&sandbox.resources).as_mut() {
                    r.fs_ctl = Some(Channel::from_fd(fd));
                }
            }
            Err(e) => {
                sandbox.teardown("create failed");
                return Err(BrokerError::Internal(format!(
                    "filesystem server command channel: {e}"
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
                Some(id.as_str()),
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
    pub(super) fn build(
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
        quota: airlock_fs::DiskQuota,
        layers: super::snapshots::LayersPlan,
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
        let disk = Arc::new(Mutex::new(crate::api::types::DiskUsage {
            limit_bytes: quota.bytes,
            limit_inodes: quota.inodes,
            ..Default::default()
        }));
        let disk_slot = Arc::clone(&disk);
        // The agent's own workspace (or a fork's branch of it) counts
        // against the agent's quota, shared with its other sandboxes.
        let workspace_usage = match layers.chain {
            Some(_) => {
                let u = self.agent_usage(agent)?;
                Some(airlock_fs::WorkspaceUsage {
                    counters: Arc::clone(&u.counters),
                    limit: u.limit,
                })
            }
            None => None,
        };
        let save_usage = workspace_usage.is_some();
        let replies = Arc::new(crate::sandbox::FsReplies::default());
        let replies_slot = Arc::clone(&replies);
        let broker = self.me_ref.get().cloned().unwrap_or_default();
        let (relay_id, relay_ws) = (id.to_string(), workspace.path.clone());
        let sink: FsSink = Box::new(move |ev: FsServerEvent| {
            // Answers to snapshot commands go to whoever waits for them.
            if let FsServerEvent::Snapshot { id, result } = ev {
                replies_slot.answer(id, result);
                return;
            }
            // Workspace changes go to the other sandboxes serving it.
            if let FsServerEvent::WorkspaceChanged { paths, all } = ev {
                if let Some(b) = broker.upgrade() {
                    b.relay_workspace_change(&relay_id, &relay_ws, paths, all);
                }
                return;
            }
            // Usage reports are state for `inspect`, not audit rows.
            if let FsServerEvent::Fs {
                event:
                    airlock_fs::FsEvent::Usage {
                        bytes,
                        inodes,
                        bytes_limit,
                        inodes_limit,
                    },
            } = ev
            {
                *lock_or_recover(&disk_slot) = crate::api::types::DiskUsage {
                    used_bytes: bytes,
                    used_inodes: inodes,
                    limit_bytes: bytes_limit,
                    limit_inodes: inodes_limit,
                };
                // The agent's numbers moved with it: kept for a restart.
                if save_usage && let Some(b) = broker.upgrade() {
                    b.save_agent_usage(&sagent);
                }
                return;
            }
            let (ev, dropped) = match ev {
                FsServerEvent::Fs { event } => match limiter.admit() {
                    Some(d) => (Some(event), d),
                    None => return,
                },
                FsServerEvent::RateLimited { dropped } => (None, dropped),
                FsServerEvent::Snapshot { .. } | FsServerEvent::WorkspaceChanged { .. } => return,
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
            quota,
            workspace_quota: workspace_usage.as_ref().map(|w| w.limit),
            snapshots: layers.chain,
            frozen_upper: layers.frozen_upper,
            frozen_workspace: layers.frozen_workspace,
            landlock_floor: self.cfg.landlock_floor,
            events_per_sec: FS_EVENTS_PER_SEC,
            events_burst: FS_EVENTS_BURST,
        };
        let mut fds = vec![dev.as_fd(), workspace.fd.as_fd()];
        if let Some(r) = rootfs {
            fds.push(r.fd.as_fd());
        }
        if let Some(w) = &workspace_usage {
            fds.push(w.counters.fd());
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
            disk,
            replies,
            workspace_usage,
        })
    }
}
