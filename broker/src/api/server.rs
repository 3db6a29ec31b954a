//! axum routes over the broker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::UnixListener;

use crate::api::types::{CreateSandbox, ErrorBody, ExecBody, ExecEvent};
use crate::audit::{AuditKind, AuditQuery};
use crate::authz::Principal;
use crate::broker::{Broker, BrokerError};
use crate::spec::{CreateSpec, ExecId, ExecSpec, SandboxId};

/// The peer's credentials, read once per connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerCred(pub Option<Principal>);

impl PeerCred {
    /// The kernel's word on who is at the other end.
    pub fn of(stream: &tokio::net::UnixStream) -> PeerCred {
        PeerCred(stream.peer_cred().ok().map(|c| Principal {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().unwrap_or(0),
        }))
    }
}

impl Connected<IncomingStream<'_, UnixListener>> for PeerCred {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        PeerCred::of(stream.io())
    }
}

/// An error response.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let code = match &e {
            BrokerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            BrokerError::Forbidden(_) => StatusCode::FORBIDDEN,
            BrokerError::NotFound(_)
            | BrokerError::NoSuchForward { .. }
            | BrokerError::NoSuchSnapshot { .. } => StatusCode::NOT_FOUND,
            BrokerError::NotRunning(_) | BrokerError::Conflict(_) => StatusCode::CONFLICT,
            BrokerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            BrokerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

pub(crate) fn principal(c: PeerCred) -> Result<Principal, ApiError> {
    c.0.ok_or_else(|| {
        ApiError(
            StatusCode::FORBIDDEN,
            "cannot read the caller's credentials (SO_PEERCRED)".into(),
        )
    })
}

pub(crate) fn json_body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

pub(crate) type Shared = State<Arc<Broker>>;
pub(crate) type Peer = ConnectInfo<PeerCred>;

/// Reads a request body whole, within [`BODY_READ_TIMEOUT`] and at most
/// [`MAX_BODY_BYTES`]: a client that declares a body and never sends it
/// (or trickles it) loses its request, not the broker a connection slot
/// forever.
pub(crate) async fn read_body(body: Body) -> Result<axum::body::Bytes, ApiError> {
    match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, MAX_BODY_BYTES),
    )
    .await
    {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body unreadable or over {MAX_BODY_BYTES} bytes: {e}"),
        )),
        Err(_) => Err(ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {}s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// The router.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(inspect).delete(destroy))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route(
            "/v1/sandboxes/{id}/exec/attach",
            get(crate::api::attach::attach),
        )
        .route("/v1/sandboxes/{id}/kill", post(kill))
        .route("/v1/sandboxes/{id}/network", put(set_network))
        .route(
            "/v1/sandboxes/{id}/ports",
            post(forward_port).get(list_ports),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{host_port}",
            delete(unforward_port),
        )
        .route(
            "/v1/sandboxes/{id}/snapshots",
            post(take_snapshot).get(list_snapshots),
        )
        .route(
            "/v1/sandboxes/{id}/snapshots/{name}",
            delete(remove_snapshot),
        )
        .route(
            "/v1/sandboxes/{id}/snapshots/{name}/restore",
            post(restore_snapshot),
        )
        .route("/v1/sandboxes/{id}/execs/{exec_id}/signal", post(signal))
        .route(
            "/v1/sandboxes/{id}/files/content",
            get(crate::api::files::read).put(crate::api::files::write),
        )
        .route(
            "/v1/sandboxes/{id}/files/list",
            get(crate::api::files::list),
        )
        .route(
            "/v1/sandboxes/{id}/files/stat",
            get(crate::api::files::stat),
        )
        .route(
            "/v1/sandboxes/{id}/files/watch",
            get(crate::api::files::watch),
        )
        .route(
            "/v1/sandboxes/{id}/files/{op}",
            post(crate::api::files::change),
        )
        .route("/v1/audit", get(audit))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint; see /v1".into()) })
        .layer(axum::middleware::from_fn(crate::api::wire::json_errors))
        .with_state(broker)
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
}

