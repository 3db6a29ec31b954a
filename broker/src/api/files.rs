//! `/v1/sandboxes/{id}/files/...`: a sandbox's files, read, written,
//! listed and changed through the API, and watched as they change.
//!
//! Every operation runs inside the sandbox, jailed as a command of its
//! default user is (see [`airlock_shim::files`]): paths resolve in the
//! sandbox's own tree with the sandbox's own rules, and every change is
//! made through its filesystem server, which audits it like any other.
//! Bytes stream both ways through the operation's pipes: a read is never
//! held whole, an upload is written beside its file and renamed over it
//! only once every announced byte arrived.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::Deserialize;

use super::server::{ApiError, Peer, Shared, Shown, principal, sandbox_id};
use crate::api::types::ExecEvent;
use crate::broker::{ExecHandle, Stdin};
use airlock_shim::files::{FileError, FileOp};

/// Most bytes of a JSON answer (a listing) read back.
const MAX_ANSWER: usize = 64 << 20;
/// Most bytes of an error read back.
const MAX_ERROR: usize = 64 << 10;
/// Upload chunks in flight between the request and the sandbox.
const UPLOAD_CHUNKS: usize = 8;

/// `?path=` (and a read's range, an upload's mode).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// A read's first byte.
    pub offset: Option<u64>,
    /// A read's most bytes.
    pub length: Option<u64>,
    /// An upload's permission bits, octal (e.g. `755`).
    pub mode: Option<String>,
}

/// The status a failed operation answers with.
fn status_of(kind: &str) -> StatusCode {
    match kind {
        "not_found" => StatusCode::NOT_FOUND,
        "forbidden" => StatusCode::FORBIDDEN,
        "exists" | "not_empty" | "is_directory" | "not_directory" => StatusCode::CONFLICT,
        "no_space" => StatusCode::INSUFFICIENT_STORAGE,
        "invalid" | "incomplete" => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The error an operation ended with: what it wrote on stderr, or how
/// it ended.
fn op_error(stderr: &[u8], code: Option<i32>, error: Option<String>) -> ApiError {
    if let Ok(e) = serde_json::from_slice::<FileError>(stderr.trim_ascii()) {
        return ApiError(status_of(&e.kind), e.error);
    }
    let why = error.unwrap_or_else(|| match code {
        Some(c) => format!("the file operation failed (status {c})"),
        None => "the file operation was killed".into(),
    });
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, why)
}

/// Runs `op` to its end and answers with the JSON it printed.
async fn json_op(handle: ExecHandle) -> Result<Response, ApiError> {
    let mut events = handle.events;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(ev) = events.recv().await {
        match ev {
            ExecEvent::Stdout(c) if out.len() < MAX_ANSWER => out.extend(c.bytes()),
            ExecEvent::Stderr(c) if err.len() < MAX_ERROR => err.extend(c.bytes()),
            ExecEvent::Exit(x) => {
                if x.code != Some(0) || out.len() >= MAX_ANSWER {
                    if out.len() >= MAX_ANSWER {
                        return Err(ApiError(
                            StatusCode::INSUFFICIENT_STORAGE,
                            format!("answer over {MAX_ANSWER} bytes"),
                        ));
                    }
                    return Err(op_error(&err, x.code, x.error));
                }
                let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
                    ApiError(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("unreadable answer from the sandbox: {e}"),
                    )
                })?;
                return Ok(Json(v).into_response());
            }
            _ => {}
        }
    }
    Err(ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the file operation ended without an answer".into(),
    ))
}

async fn start(
    b: &Arc<crate::broker::Broker>,
    c: crate::api::server::PeerCred,
    id: &str,
    op: FileOp,
    stdin: Stdin,
) -> Result<ExecHandle, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(id)?;
    Ok(b.file_op(&p, &id, op, stdin).await?)
}

/// `GET .../files/content?path=&offset=&length=`: the bytes, streamed.
pub async fn read(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let op = FileOp::Read {
        path: q.path,
        offset: q.offset.unwrap_or(0),
        length: q.length,
    };
    let handle = start(&b, c, &id, op, Stdin::Bytes(Vec::new())).await?;
    let mut events = handle.events;
    // The status is known once the first bytes come, or the end.
    let mut err = Vec::new();
    let first = loop {
        match events.recv().await {
            Some(ExecEvent::Stdout(chunk)) => break Some(chunk.bytes()),
            Some(ExecEvent::Stderr(chunk)) => {
                if err.len() < MAX_ERROR {
                    err.extend(chunk.bytes());
                }
            }
            Some(ExecEvent::Exit(x)) if x.code == Some(0) => break None,
            Some(ExecEvent::Exit(x)) => return Err(op_error(&err, x.code, x.error)),
            Some(ExecEvent::Started { .. }) => {}
            None => {
                return Err(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the read ended without an answer".into(),
                ));
            }
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::spawn(async move {
        if let Some(bytes) = first
            && tx.send(Ok(bytes)).await.is_err()
        {
            return;
        }
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                // The client hung up: dropping the events ends the read.
                _ = tx.closed() => return,
            };
            match ev {
                Some(ExecEvent::Stdout(chunk)) => {
                    let sent = tx.send(Ok(chunk.bytes())).await;
                    if sent.is_err() {
                        return;
                    }
                }
                // A read that fails midway must not look complete.
                Some(ExecEvent::Exit(x)) if x.code != Some(0) => {
                    let _ = tx
                        .send(Err(std::io::Error::other("the read failed midway")))
                        .await;
                    return;
                }
                Some(ExecEvent::Exit(_)) | None => return,
                _ => {}
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(super::server::ReceiverStream(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// `PUT .../files/content?path=&mode=`: replaces the file with the body
/// (its `Content-Length` is required), atomically.
pub async fn write(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let size = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError(
                StatusCode::LENGTH_REQUIRED,
                "an upload needs a Content-Length: the file is replaced only once all of it arrived"
                    .into(),
            )
        })?;
    let mode = match &q.mode {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!("mode {m:?} is not octal permission bits like 644"),
                    )
                })?,
        ),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_CHUNKS);
    let op = FileOp::Write {
        path: q.path,
        size,
        mode,
    };
    let handle = start(&b, c, &id, op, Stdin::Stream(rx)).await?;
    // The body flows into the sandbox as it arrives; a client that stops
    // short leaves fewer bytes than announced, and the file unchanged.
    tokio::spawn(async move {
        let mut body = body;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data()
                && tx.send(data).await.is_err()
            {
                return;
            }
        }
    });
    json_op(handle).await
}

