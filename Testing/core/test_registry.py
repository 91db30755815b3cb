"""The model registry against real bundles, a real cache folder and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
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
from DiffSegCore.io.atomic import HOST, owned_prefix
from DiffSegCore.models import registry
from DiffSegCore.models.bundle import load_bundle
from DiffSegCore.models.downloads import ChecksumError
from DiffSegCore.resources import resource_path
from Testing.conftest import make_tiny_bundle
from Testing.core.conftest import tmpfs
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
    shipped = json.loads((resource_path("Models", "hippocampus") / "model.json").read_text())["version"]
    assert default.current.version == shipped and default.current.source == "bundled"
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


def test_cli_info_shows_the_recorded_validation_and_the_model_it_was_measured_on(lab, tmp_path, capsys):
    dice = {"Anterior hippocampus": 0.9004, "Posterior hippocampus": 0.8776}
    figures = {"cases": 40, "mean_foreground_dice": 0.889, "dice": dice}
    recipe = {"id": "cli-model", "version": "1.0.0", "split": {"train_cases": 160, "validation": ["a", "b"]}}
    meta = {"metrics": {"validation": figures}, "training": {"validated_recipe": recipe}}
    assert run_cli("import", str(make_tiny_bundle(tmp_path / "m", id="cli-model", version="2.0.0", **meta))) == 0
    capsys.readouterr()
    assert run_cli("info", "cli-model") == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    at = lines.index("validation: mean foreground Dice 0.889 (Anterior hippocampus 0.900, Posterior hippocampus 0.878) on 40 cases")
    assert lines[at + 1] == (
        "(measured on cli-model 1.0.0, the same recipe trained on 160 cases; this version trained on every development case)"
    )
    run_cli("info", "lab-model")  # nothing installed, nothing measured: no such line
    assert "validation:" not in capsys.readouterr().out


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


# --- models from outside: the intake gate (docs/reliability.md, "Models and registries from outside") ---------------


@dataclass
class Cli:
    code: int
    err: str


def models_cli(capsys, *argv) -> Cli:
    """`diffseg models ...` through the real entry point; the exit code and stderr."""
    capsys.readouterr()
    code = run_cli(*map(str, argv))
    return Cli(code, capsys.readouterr().err)


def refused(result: Cli, *words: str) -> str:
    """Exit 2 and one `error:` line holding every word."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def bundle_zip(out: Path, files: dict[str, bytes], links: dict[str, str] = {}) -> Path:  # noqa: B006 (read only)
    """A zip holding `files` (member name -> bytes, deflated) and symbolic-link members."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, target)
    return out


def bundle_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_links_in_an_imported_folder_are_refused_and_never_followed(lab, tmp_path, capsys):
    folder = make_tiny_bundle(tmp_path / "linked", id="linked", version="1.0.0")
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the cache")
    (folder / "loop").symlink_to(".")  # copying this followed it forever
    (folder / "elsewhere").symlink_to(outside)
    message = refused(models_cli(capsys, "import", folder), "is a symbolic link", str(folder))
    assert "elsewhere" in message or "loop" in message
    assert cache_files(lab) == []
    (folder / "loop").unlink()
    (folder / "elsewhere").unlink()
    (folder / "notes.txt").symlink_to(outside / "secret.txt")  # a link to a file, too
    refused(models_cli(capsys, "import", folder), "notes.txt", "symbolic link")
    zipped = bundle_zip(tmp_path / "linked.zip", bundle_files(make_tiny_bundle(tmp_path / "z", id="z")),
                        links={"escape": "/etc"})  # fmt: skip
    refused(models_cli(capsys, "import", zipped), "escape", "symbolic link")
    assert cache_files(lab) == []


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "sub/../../evil.txt", "C:/evil.txt", "..\\evil.txt"])
def test_members_named_outside_the_bundle_are_refused_not_skipped(lab, tmp_path, capsys, name):
    files = bundle_files(make_tiny_bundle(tmp_path / "b", id="escaper"))
    zipped = bundle_zip(tmp_path / "escaper.zip", {**files, name: b"payload"})
    refused(models_cli(capsys, "import", zipped), "points outside the bundle", "refused")
    assert cache_files(lab) == []
    assert not (tmp_path.parent / "evil.txt").exists() and not (lab.home / "evil.txt").exists()


def test_zip_bombs_are_refused_before_anything_is_unpacked(lab, tmp_path, capsys):
    files = bundle_files(make_tiny_bundle(tmp_path / "b", id="bomb"))
    # 64 MiB of zeros deflate to about 64 kB: a ratio no weights reach.
    bomb = bundle_zip(tmp_path / "bomb.zip", {**files, "diffusion.safetensors": bytes(64 << 20)})
    assert bomb.stat().st_size < 1 << 20
    refused(models_cli(capsys, "import", bomb), "diffusion.safetensors", "more than 100 times", "refused")
    # A model.json bigger than 1 MiB is never read into memory, however it compresses.
    meta = json.loads(files["model.json"])
    meta["description"] = os.urandom(800_000).hex()
    fat = bundle_zip(tmp_path / "fat.zip", {**files, "model.json": json.dumps(meta).encode()})
    refused(models_cli(capsys, "import", fat), "model.json", "more than the 1048576")
    assert cache_files(lab) == []


def test_member_count_and_total_size_are_bounded(lab, tmp_path, capsys, monkeypatch):
    from DiffSegCore.models import intake

    files = bundle_files(make_tiny_bundle(tmp_path / "b", id="many"))
    crowded = bundle_zip(tmp_path / "many.zip", {**files, **{f"notes/{i}.txt": b"x" for i in range(70)}})
    refused(models_cli(capsys, "import", crowded), "more than 64 files")
    folder = make_tiny_bundle(tmp_path / "wide", id="wide")
    for i in range(70):
        (folder / f"{i}.txt").write_text("x")
    refused(models_cli(capsys, "import", folder), "more than 64 files")
    monkeypatch.setattr(intake, "MAX_TOTAL_BYTES", 100_000)  # the real limit is 8 GiB
    refused(models_cli(capsys, "import", tmp_path / "b"), "unpacks to", "refused")
    assert cache_files(lab) == []


def test_a_bundle_zipped_on_macos_is_imported_without_its_debris(lab, tmp_path, capsys):
    files = bundle_files(make_tiny_bundle(tmp_path / "mac", id="mac-model", version="1.0.0"))
    zipped = bundle_zip(
        tmp_path / "mac.zip",
        {
            **{f"mac-model/{name}": data for name, data in files.items()},
            "mac-model/.DS_Store": b"\0\0\0\1Bud1",
            "__MACOSX/mac-model/._model.json": b"\0\5\26\7",
            "__MACOSX/._mac-model": b"\0\5\26\7",
        },
    )
    assert models_cli(capsys, "import", zipped).code == 0
    installed = lab.home / "models" / "mac-model" / "1.0.0"
    assert sorted(p.name for p in installed.iterdir()) == sorted([*files, "install.json"])
    assert registry.resolve_model("mac-model") == installed


def test_classes_that_do_not_match_the_network_are_refused_at_import_and_at_segment(lab, tmp_path, capsys):
    folder = make_tiny_bundle(tmp_path / "three", id="three", version="1.0.0")
    meta = json.loads((folder / "model.json").read_text())
    meta["network"]["num_classes"] = meta["preseg_network"]["num_classes"] = 3  # as exported bundles say it
    meta["classes"].append({"value": 3, "name": "Third"})  # the networks still have 3 outputs (2 classes + background)
    (folder / "model.json").write_text(json.dumps(meta))
    refused(models_cli(capsys, "import", folder), "lists 3 classes", "num_classes 3", "can never run")
    assert cache_files(lab) == []
    capsys.readouterr()
    code = cli.main(["segment", str(folder), "--model", str(folder), "--output-dir", str(tmp_path / "out"), "--progress", "none"])
    refused(Cli(code, capsys.readouterr().err), "lists 3 classes", "can never run")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_segment_with_a_bundle_folder_checks_its_model_json(lab, tmp_path, capsys):
    folder = make_tiny_bundle(tmp_path / "flat", id="flat", spacing=[1.0, 0, 1.0])
    capsys.readouterr()
    code = cli.main(["segment", str(folder), "--model", str(folder), "--output-dir", str(tmp_path / "out"), "--progress", "none"])
    refused(Cli(code, capsys.readouterr().err), "model.json", "is invalid", "(at spacing/1)")


def test_import_errors_name_the_users_bundle_not_the_staging_copy(lab, tmp_path, capsys):
    folder = make_tiny_bundle(tmp_path / "cut", id="cut", version="1.0.0")
    weights = folder / "diffusion.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = refused(models_cli(capsys, "import", folder), str(folder), "corrupt or truncated", "export the bundle again")
    assert ".staging-" not in message and "re-download" not in message
    assert cache_files(lab) == []


def test_an_interrupted_import_says_nothing_was_added(lab, tmp_path, capsys, monkeypatch):
    from DiffSegCore.models import intake

    folder = make_tiny_bundle(tmp_path / "slow", id="slow", version="1.0.0")
    real_copy = intake.copy_members

    def copy_then_ctrl_c(members, dest, shown_as):
        real_copy(members[:1], dest, shown_as)
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "copy_members", copy_then_ctrl_c)
    result = models_cli(capsys, "import", folder)
    assert result.code == 130
    assert result.err.strip() == "error: interrupted; nothing was added to the model cache"
    assert cache_files(lab) == [] and [p.name for p in (lab.home / "models").iterdir()] == []


def test_url_registry_is_checked_before_it_replaces_the_saved_copy(lab, capsys):
    good = lab.registry_file.read_bytes()
    lab.server.files["/zoo/models.json"] = good
    url = lab.server.url("/zoo/models.json")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DIFFSEG_REGISTRY", url)
        assert [m.id for m in registry.list_models()] == ["tiny", "lab-model"]
        (saved,) = (lab.home / "registry").iterdir()
        for bad, why in (
            (b"<html>captive portal</html>", "is not valid JSON"),
            ("{}".encode("utf-16"), "is not UTF-8 text"),
            (b'{"format_version": 1, "models": [{"id": "x"}]}', "is invalid"),
        ):
            lab.server.files["/zoo/models.json"] = bad
            with pytest.warns(UserWarning, match=f"using the saved copy of the model registry .*{why}"):
                assert [m.id for m in registry.list_models()] == ["tiny", "lab-model"]
            assert saved.read_bytes() == good
        saved.unlink()
        lab.server.files["/zoo/models.json"] = b"\xff\xfe\x00garbage"
        refused(models_cli(capsys, "list"), "cannot load the model registry", "is not UTF-8 text", "maintainer")
        # A registry redirected to plain http is refused like a download.
        lab.server.redirects["/zoo/models.json"] = "http://example.org/models.json"
        refused(models_cli(capsys, "list"), "refusing plain-http", "redirected from")


def test_a_data_folder_that_cannot_be_written_is_one_line_that_says_what_to_do(lab, tmp_path, capsys, monkeypatch):
    home_file = tmp_path / "home-is-a-file"
    home_file.write_text("")
    monkeypatch.setenv("DIFFSEG_HOME", str(home_file))
    folder = make_tiny_bundle(tmp_path / "mine", id="mine", version="1.0.0")
    words = ("cannot write in the DiffSeg data folder", str(home_file), "DIFFSEG_HOME")
    refused(models_cli(capsys, "import", folder), *words)
    refused(models_cli(capsys, "download", "lab-model"), *words)
    capsys.readouterr()
    code = cli.main(["segment", str(folder), "--model", "lab-model", "--output-dir", str(tmp_path / "out"), "--progress", "none"])
    refused(Cli(code, capsys.readouterr().err), *words)
    # Listing a URL registry still works; only its offline copy cannot be saved, and it says so.
    lab.server.files["/zoo/models.json"] = lab.registry_file.read_bytes()
    monkeypatch.setenv("DIFFSEG_REGISTRY", lab.server.url("/zoo/models.json"))
    listed = models_cli(capsys, "list")
    assert listed.code == 0
    assert listed.err.startswith("warning: cannot save a copy of the model registry") and "set DIFFSEG_HOME" in listed.err
    assert len(listed.err.strip().splitlines()) == 1, listed.err
    assert home_file.read_text() == ""


def test_a_read_only_data_folder_is_one_line_that_says_what_to_do(lab, tmp_path, capsys, monkeypatch):
    home = tmp_path / "ro-home"
    with tmpfs(home, "1m", read_only=True) as mounted:
        if not mounted:
            home.chmod(0o555)
            if os.access(home, os.W_OK):
                pytest.skip("cannot make a read-only folder here (root without mount rights)")
        monkeypatch.setenv("DIFFSEG_HOME", str(home))
        folder = make_tiny_bundle(tmp_path / "mine", id="mine", version="1.0.0")
        refused(models_cli(capsys, "import", folder), "cannot write in the DiffSeg data folder", "writable")
        refused(models_cli(capsys, "download", "lab-model"), "cannot write in the DiffSeg data folder")


def test_a_zip_member_whose_data_does_not_match_its_header_is_refused(lab, tmp_path, capsys):
    files = bundle_files(make_tiny_bundle(tmp_path / "b", id="flipped", version="1.0.0"))
    zipped = tmp_path / "flipped.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        offset = archive.getinfo("diffusion.safetensors").header_offset
    raw = bytearray(zipped.read_bytes())
    raw[offset + 30 + len("diffusion.safetensors") + 5000] ^= 0xFF  # one byte of the stored weights
    zipped.write_bytes(bytes(raw))
    refused(models_cli(capsys, "import", zipped), "diffusion.safetensors", "corrupt or truncated", "CRC")
    assert cache_files(lab) == []


def test_a_bundle_used_in_place_may_link_its_weights_but_an_import_may_not(lab, tmp_path, capsys, small_case):
    # git-annex and DVC keep a folder's files elsewhere and link to them: fine where the bundle lies,
    # refused when it would be copied into the cache.
    folder = make_tiny_bundle(tmp_path / "annexed", id="annexed", version="1.0.0")
    store = tmp_path / "store"
    store.mkdir()
    (folder / "diffusion.safetensors").rename(store / "weights")
    (folder / "diffusion.safetensors").symlink_to(store / "weights")
    capsys.readouterr()
    code = cli.main(["segment", str(small_case), "--model", str(folder), "--output-dir", str(tmp_path / "out"),
                     "--steps", "1", "--ensemble", "2", "--progress", "none"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    refused(models_cli(capsys, "import", folder), "diffusion.safetensors", "is a symbolic link")
    assert cache_files(lab) == []


def test_staging_left_by_a_killed_install_is_removed_by_the_next_one(lab, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cache = lab.home / "models"
    dead = cache / f"{registry.STAGING}{HOST}-{gone.pid}-abc"
    live = cache / f"{owned_prefix(registry.STAGING)}abc"
    for folder in (dead, live):
        (folder / "bundle").mkdir(parents=True)
        (folder / "bundle" / "diffusion.safetensors").write_bytes(b"half")
    registry.import_model(make_tiny_bundle(tmp_path / "next", id="next", version="1.0.0"))
    assert not dead.exists() and live.exists()  # a live process's staging is its own
