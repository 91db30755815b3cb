"""settings.py: the one definition of a run's settings, resolved once against a model."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from DiffSegCore import settings
from DiffSegCore.errors import InputError
from DiffSegCore.settings import BY_NAME, SETTINGS, RunSettings, resolve

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = json.loads((ROOT / "Resources" / "Models" / "hippocampus" / "model.json").read_text())


def meta(train_steps: int = 5, **defaults) -> dict:
    return {"id": "m", "diffusion": {"train_steps": train_steps}, "defaults": defaults}


def test_run_settings_fields_are_the_settings():
    assert [f.name for f in fields(RunSettings)] == [s.name for s in SETTINGS]


def test_precedence_is_default_then_model_then_user():
    assert resolve(meta()).ensemble == BY_NAME["ensemble"].default
    assert resolve(meta(ensemble=3)).ensemble == 3
    assert resolve(meta(ensemble=3), {"ensemble": 7}).ensemble == 7
    assert resolve(meta(ensemble=3), {"ensemble": None}).ensemble == 3  # None: not chosen


def test_the_bundled_model_resolves_to_its_recorded_defaults():
    resolved = resolve(BUNDLED)
    assert (resolved.steps, resolved.ensemble, resolved.sampler) == (1, 5, "ddim")
    assert resolved.preseg_step == (BUNDLED["diffusion"]["train_steps"] - 1) // 2


def test_steps_beyond_the_schedule_are_an_error_and_a_default_beyond_it_is_lowered():
    with pytest.raises(InputError, match=r"--steps 20 is more than model m can take in total \(5\); use 1\.\.5"):
        resolve(meta(5), {"steps": 20})
    assert resolve(meta(3)).steps == 3  # the generic default of 5 meets a 3-step model
    with pytest.raises(InputError, match=r"from --preseg-step 1 \(2\)"):
        resolve(meta(5), {"preseg": "model", "preseg_step": 1, "steps": 3})
    with pytest.raises(InputError, match=r"--preseg-step 5 is beyond"):
        resolve(meta(5), {"preseg": "model", "preseg_step": 5})


@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        ({"sampler": "euler"}, r"--sampler euler is unknown; use one of ddim, ddpm"),
        ({"device": "tpu"}, r"--device tpu is unknown; use one of auto, cpu, cuda"),
        ({"ensemble": 0}, r"--ensemble 0 is out of range; use 1\.\.64"),
        ({"eta": -1.0}, r"--eta -1\.0 is out of range; use 0\.\.1"),
        ({"eta": 1.5}, r"--eta 1\.5 is out of range; use 0\.\.1"),
        ({"eta": float("nan")}, r"--eta must be a finite number, not nan"),
        ({"eta": "inf"}, r"--eta must be a finite number, not 'inf'"),
        ({"eta": float("-inf")}, r"--eta must be a finite number, not -inf"),
        ({"members_per_batch": -1}, r"--members-per-batch -1 is out of range; use 1\.\.64"),
        ({"members_per_batch": 0}, r"--members-per-batch 0 is out of range; use 1\.\.64"),
        ({"ensemble": float("inf")}, r"--ensemble must be int, not inf"),
        ({"steps": 1.5}, r"--steps must be int, not 1\.5"),
        ({"per_class_variance": "yes"}, r"--per-class-variance must be bool"),
        ({"stepz": 2}, r"unknown run settings stepz"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_flag(chosen, message):
    with pytest.raises(InputError, match=message) as caught:
        resolve(meta(), chosen)
    assert "\n" not in str(caught.value)


def test_flags_parse_back_to_the_same_settings():
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    chosen = {"steps": 2, "ensemble": 3, "sampler": "ddpm", "eta": 0.5, "preseg": "model", "preseg_step": 3,
              "seed": 9, "device": "cpu", "window": "sliding", "members_per_batch": 2, "per_class_variance": True}
    resolved = resolve(meta(), chosen)
    parsed = settings.chosen_from_args(parser.parse_args(resolved.to_flags()))
    assert resolve(meta(), parsed) == resolved
    assert settings.chosen_from_args(parser.parse_args([])) == {}  # left out: the model's defaults apply


def test_json_round_trip_checks_values():
    resolved = resolve(meta(), {"seed": 4})
    assert RunSettings.from_json(json.loads(json.dumps(resolved.to_json()))) == resolved
    with pytest.raises(InputError, match="--sampler"):
        RunSettings.from_json({**resolved.to_json(), "sampler": "x"})


CHOICE_LISTS = {"samplers": set(settings.SAMPLERS), "devices": set(settings.DEVICES), "windows": set(settings.WINDOWS)}


def _string_collections(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            values = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            yield node.lineno, values


def test_each_choice_list_is_defined_once():
    """Only settings.py spells out the samplers, devices and windows; everything else takes them from it."""
    sources = [p for folder in ("DiffSegCore", "DiffSegExtension", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 40
    found = []
    for path in sources:
        for line, values in _string_collections(path):
            for name, choices in CHOICE_LISTS.items():
                if len(values & choices) >= 2 and path.name != "settings.py":
                    found.append(f"{path.relative_to(ROOT)}:{line} lists {name} {sorted(values & choices)}")
    assert not found, "\n".join(found)
    ui = (ROOT / "Resources" / "UI" / "DiffSeg.ui").read_text(encoding="utf-8")
    assert "<string>ddpm</string>" not in ui and "<string>cuda</string>" not in ui  # the panel fills them from Choice


def test_importing_settings_leaves_torch_out():
    code = "import sys, DiffSegCore.settings, DiffSegCore.events; print(sorted(m for m in ('torch', 'monai', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
