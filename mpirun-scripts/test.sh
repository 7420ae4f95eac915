#!/usr/bin/env bash
# The project's test command: installs missing system packages, checks formatting and lints,
# runs every unit, integration (MPI jobs of 1-4 ranks) and doc test, then runs the example
# programs under mpirun as self-checking smoke tests. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash mpirun-scripts/setup.sh
# A toolchain setup.sh installed with rustup lives in ~/.cargo/bin.
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
# The NVRTC library of the nvidia-cuda-nvrtc wheel, for the kernel compile tests.
nvrtc_lib=$(python3 -c 'import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], "lib"))' 2>/dev/null || true)
[ -n "$nvrtc_lib" ] && export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test 2>&1
for cuda in cuda-12080 cuda-12040; do
  echo "== cargo check --features $cuda (older CUDA driver bindings)"
  cargo check --lib --quiet --no-default-features --features $cuda
done
echo "== the rocm feature (HIP runtime through hip-runtime-sys; Debian's HIP 5.2, no AMD GPU)"
export HIP_PATH="${HIP_PATH:-/usr}"
cargo clippy --all-targets --features rocm --quiet -- -D warnings
cargo test --lib --features rocm hip 2>&1
# A ROCm build without an AMD GPU: Communicator::init_device is a typed Unsupported, host memory still works.
cargo test --features rocm --test host_mpi -- device_unsupported 2>&1
# The device layer's host logic (plans, chunking, hierarchy, registration) in the ROCm build, on the CPU stand-in.
cargo test --features rocm --test host_mpi -- mock 2>&1
echo "== examples under mpirun"
cargo build --release --examples --quiet
passed=0 failed=0
for n in 1 2 3; do
  if timeout 120 bash mpirun-scripts/mpirun.sh -n $n target/release/examples/hello_allreduce; then
    passed=$((passed + 1))
  else
    echo "FAILED: hello_allreduce, $n ranks"; failed=$((failed + 1))
  fi
  if timeout 300 bash mpirun-scripts/mpirun.sh -n $n target/release/examples/allreduce_perf -b 8 -e 1M -f 8 -n 5 -w 1 \
      >/tmp/tpcomm-perf-$n.log 2>&1; then
    passed=$((passed + 1)); tail -3 /tmp/tpcomm-perf-$n.log
  else
    echo "FAILED: allreduce_perf, $n ranks"; cat /tmp/tpcomm-perf-$n.log; failed=$((failed + 1))
  fi
done
echo "examples: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