async fn create(State(b): Shared, ConnectInfo(c): Peer, body: Body) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let req: CreateSandbox = json_body(&read_body(body).await?)?;
    let spec = CreateSpec::try_from(req).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let info = blocking(move || b.create(&p, spec)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list(State(b): Shared, ConnectInfo(c): Peer) -> Result<Response, ApiError> {
    let p = principal(c)?;
    Ok(Json(b.list(&p)?).into_response())
}

/// A sandbox id from a request path; one that cannot be an id names no
/// sandbox.
pub(crate) fn sandbox_id(s: &str) -> Result<SandboxId, ApiError> {
    SandboxId::try_from(s).map_err(|e| ApiError(StatusCode::NOT_FOUND, e))
}

async fn inspect(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    Ok(Json(b.inspect(&p, &sandbox_id(&id)?)?).into_response())
}

async fn set_network(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let spec: airlock_net::policy::NetworkSpec = json_body(&read_body(body).await?)?;
    let info = blocking(move || b.set_network(&p, &id, &spec)).await?;
    Ok(Json(info).into_response())
}

async fn forward_port(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let req: crate::api::types::PortForward = json_body(&read_body(body).await?)?;
    let port = req.port;
    let bound = blocking(move || b.forward_port(&p, &id, &req)).await?;
    Ok(Json(serde_json::json!({
        "host_addr": bound.ip(),
        "host_port": bound.port(),
        "port": port,
    }))
    .into_response())
}

/// Runs broker work that may block (process start-up, teardown, SQLite)
/// off the async threads.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Send + 'static,
    ApiError: From<E>,
{
    let r = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(r?)
}

async fn list_ports(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let info = b.inspect(&p, &id)?;
    Ok(Json(info.ports).into_response())
}

async fn unforward_port(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path((id, host_port)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let host_port = host_port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("host port {host_port:?} is not a port"),
            )
        })?;
    let gone = blocking(move || b.unforward_port(&p, &id, host_port)).await?;
    Ok(Json(gone).into_response())
}

async fn kill(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let killed = blocking(move || b.kill_processes(&p, &id)).await?;
    Ok(Json(serde_json::json!({"killed": killed})).into_response())
}

async fn take_snapshot(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let bytes = read_body(body).await?;
    let req: crate::api::types::TakeSnapshot = if bytes.is_empty() {
        Default::default()
    } else {
        json_body(&bytes)?
    };
    let info = blocking(move || b.snapshot(&p, &id, req.name)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list_snapshots(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let list = blocking(move || b.snapshots(&p, &id)).await?;
    Ok(Json(list).into_response())
}

async fn restore_snapshot(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let info = blocking(move || b.restore(&p, &id, &name)).await?;
    Ok(Json(info).into_response())
}

async fn remove_snapshot(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let n = name.clone();
    blocking(move || b.remove_snapshot(&p, &id, &n)).await?;
    Ok(Json(serde_json::json!({"removed": name})).into_response())
}

/// `DELETE /v1/sandboxes/{id}` query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyParams {
    /// false: answer 202 at once and tear down in the background.
    pub wait: Option<bool>,
}

async fn destroy(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    Query(params): Query<DestroyParams>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    if params.wait == Some(false) {
        b.destroy_detached(&p, &id)?;
        return Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"id": id.as_str(), "destroyed": false, "state": "stopping"})),
        )
            .into_response());
    }
    let id2 = id.clone();
    blocking(move || b.destroy(&p, &id2)).await?;
    Ok(Json(serde_json::json!({"id": id.as_str(), "destroyed": true})).into_response())
}

