"""Every setting of a segmentation run, defined once: name, type, choices, range, default and help.

Stdlib only, so the Slicer GUI process can show a model's defaults and build the child process's
command line without importing torch or MONAI. One run's settings are resolved once, by
`resolve`: each setting's own default, overridden by the model's `defaults` in model.json,
overridden by what the user chose; then checked against the model (one-line errors).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from DiffSegCore.errors import InputError
from DiffSegCore.uncertainty import single_member_warning

DEFAULT_MODEL = "hippocampus-recycling-x0"
SAMPLERS = ("ddim", "ddpm")
DEVICES = ("auto", "cpu", "cuda")
WINDOWS = ("auto", "full", "sliding")
PRECISIONS = ("auto", "float32", "bf16")
PRESEG_SOURCES = ("none", "model")  # or the path of a label map to start from


@dataclass(frozen=True)
class Setting:
    """One run setting as the command line, the panel, the run record and model.json know it."""

    name: str
    kind: type  # int, float, str or bool
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    model_default: bool = False  # a model's model.json `defaults` may set it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """`value` converted to this setting's type; InputError (one line, naming the flag) if unusable."""
        if value is None:
            if self.default is None:
                return None
            raise InputError(f"{self.flag} needs a value")
        try:
            if self.kind is bool:
                if not isinstance(value, bool):
                    raise ValueError
                converted = value
            elif self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                converted = int(value)
            else:
                converted = self.kind(value)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"{self.flag} must be {self.kind.__name__}, not {value!r}") from None
        if self.kind is float and not math.isfinite(converted):
            raise InputError(f"{self.flag} must be a finite number, not {value!r}")
        if self.choices is not None and converted not in self.choices:
            raise InputError(f"{self.flag} {converted} is unknown; use one of {', '.join(self.choices)}")
        low = -float("inf") if self.minimum is None else self.minimum
        high = float("inf") if self.maximum is None else self.maximum
        if self.kind in (int, float) and not low <= converted <= high:
            bounds = f"{self.minimum:g}..{self.maximum:g}" if self.maximum is not None else f">= {self.minimum:g}"
            raise InputError(f"{self.flag} {converted} is out of range; use {bounds}")
        return converted


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "steps",
        int,
        5,
        "sampling steps K, at most the model's trained diffusion steps (default: the model's)",
        minimum=1,
        maximum=1000,
        model_default=True,
    ),
    Setting(
        "ensemble",
        int,
        5,
        "ensemble members N; their disagreement is the uncertainty (default: the model's)",
        minimum=1,
        maximum=64,
        model_default=True,
    ),
    Setting(
        "sampler",
        str,
        "ddim",
        "ddim: deterministic updates; ddpm: stochastic updates (default: the model's)",
        choices=SAMPLERS,
        model_default=True,
    ),
    Setting(
        "eta", float, 0.0, "DDIM eta: 0 deterministic updates, 1 as noisy as DDPM", minimum=0.0, maximum=1.0, model_default=True
    ),
    Setting(
        "preseg",
        str,
        "none",
        "start from noise (none), from the model's pre-segmentation network (model) or from a label file (PD-DDPM)",
        model_default=True,
    ),
    Setting(
        "preseg_step",
        int,
        None,
        "training step T' a pre-segmentation is diffused to; lower trusts it more (default: half the model's chain)",
        minimum=0,
        maximum=1000,
        model_default=True,
    ),
    Setting(
        "foreground_threshold",
        float,
        0.0,
        "label a voxel foreground only where the mean foreground probability exceeds this, then its most "
        "likely class; 0: the most likely class overall (default: the model's)",
        minimum=0.0,
        maximum=0.99,
        model_default=True,
    ),
    Setting("seed", int, 0, "random seed of the members' noise", minimum=0, maximum=2**31 - 1),
    Setting("device", str, "auto", "where to run: auto (a CUDA GPU if there is one), cpu or cuda", choices=DEVICES),
    Setting("window", str, "auto", "full volume, sliding window, or auto (as memory allows)", choices=WINDOWS),
    Setting(
        "precision",
        str,
        "auto",
        "network arithmetic: float32, bf16, or auto (bf16 on GPUs and on CPUs with native bf16, else float32)",
        choices=PRECISIONS,
    ),
    Setting(
        "members_per_batch",
        int,
        None,
        "ensemble members evaluated together (default: as memory allows)",
        minimum=1,
        maximum=64,
    ),
    Setting(
        "max_memory",
        float,
        None,
        "most memory the run may plan to use, in GiB (default: a fifth of the free memory, or 80%% of a GPU's)",
        minimum=0.1,
        maximum=4096,
    ),
    Setting("per_class_variance", bool, False, "also record the variance per class in the run record"),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class RunSettings:
    """The settings one run actually uses: every value concrete and checked against its model."""

    steps: int
    ensemble: int
    sampler: str
    eta: float
    preseg: str
    preseg_step: int
    foreground_threshold: float
    seed: int
    device: str
    window: str
    precision: str
    members_per_batch: int | None
    max_memory: float | None
    per_class_variance: bool

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> RunSettings:
        """Settings read back from a run record or a progress event, each value checked."""
        _check_names(data)
        return cls(**{s.name: s.check(data.get(s.name, s.default)) for s in SETTINGS})

    def to_flags(self) -> list[str]:
        """The command-line flags that reproduce these settings exactly."""
        return to_flags(self.to_json())


