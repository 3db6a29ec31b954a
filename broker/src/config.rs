//! brokerd's configuration: TOML read with serde, unknown keys refused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default location of the config file.
pub const DEFAULT_CONFIG: &str = "/etc/airlock/brokerd.toml";
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/airlock/brokerd.sock";

/// An agent and the host identities that may act for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Host uids that may act for this agent.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Host gids whose members may act for this agent.
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Bytes this agent's persistent workspace may hold, its snapshots
    /// included (unset: `[limits] workspace_bytes`; 0: no limit).
    #[serde(default)]
    pub workspace_bytes: Option<u64>,
    /// Inodes it may hold (unset: `[limits] workspace_inodes`).
    #[serde(default)]
    pub workspace_inodes: Option<u64>,
}

/// Default limits for new sandboxes; requests may ask for less or more, up
/// to the `max_*` ceilings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Memory per sandbox, bytes.
    pub memory_bytes: u64,
    /// Tasks per sandbox.
    pub pids: u64,
    /// CPU per sandbox in thousandths of a CPU.
    pub cpu_millis: u64,
    /// Open files per process.
    pub nofile: u64,
    /// Wall-clock lifetime of a sandbox, seconds (0: none).
    pub timeout_secs: u64,
    /// Ceiling for memory requests.
    pub max_memory_bytes: u64,
    /// Ceiling for pids requests.
    pub max_pids: u64,
    /// Ceiling for cpu requests.
    pub max_cpu_millis: u64,
    /// Ceiling for the lifetime of a sandbox, seconds.
    pub max_timeout_secs: u64,
    /// Bytes a sandbox may add across its copy-on-write layer (/tmp and
    /// every write outside /workspace) and its workspace.
    pub disk_bytes: u64,
    /// Inodes it may add there.
    pub inodes: u64,
    /// Ceiling for disk requests.
    pub max_disk_bytes: u64,
    /// Ceiling for inode requests.
    pub max_inodes: u64,
    /// Bytes each agent's persistent workspace may hold, its snapshots
    /// included, over all its sandboxes (0: no limit); `[[agents]]`
    /// entries may set their own.
    pub workspace_bytes: u64,
    /// Inodes each agent's persistent workspace may hold.
    pub workspace_inodes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            memory_bytes: 1 << 30,
            pids: 512,
            cpu_millis: 1000,
            nofile: 1024,
            timeout_secs: 0,
            max_memory_bytes: 16 << 30,
            max_pids: 8192,
            max_cpu_millis: 64_000,
            max_timeout_secs: 7 * 24 * 3600,
            disk_bytes: 10 << 30,
            inodes: 1 << 20,
            max_disk_bytes: 1 << 40,
            max_inodes: 1 << 26,
            workspace_bytes: 20 << 30,
            workspace_inodes: 1 << 22,
        }
    }
}

/// The sandboxes' network: defaults and what the operator allows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// Network of a sandbox whose request names none (shipped: none).
    pub default: airlock_net::policy::NetworkSpec,
    /// The resolver the gateways ask for allowed names ("IP" or
    /// "IP:PORT"); unset: the first nameserver of the host's
    /// /etc/resolv.conf.
    pub dns_upstream: Option<String>,
    /// A named network namespace (e.g. /run/netns/NAME) the gateways open
    /// their outgoing sockets in; unset: the host's.
    pub uplink_netns: Option<PathBuf>,
    /// Always-denied ranges (private, loopback, metadata...) that a
    /// sandbox may reach when its own rules name them by CIDR or IP.
    pub allow_ranges: Vec<ipnet::IpNet>,
    /// MTU of each sandbox's link.
    pub mtu: u32,
    /// Concurrent connections per sandbox at most.
    pub max_flows: usize,
    /// New connections per sandbox per second at most (bursts of twice
    /// that pass).
    pub max_new_flows_per_sec: u32,
    /// Bytes per second per sandbox at most, each way, over all its
    /// flows (0: no limit).
    pub max_bytes_per_sec: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            default: airlock_net::policy::NetworkSpec::default(),
            dns_upstream: None,
            uplink_netns: None,
            allow_ranges: Vec::new(),
            mtu: 65520,
            max_flows: 256,
            max_new_flows_per_sec: 5000,
            max_bytes_per_sec: 0,
        }
    }
}

/// GPUs: where the host's NVIDIA driver is, and what the operator allows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Whether sandboxes may be granted GPUs at all.
    pub enabled: bool,
    /// Where the driver's nodes are (`nvidiactl`, `nvidiaN`,
    /// `nvidia-uvm`).
    pub dev_dir: PathBuf,
    /// The driver's procfs directory (`gpus/PCI/information` names each
    /// GPU's UUID and minor); its granted part is what a sandbox sees.
    pub proc_dir: PathBuf,
    /// Serve a later release of a driver branch whose ABI is known frozen
    /// (580 from 580.95.05) with that branch's newest tables. Off: only an
    /// exact table serves. Audited when used.
    pub allow_newer_in_branch: bool,
    /// GPUs one sandbox may hold at most.
    pub max_per_sandbox: usize,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            dev_dir: PathBuf::from("/dev"),
            proc_dir: PathBuf::from("/proc/driver/nvidia"),
            allow_newer_in_branch: false,
            max_per_sandbox: 16,
        }
    }
}

