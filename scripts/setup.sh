#!/usr/bin/env bash
# Create .venv (if missing) and install DiffSeg with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv and installing DiffSeg (the first run takes a few minutes)..."
  "$python" -m venv .venv
fi
log=.venv/setup.log
# pip's build warnings are kept in the log and shown only when something fails.
install() {
  if ! .venv/bin/python -m pip install -q "$@" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "error: installing $* failed (output above, also in $log)" >&2
    exit 1
  fi
}
: >"$log"
install --upgrade pip
# The CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
install "torch==${DIFFSEG_TORCH_VERSION:-2.13.0}"
install -e ".[test]"
