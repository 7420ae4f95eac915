#!/usr/bin/env bash
# The multi-GPU run: one rank per GPU of this machine, everything the single-GPU runs cannot show.
#   1. topology: GPUs, P2P and NVLink between every pair as tpcomm detects them;
#   2. the GPU test suite at 1, 2, 4 and 8 ranks (as many as there are GPUs), and device calls
#      across two pretend nodes (TPCOMM_FAKE_NODES=2: the hierarchy, then flat NCCL; results
#      within the error NCCL's order of addition can make);
#   3. allreduce_perf bf16 8 B..1 GiB, graph mode and eager, every device algorithm forced in turn
#      and the dispatch's choice, each with NCCL measured in the same run (--compare nccl), and
#      Communicator::tune() once (table saved in $OUT);
#   4. deterministic mode against the default mode, 1 MiB..1 GiB;
#   5. every quick codec against tpcomm's exact two-shot in the same run, 1..64 MiB, with its
#      error columns (NCCL's times for the same sizes are in perf_graph_nccl: the INT4 target
#      is at least 2x NCCL's bus bandwidth from 16 MiB on 8 GPUs). Built from commit 2264130
#      instead, the same step measures the quick variant whose ranks read the reduced shards
#      from their owners' inboxes (12-15% faster at 8 ranks on one shared GPU, where reads and
#      writes of an inbox are local): keep it if it also wins across GPUs.
# Every run is under `timeout`; logs go to $OUT (default ./multi-gpu-logs). On a machine with one
# GPU it runs what fits (1 rank), which is the dry run of this script.
#
# NVLink multicast stays off: the NCCL_* settings of the machine (NCCL_NVLS_ENABLE=0 and the
# like) are forwarded to every rank unchanged, and tpcomm never calls cuMulticastCreate.
#
# Usage: mpirun-scripts/multi_gpu.sh
# Environment:
#   BIN_DIR   folder holding gpu_check and allreduce_perf (default target/release/examples)
#   PER_RUN   seconds per run (default 300)
#   PERF_MAX  largest message of the sweeps (default 1G; a dry run uses less)
set -u
BIN_DIR=${BIN_DIR:-target/release/examples}
PER_RUN=${PER_RUN:-300}
PERF_MAX=${PERF_MAX:-1G}
LOGDIR=${OUT:-./multi-gpu-logs}
mkdir -p "$LOGDIR"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export TPCOMM_CACHE_DIR=${TPCOMM_CACHE_DIR:-/tmp/tpcomm-cache}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
[ "$gpus" -ge 1 ] || { echo "no GPU visible"; exit 2; }
forward=()
for v in $(env | grep -oE '^(TPCOMM|NCCL)_[A-Z_]*'); do forward+=(-x "$v"); done
ranks=()
for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && ranks+=("$n"); done
top=${ranks[-1]}
summary="$LOGDIR/summary.txt"
: >"$summary"
failures=0
run() { # log-name ranks command...
    local log="$LOGDIR/$1.log" n=$2; shift 2
    local start=$SECONDS
    timeout -k 10 "$PER_RUN" mpirun --oversubscribe -np "$n" "${forward[@]}" "$@" >"$log" 2>&1
    local rc=$?
    local line
    line=$(grep -E "passed, [0-9]+ failed|Out of bounds" "$log" | tail -1)
    [ "$rc" -eq 124 ] && line="TIMED OUT after ${PER_RUN}s"
    echo "$(basename "$log" .log) np=$n rc=$rc $((SECONDS - start))s ${line}" | tee -a "$summary"
    [ "$rc" -ne 0 ] && failures=$((failures + 1))
}
nvidia-smi topo -m >"$LOGDIR/nvidia_topo.txt" 2>&1
run topology "$top" "$BIN_DIR/gpu_check" --topology
for n in "${ranks[@]}"; do
    run "gpu_check_np$n" "$n" "$BIN_DIR/gpu_check"
done
if [ "$top" -ge 2 ]; then
    # Two pretend nodes: device calls cross "nodes": the hierarchy (IPC kernels in each node,
    # NCCL per local index between them) up to the staging size, flat NCCL above; forced too.
    TPCOMM_FAKE_NODES=2 run perf_fake_nodes "$top" -x TPCOMM_FAKE_NODES \
        "$BIN_DIR/allreduce_perf" -d bfloat16 -b 8 -e 64M -f 4 -n 20 -w 3 -G 10
    TPCOMM_FAKE_NODES=2 run perf_fake_nodes_eager "$top" -x TPCOMM_FAKE_NODES \
        "$BIN_DIR/allreduce_perf" -d bfloat16 -b 8 -e 8M -f 4 -n 20 -w 3 --algo hier
fi
perf=("$BIN_DIR/allreduce_perf" -d bfloat16 -b 8 -f 2 -n 20 -w 3 --compare nccl)
# Forced algorithms up to the largest message they take (packet buffer 1M, staging 8M).
for algo in auto:$PERF_MAX packet:1M lamport:1M packet2:1M oneshot:8M twoshot:8M nccl:$PERF_MAX; do
    run "perf_graph_${algo%%:*}" "$top" "${perf[@]}" -e "${algo##*:}" -G 10 --algo "${algo%%:*}"
done
run perf_eager_auto "$top" "${perf[@]}" -e "$PERF_MAX" --algo auto
TPCOMM_TUNE_FILE="$LOGDIR/tuned_table.txt" run tune "$top" -x TPCOMM_TUNE_FILE \
    "$BIN_DIR/allreduce_perf" --autotune --show-dispatch -d bfloat16 -b 4K -e 64M -f 4 -n 20 -w 3 -G 10
run perf_default "$top" "$BIN_DIR/allreduce_perf" -d bfloat16 -b 1M -e "$PERF_MAX" -f 4 -n 20 -w 3 -G 10
TPCOMM_DETERMINISTIC=1 run perf_deterministic "$top" -x TPCOMM_DETERMINISTIC \
    "$BIN_DIR/allreduce_perf" -d bfloat16 -b 1M -e "$PERF_MAX" -f 4 -n 20 -w 3 -G 10
for codec in int8 int6 int4 fp8; do
    run "perf_quick_$codec" "$top" "$BIN_DIR/allreduce_perf" -d bfloat16 -b 1M -e 64M -f 2 -n 20 -w 3 -G 10 \
        --quick "$codec"
done
echo "runs failed: $failures" | tee -a "$summary"
exit "$failures"
