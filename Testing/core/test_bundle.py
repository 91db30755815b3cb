"""Bundles: save, load (folder and zip), validate with clear errors, never unpickle."""

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from DiffSegCore.errors import ModelError
from DiffSegCore.models.bundle import load_bundle, validate_bundle
from Testing.conftest import make_tiny_bundle


def _outputs(bundle):
    x = torch.randn(1, bundle.network.in_channels, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bundle.network(x, torch.tensor([2]))


def test_round_trip_gives_the_same_network(tmp_path):
    path = make_tiny_bundle(tmp_path / "b", seed=3)
    first, second = load_bundle(path), load_bundle(path)
    assert torch.equal(_outputs(first), _outputs(second))
    assert first.preseg_network is not None and first.num_classes == 3


def test_zip_bundle_loads_like_the_folder(tmp_path):
    path = make_tiny_bundle(tmp_path / "b")
    archive = shutil.make_archive(str(tmp_path / "b"), "zip", root_dir=tmp_path, base_dir="b")
    assert torch.equal(_outputs(load_bundle(archive)), _outputs(load_bundle(path)))


def test_save_refuses_to_overwrite(tmp_path):
    path = make_tiny_bundle(tmp_path / "b")
    with pytest.raises(ModelError, match="already exists"):
        make_tiny_bundle(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("classes"), "lacks required keys: classes"),
        (lambda m: m.update(format_version=99), "newer than this DiffSeg"),
        (lambda m: m["network"].update(widths=[8, 32]), "has shape"),
    ],
)
def test_bad_metadata_is_explained(tmp_path, edit, message):
    path = make_tiny_bundle(tmp_path / "b")
    meta = json.loads((path / "model.json").read_text())
    edit(meta)
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=message):
        validate_bundle(path)


def test_truncated_weights_are_reported(tmp_path):
    path = make_tiny_bundle(tmp_path / "b")
    weights = path / "diffusion.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load_bundle(path)


def test_pickled_weights_are_refused_with_conversion_advice(tmp_path):
    path = make_tiny_bundle(tmp_path / "b")
    state = load_bundle(path).network.state_dict()
    (path / "diffusion.safetensors").unlink()
    (path / "preseg.safetensors").unlink()
    torch.save(state, path / "model.pt")
    with pytest.raises(ModelError, match=r"pickled weights.*safetensors"):
        validate_bundle(path)


def _zipped(folder, archive):
    with zipfile.ZipFile(archive, "w") as z:
        for file in sorted(folder.rglob("*")):
            z.write(file, f"{folder.name}/{file.relative_to(folder).as_posix()}")
    return archive


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("extra/old.pth", b"not even a pickle"),  # refused by name, beside valid safetensors
        ("notes.dat", pickle.dumps({"w": 1})),  # refused by content, whatever the name
    ],
)
def test_any_pickle_in_a_bundle_is_refused_by_name_or_content(tmp_path, as_zip, name, content):
    path = make_tiny_bundle(tmp_path / "b")
    (path / name).parent.mkdir(exist_ok=True)
    (path / name).write_bytes(content)
    source = _zipped(path, tmp_path / "b.zip") if as_zip else path
    with pytest.raises(ModelError, match=rf"^{name} in .* holds pickled weights.*torch.load\('{Path(name).name}'"):
        load_bundle(source)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_bundle(tmp_path / "missing")
    (tmp_path / "junk.zip").write_bytes(b"no zip here")
    with pytest.raises(ModelError, match=r"valid \.zip"):
        load_bundle(tmp_path / "junk.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("readme.txt", "nothing")
    with pytest.raises(ModelError, match=r"no model\.json"):
        load_bundle(tmp_path / "empty.zip")
