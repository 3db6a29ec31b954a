//! A client of the /v1 API over brokerd's Unix socket (HTTP/1.1 + JSON).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::api::types::{CreateSandbox, ErrorBody, ExecBody, ExecEvent, SandboxInfo};
use crate::audit::AuditRow;

/// A request to brokerd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect to the socket.
    #[error("cannot connect to brokerd at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// HTTP-level failure.
    #[error("talking to brokerd: {0}")]
    Http(String),
    /// brokerd answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// Status code.
        status: u16,
        /// The error body's text.
        message: String,
    },
}

/// How long a reply may take to start, and a whole non-streamed reply to
/// arrive, unless `AIRLOCK_REPLY_TIMEOUT` says otherwise (a create that
/// waits for a sandbox to start is well within it).
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Largest non-streamed reply read (a listing, audit rows).
pub const MAX_REPLY_BYTES: usize = 64 << 20;

/// The reply timeout in force: `AIRLOCK_REPLY_TIMEOUT` (e.g. `30s`) if set
/// and valid, else [`REPLY_TIMEOUT`].
fn reply_timeout() -> std::time::Duration {
    std::env::var("AIRLOCK_REPLY_TIMEOUT")
        .ok()
        .and_then(|v| crate::util::parse_duration(&v).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(REPLY_TIMEOUT)
}

/// A brokerd client.
#[derive(Debug, Clone)]
pub struct RemoteClient {
    socket: PathBuf,
    /// The connection [`RemoteClient::reachable`] made, kept for the first
    /// request (one connect fewer on every command).
    probed: Arc<std::sync::Mutex<Option<UnixStream>>>,
}

impl RemoteClient {
    /// A client for the socket at `socket`.
    pub fn new(socket: &Path) -> RemoteClient {
        RemoteClient {
            socket: socket.to_path_buf(),
            probed: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Whether a broker answers on the socket.
    pub async fn reachable(&self) -> bool {
        match UnixStream::connect(&self.socket).await {
            Ok(stream) => {
                *crate::util::lock_or_recover(&self.probed) = Some(stream);
                true
            }
            Err(_) => false,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        self.send_body(
            method,
            path,
            Full::new(Bytes::from(body.unwrap_or_default())),
            None,
        )
        .await
    }

    async fn send_body<B>(
        &self,
        method: Method,
        path: &str,
        body: B,
        length: Option<u64>,
    ) -> Result<hyper::Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let probed = crate::util::lock_or_recover(&self.probed).take();
        let stream =
            match probed {
                Some(s) => s,
                None => UnixStream::connect(&self.socket).await.map_err(|source| {
                    ClientError::Connect {
                        path: self.socket.clone(),
                        source,
                    }
                })?,
            };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "airlock")
            .header("content-type", "application/json");
        if let Some(n) = length {
            req = req.header("content-length", n);
        }
        let req = req
            .body(body)
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let wait = reply_timeout();
        match tokio::time::timeout(wait, sender.send_request(req)).await {
            Ok(r) => r.map_err(|e| ClientError::Http(e.to_string())),
            Err(_) => Err(ClientError::Http(format!(
                "brokerd at {} did not answer within {}s (AIRLOCK_REPLY_TIMEOUT)",
                self.socket.display(),
                wait.as_secs()
            ))),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = read_reply(resp.into_body()).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Http(format!("bad reply: {e}")))
    }

    /// `POST /v1/sandboxes`.
    pub async fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(Method::POST, "/v1/sandboxes", Some(body)).await
    }

    /// `GET /v1/sandboxes`.
    pub async fn list(&self) -> Result<Vec<SandboxInfo>, ClientError> {
        self.call(Method::GET, "/v1/sandboxes", None).await
    }

    /// `GET /v1/sandboxes/{id}`.
    pub async fn inspect(&self, id: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/sandboxes/{}", enc(id)), None)
            .await
    }

    /// `POST /v1/sandboxes/{id}/ports`: the host address now forwarded.
    pub async fn forward_port(
        &self,
        id: &str,
        req: &crate::api::types::PortForward,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/ports", enc(id)),
            Some(body),
        )
        .await
    }

    /// `GET /v1/sandboxes/{id}/ports`.
    pub async fn ports(
        &self,
        id: &str,
    ) -> Result<Vec<crate::api::types::ForwardedPort>, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/sandboxes/{}/ports", enc(id)),
            None,
        )
        .await
    }

    /// `DELETE /v1/sandboxes/{id}/ports/{host_port}`.
    pub async fn unforward_port(
        &self,
        id: &str,
        host_port: u16,
    ) -> Result<Vec<crate::api::types::ForwardedPort>, ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/sandboxes/{}/ports/{host_port}", enc(id)),
            None,
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/kill`: how many processes were killed.
    pub async fn kill(&self, id: &str) -> Result<u64, ClientError> {
        let v: serde_json::Value = self
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{}/kill", enc(id)),
                None,
            )
            .await?;
        Ok(v["killed"].as_u64().unwrap_or(0))
    }

    /// `POST /v1/sandboxes/{id}/snapshots`.
    pub async fn snapshot(
        &self,
        id: &str,
        name: Option<&str>,
    ) -> Result<crate::api::types::SnapshotInfo, ClientError> {
        let req = crate::api::types::TakeSnapshot {
            name: name.map(str::to_string),
        };
        let body = serde_json::to_vec(&req).map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/snapshots", enc(id)),
            Some(body),
        )
        .await
    }

    /// `GET /v1/sandboxes/{id}/snapshots`.
    pub async fn snapshots(
        &self,
        id: &str,
    ) -> Result<Vec<crate::api::types::SnapshotInfo>, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/sandboxes/{}/snapshots", enc(id)),
            None,
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/snapshots/{name}/restore`.
    pub async fn restore(
        &self,
        id: &str,
        name: &str,
    ) -> Result<crate::api::types::SnapshotInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/snapshots/{}/restore", enc(id), enc(name)),
            None,
        )
        .await
    }

    /// `DELETE /v1/sandboxes/{id}/snapshots/{name}`.
    pub async fn remove_snapshot(&self, id: &str, name: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call(
                Method::DELETE,
                &format!("/v1/sandboxes/{}/snapshots/{}", enc(id), enc(name)),
                None,
            )
            .await?;
        Ok(())
    }

    /// `DELETE /v1/sandboxes/{id}`.
    pub async fn destroy(&self, id: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call(Method::DELETE, &format!("/v1/sandboxes/{}", enc(id)), None)
            .await?;
        Ok(())
    }

    /// `DELETE /v1/sandboxes/{id}?wait=false`: brokerd tears down in the
    /// background.
    pub async fn destroy_detached(&self, id: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call(
                Method::DELETE,
                &format!("/v1/sandboxes/{}?wait=false", enc(id)),
                None,
            )
            .await?;
        Ok(())
    }

    /// `POST /v1/sandboxes/{id}/execs/{exec_id}/signal`.
    pub async fn signal(&self, id: &str, exec_id: u64, signal: i32) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&serde_json::json!({ "signal": signal }))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let _: serde_json::Value = self
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{}/execs/{exec_id}/signal", enc(id)),
                Some(body),
            )
            .await?;
        Ok(())
    }

    /// `GET /v1/audit?...` with an already-encoded query string.
    pub async fn audit(&self, query: &str) -> Result<Vec<AuditRow>, ClientError> {
        self.call(Method::GET, &format!("/v1/audit?{query}"), None)
            .await
    }

    /// `POST /v1/sandboxes/{id}/exec`: events as they stream in. Dropping
    /// the receiver closes the connection, which kills the command.
    pub async fn exec(
        &self,
        id: &str,
        body: &ExecBody,
    ) -> Result<mpsc::Receiver<ExecEvent>, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = self
            .send(
                Method::POST,
                &format!("/v1/sandboxes/{}/exec", enc(id)),
                Some(bytes),
            )
            .await?;
        stream_of(resp).await
    }

    /// `GET .../files/content`: the file's bytes, written to `out` as they
    /// arrive; how many.
    pub async fn read_file<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        id: &str,
        path: &str,
        out: &mut W,
    ) -> Result<u64, ClientError> {
        self.read_file_range(id, path, 0, None, out).await
    }

    /// As [`RemoteClient::read_file`], from byte `offset`, `length` bytes
    /// at most.
    pub async fn read_file_range<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        id: &str,
        path: &str,
        offset: u64,
        length: Option<u64>,
        out: &mut W,
    ) -> Result<u64, ClientError> {
        use tokio::io::AsyncWriteExt;
        let mut url = format!(
            "/v1/sandboxes/{}/files/content?path={}&offset={offset}",
            enc(id),
            enc(path)
        );
        if let Some(n) = length {
            url.push_str(&format!("&length={n}"));
        }
        let resp = self.send(Method::GET, &url, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = read_reply(body).await?;
            return Err(api_error(status, &bytes));
        }
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Http(format!("reading {path}: {e}")))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data)
                    .await
                    .map_err(|e| ClientError::Http(format!("writing {path} here: {e}")))?;
                n += data.len() as u64;
            }
        }
        Ok(n)
    }

    /// `PUT .../files/content`: replaces the file with the `size` bytes
    /// `input` yields, streamed; the sandbox's stat of it.
    pub async fn write_file<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        size: u64,
        mut input: R,
    ) -> Result<airlock_shim::files::FileInfo, ClientError> {
        use tokio::io::AsyncReadExt;
        let (tx, rx) = mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(4);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                        if tx.send(Ok(hyper::body::Frame::data(chunk))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        let body = http_body_util::StreamBody::new(FrameStream(rx));
        let mut url = format!("/v1/sandboxes/{}/files/content?path={}", enc(id), enc(path));
        if let Some(m) = mode {
            url.push_str(&format!("&mode={m:o}"));
        }
        let resp = self.send_body(Method::PUT, &url, body, Some(size)).await?;
        let status = resp.status();
        let bytes = read_reply(resp.into_body()).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Http(format!("bad reply: {e}")))
    }

    /// `GET .../files/list`.
    pub async fn list_files(
        &self,
        id: &str,
        path: &str,
    ) -> Result<Vec<airlock_shim::files::FileInfo>, ClientError> {
        self.file_query("list", id, path).await
    }

    /// `GET .../files/stat`.
    pub async fn stat_file(
        &self,
        id: &str,
        path: &str,
    ) -> Result<airlock_shim::files::FileInfo, ClientError> {
        self.file_query("stat", id, path).await
    }

    async fn file_query<T: DeserializeOwned>(
        &self,
        what: &str,
        id: &str,
        path: &str,
    ) -> Result<T, ClientError> {
        let url = format!("/v1/sandboxes/{}/files/{what}?path={}", enc(id), enc(path));
        self.call(Method::GET, &url, None).await
    }

    /// `POST .../files/{op}` with `body`.
    pub async fn change_file(
        &self,
        id: &str,
        op: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/files/{}", enc(id), enc(op)),
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    /// `GET .../files/watch`: changes under `path` as they happen.
    pub async fn watch(
        &self,
        id: &str,
        path: &str,
    ) -> Result<mpsc::Receiver<serde_json::Value>, ClientError> {
        let resp = self
            .send(
                Method::GET,
                &format!("/v1/sandboxes/{}/files/watch?path={}", enc(id), enc(path)),
                None,
            )
            .await?;
        stream_of(resp).await
    }

    /// `GET .../exec/attach` (a WebSocket): starts `body` with its input
    /// streamed from the returned sender and its events on the receiver.
    pub async fn attach(
        &self,
        id: &str,
        body: &ExecBody,
    ) -> Result<
        (
            mpsc::Sender<crate::broker::Input>,
            mpsc::Receiver<ExecEvent>,
        ),
        ClientError,
    > {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let url = format!("ws://airlock/v1/sandboxes/{}/exec/attach", enc(id));
        let (ws, _) = match tokio_tungstenite::client_async(url, stream).await {
            Ok(x) => x,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp.body().clone().unwrap_or_default();
                return Err(api_error(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    &body,
                ));
            }
            Err(e) => return Err(ClientError::Http(format!("attach: {e}"))),
        };
        let (mut sink, mut source) = ws.split();
        let first = serde_json::to_string(body).map_err(|e| ClientError::Http(e.to_string()))?;
        sink.send(Message::Text(first.into()))
            .await
            .map_err(|e| ClientError::Http(format!("attach: {e}")))?;
        let (in_tx, mut in_rx) = mpsc::channel::<crate::broker::Input>(64);
        let (ev_tx, ev_rx) = mpsc::channel::<ExecEvent>(64);
        tokio::spawn(async move {
            while let Some(input) = in_rx.recv().await {
                use crate::api::types::{AttachControl, TtySize};
                use crate::broker::Input;
                let msg = match input {
                    Input::Data(b) => Message::Binary(b),
                    Input::Resize(rows, cols) => Message::Text(
                        serde_json::to_string(&AttachControl::Resize(TtySize { rows, cols }))
                            .unwrap_or_default()
                            .into(),
                    ),
                    Input::Signal(n) => Message::Text(
                        serde_json::to_string(&AttachControl::Signal(n))
                            .unwrap_or_default()
                            .into(),
                    ),
                    Input::Eof => Message::Text(
                        serde_json::to_string(&AttachControl::Eof(true))
                            .unwrap_or_default()
                            .into(),
                    ),
                };
                if sink.send(msg).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(Ok(msg)) = source.next().await {
                let Message::Text(t) = msg else { continue };
                if let Ok(ev) = serde_json::from_str::<ExecEvent>(t.as_str()) {
                    if ev_tx.send(ev).await.is_err() {
                        return;
                    }
                } else if let Ok(e) = serde_json::from_str::<ErrorBody>(t.as_str()) {
                    // The command could not start: the stream ends here,
                    // with the reason on a last exit.
                    let _ = ev_tx
                        .send(ExecEvent::Exit(crate::api::types::ExecExit {
                            code: Some(126),
                            error: Some(e.error),
                            ..Default::default()
                        }))
                        .await;
                    return;
                }
            }
        });
        Ok((in_tx, ev_rx))
    }

    /// `GET /v1/events?{query}`: lifecycle events as they happen, until the
    /// receiver is dropped or the broker goes.
    pub async fn events(
        &self,
        query: &str,
    ) -> Result<mpsc::Receiver<serde_json::Value>, ClientError> {
        let resp = self
            .send(Method::GET, &format!("/v1/events?{query}"), None)
            .await?;
        stream_of(resp).await
    }
}

