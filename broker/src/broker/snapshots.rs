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
//! - **The agent's books survive.** `state_dir/snapshots/AGENT.json` holds
//!   the frozen layers under the agent's workspace (so every later sandbox
//!   of the agent, and a restarted broker, serve the same files) and the
//!   agent's snapshots, which outlive their sandbox: a snapshot's frozen
//!   copy-on-write layer moves at once (one rename) to
//!   `state_dir/snapshots/AGENT/upper/BASE/`, `BASE` being the host uid
//!   base its files are owned in; its workspace layer lies in the
//!   workspace's `.airlock/layers`. Frozen layers no snapshot and no chain
//!   needs are deleted. Only the agent's callers see or use them.
//! - **Forks.** `create --from-snapshot ID:NAME` serves that snapshot's
//!   layers under an empty copy-on-write layer and an empty workspace
//!   branch of its own (`.airlock/branches/ID` in the agent's workspace),
//!   in O(1). Its files keep their owners: the frozen layers of another
//!   uid range are attached through an idmap onto the fork's.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
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
use crate::sandbox::Sandbox;
use crate::spec::SandboxId;
use crate::util::lock_or_recover;

/// Frozen layers something needs, by tree: a snapshot's copy-on-write
/// and workspace layers share a name, and each goes on its own.
#[derive(Debug, Default)]
struct InUse {
    upper: HashSet<String>,
    workspace: HashSet<String>,
}

/// How long the broker waits for a filesystem server's answer.
const FS_ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Most snapshots one sandbox keeps (each is a layer every lookup may
/// walk through).
pub(crate) const MAX_SNAPSHOTS: usize = 64;

/// What the broker keeps of an agent's layers across restarts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct AgentLayers {
    /// The frozen layers under the agent's workspace, bottom first.
    pub(super) workspace: Vec<String>,
    /// A workspace layer a snapshot was making when this was written: it
    /// is part of the chain if it exists (the freeze got under way).
    #[serde(default)]
    pending: Option<String>,
    /// The agent's snapshots, oldest first.
    #[serde(default)]
    pub(super) snapshots: Vec<StoredSnapshot>,
    /// The host uid base each frozen copy-on-write layer's files are
    /// owned in (that of the sandbox that froze it).
    #[serde(default)]
    pub(super) upper_bases: BTreeMap<String, u32>,
}

/// One snapshot, as kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredSnapshot {
    /// The sandbox it was taken of.
    pub(super) sandbox: String,
    /// Its name, unique per sandbox.
    pub(super) name: String,
    /// When, unix ms.
    pub(super) created_ms: i64,
    /// The frozen layers a restore or fork serves.
    pub(super) chain: airlock_fs::LayerChain,
}

/// How a new sandbox serves frozen layers.
#[derive(Debug, Default)]
pub(super) struct LayersPlan {
    /// The chain to serve; `None`: no snapshots (a caller's workspace).
    pub(super) chain: Option<airlock_fs::LayerChain>,
    /// Host directories of frozen copy-on-write layers by the uid base
    /// their files are owned in.
    pub(super) frozen_upper: Vec<(u32, PathBuf)>,
    /// The host directory of the workspace's frozen layers, for a fork.
    pub(super) frozen_workspace: Option<PathBuf>,
}

/// `base/rel...`, each missing directory made (mode 0700, the last one
/// given to `owner`), none followed if a symlink; the last one opened.
fn mkdirs_nofollow(base: &Path, rel: &[&str], owner: Option<u32>) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    let mut cur = crate::tree::open_dir_nofollow(base)?;
    for (i, c) in rel.iter().enumerate() {
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o700);
        let made = match nix::sys::stat::mkdirat(&cur, *c, mode) {
            Ok(()) => true,
            Err(nix::errno::Errno::EEXIST) => false,
            Err(e) => return Err(e.into()),
        };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
        let next = openat2(&cur, *c, how)?;
        if made
            && i + 1 == rel.len()
            && let Some(o) = owner
        {
            nix::unistd::fchownat(
                &next,
                "",
                Some(nix::unistd::Uid::from_raw(o)),
                Some(nix::unistd::Gid::from_raw(o)),
                nix::fcntl::AtFlags::AT_EMPTY_PATH,
            )?;
        }
        cur = next;
    }
    Ok(cur)
}

