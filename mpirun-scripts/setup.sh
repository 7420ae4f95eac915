#!/usr/bin/env bash
# Installs what building and running tpcomm needs on Debian/Ubuntu, if it is missing:
# Open MPI (mpicc, mpiexec, libmpi), libclang (the mpi crate generates its bindings with it), and
# clang-19 / lld-19 (build.rs compiles the kernels for AMD GPUs with the rocm feature).
# Without cargo it installs a Rust toolchain with rustup (minimal profile, rustfmt and clippy).
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

need=()
command -v mpicc >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
command -v mpiexec >/dev/null 2>&1 || need+=(openmpi-bin)
ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' || need+=(libclang-dev)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# clang-19 and lld-19 compile the kernels for AMD GPUs (HIP) without ROCm (the rocm feature).
command -v clang-19 >/dev/null 2>&1 || need+=(clang-19)
command -v ld.lld-19 >/dev/null 2>&1 || need+=(lld-19)
# The HIP runtime and headers (HIP 5.2) for the `rocm` feature's build and tests; no AMD GPU needed.
[ -e /usr/include/hip/hip_runtime_api.h ] || need+=(libamdhip64-dev)
command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || need+=(curl ca-certificates)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# NVRTC without a GPU (the nvidia-cuda-nvrtc wheel) lets the tests compile every CUDA kernel.
# Best effort outside CI (without it the kernel tests say SKIPPED loudly); an error in CI (CI set).
if ! python3 -c 'import nvidia.cu13' >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
  echo "setup: installing nvidia-cuda-nvrtc (NVRTC for compiling the kernels without a GPU)"
  python3 -m pip install -q nvidia-cuda-nvrtc==13.* >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages nvidia-cuda-nvrtc==13.* >/dev/null 2>&1 \
    || {
      echo "setup: could not install nvidia-cuda-nvrtc; kernel compile tests will be skipped" >&2
      # In CI a skipped kernel compile must not pass for a green run.
      if [ -n "${CI:-}" ]; then echo "setup: CI is set, so this is an error" >&2; exit 1; fi
    }
fi
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "setup: installing a Rust toolchain with rustup (stable, minimal, rustfmt, clippy)"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y -q --profile minimal -c rustfmt -c clippy >/dev/null
fi