async fn exec(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let id = sandbox_id(&id)?;
    let req: ExecBody = json_body(&read_body(body).await?)?;
    let spec = ExecSpec::try_from(req).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let handle = b.exec(&p, &id, spec).await?;
    let stream = futures_stream(handle.events);
    Ok(ndjson_response(stream))
}

/// `POST /v1/sandboxes/{id}/execs/{exec_id}/signal` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// Signal number (e.g. 15).
    pub signal: i32,
}

async fn signal(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Path((id, exec_id)): Path<(String, u64)>,
    body: Body,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let req: SignalBody = json_body(&read_body(body).await?)?;
    b.signal_exec(&p, &sandbox_id(&id)?, ExecId(exec_id), req.signal)?;
    Ok(
        Json(serde_json::json!({"id": id, "exec_id": exec_id, "signal": req.signal}))
            .into_response(),
    )
}

/// A 200 whose body is `stream`'s lines (one JSON object each).
pub(crate) fn ndjson_response(
    stream: impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static,
) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Turns exec events into NDJSON lines.
fn futures_stream(
    mut rx: tokio::sync::mpsc::Receiver<ExecEvent>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    async_stream_lines(move |tx| async move {
        loop {
            // A client that hangs up drops the response body: stop at once,
            // even while the command is silent (or stopped), so that
            // dropping `rx` ends the command.
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = tx.closed() => return,
            };
            let Some(ev) = ev else { return };
            let mut line = serde_json::to_vec(&ev).unwrap_or_default();
            line.push(b'\n');
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    })
}

/// A tiny channel-backed stream (avoids pulling in an async-stream macro).
pub(crate) fn async_stream_lines<F, Fut>(
    f: F,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    ReceiverStream(rx)
}

pub(crate) struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// `GET /v1/audit` query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Only this sandbox.
    pub sandbox: Option<String>,
    /// Only this agent.
    pub agent: Option<String>,
    /// Comma-separated kinds.
    pub kind: Option<String>,
    /// "10m", "2h", or an RFC 3339 UTC time.
    pub since: Option<String>,
    /// Newest N rows (default 1000).
    pub limit: Option<usize>,
}

/// Builds a query from parameters; errors name the bad value.
pub fn audit_query(params: &AuditParams) -> Result<AuditQuery, BrokerError> {
    let kinds = match &params.kind {
        None => vec![],
        Some(k) => k
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<AuditKind>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BrokerError::BadRequest(e.to_string()))?,
    };
    let since_ms = match &params.since {
        None => None,
        Some(s) => Some(
            crate::audit::parse_since(s, crate::util::now_ms())
                .map_err(|e| BrokerError::BadRequest(e.to_string()))?,
        ),
    };
    Ok(AuditQuery {
        sandbox_id: params.sandbox.clone(),
        agents: None,
        kinds,
        since_ms,
        limit: params.limit.unwrap_or(1000).min(100_000),
    })
}

async fn audit(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Query(params): Query<AuditParams>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let q = audit_query(&params)?;
    let agent = params.agent.clone();
    let rows = blocking(move || b.audit(&p, q, agent.as_deref())).await?;
    Ok(Json(rows).into_response())
}

async fn metrics(State(b): Shared, ConnectInfo(c): Peer) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let text = blocking(move || b.metrics_text(&p)).await?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Body::from(text))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// `GET /v1/events` query string.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    /// Only this sandbox.
    pub sandbox: Option<String>,
    /// Only this agent.
    pub agent: Option<String>,
    /// Comma-separated kinds among `sandbox`, `exec`, `limit`.
    pub kind: Option<String>,
}

/// The kinds `GET /v1/events` streams.
pub const EVENT_KINDS: [&str; 3] = ["sandbox", "exec", "limit"];

