#!/usr/bin/env bash
# The GPU acceptance check in one offline command: `scripts/gpu_check.sh --help` for the stages.
#   PYTHON=python3 scripts/gpu_check.sh --out results/gpu/NAME      (make gpu-check does this)
# PYTHON: any Python with a CUDA build of torch (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: PYTHON=$PYTHON is not an executable Python" >&2
  exit 2
fi
exec "$PYTHON" -m pkm_lm.gpucheck "$@"
