#!/usr/bin/env bash
# Run the self-checking GPU test (examples/gpu_check.rs) for several rank counts on one GPU.
#
# All ranks share the GPU, talking through CUDA IPC as they would across GPUs; that needs MPS
# (without it the kernels of different processes are time-sliced and a kernel spinning on a
# peer never sees it arrive). The script starts MPS, runs each rank count under `timeout`,
# stops MPS, and writes one log per rank count (plus a summary) into $OUT when set, else into
# ./gpu-test-logs.
#
# Usage: mpirun-scripts/gpu_tests.sh [extra gpu_check arguments, e.g. --bench or --quick]
# Environment:
#   GPU_CHECK_BIN      the binary (default target/release/examples/gpu_check)
#   GPU_CHECK_RANKS    rank counts (default "1 2 3 4 5 8")
#   GPU_CHECK_TIMEOUT  seconds per rank count (default 300)
#   GPU_CHECK_REPLAYS  graph replays of the long replay check (default 10000)
#   TPCOMM_*           passed to every rank (defaults below)
set -u

BIN=${GPU_CHECK_BIN:-target/release/examples/gpu_check}
RANKS=${GPU_CHECK_RANKS:-"1 2 3 4 5 8"}
PER_RUN=${GPU_CHECK_TIMEOUT:-300}
LOGDIR=${OUT:-./gpu-test-logs}
mkdir -p "$LOGDIR"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps_pipe}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mps_log}
export TPCOMM_CUSTOM_MAX_BYTES=${TPCOMM_CUSTOM_MAX_BYTES:-64M}
export TPCOMM_CACHE_DIR=${TPCOMM_CACHE_DIR:-/tmp/tpcomm-cache}
export TPCOMM_TIMEOUT_MS=${TPCOMM_TIMEOUT_MS:-60000}
export GPU_CHECK_REPLAYS=${GPU_CHECK_REPLAYS:-10000}

mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
stop_mps() {
    echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
    for _ in $(seq 50); do pgrep nvidia-cuda-mps >/dev/null || return 0; sleep 0.1; done
}
trap stop_mps EXIT

summary="$LOGDIR/summary.txt"
: >"$summary"
failures=0
for n in $RANKS; do
    log="$LOGDIR/gpu_check_np$n.log"
    # A fresh MPS server per rank count: a job killed by `timeout` must not leave state behind
    # that fails the next one.
    nvidia-cuda-mps-control -d || { echo "could not start MPS"; exit 2; }
    start=$(date +%s)
    timeout -k 10 "$PER_RUN" mpirun --oversubscribe -np "$n" \
        -x CUDA_MPS_PIPE_DIRECTORY -x TPCOMM_CUSTOM_MAX_BYTES -x TPCOMM_CACHE_DIR \
        -x TPCOMM_TIMEOUT_MS -x GPU_CHECK_REPLAYS \
        "$BIN" "$@" >"$log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    result=$(grep -E "passed, [0-9]+ failed" "$log" | tail -1)
    [ "$rc" -eq 124 ] && result="TIMED OUT after ${PER_RUN}s"
    line="np=$n rc=$rc ${took}s: ${result:-no summary line (see $log)}"
    echo "$line" | tee -a "$summary"
    [ "$rc" -ne 0 ] && failures=$((failures + 1))
    stop_mps
done
echo "rank counts failed: $failures" | tee -a "$summary"
exit "$failures"
