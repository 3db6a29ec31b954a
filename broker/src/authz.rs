//! Who is calling, and which agents they may act for. Callers are identified
//! by the kernel (SO_PEERCRED on the API socket, getuid in embedded mode),
//! never by anything they send.

use serde::Serialize;

use crate::config::{BrokerConfig, valid_agent_name};

/// The agent root acts for when it names none.
pub const ROOT_DEFAULT_AGENT: &str = "root";

/// A caller as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// Host uid.
    pub uid: u32,
    /// Host primary gid.
    pub gid: u32,
    /// Host pid (0 when unknown).
    pub pid: i32,
}

/// A refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    /// The uid is not mapped to any agent.
    #[error("uid {uid} is not mapped to any agent in the broker config")]
    Unmapped {
        /// The caller's uid.
        uid: u32,
    },
    /// The caller may not act for that agent.
    #[error("uid {uid} may not act for agent {agent:?}")]
    Forbidden {
        /// The caller's uid.
        uid: u32,
        /// The agent asked for.
        agent: String,
    },
    /// A non-root caller named a host directory it does not own.
    #[error("uid {uid} may not use {what} {path}: it is owned by uid {owner}")]
    NotOwner {
        /// The caller's uid.
        uid: u32,
        /// "workspace" or "rootfs".
        what: &'static str,
        /// The directory.
        path: String,
        /// Its owner.
        owner: u32,
    },
    /// A non-root caller asked for a GPU whose device node it could not
    /// open on the host itself.
    #[error("uid {uid} may not use GPU node {node}: it could not open it on the host itself")]
    NoDeviceAccess {
        /// The caller's uid.
        uid: u32,
        /// The node.
        node: String,
    },
    /// The agent name is malformed.
    #[error("invalid agent name {0:?}: use 1-64 of letters, digits, '.', '-', '_'")]
    BadName(String),
}

impl Principal {
    /// root administers every agent.
    pub fn is_admin(&self) -> bool {
        self.uid == 0
    }

    /// Agents this caller may act for; `None` means all (admin).
    pub fn agents(&self, cfg: &BrokerConfig) -> Option<Vec<String>> {
        if self.is_admin() {
            return None;
        }
        Some(
            cfg.agents
                .iter()
                .filter(|a| a.uids.contains(&self.uid) || a.gids.contains(&self.gid))
                .map(|a| a.name.clone())
                .collect(),
        )
    }

    /// Resolves the agent a request acts for: the one named, or the caller's
    /// default (its first mapped agent; "root" for root).
    pub fn resolve_agent(
        &self,
        cfg: &BrokerConfig,
        asked: Option<&str>,
    ) -> Result<String, AuthzError> {
        if let Some(a) = asked
            && !valid_agent_name(a)
        {
            return Err(AuthzError::BadName(a.to_string()));
        }
        match (self.agents(cfg), asked) {
            (None, Some(a)) => Ok(a.to_string()),
            (None, None) => Ok(ROOT_DEFAULT_AGENT.to_string()),
            (Some(list), _) if list.is_empty() => Err(AuthzError::Unmapped { uid: self.uid }),
            (Some(list), None) => Ok(list[0].clone()),
            (Some(list), Some(a)) => {
                if list.iter().any(|x| x == a) {
                    Ok(a.to_string())
                } else {
                    Err(AuthzError::Forbidden {
                        uid: self.uid,
                        agent: a.to_string(),
                    })
                }
            }
        }
    }

    /// Refuses callers mapped to no agent at all.
    pub fn check_mapped(&self, cfg: &BrokerConfig) -> Result<(), AuthzError> {
        match self.agents(cfg) {
            Some(l) if l.is_empty() => Err(AuthzError::Unmapped { uid: self.uid }),
            _ => Ok(()),
        }
    }

    /// May this caller see or touch a sandbox of `agent`?
    pub fn may_access(&self, cfg: &BrokerConfig, agent: &str) -> bool {
        match self.agents(cfg) {
            None => true,
            Some(l) => l.iter().any(|a| a == agent),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;

    fn cfg() -> BrokerConfig {
        BrokerConfig {
            agents: vec![
                AgentConfig {
                    name: "alice".into(),
                    uids: vec![1000],
                    gids: vec![],
                    workspace_bytes: None,
                    workspace_inodes: None,
                },
                AgentConfig {
                    name: "ci".into(),
                    uids: vec![],
                    gids: vec![500],
                    workspace_bytes: None,
                    workspace_inodes: None,
                },
            ],
            ..BrokerConfig::default()
        }
    }

    fn p(uid: u32, gid: u32) -> Principal {
        Principal { uid, gid, pid: 1 }
    }

    #[test]
    fn root_is_admin_with_a_default_agent() {
        assert_eq!(p(0, 0).resolve_agent(&cfg(), None).unwrap(), "root");
        assert_eq!(p(0, 0).resolve_agent(&cfg(), Some("bob")).unwrap(), "bob");
        assert!(p(0, 0).may_access(&cfg(), "anyone"));
    }

    #[test]
    fn mapped_users_get_their_agents_only() {
        assert_eq!(p(1000, 1000).resolve_agent(&cfg(), None).unwrap(), "alice");
        assert_eq!(
            p(1000, 1000).resolve_agent(&cfg(), Some("ci")).unwrap_err(),
            AuthzError::Forbidden {
                uid: 1000,
                agent: "ci".into()
            }
        );
        assert_eq!(p(7, 500).resolve_agent(&cfg(), None).unwrap(), "ci");
        assert!(!p(1000, 1000).may_access(&cfg(), "ci"));
    }

    #[test]
    fn unmapped_users_are_refused() {
        assert_eq!(
            p(4242, 4242).check_mapped(&cfg()).unwrap_err(),
            AuthzError::Unmapped { uid: 4242 }
        );
        assert!(p(4242, 4242).resolve_agent(&cfg(), None).is_err());
    }

    #[test]
    fn malformed_agent_names_are_refused() {
        assert!(matches!(
            p(0, 0).resolve_agent(&cfg(), Some("../etc")),
            Err(AuthzError::BadName(_))
        ));
    }
}
