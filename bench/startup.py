#!/usr/bin/env python3
"""Start-up latency of airlock beside bubblewrap and a plain fork+exec.

Measured interleaved in one run (these machines drift 2-10x within minutes),
reported as p50/p99 and as ratios to the native run and to bwrap.

  python3 bench/startup.py [--iterations 200] [--pin]

Needs root, a release build (it runs `cargo build --release` itself) and
bubblewrap (installed from Debian when missing).
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


def pct(xs, p):
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def ensure_bwrap():
    if shutil.which("bwrap"):
        return
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "bubblewrap"], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--pin", action="store_true", help="pin everything to CPU 0 (taskset)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the broker maps uid ranges, creates cgroups and mounts FUSE")
    ensure_bwrap()
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    if args.pin:
        os.sched_setaffinity(0, {0})

    tmp = tempfile.mkdtemp(prefix="airlock-bench-")
    os.chmod(tmp, 0o711)
    sock = os.path.join(tmp, "brokerd.sock")
    cfg = os.path.join(tmp, "brokerd.toml")
    with open(cfg, "w") as f:
        f.write(f'socket = "{sock}"\nstate_dir = "{tmp}/state"\nid_range_start = 1879048192\n')
    # A second broker whose pre-started sandboxes are not warmed, for the
    # A/B of pool_warm.
    cold_sock = os.path.join(tmp, "cold.sock")
    cold_cfg = os.path.join(tmp, "cold.toml")
    with open(cold_cfg, "w") as f:
        f.write(f'socket = "{cold_sock}"\nstate_dir = "{tmp}/cold-state"\n'
                f'id_range_start = 1946157056\npool_warm = []\n')
    brokerd = subprocess.Popen([BROKERD, "--config", cfg], env={"AIRLOCK_LOG": "warn"})
    cold = subprocess.Popen([BROKERD, "--config", cold_cfg], env={"AIRLOCK_LOG": "warn"})
    for _ in range(400):
        if os.path.exists(sock) and os.path.exists(cold_sock):
            break
        time.sleep(0.02)

    bwrap = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
             "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
             "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
             "/bin/true"]
    devnull = subprocess.DEVNULL

    def run(cmd):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=devnull, stderr=devnull, check=True)
        return time.perf_counter() - t

    def create_then_first_exec(argv=("/bin/true",), at=sock):
        t = time.perf_counter()
        sb = json.loads(api(at, "POST", "/v1/sandboxes", {}))
        out = api(at, "POST", f"/v1/sandboxes/{sb['id']}/exec", {"argv": list(argv)})
        dt = time.perf_counter() - t
        assert b'"code":0' in out, out
        api(at, "DELETE", f"/v1/sandboxes/{sb['id']}")
        return dt

    py = ["/usr/bin/python3", "-c", "import json, subprocess, asyncio, email"]

    cases = {
        "native fork+exec /bin/true": lambda: run(["/bin/true"]),
        "bwrap --unshare-all /bin/true": lambda: run(bwrap),
        "airlock run (embedded)": lambda: run([AIRLOCK, "--config", cfg, "--embedded", "run", "--", "/bin/true"]),
        "airlock run (brokerd)": lambda: run([AIRLOCK, "--socket", sock, "run", "--", "/bin/true"]),
        "API create + first exec (brokerd)": create_then_first_exec,
        "bwrap --unshare-all python3 import": lambda: run(bwrap[:-1] + py),
        "API create + first python3 import (warmed pool)": lambda: create_then_first_exec(py),
        "API create + first python3 import (pool not warmed)":
            lambda: create_then_first_exec(py, cold_sock),
    }
    samples = {k: [] for k in cases}
    try:
        for name, f in cases.items():  # warm-up
            for _ in range(3):
                f()
        for _ in range(args.iterations):
            for name, f in cases.items():
                samples[name].append(f())
    finally:
        for b in (brokerd, cold):
            b.terminate()
            b.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    native = statistics.median(samples["native fork+exec /bin/true"])
    bw = statistics.median(samples["bwrap --unshare-all /bin/true"])
    print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"{args.iterations} interleaved iterations{', pinned to CPU 0' if args.pin else ''}")
    print("| case | p50 ms | p99 ms | p50 / native | p50 / bwrap |")
    print("|---|---:|---:|---:|---:|")
    for name, xs in samples.items():
        p50, p99 = pct(xs, 50), pct(xs, 99)
        print(f"| {name} | {p50*1e3:.2f} | {p99*1e3:.2f} | {p50/native:.1f}x | {p50/bw:.2f}x |")


if __name__ == "__main__":
    main()
