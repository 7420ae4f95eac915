#!/usr/bin/env bash
# The main job: builds allreduce_perf and runs the nccl-tests-style sweep under mpirun: on the
# GPU where one is visible (bf16, CUDA graphs of 10 calls, 4 KiB..8 MiB; ranks sharing a GPU go
# through MPS, started here and stopped after), else on host memory (float, 8 B..64 MiB).
# Usage: bench.sh [RANKS] [extra allreduce_perf flags...]   (default: 2 ranks)
set -euo pipefail
cd "$(dirname "$0")/.."
bash mpirun-scripts/setup.sh
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
ranks=${1:-2}
shift || true
cargo build --release --examples --quiet
perf=target/release/examples/allreduce_perf
gpus=0
command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "$gpus" -gt 0 ]; then
  fwd=()
  if [ "$ranks" -gt "$gpus" ] && command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    # Kernels of ranks sharing a GPU must run at the same time, which needs MPS.
    export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/tpcomm_mps_pipe}
    export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/tpcomm_mps_log}
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
    fwd=(-x CUDA_MPS_PIPE_DIRECTORY)
  fi
  timeout 1800 bash mpirun-scripts/mpirun.sh -n "$ranks" "${fwd[@]}" $perf -d bfloat16 -b 4K -e 8M -f 2 -G 10 "$@"
else
  timeout 1800 bash mpirun-scripts/mpirun.sh -n "$ranks" $perf --memory host -b 8 -e 64M -f 2 "$@"
fi
