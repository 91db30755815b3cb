#!/usr/bin/env bash
# Quick start 2: set up, lint, then run every test suite (core, scene, ui) on the CPU; then the
# GUI side again under Python 3.12 (Slicer 5.10 and newer) without the packages DiffSeg installs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup312.sh
export QT_QPA_PLATFORM=offscreen
# UTF-8 mode: a library in the suite can switch the C locale to ASCII mid-run, and text files and child output are UTF-8
export PYTHONUTF8=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -n 2 --durations=15 Testing "$@"
# Python 3.12: the core must at least compile; the Slicer-side modules and the panel run for real.
.venv312/bin/python -m compileall -q DiffSegCore DiffSegExtension Testing
.venv312/bin/python -m pytest -q -p no:cacheprovider Testing/ui Testing/scene/test_module.py \
  Testing/scene/test_gui_imports.py Testing/scene/test_slicer_api.py Testing/scene/test_dependencies.py \
  Testing/scene/test_registry_panel.py
