#!/usr/bin/env python3
"""Network speed of a sandbox beside the usual alternatives, on this machine
only: a private "internet" namespace holds the servers, and every case's
client reaches them through its own path.

  python3 bench/net.py [--rounds 3] [--seconds 3] [--conns 500] [--pin]

Cases, interleaved in each round:
  veth    a network namespace routed to the servers over a plain veth pair
          (kernel routing, the floor)
  airlock `airlock run --net open` through brokerd (the sandbox's gateway)
  pasta   pasta --config-net (tap path: the servers are not on loopback)
  slirp   slirp4netns --configure in a fresh namespace

Measures iperf3 throughput both ways, short connections per second
(connect, send a small request, read a small response, close; one at a
time) and the median round trip of a 1-byte request/response on an open
connection. Needs root, a release build (built here), and iperf3,
slirp4netns and passt from Debian (installed when missing).
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
AIRLOCK = os.path.join(ROOT, "target/release/airlock")
BROKERD = os.path.join(ROOT, "target/release/brokerd")
UP = "al-bench-up"
VETH = "al-bench-veth"
SERVER = "203.0.113.10"

# The short-connection and round-trip client: run in each case's namespace.
CLIENT = r"""
import socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
t = time.monotonic()
for _ in range(n):
    s = socket.create_connection((host, 8080))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    while s.recv(4096):
        pass
    s.close()
cps = n / (time.monotonic() - t)
s = socket.create_connection((host, 8081))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(2000):
    a = time.monotonic_ns()
    s.sendall(b"x")
    s.recv(1)
    rtts.append(time.monotonic_ns() - a)
rtts.sort()
print(f"{cps:.1f} {rtts[len(rtts) // 2] / 1000:.1f}")
"""

# Servers in the uplink namespace: short responses on 8080, echo on 8081.
SERVERS = r"""
import socket, threading
def short():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("203.0.113.10", 8080)); s.listen(512)
    while True:
        c, _ = s.accept()
        try:
            c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass
        c.close()
def echo():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("203.0.113.10", 8081)); s.listen(16)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        def serve(c=c):
            while True:
                d = c.recv(64)
                if not d:
                    break
                c.sendall(d)
            c.close()
        threading.Thread(target=serve, daemon=True).start()
threading.Thread(target=short, daemon=True).start()
print("ready", flush=True)
echo()
"""


def sh(cmd, check=True, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=check, **kw)


def need(tool, pkg):
    if shutil.which(tool):
        return
    sh(f"apt-get install -y --no-install-recommends {pkg} >/dev/null 2>&1 || "
       f"(apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends {pkg} >/dev/null 2>&1)",
       check=False)
    if not shutil.which(tool):
        sys.exit(f"{tool} is needed (apt-get install {pkg})")


def setup():
    teardown()
    sh(f"ip netns add {UP} && ip -n {UP} link set lo up && ip -n {UP} addr add {SERVER}/32 dev lo")
    # A routable interface for pasta and slirp4netns to copy from.
    # (a veth pair inside it: this kernel may lack the dummy driver)
    sh(f"ip -n {UP} link add up0 type veth peer name up1 && ip -n {UP} addr add 198.51.100.2/24 dev up0 "
       f"&& ip -n {UP} addr add 198.51.100.1/24 dev up1 "
       f"&& ip -n {UP} link set up0 up && ip -n {UP} link set up1 up "
       f"&& ip -n {UP} route add default via 198.51.100.1 dev up0")
    # The veth baseline: a namespace routed to the servers.
    sh(f"ip netns add {VETH} && ip -n {VETH} link set lo up")
    sh(f"ip link add alb0 mtu 65520 type veth peer name alb1 mtu 65520")
    sh(f"ip link set alb0 netns {UP} && ip link set alb1 netns {VETH}")
    sh(f"ip -n {UP} addr add 10.99.0.1/30 dev alb0 && ip -n {UP} link set alb0 up")
    sh(f"ip -n {VETH} addr add 10.99.0.2/30 dev alb1 && ip -n {VETH} link set alb1 up "
       f"&& ip -n {VETH} route add default via 10.99.0.1")
    sh(f"ip netns exec {UP} iperf3 -s -D -B {SERVER}")
    p = subprocess.Popen(["ip", "netns", "exec", UP, "python3", "-c", SERVERS],
                         stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    return p


def teardown():
    sh(f"ip netns pids {UP} 2>/dev/null | xargs -r kill 2>/dev/null", check=False)
    for ns in (UP, VETH):
        sh(f"ip netns del {ns} 2>/dev/null", check=False)


def case_prefix(name, sock):
    """argv prefix that runs a command in the case's network."""
    if name == "veth":
        return ["ip", "netns", "exec", VETH]
    if name == "airlock":
        return [AIRLOCK, "--socket", sock, "run", "--net", "open", "--"]
    if name == "pasta":
        # --runas 0: as root, pasta would switch to nobody, who cannot
        # open this machine's /dev/net/tun (0600).
        return ["ip", "netns", "exec", UP, "pasta", "--quiet", "--runas", "0", "--config-net",
                "--mtu", "65520", "--"]
    if name == "slirp":
        return ["ip", "netns", "exec", UP, "sh", os.path.join(TMP, "slirp.sh")]
    raise ValueError(name)


