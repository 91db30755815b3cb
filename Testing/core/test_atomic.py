"""Atomic writes: the target appears whole or not at all, and no temporary is left behind."""

from __future__ import annotations

import os
import stat

import pytest

from DiffSegCore.io.atomic import atomic_folder, atomic_path, stale_temporaries, write_text


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_clean_exit_publishes_the_file_with_the_usual_permissions(tmp_path):
    target = tmp_path / "result.nii.gz"
    with atomic_path(target, suffix=".nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".result.nii.gz.") and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    assert _mode(target) == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nii.gz"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    target = write_text(tmp_path / "config.json", "old\n")
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise error
    assert target.read_text() == "old\n"
    assert stale_temporaries(target) == [] and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_the_default_suffix_is_the_targets_so_writers_pick_the_format(tmp_path):
    with atomic_path(tmp_path / "curve.png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"png")


def test_stale_temporaries_are_those_of_one_target(tmp_path):
    (tmp_path / ".checkpoint.safetensors.abc123").write_bytes(b"")
    (tmp_path / ".other.safetensors.abc123").write_bytes(b"")
    stale = stale_temporaries(tmp_path / "checkpoint.safetensors")
    assert [p.name for p in stale] == [".checkpoint.safetensors.abc123"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "bundle"
    with atomic_folder(target) as staging:
        (staging / "model.json").write_text("{}")
        assert not target.exists()
    assert [p.name for p in target.iterdir()] == ["model.json"]
    assert _mode(target) == 0o777 & ~_umask()
    with pytest.raises(ValueError), atomic_folder(tmp_path / "broken") as staging:
        (staging / "model.json").write_text("{}")
        raise ValueError("weights missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