impl Broker {
    /// The lock that orders creates (readers) against snapshot work
    /// (writers) on `agent`'s workspace and books.
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

    /// The agent's books (empty when it has none).
    pub(super) fn agent_layers(&self, agent: &str) -> AgentLayers {
        let mut l: AgentLayers = std::fs::read(self.agent_layers_file(agent))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(p) = l.pending.take()
            && self.workspace_layers_dir(agent).join(&p).is_dir()
        {
            l.workspace.push(p);
        }
        l
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

    /// Where the agent's frozen workspace layers lie.
    fn workspace_layers_dir(&self, agent: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("workspaces")
            .join(agent)
            .join(".airlock/layers")
    }

    /// Where the agent's frozen copy-on-write layers of uid base `base`
    /// lie.
    fn upper_store(&self, agent: &str, base: u32) -> PathBuf {
        self.cfg
            .state_dir
            .join("snapshots")
            .join(agent)
            .join("upper")
            .join(base.to_string())
    }

    /// Where a fork's workspace branch lies.
    pub(super) fn branch_dir(&self, agent: &str, id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("workspaces")
            .join(agent)
            .join(".airlock/branches")
            .join(id)
    }

    /// Makes a fork's workspace branch for sandbox `id`, owned like the
    /// agent's workspace `ws`.
    pub(super) fn make_branch(
        &self,
        agent: &str,
        id: &str,
        ws: &HostDir,
    ) -> Result<HostDir, BrokerError> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.branch_dir(agent, id);
        let md = std::fs::metadata(&ws.path)
            .map_err(|e| BrokerError::Internal(format!("stat {}: {e}", ws.path.display())))?;
        let fd = mkdirs_nofollow(&ws.path, &[".airlock", "branches", id], None)
            .and_then(|_| {
                std::os::unix::fs::chown(&dir, Some(md.uid()), Some(md.gid()))?;
                crate::tree::open_dir_nofollow(&dir)
            })
            .map_err(|e| BrokerError::Internal(format!("create {}: {e}", dir.display())))?;
        Ok(HostDir {
            path: dir,
            fd: Arc::new(fd),
        })
    }

    /// The frozen layers a new sandbox of `agent` serves: its workspace's
    /// chain when the workspace is the agent's own, the snapshot's for a
    /// fork, none for a caller's workspace.
    pub(super) fn layers_for(
        &self,
        agent: &str,
        workspace: &HostDir,
        fork: Option<&StoredSnapshot>,
    ) -> LayersPlan {
        let books = self.agent_layers(agent);
        if let Some(snap) = fork {
            let mut bases: Vec<u32> = snap
                .chain
                .upper
                .iter()
                .filter_map(|l| books.upper_bases.get(l).copied())
                .collect();
            bases.sort_unstable();
            bases.dedup();
            return LayersPlan {
                chain: Some(snap.chain.clone()),
                frozen_upper: bases
                    .into_iter()
                    .map(|b| (b, self.upper_store(agent, b)))
                    .collect(),
                frozen_workspace: Some(self.workspace_layers_dir(agent)),
            };
        }
        let own = self.cfg.state_dir.join("workspaces").join(agent);
        if workspace.path != own {
            return LayersPlan::default();
        }
        LayersPlan {
            chain: Some(airlock_fs::LayerChain {
                upper: Vec::new(),
                workspace: books.workspace,
            }),
            ..LayersPlan::default()
        }
    }

