//! Audit store: every broker decision lands in one SQLite file.
//!
//! # Theory of operation
//!
//! * Callers build an [`AuditRecord`] and hand it to [`AuditStore::record`]. That call stamps
//!   the time, pushes onto a bounded queue with `try_send` and returns; it never waits on disk.
//! * One writer thread (`airlock-audit`) owns the write connection. It takes up to
//!   [`BATCH_MAX_ROWS`] records or whatever arrives within [`BATCH_WINDOW`] of the first one,
//!   and commits them in one `BEGIN IMMEDIATE` transaction. `SQLITE_BUSY` (another process
//!   holds the write lock) is retried with back-off on top of the 5 s `busy_timeout`.
//! * When the queue is full the record is counted, not stored. The writer then appends one
//!   `kind = limit, action = "audit_dropped", detail = {"dropped": n}` row with the next batch,
//!   so losses are themselves audited.
//! * [`AuditStore::flush`] sends a marker through the same queue and waits for the writer to
//!   commit everything queued before it.
//! * Queries use a second, `query_only` connection; WAL lets them run while the writer commits.
//!   SQL is built from fixed fragments with `?` parameters only.
//! * Several processes may open the same file (system daemon plus an embedded broker): WAL,
//!   `busy_timeout` and the retry loop serialise their writers without losing rows.
//! * The schema lives in `schema.sql` and is versioned with `PRAGMA user_version` (now 1).

mod event;
mod query;
mod writer;

pub use event::AuditEvent;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// SQL for schema version 1.
pub const SCHEMA_V1: &str = include_str!("schema.sql");
/// Schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// Records the queue holds before new ones are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 65_536;
/// Most rows the writer commits in one transaction.
pub const BATCH_MAX_ROWS: usize = 512;
/// How long the writer keeps collecting after the first record of a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// What an audit row is about. Stored as the lowercase name in `events.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditKind {
    /// Sandbox lifecycle: create (with the applied config), destroy.
    Sandbox,
    /// A process run inside a sandbox: argv, cwd, user, exit status or signal, duration, OOM.
    Exec,
    /// File mutations under /workspace.
    Fs,
    /// A policy said no (egress, mount, ioctl, syscall, ...).
    Denial,
    /// A resource limit was hit (oom, pids_max, ...), or audit rows were dropped.
    Limit,
    /// Facts about the jail: landlock ABI reached, seccomp profile version, self-tests.
    Jail,
    /// API authentication / authorisation refusals.
    Auth,
    /// Network flows and DNS questions, allowed or refused, with the rule
    /// that decided.
    Net,
    /// Devices: the GPU driver and ABI tables a sandbox's device proxy
    /// serves, and the driver calls it performed, counted by kind.
    Device,
}

impl AuditKind {
    /// Every kind, in declaration order.
    pub const ALL: [AuditKind; 9] = [
        AuditKind::Sandbox,
        AuditKind::Exec,
        AuditKind::Fs,
        AuditKind::Denial,
        AuditKind::Limit,
        AuditKind::Jail,
        AuditKind::Auth,
        AuditKind::Net,
        AuditKind::Device,
    ];

    /// The lowercase name stored in the database and used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Sandbox => "sandbox",
            AuditKind::Exec => "exec",
            AuditKind::Fs => "fs",
            AuditKind::Denial => "denial",
            AuditKind::Limit => "limit",
            AuditKind::Jail => "jail",
            AuditKind::Auth => "auth",
            AuditKind::Net => "net",
            AuditKind::Device => "device",
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditKind {
    type Err = AuditError;

    /// Parses a lowercase kind name (surrounding whitespace and case are ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        AuditKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| AuditError::UnknownKind {
                value: s.to_owned(),
            })
    }
}

