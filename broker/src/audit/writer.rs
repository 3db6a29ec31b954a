//! The batched writer: file creation, schema migration and the writer thread loop.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, TransactionBehavior};

use super::{
    AuditError, AuditKind, AuditRecord, BATCH_MAX_ROWS, BATCH_WINDOW, SCHEMA_V1, SCHEMA_VERSION,
    Shared, now_unix_ms,
};

/// How long SQLite itself waits for a lock before returning `SQLITE_BUSY`.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra attempts after `SQLITE_BUSY`, on top of `BUSY_TIMEOUT` each.
const BUSY_RETRIES: u32 = 12;

/// What the store handles send to the writer thread.
pub(super) enum Msg {
    Record {
        ts_ms: i64,
        rec: AuditRecord,
    },
    /// Commit everything before this, then answer.
    Flush(mpsc::SyncSender<()>),
    /// Last handle dropped: commit everything before this and exit.
    Shutdown,
}

/// Creates `path` with mode 0600 if it does not exist; leaves an existing file alone.
pub(super) fn create_file(path: &Path) -> Result<(), AuditError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|source| AuditError::Create {
            path: path.to_owned(),
            source,
        })
}

pub(super) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Runs `f` again while it fails with `SQLITE_BUSY`, up to `BUSY_RETRIES` times.
pub(super) fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let mut attempt = 0;
    loop {
        match f() {
            Err(e) if is_busy(&e) && attempt < BUSY_RETRIES => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(10 << attempt.min(6)));
            }
            other => return other,
        }
    }
}

/// Opens the write connection: WAL, synchronous=NORMAL, busy timeout, schema up to date.
pub(super) fn open_write_connection(path: &Path) -> Result<Connection, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let mode: String =
        retry_busy(|| conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)))
            .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(AuditError::NotWal {
            path: path.to_owned(),
            mode,
        });
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Brings the schema to `SCHEMA_VERSION` inside one IMMEDIATE transaction, so two processes
/// opening a fresh file at once serialise here.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AuditError> {
    let current = |c: &Connection| c.pragma_query_value(None, "user_version", |r| r.get(0));
    let from: i64 = retry_busy(|| current(conn)).map_err(|source| AuditError::Open {
        path: path.to_owned(),
        source,
    })?;
    if from > SCHEMA_VERSION {
        return Err(AuditError::SchemaTooNew {
            path: path.to_owned(),
            found: from,
            supported: SCHEMA_VERSION,
        });
    }
    if from == SCHEMA_VERSION {
        return Ok(());
    }
    let result = retry_busy(|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let v: i64 = current(&tx)?;
        if v < 1 {
            tx.execute_batch(SCHEMA_V1)?;
        }
        // Future versions: `if v < 2 { tx.execute_batch(SCHEMA_V2_MIGRATION)?; }`
        if v < SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        Ok(v)
    });
    match result {
        Ok(v) if v > SCHEMA_VERSION => Err(AuditError::SchemaTooNew {
            path: path.to_owned(),
            found: v,
            supported: SCHEMA_VERSION,
        }),
        Ok(_) => Ok(()),
        Err(source) => Err(AuditError::Migrate {
            path: path.to_owned(),
            from,
            source,
        }),
    }
}

struct Row {
    ts_ms: i64,
    rec: AuditRecord,
}

/// Writer thread body. Returns after `Msg::Shutdown` or when every sender is gone.
pub(super) fn run(mut conn: Connection, rx: mpsc::Receiver<Msg>, shared: &Shared, path: &Path) {
    let mut batch: Vec<Row> = Vec::with_capacity(BATCH_MAX_ROWS);
    let mut acks: Vec<mpsc::SyncSender<()>> = Vec::new();
    loop {
        let Ok(first) = rx.recv() else {
            commit(&mut conn, &mut batch, shared, path);
            return;
        };
        let mut shutdown = false;
        let mut cut = take(first, &mut batch, &mut acks, &mut shutdown);
        let deadline = Instant::now() + BATCH_WINDOW;
        while !cut && batch.len() < BATCH_MAX_ROWS {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(msg) => cut = take(msg, &mut batch, &mut acks, &mut shutdown),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    shutdown = true;
                    break;
                }
            }
        }
        commit(&mut conn, &mut batch, shared, path);
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if shutdown {
            return;
        }
    }
}

/// Adds `msg` to the batch; true when the batch must be committed now.
fn take(
    msg: Msg,
    batch: &mut Vec<Row>,
    acks: &mut Vec<mpsc::SyncSender<()>>,
    shutdown: &mut bool,
) -> bool {
    match msg {
        Msg::Record { ts_ms, rec } => {
            batch.push(Row { ts_ms, rec });
            false
        }
        Msg::Flush(ack) => {
            acks.push(ack);
            true
        }
        Msg::Shutdown => {
            *shutdown = true;
            true
        }
    }
}

/// Commits `batch` (plus an `audit_dropped` row if records were dropped) in one transaction.
/// On failure the rows are added to the dropped count, so a later batch reports them.
fn commit(conn: &mut Connection, batch: &mut Vec<Row>, shared: &Shared, path: &Path) {
    let dropped = shared.dropped.swap(0, Ordering::Relaxed);
    if batch.is_empty() && dropped == 0 {
        return;
    }
    let dropped_ts = now_unix_ms();
    let result = retry_busy(|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO events (ts_ms, kind, action, sandbox_id, agent, detail) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for Row { ts_ms, rec } in batch.iter() {
                let detail =
                    serde_json::to_string(&rec.detail).unwrap_or_else(|_| "null".to_owned());
                stmt.execute(rusqlite::params![
                    ts_ms,
                    rec.kind.as_str(),
                    rec.action,
                    rec.sandbox_id,
                    rec.agent,
                    detail,
                ])?;
            }
            if dropped > 0 {
                let detail = serde_json::json!({ "dropped": dropped }).to_string();
                stmt.execute(rusqlite::params![
                    dropped_ts,
                    AuditKind::Limit.as_str(),
                    "audit_dropped",
                    Option::<String>::None,
                    Option::<String>::None,
                    detail,
                ])?;
            }
        }
        tx.commit()
    });
    let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
    let _ = shared
        .queued
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
            Some(q.saturating_sub(n))
        });
    if let Err(e) = result {
        let lost = n;
        shared.dropped_total.fetch_add(lost, Ordering::Relaxed);
        shared
            .dropped
            .fetch_add(lost.saturating_add(dropped), Ordering::Relaxed);
        tracing::error!(
            path = %path.display(),
            rows = batch.len(),
            error = %e,
            "audit batch not written; counted as dropped"
        );
    }
    batch.clear();
}
