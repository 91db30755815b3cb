#!/usr/bin/env bash
# Create .venv (if missing) and install DiffSeg with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
.venv/bin/python -m pip install -q "torch==${DIFFSEG_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
