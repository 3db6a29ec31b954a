#!/usr/bin/env bash
# The /v1 API with nothing but curl. Run as a user mapped to an agent (or root).
set -euo pipefail
S=${AIRLOCK_SOCKET:-/run/airlock/brokerd.sock}
api() { curl -sS --unix-socket "$S" -H 'content-type: application/json' "$@"; }

id=$(api -X POST http://airlock/v1/sandboxes \
  -d '{"limits": {"memory_bytes": 536870912, "pids": 128}, "timeout_secs": 600}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "sandbox $id"

# Output streams as NDJSON: {"type":"stdout","data":...} ... {"type":"exit",...}
api -N -X POST "http://airlock/v1/sandboxes/$id/exec" \
  -d '{"argv": ["sh", "-c", "echo hello from $(hostname); id"]}'

api "http://airlock/v1/sandboxes/$id" | python3 -m json.tool
api "http://airlock/v1/audit?sandbox=$id&kind=exec"
api -X DELETE "http://airlock/v1/sandboxes/$id"
