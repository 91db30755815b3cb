"""A model bundle's metadata (model.json), read from a folder or a .zip without torch.

The Slicer GUI process reads a model's classes, channels and defaults through this module only.
Every way a bundle is opened (segment --model, import, download, the panel) reads model.json
here, so the same checks hold everywhere: intake's bounds, the schema, and the class and
channel counts the networks are built with.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from DiffSegCore.errors import ModelError
from DiffSegCore.models.intake import (
    MAX_MEMBER_BYTES,
    MAX_META_BYTES,
    bundle_root,
    folder_members,
    read_member,
    zip_members,
)
from DiffSegCore.resources import resource_path

if TYPE_CHECKING:
    import jsonschema

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
REQUIRED_KEYS = ("format_version", "id", "version", "title", "channels", "classes", "network", "diffusion")
DEFAULT_FIX = "re-download or re-export it"


class BundleSource:
    """Read members of a bundle folder or zip by name, within intake's bounds.

    `shown_as` names the bundle in messages (the path the user gave, not a staging copy) and `fix`
    says what to do when it is broken (re-export an import, tell the maintainer of a download).
    A folder may hold links to files only when `file_links` (used in place, never copied).
    """

    def __init__(self, path: Path, shown_as: str | None = None, fix: str = DEFAULT_FIX, file_links: bool = True):
        self.path = Path(path)
        self.shown = shown_as or str(self.path)
        self.fix = fix
        if not self.path.exists():
            raise ModelError(f"model bundle not found: {self.shown}; pass a bundle folder, a .zip or a model id")
        self.zip = None
        try:
            if self.path.is_file():
                try:
                    self.zip = zipfile.ZipFile(self.path)
                except zipfile.BadZipFile:
                    raise ModelError(f"{self.shown} is neither a bundle folder nor a valid .zip; {fix}") from None
                members = zip_members(self.zip, self.shown)
            else:
                members = folder_members(self.path, self.shown, file_links)
        except OSError as exc:
            raise ModelError(f"cannot read {self.shown} ({exc.strerror or exc}); check that you may read it") from None
        self.members = {m.name: m for m in bundle_root(members, MODEL_FILE)}

    def read(self, name: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
        member = self.members.get(name)
        if member is None:
            raise ModelError(f"model bundle {self.shown} has no {name}; it is incomplete, {self.fix}")
        return read_member(member, self.shown, limit)


@cache
def schema(name: str) -> jsonschema.protocols.Validator:
    """The validator of a schema in Resources (model.schema.json, models.schema.json)."""
    import jsonschema  # here, not at the top: the Slicer panel reads metadata before jsonschema is installed

    return jsonschema.Draft202012Validator(json.loads(resource_path(name).read_text()))


def schema_error(name: str, data: object) -> str | None:
    """The most telling way `data` breaks the schema `name`, as one line; None when it is valid."""
    import jsonschema

    error = jsonschema.exceptions.best_match(schema(name).iter_errors(data))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "top level"
    return f"{error.message[:200]} (at {where})"


def _check_counts(meta: dict, shown: str, fix: str) -> None:
    """The networks are built for len(classes) + 1 outputs and len(channels) inputs; a config saying
    otherwise could never run."""
    values = [c["value"] for c in meta["classes"]]
    if len(set(values)) != len(values):
        raise ModelError(f"{MODEL_FILE} in {shown} lists a class value twice; {fix}")
    counts = {"num_classes": len(values) + 1, "image_channels": len(meta["channels"])}
    for key in ("network", "preseg_network"):
        for name, expected in counts.items():
            found = (meta.get(key) or {}).get(name)
            if found is not None and found != expected:
                what = f"{len(values)} classes (+ background)" if name == "num_classes" else f"{expected} channels"
                raise ModelError(
                    f"{MODEL_FILE} in {shown} lists {what} but its {key} is built for {name} {found}; "
                    f"the bundle can never run, {fix}"
                )


def meta_of(source: BundleSource) -> dict:
    """model.json of a bundle, checked: size, JSON, required keys, format version, schema, counts."""
    shown, fix = source.shown, source.fix
    try:
        meta = json.loads(source.read(MODEL_FILE, limit=MAX_META_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ModelError(f"{MODEL_FILE} in {shown} is not valid JSON ({reason}); {fix}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{MODEL_FILE} in {shown} must hold a JSON object; {fix}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelError(f"{MODEL_FILE} in {shown} lacks required keys: {', '.join(missing)}; {fix}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise ModelError(
            f"model {meta.get('id')} uses bundle format {meta['format_version']}, newer than this DiffSeg "
            f"understands ({FORMAT_VERSION}); upgrade DiffSeg"
        )
    # The Slicer panel reads metadata before DiffSeg's packages are installed; every run and import
    # checks the schema again in the core's own process, where jsonschema is a dependency.
    error = schema_error("model.schema.json", meta) if importlib.util.find_spec("jsonschema") else None
    if error is not None:
        raise ModelError(f"{MODEL_FILE} in {shown} is invalid: {error}; {fix}")
    _check_counts(meta, shown, fix)
    return meta


def read_meta(path: str | Path, shown_as: str | None = None, fix: str = DEFAULT_FIX) -> dict:
    """Only the metadata, checked (no weights read)."""
    return meta_of(BundleSource(Path(path), shown_as, fix))


def held_out_cases(meta: dict) -> list[str]:
    """The cases a bundle's training held out for validation (model.json training.split.validation); [] if none."""
    return list(((meta.get("training") or {}).get("split") or {}).get("validation") or [])
