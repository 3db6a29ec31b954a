-- airlock audit store, schema version 1 (PRAGMA user_version = 1).
--
-- Applied by `AuditStore::open` inside one IMMEDIATE transaction when
-- user_version is 0. Every statement is idempotent so that two processes
-- racing to create the same file end up with the same schema.
--
-- One row per audited decision. Rows are append-only: the broker never
-- updates or deletes them.

CREATE TABLE IF NOT EXISTS events (
    -- Monotonic row id; also the commit order across all writers.
    id         INTEGER PRIMARY KEY,
    -- Unix time in milliseconds, stamped when the broker recorded the event.
    ts_ms      INTEGER NOT NULL,
    -- One of: sandbox, exec, fs, denial, limit, jail, auth, net.
    kind       TEXT    NOT NULL,
    -- What happened within the kind: create, destroy, exit, mutation, oom,
    -- pids_max, selftest, refused, audit_dropped, ...
    action     TEXT    NOT NULL,
    -- Sandbox the event belongs to; NULL for broker-wide events.
    sandbox_id TEXT,
    -- Authenticated agent (API principal) that caused the event; NULL when
    -- none (broker start-up, kernel-triggered limits, refused auth).
    agent      TEXT,
    -- JSON object with kind-specific fields; query with json_extract().
    detail     TEXT    NOT NULL
);

-- "Everything about sandbox X, newest first".
CREATE INDEX IF NOT EXISTS events_sandbox_id ON events (sandbox_id, id);
-- Per-agent views (non-admin API callers only see their own rows).
CREATE INDEX IF NOT EXISTS events_agent_id ON events (agent, id);
-- "All denials", "all limit hits".
CREATE INDEX IF NOT EXISTS events_kind_id ON events (kind, id);
-- Time-range queries (--since).
CREATE INDEX IF NOT EXISTS events_ts_ms ON events (ts_ms);

-- Exec events with the common detail fields pulled out as columns, for
-- plain `sqlite3` use. argv is JSON array text; oom is 1/0/NULL.
CREATE VIEW IF NOT EXISTS exec_events AS
SELECT
    id,
    ts_ms,
    strftime('%Y-%m-%dT%H:%M:%fZ', ts_ms / 1000.0, 'unixepoch') AS ts,
    action,
    sandbox_id,
    agent,
    json_extract(detail, '$.argv')        AS argv,
    json_extract(detail, '$.cwd')         AS cwd,
    json_extract(detail, '$.user')        AS user,
    json_extract(detail, '$.exit_code')   AS exit_code,
    json_extract(detail, '$.signal')      AS signal,
    json_extract(detail, '$.oom')         AS oom,
    json_extract(detail, '$.duration_ms') AS duration_ms
FROM events
WHERE kind = 'exec';
