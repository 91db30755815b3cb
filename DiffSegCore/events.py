"""The progress events a run prints with `--progress json`: the contract with the Slicer extension.

One JSON object per line. Stage names are defined here only; the extension shows STAGES' labels.
The last line is stage `done` (with every case's output paths and the settings that actually ran)
or stage `error` (with a one-line message). Stdlib only, so the Slicer GUI process can import it.
"""

from __future__ import annotations

import json
from typing import Any

# stage -> (label shown to the user, share of one case's work); sampling dominates.
STAGES: dict[str, tuple[str, float]] = {
    "load": ("Loading", 0.03),
    "preprocess": ("Preprocessing", 0.03),
    "preseg": ("Pre-segmenting", 0.04),
    "sample": ("Sampling", 0.85),
    "reduce": ("Combining members", 0.02),
    "write": ("Writing", 0.03),
    "note": ("Note", 0.0),
    "done": ("Done", 0.0),
    "error": ("Failed", 0.0),
}
CASE_STAGES = ("load", "preprocess", "preseg", "sample", "reduce", "write")  # in order, each with a share
DONE, ERROR, NOTE = "done", "error", "note"


def encode(event: dict[str, Any]) -> str:
    """One event as one line."""
    return json.dumps(event)


def decode(line: str) -> dict[str, Any] | None:
    """The event on a line of the child's output, or None for any other line (warnings, tracebacks)."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and event.get("stage") in STAGES else None


def done_event(outputs: dict[str, dict[str, str]], settings: dict[str, dict[str, Any]], message: str) -> dict:
    """The final event: per case, the path of each output (by key: segmentation, uncertainty, run, ...)
    and the settings that ran (RunSettings.to_json, with the device actually used)."""
    return {"stage": DONE, "message": message, "fraction": 1.0, "outputs": outputs, "settings": settings}
