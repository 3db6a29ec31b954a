//! The pool of pre-started sandboxes: per (agent, user), up to
//! `pool_size` sandboxes built ahead of demand (namespaces, cgroup, mount,
//! filesystem server, jail and self-test done), refilled in the background
//! when the broker is quiet and at the least CPU weight, handed out by
//! [`Broker::claim`], and evicted when a real request needs the slot.

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Broker, Shape};
use crate::api::types::AppliedLimits;
use crate::sandbox::{ReadyInfo, Sandbox};
use crate::util::lock_or_recover;

/// How long a pool refill waits before it starts (see
/// [`Broker::wait_for_quiet`]).
const REFILL_GRACE: Duration = Duration::from_millis(20);

/// The longest a pre-started sandbox's warm-up may run.
const WARM_MAX: Duration = Duration::from_secs(10);

/// The longest a pool refill waits for running commands to end.
const REFILL_MAX_WAIT: Duration = Duration::from_millis(250);

/// Pool key: (agent, user).
pub(super) type PoolKey = (String, String);

/// A pre-started sandbox and what its jail self-test reported.
pub(super) type PoolEntry = (Arc<Sandbox>, ReadyInfo);

impl Broker {
    /// Requests the pool can serve: the agent's own workspace, the host
    /// base, the default open-files limit and disk quota (fixed at start);
    /// any user,
    /// memory, pids, CPU, timeout and environment (applied when handed out).
    pub(super) fn pool_key(&self, shape: &Shape) -> Option<PoolKey> {
        (self.cfg.pool_size > 0
            && shape.fork.is_none()
            && shape.gpus.is_none()
            && shape.rootfs.is_none()
            && shape.nofile == self.cfg.limits.nofile
            && shape.disk.bytes == self.cfg.limits.disk_bytes
            && shape.disk.inodes == self.cfg.limits.inodes
            && shape.workspace.path == self.cfg.state_dir.join("workspaces").join(&shape.agent))
        .then(|| (shape.agent.clone(), shape.user.clone()))
    }

    /// Takes a live pre-started sandbox for `key`, if any.
    pub(super) fn claim(&self, key: &PoolKey) -> Option<(Arc<Sandbox>, ReadyInfo)> {
        loop {
            let next = lock_or_recover(&self.pool)
                .get_mut(key)
                .and_then(|v| v.pop());
            match next {
                Some((sb, ready)) if sb.is_running() => return Some((sb, ready)),
                Some((sb, _)) => sb.teardown("pool entry died"),
                None => return None,
            }
        }
    }

    /// Tops the pool for `key` up to `pool_size` in the background.
    pub(super) fn refill(&self, key: PoolKey, shape: Shape) {
        let Some(me) = self.me_ref.get().and_then(Weak::upgrade) else {
            return;
        };
        if !lock_or_recover(&self.refilling).insert(key.clone()) {
            return;
        }
        let key_on_error = key.clone();
        let spawned = std::thread::Builder::new()
            .name("pool-refill".into())
            .spawn(move || {
                let defaults = AppliedLimits {
                    memory_bytes: me.cfg.limits.memory_bytes,
                    pids: me.cfg.limits.pids,
                    cpu_millis: me.cfg.limits.cpu_millis,
                    nofile: me.cfg.limits.nofile,
                    timeout_secs: 0,
                    disk_bytes: me.cfg.limits.disk_bytes,
                    inodes: me.cfg.limits.inodes,
                };
                loop {
                    let have = lock_or_recover(&me.pool).get(&key).map_or(0, Vec::len);
                    if have >= me.cfg.pool_size || me.closing.load(Ordering::SeqCst) {
                        break;
                    }
                    me.wait_for_quiet();
                    // Built and pooled on the workspace's frozen layers as
                    // they are (a snapshot discards pooled sandboxes).
                    let ws_lock = me.workspace_lock(&key.0);
                    let _ws = ws_lock
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match me.spawn(&shape, &defaults, false) {
                        Ok(entry) if !me.warm(&entry.0) => {
                            entry.0.teardown("pool warm-up did not end");
                            break;
                        }
                        Ok(entry) => lock_or_recover(&me.pool)
                            .entry(key.clone())
                            .or_default()
                            .push(entry),
                        Err(e) => {
                            tracing::warn!(agent = %key.0, error = %e, "pool refill failed");
                            break;
                        }
                    }
                }
                // Drain before leaving the refilling set: shutdown waits
                // for that set to empty, then lets the process exit, which
                // would cut a teardown of ours short (a FUSE mount and a
                // cgroup left behind).
                if me.closing.load(Ordering::SeqCst) {
                    me.drain_pool();
                }
                lock_or_recover(&me.refilling).remove(&key);
            });
        if spawned.is_err() {
            lock_or_recover(&self.refilling).remove(&key_on_error);
        }
    }

