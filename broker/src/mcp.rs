//! `airlock mcp`: a Model Context Protocol server on stdio.
//!
//! An MCP-speaking agent (a coding assistant, an agent framework) starts
//! `airlock mcp` as a subprocess and calls its tools: create and destroy
//! sandboxes, run commands, read, write and list files, snapshot and
//! restore, query the audit log. Every tool is a request to brokerd over
//! its socket, so the agent has exactly the rights of the user who started
//! the server (brokerd reads them with SO_PEERCRED); nothing here decides
//! what is allowed.
//!
//! The transport is JSON-RPC 2.0, one message per line on stdin and
//! stdout (stderr is for logs), with the `initialize` handshake of the
//! protocol revisions 2024-11-05 through 2025-11-25. Tool failures are
//! results with `isError` (the model reads them); protocol errors are
//! JSON-RPC errors.

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::api::types::{CreateSandbox, ExecBody, ExecEvent};
use crate::client::{ClientError, RemoteClient, enc};

/// Protocol revisions whose `initialize` handshake this server speaks,
/// oldest first.
const VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// Output a command's stdout (and again stderr) returns by default, and
/// at most.
const DEFAULT_OUTPUT: usize = 64 << 10;
const MAX_OUTPUT: usize = 1 << 20;
/// A command's timeout by default, and at most, seconds.
const DEFAULT_TIMEOUT: u64 = 120;
const MAX_TIMEOUT: u64 = 3600;
/// Bytes a file read returns by default, and at most.
const DEFAULT_READ: u64 = 256 << 10;
const MAX_READ: u64 = 4 << 20;
/// Longest request line read.
const MAX_LINE: usize = 8 << 20;

/// The tools, with their input schemas.
fn tools() -> Value {
    let sb = json!({"type": "string", "description": "the sandbox's id (from sandbox_create)"});
    let path = json!({"type": "string", "description": "absolute path inside the sandbox, e.g. /workspace/main.py"});
    json!([
        {
            "name": "sandbox_create",
            "description": "Create an isolated Linux sandbox (a fresh root filesystem with the host's tools, /workspace persisting per agent, no network unless asked). Returns its id.",
            "inputSchema": {"type": "object", "properties": {
                "agent": {"type": "string", "description": "agent whose workspace it gets (default: the caller's)"},
                "user": {"type": "string", "enum": ["sandbox", "root"]},
                "network": {"type": "object", "description": "{\"mode\": \"none\"|\"allow\"|\"open\", \"allow\": [\"pypi.org:443\", ...]}"},
                "limits": {"type": "object", "description": "{memory_bytes, pids, cpu_millis, disk_bytes, inodes}"},
                "timeout_secs": {"type": "integer", "description": "lifetime of the sandbox (0: none)"},
                "env": {"type": "array", "items": {"type": "string"}, "description": "KEY=VALUE"},
                "from_snapshot": {"type": "string", "description": "SANDBOX_ID:NAME to fork from"},
                "gpus": {"type": "array", "items": {"type": "string"}, "description": "host GPUs to grant: index (\"0\"), UUID (\"GPU-...\") or \"nvidia.com/gpu=all\""}
            }}
        },
        {
            "name": "sandbox_destroy",
            "description": "Destroy a sandbox; nothing of it is left but its agent's /workspace and snapshots.",
            "inputSchema": {"type": "object", "properties": {"sandbox": sb}, "required": ["sandbox"]}
        },
        {
            "name": "sandbox_list",
            "description": "List the sandboxes the caller may see.",
            "inputSchema": {"type": "object", "properties": {}}
        },
        {
            "name": "run_command",
            "description": "Run a shell command in a sandbox and return its exit code, stdout and stderr (each cut to max_output_bytes).",
            "inputSchema": {"type": "object", "properties": {
                "sandbox": sb,
                "command": {"type": "string", "description": "run with sh -c"},
                "cwd": {"type": "string", "description": "default /workspace"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "stdin": {"type": "string"},
                "timeout_secs": {"type": "integer", "description": format!("default {DEFAULT_TIMEOUT}, at most {MAX_TIMEOUT}")},
                "max_output_bytes": {"type": "integer", "description": format!("default {DEFAULT_OUTPUT}, at most {MAX_OUTPUT}")}
            }, "required": ["sandbox", "command"]}
        },
        {
            "name": "read_file",
            "description": "Read a file in a sandbox (UTF-8 text, or base64 for other bytes).",
            "inputSchema": {"type": "object", "properties": {
                "sandbox": sb, "path": path,
                "offset": {"type": "integer"},
                "max_bytes": {"type": "integer", "description": format!("default {DEFAULT_READ}, at most {MAX_READ}")}
            }, "required": ["sandbox", "path"]}
        },
        {
            "name": "write_file",
            "description": "Create or replace a file in a sandbox, atomically.",
            "inputSchema": {"type": "object", "properties": {
                "sandbox": sb, "path": path,
                "content": {"type": "string"},
                "encoding": {"type": "string", "enum": ["utf-8", "base64"], "description": "of content (default utf-8)"},
                "mode": {"type": "integer", "description": "permission bits, e.g. 493 for 0755"}
            }, "required": ["sandbox", "path", "content"]}
        },
        {
            "name": "list_files",
            "description": "List a directory in a sandbox: name, type, size, mode, mtime.",
            "inputSchema": {"type": "object", "properties": {"sandbox": sb, "path": path}, "required": ["sandbox", "path"]}
        },
        {
            "name": "snapshot",
            "description": "Snapshot a sandbox's files (its copy-on-write layer and /workspace) in O(1); the sandbox must be idle. Returns the snapshot's name.",
            "inputSchema": {"type": "object", "properties": {"sandbox": sb, "name": {"type": "string"}}, "required": ["sandbox"]}
        },
        {
            "name": "restore",
            "description": "Bring a sandbox's files back to a snapshot exactly (O(1)); the sandbox must be idle.",
            "inputSchema": {"type": "object", "properties": {"sandbox": sb, "name": {"type": "string"}}, "required": ["sandbox", "name"]}
        },
        {
            "name": "audit",
            "description": "Query the audit log: what sandboxes did (commands, file changes, denials, connections, limits).",
            "inputSchema": {"type": "object", "properties": {
                "sandbox": {"type": "string"},
                "kind": {"type": "string", "description": "comma-separated: sandbox, exec, fs, denial, limit, jail, auth, net"},
                "since": {"type": "string", "description": "e.g. 10m, 2h, 1d"},
                "limit": {"type": "integer", "description": "newest N rows (default 100)"}
            }}
        }
    ])
}

/// A tool's failure, shown to the model.
struct ToolError(String);

impl From<ClientError> for ToolError {
    fn from(e: ClientError) -> Self {
        ToolError(e.to_string())
    }
}

fn arg_str(args: &Value, key: &str) -> Result<String, ToolError> {
    args.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ToolError(format!("missing string argument `{key}`")))
}

