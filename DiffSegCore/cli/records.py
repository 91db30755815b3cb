"""What a command leaves behind: the command line that reproduces it, and JSON files written whole."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from DiffSegCore.errors import InputError
from DiffSegCore.io.atomic import write_text


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces these arguments (options left at their default are omitted)."""
    parts = ["diffseg", args.command]
    for action in args.parser._actions:  # argparse keeps no public list of a parser's options
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        if action.default is argparse.SUPPRESS and not value:  # --debug after a subcommand, not given
            continue
        if action.nargs == 0:
            parts.append(action.option_strings[0])
        else:
            parts += [action.option_strings[0], *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(parts)


def write_json(path: Path, data) -> None:
    """Write `data` as JSON to `path` atomically, creating its folder; a place that cannot be written is one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror or exc}); choose a writable place for it") from None
