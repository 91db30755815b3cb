"""Fixtures shared by every suite: the real hippocampus data and tiny real model bundles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The shared hippocampus data beside the checkout, else where the workplace keeps it; DIFFSEG_TEST_DATA overrides.
_CANDIDATES = [REPO.parent / "shared" / "data" / "hippocampus", Path("/work/shared/data/hippocampus")]
DATA = Path(os.environ.get("DIFFSEG_TEST_DATA") or next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0]))


def tiny_meta(**overrides) -> dict:
    """Metadata of a small, real (randomly initialised) 3-class bundle."""
    meta = {
        "id": "tiny",
        "version": "0.0.1",
        "title": "Tiny test model",
        "description": "randomly initialised network for plumbing tests",
        "license": "Apache-2.0",
        "modality": "MR",
        "channels": [{"name": "T1", "normalisation": {"kind": "percentile_zscore"}}],
        "spacing": [1.0, 1.0, 1.0],
        "classes": [
            {"value": 1, "name": "Anterior hippocampus", "color": [0.9, 0.3, 0.2]},
            {"value": 2, "name": "Posterior hippocampus", "color": [0.2, 0.5, 0.9]},
        ],
        "network": {"kind": "diffusion", "widths": [8, 16], "time_dim": 16},
        "preseg_network": {"kind": "unet", "widths": [8, 16]},
        "diffusion": {"schedule": "linear", "base_steps": 1001, "train_steps": 5, "prediction": "x0", "recycling": True},
        "defaults": {"steps": 5, "ensemble": 3, "sampler": "ddim", "eta": 0.0, "preseg": "none"},
    }
    meta.update(overrides)
    return meta


def make_tiny_bundle(out_dir: Path, seed: int = 0, **overrides) -> Path:
    import torch

    from DiffSegCore.models.bundle import network_config, save_bundle
    from DiffSegCore.networks.unet import build_network

    meta = tiny_meta(**overrides)
    torch.manual_seed(seed)
    network = build_network(network_config(meta, "network"))
    preseg = build_network(network_config(meta, "preseg_network")) if meta.get("preseg_network") else None
    return save_bundle(out_dir, meta, network.state_dict(), preseg.state_dict() if preseg else None)


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    if not (DATA / "imagesTr").is_dir():
        pytest.fail(f"hippocampus test data not found at {DATA}; set DIFFSEG_TEST_DATA")
    return DATA


@pytest.fixture(scope="session")
def hippocampus_case(hippocampus_dir: Path) -> tuple[Path, Path]:
    """(image, label) of one real case."""
    return hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz", hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")
