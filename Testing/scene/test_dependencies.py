"""What DiffSeg installs into Slicer's Python matches what the core declares."""

from __future__ import annotations

import re

from conftest import ROOT
from DiffSegLib import dependencies

# Shipped with Slicer (SimpleITK, numpy) or installed through the PyTorch extension (torch).
PROVIDED_BY_SLICER = {"torch", "simpleitk", "numpy"}


def test_requirements_cover_the_core_dependencies():
    # The [project] dependencies array (a regex, as tomllib needs Python 3.11 and the project supports 3.10).
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    declared = re.findall(r'"([^"]+)"', block)
    names = {re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0].lower() for spec in declared}
    assert names - PROVIDED_BY_SLICER <= set(dependencies.REQUIREMENTS)


def test_nothing_missing_in_the_development_environment():
    assert dependencies.missing_packages() == []
    assert dependencies.torch_installed()
