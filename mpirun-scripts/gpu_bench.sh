#!/usr/bin/env bash
# GPU benchmark of record: allreduce_perf on device memory for several rank counts sharing the
# visible GPU(s) through MPS (started here, one server per run, stopped after), CUDA graphs of 10
# calls and eager calls, bf16, 4 KiB..8 MiB, then the fused allreduce + RMSNorm sweeps (hidden
# 4096 and 8192, one-shot and two-shot, to 2 MiB), every run under `timeout`. Logs go to $OUT when set
# (the device machine's output folder), else ./gpu-bench-logs; a summary of every table is
# printed last.
#
# Usage: mpirun-scripts/gpu_bench.sh [extra allreduce_perf flags...]
# Environment:
#   PERF_BIN      the binary (default target/release/examples/allreduce_perf)
#   BENCH_RANKS   rank counts (default "2 4 8")
#   BENCH_TIMEOUT seconds per run (default 120)
#   TPCOMM_*      passed to every rank
set -u
BIN=${PERF_BIN:-target/release/examples/allreduce_perf}
RANKS=${BENCH_RANKS:-"2 4 8"}
PER_RUN=${BENCH_TIMEOUT:-120}
LOGDIR=${OUT:-./gpu-bench-logs}
mkdir -p "$LOGDIR"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps_pipe}
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mps_log}
export TPCOMM_CACHE_DIR=${TPCOMM_CACHE_DIR:-/tmp/tpcomm-cache}
export TPCOMM_CUSTOM_MAX_BYTES=${TPCOMM_CUSTOM_MAX_BYTES:-8M}
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
forward=()
for v in $(env | grep -o '^TPCOMM_[A-Z_]*') CUDA_MPS_PIPE_DIRECTORY; do forward+=(-x "$v"); done
stop_mps() { echo quit | nvidia-cuda-mps-control >/dev/null 2>&1; sleep 1; }
trap stop_mps EXIT
log="$LOGDIR/gpu_bench.log"
: >"$log"
failures=0
run() {
    local name=$1 n=$2; shift 2
    nvidia-cuda-mps-control -d || { echo "could not start MPS"; exit 2; }
    echo "=== $name: $n ranks: $*" >>"$log"
    timeout -k 10 "$PER_RUN" mpirun --oversubscribe -np "$n" "${forward[@]}" "$BIN" "$@" >>"$log" 2>&1
    local rc=$?
    echo "$name np=$n rc=$rc"
    [ "$rc" -ne 0 ] && failures=$((failures + 1))
    stop_mps
}
nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader | tee -a "$log"
for n in $RANKS; do
    run graph "$n" -d bfloat16 -b 4K -e 8M -f 2 -n 30 -w 3 -G 10 "$@"
done
for n in $RANKS; do
    run eager "$n" -d bfloat16 -b 4K -e 8M -f 8 -n 30 -w 3 "$@"
done
# The fused allreduce + RMSNorm against the split path, hidden 4096 and 8192: the fused one-shot,
# then the fused two-shot (what the dispatch takes above 256 KiB at 5-8 ranks).
for n in $RANKS; do
    for hidden in 4096 8192; do
        run fused-norm "$n" -d bfloat16 -n 20 -w 3 -G 10 -e 2M --fused-norm "$hidden"
        run fused-norm-twoshot "$n" -d bfloat16 -n 20 -w 3 -G 10 -e 2M --fused-norm "$hidden" --algo twoshot
    done
done
grep -E "^===|^ +[0-9]|Out of bounds|rror" "$log"
echo "runs failed: $failures"
[ "$failures" -eq 0 ]