/// The whole config file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// API socket path.
    pub socket: PathBuf,
    /// Socket permission bits (octal string, e.g. "0660").
    pub socket_mode: String,
    /// Group owning the socket (gid), so its members can connect.
    pub socket_gid: Option<u32>,
    /// Persistent state: workspaces, the audit log, per-sandbox layers.
    pub state_dir: PathBuf,
    /// First host uid/gid of the ranges given to sandboxes; each sandbox
    /// gets 65536 ids from here on.
    pub id_range_start: u32,
    /// Most sandboxes at once on this host.
    pub max_sandboxes: u32,
    /// Most live sandboxes one agent may hold (root's requests included).
    pub max_sandboxes_per_agent: usize,
    /// Lowest landlock ABI a sandbox may start with (0 = run without landlock).
    pub landlock_floor: u8,
    /// Sandboxes kept pre-started per (agent, user) that has asked for one,
    /// handed out by later creates that use the agent's own workspace, the
    /// host base and the default open-files limit (0: off).
    pub pool_size: usize,
    /// A command run (as the sandbox's user, output discarded) in each
    /// pre-started sandbox before it is handed out, so the caller's first
    /// command finds the filesystem's caches warm (empty: none). Default:
    /// a Python import of common modules.
    pub pool_warm: Vec<String>,
    /// Default limits.
    pub limits: LimitsConfig,
    /// Agents and who may act for them. root is always admin.
    pub agents: Vec<AgentConfig>,
    /// The sandboxes' network.
    pub net: NetConfig,
    /// GPUs.
    pub gpu: GpuConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: "0660".to_string(),
            socket_gid: None,
            state_dir: PathBuf::from("/var/lib/airlock"),
            id_range_start: 0x1000_0000,
            max_sandboxes: 1024,
            max_sandboxes_per_agent: 64,
            landlock_floor: 1,
            pool_size: 2,
            pool_warm: [
                "python3",
                "-c",
                "import json, subprocess, asyncio, email, os, re, pathlib, typing",
            ]
            .map(String::from)
            .to_vec(),
            limits: LimitsConfig::default(),
            agents: Vec::new(),
            net: NetConfig::default(),
            gpu: GpuConfig::default(),
        }
    }
}

/// The config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file failed.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or had unknown keys.
    #[error("invalid config {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config value: {0}")]
    Invalid(String),
}

/// Checks an agent name: 1-64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn valid_agent_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl BrokerConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<BrokerConfig, ConfigError> {
        let cfg: BrokerConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads `path` if it exists, else the defaults.
    pub fn load_or_default(path: &Path) -> Result<BrokerConfig, ConfigError> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(BrokerConfig::default())
        }
    }

    /// The quota on `agent`'s persistent workspace: its `[[agents]]`
    /// entry's, else `[limits]`'s.
    #[must_use]
    pub fn workspace_quota(&self, agent: &str) -> airlock_fs::DiskQuota {
        let entry = self.agents.iter().find(|a| a.name == agent);
        airlock_fs::DiskQuota {
            bytes: entry
                .and_then(|a| a.workspace_bytes)
                .unwrap_or(self.limits.workspace_bytes),
            inodes: entry
                .and_then(|a| a.workspace_inodes)
                .unwrap_or(self.limits.workspace_inodes),
        }
    }

    /// The socket mode as bits.
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "socket_mode {:?} is not an octal mode like \"0660\"",
                    self.socket_mode
                ))
            })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.socket_mode_bits()?;
        if self.id_range_start < 65536 {
            return Err(ConfigError::Invalid(format!(
                "id_range_start {} overlaps ordinary host users; use 65536 or more",
                self.id_range_start
            )));
        }
        let top = u64::from(self.id_range_start) + u64::from(self.max_sandboxes) * 65536;
        if top > u64::from(u32::MAX) {
            return Err(ConfigError::Invalid(format!(
                "id_range_start {} + max_sandboxes {} x 65536 exceeds the uid space",
                self.id_range_start, self.max_sandboxes
            )));
        }
        for a in &self.agents {
            if !valid_agent_name(&a.name) {
                return Err(ConfigError::Invalid(format!("agent name {:?}", a.name)));
            }
        }
        if self.limits.memory_bytes < (16 << 20) {
            return Err(ConfigError::Invalid(
                "limits.memory_bytes below 16 MiB".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = BrokerConfig::parse(include_str!("../../examples/brokerd.toml")).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.agents.len(), 2);
        assert_eq!(
            c.gpu,
            GpuConfig::default(),
            "the example shows the defaults"
        );
    }

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(BrokerConfig::parse("").unwrap(), BrokerConfig::default());
    }

    #[test]
    fn agents_and_limits_parse() {
        let c = BrokerConfig::parse(
            "socket_mode = \"0666\"\n[limits]\npids = 64\n[[agents]]\nname = \"alice\"\nuids = [1000]\n",
        )
        .unwrap();
        assert_eq!(c.limits.pids, 64);
        assert_eq!(c.agents[0].uids, vec![1000]);
        assert_eq!(c.socket_mode_bits().unwrap(), 0o666);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let e = BrokerConfig::parse("sokcet = \"/x\"\n").unwrap_err();
        let chain = format!("{:?}", e);
        assert!(chain.contains("sokcet"), "{chain}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = BrokerConfig::parse("id_range_start = 1000\n").unwrap_err();
        assert!(e.to_string().contains("id_range_start 1000"), "{e}");
        let e = BrokerConfig::parse("socket_mode = \"rw\"\n").unwrap_err();
        assert!(e.to_string().contains("socket_mode"), "{e}");
        let e = BrokerConfig::parse("[[agents]]\nname = \"../x\"\n").unwrap_err();
        assert!(e.to_string().contains("../x"), "{e}");
    }
}
