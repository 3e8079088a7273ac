#!/usr/bin/env bash
# Installs what `make train` / `make test` need into the current Python environment, and (as root with
# apt) the system packages the tests use. Safe to run again: it only installs what is missing.
#
#   scripts/bootstrap.sh python [EXTRAS]   torch (pinned, only when absent) + this package, editable
#   scripts/bootstrap.sh system            OpenMPI, SLURM (slurmctld, slurmd, client), munge
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# A known-good torch for machines that have none. An installed torch is never replaced.
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

python_deps() {
  local extras=${1:-dev}
  if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "bootstrap: torch is not installed; installing $TORCH_PIN"
    "$PYTHON" -m pip install -q --root-user-action=ignore "$TORCH_PIN"
  fi
  # Build requirements first, so the editable install runs without build isolation (no second download
  # and no CMake build of the CUDA library: `make build` builds that one into build/cuda).
  "$PYTHON" -m pip install -q --root-user-action=ignore "scikit-build-core>=1.0" "nvidia-cutlass>=4.0"
  "$PYTHON" -m pip install -q --root-user-action=ignore --no-build-isolation --config-settings=cmake.define.DUALFLOW_CUDA=OFF -e ".[$extras]"
}

system_deps() {
  local want=(openmpi-bin libopenmpi-dev slurmd slurmctld slurm-client munge)
  local missing=()
  for pkg in "${want[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "bootstrap: not root or no apt-get; the tests that need ${missing[*]} will be skipped with a reason"
    return 0
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

case "${1:-}" in
  python) python_deps "${2:-dev}" ;;
  system) system_deps ;;
  *) echo "usage: $0 python [EXTRAS] | system" >&2; exit 2 ;;
esac
