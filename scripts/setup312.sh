#!/usr/bin/env bash
# Create .venv312: the Python of Slicer 5.10+ (3.12) with only what a fresh Slicer has or the GUI side
# needs to be tested (the slicer-core wheel, PySide6 for the test adapter, numpy, SimpleITK,
# packaging, pytest). No torch, MONAI or the packages DiffSeg installs: this venv is a fresh Slicer.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON312:-}
if [ -z "$python" ] && command -v pyenv >/dev/null; then
  python="$(pyenv root)/versions/3.12.1/bin/python3.12"
fi
if [ -z "$python" ] || [ ! -x "$python" ]; then
  python=$(command -v python3.12 || true)
fi
if [ -z "$python" ]; then
  echo "error: no Python 3.12 found; install one (e.g. pyenv install 3.12.1) or set PYTHON312" >&2
  exit 1
fi
if [ ! -x .venv312/bin/python ]; then
  echo "Creating .venv312 with $python (Slicer 5.10's Python) for the GUI-side tests..."
  "$python" -m venv .venv312
fi
log=.venv312/setup.log
: >"$log"
if ! .venv312/bin/python -m pip install -q "slicer-core>=5.8" "PySide6-Essentials>=6.6" "numpy>=1.24" \
    "SimpleITK>=2.3" "packaging>=23" "pytest>=8" >>"$log" 2>&1; then
  cat "$log" >&2
  echo "error: setting up .venv312 failed (output above, also in $log)" >&2
  exit 1
fi