/// A sandbox's GPUs, as its create row records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpusGranted {
    /// The host driver's version.
    pub driver: String,
    /// Whose ABI tables serve it.
    pub tables: String,
    /// Whether those are a newer release's of the same branch (the
    /// operator's opt-in).
    pub newer_in_branch: bool,
    /// The GPUs, in the sandbox's order.
    pub granted: Vec<crate::api::types::GrantedGpu>,
    /// Whether the sandbox's cgroup bounds the devices it may open.
    pub devices_cgroup: bool,
}

/// One event to store. `detail` holds kind-specific fields (see the module README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub kind: AuditKind,
    /// e.g. "create", "destroy", "exit", "mutation", "oom", "pids_max", "selftest", "refused".
    pub action: String,
    pub sandbox_id: Option<String>,
    pub agent: Option<String>,
    pub detail: serde_json::Value,
}

impl AuditRecord {
    /// A record with no sandbox, no agent and an empty-object detail.
    pub fn new(kind: AuditKind, action: impl Into<String>) -> Self {
        AuditRecord {
            kind,
            action: action.into(),
            sandbox_id: None,
            agent: None,
            detail: serde_json::Value::Object(serde_json::Map::new()),
        }
    }

    /// Sets `sandbox_id`.
    pub fn with_sandbox(mut self, sandbox_id: impl Into<String>) -> Self {
        self.sandbox_id = Some(sandbox_id.into());
        self
    }

    /// Sets `agent`.
    pub fn with_agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    /// Sets `detail`.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// One stored event, as returned by [`AuditStore::query`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    pub id: i64,
    /// Unix time in milliseconds.
    pub ts_ms: i64,
    pub kind: AuditKind,
    pub action: String,
    pub sandbox_id: Option<String>,
    pub agent: Option<String>,
    pub detail: serde_json::Value,
}

/// Filters for [`AuditStore::query`]. All filters are ANDed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only rows of this sandbox.
    pub sandbox_id: Option<String>,
    /// `None`: every row (admin). `Some(list)`: only rows whose agent is in `list`; rows with no
    /// agent are excluded, and an empty list matches nothing.
    pub agents: Option<Vec<String>>,
    /// Only these kinds; empty means all kinds.
    pub kinds: Vec<AuditKind>,
    /// Only rows with `ts_ms >= since_ms`.
    pub since_ms: Option<i64>,
    /// The newest `limit` matching rows, returned oldest-first. 0 returns nothing.
    pub limit: usize,
}

impl AuditQuery {
    /// Limit used by [`AuditQuery::default`].
    pub const DEFAULT_LIMIT: usize = 100;
}

impl Default for AuditQuery {
    /// All rows visible to an admin, newest [`AuditQuery::DEFAULT_LIMIT`].
    fn default() -> Self {
        AuditQuery {
            sandbox_id: None,
            agents: None,
            kinds: Vec::new(),
            since_ms: None,
            limit: Self::DEFAULT_LIMIT,
        }
    }
}

/// Failures of the audit store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("cannot create audit db file {}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open audit db {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("audit db {} stays in journal mode {mode:?}, wal is required", .path.display())]
    NotWal { path: PathBuf, mode: String },
    #[error("cannot migrate audit db {} from schema version {from}", .path.display())]
    Migrate {
        path: PathBuf,
        from: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "audit db {} has schema version {found}, newer than supported version {supported}",
        .path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("cannot start audit writer thread")]
    Spawn(#[source] std::io::Error),
    #[error("audit query on {} failed", .path.display())]
    Query {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("audit row {id} is malformed: {reason}")]
    BadRow { id: i64, reason: String },
    #[error(
        "unknown audit kind {value:?} (valid kinds: sandbox, exec, fs, denial, limit, jail, auth)"
    )]
    UnknownKind { value: String },
    #[error(
        "invalid since value {value:?}: {reason} \
         (expected a duration like 30s, 10m, 2h, 1d, 250ms or a UTC time like 2026-11-23T10:00:00Z)"
    )]
    BadSince { value: String, reason: &'static str },
}