    /// Runs `pool_warm` (if set) in a pre-started sandbox, as its user,
    /// before it is handed out: each sandbox's filesystem is a mount of
    /// its own whose kernel caches start empty, so the caller's first
    /// command would otherwise pay for every lookup of the base (a Python
    /// import walks hundreds of paths). Its status does not matter (a
    /// missing interpreter is fine); false if it did not end within
    /// [`WARM_MAX`] (the sandbox is then not pooled). Not audited: the
    /// broker's own command, before any caller holds the sandbox.
    pub(super) fn warm(&self, sb: &crate::sandbox::Sandbox) -> bool {
        if self.cfg.pool_warm.is_empty() {
            return true;
        }
        let null = |write: bool| {
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open("/dev/null")
                .map(std::os::fd::OwnedFd::from)
        };
        let (Ok(i), Ok(o), Ok(e)) = (null(false), null(true), null(true)) else {
            return true;
        };
        let req = airlock_shim::spec::ExecRequest {
            exec_id: 0,
            argv: self.cfg.pool_warm.clone(),
            env: vec![format!("PATH={}", airlock_shim::spec::DEFAULT_PATH)],
            cwd: "/".into(),
            uid: sb.user_ids.0,
            gid: sb.user_ids.1,
            file_op: None,
            tty: false,
        };
        let Ok((_, mut rx)) = sb.send_exec(req, [i, o, e]) else {
            return false;
        };
        let start = Instant::now();
        while start.elapsed() < WARM_MAX {
            match rx.try_recv() {
                Ok(_) => return true,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => return false,
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        false
    }

    /// Holds a pool refill back until the broker is quiet: a grace of
    /// [`REFILL_GRACE`] (a create is almost always followed at once by its
    /// first exec), then until no command is running, for at most
    /// [`REFILL_MAX_WAIT`] in all. Building a sandbox costs a CPU for
    /// several milliseconds; on a small host, doing it while the caller's
    /// command starts slowed that command by a third.
    pub(super) fn wait_for_quiet(&self) {
        let start = Instant::now();
        std::thread::sleep(REFILL_GRACE);
        while self.execs_in_flight.load(Ordering::SeqCst) > 0
            && start.elapsed() < REFILL_MAX_WAIT
            && !self.closing.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Destroys one pre-started sandbox to free its slot; false if none.
    pub(super) fn evict_one(&self) -> bool {
        let victim = lock_or_recover(&self.pool)
            .values_mut()
            .find_map(|v| v.pop());
        match victim {
            Some((sb, _)) => {
                sb.teardown("evicted from the pool");
                true
            }
            None => false,
        }
    }

    /// Destroys every pre-started sandbox.
    pub(super) fn drain_pool(&self) {
        let all: Vec<_> = lock_or_recover(&self.pool)
            .drain()
            .flat_map(|(_, v)| v)
            .collect();
        for (sb, _) in all {
            sb.teardown("broker shutdown");
        }
    }
}
