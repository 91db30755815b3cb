"""Fault injection: real `diffseg segment` and `diffseg models download` processes stopped at random points
(Ctrl-C, Slicer's Cancel = SIGTERM, or kill -9) leave only complete files in the output folder and the cache.

The points are random but seeded (printed on failure) and the loops bounded, so a run takes a few seconds
per kill. A segment run is stopped after a random number of its progress events plus a random delay,
so the kills spread over loading, sampling and writing; a download after a random share of its time.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import SimpleITK as sitk

from DiffSegCore.models.bundle import validate_bundle
from Testing.conftest import make_tiny_bundle
from Testing.core.conftest import cli_process, folder_entries
from Testing.core.local_http import FileServer
from Testing.core.test_registry import entry, published, zip_bundle

KILLS = 3
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
SEGMENT = ("--steps", 2, "--ensemble", 4, "--save-probabilities", "--progress", "json")
OUTPUTS = {"probabilities", "entropy", "seg", "uncertainty", "run"}


def stop(process, how: signal.Signals) -> int:
    process.send_signal(how)
    process.communicate(timeout=120)
    return process.returncode


def assert_only_complete_outputs(folder: Path, case: str, killed_hard: bool) -> list[str]:
    """Either no outputs or all of them, each readable in full; temporaries only after kill -9 (which no
    process can clean up after), and then only the case's hidden staging folder."""
    entries = folder_entries(folder)
    visible = [name for name in entries if not name.startswith(".")]
    hidden = [name for name in entries if name.startswith(".")]
    assert hidden == [] or (killed_hard and all(name.startswith(f".{case}.") for name in hidden)), entries
    if visible:
        assert {name.removeprefix(f"{case}_").split(".")[0] for name in visible} == OUTPUTS, visible
        for name in visible:
            if name.endswith(".nii.gz"):
                assert sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name))).size > 0
        json.loads((folder / f"{case}_run.json").read_text())
    return visible


def test_segment_killed_at_random_points_leaves_all_outputs_or_none(tiny_bundle, small_case, tmp_path):
    rng = random.Random(17)
    for attempt in range(KILLS):
        # A run prints about a dozen events; a point past the last one lets the run finish first.
        after, delay, how = rng.randint(1, 14), rng.uniform(0.0, 0.3), rng.choice(SIGNALS)
        folder = tmp_path / f"kill{attempt}"
        process = cli_process("segment", small_case, "--model", tiny_bundle, "--output-dir", folder, *SEGMENT)
        for _ in range(after):
            process.stdout.readline()
        time.sleep(delay)
        code = stop(process, how)
        where = f"attempt {attempt}: {how.name} after {after} events + {delay:.2f} s, exit {code}"
        visible = assert_only_complete_outputs(folder, "small_001", how == signal.SIGKILL)
        # Stopped before its outputs were published, a run takes back any it had moved; after, they are whole.
        assert code in (0, 130, -signal.SIGKILL) and (code != 0 or len(visible) == len(OUTPUTS)), where


def test_model_download_killed_at_random_points_leaves_only_complete_models(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "lab-model", id="lab-model", version="1.0.0", preseg_network=None)
    archive = zip_bundle(bundle, tmp_path / "lab-model-1.0.0.zip")
    registry_file = tmp_path / "models.json"
    with FileServer() as server:
        server.chunk_delay = 1.0 / (archive.stat().st_size / 4096)  # about 1 s per download
        models_json = {"format_version": 1, "models": [entry("lab-model", [published(server, archive, "1.0.0")])]}
        registry_file.write_text(json.dumps(models_json))

        def download(home: Path):
            env = {"DIFFSEG_HOME": str(home), "DIFFSEG_REGISTRY": str(registry_file)}
            return cli_process("models", "download", "lab-model", env=env)

        home = tmp_path / "home"
        rng = random.Random(17)
        for attempt in range(KILLS):
            process = download(home)
            # From the first byte on disk: about 1 s of transfer, then unpacking, checking and installing.
            delay, how = rng.uniform(0.0, 2.5), rng.choice(SIGNALS)
            deadline = time.monotonic() + 120
            while not list((home / "downloads").glob("*.part")) and process.poll() is None:
                assert time.monotonic() < deadline, "the download never started"
                time.sleep(0.02)
            time.sleep(delay)
            code = stop(process, how)
            where = f"attempt {attempt}: {how.name} after {delay:.2f} s, exit {code}"
            models = home / "models" / "lab-model"
            for version in models.iterdir() if models.is_dir() else []:
                assert version.name.startswith(".") or validate_bundle(version)["id"] == "lab-model", where
            hidden = [name for name in folder_entries(home / "models") if name.startswith(".")]
            assert hidden == [] or how == signal.SIGKILL, (where, hidden)
            downloads = folder_entries(home / "downloads")
            assert all(name.endswith((".part", ".lock")) for name in downloads), (where, downloads)
            shutil.rmtree(models / "1.0.0", ignore_errors=True)  # finished before the kill: start the next afresh

        # The next run finishes the job, resuming a partial download where one was kept.
        last = download(home)
        _, err = last.communicate(timeout=300)
        assert last.returncode == 0, err
        assert validate_bundle(home / "models" / "lab-model" / "1.0.0")["id"] == "lab-model"
        assert [n for n in folder_entries(home / "downloads") if n.endswith(".part")] == []
        # Staging folders of installs killed with -9 were removed by the next install.
        assert [n for n in folder_entries(home / "models") if n.startswith(".")] == []