    /// The snapshot `name` of sandbox `id` among `agent`'s.
    pub(super) fn stored_snapshot(
        &self,
        agent: &str,
        id: &str,
        name: &str,
    ) -> Result<StoredSnapshot, BrokerError> {
        self.agent_layers(agent)
            .snapshots
            .into_iter()
            .find(|s| s.sandbox == id && s.name == name)
            .ok_or_else(|| BrokerError::NoSuchSnapshot {
                id: id.to_string(),
                name: name.chars().take(80).collect(),
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

    /// Refuses unless `sb` takes snapshots, nothing runs in it and (for
    /// the agent's workspace itself, not a fork's branch) no other sandbox
    /// serves its workspace; discards the agent's pre-started sandboxes
    /// (they serve the chain about to change).
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
                 snapshots and restores need it idle (wait for them, or stop them all with \
                 `airlock kill {}`)",
                sb.id, sb.id
            )));
        }
        if sb.branch {
            return Ok(());
        }
        let others: Vec<String> = lock_or_recover(&self.sandboxes)
            .values()
            .filter(|o| {
                o.id != sb.id && o.agent == sb.agent && o.layered && !o.branch && o.is_running()
            })
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

    /// Runs `f` holding the agent's workspace lock and the sandbox's layer
    /// gate (no create serves the agent's chain, no exec starts in `sb`).
    fn with_layer_locks<T>(&self, sb: &Sandbox, f: impl FnOnce() -> T) -> T {
        let lock = self.workspace_lock(&sb.agent);
        let _ws = lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _gate = sb
            .layer_gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f()
    }

    /// Tells every other sandbox serving workspace `ws` (pre-started ones
    /// included) that sandbox `from` changed `paths` in it, so their
    /// kernels drop what they cached. Never waits: a server whose
    /// channel is full, or a sandbox being torn down, is skipped (its
    /// cached entries expire within a second anyway).
    pub(super) fn relay_workspace_change(
        &self,
        from: &str,
        ws: &Path,
        paths: Vec<String>,
        all: bool,
    ) {
        let mut peers: Vec<Arc<Sandbox>> = lock_or_recover(&self.sandboxes)
            .values()
            .filter(|s| s.id.as_str() != from && s.workspace == ws)
            .cloned()
            .collect();
        peers.extend(
            lock_or_recover(&self.pool)
                .values()
                .flatten()
                .filter(|(s, _)| s.workspace == ws)
                .map(|(s, _)| Arc::clone(s)),
        );
        if peers.is_empty() {
            return;
        }
        let command = FsCommand::Invalidate { paths, all };
        for sb in peers {
            let Ok(res) = sb.resources.try_lock() else {
                continue;
            };
            if let Some(ctl) = res.as_ref().and_then(|r| r.fs_ctl.as_ref()) {
                let _ = crate::component::try_send_command::<FsRole>(ctl, command.clone());
            }
        }
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
        self.with_layer_locks(&sb, || self.snapshot_locked(p, id, &sb, name))
    }

    fn snapshot_locked(
        &self,
        p: &Principal,
        id: &SandboxId,
        sb: &Arc<Sandbox>,
        name: Option<String>,
    ) -> Result<SnapshotInfo, BrokerError> {
        let mut books = self.agent_layers(&sb.agent);
        let name = {
            let taken: Vec<&StoredSnapshot> = books
                .snapshots
                .iter()
                .filter(|s| s.sandbox == id.as_str())
                .collect();
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
        self.require_quiet(sb)?;
        // Layer names are unique across the agent: sandbox id, time and a
        // counter.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let layer = format!(
            "{}-{}-{}",
            sb.id,
            crate::util::now_ms(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        // Written first: a broker killed during the freeze finds the new
        // workspace layer (whole or in part) and serves it.
        if !sb.branch {
            books.pending = Some(layer.clone());
            self.save_agent_layers(&sb.agent, &books)?;
            books.pending = None;
        }
        let chain = self.fs_command(sb, |rid| FsCommand::Freeze {
            id: rid,
            layer: layer.clone(),
        })?;
        *lock_or_recover(&sb.serves) = chain.clone();
        // The frozen layers go where the agent keeps them (the server
        // keeps them open, so it never notices).
        self.store_layers(sb, &layer)?;
        // The stored copy-on-write layer is the agent's now: counted
        // against its workspace quota, off the snapshot's path (a walk).
        let stored = self.upper_store(&sb.agent, sb.host_uid_base).join(&layer);
        if let Some(me) = self.me_ref.get().and_then(std::sync::Weak::upgrade) {
            let agent = sb.agent.clone();
            let _ = std::thread::Builder::new()
                .name("quota-count".into())
                .spawn(move || me.charge_stored(&agent, &stored));
        }
        if !sb.branch {
            books.workspace = chain.workspace.clone();
        }
        books.upper_bases.insert(layer.clone(), sb.host_uid_base);
        let rec = StoredSnapshot {
            sandbox: id.to_string(),
            name: name.clone(),
            created_ms: crate::util::now_ms(),
            chain,
        };
        books.snapshots.push(rec.clone());
        self.save_agent_layers(&sb.agent, &books)?;
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
        Ok(Self::snapshot_brief(&rec))
    }

    /// Moves the layers a freeze just made out of the sandbox's own trees
    /// into the agent's stores. Every directory on the way is resolved
    /// without following a symlink (the trees are the sandbox's).
    fn store_layers(&self, sb: &Sandbox, layer: &str) -> Result<(), BrokerError> {
        let err = |what: &str, p: &Path, e: std::io::Error| {
            BrokerError::Internal(format!("{what} {}: {e}", p.display()))
        };
        let mv = |from_dir: PathBuf, base: PathBuf, rel: &[&str], owner: Option<u32>| {
            let src = match crate::tree::open_dir_nofollow(&from_dir) {
                Ok(fd) => fd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(err("open", &from_dir, e)),
            };
            let dst = mkdirs_nofollow(&base, rel, owner).map_err(|e| err("create in", &base, e))?;
            nix::fcntl::renameat(&src, layer, &dst, layer)
                .map_err(|e| err("move a layer from", &from_dir, e.into()))
        };
        let base = sb.host_uid_base.to_string();
        mv(
            self.cfg
                .state_dir
                .join("layers")
                .join(sb.id.as_str())
                .join("upper/.airlock/layers"),
            self.cfg.state_dir.join("snapshots"),
            &[sb.agent.as_str(), "upper", base.as_str()],
            Some(sb.host_uid_base),
        )?;
        if sb.branch {
            mv(
                sb.workspace.join(".airlock/layers"),
                self.cfg.state_dir.join("workspaces"),
                &[sb.agent.as_str(), ".airlock", "layers"],
                None,
            )?;
        }
        Ok(())
    }

    /// The snapshots of sandbox `id` (live, or gone: they are its
    /// agent's), oldest first.
    ///
    /// # Errors
    /// When there is no such sandbox of the caller's.
    pub fn snapshots(
        &self,
        p: &Principal,
        id: &SandboxId,
    ) -> Result<Vec<SnapshotInfo>, BrokerError> {
        let agent = self.snapshot_agent(p, id)?;
        let books = self.agent_layers(&agent);
        let list: Vec<SnapshotInfo> = books
            .snapshots
            .iter()
            .filter(|s| s.sandbox == id.as_str())
            .map(|r| self.snapshot_info(&agent, &books, r))
            .collect();
        Ok(list)
    }

    /// The agent whose books hold sandbox `id`'s snapshots: a live
    /// sandbox's, else the caller's own.
    fn snapshot_agent(&self, p: &Principal, id: &SandboxId) -> Result<String, BrokerError> {
        match self.get(p, id) {
            Ok(sb) => Ok(sb.agent.clone()),
            Err(BrokerError::NotFound(_)) => {
                let agent = p
                    .resolve_agent(&self.cfg, None)
                    .map_err(BrokerError::from)?;
                let known = self
                    .agent_layers(&agent)
                    .snapshots
                    .iter()
                    .any(|s| s.sandbox == id.as_str());
                if known {
                    Ok(agent)
                } else {
                    Err(BrokerError::NotFound(id.to_string()))
                }
            }
            Err(e) => Err(e),
        }
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
        self.with_layer_locks(&sb, || self.restore_locked(p, id, &sb, name))
    }

    fn restore_locked(
        &self,
        p: &Principal,
        id: &SandboxId,
        sb: &Arc<Sandbox>,
        name: &str,
    ) -> Result<SnapshotInfo, BrokerError> {
        let mut books = self.agent_layers(&sb.agent);
        let rec = books
            .snapshots
            .iter()
            .find(|s| s.sandbox == id.as_str() && s.name == name)
            .cloned()
            .ok_or_else(|| BrokerError::NoSuchSnapshot {
                id: id.to_string(),
                name: name.chars().take(80).collect(),
            })?;
        self.require_quiet(sb)?;
        let chain = rec.chain.clone();
        self.fs_command(sb, |rid| FsCommand::Restore {
            id: rid,
            chain: chain.clone(),
        })?;
        *lock_or_recover(&sb.serves) = rec.chain.clone();
        if !sb.branch {
            books.workspace = rec.chain.workspace.clone();
            self.save_agent_layers(&sb.agent, &books)?;
        }
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
        Ok(Self::snapshot_brief(&rec))
    }

    /// Removes snapshot `name` of sandbox `id` (live or gone), and the
    /// frozen layers nothing else needs.
    ///
    /// # Errors
    /// [`BrokerError::NoSuchSnapshot`]; as [`Broker::snapshot`] while a
    /// live sandbox's filesystem server cannot be reached.
    pub fn remove_snapshot(
        &self,
        p: &Principal,
        id: &SandboxId,
        name: &str,
    ) -> Result<(), BrokerError> {
        let agent = self.snapshot_agent(p, id)?;
        let lock = self.workspace_lock(&agent);
        let _ws = lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut books = self.agent_layers(&agent);
        let Some(at) = books
            .snapshots
            .iter()
            .position(|s| s.sandbox == id.as_str() && s.name == name)
        else {
            return Err(BrokerError::NoSuchSnapshot {
                id: id.to_string(),
                name: name.chars().take(80).collect(),
            });
        };
        let rec = books.snapshots.remove(at);
        let live = self.get(p, id).ok().filter(|s| s.is_running());
        // What still needs a layer: the agent's workspace, every other
        // snapshot, and what each live sandbox of the agent serves.
        let mut keep = self.layers_in_use(&agent, &books);
        if let Some(sb) = &live {
            let served = self.fs_command(sb, |rid| FsCommand::Remove {
                id: rid,
                layers: airlock_fs::LayerChain::default(),
            })?;
            keep.upper.extend(served.upper);
            keep.workspace.extend(served.workspace);
        }
        let drop = airlock_fs::LayerChain {
            upper: rec
                .chain
                .upper
                .iter()
                .filter(|l| !keep.upper.contains(*l))
                .cloned()
                .collect(),
            workspace: rec
                .chain
                .workspace
                .iter()
                .filter(|l| !keep.workspace.contains(*l))
                .cloned()
                .collect(),
        };
        // What the stored copy-on-write layers hold, counted before the
        // server empties them: the agent was charged that when they were
        // stored.
        let stored: Vec<(PathBuf, (u64, u64))> = drop
            .upper
            .iter()
            .filter_map(|l| {
                books
                    .upper_bases
                    .get(l)
                    .map(|b| self.upper_store(&agent, *b).join(l))
            })
            .map(|path| {
                let held = crate::tree::usage(&path);
                (path, held)
            })
            .collect();
        // The sandbox's own server empties what it holds (its quota is
        // refunded); the broker removes the rest.
        if let Some(sb) = &live
            && (!drop.upper.is_empty() || !drop.workspace.is_empty())
        {
            self.fs_command(sb, |rid| FsCommand::Remove {
                id: rid,
                layers: drop.clone(),
            })?;
        }
        for l in &drop.upper {
            books.upper_bases.remove(l);
        }
        for (path, held) in stored {
            self.remove_stored(&agent, &path, held);
        }
        for l in &drop.workspace {
            self.remove_counted(&agent, &self.workspace_layers_dir(&agent).join(l));
        }
        self.save_agent_usage(&agent);
        self.save_agent_layers(&agent, &books)?;
        self.audit.event(
            Some(id.as_str()),
            Some(&agent),
            AuditEvent::Snapshot {
                caller: (p.uid, p.pid),
                action: "snapshot_removed",
                name: name.to_string(),
                layer: rec.chain.workspace.last().cloned().unwrap_or_default(),
            },
        );
        Ok(())
    }

    /// Layers the agent's books and its live sandboxes need, by tree (a
    /// snapshot's two layers share a name).
    fn layers_in_use(&self, agent: &str, books: &AgentLayers) -> InUse {
        let mut keep = InUse::default();
        keep.workspace.extend(books.workspace.iter().cloned());
        for s in &books.snapshots {
            keep.upper.extend(s.chain.upper.iter().cloned());
            keep.workspace.extend(s.chain.workspace.iter().cloned());
        }
        for sb in lock_or_recover(&self.sandboxes).values() {
            if sb.agent == agent && sb.is_running() {
                let c = lock_or_recover(&sb.serves).clone();
                keep.upper.extend(c.upper);
                keep.workspace.extend(c.workspace);
            }
        }
        keep
    }

    /// Deletes the frozen layers of `agent` that nothing needs (no
    /// snapshot, not the workspace's chain, nothing a live sandbox serves:
    /// pre-started ones serve the chain), forks' branches whose sandbox is
    /// gone, and, once no sandbox of the agent runs, what restores set
    /// aside. Runs after a sandbox of the agent is destroyed, under the
    /// agent's lock, so no create or snapshot is under way.
    pub(super) fn collect_layers(&self, agent: &str) {
        let lock = self.workspace_lock(agent);
        let _ws = lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live: HashSet<String> = lock_or_recover(&self.sandboxes)
            .values()
            .filter(|s| s.agent == agent && s.layered && s.is_running())
            .map(|s| s.id.to_string())
            .collect();
        let books = self.agent_layers(agent);
        let keep = self.layers_in_use(agent, &books);
        let area = self
            .cfg
            .state_dir
            .join("workspaces")
            .join(agent)
            .join(".airlock");
        if crate::tree::open_dir_nofollow(&area).is_err() {
            return;
        }
        let sweep = |dir: &Path, keep: &dyn Fn(&str) -> bool| {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !keep(&n) {
                        self.remove_counted(agent, &e.path());
                    }
                }
            }
        };
        sweep(&area.join("layers"), &|n| keep.workspace.contains(n));
        sweep(&area.join("branches"), &|n| live.contains(n));
        if live.is_empty() {
            self.remove_counted(agent, &area.join("trash"));
        }
        let stores = self
            .cfg
            .state_dir
            .join("snapshots")
            .join(agent)
            .join("upper");
        if let Ok(bases) = std::fs::read_dir(&stores) {
            for b in bases.flatten() {
                sweep(&b.path(), &|n| keep.upper.contains(n));
            }
        }
        self.save_agent_usage(agent);
    }

    /// A snapshot as a snapshot or restore answers it: without its size,
    /// which costs a walk of its layers (O(files)); a listing has it.
    fn snapshot_brief(rec: &StoredSnapshot) -> SnapshotInfo {
        SnapshotInfo {
            name: rec.name.clone(),
            created_ms: rec.created_ms,
            bytes: None,
        }
    }

    /// A snapshot as a listing shows it, with the bytes its own layers
    /// hold.
    fn snapshot_info(
        &self,
        agent: &str,
        books: &AgentLayers,
        rec: &StoredSnapshot,
    ) -> SnapshotInfo {
        let mut bytes = 0;
        if let Some(l) = rec.chain.upper.last()
            && let Some(base) = books.upper_bases.get(l)
        {
            bytes += crate::tree::du(&self.upper_store(agent, *base).join(l));
        }
        if let Some(l) = rec.chain.workspace.last() {
            bytes += crate::tree::du(&self.workspace_layers_dir(agent).join(l));
        }
        SnapshotInfo {
            name: rec.name.clone(),
            created_ms: rec.created_ms,
            bytes: Some(bytes),
        }
    }
}
