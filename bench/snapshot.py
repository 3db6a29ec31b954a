#!/usr/bin/env python3
"""Snapshot, restore and fork times of a large workspace, beside copying it.

A sandbox's workspace is filled with FILES files holding TOTAL bytes (plus
a copy-on-write layer change), then, repeatedly: a snapshot, a few changes,
a restore to the snapshot, and a fork from it, each timed over the API
(brokerd's Unix socket, no CLI start-up). Peers, timed in the same run on
the same tree: `cp -a` (a copy, what a snapshot costs without layers) and
`cp -al` (a hard-link farm, the cheapest copy a plain filesystem gives).
Reported as min/median/max and as ratios to the peers.

  python3 bench/snapshot.py [--files 20000] [--total 1G] [--rounds 5]

Needs root and a release build (it runs `cargo build --release` itself).
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from brokerapi import api  # noqa: E402
AIRLOCK = os.path.join(ROOT, "target/release/airlock")
BROKERD = os.path.join(ROOT, "target/release/brokerd")


def timed(f):
    t = time.perf_counter()
    out = f()
    return (time.perf_counter() - t) * 1000.0, out


def size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def run(sock, sid, script):
    out = subprocess.run(
        [AIRLOCK, "--socket", sock, "exec", "--user", "root", sid, "--", "sh", "-c", script],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script}: {out.stderr}")
    return out.stdout


def stats(xs):
    return min(xs), statistics.median(xs), max(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--total", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    subprocess.run(["cargo", "build", "--release", "-q", "--bin", "airlock", "--bin", "brokerd"],
                   cwd=ROOT, check=True)
    total = size(a.total)
    per = max(1, total // a.files)
    tmp = tempfile.mkdtemp(prefix="airlock-bench-snap-")
    os.chmod(tmp, 0o711)
    sock = os.path.join(tmp, "sock")
    cfg = os.path.join(tmp, "brokerd.toml")
    with open(cfg, "w") as f:
        f.write(f'socket = "{sock}"\nsocket_mode = "0600"\nstate_dir = "{tmp}/state"\n'
                f'pool_size = 0\n[limits]\ndisk_bytes = {4 * total + (1 << 30)}\n')
    broker = subprocess.Popen([BROKERD, "--config", cfg], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={"AIRLOCK_LOG": "warn"})
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        sid = json.loads(api(sock, "POST", "/v1/sandboxes", {}))["id"]
        dirs = max(1, a.files // 100)
        t, _ = timed(lambda: run(sock, sid, (
            f"cd /workspace && for d in $(seq 1 {dirs}); do mkdir -p src/d$d; done && "
            f"python3 -c \"import os\nb=os.urandom({per})\n"
            f"for i in range({a.files}):\n"
            f"  open('src/d%d/f%d' % (i % {dirs} + 1, i), 'wb').write(b)\" && "
            "echo changed > /opt/layer-file")))
        ws = os.path.join(tmp, "state/workspaces/root")
        print(f"filled {a.files} files, {per * a.files >> 20} MiB in {t / 1000:.1f} s", file=sys.stderr)
        snap, rest, fork, cp, cpl = [], [], [], [], []
        for r in range(a.rounds):
            ms, _ = timed(lambda: api(sock, "POST", f"/v1/sandboxes/{sid}/snapshots", {"name": f"r{r}"}))
            snap.append(ms)
            run(sock, sid, f"echo round {r} > /workspace/src/d1/f0; rm -rf /workspace/src/d2; "
                           "echo more >> /opt/layer-file")
            ms, _ = timed(lambda: api(sock, "POST", f"/v1/sandboxes/{sid}/snapshots/r{r}/restore"))
            rest.append(ms)
            ms, out = timed(lambda: api(sock, "POST", "/v1/sandboxes", {"from_snapshot": f"{sid}:r{r}"}))
            fork.append(ms)
            api(sock, "DELETE", f"/v1/sandboxes/{json.loads(out)['id']}")
            for dst, flags, acc in ((os.path.join(tmp, "copy"), "-a", cp),
                                    (os.path.join(tmp, "links"), "-al", cpl)):
                ms, _ = timed(lambda: subprocess.run(["cp", flags, ws, dst], check=True))
                acc.append(ms)
                shutil.rmtree(dst)
        # The sandbox still shows the snapshot's files.
        n = run(sock, sid, "find /workspace/src -type f | wc -l").strip()
        assert int(n) == a.files, n
        print(f"# snapshot / restore / fork, {a.files} files, {per * a.files >> 20} MiB, "
              f"{a.rounds} rounds, {datetime.date.today()}, {platform.node()}, "
              f"{os.cpu_count()} CPUs, kernel {platform.release()}")
        print("| operation | min ms | median ms | max ms | vs cp -a | vs cp -al |")
        print("|---|---:|---:|---:|---:|---:|")
        mcp, mcpl = statistics.median(cp), statistics.median(cpl)
        for name, xs in (("snapshot", snap), ("restore", rest), ("fork (create)", fork),
                         ("cp -a (peer)", cp), ("cp -al (peer)", cpl)):
            lo, med, hi = stats(xs)
            print(f"| {name} | {lo:.1f} | {med:.1f} | {hi:.1f} | {med / mcp:.4f}x | {med / mcpl:.3f}x |")
    finally:
        broker.terminate()
        broker.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
