#!/bin/sh
# What the device proxy adds per driver call, against a SIMULATED NVIDIA
# driver (a FUSE stand-in: no GPU here), in one interleaved run: the same
# RM control made directly on the simulator and from inside a sandbox
# through its device proxy; and the validator's own cost. Then the floor
# any seccomp-notification design has on this machine (bench/notify_floor.c).
# Prints markdown tables. Run as root from the repository root.
set -eu
cd "$(dirname "$0")/.."
cargo test --release -p airlock-broker --test e2e bench_ioctl_cost -- --ignored --nocapture --test-threads=1
mkdir -p target/bench
cc -O2 -pthread -Wall -Werror -o target/bench/notify_floor bench/notify_floor.c
target/bench/notify_floor 20000