/// Checks event parameters; errors name the bad value.
pub fn event_kinds(params: &EventParams) -> Result<Vec<String>, BrokerError> {
    let Some(k) = &params.kind else {
        return Ok(Vec::new());
    };
    k.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if EVENT_KINDS.contains(&s) {
                Ok(s.to_string())
            } else {
                Err(BrokerError::BadRequest(format!(
                    "kind {:?}: events are of kinds {}",
                    s.chars().take(40).collect::<String>(),
                    EVENT_KINDS.join(", ")
                )))
            }
        })
        .collect()
}

async fn events(
    State(b): Shared,
    ConnectInfo(c): Peer,
    Query(params): Query<EventParams>,
) -> Result<Response, ApiError> {
    let p = principal(c)?;
    let kinds = event_kinds(&params)?;
    let filter = b.event_filter(&p, params.agent.as_deref())?;
    let sandbox = params.sandbox.clone();
    let show = move |ev: &crate::audit::LiveEvent| {
        let visible = ev.agent.as_deref().is_some_and(&filter);
        let wanted = (if kinds.is_empty() {
            EVENT_KINDS.contains(&ev.kind.as_str())
        } else {
            kinds.contains(&ev.kind)
        }) && sandbox
            .as_deref()
            .is_none_or(|s| ev.sandbox_id.as_deref() == Some(s));
        if visible && wanted {
            Shown::Line(serde_json::to_vec(ev).unwrap_or_default())
        } else {
            Shown::Skip
        }
    };
    let lagged = |n| serde_json::json!({"kind": "events", "action": "lagged", "missed": n});
    Ok(live_lines(b.subscribe_events(), show, lagged))
}

/// What a live stream does with one event.
pub(crate) enum Shown {
    /// Sends this JSON line.
    Line(Vec<u8>),
    /// Leaves it out.
    Skip,
    /// Ends the stream.
    End,
}

/// A stream of live events as NDJSON lines: `show` decides each event's
/// line; a client that fell behind gets `lagged(missed)`; it ends when the
/// client hangs up, `show` says so, or the broker goes.
pub(crate) fn live_lines(
    mut rx: tokio::sync::broadcast::Receiver<Arc<crate::audit::LiveEvent>>,
    show: impl Fn(&crate::audit::LiveEvent) -> Shown + Send + 'static,
    lagged: impl Fn(u64) -> serde_json::Value + Send + 'static,
) -> Response {
    use tokio::sync::broadcast::error::RecvError;
    ndjson_response(async_stream_lines(move |tx| async move {
        loop {
            let got = tokio::select! {
                got = rx.recv() => got,
                _ = tx.closed() => return,
            };
            let mut line = match got {
                Ok(ev) => match show(&ev) {
                    Shown::Line(l) => l,
                    Shown::Skip => continue,
                    Shown::End => return,
                },
                Err(RecvError::Lagged(n)) => serde_json::to_vec(&lagged(n)).unwrap_or_default(),
                Err(RecvError::Closed) => return,
            };
            line.push(b'\n');
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    }))
}

/// Most connections one uid may hold open at once.
pub const MAX_CONNECTIONS_PER_UID: usize = 128;
/// A request's headers must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request body may take to arrive.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body accepted (an exec's argv, env and stdin).
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// How long a refused connection waits for the request's head before it is
/// answered, and then for the client to hang up before it is closed.
const REFUSE_WAIT: Duration = Duration::from_secs(1);
/// Most bytes of a refused client's request that are read and discarded.
const REFUSE_DRAIN_BYTES: usize = 64 * 1024;
/// Most refused connections lingering at once; past it they are closed at
/// once, so a flood of refused connects cannot hold descriptors.
const MAX_LINGERING_REFUSALS: usize = 256;

/// Serves the API on `listener` until `shutdown` resolves.
///
/// Each connection's peer is identified at accept: a uid mapped to no agent
/// gets a 403 without any request being served, within a second even if it
/// sends nothing (so unmapped local users cannot tie up the broker; at most
/// [`MAX_LINGERING_REFUSALS`] such connections wait at once), each uid holds
/// at most
/// [`MAX_CONNECTIONS_PER_UID`] connections, and headers must arrive within
/// [`HEADER_READ_TIMEOUT`].
pub async fn serve(
    broker: Arc<Broker>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(Arc::clone(&broker));
    let open: Arc<std::sync::Mutex<HashMap<u32, usize>>> = Arc::default();
    // Shutdown: each connection finishes what it serves, then closes
    // (an upgradeable connection cannot use hyper-util's watcher).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let live = Arc::new(tokio::sync::Semaphore::new(0));
    let live_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_LINGERING_REFUSALS));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors or similar: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(p) = PeerCred::of(&stream).0 else {
            continue;
        };
        if let Err(e) = p.check_mapped(broker.config()) {
            broker.audit_connection_refused(&p, &e.to_string());
            if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, StatusCode::FORBIDDEN, e.to_string()).await;
                    drop(permit);
                });
            }
            continue;
        }
        let held = {
            let mut m = crate::util::lock_or_recover(&open);
            let n = m.entry(p.uid).or_insert(0);
            *n += 1;
            *n
        };
        let guard = ConnGuard {
            uid: p.uid,
            open: Arc::clone(&open),
        };
        if held > MAX_CONNECTIONS_PER_UID {
            tokio::spawn(async move {
                refuse(
                    stream,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "uid {} has {MAX_CONNECTIONS_PER_UID} connections open already",
                        p.uid
                    ),
                )
                .await;
                drop(guard);
            });
            continue;
        }
        let svc = app
            .clone()
            .layer(axum::Extension(ConnectInfo(PeerCred(Some(p)))));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(
                hyper_util::rt::TokioIo::new(crate::api::wire::JsonErrors::new(stream)),
                hyper_util::service::TowerToHyperService::new(svc),
            )
            // Attached execs upgrade their connection.
            .with_upgrades();
        let mut stop = stop_rx.clone();
        let (live, live_count) = (Arc::clone(&live), Arc::clone(&live_count));
        live_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(guard);
            live_count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            live.add_permits(1);
        });
    }
    // Let running requests finish (execs stream until their command ends).
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while live_count.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            if let Ok(p) = live.acquire().await {
                p.forget();
            }
        }
    })
    .await;
    Ok(())
}

