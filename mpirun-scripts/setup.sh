#!/usr/bin/env bash
# Installs what building and running tpcomm needs on Debian/Ubuntu, if it is missing:
# Open MPI (mpicc, mpiexec, libmpi) and libclang (the mpi crate generates its bindings with it).
# A Rust toolchain (cargo) must already be installed (https://rustup.rs).
set -euo pipefail

need=()
command -v mpicc >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
command -v mpiexec >/dev/null 2>&1 || need+=(openmpi-bin)
ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' || need+=(libclang-dev)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# NVRTC without a GPU (the nvidia-cuda-nvrtc wheel) lets the tests compile every CUDA kernel.
# Best effort outside CI: without it the kernel tests say SKIPPED loudly.
if ! python3 -c 'import nvidia.cu13' >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
  echo "setup: installing nvidia-cuda-nvrtc (NVRTC for compiling the kernels without a GPU)"
  python3 -m pip install -q nvidia-cuda-nvrtc==13.* >/dev/null 2>&1 \
    || python3 -m pip install -q --break-system-packages nvidia-cuda-nvrtc==13.* >/dev/null 2>&1 \
    || echo "setup: could not install nvidia-cuda-nvrtc; kernel compile tests will be skipped" >&2
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install a Rust toolchain (https://rustup.rs), then run this again" >&2
  exit 1
fi