fn arg_u64(args: &Value, key: &str) -> Result<Option<u64>, ToolError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ToolError(format!("argument `{key}` must be a non-negative integer"))),
    }
}

/// Collects up to `max` bytes of a stream, counting the rest.
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    dropped: u64,
}

impl Capped {
    fn push(&mut self, data: &[u8], max: usize) {
        let room = max.saturating_sub(self.bytes.len());
        let take = room.min(data.len());
        self.bytes
            .extend_from_slice(data.get(..take).unwrap_or_default());
        self.dropped += (data.len() - take) as u64;
    }

    fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.bytes).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!("\n[... {} more bytes not shown]", self.dropped));
        }
        s
    }
}

async fn run_command(c: &RemoteClient, args: &Value) -> Result<Value, ToolError> {
    let id = arg_str(args, "sandbox")?;
    let command = arg_str(args, "command")?;
    let timeout = arg_u64(args, "timeout_secs")?
        .unwrap_or(DEFAULT_TIMEOUT)
        .clamp(1, MAX_TIMEOUT);
    let max = arg_u64(args, "max_output_bytes")?
        .map_or(DEFAULT_OUTPUT, |m| usize::try_from(m).unwrap_or(MAX_OUTPUT))
        .min(MAX_OUTPUT);
    let env = match args.get("env") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(
            m.iter()
                .map(|(k, v)| match v.as_str() {
                    Some(v) => Ok(format!("{k}={v}")),
                    None => Err(ToolError(format!("env `{k}` must be a string"))),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(ToolError("`env` must be an object of strings".into())),
    };
    let body = ExecBody {
        argv: vec!["sh".into(), "-c".into(), command],
        env,
        cwd: args.get("cwd").and_then(Value::as_str).map(str::to_string),
        user: None,
        stdin: args
            .get("stdin")
            .and_then(Value::as_str)
            .map(str::to_string),
        timeout_secs: Some(timeout),
        tty: None,
        size: None,
    };
    let mut rx = c.exec(&id, &body).await?;
    let (mut out, mut err) = (Capped::default(), Capped::default());
    while let Some(ev) = rx.recv().await {
        match ev {
            ExecEvent::Stdout(ch) => out.push(&ch.bytes(), max),
            ExecEvent::Stderr(ch) => err.push(&ch.bytes(), max),
            ExecEvent::Exit(x) => {
                return Ok(json!({
                    "exit_code": x.code.or(x.signal.map(|s| 128 + s)),
                    "signal": x.signal,
                    "timed_out": x.timed_out,
                    "oom": x.oom,
                    "error": x.error,
                    "stdout": out.text(),
                    "stderr": err.text(),
                }));
            }
            ExecEvent::Started { .. } => {}
        }
    }
    Err(ToolError(
        "the command's stream ended without an exit".into(),
    ))
}

async fn read_file(c: &RemoteClient, args: &Value) -> Result<Value, ToolError> {
    use base64::Engine;
    let id = arg_str(args, "sandbox")?;
    let path = arg_str(args, "path")?;
    let offset = arg_u64(args, "offset")?.unwrap_or(0);
    let max = arg_u64(args, "max_bytes")?
        .unwrap_or(DEFAULT_READ)
        .min(MAX_READ);
    let mut buf = Vec::new();
    // One byte more than shown tells whether there is more.
    c.read_file_range(&id, &path, offset, Some(max + 1), &mut buf)
        .await?;
    let more = buf.len() as u64 > max;
    buf.truncate(usize::try_from(max).unwrap_or(usize::MAX));
    let (content, encoding) = match String::from_utf8(buf) {
        Ok(s) => (s, "utf-8"),
        Err(e) => (
            base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            "base64",
        ),
    };
    Ok(
        json!({"path": path, "offset": offset, "content": content, "encoding": encoding, "truncated": more}),
    )
}

async fn write_file(c: &RemoteClient, args: &Value) -> Result<Value, ToolError> {
    use base64::Engine;
    let id = arg_str(args, "sandbox")?;
    let path = arg_str(args, "path")?;
    let content = arg_str(args, "content")?;
    let bytes = match args.get("encoding").and_then(Value::as_str) {
        None | Some("utf-8" | "utf8") => content.into_bytes(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(content)
            .map_err(|e| ToolError(format!("content is not base64: {e}")))?,
        Some(other) => return Err(ToolError(format!("unknown encoding {other:?}"))),
    };
    let mode = arg_u64(args, "mode")?
        .map(|m| u32::try_from(m).ok().filter(|m| *m <= 0o7777))
        .map(|m| m.ok_or_else(|| ToolError("mode must be permission bits (0..=4095)".into())))
        .transpose()?;
    let size = bytes.len() as u64;
    let info = c
        .write_file(&id, &path, mode, size, std::io::Cursor::new(bytes))
        .await?;
    Ok(serde_json::to_value(info).unwrap_or_default())
}

async fn call_tool(c: &RemoteClient, name: &str, args: &Value) -> Result<Value, ToolError> {
    match name {
        "sandbox_create" => {
            let mut req = args.clone();
            if req.is_null() {
                req = json!({});
            }
            let req: CreateSandbox = serde_json::from_value(req)
                .map_err(|e| ToolError(format!("invalid arguments: {e}")))?;
            let info = c.create(&req).await?;
            Ok(
                json!({"sandbox": info.id, "user": info.user, "limits": info.limits, "network": info.network, "gpus": info.gpus}),
            )
        }
        "sandbox_destroy" => {
            let id = arg_str(args, "sandbox")?;
            c.destroy(&id).await?;
            Ok(json!({"destroyed": id}))
        }
        "sandbox_list" => {
            let list = c.list().await?;
            Ok(json!(
                list.iter()
                    .map(|s| json!({"sandbox": s.id, "agent": s.agent, "state": s.state}))
                    .collect::<Vec<_>>()
            ))
        }
        "run_command" => run_command(c, args).await,
        "read_file" => read_file(c, args).await,
        "write_file" => write_file(c, args).await,
        "list_files" => {
            let list = c
                .list_files(&arg_str(args, "sandbox")?, &arg_str(args, "path")?)
                .await?;
            Ok(serde_json::to_value(list).unwrap_or_default())
        }
        "snapshot" => {
            let id = arg_str(args, "sandbox")?;
            let name = args.get("name").and_then(Value::as_str);
            Ok(serde_json::to_value(c.snapshot(&id, name).await?).unwrap_or_default())
        }
        "restore" => {
            let id = arg_str(args, "sandbox")?;
            let name = arg_str(args, "name")?;
            Ok(serde_json::to_value(c.restore(&id, &name).await?).unwrap_or_default())
        }
        "audit" => {
            let mut q = vec![format!(
                "limit={}",
                arg_u64(args, "limit")?.unwrap_or(100).min(10_000)
            )];
            for k in ["sandbox", "kind", "since"] {
                if let Some(v) = args.get(k).and_then(Value::as_str) {
                    q.push(format!("{k}={}", enc(v)));
                }
            }
            Ok(serde_json::to_value(c.audit(&q.join("&")).await?).unwrap_or_default())
        }
        other => Err(ToolError(format!("no tool named {other:?}"))),
    }
}

fn error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// Answers one message; `None` for a notification.
async fn answer(c: &RemoteClient, msg: &Value) -> Option<Value> {
    let id = msg.get("id").cloned();
    let method = msg.get("method").and_then(Value::as_str);
    let (Some(id), Some(method)) = (id, method) else {
        // A notification (no id), or a response to nothing we asked.
        return if msg.get("id").is_some() && method.is_none() {
            None
        } else if method.is_none() {
            Some(error(&Value::Null, -32600, "not a JSON-RPC request"))
        } else {
            None
        };
    };
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "initialize" => {
            let asked = params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let version = VERSIONS
                .iter()
                .find(|v| **v == asked)
                .or(VERSIONS.last())
                .copied()
                .unwrap_or_default();
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "airlock", "version": env!("CARGO_PKG_VERSION")},
                "instructions": "Run code in airlock sandboxes: sandbox_create, then run_command / write_file / read_file in it; snapshot before risky steps and restore to go back; sandbox_destroy when done."
            })
        }
        "ping" => json!({}),
        "tools/list" => json!({"tools": tools()}),
        "tools/call" => {
            let Some(name) = params.get("name").and_then(Value::as_str) else {
                return Some(error(&id, -32602, "tools/call needs a tool `name`"));
            };
            if !tools()
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["name"] == name))
            {
                return Some(error(&id, -32602, &format!("no tool named {name:?}")));
            }
            let args = params.get("arguments").cloned().unwrap_or(json!({}));
            match call_tool(c, name, &args).await {
                Ok(v) => json!({
                    "content": [{"type": "text", "text": serde_json::to_string_pretty(&v).unwrap_or_default()}],
                    "structuredContent": if v.is_object() { v } else { json!({"result": v}) },
                    "isError": false
                }),
                Err(ToolError(e)) => json!({
                    "content": [{"type": "text", "text": e}],
                    "isError": true
                }),
            }
        }
        _ => return Some(error(&id, -32601, &format!("method {method:?} not found"))),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// Serves MCP on stdin/stdout until stdin closes.
///
/// # Errors
/// When stdout cannot be written.
pub async fn serve(c: RemoteClient) -> std::io::Result<()> {
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut lines = stdin.lines();
    let mut out = tokio::io::stdout();
    // Requests are answered one at a time, in order.
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let replies: Vec<Value> = if line.len() > MAX_LINE {
            vec![error(&Value::Null, -32600, "message too large")]
        } else {
            match serde_json::from_str::<Value>(&line) {
                Err(e) => vec![error(&Value::Null, -32700, &format!("parse error: {e}"))],
                Ok(Value::Array(batch)) => {
                    let mut r = Vec::new();
                    for m in &batch {
                        if let Some(a) = answer(&c, m).await {
                            r.push(a);
                        }
                    }
                    if r.is_empty() {
                        vec![]
                    } else {
                        vec![Value::Array(r)]
                    }
                }
                Ok(m) => answer(&c, &m).await.into_iter().collect(),
            }
        };
        for r in replies {
            let mut bytes = serde_json::to_vec(&r).unwrap_or_default();
            bytes.push(b'\n');
            out.write_all(&bytes).await?;
            out.flush().await?;
        }
    }
    Ok(())
}
