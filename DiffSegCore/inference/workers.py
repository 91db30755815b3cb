"""A folder run in several worker processes, each segmenting its share of the cases with its own torch threads.

Small volumes leave torch's intra-op threads half idle (a hippocampus case is about 35x51x35 voxels), so on a CPU
several one-thread processes, one per core, get through a folder faster than one process with every core
(docs/results.md, section 8). Each worker runs `cohort.segment_cases` on its share (`ranks.Distributed.share`,
the split torchrun ranks use), so skipping complete cases, reporting failed ones and the cohort table are the same
as in one process. On Linux workers are forked once the model is loaded and share it; elsewhere they are spawned
and load it again. They report progress and each case's outcome through a pipe; the parent relays the progress,
restarts a worker that died (its unfinished case fails, the rest go on) and, on Ctrl-C or SIGTERM, stops them:
a worker finishes the outputs it is writing (each case's outputs appear together or not at all) and exits.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

import SimpleITK as sitk
import torch

from DiffSegCore.errors import RuntimeFault, one_line
from DiffSegCore.inference.cohort import FAILED, CaseOutcome, input_files, segment_cases
from DiffSegCore.inference.memory import workers_that_fit
from DiffSegCore.inference.pipeline import OutputOptions, plan_case
from DiffSegCore.inference.plan import free_memory_bytes, resolve_device, share_memory
from DiffSegCore.inference.ranks import Distributed
from DiffSegCore.models.bundle import ModelBundle, load_bundle
from DiffSegCore.progress import RunProgress
from DiffSegCore.settings import RunSettings

# Forked workers share the loaded model, which spares each the import of torch and the model's loading; fork is
# safe for CPU workers of one thread each (segment_in_workers spawns others). macOS and Windows spawn.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
STOP_SECONDS = 60.0  # how long a stopped worker may take to finish the outputs it is writing, then it is killed
_inherited: ModelBundle | None = None  # the parent's loaded model, which forked workers use


def physical_cores() -> int:
    """CPU cores this process may run on, a core's hardware threads counted once, within a cgroup CPU quota."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        try:  # Linux names each logical CPU's core by the list of its hardware threads
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    quota = _cgroup_cpu_quota()
    return max(1, min(len(cores), quota) if quota else len(cores))


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole CPUs a cgroup v2 quota allows this process ('max': no quota), or None."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def workers_that_fit_case(bundle: ModelBundle, inputs: list[Path], settings: RunSettings, most: int) -> int:
    """memory.workers_that_fit for one case's volume (read here) and the free memory now; `most` if it cannot be
    read (the case then fails in its turn, as any unreadable case does)."""
    try:
        shape, _ = plan_case(bundle, inputs, settings)
    except Exception:
        return most
    device = resolve_device(settings.device)
    meta = {**bundle.meta, "network": bundle.network.config}
    return workers_that_fit(meta, shape, settings, device.type, free_memory_bytes(device), most)


@dataclass
class WorkerJob:
    """What one worker needs (picklable, for spawn): its share of the cases and the run's settings."""

    rank: int
    workers: int
    threads: int
    model: str  # the bundle's path, loaded again by a spawned worker
    cases: dict[str, list[Path]]
    output_dir: Path
    settings: RunSettings
    options: OutputOptions
    inputs: set[Path]  # every input file of the run, which no output may replace
    overlap: bool | None = None  # reading and writing beside the network (None: on a GPU only)
    debug: bool = False


class RelayedProgress(RunProgress):
    """A worker's progress, sent to the parent, which reports it (one bar, one stream of JSON lines)."""

    def __init__(self, connection: Connection):
        super().__init__("none")
        self.connection = connection

    def send(self, *message) -> None:
        try:
            self.connection.send(message)
        except OSError:  # the parent is gone: stop as on Ctrl-C
            raise KeyboardInterrupt from None

    def start_case(self, index: int, name: str) -> None:
        super().start_case(index, name)
        self.send("start", name)

    def report(self, stage: str, message: str = "", **fields) -> None:
        self.send("report", self.case, stage, message, fields)

    def result(self, line: str) -> None:
        self.send("result", line)

    def note(self, message: str) -> None:
        self.send("note", message)


