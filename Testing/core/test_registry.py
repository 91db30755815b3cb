"""The model registry against real bundles, a real cache folder and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from DiffSegCore.cli import main as cli
from DiffSegCore.errors import ModelError
from DiffSegCore.models import registry
from DiffSegCore.models.bundle import load_bundle
from DiffSegCore.models.downloads import ChecksumError
from DiffSegCore.resources import resource_path
from Testing.conftest import make_tiny_bundle
from Testing.core.local_http import FileServer


def zip_bundle(folder: Path, out: Path, nested: bool = False) -> Path:
    """Zip a bundle folder, its files at the root or (nested) inside one top-level folder."""
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{folder.name}/{path.name}" if nested else path.name)
    return out


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict[str, Path]:
    """Published bundle zips: lab-model 1.0.0 and 1.1.0."""
    root = tmp_path_factory.mktemp("published")
    return {
        version: zip_bundle(
            make_tiny_bundle(root / f"lab-model-{version}", id="lab-model", version=version, preseg_network=None),
            root / f"lab-model-{version}.zip",
        )
        for version in ("1.0.0", "1.1.0")
    }


def entry(model_id: str, versions: list[dict]) -> dict:
    return {
        "id": model_id,
        "title": f"{model_id} title",
        "description": "test model",
        "modality": "MR",
        "classes": [{"value": 1, "name": "Anterior hippocampus"}, {"value": 2, "name": "Posterior hippocampus"}],
        "license": "Apache-2.0",
        "citation": "",
        "expected_seconds": {"gpu": 1, "cpu": 5},
        "versions": versions,
    }


def published(server: FileServer, path: Path, version: str) -> dict:
    data = path.read_bytes()
    server.files[f"/{path.name}"] = data
    return {
        "version": version,
        "url": server.url(f"/{path.name}"),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


@dataclass
class Lab:
    server: FileServer
    home: Path
    registry_file: Path

    def write_registry(self, models: list[dict]) -> None:
        self.registry_file.write_text(json.dumps({"format_version": 1, "models": models}))


@pytest.fixture
def lab(tmp_path, monkeypatch, tiny_bundle, zips):
    """A lab's own registry: 'tiny' bundled beside it, 'lab-model' downloadable; an empty cache."""
    shutil.copytree(tiny_bundle, tmp_path / "zoo" / "Models" / "tiny")
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIFFSEG_REGISTRY", str(tmp_path / "zoo" / "models.json"))
    with FileServer() as server:
        lab = Lab(server, tmp_path / "home", tmp_path / "zoo" / "models.json")
        lab.write_registry(
            [
                entry("tiny", [{"version": "0.0.1", "bundled": "Models/tiny"}]),
                entry(
                    "lab-model", [published(server, zips["1.1.0"], "1.1.0"), published(server, zips["1.0.0"], "1.0.0")]
                ),
            ]
        )
        yield lab


def run_cli(*argv: str) -> int:
    """`diffseg models ...` in this process, through the real entry point."""
    return cli.main(["models", *argv])


def cache_files(lab: Lab) -> list[str]:
    """Everything in the cache but lock files."""
    if not lab.home.exists():
        return []
    return sorted(str(p.relative_to(lab.home)) for p in lab.home.rglob("*") if p.is_file() and p.suffix != ".lock")