def run_case(args, timeout):
    """Runs a case's command in a session of its own; kills the whole
    session if it outlives `timeout` (a stuck helper must not hang the run)."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            print(f"{args[0]}... exited {p.returncode}: {err.strip()[-300:]}", file=sys.stderr)
        return out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.communicate()
        return ""


def iperf(prefix, seconds, reverse):
    args = prefix + ["iperf3", "-c", SERVER, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
    out = run_case(args, seconds + 30)
    try:
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        return float("nan")


def short(prefix, n):
    out = run_case(prefix + ["python3", "-c", CLIENT, SERVER, str(n)], 120).split()
    try:
        return float(out[0]), float(out[1])
    except (IndexError, ValueError):
        return float("nan"), float("nan")


def main():
    global TMP
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--pin", action="store_true", help="run everything on CPU 0")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    if a.pin:
        os.sched_setaffinity(0, {0})
    for tool, pkg in (("iperf3", "iperf3"), ("slirp4netns", "slirp4netns"), ("pasta", "passt"), ("ip", "iproute2")):
        need(tool, pkg)
    sh(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
    TMP = tempfile.mkdtemp(prefix="airlock-netbench-")
    # Sandboxes' ids must be able to traverse to their mountpoints.
    os.chmod(TMP, 0o711)
    # slirp4netns needs a namespace with a process in it to attach to.
    with open(os.path.join(TMP, "slirp.sh"), "w") as f:
        f.write('unshare -n sleep 600 & pid=$!; sleep 0.2\n'
                'slirp4netns --configure --mtu=65520 $pid tap0 >/dev/null 2>&1 & sp=$!; sleep 0.5\n'
                'nsenter -t $pid -n "$@"; rc=$?\nkill $sp $pid; exit $rc\n')
    servers = setup()
    sock = os.path.join(TMP, "brokerd.sock")
    cfg = os.path.join(TMP, "brokerd.toml")
    with open(cfg, "w") as f:
        f.write(f'socket = "{sock}"\nstate_dir = "{TMP}/state"\nid_range_start = {0x5000_0000}\n'
                f'[net]\nuplink_netns = "/run/netns/{UP}"\ndns_upstream = "{SERVER}"\n')
    brokerd = subprocess.Popen([BROKERD, "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    cases = ["veth", "airlock", "pasta", "slirp"]
    res = {c: {"up": [], "down": [], "cps": [], "rtt": []} for c in cases}
    try:
        for _ in range(a.rounds):
            for c in cases:
                p = case_prefix(c, sock)
                res[c]["up"].append(iperf(p, a.seconds, False))
                res[c]["down"].append(iperf(p, a.seconds, True))
                cps, rtt = short(p, a.conns)
                res[c]["cps"].append(cps)
                res[c]["rtt"].append(rtt)
    finally:
        brokerd.terminate()
        brokerd.wait()
        servers.kill()
        teardown()
        shutil.rmtree(TMP, ignore_errors=True)
    med = {c: {k: statistics.median(v) for k, v in r.items()} for c, r in res.items()}
    print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs, kernel "
          f"{platform.release()}, {a.rounds} interleaved rounds, {'pinned to CPU 0' if a.pin else 'unpinned'}")
    print("| case | up Gbit/s | down Gbit/s | conn/s | RTT µs | up / pasta | down / pasta | conn/s / pasta | RTT - veth µs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    pa, ve = med["pasta"], med["veth"]
    for c in cases:
        m = med[c]
        print(f"| {c} | {m['up']:.2f} | {m['down']:.2f} | {m['cps']:.0f} | {m['rtt']:.1f} | "
              f"{m['up'] / pa['up']:.2f}x | {m['down'] / pa['down']:.2f}x | {m['cps'] / pa['cps']:.2f}x | "
              f"{m['rtt'] - ve['rtt']:+.1f} |")


if __name__ == "__main__":
    main()