/// Releases a uid's connection slot when the connection ends.
struct ConnGuard {
    uid: u32,
    open: Arc<std::sync::Mutex<HashMap<u32, usize>>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut m = crate::util::lock_or_recover(&self.open);
        if let Some(n) = m.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// Answers a connection with one error response and closes it.
///
/// The answer waits for the request's head (at most [`REFUSE_WAIT`]): an
/// HTTP/1.1 client treats bytes that arrive before it has sent its request
/// as a protocol error and never shows the reason. After the answer, what
/// the client still sends is read and discarded until it hangs up (at most
/// [`REFUSE_WAIT`] again): closing with its request unread would make its
/// write fail before it reads the answer. Either way the connection is gone
/// within twice [`REFUSE_WAIT`], and at most [`REFUSE_DRAIN_BYTES`] are read.
async fn refuse(mut stream: tokio::net::UnixStream, code: StatusCode, error: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_string(&ErrorBody { error }).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        code.as_u16(),
        code.canonical_reason().unwrap_or(""),
        body.len()
    );
    let mut buf = [0u8; 4096];
    let mut read = 0usize;
    // The last bytes seen, to spot the blank line that ends the head.
    let mut tail: Vec<u8> = Vec::with_capacity(8);
    let head_read = async {
        while read < REFUSE_DRAIN_BYTES {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            read += n;
            tail.extend_from_slice(&buf[..n]);
            if tail.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
            let keep = tail.len().saturating_sub(3);
            tail.drain(..keep);
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSE_WAIT, head_read).await;
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        while read < REFUSE_DRAIN_BYTES {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            read += n;
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSE_WAIT, answer).await;
}
