"""Broken, unsafe or incompatible models through `diffseg segment`: one clear error line, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from Testing.core.conftest import assert_one_line_error, folder_entries
from Testing.core.local_http import FileServer

FAST = ("--steps", 1, "--ensemble", 1, "--progress", "none")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def refused(cli, small_case, model, out: Path, *words: str) -> str:
    message = assert_one_line_error(cli("segment", small_case, "--model", model, "--output-dir", out, *FAST), *words)
    assert folder_entries(out) == []
    return message


class _Payload:
    """Unpickling this creates a folder: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_missing_bundle_folder(cli, small_case, tmp_path):
    refused(cli, small_case, tmp_path / "no_such_bundle", tmp_path / "out", "model bundle not found", "bundle folder")


def test_unknown_model_id(cli, small_case, tmp_path):
    refused(cli, small_case, "no-such-model", tmp_path / "out", "unknown model", "diffseg models list")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights(cli, small_case, bundle_copy, tmp_path, damage):
    weights = bundle_copy / "diffusion.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    refused(cli, small_case, bundle_copy, tmp_path / "out", "corrupt or truncated", "re-download")


def test_truncated_bundle_zip(cli, small_case, tiny_bundle, tmp_path):
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(tiny_bundle.iterdir()):
            z.write(path, path.name)
    archive.write_bytes(archive.read_bytes()[:-3000])
    refused(cli, small_case, archive, tmp_path / "out", "nor a valid .zip", "re-download")


def test_weights_that_do_not_fit_the_network_config(cli, small_case, bundle_copy, tmp_path):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["network"]["widths"] = [8, 32]
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    refused(cli, small_case, bundle_copy, tmp_path / "out", "weight", "config")


@pytest.mark.parametrize("key", ["classes", "network", "diffusion"])
def test_model_json_missing_a_key(cli, small_case, bundle_copy, tmp_path, key):
    meta = json.loads((bundle_copy / "model.json").read_text())
    del meta[key]
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    refused(cli, small_case, bundle_copy, tmp_path / "out", "lacks required keys", key)


def test_model_json_not_json(cli, small_case, bundle_copy, tmp_path):
    (bundle_copy / "model.json").write_text('{"id": "tiny", ')
    refused(cli, small_case, bundle_copy, tmp_path / "out", "not valid json", "re-export")


def test_newer_format_version(cli, small_case, bundle_copy, tmp_path):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["format_version"] = 99
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    refused(cli, small_case, bundle_copy, tmp_path / "out", "format 99", "upgrade diffseg")


def test_pickled_weights_are_refused_and_never_unpickled(cli, small_case, bundle_copy, tmp_path):
    marker = tmp_path / "unpickled"
    (bundle_copy / "diffusion.safetensors").unlink()
    (bundle_copy / "preseg.safetensors").unlink()
    (bundle_copy / "diffusion.pt").write_bytes(pickle.dumps(_Payload(marker)))
    refused(cli, small_case, bundle_copy, tmp_path / "out", "pickled weights", "never loads", "safetensors")
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_never_unpickled(cli, small_case, bundle_copy, tmp_path):
    marker = tmp_path / "unpickled"
    (bundle_copy / "diffusion.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    refused(cli, small_case, bundle_copy, tmp_path / "out", "corrupt or truncated")
    assert not marker.exists()


def test_checksum_mismatch_on_first_use_leaves_no_model_and_no_outputs(
    cli, small_case, tiny_bundle, tmp_path, monkeypatch
):
    archive = tmp_path / "lab-model-1.0.0.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(tiny_bundle.iterdir()):
            z.write(path, path.name)
    good = archive.read_bytes()
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF
    home = tmp_path / "home"
    with FileServer() as server:
        server.files["/lab-model-1.0.0.zip"] = bytes(tampered)
        registry = tmp_path / "models.json"
        version = {
            "version": "1.0.0",
            "url": server.url("/lab-model-1.0.0.zip"),
            "sha256": hashlib.sha256(good).hexdigest(),
            "size": len(good),
        }
        entry = {
            "id": "lab-model",
            "title": "lab model",
            "description": "test model",
            "modality": "MR",
            "classes": [{"value": 1, "name": "a"}, {"value": 2, "name": "b"}],
            "license": "Apache-2.0",
            "citation": "",
            "expected_seconds": {"gpu": 1, "cpu": 5},
            "versions": [version],
        }
        registry.write_text(json.dumps({"format_version": 1, "models": [entry]}))
        monkeypatch.setenv("DIFFSEG_REGISTRY", str(registry))
        monkeypatch.setenv("DIFFSEG_HOME", str(home))
        refused(cli, small_case, "lab-model", tmp_path / "out", "does not match the registry")
    cached = [p for p in home.rglob("*") if p.is_file() and p.suffix != ".lock"] if home.exists() else []
    assert cached == []
