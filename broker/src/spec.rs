//! What the broker's core acts on: requests validated once, at the edge,
//! from the /v1 wire types ([`crate::api::types`]) with `TryFrom`. The
//! wire types are the public API and change only on purpose; these change
//! with the core, and a conversion that no longer fits fails to compile
//! instead of silently reshaping the JSON.

use std::path::PathBuf;
use std::time::Duration;

use crate::api::types::{CreateSandbox, ExecBody, LimitsRequest};

/// Sandbox uid of the default (unprivileged) user.
pub const SANDBOX_UID: u32 = 1000;
/// Ids per sandbox.
pub const IDS_PER_SANDBOX: u32 = 65536;
/// Largest argv plus env of one exec, in bytes (with their terminators):
/// it travels to pid 1 in one control message.
pub const MAX_EXEC_ARGS_BYTES: usize = 128 * 1024;

/// Largest encoded env of a sandbox: a quarter of the control channel's
/// message limit, leaving the rest to each command's argv and env.
pub const MAX_SANDBOX_ENV_BYTES: usize = airlock_shim::channel::MAX_MESSAGE / 4;
/// Largest encoded command (argv, the sandbox's env merged with its own)
/// sent to pid 1, below the control channel's message limit.
pub const MAX_EXEC_MESSAGE_BYTES: usize = airlock_shim::channel::MAX_MESSAGE - 4096;

/// Bytes `v` takes on the control channel (JSON).
pub fn encoded_len<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// A sandbox's id: 12 lowercase hex digits, chosen by the broker. Parsed
/// once where an id enters from outside (an API path, a CLI argument), so
/// the core never confuses it with another string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

/// Hex digits of a [`SandboxId`].
const SANDBOX_ID_LEN: usize = 12;

impl SandboxId {
    /// A fresh random id.
    ///
    /// # Errors
    /// When /dev/urandom cannot be read.
    pub fn random() -> std::io::Result<SandboxId> {
        crate::util::random_hex(SANDBOX_ID_LEN / 2).map(SandboxId)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for SandboxId {
    type Error = String;

    fn try_from(s: &str) -> Result<Self, String> {
        if s.len() == SANDBOX_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(SandboxId(s.to_string()))
        } else {
            Err(format!(
                "{:?} is not a sandbox id ({SANDBOX_ID_LEN} lowercase hex digits)",
                s.chars().take(64).collect::<String>()
            ))
        }
    }
}

impl std::fmt::Display for SandboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for SandboxId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A command's id within its sandbox (counted from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecId(pub u64);

impl std::fmt::Display for ExecId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The user commands run as by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxUser {
    /// uid 1000 inside.
    Sandbox,
    /// uid 0 inside (still nobody on the host).
    Root,
}

impl SandboxUser {
    /// Its name, as the API and the audit log spell it.
    pub fn name(self) -> &'static str {
        match self {
            SandboxUser::Sandbox => "sandbox",
            SandboxUser::Root => "root",
        }
    }

    /// (uid, gid) inside.
    pub fn ids(self) -> (u32, u32) {
        match self {
            SandboxUser::Sandbox => (SANDBOX_UID, SANDBOX_UID),
            SandboxUser::Root => (0, 0),
        }
    }
}

/// A create request, checked.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Agent asked for (authorized later, against the caller).
    pub agent: Option<String>,
    /// Caller's rootfs directory, if any.
    pub rootfs: Option<PathBuf>,
    /// Caller's workspace directory, if any.
    pub workspace: Option<PathBuf>,
    /// Default exec user.
    pub user: SandboxUser,
    /// Limits asked for (bounded against the config later).
    pub limits: LimitsRequest,
    /// Wall-clock limit asked for.
    pub timeout_secs: Option<u64>,
    /// Default environment of execs, `KEY=VALUE` each.
    pub env: Vec<String>,
    /// Network asked for, validated (None: the configured default).
    pub network: Option<airlock_net::policy::Policy>,
    /// The snapshot to fork from: (sandbox id, snapshot name).
    pub from_snapshot: Option<(String, String)>,
    /// Host GPUs asked for (names checked for form; resolved on the host
    /// later).
    pub gpus: Vec<String>,
}

impl TryFrom<CreateSandbox> for CreateSpec {
    type Error = String;

