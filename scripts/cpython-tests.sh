#!/usr/bin/env bash
# CPython's tests of its OS-facing modules, natively and inside a sandbox,
# as the same unprivileged user (uid 1000), and the difference.
#
#   scripts/cpython-tests.sh [TEST...]
#
# Needs root (to run natively as uid 1000 and to start the sandbox) and
# CPython's test package (Debian: libpython3.X-testsuite, installed when
# missing). Prints each side's failures, then `only in the sandbox: ...`
# (exit 1 if any) and `only native: ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ "$(id -u)" = 0 ] || { echo "cpython-tests: needs root" >&2; exit 2; }
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
    TESTS=(test_os test_shutil test_tempfile test_subprocess test_signal test_posix
           test_pathlib test_mmap test_threading test_tarfile test_zipfile test_socket
           test_logging test_mailbox test_multiprocessing_forkserver test_fileio
           test_io test_glob test_stat test_fcntl test_select test_selectors)
fi
# The system's interpreter (what a sandbox's base has), not a user's.
PY=/usr/bin/python3
if ! $PY -c 'import test.test_os' 2>/dev/null; then
    v=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    echo "cpython-tests: installing libpython$v-testsuite" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "libpython$v-testsuite" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "libpython$v-testsuite" >/dev/null 2>&1; }
    $PY -c 'import test.test_os' || { echo "cpython-tests: no test package for $PY" >&2; exit 2; }
fi
cargo build --release --quiet --bin airlock
OUT=$(mktemp -d /tmp/airlock-cpython-XXXXXX)
trap 'rm -rf "$OUT"' EXIT
chmod 0755 "$OUT"
PATHS=/usr/local/bin:/usr/bin:/bin
REGRTEST=($PY -m test -j2 --timeout 600 "${TESTS[@]}")

# Native: uid 1000 in a scratch directory of its own.
mkdir -p "$OUT/native" && chown 1000:1000 "$OUT/native"
(cd "$OUT/native" && setpriv --reuid 1000 --regid 1000 --clear-groups \
    env -i PATH=$PATHS HOME="$OUT/native" LANG=C.UTF-8 "${REGRTEST[@]}") \
    > "$OUT/native.log" 2>&1 || true
# Inside: the sandbox user (uid 1000), in /tmp on the copy-on-write root.
"$ROOT/target/release/airlock" run --timeout 3600s --env PATH=$PATHS --env HOME=/tmp \
    --env LANG=C.UTF-8 --cwd /tmp -- "${REGRTEST[@]}" > "$OUT/sandbox.log" 2>&1 || true

python3 - "$OUT/native.log" "$OUT/sandbox.log" <<'PY'
import re, sys

def failed(path):
    text = open(path, errors="replace").read()
    if not re.search(r"^Total tests: |^== Tests result|^Tests result:", text, re.M):
        print(f"{path}: regrtest did not finish; its end:\n{text[-2000:]}")
        sys.exit(2)
    names = set()
    # "N tests failed:" (or "failed again", "had errors") then indented names.
    for m in re.finditer(r"^\d+ tests? (?:failed(?: again)?|altered the execution environment|had errors|skipped \(resource denied\)|failed \(env changed\)):\n((?:\s{4}.*\n)+)", text, re.M):
        head = text[m.start():m.start() + 60]
        if "failed" in head or "errors" in head:
            names.update(m.group(1).split())
    return names, text

native, _ = failed(sys.argv[1])
inside, _ = failed(sys.argv[2])
print("native failed:", " ".join(sorted(native)) or "none")
print("sandbox failed:", " ".join(sorted(inside)) or "none")
print("only in the sandbox:", " ".join(sorted(inside - native)) or "none")
print("only native:", " ".join(sorted(native - inside)) or "none")
sys.exit(1 if inside - native else 0)
PY
