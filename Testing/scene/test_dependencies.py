"""What DiffSeg installs into Slicer's Python matches what the core declares, with the same minimum versions."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT
from DiffSegLib import dependencies

# Shipped with Slicer (SimpleITK, numpy) or installed through the PyTorch extension (torch).
PROVIDED_BY_SLICER = {"simpleitk", "numpy"}


def declared() -> dict[str, str]:
    """The [project] dependencies array as name -> minimum (a regex: tomllib needs Python 3.11, the project supports 3.10)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    found = {}
    for spec in re.findall(r'"([^"]+)"', block):
        name, minimum = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", spec).groups()
        found[name.lower()] = minimum
    return found


def test_requirements_are_the_core_dependencies_with_their_minimum_versions():
    expected = {name: minimum for name, minimum in declared().items() if name not in PROVIDED_BY_SLICER}
    checked = {**dependencies.REQUIREMENTS, dependencies.TORCH: dependencies.TORCH_MINIMUM}
    assert checked == expected


def test_nothing_missing_in_the_development_environment():
    pytest.importorskip("torch", reason="the light Python 3.12 venv is a fresh Slicer: everything is missing there")
    assert dependencies.check_all() == []


def test_pip_gets_every_requirement_with_its_minimum():
    problems = [dependencies.Problem("monai", "1.4", None), dependencies.Problem("tqdm", "4.66", "4.0")]
    assert dependencies.pip_arguments(problems)[-2:] == ["monai>=1.4", "tqdm>=4.66"]
    assert "monai >= 1.4 (not installed)" in dependencies.summary(problems)