/// A streamed reply's lines, or its error.
async fn stream_of<T: DeserializeOwned + Send + 'static>(
    resp: hyper::Response<Incoming>,
) -> Result<mpsc::Receiver<T>, ClientError> {
    let status = resp.status();
    let body = resp.into_body();
    if !status.is_success() {
        let bytes = read_reply(body).await?;
        return Err(api_error(status, &bytes));
    }
    Ok(ndjson_lines(body))
}

/// Upload frames from a channel, as a body stream.
struct FrameStream(mpsc::Receiver<Result<hyper::body::Frame<Bytes>, std::io::Error>>);

impl futures_core::Stream for FrameStream {
    type Item = Result<hyper::body::Frame<Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Longest line a streamed reply may send; past it the stream ends (a
/// broken or hostile server cannot make the client buffer without end).
const MAX_LINE_BYTES: usize = 16 << 20;

/// Decodes an NDJSON body line by line onto a channel, on a task of its
/// own; it stops when the receiver is dropped, the body ends, or a line
/// passes [`MAX_LINE_BYTES`].
fn ndjson_lines<T: DeserializeOwned + Send + 'static>(mut body: Incoming) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = tx.closed() => return,
            };
            let Some(Ok(frame)) = frame else { return };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                if let Ok(ev) = serde_json::from_slice::<T>(&line)
                    && tx.send(ev).await.is_err()
                {
                    return;
                }
            }
            if buf.len() > MAX_LINE_BYTES {
                return;
            }
        }
    });
    rx
}

/// A whole non-streamed reply, at most [`MAX_REPLY_BYTES`] and within the
/// reply timeout: a broken or hostile server can neither grow the client
/// without end nor hold it forever.
async fn read_reply(body: Incoming) -> Result<Bytes, ClientError> {
    let wait = reply_timeout();
    let limited = http_body_util::Limited::new(body, MAX_REPLY_BYTES);
    match tokio::time::timeout(wait, limited.collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => Err(ClientError::Http(format!(
            "reading the reply (at most {MAX_REPLY_BYTES} bytes): {e}"
        ))),
        Err(_) => Err(ClientError::Http(format!(
            "the reply did not arrive within {}s (AIRLOCK_REPLY_TIMEOUT)",
            wait.as_secs()
        ))),
    }
}

fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
    ClientError::Api {
        status: status.as_u16(),
        message,
    }
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
