"""Run the DiffSeg command line in a child process and collect its JSON-lines progress.

Pure Python (no Qt, no VTK): a reader thread turns stdout lines into events on a queue, and
whoever owns the scene drains the queue on its own thread (a QTimer in Slicer, a wait loop in
batch scripts and tests), so callbacks never touch MRML from a background thread. Lines that are
not progress events (warnings, pip's output, tracebacks) are kept as the run's log.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from DiffSegCore.events import DONE, ERROR, decode

# Cancel: how long the child gets to stop after the polite signal, and how long the reader thread
# gets to drain the pipe afterwards; together well under the one second the panel promises.
CANCEL_GRACE_S = 0.5
READER_JOIN_S = 0.2


@dataclass
class WorkerResult:
    """How the child process ended."""

    returncode: int | None
    cancelled: bool
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)  # case -> output key -> path
    settings: dict[str, dict] = field(default_factory=dict)  # case -> the settings that ran
    error: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.cancelled and self.returncode == 0 and not self.error


class Worker:
    """One child process; `poll()` returns the progress events received since the last call."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.args = list(args)
        self.env = env
        self.cwd = cwd
        self._events: queue.Queue[dict] = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._cancelled = False
        self._outputs: dict[str, dict[str, str]] = {}
        self._settings: dict[str, dict] = {}
        self._error = ""
        self._log: list[str] = []
        self._new_lines: queue.Queue[str] = queue.Queue()
        self.started_at = 0.0

    def start(self) -> None:
        """Start the process in its own process group so that cancel reaches its children too."""
        kwargs: dict = {}
        if sys.platform == "win32":
            # No console window per run (as slicer.util.launchConsoleProcess hides it), own group for cancel.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        self.started_at = time.monotonic()
        self._process = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=self.env,
            cwd=self.cwd,
            **kwargs,
        )
        self._reader = threading.Thread(target=self._read, name="diffseg-worker-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\n")
            if not line:
                continue
            event = decode(line)
            if event is None:
                # Warnings, library messages and tracebacks (with --debug) are the run's log.
                self._log.append(line)
                self._new_lines.put(line)
                continue
            if event["stage"] == DONE:
                self._outputs = dict(event.get("outputs") or {})
                self._settings = dict(event.get("settings") or {})
            elif event["stage"] == ERROR:
                self._error = str(event.get("message", "unknown error"))
            self._events.put(event)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at if self.started_at else 0.0

    def poll(self) -> list[dict]:
        """Progress events received since the last call (never blocks)."""
        return _drain(self._events)

    def poll_log(self) -> list[str]:
        """Log lines (everything that is not a progress event) received since the last call (never blocks)."""
        return _drain(self._new_lines)

    def running(self) -> bool:
        """True while the process runs or its output is still being read."""
        if self._process is None:
            return False
        return self._process.poll() is None or (self._reader is not None and self._reader.is_alive())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the process ended and its output is read; False on timeout."""
        if self._process is None:
            return True
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        if self._reader is not None:
            self._reader.join(timeout)
            return not self._reader.is_alive()
        return True

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None:
        """Stop the whole process tree: a polite signal first, then a kill after `grace` seconds.

        Returns within about grace + READER_JOIN_S seconds, so the GUI never waits long."""
        self._cancelled = True
        process = self._process
        if process is None or process.poll() is not None:
            return
        if sys.platform == "win32":
            # taskkill /T is the standard way to end a process together with its children on Windows.
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        else:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        if self._reader is not None:
            self._reader.join(READER_JOIN_S)

    def result(self) -> WorkerResult:
        """The outcome; call after `wait()` or once `running()` is False."""
        returncode = self._process.poll() if self._process is not None else None
        error = self._error
        if not error and not self._cancelled and returncode not in (0, None):
            tail = "; ".join(self._log[-3:])
            error = f"diffseg exited with code {returncode}" + (f": {tail}" if tail else "")
        return WorkerResult(
            returncode, self._cancelled, dict(self._outputs), dict(self._settings), error, list(self._log)
        )


def _drain(items: queue.Queue) -> list:
    """Everything in the queue now, without waiting."""
    drained = []
    while True:
        try:
            drained.append(items.get_nowait())
        except queue.Empty:
            return drained


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass
