//! The quota on each agent's persistent workspace, over all its sandboxes.
//!
//! The counters are an [`airlock_fs::SharedUsage`] the broker makes once
//! per agent and hands to every filesystem server of that workspace; each
//! server charges and refunds it as it serves (see the fs crate's `quota`
//! module), so the limit holds whichever sandbox writes. What the broker
//! itself adds or removes there (a snapshot's copy-on-write layer it
//! stores, layers and leftovers it collects) it counts and charges too:
//! an agent's snapshots count against its quota.
//!
//! The numbers survive a broker restart: they are written to
//! `state_dir/usage/AGENT.json` whenever a server reports a change (once a
//! second at most), after the broker's own changes, and when a sandbox of
//! the agent goes. An agent without that file (its first sandbox, or a
//! workspace from before quotas) is counted once by a walk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Broker;
use crate::broker::BrokerError;
use crate::util::lock_or_recover;

/// One agent's workspace counters and limit.
#[derive(Debug)]
pub(crate) struct AgentUsage {
    pub(crate) counters: Arc<airlock_fs::SharedUsage>,
    pub(crate) limit: airlock_fs::DiskQuota,
    /// What was last written to the agent's usage file.
    saved: std::sync::Mutex<(u64, u64)>,
}

/// The agent's usage file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    bytes: u64,
    inodes: u64,
}

impl Broker {
    fn usage_file(&self, agent: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("usage")
            .join(format!("{agent}.json"))
    }

    /// Where everything counted against the agent's quota lies: its
    /// workspace (with its frozen layers, forks' branches and what
    /// restores set aside) and its snapshots' copy-on-write layers.
    fn quota_roots(&self, agent: &str) -> [PathBuf; 2] {
        [
            self.cfg.state_dir.join("workspaces").join(agent),
            self.cfg
                .state_dir
                .join("snapshots")
                .join(agent)
                .join("upper"),
        ]
    }

    /// The agent's workspace counters, made (from its usage file, else by
    /// counting) on first use.
    ///
    /// # Errors
    /// When the counters cannot be made.
    pub(crate) fn agent_usage(&self, agent: &str) -> Result<Arc<AgentUsage>, BrokerError> {
        if let Some(u) = lock_or_recover(&self.workspace_usage).get(agent) {
            return Ok(Arc::clone(u));
        }
        // Counted without the map's lock: a large workspace's walk must
        // not hold up every other agent's creates.
        let counters = airlock_fs::SharedUsage::create()
            .map_err(|e| BrokerError::Internal(format!("workspace usage counters: {e}")))?;
        let saved = std::fs::read(self.usage_file(agent))
            .ok()
            .and_then(|b| serde_json::from_slice::<Saved>(&b).ok());
        let (bytes, inodes) = match saved {
            Some(s) => (s.bytes, s.inodes),
            None => {
                // No server of the agent runs before its first use.
                let (mut b, mut i) = (0u64, 0u64);
                for root in self.quota_roots(agent) {
                    let (rb, ri) = crate::tree::usage(&root);
                    b = b.saturating_add(rb);
                    i = i.saturating_add(ri);
                }
                (b, i)
            }
        };
        counters.set(bytes, inodes);
        let u = Arc::new(AgentUsage {
            counters: Arc::new(counters),
            limit: self.cfg.workspace_quota(agent),
            saved: std::sync::Mutex::new((u64::MAX, u64::MAX)),
        });
        let u = {
            let mut all = lock_or_recover(&self.workspace_usage);
            // Another create of the agent may have counted meanwhile: the
            // first one in is kept, so every server shares one page.
            Arc::clone(all.entry(agent.to_string()).or_insert(u))
        };
        self.save_agent_usage(agent);
        Ok(u)
    }

    /// Writes the agent's usage file if its numbers changed since last
    /// written (loaded counters only).
    pub(crate) fn save_agent_usage(&self, agent: &str) {
        let Some(u) = lock_or_recover(&self.workspace_usage).get(agent).cloned() else {
            return;
        };
        let mut saved = lock_or_recover(&u.saved);
        let now = u.counters.get();
        if *saved == now {
            return;
        }
        let path = self.usage_file(agent);
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            let body = serde_json::to_vec(&Saved {
                bytes: now.0,
                inodes: now.1,
            })
            .map_err(std::io::Error::other)?;
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, &path)
        };
        match write() {
            Ok(()) => *saved = now,
            Err(e) => tracing::warn!(agent, error = %e, "cannot save workspace usage"),
        }
    }

    /// Charges the agent for what `path` holds (a tree the broker just
    /// moved into the agent's stores): never refused, it is there.
    pub(crate) fn charge_stored(&self, agent: &str, path: &Path) {
        if let Ok(u) = self.agent_usage(agent) {
            let (b, i) = crate::tree::usage(path);
            u.counters.add(b, i);
            self.save_agent_usage(agent);
        }
    }

    /// Removes tree `path` of the agent's and refunds what it held.
    pub(crate) fn remove_counted(&self, agent: &str, path: &Path) {
        let held = crate::tree::usage(path);
        self.remove_stored(agent, path, held);
    }

    /// Removes tree `path` of the agent's, which held `held` (bytes,
    /// inodes) when the agent was last charged for it, and refunds that.
    pub(crate) fn remove_stored(&self, agent: &str, path: &Path, held: (u64, u64)) {
        let _ = crate::tree::remove_tree(path);
        if held == (0, 0) {
            return;
        }
        // What a failed removal left still counts.
        let (lb, li) = crate::tree::usage(path);
        if let Ok(u) = self.agent_usage(agent) {
            u.counters
                .sub(held.0.saturating_sub(lb), held.1.saturating_sub(li));
        }
    }
}
