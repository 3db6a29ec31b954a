//! Snapshots: a sandbox's copy-on-write layer and its agent's workspace,
//! frozen together in O(1) and restored in O(1).
//!
//! The filesystem server does the work on its own trees (see
//! [`airlock_fs::Snapshots`]): a snapshot freezes both live trees into new
//! frozen layers, a restore serves another chain of frozen layers under
//! emptied live trees. The broker decides when that is safe and keeps the
//! books:
//!
//! - **Only the agent's own workspace.** A workspace given as a host
//!   directory (`--workspace DIR`) is the caller's own tree, never
//!   rearranged: such a sandbox takes no snapshots.
//! - **Nothing runs.** No command may run in the sandbox (no exec in flight,
//!   no process left behind), and none starts while the work is under way.
//! - **One user of the workspace.** The workspace's frozen layers are its
//!   agent's: every sandbox of the agent serves them. A snapshot or restore
//!   changes them, so it is refused while another sandbox of the agent
//!   uses the workspace; pre-started ones are discarded. Creates serve the
//!   chain under the agent's lock, so none is built on a chain that is
//!   changing.
//! - **The workspace's chain survives.** `state_dir/snapshots/AGENT.json`
//!   holds the frozen layers under the agent's workspace, so every later
//!   sandbox of the agent (and a restarted broker) serves the same files.
//!   Frozen layers no snapshot and no chain needs are deleted.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Broker;
use super::host_dirs::HostDir;
use crate::api::types::SnapshotInfo;
use crate::audit::AuditEvent;
use crate::authz::Principal;
use crate::broker::BrokerError;
use crate::fs_server::{FsCommand, FsRole};
use crate::sandbox::{Sandbox, SnapshotRecord};
use crate::spec::SandboxId;
use crate::util::lock_or_recover;

/// How long the broker waits for a filesystem server's answer.
const FS_ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Most snapshots one sandbox keeps (each is a layer every lookup may
/// walk through).
pub(crate) const MAX_SNAPSHOTS: usize = 64;

/// What the broker keeps of an agent's workspace across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
struct AgentLayers {
    /// The frozen layers under the agent's workspace, bottom first.
    workspace: Vec<String>,
}

impl Broker {
    /// The lock that orders creates (readers) against snapshot work
    /// (writers) on `agent`'s workspace.
    pub(super) fn workspace_lock(&self, agent: &str) -> Arc<RwLock<()>> {
        Arc::clone(
            lock_or_recover(&self.workspace_locks)
                .entry(agent.to_string())
                .or_default(),
        )
    }

    fn agent_layers_file(&self, agent: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("snapshots")
            .join(format!("{agent}.json"))
    }

    fn agent_layers(&self, agent: &str) -> AgentLayers {
        std::fs::read(self.agent_layers_file(agent))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_agent_layers(&self, agent: &str, layers: &AgentLayers) -> Result<(), BrokerError> {
        let path = self.agent_layers_file(agent);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec(layers)
            .map_err(|e| BrokerError::Internal(format!("encode {}: {e}", path.display())))?;
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| BrokerError::Internal(format!("write {}: {e}", path.display())))
    }

    /// The frozen layers a new sandbox of `agent` serves: `Some` when its
    /// workspace is the agent's own (snapshots on), `None` otherwise.
    pub(super) fn layers_for(
        &self,
        agent: &str,
        workspace: &HostDir,
    ) -> Option<airlock_fs::LayerChain> {
        let own = self.cfg.state_dir.join("workspaces").join(agent);
        (workspace.path == own).then(|| airlock_fs::LayerChain {
            upper: Vec::new(),
            workspace: self.agent_layers(agent).workspace,
        })
    }

    /// Sends `make(id)` to the sandbox's filesystem server and waits for
    /// its answer.
    fn fs_command(
        &self,
        sb: &Sandbox,
        make: impl FnOnce(u64) -> FsCommand,
    ) -> Result<airlock_fs::LayerChain, BrokerError> {
        let (id, rx) = sb.fs_replies.expect();
        let sent = {
            let res = lock_or_recover(&sb.resources);
            let Some(ctl) = res.as_ref().and_then(|r| r.fs_ctl.as_ref()) else {
                sb.fs_replies.forget(id);
                return Err(BrokerError::NotRunning(sb.id.to_string()));
            };
            crate::component::send_command::<FsRole>(ctl, make(id))
        };
        if let Err(e) = sent {
            sb.fs_replies.forget(id);
            return Err(BrokerError::Internal(format!(
                "tell the filesystem server: {e}"
            )));
        }
        match rx.recv_timeout(FS_ANSWER_WAIT) {
            Ok(Ok(chain)) => Ok(chain),
            Ok(Err(e)) => Err(BrokerError::Conflict(format!(
                "sandbox {}: the filesystem server refused: {e}",
                sb.id
            ))),
            Err(_) => {
                sb.fs_replies.forget(id);
                Err(BrokerError::Internal(format!(
                    "sandbox {}: the filesystem server did not answer within {}s",
                    sb.id,
                    FS_ANSWER_WAIT.as_secs()
                )))
            }
        }
    }

    /// Refuses unless `sb` takes snapshots, nothing runs in it and no other
    /// sandbox uses its workspace; discards the agent's pre-started
    /// sandboxes (they serve the chain about to change).
    fn require_quiet(&self, sb: &Arc<Sandbox>) -> Result<(), BrokerError> {
        if !sb.is_running() {
            return Err(BrokerError::NotRunning(sb.id.to_string()));
        }
        if !sb.layered {
            return Err(BrokerError::BadRequest(format!(
                "sandbox {}: its workspace {} is a host directory of the caller's (--workspace), \
                 which snapshots never rearrange; snapshots need the agent's own workspace",
                sb.id,
                sb.workspace.display()
            )));
        }
        let running = lock_or_recover(&sb.pending).len();
        let procs = sb.processes();
        if running > 0 || procs > 0 {
            return Err(BrokerError::Conflict(format!(
                "sandbox {}: {running} command(s) and {procs} process(es) running; \
                 snapshots and restores need it idle (wait for them, or kill them)",
                sb.id
            )));
        }
        let others: Vec<String> = lock_or_recover(&self.sandboxes)
            .values()
            .filter(|o| o.id != sb.id && o.agent == sb.agent && o.layered && o.is_running())
            .map(|o| o.id.to_string())
            .collect();
        if !others.is_empty() {
            return Err(BrokerError::Conflict(format!(
                "sandbox {}: agent {:?}'s workspace is also in use by sandbox {}; \
                 snapshots and restores need it used by one sandbox",
                sb.id,
                sb.agent,
                others.join(", ")
            )));
        }
        let pooled: Vec<_> = {
            let mut pool = lock_or_recover(&self.pool);
            pool.iter_mut()
                .filter(|(k, _)| k.0 == sb.agent)
                .flat_map(|(_, v)| v.drain(..))
                .collect()
        };
        for (p, _) in pooled {
            p.teardown("its workspace's layers changed");
        }
        Ok(())
    }

    /// Takes a snapshot of sandbox `id` named `name` (or `snap-N`).
    ///
    /// # Errors
    /// [`BrokerError::Conflict`] when it is busy or shares its workspace,
    /// [`BrokerError::BadRequest`] for a bad or taken name or a sandbox
    /// without snapshots.
    pub fn snapshot(
        &self,
        p: &Principal,
        id: &SandboxId,
        name: Option<String>,
    ) -> Result<SnapshotInfo, BrokerError> {
        let sb = self.get(p, id)?;
        let lock = self.workspace_lock(&sb.agent);
        let _ws = lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _gate = sb
            .layer_gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = {
            let taken = lock_or_recover(&sb.snapshots);
            if taken.len() >= MAX_SNAPSHOTS {
                return Err(BrokerError::BadRequest(format!(
                    "sandbox {id} has {MAX_SNAPSHOTS} snapshots, the most: remove one first"
                )));
            }
            let name = name.unwrap_or_else(|| {
                (1..)
                    .map(|n| format!("snap-{n}"))
                    .find(|n| !taken.iter().any(|s| &s.name == n))
                    .unwrap_or_default()
            });
            if !airlock_fs::valid_layer_name(&name) {
                return Err(BrokerError::BadRequest(format!(
                    "snapshot name {:?}: use 1 to 64 of A-Z a-z 0-9 _ . - (not starting with a dot)",
                    name.chars().take(80).collect::<String>()
                )));
            }
            if taken.iter().any(|s| s.name == name) {
                return Err(BrokerError::Conflict(format!(
                    "sandbox {id} already has a snapshot named {name}"
                )));
            }
            name
        };
        self.require_quiet(&sb)?;
        // Layer names are unique across the agent's workspace: sandbox id
        // and a counter.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let layer = format!(
            "{}-{}-{}",
            sb.id,
            crate::util::now_ms(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let chain = self.fs_command(&sb, |rid| FsCommand::Freeze {
            id: rid,
            layer: layer.clone(),
        })?;
        self.save_agent_layers(
            &sb.agent,
            &AgentLayers {
                workspace: chain.workspace.clone(),
            },
        )?;
        let rec = SnapshotRecord {
            name: name.clone(),
            created_ms: crate::util::now_ms(),
            chain,
        };
        lock_or_recover(&sb.snapshots).push(rec.clone());
        self.audit.event(
            Some(id.as_str()),
            Some(&sb.agent),
            AuditEvent::Snapshot {
                caller: (p.uid, p.pid),
                action: "snapshot",
                name: name.clone(),
                layer,
            },
        );
        Ok(self.snapshot_info(&sb, &rec))
    }

    /// The snapshots of sandbox `id`, oldest first.
    ///
    /// # Errors
    /// When there is no such sandbox of the caller's.
    pub fn snapshots(
        &self,
        p: &Principal,
        id: &SandboxId,
    ) -> Result<Vec<SnapshotInfo>, BrokerError> {
        let sb = self.get(p, id)?;
        let recs = lock_or_recover(&sb.snapshots).clone();
        Ok(recs.iter().map(|r| self.snapshot_info(&sb, r)).collect())
    }

    /// Brings sandbox `id`'s copy-on-write layer and workspace back to
    /// snapshot `name`. Later snapshots stay and may be restored too.
    ///
    /// # Errors
    /// As [`Broker::snapshot`]; [`BrokerError::NoSuchSnapshot`].
    pub fn restore(
        &self,
        p: &Principal,
        id: &SandboxId,
        name: &str,
    ) -> Result<SnapshotInfo, BrokerError> {
        let sb = self.get(p, id)?;
        let lock = self.workspace_lock(&sb.agent);
        let _ws = lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _gate = sb
            .layer_gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rec = self.record(&sb, name)?;
        self.require_quiet(&sb)?;
        let chain = rec.chain.clone();
        self.fs_command(&sb, |rid| FsCommand::Restore {
            id: rid,
            chain: chain.clone(),
        })?;
        self.save_agent_layers(
            &sb.agent,
            &AgentLayers {
                workspace: rec.chain.workspace.clone(),
            },
        )?;
        self.audit.event(
            Some(id.as_str()),
            Some(&sb.agent),
            AuditEvent::Snapshot {
                caller: (p.uid, p.pid),
                action: "restore",
                name: name.to_string(),
                layer: rec.chain.workspace.last().cloned().unwrap_or_default(),
            },
        );
        Ok(self.snapshot_info(&sb, &rec))
    }

    /// Removes snapshot `name` of sandbox `id`, and the frozen layers
    /// nothing else needs.
    ///
    /// # Errors
    /// [`BrokerError::NoSuchSnapshot`]; as [`Broker::snapshot`] while the
    /// sandbox's filesystem server cannot be reached.
    pub fn remove_snapshot(
        &self,
        p: &Principal,
        id: &SandboxId,
        name: &str,
    ) -> Result<(), BrokerError> {
        let sb = self.get(p, id)?;
        let lock = self.workspace_lock(&sb.agent);
        let _ws = lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rec = self.record(&sb, name)?;
        let remaining: Vec<SnapshotRecord> = lock_or_recover(&sb.snapshots)
            .iter()
            .filter(|r| r.name != name)
            .cloned()
            .collect();
        // Layers still needed: the chain served now and every other
        // snapshot's.
        let served = self.agent_layers(&sb.agent).workspace;
        let mut keep_ws: HashSet<String> = served.into_iter().collect();
        let mut keep_upper: HashSet<String> = HashSet::new();
        for r in &remaining {
            keep_ws.extend(r.chain.workspace.iter().cloned());
            keep_upper.extend(r.chain.upper.iter().cloned());
        }
        let mut current = airlock_fs::LayerChain::default();
        if sb.is_running() {
            current = self.fs_command(&sb, |rid| FsCommand::Remove {
                id: rid,
                layers: airlock_fs::LayerChain::default(),
            })?;
        }
        keep_upper.extend(current.upper.iter().cloned());
        keep_ws.extend(current.workspace.iter().cloned());
        let drop = airlock_fs::LayerChain {
            upper: rec
                .chain
                .upper
                .iter()
                .filter(|l| !keep_upper.contains(*l))
                .cloned()
                .collect(),
            workspace: rec
                .chain
                .workspace
                .iter()
                .filter(|l| !keep_ws.contains(*l))
                .cloned()
                .collect(),
        };
        if sb.is_running() && (!drop.upper.is_empty() || !drop.workspace.is_empty()) {
            self.fs_command(&sb, |rid| FsCommand::Remove {
                id: rid,
                layers: drop.clone(),
            })?;
        }
        *lock_or_recover(&sb.snapshots) = remaining;
        self.audit.event(
            Some(id.as_str()),
            Some(&sb.agent),
            AuditEvent::Snapshot {
                caller: (p.uid, p.pid),
                action: "snapshot_removed",
                name: name.to_string(),
                layer: rec.chain.workspace.last().cloned().unwrap_or_default(),
            },
        );
        Ok(())
    }

    /// Deletes the frozen workspace layers of `agent` that neither its
    /// workspace's chain nor a snapshot of a live sandbox needs, and what
    /// restores set aside, once no sandbox of the agent serves the
    /// workspace. Runs after a sandbox of the agent is destroyed.
    pub(super) fn collect_layers(&self, agent: &str) {
        let lock = self.workspace_lock(agent);
        let _ws = lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live: Vec<Arc<Sandbox>> = lock_or_recover(&self.sandboxes)
            .values()
            .filter(|s| s.agent == agent && s.layered && s.is_running())
            .cloned()
            .collect();
        let pooled = lock_or_recover(&self.pool)
            .iter()
            .any(|(k, v)| k.0 == agent && !v.is_empty());
        if !live.is_empty() || pooled {
            return;
        }
        // No sandbox is left to restore a snapshot: only the chain the
        // workspace serves is needed.
        let keep: HashSet<String> = self.agent_layers(agent).workspace.into_iter().collect();
        let area = self
            .cfg
            .state_dir
            .join("workspaces")
            .join(agent)
            .join(".airlock");
        if let Ok(entries) = std::fs::read_dir(area.join("layers")) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&n) {
                    let _ = crate::tree::remove_tree(&e.path());
                }
            }
        }
        let _ = crate::tree::remove_tree(&area.join("trash"));
    }

    fn record(&self, sb: &Sandbox, name: &str) -> Result<SnapshotRecord, BrokerError> {
        lock_or_recover(&sb.snapshots)
            .iter()
            .find(|r| r.name == name)
            .cloned()
            .ok_or_else(|| BrokerError::NoSuchSnapshot {
                id: sb.id.to_string(),
                name: name.chars().take(80).collect(),
            })
    }

    /// A snapshot as the API shows it, with the bytes its own layers hold.
    fn snapshot_info(&self, sb: &Sandbox, rec: &SnapshotRecord) -> SnapshotInfo {
        let mut bytes = 0;
        if let Some(l) = rec.chain.upper.last() {
            bytes += crate::tree::du(
                &self
                    .cfg
                    .state_dir
                    .join("layers")
                    .join(sb.id.as_str())
                    .join("upper/.airlock/layers")
                    .join(l),
            );
        }
        if let Some(l) = rec.chain.workspace.last() {
            bytes += crate::tree::du(&sb.workspace.join(".airlock/layers").join(l));
        }
        SnapshotInfo {
            name: rec.name.clone(),
            created_ms: rec.created_ms,
            bytes,
        }
    }
}
