#!/usr/bin/env bash
# mpirun with the habits tpcomm's scripts need: Open MPI allowed to run as root (containers,
# CI) and more ranks than cores (--oversubscribe). Usage: mpirun.sh -n 4 PROGRAM [ARGS...]
set -euo pipefail
if mpiexec --version 2>/dev/null | grep -qiE 'open ?mpi|openrte'; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  exec mpiexec --oversubscribe "$@"
fi
exec mpiexec "$@"
