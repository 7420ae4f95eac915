#!/usr/bin/env bash
# The main job: builds allreduce_perf and runs the nccl-tests-style sweep under mpirun.
# Usage: bench.sh [RANKS] [extra allreduce_perf flags...]   (default: 2 ranks, 8 B to 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
bash mpirun-scripts/setup.sh
ranks=${1:-2}
shift || true
cargo build --release --examples --quiet
exec timeout 1800 bash mpirun-scripts/mpirun.sh -n "$ranks" target/release/examples/allreduce_perf -b 8 -e 64M -f 2 "$@"
