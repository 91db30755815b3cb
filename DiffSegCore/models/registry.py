"""The model registry: which models exist, where they are, and getting them into the local cache.

The registry is Resources/models.json (or the file or https URL in DIFFSEG_REGISTRY). Each
version of a model is either bundled (a folder shipped with DiffSeg) or a .zip download with
a sha256. Downloaded and imported bundles live in the cache under models_home():

    <home>/models/<id>/<version>/   model.json, *.safetensors, install.json (where it came from)
    <home>/downloads/               partial downloads (.part) and their locks
    <home>/locks/                   one lock per id@version, so one process installs it
    <home>/registry/                last copy of each URL registry, used when offline

torch is imported only when a bundle is validated, so listing models stays fast.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from DiffSegCore.errors import ModelError
from DiffSegCore.io.atomic import owned_prefix, remove_orphans, write_text
from DiffSegCore.models.intake import copy_members
from DiffSegCore.models.metadata import MODEL_FILE, BundleSource, meta_of, read_meta, schema_error
from DiffSegCore.models.safety import refuse_pickles
from DiffSegCore.resources import resource_path

if TYPE_CHECKING:
    from DiffSegCore.models.downloads import ByteProgress

HOME_ENV = "DIFFSEG_HOME"
REGISTRY_ENV = "DIFFSEG_REGISTRY"
INSTALL_FILE = "install.json"
MAX_REGISTRY_BYTES = 8 << 20  # a registry lists models; a bigger answer is not one
IMPORT_FIX = "fix or export the bundle again"
DOWNLOAD_FIX = "the published file is broken, tell the registry maintainer"
STAGING = ".staging-"
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # as in the schemas
_SEMVER = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?")


@dataclass
class ModelVersion:
    """One version of a model and whether it is on this machine."""

    version: str
    source: str  # "bundled" (ships with DiffSeg), "download" (registry zip) or "imported"
    installed: bool
    path: str | None  # folder to load it from, when installed
    url: str | None = None
    sha256: str | None = None
    size: int | None = None


@dataclass
class ModelInfo:
    """A model as the CLI and the Slicer panel show it; versions[0] is the current one."""

    id: str
    title: str
    description: str
    modality: str
    classes: list[dict]
    license: str
    citation: str
    expected_seconds: dict
    origin: str  # "registry" or "imported" (only in the local cache)
    versions: list[ModelVersion] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)  # input channel names; empty when the registry omits them
    defaults: dict = field(default_factory=dict)  # the model's run-setting defaults (model.json `defaults`)
    train_steps: int | None = None  # the model's trained diffusion steps (bounds steps and T')

    @property
    def current(self) -> ModelVersion:
        return self.versions[0]

    def summary_meta(self) -> dict | None:
        """What settings.resolve and the panel need of model.json, known before the bundle is downloaded
        (None when the registry entry does not carry it)."""
        if not self.channels or self.train_steps is None:
            return None
        return {
            "id": self.id,
            "channels": [{"name": name} for name in self.channels],
            "classes": self.classes,
            "defaults": self.defaults,
            "diffusion": {"train_steps": self.train_steps},
        }

    def to_json(self) -> dict:
        return {**asdict(self), "current": self.current.version}


# ---------------------------------------------------------------------------------------------
# locations


def models_home() -> Path:
    """The per-user DiffSeg data folder (DIFFSEG_HOME if set); the model cache lives in it."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("DiffSeg", appauthor=False))


def _cache_known() -> bool:
    """False only where platformdirs is missing and DIFFSEG_HOME unset: nothing was cached by this Python then."""
    return bool(os.environ.get(HOME_ENV)) or importlib.util.find_spec("platformdirs") is not None


def cache_dir() -> Path:
    """Folder holding one sub-folder per cached model id (what "Open models folder" opens)."""
    return models_home() / "models"


def _version_dir(model_id: str, version: str) -> Path:
    return cache_dir() / model_id / version