    fn try_from(req: CreateSandbox) -> Result<Self, String> {
        let user = match req.user.as_deref() {
            None | Some("sandbox") => SandboxUser::Sandbox,
            Some("root") => SandboxUser::Root,
            Some(other) => return Err(format!("user {other:?}: use \"sandbox\" or \"root\"")),
        };
        let env = req.env.unwrap_or_default();
        check_env(&env)?;
        // Every command carries the sandbox's env to pid 1 in one control
        // message: an env that leaves no room for commands is refused
        // here, not at every exec.
        let encoded = encoded_len(&env);
        if encoded > MAX_SANDBOX_ENV_BYTES {
            return Err(format!(
                "env encodes to {encoded} bytes; a sandbox's env may take at most \
                 {MAX_SANDBOX_ENV_BYTES} (each command carries it with its own argv and env)"
            ));
        }
        let network = match &req.network {
            Some(n) => Some(
                airlock_net::policy::Policy::from_spec(n).map_err(|e| format!("network: {e}"))?,
            ),
            None => None,
        };
        let from_snapshot = match req.from_snapshot.as_deref() {
            None => None,
            Some(s) => match s.split_once(':') {
                Some((id, name)) if SandboxId::try_from(id).is_ok() && !name.is_empty() => {
                    if req.workspace.is_some() {
                        return Err(
                            "from_snapshot: a fork works in a branch of its agent's workspace; \
                             drop workspace"
                                .into(),
                        );
                    }
                    Some((id.to_string(), name.to_string()))
                }
                _ => {
                    return Err(format!(
                        "from_snapshot {:?}: use SANDBOX_ID:NAME",
                        s.chars().take(80).collect::<String>()
                    ));
                }
            },
        };
        crate::gpu::check_names(&req.gpus)?;
        Ok(CreateSpec {
            gpus: req.gpus,
            from_snapshot,
            agent: req.agent,
            rootfs: req.rootfs,
            workspace: req.workspace,
            user,
            limits: req.limits.unwrap_or_default(),
            timeout_secs: req.timeout_secs,
            env,
            network,
        })
    }
}

/// Who an exec runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecUser {
    /// The sandbox's default user.
    Default,
    /// A named user.
    Named(SandboxUser),
    /// A uid inside (below [`IDS_PER_SANDBOX`]), its gid the same.
    Uid(u32),
}

/// An exec request, checked.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// Program and arguments: at least the program, no NUL.
    pub argv: Vec<String>,
    /// Environment entries on top of the sandbox's.
    pub env: Vec<String>,
    /// Absolute working directory inside.
    pub cwd: String,
    /// Who it runs as.
    pub user: ExecUser,
    /// What its stdin reads, then EOF.
    pub stdin: Vec<u8>,
    /// Its own wall-clock limit.
    pub timeout: Option<Duration>,
    /// A terminal of this size (rows, columns) instead of pipes.
    pub tty: Option<(u16, u16)>,
}

impl TryFrom<ExecBody> for ExecSpec {
    type Error = String;

    fn try_from(body: ExecBody) -> Result<Self, String> {
        if body.argv.first().is_none_or(|a| a.is_empty()) {
            return Err("argv must name a program".into());
        }
        if body.argv.iter().any(|a| a.contains('\0')) {
            return Err("argv contains a NUL byte".into());
        }
        let env = body.env.unwrap_or_default();
        check_env(&env)?;
        let size: usize = body
            .argv
            .iter()
            .chain(env.iter())
            .map(|a| a.len() + 1)
            .sum();
        if size > MAX_EXEC_ARGS_BYTES {
            return Err(format!(
                "argv and env hold {size} bytes; at most {MAX_EXEC_ARGS_BYTES} are accepted"
            ));
        }
        let user = match body.user.as_deref() {
            None => ExecUser::Default,
            Some("sandbox") => ExecUser::Named(SandboxUser::Sandbox),
            Some("root") => ExecUser::Named(SandboxUser::Root),
            Some(n) => match n.parse::<u32>() {
                Ok(u) if u < IDS_PER_SANDBOX => ExecUser::Uid(u),
                _ => {
                    return Err(format!(
                        "user {n:?}: use \"sandbox\", \"root\" or a uid below 65536"
                    ));
                }
            },
        };
        let cwd = body.cwd.unwrap_or_else(|| "/workspace".to_string());
        if !cwd.starts_with('/') || cwd.contains('\0') {
            return Err(format!("cwd {cwd:?} must be an absolute path"));
        }
        Ok(ExecSpec {
            argv: body.argv,
            env,
            cwd,
            user,
            stdin: body.stdin.unwrap_or_default().into_bytes(),
            // 0 is no limit, as for a sandbox's lifetime.
            timeout: body
                .timeout_secs
                .filter(|t| *t > 0)
                .map(Duration::from_secs),
            tty: match (body.tty, body.size) {
                (Some(true), size) => {
                    let s = size.unwrap_or(crate::api::types::TtySize { rows: 24, cols: 80 });
                    Some((s.rows.max(1), s.cols.max(1)))
                }
                (_, Some(_)) => return Err("size is for a terminal: set tty too".into()),
                _ => None,
            },
        })
    }
}

/// Env entries must be KEY=VALUE with a plain key and no NUL.
fn check_env(env: &[String]) -> Result<(), String> {
    for e in env {
        let ok = match e.split_once('=') {
            Some((k, _)) => {
                !k.is_empty()
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !e.contains('\0')
            }
            None => false,
        };
        if !ok {
            return Err(format!(
                "env entry {e:?} is not KEY=VALUE with a name of letters, digits and '_'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn sandbox_ids_are_twelve_lowercase_hex_digits() {
        let id = SandboxId::random().unwrap();
        assert_eq!(SandboxId::try_from(id.as_str()), Ok(id.clone()));
        for bad in [
            "",
            "0123456789a",
            "0123456789abc",
            "0123456789AB",
            "../../../etc",
            "01234567890g",
        ] {
            let e = SandboxId::try_from(bad).unwrap_err();
            assert!(e.contains("is not a sandbox id"), "{bad}: {e}");
        }
    }
}