def _check_names(names: Mapping[str, Any]) -> None:
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise InputError(f"unknown run settings {', '.join(unknown)}")


def schedule_steps(meta: dict) -> int:
    """Number of diffusion steps the model was trained on (its time embedding's range)."""
    return int(meta["diffusion"]["train_steps"])


def default_preseg_step(meta: dict) -> int:
    """T' when neither the user nor the model chose one: half the model's chain."""
    return (schedule_steps(meta) - 1) // 2


def resolve(meta: dict, chosen: Mapping[str, Any] | None = None) -> RunSettings:
    """The run's settings: defaults < the model's `defaults` < `chosen`; merged here and nowhere else.

    A step count the user asks for beyond what the model can take is an error; a default beyond it
    (a generic default meeting a short schedule) is lowered to what the model can take.
    """
    chosen = {k: v for k, v in (chosen or {}).items() if v is not None}
    _check_names(chosen)
    model_defaults = meta.get("defaults") or {}
    values = {}
    for setting in SETTINGS:
        value = setting.default
        if setting.model_default and model_defaults.get(setting.name) is not None:
            value = model_defaults[setting.name]
        values[setting.name] = setting.check(chosen.get(setting.name, value))
    if values["preseg_step"] is None:
        values["preseg_step"] = default_preseg_step(meta)
    trained = schedule_steps(meta)
    if values["preseg_step"] > trained - 1:
        raise InputError(
            f"--preseg-step {values['preseg_step']} is beyond model {meta.get('id')}'s trained steps; use 0..{trained - 1}"
        )
    # From a pre-segmentation, sampling covers the steps T'..0 only.
    limit = values["preseg_step"] + 1 if values["preseg"] != "none" else trained
    if values["steps"] > limit:
        if "steps" in chosen:
            where = f"from --preseg-step {values['preseg_step']}" if values["preseg"] != "none" else "in total"
            raise InputError(
                f"--steps {values['steps']} is more than model {meta.get('id')} can take {where} ({limit}); use 1..{limit}"
            )
        values["steps"] = limit
    return RunSettings(**values)


def setting_warnings(settings: RunSettings) -> list[str]:
    """What the user should know about settings that run but may not give what they expect (one line each)."""
    return [warning for warning in [single_member_warning(settings.ensemble)] if warning]


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: tuple[str, ...] = ()) -> None:
    """Register the settings (all, or those in `names`) as options; an option left out parses as None."""
    for setting in SETTINGS:
        if names and setting.name not in names:
            continue
        if setting.kind is bool:
            parser.add_argument(setting.flag, action="store_true", default=None, help=setting.help)
        else:
            parser.add_argument(setting.flag, type=setting.kind, choices=setting.choices, help=setting.help)


def chosen_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (options left out are not in the result)."""
    return {name: value for name, value in vars(args).items() if name in BY_NAME and value is not None}


def to_flags(values: Mapping[str, Any]) -> list[str]:
    """Command-line flags for the given settings (None values left out, so the model's default applies)."""
    _check_names(values)
    flags: list[str] = []
    for name, value in values.items():
        setting = BY_NAME[name]
        value = setting.check(value)
        if value is None or (setting.kind is bool and not value):
            continue
        flags += [setting.flag] if setting.kind is bool else [setting.flag, str(value)]
    return flags



# How a folder run uses the machine: worker processes, each with a share of the cases, and torch threads per
# process. Not RunSettings: a run resumes whatever they were, and they change outputs only by rounding (the summation
# order of the network's arithmetic depends on the threads: 3e-5 of the variance in float32, 4e-3 under bf16).
WORKERS_HELP = (
    "worker processes of a folder run, each taking a share of the cases: auto (on a CPU run of several cases one "
    "per physical core, one torch thread each, as many as fit a whole volume each in memory; 1 on a GPU or for "
    "one case) or a number"
)
THREADS = Setting(
    "threads",
    int,
    None,
    "torch threads per process (default: torch's, one per core; with several workers, the cores shared among them)",
    minimum=1,
    maximum=4096,
)


def workers_value(text: str) -> int | None:
    """--workers: 'auto' (None) or a whole number of processes >= 1 (argparse type; its message on a bad value)."""
    if text == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a whole number of processes >= 1")
    return count


def worker_plan(
    workers: int | None, threads: int | None, device: str, cases: int, cores: int, fit: int | None = None
) -> tuple[int, int | None]:
    """(worker processes, torch threads per process or None for torch's default) for a folder run.

    Args:
        workers: --workers (None: auto).
        threads: --threads (None: as the workers leave it).
        device: the run's device type, cpu or cuda.
        cases: cases this process is to segment.
        cores: physical CPU cores this process may use (under torchrun: its share of the node's).
        fit: the most workers that each fit a whole volume in their part of the memory (None: no limit).

    Auto: one worker per core on a CPU run of several cases, or per --threads cores, as the small hippocampus volumes
    leave a second thread of one process half idle (docs/results.md, section 8), but no more than `fit`: a worker
    squeezed into a sliding window does more work, where large volumes keep a process's threads busy anyway. One on a
    GPU, which a single process keeps busy. Never more workers than cases; workers share the cores unless --threads
    says otherwise.
    """
    if workers is None:
        workers = 1 if device == "cuda" else min(max(1, cores // (threads or 1)), fit or cores)
    workers = max(1, min(workers, cases))
    if threads is None and workers > 1:
        threads = max(1, cores // workers)
    return workers, threads