/// `GET .../files/list?path=`: the directory's entries.
pub async fn list(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let op = FileOp::List { path: q.path };
    json_op(start(&b, c, &id, op, Stdin::Bytes(Vec::new())).await?).await
}

/// `GET .../files/stat?path=`: one entry.
pub async fn stat(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let op = FileOp::Stat { path: q.path };
    json_op(start(&b, c, &id, op, Stdin::Bytes(Vec::new())).await?).await
}

/// Body of `POST .../files/mkdir`, `remove`, `rename` and `symlink`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeBody {
    /// The path (mkdir, remove).
    pub path: Option<String>,
    /// mkdir: make parents; an existing directory is fine.
    #[serde(default)]
    pub parents: bool,
    /// mkdir: permission bits (default 0755).
    pub mode: Option<u32>,
    /// remove: a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
    /// rename: from.
    pub from: Option<String>,
    /// rename: to.
    pub to: Option<String>,
    /// symlink: what the new link (`path`) points to.
    pub target: Option<String>,
}

fn need(v: Option<String>, field: &str) -> Result<String, ApiError> {
    v.ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, format!("missing field `{field}`")))
}

/// `POST .../files/{mkdir,remove,rename,symlink}`.
pub async fn change(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path((id, what)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ChangeBody = super::server::json_body(&super::server::read_body(body).await?)?;
    let op = match what.as_str() {
        "mkdir" => FileOp::Mkdir {
            path: need(req.path, "path")?,
            parents: req.parents,
            mode: req.mode.filter(|m| *m <= 0o7777),
        },
        "remove" => FileOp::Remove {
            path: need(req.path, "path")?,
            recursive: req.recursive,
        },
        "rename" => FileOp::Rename {
            from: need(req.from, "from")?,
            to: need(req.to, "to")?,
        },
        "symlink" => FileOp::Symlink {
            path: need(req.path, "path")?,
            target: need(req.target, "target")?,
        },
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "no file operation {:?}: use mkdir, remove, rename or symlink",
                    other.chars().take(40).collect::<String>()
                ),
            ));
        }
    };
    json_op(start(&b, c, &id, op, Stdin::Bytes(Vec::new())).await?).await
}

/// What a change under a watched path was.
fn change_kind(op: &str) -> &'static str {
    match op {
        "Create" | "Mkdir" | "Symlink" | "Link" => "created",
        "Unlink" | "Rmdir" => "removed",
        "Rename" => "renamed",
        _ => "modified",
    }
}

/// Whether `path` is `under` or below it.
fn is_under(path: &str, under: &str) -> bool {
    let under = under.trim_end_matches('/');
    under.is_empty()
        || path == under
        || path
            .strip_prefix(under)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `GET .../files/watch?path=`: changes under a path, one JSON object per
/// line, as the sandbox's filesystem server reports them.
pub async fn watch(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let sid = sandbox_id(&id)?;
    // Only a sandbox the caller may see.
    let info = b.inspect(&p, &sid)?;
    if !q.path.starts_with('/') {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "path {:?} must be absolute",
                q.path.chars().take(200).collect::<String>()
            ),
        ));
    }
    let under = q.path.clone();
    let id = info.id.clone();
    let show = move |ev: &crate::audit::LiveEvent| {
        if ev.sandbox_id.as_deref() != Some(id.as_str()) {
            return Shown::Skip;
        }
        if ev.kind == "sandbox" && ev.action == "destroy" {
            return Shown::End;
        }
        let Some(m) = ev.detail.get("Mutation") else {
            return Shown::Skip;
        };
        let path = m["path"].as_str().unwrap_or("");
        let to = m["to"].as_str();
        if !is_under(path, &under) && !to.is_some_and(|t| is_under(t, &under)) {
            return Shown::Skip;
        }
        let mut j = serde_json::json!({
            "ts_ms": ev.ts_ms,
            "event": change_kind(m["op"].as_str().unwrap_or("")),
            "op": m["op"],
            "path": path,
        });
        if let (Some(t), Some(o)) = (to, j.as_object_mut()) {
            o.insert("to".into(), serde_json::json!(t));
        }
        Shown::Line(serde_json::to_vec(&j).unwrap_or_default())
    };
    let lagged = |n| serde_json::json!({"event": "lagged", "missed": n});
    Ok(super::server::live_lines(
        b.subscribe_events(),
        show,
        lagged,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_paths_match_whole_components() {
        assert!(is_under("/workspace/a", "/workspace"));
        assert!(is_under("/workspace", "/workspace/"));
        assert!(!is_under("/workspace2/a", "/workspace"));
        assert!(is_under("/anything", "/"));
        assert_eq!(change_kind("Rmdir"), "removed");
        assert_eq!(change_kind("Chmod"), "modified");
    }
}
