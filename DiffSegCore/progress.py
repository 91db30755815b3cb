"""Progress reporting: a terminal bar, JSON lines for the Slicer worker, or nothing."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from tqdm import tqdm

# Share of one case's work per stage; sampling dominates.
STAGE_WEIGHTS = {"load": 0.03, "preprocess": 0.03, "preseg": 0.04, "sample": 0.85, "reduce": 0.02, "write": 0.03}


class Progress:
    """Reports (stage, step, member, fraction, message) for a run over several cases."""

    def __init__(self, mode: str = "text", cases: int = 1, stream: TextIO | None = None):
        self.mode = mode
        self.cases = max(cases, 1)
        self.case_index = 0
        self.case = ""
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self.bar = (
            tqdm(
                total=100,
                desc="loading model".ljust(28),
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
                file=sys.stderr,
            )
            if mode == "text"
            else None
        )

    def start_case(self, index: int, name: str) -> None:
        self.case_index, self.case = index, name

    def fraction(self, stage: str, within: float = 0.0) -> float:
        """Fraction of the whole run done once `stage` of the current case is `within` done."""
        done = 0.0
        for name, weight in STAGE_WEIGHTS.items():
            if name == stage:
                done += weight * min(max(within, 0.0), 1.0)
                break
            done += weight
        return min((self.case_index + done) / self.cases, 1.0)

    def report(
        self,
        stage: str,
        message: str = "",
        step: int = 0,
        steps: int = 0,
        member: int = 0,
        members: int = 0,
        within: float = 0.0,
        **extra,
    ) -> None:
        fraction = 1.0 if stage == "done" else self.fraction(stage, within) if stage in STAGE_WEIGHTS else None
        if self.mode == "json":
            record = {
                "stage": stage,
                "case": self.case,
                "step": step,
                "steps": steps,
                "member": member,
                "members": members,
                "fraction": fraction,
                "message": message,
                "elapsed": round(time.monotonic() - self.started, 3),
                **extra,
            }
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        elif self.bar is not None:
            if fraction is not None:
                self.bar.n = round(fraction * 100)
            self.bar.set_description_str(f"{self.case} {stage}"[:40].ljust(28), refresh=False)
            if stage in ("done", "error"):
                self.bar.close()  # draws the final state once
            else:
                self.bar.refresh()

    def result(self, line: str) -> None:
        """A line for the user on the output stream, in text mode only, clear of the progress bar."""
        if self.mode == "text":
            tqdm.write(line, file=self.stream)

    def note(self, message: str) -> None:
        """A message for the user (warnings, fallbacks) that does not move the bar."""
        if self.mode == "json":
            self.report("note", message)
        elif self.mode == "text":
            tqdm.write(message, file=sys.stderr)
