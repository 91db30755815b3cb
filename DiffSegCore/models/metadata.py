"""A model bundle's metadata (model.json), read from a folder or a .zip without torch.

The Slicer GUI process reads a model's classes, channels and defaults through this module only.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from DiffSegCore.errors import ModelError

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
REQUIRED_KEYS = ("format_version", "id", "version", "title", "channels", "classes", "network", "diffusion")


class BundleSource:
    """Read members of a bundle folder or zip by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelError(f"model bundle not found: {self.path}; pass a bundle folder, a .zip or a model id")
        self.zip = None
        if self.path.is_file():
            try:
                self.zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile:
                raise ModelError(
                    f"{self.path} is neither a bundle folder nor a valid .zip; re-download or re-export it"
                ) from None
            names = [n for n in self.zip.namelist() if not n.endswith("/")]
            roots = {n.split("/")[0] for n in names}
            # A zip of the bundle folder itself holds one top-level folder; accept both layouts.
            self.prefix = f"{roots.pop()}/" if len(roots) == 1 and MODEL_FILE not in names else ""

    def names(self) -> list[str]:
        if self.zip is None:
            return [p.name for p in self.path.iterdir()]
        return [n[len(self.prefix) :] for n in self.zip.namelist() if n.startswith(self.prefix)]

    def read(self, name: str) -> bytes:
        try:
            if self.zip is None:
                return (self.path / name).read_bytes()
            return self.zip.read(self.prefix + name)
        except (KeyError, FileNotFoundError):
            raise ModelError(
                f"model bundle {self.path} has no {name}; it is incomplete, re-download or re-export it"
            ) from None


def meta_of(source: BundleSource) -> dict:
    try:
        meta = json.loads(source.read(MODEL_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{MODEL_FILE} in {source.path} is not valid JSON ({exc}); re-export the bundle") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{MODEL_FILE} in {source.path} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelError(f"{MODEL_FILE} in {source.path} lacks required keys: {', '.join(missing)}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise ModelError(
            f"model {meta.get('id')} uses bundle format {meta['format_version']}, newer than this DiffSeg "
            f"understands ({FORMAT_VERSION}); upgrade DiffSeg"
        )
    if not meta["classes"]:
        raise ModelError(f"{MODEL_FILE} in {source.path} lists no classes")
    return meta


def read_meta(path: str | Path) -> dict:
    """Only the metadata, checked for required keys and format version (no weights read)."""
    return meta_of(BundleSource(Path(path)))
