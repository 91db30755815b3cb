#!/usr/bin/env bash
# Quick start 1: set up, then segment the bundled sample case with the bundled model on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-out/demo}
.venv/bin/diffseg segment Resources/SampleData/hippocampus_sample.nii.gz \
  --model hippocampus-recycling-x0 --output-dir "$out" --preview --overwrite
echo "Outputs in $out: segmentation, uncertainty, run record and preview PNG:"
ls -1 "$out"
