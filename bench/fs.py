#!/usr/bin/env python3
"""File-system speed inside a sandbox beside native ext4 and two FUSE peers.

  python3 bench/fs.py [--rounds 3] [--files 10000] [--pin]

Phases, each a fresh process in the case's view of one directory:
  create   10k small files in 100 directories
  find     find -ls over them
  read     cat every file
  untar    unpack a tarball of /usr/share/doc (a real, mixed tree)
  git      git init, add -A, commit of the untarred tree
  status   git status
  seqwrite write 256 MiB sequentially (dd, fsync at the end)
  seqread  read it back (caches dropped first)
  rm       rm -rf everything

Cases, interleaved per round (these machines drift):
  native          the directory on the host's filesystem
  bindfs          bindfs of it (FUSE, no layering)
  fuse-overlayfs  fuse-overlayfs with it as upper (FUSE, layered)
  airlock-ws      `airlock run` through brokerd, in /workspace
                  (--workspace of that directory), a fresh sandbox per phase
  airlock-exec    `airlock exec` into one long-lived sandbox, in /workspace
                  (--workspace of that directory: the caller's own)
  airlock-agent   `airlock exec` into one long-lived sandbox, in its agent's
                  own persistent /workspace (no --workspace)
  airlock-root    `airlock exec` into that sandbox, in /var/tmp on the
                  copy-on-write root

Prints min/median/max seconds per phase and case, each case's total as a
ratio to native and to fuse-overlayfs. Needs root; installs bindfs,
fuse-overlayfs and git from Debian when missing; builds the release binaries.
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
PATH = "/usr/local/bin:/usr/bin:/bin"

PHASES = ["create", "find", "read", "untar", "git", "status", "seqwrite", "seqread", "rm"]


def script(phase, d, files):
    """The shell for `phase` run in directory `d` (the case's view)."""
    g = "git -c user.name=b -c user.email=b@b -c gc.auto=0 -c core.fsmonitor=false"
    return {
        "create": f"cd {d} && python3 -c \"import os\nfor i in range({files}):\n"
                  f"    p='s/%d' % (i % 100)\n    os.makedirs(p, exist_ok=True)\n"
                  f"    open('%s/f%d' % (p, i), 'w').write('x' * 100)\"",
        "find": f"cd {d} && find s -ls > /dev/null",
        "read": f"cd {d} && find s -type f -exec cat {{}} + > /dev/null",
        "untar": f"cd {d} && mkdir -p t && tar -xf {d}/../doc.tar -C t",
        "git": f"cd {d}/t && {g} init -q && {g} add -A && {g} commit -qm b",
        "status": f"cd {d}/t && {g} status --porcelain > /dev/null",
        "seqwrite": f"cd {d} && dd if=/dev/zero of=big bs=1M count=256 conv=fsync status=none",
        "seqread": f"cd {d} && dd if=big of=/dev/null bs=1M status=none",
        "rm": f"cd {d} && rm -rf s t big",
    }[phase]


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def need(tool, pkg):
    if shutil.which(tool):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
        sh(["apt-get", "install", "-y", "-qq", pkg], env=env, stdout=subprocess.DEVNULL)


def drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--pin", action="store_true", help="run everything on CPU 0")
    ap.add_argument("--cases", default="native,bindfs,fuse-overlayfs,airlock-ws,airlock-exec,"
                    "airlock-agent,airlock-root")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    for tool, pkg in (("bindfs", "bindfs"), ("fuse-overlayfs", "fuse-overlayfs"), ("git", "git")):
        need(tool, pkg)
    sh(["cargo", "build", "--release", "--quiet", "--bins"], cwd=ROOT)
    if a.pin:
        os.sched_setaffinity(0, {0})
    cases = a.cases.split(",")

    tmp = tempfile.mkdtemp(prefix="airlock-fsbench-", dir="/var/tmp")
    os.chmod(tmp, 0o755)
    # A real, mixed tree to unpack and commit.
    sh(f"tar -cf {tmp}/doc.tar -C /usr/share doc 2>/dev/null || true")
    sock = os.path.join(tmp, "brokerd.sock")
    cfg = os.path.join(tmp, "brokerd.toml")
    with open(cfg, "w") as f:
        f.write(f'socket = "{sock}"\nstate_dir = "{tmp}/state"\nid_range_start = 1879048192\n'
                f'pool_size = 1\n[limits]\nmemory_bytes = 4294967296\npids = 4096\ncpu_millis = 2000\n')
    brokerd = subprocess.Popen([BROKERD, "--config", cfg], env={"AIRLOCK_LOG": "warn"})
    for _ in range(500):
        if os.path.exists(sock):
            break
        time.sleep(0.02)
    mounts = []
    dirs = {}
    for c in cases:
        d = os.path.join(tmp, c)
        os.makedirs(os.path.join(d, "work"))
        os.chmod(d, 0o755)
        shutil.copy(f"{tmp}/doc.tar", os.path.join(d, "doc.tar"))
        dirs[c] = d
    if "bindfs" in cases:
        d = dirs["bindfs"]
        os.makedirs(f"{d}/real")
        os.rename(f"{d}/work", f"{d}/real/work")
        os.makedirs(f"{d}/work")
        sh(["bindfs", "--no-allow-other", f"{d}/real/work", f"{d}/work"])
        mounts.append(f"{d}/work")
    if "fuse-overlayfs" in cases:
        d = dirs["fuse-overlayfs"]
        for s in ("lower", "upper", "wd"):
            os.makedirs(f"{d}/{s}")
        sh(["fuse-overlayfs", "-o", f"lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/wd",
            f"{d}/work"])
        mounts.append(f"{d}/work")
    sandbox = None
    if "airlock-exec" in cases or "airlock-root" in cases:
        out = subprocess.run([AIRLOCK, "--socket", sock, "--json", "create", "--workspace",
                              dirs.get("airlock-exec", tmp), "--disk", "100G",
                              "--inodes", "10000000"],
                             check=True, capture_output=True, text=True).stdout
        sandbox = json.loads(out)["id"]
    agent_sandbox = None
    if "airlock-agent" in cases:
        out = subprocess.run([AIRLOCK, "--socket", sock, "--json", "create", "--agent", "fsbench",
                              "--disk", "100G", "--inodes", "10000000"],
                             check=True, capture_output=True, text=True).stdout
        agent_sandbox = json.loads(out)["id"]
        sh([AIRLOCK, "--socket", sock, "exec", agent_sandbox, "--", "mkdir", "-p",
            "/workspace/work"], stdout=subprocess.DEVNULL)
        sh([AIRLOCK, "--socket", sock, "cp", f"{tmp}/doc.tar",
            f"{agent_sandbox}:/workspace/doc.tar"], stdout=subprocess.DEVNULL)

    def argv(case, phase):
        files = a.files
        if case in ("native", "bindfs", "fuse-overlayfs"):
            return ["sh", "-c", script(phase, f"{dirs[case]}/work", files)]
        env = ["--env", f"PATH={PATH}"]
        if case == "airlock-ws":
            return [AIRLOCK, "--socket", sock, "run", "--workspace", dirs[case], "--disk", "100G",
                    "--inodes", "10000000", *env, "--", "sh", "-c",
                    script(phase, "/workspace/work", files)]
        d = "/var/tmp/work" if case == "airlock-root" else "/workspace/work"
        prep = "mkdir -p /var/tmp/work && cp -n /workspace/doc.tar /var/tmp/ 2>/dev/null; " \
            if case == "airlock-root" else ""
        target = agent_sandbox if case == "airlock-agent" else sandbox
        return [AIRLOCK, "--socket", sock, "exec", target, *env, "--", "sh", "-c",
                prep + script(phase, d, files)]

    times = {c: {p: [] for p in PHASES} for c in cases}
    try:
        for r in range(a.rounds):
            for c in cases:
                for p in PHASES:
                    if p == "seqread":
                        drop_caches()
                    t = time.perf_counter()
                    res = subprocess.run(argv(c, p), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
                    dt = time.perf_counter() - t
                    if res.returncode != 0:
                        sys.exit(f"{c} {p} failed: {res.stderr[-2000:]}")
                    times[c][p].append(dt)
            print(f"round {r + 1} done", file=sys.stderr)
    finally:
        for sb in (sandbox, agent_sandbox):
            if sb:
                subprocess.run([AIRLOCK, "--socket", sock, "rm", sb], stdout=subprocess.DEVNULL)
        for m in mounts:
            subprocess.run(["fusermount", "-u", m], stderr=subprocess.DEVNULL)
            subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
        brokerd.terminate()
        brokerd.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {c: {p: statistics.median(times[c][p]) for p in PHASES} for c in cases}
    total = {c: sum(med[c].values()) for c in cases}
    meta = [p for p in PHASES if not p.startswith("seq")]
    meta_total = {c: sum(med[c][p] for p in meta) for c in cases}
    print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs, kernel "
          f"{platform.release()}, {a.rounds} interleaved rounds, {a.files} files, "
          f"{'pinned to CPU 0' if a.pin else 'unpinned'}; seconds min/median/max")
    print("| phase | " + " | ".join(cases) + " |")
    print("|---|" + "---:|" * len(cases))
    for p in PHASES:
        cells = []
        for c in cases:
            xs = times[c][p]
            cells.append(f"{min(xs):.2f}/{statistics.median(xs):.2f}/{max(xs):.2f}")
        print(f"| {p} | " + " | ".join(cells) + " |")
    print("| metadata total (median) | " + " | ".join(f"{meta_total[c]:.2f}" for c in cases) + " |")
    if "native" in cases:
        print("| metadata / native | " + " | ".join(
            f"{meta_total[c] / meta_total['native']:.2f}x" for c in cases) + " |")
        for p in ("seqwrite", "seqread"):
            print(f"| {p} speed / native | " + " | ".join(
                f"{med['native'][p] / med[c][p]:.2f}x" for c in cases) + " |")
    if "fuse-overlayfs" in cases:
        print("| metadata / fuse-overlayfs | " + " | ".join(
            f"{meta_total[c] / meta_total['fuse-overlayfs']:.2f}x" for c in cases) + " |")
        worst = []
        for c in cases:
            slower = [p for p in PHASES if med[c][p] > med["fuse-overlayfs"][p] * 1.05]
            worst.append(",".join(slower) or "none")
        print("| phases slower than fuse-overlayfs | " + " | ".join(worst) + " |")
    print(f"| all phases total (median) | " + " | ".join(f"{total[c]:.2f}" for c in cases) + " |")


if __name__ == "__main__":
    main()
