#!/usr/bin/env bash
# pjdfstest, the POSIX filesystem suite, as sandbox root inside a sandbox:
# in /workspace and on the copy-on-write root.
#
#   scripts/pjdfstest.sh [--subset] [--where workspace|root|both]
#
# Builds pjdfstest from ../shared/third_party (or $PJDFSTEST_TARBALL) into
# target/pjdfstest (never into the source tree), installing its Debian
# build dependencies when missing, then runs `prove` over its tests inside
# `airlock run --user root` (embedded broker). --subset runs the
# directories CI runs. Prints, per place, `WHERE: N passed, M failed` and
# the failing test files with their subtests, then `unexpected: ...` for
# failures not listed in scripts/pjdfstest-exceptions.txt (exit 1 if any).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SUBSET=0
WHERE=both
while [ $# -gt 0 ]; do
    case "$1" in
        --subset) SUBSET=1 ;;
        --where) WHERE=$2; shift ;;
        *) echo "usage: $0 [--subset] [--where workspace|root|both]" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || { echo "pjdfstest: needs root" >&2; exit 2; }

TARBALL=${PJDFSTEST_TARBALL:-}
for t in "$ROOT/../shared/third_party" /work/shared/third_party; do
    [ -n "$TARBALL" ] || [ ! -f "$t/pjdfstest-85a8aea.tar.gz" ] || TARBALL=$t/pjdfstest-85a8aea.tar.gz
done
[ -f "$TARBALL" ] || { echo "pjdfstest: no source tarball at $TARBALL (set PJDFSTEST_TARBALL)" >&2; exit 2; }

need=()
for t in autoreconf:autoconf automake:automake libtoolize:libtool cc:gcc make:make prove:libtest-harness-perl; do
    command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "pjdfstest: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${need[@]}" >/dev/null 2>&1; }
fi

BUILD=$ROOT/target/pjdfstest
if [ ! -x "$BUILD/src/pjdfstest" ]; then
    rm -rf "$BUILD.tmp" && mkdir -p "$BUILD.tmp"
    tar xzf "$TARBALL" -C "$BUILD.tmp"
    src=$(find "$BUILD.tmp" -maxdepth 1 -mindepth 1 -type d | head -1)
    (cd "$src" && autoreconf -ifs >/dev/null 2>&1 && ./configure -q >/dev/null && make -s pjdfstest >/dev/null 2>&1)
    rm -rf "$BUILD" && mv "$src" "$BUILD" && rm -rf "$BUILD.tmp"
    # The tests find the binary beside tests/.
    [ -x "$BUILD/pjdfstest" ] || ln -sf src/pjdfstest "$BUILD/pjdfstest" 2>/dev/null || true
fi
[ -x "$BUILD/pjdfstest" ] || { echo "pjdfstest: build failed in $BUILD" >&2; exit 1; }

cargo build --release --quiet --bin airlock
AIRLOCK=$ROOT/target/release/airlock

if [ $SUBSET = 1 ]; then
    # What CI runs: every directory but the two largest (rename, link).
    DIRS="chmod chown mkdir mkfifo open rmdir symlink truncate unlink utimensat"
else
    DIRS=$(cd "$BUILD/tests" && ls -d */ | tr -d /)
fi

# The suite lives in a host workspace the sandbox sees at /workspace; it
# runs in a scratch directory there, or in /tmp on the copy-on-write root.
WS=$(mktemp -d /tmp/airlock-pjdfstest-XXXXXX)
trap 'rm -rf "$WS"' EXIT
cp -a "$BUILD" "$WS/pjdfstest"
chmod 0755 "$WS"

run_in() {
    local where=$1 scratch
    case "$where" in
        workspace) scratch=/workspace/scratch ;;
        root) scratch=/tmp/scratch ;;
    esac
    local tests=""
    for d in $DIRS; do tests="$tests /workspace/pjdfstest/tests/$d"; done
    "$AIRLOCK" run --user root --workspace "$WS" --timeout 3600s -- sh -c \
        "mkdir -p $scratch && cd $scratch && prove -r -j2 $tests 2>&1" > "$WS/$where.log" || true
    python3 - "$where" "$WS/$where.log" "$ROOT/scripts/pjdfstest-exceptions.txt" <<'PY'
import re, sys
where, log, exc = sys.argv[1:4]
text = open(log, errors="replace").read()

def numbers(spec):
    out = set()
    for part in re.split(r"[,\s]+", spec.strip()):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        elif part:
            out.add(int(part))
    return out

def ranges(nums):
    out, run = [], []
    for n in sorted(nums):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)

# prove's summary: "<file> (Wstat: .. Tests: N Failed: M)" then
# "  Failed tests:  1-3, 7" (continued on indented lines).
failed = {}
for m in re.finditer(r"^(\S+\.t)\s+\(Wstat: \d+ Tests: \d+ Failed: \d+\)\n\s+Failed tests?:\s+((?:[\d, \-]+\n?(?:\s{2,}(?=\d))?)+)", text, re.M):
    failed[m.group(1).split("/tests/", 1)[-1]] = numbers(m.group(2))
total = re.search(r"^Files=\d+, Tests=(\d+)", text, re.M)
if not total:
    print(f"{where}: prove did not finish; its output:\n{text[-3000:]}")
    sys.exit(1)
nfail = sum(len(v) for v in failed.values())
print(f"{where}: {int(total.group(1)) - nfail} passed, {nfail} failed")

# Exceptions: "WHERE FILE [SUBTESTS]  # reason"; WHERE is workspace, root
# or both; no SUBTESTS: the whole file.
allowed = {}
for raw in open(exc):
    f = raw.split("#", 1)[0].split()
    if len(f) < 2 or f[0] not in (where, "both"):
        continue
    if len(f) == 2:
        allowed[f[1]] = None
    elif allowed.get(f[1], set()) is not None:
        allowed.setdefault(f[1], set()).update(numbers(f[2]))
bad = []
for name, nums in sorted(failed.items()):
    print(f"  {name} {ranges(nums)}")
    ok = allowed.get(name, set())
    extra = set() if ok is None else nums - ok
    if extra:
        bad.append(f"{name} {ranges(extra)}")
print(f"{where} unexpected: {'; '.join(bad) if bad else 'none'}")
sys.exit(1 if bad else 0)
PY
}

rc=0
case "$WHERE" in
    both) run_in root || rc=1; run_in workspace || rc=1 ;;
    *) run_in "$WHERE" || rc=1 ;;
esac
exit $rc
