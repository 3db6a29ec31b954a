//! Crash recovery: whatever a broker that died left behind (sandbox
//! processes, filesystem servers, cgroups, FUSE mounts, layer and sandbox
//! directories) is found by name in the state directory and released
//! through the one teardown path, [`Resources::release`]. Every sandbox's
//! layer directory and its owner record are written before anything else
//! of it exists, so a broker killed at any instant leaves only what this
//! finds. Workspaces and the audit log are kept.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Broker;
use crate::audit::AuditEvent;
use crate::sandbox::Resources;

/// How long recovery waits for a killed broker's last threads to exit.
pub(super) const OWNER_EXIT_WAIT: Duration = Duration::from_secs(5);

/// A recorded owner broker, as recovery finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnerState {
    /// Running.
    Alive,
    /// Killed, but a thread still runs (and holds its descriptors).
    Dying,
    /// Gone: exited, a zombie with no thread left, or the pid reused.
    Dead,
}

/// What a sandbox directory records about its owner, for crash recovery.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct OwnerRecord {
    pub(super) pid: i32,
    pub(super) start_ticks: u64,
    pub(super) agent: String,
}

/// Start time of a process in clock ticks (field 22 of /proc/pid/stat).
pub(crate) fn start_ticks(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, ticks)| ticks)
}

/// State letter (field 3) and start time (field 22) of /proc/pid/stat. The
/// command name (field 2) may hold any byte, so fields are counted from the
/// last ')'.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((state, ticks))
}

impl Broker {
    /// What became of the broker that wrote `rec`. A killed broker's main
    /// thread is a zombie as soon as it exits, and stays one until its
    /// parent reaps it (a service manager may take its time, a shell may
    /// never): that is a dead owner, as is one that reused the pid. But its
    /// other threads may still be finishing their last system call, and
    /// while one of them lives the process still holds its descriptors
    /// (its sandboxes' control channels among them): that owner is dying.
    fn owner_state(rec: &OwnerRecord) -> OwnerState {
        if rec.pid <= 0 {
            return OwnerState::Dead;
        }
        match proc_stat(rec.pid) {
            Some((state, ticks)) if ticks == rec.start_ticks => {
                if state != 'Z' && state != 'X' {
                    return OwnerState::Alive;
                }
                let tasks = std::fs::read_dir(format!("/proc/{}/task", rec.pid));
                let live_thread = tasks.into_iter().flatten().flatten().any(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|s| s.get(s.rfind(')')? + 2..)?.chars().next())
                        .is_some_and(|c| c != 'Z' && c != 'X')
                });
                if live_thread {
                    OwnerState::Dying
                } else {
                    OwnerState::Dead
                }
            }
            _ => OwnerState::Dead,
        }
    }

    /// Whether the owner is alive, after waiting (boundedly) for a dying one
    /// to finish, so that its descriptors (its sandboxes' channels) are
    /// closed before recovery starts.
    fn owner_alive(rec: &OwnerRecord) -> bool {
        let deadline = Instant::now() + OWNER_EXIT_WAIT;
        loop {
            match Self::owner_state(rec) {
                OwnerState::Alive => return true,
                OwnerState::Dead => return false,
                // A killed process runs no code of its own any more: past
                // the wait, recover (killing what it left) rather than
                // leave its sandboxes to a broker that will never return.
                OwnerState::Dying if Instant::now() >= deadline => return false,
                OwnerState::Dying => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Removes sandboxes whose owning broker process is gone: their
    /// processes, cgroups, FUSE mounts and directories. Workspaces and the
    /// audit log are kept.
    pub fn recover(&self) {
        let sb_root = self.cfg.state_dir.join("sandboxes");
        let mut live_elsewhere = std::collections::HashSet::new();
        // One verdict per owner: a dying owner is waited for once.
        let mut owners: HashMap<(i32, u64), bool> = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(&sb_root) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                let owner: Option<OwnerRecord> = std::fs::read(
                    self.cfg
                        .state_dir
                        .join("layers")
                        .join(id.as_str())
                        .join("owner.json"),
                )
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
                if let Some(o) = &owner
                    && (o.pid, o.start_ticks) != self.me
                    && *owners
                        .entry((o.pid, o.start_ticks))
                        .or_insert_with(|| Self::owner_alive(o))
                {
                    live_elsewhere.insert(id);
                    continue;
                }
                self.remove_leftover(&id, owner.map(|o| o.agent));
            }
        }
        // Layer directories without a live owner (a crash between creating
        // the layer directory and the sandbox directory). Cgroups are only
        // ever removed by id from here: other brokers with other state
        // directories may share the hierarchy.
        if let Ok(rd) = std::fs::read_dir(self.cfg.state_dir.join("layers")) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if !live_elsewhere.contains(&id) && !sb_root.join(id.as_str()).exists() {
                    self.remove_leftover(&id, None);
                }
            }
        }
        // What recovery found is worth having on disk before anything else.
        self.audit.flush();
    }

    fn remove_leftover(&self, id: &str, agent: Option<String>) {
        let problems = match self.cgroups.open(id) {
            Ok(cg) => Resources::leftover(id, &self.cfg.state_dir, cg).release(),
            Err(e) => vec![e.to_string()],
        };
        self.audit.event(
            Some(id),
            agent.as_deref(),
            AuditEvent::SandboxRecovered { problems },
        );
    }
}