def _home_folder(name: str) -> Path:
    """A sub-folder of the data folder, created if need be (call inside _writing_home)."""
    folder = models_home() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _writing_home() -> Iterator[None]:
    """An OSError on a path inside the DiffSeg data folder (read-only, a file, full) becomes one line that
    says how to fix it; other OSErrors pass through."""
    try:
        yield
    except OSError as exc:
        home = models_home()
        where = Path(os.path.abspath(exc.filename)) if isinstance(exc.filename, (str, os.PathLike)) else None
        if where is None or not where.is_relative_to(os.path.abspath(home)):
            raise
        raise ModelError(
            f"cannot write in the DiffSeg data folder {home} ({exc.strerror or exc}); make it a writable folder "
            f"or set {HOME_ENV} to one"
        ) from None


# ---------------------------------------------------------------------------------------------
# the registry file


@dataclass(frozen=True)
class _Registry:
    location: str
    base_dir: Path | None  # folder that bundled paths are relative to; None for URL registries
    models: dict[str, dict]


def _is_url(ref: str) -> bool:
    return urlparse(ref).scheme in ("http", "https")


def _parse_registry(data: bytes, location: str) -> _Registry:
    """A registry's bytes, checked (UTF-8, JSON, schema, no id or version twice); raises ModelError."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"the model registry {location} is not UTF-8 text; tell its maintainer") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ModelError(f"the model registry {location} is not valid JSON ({reason})") from None
    if importlib.util.find_spec("jsonschema") is not None:
        error = schema_error("models.schema.json", parsed)
        if error is not None:
            raise ModelError(f"the model registry {location} is invalid: {error}")
    elif location != str(resource_path("models.json")):
        # The shipped registry is checked against its schema by the tests; another one must be checked here.
        raise ModelError(f"checking the model registry {location} needs the jsonschema package; install it first")
    models: dict[str, dict] = {}
    for entry in parsed["models"]:
        versions = [v["version"] for v in entry["versions"]]
        if entry["id"] in models or len(set(versions)) != len(versions):
            raise ModelError(f"the model registry {location} lists model {entry['id']} or one of its versions twice")
        models[entry["id"]] = entry
    base_dir = None if _is_url(location) else Path(location).expanduser().resolve().parent
    return _Registry(location, base_dir, models)


def _load_registry() -> _Registry:
    location = os.environ.get(REGISTRY_ENV) or str(resource_path("models.json"))
    if _is_url(location):
        return _fetch_registry(location)
    path = Path(location).expanduser()
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_REGISTRY_BYTES + 1)
    except OSError as exc:
        raise ModelError(f"cannot read the model registry {path} ({exc.strerror}); check {REGISTRY_ENV}") from None
    if len(data) > MAX_REGISTRY_BYTES:
        raise ModelError(f"the model registry {path} is larger than {MAX_REGISTRY_BYTES >> 20} MiB; check {REGISTRY_ENV}")
    return _parse_registry(data, location)


def _fetch_registry(url: str) -> _Registry:
    """The registry at `url`, checked before it replaces the last good copy; that copy is used when the
    network fails or the answer is not a valid registry, so cached models still resolve."""
    from DiffSegCore.models.downloads import fetch_bytes

    copy = models_home() / "registry" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".json")
    try:
        data = fetch_bytes(url, limit=MAX_REGISTRY_BYTES)
        registry = _parse_registry(data, url)
    except ModelError as exc:
        if not copy.is_file():
            raise ModelError(f"cannot load the model registry: {exc}") from None
        warnings.warn(f"using the saved copy of the model registry {url}: {exc}", stacklevel=3)
        return _parse_registry(copy.read_bytes(), url)
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        write_text(copy, data.decode("utf-8"))
    except OSError as exc:  # listing works without the copy; only offline use needs it
        warnings.warn(
            f"cannot save a copy of the model registry in {models_home()} ({exc.strerror or exc}), so it will not "
            f"be available offline; make that folder writable or set {HOME_ENV}",
            stacklevel=3,
        )
    return registry


# ---------------------------------------------------------------------------------------------
# listing


def _semver_key(version: str) -> tuple:
    """Sort key for semver strings: a pre-release sorts before its release."""
    match = _SEMVER.fullmatch(version)
    if not match:
        return (-1, -1, -1, 0, version)
    major, minor, patch, pre = match.groups()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


def _installed_versions(model_id: str) -> list[str]:
    """Cached versions of a model, newest first (staging folders start with a dot)."""
    if not _cache_known():
        return []
    folder = cache_dir() / model_id
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / MODEL_FILE).is_file()]
    return sorted(found, key=_semver_key, reverse=True)


def _read_install_record(folder: Path) -> dict:
    try:
        return json.loads((folder / INSTALL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _cached_version(model_id: str, version: str) -> ModelVersion:
    folder = _version_dir(model_id, version)
    record = _read_install_record(folder)
    return ModelVersion(
        version=version,
        source=record.get("source", "imported"),
        installed=True,
        path=str(folder),
        url=record.get("url"),
        sha256=record.get("sha256"),
    )


def _registry_version(registry: _Registry, model_id: str, spec: dict) -> ModelVersion:
    version = spec["version"]
    if "bundled" in spec:
        path = _bundled_path(registry, spec)
        installed = path is not None and (path / MODEL_FILE).is_file()
        return ModelVersion(version, "bundled", installed, str(path) if installed else None)
    folder = _version_dir(model_id, version) if _cache_known() else None
    installed = folder is not None and (folder / MODEL_FILE).is_file()
    return ModelVersion(
        version,
        "download",
        installed,
        str(folder) if installed else None,
        spec["url"],
        spec["sha256"].lower(),
        spec["size"],
    )


def _bundled_path(registry: _Registry, spec: dict) -> Path | None:
    if registry.base_dir is None:
        return None  # a registry fetched from a URL cannot point into this machine's files
    return registry.base_dir / spec["bundled"]


def _registry_info(registry: _Registry, entry: dict) -> ModelInfo:
    listed = [_registry_version(registry, entry["id"], spec) for spec in entry["versions"]]
    known = {v.version for v in listed}
    extra = [_cached_version(entry["id"], v) for v in _installed_versions(entry["id"]) if v not in known]
    fields = {k: entry[k] for k in ("id", "title", "description", "modality", "classes", "license", "citation")}
    return ModelInfo(
        **fields,
        expected_seconds=entry["expected_seconds"],
        origin="registry",
        versions=listed + extra,
        channels=[channel["name"] for channel in entry.get("channels", [])],
        defaults=dict(entry.get("defaults") or {}),
        train_steps=entry.get("train_steps"),
    )


def _imported_info(model_id: str) -> ModelInfo | None:
    versions = [_cached_version(model_id, v) for v in _installed_versions(model_id)]
    if not versions:
        return None
    try:
        meta = json.loads(Path(versions[0].path, MODEL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # damaged by hand; `diffseg models remove` still cleans it up
    return ModelInfo(
        id=model_id,
        title=meta.get("title", model_id),
        description=meta.get("description", ""),
        modality=meta.get("modality", ""),
        classes=[{"value": c.get("value"), "name": c.get("name")} for c in meta.get("classes", [])],
        license=meta.get("license", ""),
        citation=meta.get("citation", ""),
        expected_seconds=meta.get("expected_seconds", {}),
        origin="imported",
        versions=versions,
        channels=[c.get("name", "") for c in meta.get("channels", [])],
        defaults=dict(meta.get("defaults") or {}),
        train_steps=(meta.get("diffusion") or {}).get("train_steps"),
    )


def list_models() -> list[ModelInfo]:
    """Registry models (downloaded or not) in registry order, then models only in the local cache."""
    registry = _load_registry()
    infos = [_registry_info(registry, entry) for entry in registry.models.values()]
    folders = cache_dir().iterdir() if _cache_known() and cache_dir().is_dir() else []
    # Dot-folders are imports and removals in progress.
    cached = sorted(p.name for p in folders if p.is_dir() and not p.name.startswith("."))
    for model_id in cached:
        if model_id not in registry.models and (info := _imported_info(model_id)) is not None:
            infos.append(info)
    return infos


def model_info(model_id: str) -> ModelInfo:
    """One model by id (registry or cache)."""
    for info in list_models():
        if info.id == model_id:
            return info
    raise ModelError(f"unknown model '{model_id}'; `diffseg models list` shows the available ones")


# ---------------------------------------------------------------------------------------------
# resolving, downloading


def _split_ref(ref: str) -> tuple[str, str | None]:
    """`id` or `id@version`, checked so that neither can leave the cache folder."""
    model_id, _, version = ref.partition("@")
    if not _MODEL_ID.fullmatch(model_id) or (version and not _SEMVER.fullmatch(version)):
        raise ModelError(f"'{ref}' is neither an existing bundle path nor a model id like name or name@1.2.3")
    return model_id, version or None


def _looks_like_path(ref: str) -> bool:
    return os.sep in ref or "/" in ref or ref.endswith((".zip", ".json")) or ref.startswith((".", "~"))


def resolve_model(ref: str, download: bool = True, progress: ByteProgress | None = None) -> Path:
    """A bundle path for `ref`: an existing bundle path, or a model `id` / `id@version`.

    A registry model not yet in the cache is downloaded only when `download` is true (the
    user named it); `progress(bytes_done, bytes_total)` follows the download.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if _looks_like_path(ref):
        raise ModelError(f"model bundle not found: {ref}; pass a bundle folder, a .zip or a model id")
    model_id, version = _split_ref(ref)
    registry = _load_registry()
    entry = registry.models.get(model_id)
    cached = _installed_versions(model_id)
    if entry is None and not cached:
        raise ModelError(
            f"unknown model '{model_id}'; `diffseg models list` shows the available ones, or pass a bundle path"
        )
    if version is None:
        version = entry["versions"][0]["version"] if entry else cached[0]
    spec = next((v for v in entry["versions"] if v["version"] == version), None) if entry else None
    if spec is not None and "bundled" in spec:
        bundled = _bundled_path(registry, spec)
        if bundled is None or not (bundled / MODEL_FILE).is_file():
            raise ModelError(
                f"model {model_id}@{version} should ship with DiffSeg at {spec['bundled']} but is missing; reinstall DiffSeg"
            )
        return bundled
    if version in cached:
        return _version_dir(model_id, version)
    if spec is None:
        known = {v["version"] for v in entry["versions"]} if entry else set()
        available = ", ".join(sorted(known | set(cached), key=_semver_key))
        raise ModelError(f"model {model_id} has no version {version}; available: {available}")
    if not download:
        raise ModelError(
            f"model {model_id}@{version} is not downloaded yet; run `diffseg models download {model_id}@{version}`"
        )
    return _download(model_id, spec, progress)


