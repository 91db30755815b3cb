"""The shipped registry carries what the panel needs before a download, equal to each bundle's model.json."""

from __future__ import annotations

import json

from DiffSegCore.models.metadata import read_meta
from DiffSegCore.models.registry import list_models
from DiffSegCore.resources import resource_path


def test_registry_entries_carry_channels_defaults_and_trained_steps_of_their_bundle(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFSEG_REGISTRY", raising=False)
    monkeypatch.setenv("DIFFSEG_HOME", str(tmp_path))
    entries = json.loads(resource_path("models.json").read_text())["models"]
    assert all({"channels", "defaults", "train_steps"} <= set(entry) for entry in entries)
    for info in list_models():
        assert info.summary_meta() is not None, info.id
        if info.current.source != "bundled":
            continue
        meta = read_meta(info.current.path)
        assert info.channels == [c["name"] for c in meta["channels"]]
        assert info.defaults == meta["defaults"]
        assert info.train_steps == meta["diffusion"]["train_steps"]
        assert [(c["value"], c["name"]) for c in info.classes] == [(c["value"], c["name"]) for c in meta["classes"]]
