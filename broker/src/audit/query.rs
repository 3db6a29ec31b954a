//! Read side: a `query_only` connection and parameterised filters over `events`.

use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::Value;

use super::writer::{BUSY_TIMEOUT, retry_busy};
use super::{AuditError, AuditKind, AuditQuery, AuditRow};

/// Opens the read connection. The writer connection has already created the schema.
pub(super) fn open_read_connection(path: &Path) -> Result<Connection, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    conn.pragma_update(None, "query_only", true)
        .map_err(open_err)?;
    Ok(conn)
}

/// Builds the SQL text and its parameters for `q`; `None` when `q` can match nothing.
/// Only fixed fragments and `?` placeholders go into the text.
fn build(q: &AuditQuery) -> Option<(String, Vec<Value>)> {
    if q.limit == 0 {
        return None;
    }
    let mut sql = String::from(
        "SELECT id, ts_ms, kind, action, sandbox_id, agent, detail FROM events WHERE 1 = 1",
    );
    let mut params: Vec<Value> = Vec::new();
    if let Some(sandbox_id) = &q.sandbox_id {
        sql.push_str(" AND sandbox_id = ?");
        params.push(Value::Text(sandbox_id.clone()));
    }
    if let Some(agents) = &q.agents {
        if agents.is_empty() {
            return None;
        }
        sql.push_str(" AND agent IN (");
        sql.push_str(&placeholders(agents.len()));
        sql.push(')');
        params.extend(agents.iter().cloned().map(Value::Text));
    }
    if !q.kinds.is_empty() {
        let mut kinds = q.kinds.clone();
        kinds.sort_unstable();
        kinds.dedup();
        sql.push_str(" AND kind IN (");
        sql.push_str(&placeholders(kinds.len()));
        sql.push(')');
        params.extend(kinds.iter().map(|k| Value::Text(k.as_str().to_owned())));
    }
    if let Some(since) = q.since_ms {
        sql.push_str(" AND ts_ms >= ?");
        params.push(Value::Integer(since));
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?");
    params.push(Value::Integer(i64::try_from(q.limit).unwrap_or(i64::MAX)));
    Some((sql, params))
}

fn placeholders(n: usize) -> String {
    let mut s = "?,".repeat(n);
    s.pop();
    s
}

type RawRow = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
);

/// Runs `q`: the newest `q.limit` matching rows, oldest first.
pub(super) fn run(
    conn: &Connection,
    q: &AuditQuery,
    path: &Path,
) -> Result<Vec<AuditRow>, AuditError> {
    let Some((sql, params)) = build(q) else {
        return Ok(Vec::new());
    };
    let raw = retry_busy(|| {
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?;
        rows.collect::<rusqlite::Result<Vec<RawRow>>>()
    })
    .map_err(|source| AuditError::Query {
        path: path.to_owned(),
        source,
    })?;
    raw.into_iter()
        .rev()
        .map(|(id, ts_ms, kind, action, sandbox_id, agent, detail)| {
            let kind: AuditKind = kind.parse().map_err(|_| AuditError::BadRow {
                id,
                reason: format!("unknown kind {kind:?}"),
            })?;
            let detail = serde_json::from_str(&detail).map_err(|e| AuditError::BadRow {
                id,
                reason: format!("detail is not JSON: {e}"),
            })?;
            Ok(AuditRow {
                id,
                ts_ms,
                kind,
                action,
                sandbox_id,
                agent,
                detail,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_uses_only_placeholders() {
        let q = AuditQuery {
            sandbox_id: Some("sb'; DROP TABLE events; --".into()),
            agents: Some(vec!["a".into(), "b".into()]),
            kinds: vec![AuditKind::Exec, AuditKind::Exec, AuditKind::Fs],
            since_ms: Some(5),
            limit: 3,
        };
        let Some((sql, params)) = build(&q) else {
            panic!("query unexpectedly empty");
        };
        assert!(!sql.contains("DROP"));
        assert!(sql.contains("agent IN (?,?)"));
        assert!(sql.contains("kind IN (?,?)"));
        assert_eq!(params.len(), 1 + 2 + 2 + 1 + 1);
    }

    #[test]
    fn build_empty_cases() {
        let zero = AuditQuery {
            limit: 0,
            ..AuditQuery::default()
        };
        assert!(build(&zero).is_none());
        let nobody = AuditQuery {
            agents: Some(Vec::new()),
            ..AuditQuery::default()
        };
        assert!(build(&nobody).is_none());
    }
}
