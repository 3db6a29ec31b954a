//! `GET /v1/sandboxes/{id}/exec/attach`: a command with its input
//! streamed in and its output streamed out over one connection (an HTTP
//! upgrade to WebSocket on the same socket): interactive shells on a
//! terminal (`"tty": true`), and commands fed from a pipe.
//!
//! The client's first message is the exec body (JSON text, as for
//! `POST .../exec`, with `tty` and `size`). Then binary messages are
//! stdin bytes (typed into the terminal), and text messages are controls:
//! `{"resize": {"rows", "cols"}}`, `{"signal": N}`, `{"eof": true}`. The
//! server sends each exec event as a JSON text message (the same objects
//! as the NDJSON stream), the exit last, then closes. A client that goes
//! away ends the command.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};

use super::server::{ApiError, Peer, Shared, principal, sandbox_id};
use crate::api::types::{AttachControl, ExecBody, ExecEvent};
use crate::authz::Principal;
use crate::broker::{Broker, Input, Stdin};
use crate::spec::{ExecSpec, SandboxId};

/// How long the exec body may take to arrive after the upgrade.
const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(10);
/// Largest message a client may send.
const MAX_MESSAGE: usize = 1 << 20;

/// The upgrade: the sandbox is checked first, so a wrong id is a plain
/// 404, not a socket that closes.
pub async fn attach(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let sid = sandbox_id(&id)?;
    b.inspect(&p, &sid)?;
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| serve(b, p, sid, socket)))
}

async fn fail(mut socket: WebSocket, error: String) {
    let line = serde_json::json!({ "error": error }).to_string();
    let _ = socket.send(Message::Text(line.into())).await;
    let _ = socket.close().await;
}

async fn serve(b: Arc<Broker>, p: Principal, id: SandboxId, mut socket: WebSocket) {
    let first = match tokio::time::timeout(FIRST_MESSAGE_WAIT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(_) => {
            return fail(
                socket,
                "the first message must be the exec body (JSON text)".into(),
            )
            .await;
        }
        Err(_) => {
            return fail(
                socket,
                format!("no exec body within {}s", FIRST_MESSAGE_WAIT.as_secs()),
            )
            .await;
        }
    };
    let spec = match serde_json::from_str::<ExecBody>(first.as_str())
        .map_err(|e| format!("invalid exec body: {e}"))
        .and_then(ExecSpec::try_from)
    {
        Ok(s) => s,
        Err(e) => return fail(socket, e).await,
    };
    let (input, rx) = tokio::sync::mpsc::channel(64);
    let mut handle = match b.exec_attached(&p, &id, spec, Stdin::Attached(rx)).await {
        Ok(h) => h,
        Err(e) => return fail(socket, e.to_string()).await,
    };
    let (mut out, mut inc) = socket.split();
    loop {
        tokio::select! {
            ev = handle.events.recv() => {
                let Some(ev) = ev else { break };
                let last = matches!(ev, ExecEvent::Exit(_));
                let line = serde_json::to_string(&ev).unwrap_or_default();
                if out.send(Message::Text(line.into())).await.is_err() {
                    // Gone: dropping the events ends the command.
                    return;
                }
                if last {
                    let _ = out.close().await;
                    return;
                }
            }
            msg = inc.next() => {
                let sent = match msg {
                    Some(Ok(Message::Binary(data))) => input.send(Input::Data(data)).await,
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<AttachControl>(t.as_str()) {
                        Ok(AttachControl::Resize(s)) => input.send(Input::Resize(s.rows.max(1), s.cols.max(1))).await,
                        Ok(AttachControl::Signal(n)) => {
                            if !airlock_shim::sys::is_signal(n) {
                                continue;
                            }
                            input.send(Input::Signal(n)).await
                        }
                        Ok(AttachControl::Eof(_)) => input.send(Input::Eof).await,
                        Err(_) => Ok(()),
                    },
                    Some(Ok(_)) => Ok(()),
                    // The client went away: the command goes too.
                    Some(Err(_)) | None => return,
                };
                if sent.is_err() {
                    // The command no longer reads: keep sending its output.
                }
            }
        }
    }
}