def _download(model_id: str, spec: dict, progress: ByteProgress | None) -> Path:
    from filelock import FileLock

    from DiffSegCore.models.downloads import download_file

    version = spec["version"]
    home = models_home()
    target = _version_dir(model_id, version)
    with _writing_home(), FileLock(_home_folder("locks") / f"{model_id}@{version}.lock"):
        if (target / MODEL_FILE).is_file():
            return target  # another process installed it while we waited
        archive = download_file(
            spec["url"],
            home / "downloads" / f"{model_id}-{version}.zip",
            spec["sha256"],
            spec["size"],
            progress=progress,
        )
        record = {"source": "download", "url": spec["url"], "sha256": spec["sha256"].lower()}
        try:
            _install(archive, spec["url"], record, DOWNLOAD_FIX, expect=(model_id, version))
        finally:
            archive.unlink()  # unpacked, or unusable: fetching the same bytes again would not help
    return target


# ---------------------------------------------------------------------------------------------
# installing (download or import), removing


def _install(
    source: Path, shown: str, record: dict, fix: str, expect: tuple[str, str] | None = None, replace: bool = False
) -> dict:
    """Check a bundle, copy it into a staging folder inside the cache, check the copy, then rename it into place.

    intake's bounds, the pickle rule and model.json are checked on the source before a byte is
    copied; the weights on the copy, which is what gets published. Nothing enters
    <home>/models/<id>/<version> unless it passed every check. Messages name the bundle `shown` (the path
    or URL the user knows, never the staging copy) and end with `fix`.
    """
    from DiffSegCore.models.bundle import validate_bundle  # torch is needed only here

    bundle = BundleSource(source, shown, fix, file_links=False)  # the cache takes in no file from outside
    members = list(bundle.members.values())
    refuse_pickles(members, shown)
    meta = meta_of(bundle)
    found = (meta["id"], meta["version"])
    if expect is not None and found != expect:
        raise ModelError(
            f"{shown} holds model {found[0]}@{found[1]} but the registry entry is {expect[0]}@{expect[1]}; "
            "tell the registry maintainer"
        )
    with _writing_home():
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        remove_orphans(cache, glob.escape(STAGING))
        staging = Path(tempfile.mkdtemp(prefix=owned_prefix(STAGING), dir=cache))
        try:
            root = staging / "bundle"
            copy_members(members, root, shown)
            validate_bundle(root, shown, fix)
            record = {**record, "installed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (root / INSTALL_FILE).write_text(json.dumps(record, indent=2) + "\n")
            target = _version_dir(*found)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if not replace:
                    raise ModelError(
                        f"model {found[0]}@{found[1]} is already in the cache; remove it first "
                        f"(`diffseg models remove {found[0]}@{found[1]}`) or import with --replace"
                    )
                os.replace(target, staging / "old")
            os.replace(root, target)
            return meta
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def import_model(path: str | Path, replace: bool = False) -> str:
    """Validate a bundle folder or .zip and copy it into the cache; return its model id.

    Ids and versions published in the registry are refused, so an imported model can never
    stand in for a verified download.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise ModelError(f"{source} does not exist; pass a bundle folder or .zip")
    registry = _load_registry()
    meta = read_meta(source, str(source), IMPORT_FIX)
    entry = registry.models.get(meta["id"])
    if entry and any(v["version"] == meta["version"] for v in entry["versions"]):
        raise ModelError(
            f"{meta['id']}@{meta['version']} is a registry model; give your model another id or version in its {MODEL_FILE}"
        )
    meta = _install(source, str(source), {"source": "imported", "from": str(source.resolve())}, IMPORT_FIX, replace=replace)
    return meta["id"]


def remove_model(ref: str) -> list[str]:
    """Delete a cached model (`id`: all its versions, `id@version`: one); return what was removed."""
    model_id, version = _split_ref(ref)
    cached = _installed_versions(model_id)
    chosen = [version] if version else cached
    if not cached or (version and version not in cached):
        bundled = any("bundled" in v for v in _load_registry().models.get(model_id, {}).get("versions", []))
        hint = " (bundled models ship with DiffSeg and cannot be removed)" if bundled else ""
        raise ModelError(f"{ref} is not in the model cache {cache_dir()}{hint}")
    removed = []
    with _writing_home():
        for name in chosen:
            folder = _version_dir(model_id, name)
            # Rename first so a half-deleted folder never looks like an installed model.
            trash = folder.with_name(f".removing-{name}-{os.getpid()}")
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(f"{model_id}@{name}")
        if not any((cache_dir() / model_id).iterdir()):
            (cache_dir() / model_id).rmdir()
    return removed