/// Current unix time in milliseconds (0 if the clock is before 1970).
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Parses a `--since` value into unix milliseconds.
///
/// Accepts a duration back from `now_ms` (`250ms`, `30s`, `10m`, `2h`, `1d`) or an
/// RFC 3339 time: `2026-11-23T10:00:00Z`, with optional fraction (`.123`), `z`, a space
/// instead of `T`, or a numeric offset (`+02:00`). A bare date (`2026-11-23`) means midnight UTC.
pub fn parse_since(s: &str, now_ms: i64) -> Result<i64, AuditError> {
    let bad = |reason: &'static str| AuditError::BadSince {
        value: s.to_owned(),
        reason,
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad("must start with a number"));
    }
    if t[digits..].starts_with('-') {
        return parse_rfc3339_ms(t).map_err(bad);
    }
    // The CLI's and the API's one duration grammar.
    let back =
        crate::util::parse_duration(t).map_err(|_| bad("unknown unit (use ms, s, m, h, d)"))?;
    i64::try_from(back.as_millis())
        .ok()
        .and_then(|d| now_ms.checked_sub(d))
        .ok_or_else(|| bad("duration too large"))
}

/// `YYYY-MM-DD[(T|t| )HH:MM:SS[.fff…](Z|z|±HH:MM)]` to unix ms.
fn parse_rfc3339_ms(t: &str) -> Result<i64, &'static str> {
    fn num(b: &[u8], at: usize, len: usize) -> Result<i64, &'static str> {
        let part = b.get(at..at + len).ok_or("truncated time")?;
        part.iter().try_fold(0i64, |acc, c| {
            if c.is_ascii_digit() {
                Ok(acc * 10 + i64::from(c - b'0'))
            } else {
                Err("malformed time, expected digits")
            }
        })
    }
    fn sep(b: &[u8], at: usize, want: &[u8]) -> Result<(), &'static str> {
        match b.get(at) {
            Some(c) if want.contains(c) => Ok(()),
            _ => Err("malformed time separator"),
        }
    }

    let b = t.as_bytes();
    let year = num(b, 0, 4)?;
    sep(b, 4, b"-")?;
    let month = num(b, 5, 2)?;
    sep(b, 7, b"-")?;
    let day = num(b, 8, 2)?;
    if !(1..=12).contains(&month) {
        return Err("month out of range");
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err("day out of range");
    }
    let date_ms = days_from_civil(year, month, day) * 86_400_000;
    if b.len() == 10 {
        return Ok(date_ms);
    }
    sep(b, 10, b"Tt ")?;
    let hour = num(b, 11, 2)?;
    sep(b, 13, b":")?;
    let minute = num(b, 14, 2)?;
    sep(b, 16, b":")?;
    let second = num(b, 17, 2)?;
    if hour > 23 || minute > 59 || second > 60 {
        return Err("time of day out of range");
    }
    let second = second.min(59); // leap second
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        match i - start {
            0 => return Err("empty fraction of a second"),
            1 => millis *= 100,
            2 => millis *= 10,
            _ => {}
        }
    }
    let offset_ms = match b.get(i) {
        Some(b'Z' | b'z') if b.len() == i + 1 => 0,
        Some(c @ (b'+' | b'-')) if b.len() == i + 6 => {
            let oh = num(b, i + 1, 2)?;
            sep(b, i + 3, b":")?;
            let om = num(b, i + 4, 2)?;
            if oh > 23 || om > 59 {
                return Err("timezone offset out of range");
            }
            let off = (oh * 60 + om) * 60_000;
            if *c == b'+' { off } else { -off }
        }
        None => return Err("missing timezone (append Z for UTC)"),
        _ => return Err("malformed timezone"),
    };
    Ok(date_ms + ((hour * 60 + minute) * 60 + second) * 1_000 + millis - offset_ms)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// State shared by the store handles and the writer thread.
#[derive(Debug, Default)]
struct Shared {
    /// Records not stored since the last `audit_dropped` row (queue full or batch failed).
    dropped: AtomicU64,
    /// Records never stored, since start (for metrics).
    dropped_total: AtomicU64,
    /// Records queued and not yet committed (for metrics).
    queued: AtomicU64,
}

