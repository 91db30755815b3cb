"""Record in a bundle's model.json what its training images were like (size, spacing, field of view,
intensities), so that a run on an input far from them says so. Nothing else in the bundle changes.

    .venv/bin/python scripts/record_training_envelope.py Resources/Models/hippocampus ../shared/data/hippocampus

The training cases are the dataset's images (imagesTr, `_0000`-style channels) less the validation
cases the model lists in training.split.validation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from DiffSegCore.io.atomic import write_text
from DiffSegCore.io.cases import collect_cases
from DiffSegCore.io.sanity import training_envelope
from DiffSegCore.io.volumes import read_channels
from DiffSegCore.models.metadata import MODEL_FILE, held_out_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="bundle folder whose model.json is updated")
    parser.add_argument("data", type=Path, help="dataset folder holding imagesTr/")
    args = parser.parse_args()
    meta_path = args.bundle / MODEL_FILE
    meta = json.loads(meta_path.read_text())
    held_out = set(held_out_cases(meta))
    cases = {name: paths for name, paths in collect_cases([args.data / "imagesTr"]).items() if name not in held_out}
    envelope = training_envelope(read_channels(paths) for paths in cases.values())
    meta["training"] = {**meta.get("training", {}), **envelope, "envelope_cases": len(cases)}
    write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"{meta_path}: {len(cases)} training cases; {json.dumps(envelope)}")


if __name__ == "__main__":
    main()
