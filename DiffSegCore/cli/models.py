"""`diffseg models list | info | download | import | remove`: the registry from the command line."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

# The registry (jsonschema, requests) is imported by the sub-commands that use it, so that
# `diffseg --help` and `--version` start without it.
if TYPE_CHECKING:
    from DiffSegCore.models.registry import ModelInfo, ModelVersion


def add_models_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `models` and its sub-commands; each sets `func(args) -> int` (the exit code)."""
    parser = subparsers.add_parser(
        "models",
        help="list, download, import or remove segmentation models",
        description=(
            "Models come from the registry (Resources/models.json, or the file or URL in DIFFSEG_REGISTRY) "
            "and are cached under DIFFSEG_HOME (default: the per-user data folder)."
        ),
    )
    commands = parser.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="models in the registry and the local cache")
    listing.add_argument("--json", action="store_true", help="print a JSON array (for scripts)")
    listing.set_defaults(func=_list)

    info = commands.add_parser("info", help="details of one model")
    info.add_argument("id", metavar="ID")
    info.add_argument("--json", action="store_true", help="print a JSON object (for scripts)")
    info.set_defaults(func=_info)

    download = commands.add_parser("download", help="download a registry model into the cache")
    download.add_argument("ref", metavar="ID[@VERSION]")
    download.set_defaults(
        func=_download,
        interrupted="interrupted; nothing was added to the model cache, run the command again to resume the download",
    )

    importing = commands.add_parser("import", help="check your own bundle (.zip or folder) and add it to the cache")
    importing.add_argument("path", metavar="ZIP_OR_FOLDER")
    importing.add_argument("--replace", action="store_true", help="overwrite the same id and version in the cache")
    importing.set_defaults(func=_import, interrupted="interrupted; nothing was added to the model cache")

    remove = commands.add_parser("remove", help="delete a model (all versions, or ID@VERSION) from the cache")
    remove.add_argument("ref", metavar="ID[@VERSION]")
    remove.set_defaults(func=_remove)
    return parser


def _status(version: ModelVersion) -> str:
    if version.source == "bundled":
        return "bundled" if version.installed else "missing"
    if version.source == "download":
        return "downloaded" if version.installed else "not downloaded"
    return version.source


def _size(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.1f} MB"


def _list(args: argparse.Namespace) -> int:
    from DiffSegCore.models import registry

    models = registry.list_models()
    if args.json:
        print(json.dumps([m.to_json() for m in models], indent=2))
        return 0
    rows = [("ID", "VERSION", "STATUS", "TITLE")]
    rows += [(m.id, m.current.version, _status(m.current), m.title) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    if not models:
        print("(no models: the registry is empty and nothing was imported)")
    return 0


def _describe(model: ModelInfo) -> list[str]:
    classes = ", ".join(f"{c['value']} {c['name']}" for c in model.classes)
    seconds = model.expected_seconds
    lines = [
        f"{model.id}: {model.title}",
        f"  {model.description}" if model.description else "",
        f"  modality: {model.modality}   classes: {classes}",
        f"  licence: {model.license}",
        f"  cite: {model.citation}" if model.citation else "",
        f"  expected time per case: {seconds.get('gpu', '?')} s GPU, {seconds.get('cpu', '?')} s CPU"
        if seconds
        else "",
        "  versions (first = current):",
    ]
    for v in model.versions:
        where = v.path if v.installed else v.url
        lines.append(f"    {v.version:<12} {_status(v):<15} {_size(v.size):>9}  {where or ''}".rstrip())
        lines += [f"      {line}" for line in _measured(v)]
    return [line for line in lines if line]


def _measured(version: ModelVersion) -> list[str]:
    """The validation figures an installed version's model.json records, and on which model they were measured."""
    from DiffSegCore.errors import ModelError
    from DiffSegCore.models.metadata import read_meta

    if not version.installed:
        return []
    try:
        meta = read_meta(version.path)
    except ModelError as exc:
        return [f"not usable: {exc}"]
    figures = meta.get("metrics", {}).get("validation")
    try:
        dice = ", ".join(f"{name} {value:.3f}" for name, value in figures["dice"].items())
        mean, cases = f"{figures['mean_foreground_dice']:.3f}", int(figures["cases"])
    except (KeyError, TypeError, ValueError, AttributeError):  # none recorded, or not in `diffseg evaluate`'s form
        return []
    lines = [f"validation: mean foreground Dice {mean} ({dice}) on {cases} cases"]
    recipe = meta.get("training", {}).get("validated_recipe")
    if recipe:  # trained on every case: the figures are its split run's
        lines.append(
            f"(measured on {recipe['id']} {recipe['version']}, the same recipe trained on "
            f"{recipe['split']['train_cases']} cases; this version trained on every development case)"
        )
    return lines


def _info(args: argparse.Namespace) -> int:
    from DiffSegCore.models import registry

    model = registry.model_info(args.id)
    print(json.dumps(model.to_json(), indent=2) if args.json else "\n".join(_describe(model)))
    return 0


def _download(args: argparse.Namespace) -> int:
    from DiffSegCore.models import registry

    path = registry.resolve_model(args.ref, download=True)
    print(f"{args.ref} is ready: {path}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from DiffSegCore.models import registry

    model_id = registry.import_model(args.path, replace=args.replace)
    print(f"imported {model_id}; use it with --model {model_id}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from DiffSegCore.models import registry

    for removed in registry.remove_model(args.ref):
        print(f"removed {removed}")
    return 0