struct Inner {
    path: PathBuf,
    capacity: usize,
    /// Lifecycle events for live subscribers (see [`AuditStore::subscribe`]).
    events: tokio::sync::broadcast::Sender<Arc<LiveEvent>>,
    tx: mpsc::SyncSender<writer::Msg>,
    shared: Arc<Shared>,
    reader: Mutex<rusqlite::Connection>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last handle: everything queued is ahead of this marker, so the writer commits it
        // (plus any audit_dropped row) and exits.
        let _ = self.tx.send(writer::Msg::Shutdown);
        if let Some(handle) = self.writer.take()
            && handle.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "audit writer thread panicked");
        }
    }
}

/// Handle to an audit database. Cheap to clone; all clones share one writer thread, which is
/// flushed and joined when the last clone drops.
#[derive(Clone)]
pub struct AuditStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for AuditStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditStore")
            .field("path", &self.inner.path)
            .field("capacity", &self.inner.capacity)
            .field(
                "dropped",
                &self.inner.shared.dropped.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl AuditStore {
    /// Opens (creating with mode 0600 if missing) the database at `path`, applies schema
    /// migrations and starts the writer thread. The parent directory must exist.
    pub fn open(path: &Path) -> Result<AuditStore, AuditError> {
        Self::open_with_capacity(path, QUEUE_CAPACITY)
    }

    /// [`AuditStore::open`] with a custom queue capacity (at least 1).
    pub(crate) fn open_with_capacity(
        path: &Path,
        capacity: usize,
    ) -> Result<AuditStore, AuditError> {
        let capacity = capacity.max(1);
        writer::create_file(path)?;
        let write_conn = writer::open_write_connection(path)?;
        let reader = query::open_read_connection(path)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(capacity);
        let handle = {
            let shared = Arc::clone(&shared);
            let path = path.to_owned();
            std::thread::Builder::new()
                .name("airlock-audit".into())
                .spawn(move || writer::run(write_conn, rx, &shared, &path))
                .map_err(AuditError::Spawn)?
        };
        Ok(AuditStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                capacity,
                events: tokio::sync::broadcast::channel(LIVE_EVENTS).0,
                tx,
                shared,
                reader: Mutex::new(reader),
                writer: Some(handle),
            }),
        })
    }

    /// Records `ev` about `sandbox_id` of `agent` (see
    /// [`AuditEvent::into_record`]), as [`AuditStore::record`] does.
    pub fn event(&self, sandbox_id: Option<&str>, agent: Option<&str>, ev: AuditEvent) {
        self.record(ev.into_record(sandbox_id, agent));
    }

    /// Queues `rec`, stamped with the current time. Never blocks on disk and never panics;
    /// if the queue is full the record is counted and reported later as an
    /// `audit_dropped` row. Lifecycle records (sandbox, exec, limit) also
    /// go to live subscribers.
    pub fn record(&self, rec: AuditRecord) {
        let ts_ms = now_unix_ms();
        if matches!(
            rec.kind,
            AuditKind::Sandbox | AuditKind::Exec | AuditKind::Limit | AuditKind::Fs
        ) {
            self.publish_at(ts_ms, &rec);
        }
        let msg = writer::Msg::Record { ts_ms, rec };
        let shared = &self.inner.shared;
        if self.inner.tx.try_send(msg).is_err() {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            shared.dropped_total.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.queued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends `rec` to live subscribers only (an event not worth a row,
    /// such as a command starting).
    pub fn publish(&self, rec: &AuditRecord) {
        self.publish_at(now_unix_ms(), rec);
    }

    fn publish_at(&self, ts_ms: i64, rec: &AuditRecord) {
        if self.inner.events.receiver_count() > 0 {
            let _ = self.inner.events.send(Arc::new(LiveEvent {
                ts_ms,
                kind: rec.kind.as_str().to_string(),
                action: rec.action.clone(),
                sandbox_id: rec.sandbox_id.clone(),
                agent: rec.agent.clone(),
                detail: rec.detail.clone(),
            }));
        }
    }

    /// Lifecycle events from now on (created, exec started and ended,
    /// limits hit, destroyed), and file changes (for watches). A subscriber that falls more than
    /// [`LIVE_EVENTS`] behind is told how many it missed.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<LiveEvent>> {
        self.inner.events.subscribe()
    }

    /// Records queued and not yet committed, and records never stored
    /// since start.
    pub fn queue_stats(&self) -> (u64, u64) {
        let s = &self.inner.shared;
        (
            s.queued.load(Ordering::Relaxed),
            s.dropped_total.load(Ordering::Relaxed),
        )
    }

    /// Blocks until everything recorded before this call is committed (or given up on).
    pub fn flush(&self) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if self.inner.tx.send(writer::Msg::Flush(ack_tx)).is_ok() {
            // Err means the writer is gone; nothing more can be committed anyway.
            let _ = ack_rx.recv();
        }
    }

    /// Runs `q` on the read connection. Does not flush; call [`AuditStore::flush`] first to
    /// see rows recorded by this process a moment ago.
    pub fn query(&self, q: &AuditQuery) -> Result<Vec<AuditRow>, AuditError> {
        let conn = self
            .inner
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        query::run(&conn, q, &self.inner.path)
    }

    /// The database file path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Live events a subscriber may fall behind by before it is told it
/// missed some.
pub const LIVE_EVENTS: usize = 1024;

/// A lifecycle event as live subscribers see it (`GET /v1/events`): the
/// fields of an audit row, without its id (it may never be stored).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LiveEvent {
    /// Unix ms.
    pub ts_ms: i64,
    /// `sandbox`, `exec`, `limit` or `fs`.
    pub kind: String,
    /// e.g. `create`, `start`, `exit`, `oom`, `destroy`.
    pub action: String,
    /// The sandbox, if any.
    pub sandbox_id: Option<String>,
    /// Its agent, if any.
    pub agent: Option<String>,
    /// As in the audit row.
    pub detail: serde_json::Value,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tmp_db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        (dir, path)
    }

    fn all(limit: usize) -> AuditQuery {
        AuditQuery {
            limit,
            ..AuditQuery::default()
        }
    }

    fn rec(kind: AuditKind, action: &str, sb: &str, agent: &str, n: i64) -> AuditRecord {
        AuditRecord::new(kind, action)
            .with_sandbox(sb)
            .with_agent(agent)
            .with_detail(json!({ "n": n }))
    }

    #[test]
    fn store_is_send_sync_debug() {
        fn assert_bounds<T: Send + Sync + Clone + fmt::Debug>() {}
        assert_bounds::<AuditStore>();
    }

    #[test]
    fn kind_names_roundtrip() {
        for k in AuditKind::ALL {
            assert_eq!(k.as_str().parse::<AuditKind>().unwrap(), k);
            assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
        }
        assert_eq!(" EXEC ".parse::<AuditKind>().unwrap(), AuditKind::Exec);
        let err = "network".parse::<AuditKind>().unwrap_err().to_string();
        assert!(err.contains("\"network\""), "{err}");
        assert!(
            err.contains("sandbox, exec, fs, denial, limit, jail, auth"),
            "{err}"
        );
    }

    #[test]
    fn roundtrip_and_filters() {
        let (_dir, path) = tmp_db();
        let store = AuditStore::open(&path).unwrap();
        let t0 = now_unix_ms();
        store.record(rec(AuditKind::Sandbox, "create", "sb1", "alice", 1));
        store.record(rec(AuditKind::Exec, "exit", "sb1", "alice", 2));
        store.record(rec(AuditKind::Exec, "exit", "sb2", "bob", 3));
        store.record(rec(AuditKind::Denial, "egress", "sb2", "bob", 4));
        store.record(AuditRecord::new(AuditKind::Jail, "selftest").with_detail(json!({"n": 5})));
        store.flush();

        let ns = |rows: &[AuditRow]| {
            rows.iter()
                .map(|r| r.detail["n"].as_i64().unwrap())
                .collect::<Vec<_>>()
        };

        let rows = store.query(&all(100)).unwrap();
        assert_eq!(ns(&rows), [1, 2, 3, 4, 5]);
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
        assert!(
            rows.iter()
                .all(|r| r.ts_ms >= t0 && r.ts_ms <= now_unix_ms())
        );
        assert_eq!(rows[0].kind, AuditKind::Sandbox);
        assert_eq!(rows[0].action, "create");
        assert_eq!(rows[0].sandbox_id.as_deref(), Some("sb1"));
        assert_eq!(rows[0].agent.as_deref(), Some("alice"));
        assert_eq!(rows[4].sandbox_id, None);
        assert_eq!(rows[4].agent, None);

        let q = AuditQuery {
            sandbox_id: Some("sb2".into()),
            ..all(100)
        };
        assert_eq!(ns(&store.query(&q).unwrap()), [3, 4]);

        let q = AuditQuery {
            agents: Some(vec!["alice".into()]),
            ..all(100)
        };
        assert_eq!(ns(&store.query(&q).unwrap()), [1, 2]);
        let q = AuditQuery {
            agents: Some(vec!["alice".into(), "bob".into()]),
            ..all(100)
        };
        assert_eq!(ns(&store.query(&q).unwrap()), [1, 2, 3, 4]);
        let q = AuditQuery {
            agents: Some(vec![]),
            ..all(100)
        };
        assert!(store.query(&q).unwrap().is_empty());

        let q = AuditQuery {
            kinds: vec![AuditKind::Exec, AuditKind::Jail],
            ..all(100)
        };
        assert_eq!(ns(&store.query(&q).unwrap()), [2, 3, 5]);

        let q = AuditQuery {
            since_ms: Some(t0),
            ..all(100)
        };
        assert_eq!(store.query(&q).unwrap().len(), 5);
        let q = AuditQuery {
            since_ms: Some(now_unix_ms() + 60_000),
            ..all(100)
        };
        assert!(store.query(&q).unwrap().is_empty());

        // Newest two, oldest first.
        assert_eq!(ns(&store.query(&all(2)).unwrap()), [4, 5]);
        assert!(store.query(&all(0)).unwrap().is_empty());

        // Combined filters.
        let q = AuditQuery {
            sandbox_id: Some("sb2".into()),
            agents: Some(vec!["bob".into()]),
            kinds: vec![AuditKind::Exec],
            since_ms: Some(t0),
            limit: 10,
        };
        assert_eq!(ns(&store.query(&q).unwrap()), [3]);

        // Rows serialise with lowercase kinds for the API.
        let v = serde_json::to_value(&rows[1]).unwrap();
        assert_eq!(v["kind"], "exec");
        let back: AuditRow = serde_json::from_value(v).unwrap();
        assert_eq!(back, rows[1]);
    }

    #[test]
    fn persists_across_reopen_and_sets_user_version() {
        let (_dir, path) = tmp_db();
        {
            let store = AuditStore::open(&path).unwrap();
            store.record(rec(AuditKind::Fs, "mutation", "sb", "a", 1));
            // No flush: dropping the last handle must commit.
        }
        let store = AuditStore::open(&path).unwrap();
        store.record(rec(AuditKind::Fs, "mutation", "sb", "a", 2));
        store.flush();
        let rows = store.query(&all(10)).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(store.path(), path.as_path());

        let conn = rusqlite::Connection::open(&path).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, 1);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");

        use std::os::unix::fs::PermissionsExt;
        let perm = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(perm & 0o777, 0o600);
    }

    #[test]
    fn refuses_newer_schema() {
        let (_dir, path) = tmp_db();
        drop(AuditStore::open(&path).unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 7).unwrap();
        drop(conn);
        let err = AuditStore::open(&path).unwrap_err();
        assert!(
            matches!(err, AuditError::SchemaTooNew { found: 7, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("audit.db"), "{err}");
    }

    #[test]
    fn two_stores_many_threads_lose_nothing() {
        const THREADS: usize = 3;
        const PER_THREAD: usize = 400;
        let (_dir, path) = tmp_db();
        let (a, b) = std::thread::scope(|s| {
            let ha = s.spawn(|| AuditStore::open(&path).unwrap());
            let hb = s.spawn(|| AuditStore::open(&path).unwrap());
            (ha.join().unwrap(), hb.join().unwrap())
        });
        std::thread::scope(|s| {
            for (si, store) in [&a, &b].into_iter().enumerate() {
                for t in 0..THREADS {
                    s.spawn(move || {
                        for i in 0..PER_THREAD {
                            store.record(
                                AuditRecord::new(AuditKind::Exec, "exit")
                                    .with_agent(format!("s{si}t{t}"))
                                    .with_detail(json!({ "i": i })),
                            );
                        }
                    });
                }
            }
        });
        a.flush();
        b.flush();
        let rows = a.query(&all(100_000)).unwrap();
        assert_eq!(rows.len(), 2 * THREADS * PER_THREAD);
        assert!(
            rows.iter().all(|r| r.action == "exit"),
            "no audit_dropped rows"
        );
        // Per-thread order is preserved.
        let q = AuditQuery {
            agents: Some(vec!["s1t2".into()]),
            ..all(100_000)
        };
        let is: Vec<i64> = b
            .query(&q)
            .unwrap()
            .iter()
            .map(|r| r.detail["i"].as_i64().unwrap())
            .collect();
        assert_eq!(is, (0..PER_THREAD as i64).collect::<Vec<_>>());
    }

    #[test]
    fn detail_is_queryable_with_json_extract_and_view() {
        let (_dir, path) = tmp_db();
        let store = AuditStore::open(&path).unwrap();
        store.record(
            AuditRecord::new(AuditKind::Exec, "exit")
                .with_sandbox("sb1")
                .with_agent("alice")
                .with_detail(json!({
                    "argv": ["python3", "-c", "print(1)"],
                    "cwd": "/workspace",
                    "user": "sandbox",
                    "exit_code": 3,
                    "signal": null,
                    "oom": false,
                    "duration_ms": 42,
                })),
        );
        store.record(rec(AuditKind::Limit, "oom", "sb1", "alice", 9));
        store.flush();

        let conn = rusqlite::Connection::open(&path).unwrap();
        let code: i64 = conn
            .query_row(
                "SELECT json_extract(detail, '$.exit_code') FROM events \
                 WHERE kind = 'exec' AND sandbox_id = ?1",
                ["sb1"],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(code, 3);
        let (argv, cwd, user, exit_code, signal, oom, dur): (
            String,
            String,
            String,
            i64,
            Option<i64>,
            i64,
            i64,
        ) = conn
            .query_row(
                "SELECT argv, cwd, user, exit_code, signal, oom, duration_ms FROM exec_events",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(argv, r#"["python3","-c","print(1)"]"#);
        assert_eq!((cwd.as_str(), user.as_str()), ("/workspace", "sandbox"));
        assert_eq!((exit_code, signal, oom, dur), (3, None, 0, 42));
        let n: i64 = conn
            .query_row("SELECT count(*) FROM exec_events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn overflow_records_audit_dropped_row() {
        const CAP: usize = 4;
        const BURST: usize = 100;
        let (_dir, path) = tmp_db();
        let store = AuditStore::open_with_capacity(&path, CAP).unwrap();

        // Another connection holds the write lock, so the writer stalls on its first batch
        // and the queue fills up.
        let mut blocker = rusqlite::Connection::open(&path).unwrap();
        let tx = blocker
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        store.record(rec(AuditKind::Exec, "exit", "sb", "a", 0));
        std::thread::sleep(Duration::from_millis(200));
        for i in 1..=BURST {
            store.record(rec(AuditKind::Exec, "exit", "sb", "a", i as i64));
        }
        tx.commit().unwrap();
        store.flush();

        let rows = store.query(&all(1_000)).unwrap();
        let kept = rows.iter().filter(|r| r.action == "exit").count();
        let dropped_rows: Vec<&AuditRow> = rows
            .iter()
            .filter(|r| r.action == "audit_dropped")
            .collect();
        assert_eq!(dropped_rows.len(), 1, "{rows:?}");
        let d = dropped_rows[0];
        assert_eq!(d.kind, AuditKind::Limit);
        let dropped = d.detail["dropped"].as_u64().unwrap();
        assert!(dropped > 0);
        assert_eq!(kept as u64 + dropped, BURST as u64 + 1);
        assert!(kept <= CAP + 1 + BATCH_MAX_ROWS);

        // The counter was reset: more records do not produce another audit_dropped row.
        store.record(rec(AuditKind::Exec, "exit", "sb", "a", 1_000));
        store.flush();
        let q = AuditQuery {
            kinds: vec![AuditKind::Limit],
            ..all(10)
        };
        assert_eq!(store.query(&q).unwrap().len(), 1);
    }

    #[test]
    fn parse_since_durations() {
        let now = 1_000_000_000;
        assert_eq!(parse_since("250ms", now).unwrap(), now - 250);
        assert_eq!(parse_since("30s", now).unwrap(), now - 30_000);
        assert_eq!(parse_since("10m", now).unwrap(), now - 600_000);
        assert_eq!(parse_since("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(parse_since("1d", now).unwrap(), now - 86_400_000);
        assert_eq!(parse_since(" 0s ", now).unwrap(), now);
    }

    #[test]
    fn parse_since_timestamps() {
        let now = 0;
        assert_eq!(parse_since("1970-01-01T00:00:00Z", now).unwrap(), 0);
        assert_eq!(
            parse_since("2026-11-23T10:00:00Z", now).unwrap(),
            1_795_428_000_000
        );
        assert_eq!(
            parse_since("2026-11-23t10:00:00.5z", now).unwrap(),
            1_795_428_000_500
        );
        assert_eq!(
            parse_since("2026-11-23 10:00:00.123456Z", now).unwrap(),
            1_795_428_000_123
        );
        assert_eq!(
            parse_since("2026-11-23T12:00:00+02:00", now).unwrap(),
            1_795_428_000_000
        );
        assert_eq!(
            parse_since("2026-11-23T08:30:00-01:30", now).unwrap(),
            1_795_428_000_000
        );
        assert_eq!(parse_since("2026-11-23", now).unwrap(), 1_795_392_000_000);
        assert_eq!(
            parse_since("2024-02-29T00:00:00Z", now).unwrap(),
            1_709_164_800_000
        );
        assert_eq!(
            parse_since("2000-03-01T00:00:00Z", now).unwrap(),
            951_868_800_000
        );
        assert_eq!(parse_since("1969-12-31T23:59:59Z", now).unwrap(), -1_000);
    }

    #[test]
    fn parse_since_errors() {
        // A bare number is seconds, as everywhere else.
        assert_eq!(parse_since("10", 20_000).unwrap(), 10_000);
        for bad in [
            "",
            "10x",
            "m",
            "-5m",
            "10 m",
            "99999999999999999999s",
            "9223372036854775807d",
            "2026-11-23T10:00:00",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T10:00Z",
            "2026-11-23T10:00:00.Z",
            "2026-11-23T10:00:00Zjunk",
            "2026-11-23T10:00:00+2:00",
            "2026/11/23",
        ] {
            let err = parse_since(bad, 1_000).unwrap_err();
            assert!(matches!(err, AuditError::BadSince { .. }), "{bad:?}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        }
    }
}
