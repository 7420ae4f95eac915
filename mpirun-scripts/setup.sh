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
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install a Rust toolchain (https://rustup.rs), then run this again" >&2
  exit 1
fi
