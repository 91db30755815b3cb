#!/usr/bin/env bash
# Quick start 2: set up, lint, then run every test suite (core, scene, ui) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_QPA_PLATFORM=offscreen
.venv/bin/ruff check .
.venv/bin/python -m pytest -n 2 --durations=15 Testing "$@"
