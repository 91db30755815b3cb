"""Progress reporting: a terminal bar, JSON lines for the Slicer worker, or nothing."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from DiffSegCore.events import CASE_STAGES, DONE, ERROR, NOTE, STAGES, done_event, encode


class RunProgress:
    """Reports (stage, step, member, fraction, message) for a run over several cases (events.py)."""

    def __init__(self, mode: str = "text", cases: int = 1, stream: TextIO | None = None):
        self.mode = mode
        self.cases = max(cases, 1)
        self.case_index = 0
        self.case = ""
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self.reached = 0.0  # the largest fraction reported: worker processes report their cases interleaved
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
        for name in CASE_STAGES:
            weight = STAGES[name][1]
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
        fraction = 1.0 if stage == DONE else self.fraction(stage, within) if stage in CASE_STAGES else None
        if fraction is not None:
            fraction = self.reached = max(fraction, self.reached)  # the bar never goes back
        if self.mode == "json":
            self._write({
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
            })
        elif self.bar is not None:
            if fraction is not None:
                self.bar.n = round(fraction * 100)
            self.bar.set_description_str(f"{self.case} {stage}"[:40].ljust(28), refresh=False)
            if stage in (DONE, ERROR):
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
            self.report(NOTE, message)
        elif self.mode == "text":
            tqdm.write(message, file=sys.stderr)

    def finish(self, outputs: dict[str, dict[str, str]], settings: dict[str, dict], message: str) -> None:
        """The final event: each case's output paths and the settings that ran (events.done_event)."""
        if self.mode == "json":
            self._write({**done_event(outputs, settings, message), "elapsed": round(time.monotonic() - self.started, 3)})
        elif self.bar is not None:
            self.report(DONE, message)

    def _write(self, event: dict) -> None:
        self.stream.write(encode(event) + "\n")
        self.stream.flush()