def _stop_once(signum, frame) -> None:
    """Ctrl-C or SIGTERM in a worker: stop once (the writes under way finish), deaf to the signals that follow."""
    # A handler that does nothing, not SIG_IGN: Python raises OSError for a signal already pending under SIG_IGN.
    signal.signal(signal.SIGINT, _deaf)
    signal.signal(signal.SIGTERM, _deaf)
    raise KeyboardInterrupt


def _deaf(signum, frame) -> None:
    """A worker that is stopping already."""


def _work(job: WorkerJob, connection: Connection) -> None:
    """A worker process: segment the job's cases, sending progress and each case's outcome to the parent."""
    signal.signal(signal.SIGINT, _stop_once)
    signal.signal(signal.SIGTERM, _stop_once)
    try:
        torch.set_num_threads(job.threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(job.threads)  # reading, resampling: the same share of cores
        share_memory(job.workers)
        device = resolve_device(job.settings.device)
        bundle = _inherited if _inherited is not None else load_bundle(job.model, device)
        relay = RelayedProgress(connection)

        def on_failure(name: str, exc: Exception) -> None:
            if job.debug:
                traceback.print_exception(exc)

        segment_cases(
            bundle,
            job.cases,
            job.output_dir,
            job.settings,
            job.options,
            relay,
            overlap=device.type == "cuda" if job.overlap is None else job.overlap,  # on a CPU the others fill the cores
            on_failure=on_failure,
            on_outcome=lambda outcome: relay.send("outcome", replace(outcome, error=None)),  # errors may not pickle
            inputs=job.inputs,
        )
        relay.send("end")
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a failure outside any one case (a spawned worker loading the model): say why, briefly
        if job.debug:
            traceback.print_exception(exc)
        connection.send(("fatal", one_line(exc)))
        sys.exit(1)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: Connection
    cases: dict[str, list[Path]]  # its share not yet settled
    current: str | None = None  # the case it is on
    finished: bool = False  # it sent "end"
    readable: bool = True
    settled: int = 0  # cases it has settled
    fatal: str = ""  # why it could not go on, when it said so


def exit_reason(code: int | None) -> str:
    """A worker's exit code in words."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def segment_in_workers(
    bundle: ModelBundle,
    cases: dict[str, list[Path]],
    output_dir: Path,
    settings: RunSettings,
    options: OutputOptions,
    progress: RunProgress,
    workers: int,
    threads: int | None,
    on_failure: Callable[[str, Exception], None] | None = None,
    debug: bool = False,
    start_method: str = START_METHOD,
    inputs: set[Path] | None = None,
    overlap: bool | None = None,
) -> list[CaseOutcome]:
    """`cohort.segment_cases` over `workers` processes of `threads` torch threads each: the same outcomes, in the
    order of `cases`. A case a worker died on fails (and is reported through `on_failure`); a new worker takes the
    rest of its share. KeyboardInterrupt (Ctrl-C, or SIGTERM through the CLI) stops every worker, then propagates.
    `inputs`: as for `segment_cases`; `overlap`: reading and writing beside the network in each worker (None: on a
    GPU only). One worker runs in this process (`threads` None: torch's default)."""
    global _inherited
    if workers == 1:
        if threads:
            torch.set_num_threads(threads)
        return segment_cases(bundle, cases, output_dir, settings, options, progress, overlap, on_failure, inputs=inputs)
    if start_method == "fork" and (threads != 1 or resolve_device(settings.device).type == "cuda"):
        # CUDA cannot be used again in a forked child, and GNU OpenMP (torch's CPU threads) hangs in a forked child
        # that runs more than one thread once the parent has run parallel work: fork one-thread CPU workers only.
        start_method = "spawn"
    context = multiprocessing.get_context(start_method)
    items = list(cases.items())
    inputs = input_files(cases) if inputs is None else inputs
    outcomes: dict[str, CaseOutcome] = {}
    running: dict[int, _Worker] = {}
    begun: dict[str, int] = {}  # case -> its place in the order cases were begun, for the progress fraction

    def launch(rank: int, share: dict[str, list[Path]]) -> None:
        receive, send = context.Pipe(duplex=False)
        job = WorkerJob(
            rank, workers, threads or 1, str(bundle.path), share, output_dir, settings, options, inputs, overlap, debug
        )
        process = context.Process(target=_work, args=(job, send), name=f"diffseg-worker-{rank}", daemon=True)
        with warnings.catch_warnings():  # Python 3.12+ warns of fork in a threaded process; these workers are safe
            warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
            process.start()
        send.close()  # the worker holds the sending end now: the pipe ends when the worker does
        running[rank] = _Worker(process, receive, dict(share))

    def settle(outcome: CaseOutcome) -> None:
        if outcome.status == FAILED:
            outcome = replace(outcome, error=RuntimeFault(outcome.message))
            if on_failure is not None:
                on_failure(outcome.name, outcome.error)
        outcomes[outcome.name] = outcome

    def handle(worker: _Worker, message: tuple) -> None:
        kind, *rest = message
        if kind == "start":
            worker.current = rest[0]
            begun.setdefault(rest[0], len(begun))
        elif kind == "report":
            case, stage, text, fields = rest
            progress.start_case(begun.get(case, 0), case)
            progress.report(stage, text, **fields)
        elif kind == "result":
            progress.result(rest[0])
        elif kind == "note":
            progress.note(rest[0])
        elif kind == "outcome":
            worker.cases.pop(rest[0].name, None)
            worker.current = None
            worker.settled += 1
            settle(rest[0])
        elif kind == "end":
            worker.finished = True
        elif kind == "fatal":
            worker.fatal = rest[0]

    def drain(worker: _Worker) -> None:
        while worker.readable and worker.connection.poll():
            try:
                message = worker.connection.recv()
            except Exception:  # the pipe ended, or a signal cut the worker mid-message: nothing more to read
                worker.readable = False
                return
            handle(worker, message)

    def ended(rank: int, worker: _Worker) -> None:
        """A worker exited. If it died before its share was done, the case it was on fails and a new worker takes
        the rest; if it died before it got anywhere (so would its successor), every case of its share fails."""
        worker.process.join()
        worker.connection.close()
        del running[rank]
        if worker.finished:
            return
        reason = worker.fatal or exit_reason(worker.process.exitcode)
        if worker.current is not None:
            lost = [worker.current]
        else:  # between cases: a successor can go on where it had got somewhere
            lost = [] if worker.settled else list(worker.cases)
        for name in lost:
            message = f"the worker process segmenting it stopped ({reason})"
            if not worker.fatal:
                message += "; run this case alone (--workers 1) to see why, or rerun the folder to resume"
            settle(CaseOutcome(name, FAILED, message=message))
            worker.cases.pop(name)
        if worker.cases:
            launch(rank, worker.cases)

    sys.stdout.flush()  # a forked worker flushes what it inherited unwritten: the parent's lines would appear twice
    sys.stderr.flush()
    _inherited = bundle if start_method == "fork" else None
    try:
        for rank in range(workers):
            share = dict(Distributed(rank, workers).share(items))
            if share:
                launch(rank, share)
        while running:
            wait([w.process.sentinel for w in running.values()] + [w.connection for w in running.values() if w.readable])
            for rank, worker in list(running.items()):
                alive = worker.process.is_alive()  # before reading: once it is dead, all it sent is in the pipe
                drain(worker)
                if not alive:
                    ended(rank, worker)
    except BaseException:
        stop(running.values())
        raise
    finally:
        _inherited = None
    return [outcomes[name] for name in cases]


def stop(workers) -> None:
    """Stop workers as Ctrl-C does (a Ctrl-C in the terminal has reached them already; SIGTERM from Slicer has
    not), wait for each to finish the outputs it is writing, and kill those that take longer than STOP_SECONDS."""
    workers = list(workers)
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.connection.close()