def test_shipped_registry_lists_the_bundled_default(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFSEG_REGISTRY", raising=False)
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    default = registry.model_info("hippocampus-recycling-x0")
    assert default.title == "Hippocampus (MR) - recycling diffusion"
    assert default.current.version == "1.0.2" and default.current.source == "bundled"
    assert [c["value"] for c in default.classes] == [1, 2]
    if default.current.installed:  # once the trained model ships, it resolves to Resources/Models
        assert registry.resolve_model("hippocampus-recycling-x0") == resource_path("Models", "hippocampus")


def test_models_home_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFSEG_HOME", raising=False)
    assert "diffseg" in str(registry.models_home()).lower()
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    assert registry.models_home() == tmp_path
    assert registry.cache_dir() == tmp_path / "models"


def test_nothing_is_downloaded_unless_asked(lab):
    [tiny, lab_model] = registry.list_models()
    assert (tiny.current.source, tiny.current.installed) == ("bundled", True)
    assert (lab_model.current.version, lab_model.current.installed) == ("1.1.0", False)
    with pytest.raises(ModelError, match=r"not downloaded yet; run `diffseg models download lab-model@1.1.0`"):
        registry.resolve_model("lab-model", download=False)
    assert lab.server.requests == []
    assert cache_files(lab) == []


def test_first_use_downloads_verifies_and_then_uses_the_cache(lab):
    seen = []
    path = registry.resolve_model("lab-model", progress=lambda done, total: seen.append((done, total)))
    assert path == lab.home / "models" / "lab-model" / "1.1.0"
    assert seen[-1][0] == seen[-1][1] > 0
    bundle = load_bundle(path)
    assert (bundle.meta["id"], bundle.meta["version"]) == ("lab-model", "1.1.0")
    record = json.loads((path / "install.json").read_text())
    assert record["source"] == "download" and record["url"].endswith("/lab-model-1.1.0.zip")
    assert not any(name.startswith("downloads/") for name in cache_files(lab))  # the zip is gone once unpacked
    assert registry.resolve_model("lab-model") == path
    assert len(lab.server.requests) == 1
    assert registry.model_info("lab-model").current.installed


def test_a_named_version_resolves_and_an_unknown_one_is_explained(lab):
    path = registry.resolve_model("lab-model@1.0.0")
    assert load_bundle(path).meta["version"] == "1.0.0"
    with pytest.raises(ModelError, match=r"has no version 9.9.9; available: 1.0.0, 1.1.0"):
        registry.resolve_model("lab-model@9.9.9")
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        registry.resolve_model("nope")
    with pytest.raises(ModelError, match=r"model bundle not found: ./nope.zip"):
        registry.resolve_model("./nope.zip")


def test_checksum_mismatch_leaves_nothing_in_the_cache(lab, zips):
    tampered = bytearray(zips["1.1.0"].read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    lab.server.files["/lab-model-1.1.0.zip"] = bytes(tampered)
    with pytest.raises(ChecksumError, match="does not match the registry"):
        registry.resolve_model("lab-model")
    assert cache_files(lab) == []
    assert not (lab.home / "models" / "lab-model").exists()


def test_a_download_holding_another_model_is_refused(lab, zips):
    lab.write_registry([entry("mislabelled", [published(lab.server, zips["1.0.0"], "1.0.0")])])
    with pytest.raises(ModelError, match=r"holds model lab-model@1.0.0 but the registry entry is mislabelled@1.0.0"):
        registry.resolve_model("mislabelled")
    assert cache_files(lab) == []


def test_concurrent_first_uses_install_one_good_copy(lab):
    lab.server.chunk_delay = 0.002
    results, errors = [], []

    def use():
        try:
            results.append(registry.resolve_model("lab-model", progress=lambda done, total: None))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(results) == {lab.home / "models" / "lab-model" / "1.1.0"}
    assert len(lab.server.requests) == 1
    assert sorted(p.name for p in (lab.home / "models" / "lab-model").iterdir()) == ["1.1.0"]
    assert load_bundle(results[0]).meta["id"] == "lab-model"


def test_bundled_models_resolve_in_place_and_cannot_be_removed(lab):
    assert registry.resolve_model("tiny") == lab.registry_file.parent / "Models" / "tiny"
    with pytest.raises(ModelError, match="bundled models ship with DiffSeg"):
        registry.remove_model("tiny")


def test_import_folder_and_zip_then_remove(lab, tmp_path):
    folder = make_tiny_bundle(tmp_path / "mine-0.1", id="my-model", version="0.1.0", preseg_network=None)
    assert registry.import_model(folder) == "my-model"
    first = lab.home / "models" / "my-model" / "0.1.0"
    assert registry.resolve_model("my-model") == first
    assert json.loads((first / "install.json").read_text())["source"] == "imported"

    newer = make_tiny_bundle(tmp_path / "mine-0.2", seed=1, id="my-model", version="0.2.0")
    assert registry.import_model(zip_bundle(newer, tmp_path / "mine-0.2.zip", nested=True)) == "my-model"
    assert registry.resolve_model("my-model") == lab.home / "models" / "my-model" / "0.2.0"
    assert load_bundle(registry.resolve_model("my-model")).preseg_network is not None
    mine = registry.model_info("my-model")
    assert mine.origin == "imported" and [v.version for v in mine.versions] == ["0.2.0", "0.1.0"]

    with pytest.raises(ModelError, match="already in the cache"):
        registry.import_model(folder)
    registry.import_model(folder, replace=True)

    assert registry.remove_model("my-model@0.1.0") == ["my-model@0.1.0"]
    assert [v.version for v in registry.model_info("my-model").versions] == ["0.2.0"]
    assert registry.remove_model("my-model") == ["my-model@0.2.0"]
    assert "my-model" not in [m.id for m in registry.list_models()]
    with pytest.raises(ModelError, match="is not in the model cache"):
        registry.remove_model("my-model")
    for ref in ("..", "my-model@../..", "a b"):
        with pytest.raises(ModelError, match="is neither an existing bundle path nor a model id"):
            registry.remove_model(ref)


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_import_refuses_pickled_weights(lab, tmp_path, zip_format):
    import torch

    folder = make_tiny_bundle(tmp_path / "pickled", id="pickled")
    state = {"w": torch.zeros(2)}
    torch.save(state, folder / "diffusion.pt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(
        ModelError, match=r"diffusion.pt .* pickled weights.*torch.load\('diffusion.pt', weights_only=True\)"
    ):
        registry.import_model(folder)
    assert cache_files(lab) == []


def test_import_refuses_a_registry_id_and_version(lab, zips):
    with pytest.raises(ModelError, match=r"lab-model@1.1.0 is a registry model"):
        registry.import_model(zips["1.1.0"])
    assert cache_files(lab) == []


def test_import_refuses_invalid_bundles(lab, tmp_path):
    bad_version = make_tiny_bundle(tmp_path / "bad-version", version="first")
    with pytest.raises(ModelError, match=r"model.json in .* is invalid: 'first' does not match .* \(at version\)"):
        registry.import_model(bad_version)
    truncated = make_tiny_bundle(tmp_path / "truncated", id="truncated")
    weights = truncated / "diffusion.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        registry.import_model(truncated)
    with pytest.raises(ModelError, match=r"no model.json"):
        registry.import_model(lab.registry_file.parent)
    assert cache_files(lab) == []


def test_url_registry_with_offline_fallback(lab):
    lab.server.files["/zoo/models.json"] = lab.registry_file.read_bytes()
    url = lab.server.url("/zoo/models.json")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DIFFSEG_REGISTRY", url)
        assert [m.id for m in registry.list_models()] == ["tiny", "lab-model"]
        # A URL registry cannot point into this machine's files.
        with pytest.raises(ModelError, match="should ship with DiffSeg"):
            registry.resolve_model("tiny")
        del lab.server.files["/zoo/models.json"]
        with pytest.warns(UserWarning, match="saved copy of the model registry"):
            assert [m.id for m in registry.list_models()] == ["tiny", "lab-model"]
        env.setenv("DIFFSEG_REGISTRY", lab.server.url("/elsewhere.json"))
        with pytest.raises(ModelError, match=r"cannot load the model registry: .* \(HTTP 404\)"):
            registry.list_models()


def test_invalid_registries_are_reported(lab):
    lab.write_registry([entry("x", [{"version": "1.0.0", "url": "https://example.org/x.zip"}])])
    with pytest.raises(ModelError, match=r"the model registry .* is invalid"):
        registry.list_models()
    lab.write_registry(
        [entry("x", [{"version": "1.0.0", "bundled": "a"}]), entry("x", [{"version": "2.0.0", "bundled": "b"}])]
    )
    with pytest.raises(ModelError, match="lists model x or one of its versions twice"):
        registry.list_models()
    lab.registry_file.write_text("{")
    with pytest.raises(ModelError, match="is not valid JSON"):
        registry.list_models()


def test_cli_list_download_info_import_remove(lab, tmp_path, capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "VERSION", "STATUS", "TITLE"]
    assert out[1].split()[:3] == ["tiny", "0.0.1", "bundled"]
    assert out[2].split()[:4] == ["lab-model", "1.1.0", "not", "downloaded"]

    assert run_cli("download", "lab-model@1.0.0") == 0
    assert "lab-model@1.0.0 is ready" in capsys.readouterr().out
    run_cli("list", "--json")
    listed = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["lab-model"]["current"] == "1.1.0"
    assert [(v["version"], v["installed"]) for v in listed["lab-model"]["versions"]] == [
        ("1.1.0", False),
        ("1.0.0", True),
    ]

    run_cli("info", "lab-model")
    info = capsys.readouterr().out
    assert "lab-model: lab-model title" in info and "downloaded" in info and "1 Anterior hippocampus" in info

    folder = make_tiny_bundle(tmp_path / "cli-model", id="cli-model", version="2.0.0")
    assert run_cli("import", str(folder)) == 0
    assert "imported cli-model" in capsys.readouterr().out
    run_cli("list")
    assert any(line.split()[:3] == ["cli-model", "2.0.0", "imported"] for line in capsys.readouterr().out.splitlines())
    assert run_cli("remove", "cli-model") == 0
    assert capsys.readouterr().out.strip() == "removed cli-model@2.0.0"

    assert run_cli("info", "cli-model") == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: unknown model 'cli-model'; `diffseg models list` shows the available ones"
    )


def test_diffseg_models_list_as_a_command(lab):
    done = subprocess.run(
        [sys.executable, "-m", "DiffSegCore", "models", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert [m["id"] for m in json.loads(done.stdout)] == ["tiny", "lab-model"]
